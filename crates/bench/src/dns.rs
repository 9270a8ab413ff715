//! Cluster DNS against dnsmasq serving the same records, both on loopback,
//! both queried by Debian's `dnsperf` in the same run: queries per second at
//! full load, then latency percentiles at a fixed rate (from `dnsperf -v`,
//! which reports every query's time).

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::{Arc, RwLock};

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::Service;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// ClusterIP Services in the zone (one A record each).
    #[arg(long, default_value = "1000")]
    services: usize,
    /// Seconds of full load per server.
    #[arg(long, default_value = "10")]
    seconds: u64,
    /// Queries per second of the latency pass.
    #[arg(long, default_value = "5000")]
    rate: u64,
}

fn service(i: usize) -> Service {
    let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 1, 0)) + i as u32);
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": format!("svc-{i}"), "namespace": "default"},
        "spec": {"clusterIP": ip.to_string(), "ports": [{"name": "http", "port": 80}]},
    }))
    .expect("a Service")
}

/// `dnsperf`'s summary: queries per second and mean latency (ms).
struct Load {
    qps: f64,
    mean_ms: f64,
    lost: String,
}

fn dnsperf(addr: SocketAddr, queries: &std::path::Path, extra: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("dnsperf")
        .args(["-s", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .arg("-d")
        .arg(queries)
        .args(extra)
        .stderr(Stdio::null())
        .output()
        .context("running dnsperf (apt-get install dnsperf)")?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn full_load(addr: SocketAddr, queries: &std::path::Path, seconds: u64) -> anyhow::Result<Load> {
    let out = dnsperf(
        addr,
        queries,
        &["-l", &seconds.to_string(), "-c", "4", "-q", "200"],
    )?;
    let field = |label: &str| -> Option<String> {
        out.lines()
            .find(|l| l.trim_start().starts_with(label))
            .map(|l| l[l.find(':').map_or(0, |i| i + 1)..].trim().to_owned())
    };
    let qps = field("Queries per second")
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no rate in dnsperf's output:\n{out}"))?;
    let mean_ms = field("Average Latency (s)")
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(f64::NAN, |s| s * 1e3);
    let lost = field("Queries lost").unwrap_or_default();
    Ok(Load { qps, mean_ms, lost })
}

/// p50 and p99 (ms) at a fixed rate, from every query's time.
fn latency(
    addr: SocketAddr,
    queries: &std::path::Path,
    rate: u64,
    seconds: u64,
) -> anyhow::Result<(f64, f64)> {
    let seconds = seconds.clamp(1, 3).to_string();
    let out = dnsperf(
        addr,
        queries,
        &["-l", &seconds, "-Q", &rate.to_string(), "-v"],
    )?;
    // `> NOERROR svc-1.default.svc.cluster.local A 0.000123`
    let mut times: Vec<f64> = out
        .lines()
        .filter(|l| l.starts_with("> "))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .collect();
    if times.is_empty() {
        bail!("dnsperf reported no queries:\n{out}");
    }
    times.sort_by(f64::total_cmp);
    let at = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)] * 1e3;
    Ok((at(0.50), at(0.99)))
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let services: Vec<wasmkube_proxy::ServiceView> = (0..args.services)
        .filter_map(|i| wasmkube_proxy::ServiceView::of(&service(i)))
        .collect();
    let zone = wasmkube_dns::Zone::build("cluster.local", &services, []);
    // The same names for both: a query file and a hosts file.
    let queries = dir.path().join("queries");
    let hosts = dir.path().join("hosts");
    {
        let mut q = std::fs::File::create(&queries)?;
        let mut h = std::fs::File::create(&hosts)?;
        for s in &services {
            let name = format!("{}.default.svc.cluster.local", s.name);
            let wasmkube_proxy::view::ClusterIp::Ip(ip) = s.cluster_ip else {
                bail!("bench Service {} has no cluster IP", s.name);
            };
            writeln!(q, "{name} A")?;
            writeln!(h, "{ip} {name}")?;
        }
    }

    // Ours: the cluster DNS's UDP server, on this process's runtime.
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let ours = socket.local_addr()?;
    let state = Arc::new(wasmkube_dns::server::State {
        zone: RwLock::new(Arc::new(zone)),
        upstreams: Vec::new(),
    });
    let rt = tokio::runtime::Handle::current();
    std::thread::spawn(move || wasmkube_dns::server::serve_udp(socket, state, rt));

    // The peer: dnsmasq answering from a hosts file, TTL 5 s as ours.
    let port = crate::support::free_port()?;
    let theirs = SocketAddr::from(([127, 0, 0, 1], port));
    let mut dnsmasq = Command::new("dnsmasq")
        .args([
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
        ])
        .args([
            "--listen-address=127.0.0.1",
            "--local-ttl=5",
            "--cache-size=10000",
        ])
        .arg(format!("--port={port}"))
        .arg(format!("--addn-hosts={}", hosts.display()))
        .arg(format!("--pid-file={}", dir.path().join("pid").display()))
        .stderr(Stdio::null())
        .spawn()
        .context("starting dnsmasq (apt-get install dnsmasq-base)")?;
    // dnsmasq answers once its socket is bound: ask until it does.
    let probe = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    let mut ready = false;
    for _ in 0..100 {
        // A query for svc-0, id 1.
        let mut m = vec![0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in "svc-0.default.svc.cluster.local".split('.') {
            m.push(label.len() as u8);
            m.extend(label.as_bytes());
        }
        m.extend([0, 0, 1, 0, 1]);
        probe.send_to(&m, theirs).await?;
        let mut buf = [0u8; 512];
        if let Ok(Ok(_)) = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            probe.recv_from(&mut buf),
        )
        .await
        {
            ready = true;
            break;
        }
    }
    if !ready {
        let _ = dnsmasq.kill();
        bail!("dnsmasq did not answer");
    }

    println!(
        "cluster DNS vs dnsmasq, {} A records, dnsperf on loopback ({} s full load each, then {} q/s for latency)",
        args.services, args.seconds, args.rate
    );
    let (queries2, seconds, rate) = (queries.clone(), args.seconds, args.rate);
    let measured = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let ours_load = full_load(ours, &queries2, seconds)?;
        let theirs_load = full_load(theirs, &queries2, seconds)?;
        let ours_lat = latency(ours, &queries2, rate, seconds)?;
        let theirs_lat = latency(theirs, &queries2, rate, seconds)?;
        Ok((ours_load, theirs_load, ours_lat, theirs_lat))
    })
    .await??;
    let _ = dnsmasq.kill();
    let _ = dnsmasq.wait();
    let (o, t, (o50, o99), (t50, t99)) = measured;
    println!(
        "  wasmkube DNS: {:>9.0} q/s (mean {:.3} ms, lost {})  at {rate} q/s: p50 {o50:.3} ms, p99 {o99:.3} ms",
        o.qps, o.mean_ms, o.lost
    );
    println!(
        "  dnsmasq:      {:>9.0} q/s (mean {:.3} ms, lost {})  at {rate} q/s: p50 {t50:.3} ms, p99 {t99:.3} ms",
        t.qps, t.mean_ms, t.lost
    );
    println!(
        "  ratio: {:.2}x the queries per second; p99 {:.2}x dnsmasq's",
        o.qps / t.qps,
        o99 / t99
    );
    Ok(())
}
