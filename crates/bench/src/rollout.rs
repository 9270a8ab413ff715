//! A Deployment rollout at scale: a `wasmkube server` child, simulated nodes
//! in this process that run their pods, and one Deployment created through
//! the API (the request `kubectl apply` sends); the figure is the time until
//! every replica is Ready.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ListParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;

use crate::schedule::start_nodes;
use crate::support::{ChildServer, wasmkube_binary};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Simulated nodes.
    #[arg(long, default_value = "1000")]
    nodes: usize,
    /// Replicas of the Deployment.
    #[arg(long, default_value = "10000")]
    replicas: i32,
    /// The wasmkube binary to measure (default: next to this one).
    #[arg(long)]
    binary: Option<PathBuf>,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let binary = wasmkube_binary(args.binary)?;
    let (server, _) = ChildServer::start(&binary).await?;
    let client = server.client()?;
    start_nodes(&client, args.nodes, 110, true).await?;
    let api: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let d: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "scale"},
        "spec": {"replicas": args.replicas, "selector": {"matchLabels": {"app": "scale"}},
            "template": {"metadata": {"labels": {"app": "scale"}},
                "spec": {"containers": [{"name": "c", "image": "scale:1",
                    "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}}]}}},
    }))?;
    let mut stream =
        std::pin::pin!(watcher(api.clone(), watcher::Config::default()).applied_objects());
    let started = Instant::now();
    api.create(&PostParams::default(), &d).await?;
    let mut last_report = Instant::now();
    loop {
        let d = tokio::time::timeout(Duration::from_secs(600), stream.try_next())
            .await
            .map_err(|_| anyhow::anyhow!("no progress for 10 minutes"))??
            .ok_or_else(|| anyhow::anyhow!("the watch ended"))?;
        let st = d.status.unwrap_or_default();
        let ready = st.ready_replicas.unwrap_or(0);
        if last_report.elapsed() > Duration::from_secs(2) {
            eprintln!(
                "  {:>6.1} s  {ready}/{} ready",
                started.elapsed().as_secs_f64(),
                args.replicas
            );
            last_report = Instant::now();
        }
        if ready == args.replicas && st.updated_replicas == Some(args.replicas) {
            break;
        }
    }
    let took = started.elapsed();
    println!(
        "deployment rollout: {} replicas on {} nodes",
        args.replicas, args.nodes
    );
    println!(
        "  create -> all Ready  {:.1} s  ({:.0} pods/s)",
        took.as_secs_f64(),
        f64::from(args.replicas) / took.as_secs_f64()
    );
    // Every write takes one store revision: writes per replica show what a
    // pod costs the API (create, binding, event, status, and the owners' status).
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let revision: f64 = namespaces
        .list_metadata(&ListParams::default().limit(1))
        .await?
        .metadata
        .resource_version
        .unwrap_or_default()
        .parse()?;
    println!(
        "  store writes         {revision:.0} ({:.2} per replica)",
        revision / f64::from(args.replicas)
    );
    println!("  server RSS           {:.0} MiB", server.rss_mib());
    Ok(())
}
