//! The controllers' Prometheus metrics, under controller-runtime's names
//! (what operators built on it export): reconciles by controller and
//! result, and errors. They live in the process's default registry, which
//! the API server's `/metrics` serves when both run in one process.

use std::sync::LazyLock;

use prometheus::{IntCounterVec, Opts};

struct Metrics {
    reconciles: IntCounterVec,
    errors: IntCounterVec,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let reconciles = IntCounterVec::new(
        Opts::new(
            "controller_runtime_reconcile_total",
            "Total number of reconciliations per controller",
        ),
        &["controller", "result"],
    )
    .expect("a valid metric");
    let errors = IntCounterVec::new(
        Opts::new(
            "controller_runtime_reconcile_errors_total",
            "Total number of reconciliation errors per controller",
        ),
        &["controller"],
    )
    .expect("a valid metric");
    let registry = prometheus::default_registry();
    // Controllers started twice in one process (tests) share them.
    let _ = registry.register(Box::new(reconciles.clone()));
    let _ = registry.register(Box::new(errors.clone()));
    Metrics { reconciles, errors }
});

/// Counts one reconcile of `controller`.
pub(crate) fn reconciled(controller: &str, ok: bool) {
    let result = if ok { "success" } else { "error" };
    METRICS
        .reconciles
        .with_label_values(&[controller, result])
        .inc();
    if !ok {
        METRICS.errors.with_label_values(&[controller]).inc();
    }
}
