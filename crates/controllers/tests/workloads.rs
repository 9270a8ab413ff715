//! Workload controllers in an in-process cluster: API server, scheduler,
//! simulated nodes and the controllers, over loopback HTTP. Every wait is a
//! watch with a deadline.

use std::time::Duration;

use futures::TryStreamExt;
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;

struct Cluster {
    client: kube::Client,
    _tasks: Vec<tokio::task::JoinHandle<()>>,
}

async fn cluster() -> Cluster {
    let api = wasmkube_apiserver::ApiServer::start(wasmkube_store::memory(), Default::default())
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let client = kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap();
    let (c1, c2, c3) = (client.clone(), client.clone(), client.clone());
    let tasks = vec![
        tokio::spawn(async move { api.serve(listener).await.unwrap() }),
        tokio::spawn(async move {
            wasmkube_sim::run(
                c1,
                wasmkube_sim::SimConfig {
                    count: 3,
                    ..Default::default()
                },
            )
            .await
            .unwrap()
        }),
        tokio::spawn(async move {
            wasmkube_scheduler::run(c2, Default::default())
                .await
                .unwrap()
        }),
        tokio::spawn(async move { wasmkube_controllers::replicaset::run(c3).await.unwrap() }),
    ];
    Cluster {
        client,
        _tasks: tasks,
    }
}

/// Waits, through a watch on the selected pods, until `pred` holds for the
/// running ones, and returns their names.
async fn wait_running(
    client: &kube::Client,
    selector: &str,
    pred: impl Fn(usize) -> bool,
) -> Vec<String> {
    let api: Api<Pod> = Api::namespaced(client.clone(), "default");
    let mut stream = std::pin::pin!(
        watcher(api.clone(), watcher::Config::default().labels(selector)).default_backoff()
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let running: Vec<String> = api
            .list(&ListParams::default().labels(selector))
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|p| {
                p.metadata.deletion_timestamp.is_none()
                    && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
            })
            .map(|p| p.metadata.name.unwrap())
            .collect();
        if pred(running.len()) {
            return running;
        }
        // Nothing to do until a pod changes.
        tokio::time::timeout_at(deadline, stream.try_next())
            .await
            .unwrap_or_else(|_| panic!("timed out; running: {running:?}"))
            .unwrap();
    }
}

fn replicaset(name: &str, replicas: i32) -> ReplicaSet {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": [{"name": "c", "image": "app:1"}]}}},
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicaset_scales_and_replaces_pods() {
    let c = cluster().await;
    let rss: Api<ReplicaSet> = Api::namespaced(c.client.clone(), "default");
    rss.create(&PostParams::default(), &replicaset("web", 3))
        .await
        .unwrap();
    let first = wait_running(&c.client, "app=web", |n| n == 3).await;

    let scale = |n: i32| Patch::Merge(json!({"spec": {"replicas": n}}));
    rss.patch("web", &PatchParams::default(), &scale(5))
        .await
        .unwrap();
    wait_running(&c.client, "app=web", |n| n == 5).await;
    rss.patch("web", &PatchParams::default(), &scale(2))
        .await
        .unwrap();
    wait_running(&c.client, "app=web", |n| n == 2).await;

    // A deleted pod is replaced by a new one.
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), "default");
    let survivors = wait_running(&c.client, "app=web", |n| n == 2).await;
    pods.delete(&survivors[0], &DeleteParams::default())
        .await
        .unwrap();
    let after = wait_running(&c.client, "app=web", |n| n == 2).await;
    assert!(!after.contains(&survivors[0]), "{after:?}");
    assert!(first.len() == 3);

    // Status reports what runs, for the generation it saw.
    let mut stream =
        std::pin::pin!(watcher(rss.clone(), watcher::Config::default()).applied_objects());
    loop {
        let rs = tokio::time::timeout(Duration::from_secs(30), stream.try_next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let st = rs.status.clone().unwrap_or_default();
        if st.ready_replicas == Some(2)
            && st.replicas == 2
            && st.observed_generation == rs.metadata.generation
        {
            break;
        }
    }
    // Owner references tie every pod to its ReplicaSet.
    let owned = pods
        .list(&ListParams::default().labels("app=web"))
        .await
        .unwrap();
    assert!(owned.items.iter().all(|p| {
        p.metadata
            .owner_references
            .as_ref()
            .is_some_and(|o| o[0].kind == "ReplicaSet" && o[0].controller == Some(true))
    }));
}
