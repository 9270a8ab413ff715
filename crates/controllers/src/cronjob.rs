//! The CronJob controller: creates a Job at each scheduled time (standard
//! five-field cron syntax and `@hourly`-style macros, in `spec.timeZone` or
//! UTC), honouring `concurrencyPolicy` (Allow, Forbid, Replace), `suspend`,
//! `startingDeadlineSeconds` and the successful/failed history limits.
//!
//! Like Kubernetes it only ever starts the most recent missed run, and names
//! each Job after its scheduled minute, so a retried reconcile cannot start a
//! run twice.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::Cron;
use k8s_openapi::api::batch::v1::{CronJob, Job};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, PropagationPolicy};
use kube::runtime::controller::Action;
use kube::runtime::reflector::Store;
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};

use crate::Error;
use crate::job::finished_at;

/// The annotation recording which scheduled time a Job is for.
pub const SCHEDULED_TIMESTAMP: &str = "batch.kubernetes.io/cronjob-scheduled-timestamp";

pub(crate) struct Ctx {
    client: kube::Client,
    jobs: Store<Job>,
}

/// Parses a Kubernetes CronJob schedule: five fields or a macro.
pub fn parse_schedule(schedule: &str) -> Result<Cron, String> {
    let s = schedule.trim();
    if !s.starts_with('@') && s.split_whitespace().count() != 5 {
        return Err(format!(
            "unparseable schedule {schedule:?}: expected exactly 5 fields, found {}",
            s.split_whitespace().count()
        ));
    }
    s.parse::<Cron>()
        .map_err(|e| format!("unparseable schedule {schedule:?}: {e}"))
}

/// The latest scheduled time in `(after, now]`, and the next one after `now`.
pub fn schedule_times(
    cron: &Cron,
    tz: Tz,
    after: DateTime<Utc>,
    now: DateTime<Utc>,
) -> (Option<DateTime<Utc>>, Option<DateTime<Utc>>) {
    let now_tz = now.with_timezone(&tz);
    let last = cron
        .find_previous_occurrence(&now_tz, true)
        .ok()
        .map(|t| t.with_timezone(&Utc))
        .filter(|t| *t > after);
    let next = cron
        .find_next_occurrence(&now_tz, false)
        .ok()
        .map(|t| t.with_timezone(&Utc));
    (last, next)
}

fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

fn time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn job_from_template(cj: &CronJob, at: DateTime<Utc>) -> Result<Job, Error> {
    let template = cj
        .spec
        .as_ref()
        .map(|s| s.job_template.clone())
        .unwrap_or_default();
    let mut meta = template.metadata.unwrap_or_default();
    meta.name = Some(format!("{}-{}", cj.name_any(), at.timestamp() / 60));
    meta.generate_name = None;
    meta.namespace = cj.namespace();
    meta.owner_references = Some(vec![cj.controller_owner_ref(&()).ok_or(Error::MissingUid)?]);
    meta.annotations
        .get_or_insert_default()
        .insert(SCHEDULED_TIMESTAMP.into(), time(at));
    Ok(Job {
        metadata: meta,
        spec: template.spec,
        status: None,
    })
}

fn owned_jobs(store: &Store<Job>, ns: &str, uid: &str) -> Vec<Arc<Job>> {
    store
        .state()
        .into_iter()
        .filter(|j| j.metadata.namespace.as_deref() == Some(ns))
        .filter(|j| {
            j.owner_references()
                .iter()
                .any(|o| o.controller == Some(true) && o.uid == uid)
        })
        .collect()
}

fn scheduled_at(job: &Job) -> DateTime<Utc> {
    job.annotations()
        .get(SCHEDULED_TIMESTAMP)
        .and_then(|t| parse_time(t))
        .or_else(|| {
            job.metadata
                .creation_timestamp
                .as_ref()
                .and_then(|t| parse_time(&t.0.to_string()))
        })
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

async fn delete_job(api: &Api<Job>, job: &Job) -> Result<(), Error> {
    let params = DeleteParams {
        propagation_policy: Some(PropagationPolicy::Background),
        ..Default::default()
    };
    match crate::gone_ok(api.delete(&job.name_any(), &params).await) {
        Ok(()) => Ok(()),
        Err(e) => Err(Error::Kube(e)),
    }
}

fn job_ref(job: &Job) -> Value {
    json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "name": job.metadata.name, "namespace": job.metadata.namespace,
        "uid": job.metadata.uid, "resourceVersion": job.metadata.resource_version,
    })
}

async fn reconcile(cj: Arc<CronJob>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    if cj.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let ns = cj.namespace().unwrap_or_default();
    let uid = cj.uid().ok_or(Error::MissingUid)?;
    let spec = cj.spec.clone().unwrap_or_default();
    let api: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
    let cj_api: Api<CronJob> = Api::namespaced(ctx.client.clone(), &ns);

    let mut jobs = owned_jobs(&ctx.jobs, &ns, &uid);
    jobs.sort_by_key(|j| scheduled_at(j));
    let (mut active, mut succeeded, mut failed) = (Vec::new(), Vec::new(), Vec::new());
    for j in &jobs {
        if j.metadata.deletion_timestamp.is_some() {
            continue;
        }
        match finished_at(j) {
            None => active.push(j.clone()),
            Some((kind, _)) if kind == "Complete" => succeeded.push(j.clone()),
            Some(_) => failed.push(j.clone()),
        }
    }
    // History limits: the oldest finished Jobs go first.
    for (list, limit) in [
        (&succeeded, spec.successful_jobs_history_limit.unwrap_or(3)),
        (&failed, spec.failed_jobs_history_limit.unwrap_or(1)),
    ] {
        let excess = list.len().saturating_sub(limit.max(0) as usize);
        for j in &list[..excess] {
            delete_job(&api, j).await?;
        }
    }
    let last_successful = succeeded
        .iter()
        .filter_map(|j| j.status.as_ref()?.completion_time.as_ref())
        .filter_map(|t| parse_time(&t.0.to_string()))
        .max();

    let cron = match parse_schedule(&spec.schedule) {
        Ok(c) => c,
        Err(message) => {
            tracing::warn!(cronjob = %cj.name_any(), %message, "cannot schedule");
            return Ok(Action::await_change());
        }
    };
    let tz: Tz = match spec.time_zone.as_deref().unwrap_or("UTC").parse() {
        Ok(tz) => tz,
        Err(_) => {
            tracing::warn!(cronjob = %cj.name_any(), zone = ?spec.time_zone, "unknown time zone");
            return Ok(Action::await_change());
        }
    };
    let now = Utc::now();
    let status = cj.status.clone().unwrap_or_default();
    let last_schedule = status
        .last_schedule_time
        .as_ref()
        .and_then(|t| parse_time(&t.0.to_string()));
    let created = cj
        .metadata
        .creation_timestamp
        .as_ref()
        .and_then(|t| parse_time(&t.0.to_string()))
        .unwrap_or(now);
    let mut earliest = last_schedule.unwrap_or(created);
    if let Some(deadline) = spec.starting_deadline_seconds {
        earliest = earliest.max(now - chrono::Duration::seconds(deadline));
    }
    let (due, next) = schedule_times(&cron, tz, earliest, now);
    let mut new_last_schedule = last_schedule;
    if let Some(at) = due
        && spec.suspend != Some(true)
    {
        let policy = spec.concurrency_policy.as_deref().unwrap_or("Allow");
        let start = match policy {
            "Forbid" if !active.is_empty() => {
                tracing::debug!(cronjob = %cj.name_any(), "previous run still active; skipping");
                false
            }
            "Replace" => {
                for j in active.drain(..) {
                    delete_job(&api, &j).await?;
                }
                true
            }
            _ => true,
        };
        if start {
            match api
                .create(&PostParams::default(), &job_from_template(&cj, at)?)
                .await
            {
                Ok(job) => {
                    tracing::info!(cronjob = %cj.name_any(), job = %job.name_any(), scheduled = %time(at), "started job");
                    active.push(Arc::new(job));
                }
                // Created by an earlier attempt whose status write was lost.
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => return Err(Error::Kube(e)),
            }
            new_last_schedule = Some(at);
        }
    }
    let mut patch = json!({
        "active": active.iter().map(|j| job_ref(j)).collect::<Vec<_>>(),
    });
    if let Some(t) = new_last_schedule {
        patch["lastScheduleTime"] = json!(time(t));
    }
    if let Some(t) = last_successful {
        patch["lastSuccessfulTime"] = json!(time(t));
    }
    cj_api
        .patch_status(
            &cj.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": patch })),
        )
        .await
        .map_err(Error::Kube)?;
    Ok(match next {
        Some(t) => Action::requeue(
            (t - Utc::now()).to_std().unwrap_or_default() + Duration::from_millis(100),
        ),
        None => Action::await_change(),
    })
}

/// Runs the CronJob controller until its watches end.
pub(crate) fn run(
    client: kube::Client,
    informers: &mut crate::Informers,
) -> impl std::future::Future<Output = Result<(), Error>> + use<> {
    let children = informers.cache::<Job>();
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        jobs: children.store.clone(),
    });
    crate::run_owning::<CronJob, _, _, _, _>(client, children, reconcile, ctx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn schedules_follow_cron_syntax_and_time_zones() {
        let every_5 = parse_schedule("*/5 * * * *").unwrap();
        let (last, next) = schedule_times(
            &every_5,
            Tz::UTC,
            at("2026-11-22T09:00:00Z"),
            at("2026-11-22T10:07:30Z"),
        );
        assert_eq!(last, Some(at("2026-11-22T10:05:00Z")));
        assert_eq!(next, Some(at("2026-11-22T10:10:00Z")));
        // Nothing is due when the last run was at or after the latest time.
        let (last, _) = schedule_times(
            &every_5,
            Tz::UTC,
            at("2026-11-22T10:05:00Z"),
            at("2026-11-22T10:07:30Z"),
        );
        assert_eq!(last, None);
        // 09:00 in New York is 14:00 UTC in November (EST, UTC-5).
        let nine = parse_schedule("0 9 * * MON-FRI").unwrap();
        let ny: Tz = "America/New_York".parse().unwrap();
        let (_, next) = schedule_times(
            &nine,
            ny,
            at("2026-11-20T00:00:00Z"),
            at("2026-11-22T12:00:00Z"),
        );
        assert_eq!(next, Some(at("2026-11-23T14:00:00Z")));
        let hourly = parse_schedule("@hourly").unwrap();
        let (_, next) = schedule_times(
            &hourly,
            Tz::UTC,
            at("2026-11-22T00:00:00Z"),
            at("2026-11-22T10:07:30Z"),
        );
        assert_eq!(next, Some(at("2026-11-22T11:00:00Z")));
        assert!(parse_schedule("* * * *").is_err());
        assert!(parse_schedule("0 * * * * *").is_err());
        assert!(parse_schedule("61 * * * *").is_err());
    }
}
