//! Service proxy programming at scale: thousands of Services with several
//! endpoints each, programmed into a network namespace this benchmark makes
//! (needs root and `nft`). It times what the proxy's sync loop does after
//! an endpoint change (the model from the caches, the rules, the diff and
//! one `nft` transaction) over many changes, against rewriting the whole
//! table (what a proxy without incremental updates does per change), and
//! the first full sync; and the memory the model and rules take.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::Context;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use wasmkube_proxy::{NodeNetwork, ServiceView, SliceView, nft};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(long, default_value = "10000")]
    services: usize,
    #[arg(long, default_value = "5")]
    endpoints: usize,
    /// Endpoint changes to time.
    #[arg(long, default_value = "200")]
    changes: usize,
}

fn service(i: usize) -> Service {
    let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 16, 0)) + i as u32);
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": format!("svc-{i}"), "namespace": "bench"},
        "spec": {"clusterIP": ip.to_string(), "type": "ClusterIP",
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]},
    }))
    .expect("a Service")
}

fn slice(i: usize, endpoints: usize, generation: u32) -> EndpointSlice {
    let eps: Vec<serde_json::Value> = (0..endpoints)
        .map(|e| {
            let n = (i * endpoints + e) as u32 + generation * 7919;
            let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 244, 0, 0)) + (n % 65000));
            serde_json::json!({"addresses": [ip.to_string()], "conditions": {"ready": true}, "nodeName": "n1"})
        })
        .collect();
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": format!("svc-{i}-x"), "namespace": "bench",
                     "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
        "addressType": "IPv4",
        "endpoints": eps,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    }))
    .expect("an EndpointSlice")
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4)
}

fn percentile(sorted: &[Duration], q: f64) -> f64 {
    sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)].as_secs_f64() * 1e3
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    wasmkube_proxy::check().context("the proxy benchmark programs nftables")?;
    // The work runs on a thread inside a namespace of its own, so `nft`
    // (started from it) programs the namespace, not the machine.
    let ns = wasmkube_testkit::TestNetns::new("wkb-proxy");
    ns.run(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(measure(&args))
    })
}

async fn measure(args: &Args) -> anyhow::Result<()> {
    let net = NodeNetwork {
        cluster_cidr: Some("10.244.0.0/16".parse()?),
        service_cidr: "10.96.0.0/12".parse()?,
        node_local: Vec::new(),
    };
    let before = rss_kib();
    // Held as the node's watch holds them: views of the objects.
    let services: Vec<ServiceView> = (0..args.services)
        .filter_map(|i| ServiceView::of(&service(i)))
        .collect();
    let mut slices: Vec<SliceView> = (0..args.services)
        .filter_map(|i| SliceView::of(&slice(i, args.endpoints, 0)))
        .collect();
    let objects = rss_kib();
    let config = wasmkube_proxy::Config::new("n1", net.clone());
    let started = Instant::now();
    let ports = wasmkube_proxy::ports_by_service(&config, &services, &slices);
    let (mut table, script) = nft::Table::full(&net, ports);
    let computed = started.elapsed();
    let model_rss = rss_kib();
    nft::apply(&script).await?;
    table.applied();
    let first = started.elapsed();
    let (chains, sets, elements) = table.size();
    println!(
        "{} Services x {} endpoints: {chains} chains, {sets} sets, {elements} map elements, a {} KiB script",
        args.services,
        args.endpoints,
        script.len() / 1024
    );
    println!(
        "  first full sync: {:.0} ms ({:.0} ms of it computing the rules)",
        first.as_secs_f64() * 1e3,
        computed.as_secs_f64() * 1e3
    );
    println!(
        "  memory: {} KiB for the Service and slice views, {} KiB more for the model and rules",
        objects.saturating_sub(before),
        model_rss.saturating_sub(objects)
    );

    // One endpoint change at a time, as the sync loop sees them: the
    // changed Service's ports from its object and all the slices, its
    // part of the table rebuilt and diffed, one `nft` transaction.
    let mut total = Vec::with_capacity(args.changes);
    let mut nft_only = Vec::with_capacity(args.changes);
    for c in 0..args.changes {
        let i = (c * 7919) % args.services;
        let changed = slice(i, args.endpoints, c as u32 + 1);
        let started = Instant::now();
        slices[i] = SliceView::of(&changed).context("a bench slice is IPv4")?;
        let dirty = std::collections::BTreeSet::from([("bench".to_owned(), format!("svc-{i}"))]);
        let ports = wasmkube_proxy::changed_ports(&config, &dirty, [&services[i]], &slices);
        let script = table.update(&net, ports);
        let applying = Instant::now();
        nft::apply(&script).await?;
        table.applied();
        nft_only.push(applying.elapsed());
        total.push(started.elapsed());
    }
    total.sort();
    nft_only.sort();
    // The peer: the whole table rewritten, as a proxy without incremental
    // updates does for every change.
    let mut rewrites = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let ports = wasmkube_proxy::ports_by_service(&config, &services, &slices);
        nft::apply(&nft::Table::full(&net, ports).1).await?;
        rewrites.push(started.elapsed());
    }
    rewrites.sort();
    let p50 = percentile(&total, 0.5);
    println!(
        "  endpoint change to rules in place ({} changes): p50 {p50:.1} ms, p99 {:.1} ms (nft alone: p50 {:.1} ms, p99 {:.1} ms)",
        args.changes,
        percentile(&total, 0.99),
        percentile(&nft_only, 0.5),
        percentile(&nft_only, 0.99),
    );
    let full = percentile(&rewrites, 0.5);
    println!(
        "  whole-table rewrite per change (peer): median {full:.0} ms; incremental is {:.1}x faster",
        full / p50
    );
    nft::apply(&nft::remove()).await?;
    Ok(())
}
