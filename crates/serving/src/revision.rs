//! The Revision controller: a Revision runs as a Deployment
//! (`NAME-deployment`) whose pods carry Knative's labels and env (`PORT`,
//! `K_SERVICE`, `K_CONFIGURATION`, `K_REVISION`), and is reached through a
//! ClusterIP Service of its name on port 80. The Deployment starts at the
//! revision's initial scale; after that the autoscaler owns its replicas.
//!
//! Status: `ResourcesAvailable` (it has had a ready pod), `ContainerHealthy`
//! (no pod is failing to pull or start its image), `Active` (it has pods, or
//! `NoTraffic` at zero), `Ready`, and the actual and desired replicas.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use serde_json::json;
use wasmkube_api::knative::{ContainerStatus, Revision, Scaling, labels, revision_port};
use wasmkube_controllers::queue::Controller;

use crate::Error;

struct Ctx {
    client: kube::Client,
    deployments: Store<Deployment>,
    pods: Store<Pod>,
}

/// The Deployment that runs a revision.
pub fn deployment_name(revision: &str) -> String {
    format!("{revision}-deployment")
}

/// Waiting reasons that mean the revision's image cannot run.
const FAILING: &[&str] = &[
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
];

/// The labels of a revision's pods and of what it creates.
fn pod_labels(rev: &Revision) -> BTreeMap<String, String> {
    let mut l = rev.labels().clone();
    l.insert(labels::REVISION.into(), rev.name_any());
    l.insert(labels::REVISION_UID.into(), rev.uid().unwrap_or_default());
    l.insert("app".into(), rev.name_any());
    l
}

fn deployment_for(rev: &Revision) -> Result<Deployment, Error> {
    let name = rev.name_any();
    let port = revision_port(&rev.spec);
    let scaling = Scaling::from_annotations(
        rev.annotations(),
        rev.spec.container_concurrency.unwrap_or(0),
    );
    let mut initial = scaling.initial.max(scaling.min);
    if scaling.max > 0 {
        initial = initial.min(scaling.max);
    }
    let mut pod = rev.spec.pod.clone();
    let serving = pod
        .containers
        .iter()
        .position(|c| c.ports.as_ref().is_some_and(|p| !p.is_empty()))
        .unwrap_or(0);
    let label = |key: &str| rev.labels().get(key).cloned().unwrap_or_default();
    for (i, c) in pod.containers.iter_mut().enumerate() {
        let env = c.env.get_or_insert_with(Vec::new);
        let mut add = |k: &str, v: String| {
            if !env.iter().any(|e| e.name == k) {
                env.push(k8s_openapi::api::core::v1::EnvVar {
                    name: k.into(),
                    value: Some(v),
                    value_from: None,
                });
            }
        };
        if i == serving {
            add("PORT", port.to_string());
        }
        add("K_REVISION", name.clone());
        add("K_CONFIGURATION", label(labels::CONFIGURATION));
        add("K_SERVICE", label(labels::SERVICE));
        if i == serving && c.ports.as_ref().is_none_or(Vec::is_empty) {
            c.ports = Some(vec![k8s_openapi::api::core::v1::ContainerPort {
                name: Some("user-port".into()),
                container_port: port,
                protocol: Some("TCP".into()),
                ..Default::default()
            }]);
        }
    }
    if pod.termination_grace_period_seconds.is_none() {
        pod.termination_grace_period_seconds = rev.spec.timeout_seconds;
    }
    let labels = pod_labels(rev);
    let value = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {
            "name": deployment_name(&name), "namespace": rev.namespace(),
            "labels": labels, "ownerReferences": [crate::controller_ref(rev)],
        },
        "spec": {
            "replicas": initial,
            "selector": {"matchLabels": {labels::REVISION: name}},
            "template": {
                "metadata": {"labels": labels, "annotations": rev.annotations()},
                "spec": pod,
            },
        },
    });
    serde_json::from_value(value).map_err(|source| Error::Encode {
        what: "a revision's Deployment",
        source,
    })
}

fn service_for(rev: &Revision) -> Result<Service, Error> {
    let name = rev.name_any();
    let value = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {
            "name": name, "namespace": rev.namespace(),
            "labels": pod_labels(rev), "ownerReferences": [crate::controller_ref(rev)],
        },
        "spec": {
            "selector": {labels::REVISION: name},
            "ports": [{"name": "http", "port": 80, "targetPort": revision_port(&rev.spec)}],
        },
    });
    serde_json::from_value(value).map_err(|source| Error::Encode {
        what: "a revision's Service",
        source,
    })
}

/// The first failing container among the revision's pods: its reason and
/// message.
fn failing(pods: &[Arc<Pod>]) -> Option<(String, String)> {
    pods.iter()
        .flat_map(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.container_statuses.clone())
                .unwrap_or_default()
        })
        .find_map(|cs| {
            let waiting = cs.state?.waiting?;
            let reason = waiting.reason?;
            FAILING
                .contains(&reason.as_str())
                .then(|| (reason, waiting.message.unwrap_or_default()))
        })
}

async fn reconcile(rev: Arc<Revision>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    if rev.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let ns = rev.namespace().unwrap_or_default();
    let name = rev.name_any();
    let dep_name = deployment_name(&name);
    let deployment = ctx.deployments.get(&ObjectRef::new(&dep_name).within(&ns));
    if deployment.is_none() {
        let api: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
        crate::create_absent(&api, &deployment_for(&rev)?).await?;
        let api: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
        crate::create_absent(&api, &service_for(&rev)?).await?;
    }
    let desired = deployment
        .as_ref()
        .and_then(|d| d.spec.as_ref()?.replicas)
        .unwrap_or(0);
    let ready = deployment
        .as_ref()
        .and_then(|d| d.status.as_ref()?.ready_replicas)
        .unwrap_or(0);
    let pods: Vec<Arc<Pod>> = ctx
        .pods
        .state()
        .into_iter()
        .filter(|p| {
            p.namespace().as_deref() == Some(ns.as_str())
                && p.labels().get(labels::REVISION) == Some(&name)
        })
        .collect();

    let old = rev.status.clone().unwrap_or_default();
    let mut status = old.clone();
    status.observed_generation = rev.metadata.generation;
    status.actual_replicas = Some(ready);
    status.desired_replicas = Some(desired);
    let conds = &mut status.conditions;
    let was_available = crate::status_of(conds, "ResourcesAvailable") == "True";
    // `initial-scale: 0` (Knative's allow-zero-initial-scale): ready with
    // no pod ever started; the first request wakes it.
    let scaling = wasmkube_api::knative::Scaling::from_annotations(rev.annotations(), 0);
    let zero_initial = deployment.is_some() && scaling.initial == 0 && scaling.min == 0;
    if ready > 0 || was_available || zero_initial {
        crate::set_condition(conds, "ResourcesAvailable", "True", None, None);
    } else {
        crate::set_condition(
            conds,
            "ResourcesAvailable",
            "Unknown",
            Some("Deploying"),
            None,
        );
    }
    match failing(&pods) {
        Some((reason, message)) => crate::set_condition(
            conds,
            "ContainerHealthy",
            "False",
            Some(&reason),
            Some(message),
        ),
        None if ready > 0
            || zero_initial
            || crate::status_of(conds, "ContainerHealthy") == "True" =>
        {
            crate::set_condition(conds, "ContainerHealthy", "True", None, None)
        }
        None => crate::set_condition(
            conds,
            "ContainerHealthy",
            "Unknown",
            Some("Deploying"),
            None,
        ),
    }
    if desired == 0 {
        crate::set_condition(
            conds,
            "Active",
            "False",
            Some("NoTraffic"),
            Some("The target is not receiving traffic.".into()),
        );
    } else if ready > 0 {
        crate::set_condition(conds, "Active", "True", None, None);
    } else {
        crate::set_condition(conds, "Active", "Unknown", Some("Activating"), None);
    }
    crate::set_ready_from(conds, &["ResourcesAvailable", "ContainerHealthy"]);
    let digests: Vec<ContainerStatus> = pods
        .iter()
        .find_map(|p| p.status.as_ref()?.container_statuses.clone())
        .unwrap_or_default()
        .into_iter()
        .filter(|c| !c.image_id.is_empty())
        .map(|c| ContainerStatus {
            name: Some(c.name),
            image_digest: Some(c.image_id),
        })
        .collect();
    if !digests.is_empty() {
        status.container_statuses = digests;
    }
    if status != old {
        let api: Api<Revision> = Api::namespaced(ctx.client.clone(), &ns);
        crate::patch_status(&api, &name, &status).await?;
    }
    Ok(Action::await_change())
}

/// Runs the Revision controller until its watches end.
pub fn run(
    client: kube::Client,
    informers: &mut wasmkube_controllers::Informers,
) -> impl std::future::Future<Output = Result<(), Error>> + use<> {
    let deployments = informers.cache::<Deployment>();
    let pods = informers.cache::<Pod>();
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        deployments: deployments.store.clone(),
        pods: pods.store.clone(),
    });
    async move {
        let _ = tokio::join!(
            ctx.deployments.wait_until_ready(),
            ctx.pods.wait_until_ready()
        );
        // A pod wakes the revision it runs (by label: a revision's pods
        // are its Deployment's ReplicaSet's, not its own).
        let of_pod = |p: Arc<Pod>| {
            let ns = p.namespace();
            p.labels()
                .get(labels::REVISION)
                .map(|r| ObjectRef::<Revision>::new(r).within(ns.as_deref().unwrap_or_default()))
        };
        let controller = Controller::new(Api::<Revision>::all(client), watcher::Config::default())
            .owns_shared_stream(deployments.changes)
            .watches_shared_stream(pods.changes, of_pod);
        controller
            .run("knative-revision", reconcile, crate::retry_soon, ctx)
            .await;
        Err(Error::WatchEnded { what: "Revision" })
    }
}
