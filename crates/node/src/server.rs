//! The agent endpoint: container logs and exec sessions (which the API
//! server proxies `pods/log` and `pods/exec` to), usage and Prometheus
//! metrics. Every route but `/healthz` is for the API server only: over
//! mutual TLS in a cluster with a CA (`tls.rs`), otherwise to the
//! cluster's node-proxy token.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::Ctx;
use crate::logs::{self, LogOptions};

pub(crate) async fn serve(
    ctx: Arc<Ctx>,
    listener: tokio::net::TcpListener,
    tls: Option<tokio::sync::watch::Receiver<Arc<rustls::ServerConfig>>>,
) {
    let protected = Router::new()
        .route(
            "/containerLogs/{namespace}/{pod}/{container}",
            get(container_logs),
        )
        .route(
            "/exec/{namespace}/{pod}/{container}",
            get(crate::exec::handle).post(crate::exec::handle),
        )
        .route(
            "/attach/{namespace}/{pod}/{container}",
            get(crate::attach::handle).post(crate::attach::handle),
        )
        .route(
            "/portForward/{namespace}/{pod}",
            get(crate::portforward::handle),
        )
        .route("/metrics", get(metrics))
        .route("/stats/pods", get(stats))
        .route(
            "/stats/history/{namespace}/{pod}",
            get(crate::history::serve),
        )
        .route_layer(middleware::from_fn_with_state(ctx.clone(), authenticate));
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .merge(protected)
        .with_state(ctx);
    match tls {
        Some(tls) => crate::tls::serve(listener, tls, app).await,
        None => {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "the agent endpoint stopped");
            }
        }
    }
}

/// The node-proxy token, where the endpoint is served without TLS (over
/// TLS, `tls::serve` admitted only the API server's connections).
async fn authenticate(State(ctx): State<Arc<Ctx>>, req: Request, next: Next) -> Response {
    let Some(token) = &ctx.token else {
        return next.run(req).await;
    };
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Compared in constant time: the token is the endpoint's only key.
    let ok = presented.is_some_and(|p| {
        p.len() == token.len()
            && p.bytes()
                .zip(token.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    });
    if !ok || token.is_empty() {
        return (StatusCode::UNAUTHORIZED, "Unauthorized\n").into_response();
    }
    next.run(req).await
}

fn bad_request(message: String) -> Response {
    (StatusCode::BAD_REQUEST, message).into_response()
}

/// The 404 for a pod this node does not run.
pub(crate) fn not_here(namespace: &str, pod: &str) -> (StatusCode, String) {
    (
        StatusCode::NOT_FOUND,
        format!("pod {namespace}/{pod} is not running on this node"),
    )
}

async fn container_logs(
    State(ctx): State<Arc<Ctx>>,
    Path((namespace, pod, container)): Path<(String, String, String)>,
    Query(options): Query<LogOptions>,
) -> Response {
    let Some(state) = ctx.pod_state(&namespace, &pod) else {
        return crate::server::not_here(&namespace, &pod).into_response();
    };
    let (dir, run, waiting) = {
        let st = state.lock().expect("pod state");
        let waiting = st
            .containers
            .iter()
            .find(|c| c.name == container)
            .map(|c| match &c.state {
                crate::status::State::Waiting { reason, .. } => reason.clone(),
                _ => String::new(),
            });
        (st.dir.clone(), st.runs.get(&container).cloned(), waiting)
    };
    let Some(waiting) = waiting else {
        return bad_request(format!("container {container} is not valid for pod {pod}"));
    };
    let Some(run) = run else {
        return bad_request(format!(
            "container \"{container}\" in pod \"{pod}\" is waiting to start: {waiting}"
        ));
    };
    let (path, live) = if options.previous {
        if run.restart_count == 0 {
            return bad_request(format!(
                "previous terminated container \"{container}\" in pod \"{pod}\" not found"
            ));
        }
        (logs::path(&dir, &container, run.restart_count - 1), None)
    } else {
        (
            logs::path(&dir, &container, run.restart_count),
            run.live_log.filter(|_| run.running),
        )
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    tokio::spawn(logs::stream(path, options, live, tx));
    let body = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|chunk| (Ok::<_, Infallible>(chunk), rx))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Body::from_stream(body))
        .expect("a valid response")
}

/// Prometheus text format: per-container CPU and memory, per-node pods.
async fn metrics(State(ctx): State<Arc<Ctx>>) -> Response {
    let mut out = String::new();
    out.push_str("# HELP wasmkube_container_cpu_usage_seconds_total CPU time used by the container's guest.\n# TYPE wasmkube_container_cpu_usage_seconds_total counter\n");
    let mut memory = String::from(
        "# HELP wasmkube_container_memory_working_set_bytes Linear memory the container's guest holds.\n# TYPE wasmkube_container_memory_working_set_bytes gauge\n",
    );
    let mut high = String::from(
        "# HELP wasmkube_container_memory_high_water_bytes Most linear memory the container's guest has held.\n# TYPE wasmkube_container_memory_high_water_bytes gauge\n",
    );
    let mut restarts = String::from(
        "# HELP wasmkube_container_restarts_total Restarts of the container.\n# TYPE wasmkube_container_restarts_total counter\n",
    );
    let mut requests = String::from(
        "# HELP wasmkube_container_http_requests_total HTTP requests an HTTP function container received.\n# TYPE wasmkube_container_http_requests_total counter\n",
    );
    let mut instances = String::from(
        "# HELP wasmkube_container_instances Live Wasm instances of the container (one per request in flight for HTTP functions).\n# TYPE wasmkube_container_instances gauge\n",
    );
    let pods = ctx.pods.lock().expect("pods lock");
    for h in pods.values() {
        let st = h.state.lock().expect("pod state");
        for c in &st.containers {
            let labels = format!(
                "namespace=\"{}\",pod=\"{}\",container=\"{}\"",
                h.namespace, h.name, c.name
            );
            let _ = writeln!(
                restarts,
                "wasmkube_container_restarts_total{{{labels}}} {}",
                c.restart_count
            );
            if let Some(run) = st.runs.get(&c.name) {
                let _ = writeln!(
                    out,
                    "wasmkube_container_cpu_usage_seconds_total{{{labels}}} {}",
                    run.usage.cpu().as_secs_f64()
                );
                let _ = writeln!(
                    memory,
                    "wasmkube_container_memory_working_set_bytes{{{labels}}} {}",
                    run.usage.memory()
                );
                let _ = writeln!(
                    high,
                    "wasmkube_container_memory_high_water_bytes{{{labels}}} {}",
                    run.usage.memory_high_water()
                );
                let _ = writeln!(
                    requests,
                    "wasmkube_container_http_requests_total{{{labels}}} {}",
                    run.usage.requests()
                );
                let _ = writeln!(
                    instances,
                    "wasmkube_container_instances{{{labels}}} {}",
                    run.usage.instances()
                );
            }
        }
    }
    let count = pods.len();
    drop(pods);
    out.push_str(&memory);
    out.push_str(&high);
    out.push_str(&restarts);
    out.push_str(&requests);
    out.push_str(&instances);
    let _ = write!(
        out,
        "# HELP wasmkube_node_pods Pods the agent runs.\n# TYPE wasmkube_node_pods gauge\nwasmkube_node_pods {count}\n"
    );
    for rt in &ctx.runtimes {
        out.push_str(&rt.metrics());
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

/// Previous samples: CPU time per container run and busy/total jiffies of
/// the machine, with when they were taken and the rate computed then.
#[derive(Debug, Default)]
pub(crate) struct Samples {
    containers: HashMap<String, Sample>,
    machine: Option<(Instant, u64, u64, f64)>,
}

type Sample = (Instant, Duration, f64);

/// Busy and total jiffies from /proc/stat.
fn machine_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = fields.iter().sum();
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    (total.saturating_sub(idle), total)
}

/// A CPU rate in cores since the previous sample (when that is at least a
/// second old; a younger one keeps its rate), or since the run started.
fn rate(prev: Option<Sample>, now: Instant, cpu: Duration, started: Instant) -> Sample {
    match prev {
        Some(p) if now.duration_since(p.0) < Duration::from_secs(1) => p,
        Some((t, c, _)) => {
            let r = cpu.saturating_sub(c).as_secs_f64() / now.duration_since(t).as_secs_f64();
            (now, cpu, r)
        }
        None => {
            let r = cpu.as_secs_f64() / now.duration_since(started).as_secs_f64().max(1e-3);
            (now, cpu, r)
        }
    }
}

/// Usage for the metrics API: the machine's CPU (cores) and memory in use,
/// and each running container's CPU rate and working set.
async fn stats(State(ctx): State<Arc<Ctx>>) -> Response {
    let now = Instant::now();
    let body = {
        let mut samples = ctx.samples.lock().expect("samples lock");
        let (busy, total) = machine_jiffies();
        let cpus = crate::node::allocatable_cpu() as f64;
        let node_cpu = match samples.machine {
            Some((t, _, _, r)) if now.duration_since(t) < Duration::from_secs(1) => r,
            Some((_, b, tot, _)) if total > tot => {
                let r = busy.saturating_sub(b) as f64 / (total - tot) as f64 * cpus;
                samples.machine = Some((now, busy, total, r));
                r
            }
            _ => {
                let r = busy as f64 / total.max(1) as f64 * cpus;
                samples.machine = Some((now, busy, total, r));
                r
            }
        };
        let (mem_total, mem_available) = crate::node::meminfo();
        let mut pods = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (uid, h) in ctx.pods.lock().expect("pods lock").iter() {
            let st = h.state.lock().expect("pod state");
            let mut containers = Vec::new();
            for (name, run) in st.runs.iter().filter(|(_, r)| r.running) {
                let key = format!("{uid}/{name}/{}", run.restart_count);
                let sample = rate(
                    samples.containers.get(&key).copied(),
                    now,
                    run.usage.cpu(),
                    run.started,
                );
                samples.containers.insert(key.clone(), sample);
                seen.insert(key);
                let mut container = serde_json::json!({
                    "name": name,
                    "cpuNanoCores": (sample.2 * 1e9) as u64,
                    "memoryBytes": run.usage.memory(),
                });
                // What a Wasm container runs, as its node got it ready.
                if let Some(m) = run.usage.module() {
                    container["wasmKind"] = serde_json::json!(m.kind);
                    container["wasmModuleBytes"] = serde_json::json!(m.bytes);
                    container["wasmNativeBytes"] = serde_json::json!(m.native_bytes);
                    container["wasmLoadSeconds"] = serde_json::json!(m.loaded_in.as_secs_f64());
                    if let Some(compiled) = m.compiled_in {
                        container["wasmCompileSeconds"] = serde_json::json!(compiled.as_secs_f64());
                    }
                    container["wasmInstances"] = serde_json::json!(run.usage.instances());
                }
                // Request figures only where the runtime counts requests
                // (HTTP functions): counters a reader differences.
                if run.usage.serves_requests() {
                    let (in_flight, request_seconds) = run.usage.concurrency();
                    container["requests"] = serde_json::json!(run.usage.requests());
                    container["requestsInFlight"] = serde_json::json!(in_flight);
                    container["requestSeconds"] = serde_json::json!(request_seconds);
                }
                containers.push(container);
            }
            if !containers.is_empty() {
                pods.push(serde_json::json!({"namespace": h.namespace, "name": h.name, "labels": h.labels(), "containers": containers}));
            }
        }
        samples.containers.retain(|k, _| seen.contains(k));
        let revisions = ctx
            .config
            .routed_load
            .as_ref()
            .map(|load| (load.0)())
            .unwrap_or_default();
        serde_json::json!({
            "node": {"cpuNanoCores": (node_cpu * 1e9) as u64, "memoryBytes": mem_total.saturating_sub(mem_available)},
            "pods": pods,
            "revisions": revisions,
        })
    };
    axum::Json(body).into_response()
}
