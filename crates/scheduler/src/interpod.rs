//! Plugins that look beyond one node: inter-pod affinity and anti-affinity
//! (with topology keys) and pod topology spread. Each is prepared once per
//! scheduling cycle from the cache (kube-scheduler's PreFilter), then asked
//! per node.

use std::collections::{BTreeMap, HashMap, HashSet};

use k8s_openapi::api::core::v1::{Pod, PodAffinityTerm, TopologySpreadConstraint};
use wasmkube_api::selectors::LabelSelector;

use crate::cache::Cache;
use crate::node_info::NodeInfo;
use crate::plugins::{Reasons, matches_node_affinity};

fn labels(pod: &Pod) -> &BTreeMap<String, String> {
    static EMPTY: BTreeMap<String, String> = BTreeMap::new();
    pod.metadata.labels.as_ref().unwrap_or(&EMPTY)
}

fn namespace(pod: &Pod) -> &str {
    pod.metadata.namespace.as_deref().unwrap_or_default()
}

fn selector(
    sel: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector>,
) -> Option<LabelSelector> {
    // A missing or unparsable selector matches nothing.
    sel.and_then(|s| LabelSelector::from_api(s).ok())
}

/// An affinity term resolved against the owner's namespace.
struct Term {
    selector: Option<LabelSelector>,
    /// `None` means every namespace.
    namespaces: Option<HashSet<String>>,
    key: String,
    weight: i64,
}

impl Term {
    fn new(t: &PodAffinityTerm, owner_ns: &str, weight: i32, cache: &Cache) -> Self {
        let mut namespaces: HashSet<String> = t.namespaces.iter().flatten().cloned().collect();
        let all = match &t.namespace_selector {
            Some(sel) => match LabelSelector::from_api(sel) {
                Ok(s) if s.is_empty() => true,
                Ok(s) => {
                    namespaces.extend(
                        cache
                            .namespaces()
                            .filter(|(_, l)| s.matches(l))
                            .map(|(n, _)| n.clone()),
                    );
                    false
                }
                Err(_) => false,
            },
            None => {
                if namespaces.is_empty() {
                    namespaces.insert(owner_ns.to_owned());
                }
                false
            }
        };
        Self {
            selector: selector(t.label_selector.as_ref()),
            namespaces: (!all).then_some(namespaces),
            key: t.topology_key.clone(),
            weight: i64::from(weight),
        }
    }

    fn matches(&self, pod: &Pod) -> bool {
        self.namespaces
            .as_ref()
            .is_none_or(|ns| ns.contains(namespace(pod)))
            && self
                .selector
                .as_ref()
                .is_some_and(|s| s.matches(labels(pod)))
    }
}

/// The four term lists of a pod's affinity.
#[derive(Default)]
struct Terms {
    required_affinity: Vec<Term>,
    required_anti: Vec<Term>,
    preferred_affinity: Vec<Term>,
    preferred_anti: Vec<Term>,
}

impl Terms {
    fn of(pod: &Pod, cache: &Cache) -> Self {
        let ns = namespace(pod);
        let Some(aff) = pod.spec.as_ref().and_then(|s| s.affinity.as_ref()) else {
            return Self::default();
        };
        let req = |ts: Option<&Vec<PodAffinityTerm>>| -> Vec<Term> {
            ts.into_iter()
                .flatten()
                .map(|t| Term::new(t, ns, 1, cache))
                .collect()
        };
        let pa = aff.pod_affinity.as_ref();
        let anti = aff.pod_anti_affinity.as_ref();
        Self {
            required_affinity: req(pa.and_then(|a| {
                a.required_during_scheduling_ignored_during_execution
                    .as_ref()
            })),
            required_anti: req(anti.and_then(|a| {
                a.required_during_scheduling_ignored_during_execution
                    .as_ref()
            })),
            preferred_affinity: pa
                .and_then(|a| {
                    a.preferred_during_scheduling_ignored_during_execution
                        .as_ref()
                })
                .into_iter()
                .flatten()
                .map(|w| Term::new(&w.pod_affinity_term, ns, w.weight, cache))
                .collect(),
            preferred_anti: anti
                .and_then(|a| {
                    a.preferred_during_scheduling_ignored_during_execution
                        .as_ref()
                })
                .into_iter()
                .flatten()
                .map(|w| Term::new(&w.pod_affinity_term, ns, w.weight, cache))
                .collect(),
        }
    }

    fn is_empty(&self) -> bool {
        self.required_affinity.is_empty()
            && self.required_anti.is_empty()
            && self.preferred_affinity.is_empty()
            && self.preferred_anti.is_empty()
    }
}

type Domain = (String, String);

fn domain(node: &NodeInfo, key: &str) -> Option<Domain> {
    node.labels.get(key).map(|v| (key.to_owned(), v.clone()))
}

fn node_in(node: &NodeInfo, counts: &HashMap<Domain, i64>, key: &str) -> i64 {
    node.labels
        .get(key)
        .and_then(|v| counts.get(&(key.to_owned(), v.clone())))
        .copied()
        .unwrap_or(0)
}

/// Inter-pod affinity prepared for one incoming pod.
#[derive(Default)]
pub struct InterPodAffinity {
    own: Terms,
    /// Domains where an existing pod's required anti-affinity forbids the pod.
    existing_anti: HashMap<Domain, i64>,
    /// Per required affinity term: pods matching all terms, by domain.
    affinity: Vec<HashMap<Domain, i64>>,
    affinity_matches_anywhere: bool,
    self_matches_affinity: bool,
    /// Per required anti-affinity term: matching pods by domain.
    anti: Vec<HashMap<Domain, i64>>,
    /// Preferred (anti-)affinity, both ways, summed by domain.
    preferred: HashMap<Domain, i64>,
}

impl InterPodAffinity {
    pub fn prepare(pod: &Pod, cache: &Cache) -> Self {
        let own = Terms::of(pod, cache);
        let mut s = Self {
            affinity: vec![HashMap::new(); own.required_affinity.len()],
            anti: vec![HashMap::new(); own.required_anti.len()],
            self_matches_affinity: own.required_affinity.iter().all(|t| t.matches(pod)),
            ..Self::default()
        };
        // Existing pods' terms about the incoming pod (symmetry).
        for (node, other) in cache.pods_with_affinity() {
            let theirs = Terms::of(other, cache);
            for t in &theirs.required_anti {
                if t.matches(pod)
                    && let Some(d) = domain(node, &t.key)
                {
                    *s.existing_anti.entry(d).or_default() += 1;
                }
            }
            for (terms, sign) in [
                (&theirs.preferred_affinity, 1),
                (&theirs.preferred_anti, -1),
                (&theirs.required_affinity, 1),
            ] {
                for t in terms {
                    if t.matches(pod)
                        && let Some(d) = domain(node, &t.key)
                    {
                        *s.preferred.entry(d).or_default() += sign * t.weight;
                    }
                }
            }
        }
        if !own.is_empty() {
            for node in cache.nodes() {
                for other in node.pods.values() {
                    if !own.required_affinity.is_empty()
                        && own.required_affinity.iter().all(|t| t.matches(other))
                    {
                        s.affinity_matches_anywhere = true;
                        for (i, t) in own.required_affinity.iter().enumerate() {
                            if let Some(d) = domain(node, &t.key) {
                                *s.affinity[i].entry(d).or_default() += 1;
                            }
                        }
                    }
                    for (i, t) in own.required_anti.iter().enumerate() {
                        if t.matches(other)
                            && let Some(d) = domain(node, &t.key)
                        {
                            *s.anti[i].entry(d).or_default() += 1;
                        }
                    }
                    for (terms, sign) in [(&own.preferred_affinity, 1), (&own.preferred_anti, -1)] {
                        for t in terms {
                            if t.matches(other)
                                && let Some(d) = domain(node, &t.key)
                            {
                                *s.preferred.entry(d).or_default() += sign * t.weight;
                            }
                        }
                    }
                }
            }
        }
        s.own = own;
        s
    }

    /// kube-scheduler's InterPodAffinity filter, its checks in its order.
    pub fn filter(&self, node: &NodeInfo) -> Reasons {
        let terms = &self.own.required_affinity;
        let satisfied = terms
            .iter()
            .enumerate()
            .all(|(i, t)| node_in(node, &self.affinity[i], &t.key) > 0);
        // The first pod of a group that selects itself may go anywhere the
        // topology keys exist.
        let first_of_group = !self.affinity_matches_anywhere
            && self.self_matches_affinity
            && terms.iter().all(|t| node.labels.contains_key(&t.key));
        if !terms.is_empty() && !satisfied && !first_of_group {
            return vec!["node(s) didn't match pod affinity rules".into()];
        }
        if self
            .own
            .required_anti
            .iter()
            .enumerate()
            .any(|(i, t)| node_in(node, &self.anti[i], &t.key) > 0)
        {
            return vec!["node(s) didn't match pod anti-affinity rules".into()];
        }
        if self
            .existing_anti
            .keys()
            .any(|(k, v)| node.labels.get(k) == Some(v))
        {
            return vec!["node(s) didn't satisfy existing pods anti-affinity rules".into()];
        }
        Vec::new()
    }

    /// The raw preferred score (sum of weights of matching domains).
    pub fn score(&self, node: &NodeInfo) -> i64 {
        self.preferred
            .iter()
            .filter(|((k, v), _)| node.labels.get(k) == Some(v))
            .map(|(_, w)| w)
            .sum()
    }

    pub fn scores_anything(&self) -> bool {
        !self.preferred.is_empty()
    }
}

struct Constraint {
    max_skew: i64,
    key: String,
    selector: Option<LabelSelector>,
    min_domains: usize,
    hard: bool,
    /// Matching pods per domain value, over eligible nodes.
    counts: HashMap<String, i64>,
    min: i64,
}

/// Pod topology spread prepared for one incoming pod.
#[derive(Default)]
pub struct TopologySpread {
    constraints: Vec<Constraint>,
    self_match: Vec<i64>,
}

impl TopologySpread {
    pub fn prepare(pod: &Pod, cache: &Cache) -> Self {
        let list: &[TopologySpreadConstraint] = pod
            .spec
            .as_ref()
            .and_then(|s| s.topology_spread_constraints.as_deref())
            .unwrap_or_default();
        if list.is_empty() {
            return Self::default();
        }
        let mut constraints: Vec<Constraint> = list
            .iter()
            .map(|c| Constraint {
                max_skew: i64::from(c.max_skew.max(1)),
                key: c.topology_key.clone(),
                selector: selector(c.label_selector.as_ref()),
                min_domains: c.min_domains.unwrap_or(1).max(1) as usize,
                hard: c.when_unsatisfiable != "ScheduleAnyway",
                counts: HashMap::new(),
                min: 0,
            })
            .collect();
        let hard_keys: Vec<String> = constraints
            .iter()
            .filter(|c| c.hard)
            .map(|c| c.key.clone())
            .collect();
        let ns = namespace(pod);
        for node in cache.nodes() {
            // Nodes the pod could never use do not count (nodeAffinityPolicy: Honor).
            if !matches_node_affinity(pod, node)
                || !hard_keys.iter().all(|k| node.labels.contains_key(k))
            {
                continue;
            }
            for c in &mut constraints {
                let Some(value) = node.labels.get(&c.key) else {
                    continue;
                };
                let n = node
                    .pods
                    .values()
                    .filter(|p| {
                        p.metadata.deletion_timestamp.is_none()
                            && namespace(p) == ns
                            && c.selector.as_ref().is_some_and(|s| s.matches(labels(p)))
                    })
                    .count() as i64;
                *c.counts.entry(value.clone()).or_default() += n;
            }
        }
        for c in &mut constraints {
            c.min = if c.counts.len() < c.min_domains {
                0
            } else {
                c.counts.values().copied().min().unwrap_or(0)
            };
        }
        let self_match = constraints
            .iter()
            .map(|c| i64::from(c.selector.as_ref().is_some_and(|s| s.matches(labels(pod)))))
            .collect();
        Self {
            constraints,
            self_match,
        }
    }

    /// kube-scheduler's PodTopologySpread filter (DoNotSchedule constraints).
    pub fn filter(&self, node: &NodeInfo) -> Reasons {
        for (c, self_match) in self.constraints.iter().zip(&self.self_match) {
            if !c.hard {
                continue;
            }
            let Some(value) = node.labels.get(&c.key) else {
                return vec![
                    "node(s) didn't match pod topology spread constraints (missing required label)"
                        .into(),
                ];
            };
            let count = c.counts.get(value).copied().unwrap_or(0);
            if count + self_match - c.min > c.max_skew {
                return vec!["node(s) didn't match pod topology spread constraints".into()];
            }
        }
        Vec::new()
    }

    /// Raw ScheduleAnyway score: matching pods in the node's domains (lower
    /// is better); `None` when the node lacks a key.
    pub fn score(&self, node: &NodeInfo) -> Option<i64> {
        let mut sum = 0;
        for c in self.constraints.iter().filter(|c| !c.hard) {
            let value = node.labels.get(&c.key)?;
            sum += c.counts.get(value).copied().unwrap_or(0);
        }
        Some(sum)
    }

    pub fn scores_anything(&self) -> bool {
        self.constraints.iter().any(|c| !c.hard)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::{Value, json};

    use super::*;
    use crate::node_info::Resources;
    use crate::plugins::{Cycle, select};

    fn pod(name: &str, labels: Value, spec: Value) -> Pod {
        let mut spec = spec;
        spec["containers"] = json!([{"name": "c"}]);
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "d", "labels": labels},
            "spec": spec,
        }))
        .unwrap()
    }

    /// Nodes n0..n{count} in zones a, b, a, b, ...
    fn cluster(count: usize) -> Cache {
        let mut c = Cache::default();
        for i in 0..count {
            c.upsert_node_info(NodeInfo {
                name: format!("n{i}"),
                ready: true,
                allocatable: Resources {
                    milli_cpu: 4000,
                    memory: 8 << 30,
                    ephemeral_storage: 0,
                },
                allowed_pods: 110,
                labels: [
                    ("kubernetes.io/hostname".to_owned(), format!("n{i}")),
                    ("zone".to_owned(), ["a", "b"][i % 2].to_owned()),
                ]
                .into(),
                ..NodeInfo::default()
            });
        }
        c
    }

    fn place(c: &mut Cache, node: &str, p: Pod) {
        let key = format!("d/{}", p.metadata.name.as_deref().unwrap());
        c.add_pod(&key, node, Arc::new(p), false);
    }

    fn feasible(c: &Cache, p: &Pod) -> Vec<String> {
        let cycle = Cycle::prepare("d/new", p, c);
        c.nodes()
            .filter(|n| cycle.filter(p, n).is_empty())
            .map(|n| n.name.clone())
            .collect()
    }

    fn term(key: &str, app: &str) -> Value {
        json!({"topologyKey": key, "labelSelector": {"matchLabels": {"app": app}}})
    }

    #[test]
    fn required_anti_affinity_keeps_replicas_apart_both_ways() {
        let mut c = cluster(4);
        let anti = |name: &str| {
            pod(
                name,
                json!({"app": "db"}),
                json!({"affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [term("zone", "db")]}}}),
            )
        };
        place(&mut c, "n0", anti("db-0"));
        // Zone a (n0, n2) is taken by db-0.
        assert_eq!(feasible(&c, &anti("db-1")), ["n1", "n3"]);
        // Symmetry: a plain pod labelled app=db may not join db-0's zone either.
        let plain = pod("x", json!({"app": "db"}), json!({}));
        assert_eq!(feasible(&c, &plain), ["n1", "n3"]);
        let cycle = Cycle::prepare("d/x", &plain, &c);
        assert_eq!(
            cycle.filter(&plain, c.node("n2").unwrap()),
            ["node(s) didn't satisfy existing pods anti-affinity rules"]
        );
        place(&mut c, "n1", anti("db-1"));
        let err = select("d/db-2", &anti("db-2"), &mut c).unwrap_err();
        assert_eq!(
            err.to_string(),
            "0/4 nodes are available: 4 node(s) didn't match pod anti-affinity rules."
        );
    }

    #[test]
    fn required_affinity_follows_the_matching_pods_and_lets_the_first_one_in() {
        let mut c = cluster(4);
        let web = |name: &str| {
            pod(
                name,
                json!({"app": "web"}),
                json!({"affinity": {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [term("kubernetes.io/hostname", "cache")]}}}),
            )
        };
        // Nothing matches yet and the pod does not match itself: nowhere.
        assert!(feasible(&c, &web("w")).is_empty());
        // A pod that selects itself may start the group anywhere.
        let first = pod(
            "cache-0",
            json!({"app": "cache"}),
            json!({"affinity": {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [term("zone", "cache")]}}}),
        );
        assert_eq!(feasible(&c, &first).len(), 4);
        place(&mut c, "n3", first);
        assert_eq!(feasible(&c, &web("w")), ["n3"]);
        // The other namespace's pods do not count unless the term names it.
        let other_ns = pod(
            "o",
            json!({}),
            json!({"affinity": {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
                {"topologyKey": "zone", "labelSelector": {"matchLabels": {"app": "cache"}}, "namespaces": ["elsewhere"]}]}}}),
        );
        assert!(feasible(&c, &other_ns).is_empty());
    }

    #[test]
    fn preferred_affinity_and_anti_affinity_steer_scores() {
        let mut c = cluster(2);
        place(
            &mut c,
            "n1",
            pod("cache", json!({"app": "cache"}), json!({})),
        );
        let near = pod(
            "near",
            json!({}),
            json!({"affinity": {"podAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 100, "podAffinityTerm": term("kubernetes.io/hostname", "cache")}]}}}),
        );
        assert_eq!(select("d/near", &near, &mut c).unwrap(), "n1");
        let far = pod(
            "far",
            json!({}),
            json!({"affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 100, "podAffinityTerm": term("kubernetes.io/hostname", "cache")}]}}}),
        );
        assert_eq!(select("d/far", &far, &mut c).unwrap(), "n0");
    }

    #[test]
    fn topology_spread_honours_max_skew_and_missing_keys() {
        let mut c = cluster(4);
        let spread = |name: &str, key: &str, when: &str| {
            pod(
                name,
                json!({"app": "s"}),
                json!({"topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": key,
                    "whenUnsatisfiable": when, "labelSelector": {"matchLabels": {"app": "s"}}}]}),
            )
        };
        place(&mut c, "n0", spread("s0", "zone", "DoNotSchedule"));
        // Zone a has 1, zone b has 0: another in zone a would make skew 2.
        assert_eq!(
            feasible(&c, &spread("s1", "zone", "DoNotSchedule")),
            ["n1", "n3"]
        );
        let cycle = Cycle::prepare("d/s1", &spread("s1", "zone", "DoNotSchedule"), &c);
        assert_eq!(
            cycle.filter(
                &spread("s1", "zone", "DoNotSchedule"),
                c.node("n2").unwrap()
            ),
            ["node(s) didn't match pod topology spread constraints"]
        );
        // A node without the key never qualifies for a hard constraint.
        let no_key = spread("s2", "rack", "DoNotSchedule");
        let cycle = Cycle::prepare("d/s2", &no_key, &c);
        assert_eq!(
            cycle.filter(&no_key, c.node("n1").unwrap()),
            ["node(s) didn't match pod topology spread constraints (missing required label)"]
        );
        // ScheduleAnyway prefers the emptier zone but does not filter.
        let soft = spread("s3", "zone", "ScheduleAnyway");
        assert_eq!(feasible(&c, &soft).len(), 4);
        for i in 0..6 {
            let name = format!("soft{i}");
            let node = select(&format!("d/{name}"), &soft, &mut c).unwrap();
            place(&mut c, &node, spread(&name, "zone", "ScheduleAnyway"));
        }
        let per_zone = |z: &str| -> usize {
            c.nodes()
                .filter(|n| n.labels["zone"] == z)
                .map(|n| n.pods.len())
                .sum()
        };
        assert!(
            per_zone("a").abs_diff(per_zone("b")) <= 1,
            "{} vs {}",
            per_zone("a"),
            per_zone("b")
        );
    }

    #[test]
    fn runtime_class_handlers_decide_where_a_pod_may_run() {
        let mut c = cluster(2);
        let mut wasm_node = c.node("n1").unwrap().clone();
        wasm_node.runtime_handlers.insert("wasmtime".into());
        c.upsert_node_info(wasm_node);
        c.set_runtime_class("wasm".into(), "wasmtime".into());
        let p = pod("w", json!({}), json!({"runtimeClassName": "wasm"}));
        assert_eq!(feasible(&c, &p), ["n1"]);
        let err = select(
            "d/x",
            &pod("x", json!({}), json!({"runtimeClassName": "gvisor"})),
            &mut c,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "0/2 nodes are available: 2 node(s) didn't have the runtime handler \"gvisor\"."
        );
    }
}
