//! Failover of a control plane on etcd: two `wasmkube server` processes on
//! one etcd cluster; the one a client writes through and that runs the
//! scheduler is SIGKILLed. Measured from the kill: the client's next
//! acknowledged write (through the other server: it moves on at the first
//! failed request), and the next pod bound (the survivor's scheduler
//! takes the `kube-scheduler` Lease once the dead holder's 15 s expire).
//! Each run is a cluster of its own under its own `--etcd-prefix`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, PostParams};
use serde_json::json;

use crate::support::{ChildServer, KillOnDrop, ms, percentile, wasmkube_binary};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The wasmkube binary to measure (default: next to this one).
    #[arg(long)]
    binary: Option<PathBuf>,
    /// Kills measured (each about 20 s: the leader lease runs out).
    #[arg(long, default_value = "5")]
    runs: usize,
    /// Members of the etcd cluster (Debian's etcd, on loopback).
    #[arg(long, default_value = "3")]
    etcd_members: usize,
}

/// Waits for `probe` to hold, checking every few milliseconds.
async fn until<F: std::future::Future<Output = bool>>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> F,
) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + timeout;
    loop {
        if probe().await {
            return Ok(Instant::now());
        }
        anyhow::ensure!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let binary = wasmkube_binary(args.binary)?;
    let members = args.etcd_members.max(1);
    let etcd =
        tokio::task::spawn_blocking(move || wasmkube_testkit::etcd::EtcdCluster::start(members))
            .await?;
    let endpoints = etcd.endpoints().join(",");
    let (mut writes, mut binds) = (Vec::new(), Vec::new());
    for run in 0..args.runs {
        let prefix = format!("/failover-{run}");
        let flags = [
            "--no-local-node",
            "--no-registry",
            "--etcd-servers",
            endpoints.as_str(),
            "--etcd-prefix",
            prefix.as_str(),
        ];
        // A starts alone, so it takes the leader leases.
        let (mut a, _) = ChildServer::start_with(&binary, &flags).await?;
        let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
            Api::namespaced(a.client()?, "kube-system");
        until(
            "A holds the scheduler lease",
            Duration::from_secs(30),
            || {
                let leases = leases.clone();
                async move { matches!(leases.get_opt("kube-scheduler").await, Ok(Some(_))) }
            },
        )
        .await?;
        let (b, _) = ChildServer::start_with(&binary, &flags).await?;
        let _node = KillOnDrop(
            std::process::Command::new(&binary)
                .args(["sim-nodes", "--count", "1", "--server", &b.url])
                .env("RUST_LOG", "warn")
                .stderr(std::process::Stdio::null())
                .spawn()?,
        );
        let nodes: Api<Node> = Api::all(b.client()?);
        until("the simulated node", Duration::from_secs(30), || {
            let nodes = nodes.clone();
            async move { matches!(nodes.get_opt("sim-0").await, Ok(Some(_))) }
        })
        .await?;

        // A client with both servers writes through A until A dies.
        let http = reqwest::Client::new();
        let urls = [a.url.clone(), b.url.clone()];
        let writer = tokio::spawn(async move {
            let mut server = 0;
            let mut acknowledged = Vec::new();
            for i in 0.. {
                let url = format!("{}/api/v1/namespaces/default/configmaps", urls[server]);
                let body = json!({"apiVersion": "v1", "kind": "ConfigMap",
                                  "metadata": {"name": format!("w-{i}")}});
                match http.post(&url).json(&body).send().await {
                    Ok(r) if r.status().as_u16() == 201 => {
                        acknowledged.push((Instant::now(), server));
                        if server == 1 {
                            return acknowledged;
                        }
                    }
                    _ => server = 1,
                }
            }
            acknowledged
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        a.child.kill()?;
        let killed = Instant::now();
        a.child.wait()?;
        let acknowledged = writer.await?;
        let (through_b, _) = acknowledged
            .iter()
            .find(|(_, server)| *server == 1)
            .copied()
            .ok_or_else(|| anyhow::anyhow!("no write went through B"))?;
        writes.push(through_b.saturating_duration_since(killed));

        // A pod created now is bound once B's scheduler leads.
        let pods: Api<Pod> = Api::namespaced(b.client()?, "default");
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "after-failover"},
            "spec": {"containers": [{"name": "c", "image": "registry.local/x:1"}]},
        }))?;
        pods.create(&PostParams::default(), &pod).await?;
        let bound = until(
            "the pod bound by B's scheduler",
            Duration::from_secs(60),
            || {
                let pods = pods.clone();
                async move {
                    pods.get("after-failover")
                        .await
                        .ok()
                        .and_then(|p| p.spec?.node_name)
                        .is_some()
                }
            },
        )
        .await?;
        binds.push(bound - killed);
        drop(b);
    }
    writes.sort();
    binds.sort();
    let line = |v: &[Duration]| {
        format!(
            "p50 {}  p99 {}  (max of {})",
            ms(percentile(v, 50.0)),
            ms(percentile(v, 99.0)),
            v.len()
        )
    };
    println!(
        "failover on etcd ({members} member{}), two API servers, SIGKILL of the one serving and leading",
        if members == 1 { "" } else { "s" }
    );
    println!(
        "  next acknowledged write (client with both servers): {}",
        line(&writes)
    );
    println!(
        "  next pod bound (leader lease 15 s):                  {}",
        line(&binds)
    );
    tokio::task::spawn_blocking(move || drop(etcd)).await?;
    Ok(())
}
