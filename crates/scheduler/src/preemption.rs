//! Preemption (kube-scheduler's DefaultPreemption, reduced to what node-local
//! filters decide): when a pod fits nowhere, find the node where evicting the
//! fewest, least important lower-priority pods makes it fit.
//!
//! Only resource, pod-count and host-port shortfalls are resolved this way; a
//! node that fails for its taints, labels, runtime handler, inter-pod affinity
//! or spread is not a candidate, and PodDisruptionBudgets are not consulted.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;

use crate::cache::Cache;
use crate::node_info::{NodeInfo, priority};
use crate::plugins::{Cycle, with_nominated};

/// The chosen node and the pods to evict from it.
#[derive(Debug)]
pub struct Plan {
    pub node: String,
    pub victims: Vec<(String, Arc<Pod>)>,
}

fn resolvable(reason: &str) -> bool {
    reason.starts_with("Insufficient ")
        || reason == "Too many pods"
        || reason == "node(s) didn't have free ports for the requested pod ports"
}

fn may_preempt(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.preemption_policy.as_deref())
        != Some("Never")
}

/// Victims on one node, or `None` when evicting every lower-priority pod
/// would still not make room.
fn victims_on(
    pod: &Pod,
    cycle: &Cycle,
    cache: &Cache,
    node: &NodeInfo,
) -> Option<Vec<(String, Arc<Pod>)>> {
    let mut trial = with_nominated(cache, cycle, node).into_owned();
    let mut lower: Vec<(String, Arc<Pod>)> = node
        .pods
        .iter()
        .filter(|(_, p)| priority(p) < cycle.priority() && p.metadata.deletion_timestamp.is_none())
        .map(|(k, p)| (k.clone(), p.clone()))
        .collect();
    if lower.is_empty() {
        return None;
    }
    for (k, _) in &lower {
        trial.remove_pod(k);
    }
    if !cycle.filter_local(pod, &trial).is_empty() {
        return None;
    }
    // Reprieve the most important pods first; whoever does not fit back in
    // is a victim.
    lower.sort_by_key(|(k, p)| (std::cmp::Reverse(priority(p)), k.clone()));
    let mut victims = Vec::new();
    for (k, p) in lower {
        trial.add_pod(&k, p.clone());
        if !cycle.filter_local(pod, &trial).is_empty() {
            trial.remove_pod(&k);
            victims.push((k, p));
        }
    }
    Some(victims)
}

/// Finds the best node to preempt on for a pod that fits nowhere.
pub fn plan(pod: &Pod, cycle: &Cycle, cache: &Cache) -> Option<Plan> {
    if !may_preempt(pod) {
        return None;
    }
    let mut best: Option<((i32, i64, usize), Plan)> = None;
    for node in cache.nodes() {
        let reasons = cycle.filter(pod, &with_nominated(cache, cycle, node));
        if reasons.is_empty() || !reasons.iter().all(|r| resolvable(r)) {
            continue;
        }
        let Some(victims) = victims_on(pod, cycle, cache, node) else {
            continue;
        };
        // Fewest important victims: lowest highest priority, then lowest
        // sum of priorities, then fewest pods.
        let rank = (
            victims
                .iter()
                .map(|(_, p)| priority(p))
                .max()
                .unwrap_or(i32::MIN),
            victims.iter().map(|(_, p)| i64::from(priority(p))).sum(),
            victims.len(),
        );
        if best.as_ref().is_none_or(|(r, _)| rank < *r) {
            best = Some((
                rank,
                Plan {
                    node: node.name.clone(),
                    victims,
                },
            ));
        }
    }
    best.map(|(_, p)| p)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::node_info::Resources;

    fn pod(name: &str, cpu: &str, prio: i32) -> Arc<Pod> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "d"},
                "spec": {"priority": prio, "containers": [{"name": "c", "resources": {"requests": {"cpu": cpu}}}]},
            }))
            .unwrap(),
        )
    }

    /// A pod on a test node: name, cpu request, priority.
    type TestPod<'a> = (&'a str, &'a str, i32);

    fn cache(nodes: &[(&str, &[TestPod])]) -> Cache {
        let mut c = Cache::default();
        for (name, pods) in nodes {
            c.upsert_node_info(NodeInfo {
                name: (*name).into(),
                ready: true,
                allocatable: Resources {
                    milli_cpu: 2000,
                    memory: 8 << 30,
                    ephemeral_storage: 0,
                },
                allowed_pods: 110,
                ..NodeInfo::default()
            });
            for (p, cpu, prio) in *pods {
                c.add_pod(&format!("d/{p}"), name, pod(p, cpu, *prio), false);
            }
        }
        c
    }

    fn plan_for(c: &Cache, p: &Pod) -> Option<Plan> {
        let cycle = Cycle::prepare("d/new", p, c);
        plan(p, &cycle, c)
    }

    #[test]
    fn evicts_the_fewest_least_important_pods() {
        let c = cache(&[
            ("a", &[("a-mid", "1", 500), ("a-low", "1", 100)]),
            ("b", &[("b-low1", "1", 100), ("b-low2", "1", 100)]),
            ("c", &[("c-high", "2", 2000)]),
        ]);
        let new = pod("new", "1", 1000);
        let plan = plan_for(&c, &new).unwrap();
        let victims: Vec<&str> = plan.victims.iter().map(|(k, _)| k.as_str()).collect();
        // On a, one victim of priority 100 (a-mid is reprieved); on b also one
        // of 100; c holds only a higher-priority pod. Ties go to the first node.
        assert_eq!((plan.node.as_str(), victims), ("a", vec!["d/a-low"]));
        // A pod that needs the whole node evicts everything lower on it.
        let big = pod("big", "2", 1000);
        let plan = plan_for(&c, &big).unwrap();
        assert_eq!(plan.node, "b");
        assert_eq!(plan.victims.len(), 2);
    }

    #[test]
    fn no_plan_without_lower_priority_pods_or_with_preemption_never() {
        let c = cache(&[("a", &[("a-high", "2", 1000)])]);
        assert!(plan_for(&c, &pod("new", "1", 1000)).is_none());
        let mut never = (*pod("never", "1", 5000)).clone();
        never.spec.as_mut().unwrap().preemption_policy = Some("Never".into());
        assert!(plan_for(&c, &never).is_none());
        assert!(plan_for(&c, &pod("urgent", "1", 5000)).is_some());
    }

    #[test]
    fn nominated_preemptors_keep_their_room() {
        let mut c = cache(&[("a", &[("a-low", "1", 100)])]);
        // A preemptor of priority 1000 is nominated to a for its last free core.
        c.nominate("d/pre", "a", pod("pre", "1", 1000));
        let lower = pod("lower", "1", 10);
        let err = crate::plugins::select("d/lower", &lower, &mut c).unwrap_err();
        assert_eq!(
            err.to_string(),
            "0/1 nodes are available: 1 Insufficient cpu."
        );
        // The preemptor itself still fits there.
        assert_eq!(
            crate::plugins::select("d/pre", &pod("pre", "1", 1000), &mut c).unwrap(),
            "a"
        );
    }
}
