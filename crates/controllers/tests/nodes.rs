//! DaemonSets, node lifecycle (lease expiry, taints, eviction) and leader
//! election in an in-process cluster of simulated nodes.

use std::time::Duration;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use wasmkube_controllers::leader::{ElectionConfig, LeaderElector};

mod common;
use common::{Options, cluster, cluster_with, describe_pods, wait_list};

fn live(pods: &[Pod]) -> Vec<&Pod> {
    pods.iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect()
}

fn running_on(pods: &[Pod]) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = live(pods)
        .into_iter()
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .map(|p| {
            let spec = p.spec.as_ref().unwrap();
            (
                spec.node_name.clone().unwrap_or_default(),
                spec.containers[0].image.clone().unwrap_or_default(),
            )
        })
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemonsets_run_one_pod_per_eligible_node_and_roll() {
    let c = cluster().await;
    let nodes: Api<Node> = Api::all(c.client.clone());
    wait_list(&nodes, "three nodes", |ns| ns.len() == 3).await;
    // sim-2 is tainted; the daemon does not tolerate it.
    nodes
        .patch(
            "sim-2",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"taints": [{"key": "dedicated", "value": "db", "effect": "NoSchedule"}]}})),
        )
        .await
        .unwrap();
    let dss: Api<DaemonSet> = Api::namespaced(c.client.clone(), "default");
    let ds: DaemonSet = serde_json::from_value(json!({
        "metadata": {"name": "agent"},
        "spec": {"selector": {"matchLabels": {"app": "agent"}},
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
            "template": {"metadata": {"labels": {"app": "agent"}},
                "spec": {"containers": [{"name": "c", "image": "agent:1"}]}}},
    }))
    .unwrap();
    dss.create(&PostParams::default(), &ds).await.unwrap();
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), "default");
    let want = |image: &str, nodes: &[&str]| -> Vec<(String, String)> {
        nodes
            .iter()
            .map(|n| ((*n).to_owned(), image.to_owned()))
            .collect()
    };
    let v1 = want("agent:1", &["sim-0", "sim-1"]);
    wait_list(&pods, "a daemon on sim-0 and sim-1", |ps| {
        running_on(ps) == v1
    })
    .await;

    // Tolerating the taint brings the daemon to sim-2, through the scheduler.
    dss.patch(
        "agent",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"template": {"spec": {
            "containers": [{"name": "c", "image": "agent:2"}],
            "tolerations": [{"key": "dedicated", "operator": "Exists"}]}}}})),
    )
    .await
    .unwrap();
    let v2 = want("agent:2", &["sim-0", "sim-1", "sim-2"]);
    wait_list(&pods, "agent:2 everywhere", |ps| running_on(ps) == v2).await;
    let done = wait_list(&dss, "status", |ds| {
        ds[0].status.as_ref().is_some_and(|s| {
            s.desired_number_scheduled == 3
                && s.updated_number_scheduled == Some(3)
                && s.number_available == Some(3)
                && s.observed_generation == ds[0].metadata.generation
        })
    })
    .await;
    assert_eq!(done[0].status.as_ref().unwrap().number_misscheduled, 0);
    // Every daemon pod is pinned by node affinity and carries the tolerations
    // daemons get.
    let all = pods.list(&Default::default()).await.unwrap().items;
    for p in live(&all) {
        let spec = p.spec.as_ref().unwrap();
        let tolerations = spec.tolerations.as_ref().unwrap();
        assert!(
            tolerations.iter().any(
                |t| t.key.as_deref() == Some("node.kubernetes.io/unreachable")
                    && t.toleration_seconds.is_none()
            ),
            "{}",
            describe_pods(&all)
        );
        assert!(spec.affinity.is_some());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_node_is_marked_unknown_tainted_and_its_pods_replaced() {
    let c = cluster_with(Options {
        sim: wasmkube_sim::SimConfig {
            count: 2,
            renew_interval: Duration::from_millis(200),
            ..Default::default()
        },
        controllers: wasmkube_controllers::Config {
            node_monitor_grace_period: Duration::from_secs(2),
            node_monitor_period: Duration::from_millis(200),
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    // A third node whose agent will vanish.
    let doomed = c.start_sim(wasmkube_sim::SimConfig {
        count: 1,
        prefix: "doomed".into(),
        renew_interval: Duration::from_millis(200),
        ..Default::default()
    });
    let nodes: Api<Node> = Api::all(c.client.clone());
    wait_list(&nodes, "three nodes", |ns| ns.len() == 3).await;
    let deployments: Api<Deployment> = Api::namespaced(c.client.clone(), "default");
    let d: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"replicas": 6, "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}}, "spec": {
                "containers": [{"name": "c", "image": "web:1"}],
                // Leave an unreachable node after one second, not five minutes.
                "tolerations": [{"key": "node.kubernetes.io/unreachable", "operator": "Exists",
                    "effect": "NoExecute", "tolerationSeconds": 1}]}}},
    }))
    .unwrap();
    deployments
        .create(&PostParams::default(), &d)
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), "default");
    let spread = wait_list(&pods, "six running, some on doomed-0", |ps| {
        let r = running_on(ps);
        r.len() == 6 && r.iter().any(|(n, _)| n == "doomed-0")
    })
    .await;
    assert!(running_on(&spread).iter().any(|(n, _)| n == "doomed-0"));

    doomed.abort();
    let tainted = wait_list(&nodes, "doomed-0 unknown and tainted", |ns| {
        ns.iter().any(|n| {
            n.metadata.name.as_deref() == Some("doomed-0")
                && n.status
                    .as_ref()
                    .unwrap()
                    .conditions
                    .as_ref()
                    .unwrap()
                    .iter()
                    .any(|c| {
                        c.type_ == "Ready"
                            && c.status == "Unknown"
                            && c.reason.as_deref() == Some("NodeStatusUnknown")
                    })
                && n.spec.as_ref().unwrap().taints.as_ref().is_some_and(|ts| {
                    ts.iter()
                        .filter(|t| t.key == "node.kubernetes.io/unreachable")
                        .count()
                        == 2
                })
        })
    })
    .await;
    assert_eq!(tainted.len(), 3);
    // Its pods are evicted (they stay Terminating: nobody on that node can
    // confirm) and replaced on the other nodes.
    let after = wait_list(&pods, "six running elsewhere", |ps| {
        let r = running_on(ps);
        r.len() == 6 && r.iter().all(|(n, _)| n != "doomed-0")
    })
    .await;
    let evicted: Vec<&Pod> = after
        .iter()
        .filter(|p| p.spec.as_ref().unwrap().node_name.as_deref() == Some("doomed-0"))
        .collect();
    assert!(!evicted.is_empty());
    assert!(
        evicted
            .iter()
            .all(|p| p.metadata.deletion_timestamp.is_some()),
        "{}",
        describe_pods(&after)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_one_candidate_leads_and_a_successor_takes_over() {
    let c = cluster_with(Options {
        sim: wasmkube_sim::SimConfig {
            count: 0,
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let config = ElectionConfig {
        lease_duration: Duration::from_secs(1),
        renew_deadline: Duration::from_millis(800),
        retry_period: Duration::from_millis(100),
    };
    let a = LeaderElector::new(c.client.clone(), "kube-system", "demo", "a", config.clone());
    let b = LeaderElector::new(c.client.clone(), "kube-system", "demo", "b", config.clone());
    assert!(a.try_acquire_or_renew().await);
    assert!(
        !b.try_acquire_or_renew().await,
        "b must not take a held lease"
    );
    assert!(a.try_acquire_or_renew().await, "the holder renews");
    // a stops renewing; b waits out the lease duration, then takes over.
    let started = std::time::Instant::now();
    let (tx, mut rx) = tokio::sync::mpsc::channel(1);
    let b_task = tokio::spawn(async move {
        b.run(|| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(()).await;
                std::future::pending::<()>().await
            }
        })
        .await
    });
    rx.recv().await.unwrap();
    assert!(started.elapsed() >= Duration::from_secs(1));
    let leases: Api<Lease> = Api::namespaced(c.client.clone(), "kube-system");
    let lease = leases.get("demo").await.unwrap().spec.unwrap();
    assert_eq!(lease.holder_identity.as_deref(), Some("b"));
    assert_eq!(lease.lease_transitions, Some(1));
    // a cannot take it back while b renews.
    assert!(!a.try_acquire_or_renew().await);
    b_task.abort();
    // A released lease is free at once.
    let d = LeaderElector::new(
        c.client.clone(),
        "kube-system",
        "demo2",
        "d",
        config.clone(),
    );
    let e = LeaderElector::new(c.client.clone(), "kube-system", "demo2", "e", config);
    assert!(d.try_acquire_or_renew().await);
    d.release().await;
    assert!(e.try_acquire_or_renew().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_csr_cleaner_deletes_decided_requests_after_an_hour_and_pending_ones_after_a_day() {
    use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
    let c = cluster().await;
    let api: Api<CertificateSigningRequest> = Api::all(c.client.clone());
    let request = |name: &str| -> CertificateSigningRequest {
        let who = wasmkube_pki::Identity::new(name, &[]);
        let (pem, _key) = wasmkube_pki::new_csr(&who).unwrap();
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {
                "request": k8s_openapi::ByteString(pem.into_bytes()),
                "signerName": "kubernetes.io/kube-apiserver-client",
                "usages": ["client auth"],
            },
        }))
        .unwrap()
    };
    for name in ["waiting", "refused"] {
        api.create(&PostParams::default(), &request(name))
            .await
            .unwrap();
    }
    // Denied two hours ago (as the approval subresource records it).
    let two_hours_ago = (chrono::Utc::now() - chrono::Duration::hours(2))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let mut refused = api.get("refused").await.unwrap();
    refused.status = Some(
        serde_json::from_value(json!({"conditions": [{
            "type": "Denied", "status": "True", "reason": "Test",
            "lastUpdateTime": two_hours_ago, "lastTransitionTime": two_hours_ago,
        }]}))
        .unwrap(),
    );
    api.replace_subresource("approval", "refused", &PostParams::default(), &refused)
        .await
        .unwrap();
    let names = |api: Api<CertificateSigningRequest>| async move {
        let mut names: Vec<String> = api
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter_map(|c| c.metadata.name)
            .filter(|n| n == "waiting" || n == "refused")
            .collect();
        names.sort();
        names
    };
    let now = chrono::Utc::now();
    let swept = wasmkube_controllers::csrcleaner::sweep(&c.client, now)
        .await
        .unwrap();
    assert_eq!(swept, 1);
    assert_eq!(names(api.clone()).await, ["waiting"]);
    // A day later the pending one goes too.
    wasmkube_controllers::csrcleaner::sweep(&c.client, now + chrono::Duration::hours(25))
        .await
        .unwrap();
    assert!(names(api.clone()).await.is_empty());
}
