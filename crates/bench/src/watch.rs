//! Watch fan-out: many watchers, one writer; latency from a write's
//! acknowledgment to each watcher receiving its event.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::json;

use crate::support::{ms, percentile, start_server};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Concurrent watchers.
    #[arg(long, default_value = "1000")]
    watchers: usize,
    /// Writes observed by every watcher.
    #[arg(long, default_value = "200")]
    events: usize,
    /// Pause between writes. Each write fans out to every watcher, so this
    /// sets the load: at 5 ms with 1,000 watchers two cores are saturated.
    #[arg(long, default_value = "10")]
    interval_ms: u64,
}

type Received = Arc<Mutex<Vec<(String, Instant)>>>;

/// Only the object's name: the measuring client decodes as little as it can,
/// since it shares the machine with the server it measures.
#[derive(serde::Deserialize)]
struct Event {
    object: Object,
}

#[derive(serde::Deserialize)]
struct Object {
    metadata: Meta,
}

#[derive(serde::Deserialize)]
struct Meta {
    name: String,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let server = start_server().await?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.watchers + 8)
        .build()?;
    let base = format!("{}/api/v1/namespaces/default/configmaps", server.base);
    let rv = server.api.current_revision();
    let received: Vec<Received> = (0..args.watchers)
        .map(|_| Arc::new(Mutex::new(Vec::new())))
        .collect();
    let mut handles = Vec::new();
    for sink in &received {
        let resp = http
            .get(format!("{base}?watch=1&resourceVersion={rv}"))
            .send()
            .await?;
        anyhow::ensure!(
            resp.status().is_success(),
            "watch failed: {}",
            resp.status()
        );
        let (sink, want) = (sink.clone(), args.events);
        handles.push(tokio::spawn(async move {
            let mut stream = resp.bytes_stream();
            let mut buf = Vec::new();
            let mut got = 0;
            while got < want {
                let Some(Ok(chunk)) = stream.next().await else {
                    break;
                };
                let now = Instant::now();
                buf.extend_from_slice(&chunk);
                while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=pos).collect();
                    if let Ok(ev) = serde_json::from_slice::<Event>(&line) {
                        sink.lock()
                            .expect("sink")
                            .push((ev.object.metadata.name, now));
                        got += 1;
                    }
                }
            }
        }));
    }
    // One write at a time, paced so each event's fan-out is measured on its own.
    let mut acked = HashMap::new();
    for i in 0..args.events {
        let name = format!("w-{i}");
        let body = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}});
        let resp = http.post(&base).json(&body).send().await?;
        anyhow::ensure!(resp.status().as_u16() == 201);
        acked.insert(name, Instant::now());
        tokio::time::sleep(Duration::from_millis(args.interval_ms)).await;
    }
    let deadline =
        tokio::time::timeout(Duration::from_secs(120), futures::future::join_all(handles)).await;
    anyhow::ensure!(
        deadline.is_ok(),
        "watchers did not receive every event within 120 s"
    );
    let mut lat: Vec<Duration> = Vec::new();
    for sink in &received {
        for (name, at) in sink.lock().expect("sink").iter() {
            if let Some(ack) = acked.get(name) {
                lat.push(at.saturating_duration_since(*ack));
            }
        }
    }
    anyhow::ensure!(
        lat.len() == args.watchers * args.events,
        "missing events: {} of {}",
        lat.len(),
        args.watchers * args.events
    );
    lat.sort();
    println!(
        "watch fan-out: {} watchers x {} events ({} deliveries)",
        args.watchers,
        args.events,
        lat.len()
    );
    println!(
        "  ack -> received  p50 {}  p99 {}  max {}",
        ms(percentile(&lat, 50.0)),
        ms(percentile(&lat, 99.0)),
        ms(*lat.last().unwrap_or(&Duration::ZERO))
    );
    Ok(())
}
