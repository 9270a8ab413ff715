//! What the scheduler knows about a node: allocatable resources, what the
//! pods bound to it request, its host ports, labels, taints, images and
//! runtime handlers. Kept up to date incrementally by the scheduler's cache.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Pod, Taint};
use wasmkube_api::quantity;

/// Requests in the units the scheduler compares: millicores, bytes, bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resources {
    pub milli_cpu: i64,
    pub memory: i64,
    pub ephemeral_storage: i64,
}

impl std::ops::AddAssign for Resources {
    fn add_assign(&mut self, o: Self) {
        self.milli_cpu += o.milli_cpu;
        self.memory += o.memory;
        self.ephemeral_storage += o.ephemeral_storage;
    }
}

impl std::ops::SubAssign for Resources {
    fn sub_assign(&mut self, o: Self) {
        self.milli_cpu -= o.milli_cpu;
        self.memory -= o.memory;
        self.ephemeral_storage -= o.ephemeral_storage;
    }
}

fn parse_list(
    list: Option<&BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>>,
) -> Resources {
    let get = |name: &str, millis: bool| {
        list.and_then(|l| l.get(name))
            .and_then(|q| quantity::parse(&q.0).ok())
            .map(|q| if millis { q.millis() } else { q.ceil_units() })
            .unwrap_or(0) as i64
    };
    Resources {
        milli_cpu: get("cpu", true),
        memory: get("memory", false),
        ephemeral_storage: get("ephemeral-storage", false),
    }
}

/// What a pod requests: the sum over its containers, at least the largest
/// init container (they run one at a time), plus its overhead.
pub fn pod_requests(pod: &Pod) -> Resources {
    let Some(spec) = &pod.spec else {
        return Resources::default();
    };
    let mut sum = Resources::default();
    for c in &spec.containers {
        sum += parse_list(c.resources.as_ref().and_then(|r| r.requests.as_ref()));
    }
    for c in spec.init_containers.iter().flatten() {
        let r = parse_list(c.resources.as_ref().and_then(|r| r.requests.as_ref()));
        sum.milli_cpu = sum.milli_cpu.max(r.milli_cpu);
        sum.memory = sum.memory.max(r.memory);
        sum.ephemeral_storage = sum.ephemeral_storage.max(r.ephemeral_storage);
    }
    sum += parse_list(spec.overhead.as_ref());
    sum
}

/// Requests as scoring sees them: a container without requests counts as
/// 100m CPU and 200 MiB, so empty pods still spread (as kube-scheduler does).
pub fn pod_requests_for_scoring(pod: &Pod) -> Resources {
    let mut r = pod_requests(pod);
    if r.milli_cpu == 0 {
        r.milli_cpu = 100;
    }
    if r.memory == 0 {
        r.memory = 200 * 1024 * 1024;
    }
    r
}

/// Host ports a pod asks for, as (protocol, port).
pub fn host_ports(pod: &Pod) -> BTreeSet<(String, i32)> {
    pod.spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| {
            p.host_port
                .filter(|hp| *hp > 0)
                .map(|hp| (p.protocol.clone().unwrap_or_else(|| "TCP".into()), hp))
        })
        .collect()
}

/// A pod's priority (0 when admission gave it none).
pub fn priority(pod: &Pod) -> i32 {
    pod.spec.as_ref().and_then(|s| s.priority).unwrap_or(0)
}

/// One node as the scheduler sees it.
#[derive(Clone, Debug, Default)]
pub struct NodeInfo {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub taints: Vec<Taint>,
    pub unschedulable: bool,
    pub ready: bool,
    pub allocatable: Resources,
    pub allowed_pods: i64,
    pub requested: Resources,
    /// Requests with scoring defaults for pods that request nothing.
    pub requested_for_scoring: Resources,
    pub pod_count: i64,
    pub used_ports: BTreeSet<(String, i32)>,
    /// Image names the node holds, with their sizes in bytes.
    pub images: BTreeMap<String, i64>,
    /// Runtime handlers the node advertises (`status.runtimeHandlers`).
    pub runtime_handlers: BTreeSet<String>,
    /// Pods bound or assumed bound here, by `namespace/name`.
    pub pods: HashMap<String, Arc<Pod>>,
}

impl NodeInfo {
    pub fn from_node(node: &Node) -> Self {
        let status = node.status.as_ref();
        let alloc = status.and_then(|s| s.allocatable.as_ref().or(s.capacity.as_ref()));
        let allowed_pods = alloc
            .and_then(|a| a.get("pods"))
            .and_then(|q| quantity::parse(&q.0).ok())
            .map_or(110, |q| q.ceil_units() as i64);
        let ready = status
            .and_then(|s| s.conditions.as_ref())
            .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
            .is_some_and(|c| c.status == "True");
        let images = status
            .and_then(|s| s.images.as_ref())
            .map(|imgs| {
                imgs.iter()
                    .flat_map(|i| {
                        let size = i.size_bytes.unwrap_or(0);
                        i.names.iter().flatten().map(move |n| (n.clone(), size))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let runtime_handlers = status
            .and_then(|s| s.runtime_handlers.as_ref())
            .map(|hs| hs.iter().filter_map(|h| h.name.clone()).collect())
            .unwrap_or_default();
        Self {
            name: node.metadata.name.clone().unwrap_or_default(),
            labels: node.metadata.labels.clone().unwrap_or_default(),
            taints: node
                .spec
                .as_ref()
                .and_then(|s| s.taints.clone())
                .unwrap_or_default(),
            unschedulable: node
                .spec
                .as_ref()
                .and_then(|s| s.unschedulable)
                .unwrap_or(false),
            ready,
            allocatable: parse_list(alloc),
            allowed_pods,
            images,
            runtime_handlers,
            ..Self::default()
        }
    }

    /// Takes the node's own fields from `newer`, keeping the pods accounted here.
    pub fn update_node(&mut self, newer: NodeInfo) {
        let pods = std::mem::take(&mut self.pods);
        let (requested, scoring, count, ports) = (
            self.requested,
            self.requested_for_scoring,
            self.pod_count,
            std::mem::take(&mut self.used_ports),
        );
        *self = newer;
        self.pods = pods;
        self.requested = requested;
        self.requested_for_scoring = scoring;
        self.pod_count = count;
        self.used_ports = ports;
    }

    /// Accounts a pod bound (or assumed bound) to this node under `key`,
    /// replacing an older version of it.
    pub fn add_pod(&mut self, key: &str, pod: Arc<Pod>) {
        self.remove_pod(key);
        self.requested += pod_requests(&pod);
        self.requested_for_scoring += pod_requests_for_scoring(&pod);
        self.pod_count += 1;
        self.used_ports.extend(host_ports(&pod));
        self.pods.insert(key.to_owned(), pod);
    }

    /// Stops accounting the pod `key`; returns it if it was here.
    pub fn remove_pod(&mut self, key: &str) -> Option<Arc<Pod>> {
        let pod = self.pods.remove(key)?;
        self.requested -= pod_requests(&pod);
        self.requested_for_scoring -= pod_requests_for_scoring(&pod);
        self.pod_count -= 1;
        if !host_ports(&pod).is_empty() {
            self.used_ports = self.pods.values().flat_map(|p| host_ports(p)).collect();
        }
        Some(pod)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn requests_sum_containers_and_take_the_largest_init_container() {
        let p = pod(json!({"spec": {
            "initContainers": [{"name": "i", "resources": {"requests": {"cpu": "2", "memory": "1Gi"}}}],
            "containers": [
                {"name": "a", "resources": {"requests": {"cpu": "500m", "memory": "128Mi"}}},
                {"name": "b", "resources": {"requests": {"cpu": "250m"}}}],
            "overhead": {"cpu": "10m"}}}));
        assert_eq!(
            pod_requests(&p),
            Resources {
                milli_cpu: 2010,
                memory: 1 << 30,
                ephemeral_storage: 0
            }
        );
        let empty = pod(json!({"spec": {"containers": [{"name": "a"}]}}));
        assert_eq!(
            pod_requests_for_scoring(&empty),
            Resources {
                milli_cpu: 100,
                memory: 200 << 20,
                ephemeral_storage: 0
            }
        );
    }
}
