//! The Job controller: runs pods to completion. `completions` and
//! `parallelism`, `backoffLimit` with exponential backoff between
//! replacements, `activeDeadlineSeconds`, `ttlSecondsAfterFinished`, the
//! Indexed completion mode and `suspend`, with the status and conditions
//! (`Complete`, `Failed`, `Suspended`) kubectl and clients read.
//!
//! Counts come from the pods the Job owns; finished pods are kept until the
//! Job goes, so nothing is counted twice or lost.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::batch::v1::{Job, JobCondition};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, PropagationPolicy};
use kube::runtime::controller::Action;
use kube::runtime::reflector::Store;
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};

use crate::expectations::Expectations;
use crate::replicaset::owned_pods;
use crate::{Config, Error, pods};

/// The annotation and label carrying an Indexed Job pod's index.
pub const COMPLETION_INDEX: &str = "batch.kubernetes.io/job-completion-index";
/// Replacement pods wait at most this long after failures.
const MAX_BACKOFF: Duration = Duration::from_secs(360);

pub(crate) struct Ctx {
    client: kube::Client,
    pods: Store<Pod>,
    expectations: Expectations,
    backoff: Duration,
    /// Per Job uid: failed pods last counted, and when that count was first
    /// seen rising (the backoff clock; pod timestamps have whole seconds).
    failures: std::sync::Mutex<std::collections::HashMap<String, (usize, DateTime<Utc>)>>,
}

impl Ctx {
    /// When this controller first saw the Job's latest failure.
    fn last_failure(&self, job: &str, failed: usize) -> DateTime<Utc> {
        let mut all = self.failures.lock().expect("failures lock");
        let entry = all.entry(job.to_owned()).or_insert((failed, Utc::now()));
        if entry.0 != failed {
            *entry = (failed, Utc::now());
        }
        entry.1
    }
}

fn time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

fn condition_true(job: &Job, type_: &str) -> Option<JobCondition> {
    job.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_ && c.status == "True")
        .cloned()
}

/// When the Job finished (`Complete` or `Failed`), if it has.
pub(crate) fn finished_at(job: &Job) -> Option<(String, DateTime<Utc>)> {
    ["Complete", "Failed"].iter().find_map(|t| {
        let c = condition_true(job, t)?;
        let at = c
            .last_transition_time
            .and_then(|t| parse_time(&t.0.to_string()))
            .unwrap_or_else(Utc::now);
        Some(((*t).to_owned(), at))
    })
}

fn pod_index(pod: &Pod) -> Option<i32> {
    pod.metadata
        .annotations
        .as_ref()?
        .get(COMPLETION_INDEX)?
        .parse()
        .ok()
}

/// `0-2,4,6-7`, as Kubernetes writes `completedIndexes`.
pub fn format_indexes(set: &BTreeSet<i32>) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut iter = set.iter().copied().peekable();
    while let Some(start) = iter.next() {
        let mut end = start;
        while iter.peek() == Some(&(end + 1)) {
            end = iter.next().unwrap_or(end);
        }
        out.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
    }
    out.join(",")
}

fn pod_from_template(job: &Job, index: Option<i32>) -> Result<Pod, Error> {
    let template = job
        .spec
        .as_ref()
        .map(|s| s.template.clone())
        .unwrap_or_default();
    let mut meta = template.metadata.unwrap_or_default();
    let mut spec = template.spec.unwrap_or_default();
    let name = job.name_any();
    meta.name = None;
    meta.namespace = job.namespace();
    meta.owner_references = Some(vec![
        job.controller_owner_ref(&()).ok_or(Error::MissingUid)?,
    ]);
    meta.generate_name = Some(format!("{name}-"));
    if let Some(i) = index {
        meta.generate_name = Some(format!("{name}-{i}-"));
        meta.annotations
            .get_or_insert_default()
            .insert(COMPLETION_INDEX.into(), i.to_string());
        meta.labels
            .get_or_insert_default()
            .insert(COMPLETION_INDEX.into(), i.to_string());
        spec.hostname = Some(format!("{name}-{i}"));
        // The index reaches the program as Kubernetes passes it.
        let env: k8s_openapi::api::core::v1::EnvVar = serde_json::from_value(json!({
            "name": "JOB_COMPLETION_INDEX",
            "valueFrom": {"fieldRef": {"fieldPath": format!("metadata.labels['{COMPLETION_INDEX}']")}},
        }))
        .map_err(|e| Error::Encode(e.to_string()))?;
        for c in spec
            .containers
            .iter_mut()
            .chain(spec.init_containers.iter_mut().flatten())
        {
            c.env.get_or_insert_default().push(env.clone());
        }
    }
    Ok(Pod {
        metadata: meta,
        spec: Some(spec),
        status: None,
    })
}

/// The conditions list with `type_` set (replacing one of the same type,
/// keeping its transition time when the status is unchanged).
fn with_condition(job: &Job, type_: &str, status: &str, reason: &str, message: &str) -> Vec<Value> {
    let now = time(Utc::now());
    let mut list: Vec<Value> = job
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .map(|cs| {
            cs.iter()
                .filter_map(|c| serde_json::to_value(c).ok())
                .collect()
        })
        .unwrap_or_default();
    let new = json!({"type": type_, "status": status, "reason": reason, "message": message,
        "lastProbeTime": now, "lastTransitionTime": now});
    match list.iter_mut().find(|c| c["type"] == type_) {
        Some(c) if c["status"] == status => {
            c["reason"] = json!(reason);
            c["message"] = json!(message);
        }
        Some(c) => *c = new,
        None => list.push(new),
    }
    list
}

struct Counts {
    active: Vec<Arc<Pod>>,
    succeeded: usize,
    failed: usize,
    ready: usize,
    completed_indexes: BTreeSet<i32>,
}

fn count(owned: &[Arc<Pod>], pending_deletes: &std::collections::HashSet<String>) -> Counts {
    let mut c = Counts {
        active: Vec::new(),
        succeeded: 0,
        failed: 0,
        ready: 0,
        completed_indexes: BTreeSet::new(),
    };
    for p in owned {
        match pods::phase(p) {
            "Succeeded" => {
                c.succeeded += 1;
                if let Some(i) = pod_index(p) {
                    c.completed_indexes.insert(i);
                }
            }
            "Failed" => c.failed += 1,
            _ if pods::is_active(p)
                && !p
                    .metadata
                    .uid
                    .as_ref()
                    .is_some_and(|u| pending_deletes.contains(u)) =>
            {
                if pods::is_ready(p) {
                    c.ready += 1;
                }
                c.active.push(p.clone());
            }
            _ => {}
        }
    }
    c
}

async fn delete_pods(ctx: &Ctx, owner: &str, ns: &str, pods: &[Arc<Pod>]) -> Result<(), Error> {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    for p in pods {
        match crate::gone_ok(api.delete(&p.name_any(), &DeleteParams::default()).await) {
            Ok(()) => {}
            Err(e) => return Err(Error::Kube(e)),
        }
        if let Some(u) = p.metadata.uid.clone() {
            ctx.expectations.expect_delete(owner, u);
        }
    }
    Ok(())
}

async fn patch_status(ctx: &Ctx, job: &Job, status: Value) -> Result<(), Error> {
    let api: Api<Job> = Api::namespaced(ctx.client.clone(), &job.namespace().unwrap_or_default());
    api.patch_status(
        &job.name_any(),
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": status })),
    )
    .await
    .map_err(Error::Kube)?;
    Ok(())
}

/// Deletes a finished Job once its TTL has passed; otherwise says when.
async fn expire(ctx: &Ctx, job: &Job, finished: DateTime<Utc>) -> Result<Action, Error> {
    let Some(ttl) = job.spec.as_ref().and_then(|s| s.ttl_seconds_after_finished) else {
        return Ok(Action::await_change());
    };
    let due = finished + chrono::Duration::seconds(i64::from(ttl));
    let now = Utc::now();
    if now < due {
        return Ok(Action::requeue((due - now).to_std().unwrap_or_default()));
    }
    let api: Api<Job> = Api::namespaced(ctx.client.clone(), &job.namespace().unwrap_or_default());
    let params = DeleteParams {
        propagation_policy: Some(PropagationPolicy::Background),
        preconditions: Some(kube::api::Preconditions {
            uid: job.uid(),
            resource_version: None,
        }),
        ..Default::default()
    };
    match crate::gone_ok(api.delete(&job.name_any(), &params).await) {
        Ok(()) => {
            tracing::info!(job = %job.name_any(), "deleted after ttlSecondsAfterFinished");
            Ok(Action::await_change())
        }
        Err(e) => Err(Error::Kube(e)),
    }
}

async fn reconcile(job: Arc<Job>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    if job.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let ns = job.namespace().unwrap_or_default();
    let uid = job.uid().ok_or(Error::MissingUid)?;
    let spec = job.spec.clone().unwrap_or_default();
    let owned = owned_pods(&ctx.pods, &ns, &uid);
    let (pending_creates, pending_deletes) = ctx.expectations.observe(&uid, &owned);
    let c = count(&owned, &pending_deletes);
    let now = Utc::now();
    let mut status = json!({
        "active": c.active.len(),
        "ready": c.ready,
        "succeeded": c.succeeded,
        "failed": c.failed,
    });
    let indexed = spec.completion_mode.as_deref() == Some("Indexed");
    if indexed {
        status["completedIndexes"] = json!(format_indexes(&c.completed_indexes));
    }

    if let Some((_, at)) = finished_at(&job) {
        // Finished: nothing runs any more; only the TTL is left.
        delete_pods(&ctx, &uid, &ns, &c.active).await?;
        status["active"] = json!(0);
        patch_status(&ctx, &job, status).await?;
        return expire(&ctx, &job, at).await;
    }

    if spec.suspend == Some(true) {
        delete_pods(&ctx, &uid, &ns, &c.active).await?;
        status["active"] = json!(0);
        status["startTime"] = Value::Null;
        status["conditions"] = json!(with_condition(
            &job,
            "Suspended",
            "True",
            "JobSuspended",
            "Job suspended"
        ));
        patch_status(&ctx, &job, status).await?;
        return Ok(Action::await_change());
    }
    let was_suspended = condition_true(&job, "Suspended").is_some();
    if was_suspended {
        status["conditions"] = json!(with_condition(
            &job,
            "Suspended",
            "False",
            "JobResumed",
            "Job resumed"
        ));
    }
    let start = job
        .status
        .as_ref()
        .and_then(|s| s.start_time.as_ref())
        .filter(|_| !was_suspended)
        .and_then(|t| parse_time(&t.0.to_string()))
        .unwrap_or(now);
    status["startTime"] = json!(time(start));

    // Failure: too many failed pods, or past the deadline.
    let backoff_limit = spec.backoff_limit.unwrap_or(6).max(0) as usize;
    let deadline = spec
        .active_deadline_seconds
        .map(|s| start + chrono::Duration::seconds(s));
    let failure = if c.failed > backoff_limit {
        Some((
            "BackoffLimitExceeded",
            "Job has reached the specified backoff limit",
        ))
    } else if deadline.is_some_and(|d| now >= d) {
        Some((
            "DeadlineExceeded",
            "Job was active longer than specified deadline",
        ))
    } else {
        None
    };
    if let Some((reason, message)) = failure {
        delete_pods(&ctx, &uid, &ns, &c.active).await?;
        let mut with = job.as_ref().clone();
        with.status.get_or_insert_default().conditions = serde_json::from_value(json!(
            with_condition(&job, "FailureTarget", "True", reason, message)
        ))
        .ok();
        status["conditions"] = json!(with_condition(&with, "Failed", "True", reason, message));
        status["active"] = json!(0);
        tracing::info!(job = %job.name_any(), reason, "job failed");
        patch_status(&ctx, &job, status).await?;
        return Ok(Action::requeue(Duration::from_secs(1)));
    }

    // Success.
    let parallelism = spec.parallelism.unwrap_or(1).max(0) as usize;
    let completions = spec.completions.map(|c| c.max(0) as usize);
    let complete = match (indexed, completions) {
        (true, Some(n)) => c.completed_indexes.len() >= n,
        (_, Some(n)) => c.succeeded >= n,
        (_, None) => c.succeeded >= 1 && c.active.is_empty(),
    };
    if complete {
        delete_pods(&ctx, &uid, &ns, &c.active).await?;
        let mut with = job.as_ref().clone();
        with.status.get_or_insert_default().conditions =
            serde_json::from_value(json!(with_condition(
                &job,
                "SuccessCriteriaMet",
                "True",
                "CompletionsReached",
                "Reached expected number of succeeded pods"
            )))
            .ok();
        status["conditions"] = json!(with_condition(
            &with,
            "Complete",
            "True",
            "CompletionsReached",
            "Reached expected number of succeeded pods"
        ));
        status["completionTime"] = json!(time(now));
        status["active"] = json!(0);
        tracing::info!(job = %job.name_any(), succeeded = c.succeeded, "job complete");
        patch_status(&ctx, &job, status).await?;
        return Ok(Action::requeue(Duration::from_secs(1)));
    }

    // How many pods should run now, and for which indexes.
    let running = c.active.len() + pending_creates;
    let want = match (indexed, completions) {
        (_, None) if c.succeeded > 0 => 0,
        (_, None) => parallelism,
        (true, Some(n)) => parallelism.min(n - c.completed_indexes.len()),
        (false, Some(n)) => parallelism.min(n - c.succeeded),
    };
    let mut requeue = deadline.map(|d| (d - now).to_std().unwrap_or_default());
    if running > want && pending_creates == 0 {
        let mut surplus = c.active.clone();
        surplus.sort_by_key(|p| pods::deletion_rank(p));
        surplus.truncate(running - want);
        delete_pods(&ctx, &uid, &ns, &surplus).await?;
    } else if running < want {
        // Failed pods are replaced after an exponential backoff.
        let wait = if c.failed > 0 {
            let delay = ctx
                .backoff
                .saturating_mul(1 << (c.failed - 1).min(16))
                .min(MAX_BACKOFF);
            let since = ctx.last_failure(&uid, c.failed);
            let ready_at = since + chrono::Duration::from_std(delay).unwrap_or_default();
            (ready_at > now).then(|| (ready_at - now).to_std().unwrap_or_default())
        } else {
            None
        };
        match wait {
            Some(w) => requeue = Some(requeue.map_or(w, |r| r.min(w))),
            None => {
                let indexes: Vec<Option<i32>> = if indexed {
                    let busy: BTreeSet<i32> =
                        c.active.iter().filter_map(|p| pod_index(p)).collect();
                    (0..completions.unwrap_or(0) as i32)
                        .filter(|i| !c.completed_indexes.contains(i) && !busy.contains(i))
                        .take(want - running)
                        .map(Some)
                        .collect()
                } else {
                    vec![None; want - running]
                };
                let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
                for index in indexes {
                    let pod = api
                        .create(&PostParams::default(), &pod_from_template(&job, index)?)
                        .await
                        .map_err(Error::Kube)?;
                    ctx.expectations.expect_create(&uid, pod.name_any());
                }
            }
        }
    }
    patch_status(&ctx, &job, status).await?;
    Ok(Action::requeue(requeue.unwrap_or(Duration::from_secs(300))))
}

/// Runs the Job controller until its watches end.
pub(crate) fn run(
    client: kube::Client,
    informers: &mut crate::Informers,
    config: &Config,
) -> impl std::future::Future<Output = Result<(), Error>> + use<> {
    let children = informers.cache::<Pod>();
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        pods: children.store.clone(),
        expectations: Expectations::default(),
        backoff: config.job_backoff,
        failures: Default::default(),
    });
    crate::run_owning::<Job, _, _, _, _>(client, children, reconcile, ctx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completed_indexes_read_like_kubernetes() {
        let set: BTreeSet<i32> = [0, 1, 2, 4, 6, 7].into();
        assert_eq!(format_indexes(&set), "0-2,4,6-7");
        assert_eq!(format_indexes(&BTreeSet::new()), "");
    }
}
