//! Pod startup latency: a `wasmkube server` child with its local node, a
//! real registry on loopback holding the `sleeper` workload, and pods
//! created through the API one batch at a time. Each pod's figure is the
//! time from sending its create to seeing it Running on a watch: the whole
//! path (admission, scheduling, binding, the agent's watch, the cached
//! module's instantiation, the status write). The peer, in the same run, is
//! the same pods on a simulated node, which reports Running without running
//! anything: the difference is what running Wasm costs.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use serde_json::json;

use crate::support::{ChildServer, RunningPods, ms, percentile, wasmkube_binary};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Pods per node kind.
    #[arg(long, default_value = "1000")]
    pods: usize,
    /// Pods created at once (each batch waits for the previous one).
    #[arg(long, default_value = "10")]
    batch: usize,
    /// The wasmkube binary to measure (default: next to this one).
    #[arg(long)]
    binary: Option<PathBuf>,
    /// Then this many busybox Linux pods (runc; the benchmark must run as
    /// root with runc and busybox-static installed) against as many more
    /// Wasm pods on the same node, batch by batch. 0 skips it.
    #[arg(long, default_value = "0")]
    linux: usize,
    /// First, a Deployment of this many replicas of an HTTP function whose
    /// module the node has never seen, timed to all Ready, then again with
    /// the module cached; each scaled to zero, timed until its pods are
    /// gone. 0 skips it.
    #[arg(long, default_value = "100")]
    deploy: i32,
    /// Give the local node's pods their own network namespaces and IPs
    /// (root; routed veths, set up in-process) instead of sharing the
    /// node's network.
    #[arg(long)]
    pod_network: bool,
}

const LOCAL: &str = "bench-local";

pub async fn run(args: Args) -> anyhow::Result<()> {
    let binary = wasmkube_binary(args.binary.clone())?;
    let registry = wasmkube_testkit::Registry::start();
    let image = format!("{}/sleeper:v1", registry.host());
    let module = std::fs::read(wasmkube_testkit::workload_path("sleeper", "wasm32-wasip1"))?;
    wasmkube_oci::push_wasm(module, &image, &Default::default()).await?;
    let max_pods = (args.pods + 2 * args.linux + 10 + args.deploy.max(0) as usize).to_string();
    // The machine's own network is left alone: no service proxy rules.
    let mut flags = vec![
        "--node-name",
        LOCAL,
        "--max-pods",
        &max_pods,
        "--no-service-proxy",
        "--no-gateway",
    ];
    // A node's pod CIDR holds every pod the run makes (a /24, 253, at least).
    let pods_needed = args.pods + 2 * args.linux + 10 + args.deploy.max(0) as usize;
    let mask = (16..=24u8)
        .rev()
        .find(|p| (1usize << (32 - p)) - 3 >= pods_needed)
        .unwrap_or(16)
        .to_string();
    if args.pod_network {
        flags.extend(["--node-cidr-mask-size", &mask]);
    } else {
        flags.push("--no-pod-network");
    }
    let _leftovers = args
        .pod_network
        .then(crate::support::NodeNetworkLeftovers::before);
    let (server, _) = ChildServer::start_with(&binary, &flags).await?;
    let client = server.client()?;
    crate::schedule::start_nodes(&client, 1, args.pods as u32 + 10, true).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    if args.deploy > 0 {
        // The cold path first, while the node has seen no module at all.
        let function = format!("{}/http-hello:v1", registry.host());
        let component = std::fs::read(wasmkube_testkit::workload_path(
            "http_hello",
            "wasm32-wasip2",
        ))?;
        wasmkube_oci::push_wasm(component, &function, &Default::default()).await?;
        let cold = crate::deploy::round(&client, "cold", &function, LOCAL, args.deploy).await?;
        let cached = crate::deploy::round(&client, "cached", &function, LOCAL, args.deploy).await?;
        crate::deploy::print(args.deploy, &cold, &cached);
    }

    // Running pods, by name, as the watch sees them.
    let running = RunningPods::watch(pods.clone());
    let busybox = format!("{}/busybox:v1", registry.host());
    if args.linux > 0 {
        let (layer, config) = wasmkube_testkit::busybox_image(None);
        wasmkube_oci::push_image(vec![layer], config, &busybox, &Default::default()).await?;
    }
    let pod_of = |name: &str, node: &str, kind: &str| -> anyhow::Result<Pod> {
        let container = if kind == "linux" {
            json!({"name": "c", "image": busybox, "command": ["sleep", "3600"],
                   "imagePullPolicy": "IfNotPresent",
                   "resources": {"requests": {"cpu": "1m", "memory": "1Mi"}}})
        } else {
            // No CPU request: at 1m each, two cores fill at 2,000 pods.
            json!({"name": "c", "image": image, "imagePullPolicy": "IfNotPresent",
                   "resources": {"requests": {"memory": "1Mi"}}})
        };
        Ok(serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {
                "nodeSelector": {"kubernetes.io/hostname": node},
                "terminationGracePeriodSeconds": 1,
                "containers": [container],
            },
        }))?)
    };
    let pod = |name: &str, node: &str| pod_of(name, node, "wasm");
    // One pod per node first: the image is pulled and compiled once.
    for (name, node) in [("warm-wasm", LOCAL), ("warm-sim", "sim-0")] {
        let created = Instant::now();
        pods.create(&PostParams::default(), &pod(name, node)?)
            .await?;
        running.wait(&[name.to_owned()]).await?;
        eprintln!("  {name}: {}", ms(created.elapsed()));
    }
    let mut results: HashMap<&str, Vec<Duration>> = HashMap::new();
    for i in 0..args.pods.div_ceil(args.batch) {
        // Alternate the kinds batch by batch: both see the same conditions.
        for (kind, node) in [("wasm", LOCAL), ("sim", "sim-0")] {
            let names = batch_names(kind, i, args.batch);
            let times = timed_batch(&pods, &running, &names, |n| pod(n, node)).await?;
            results.entry(kind).or_default().extend(times);
        }
        if (i + 1) % 10 == 0 {
            eprintln!("  {} pods of each kind running", (i + 1) * args.batch);
        }
    }
    println!(
        "pod startup, create -> Running on a watch, module cached ({} pods per kind, batches of {})",
        args.pods, args.batch
    );
    let mut p99s = HashMap::new();
    for kind in ["wasm", "sim"] {
        let mut d = results.remove(kind).unwrap_or_default();
        d.sort();
        let label = if kind == "wasm" {
            "Wasm pods, local node     "
        } else {
            "peer: simulated node      "
        };
        println!(
            "  {label} p50 {}  p99 {}  max {}",
            ms(percentile(&d, 50.0)),
            ms(percentile(&d, 99.0)),
            ms(percentile(&d, 100.0))
        );
        p99s.insert(kind, percentile(&d, 99.0));
    }
    println!(
        "  p99 ratio wasm/sim        {:.2}x",
        p99s["wasm"].as_secs_f64() / p99s["sim"].as_secs_f64().max(1e-9)
    );
    println!(
        "  server RSS with {} Wasm pods running: {:.0} MiB",
        args.pods + 1,
        server.rss_mib()
    );
    if args.linux > 0 {
        linux_against_wasm(&args, &pods, &running, &pod_of).await?;
    }
    if args.linux > 0 || args.pod_network {
        // Linux pods hold processes and pods with a network their
        // namespaces: remove them rather than leave them to the server's
        // kill.
        delete_all(&pods).await?;
    }
    drop(server);

    Ok(())
}

async fn delete_all(pods: &Api<Pod>) -> anyhow::Result<()> {
    pods.delete_collection(&Default::default(), &Default::default())
        .await?;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let left = pods.list_metadata(&Default::default()).await?.items.len();
        if left == 0 {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{left} pods still being deleted after 300 s; their containers may outlive the server"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Linux pods against Wasm pods on the same node, batch by batch.
async fn linux_against_wasm(
    args: &Args,
    pods: &Api<Pod>,
    running: &RunningPods,
    pod_of: &impl Fn(&str, &str, &str) -> anyhow::Result<Pod>,
) -> anyhow::Result<()> {
    pods.create(
        &PostParams::default(),
        &pod_of("warm-linux", LOCAL, "linux")?,
    )
    .await?;
    running.wait(&["warm-linux".to_owned()]).await?;
    let mut results: HashMap<&str, Vec<Duration>> = HashMap::new();
    for i in 0..args.linux.div_ceil(args.batch) {
        for kind in ["linux", "wasm2"] {
            let names = batch_names(kind, i, args.batch);
            let runtime = if kind == "linux" { "linux" } else { "wasm" };
            let times = timed_batch(pods, running, &names, |n| pod_of(n, LOCAL, runtime)).await?;
            results.entry(kind).or_default().extend(times);
        }
    }
    println!(
        "Linux (busybox, runc) against Wasm pods on the same node ({} each, image cached)",
        args.linux
    );
    let mut p50s = HashMap::new();
    for (kind, label) in [
        ("linux", "Linux pods (runc)         "),
        ("wasm2", "Wasm pods                 "),
    ] {
        let mut d = results.remove(kind).unwrap_or_default();
        d.sort();
        println!(
            "  {label} p50 {}  p99 {}",
            ms(percentile(&d, 50.0)),
            ms(percentile(&d, 99.0))
        );
        p50s.insert(kind, percentile(&d, 50.0));
    }
    println!(
        "  p50 ratio linux/wasm       {:.1}x",
        p50s["linux"].as_secs_f64() / p50s["wasm2"].as_secs_f64().max(1e-9)
    );
    Ok(())
}

fn batch_names(kind: &str, batch: usize, size: usize) -> Vec<String> {
    (0..size)
        .map(|j| format!("{kind}-{}", batch * size + j))
        .collect()
}

/// Creates the named pods and returns each one's time from its create to
/// Running on the watch.
async fn timed_batch(
    pods: &Api<Pod>,
    running: &RunningPods,
    names: &[String],
    make: impl Fn(&str) -> anyhow::Result<Pod>,
) -> anyhow::Result<Vec<Duration>> {
    let mut sent = HashMap::new();
    for name in names {
        sent.insert(name.clone(), Instant::now());
        pods.create(&PostParams::default(), &make(name)?).await?;
    }
    running.wait(names).await?;
    Ok(names
        .iter()
        .map(|n| {
            running
                .seen_at(n)
                .expect("waited for")
                .duration_since(sent[n])
        })
        .collect())
}
