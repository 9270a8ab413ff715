//! Persistent storage's shared vocabulary: the annotations and names the
//! volume controller, the scheduler and the node agents agree on, the
//! built-in local-path StorageClass, and which PersistentVolume may bind a
//! claim.

use k8s_openapi::api::core::v1::{
    PersistentVolume, PersistentVolumeClaim, PersistentVolumeClaimSpec,
};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::quantity;

/// The annotation marking the default StorageClass.
pub const DEFAULT_STORAGE_CLASS: &str = "storageclass.kubernetes.io/is-default-class";

/// The built-in StorageClass: a directory per claim on the node that first
/// runs a pod using it (as k3s' local-path provisioner).
pub const LOCAL_PATH_CLASS: &str = "local-path";

/// The provisioner name of the built-in class.
pub const LOCAL_PATH_PROVISIONER: &str = "wasmkube.io/local-path";

/// Set by the scheduler on a claim of a `WaitForFirstConsumer` class: the
/// node the claim's first pod goes to, where its volume is provisioned.
pub const SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";

/// On a volume: the provisioner that made it.
pub const PROVISIONED_BY: &str = "pv.kubernetes.io/provisioned-by";

/// On a claim and its volume once the controller has bound them.
pub const BIND_COMPLETED: &str = "pv.kubernetes.io/bind-completed";

/// A node agent publishes its local-path root (the directory under which
/// it keeps provisioned volumes) on its Node under this annotation.
pub const LOCAL_PATH_ROOT: &str = "wasmkube.io/local-path-root";

/// On a provisioned local volume: the node keeping its directory (so the
/// node may watch the volumes it keeps).
pub const LOCAL_PATH_NODE_LABEL: &str = "wasmkube.io/local-path-node";

/// Held by a provisioned local volume until the node that keeps its
/// directory has removed it.
pub const LOCAL_PATH_FINALIZER: &str = "wasmkube.io/local-path-cleanup";

/// Held by every claim until no pod uses it (Kubernetes' claim
/// protection), so a claim deleted under a running pod waits for the pod.
pub const CLAIM_PROTECTION: &str = "kubernetes.io/pvc-protection";

/// Held by every volume until it is no longer bound (Kubernetes' volume
/// protection), so a volume deleted under its claim waits for the claim.
pub const VOLUME_PROTECTION: &str = "kubernetes.io/pv-protection";

/// The label naming a node, which local volumes' node affinity selects.
pub const HOSTNAME_LABEL: &str = "kubernetes.io/hostname";

/// The built-in StorageClass, the cluster's default.
pub fn local_path_class() -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
        "metadata": {"name": LOCAL_PATH_CLASS,
                     "annotations": {DEFAULT_STORAGE_CLASS: "true"}},
        "provisioner": LOCAL_PATH_PROVISIONER,
        "reclaimPolicy": "Delete",
        "volumeBindingMode": "WaitForFirstConsumer",
        // A directory has no size to change: claims grow at once.
        "allowVolumeExpansion": true,
    })
}

/// A claim spec's requested size in bytes, when it names a valid one.
pub fn spec_request_bytes(spec: &PersistentVolumeClaimSpec) -> Option<i128> {
    spec.resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("storage"))
        .and_then(|q| quantity::parse(&q.0).ok())
        .map(|q| q.millis() / 1000)
}

/// A claim's requested size in bytes.
pub fn requested_bytes(claim: &PersistentVolumeClaim) -> i128 {
    claim
        .spec
        .as_ref()
        .and_then(spec_request_bytes)
        .unwrap_or(0)
}

/// The merge patch that takes `finalizer` off an object, guarded by the
/// version it was read at, so a finalizer added meanwhile is not lost.
pub fn without_finalizer(meta: &ObjectMeta, finalizer: &str) -> serde_json::Value {
    let left: Vec<&String> = meta
        .finalizers
        .iter()
        .flatten()
        .filter(|f| *f != finalizer)
        .collect();
    serde_json::json!({"metadata": {"finalizers": left,
        "resourceVersion": meta.resource_version}})
}

/// A volume's capacity in bytes.
pub fn capacity_bytes(pv: &PersistentVolume) -> i128 {
    pv.spec
        .as_ref()
        .and_then(|s| s.capacity.as_ref())
        .and_then(|c| c.get("storage"))
        .and_then(|q| quantity::parse(&q.0).ok())
        .map_or(0, |q| q.millis() / 1000)
}

/// The class a claim asks for; `""` is no class.
pub fn claim_class(claim: &PersistentVolumeClaim) -> &str {
    claim
        .spec
        .as_ref()
        .and_then(|s| s.storage_class_name.as_deref())
        .unwrap_or_default()
}

/// Whether `class` binds at once or waits for a pod's node.
pub fn waits_for_first_consumer(class: Option<&StorageClass>) -> bool {
    class.and_then(|c| c.volume_binding_mode.as_deref()) == Some("WaitForFirstConsumer")
}

/// The node a volume's node affinity pins it to, when it names one host.
pub fn pinned_node(pv: &PersistentVolume) -> Option<&str> {
    let terms = &pv
        .spec
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required
        .as_ref()?
        .node_selector_terms;
    let [term] = terms.as_slice() else {
        return None;
    };
    term.match_expressions.iter().flatten().find_map(|e| {
        if e.key != HOSTNAME_LABEL || e.operator != "In" {
            return None;
        }
        match e.values.as_deref()? {
            [one] => Some(one.as_str()),
            _ => None,
        }
    })
}

/// Whether an available volume may bind this claim, as Kubernetes' binder
/// matches: the same class, every requested access mode, the same volume
/// mode, enough capacity, the claim's selector, and not already claimed by
/// another claim.
pub fn volume_fits(pv: &PersistentVolume, claim: &PersistentVolumeClaim) -> bool {
    let (Some(spec), Some(want)) = (pv.spec.as_ref(), claim.spec.as_ref()) else {
        return false;
    };
    if pv.metadata.deletion_timestamp.is_some() {
        return false;
    }
    if let Some(r) = &spec.claim_ref
        && (r.uid.is_some() && r.uid != claim.metadata.uid
            || r.name != claim.metadata.name
            || r.namespace != claim.metadata.namespace)
    {
        return false;
    }
    let phase = pv.status.as_ref().and_then(|s| s.phase.as_deref());
    if spec.claim_ref.is_none() && phase.is_some_and(|p| p != "Available" && p != "Pending") {
        return false;
    }
    if spec.storage_class_name.as_deref().unwrap_or_default() != claim_class(claim) {
        return false;
    }
    let has = spec.access_modes.as_deref().unwrap_or_default();
    if !want.access_modes.iter().flatten().all(|m| has.contains(m)) {
        return false;
    }
    let mode = |m: Option<&String>| m.map_or("Filesystem", |m| m.as_str()).to_owned();
    if mode(spec.volume_mode.as_ref()) != mode(want.volume_mode.as_ref()) {
        return false;
    }
    if capacity_bytes(pv) < requested_bytes(claim) {
        return false;
    }
    if let Some(selector) = &want.selector {
        let labels = pv.metadata.labels.clone().unwrap_or_default();
        match crate::selectors::LabelSelector::from_api(selector) {
            Ok(s) if s.matches(&labels) => {}
            _ => return false,
        }
    }
    true
}

/// The smallest available volume that fits the claim (Kubernetes prefers
/// the smallest, so large volumes stay for large claims); a volume already
/// reserved for this claim by its `claimRef` wins.
pub fn best_volume<'a>(
    volumes: impl IntoIterator<Item = &'a PersistentVolume>,
    claim: &PersistentVolumeClaim,
) -> Option<&'a PersistentVolume> {
    volumes
        .into_iter()
        .filter(|pv| volume_fits(pv, claim))
        .min_by_key(|pv| {
            let reserved = pv
                .spec
                .as_ref()
                .and_then(|s| s.claim_ref.as_ref())
                .is_some();
            (!reserved, capacity_bytes(pv))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pv(name: &str, size: &str, class: &str, modes: &[&str]) -> PersistentVolume {
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"tier": "fast"}},
            "spec": {"capacity": {"storage": size}, "accessModes": modes,
                     "storageClassName": class, "hostPath": {"path": "/tmp/x"}},
            "status": {"phase": "Available"},
        }))
        .unwrap()
    }

    fn pvc(size: &str, class: &str, modes: &[&str]) -> PersistentVolumeClaim {
        serde_json::from_value(json!({
            "metadata": {"name": "data", "namespace": "default", "uid": "u1"},
            "spec": {"resources": {"requests": {"storage": size}}, "accessModes": modes,
                     "storageClassName": class},
        }))
        .unwrap()
    }

    #[test]
    fn the_smallest_fitting_volume_of_the_class_binds() {
        let vols = [
            pv("big", "10Gi", "slow", &["ReadWriteOnce"]),
            pv("small", "1Gi", "slow", &["ReadWriteOnce", "ReadOnlyMany"]),
            pv("tiny", "100Mi", "slow", &["ReadWriteOnce"]),
            pv("other", "1Gi", "fast", &["ReadWriteOnce"]),
        ];
        let claim = pvc("500Mi", "slow", &["ReadWriteOnce"]);
        assert_eq!(
            best_volume(&vols, &claim).and_then(|v| v.metadata.name.as_deref()),
            Some("small")
        );
        let many = pvc("500Mi", "slow", &["ReadOnlyMany"]);
        assert_eq!(
            best_volume(&vols, &many).and_then(|v| v.metadata.name.as_deref()),
            Some("small")
        );
        assert!(best_volume(&vols, &pvc("20Gi", "slow", &["ReadWriteOnce"])).is_none());
        assert!(best_volume(&vols, &pvc("1Gi", "", &["ReadWriteOnce"])).is_none());
    }

    #[test]
    fn a_volume_reserved_for_another_claim_or_bound_does_not_fit() {
        let mut v = pv("v", "1Gi", "", &["ReadWriteOnce"]);
        let claim = pvc("1Gi", "", &["ReadWriteOnce"]);
        assert!(volume_fits(&v, &claim));
        v.spec.as_mut().unwrap().claim_ref = Some(Default::default());
        v.spec.as_mut().unwrap().claim_ref.as_mut().unwrap().name = Some("other".into());
        assert!(!volume_fits(&v, &claim));
        v.spec.as_mut().unwrap().claim_ref.as_mut().unwrap().name = Some("data".into());
        v.spec
            .as_mut()
            .unwrap()
            .claim_ref
            .as_mut()
            .unwrap()
            .namespace = Some("default".into());
        assert!(volume_fits(&v, &claim), "pre-bound to this claim");
        let mut released = pv("r", "1Gi", "", &["ReadWriteOnce"]);
        released.status.as_mut().unwrap().phase = Some("Released".into());
        assert!(!volume_fits(&released, &claim));
    }

    #[test]
    fn a_local_volume_names_its_node() {
        let v: PersistentVolume = serde_json::from_value(json!({
            "spec": {"nodeAffinity": {"required": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": HOSTNAME_LABEL, "operator": "In", "values": ["n1"]}]}
            ]}}},
        }))
        .unwrap();
        assert_eq!(pinned_node(&v), Some("n1"));
        assert_eq!(pinned_node(&pv("x", "1Gi", "", &[])), None);
    }
}
