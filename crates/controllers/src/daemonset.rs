//! The DaemonSet controller: one pod per eligible node (the template's node
//! selector and required affinity match, its tolerations cover the node's
//! NoSchedule/NoExecute taints), placed through the scheduler with a
//! `metadata.name` node affinity as Kubernetes does, and replaced node by node
//! on a template change (RollingUpdate with maxUnavailable, or OnDelete).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use crate::queue::Controller;
use chrono::Utc;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Node, Pod, Toleration};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde_json::json;
use wasmkube_api::scheduling;

use crate::deployment::{resolve, template_hash};
use crate::expectations::Expectations;
use crate::replicaset::owned_pods;
use crate::{Error, pods};

/// The label carrying the hash of the template a pod was made from.
const REVISION_HASH: &str = "controller-revision-hash";

pub(crate) struct Ctx {
    client: kube::Client,
    pods: Store<Pod>,
    nodes: Store<Node>,
    expectations: Expectations,
}

/// The tolerations Kubernetes adds to every daemon pod, so node conditions
/// never evict or block it.
fn daemon_tolerations(host_network: bool) -> Vec<Toleration> {
    let mut list = vec![
        ("node.kubernetes.io/not-ready", "NoExecute"),
        ("node.kubernetes.io/unreachable", "NoExecute"),
        ("node.kubernetes.io/disk-pressure", "NoSchedule"),
        ("node.kubernetes.io/memory-pressure", "NoSchedule"),
        ("node.kubernetes.io/pid-pressure", "NoSchedule"),
        ("node.kubernetes.io/unschedulable", "NoSchedule"),
    ];
    if host_network {
        list.push(("node.kubernetes.io/network-unavailable", "NoSchedule"));
    }
    list.into_iter()
        .map(|(key, effect)| Toleration {
            key: Some(key.into()),
            operator: Some("Exists".into()),
            effect: Some(effect.into()),
            ..Default::default()
        })
        .collect()
}

/// The pod spec a daemon pod gets (before pinning it to a node).
fn daemon_spec(ds: &DaemonSet) -> k8s_openapi::api::core::v1::PodSpec {
    let mut spec = ds
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.clone())
        .unwrap_or_default();
    let tolerations = spec.tolerations.get_or_insert_default();
    for t in daemon_tolerations(spec.host_network == Some(true)) {
        if !tolerations.contains(&t) {
            tolerations.push(t);
        }
    }
    spec
}

/// Whether the daemon should run on `node`.
fn should_run(spec: &k8s_openapi::api::core::v1::PodSpec, node: &Node) -> bool {
    let labels = node.metadata.labels.clone().unwrap_or_default();
    let name = node.name_any();
    if !scheduling::node_matches(spec, &labels, &name) {
        return false;
    }
    let tolerations = spec.tolerations.as_deref().unwrap_or_default();
    node.spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .into_iter()
        .flatten()
        .filter(|t| matches!(t.effect.as_str(), "NoSchedule" | "NoExecute"))
        .all(|t| scheduling::tolerated(tolerations, t))
}

/// The node a daemon pod is for: where it is bound, or where its node
/// affinity pins it.
fn target_node(pod: &Pod) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    if let Some(n) = spec.node_name.as_ref().filter(|n| !n.is_empty()) {
        return Some(n.clone());
    }
    spec.affinity
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required_during_scheduling_ignored_during_execution
        .as_ref()?
        .node_selector_terms
        .iter()
        .flat_map(|t| t.match_fields.iter().flatten())
        .find(|f| f.key == "metadata.name" && f.operator == "In")
        .and_then(|f| f.values.as_ref()?.first().cloned())
}

fn pod_for(ds: &DaemonSet, node: &str, hash: &str) -> Result<Pod, Error> {
    let template = ds
        .spec
        .as_ref()
        .map(|s| s.template.clone())
        .unwrap_or_default();
    let mut meta = template.metadata.unwrap_or_default();
    meta.name = None;
    meta.generate_name = Some(format!("{}-", ds.name_any()));
    meta.namespace = ds.namespace();
    meta.owner_references = Some(vec![ds.controller_owner_ref(&()).ok_or(Error::MissingUid)?]);
    let labels = meta.labels.get_or_insert_default();
    labels.insert(REVISION_HASH.into(), hash.into());
    labels.insert(
        "pod-template-generation".into(),
        ds.metadata.generation.unwrap_or(1).to_string(),
    );
    let mut spec = daemon_spec(ds);
    // Pin to the node through the scheduler (Kubernetes'
    // ReplaceDaemonSetPodNodeNameNodeAffinity).
    let affinity = spec.affinity.get_or_insert_default();
    let node_affinity = affinity.node_affinity.get_or_insert_default();
    node_affinity.required_during_scheduling_ignored_during_execution = Some(
        serde_json::from_value(json!({"nodeSelectorTerms": [{"matchFields": [
            {"key": "metadata.name", "operator": "In", "values": [node]}]}]}))
        .map_err(|e| Error::Encode(e.to_string()))?,
    );
    Ok(Pod {
        metadata: meta,
        spec: Some(spec),
        status: None,
    })
}

fn hash_of(pod: &Pod) -> Option<&str> {
    pod.metadata
        .labels
        .as_ref()?
        .get(REVISION_HASH)
        .map(String::as_str)
}

async fn delete(api: &Api<Pod>, ctx: &Ctx, owner: &str, pod: &Pod) -> Result<(), Error> {
    match crate::gone_ok(api.delete(&pod.name_any(), &DeleteParams::default()).await) {
        Ok(()) => {}
        Err(e) => return Err(Error::Kube(e)),
    }
    if let Some(u) = pod.metadata.uid.clone() {
        ctx.expectations.expect_delete(owner, u);
    }
    Ok(())
}

async fn reconcile(ds: Arc<DaemonSet>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    if ds.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let ns = ds.namespace().unwrap_or_default();
    let uid = ds.uid().ok_or(Error::MissingUid)?;
    let spec = ds.spec.clone().unwrap_or_default();
    let hash = template_hash(&serde_json::to_value(&spec.template).unwrap_or_default());
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let owned = owned_pods(&ctx.pods, &ns, &uid);
    let (pending_creates, pending_deletes) = ctx.expectations.observe(&uid, &owned);
    let pod_spec = daemon_spec(&ds);
    let min_ready = spec.min_ready_seconds.unwrap_or(0);
    let now = Utc::now();

    let mut by_node: HashMap<String, Vec<Arc<Pod>>> = HashMap::new();
    for p in &owned {
        if pods::phase(p) == "Failed" && p.metadata.deletion_timestamp.is_none() {
            // A failed daemon pod is replaced, as Kubernetes does.
            delete(&api, &ctx, &uid, p).await?;
            continue;
        }
        let gone = p
            .metadata
            .uid
            .as_ref()
            .is_some_and(|u| pending_deletes.contains(u));
        if pods::is_active(p)
            && !gone
            && let Some(n) = target_node(p)
        {
            by_node.entry(n).or_default().push(p.clone());
        }
    }
    let nodes: BTreeMap<String, Arc<Node>> = ctx
        .nodes
        .state()
        .into_iter()
        .map(|n| (n.name_any(), n))
        .collect();

    let mut to_create = Vec::new();
    let (mut desired, mut current, mut misscheduled, mut ready, mut available, mut updated) =
        (0, 0, 0, 0, 0, 0);
    // Nodes whose daemon runs the old template, with that pod's availability.
    let mut old: Vec<(Arc<Pod>, bool)> = Vec::new();
    for (name, node) in &nodes {
        let mut here = by_node.remove(name).unwrap_or_default();
        if !should_run(&pod_spec, node) {
            if !here.is_empty() {
                misscheduled += 1;
            }
            for p in &here {
                delete(&api, &ctx, &uid, p).await?;
            }
            continue;
        }
        desired += 1;
        if here.is_empty() {
            to_create.push(name.clone());
            continue;
        }
        current += 1;
        // One daemon per node: keep the oldest.
        here.sort_by_key(|p| {
            p.metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.to_string())
        });
        for extra in here.drain(1..) {
            delete(&api, &ctx, &uid, &extra).await?;
        }
        let p = &here[0];
        let is_available = pods::is_available(p, min_ready, now);
        ready += usize::from(pods::is_ready(p));
        available += usize::from(is_available);
        if hash_of(p) == Some(hash.as_str()) {
            updated += 1;
        } else {
            old.push((p.clone(), is_available));
        }
    }
    // Pods for nodes that no longer exist.
    for p in by_node.values().flatten() {
        delete(&api, &ctx, &uid, p).await?;
    }

    if pending_creates == 0 {
        for node in &to_create {
            let pod = api
                .create(&PostParams::default(), &pod_for(&ds, node, &hash)?)
                .await
                .map_err(Error::Kube)?;
            ctx.expectations.expect_create(&uid, pod.name_any());
        }
    }

    // Rolling update: replace old pods while at most maxUnavailable nodes
    // lack an available daemon; unavailable old pods go first, at no cost.
    let strategy = spec.update_strategy.clone().unwrap_or_default();
    if strategy.type_.as_deref().unwrap_or("RollingUpdate") == "RollingUpdate" && !old.is_empty() {
        let max_unavailable = resolve(
            strategy
                .rolling_update
                .as_ref()
                .and_then(|r| r.max_unavailable.as_ref()),
            "1",
            desired as i32,
            true,
        )
        .max(1) as usize;
        let mut unavailable = desired - available;
        old.sort_by_key(|(_, avail)| *avail);
        for (p, avail) in old {
            if avail {
                if unavailable >= max_unavailable {
                    break;
                }
                unavailable += 1;
            }
            delete(&api, &ctx, &uid, &p).await?;
        }
    }

    let status = json!({
        "desiredNumberScheduled": desired,
        "currentNumberScheduled": current,
        "numberMisscheduled": misscheduled,
        "numberReady": ready,
        "numberAvailable": available,
        "numberUnavailable": desired - available,
        "updatedNumberScheduled": updated,
        "observedGeneration": ds.metadata.generation,
    });
    let ds_api: Api<DaemonSet> = Api::namespaced(ctx.client.clone(), &ns);
    ds_api
        .patch_status(
            &ds.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": status })),
        )
        .await
        .map_err(Error::Kube)?;
    if ready > available {
        return Ok(Action::requeue(Duration::from_secs(
            u64::try_from(min_ready.max(1)).unwrap_or(1),
        )));
    }
    Ok(Action::requeue(Duration::from_secs(300)))
}

/// Runs the DaemonSet controller until its watches end.
pub(crate) fn run(
    client: kube::Client,
    informers: &mut crate::Informers,
) -> impl std::future::Future<Output = Result<(), Error>> + use<> {
    let crate::Cache {
        store: pods,
        changes: pod_changes,
    } = informers.cache::<Pod>();
    let crate::Cache {
        store: nodes,
        changes: node_changes,
    } = informers.cache::<Node>();
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        pods: pods.clone(),
        nodes: nodes.clone(),
        expectations: Expectations::default(),
    });
    async move {
        let _ = pods.wait_until_ready().await;
        let _ = nodes.wait_until_ready().await;
        let controller = Controller::new(Api::<DaemonSet>::all(client), watcher::Config::default());
        let daemonsets = controller.store();
        // Any node change may change where every DaemonSet should run.
        let all = move |_: Arc<Node>| {
            daemonsets
                .state()
                .into_iter()
                .map(|d| ObjectRef::from_obj(&*d))
                .collect::<Vec<_>>()
        };
        controller
            .owns_shared_stream(pod_changes)
            .watches_shared_stream(node_changes, all)
            .run("daemonset", reconcile, crate::retry_soon, ctx)
            .await;
        Ok(())
    }
}
