//! The scheduler in an in-process cluster: the real API server, simulated
//! nodes and the scheduler, all talking over loopback HTTP. Tests wait on
//! watches with deadlines, never on sleeps.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::TryStreamExt;
use k8s_openapi::api::core::v1::{Event, Pod};
use kube::api::{Api, ListParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;

struct Cluster {
    client: kube::Client,
    _tasks: Vec<tokio::task::JoinHandle<()>>,
}

async fn cluster(sim: wasmkube_sim::SimConfig) -> Cluster {
    let api = wasmkube_apiserver::ApiServer::start(wasmkube_store::memory(), Default::default())
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let mut tasks = vec![tokio::spawn(async move {
        api.serve(listener).await.unwrap();
    })];
    let client = kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap();
    let (c1, c2) = (client.clone(), client.clone());
    let count = sim.count;
    tasks.push(tokio::spawn(async move {
        wasmkube_sim::run(c1, sim).await.unwrap();
    }));
    // The scheduler starts once every node is registered, so its first
    // list holds them all and it places no pod on a partial view (as a
    // test of spreading needs; a live scheduler would catch up on its own).
    wait_nodes(&client, count).await;
    tasks.push(tokio::spawn(async move {
        wasmkube_scheduler::run(c2, Default::default())
            .await
            .unwrap();
    }));
    Cluster {
        client,
        _tasks: tasks,
    }
}

/// Waits, through a watch, until `count` nodes are registered.
async fn wait_nodes(client: &kube::Client, count: usize) {
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    let stream = watcher(nodes, watcher::Config::default()).applied_objects();
    let mut stream = std::pin::pin!(stream);
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < count {
        let node = tokio::time::timeout(Duration::from_secs(30), stream.try_next())
            .await
            .expect("nodes registered in time")
            .unwrap()
            .unwrap();
        seen.insert(node.metadata.name.unwrap_or_default());
    }
}

/// Waits, through a watch, until `count` events in `default` match the
/// field selector; events are written after what they record, so a test
/// waits for them rather than listing once.
async fn wait_events(client: &kube::Client, fields: &str, count: usize) -> Vec<Event> {
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    let stream = watcher(events, watcher::Config::default().fields(fields)).applied_objects();
    let mut stream = std::pin::pin!(stream);
    let mut seen = BTreeMap::new();
    while seen.len() < count {
        let event: Event = tokio::time::timeout(Duration::from_secs(30), stream.try_next())
            .await
            .unwrap_or_else(|_| panic!("{count} events with {fields} in time; seen {}", seen.len()))
            .unwrap()
            .unwrap();
        seen.insert(event.metadata.name.clone().unwrap_or_default(), event);
    }
    seen.into_values().collect()
}

fn pod(name: &str, extra: serde_json::Value) -> Pod {
    let mut v = json!({"metadata": {"name": name}, "spec": {"containers": [{"name": "c", "image": "app:1"}]}});
    if let (Some(spec), Some(more)) = (v["spec"].as_object_mut(), extra.as_object()) {
        for (k, x) in more {
            spec.insert(k.clone(), x.clone());
        }
    }
    serde_json::from_value(v).unwrap()
}

/// Waits until every named pod satisfies `done`, through a watch.
async fn wait_pods(
    api: &Api<Pod>,
    names: &[String],
    done: impl Fn(&Pod) -> bool,
) -> BTreeMap<String, Pod> {
    let mut seen = BTreeMap::new();
    let stream = watcher(api.clone(), watcher::Config::default()).applied_objects();
    let mut stream = std::pin::pin!(stream);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while seen.len() < names.len() {
        let pod = tokio::time::timeout_at(deadline, stream.try_next())
            .await
            .unwrap_or_else(|_| panic!("pods not done in time; done so far: {:?}", seen.keys()))
            .unwrap()
            .unwrap();
        let name = pod.metadata.name.clone().unwrap();
        if names.contains(&name) && done(&pod) {
            seen.insert(name, pod);
        }
    }
    seen
}

fn node_of(p: &Pod) -> String {
    p.spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_default()
}

fn phase(p: &Pod) -> &str {
    p.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_are_bound_spread_and_run_on_simulated_nodes() {
    let c = cluster(wasmkube_sim::SimConfig {
        count: 3,
        ..Default::default()
    })
    .await;
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), "default");
    let names: Vec<String> = (0..6).map(|i| format!("web-{i}")).collect();
    for n in &names {
        let requests = json!({"containers": [{"name": "c", "image": "app:1", "resources": {"requests": {"cpu": "1", "memory": "1Gi"}}}]});
        pods.create(&PostParams::default(), &pod(n, requests))
            .await
            .unwrap();
    }
    let running = wait_pods(&pods, &names, |p| phase(p) == "Running").await;
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for p in running.values() {
        *per_node.entry(node_of(p)).or_default() += 1;
    }
    assert_eq!(
        per_node.values().copied().collect::<Vec<_>>(),
        [2, 2, 2],
        "least-allocated spreads: {per_node:?}"
    );
    // Each binding is recorded as a Scheduled event.
    let scheduled = wait_events(&c.client, "reason=Scheduled", names.len()).await;
    let mut for_pods: Vec<String> = scheduled
        .into_iter()
        .filter_map(|e| e.involved_object.name)
        .collect();
    for_pods.sort();
    assert_eq!(for_pods, names);
    // A pod that asks to finish does.
    let mut done = pod("once", json!({}));
    done.metadata.annotations = Some(
        [(
            wasmkube_sim::PHASE_ANNOTATION.to_string(),
            "Succeeded".to_string(),
        )]
        .into(),
    );
    pods.create(&PostParams::default(), &done).await.unwrap();
    wait_pods(&pods, &["once".into()], |p| phase(p) == "Succeeded").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_that_fits_nowhere_stays_pending_with_the_reasons() {
    let taint: k8s_openapi::api::core::v1::Taint =
        serde_json::from_value(json!({"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}))
            .unwrap();
    let c = cluster(wasmkube_sim::SimConfig {
        count: 2,
        taints: vec![taint],
        ..Default::default()
    })
    .await;
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), "default");
    pods.create(&PostParams::default(), &pod("big", json!({"containers": [{"name": "c", "image": "x", "resources": {"requests": {"memory": "64Gi"}}}]})))
        .await
        .unwrap();
    let pending = wait_pods(&pods, &["big".into()], |p| {
        p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| {
                // Nodes register one by one; the verdict is final once both are seen.
                cs.iter().any(|c| {
                    c.type_ == "PodScheduled"
                        && c.status == "False"
                        && c.message.as_deref().is_some_and(|m| m.starts_with("0/2"))
                })
            })
    })
    .await;
    let cond = pending["big"]
        .status
        .as_ref()
        .unwrap()
        .conditions
        .as_ref()
        .unwrap()
        .iter()
        .find(|c| c.type_ == "PodScheduled")
        .unwrap()
        .clone();
    assert_eq!(cond.reason.as_deref(), Some("Unschedulable"));
    assert_eq!(
        cond.message.as_deref(),
        Some("0/2 nodes are available: 2 node(s) had untolerated taint {dedicated: gpu}.")
    );
    let failed = wait_events(
        &c.client,
        "involvedObject.name=big,reason=FailedScheduling",
        1,
    )
    .await;
    assert_eq!(failed[0].type_.as_deref(), Some("Warning"));

    // A tolerating pod schedules; once it exists the untolerated one still waits.
    let tolerant = pod(
        "tolerant",
        json!({"tolerations": [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}]}),
    );
    pods.create(&PostParams::default(), &tolerant)
        .await
        .unwrap();
    let bound = wait_pods(&pods, &["tolerant".into()], |p| phase(p) == "Running").await;
    assert!(node_of(&bound["tolerant"]).starts_with("sim-"));
    let big = pods.get("big").await.unwrap();
    assert_eq!(node_of(&big), "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_high_priority_pod_preempts_lower_ones_and_admission_sets_priorities() {
    let c = cluster(wasmkube_sim::SimConfig {
        count: 1,
        cpu: "2".into(),
        ..Default::default()
    })
    .await;
    let classes: Api<k8s_openapi::api::scheduling::v1::PriorityClass> = Api::all(c.client.clone());
    for (name, value, default) in [("low", 100, true), ("high", 10_000, false)] {
        let pc = serde_json::from_value(
            json!({"metadata": {"name": name}, "value": value, "globalDefault": default}),
        )
        .unwrap();
        classes.create(&PostParams::default(), &pc).await.unwrap();
    }
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), "default");
    let cpu =
        |n: &str| json!([{"name": "c", "image": "app:1", "resources": {"requests": {"cpu": n}}}]);
    // Two low-priority pods (by the global default) fill the node.
    let mut names = Vec::new();
    for i in 0..2 {
        let created = pods
            .create(
                &PostParams::default(),
                &pod(&format!("low-{i}"), json!({"containers": cpu("1")})),
            )
            .await
            .unwrap();
        let spec = created.spec.unwrap();
        assert_eq!(
            (spec.priority, spec.priority_class_name.as_deref()),
            (Some(100), Some("low"))
        );
        names.push(format!("low-{i}"));
    }
    wait_pods(&pods, &names, |p| {
        p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
    })
    .await;
    // An unknown class is refused at admission.
    let err = pods
        .create(
            &PostParams::default(),
            &pod("nope", json!({"priorityClassName": "missing"})),
        )
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("no PriorityClass with name missing was found"),
        "{err}"
    );
    // The high-priority pod evicts exactly one low pod and takes its place.
    let high = pods
        .create(
            &PostParams::default(),
            &pod(
                "high",
                json!({"priorityClassName": "high", "containers": cpu("1")}),
            ),
        )
        .await
        .unwrap();
    assert_eq!(high.spec.unwrap().priority, Some(10_000));
    wait_pods(&pods, &["high".to_owned()], |p| {
        p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
    })
    .await;
    let all = pods.list(&ListParams::default()).await.unwrap().items;
    let low_left: Vec<&Pod> = all
        .iter()
        .filter(|p| p.metadata.name.as_deref().unwrap().starts_with("low-"))
        .collect();
    assert_eq!(low_left.len(), 1, "one victim is gone");
    let preempted = wait_events(&c.client, "reason=Preempted", 1).await;
    let victim = preempted[0].involved_object.name.as_deref().unwrap();
    assert!(
        victim.starts_with("low-")
            && !low_left
                .iter()
                .any(|p| p.metadata.name.as_deref() == Some(victim)),
        "the Preempted event names the victim: {victim}"
    );
}
