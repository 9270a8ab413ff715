//! Watch fan-out: many watchers, one writer; latency from a write's
//! acknowledgment to each watcher receiving its event.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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

/// Reads one watch response from a raw socket and records when each object
/// name arrives. The measuring client does as little as it can (one read per
/// wake-up, a byte search for the name), since it shares the machine with the
/// server it measures; a full HTTP client adds a task hop per event.
async fn read_watch(mut conn: tokio::net::TcpStream, sink: Received, want: usize) {
    const MARK: &[u8] = b"\"name\":\"w-";
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut chunk = vec![0u8; 64 * 1024];
    let mut got = 0;
    while got < want {
        let n = match conn.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let now = Instant::now();
        buf.extend_from_slice(&chunk[..n]);
        let mut consumed = 0;
        while let Some(pos) = buf[consumed..].windows(MARK.len()).position(|w| w == MARK) {
            let start = consumed + pos + MARK.len() - 2;
            let Some(end) = buf[start..].iter().position(|b| *b == b'"') else {
                break;
            };
            let name = String::from_utf8_lossy(&buf[start..start + end]).into_owned();
            sink.lock().expect("sink").push((name, now));
            got += 1;
            consumed = start + end;
        }
        buf.drain(..consumed);
    }
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
    let addr = server.base.trim_start_matches("http://").to_owned();
    for sink in &received {
        let mut conn = tokio::net::TcpStream::connect(&addr).await?;
        conn.set_nodelay(true)?;
        let request = format!(
            "GET /api/v1/namespaces/default/configmaps?watch=1&resourceVersion={rv} HTTP/1.1\r\nHost: {addr}\r\nAccept: application/json\r\n\r\n"
        );
        conn.write_all(request.as_bytes()).await?;
        let (sink, want) = (sink.clone(), args.events);
        handles.push(tokio::spawn(
            async move { read_watch(conn, sink, want).await },
        ));
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
