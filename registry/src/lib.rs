//! The built-in OCI registry: the OCI Distribution Specification v1.1
//! (pull, push with monolithic, chunked and resumable uploads, cross-
//! repository mounts, tag listing, the catalog, deletion and the referrers
//! API) over content-addressed storage in one folder, with garbage
//! collection of what no manifest references.
//!
//! `wasmkube server` serves it on `--registry-listen` (loopback port 5000 by
//! default), so a laptop has a registry to push to with nothing else
//! started. Who may pull, push and delete is a [`Gate`]'s to say: the
//! server passes the cluster's authentication and RBAC.

mod auth;
mod digest;
mod error;
mod http;
mod names;
mod storage;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderValue;
use axum::routing::{any, get};

pub use auth::{Action, Gate, Refusal};
pub use digest::{Algorithm, Digest, DigestError};
pub use error::Error;
pub use storage::{GcPolicy, GcReport, Storage};

/// The registry: its storage and the HTTP API over it.
#[derive(Clone)]
pub struct Registry {
    storage: Arc<Storage>,
    gate: Option<Arc<dyn Gate>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("storage", &self.storage)
            .field("gated", &self.gate.is_some())
            .finish()
    }
}

impl Registry {
    /// Opens (or creates) the registry's storage in `dir`. Uploads in
    /// progress survive a restart and resume where they were.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        Ok(Self {
            storage: Arc::new(Storage::open(dir)?),
            gate: None,
        })
    }

    /// Decides every request with `gate` (without one, anyone who reaches
    /// the registry may push and pull).
    pub fn with_gate(mut self, gate: Arc<dyn Gate>) -> Self {
        self.gate = Some(gate);
        self
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The distribution API's routes.
    pub fn router(&self) -> axum::Router {
        let shared = Arc::new(http::Shared::new(self.storage.clone(), self.gate.clone()));
        axum::Router::new()
            .route("/v2/", get(http::version))
            .route("/v2", get(http::version))
            .route("/v2/{*path}", any(http::dispatch))
            .with_state(shared)
            .layer(axum::middleware::map_response(
                |mut response: axum::response::Response| async move {
                    response.headers_mut().insert(
                        "Docker-Distribution-API-Version",
                        HeaderValue::from_static("registry/2.0"),
                    );
                    response
                },
            ))
    }

    /// Collects garbage every `interval`, forever (for a server that serves
    /// [`Registry::router`] itself).
    pub async fn collect_garbage_every(self, interval: Duration, policy: GcPolicy) {
        loop {
            tokio::time::sleep(interval).await;
            let storage = self.storage.clone();
            match tokio::task::spawn_blocking(move || storage.collect_garbage(policy)).await {
                Ok(Ok(report)) if report.blobs_removed + report.uploads_removed > 0 => {
                    tracing::info!(
                        blobs = report.blobs_removed,
                        bytes = report.bytes_freed,
                        uploads = report.uploads_removed,
                        "registry garbage collected"
                    );
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "registry garbage collection failed"),
                Err(e) => tracing::warn!(error = %e, "registry garbage collection panicked"),
            }
        }
    }

    /// Serves the API on `listener` until the task is dropped, collecting
    /// garbage every `gc_interval`.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        gc_interval: Duration,
        policy: GcPolicy,
    ) -> std::io::Result<()> {
        let gc = tokio::spawn(self.clone().collect_garbage_every(gc_interval, policy));
        // Small responses (configs, manifests, the end of a streamed blob)
        // must not wait for the peer's delayed ACK behind Nagle's algorithm.
        use axum::serve::ListenerExt;
        let listener = listener.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY");
            }
        });
        let result = axum::serve(listener, self.router()).await;
        gc.abort();
        result
    }
}
