//! The StatefulSet controller: pods with stable names (`NAME-0`, `NAME-1`,
//! ...) and identities (hostname the pod's name, subdomain the governing
//! Service, so `NAME-0.SERVICE.NS.svc` resolves to it), as Kubernetes' does.
//!
//! Under `OrderedReady` a pod is made only when every lower ordinal is
//! running and ready, and removed (scale down, highest first) only when its
//! deletion is the one thing in progress; `Parallel` makes and removes them
//! all at once. Each template is a ControllerRevision (`NAME-HASH`, numbered,
//! trimmed to `revisionHistoryLimit`), so `kubectl rollout history` lists
//! them; a pod carries its revision's name in `controller-revision-hash`. A
//! RollingUpdate replaces pods from the highest ordinal down, one at a time,
//! down to the partition (pods below it keep, and are recreated at, the
//! current revision); OnDelete leaves replacing to the user.
//!
//! Each `volumeClaimTemplates` entry gives every pod its own claim,
//! `TEMPLATE-NAME-ORDINAL`, made before the pod and kept across its
//! replacements; the retention policy deletes them with the set
//! (`whenDeleted`, through an owner reference to the set) or with a pod
//! scaled away (`whenScaled`, owned by that pod before it goes).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use crate::queue::Controller;
use chrono::Utc;
use k8s_openapi::api::apps::v1::{ControllerRevision, StatefulSet};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};

use crate::deployment::template_hash;
use crate::replicaset::owned_pods;
use crate::{Error, pods};

/// The label naming the revision a pod was made from.
const REVISION_LABEL: &str = "controller-revision-hash";
const POD_NAME_LABEL: &str = "statefulset.kubernetes.io/pod-name";
const POD_INDEX_LABEL: &str = "apps.kubernetes.io/pod-index";
/// The label carrying a ControllerRevision's template hash.
const HASH_LABEL: &str = "controller.kubernetes.io/hash";

struct Ctx {
    client: kube::Client,
    pods: Store<Pod>,
}

fn encode_err(e: impl std::fmt::Display) -> Error {
    Error::Encode(e.to_string())
}

/// The ordinal of a pod of set `set` (`set-3` is 3).
fn ordinal(set: &str, pod: &str) -> Option<i32> {
    pod.strip_prefix(set)?
        .strip_prefix('-')?
        .parse()
        .ok()
        .filter(|n: &i32| *n >= 0)
}

fn revision_of(pod: &Pod) -> Option<&str> {
    pod.labels().get(REVISION_LABEL).map(String::as_str)
}

/// Running, ready and not going: what `OrderedReady` waits for.
fn healthy(pod: &Pod) -> bool {
    pods::phase(pod) == "Running"
        && pods::is_ready(pod)
        && pod.metadata.deletion_timestamp.is_none()
}

/// The set's revisions: the update revision (its template now), the
/// current one (what the pods below a partition keep) with its template,
/// and every revision it owns.
struct Revisions {
    update: String,
    current: String,
    current_template: Value,
    owned: Vec<ControllerRevision>,
}

fn template_in(rev: &ControllerRevision) -> Option<Value> {
    let mut t = rev.data.as_ref()?.0.get("spec")?.get("template")?.clone();
    t.as_object_mut()?.remove("$patch");
    Some(t)
}

async fn revisions(sts: &StatefulSet, ctx: &Ctx, uid: &str) -> Result<Revisions, Error> {
    let ns = sts.namespace().unwrap_or_default();
    let name = sts.name_any();
    let spec = sts.spec.clone().unwrap_or_default();
    let api: Api<ControllerRevision> = Api::namespaced(ctx.client.clone(), &ns);
    let selector =
        wasmkube_api::selectors::render(&serde_json::to_value(&spec.selector).map_err(encode_err)?);
    let mut owned: Vec<ControllerRevision> = api
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(Error::Kube)?
        .items
        .into_iter()
        .filter(|r| {
            r.owner_references()
                .iter()
                .any(|o| o.controller == Some(true) && o.uid == uid)
        })
        .collect();
    let template = serde_json::to_value(&spec.template).map_err(encode_err)?;
    let hash = template_hash(&template);
    let update = format!("{name}-{hash}");
    let latest = owned.iter().map(|r| r.revision).max().unwrap_or(0);
    match owned.iter_mut().find(|r| r.name_any() == update) {
        // A template seen before (a rollback): it becomes the newest.
        Some(r) if r.revision < latest => {
            api.patch(
                &update,
                &PatchParams::default(),
                &Patch::Merge(json!({"revision": latest + 1})),
            )
            .await
            .map_err(Error::Kube)?;
            r.revision = latest + 1;
        }
        Some(_) => {}
        None => {
            let mut labels = spec.selector.match_labels.clone().unwrap_or_default();
            labels.insert(HASH_LABEL.into(), hash.clone());
            let mut data = json!({"spec": {"template": template.clone()}});
            data["spec"]["template"]["$patch"] = json!("replace");
            let rev: ControllerRevision = serde_json::from_value(json!({
                "metadata": {
                    "name": update,
                    "namespace": ns,
                    "labels": labels,
                    "ownerReferences": [sts.controller_owner_ref(&()).ok_or(Error::MissingUid)?],
                },
                "data": data,
                "revision": latest + 1,
            }))
            .map_err(encode_err)?;
            match api.create(&PostParams::default(), &rev).await {
                Ok(created) => owned.push(created),
                Err(kube::Error::Api(e)) if e.code == 409 => owned.push(rev),
                Err(e) => return Err(Error::Kube(e)),
            }
        }
    }
    let current = sts
        .status
        .as_ref()
        .and_then(|s| s.current_revision.clone())
        .filter(|c| owned.iter().any(|r| r.name_any() == *c))
        .unwrap_or_else(|| update.clone());
    let current_template = owned
        .iter()
        .find(|r| r.name_any() == current)
        .and_then(template_in)
        .unwrap_or(template);
    Ok(Revisions {
        update,
        current,
        current_template,
        owned,
    })
}

/// The pod of `ordinal` made from `template` at `revision`.
fn pod_for(
    sts: &StatefulSet,
    ordinal: i32,
    revision: &str,
    template: &Value,
) -> Result<Pod, Error> {
    let set = sts.name_any();
    let name = format!("{set}-{ordinal}");
    let mut meta = template["metadata"].clone();
    if !meta.is_object() {
        meta = json!({});
    }
    meta["name"] = json!(name);
    meta["namespace"] = json!(sts.namespace());
    if !meta["labels"].is_object() {
        meta["labels"] = json!({});
    }
    meta["labels"][REVISION_LABEL] = json!(revision);
    meta["labels"][POD_NAME_LABEL] = json!(name);
    meta["labels"][POD_INDEX_LABEL] = json!(ordinal.to_string());
    meta["ownerReferences"] = json!([sts.controller_owner_ref(&()).ok_or(Error::MissingUid)?]);
    let mut spec = template["spec"].clone();
    // Each claim template becomes a volume of the pod's own claim, in place
    // of a template volume of the same name.
    let claims = claim_templates(sts);
    if !claims.is_empty() {
        let mut volumes: Vec<Value> = spec["volumes"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|v| {
                !claims
                    .iter()
                    .any(|c| Some(c.as_str()) == v["name"].as_str())
            })
            .collect();
        for c in &claims {
            volumes.push(json!({"name": c,
                "persistentVolumeClaim": {"claimName": claim_name(c, &set, ordinal)}}));
        }
        spec["volumes"] = json!(volumes);
    }
    spec["hostname"] = json!(name);
    if let Some(service) = sts
        .spec
        .as_ref()
        .and_then(|s| s.service_name.as_ref())
        .filter(|s| !s.is_empty())
    {
        spec["subdomain"] = json!(service);
    }
    serde_json::from_value(json!({"metadata": meta, "spec": spec})).map_err(encode_err)
}

/// The names of the set's claim templates.
fn claim_templates(sts: &StatefulSet) -> Vec<String> {
    sts.spec
        .iter()
        .flat_map(|s| s.volume_claim_templates.iter().flatten())
        .filter_map(|t| t.metadata.name.clone())
        .collect()
}

/// The claim of template `template` for the pod of `ordinal`.
fn claim_name(template: &str, set: &str, ordinal: i32) -> String {
    format!("{template}-{set}-{ordinal}")
}

/// The set's retention policy: (whenDeleted, whenScaled) delete the claims.
fn deletes_claims(sts: &StatefulSet) -> (bool, bool) {
    let policy = sts
        .spec
        .as_ref()
        .and_then(|s| s.persistent_volume_claim_retention_policy.as_ref());
    let delete = |v: Option<&String>| v.is_some_and(|v| v == "Delete");
    (
        delete(policy.and_then(|p| p.when_deleted.as_ref())),
        delete(policy.and_then(|p| p.when_scaled.as_ref())),
    )
}

/// Makes the claims of the pod of `ordinal` that do not exist yet, from the
/// set's templates (labelled with the set's selector; owned by the set when
/// its claims go with it).
async fn ensure_claims(ctx: &Ctx, sts: &StatefulSet, ordinal: i32) -> Result<(), Error> {
    let ns = sts.namespace().unwrap_or_default();
    let set = sts.name_any();
    let api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
    let selector_labels = sts
        .spec
        .as_ref()
        .and_then(|s| s.selector.match_labels.clone())
        .unwrap_or_default();
    let (when_deleted, _) = deletes_claims(sts);
    for t in sts
        .spec
        .iter()
        .flat_map(|s| s.volume_claim_templates.iter().flatten())
    {
        let template = t.metadata.name.clone().unwrap_or_default();
        let mut claim = t.clone();
        claim.status = None;
        claim.metadata.name = Some(claim_name(&template, &set, ordinal));
        claim.metadata.namespace = Some(ns.clone());
        let labels = claim.metadata.labels.get_or_insert_with(Default::default);
        labels.extend(selector_labels.clone());
        if when_deleted {
            let mut owner = sts.controller_owner_ref(&()).ok_or(Error::MissingUid)?;
            owner.controller = None;
            owner.block_owner_deletion = None;
            claim.metadata.owner_references = Some(vec![owner]);
        }
        match api.create(&PostParams::default(), &claim).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(Error::Kube(e)),
        }
    }
    Ok(())
}

/// Before a pod above the range goes, under `whenScaled: Delete`, its claims
/// are given to it, so the garbage collector removes them after it.
async fn release_claims_with(ctx: &Ctx, sts: &StatefulSet, pod: &Pod) -> Result<(), Error> {
    let (_, when_scaled) = deletes_claims(sts);
    let Some(ordinal) = ordinal(&sts.name_any(), &pod.name_any()) else {
        return Ok(());
    };
    if !when_scaled {
        return Ok(());
    }
    let api: Api<PersistentVolumeClaim> =
        Api::namespaced(ctx.client.clone(), &sts.namespace().unwrap_or_default());
    let owner = json!({"apiVersion": "v1", "kind": "Pod", "name": pod.name_any(),
                       "uid": pod.uid().ok_or(Error::MissingUid)?});
    for template in claim_templates(sts) {
        let name = claim_name(&template, &sts.name_any(), ordinal);
        let patch = json!({"metadata": {"ownerReferences": [owner]}});
        crate::gone_ok(
            api.patch(&name, &PatchParams::default(), &Patch::Merge(patch))
                .await,
        )
        .map_err(Error::Kube)?;
    }
    Ok(())
}

/// What the reconcile does next, one step of Kubernetes' ordered walk.
enum Step {
    Create(i32),
    Delete(Arc<Pod>),
}

/// The steps toward the spec, in Kubernetes' order: make missing or
/// replace failed pods in the range (lowest first), then remove pods above
/// it (highest first), then roll the update down from the top to the
/// partition. Under `OrderedReady` the walk stops at the first step or at
/// any pod that is not yet healthy; under `Parallel` every create and
/// removal is taken at once (the update still goes one pod at a time).
fn plan(
    by_ordinal: &BTreeMap<i32, Arc<Pod>>,
    range: std::ops::Range<i32>,
    parallel: bool,
    rolling_from: Option<i32>,
    update: &str,
) -> Vec<Step> {
    let mut steps = Vec::new();
    for ord in range.clone() {
        match by_ordinal.get(&ord) {
            None => steps.push(Step::Create(ord)),
            Some(p) if pods::is_terminal(p) && p.metadata.deletion_timestamp.is_none() => {
                steps.push(Step::Delete(p.clone()))
            }
            Some(p) if healthy(p) => continue,
            Some(_) if parallel => continue,
            // Starting, or going: wait for it.
            Some(_) => return steps,
        }
        if !parallel {
            return steps;
        }
    }
    let condemned: Vec<&Arc<Pod>> = by_ordinal
        .iter()
        .rev()
        .filter(|(ord, _)| !range.contains(ord))
        .map(|(_, p)| p)
        .collect();
    if !condemned.is_empty() {
        for p in condemned {
            if p.metadata.deletion_timestamp.is_none() {
                steps.push(Step::Delete(p.clone()));
            } else if !parallel {
                return steps;
            }
            if !parallel {
                break;
            }
        }
        return steps;
    }
    if !steps.is_empty() || by_ordinal.values().any(|p| !healthy(p)) {
        return steps;
    }
    if let Some(partition) = rolling_from {
        let stale = range
            .rev()
            .filter(|ord| *ord >= partition)
            .filter_map(|ord| by_ordinal.get(&ord))
            .find(|p| revision_of(p) != Some(update));
        if let Some(p) = stale {
            steps.push(Step::Delete(p.clone()));
        }
    }
    steps
}

async fn reconcile(sts: Arc<StatefulSet>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    if sts.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let ns = sts.namespace().unwrap_or_default();
    let uid = sts.uid().ok_or(Error::MissingUid)?;
    let set = sts.name_any();
    let spec = sts.spec.clone().unwrap_or_default();
    let replicas = spec.replicas.unwrap_or(1);
    let start = spec.ordinals.as_ref().and_then(|o| o.start).unwrap_or(0);
    let range = start..start + replicas;
    let parallel = spec.pod_management_policy.as_deref() == Some("Parallel");
    let strategy = spec.update_strategy.clone().unwrap_or_default();
    let rolling = strategy.type_.as_deref().unwrap_or("RollingUpdate") == "RollingUpdate";
    let partition = strategy
        .rolling_update
        .as_ref()
        .and_then(|r| r.partition)
        .unwrap_or(0);
    let revs = revisions(&sts, &ctx, &uid).await?;
    let update_template = serde_json::to_value(&spec.template).map_err(encode_err)?;

    let by_ordinal: BTreeMap<i32, Arc<Pod>> = owned_pods(&ctx.pods, &ns, &uid)
        .into_iter()
        .filter_map(|p| Some((ordinal(&set, &p.name_any())?, p)))
        .collect();
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let steps = plan(
        &by_ordinal,
        range.clone(),
        parallel,
        rolling.then_some(partition),
        &revs.update,
    );
    for step in steps {
        match step {
            Step::Create(ord) => {
                // Below a rolling update's partition, pods keep the current
                // revision.
                let (revision, template) = if rolling && ord < partition {
                    (&revs.current, &revs.current_template)
                } else {
                    (&revs.update, &update_template)
                };
                ensure_claims(&ctx, &sts, ord).await?;
                let pod = pod_for(&sts, ord, revision, template)?;
                match api.create(&PostParams::default(), &pod).await {
                    Ok(_) => {}
                    // The cache had not shown it yet.
                    Err(kube::Error::Api(e)) if e.code == 409 => {}
                    Err(e) => return Err(Error::Kube(e)),
                }
            }
            Step::Delete(pod) => {
                if ordinal(&set, &pod.name_any()).is_some_and(|o| !range.contains(&o)) {
                    release_claims_with(&ctx, &sts, &pod).await?;
                }
                crate::gone_ok(api.delete(&pod.name_any(), &DeleteParams::default()).await)
                    .map_err(Error::Kube)?;
            }
        }
    }

    // Status, from the pods as the cache has them.
    let min_ready = spec.min_ready_seconds.unwrap_or(0);
    let now = Utc::now();
    let live: Vec<&Arc<Pod>> = by_ordinal
        .values()
        .filter(|p| !pods::is_terminal(p))
        .collect();
    let count = |f: &dyn Fn(&Pod) -> bool| live.iter().filter(|p| f(p)).count() as i32;
    let ready = count(&|p| pods::is_ready(p));
    let available = count(&|p| pods::is_available(p, min_ready, now));
    let updated = count(&|p| revision_of(p) == Some(revs.update.as_str()));
    let mut current_revision = revs.current.clone();
    let mut current = count(&|p| revision_of(p) == Some(revs.current.as_str()));
    let settled = by_ordinal.keys().all(|o| range.contains(o));
    if rolling && settled && updated == replicas && ready == replicas {
        current_revision = revs.update.clone();
        current = updated;
    }
    let status = json!({
        "observedGeneration": sts.metadata.generation,
        "replicas": live.len(),
        "readyReplicas": ready,
        "availableReplicas": available,
        "currentReplicas": current,
        "updatedReplicas": updated,
        "currentRevision": current_revision,
        "updateRevision": revs.update,
        "collisionCount": 0,
    });
    let old = serde_json::to_value(&sts.status).map_err(encode_err)?;
    let changed = status
        .as_object()
        .into_iter()
        .flatten()
        .any(|(k, v)| old.get(k) != Some(v) && !(v == 0 && old.get(k).is_none()));
    if changed {
        let sts_api: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), &ns);
        crate::gone_ok(
            sts_api
                .patch_status(
                    &set,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"status": status})),
                )
                .await,
        )
        .map_err(Error::Kube)?;
    }

    trim_history(&sts, &ctx, &revs, &by_ordinal, &current_revision).await?;
    if ready > available {
        return Ok(Action::requeue(Duration::from_secs(
            u64::try_from(min_ready.max(1)).unwrap_or(1),
        )));
    }
    Ok(Action::requeue(Duration::from_secs(300)))
}

/// Deletes the oldest revisions no pod uses beyond `revisionHistoryLimit`.
async fn trim_history(
    sts: &StatefulSet,
    ctx: &Ctx,
    revs: &Revisions,
    by_ordinal: &BTreeMap<i32, Arc<Pod>>,
    current: &str,
) -> Result<(), Error> {
    let limit = sts
        .spec
        .as_ref()
        .and_then(|s| s.revision_history_limit)
        .unwrap_or(10)
        .max(0) as usize;
    let live: HashSet<&str> = by_ordinal
        .values()
        .filter_map(|p| revision_of(p))
        .chain([current, revs.update.as_str()])
        .collect();
    let mut history: Vec<&ControllerRevision> = revs
        .owned
        .iter()
        .filter(|r| !live.contains(r.name_any().as_str()))
        .collect();
    if history.len() <= limit {
        return Ok(());
    }
    history.sort_by_key(|r| r.revision);
    let api: Api<ControllerRevision> =
        Api::namespaced(ctx.client.clone(), &sts.namespace().unwrap_or_default());
    for r in &history[..history.len() - limit] {
        crate::gone_ok(api.delete(&r.name_any(), &DeleteParams::default()).await)
            .map_err(Error::Kube)?;
    }
    Ok(())
}

/// Runs the StatefulSet controller until its watches end.
pub(crate) fn run(
    client: kube::Client,
    informers: &mut crate::Informers,
) -> impl std::future::Future<Output = Result<(), Error>> + use<> {
    let crate::Cache {
        store: pods,
        changes,
    } = informers.cache::<Pod>();
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        pods: pods.clone(),
    });
    async move {
        let _ = pods.wait_until_ready().await;
        let controller =
            Controller::new(Api::<StatefulSet>::all(client), watcher::Config::default());
        controller
            .owns_shared_stream(changes)
            .run("statefulset", reconcile, crate::retry_soon, ctx)
            .await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, phase: &str, ready: bool, revision: &str, going: bool) -> Arc<Pod> {
        let mut p = json!({"metadata": {"name": name, "labels": {REVISION_LABEL: revision}},
            "status": {"phase": phase, "conditions": [
                {"type": "Ready", "status": if ready { "True" } else { "False" }}]}});
        if going {
            p["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        }
        Arc::new(serde_json::from_value(p).unwrap())
    }

    fn pods_of(list: &[Arc<Pod>]) -> BTreeMap<i32, Arc<Pod>> {
        list.iter()
            .map(|p| (ordinal("web", &p.name_any()).unwrap(), p.clone()))
            .collect()
    }

    fn shown(steps: &[Step]) -> Vec<String> {
        steps
            .iter()
            .map(|s| match s {
                Step::Create(o) => format!("create {o}"),
                Step::Delete(p) => format!("delete {}", p.name_any()),
            })
            .collect()
    }

    #[test]
    fn ordered_ready_makes_one_pod_at_a_time_and_waits_for_it() {
        let up = |n: &str| pod(n, "Running", true, "r1", false);
        let none = pods_of(&[]);
        assert_eq!(
            shown(&plan(&none, 0..3, false, Some(0), "r1")),
            ["create 0"]
        );
        let starting = pods_of(&[pod("web-0", "Pending", false, "r1", false)]);
        assert!(plan(&starting, 0..3, false, Some(0), "r1").is_empty());
        let one = pods_of(&[up("web-0")]);
        assert_eq!(shown(&plan(&one, 0..3, false, Some(0), "r1")), ["create 1"]);
        // Parallel: every missing pod at once.
        assert_eq!(
            shown(&plan(&none, 0..3, true, Some(0), "r1")),
            ["create 0", "create 1", "create 2"]
        );
        // A failed pod is replaced.
        let failed = pods_of(&[pod("web-0", "Failed", false, "r1", false)]);
        assert_eq!(
            shown(&plan(&failed, 0..3, false, Some(0), "r1")),
            ["delete web-0"]
        );
        // Scaling down: the highest first, one at a time, waiting for it.
        let three = pods_of(&[up("web-0"), up("web-1"), up("web-2")]);
        assert_eq!(
            shown(&plan(&three, 0..1, false, Some(0), "r1")),
            ["delete web-2"]
        );
        let going = pods_of(&[
            up("web-0"),
            up("web-1"),
            pod("web-2", "Running", true, "r1", true),
        ]);
        assert!(plan(&going, 0..1, false, Some(0), "r1").is_empty());
        assert_eq!(
            shown(&plan(&three, 0..1, true, Some(0), "r1")),
            ["delete web-2", "delete web-1"]
        );
    }

    #[test]
    fn a_rolling_update_goes_down_from_the_top_to_the_partition() {
        let at = |n: &str, r: &str| pod(n, "Running", true, r, false);
        let old = pods_of(&[at("web-0", "r1"), at("web-1", "r1"), at("web-2", "r1")]);
        assert_eq!(
            shown(&plan(&old, 0..3, false, Some(0), "r2")),
            ["delete web-2"]
        );
        let half = pods_of(&[at("web-0", "r1"), at("web-1", "r1"), at("web-2", "r2")]);
        assert_eq!(
            shown(&plan(&half, 0..3, false, Some(0), "r2")),
            ["delete web-1"]
        );
        // Partition 2: web-2 alone is updated.
        assert!(plan(&half, 0..3, false, Some(2), "r2").is_empty());
        // OnDelete: nothing is replaced.
        assert!(plan(&old, 0..3, false, None, "r2").is_empty());
        // A pod not yet ready holds the update back.
        let waiting = pods_of(&[
            at("web-0", "r1"),
            pod("web-1", "Running", false, "r1", false),
            at("web-2", "r2"),
        ]);
        assert!(plan(&waiting, 0..3, false, Some(0), "r2").is_empty());
        assert_eq!(ordinal("web", "web-10"), Some(10));
        assert_eq!(ordinal("web", "webby-1"), None);
    }
}
