//! Prometheus metrics of the API server, under Kubernetes' names so its
//! dashboards and alerts work unchanged: `apiserver_request_total` and
//! `apiserver_request_duration_seconds` by verb, group, version, resource,
//! subresource, scope and code; `apiserver_longrunning_requests` (watches
//! open now); `apiserver_watch_events_total` and
//! `apiserver_watch_events_sizes` by kind. Served at `/metrics` in the
//! Prometheus text format (0.0.4, as Kubernetes serves it).
//!
//! The registry is the process's default one (as client-go's and the API
//! server's are), so the page also carries the metrics of the scheduler
//! and controllers that run in the same process.

use std::sync::LazyLock;
use std::time::Instant;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, TextEncoder,
};

use crate::params::Params;
use crate::request;

/// What a request addressed, as the API server's request metrics label it.
#[derive(Clone, Debug)]
struct RequestLabels {
    verb: &'static str,
    group: String,
    version: String,
    resource: String,
    subresource: String,
    scope: &'static str,
}

impl RequestLabels {
    fn values(&self) -> [&str; 7] {
        [
            self.verb,
            &self.group,
            &self.version,
            &self.resource,
            &self.subresource,
            self.scope,
            "apiserver",
        ]
    }
}

const REQUEST_LABELS: [&str; 7] = [
    "verb",
    "group",
    "version",
    "resource",
    "subresource",
    "scope",
    "component",
];

struct Metrics {
    requests: IntCounterVec,
    durations: HistogramVec,
    longrunning: IntGaugeVec,
    watch_events: IntCounterVec,
    watch_sizes: HistogramVec,
}

/// Kubernetes' buckets for request (and storage request) latency.
pub(crate) const LATENCY_BUCKETS: [f64; 23] = [
    0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0,
    10.0, 15.0, 20.0, 30.0, 45.0, 60.0,
];

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let mut code_labels = REQUEST_LABELS.to_vec();
    code_labels.push("code");
    let requests = IntCounterVec::new(
        Opts::new(
            "apiserver_request_total",
            "Counter of apiserver requests broken out for each verb, group, version, resource, scope, component, and HTTP response code.",
        ),
        &code_labels,
    )
    .expect("a valid metric");
    let durations = HistogramVec::new(
        HistogramOpts::new(
            "apiserver_request_duration_seconds",
            "Response latency distribution in seconds for each verb, group, version, resource, subresource, scope and component.",
        )
        .buckets(LATENCY_BUCKETS.to_vec()),
        &REQUEST_LABELS,
    )
    .expect("a valid metric");
    let longrunning = IntGaugeVec::new(
        Opts::new(
            "apiserver_longrunning_requests",
            "Gauge of all active long-running apiserver requests broken out by verb, group, version, resource, scope and component.",
        ),
        &REQUEST_LABELS,
    )
    .expect("a valid metric");
    let watch_events = IntCounterVec::new(
        Opts::new(
            "apiserver_watch_events_total",
            "Number of events sent in watch clients",
        ),
        &["group", "version", "kind"],
    )
    .expect("a valid metric");
    let watch_sizes = HistogramVec::new(
        HistogramOpts::new(
            "apiserver_watch_events_sizes",
            "Watch event size distribution in bytes",
        )
        .buckets(prometheus::exponential_buckets(1024.0, 2.0, 8).expect("valid buckets")),
        &["group", "version", "kind"],
    )
    .expect("a valid metric");
    let registry = prometheus::default_registry();
    for m in [
        Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
        Box::new(durations.clone()),
        Box::new(longrunning.clone()),
        Box::new(watch_events.clone()),
        Box::new(watch_sizes.clone()),
    ] {
        // Another API server in the same process (tests) shares them.
        let _ = registry.register(m);
    }
    Metrics {
        requests,
        durations,
        longrunning,
        watch_events,
        watch_sizes,
    }
});

/// The metrics in the Prometheus text format.
pub(crate) async fn serve() -> Response {
    let encoder = TextEncoder::new();
    let mut out = Vec::new();
    // Everything in the process's registry: the API server's, and the
    // scheduler's and controllers' when they run in the same process.
    LazyLock::force(&METRICS);
    if encoder.encode(&prometheus::gather(), &mut out).is_err() {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    (
        [(header::CONTENT_TYPE, encoder.format_type().to_owned())],
        out,
    )
        .into_response()
}

/// Counts a watch event of `bytes` sent to a client.
pub(crate) fn watch_event(group: &str, version: &str, kind: &str, bytes: usize) {
    let labels = [group, version, kind];
    METRICS.watch_events.with_label_values(&labels).inc();
    METRICS
        .watch_sizes
        .with_label_values(&labels)
        .observe(bytes as f64);
}

/// The labels of a request, from its method, path and query.
fn labels(method: &Method, path: &str, query: Option<&str>) -> RequestLabels {
    let mut l = RequestLabels {
        verb: "",
        group: String::new(),
        version: String::new(),
        resource: String::new(),
        subresource: String::new(),
        scope: "",
    };
    let target = request::parse(path).ok().flatten();
    let Some(t) = target else {
        // Not a resource: the path's first segment, as Kubernetes labels
        // non-resource URLs (bounded, whatever clients ask for).
        l.verb = match *method {
            Method::GET | Method::HEAD => "GET",
            Method::POST => "POST",
            Method::PUT => "PUT",
            Method::PATCH => "PATCH",
            Method::DELETE => "DELETE",
            _ => "OTHER",
        };
        let first = path.trim_start_matches('/').split('/').next().unwrap_or("");
        l.subresource = match first {
            "api" | "apis" | "openapi" | "healthz" | "livez" | "readyz" | "version" | "metrics" => {
                format!("/{first}")
            }
            _ => "other".to_owned(),
        };
        return l;
    };
    let watch = Params::parse(query).map(|p| p.watch).unwrap_or(false);
    l.verb = match (method, t.name.is_some(), watch) {
        (&Method::GET, _, true) => "WATCH",
        (&Method::GET, true, _) => "GET",
        (&Method::GET, false, _) => "LIST",
        (&Method::POST, ..) if t.subresource.is_some() => "CONNECT",
        (&Method::POST, ..) => "POST",
        (&Method::PUT, ..) => "PUT",
        (&Method::PATCH, ..) => "PATCH",
        (&Method::DELETE, true, _) => "DELETE",
        (&Method::DELETE, false, _) => "DELETECOLLECTION",
        _ => "OTHER",
    };
    l.group = t.rt.group.to_owned();
    l.version = t.rt.version.to_owned();
    l.resource = t.rt.plural.to_owned();
    l.subresource = t
        .subresource
        .map(|s| s.name().to_owned())
        .unwrap_or_default();
    l.scope = if t.name.is_some() {
        "resource"
    } else if t.namespace.is_some() {
        "namespace"
    } else {
        "cluster"
    };
    l
}

/// Middleware: counts and times every request; a watch counts as a
/// long-running request until its response ends.
pub(crate) async fn track(req: Request, next: Next) -> Response {
    let started = Instant::now();
    let mut l = labels(req.method(), req.uri().path(), req.uri().query());
    if req.method() == Method::PATCH
        && req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("application/apply-patch"))
    {
        l.verb = "APPLY";
    }
    let response = next.run(req).await;
    let values = l.values();
    let code = response.status().as_u16().to_string();
    let mut with_code = values.to_vec();
    with_code.push(&code);
    METRICS.requests.with_label_values(&with_code).inc();
    if l.verb != "WATCH" || !response.status().is_success() {
        METRICS
            .durations
            .with_label_values(&values)
            .observe(started.elapsed().as_secs_f64());
        return response;
    }
    // Open until the client or the server ends the stream.
    struct Open(prometheus::IntGauge);
    impl Drop for Open {
        fn drop(&mut self) {
            self.0.dec();
        }
    }
    let gauge = METRICS.longrunning.with_label_values(&values);
    gauge.inc();
    let open = Open(gauge);
    let (parts, body) = response.into_parts();
    let body = body.into_data_stream().map(move |chunk| {
        let _ = &open;
        chunk
    });
    Response::from_parts(parts, Body::from_stream(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_labelled_as_kubernetes_labels_them() {
        let l = |m: Method, p: &str, q: Option<&str>| {
            let l = labels(&m, p, q);
            format!(
                "{} {}/{}/{}/{} {}",
                l.verb, l.group, l.version, l.resource, l.subresource, l.scope
            )
        };
        assert_eq!(
            l(Method::GET, "/api/v1/namespaces/default/pods", None),
            "LIST /v1/pods/ namespace"
        );
        assert_eq!(
            l(Method::GET, "/api/v1/pods", Some("watch=true")),
            "WATCH /v1/pods/ cluster"
        );
        assert_eq!(
            l(
                Method::PUT,
                "/apis/apps/v1/namespaces/a/deployments/web/status",
                None
            ),
            "PUT apps/v1/deployments/status resource"
        );
        assert_eq!(
            l(Method::DELETE, "/api/v1/namespaces/a/configmaps", None),
            "DELETECOLLECTION /v1/configmaps/ namespace"
        );
        assert_eq!(
            l(Method::POST, "/api/v1/namespaces/a/pods/p/exec", None),
            "CONNECT /v1/pods/exec resource"
        );
        assert_eq!(labels(&Method::GET, "/readyz", None).subresource, "/readyz");
        assert_eq!(
            labels(&Method::GET, "/whatever/x", None).subresource,
            "other"
        );
    }
}
