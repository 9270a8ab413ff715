//! Shared benchmark plumbing: an API server on loopback, percentiles.

use std::sync::Arc;
use std::time::Duration;

use wasmkube_apiserver::{ApiServer, Config};

/// An API server on a durable sled store in a temp dir, served on loopback.
pub struct Server {
    pub base: String,
    pub api: Arc<ApiServer>,
    _dir: tempfile::TempDir,
}

pub async fn start_server() -> anyhow::Result<Server> {
    let dir = tempfile::tempdir()?;
    let store = wasmkube_store::open_sled(dir.path())?;
    let api = ApiServer::start(store, Config::default()).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let serving = api.clone();
    tokio::spawn(async move { serving.serve(listener).await });
    Ok(Server {
        base,
        api,
        _dir: dir,
    })
}

/// The `p`th percentile (0..=100) of sorted durations.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

pub fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}
