//! Durable create throughput: N concurrent API clients creating ConfigMaps,
//! through an API server on the embedded store and, in the same run, on a
//! real etcd cluster of loopback members.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use bytes::Bytes;
use serde_json::json;

use crate::support::start_server;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Concurrent clients.
    #[arg(long, default_value = "64")]
    clients: usize,
    /// Objects created in total.
    #[arg(long, default_value = "20000")]
    objects: usize,
    /// Members of the etcd cluster the same load then runs against (Debian's
    /// etcd, started on loopback; 0 skips it).
    #[arg(long, default_value = "3")]
    etcd_members: usize,
}

/// Creates `objects` ConfigMaps through the API at `base` with `clients`
/// concurrent clients; returns objects per second.
async fn api_rate(base: &str, clients: usize, objects: usize) -> anyhow::Result<f64> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(clients)
        .build()?;
    let url = format!("{base}/api/v1/namespaces/default/configmaps");
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (http, url, next, total) = (http.clone(), url.clone(), next.clone(), objects);
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return Ok::<_, anyhow::Error>(());
                }
                let body = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": format!("cm-{i}")}, "data": {"k": "v"}});
                let resp = http.post(&url).json(&body).send().await?;
                anyhow::ensure!(resp.status().as_u16() == 201, "create failed: {}", resp.status());
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(objects as f64 / started.elapsed().as_secs_f64())
}

/// The create rate through an API server on an etcd cluster of `members`.
async fn etcd_rate(members: usize, clients: usize, objects: usize) -> anyhow::Result<f64> {
    use wasmkube_apiserver::{ApiServer, Config};
    let etcd =
        tokio::task::spawn_blocking(move || wasmkube_testkit::etcd::EtcdCluster::start(members))
            .await?;
    let store = wasmkube_store::connect_etcd(&wasmkube_store::EtcdConfig {
        endpoints: etcd.endpoints(),
        ..Default::default()
    })
    .await?;
    let api = ApiServer::start(store, Config::default()).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let serving = tokio::spawn(async move { api.serve(listener).await });
    let rate = api_rate(&base, clients, objects).await;
    serving.abort();
    tokio::task::spawn_blocking(move || drop(etcd)).await?;
    rate
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let server = start_server().await?;
    let api_rate = api_rate(&server.base, args.clients, args.objects).await?;
    drop(server);
    let etcd = if args.etcd_members > 0 {
        Some(etcd_rate(args.etcd_members, args.clients, args.objects).await?)
    } else {
        None
    };

    // Peer 1: the store alone (no HTTP, no API machinery), same concurrency.
    let dir = tempfile::tempdir()?;
    let store = wasmkube_store::open_sled(dir.path())?;
    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..args.clients {
        let (store, next, total) = (store.clone(), next.clone(), args.objects);
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return Ok::<_, anyhow::Error>(());
                }
                store
                    .create(&format!("/bench/{i}"), Bytes::from_static(b"{\"k\":\"v\"}"))
                    .await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    let store_rate = args.objects as f64 / started.elapsed().as_secs_f64();

    // Peer 2: one writer, one fsync per write (what group commit avoids).
    let dir = tempfile::tempdir()?;
    let single = wasmkube_store::open_sled(dir.path())?;
    let n = (args.objects / 20).max(50);
    let started = Instant::now();
    for i in 0..n {
        single
            .create(&format!("/bench/{i}"), Bytes::from_static(b"{}"))
            .await?;
    }
    let serial_rate = n as f64 / started.elapsed().as_secs_f64();

    println!(
        "durable creates, {} objects, {} concurrent clients",
        args.objects, args.clients
    );
    println!("  API (HTTP, sled, fsync before ack): {api_rate:>9.0} objects/s");
    println!(
        "  store alone, same concurrency:      {store_rate:>9.0} objects/s  (API/store = {:.2})",
        api_rate / store_rate
    );
    println!(
        "  store, 1 writer (fsync per write):  {serial_rate:>9.0} objects/s  (API/serial = {:.1}x)",
        api_rate / serial_rate
    );
    if let Some(etcd) = etcd {
        println!(
            "  API on etcd ({} member{}, loopback): {etcd:>8.0} objects/s  (etcd/sled = {:.2})",
            args.etcd_members,
            if args.etcd_members == 1 { "" } else { "s" },
            etcd / api_rate
        );
    }
    Ok(())
}
