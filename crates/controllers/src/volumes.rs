//! The persistent-volume controller, as Kubernetes' binder and the
//! local-path provisioner k3s ships, together:
//!
//! - a claim is bound to the smallest available volume that fits it (class,
//!   access modes, volume mode, size, selector), volume first
//!   (`spec.claimRef`), then claim (`spec.volumeName`), then both statuses;
//! - a claim of the built-in `wasmkube.io/local-path` provisioner with no
//!   fitting volume gets one made for it: a directory under the local-path
//!   root of the node its first pod was scheduled to (the scheduler names
//!   it in `volume.kubernetes.io/selected-node`), pinned to that node by
//!   node affinity and pre-bound to the claim;
//! - a claim being deleted keeps its `kubernetes.io/pvc-protection`
//!   finalizer while a pod that has not finished uses it;
//! - a volume whose claim is gone is `Released`, then kept (`Retain`) or
//!   deleted (`Delete`); a volume being deleted keeps its
//!   `kubernetes.io/pv-protection` finalizer while it is bound. A provisioned volume holds a finalizer until the
//!   node that keeps its directory has removed it.

use std::sync::Arc;
use std::time::Duration;

use crate::queue::Controller;
use k8s_openapi::api::core::v1::{
    Node, ObjectReference, PersistentVolume, PersistentVolumeClaim, PersistentVolumeClaimStatus,
    PersistentVolumeStatus, Pod,
};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use serde_json::json;
use wasmkube_api::storage::{self as st, LOCAL_PATH_PROVISIONER};

use crate::Error;

const COMPONENT: &str = "persistentvolume-controller";

struct Ctx {
    client: kube::Client,
    volumes: Store<PersistentVolume>,
    classes: Store<StorageClass>,
    nodes: Store<Node>,
    pods: Store<Pod>,
}

impl Ctx {
    fn class(&self, name: &str) -> Option<Arc<StorageClass>> {
        (!name.is_empty())
            .then(|| self.classes.get(&ObjectRef::new(name)))
            .flatten()
    }
}

/// A write that lost a race is retried soon from fresh caches.
fn conflict_soon(r: Result<(), kube::Error>) -> Result<Action, Error> {
    match r {
        Ok(()) => Ok(Action::await_change()),
        Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => {
            Ok(Action::requeue(Duration::from_millis(200)))
        }
        Err(e) => Err(Error::Kube(e)),
    }
}

fn claim_ref(claim: &PersistentVolumeClaim) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("PersistentVolumeClaim".into()),
        name: claim.metadata.name.clone(),
        namespace: claim.metadata.namespace.clone(),
        uid: claim.metadata.uid.clone(),
        resource_version: claim.metadata.resource_version.clone(),
        field_path: None,
    }
}

/// The volume made for a local-path claim on `node`, under `root`.
fn provisioned_volume(
    claim: &PersistentVolumeClaim,
    class: &StorageClass,
    node: &str,
    root: &str,
) -> Result<PersistentVolume, Error> {
    let uid = claim.metadata.uid.as_deref().ok_or(Error::MissingUid)?;
    let name = format!("pvc-{uid}");
    let spec = claim.spec.clone().unwrap_or_default();
    let size = spec
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("storage"))
        .map(|q| q.0.clone())
        .unwrap_or_else(|| "0".into());
    let path = format!(
        "{}/{name}_{}_{}",
        root.trim_end_matches('/'),
        claim.namespace().unwrap_or_default(),
        claim.name_any()
    );
    serde_json::from_value(json!({
        "metadata": {
            "name": name,
            "labels": {st::LOCAL_PATH_NODE_LABEL: node},
            "annotations": {st::PROVISIONED_BY: LOCAL_PATH_PROVISIONER},
            "finalizers": [st::LOCAL_PATH_FINALIZER],
        },
        "spec": {
            "capacity": {"storage": size},
            "accessModes": spec.access_modes,
            "volumeMode": spec.volume_mode.unwrap_or_else(|| "Filesystem".into()),
            "storageClassName": class.metadata.name,
            "persistentVolumeReclaimPolicy": class.reclaim_policy.clone().unwrap_or_else(|| "Delete".into()),
            "local": {"path": path},
            "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                {"key": st::HOSTNAME_LABEL, "operator": "In", "values": [node]}]}]}},
            "claimRef": claim_ref(claim),
        },
    }))
    .map_err(|e| Error::Encode(e.to_string()))
}

/// Where the local-path volumes of `node` live: the class's `nodePath`
/// parameter, else the root its agent publishes on its Node.
fn local_root(ctx: &Ctx, class: &StorageClass, node: &str) -> Option<String> {
    if let Some(p) = class.parameters.as_ref().and_then(|p| p.get("nodePath")) {
        return Some(p.clone());
    }
    ctx.nodes
        .get(&ObjectRef::new(node))?
        .annotations()
        .get(st::LOCAL_PATH_ROOT)
        .cloned()
}

/// Whether a pod that has not finished uses claim `name` of its namespace.
fn in_use(pods: &Store<Pod>, ns: &str, name: &str) -> bool {
    pods.state().iter().any(|p| {
        p.metadata.namespace.as_deref() == Some(ns)
            && !crate::pods::is_terminal(p)
            && claims_of(p).any(|c| c == name)
    })
}

/// The claims a pod's volumes name.
fn claims_of(pod: &Pod) -> impl Iterator<Item = &str> {
    pod.spec
        .iter()
        .flat_map(|s| s.volumes.iter().flatten())
        .filter_map(|v| v.persistent_volume_claim.as_ref())
        .map(|c| c.claim_name.as_str())
}

async fn reconcile_claim(
    claim: Arc<PersistentVolumeClaim>,
    ctx: Arc<Ctx>,
) -> Result<Action, Error> {
    let ns = claim.namespace().unwrap_or_default();
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
    if claim.metadata.deletion_timestamp.is_some() {
        // Kubernetes' claim protection: a claim goes only once no pod uses
        // it (the pods' changes wake this).
        if !claim.finalizers().iter().any(|f| f == st::CLAIM_PROTECTION)
            || in_use(&ctx.pods, &ns, &claim.name_any())
        {
            return Ok(Action::await_change());
        }
        let patch = st::without_finalizer(&claim.metadata, st::CLAIM_PROTECTION);
        let r = claims
            .patch(
                &claim.name_any(),
                &PatchParams::default(),
                &Patch::Merge(patch),
            )
            .await
            .map(drop);
        return conflict_soon(r);
    }
    let bound_to = claim
        .spec
        .as_ref()
        .and_then(|s| s.volume_name.clone())
        .filter(|v| !v.is_empty());
    if let Some(volume) = bound_to {
        let Some(pv) = ctx.volumes.get(&ObjectRef::new(&volume)) else {
            return set_claim_status(&claims, &claim, "Lost", None).await;
        };
        let mine = pv
            .spec
            .as_ref()
            .and_then(|s| s.claim_ref.as_ref())
            .is_some_and(|r| r.uid == claim.metadata.uid);
        if !mine {
            // Named by the claim (a user's static binding): the volume
            // follows, unless another claim holds it.
            let free = pv
                .spec
                .as_ref()
                .and_then(|s| s.claim_ref.as_ref())
                .is_none_or(|r| {
                    r.name == claim.metadata.name && r.namespace == claim.metadata.namespace
                });
            if !free {
                return set_claim_status(&claims, &claim, "Lost", None).await;
            }
            return conflict_soon(claim_volume(&ctx, &pv, &claim).await);
        }
        if let Some(action) = expand(&ctx, &claim, &pv).await? {
            return Ok(action);
        }
        return set_claim_status(&claims, &claim, "Bound", Some(&pv)).await;
    }
    let class_name = st::claim_class(&claim).to_owned();
    let class = ctx.class(&class_name);
    let delayed = st::waits_for_first_consumer(class.as_deref());
    let selected = claim.annotations().get(st::SELECTED_NODE).cloned();
    if delayed && selected.is_none() {
        // The scheduler names the node once a pod uses the claim.
        return Ok(Action::await_change());
    }
    let volumes = ctx.volumes.state();
    let fitting = volumes.iter().map(|v| &**v).filter(|pv| {
        // A delayed claim binds only a volume on its pod's node.
        match (&selected, st::pinned_node(pv)) {
            (Some(node), Some(pinned)) => !delayed || pinned == node,
            _ => true,
        }
    });
    if let Some(pv) = st::best_volume(fitting, &claim) {
        let pv_name = pv.name_any();
        let pre_bound = pv
            .spec
            .as_ref()
            .and_then(|s| s.claim_ref.as_ref())
            .is_some();
        if !pre_bound {
            return conflict_soon(claim_volume(&ctx, pv, &claim).await);
        }
        // The volume holds the claim: the claim names the volume.
        let mut updated = (*claim).clone();
        updated.metadata.managed_fields = None;
        updated
            .annotations_mut()
            .insert(st::BIND_COMPLETED.into(), "yes".into());
        updated
            .spec
            .get_or_insert_with(Default::default)
            .volume_name = Some(pv_name);
        let r = claims
            .replace(&claim.name_any(), &PostParams::default(), &updated)
            .await
            .map(drop);
        return conflict_soon(r);
    }
    let Some(class) = class.filter(|c| c.provisioner == LOCAL_PATH_PROVISIONER) else {
        let message = if class_name.is_empty() {
            "no persistent volumes available for this claim and no storage class is set".to_owned()
        } else if ctx.class(&class_name).is_none() {
            format!("storageclass.storage.k8s.io \"{class_name}\" not found")
        } else {
            format!(
                "waiting for a volume to be created, either by the external provisioner of class {class_name:?} or manually by the system administrator"
            )
        };
        if claim.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Pending") {
            set_claim_status(&claims, &claim, "Pending", None).await?;
        }
        crate::record_event(
            &ctx.client,
            &*claim,
            COMPONENT,
            "Normal",
            "FailedBinding",
            message,
        )
        .await;
        return Ok(Action::requeue(Duration::from_secs(30)));
    };
    let failed = |message: String| {
        crate::record_event(
            &ctx.client,
            &*claim,
            COMPONENT,
            "Warning",
            "ProvisioningFailed",
            message,
        )
    };
    let Some(node) = selected else {
        failed("the local-path provisioner needs volumeBindingMode WaitForFirstConsumer: it makes the volume on the node of the claim's first pod".into()).await;
        return Ok(Action::await_change());
    };
    let Some(root) = local_root(&ctx, &class, &node) else {
        failed(format!(
            "node {node:?} publishes no local-path root ({})",
            st::LOCAL_PATH_ROOT
        ))
        .await;
        return Ok(Action::requeue(Duration::from_secs(5)));
    };
    let pv = provisioned_volume(&claim, &class, &node, &root)?;
    let api: Api<PersistentVolume> = Api::all(ctx.client.clone());
    match api.create(&PostParams::default(), &pv).await {
        Ok(_) => {
            crate::record_event(
                &ctx.client,
                &*claim,
                COMPONENT,
                "Normal",
                "ProvisioningSucceeded",
                format!(
                    "Successfully provisioned volume {} on node {node}",
                    pv.name_any()
                ),
            )
            .await;
            // The volume's event binds the claim.
            Ok(Action::await_change())
        }
        Err(kube::Error::Api(e)) if e.code == 409 => {
            Ok(Action::requeue(Duration::from_millis(200)))
        }
        Err(e) => Err(Error::Kube(e)),
    }
}

/// Volume expansion for a local-path volume: a bound claim that asks for
/// more than its volume holds (its class allowed the growth at admission)
/// gets a volume of the new size at once, a directory having no size to
/// change; the volume's event then carries the size into the claim's
/// status. `None` when there is nothing to grow.
async fn expand(
    ctx: &Ctx,
    claim: &PersistentVolumeClaim,
    pv: &PersistentVolume,
) -> Result<Option<Action>, Error> {
    let wanted = claim.spec.as_ref().and_then(st::spec_request_bytes);
    let has = pv
        .spec
        .as_ref()
        .and_then(|s| s.capacity.as_ref())
        .and_then(|c| c.get("storage"))
        .and_then(|q| wasmkube_api::quantity::parse(&q.0).ok())
        .map(|q| q.millis() / 1000);
    let local_path = pv.annotations().get(st::PROVISIONED_BY).map(String::as_str)
        == Some(LOCAL_PATH_PROVISIONER);
    let (Some(wanted), Some(has)) = (wanted, has) else {
        return Ok(None);
    };
    if wanted <= has || !local_path {
        return Ok(None);
    }
    let size = claim.spec.as_ref().and_then(|s| {
        s.resources
            .as_ref()?
            .requests
            .as_ref()?
            .get("storage")
            .cloned()
    });
    let mut updated = pv.clone();
    updated.metadata.managed_fields = None;
    updated
        .spec
        .get_or_insert_with(Default::default)
        .capacity
        .get_or_insert_with(Default::default)
        .insert("storage".into(), size.unwrap_or_default());
    let api: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let r = api
        .replace(&pv.name_any(), &PostParams::default(), &updated)
        .await
        .map(drop);
    if r.is_ok() {
        crate::record_event(
            &ctx.client,
            claim,
            COMPONENT,
            "Normal",
            "VolumeResizeSuccessful",
            format!(
                "resize volume {} for claim {} finished",
                pv.name_any(),
                claim.name_any()
            ),
        )
        .await;
    }
    conflict_soon(r).map(Some)
}

/// Reserves `pv` for `claim` (`spec.claimRef`); the volume's event then
/// binds the claim to it.
async fn claim_volume(
    ctx: &Ctx,
    pv: &PersistentVolume,
    claim: &PersistentVolumeClaim,
) -> Result<(), kube::Error> {
    let mut updated = pv.clone();
    updated.metadata.managed_fields = None;
    updated.spec.get_or_insert_with(Default::default).claim_ref = Some(claim_ref(claim));
    updated
        .annotations_mut()
        .insert(st::BIND_COMPLETED.into(), "yes".into());
    let api: Api<PersistentVolume> = Api::all(ctx.client.clone());
    api.replace(&pv.name_any(), &PostParams::default(), &updated)
        .await
        .map(drop)
}

async fn set_claim_status(
    api: &Api<PersistentVolumeClaim>,
    claim: &PersistentVolumeClaim,
    phase: &str,
    pv: Option<&PersistentVolume>,
) -> Result<Action, Error> {
    let spec = pv.and_then(|p| p.spec.as_ref());
    // Without a volume, no access modes or capacity.
    let status = PersistentVolumeClaimStatus {
        phase: Some(phase.into()),
        access_modes: spec.and_then(|s| s.access_modes.clone()),
        capacity: spec.and_then(|s| s.capacity.clone()),
        ..claim.status.clone().unwrap_or_default()
    };
    if claim.status.as_ref() == Some(&status) {
        return Ok(Action::await_change());
    }
    let mut updated = claim.clone();
    updated.metadata.managed_fields = None;
    updated.status = Some(status);
    conflict_soon(
        api.replace_status(&claim.name_any(), &PostParams::default(), &updated)
            .await
            .map(drop),
    )
}

async fn reconcile_volume(
    pv: Arc<PersistentVolume>,
    ctx: Arc<Ctx>,
    claims: &Store<PersistentVolumeClaim>,
) -> Result<Action, Error> {
    let api: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let reference = pv.spec.as_ref().and_then(|s| s.claim_ref.clone());
    let phase = match &reference {
        None => "Available",
        Some(r) => {
            let claim = claims.get(
                &ObjectRef::new(r.name.as_deref().unwrap_or_default())
                    .within(r.namespace.as_deref().unwrap_or_default()),
            );
            let same = claim
                .as_ref()
                .is_some_and(|c| r.uid.is_none() || c.metadata.uid == r.uid);
            let current = pv.status.as_ref().and_then(|s| s.phase.as_deref());
            if !same && r.uid.is_some() {
                "Released"
            } else if claim
                .as_ref()
                .and_then(|c| c.spec.as_ref()?.volume_name.as_deref())
                == Some(&pv.name_any())
            {
                "Bound"
            } else if current == Some("Bound") && claim.is_none() {
                "Released"
            } else {
                "Available"
            }
        }
    };
    if pv.status.as_ref().and_then(|s| s.phase.as_deref()) != Some(phase) {
        let mut updated = (*pv).clone();
        updated.metadata.managed_fields = None;
        updated.status = Some(PersistentVolumeStatus {
            phase: Some(phase.into()),
            last_phase_transition_time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now(),
            )),
            ..pv.status.clone().unwrap_or_default()
        });
        return conflict_soon(
            api.replace_status(&pv.name_any(), &PostParams::default(), &updated)
                .await
                .map(drop),
        );
    }
    // Kubernetes' volume protection: a volume being deleted goes once it is
    // not bound.
    if pv.metadata.deletion_timestamp.is_some()
        && phase != "Bound"
        && pv.finalizers().iter().any(|f| f == st::VOLUME_PROTECTION)
    {
        let patch = st::without_finalizer(&pv.metadata, st::VOLUME_PROTECTION);
        return conflict_soon(
            api.patch(
                &pv.name_any(),
                &PatchParams::default(),
                &Patch::Merge(patch),
            )
            .await
            .map(drop),
        );
    }
    let policy = pv
        .spec
        .as_ref()
        .and_then(|s| s.persistent_volume_reclaim_policy.as_deref())
        .unwrap_or("Retain");
    if phase == "Released" && policy == "Delete" && pv.metadata.deletion_timestamp.is_none() {
        tracing::info!(volume = %pv.name_any(), "claim gone; deleting the volume (reclaim policy Delete)");
        return conflict_soon(
            api.delete(&pv.name_any(), &DeleteParams::default())
                .await
                .map(drop),
        );
    }
    // Looked at again now and then, as Kubernetes' volume controller
    // resyncs: what it reads of claims comes from another watch than its own.
    Ok(Action::requeue(Duration::from_secs(30)))
}

/// Runs the persistent-volume controller until its watches end.
pub(crate) fn run(
    client: kube::Client,
    informers: &mut crate::Informers,
) -> impl std::future::Future<Output = Result<(), Error>> + use<> {
    let crate::Cache {
        store: volumes,
        changes: volume_changes,
    } = informers.cache::<PersistentVolume>();
    let classes = informers.store::<StorageClass>();
    let nodes = informers.store::<Node>();
    let crate::Cache {
        store: pods,
        changes: pod_changes,
    } = informers.cache::<Pod>();
    // The volume side reads claims from the cache whose changes wake it, so
    // a claim's deletion is never seen before the cache has lost it.
    let crate::Cache {
        store: claim_cache,
        changes: claim_changes,
    } = informers.cache::<PersistentVolumeClaim>();
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        volumes: volumes.clone(),
        classes: classes.clone(),
        nodes: nodes.clone(),
        pods: pods.clone(),
    });
    async move {
        let _ = volumes.wait_until_ready().await;
        let _ = pods.wait_until_ready().await;
        let _ = classes.wait_until_ready().await;
        let _ = nodes.wait_until_ready().await;
        let claims = Controller::new(
            Api::<PersistentVolumeClaim>::all(client.clone()),
            watcher::Config::default(),
        );
        // A volume's change concerns the claim it names.
        let claim_of = |pv: Arc<PersistentVolume>| {
            pv.spec
                .as_ref()
                .and_then(|s| s.claim_ref.as_ref())
                .and_then(|r| {
                    Some(ObjectRef::new(r.name.as_deref()?).within(r.namespace.as_deref()?))
                })
        };
        let claim_side = claims
            .watches_shared_stream(volume_changes, claim_of)
            // A pod's change may free a claim being deleted.
            .watches_shared_stream(pod_changes, |pod: Arc<Pod>| {
                let ns = pod.namespace().unwrap_or_default();
                claims_of(&pod)
                    .map(|c| ObjectRef::new(c).within(&ns))
                    .collect::<Vec<_>>()
            })
            .run(
                "persistentvolume-binder",
                reconcile_claim,
                crate::retry_soon,
                ctx.clone(),
            );
        // The volume side: a volume's phase follows its claim.
        let _ = claim_cache.wait_until_ready().await;
        let volume_side = Controller::new(
            Api::<PersistentVolume>::all(client.clone()),
            watcher::Config::default(),
        )
        .watches_shared_stream(claim_changes, |claim: Arc<PersistentVolumeClaim>| {
            claim
                .spec
                .as_ref()
                .and_then(|s| s.volume_name.clone())
                .filter(|v| !v.is_empty())
                .map(|v| ObjectRef::new(&v))
        })
        .run(
            "persistentvolume",
            move |pv, ctx| {
                let claims = claim_cache.clone();
                async move { reconcile_volume(pv, ctx, &claims).await }
            },
            crate::retry_soon,
            ctx,
        );
        tokio::join!(claim_side, volume_side);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_provisioned_volume_is_pinned_to_its_node_and_reserved_for_its_claim() {
        let claim: PersistentVolumeClaim = serde_json::from_value(json!({
            "metadata": {"name": "data", "namespace": "ns", "uid": "u-1"},
            "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "local-path",
                     "resources": {"requests": {"storage": "1Gi"}}},
        }))
        .unwrap();
        let class: StorageClass =
            serde_json::from_value(wasmkube_api::storage::local_path_class()).unwrap();
        let pv = provisioned_volume(&claim, &class, "n1", "/data/storage/").unwrap();
        assert_eq!(pv.name_any(), "pvc-u-1");
        assert_eq!(st::pinned_node(&pv), Some("n1"));
        let spec = pv.spec.as_ref().unwrap();
        assert_eq!(
            spec.local.as_ref().unwrap().path,
            "/data/storage/pvc-u-1_ns_data"
        );
        assert_eq!(
            spec.persistent_volume_reclaim_policy.as_deref(),
            Some("Delete")
        );
        assert_eq!(spec.claim_ref.as_ref().unwrap().uid.as_deref(), Some("u-1"));
        assert!(
            st::volume_fits(&pv, &claim),
            "the claim binds its own volume"
        );
        assert_eq!(
            pv.metadata.finalizers.as_deref(),
            Some(&[st::LOCAL_PATH_FINALIZER.to_owned()][..])
        );
    }
}
