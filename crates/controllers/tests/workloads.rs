//! Workload controllers in an in-process cluster: API server, scheduler,
//! simulated nodes and the controllers, over loopback HTTP. Every wait is a
//! watch with a deadline.

use std::time::Duration;

use futures::TryStreamExt;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;

mod common;
use common::{cluster, describe_pods, wait_list};

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
        let all = api
            .list(&ListParams::default().labels(selector))
            .await
            .unwrap()
            .items;
        let running: Vec<String> = all
            .clone()
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
            .unwrap_or_else(|_| {
                panic!(
                    "timed out; running: {running:?}; all: {}",
                    describe_pods(&all)
                )
            })
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

fn deployment(name: &str, replicas: i32, image: &str) -> Deployment {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
            "strategy": {"rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": [{"name": "c", "image": image}]}}},
    }))
    .unwrap()
}

fn image_of(p: &Pod) -> String {
    p.spec
        .as_ref()
        .and_then(|s| s.containers[0].image.clone())
        .unwrap_or_default()
}

/// Watches a deployment's pods until exactly `n` run, all with `image`.
/// Once `floor` pods run, it fails if fewer ever run again before the end.
async fn roll_to(client: &kube::Client, image: &str, n: usize, floor: usize) {
    let api: Api<Pod> = Api::namespaced(client.clone(), "default");
    let mut stream = std::pin::pin!(
        watcher(api.clone(), watcher::Config::default().labels("app=web")).default_backoff()
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut live: std::collections::BTreeMap<String, Pod> = Default::default();
    let mut armed = false;
    loop {
        let event = tokio::time::timeout_at(deadline, stream.try_next())
            .await
            .unwrap_or_else(|_| {
                let state: Vec<(String, String, String, bool)> = live
                    .values()
                    .map(|p| {
                        (
                            p.metadata.name.clone().unwrap_or_default(),
                            image_of(p),
                            p.status
                                .as_ref()
                                .and_then(|s| s.phase.clone())
                                .unwrap_or_default(),
                            p.metadata.deletion_timestamp.is_some(),
                        )
                    })
                    .collect();
                panic!("rollout to {image} not done in time; pods: {state:?}")
            })
            .unwrap()
            .unwrap();
        match event {
            watcher::Event::Apply(p) | watcher::Event::InitApply(p) => {
                live.insert(p.metadata.name.clone().unwrap(), p);
            }
            watcher::Event::Delete(p) => {
                live.remove(&p.metadata.name.clone().unwrap());
            }
            watcher::Event::Init => live.clear(),
            watcher::Event::InitDone => {}
        }
        let running: Vec<&Pod> = live
            .values()
            .filter(|p| {
                p.metadata.deletion_timestamp.is_none()
                    && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
            })
            .collect();
        armed |= floor > 0 && running.len() >= floor;
        assert!(
            !armed || running.len() >= floor,
            "availability dropped to {} during the rollout (floor {floor})",
            running.len()
        );
        if running.len() == n && running.iter().all(|p| image_of(p) == image) {
            return;
        }
    }
}

async fn wait_deployment(client: &kube::Client, done: impl Fn(&Deployment) -> bool) -> Deployment {
    let api: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let mut stream = std::pin::pin!(watcher(api, watcher::Config::default()).applied_objects());
    loop {
        let d = tokio::time::timeout(Duration::from_secs(30), stream.try_next())
            .await
            .expect("deployment state in time")
            .unwrap()
            .unwrap();
        if done(&d) {
            return d;
        }
    }
}

fn revisions(rss: &[ReplicaSet]) -> Vec<(String, String, i32)> {
    let mut out: Vec<_> = rss
        .iter()
        .map(|rs| {
            (
                rs.spec
                    .as_ref()
                    .unwrap()
                    .template
                    .as_ref()
                    .map(|t| {
                        image_of(&Pod {
                            spec: t.spec.clone(),
                            ..Default::default()
                        })
                    })
                    .unwrap_or_default(),
                rs.metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get("deployment.kubernetes.io/revision").cloned())
                    .unwrap_or_default(),
                rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0),
            )
        })
        .collect();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployment_rolls_out_rolls_back_and_reports_status() {
    let c = cluster().await;
    let deploys: Api<Deployment> = Api::namespaced(c.client.clone(), "default");
    deploys
        .create(&PostParams::default(), &deployment("web", 3, "app:1"))
        .await
        .unwrap();
    roll_to(&c.client, "app:1", 3, 0).await;
    let d = wait_deployment(&c.client, |d| {
        let s = d.status.clone().unwrap_or_default();
        s.available_replicas == Some(3)
            && s.updated_replicas == Some(3)
            && s.observed_generation == d.metadata.generation
    })
    .await;
    assert_eq!(
        d.metadata.annotations.unwrap()["deployment.kubernetes.io/revision"],
        "1"
    );

    // A new image rolls out with maxUnavailable 0: never fewer than 3 running.
    let set_image = |img: &str| {
        Patch::Strategic(
            json!({"spec": {"template": {"spec": {"containers": [{"name": "c", "image": img}]}}}}),
        )
    };
    deploys
        .patch("web", &PatchParams::default(), &set_image("app:2"))
        .await
        .unwrap();
    roll_to(&c.client, "app:2", 3, 3).await;
    let d = wait_deployment(&c.client, |d| {
        let s = d.status.clone().unwrap_or_default();
        let done = s.conditions.unwrap_or_default().iter().any(|c| {
            c.type_ == "Progressing" && c.reason.as_deref() == Some("NewReplicaSetAvailable")
        });
        done && s.updated_replicas == Some(3)
            && s.replicas == Some(3)
            && s.observed_generation == d.metadata.generation
    })
    .await;
    assert_eq!(
        d.metadata.annotations.unwrap()["deployment.kubernetes.io/revision"],
        "2"
    );

    // Rolling back reuses the first ReplicaSet, now at revision 3.
    deploys
        .patch("web", &PatchParams::default(), &set_image("app:1"))
        .await
        .unwrap();
    roll_to(&c.client, "app:1", 3, 3).await;
    let rss: Api<ReplicaSet> = Api::namespaced(c.client.clone(), "default");
    let want = [
        ("app:1".to_string(), "3".to_string(), 3),
        ("app:2".to_string(), "2".to_string(), 0),
    ];
    let mut changes =
        std::pin::pin!(watcher(rss.clone(), watcher::Config::default()).applied_objects());
    // The revision annotation lands in its own write: re-list on each change.
    while revisions(&rss.list(&ListParams::default()).await.unwrap().items) != want {
        tokio::time::timeout(Duration::from_secs(30), changes.try_next())
            .await
            .expect("replicaset change")
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_collection_follows_propagation_policies() {
    use kube::api::PropagationPolicy;
    let c = cluster().await;
    let deploys: Api<Deployment> = Api::namespaced(c.client.clone(), "default");
    let rss: Api<ReplicaSet> = Api::namespaced(c.client.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), "default");

    // Background (the default): the Deployment goes at once, then its ReplicaSet and pods.
    deploys
        .create(&PostParams::default(), &deployment("web", 2, "app:1"))
        .await
        .unwrap();
    roll_to(&c.client, "app:1", 2, 0).await;
    deploys
        .delete("web", &DeleteParams::default())
        .await
        .unwrap();
    wait_list(&rss, "replicasets collected", |l| l.is_empty()).await;
    wait_list(&pods, "pods collected", |l| l.is_empty()).await;

    // Foreground: the Deployment stays, marked, until its dependents are gone.
    deploys
        .create(&PostParams::default(), &deployment("web", 2, "app:1"))
        .await
        .unwrap();
    roll_to(&c.client, "app:1", 2, 0).await;
    let fg = DeleteParams {
        propagation_policy: Some(PropagationPolicy::Foreground),
        ..Default::default()
    };
    deploys.delete("web", &fg).await.unwrap();
    let marked = deploys.get_opt("web").await.unwrap();
    assert!(marked.is_none_or(|d| d.metadata.deletion_timestamp.is_some()));
    wait_list(&deploys, "deployment deleted after its dependents", |l| {
        l.is_empty()
    })
    .await;
    assert!(
        rss.list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );

    // Orphan: deleting a ReplicaSet leaves its pods, released.
    rss.create(&PostParams::default(), &replicaset("keep", 2))
        .await
        .unwrap();
    wait_running(&c.client, "app=keep", |n| n == 2).await;
    let orphan = DeleteParams {
        propagation_policy: Some(PropagationPolicy::Orphan),
        ..Default::default()
    };
    rss.delete("keep", &orphan).await.unwrap();
    wait_list(&rss, "replicaset gone", |l| l.is_empty()).await;
    let left = wait_list(&pods, "pods released", |l| {
        l.len() == 2
            && l.iter().all(|p| {
                p.metadata
                    .owner_references
                    .as_ref()
                    .is_none_or(|o| o.is_empty())
            })
    })
    .await;
    assert_eq!(left.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_namespace_removes_everything_in_it() {
    use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
    let c = cluster().await;
    let namespaces: Api<Namespace> = Api::all(c.client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "team"}})).unwrap(),
        )
        .await
        .unwrap();
    let deploys: Api<Deployment> = Api::namespaced(c.client.clone(), "team");
    deploys
        .create(&PostParams::default(), &deployment("web", 2, "app:1"))
        .await
        .unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(c.client.clone(), "team");
    cms.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "cfg"}})).unwrap(),
    )
    .await
    .unwrap();
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), "team");
    wait_list(&pods, "pods running in the namespace", |l| l.len() == 2).await;
    namespaces
        .delete("team", &DeleteParams::default())
        .await
        .unwrap();
    wait_list(&namespaces, "namespace finalized", |l| {
        l.iter().all(|n| n.metadata.name.as_deref() != Some("team"))
    })
    .await;
    assert!(
        pods.list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
    assert!(
        cms.list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_get_endpoints_and_slices_that_follow_their_pods() {
    use k8s_openapi::api::core::v1::{Endpoints, Service, ServiceAccount};
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    let c = cluster().await;
    let svcs: Api<Service> = Api::namespaced(c.client.clone(), "default");
    let svc: Service = serde_json::from_value(json!({"metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}))
    .unwrap();
    svcs.create(&PostParams::default(), &svc).await.unwrap();
    let mut d = deployment("web", 3, "app:1");
    d.spec
        .as_mut()
        .unwrap()
        .template
        .spec
        .as_mut()
        .unwrap()
        .containers[0]
        .ports = Some(vec![
        serde_json::from_value(json!({"name": "http", "containerPort": 8080})).unwrap(),
    ]);
    let deploys: Api<Deployment> = Api::namespaced(c.client.clone(), "default");
    deploys.create(&PostParams::default(), &d).await.unwrap();

    let endpoints: Api<Endpoints> = Api::namespaced(c.client.clone(), "default");
    let ready_addresses = |l: &[Endpoints]| -> usize {
        l.iter()
            .filter(|e| e.metadata.name.as_deref() == Some("web"))
            .flat_map(|e| e.subsets.iter().flatten())
            .map(|s| s.addresses.as_ref().map_or(0, Vec::len))
            .sum()
    };
    let listed = wait_list(&endpoints, "three ready endpoints", |l| {
        ready_addresses(l) == 3
    })
    .await;
    let subset = &listed
        .iter()
        .find(|e| e.metadata.name.as_deref() == Some("web"))
        .unwrap()
        .subsets
        .as_ref()
        .unwrap()[0];
    assert_eq!(
        subset.ports.as_ref().unwrap()[0].port,
        8080,
        "the named target port resolves to the container port"
    );
    let slices: Api<EndpointSlice> = Api::namespaced(c.client.clone(), "default");
    wait_list(&slices, "a slice with three ready endpoints", |l| {
        l.iter().any(|s| {
            s.metadata
                .labels
                .as_ref()
                .and_then(|m| m.get("kubernetes.io/service-name"))
                .map(String::as_str)
                == Some("web")
                && s.endpoints
                    .iter()
                    .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
                    .count()
                    == 3
        })
    })
    .await;

    deploys
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 1}})),
        )
        .await
        .unwrap();
    wait_list(&endpoints, "one ready endpoint after scaling down", |l| {
        ready_addresses(l) == 1
    })
    .await;
    svcs.delete("web", &DeleteParams::default()).await.unwrap();
    wait_list(&endpoints, "endpoints removed with the service", |l| {
        l.iter().all(|e| e.metadata.name.as_deref() != Some("web"))
    })
    .await;
    wait_list(&slices, "slices removed with the service", |l| l.is_empty()).await;

    // Every namespace has a default service account.
    let accounts: Api<ServiceAccount> = Api::namespaced(c.client.clone(), "default");
    wait_list(&accounts, "default service account", |l| {
        l.iter()
            .any(|a| a.metadata.name.as_deref() == Some("default"))
    })
    .await;
}
