//! Density: thousands of idle Wasm pods running on one node agent. A
//! `wasmkube server` child without a local node and a `wasmkube agent` child
//! (so the agent's memory is its own), a real registry on loopback holding
//! the `sleeper` workload, and pods created through the API. Reports the
//! agent's RSS per pod against its own RSS with one pod, what the process
//! holds (threads, files, memory mappings against `vm.max_map_count`), and,
//! as the peer in the same run, the startup latency of a few more pods on the
//! full node against the same on the empty node.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;

use crate::support::{ChildServer, ms, percentile, rss_kib, wasmkube_binary};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Idle pods to run on the node.
    #[arg(long, default_value = "10000")]
    pods: usize,
    /// Creates in flight at once.
    #[arg(long, default_value = "32")]
    concurrency: usize,
    /// Pods whose startup latency is measured on the empty and the full node.
    #[arg(long, default_value = "20")]
    probes: usize,
    /// Then restart the whole control plane: SIGKILL the server, keep it
    /// down this many seconds, start it again on the same data dir.
    #[arg(long, default_value = "10")]
    outage: f64,
    /// After the restart, watch the pods this long (seconds) for any that
    /// restarts or is evicted (default: past the node monitor's 40 s grace).
    #[arg(long, default_value = "45")]
    settle: f64,
    /// Skip the control-plane restart.
    #[arg(long)]
    no_restart: bool,
    /// The wasmkube binary to measure (default: next to this one).
    #[arg(long)]
    binary: Option<PathBuf>,
}

const NODE: &str = "dense-0";

/// The agent child process; killed on drop.
struct AgentChild {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for AgentChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the agent process holds, read from /proc.
struct Footprint {
    rss_kib: u64,
    threads: usize,
    files: usize,
    maps: usize,
}

fn footprint(pid: u32) -> anyhow::Result<Footprint> {
    let count = |path: String| std::fs::read_dir(path).map(|d| d.count());
    Ok(Footprint {
        rss_kib: rss_kib(pid)?,
        threads: count(format!("/proc/{pid}/task"))?,
        files: count(format!("/proc/{pid}/fd"))?,
        maps: std::fs::read_to_string(format!("/proc/{pid}/maps"))?
            .lines()
            .count(),
    })
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let binary = wasmkube_binary(args.binary.clone())?;
    let registry = wasmkube_testkit::Registry::start();
    let image = format!("{}/sleeper:v1", registry.host());
    let module = std::fs::read(wasmkube_testkit::workload_path("sleeper", "wasm32-wasip1"))?;
    wasmkube_oci::push_wasm(module, &image, &Default::default()).await?;
    let (mut server, _) = ChildServer::start(&binary).await?;
    let client = server.client()?;

    let dir = tempfile::tempdir()?;
    let max_pods = (args.pods + 2 * args.probes + 10).to_string();
    let child = Command::new(&binary)
        .args([
            "agent",
            "--server",
            &server.url,
            "--name",
            NODE,
            "--port",
            "0",
        ])
        .args([
            "--max-pods",
            &max_pods,
            "--no-pod-network",
            "--no-service-proxy",
            "--no-gateway",
            "--data-dir",
        ])
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .stderr(Stdio::null())
        .spawn()?;
    let agent = AgentChild { child, _dir: dir };
    wait_node_ready(&client).await?;

    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let running = Arc::new(Mutex::new(HashSet::<String>::new()));
    let notify = Arc::new(tokio::sync::Notify::new());
    {
        let (running, notify, pods) = (running.clone(), notify.clone(), pods.clone());
        let mut stream = watcher(pods, watcher::Config::default())
            .applied_objects()
            .boxed();
        tokio::spawn(async move {
            while let Ok(Some(p)) = stream.try_next().await {
                let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
                if phase == Some("Running")
                    && let Some(name) = p.metadata.name
                {
                    running.lock().unwrap().insert(name);
                    notify.notify_waiters();
                }
            }
        });
    }
    let pod = |name: &str| -> anyhow::Result<Pod> {
        Ok(serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"app": "idle"}},
            "spec": {
                "nodeSelector": {"kubernetes.io/hostname": NODE},
                "containers": [{"name": "c", "image": image, "imagePullPolicy": "IfNotPresent"}],
            },
        }))?)
    };
    let wait = |names: Vec<String>, limit: Duration| {
        let (running, notify) = (running.clone(), notify.clone());
        async move {
            let deadline = Instant::now() + limit;
            loop {
                let woken = notify.notified();
                let missing = {
                    let running = running.lock().unwrap();
                    names.iter().filter(|n| !running.contains(*n)).count()
                };
                if missing == 0 {
                    return Ok(());
                }
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "{missing} of {} pods not Running within {limit:?}",
                    names.len()
                );
                let _ = tokio::time::timeout_at(deadline.into(), woken).await;
            }
        }
    };
    // Startup latency of a few pods, one at a time.
    let probe = |prefix: &'static str| {
        let (pods, wait) = (pods.clone(), &wait);
        let pod = &pod;
        async move {
            let mut d = Vec::new();
            for i in 0..args.probes {
                let name = format!("{prefix}-{i}");
                let sent = Instant::now();
                pods.create(&PostParams::default(), &pod(&name)?).await?;
                wait(vec![name], Duration::from_secs(60)).await?;
                d.push(sent.elapsed());
            }
            d.sort();
            anyhow::Ok(d)
        }
    };

    // One pod first: the image is pulled and compiled once.
    pods.create(&PostParams::default(), &pod("warm")?).await?;
    wait(vec!["warm".into()], Duration::from_secs(120)).await?;
    let empty = probe("empty").await?;
    let pid = agent.child.id();
    let base = footprint(pid)?;

    let started = Instant::now();
    let names: Vec<String> = (0..args.pods).map(|i| format!("idle-{i}")).collect();
    let mut creates = futures::stream::iter(names.iter().cloned())
        .map(|name| {
            let pods = pods.clone();
            let p = pod(&name);
            async move { anyhow::Ok(pods.create(&PostParams::default(), &p?).await?) }
        })
        .buffer_unordered(args.concurrency.max(1));
    let mut created = 0;
    while let Some(r) = creates.next().await {
        r?;
        created += 1;
        if created % 1000 == 0 {
            let up = running.lock().unwrap().len();
            eprintln!(
                "  {created} created, {up} running, agent RSS {:.0} MiB",
                rss_kib(pid)? as f64 / 1024.0
            );
        }
    }
    drop(creates);
    wait(names, Duration::from_secs(600)).await?;
    let all_running = started.elapsed();
    let full = footprint(pid)?;
    let loaded = probe("full").await?;
    let nodes: Api<Node> = Api::all(client.clone());
    let ready = node_ready(&nodes.get(NODE).await?);

    let per_pod = full.rss_kib.saturating_sub(base.rss_kib) as f64 / args.pods as f64;
    let max_map_count = std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "?".into());
    println!(
        "density: {} idle Wasm pods (sleeper, wasip1) on one agent",
        args.pods
    );
    println!(
        "  all Running after          {:.1} s ({:.0} pods/s)",
        all_running.as_secs_f64(),
        args.pods as f64 / all_running.as_secs_f64()
    );
    println!(
        "  agent RSS                  {:.0} MiB with 1 pod, {:.0} MiB with {}",
        base.rss_kib as f64 / 1024.0,
        full.rss_kib as f64 / 1024.0,
        args.pods + 1
    );
    println!("  agent RSS per pod          {per_pod:.1} KiB");
    println!(
        "  agent threads / files      {} / {} (with 1 pod: {} / {})",
        full.threads, full.files, base.threads, base.files
    );
    println!(
        "  agent memory mappings      {} of vm.max_map_count {max_map_count} (with 1 pod: {})",
        full.maps, base.maps
    );
    println!("  server RSS                 {:.0} MiB", server.rss_mib());
    println!(
        "  node Ready at the end      {}",
        if ready { "yes" } else { "NO" }
    );
    println!(
        "  startup of {} more pods    empty node p50 {} max {}; full node p50 {} max {} ({:.2}x p50)",
        args.probes,
        ms(percentile(&empty, 50.0)),
        ms(percentile(&empty, 100.0)),
        ms(percentile(&loaded, 50.0)),
        ms(percentile(&loaded, 100.0)),
        percentile(&loaded, 50.0).as_secs_f64() / percentile(&empty, 50.0).as_secs_f64().max(1e-9)
    );
    if !args.no_restart {
        restart_control_plane(&mut server, pid, &args).await?;
    }
    Ok(())
}

/// What identifies one run of a pod's container: a restart, a recreated
/// pod or a replaced container changes it.
#[derive(Debug, PartialEq, Eq)]
struct Run {
    uid: String,
    container: String,
    started: String,
    restarts: i32,
    phase: String,
}

async fn runs(client: &kube::Client) -> anyhow::Result<std::collections::BTreeMap<String, Run>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let mut out = std::collections::BTreeMap::new();
    for p in pods.list(&Default::default()).await? {
        let status = p.status.unwrap_or_default();
        let c = status
            .container_statuses
            .unwrap_or_default()
            .into_iter()
            .next()
            .unwrap_or_default();
        out.insert(
            p.metadata.name.unwrap_or_default(),
            Run {
                uid: p.metadata.uid.unwrap_or_default(),
                container: c.container_id.unwrap_or_default(),
                started: c
                    .state
                    .and_then(|s| s.running)
                    .and_then(|r| r.started_at)
                    .map(|t| t.0.to_string())
                    .unwrap_or_default(),
                restarts: c.restart_count,
                phase: status.phase.unwrap_or_default(),
            },
        );
    }
    Ok(out)
}

/// The pods' status writes counted by the server since it started.
async fn status_writes(url: &str) -> anyhow::Result<u64> {
    let page = reqwest::get(format!("{url}/metrics")).await?.text().await?;
    Ok(page
        .lines()
        .filter(|l| {
            l.starts_with("apiserver_request_total{")
                && l.contains("resource=\"pods\"")
                && l.contains("subresource=\"status\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64)
}

/// The whole control plane (API server, store, scheduler, controllers: one
/// process here) is SIGKILLed and started again on its data dir while the
/// agent runs every pod. Nothing on the node may restart: each pod keeps
/// its uid, container id, start time and a restart count of 0, through the
/// outage and through a settle period past the node monitor's grace.
async fn restart_control_plane(
    server: &mut ChildServer,
    agent: u32,
    args: &Args,
) -> anyhow::Result<()> {
    let before = runs(&server.client()?).await?;
    let agent_before = rss_kib(agent)?;
    server.kill()?;
    let killed = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(args.outage)).await;
    anyhow::ensure!(
        std::path::Path::new(&format!("/proc/{agent}")).exists(),
        "the agent died while the control plane was down"
    );
    let ready = server.start_again().await?;
    let restarted = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64;
    let client = server.client()?;
    // The agent is back once its lease is renewed by the new server.
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), "kube-node-lease");
    let mut stream = watcher(
        leases,
        watcher::Config::default().fields(&format!("metadata.name={NODE}")),
    )
    .applied_objects()
    .boxed();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let lease = tokio::time::timeout_at(deadline.into(), stream.try_next())
            .await??
            .ok_or_else(|| anyhow::anyhow!("lease watch ended"))?;
        let renewed = lease
            .spec
            .and_then(|s| s.renew_time)
            .map(|t| t.0.as_millisecond());
        if renewed.is_some_and(|t| t > restarted) {
            break;
        }
    }
    drop(stream);
    let back = killed.elapsed();
    tokio::time::sleep(Duration::from_secs_f64(args.settle)).await;
    let after = runs(&client).await?;
    let writes = status_writes(&server.url).await?;
    let nodes: Api<Node> = Api::all(client.clone());
    let ready_after = node_ready(&nodes.get(NODE).await?);
    let changed: Vec<&String> = before
        .iter()
        .filter(|(name, run)| after.get(*name) != Some(run))
        .map(|(name, _)| name)
        .collect();
    let restarts: i32 = after.values().map(|r| r.restarts).sum();
    println!(
        "control plane restart: SIGKILL, {:.0} s down, {} pods on the node",
        args.outage,
        before.len()
    );
    println!(
        "  server ready again after   {:.2} s (exec to /readyz, {} pods in its store)",
        ready.as_secs_f64(),
        after.len()
    );
    println!(
        "  agent's lease renewed      {:.2} s after the kill",
        back.as_secs_f64()
    );
    println!(
        "  pods changed               {} of {} (uid, container id, start time, phase); restarts {restarts}",
        changed.len(),
        before.len()
    );
    println!(
        "  pod status writes          {writes} in the {:.0} s after the restart",
        args.settle + (back.as_secs_f64() - args.outage).max(0.0)
    );
    println!(
        "  agent RSS                  {:.0} MiB before, {:.0} MiB after",
        agent_before as f64 / 1024.0,
        rss_kib(agent)? as f64 / 1024.0
    );
    println!(
        "  node Ready after settle    {}",
        if ready_after { "yes" } else { "NO" }
    );
    anyhow::ensure!(
        changed.is_empty(),
        "pods changed across the restart: {:?}",
        &changed[..changed.len().min(10)]
    );
    Ok(())
}

fn node_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

async fn wait_node_ready(client: &kube::Client) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut stream = watcher(
        nodes,
        watcher::Config::default().fields(&format!("metadata.name={NODE}")),
    )
    .applied_objects()
    .boxed();
    while let Some(node) = tokio::time::timeout_at(deadline.into(), stream.try_next()).await?? {
        if node_ready(&node) {
            return Ok(());
        }
    }
    anyhow::bail!("node {NODE} never became Ready")
}
