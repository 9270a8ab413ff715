//! From `wasmkube push` of a module never seen to its pod Running: the
//! real CLI publishes to the built-in registry of a `wasmkube server` child
//! with its local node, a pod is created through the API, and the figure
//! ends when a watch sees it Running (the node pulls the module, compiles
//! it and starts it). Each round's module is new (a custom section of its
//! own), so nothing is cached: the path a developer takes after every
//! build. The peer in the same run is a pod of an image the node already
//! holds, compiled.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use serde_json::json;

use crate::support::{ChildServer, RunningPods, free_port, ms, percentile, wasmkube_binary};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Modules pushed and run, one after another.
    #[arg(long, default_value = "10")]
    runs: usize,
    /// The wasmkube binary to measure (default: next to this one).
    #[arg(long)]
    binary: Option<PathBuf>,
}

const NODE: &str = "bench-push";

/// `module` with a custom section named `wasmkube-bench` holding `tag`: a
/// module no node has seen, which behaves as the original.
fn unique(module: &[u8], tag: &str) -> Vec<u8> {
    fn leb(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    let name = b"wasmkube-bench";
    let mut payload = Vec::new();
    leb(name.len(), &mut payload);
    payload.extend_from_slice(name);
    payload.extend_from_slice(tag.as_bytes());
    let mut out = module.to_vec();
    out.push(0);
    leb(payload.len(), &mut out);
    out.extend_from_slice(&payload);
    out
}

fn pod(name: &str, image: &str) -> anyhow::Result<Pod> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": NODE},
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "c", "image": image, "imagePullPolicy": "IfNotPresent"}],
        },
    }))?)
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let binary = wasmkube_binary(args.binary.clone())?;
    let registry = format!("127.0.0.1:{}", free_port()?);
    let server = ChildServer::start_with_local_node(&binary, NODE, &registry).await?;
    let client = server.client()?;
    let pods: Api<Pod> = Api::namespaced(client, "default");
    let running = RunningPods::watch(pods.clone());
    let module = std::fs::read(wasmkube_testkit::workload_path("sleeper", "wasm32-wasip1"))?;
    let dir = tempfile::tempdir()?;
    let stamp = format!("{:?}", std::time::SystemTime::now());
    let (mut pushes, mut totals, mut cached) = (Vec::new(), Vec::new(), Vec::new());
    println!(
        "wasmkube push of a new module -> its pod Running ({} rounds; module {} KiB)",
        args.runs,
        module.len() / 1024
    );
    for i in 0..args.runs {
        let file = dir.path().join(format!("app-{i}.wasm"));
        std::fs::write(&file, unique(&module, &format!("{stamp}-{i}")))?;
        let name = format!("app-{i}");
        let started = Instant::now();
        let out = Command::new(&binary)
            .arg("push")
            .arg(&file)
            .arg(format!("{name}:v1"))
            .arg("--registry")
            .arg(&registry)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "wasmkube push: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pushed = started.elapsed();
        pods.create(
            &PostParams::default(),
            &pod(&name, &format!("{registry}/{name}:v1"))?,
        )
        .await?;
        running.wait(std::slice::from_ref(&name)).await?;
        let total = running
            .seen_at(&name)
            .expect("waited for")
            .duration_since(started);
        // The peer: the same image again, now on the node and compiled.
        let again = format!("{name}-again");
        let created = Instant::now();
        pods.create(
            &PostParams::default(),
            &pod(&again, &format!("{registry}/{name}:v1"))?,
        )
        .await?;
        running.wait(std::slice::from_ref(&again)).await?;
        let warm = running
            .seen_at(&again)
            .expect("waited for")
            .duration_since(created);
        println!(
            "  round {i}: push {}  push -> Running {}  (cached image: create -> Running {})",
            ms(pushed),
            ms(total),
            ms(warm)
        );
        pushes.push(pushed);
        totals.push(total);
        cached.push(warm);
    }
    for v in [&mut pushes, &mut totals, &mut cached] {
        v.sort();
    }
    let (p50, p90) = (percentile(&totals, 50.0), percentile(&totals, 90.0));
    println!(
        "push -> Running: p50 {}  p90 {}  max {}  (of which wasmkube push p50 {})",
        ms(p50),
        ms(p90),
        ms(percentile(&totals, 100.0)),
        ms(percentile(&pushes, 50.0))
    );
    println!(
        "peer, cached image create -> Running: p50 {}; new module / cached p50 ratio {:.1}x",
        ms(percentile(&cached, 50.0)),
        p50.as_secs_f64() / percentile(&cached, 50.0).as_secs_f64().max(1e-9)
    );
    pods.delete_collection(&Default::default(), &Default::default())
        .await?;
    Ok(())
}
