//! `wasmkube scheduler`: the scheduler as its own process against any API
//! server, as kube-scheduler runs in a multi-machine control plane.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use wasmkube_controllers::leader::{ElectionConfig, LeaderElector};

#[derive(clap::Args, Debug)]
pub struct SchedulerArgs {
    /// The API server's URL [default: the kubeconfig's]. Repeat it for the
    /// several API servers of one cluster: the client uses one and moves
    /// to the next when it stops answering.
    #[arg(long = "server", value_name = "URL")]
    servers: Vec<String>,
    /// The kubeconfig to use [default: $KUBECONFIG, then ~/.kube/config].
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Schedule the pods that name this `spec.schedulerName`. The default
    /// scheduler competes for the `kube-scheduler` Lease with the scheduler
    /// in every `wasmkube server`; a scheduler with another name uses a Lease
    /// of its own name and runs beside them.
    #[arg(long, default_value = "default-scheduler")]
    scheduler_name: String,
    /// Where to serve `/metrics` (Prometheus text: scheduling attempts,
    /// their latency, pending pods) and `/healthz`, over plain HTTP.
    #[arg(long, default_value = "127.0.0.1:10259")]
    metrics_listen: std::net::SocketAddr,
}

/// The process's metrics (the scheduler's registry), for Prometheus.
async fn metrics() -> axum::response::Response {
    use axum::response::IntoResponse;
    use prometheus::Encoder;
    let encoder = prometheus::TextEncoder::new();
    let mut out = Vec::new();
    match encoder.encode(&prometheus::gather(), &mut out) {
        Ok(()) => (
            [(
                axum::http::header::CONTENT_TYPE,
                encoder.format_type().to_owned(),
            )],
            out,
        )
            .into_response(),
        Err(_) => axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

pub async fn run(args: SchedulerArgs) -> anyhow::Result<()> {
    let client = crate::kubeconfig::client(args.kubeconfig.as_deref(), &args.servers).await?;
    let listener = tokio::net::TcpListener::bind(args.metrics_listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot serve metrics on {}: {e}", args.metrics_listen))?;
    tracing::info!(address = %listener.local_addr()?, "serving /metrics");
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(metrics))
        .route("/healthz", axum::routing::get(|| async { "ok" }));
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the metrics endpoint stopped");
        }
    });
    let lease = if args.scheduler_name == "default-scheduler" {
        "kube-scheduler".to_owned()
    } else {
        args.scheduler_name.clone()
    };
    let elector = Arc::new(LeaderElector::new(
        client.clone(),
        "kube-system",
        &lease,
        &crate::server::identity(),
        ElectionConfig::default(),
    ));
    let config = wasmkube_scheduler::Config {
        scheduler_name: args.scheduler_name,
        ..Default::default()
    };
    tracing::info!(%lease, scheduler = %config.scheduler_name, "waiting for the scheduler lease");
    let work = {
        let elector = elector.clone();
        async move {
            elector
                .run(|| wasmkube_scheduler::run(client.clone(), config.clone()))
                .await
        }
    };
    tokio::select! {
        result = work => result?,
        signal = crate::server::shutdown_signal() => tracing::info!(signal, "shutting down"),
    }
    // Hand the Lease over at once, so another scheduler need not wait it out.
    let _ = tokio::time::timeout(Duration::from_secs(2), elector.release()).await;
    Ok(())
}
