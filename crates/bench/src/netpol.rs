//! NetworkPolicy at scale (root, `nft`): a thousand policies over a
//! cluster of pods, programmed into a router namespace this benchmark
//! makes between a client namespace and a server namespace.
//!
//! It times what the enforcer's sync loop does after a policy change (the
//! plan from the cluster's objects, the script, one `nft` transaction)
//! over many changes, and the first sync; then it measures new TCP
//! connections per second from the client to the server through the
//! router, in alternating rounds with the table and without it (the peer),
//! the server being an isolated pod whose policies admit the client by its
//! last rule.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use wasmkube_netpol::model::{self, NamedPort, PodView, Protocol};
use wasmkube_netpol::nft;
use wasmkube_testkit::TestNetns;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(long, default_value = "1000")]
    policies: usize,
    /// Namespaces the policies and pods are spread over.
    #[arg(long, default_value = "100")]
    namespaces: usize,
    /// Pods per namespace (cluster-wide; every tenth is on this node).
    #[arg(long, default_value = "20")]
    pods: usize,
    /// Policy changes to time.
    #[arg(long, default_value = "200")]
    changes: usize,
    /// New connections per round of the throughput measurement.
    #[arg(long, default_value = "3000")]
    connections: usize,
    /// Rounds with and without the table, alternating.
    #[arg(long, default_value = "3")]
    rounds: usize,
}

const NODE: &str = "bench-node";
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 250, 1, 2);
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 250, 2, 2);
const PORT: u16 = 8080;

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new("ip").args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The cluster's pods: `pods` per namespace, every tenth on this node; pod
/// 0 of namespace 0 is the server, and the client is a pod of another node
/// in namespace 0.
fn pods(args: &Args) -> Vec<PodView> {
    let mut out = Vec::new();
    for n in 0..args.namespaces {
        for p in 0..args.pods {
            let addr =
                Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 244, 0, 0)) + (n * 256 + p) as u32);
            let (addr, role) = match (n, p) {
                (0, 0) => (SERVER, "server"),
                (0, 1) => (CLIENT, "client"),
                _ => (addr, if p % 2 == 0 { "server" } else { "client" }),
            };
            out.push(PodView {
                uid: format!("{n}-{p}"),
                namespace: format!("ns-{n}"),
                name: format!("pod-{p}"),
                labels: BTreeMap::from([
                    ("app".to_owned(), format!("app-{}", p % 5)),
                    ("role".to_owned(), role.to_owned()),
                    ("pod".to_owned(), format!("p{p}")),
                ]),
                ip: addr,
                node: if p % 10 == 0 {
                    NODE.into()
                } else {
                    "other".into()
                },
                ports: vec![NamedPort {
                    name: "http".into(),
                    protocol: Protocol::Tcp,
                    port: PORT,
                }],
            });
        }
    }
    out
}

/// Policy `k`: in namespace `k % namespaces`, selecting the servers, from
/// one pod by label and a tenant namespace, on a port of its own. The
/// last policy of namespace 0 admits the client on the server's port.
fn policy(k: usize, args: &Args, generation: usize) -> NetworkPolicy {
    let ns = k % args.namespaces;
    let last_of_ns0 = ns == 0 && k + args.namespaces >= args.policies;
    let (from_pod, port) = if last_of_ns0 {
        ("p1".to_owned(), serde_json::json!("http"))
    } else {
        (
            format!("p{}", (k + generation) % args.pods),
            serde_json::json!(9000 + (k + generation) % 1000),
        )
    };
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": format!("np-{k}"), "namespace": format!("ns-{ns}")},
        "spec": {
            "podSelector": {"matchLabels": {"role": "server"}},
            "policyTypes": ["Ingress"],
            "ingress": [{
                "from": [{"podSelector": {"matchLabels": {"pod": from_pod}}},
                         {"namespaceSelector": {"matchLabels": {"tenant": format!("t{}", k % 7)}}}],
                "ports": [{"port": port}],
            }],
        },
    }))
    .expect("a NetworkPolicy")
}

fn percentile(sorted: &[Duration], q: f64) -> f64 {
    sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)].as_secs_f64() * 1e3
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    wasmkube_netpol::check().context("the network policy benchmark programs nftables")?;
    let router = TestNetns::new("wkb-np-r");
    let client = TestNetns::new("wkb-np-c");
    let server = TestNetns::new("wkb-np-s");
    let suffix = std::process::id() % 10000;
    for (ns, side, addr, gw) in [
        (&client, "c", "10.250.1.2/24", "10.250.1.1"),
        (&server, "s", "10.250.2.2/24", "10.250.2.1"),
    ] {
        let (outer, inner) = (format!("wkr{side}{suffix}"), format!("wk{side}{suffix}"));
        ip(&[
            "link", "add", &inner, "type", "veth", "peer", "name", &outer,
        ])?;
        ip(&["link", "set", &inner, "netns", ns.name()])?;
        ip(&["link", "set", &outer, "netns", router.name()])?;
        ip(&["-n", ns.name(), "addr", "add", addr, "dev", &inner])?;
        ip(&["-n", ns.name(), "link", "set", &inner, "up"])?;
        ip(&["-n", ns.name(), "link", "set", "lo", "up"])?;
        ip(&["-n", ns.name(), "route", "add", "default", "via", gw])?;
        ip(&[
            "-n",
            router.name(),
            "addr",
            "add",
            &format!("{gw}/24"),
            "dev",
            &outer,
        ])?;
        ip(&["-n", router.name(), "link", "set", &outer, "up"])?;
    }
    router.run(|| std::fs::write("/proc/sys/net/ipv4/ip_forward", "1"))?;

    let pods = pods(&args);
    let mut namespaces: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for n in 0..args.namespaces {
        namespaces.insert(
            format!("ns-{n}"),
            BTreeMap::from([
                (model::NAMESPACE_NAME_LABEL.to_owned(), format!("ns-{n}")),
                ("tenant".to_owned(), format!("t{}", n % 7)),
            ]),
        );
    }
    let mut policies: Vec<NetworkPolicy> =
        (0..args.policies).map(|k| policy(k, &args, 0)).collect();
    let sync_with = |policies: &[NetworkPolicy], pods: &[PodView]| -> nft::Rendered {
        let refs: Vec<&NetworkPolicy> = policies.iter().collect();
        nft::Rendered::of(&model::plan(&refs, pods, &namespaces, NODE))
    };
    let sync = |policies: &[NetworkPolicy]| sync_with(policies, &pods);
    let apply = |script: String| {
        router.run(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(wasmkube_proxy::nft::apply(&script))
                .map_err(anyhow::Error::from)
        })
    };

    let started = Instant::now();
    let mut written = sync(&policies);
    let script = written.full();
    let (isolated, sets) = written.size();
    let computed = started.elapsed();
    apply(script.clone())?;
    let first = started.elapsed();
    println!(
        "{} policies over {} namespaces x {} pods ({} on this node): {isolated} pod chains, {sets} address sets, a {} KiB script",
        args.policies,
        args.namespaces,
        args.pods,
        pods.iter().filter(|p| p.node == NODE).count(),
        script.len() / 1024
    );
    println!(
        "  first sync: {:.1} ms ({:.1} ms of it computing the plan and script)",
        first.as_secs_f64() * 1e3,
        computed.as_secs_f64() * 1e3
    );

    // One policy change at a time, as the sync loop sees it: the plan, the
    // difference from what was written, one transaction.
    let mut total = Vec::with_capacity(args.changes);
    let mut nft_only = Vec::with_capacity(args.changes);
    let mut script_bytes = 0;
    for c in 0..args.changes {
        let k = (c * 7919) % args.policies;
        policies[k] = policy(k, &args, c + 1);
        let started = Instant::now();
        let now = sync(&policies);
        let Some(script) = now.diff(&written) else {
            continue;
        };
        script_bytes += script.len();
        let applying = Instant::now();
        apply(script)?;
        nft_only.push(applying.elapsed());
        total.push(started.elapsed());
        written = now;
    }
    anyhow::ensure!(!total.is_empty(), "no change touched the node's rules");
    total.sort();
    nft_only.sort();
    // Pods of this node going and coming back: their chains, map elements
    // and places in the address sets.
    let mut churn = Vec::new();
    let local: Vec<usize> = (0..pods.len()).filter(|&i| pods[i].node == NODE).collect();
    for c in 0..args.changes {
        let gone = local[(c * 31) % local.len()];
        let fewer: Vec<PodView> = pods
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != gone)
            .map(|(_, p)| p.clone())
            .collect();
        for now in [sync_with(&policies, &fewer), sync(&policies)] {
            let started = Instant::now();
            if let Some(script) = now.diff(&written) {
                apply(script)?;
                churn.push(started.elapsed());
            }
            written = now;
        }
    }
    churn.sort();
    // The peer: the whole table rewritten per change.
    let mut rewrites = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        apply(sync(&policies).full())?;
        rewrites.push(started.elapsed());
    }
    rewrites.sort();
    let p50 = percentile(&total, 0.5);
    println!(
        "  policy change to rules in place ({} changes, {} B of script each): p50 {p50:.1} ms, p99 {:.1} ms (nft alone: p50 {:.1} ms, p99 {:.1} ms)",
        total.len(),
        script_bytes / total.len(),
        percentile(&total, 0.99),
        percentile(&nft_only, 0.5),
        percentile(&nft_only, 0.99),
    );
    if !churn.is_empty() {
        println!(
            "  a pod of this node gone or back ({} changes): p50 {:.1} ms, p99 {:.1} ms",
            churn.len(),
            percentile(&churn, 0.5),
            percentile(&churn, 0.99)
        );
    }
    let full = percentile(&rewrites, 0.5);
    println!(
        "  whole-table rewrite per change (peer): median {full:.1} ms; the difference is {:.1}x faster",
        full / p50
    );

    // New connections through the router: the server admits the client by
    // the last rule of its policies.
    let script = sync(&policies).full();
    anyhow::ensure!(
        script.contains(&format!("{SERVER} : jump in-")),
        "the server is not isolated"
    );
    let stop = AtomicBool::new(false);
    let listener = server.run(|| TcpListener::bind(SocketAddr::from((SERVER, PORT))))?;
    let (mut with, mut without) = (Vec::new(), Vec::new());
    std::thread::scope(|scope| -> anyhow::Result<()> {
        scope.spawn(|| {
            for conn in listener.incoming() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                if let Ok(mut conn) = conn {
                    let mut byte = [0u8; 1];
                    let _ = conn.read(&mut byte);
                    let _ = conn.write_all(b"ok");
                }
            }
        });
        let result = (|| {
            for round in 0..args.rounds * 2 {
                let on = round % 2 == 1;
                if on {
                    apply(script.clone())?;
                } else {
                    apply(nft::remove())?;
                }
                let rate = client.run(|| connections(args.connections))?;
                if on { &mut with } else { &mut without }.push(rate);
            }
            Ok(())
        })();
        stop.store(true, Ordering::Relaxed);
        let _ = client.run(|| {
            TcpStream::connect_timeout(&SocketAddr::from((SERVER, PORT)), Duration::from_secs(1))
        });
        result
    })?;
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    println!(
        "  new connections per second through the node: {:.0} with {} policies, {:.0} without (peer): {:.2}x",
        mean(&with),
        args.policies,
        mean(&without),
        mean(&with) / mean(&without)
    );
    apply(nft::remove())?;
    Ok(())
}

/// Opens `n` connections to the server one after another, each sending a
/// byte and reading the answer; connections per second.
fn connections(n: usize) -> anyhow::Result<f64> {
    let started = Instant::now();
    for _ in 0..n {
        let mut conn =
            TcpStream::connect_timeout(&SocketAddr::from((SERVER, PORT)), Duration::from_secs(5))
                .context("connecting through the router")?;
        conn.write_all(b"x")?;
        let mut answer = Vec::new();
        conn.read_to_end(&mut answer)?;
        anyhow::ensure!(answer == b"ok", "the server answered {answer:?}");
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}
