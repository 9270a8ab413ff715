//! Scheduler throughput through the real API: a `wasmkube server` child
//! (API server, scheduler, controllers), thousands of simulated nodes in this
//! process, and pods created by concurrent clients. Like kube-scheduler's
//! scheduler_perf, the nodes do not run the pods: the figure is binding.
//! The peer is the creation rate itself, measured in the same run: the
//! scheduler cannot bind faster than pods arrive.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::{Api, ListParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;

use crate::support::{ChildServer, wasmkube_binary};

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

pub async fn run(args: Args) -> anyhow::Result<()> {
    let binary = wasmkube_binary(args.binary)?;
    let (server, _) = ChildServer::start(&binary).await?;
    let client = server.client()?;
    let registered = start_nodes(&client, args.nodes, 110, false).await?;
    println!(
        "{} simulated nodes registered in {:.1} s; server RSS {:.0} MiB",
        args.nodes,
        registered.as_secs_f64(),
        server.rss_mib()
    );
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": "bench"}}))?;
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "bench");

    // Count bindings as the watch shows them.
    let bound: Arc<Mutex<(HashSet<String>, Option<Instant>)>> = Arc::default();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    {
        let (bound, pods, want) = (bound.clone(), pods.clone(), args.pods);
        tokio::spawn(async move {
            let mut stream =
                std::pin::pin!(watcher(pods, watcher::Config::default()).applied_objects());
            let mut done_tx = Some(done_tx);
            while let Ok(Some(p)) = stream.try_next().await {
                if p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some() {
                    let mut b = bound.lock().expect("bound lock");
                    if b.0.insert(p.metadata.name.unwrap_or_default()) && b.1.is_none() {
                        b.1 = Some(Instant::now());
                    }
                    if b.0.len() >= want
                        && let Some(tx) = done_tx.take()
                    {
                        let _ = tx.send(Instant::now());
                    }
                }
            }
        });
    }
    // Let the watch start before the first create.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let template = json!({"spec": {"containers": [{"name": "c", "image": "bench:1",
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}}]}});
    let started = Instant::now();
    let results: Vec<Result<Pod, kube::Error>> = futures::stream::iter(0..args.pods)
        .map(|i| {
            let pods = pods.clone();
            let mut body = template.clone();
            body["metadata"] = json!({"name": format!("pod-{i}")});
            async move {
                let pod: Pod = serde_json::from_value(body).expect("a pod");
                pods.create(&PostParams::default(), &pod).await
            }
        })
        .buffer_unordered(args.clients)
        .collect()
        .await;
    let created = started.elapsed();
    if let Some(e) = results.into_iter().find_map(Result::err) {
        anyhow::bail!("create failed: {e}");
    }
    let all_bound = tokio::time::timeout(Duration::from_secs(1800), done_rx)
        .await
        .map_err(|_| anyhow::anyhow!("not all pods were bound within 30 min"))??;
    let total = all_bound - started;
    let create_rate = args.pods as f64 / created.as_secs_f64();
    let bind_rate = args.pods as f64 / total.as_secs_f64();
    println!(
        "scheduler throughput: {} pods on {} nodes, {} creating clients",
        args.pods, args.nodes, args.clients
    );
    println!(
        "  created      {:>8.1} s  {:>8.0} pods/s (peer: the API accepting pods)",
        created.as_secs_f64(),
        create_rate
    );
    println!(
        "  all bound    {:>8.1} s  {:>8.0} pods/s  ({:.2}x the creation rate)",
        total.as_secs_f64(),
        bind_rate,
        bind_rate / create_rate
    );
    println!("  server RSS   {:>8.0} MiB", server.rss_mib());
    Ok(())
}
