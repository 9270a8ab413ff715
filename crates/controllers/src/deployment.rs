//! The Deployment controller: one ReplicaSet per pod template (named by the
//! template's hash), revisions in `deployment.kubernetes.io/revision`,
//! RollingUpdate within maxSurge/maxUnavailable or Recreate, old ReplicaSets
//! trimmed to `revisionHistoryLimit`, and the status and conditions that
//! `kubectl rollout status` reads.
//!
//! Rollback (`kubectl rollout undo`) and restart need nothing special here:
//! kubectl rewrites the template, and the ReplicaSet whose template matches
//! becomes the new one again with the next revision.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::Store;
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};

use crate::Error;

pub const REVISION: &str = "deployment.kubernetes.io/revision";
pub const HASH_LABEL: &str = "pod-template-hash";

pub(crate) struct Ctx {
    client: kube::Client,
    replicasets: Store<ReplicaSet>,
}

/// A short, stable hash of a pod template, in Kubernetes' safe alphabet.
pub fn template_hash(template: &Value) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut h: u32 = 0x811c_9dc5;
    for b in template.to_string().bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    let mut out = String::new();
    while out.len() < 10 {
        out.push(ALPHABET[(h % ALPHABET.len() as u32) as usize] as char);
        h /= ALPHABET.len() as u32;
        if h == 0 {
            h = 0x9e37_79b9 ^ out.len() as u32;
        }
    }
    out
}

/// An absolute or percentage value against `total` (surge rounds up,
/// unavailability down, as Kubernetes does).
pub fn resolve(value: Option<&IntOrString>, default: &str, total: i32, round_up: bool) -> i32 {
    let v = value
        .cloned()
        .unwrap_or(IntOrString::String(default.into()));
    match v {
        IntOrString::Int(n) => n.max(0),
        IntOrString::String(s) => {
            let pct: f64 = s.trim_end_matches('%').parse().unwrap_or(0.0);
            let exact = pct * f64::from(total) / 100.0;
            (if round_up {
                exact.ceil()
            } else {
                exact.floor()
            }) as i32
        }
    }
}

fn revision(rs: &ReplicaSet) -> i64 {
    rs.annotations()
        .get(REVISION)
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

fn spec_replicas(rs: &ReplicaSet) -> i32 {
    rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0)
}

fn status_of(rs: &ReplicaSet) -> (i32, i32, i32) {
    let s = rs.status.clone().unwrap_or_default();
    (
        s.replicas,
        s.ready_replicas.unwrap_or(0),
        s.available_replicas.unwrap_or(0),
    )
}

/// The template with the hash label removed, for comparing with the Deployment's.
fn template_without_hash(rs: &ReplicaSet) -> Value {
    let mut t =
        serde_json::to_value(rs.spec.as_ref().and_then(|s| s.template.clone())).unwrap_or_default();
    if let Some(labels) = t["metadata"]["labels"].as_object_mut() {
        labels.remove(HASH_LABEL);
        if labels.is_empty() {
            t["metadata"].as_object_mut().map(|m| m.remove("labels"));
        }
    }
    t
}

impl Ctx {
    /// Merge-patches one of the Deployment's ReplicaSets.
    async fn patch_rs(&self, rs: &ReplicaSet, patch: serde_json::Value) -> Result<(), Error> {
        let api: Api<ReplicaSet> =
            Api::namespaced(self.client.clone(), &rs.namespace().unwrap_or_default());
        api.patch(
            &rs.name_any(),
            &PatchParams::default(),
            &Patch::Merge(patch),
        )
        .await
        .map_err(Error::Kube)?;
        Ok(())
    }

    async fn scale(&self, rs: &ReplicaSet, replicas: i32, d: &Deployment) -> Result<(), Error> {
        let desired = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
        self.patch_rs(
            rs,
            json!({
                "metadata": {"annotations": {"deployment.kubernetes.io/desired-replicas": desired.to_string()}},
                "spec": {"replicas": replicas},
            }),
        )
        .await
    }

    async fn create_new(
        &self,
        d: &Deployment,
        hash: &str,
        revision: i64,
        replicas: i32,
    ) -> Result<Option<ReplicaSet>, Error> {
        let ns = d.namespace().unwrap_or_default();
        let spec = d.spec.clone().unwrap_or_default();
        let mut template =
            serde_json::to_value(&spec.template).map_err(|e| Error::Encode(e.to_string()))?;
        template["metadata"]["labels"][HASH_LABEL] = json!(hash);
        let mut selector =
            serde_json::to_value(&spec.selector).map_err(|e| Error::Encode(e.to_string()))?;
        selector["matchLabels"][HASH_LABEL] = json!(hash);
        let rs: ReplicaSet = serde_json::from_value(json!({
            "metadata": {
                "name": format!("{}-{hash}", d.name_any()),
                "namespace": ns,
                "labels": template["metadata"]["labels"],
                "annotations": {
                    REVISION: revision.to_string(),
                    "deployment.kubernetes.io/desired-replicas": spec.replicas.unwrap_or(1).to_string(),
                },
                "ownerReferences": [d.controller_owner_ref(&()).ok_or(Error::MissingUid)?],
            },
            "spec": {"replicas": replicas, "minReadySeconds": spec.min_ready_seconds.unwrap_or(0), "selector": selector, "template": template},
        }))
        .map_err(|e| Error::Encode(e.to_string()))?;
        let api: Api<ReplicaSet> = Api::namespaced(self.client.clone(), &ns);
        match api.create(&PostParams::default(), &rs).await {
            Ok(created) => Ok(Some(created)),
            // Created by an earlier reconcile the cache has not shown yet.
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(None),
            Err(e) => Err(Error::Kube(e)),
        }
    }
}

async fn reconcile(d: Arc<Deployment>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let ns = d.namespace().unwrap_or_default();
    let uid = d.uid().ok_or(Error::MissingUid)?;
    if d.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let spec = d.spec.clone().unwrap_or_default();
    let replicas = spec.replicas.unwrap_or(1);
    let mut owned: Vec<Arc<ReplicaSet>> = ctx
        .replicasets
        .state()
        .into_iter()
        .filter(|rs| rs.metadata.namespace.as_deref() == Some(ns.as_str()))
        .filter(|rs| {
            rs.owner_references()
                .iter()
                .any(|o| o.controller == Some(true) && o.uid == uid)
        })
        .collect();
    owned.sort_by_key(|rs| revision(rs));
    let template =
        serde_json::to_value(&spec.template).map_err(|e| Error::Encode(e.to_string()))?;
    let max_revision = owned.iter().map(|rs| revision(rs)).max().unwrap_or(0);
    let existing_new = owned
        .iter()
        .find(|rs| template_without_hash(rs) == template)
        .cloned();
    let old: Vec<Arc<ReplicaSet>> = owned
        .iter()
        .filter(|rs| existing_new.as_ref().is_none_or(|n| n.uid() != rs.uid()))
        .cloned()
        .collect();

    if spec.paused == Some(true) {
        update_status(&ctx, &d, existing_new.as_deref(), &owned, false).await?;
        return Ok(Action::await_change());
    }

    let strategy = spec.strategy.clone().unwrap_or_default();
    let recreate = strategy.type_.as_deref() == Some("Recreate");
    let rolling = strategy.rolling_update.unwrap_or_default();
    let surge = resolve(rolling.max_surge.as_ref(), "25%", replicas, true);
    let mut unavailable = resolve(rolling.max_unavailable.as_ref(), "25%", replicas, false);
    if surge == 0 && unavailable == 0 {
        unavailable = 1;
    }
    let old_total: i32 = old.iter().map(|rs| spec_replicas(rs)).sum();
    let mut progressed = false;

    // The ReplicaSet for the current template; a former one becoming current
    // again (rollback) takes the next revision.
    let (new_rs, new_revision): (Arc<ReplicaSet>, i64) = match existing_new {
        Some(rs) if revision(&rs) < max_revision || revision(&rs) == 0 => {
            ctx.patch_rs(
                &rs,
                json!({"metadata": {"annotations": {REVISION: (max_revision + 1).to_string()}}}),
            )
            .await?;
            progressed = true;
            (rs, max_revision + 1)
        }
        Some(rs) => {
            let r = revision(&rs);
            (rs, r)
        }
        None => {
            let initial = if recreate {
                if old_total > 0 { 0 } else { replicas }
            } else {
                (replicas + surge - old_total).clamp(0, replicas)
            };
            let hash = template_hash(&template);
            match ctx.create_new(&d, &hash, max_revision + 1, initial).await? {
                Some(rs) => (Arc::new(rs), max_revision + 1),
                None => return Ok(Action::requeue(Duration::from_secs(1))),
            }
        }
    };
    if d.annotations()
        .get(REVISION)
        .and_then(|r| r.parse::<i64>().ok())
        != Some(new_revision)
    {
        let api: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
        let patch = json!({"metadata": {"annotations": {REVISION: new_revision.to_string()}}});
        api.patch(&d.name_any(), &PatchParams::default(), &Patch::Merge(patch))
            .await
            .map_err(Error::Kube)?;
    }

    let new_spec = spec_replicas(&new_rs);
    if recreate {
        if old_total > 0 {
            for rs in old.iter().filter(|rs| spec_replicas(rs) > 0) {
                ctx.scale(rs, 0, &d).await?;
            }
            progressed = true;
        } else if old.iter().all(|rs| status_of(rs).0 == 0) && new_spec != replicas {
            // Old pods are gone: bring up the new ones.
            ctx.scale(&new_rs, replicas, &d).await?;
            progressed = true;
        }
    } else {
        let total = old_total + new_spec;
        let mut new_after = new_spec;
        if new_spec < replicas {
            let up = (replicas + surge - total).min(replicas - new_spec);
            if up > 0 {
                new_after = new_spec + up;
                ctx.scale(&new_rs, new_after, &d).await?;
                progressed = true;
            }
        } else if new_spec > replicas {
            new_after = replicas;
            ctx.scale(&new_rs, replicas, &d).await?;
            progressed = true;
        }
        // Scale old ReplicaSets down as far as availability allows, oldest first.
        let min_available = replicas - unavailable;
        let new_unavailable = (new_after - status_of(&new_rs).2).max(0);
        let mut budget = old_total + new_after - min_available - new_unavailable;
        for rs in old.iter().filter(|rs| spec_replicas(rs) > 0) {
            if budget <= 0 {
                break;
            }
            let take = spec_replicas(rs).min(budget);
            ctx.scale(rs, spec_replicas(rs) - take, &d).await?;
            budget -= take;
            progressed = true;
        }
    }

    // Keep only revisionHistoryLimit drained old ReplicaSets.
    let limit = spec.revision_history_limit.unwrap_or(10).max(0) as usize;
    let drained: Vec<&Arc<ReplicaSet>> = old
        .iter()
        .filter(|rs| spec_replicas(rs) == 0 && status_of(rs).0 == 0)
        .collect();
    if drained.len() > limit {
        let api: Api<ReplicaSet> = Api::namespaced(ctx.client.clone(), &ns);
        for rs in &drained[..drained.len() - limit] {
            match api.delete(&rs.name_any(), &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(Error::Kube(e)),
            }
        }
    }
    update_status(&ctx, &d, Some(&new_rs), &owned, progressed).await?;
    Ok(Action::requeue(Duration::from_secs(30)))
}

fn condition(
    kind: &str,
    status: &str,
    reason: &str,
    message: String,
    now: &str,
    previous: Option<&Value>,
) -> Value {
    // The transition time moves only when the status does.
    let transition = match previous {
        Some(p) if p["status"] == status => p["lastTransitionTime"].clone(),
        _ => json!(now),
    };
    json!({"type": kind, "status": status, "reason": reason, "message": message, "lastUpdateTime": now, "lastTransitionTime": transition})
}

async fn update_status(
    ctx: &Ctx,
    d: &Deployment,
    new_rs: Option<&ReplicaSet>,
    owned: &[Arc<ReplicaSet>],
    progressed: bool,
) -> Result<(), Error> {
    let spec = d.spec.clone().unwrap_or_default();
    let replicas = spec.replicas.unwrap_or(1);
    let (mut total, mut ready, mut available) = (0, 0, 0);
    for rs in owned {
        let (t, r, a) = status_of(rs);
        total += t;
        ready += r;
        available += a;
    }
    let updated = new_rs.map_or(0, |rs| status_of(rs).0);
    let new_available = new_rs.map_or(0, |rs| status_of(rs).2);
    let rolling = spec
        .strategy
        .as_ref()
        .and_then(|s| s.rolling_update.clone())
        .unwrap_or_default();
    let max_unavailable =
        if spec.strategy.as_ref().and_then(|s| s.type_.as_deref()) == Some("Recreate") {
            0
        } else {
            resolve(rolling.max_unavailable.as_ref(), "25%", replicas, false)
        };
    let now_t = Utc::now();
    let now = now_t.to_rfc3339_opts(SecondsFormat::Secs, true);
    // Compare with the stored status, not the one this reconcile was handed:
    // that may predate our own last write. (Conditions carry timestamps, so an
    // unconditional write would wake this controller forever.)
    let api: Api<Deployment> =
        Api::namespaced(ctx.client.clone(), &d.namespace().unwrap_or_default());
    let fresh = api.get_status(&d.name_any()).await.map_err(Error::Kube)?;
    let previous = serde_json::to_value(fresh.status.unwrap_or_default()).unwrap_or_default();
    let prev_cond = |t: &str| {
        previous["conditions"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["type"] == t))
            .cloned()
    };
    let name = new_rs.map(|rs| rs.name_any()).unwrap_or_default();
    let available_cond = if available >= replicas - max_unavailable {
        condition(
            "Available",
            "True",
            "MinimumReplicasAvailable",
            "Deployment has minimum availability.".into(),
            &now,
            prev_cond("Available").as_ref(),
        )
    } else {
        condition(
            "Available",
            "False",
            "MinimumReplicasUnavailable",
            "Deployment does not have minimum availability.".into(),
            &now,
            prev_cond("Available").as_ref(),
        )
    };
    let complete = updated == replicas && total == replicas && new_available == replicas;
    let prev_progress = prev_cond("Progressing");
    let counts_moved = previous["updatedReplicas"].as_i64() != Some(i64::from(updated))
        || previous["availableReplicas"].as_i64() != Some(i64::from(available));
    let progressing = if complete {
        condition(
            "Progressing",
            "True",
            "NewReplicaSetAvailable",
            format!("ReplicaSet \"{name}\" has successfully progressed."),
            &now,
            prev_progress.as_ref(),
        )
    } else {
        let last_progress = prev_progress
            .as_ref()
            .filter(|_| !progressed && !counts_moved)
            .and_then(|c| c["lastUpdateTime"].as_str())
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map_or(now_t, |t| t.with_timezone(&Utc));
        let deadline = i64::from(spec.progress_deadline_seconds.unwrap_or(600));
        if (now_t - last_progress).num_seconds() > deadline {
            condition(
                "Progressing",
                "False",
                "ProgressDeadlineExceeded",
                format!("ReplicaSet \"{name}\" has timed out progressing."),
                &now,
                prev_progress.as_ref(),
            )
        } else {
            let mut c = condition(
                "Progressing",
                "True",
                "ReplicaSetUpdated",
                format!("ReplicaSet \"{name}\" is progressing."),
                &now,
                prev_progress.as_ref(),
            );
            c["lastUpdateTime"] = json!(last_progress.to_rfc3339_opts(SecondsFormat::Secs, true));
            c
        }
    };
    let status = json!({
        "observedGeneration": d.metadata.generation,
        "replicas": total,
        "updatedReplicas": updated,
        "readyReplicas": ready,
        "availableReplicas": available,
        "unavailableReplicas": (replicas - available).max(0),
        "conditions": [available_cond, progressing],
    });
    // Write only when something other than timestamps changed.
    let strip = |v: &Value| {
        let mut v = v.clone();
        for c in v["conditions"].as_array_mut().into_iter().flatten() {
            if let Some(m) = c.as_object_mut() {
                m.remove("lastUpdateTime");
                m.remove("lastTransitionTime");
            }
        }
        for k in [
            "replicas",
            "updatedReplicas",
            "readyReplicas",
            "availableReplicas",
            "unavailableReplicas",
        ] {
            if v[k].is_null() {
                v[k] = json!(0);
            }
        }
        v
    };
    let mut prev_cmp = strip(&previous);
    if let Some(m) = prev_cmp.as_object_mut() {
        m.remove("collisionCount");
    }
    if strip(&status) != prev_cmp || progressed {
        api.patch_status(
            &d.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({"status": status})),
        )
        .await
        .map_err(Error::Kube)?;
    }
    Ok(())
}

/// Runs the Deployment controller until its watches end.
pub(crate) fn run(
    client: kube::Client,
    informers: &mut crate::Informers,
) -> impl std::future::Future<Output = Result<(), Error>> + use<> {
    let children = informers.cache::<ReplicaSet>();
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        replicasets: children.store.clone(),
    });
    crate::run_owning::<Deployment, _, _, _, _>(client, children, reconcile, ctx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn surge_rounds_up_and_unavailable_down() {
        let pct = |s: &str| IntOrString::String(s.into());
        assert_eq!(resolve(Some(&pct("25%")), "25%", 10, true), 3);
        assert_eq!(resolve(Some(&pct("25%")), "25%", 10, false), 2);
        assert_eq!(resolve(None, "25%", 3, true), 1);
        assert_eq!(resolve(None, "25%", 3, false), 0);
        assert_eq!(resolve(Some(&IntOrString::Int(2)), "25%", 10, true), 2);
    }

    #[test]
    fn template_hashes_are_stable_and_distinct() {
        let a = json!({"spec": {"containers": [{"name": "c", "image": "a:1"}]}});
        let b = json!({"spec": {"containers": [{"name": "c", "image": "a:2"}]}});
        assert_eq!(template_hash(&a), template_hash(&a.clone()));
        assert_ne!(template_hash(&a), template_hash(&b));
        assert!(
            template_hash(&a)
                .chars()
                .all(|c| "bcdfghjklmnpqrstvwxz2456789".contains(c))
        );
    }
}
