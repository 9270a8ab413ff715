//! HTTP function throughput and latency: the `http-hello` component as a
//! pod on `wasmkube server`'s local node (a fresh instance per request),
//! loaded by keep-alive clients; the peer, when installed, is `wasmtime
//! serve -S cli` on the same component in the same run (install it outside
//! CI: `cargo install wasmtime-cli --version 48.0.8 --locked`).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use kube::runtime::wait::await_condition;
use serde_json::json;

use crate::support::{ChildServer, free_port, ms, percentile, wasmkube_binary};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Concurrent keep-alive clients.
    #[arg(long, default_value = "32")]
    clients: usize,
    /// How long each side is loaded.
    #[arg(long, default_value = "10")]
    seconds: f64,
    /// The `wasmtime` CLI to measure as the peer [default: `wasmtime` on PATH].
    #[arg(long)]
    wasmtime: Option<PathBuf>,
    /// The wasmkube binary to measure (default: next to this one).
    #[arg(long)]
    binary: Option<PathBuf>,
}

/// Loads `url` for `seconds` with `clients` keep-alive clients; returns
/// requests per second and the sorted latencies.
async fn load(url: &str, clients: usize, seconds: f64) -> anyhow::Result<(f64, Vec<Duration>)> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(clients)
        .build()?;
    // Warm up: the first requests link and cache the component.
    for _ in 0..20 {
        http.get(url)
            .send()
            .await?
            .error_for_status()?
            .bytes()
            .await?;
    }
    let until = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let workers = (0..clients).map(|_| {
        let (http, url) = (http.clone(), url.to_owned());
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < until {
                let t = Instant::now();
                let ok = match http.get(&url).send().await {
                    Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                    Err(_) => false,
                };
                anyhow::ensure!(ok, "a request failed");
                latencies.push(t.elapsed());
            }
            Ok(latencies)
        })
    });
    let mut all = Vec::new();
    for w in futures::future::join_all(workers).await {
        all.extend(w??);
    }
    let rate = all.len() as f64 / started.elapsed().as_secs_f64();
    all.sort();
    Ok((rate, all))
}

fn report(label: &str, rate: f64, latencies: &[Duration]) {
    println!(
        "  {label:<34} {rate:>8.0} req/s  p50 {}  p99 {}",
        ms(percentile(latencies, 50.0)),
        ms(percentile(latencies, 99.0))
    );
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let binary = wasmkube_binary(args.binary)?;
    let component = wasmkube_testkit::workload_path("http_hello", "wasm32-wasip2");
    let registry = wasmkube_testkit::Registry::start();
    let image = format!("{}/http-hello:v1", registry.host());
    wasmkube_oci::push_wasm(std::fs::read(&component)?, &image, &Default::default()).await?;
    let (server, _) =
        ChildServer::start_with(&binary, &["--node-name", "bench-http", "--no-pod-network"])
            .await?;
    let client = server.client()?;
    let port = free_port()?;
    let pods: Api<Pod> = Api::namespaced(client, "default");
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "http-hello"},
        "spec": {"containers": [{"name": "web", "image": image, "ports": [{"containerPort": port}]}]},
    }))?;
    pods.create(&PostParams::default(), &pod).await?;
    tokio::time::timeout(
        Duration::from_secs(60),
        await_condition(pods, "http-hello", |p: Option<&Pod>| {
            p.and_then(|p| p.status.as_ref()?.phase.as_deref()) == Some("Running")
        }),
    )
    .await??;
    println!(
        "HTTP function (http-hello), {} keep-alive clients, {} s each",
        args.clients, args.seconds
    );
    let (rate, lat) = load(
        &format!("http://127.0.0.1:{port}/bench"),
        args.clients,
        args.seconds,
    )
    .await?;
    report("wasmkube pod (fresh instance/req)", rate, &lat);
    let wasmtime = args.wasmtime.unwrap_or_else(|| PathBuf::from("wasmtime"));
    let peer_port = free_port()?;
    let peer = Command::new(&wasmtime)
        .args([
            "serve",
            "-S",
            "cli",
            "--addr",
            &format!("127.0.0.1:{peer_port}"),
        ])
        .arg(&component)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let Ok(mut peer) = peer else {
        println!(
            "  peer: `{}` is not installed; no ratio (see docs/benchmarks.md)",
            wasmtime.display()
        );
        return Ok(());
    };
    let url = format!("http://127.0.0.1:{peer_port}/bench");
    let ready = Instant::now();
    while reqwest::get(&url).await.is_err() {
        anyhow::ensure!(
            ready.elapsed() < Duration::from_secs(30),
            "wasmtime serve did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (peer_rate, peer_lat) = load(&url, args.clients, args.seconds).await?;
    let _ = peer.kill();
    let _ = peer.wait();
    report("peer: wasmtime serve -S cli", peer_rate, &peer_lat);
    println!(
        "  ratio wasmkube/wasmtime          {:.2}x req/s, p99 {:.2}x",
        rate / peer_rate,
        percentile(&lat, 99.0).as_secs_f64() / percentile(&peer_lat, 99.0).as_secs_f64()
    );
    Ok(())
}
