//! Custom resources against a built-in kind, in the same run on the same
//! API server: durable create throughput with concurrent clients, and the
//! latency from a create being sent to its event on a watch. The custom
//! kind comes from a CRD with a structural schema (validation, defaults,
//! pruning on every write); the built-in peer is a ConfigMap carrying the
//! same fields.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};

use crate::support::{ms, percentile, start_server};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Concurrent clients creating objects.
    #[arg(long, default_value = "64")]
    clients: usize,
    /// Objects each throughput round creates.
    #[arg(long, default_value = "5000")]
    objects: usize,
    /// Creates timed one at a time to their watch event.
    #[arg(long, default_value = "200")]
    events: usize,
}

const GROUP: &str = "bench.wasmkube.dev";

fn crd() -> Value {
    json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": format!("widgets.{GROUP}")},
        "spec": {"group": GROUP, "scope": "Namespaced",
            "names": {"kind": "Widget", "plural": "widgets", "singular": "widget"},
            "versions": [{"name": "v1", "served": true, "storage": true,
                "subresources": {"status": {}},
                "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                    "spec": {"type": "object", "required": ["image"], "properties": {
                        "image": {"type": "string", "minLength": 1},
                        "size": {"type": "integer", "minimum": 0, "default": 1},
                        "color": {"type": "string", "enum": ["blue", "red"], "default": "blue"}}},
                    "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}}}]}
    })
}

/// One kind under test: where its objects go and what they look like.
struct Kind {
    label: &'static str,
    url: String,
    body: fn(&str) -> Value,
}

fn widget(name: &str) -> Value {
    json!({"apiVersion": format!("{GROUP}/v1"), "kind": "Widget", "metadata": {"name": name},
           "spec": {"image": "registry.local/widget:v1", "size": 3, "color": "red"}})
}

fn config_map(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name},
           "data": {"image": "registry.local/widget:v1", "size": "3", "color": "red"}})
}

/// Creates one object, expecting 201.
async fn create(http: &reqwest::Client, url: &str, body: &Value) -> anyhow::Result<()> {
    let resp = http.post(url).json(body).send().await?;
    anyhow::ensure!(
        resp.status().as_u16() == 201,
        "create failed: {}",
        resp.status()
    );
    Ok(())
}

/// Objects per second created by `clients` concurrent clients.
async fn creates(
    http: &reqwest::Client,
    kind: &Kind,
    prefix: &str,
    clients: usize,
    total: usize,
) -> anyhow::Result<f64> {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (http, url, next, body) = (http.clone(), kind.url.clone(), next.clone(), kind.body);
        let prefix = prefix.to_owned();
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return Ok::<_, anyhow::Error>(());
                }
                create(&http, &url, &body(&format!("{prefix}-{i}"))).await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

/// Creates `events` objects one at a time while a watch is open, and
/// returns each create's time from sending to its event arriving.
async fn watch_latency(
    http: &reqwest::Client,
    kind: &Kind,
    events: usize,
) -> anyhow::Result<Vec<Duration>> {
    let list: Value = http.get(&kind.url).send().await?.json().await?;
    let rv = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or("0")
        .to_owned();
    let resp = http
        .get(format!("{}?watch=1&resourceVersion={rv}", kind.url))
        .send()
        .await?;
    anyhow::ensure!(resp.status().is_success(), "watch: {}", resp.status());
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
    let reader = tokio::spawn(async move {
        const MARK: &[u8] = b"\"name\":\"lat-";
        let mut stream = resp.bytes_stream();
        let mut buf: Vec<u8> = Vec::new();
        while let Some(Ok(chunk)) = stream.next().await {
            let now = Instant::now();
            buf.extend_from_slice(&chunk);
            let mut consumed = 0;
            while let Some(pos) = buf[consumed..].windows(MARK.len()).position(|w| w == MARK) {
                let start = consumed + pos + MARK.len() - 4;
                let Some(end) = buf[start..].iter().position(|b| *b == b'"') else {
                    break;
                };
                let name = String::from_utf8_lossy(&buf[start..start + end]).into_owned();
                let _ = tx.send((name, now));
                consumed = start + end;
            }
            buf.drain(..consumed);
        }
    });
    let mut out = Vec::with_capacity(events);
    for i in 0..events {
        let name = format!("lat-{i}");
        let at = Instant::now();
        create(http, &kind.url, &(kind.body)(&name)).await?;
        // The next create waits for this one's event, so each is timed
        // alone (a watch that lags shows as latency, not as a queue).
        loop {
            let got = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await;
            match got {
                Ok(Some((n, t))) if n == name => {
                    out.push(t.duration_since(at));
                    break;
                }
                Ok(Some(_)) => {}
                _ => anyhow::bail!("no watch event for {name}"),
            }
        }
    }
    reader.abort();
    out.sort();
    Ok(out)
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let server = start_server().await?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.clients)
        .build()?;
    let resp = http
        .post(format!(
            "{}/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
            server.base
        ))
        .json(&crd())
        .send()
        .await?;
    anyhow::ensure!(resp.status().as_u16() == 201, "CRD: {}", resp.status());
    let kinds = [
        Kind {
            label: "ConfigMap (built-in)",
            url: format!("{}/api/v1/namespaces/default/configmaps", server.base),
            body: config_map,
        },
        Kind {
            label: "Widget (custom)",
            url: format!("{}/apis/{GROUP}/v1/namespaces/default/widgets", server.base),
            body: widget,
        },
    ];
    println!(
        "custom resources vs a built-in kind: {} creates x 2 rounds with {} clients; {} watched creates",
        args.objects, args.clients, args.events
    );
    // Alternating rounds, so both kinds meet the machine's noise alike.
    let mut rates = [Vec::new(), Vec::new()];
    for round in 0..2 {
        for (k, kind) in kinds.iter().enumerate() {
            rates[k].push(
                creates(
                    &http,
                    kind,
                    &format!("r{round}"),
                    args.clients,
                    args.objects,
                )
                .await?,
            );
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    for (k, kind) in kinds.iter().enumerate() {
        println!(
            "  {:<22} {:>8.0} creates/s  (rounds: {:.0}, {:.0})",
            kind.label,
            mean(&rates[k]),
            rates[k][0],
            rates[k][1]
        );
    }
    println!(
        "  ratio custom/built-in     {:.2}x",
        mean(&rates[1]) / mean(&rates[0])
    );
    let mut p99 = Vec::new();
    for kind in &kinds {
        let lat = watch_latency(&http, kind, args.events).await?;
        println!(
            "  {:<22} create -> watch event  p50 {}  p99 {}  max {}",
            kind.label,
            ms(percentile(&lat, 50.0)),
            ms(percentile(&lat, 99.0)),
            ms(percentile(&lat, 100.0))
        );
        p99.push(percentile(&lat, 99.0));
    }
    println!(
        "  watch p99 custom/built-in {:.2}x",
        p99[1].as_secs_f64() / p99[0].as_secs_f64().max(1e-9)
    );
    Ok(())
}
