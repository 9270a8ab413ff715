//! Filter and score plugins in kube-scheduler's order, with its messages and
//! default weights: node-local ones as pure functions of a pod and a node,
//! cluster-aware ones (inter-pod affinity, topology spread) prepared once per
//! cycle in [`crate::interpod`].

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{NodeSelectorTerm, Pod, PodSpec, Taint};

use crate::cache::Cache;
use crate::interpod::{InterPodAffinity, TopologySpread};
use crate::node_info::{NodeInfo, host_ports, pod_requests, pod_requests_for_scoring, priority};

/// Why a node does not fit, in kube-scheduler's words.
pub type Reasons = Vec<String>;

fn spec(pod: &Pod) -> Option<&PodSpec> {
    pod.spec.as_ref()
}

pub use wasmkube_api::scheduling::tolerates;

fn tolerated(pod: &Pod, taint: &Taint) -> bool {
    spec(pod)
        .and_then(|s| s.tolerations.as_ref())
        .is_some_and(|ts| ts.iter().any(|t| tolerates(t, taint)))
}

fn taint_text(t: &Taint) -> String {
    format!("{{{}: {}}}", t.key, t.value.as_deref().unwrap_or(""))
}

fn synthetic_taint(key: &str) -> Taint {
    Taint {
        key: key.into(),
        effect: "NoSchedule".into(),
        ..Default::default()
    }
}

fn node_unschedulable(pod: &Pod, _: &PodFacts, node: &NodeInfo) -> Reasons {
    if node.unschedulable && !tolerated(pod, &synthetic_taint("node.kubernetes.io/unschedulable")) {
        return vec!["node(s) were unschedulable".into()];
    }
    Vec::new()
}

fn node_ready(pod: &Pod, _: &PodFacts, node: &NodeInfo) -> Reasons {
    let taint = synthetic_taint("node.kubernetes.io/not-ready");
    if !node.ready && !tolerated(pod, &taint) {
        return vec![format!(
            "node(s) had untolerated taint {}",
            taint_text(&taint)
        )];
    }
    Vec::new()
}

fn node_name(pod: &Pod, _: &PodFacts, node: &NodeInfo) -> Reasons {
    match spec(pod).and_then(|s| s.node_name.as_deref()) {
        Some(want) if !want.is_empty() && want != node.name => {
            vec!["node(s) didn't match the requested node name".into()]
        }
        _ => Vec::new(),
    }
}

fn taint_toleration(pod: &Pod, _: &PodFacts, node: &NodeInfo) -> Reasons {
    node.taints
        .iter()
        .find(|t| matches!(t.effect.as_str(), "NoSchedule" | "NoExecute") && !tolerated(pod, t))
        .map(|t| vec![format!("node(s) had untolerated taint {}", taint_text(t))])
        .unwrap_or_default()
}

/// A node selector term against a node (see [`wasmkube_api::scheduling`]).
pub fn term_matches(term: &NodeSelectorTerm, node: &NodeInfo) -> bool {
    wasmkube_api::scheduling::term_matches(term, &node.labels, &node.name)
}

fn node_affinity(pod: &Pod, _: &PodFacts, node: &NodeInfo) -> Reasons {
    if matches_node_affinity(pod, node) {
        Vec::new()
    } else {
        vec!["node(s) didn't match Pod's node affinity/selector".into()]
    }
}

/// The pod's `nodeSelector` and required node affinity both hold on `node`.
pub fn matches_node_affinity(pod: &Pod, node: &NodeInfo) -> bool {
    spec(pod).is_none_or(|s| wasmkube_api::scheduling::node_matches(s, &node.labels, &node.name))
}

fn node_ports(_: &Pod, facts: &PodFacts, node: &NodeInfo) -> Reasons {
    if facts.ports.iter().any(|p| node.used_ports.contains(p)) {
        return vec!["node(s) didn't have free ports for the requested pod ports".into()];
    }
    Vec::new()
}

fn resources_fit(_: &Pod, facts: &PodFacts, node: &NodeInfo) -> Reasons {
    let mut reasons = Vec::new();
    if node.pod_count + 1 > node.allowed_pods {
        reasons.push("Too many pods".into());
    }
    let want = facts.requests;
    let checks = [
        (
            "cpu",
            want.milli_cpu,
            node.requested.milli_cpu,
            node.allocatable.milli_cpu,
        ),
        (
            "memory",
            want.memory,
            node.requested.memory,
            node.allocatable.memory,
        ),
        (
            "ephemeral-storage",
            want.ephemeral_storage,
            node.requested.ephemeral_storage,
            node.allocatable.ephemeral_storage,
        ),
    ];
    for (name, want, used, alloc) in checks {
        if want > 0 && want > alloc - used {
            reasons.push(format!("Insufficient {name}"));
        }
    }
    reasons
}

/// What the filters need of a pod, computed once per cycle.
#[derive(Debug, Default)]
pub struct PodFacts {
    pub requests: crate::node_info::Resources,
    pub ports: std::collections::BTreeSet<(String, i32)>,
}

impl PodFacts {
    pub fn of(pod: &Pod) -> Self {
        Self {
            requests: pod_requests(pod),
            ports: host_ports(pod),
        }
    }
}

type Filter = fn(&Pod, &PodFacts, &NodeInfo) -> Reasons;

/// Filters in kube-scheduler's order; the first that fails names the reasons.
const FILTERS: &[Filter] = &[
    node_unschedulable,
    node_ready,
    node_name,
    taint_toleration,
    node_affinity,
    node_ports,
    resources_fit,
];

/// Why `node` cannot run `pod`; empty when it can.
pub fn filter(pod: &Pod, node: &NodeInfo) -> Reasons {
    filter_with(pod, &PodFacts::of(pod), node)
}

fn filter_with(pod: &Pod, facts: &PodFacts, node: &NodeInfo) -> Reasons {
    FILTERS
        .iter()
        .map(|f| f(pod, facts, node))
        .find(|r| !r.is_empty())
        .unwrap_or_default()
}

/// Scores in 0..=100 for each feasible node, combined with kube-scheduler's
/// default weights. Plugins whose raw values are relative (affinity weights,
/// taint counts) are normalized over the feasible nodes.
pub fn score(pod: &Pod, nodes: &[&NodeInfo]) -> Vec<i64> {
    const W_TAINT: i64 = 3;
    const W_AFFINITY: i64 = 2;
    const W_FIT: i64 = 1;
    const W_BALANCED: i64 = 1;
    const W_IMAGE: i64 = 1;
    let want = pod_requests_for_scoring(pod);
    let fraction = |used: i64, alloc: i64| {
        if alloc <= 0 {
            1.0
        } else {
            (used as f64 / alloc as f64).min(1.0)
        }
    };
    let preferred = spec(pod)
        .and_then(|s| s.affinity.as_ref())
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|na| {
            na.preferred_during_scheduling_ignored_during_execution
                .clone()
        })
        .unwrap_or_default();
    let affinity_raw: Vec<i64> = nodes
        .iter()
        .map(|n| {
            preferred
                .iter()
                .filter(|p| term_matches(&p.preference, n))
                .map(|p| i64::from(p.weight))
                .sum()
        })
        .collect();
    let taint_raw: Vec<i64> = nodes
        .iter()
        .map(|n| {
            n.taints
                .iter()
                .filter(|t| t.effect == "PreferNoSchedule" && !tolerated(pod, t))
                .count() as i64
        })
        .collect();
    let max_affinity = affinity_raw.iter().copied().max().unwrap_or(0);
    let max_taints = taint_raw.iter().copied().max().unwrap_or(0);
    let images: Vec<String> = spec(pod)
        .map(|s| {
            s.containers
                .iter()
                .filter_map(|c| c.image.clone())
                .collect()
        })
        .unwrap_or_default();
    nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let cpu = fraction(
                n.requested_for_scoring.milli_cpu + want.milli_cpu,
                n.allocatable.milli_cpu,
            );
            let mem = fraction(
                n.requested_for_scoring.memory + want.memory,
                n.allocatable.memory,
            );
            let least_allocated = ((1.0 - cpu) * 50.0 + (1.0 - mem) * 50.0) as i64;
            let balanced = ((1.0 - (cpu - mem).abs() / 2.0) * 100.0) as i64;
            // The share of the pod's images (or Wasm modules) the node already
            // holds: the warm start path.
            let image = if images.is_empty() {
                0
            } else {
                (images
                    .iter()
                    .filter(|img| n.images.contains_key(*img))
                    .count() as i64
                    * 100)
                    / images.len() as i64
            };
            let affinity = if max_affinity > 0 {
                affinity_raw[i] * 100 / max_affinity
            } else {
                0
            };
            let taint = if max_taints > 0 {
                100 - taint_raw[i] * 100 / max_taints
            } else {
                100
            };
            W_FIT * least_allocated
                + W_BALANCED * balanced
                + W_IMAGE * image
                + W_AFFINITY * affinity
                + W_TAINT * taint
        })
        .collect()
}

/// No node fits: the per-reason counts behind `FailedScheduling`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FitError {
    pub nodes: usize,
    pub reasons: BTreeMap<String, usize>,
}

impl std::fmt::Display for FitError {
    /// `0/5 nodes are available: 2 node(s) had untolerated taint {dedicated: gpu}, 3 Insufficient memory.`
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts: Vec<String> = self
            .reasons
            .iter()
            .map(|(r, n)| format!("{n} {r}"))
            .collect();
        parts.sort();
        if parts.is_empty() {
            write!(f, "0/{} nodes are available.", self.nodes)
        } else {
            write!(
                f,
                "0/{} nodes are available: {}.",
                self.nodes,
                parts.join(", ")
            )
        }
    }
}

/// How many feasible nodes a cycle looks for before it stops filtering
/// (kube-scheduler's adaptive `percentageOfNodesToScore`): all of a small
/// cluster, 10% of 5,000 nodes, never fewer than 100.
pub fn feasible_nodes_to_find(nodes: usize) -> usize {
    const MIN: usize = 100;
    if nodes < MIN {
        return nodes;
    }
    let percent = (50 - nodes as i64 / 125).max(5) as usize;
    (nodes * percent / 100).max(MIN)
}

/// Where a pod's RuntimeClass sends it: the handler it needs, if any.
fn runtime_handler(pod: &Pod, cache: &Cache) -> Option<String> {
    let class = spec(pod)?.runtime_class_name.as_deref()?;
    Some(cache.runtime_handler(class).unwrap_or(class).to_owned())
}

/// One scheduling cycle's prepared state for one pod.
pub struct Cycle {
    facts: PodFacts,
    handler: Option<String>,
    volumes: crate::volumes::VolumeNeeds,
    pub affinity: InterPodAffinity,
    pub spread: TopologySpread,
    priority: i32,
    key: String,
}

impl Cycle {
    pub fn prepare(key: &str, pod: &Pod, cache: &Cache) -> Self {
        let mut volumes = crate::volumes::VolumeNeeds::of(pod, &cache.storage);
        volumes.restrict_read_write_once_pod(pod, &cache.storage, || {
            cache.nodes().flat_map(|n| n.pods.values().map(|p| &**p))
        });
        Self {
            facts: PodFacts::of(pod),
            handler: runtime_handler(pod, cache),
            volumes,
            affinity: InterPodAffinity::prepare(pod, cache),
            spread: TopologySpread::prepare(pod, cache),
            priority: priority(pod),
            key: key.to_owned(),
        }
    }

    /// Every filter, node-local then cluster-aware.
    pub fn filter(&self, pod: &Pod, node: &NodeInfo) -> Reasons {
        let r = self.filter_local(pod, node);
        if !r.is_empty() {
            return r;
        }
        let r = self.spread.filter(node);
        if !r.is_empty() {
            return r;
        }
        self.affinity.filter(node)
    }

    /// The node-local filters, plus the runtime handler.
    pub fn filter_local(&self, pod: &Pod, node: &NodeInfo) -> Reasons {
        if let Some(h) = &self.handler
            && !node.runtime_handlers.contains(h)
        {
            return vec![format!("node(s) didn't have the runtime handler {h:?}")];
        }
        let r = self.volumes.filter(node);
        if !r.is_empty() {
            return r;
        }
        filter_with(pod, &self.facts, node)
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn priority(&self) -> i32 {
        self.priority
    }
}

/// `node` with the pods nominated to it that `cycle`'s pod must leave room
/// for (preemptors of at least its priority), when there are any.
pub fn with_nominated<'a>(
    cache: &Cache,
    cycle: &Cycle,
    node: &'a NodeInfo,
) -> std::borrow::Cow<'a, NodeInfo> {
    let mut nominated = cache
        .nominated_on(&node.name, cycle.priority, &cycle.key)
        .peekable();
    if nominated.peek().is_none() {
        return std::borrow::Cow::Borrowed(node);
    }
    let mut n = node.clone();
    for (k, p) in nominated {
        n.add_pod(k, p.clone());
    }
    std::borrow::Cow::Owned(n)
}

/// The outcome of filtering: feasible nodes, or why each node failed.
pub struct Filtered<'a> {
    pub feasible: Vec<&'a NodeInfo>,
    pub inspected: usize,
    pub reasons: BTreeMap<String, usize>,
    /// Nodes that failed, with their reasons (kept for preemption).
    pub failed: Vec<(&'a NodeInfo, Reasons)>,
}

/// Filters nodes from the cache's rotation until enough are feasible.
pub fn find_feasible<'a>(pod: &Pod, cycle: &Cycle, cache: &'a Cache) -> Filtered<'a> {
    let want = feasible_nodes_to_find(cache.node_count());
    let nominations = cache.has_nominations();
    let mut out = Filtered {
        feasible: Vec::new(),
        inspected: 0,
        reasons: BTreeMap::new(),
        failed: Vec::new(),
    };
    for n in cache.nodes_from_rotation() {
        if out.feasible.len() >= want {
            break;
        }
        out.inspected += 1;
        let r = if nominations {
            cycle.filter(pod, &with_nominated(cache, cycle, n))
        } else {
            cycle.filter(pod, n)
        };
        if r.is_empty() {
            out.feasible.push(n);
        } else {
            for reason in &r {
                *out.reasons.entry(reason.clone()).or_default() += 1;
            }
            out.failed.push((n, r));
        }
    }
    out
}

/// Normalizes raw values to 0..=100 over the feasible nodes, highest best
/// (or lowest best when `reverse`).
fn normalize(raw: &[i64], reverse: bool) -> Vec<i64> {
    let (min, max) = (
        raw.iter().copied().min().unwrap_or(0),
        raw.iter().copied().max().unwrap_or(0),
    );
    raw.iter()
        .map(|&v| {
            if max == min {
                if reverse { 100 } else { 0 }
            } else if reverse {
                (max - v) * 100 / (max - min)
            } else {
                (v - min) * 100 / (max - min)
            }
        })
        .collect()
}

/// Picks the best node for `pod` in `cache`, or says why none fits. The
/// cache's rotation moves on by the nodes inspected.
pub fn select(key: &str, pod: &Pod, cache: &mut Cache) -> Result<String, FitError> {
    let cycle = Cycle::prepare(key, pod, cache);
    let (pick, inspected) = {
        let filtered = find_feasible(pod, &cycle, cache);
        if filtered.feasible.is_empty() {
            return Err(FitError {
                nodes: cache.node_count(),
                reasons: filtered.reasons,
            });
        }
        let mut scores = score(pod, &filtered.feasible);
        const W_INTER_POD: i64 = 2;
        const W_SPREAD: i64 = 2;
        if cycle.affinity.scores_anything() {
            let raw: Vec<i64> = filtered
                .feasible
                .iter()
                .map(|n| cycle.affinity.score(n))
                .collect();
            for (s, v) in scores.iter_mut().zip(normalize(&raw, false)) {
                *s += W_INTER_POD * v;
            }
        }
        if cycle.spread.scores_anything() {
            let raw: Vec<Option<i64>> = filtered
                .feasible
                .iter()
                .map(|n| cycle.spread.score(n))
                .collect();
            let present: Vec<i64> = raw.iter().flatten().copied().collect();
            let normalized = normalize(&present, true);
            let mut it = normalized.into_iter();
            for (s, v) in scores.iter_mut().zip(&raw) {
                if v.is_some() {
                    *s += W_SPREAD * it.next().unwrap_or(0);
                }
            }
        }
        let best = scores.iter().copied().max().unwrap_or(0);
        let top: Vec<&NodeInfo> = filtered
            .feasible
            .iter()
            .zip(&scores)
            .filter(|(_, s)| **s == best)
            .map(|(n, _)| *n)
            .collect();
        // Ties break at random so equal nodes share the load.
        let pick = top[rand::random_range(0..top.len())].name.clone();
        (pick, filtered.inspected)
    };
    cache.advance(inspected);
    Ok(pick)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node_info::Resources;
    use serde_json::json;
    use std::sync::Arc;

    fn select(p: &Pod, nodes: &[NodeInfo]) -> Result<String, FitError> {
        let mut cache = Cache::default();
        for n in nodes {
            cache.upsert_node_info(n.clone());
        }
        super::select("d/p", p, &mut cache)
    }

    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": "p"}, "spec": v})).unwrap()
    }

    fn node(name: &str) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            ready: true,
            allocatable: Resources {
                milli_cpu: 4000,
                memory: 8 << 30,
                ephemeral_storage: 100 << 30,
            },
            allowed_pods: 110,
            ..NodeInfo::default()
        }
    }

    fn taint(key: &str, value: &str, effect: &str) -> Taint {
        Taint {
            key: key.into(),
            value: Some(value.into()),
            effect: effect.into(),
            ..Default::default()
        }
    }

    #[test]
    fn filters_name_their_reasons() {
        let small = pod(
            json!({"containers": [{"name": "c", "resources": {"requests": {"cpu": "1", "memory": "1Gi"}}}]}),
        );
        let big = pod(
            json!({"containers": [{"name": "c", "resources": {"requests": {"cpu": "8", "memory": "64Gi"}}}]}),
        );
        let mut tainted = node("t");
        tainted.taints = vec![taint("dedicated", "gpu", "NoSchedule")];
        let mut cordoned = node("c");
        cordoned.unschedulable = true;
        let mut not_ready = node("nr");
        not_ready.ready = false;
        let ok = node("ok");
        let mut full = node("f");
        full.pod_count = 110;
        let cases: Vec<(&Pod, &NodeInfo, Vec<&str>)> = vec![
            (&small, &ok, vec![]),
            (&big, &ok, vec!["Insufficient cpu", "Insufficient memory"]),
            (
                &small,
                &tainted,
                vec!["node(s) had untolerated taint {dedicated: gpu}"],
            ),
            (&small, &cordoned, vec!["node(s) were unschedulable"]),
            (
                &small,
                &not_ready,
                vec!["node(s) had untolerated taint {node.kubernetes.io/not-ready: }"],
            ),
            (&small, &full, vec!["Too many pods"]),
        ];
        for (p, n, want) in cases {
            assert_eq!(filter(p, n), want, "node {}", n.name);
        }
        let tolerant = pod(
            json!({"tolerations": [{"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}], "containers": [{"name": "c"}]}),
        );
        assert!(filter(&tolerant, &tainted).is_empty());
        let exists_all =
            pod(json!({"tolerations": [{"operator": "Exists"}], "containers": [{"name": "c"}]}));
        assert!(filter(&exists_all, &tainted).is_empty());
    }

    #[test]
    fn node_affinity_operators() {
        let mut n = node("n1");
        n.labels = [("zone", "a"), ("gen", "5")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let with = |exprs: serde_json::Value| {
            pod(
                json!({"containers": [{"name": "c"}], "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": exprs}]}}}}),
            )
        };
        let cases = [
            (
                json!([{"key": "zone", "operator": "In", "values": ["a", "b"]}]),
                true,
            ),
            (
                json!([{"key": "zone", "operator": "NotIn", "values": ["a"]}]),
                false,
            ),
            (json!([{"key": "gpu", "operator": "DoesNotExist"}]), true),
            (json!([{"key": "gpu", "operator": "Exists"}]), false),
            (
                json!([{"key": "gen", "operator": "Gt", "values": ["4"]}]),
                true,
            ),
            (
                json!([{"key": "gen", "operator": "Lt", "values": ["4"]}]),
                false,
            ),
        ];
        for (exprs, fits) in cases {
            assert_eq!(filter(&with(exprs.clone()), &n).is_empty(), fits, "{exprs}");
        }
        let by_field = pod(
            json!({"containers": [{"name": "c"}], "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1"]}]}]}}}}),
        );
        assert!(filter(&by_field, &n).is_empty());
        let selector = pod(json!({"containers": [{"name": "c"}], "nodeSelector": {"zone": "b"}}));
        assert_eq!(
            filter(&selector, &n),
            ["node(s) didn't match Pod's node affinity/selector"]
        );
    }

    #[test]
    fn host_ports_conflict() {
        let p = pod(
            json!({"containers": [{"name": "c", "ports": [{"containerPort": 80, "hostPort": 8080}]}]}),
        );
        let mut n = node("n");
        assert!(filter(&p, &n).is_empty());
        n.add_pod("d/p", Arc::new(p.clone()));
        assert_eq!(
            filter(&p, &n),
            ["node(s) didn't have free ports for the requested pod ports"]
        );
    }

    #[test]
    fn scoring_prefers_emptier_nodes_preferred_affinity_and_cached_images() {
        let p = pod(
            json!({"containers": [{"name": "c", "image": "reg/app:1", "resources": {"requests": {"cpu": "500m", "memory": "512Mi"}}}]}),
        );
        let mut busy = node("busy");
        busy.requested_for_scoring = Resources {
            milli_cpu: 3000,
            memory: 6 << 30,
            ephemeral_storage: 0,
        };
        assert_eq!(select(&p, &[busy.clone(), node("idle")]).unwrap(), "idle");
        let mut cached = node("cached");
        cached.images.insert("reg/app:1".into(), 1 << 20);
        assert_eq!(select(&p, &[node("cold"), cached]).unwrap(), "cached");
        let prefers = pod(
            json!({"containers": [{"name": "c"}], "affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 50, "preference": {"matchExpressions": [{"key": "disk", "operator": "In", "values": ["ssd"]}]}}]}}}),
        );
        let mut ssd = node("ssd");
        ssd.labels.insert("disk".into(), "ssd".into());
        assert_eq!(select(&prefers, &[node("hdd"), ssd]).unwrap(), "ssd");
        let mut soft = node("soft");
        soft.taints = vec![taint("spot", "true", "PreferNoSchedule")];
        assert_eq!(select(&p, &[soft, node("clean")]).unwrap(), "clean");
    }

    #[test]
    fn fit_error_reads_like_kube_scheduler() {
        let p = pod(
            json!({"containers": [{"name": "c", "resources": {"requests": {"memory": "16Gi"}}}]}),
        );
        let mut nodes: Vec<NodeInfo> = (0..3).map(|i| node(&format!("m{i}"))).collect();
        for i in 0..2 {
            let mut n = node(&format!("g{i}"));
            n.taints = vec![taint("dedicated", "gpu", "NoSchedule")];
            nodes.push(n);
        }
        let err = select(&p, &nodes).unwrap_err();
        assert_eq!(
            err.to_string(),
            "0/5 nodes are available: 2 node(s) had untolerated taint {dedicated: gpu}, 3 Insufficient memory."
        );
    }
}
