//! The VolumeBinding plugin, as kube-scheduler's: a pod waits while a claim
//! it uses is missing, being deleted, or unbound with a class that binds at
//! once; a claim bound to a volume pinned to a node takes the pod to that
//! node; a claim whose class waits for its first consumer goes where the pod
//! goes, and the scheduler names that node on the claim
//! (`volume.kubernetes.io/selected-node`) before it binds the pod, so the
//! volume is provisioned there; when no provisioner serves the claim's
//! class, the pod goes only to a node with an available volume that fits
//! it (a static `local` volume pinned there, or one pinned nowhere).

use std::collections::HashMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::StorageClass;
use wasmkube_api::storage as st;

use crate::node_info::NodeInfo;

/// The scheduler's copy of the cluster's claims, volumes and classes.
#[derive(Debug, Default)]
pub struct Storage {
    claims: HashMap<(String, String), Arc<PersistentVolumeClaim>>,
    volumes: HashMap<String, Arc<PersistentVolume>>,
    classes: HashMap<String, Arc<StorageClass>>,
}

fn name_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    meta.name.clone().unwrap_or_default()
}

impl Storage {
    pub fn set_claim(&mut self, claim: PersistentVolumeClaim) {
        let key = (
            claim.metadata.namespace.clone().unwrap_or_default(),
            name_of(&claim.metadata),
        );
        self.claims.insert(key, Arc::new(claim));
    }

    pub fn remove_claim(&mut self, claim: &PersistentVolumeClaim) {
        let key = (
            claim.metadata.namespace.clone().unwrap_or_default(),
            name_of(&claim.metadata),
        );
        self.claims.remove(&key);
    }

    pub fn set_volume(&mut self, pv: PersistentVolume) {
        self.volumes.insert(name_of(&pv.metadata), Arc::new(pv));
    }

    pub fn remove_volume(&mut self, pv: &PersistentVolume) {
        self.volumes.remove(&name_of(&pv.metadata));
    }

    pub fn set_class(&mut self, class: StorageClass) {
        self.classes
            .insert(name_of(&class.metadata), Arc::new(class));
    }

    pub fn remove_class(&mut self, class: &StorageClass) {
        self.classes.remove(&name_of(&class.metadata));
    }
}

/// What a pod's claims ask of its node.
#[derive(Debug, Default, PartialEq)]
pub struct VolumeNeeds {
    /// Why no node can take the pod now.
    unschedulable: Option<String>,
    /// The one node its bound (or node-selected) claims allow.
    node: Option<String>,
    /// Claims that wait for this pod's node: `(namespace, name)`.
    pub delayed: Vec<(String, String)>,
    /// For each delayed claim no provisioner will serve, the nodes with an
    /// available volume that fits it (a fitting volume not pinned to any
    /// node allows them all, and adds no set here).
    static_nodes: Vec<std::collections::BTreeSet<String>>,
}

impl VolumeNeeds {
    pub fn of(pod: &Pod, storage: &Storage) -> Self {
        let mut needs = Self::default();
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let claims = pod
            .spec
            .iter()
            .flat_map(|s| s.volumes.iter().flatten())
            .filter_map(|v| v.persistent_volume_claim.as_ref())
            .map(|c| c.claim_name.clone());
        for name in claims {
            let Some(claim) = storage.claims.get(&(ns.clone(), name.clone())) else {
                needs.unschedulable = Some(format!("persistentvolumeclaim {name:?} not found"));
                return needs;
            };
            if claim.metadata.deletion_timestamp.is_some() {
                needs.unschedulable =
                    Some(format!("persistentvolumeclaim {name:?} is being deleted"));
                return needs;
            }
            let volume = claim
                .spec
                .as_ref()
                .and_then(|s| s.volume_name.as_deref())
                .filter(|v| !v.is_empty());
            let pinned = match volume {
                Some(v) => match storage.volumes.get(v) {
                    Some(pv) => st::pinned_node(pv).map(str::to_owned),
                    None => {
                        needs.unschedulable = Some(format!("persistentvolume {v:?} not found"));
                        return needs;
                    }
                },
                None => {
                    let class = storage.classes.get(st::claim_class(claim));
                    if !st::waits_for_first_consumer(class.map(|c| &**c)) {
                        needs.unschedulable =
                            Some("pod has unbound immediate PersistentVolumeClaims".into());
                        return needs;
                    }
                    match claim
                        .metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get(st::SELECTED_NODE))
                    {
                        Some(node) => Some(node.clone()),
                        None => {
                            needs.delayed.push((ns.clone(), name.clone()));
                            // Only the built-in provisioner makes volumes: a
                            // claim of another class binds an existing
                            // volume, so the pod goes where one fits.
                            let dynamic =
                                class.is_some_and(|c| c.provisioner == st::LOCAL_PATH_PROVISIONER);
                            if !dynamic {
                                let fitting: Vec<_> = storage
                                    .volumes
                                    .values()
                                    .filter(|pv| st::volume_fits(pv, claim))
                                    .collect();
                                if fitting.is_empty() {
                                    needs.unschedulable = Some(NO_VOLUME.into());
                                    return needs;
                                }
                                if fitting.iter().all(|pv| st::pinned_node(pv).is_some()) {
                                    needs.static_nodes.push(
                                        fitting
                                            .iter()
                                            .filter_map(|pv| st::pinned_node(pv))
                                            .map(str::to_owned)
                                            .collect(),
                                    );
                                }
                            }
                            None
                        }
                    }
                }
            };
            match (&needs.node, pinned) {
                (Some(a), Some(b)) if *a != b => {
                    needs.unschedulable = Some(CONFLICT.into());
                    return needs;
                }
                (_, Some(b)) => needs.node = Some(b),
                _ => {}
            }
        }
        needs
    }

    /// The VolumeRestrictions plugin's ReadWriteOncePod check: a claim with
    /// that access mode already used by another pod that has a node and has
    /// not finished keeps this pod from every node.
    pub fn restrict_read_write_once_pod<'a, I: Iterator<Item = &'a Pod>>(
        &mut self,
        pod: &Pod,
        storage: &Storage,
        others: impl Fn() -> I,
    ) {
        if self.unschedulable.is_some() {
            return;
        }
        let ns = pod.metadata.namespace.as_deref().unwrap_or_default();
        let claims_of = |p: &'a Pod| {
            p.spec
                .iter()
                .flat_map(|s| s.volumes.iter().flatten())
                .filter_map(|v| v.persistent_volume_claim.as_ref())
                .map(|c| c.claim_name.as_str())
        };
        let pod_claims = pod
            .spec
            .iter()
            .flat_map(|s| s.volumes.iter().flatten())
            .filter_map(|v| v.persistent_volume_claim.as_ref());
        for c in pod_claims {
            let once_pod = storage
                .claims
                .get(&(ns.to_owned(), c.claim_name.clone()))
                .and_then(|claim| claim.spec.as_ref()?.access_modes.as_ref())
                .is_some_and(|modes| modes.iter().any(|m| m == "ReadWriteOncePod"));
            if !once_pod {
                continue;
            }
            let in_use = others().any(|other| {
                other.metadata.uid != pod.metadata.uid
                    && other.metadata.namespace.as_deref() == Some(ns)
                    && !matches!(
                        other.status.as_ref().and_then(|s| s.phase.as_deref()),
                        Some("Succeeded" | "Failed")
                    )
                    && claims_of(other).any(|n| n == c.claim_name)
            });
            if in_use {
                self.unschedulable = Some(READ_WRITE_ONCE_POD.into());
                return;
            }
        }
    }

    /// The plugin's filter for one node.
    pub fn filter(&self, node: &NodeInfo) -> Vec<String> {
        if let Some(reason) = &self.unschedulable {
            return vec![reason.clone()];
        }
        match &self.node {
            Some(n) if *n != node.name => vec![CONFLICT.into()],
            _ if self
                .static_nodes
                .iter()
                .any(|nodes| !nodes.contains(&node.name)) =>
            {
                vec![NO_VOLUME.into()]
            }
            _ => Vec::new(),
        }
    }
}

const CONFLICT: &str = "node(s) had volume node affinity conflict";
const READ_WRITE_ONCE_POD: &str =
    "node has pod using PersistentVolumeClaim with the same name and ReadWriteOncePod access mode";
const NO_VOLUME: &str = "node(s) didn't find available persistent volumes to bind";

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(claims: &[&str]) -> Pod {
        let volumes: Vec<_> = claims
            .iter()
            .map(|c| json!({"name": c, "persistentVolumeClaim": {"claimName": c}}))
            .collect();
        serde_json::from_value(json!({"metadata": {"name": "p", "namespace": "ns"},
            "spec": {"containers": [], "volumes": volumes}}))
        .unwrap()
    }

    fn storage() -> Storage {
        let mut s = Storage::default();
        s.set_class(serde_json::from_value(st::local_path_class()).unwrap());
        s.set_class(
            serde_json::from_value(json!({"metadata": {"name": "now"}, "provisioner": "x",
                "volumeBindingMode": "Immediate"}))
            .unwrap(),
        );
        for (name, class, volume, selected) in [
            ("fresh", "local-path", None, None),
            ("picked", "local-path", None, Some("n2")),
            ("bound", "local-path", Some("pv-1"), None),
            ("immediate", "now", None, None),
        ] {
            let mut annotations = serde_json::Map::new();
            if let Some(n) = selected {
                annotations.insert(st::SELECTED_NODE.into(), json!(n));
            }
            s.set_claim(
                serde_json::from_value(json!({
                    "metadata": {"name": name, "namespace": "ns", "annotations": annotations},
                    "spec": {"storageClassName": class, "volumeName": volume},
                }))
                .unwrap(),
            );
        }
        s.set_volume(
            serde_json::from_value(json!({"metadata": {"name": "pv-1"},
                "spec": {"nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                    {"key": st::HOSTNAME_LABEL, "operator": "In", "values": ["n1"]}]}]}}}}))
            .unwrap(),
        );
        s
    }

    fn node(name: &str) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_read_write_once_pod_claim_in_use_holds_the_pod() {
        let mut s = storage();
        s.set_claim(
            serde_json::from_value(json!({
                "metadata": {"name": "solo", "namespace": "ns"},
                "spec": {"storageClassName": "local-path", "accessModes": ["ReadWriteOncePod"]},
            }))
            .unwrap(),
        );
        let with_uid = |uid: &str, phase: &str| {
            let mut p = pod(&["solo"]);
            p.metadata.uid = Some(uid.into());
            p.status = Some(serde_json::from_value(json!({"phase": phase})).unwrap());
            p
        };
        let (holder, done, new) = (
            with_uid("a", "Running"),
            with_uid("b", "Succeeded"),
            with_uid("c", "Pending"),
        );
        let mut needs = VolumeNeeds::of(&new, &s);
        needs.restrict_read_write_once_pod(&new, &s, || [&holder, &new].into_iter());
        assert_eq!(
            needs.filter(&node("n1")),
            vec![READ_WRITE_ONCE_POD.to_owned()]
        );
        // A finished pod, or only itself, does not hold it.
        let mut needs = VolumeNeeds::of(&new, &s);
        needs.restrict_read_write_once_pod(&new, &s, || [&done, &new].into_iter());
        assert!(needs.filter(&node("n1")).is_empty());
        // Another access mode is shared.
        let shared = pod(&["fresh"]);
        let mut needs = VolumeNeeds::of(&shared, &s);
        needs.restrict_read_write_once_pod(&shared, &s, || [&holder].into_iter());
        assert!(needs.filter(&node("n1")).is_empty());
    }

    #[test]
    fn claims_steer_or_hold_the_pod() {
        let s = storage();
        let fresh = VolumeNeeds::of(&pod(&["fresh"]), &s);
        assert!(fresh.filter(&node("n1")).is_empty());
        assert_eq!(fresh.delayed, vec![("ns".to_owned(), "fresh".to_owned())]);

        let bound = VolumeNeeds::of(&pod(&["bound", "fresh"]), &s);
        assert!(bound.filter(&node("n1")).is_empty());
        assert_eq!(bound.filter(&node("n2")), vec![CONFLICT.to_owned()]);

        let picked = VolumeNeeds::of(&pod(&["picked"]), &s);
        assert!(picked.filter(&node("n2")).is_empty());
        assert!(picked.delayed.is_empty());

        let both = VolumeNeeds::of(&pod(&["picked", "bound"]), &s);
        assert_eq!(both.filter(&node("n1")), vec![CONFLICT.to_owned()]);

        let missing = VolumeNeeds::of(&pod(&["nope"]), &s);
        assert_eq!(
            missing.filter(&node("n1")),
            vec!["persistentvolumeclaim \"nope\" not found".to_owned()]
        );
        // A claim of a class nobody provisions for goes where a fitting
        // static volume is, or nowhere.
        let mut s2 = storage();
        s2.set_class(
            serde_json::from_value(json!({"metadata": {"name": "local-storage"},
                "provisioner": "kubernetes.io/no-provisioner",
                "volumeBindingMode": "WaitForFirstConsumer"}))
            .unwrap(),
        );
        s2.set_claim(
            serde_json::from_value(json!({
                "metadata": {"name": "disk", "namespace": "ns"},
                "spec": {"storageClassName": "local-storage", "accessModes": ["ReadWriteOnce"],
                         "resources": {"requests": {"storage": "1Gi"}}},
            }))
            .unwrap(),
        );
        let none = VolumeNeeds::of(&pod(&["disk"]), &s2);
        assert_eq!(none.filter(&node("n1")), vec![NO_VOLUME.to_owned()]);
        s2.set_volume(
            serde_json::from_value(json!({"metadata": {"name": "n3-disk"},
                "spec": {"storageClassName": "local-storage", "accessModes": ["ReadWriteOnce"],
                         "capacity": {"storage": "2Gi"}, "local": {"path": "/mnt/d"},
                         "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                             {"key": st::HOSTNAME_LABEL, "operator": "In", "values": ["n3"]}]}]}}},
                "status": {"phase": "Available"}}))
            .unwrap(),
        );
        let on_n3 = VolumeNeeds::of(&pod(&["disk"]), &s2);
        assert!(on_n3.filter(&node("n3")).is_empty());
        assert_eq!(on_n3.filter(&node("n1")), vec![NO_VOLUME.to_owned()]);

        let immediate = VolumeNeeds::of(&pod(&["immediate"]), &s);
        assert_eq!(
            immediate.filter(&node("n1")),
            vec!["pod has unbound immediate PersistentVolumeClaims".to_owned()]
        );
    }
}
