//! The agent endpoint: container logs (which the API server proxies
//! `pods/log` to), usage and Prometheus metrics. Every route but `/healthz`
//! needs the cluster's node-proxy token.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::Ctx;
use crate::logs::{self, LogOptions};

pub(crate) async fn serve(ctx: Arc<Ctx>, listener: tokio::net::TcpListener) {
    let protected = Router::new()
        .route(
            "/containerLogs/{namespace}/{pod}/{container}",
            get(container_logs),
        )
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(ctx.clone(), authenticate));
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .merge(protected)
        .with_state(ctx);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "the agent endpoint stopped");
    }
}

async fn authenticate(State(ctx): State<Arc<Ctx>>, req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Compared in constant time: the token is the endpoint's only key.
    let ok = presented.is_some_and(|p| {
        p.len() == ctx.token.len()
            && p.bytes()
                .zip(ctx.token.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    });
    if !ok || ctx.token.is_empty() {
        return (StatusCode::UNAUTHORIZED, "Unauthorized\n").into_response();
    }
    next.run(req).await
}

fn bad_request(message: String) -> Response {
    (StatusCode::BAD_REQUEST, message).into_response()
}

async fn container_logs(
    State(ctx): State<Arc<Ctx>>,
    Path((namespace, pod, container)): Path<(String, String, String)>,
    Query(options): Query<LogOptions>,
) -> Response {
    let found = ctx
        .pods
        .lock()
        .expect("pods lock")
        .values()
        .find(|h| h.namespace == namespace && h.name == pod)
        .map(|h| h.state.clone());
    let Some(state) = found else {
        return (
            StatusCode::NOT_FOUND,
            format!("pod {namespace}/{pod} is not running on this node"),
        )
            .into_response();
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
            }
        }
    }
    let count = pods.len();
    drop(pods);
    out.push_str(&memory);
    out.push_str(&high);
    out.push_str(&restarts);
    let _ = write!(
        out,
        "# HELP wasmkube_node_pods Pods the agent runs.\n# TYPE wasmkube_node_pods gauge\nwasmkube_node_pods {count}\n"
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}
