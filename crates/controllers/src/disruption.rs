//! The disruption controller: keeps each PodDisruptionBudget's status
//! current (the pods it covers, how many are healthy, how many must be, and
//! so how many may be evicted now), as Kubernetes' does. The API server's
//! `pods/eviction` reads `disruptionsAllowed` and takes one per eviction,
//! recording the pod in `disruptedPods` until it is gone (or two minutes
//! pass), so a pod being evicted is not counted healthy meanwhile.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use crate::queue::Controller;
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::ResourceExt;
use kube::api::{Api, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use wasmkube_api::selectors::LabelSelector;

use crate::Error;

/// How long an evicted pod stays in `disruptedPods` if it does not go.
const DELETION_TIMEOUT: Duration = Duration::from_secs(120);

struct Ctx {
    client: kube::Client,
    pods: Store<Pod>,
    replica_sets: Store<ReplicaSet>,
}

/// The pods `pdb` covers: those of its namespace its selector matches (an
/// empty selector matches all of them, a missing one none).
fn covered(pdb: &PodDisruptionBudget, pods: &[Arc<Pod>]) -> Vec<Arc<Pod>> {
    let ns = pdb.namespace();
    let Some(selector) = pdb
        .spec
        .as_ref()
        .and_then(|s| s.selector.as_ref())
        .and_then(|s| LabelSelector::from_api(s).ok())
    else {
        return Vec::new();
    };
    pods.iter()
        .filter(|p| p.namespace() == ns && selector.matches(p.labels()))
        .filter(|p| {
            !matches!(
                p.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            )
        })
        .cloned()
        .collect()
}

/// A count or a percentage of `of`, rounded up.
fn scaled(v: &IntOrString, of: i32) -> i32 {
    match v {
        IntOrString::Int(n) => *n,
        IntOrString::String(p) => {
            let pct: i64 = p.trim_end_matches('%').parse().unwrap_or(0);
            ((i64::from(of) * pct + 99) / 100) as i32
        }
    }
}

/// The pods the budget expects: its pods' controllers' scale where the
/// budget is relative (a percentage, or `maxUnavailable`), else the pods.
fn expected(pdb: &PodDisruptionBudget, pods: &[Arc<Pod>], replica_sets: &Store<ReplicaSet>) -> i32 {
    let spec = pdb.spec.as_ref();
    let relative = spec.is_some_and(|s| {
        s.max_unavailable.is_some() || matches!(s.min_available, Some(IntOrString::String(_)))
    });
    if !relative {
        return pods.len() as i32;
    }
    let mut controllers = HashSet::new();
    let mut count = 0;
    for p in pods {
        let owner = p
            .owner_references()
            .iter()
            .find(|o| o.controller == Some(true));
        match owner {
            Some(o) if o.kind == "ReplicaSet" => {
                if controllers.insert(o.uid.clone()) {
                    let rs = replica_sets
                        .get(&ObjectRef::new(&o.name).within(&p.namespace().unwrap_or_default()));
                    count += rs.and_then(|rs| rs.spec.as_ref()?.replicas).unwrap_or(1);
                }
            }
            _ => count += 1,
        }
    }
    count
}

/// The budget's status as of now, from `pods`.
fn status_of(
    pdb: &PodDisruptionBudget,
    pods: &[Arc<Pod>],
    expected_pods: i32,
    now: Timestamp,
) -> (PodDisruptionBudgetStatus, bool) {
    let old = pdb.status.clone().unwrap_or_default();
    let names: HashSet<String> = pods.iter().map(|p| p.name_any()).collect();
    // Evicted pods still here, for at most the deletion timeout.
    let disrupted: BTreeMap<String, Time> = old
        .disrupted_pods
        .unwrap_or_default()
        .into_iter()
        .filter(|(name, at)| {
            names.contains(name)
                && now.duration_since(at.0)
                    < SignedDuration::try_from(DELETION_TIMEOUT).unwrap_or(SignedDuration::MAX)
        })
        .collect();
    let healthy = pods
        .iter()
        .filter(|p| {
            p.metadata.deletion_timestamp.is_none()
                && !disrupted.contains_key(&p.name_any())
                && crate::pods::is_ready(p)
        })
        .count() as i32;
    let spec = pdb.spec.clone().unwrap_or_default();
    let desired = match (&spec.max_unavailable, &spec.min_available) {
        (Some(max), _) => (expected_pods - scaled(max, expected_pods)).max(0),
        (None, Some(min)) => scaled(min, expected_pods),
        (None, None) => 0,
    };
    let allowed = if expected_pods <= 0 {
        0
    } else {
        (healthy - desired).max(0)
    };
    let (cond_status, reason) = if allowed > 0 {
        ("True", "SufficientPods")
    } else {
        ("False", "InsufficientPods")
    };
    let previous = old
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "DisruptionAllowed");
    let condition = Condition {
        type_: "DisruptionAllowed".into(),
        status: cond_status.into(),
        reason: reason.into(),
        message: String::new(),
        observed_generation: pdb.metadata.generation,
        last_transition_time: match previous {
            Some(c) if c.status == cond_status => c.last_transition_time.clone(),
            _ => Time(now),
        },
    };
    let status = PodDisruptionBudgetStatus {
        observed_generation: pdb.metadata.generation,
        expected_pods,
        current_healthy: healthy,
        desired_healthy: desired,
        disruptions_allowed: allowed,
        disrupted_pods: (!disrupted.is_empty()).then_some(disrupted),
        conditions: Some(vec![condition]),
    };
    let waiting = status.disrupted_pods.is_some();
    (status, waiting)
}

async fn reconcile(pdb: Arc<PodDisruptionBudget>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let pods = covered(&pdb, &ctx.pods.state());
    let expected_pods = expected(&pdb, &pods, &ctx.replica_sets);
    let (status, waiting) = status_of(&pdb, &pods, expected_pods, Timestamp::now());
    let again = if waiting {
        Action::requeue(DELETION_TIMEOUT)
    } else {
        Action::await_change()
    };
    if pdb.status.as_ref() == Some(&status) {
        return Ok(again);
    }
    let mut updated = (*pdb).clone();
    updated.status = Some(status);
    updated.metadata.managed_fields = None;
    let api: Api<PodDisruptionBudget> =
        Api::namespaced(ctx.client.clone(), &pdb.namespace().unwrap_or_default());
    // A replace under the read version: an eviction that took a disruption
    // meanwhile makes this fail, and the next pass sees it.
    match api
        .replace_status(&pdb.name_any(), &PostParams::default(), &updated)
        .await
    {
        Ok(_) => Ok(again),
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {
            Ok(Action::requeue(Duration::from_millis(100)))
        }
        Err(e) => Err(Error::Kube(e)),
    }
}

/// Runs the disruption controller until its watches end.
pub(crate) fn run(
    client: kube::Client,
    informers: &mut crate::Informers,
) -> impl std::future::Future<Output = Result<(), Error>> + use<> {
    let crate::Cache {
        store: pods,
        changes,
    } = informers.cache::<Pod>();
    let replica_sets = informers.store::<ReplicaSet>();
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        pods: pods.clone(),
        replica_sets,
    });
    async move {
        let _ = pods.wait_until_ready().await;
        let controller = Controller::new(
            Api::<PodDisruptionBudget>::all(client),
            watcher::Config::default(),
        );
        let budgets = controller.store();
        // A pod's change may change the budgets of its namespace.
        let covering = move |pod: Arc<Pod>| {
            budgets
                .state()
                .into_iter()
                .filter(|b| b.namespace() == pod.namespace())
                .map(|b| ObjectRef::from_obj(&*b))
                .collect::<Vec<_>>()
        };
        controller
            .watches_shared_stream(changes, covering)
            .run("disruption", reconcile, crate::retry_soon, ctx)
            .await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(name: &str, ready: bool) -> Arc<Pod> {
        Arc::new(
            serde_json::from_value(json!({"metadata": {"name": name, "namespace": "ns",
                "labels": {"app": "web"}},
                "status": {"phase": "Running", "conditions": [
                    {"type": "Ready", "status": if ready { "True" } else { "False" }}]}}))
            .unwrap(),
        )
    }

    fn pdb(spec: serde_json::Value, disrupted: serde_json::Value) -> PodDisruptionBudget {
        serde_json::from_value(
            json!({"metadata": {"name": "web", "namespace": "ns", "generation": 1},
            "spec": spec, "status": {"disruptedPods": disrupted, "disruptionsAllowed": 0,
            "currentHealthy": 0, "desiredHealthy": 0, "expectedPods": 0}}),
        )
        .unwrap()
    }

    #[test]
    fn allowed_disruptions_are_healthy_pods_beyond_what_the_budget_keeps() {
        let pods = vec![
            pod("a", true),
            pod("b", true),
            pod("c", true),
            pod("d", false),
        ];
        let now = Timestamp::now();
        let selector = json!({"matchLabels": {"app": "web"}});
        let b = pdb(json!({"selector": selector, "minAvailable": 2}), json!({}));
        let covered = covered(&b, &pods);
        assert_eq!(covered.len(), 4);
        let (s, _) = status_of(&b, &covered, 4, now);
        assert_eq!(
            (s.current_healthy, s.desired_healthy, s.disruptions_allowed),
            (3, 2, 1)
        );
        // maxUnavailable as a percentage of 4 expected: 25 % is one pod.
        let b = pdb(
            json!({"selector": selector, "maxUnavailable": "25%"}),
            json!({}),
        );
        let (s, _) = status_of(&b, &covered, 4, now);
        assert_eq!((s.desired_healthy, s.disruptions_allowed), (3, 0));
        // A pod being evicted is not healthy until it goes; an old entry
        // (past the deletion timeout) or one for a pod gone is dropped.
        let old = now
            .checked_sub(SignedDuration::from_mins(5))
            .unwrap()
            .to_string();
        let b = pdb(
            json!({"selector": selector, "minAvailable": 2}),
            json!({"a": now.to_string(), "b": old, "gone": now.to_string()}),
        );
        let (s, waiting) = status_of(&b, &covered, 4, now);
        assert_eq!((s.current_healthy, s.disruptions_allowed), (2, 0));
        assert_eq!(s.disrupted_pods.unwrap().keys().collect::<Vec<_>>(), ["a"]);
        assert!(waiting);
        // No selector: no pods.
        assert!(super::covered(&pdb(json!({"minAvailable": 1}), json!({})), &pods).is_empty());
    }
}
