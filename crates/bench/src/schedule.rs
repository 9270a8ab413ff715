//! Scheduler throughput through the real API: a `wasmkube server` child,
//! thousands of simulated nodes in this process, and pods created by
//! concurrent clients. Like kube-scheduler's scheduler_perf, the nodes do
//! not run the pods: the figure is binding.
//!
//! Two runs, each on a fresh server. *Backlog*: the server runs no
//! scheduler while the pods are created; then a `wasmkube scheduler`
//! process is started against it and binds them all (its start, Lease,
//! initial list of every pod and node, and every binding and `Scheduled`
//! event through the API): the scheduler's own throughput, as in
//! scheduler_perf, where the API server is not the bottleneck.
//! *Concurrent*: the server's own scheduler binds while the pods are still
//! being created, so creating and binding share the two cores; the
//! creation rate of the same run is its peer.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::{Api, ListParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;

use crate::support::{ChildServer, KillOnDrop, wasmkube_binary};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Simulated nodes.
    #[arg(long, default_value = "5000")]
    nodes: usize,
    /// Pods to create and schedule.
    #[arg(long, default_value = "50000")]
    pods: usize,
    /// Concurrent creating clients.
    #[arg(long, default_value = "64")]
    clients: usize,
    /// The wasmkube binary to measure (default: next to this one).
    #[arg(long)]
    binary: Option<PathBuf>,
    /// Which runs: `backlog`, `concurrent` or `both`.
    #[arg(long, default_value = "both", value_parser = ["backlog", "concurrent", "both"])]
    mode: String,
}

/// Registers `count` simulated nodes in this process and waits until the
/// API lists them all.
pub async fn start_nodes(
    client: &kube::Client,
    count: usize,
    pods_per_node: u32,
    run_pods: bool,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let config = wasmkube_sim::SimConfig {
        count,
        cpu: "64".into(),
        memory: "256Gi".into(),
        pods: pods_per_node,
        run_pods,
        ..Default::default()
    };
    let c = client.clone();
    tokio::spawn(async move {
        if let Err(e) = wasmkube_sim::run(c, config).await {
            eprintln!("simulated nodes stopped: {e}");
        }
    });
    let nodes: Api<Node> = Api::all(client.clone());
    loop {
        let n = nodes
            .list_metadata(&ListParams::default())
            .await?
            .items
            .len();
        if n >= count {
            return Ok(started.elapsed());
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "only {n} of {count} nodes registered"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Counts pods as the watch shows them bound; `done` fires at `want`.
struct Bindings {
    first: Arc<Mutex<Option<Instant>>>,
    done: tokio::sync::oneshot::Receiver<Instant>,
}

impl Bindings {
    fn watch(pods: Api<Pod>, want: usize) -> Self {
        let first: Arc<Mutex<Option<Instant>>> = Arc::default();
        let (done_tx, done) = tokio::sync::oneshot::channel();
        let seen_first = first.clone();
        tokio::spawn(async move {
            let mut stream =
                std::pin::pin!(watcher(pods, watcher::Config::default()).applied_objects());
            let mut bound = HashSet::new();
            let mut done_tx = Some(done_tx);
            while let Ok(Some(p)) = stream.try_next().await {
                if p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some() {
                    if bound.insert(p.metadata.name.unwrap_or_default()) && bound.len() == 1 {
                        *seen_first.lock().expect("first lock") = Some(Instant::now());
                    }
                    if bound.len() >= want
                        && let Some(tx) = done_tx.take()
                    {
                        let _ = tx.send(Instant::now());
                    }
                }
            }
        });
        Self { first, done }
    }

    /// When the last pod was bound, and when the first was.
    async fn all(self) -> anyhow::Result<(Instant, Instant)> {
        let last = tokio::time::timeout(Duration::from_secs(1800), self.done)
            .await
            .map_err(|_| anyhow::anyhow!("not all pods were bound within 30 min"))??;
        let first = self.first.lock().expect("first lock").unwrap_or(last);
        Ok((first, last))
    }
}

/// A server with `nodes` simulated nodes and an empty `bench` namespace.
async fn cluster(
    binary: &std::path::Path,
    flags: &[&str],
    nodes: usize,
) -> anyhow::Result<(ChildServer, Api<Pod>)> {
    let (server, _) = ChildServer::start_with(binary, flags).await?;
    let client = server.client()?;
    let registered = start_nodes(&client, nodes, 110, false).await?;
    println!(
        "  {nodes} simulated nodes registered in {:.1} s; server RSS {:.0} MiB",
        registered.as_secs_f64(),
        server.rss_mib()
    );
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": "bench"}}))?;
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await?;
    Ok((server, Api::namespaced(client, "bench")))
}

/// Creates `count` pods with `clients` concurrent clients; returns how long it took.
async fn create_pods(pods: &Api<Pod>, count: usize, clients: usize) -> anyhow::Result<Duration> {
    let template = json!({"spec": {"containers": [{"name": "c", "image": "bench:1",
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}}]}});
    let started = Instant::now();
    let results: Vec<Result<Pod, kube::Error>> = futures::stream::iter(0..count)
        .map(|i| {
            let pods = pods.clone();
            let mut body = template.clone();
            body["metadata"] = json!({"name": format!("pod-{i}")});
            async move {
                let pod: Pod = serde_json::from_value(body).expect("a pod");
                pods.create(&PostParams::default(), &pod).await
            }
        })
        .buffer_unordered(clients)
        .collect()
        .await;
    let took = started.elapsed();
    if let Some(e) = results.into_iter().find_map(Result::err) {
        anyhow::bail!("create failed: {e}");
    }
    Ok(took)
}

fn rate(count: usize, d: Duration) -> f64 {
    count as f64 / d.as_secs_f64()
}

/// Pods created with no scheduler running, then bound by a `wasmkube
/// scheduler` process; returns pods bound per second from its start.
async fn backlog(binary: &std::path::Path, args: &Args) -> anyhow::Result<f64> {
    println!(
        "backlog: {} pods created first, then one scheduler binds them",
        args.pods
    );
    let (server, pods) =
        cluster(binary, &["--no-local-node", "--no-scheduler"], args.nodes).await?;
    let created = create_pods(&pods, args.pods, args.clients).await?;
    println!(
        "  created          {:>6.1} s  {:>6.0} pods/s (no scheduler running)",
        created.as_secs_f64(),
        rate(args.pods, created)
    );
    let bindings = Bindings::watch(pods, args.pods);
    let started = Instant::now();
    let scheduler = KillOnDrop(
        std::process::Command::new(binary)
            .args(["scheduler", "--server", &server.url])
            .env("RUST_LOG", "warn")
            .stderr(std::process::Stdio::null())
            .spawn()?,
    );
    let (first, last) = bindings.all().await?;
    let total = last - started;
    println!(
        "  first binding    {:>6.2} s after the scheduler's exec (Lease, initial list of pods and nodes)",
        (first - started).as_secs_f64()
    );
    println!(
        "  all bound        {:>6.1} s  {:>6.0} pods/s from exec ({:.0} pods/s first to last binding)",
        total.as_secs_f64(),
        rate(args.pods, total),
        rate(args.pods, last - first)
    );
    println!(
        "  RSS              server {:.0} MiB, scheduler {:.0} MiB",
        server.rss_mib(),
        scheduler.rss_mib()
    );
    Ok(rate(args.pods, total))
}

/// The server's own scheduler binds while the pods are created; returns
/// pods bound per second from the first create.
async fn concurrent(binary: &std::path::Path, args: &Args) -> anyhow::Result<f64> {
    println!(
        "concurrent: the server's scheduler binds while {} clients create {} pods",
        args.clients, args.pods
    );
    let (server, pods) = cluster(binary, &["--no-local-node"], args.nodes).await?;
    let bindings = Bindings::watch(pods.clone(), args.pods);
    // Let the watch start before the first create.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    let created = create_pods(&pods, args.pods, args.clients).await?;
    let (_, last) = bindings.all().await?;
    let total = last - started;
    let (create_rate, bind_rate) = (rate(args.pods, created), rate(args.pods, total));
    println!(
        "  created          {:>6.1} s  {:>6.0} pods/s (peer: the API accepting pods)",
        created.as_secs_f64(),
        create_rate
    );
    println!(
        "  all bound        {:>6.1} s  {:>6.0} pods/s  ({:.2}x the creation rate)",
        total.as_secs_f64(),
        bind_rate,
        bind_rate / create_rate
    );
    println!("  server RSS       {:>6.0} MiB", server.rss_mib());
    Ok(bind_rate)
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let binary = wasmkube_binary(args.binary.clone())?;
    println!(
        "scheduler throughput: {} pods on {} simulated nodes, {} creating clients",
        args.pods, args.nodes, args.clients
    );
    let backlog_rate = match args.mode.as_str() {
        "backlog" | "both" => Some(backlog(&binary, &args).await?),
        _ => None,
    };
    let concurrent_rate = match args.mode.as_str() {
        "concurrent" | "both" => Some(concurrent(&binary, &args).await?),
        _ => None,
    };
    if let (Some(b), Some(c)) = (backlog_rate, concurrent_rate) {
        println!("  binding alone / binding while creating: {:.2}x", b / c);
    }
    Ok(())
}
