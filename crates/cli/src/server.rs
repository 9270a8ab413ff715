//! `wasmkube server`: the whole cluster in one process (today the API server,
//! the scheduler and the workload controllers; a node agent is next).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use fs4::fs_std::FileExt;

use crate::kubeconfig;

#[derive(clap::Args, Debug)]
pub struct ServerArgs {
    /// Where the cluster keeps its state (the embedded store). Only one
    /// server may use a data directory at a time.
    #[arg(long, env = "WASMKUBE_DATA_DIR", default_value_os_t = default_data_dir())]
    data_dir: PathBuf,

    /// Address the Kubernetes API listens on (port 0 picks a free port).
    #[arg(long, env = "WASMKUBE_LISTEN", default_value = "127.0.0.1:6443")]
    listen: SocketAddr,

    /// Where to write the kubeconfig for kubectl [default: DATA_DIR/kubeconfig].
    #[arg(long)]
    write_kubeconfig: Option<PathBuf>,

    /// How often store history older than the previous interval is compacted;
    /// watches from before it get 410 Gone and relist, as on Kubernetes.
    #[arg(long, default_value = "300", value_name = "SECONDS")]
    compaction_interval: u64,
}

fn default_data_dir() -> PathBuf {
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("wasmkube")
}

pub async fn run(args: ServerArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create data directory {}", args.data_dir.display()))?;
    let lock_path = args.data_dir.join("wasmkube.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("cannot open {}", lock_path.display()))?;
    if !lock.try_lock_exclusive().unwrap_or(false) {
        bail!(
            "another wasmkube server is already using the data directory {}; stop it or pass a different --data-dir",
            args.data_dir.display()
        );
    }
    let store = wasmkube_store::open_sled(&args.data_dir.join("store"))
        .with_context(|| format!("cannot open the store in {}", args.data_dir.display()))?;
    let api = wasmkube_apiserver::ApiServer::start(store, Default::default())
        .await
        .context("cannot start the API server")?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let url = format!("http://{addr}");
    let kubeconfig_path = args
        .write_kubeconfig
        .unwrap_or_else(|| args.data_dir.join("kubeconfig"));
    kubeconfig::write(&kubeconfig_path, &url)
        .with_context(|| format!("cannot write kubeconfig {}", kubeconfig_path.display()))?;
    tracing::info!(
        %url,
        data_dir = %args.data_dir.display(),
        revision = api.current_revision(),
        startup_ms = started.elapsed().as_millis() as u64,
        "wasmkube server ready"
    );
    eprintln!(
        "wasmkube is ready at {url}\n  export KUBECONFIG={}",
        kubeconfig_path.display()
    );

    tokio::spawn(compact_periodically(
        api.clone(),
        Duration::from_secs(args.compaction_interval.max(1)),
    ));
    // The control plane's own components are API clients like any other.
    let client = kube::Client::try_from(kube::Config::new(url.parse()?))?;
    let controllers_client = client.clone();
    tokio::spawn(async move {
        if let Err(e) = wasmkube_scheduler::run(client, Default::default()).await {
            tracing::error!(error = %e, "the scheduler stopped");
        }
    });
    tokio::spawn(async move {
        if let Err(e) = wasmkube_controllers::run_all(controllers_client).await {
            tracing::error!(error = %e, "the controllers stopped");
        }
    });
    let server = api.serve(listener);
    tokio::select! {
        result = server => result.context("the API server stopped")?,
        signal = shutdown_signal() => tracing::info!(signal, "shutting down"),
    }
    // Every acknowledged write is already durable; dropping the store ends its writer.
    drop(api);
    drop(lock);
    Ok(())
}

/// Compacts to the revision seen one interval ago, like kube-apiserver.
async fn compact_periodically(api: std::sync::Arc<wasmkube_apiserver::ApiServer>, every: Duration) {
    let mut previous = api.current_revision();
    loop {
        tokio::time::sleep(every).await;
        if previous > 0
            && let Err(e) = api.compact(previous).await
        {
            tracing::warn!(error = %e, revision = previous, "compaction failed");
        }
        previous = api.current_revision();
    }
}

async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}
