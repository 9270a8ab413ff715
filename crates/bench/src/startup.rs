//! `wasmkube server` from exec to `/readyz` OK, and its idle RSS.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{ms, percentile};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The wasmkube binary to measure (default: next to this one).
    #[arg(long)]
    binary: Option<PathBuf>,
    /// Starts measured.
    #[arg(long, default_value = "10")]
    runs: usize,
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .ok_or_else(|| anyhow::anyhow!("no VmRSS"))?;
    Ok(line.split_whitespace().nth(1).unwrap_or("0").parse()?)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let binary = match args.binary {
        Some(b) => b,
        None => std::env::current_exe()?.with_file_name("wasmkube"),
    };
    anyhow::ensure!(
        binary.exists(),
        "{} not found: build it first (cargo build --release -p wasmkube)",
        binary.display()
    );
    let http = reqwest::Client::new();
    let mut times = Vec::new();
    let mut rss = Vec::new();
    for _ in 0..args.runs {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let started = Instant::now();
        let mut child = Command::new(&binary)
            .args([
                "server",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--data-dir",
            ])
            .arg(dir.path())
            .env("RUST_LOG", "warn")
            .stderr(Stdio::null())
            .spawn()?;
        let url = format!("http://127.0.0.1:{port}/readyz");
        loop {
            if let Ok(r) = http.get(&url).send().await
                && r.status().is_success()
            {
                break;
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(30),
                "server not ready in 30 s"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        times.push(started.elapsed());
        tokio::time::sleep(Duration::from_millis(500)).await;
        rss.push(rss_kib(child.id())?);
        child.kill()?;
        child.wait()?;
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
