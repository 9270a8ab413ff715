//! `wasmkube server` from exec to `/readyz` OK, and its idle RSS.

use std::path::PathBuf;
use std::time::Duration;

use crate::support::{ChildServer, ms, percentile, rss_kib, wasmkube_binary};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The wasmkube binary to measure (default: next to this one).
    #[arg(long)]
    binary: Option<PathBuf>,
    /// Starts measured.
    #[arg(long, default_value = "10")]
    runs: usize,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let binary = wasmkube_binary(args.binary)?;
    let mut times = Vec::new();
    let mut rss = Vec::new();
    for _ in 0..args.runs {
        let (server, ready) = ChildServer::start_with(
            &binary,
            &["--no-pod-network", "--no-service-proxy", "--no-gateway"],
        )
        .await?;
        times.push(ready);
        tokio::time::sleep(Duration::from_millis(500)).await;
        rss.push(rss_kib(server.child.id())?);
    }
    times.sort();
    rss.sort_unstable();
    println!("wasmkube server startup over {} runs", args.runs);
    println!(
        "  exec -> /readyz OK  p50 {}  max {}",
        ms(percentile(&times, 50.0)),
        ms(*times.last().unwrap_or(&Duration::ZERO))
    );
    println!(
        "  idle RSS            median {:.1} MiB",
        rss[rss.len() / 2] as f64 / 1024.0
    );
    Ok(())
}
