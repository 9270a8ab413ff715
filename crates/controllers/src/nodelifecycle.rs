//! The node lifecycle controller: watches node heartbeats (Leases in
//! `kube-node-lease`, and the Ready condition's heartbeat), marks a node whose
//! heartbeat stopped for longer than the grace period `Ready=Unknown`, keeps
//! the `node.kubernetes.io/unreachable` / `not-ready` taints in step with the
//! Ready condition, and evicts pods from NoExecute-tainted nodes once their
//! tolerations run out (the taint manager), so their controllers replace them
//! elsewhere.
//!
//! Heartbeats are judged by when this controller saw them change, not by the
//! timestamps in them, as Kubernetes does, so clock skew between machines
//! cannot make a node look dead or alive.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod, Taint};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::reflector::Store;
use serde_json::{Value, json};
use tokio::time::Instant;
use wasmkube_api::scheduling;

use crate::{Config, Error};

pub const UNREACHABLE: &str = "node.kubernetes.io/unreachable";
pub const NOT_READY: &str = "node.kubernetes.io/not-ready";

struct Ctx {
    client: kube::Client,
    nodes: Store<Node>,
    leases: Store<Lease>,
    pods: Store<Pod>,
    grace: Duration,
    /// Node → (last heartbeat seen, when it was first seen).
    seen: HashMap<String, (String, Instant)>,
}

fn time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn ready_status(node: &Node) -> Option<String> {
    node.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.status.clone())
}

/// What identifies the node's latest heartbeat: its lease's renew time and
/// its Ready condition's heartbeat time.
fn heartbeat(node: &Node, lease: Option<&Lease>) -> String {
    let renew = lease
        .and_then(|l| l.spec.as_ref()?.renew_time.as_ref())
        .map(|t| t.0.to_string())
        .unwrap_or_default();
    let status = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .and_then(|c| c.last_heartbeat_time.as_ref())
        .map(|t| t.0.to_string())
        .unwrap_or_default();
    format!("{renew}|{status}")
}

/// The taints the Ready condition calls for, among the two this controller owns.
fn wanted_taints(ready: Option<&str>) -> Vec<&'static str> {
    match ready {
        Some("True") => vec![],
        Some("False") => vec![NOT_READY],
        _ => vec![UNREACHABLE],
    }
}

impl Ctx {
    /// One monitoring pass over every node.
    async fn monitor(&mut self) -> Result<(), Error> {
        let now = Instant::now();
        let leases: HashMap<String, Arc<Lease>> = self
            .leases
            .state()
            .into_iter()
            .filter(|l| l.namespace().as_deref() == Some("kube-node-lease"))
            .map(|l| (l.name_any(), l))
            .collect();
        let nodes = self.nodes.state();
        let names: HashSet<String> = nodes.iter().map(|n| n.name_any()).collect();
        self.seen.retain(|name, _| names.contains(name));
        for node in nodes {
            let name = node.name_any();
            let beat = heartbeat(&node, leases.get(&name).map(|l| &**l));
            let entry = self.seen.entry(name.clone()).or_insert((beat.clone(), now));
            if entry.0 != beat {
                *entry = (beat, now);
            }
            let silent = now.duration_since(entry.1) > self.grace;
            let mut ready = ready_status(&node);
            if silent && ready.as_deref() != Some("Unknown") {
                tracing::info!(node = %name, grace = ?self.grace, "node stopped posting status; marking Ready=Unknown");
                self.mark_unknown(&node).await?;
                ready = Some("Unknown".into());
            }
            self.sync_taints(&node, ready.as_deref()).await?;
        }
        self.evict().await
    }

    async fn mark_unknown(&self, node: &Node) -> Result<(), Error> {
        let now = time(Utc::now());
        let conditions: Vec<Value> = node
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .into_iter()
            .flatten()
            .map(|c| {
                let mut v = serde_json::to_value(c).unwrap_or_default();
                if matches!(
                    c.type_.as_str(),
                    "Ready" | "MemoryPressure" | "DiskPressure" | "PIDPressure"
                ) {
                    v["status"] = json!("Unknown");
                    v["reason"] = json!("NodeStatusUnknown");
                    v["message"] = json!("Kubelet stopped posting node status.");
                    v["lastTransitionTime"] = json!(now);
                }
                v
            })
            .collect();
        let api: Api<Node> = Api::all(self.client.clone());
        api.patch_status(
            &node.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({
                "metadata": {"resourceVersion": node.metadata.resource_version},
                "status": {"conditions": conditions},
            })),
        )
        .await
        .map_err(Error::Kube)?;
        Ok(())
    }

    async fn sync_taints(&self, node: &Node, ready: Option<&str>) -> Result<(), Error> {
        let wanted = wanted_taints(ready);
        let current: Vec<Taint> = node
            .spec
            .as_ref()
            .and_then(|s| s.taints.clone())
            .unwrap_or_default();
        let ours = |t: &Taint| t.key == UNREACHABLE || t.key == NOT_READY;
        let mut have: Vec<(&str, &str)> = current
            .iter()
            .filter(|t| ours(t))
            .map(|t| (t.key.as_str(), t.effect.as_str()))
            .collect();
        have.sort_unstable();
        let mut want: Vec<(&str, &str)> = wanted
            .iter()
            .flat_map(|k| [(*k, "NoExecute"), (*k, "NoSchedule")])
            .collect();
        want.sort_unstable();
        if have == want {
            return Ok(());
        }
        let now = time(Utc::now());
        let mut taints: Vec<Value> = current
            .iter()
            .filter(|t| !ours(t) || wanted.contains(&t.key.as_str()))
            .map(|t| serde_json::to_value(t).unwrap_or_default())
            .collect();
        for key in &wanted {
            for effect in ["NoSchedule", "NoExecute"] {
                if !current.iter().any(|t| t.key == *key && t.effect == effect) {
                    taints.push(json!({"key": key, "effect": effect, "timeAdded": now}));
                }
            }
        }
        tracing::info!(node = %node.name_any(), ?wanted, "updating node condition taints");
        let api: Api<Node> = Api::all(self.client.clone());
        api.patch(
            &node.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({
                "metadata": {"resourceVersion": node.metadata.resource_version},
                "spec": {"taints": taints},
            })),
        )
        .await
        .map_err(Error::Kube)?;
        Ok(())
    }

    /// The taint manager: deletes pods whose tolerations of their node's
    /// NoExecute taints have run out.
    async fn evict(&self) -> Result<(), Error> {
        let tainted: HashMap<String, Vec<Taint>> = self
            .nodes
            .state()
            .into_iter()
            .filter_map(|n| {
                let taints: Vec<Taint> = n
                    .spec
                    .as_ref()?
                    .taints
                    .iter()
                    .flatten()
                    .filter(|t| t.effect == "NoExecute")
                    .cloned()
                    .collect();
                (!taints.is_empty()).then(|| (n.name_any(), taints))
            })
            .collect();
        if tainted.is_empty() {
            return Ok(());
        }
        let now = Utc::now();
        for pod in self.pods.state() {
            if pod.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let Some(taints) = pod
                .spec
                .as_ref()
                .and_then(|s| s.node_name.as_ref())
                .and_then(|n| tainted.get(n))
            else {
                continue;
            };
            if let Some(due) = eviction_time(&pod, taints)
                && due <= now
            {
                self.delete(&pod).await?;
            }
        }
        Ok(())
    }

    async fn delete(&self, pod: &Pod) -> Result<(), Error> {
        let ns = pod.namespace().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
        let condition = json!({"status": {"conditions": [{
            "type": "DisruptionTarget", "status": "True", "reason": "DeletionByTaintManager",
            "message": "Taint manager: deleting due to NoExecute taint",
            "lastTransitionTime": time(Utc::now()),
        }]}});
        let name = pod.name_any();
        if let Err(e) = api
            .patch_status(&name, &PatchParams::default(), &Patch::Strategic(condition))
            .await
        {
            tracing::debug!(pod = %name, error = %e, "could not mark the pod");
        }
        tracing::info!(pod = %format!("{ns}/{name}"), "evicting from a NoExecute-tainted node");
        match crate::gone_ok(api.delete(&name, &DeleteParams::default()).await) {
            Ok(()) => Ok(()),
            Err(e) => Err(Error::Kube(e)),
        }
    }
}

/// When a pod must leave a node with these NoExecute taints: now if one is
/// not tolerated, never if all are tolerated without a limit, else when the
/// shortest `tolerationSeconds` runs out after its taint was added.
pub fn eviction_time(pod: &Pod, taints: &[Taint]) -> Option<DateTime<Utc>> {
    let tolerations = pod
        .spec
        .as_ref()
        .and_then(|s| s.tolerations.as_deref())
        .unwrap_or_default();
    let mut due: Option<DateTime<Utc>> = None;
    for taint in taints {
        let matching: Vec<_> = tolerations
            .iter()
            .filter(|t| scheduling::tolerates(t, taint))
            .collect();
        if matching.is_empty() {
            return Some(DateTime::<Utc>::MIN_UTC);
        }
        // The longest toleration among those that match wins for this taint.
        if matching.iter().any(|t| t.toleration_seconds.is_none()) {
            continue;
        }
        let seconds = matching
            .iter()
            .filter_map(|t| t.toleration_seconds)
            .max()
            .unwrap_or(0)
            .max(0);
        let added = taint
            .time_added
            .as_ref()
            .and_then(|t| DateTime::parse_from_rfc3339(&t.0.to_string()).ok())
            .map_or_else(Utc::now, |t| t.with_timezone(&Utc));
        let at = added + chrono::Duration::seconds(seconds);
        due = Some(due.map_or(at, |d| d.min(at)));
    }
    due
}

/// Runs the node lifecycle controller (it polls its caches every period).
pub(crate) fn run(
    client: kube::Client,
    informers: &mut crate::Informers,
    config: &Config,
) -> impl std::future::Future<Output = Result<(), Error>> + use<> {
    let mut ctx = Ctx {
        client,
        nodes: informers.store::<Node>(),
        leases: informers.store::<Lease>(),
        pods: informers.store::<Pod>(),
        grace: config.node_monitor_grace_period,
        seen: HashMap::new(),
    };
    let period = config.node_monitor_period;
    async move {
        let _ = ctx.nodes.wait_until_ready().await;
        let _ = ctx.leases.wait_until_ready().await;
        let _ = ctx.pods.wait_until_ready().await;
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = ctx.monitor().await {
                tracing::warn!(error = %crate::ErrorChain(&e), "node monitoring pass failed; retrying");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eviction_waits_for_the_shortest_toleration() {
        let pod = |tolerations: Value| -> Pod {
            serde_json::from_value(json!({"metadata": {"name": "p"}, "spec": {"containers": [], "tolerations": tolerations}})).unwrap()
        };
        let taint: Taint = serde_json::from_value(
            json!({"key": UNREACHABLE, "effect": "NoExecute", "timeAdded": "2026-11-22T10:00:00Z"}),
        )
        .unwrap();
        let at = |s: &str| s.parse::<DateTime<Utc>>().unwrap();
        let t300 = json!([{"key": UNREACHABLE, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}]);
        assert_eq!(
            eviction_time(&pod(t300), std::slice::from_ref(&taint)),
            Some(at("2026-11-22T10:05:00Z"))
        );
        let forever = json!([{"key": UNREACHABLE, "operator": "Exists", "effect": "NoExecute"}]);
        assert_eq!(
            eviction_time(&pod(forever), std::slice::from_ref(&taint)),
            None
        );
        assert_eq!(
            eviction_time(&pod(json!([])), std::slice::from_ref(&taint)),
            Some(DateTime::<Utc>::MIN_UTC)
        );
        assert_eq!(wanted_taints(Some("Unknown")), [UNREACHABLE]);
        assert_eq!(wanted_taints(Some("False")), [NOT_READY]);
        assert!(wanted_taints(Some("True")).is_empty());
    }
}
