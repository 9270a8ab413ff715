//! Jobs and CronJobs in an in-process cluster on simulated nodes, which end
//! pods as Succeeded or Failed when the pod template asks for it.

use std::time::Duration;

use chrono::Utc;
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

mod common;
use common::{cluster, describe_pods, wait_list};

fn job(name: &str, spec: Value, phase: Option<&str>) -> Job {
    let annotations = phase.map_or(json!({}), |p| json!({"sim.wasmkube.io/phase": p}));
    let mut spec = spec;
    spec["template"] = json!({
        "metadata": {"annotations": annotations},
        "spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "batch:1"}]},
    });
    serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec})).unwrap()
}

fn condition(j: &Job, t: &str) -> Option<(String, String)> {
    j.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == t && c.status == "True")
        .map(|c| {
            (
                c.reason.clone().unwrap_or_default(),
                c.message.clone().unwrap_or_default(),
            )
        })
}

async fn wait_job(api: &Api<Job>, name: &str, done: impl Fn(&Job) -> bool) -> Job {
    let list = wait_list(api, name, |jobs| {
        jobs.iter()
            .any(|j| j.metadata.name.as_deref() == Some(name) && done(j))
    })
    .await;
    list.into_iter()
        .find(|j| j.metadata.name.as_deref() == Some(name))
        .unwrap()
}

async fn job_pods(client: &kube::Client, job: &str) -> Vec<Pod> {
    Api::<Pod>::namespaced(client.clone(), "default")
        .list(&ListParams::default().labels(&format!("batch.kubernetes.io/job-name={job}")))
        .await
        .unwrap()
        .items
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_run_to_completion_with_parallelism_and_indexes() {
    let c = cluster().await;
    let jobs: Api<Job> = Api::namespaced(c.client.clone(), "default");
    jobs.create(
        &PostParams::default(),
        &job(
            "count",
            json!({"completions": 4, "parallelism": 2}),
            Some("Succeeded"),
        ),
    )
    .await
    .unwrap();
    let done = wait_job(&jobs, "count", |j| condition(j, "Complete").is_some()).await;
    let st = done.status.clone().unwrap();
    assert_eq!(
        (st.succeeded, st.failed, st.active),
        (Some(4), Some(0), Some(0))
    );
    assert!(st.completion_time.is_some() && st.start_time.is_some());
    let pods = job_pods(&c.client, "count").await;
    assert_eq!(pods.len(), 4, "{}", describe_pods(&pods));

    jobs.create(
        &PostParams::default(),
        &job(
            "indexed",
            json!({"completions": 3, "parallelism": 3, "completionMode": "Indexed"}),
            Some("Succeeded"),
        ),
    )
    .await
    .unwrap();
    let done = wait_job(&jobs, "indexed", |j| condition(j, "Complete").is_some()).await;
    assert_eq!(
        done.status.unwrap().completed_indexes.as_deref(),
        Some("0-2")
    );
    let mut indexes: Vec<(String, String)> = job_pods(&c.client, "indexed")
        .await
        .iter()
        .map(|p| {
            let spec = p.spec.as_ref().unwrap();
            (
                p.metadata.annotations.as_ref().unwrap()["batch.kubernetes.io/job-completion-index"].clone(),
                spec.hostname.clone().unwrap(),
            )
        })
        .collect();
    indexes.sort();
    assert_eq!(
        indexes,
        [("0", "indexed-0"), ("1", "indexed-1"), ("2", "indexed-2")]
            .map(|(a, b)| (a.to_owned(), b.to_owned()))
    );
    let pod = &job_pods(&c.client, "indexed").await[0];
    let env = pod.spec.as_ref().unwrap().containers[0]
        .env
        .clone()
        .unwrap();
    assert!(env.iter().any(|e| e.name == "JOB_COMPLETION_INDEX"));

    // A finished Job with a TTL is deleted, and its pods with it.
    jobs.create(
        &PostParams::default(),
        &job(
            "ttl",
            json!({"ttlSecondsAfterFinished": 0}),
            Some("Succeeded"),
        ),
    )
    .await
    .unwrap();
    wait_list(&jobs, "ttl job deleted", |js| {
        js.iter().all(|j| j.metadata.name.as_deref() != Some("ttl"))
    })
    .await;
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), "default");
    wait_list(&pods, "ttl pods deleted", |ps| {
        ps.iter().all(|p| {
            p.metadata
                .labels
                .as_ref()
                .unwrap()
                .get("batch.kubernetes.io/job-name")
                != Some(&"ttl".to_owned())
        })
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_fail_on_backoff_limit_and_deadline_and_suspend() {
    let c = cluster().await;
    let jobs: Api<Job> = Api::namespaced(c.client.clone(), "default");
    let started = std::time::Instant::now();
    jobs.create(
        &PostParams::default(),
        &job("flaky", json!({"backoffLimit": 2}), Some("Failed")),
    )
    .await
    .unwrap();
    let failed = wait_job(&jobs, "flaky", |j| condition(j, "Failed").is_some()).await;
    // Replacements waited 200 ms, then 400 ms (the test cluster's backoff).
    assert!(
        started.elapsed() >= Duration::from_millis(600),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        condition(&failed, "Failed").unwrap().0,
        "BackoffLimitExceeded"
    );
    assert_eq!(failed.status.as_ref().unwrap().failed, Some(3));
    assert_eq!(job_pods(&c.client, "flaky").await.len(), 3);

    // Pods that run forever meet the deadline, and are stopped.
    jobs.create(
        &PostParams::default(),
        &job(
            "slow",
            json!({"activeDeadlineSeconds": 1, "parallelism": 2, "completions": 2}),
            None,
        ),
    )
    .await
    .unwrap();
    let failed = wait_job(&jobs, "slow", |j| condition(j, "Failed").is_some()).await;
    assert_eq!(condition(&failed, "Failed").unwrap().0, "DeadlineExceeded");
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), "default");
    wait_list(&pods, "slow pods stopped", |ps| {
        ps.iter()
            .filter(|p| {
                p.metadata.labels.as_ref().unwrap().get("job-name") == Some(&"slow".to_owned())
            })
            .all(|p| {
                p.metadata.deletion_timestamp.is_some()
                    || p.status.as_ref().unwrap().phase.as_deref() != Some("Running")
            })
    })
    .await;

    // A suspended Job runs nothing until resumed.
    jobs.create(
        &PostParams::default(),
        &job("later", json!({"suspend": true}), Some("Succeeded")),
    )
    .await
    .unwrap();
    let suspended = wait_job(&jobs, "later", |j| condition(j, "Suspended").is_some()).await;
    assert_eq!(suspended.status.unwrap().active, Some(0));
    assert!(job_pods(&c.client, "later").await.is_empty());
    jobs.patch(
        "later",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"suspend": false}})),
    )
    .await
    .unwrap();
    let done = wait_job(&jobs, "later", |j| condition(j, "Complete").is_some()).await;
    assert!(condition(&done, "Suspended").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cronjobs_start_the_missed_run_and_keep_their_history() {
    let c = cluster().await;
    let cjs: Api<CronJob> = Api::namespaced(c.client.clone(), "default");
    let jobs: Api<Job> = Api::namespaced(c.client.clone(), "default");
    let template = job("x", json!({}), Some("Succeeded")).spec.unwrap();
    let cj: CronJob = serde_json::from_value(json!({
        "metadata": {"name": "tick"},
        "spec": {"schedule": "* * * * *", "timeZone": "Europe/Berlin",
            "successfulJobsHistoryLimit": 1,
            "jobTemplate": {"metadata": {"labels": {"from": "tick"}}, "spec": template}},
    }))
    .unwrap();
    let cj = cjs.create(&PostParams::default(), &cj).await.unwrap();
    // Two older finished runs the CronJob owns; the history limit keeps one.
    let owner = json!([{"apiVersion": "batch/v1", "kind": "CronJob", "name": "tick",
        "uid": cj.metadata.uid, "controller": true, "blockOwnerDeletion": true}]);
    for (name, minutes_ago) in [("tick-old1", 30), ("tick-old2", 20)] {
        let mut j = job(name, json!({}), Some("Succeeded"));
        j.metadata.owner_references = serde_json::from_value(owner.clone()).unwrap();
        let at = Utc::now() - chrono::Duration::minutes(minutes_ago);
        j.metadata.annotations = Some(
            [(
                "batch.kubernetes.io/cronjob-scheduled-timestamp".to_owned(),
                at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            )]
            .into(),
        );
        jobs.create(&PostParams::default(), &j).await.unwrap();
    }
    // The last run was two minutes ago: the latest missed minute runs now.
    let two_ago = (Utc::now() - chrono::Duration::minutes(2))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    cjs.patch_status(
        "tick",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"lastScheduleTime": two_ago}})),
    )
    .await
    .unwrap();
    // The run for this minute, or for the next if the test crosses into it
    // (that run then replaces this one in the history of one).
    let this_minute = Utc::now().timestamp() / 60;
    let left = wait_list(&jobs, "history trimmed to the new run", |js| {
        let minutes: Vec<Option<i64>> = js
            .iter()
            .map(|j| {
                j.metadata
                    .name
                    .as_deref()
                    .and_then(|n| n.strip_prefix("tick-"))
                    .and_then(|m| m.parse().ok())
            })
            .collect();
        matches!(minutes[..], [Some(m)] if m >= this_minute)
            && js[0]
                .status
                .as_ref()
                .is_some_and(|s| s.succeeded == Some(1))
    })
    .await;
    assert_eq!(left[0].metadata.labels.as_ref().unwrap()["from"], "tick");
    let cj = wait_list(&cjs, "cronjob status", |cs| {
        cs[0]
            .status
            .as_ref()
            .is_some_and(|s| s.last_successful_time.is_some())
    })
    .await;
    let st = cj[0].status.clone().unwrap();
    assert!(st.last_schedule_time.unwrap().0.to_string() > two_ago);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cronjob_replace_policy_stops_the_running_job() {
    let c = cluster().await;
    let cjs: Api<CronJob> = Api::namespaced(c.client.clone(), "default");
    let jobs: Api<Job> = Api::namespaced(c.client.clone(), "default");
    let template = job("x", json!({}), None).spec.unwrap();
    let cj: CronJob = serde_json::from_value(json!({
        "metadata": {"name": "swap"},
        "spec": {"schedule": "*/1 * * * *", "concurrencyPolicy": "Replace",
            "jobTemplate": {"spec": template}},
    }))
    .unwrap();
    let cj = cjs.create(&PostParams::default(), &cj).await.unwrap();
    let mut running = job("swap-old", json!({}), None);
    running.metadata.owner_references = serde_json::from_value(
        json!([{"apiVersion": "batch/v1", "kind": "CronJob", "name": "swap",
        "uid": cj.metadata.uid, "controller": true}]),
    )
    .unwrap();
    jobs.create(&PostParams::default(), &running).await.unwrap();
    let two_ago = (Utc::now() - chrono::Duration::minutes(2))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    cjs.patch_status(
        "swap",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"lastScheduleTime": two_ago}})),
    )
    .await
    .unwrap();
    wait_list(&jobs, "old run replaced", |js| {
        js.iter().all(|j| {
            j.metadata.name.as_deref() != Some("swap-old")
                || j.metadata.deletion_timestamp.is_some()
        }) && js
            .iter()
            .any(|j| j.metadata.name.as_deref().is_some_and(|n| n != "swap-old"))
    })
    .await;
}
