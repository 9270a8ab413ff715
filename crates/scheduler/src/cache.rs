//! The scheduler's incremental view of the cluster: one [`NodeInfo`] per node
//! with the pods bound (or assumed bound) to it, updated per watch event so a
//! scheduling cycle costs what it inspects, not the size of the cluster.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Pod};

use crate::node_info::{NodeInfo, priority};
use crate::queue::Key;

/// Nodes, their pods, assumed bindings and preemptors' nominated nodes.
#[derive(Debug, Default)]
pub struct Cache {
    nodes: HashMap<String, NodeInfo>,
    /// Node names in a stable order, for sampling from a rotating start.
    order: Vec<String>,
    pod_node: HashMap<Key, String>,
    /// Pods with inter-pod (anti-)affinity terms, which other pods' filters
    /// and scores must consult.
    with_affinity: HashMap<Key, Arc<Pod>>,
    /// Pods bound by us whose binding the pod watch has not shown yet.
    assumed: HashSet<Key>,
    /// Preemptors waiting for their victims to go: key → (node, pod).
    nominated: HashMap<Key, (String, Arc<Pod>)>,
    /// Victims whose delete was accepted: terminating even while the watch
    /// still delivers their earlier versions.
    victims: HashSet<Key>,
    /// Labels of every namespace, for namespace selectors in affinity terms.
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
    /// RuntimeClass name → handler.
    runtime_classes: HashMap<String, String>,
    /// Claims, volumes and storage classes, for the VolumeBinding plugin.
    pub storage: crate::volumes::Storage,
    next_start: usize,
}

/// The pod with a deletion timestamp (itself when it has one).
fn terminating(pod: Arc<Pod>) -> Arc<Pod> {
    if pod.metadata.deletion_timestamp.is_some() {
        return pod;
    }
    let mut p = (*pod).clone();
    p.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::now(),
    ));
    Arc::new(p)
}

fn has_pod_affinity(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.affinity.as_ref())
        .is_some_and(|a| a.pod_affinity.is_some() || a.pod_anti_affinity.is_some())
}

impl Cache {
    pub fn node_count(&self) -> usize {
        self.order.len()
    }

    pub fn node(&self, name: &str) -> Option<&NodeInfo> {
        self.nodes.get(name)
    }

    /// Every node, in the stable order.
    pub fn nodes(&self) -> impl Iterator<Item = &NodeInfo> {
        self.order.iter().filter_map(|n| self.nodes.get(n))
    }

    /// Every node, starting after where the previous cycle stopped, so
    /// sampled cycles spread over the whole cluster (kube-scheduler's
    /// `nextStartNodeIndex`).
    pub fn nodes_from_rotation(&self) -> impl Iterator<Item = &NodeInfo> {
        let start = if self.order.is_empty() {
            0
        } else {
            self.next_start % self.order.len()
        };
        self.order[start..]
            .iter()
            .chain(&self.order[..start])
            .filter_map(|n| self.nodes.get(n))
    }

    /// Moves the rotation on by the number of nodes a cycle looked at.
    pub fn advance(&mut self, inspected: usize) {
        self.next_start = self.next_start.wrapping_add(inspected);
    }

    /// Pods with inter-pod affinity terms, and the node each is on.
    pub fn pods_with_affinity(&self) -> impl Iterator<Item = (&NodeInfo, &Arc<Pod>)> {
        self.with_affinity.iter().filter_map(|(k, p)| {
            let node = self.nodes.get(self.pod_node.get(k)?)?;
            Some((node, p))
        })
    }

    /// Every namespace with its labels.
    pub fn namespaces(&self) -> impl Iterator<Item = (&String, &BTreeMap<String, String>)> {
        self.namespaces.iter()
    }

    /// The handler a RuntimeClass names, if the class is known.
    pub fn runtime_handler(&self, class: &str) -> Option<&str> {
        self.runtime_classes.get(class).map(String::as_str)
    }

    pub fn set_runtime_class(&mut self, name: String, handler: String) {
        self.runtime_classes.insert(name, handler);
    }

    pub fn remove_runtime_class(&mut self, name: &str) {
        self.runtime_classes.remove(name);
    }

    pub fn set_namespace(&mut self, name: String, labels: BTreeMap<String, String>) {
        self.namespaces.insert(name, labels);
    }

    pub fn remove_namespace(&mut self, name: &str) {
        self.namespaces.remove(name);
    }

    pub fn upsert_node(&mut self, node: &Node) {
        self.upsert_node_info(NodeInfo::from_node(node));
    }

    /// Adds or updates a node from its scheduler view (pods accounted on it
    /// stay).
    pub fn upsert_node_info(&mut self, info: NodeInfo) {
        match self.nodes.get_mut(&info.name) {
            Some(existing) => existing.update_node(info),
            None => {
                let pos = self.order.binary_search(&info.name).unwrap_or_else(|p| p);
                self.order.insert(pos, info.name.clone());
                self.nodes.insert(info.name.clone(), info);
            }
        }
    }

    pub fn remove_node(&mut self, name: &str) {
        if let Some(info) = self.nodes.remove(name) {
            self.order.retain(|n| n != name);
            for key in info.pods.keys() {
                self.pod_node.remove(key);
                self.with_affinity.remove(key);
            }
        }
    }

    /// Keeps only the named nodes (after a relist).
    pub fn retain_nodes(&mut self, names: &HashSet<String>) {
        let gone: Vec<String> = self
            .order
            .iter()
            .filter(|n| !names.contains(*n))
            .cloned()
            .collect();
        for n in gone {
            self.remove_node(&n);
        }
    }

    /// Accounts `pod` on `node` (bound, or assumed when `assumed`).
    pub fn add_pod(&mut self, key: &str, node: &str, pod: Arc<Pod>, assumed: bool) {
        let pod = if self.victims.contains(key) {
            terminating(pod)
        } else {
            pod
        };
        if self.pod_node.get(key).is_some_and(|n| n != node) {
            self.remove_pod(key);
        }
        if assumed {
            self.assumed.insert(key.to_owned());
        } else {
            self.assumed.remove(key);
        }
        self.nominated.remove(key);
        if has_pod_affinity(&pod) {
            self.with_affinity.insert(key.to_owned(), pod.clone());
        } else {
            self.with_affinity.remove(key);
        }
        self.pod_node.insert(key.to_owned(), node.to_owned());
        if let Some(info) = self.nodes.get_mut(node) {
            info.add_pod(key, pod);
        }
    }

    /// Forgets the pod; true when it was accounted on a node.
    pub fn remove_pod(&mut self, key: &str) -> bool {
        self.assumed.remove(key);
        self.victims.remove(key);
        self.with_affinity.remove(key);
        self.nominated.remove(key);
        match self.pod_node.remove(key) {
            Some(node) => self
                .nodes
                .get_mut(&node)
                .and_then(|n| n.remove_pod(key))
                .is_some(),
            None => false,
        }
    }

    /// Marks an accounted pod as terminating at once (a preemption victim
    /// whose delete was accepted), before the watch reports it: the next
    /// cycle must not pick it, or a second victim, again.
    pub fn mark_terminating(&mut self, key: &str) {
        let Some(node) = self.pod_node.get(key).cloned() else {
            return;
        };
        self.victims.insert(key.to_owned());
        let Some(info) = self.nodes.get_mut(&node) else {
            return;
        };
        if let Some(pod) = info.pods.get(key).cloned() {
            info.remove_pod(key);
            info.add_pod(key, terminating(pod));
        }
    }

    pub fn is_assumed(&self, key: &str) -> bool {
        self.assumed.contains(key)
    }

    pub fn is_accounted(&self, key: &str) -> bool {
        self.pod_node.contains_key(key)
    }

    /// Keeps only the named pods, and the assumed ones (after a relist).
    pub fn retain_pods(&mut self, keys: &HashSet<Key>) {
        let gone: Vec<Key> = self
            .pod_node
            .keys()
            .filter(|k| !keys.contains(*k) && !self.assumed.contains(*k))
            .cloned()
            .collect();
        for k in gone {
            self.remove_pod(&k);
        }
    }

    /// Whether a preemptor nominated to a node is still waiting for its
    /// victims there (lower-priority pods terminating): it must not preempt
    /// again meanwhile (kube-scheduler's `PodEligibleToPreemptOthers`).
    pub fn awaits_victims(&self, key: &str, priority: i32) -> bool {
        let Some((node, _)) = self.nominated.get(key) else {
            return false;
        };
        self.nodes.get(node).is_some_and(|n| {
            n.pods.values().any(|p| {
                p.metadata.deletion_timestamp.is_some()
                    && p.spec.as_ref().and_then(|s| s.priority).unwrap_or(0) < priority
            })
        })
    }

    pub fn nominate(&mut self, key: &str, node: &str, pod: Arc<Pod>) {
        self.nominated
            .insert(key.to_owned(), (node.to_owned(), pod));
    }

    /// Pods nominated to `node` that a pod of priority `at_least` and key
    /// `except` must leave room for.
    pub fn nominated_on<'a>(
        &'a self,
        node: &'a str,
        at_least: i32,
        except: &'a str,
    ) -> impl Iterator<Item = (&'a Key, &'a Arc<Pod>)> {
        self.nominated.iter().filter_map(move |(k, (n, p))| {
            (n == node && k != except && priority(p) >= at_least).then_some((k, p))
        })
    }

    pub fn has_nominations(&self) -> bool {
        !self.nominated.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str) -> Node {
        serde_json::from_value(json!({"metadata": {"name": name}, "status": {
            "allocatable": {"cpu": "4", "memory": "8Gi", "pods": "110"},
            "conditions": [{"type": "Ready", "status": "True"}]}}))
        .unwrap()
    }

    fn pod(cpu: &str) -> Arc<Pod> {
        Arc::new(
            serde_json::from_value(
                json!({"metadata": {"name": "p", "namespace": "d"}, "spec": {
                "containers": [{"name": "c", "resources": {"requests": {"cpu": cpu}}}]}}),
            )
            .unwrap(),
        )
    }

    #[test]
    fn accounts_pods_incrementally_and_survives_node_updates() {
        let mut c = Cache::default();
        c.upsert_node(&node("b"));
        c.upsert_node(&node("a"));
        c.add_pod("d/p", "a", pod("1"), true);
        c.add_pod("d/q", "a", pod("500m"), false);
        assert_eq!(c.node("a").unwrap().requested.milli_cpu, 1500);
        // The binding shows up: the same pod, no double counting.
        c.add_pod("d/p", "a", pod("1"), false);
        assert!(!c.is_assumed("d/p"));
        assert_eq!(c.node("a").unwrap().pod_count, 2);
        // A node status update keeps what is bound to it.
        c.upsert_node(&node("a"));
        assert_eq!(c.node("a").unwrap().requested.milli_cpu, 1500);
        // Moving a pod (a rebinding after a failed assume) moves its requests.
        c.add_pod("d/q", "b", pod("500m"), false);
        assert_eq!(c.node("a").unwrap().requested.milli_cpu, 1000);
        assert_eq!(c.node("b").unwrap().requested.milli_cpu, 500);
        assert!(c.remove_pod("d/p"));
        assert!(!c.remove_pod("d/p"));
        assert_eq!(c.node("a").unwrap().pod_count, 0);
        let names: Vec<&str> = c.nodes_from_rotation().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        c.advance(1);
        let names: Vec<&str> = c.nodes_from_rotation().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["b", "a"]);
        c.retain_nodes(&HashSet::from(["b".to_owned()]));
        assert_eq!(c.node_count(), 1);
        assert!(!c.is_accounted("d/p"));
    }
}
