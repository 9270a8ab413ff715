//! The scheduler's Prometheus metrics, under kube-scheduler's names:
//! scheduling attempts and their latency by result, and the pods waiting
//! in each queue. They live in the process's default registry, which the
//! API server's `/metrics` serves when both run in one process (as
//! `wasmkube server` runs them).

use std::sync::LazyLock;
use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts};

/// How an attempt to schedule a pod ended.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Result {
    Scheduled,
    Unschedulable,
    Error,
}

impl Result {
    fn label(self) -> &'static str {
        match self {
            Self::Scheduled => "scheduled",
            Self::Unschedulable => "unschedulable",
            Self::Error => "error",
        }
    }
}

struct Metrics {
    attempts: IntCounterVec,
    duration: HistogramVec,
    pending: IntGaugeVec,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let attempts = IntCounterVec::new(
        Opts::new(
            "scheduler_schedule_attempts_total",
            "Number of attempts to schedule pods, by the result. 'unschedulable' means a pod could not be scheduled, while 'error' means an internal scheduler problem.",
        ),
        &["result", "profile"],
    )
    .expect("a valid metric");
    let duration = HistogramVec::new(
        HistogramOpts::new(
            "scheduler_scheduling_attempt_duration_seconds",
            "Scheduling attempt latency in seconds (scheduling algorithm + binding)",
        )
        .buckets(prometheus::exponential_buckets(0.001, 2.0, 15).expect("valid buckets")),
        &["result", "profile"],
    )
    .expect("a valid metric");
    let pending = IntGaugeVec::new(
        Opts::new(
            "scheduler_pending_pods",
            "Number of pending pods, by the queue type. 'active' means number of pods in activeQ; 'backoff' means number of pods in backoffQ; 'unschedulable' means number of pods in unschedulablePods.",
        ),
        &["queue"],
    )
    .expect("a valid metric");
    let registry = prometheus::default_registry();
    for m in [
        Box::new(attempts.clone()) as Box<dyn prometheus::core::Collector>,
        Box::new(duration.clone()),
        Box::new(pending.clone()),
    ] {
        // A second scheduler in the same process (tests) shares them.
        let _ = registry.register(m);
    }
    Metrics {
        attempts,
        duration,
        pending,
    }
});

/// Records one scheduling attempt of the profile `profile`.
pub(crate) fn attempt(profile: &str, result: Result, took: Duration) {
    let labels = [result.label(), profile];
    METRICS.attempts.with_label_values(&labels).inc();
    METRICS
        .duration
        .with_label_values(&labels)
        .observe(took.as_secs_f64());
}

/// The pods waiting in each queue now.
pub(crate) fn pending(active: usize, backoff: usize, unschedulable: usize) {
    for (queue, n) in [
        ("active", active),
        ("backoff", backoff),
        ("unschedulable", unschedulable),
    ] {
        METRICS
            .pending
            .with_label_values(&[queue])
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
}
