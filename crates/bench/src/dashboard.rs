//! The dashboard as a reader meets it: Debian's Chromium, driven by
//! Playwright (`tests/dashboard/dashboard.mjs bench`), opens `/dashboard/`
//! through `kubectl proxy` on a `wasmkube server` child with its local
//! node. Figures: first contentful paint and first data drawn (the first
//! load, then reloads), and the time from a pod's create to its row on the
//! page, against the same pods printed by `kubectl get pods --watch`
//! running beside it (the peer, in the same run).

use crate::support::{ChildServer, free_port, wasmkube_binary};
use std::path::PathBuf;
use std::process::Command;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Pods created one after another while the page is open.
    #[arg(long, default_value = "30")]
    pods: usize,
    /// Page loads measured for first paint (the first cold, the rest reloads).
    #[arg(long, default_value = "5")]
    loads: usize,
    /// The wasmkube binary to measure (default: next to this one).
    #[arg(long)]
    binary: Option<PathBuf>,
}

const NODE: &str = "bench-dashboard";

pub async fn run(args: Args) -> anyhow::Result<()> {
    let binary = wasmkube_binary(args.binary.clone())?;
    let registry = format!("127.0.0.1:{}", free_port()?);
    let server = ChildServer::start_with_local_node(&binary, NODE, &registry).await?;
    let module = wasmkube_testkit::workload_path("sleeper", "wasm32-wasip1");
    let pushed = Command::new(&binary)
        .arg("push")
        .arg(&module)
        .arg("sleeper:v1")
        .arg("--registry")
        .arg(&registry)
        .output()?;
    anyhow::ensure!(
        pushed.status.success(),
        "push: {}",
        String::from_utf8_lossy(&pushed.stderr)
    );
    let script = wasmkube_testkit::repo_root().join("tests/dashboard/dashboard.mjs");
    let status = Command::new("node")
        .arg(&script)
        .arg("bench")
        .arg("--kubeconfig")
        .arg(server.kubeconfig())
        .args(["--image", &format!("{registry}/sleeper:v1")])
        .args(["--pods", &args.pods.to_string()])
        .args(["--loads", &args.loads.to_string()])
        .status()
        .map_err(|e| anyhow::anyhow!("node (for Playwright): {e}"))?;
    anyhow::ensure!(
        status.success(),
        "the dashboard benchmark failed ({status}); scripts/test.sh installs Chromium and Playwright"
    );
    Ok(())
}
