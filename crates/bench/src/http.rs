//! HTTP function throughput and latency: the `http-hello` component as a
//! pod on `wasmkube server`'s local node (a fresh instance per request),
//! loaded by keep-alive clients. The pod is measured in one run: on the
//! node-port fallback (`--no-pod-network`: the node's IP, a node port) and,
//! when the bench runs as root, at its own pod IP in its own network
//! namespace, through a ClusterIP Service in front of it (with `nft`: the
//! service proxy's DNAT on the node), through the built-in gateway (a
//! Gateway listener and an HTTPRoute to the Service) and, when Debian's
//! `nginx` is installed, through nginx as a reverse proxy to the same pod
//! (the gateway's peer). The function's peer, when installed, is `wasmtime
//! serve -S cli` on the same component in the same run (install it outside
//! CI: `cargo install wasmtime-cli --version 48.0.8 --locked`).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use kube::runtime::wait::await_condition;
use serde_json::json;

use crate::support::{ChildServer, free_port, ms, percentile, wasmkube_binary};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Concurrent keep-alive clients.
    #[arg(long, default_value = "32")]
    clients: usize,
    /// How long each side is loaded.
    #[arg(long, default_value = "10")]
    seconds: f64,
    /// The `wasmtime` CLI to measure as the peer [default: `wasmtime` on PATH].
    #[arg(long)]
    wasmtime: Option<PathBuf>,
    /// The wasmkube binary to measure (default: next to this one).
    #[arg(long)]
    binary: Option<PathBuf>,
}

/// Rounds two targets compared in one run take turns in (each a quarter
/// of `--seconds`): the pod IP and the ClusterIP, the gateway and nginx.
const INTERLEAVED_ROUNDS: usize = 4;

/// Loads of one target over several equal rounds: the mean rate and every
/// latency.
#[derive(Default)]
struct Rounds {
    rates: Vec<f64>,
    latencies: Vec<Duration>,
}

impl Rounds {
    fn add(&mut self, (rate, latencies): (f64, Vec<Duration>)) {
        self.rates.push(rate);
        self.latencies.extend(latencies);
    }

    fn total(mut self) -> (f64, Vec<Duration>) {
        self.latencies.sort();
        let rate = self.rates.iter().sum::<f64>() / self.rates.len().max(1) as f64;
        (rate, self.latencies)
    }
}

/// Loads `url` for `seconds` with `clients` keep-alive clients; returns
/// requests per second and the sorted latencies.
/// `a` and `b` loaded in turns, [`INTERLEAVED_ROUNDS`] rounds of a
/// quarter of `seconds` each (`a` first in odd rounds, `b` in even ones),
/// so neither always runs first or last on a shared machine.
async fn interleaved(
    a: &str,
    b: &str,
    clients: usize,
    seconds: f64,
) -> anyhow::Result<((f64, Vec<Duration>), (f64, Vec<Duration>))> {
    let (mut at_a, mut at_b) = (Rounds::default(), Rounds::default());
    let seconds = seconds / INTERLEAVED_ROUNDS as f64;
    for round in 0..INTERLEAVED_ROUNDS {
        let a_first = round % 2 == 0;
        for first in [a_first, !a_first] {
            if first {
                at_a.add(load(a, clients, seconds).await?);
            } else {
                at_b.add(load(b, clients, seconds).await?);
            }
        }
    }
    Ok((at_a.total(), at_b.total()))
}

async fn load(url: &str, clients: usize, seconds: f64) -> anyhow::Result<(f64, Vec<Duration>)> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(clients)
        .build()?;
    // Warm up: the first requests link and cache the component.
    for _ in 0..20 {
        http.get(url)
            .send()
            .await?
            .error_for_status()?
            .bytes()
            .await?;
    }
    let until = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let workers = (0..clients).map(|_| {
        let (http, url) = (http.clone(), url.to_owned());
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < until {
                let t = Instant::now();
                let ok = match http.get(&url).send().await {
                    Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                    Err(_) => false,
                };
                anyhow::ensure!(ok, "a request failed");
                latencies.push(t.elapsed());
            }
            Ok(latencies)
        })
    });
    let mut all = Vec::new();
    for w in futures::future::join_all(workers).await {
        all.extend(w??);
    }
    let rate = all.len() as f64 / started.elapsed().as_secs_f64();
    all.sort();
    Ok((rate, all))
}

/// Why this run cannot give pods their own IPs, if it cannot.
fn pod_network_unavailable() -> Option<&'static str> {
    (!rustix::process::geteuid().is_root()).then_some("not root")
}

/// Runs http-hello as a pod serving port 8080 on `server`'s node; returns
/// the URL it answers at: its pod IP, or the node port its status names
/// when it shares the node's IP.
async fn serve(server: &ChildServer, image: &str) -> anyhow::Result<String> {
    let pods: Api<Pod> = Api::namespaced(server.client()?, "default");
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "http-hello", "labels": {"app": "http-hello"}},
        "spec": {"containers": [{"name": "web", "image": image, "ports": [{"containerPort": 8080}]}]},
    }))?;
    pods.create(&PostParams::default(), &pod).await?;
    let running = tokio::time::timeout(
        Duration::from_secs(60),
        await_condition(pods, "http-hello", |p: Option<&Pod>| {
            p.and_then(|p| p.status.as_ref()?.phase.as_deref()) == Some("Running")
        }),
    )
    .await??
    .ok_or_else(|| anyhow::anyhow!("the pod vanished"))?;
    let status = running.status.unwrap_or_default();
    let ip = status.pod_ip.unwrap_or_default();
    let node_port = status
        .conditions
        .unwrap_or_default()
        .into_iter()
        .find(|c| c.type_ == "wasmkube.dev/NodePorts")
        .and_then(|c| c.message)
        .and_then(|m| {
            let (_, rest) = m.split_once("web:8080->")?;
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse::<u16>()
                .ok()
        });
    Ok(format!("http://{ip}:{}/bench", node_port.unwrap_or(8080)))
}

/// Puts a ClusterIP Service `http-hello` (port 80) in front of the pod;
/// returns its cluster IP.
async fn expose(server: &ChildServer) -> anyhow::Result<String> {
    use k8s_openapi::api::core::v1::Service;
    let services: Api<Service> = Api::namespaced(server.client()?, "default");
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "http-hello"},
        "spec": {"selector": {"app": "http-hello"}, "ports": [{"port": 80, "targetPort": 8080}]},
    }))?;
    let svc = services.create(&PostParams::default(), &svc).await?;
    svc.spec
        .and_then(|s| s.cluster_ip)
        .ok_or_else(|| anyhow::anyhow!("the Service got no cluster IP"))
}

/// Asks `url` until it answers 200 (a route or rule being programmed).
async fn until_answered(url: &str) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = http.get(url).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!("{url} did not answer within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A Gateway of the built-in class with an HTTP listener on a free port of
/// the node's address (127.0.0.1) and an HTTPRoute to the Service; returns
/// the URL once the gateway answers there.
async fn route_through_gateway(server: &ChildServer) -> anyhow::Result<String> {
    use wasmkube_api::gateway_api::{Gateway, HTTPRoute};
    let client = server.client()?;
    let port = free_port()?;
    let gateway: Gateway = serde_json::from_value(json!({
        "metadata": {"name": "bench"},
        "spec": {"gatewayClassName": "wasmkube",
                 "listeners": [{"name": "http", "port": port, "protocol": "HTTP"}]},
    }))?;
    Api::<Gateway>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &gateway)
        .await?;
    let route: HTTPRoute = serde_json::from_value(json!({
        "metadata": {"name": "bench"},
        "spec": {"parentRefs": [{"name": "bench"}],
                 "rules": [{"backendRefs": [{"name": "http-hello", "port": 80}]}]},
    }))?;
    Api::<HTTPRoute>::namespaced(client, "default")
        .create(&PostParams::default(), &route)
        .await?;
    let url = format!("http://127.0.0.1:{port}/bench");
    until_answered(&url).await?;
    Ok(url)
}

/// nginx (Debian's) as a reverse proxy to `upstream` with keep-alive
/// connections to it, on a free loopback port: the gateway's peer.
struct Nginx {
    child: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Nginx {
    fn start(upstream: &str) -> anyhow::Result<Option<Self>> {
        let Ok(binary) = which("nginx") else {
            return Ok(None);
        };
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let d = dir.path().display();
        let config = format!(
            "worker_processes 2;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
               fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
               upstream pod {{ server {upstream}; keepalive 64; }}\n\
               server {{ listen 127.0.0.1:{port};\n\
                 location / {{ proxy_pass http://pod; proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }}\n}}\n"
        );
        let conf = dir.path().join("nginx.conf");
        std::fs::write(&conf, config)?;
        let child = Command::new(binary)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&conf)
            .args(["-g", "daemon off;"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        Ok(Some(Self {
            child,
            url: format!("http://127.0.0.1:{port}/bench"),
            _dir: dir,
        }))
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM is nginx's fast shutdown; its workers go with the master.
        let _ = rustix::process::kill_process(
            rustix::process::Pid::from_child(&self.child),
            rustix::process::Signal::TERM,
        );
        let _ = self.child.wait();
    }
}

/// A program on PATH or in the sbin directories (nginx lives in /usr/sbin).
fn which(name: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| anyhow::anyhow!("{name} not found"))
}

fn report(label: &str, rate: f64, latencies: &[Duration]) {
    println!(
        "  {label:<34} {rate:>8.0} req/s  p50 {}  p99 {}",
        ms(percentile(latencies, 50.0)),
        ms(percentile(latencies, 99.0))
    );
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let binary = wasmkube_binary(args.binary)?;
    let component = wasmkube_testkit::workload_path("http_hello", "wasm32-wasip2");
    let registry = wasmkube_testkit::Registry::start();
    let image = format!("{}/http-hello:v1", registry.host());
    wasmkube_oci::push_wasm(std::fs::read(&component)?, &image, &Default::default()).await?;
    println!(
        "HTTP function (http-hello), {} keep-alive clients, {} s each",
        args.clients, args.seconds
    );
    let (rate, lat) = {
        let (server, _) = ChildServer::start_with(
            &binary,
            &[
                "--node-name",
                "bench-http",
                "--no-pod-network",
                "--no-service-proxy",
                "--no-gateway",
            ],
        )
        .await?;
        let url = serve(&server, &image).await?;
        let (rate, lat) = load(&url, args.clients, args.seconds).await?;
        report("wasmkube pod at a node port", rate, &lat);
        (rate, lat)
    };
    if let Some(why) = pod_network_unavailable() {
        println!("  pod IP: not measured ({why})");
    } else {
        let leftovers = crate::support::NodeNetworkLeftovers::before();
        let measured = async {
            let proxy = wasmkube_proxy::check().is_ok();
            let mut flags = vec!["--node-name", "bench-http-ip"];
            if !proxy {
                flags.push("--no-service-proxy");
            }
            let (server, _) = ChildServer::start_with(&binary, &flags).await?;
            let url = serve(&server, &image).await?;
            let cluster_ip = expose(&server).await?;
            let (figures, through_service) = if proxy {
                let svc_url = format!("http://{cluster_ip}/bench");
                until_answered(&svc_url).await?;
                let (at_ip, at_svc) =
                    interleaved(&url, &svc_url, args.clients, args.seconds).await?;
                (at_ip, Some(at_svc))
            } else {
                (load(&url, args.clients, args.seconds).await?, None)
            };
            let gateway_url = route_through_gateway(&server).await?;
            let pod_addr = url
                .trim_start_matches("http://")
                .trim_end_matches("/bench")
                .to_owned();
            let (through_gateway, through_nginx) = match Nginx::start(&pod_addr)? {
                Some(nginx) => {
                    until_answered(&nginx.url).await?;
                    let (gw, ng) =
                        interleaved(&gateway_url, &nginx.url, args.clients, args.seconds).await?;
                    (gw, Some(ng))
                }
                None => (load(&gateway_url, args.clients, args.seconds).await?, None),
            };
            // The pod's namespace goes with its deletion, before the server.
            let pods: Api<Pod> = Api::namespaced(server.client()?, "default");
            pods.delete("http-hello", &Default::default()).await?;
            tokio::time::timeout(
                Duration::from_secs(60),
                await_condition(pods, "http-hello", |p: Option<&Pod>| p.is_none()),
            )
            .await??;
            anyhow::Ok((figures, through_service, through_gateway, through_nginx))
        }
        .await;
        drop(leftovers);
        let ((ip_rate, ip_lat), through_service, (gw_rate, gw_lat), through_nginx) = measured?;
        report("wasmkube pod at its pod IP", ip_rate, &ip_lat);
        println!(
            "  ratio pod IP/node port            {:.2}x req/s, p99 {:.2}x",
            ip_rate / rate,
            percentile(&ip_lat, 99.0).as_secs_f64() / percentile(&lat, 99.0).as_secs_f64()
        );
        match through_service {
            Some((svc_rate, svc_lat)) => {
                report("wasmkube pod through a ClusterIP", svc_rate, &svc_lat);
                println!(
                    "  ratio ClusterIP/pod IP            {:.2}x req/s, p99 {:.2}x",
                    svc_rate / ip_rate,
                    percentile(&svc_lat, 99.0).as_secs_f64()
                        / percentile(&ip_lat, 99.0).as_secs_f64()
                );
            }
            None => println!("  ClusterIP: not measured (no service proxy: `nft` missing)"),
        }
        report("wasmkube pod through the gateway", gw_rate, &gw_lat);
        match through_nginx {
            Some((nginx_rate, nginx_lat)) => {
                report("peer: through nginx", nginx_rate, &nginx_lat);
                println!(
                    "  ratio gateway/nginx               {:.2}x req/s, p99 {:.2}x",
                    gw_rate / nginx_rate,
                    percentile(&gw_lat, 99.0).as_secs_f64()
                        / percentile(&nginx_lat, 99.0).as_secs_f64()
                );
            }
            None => println!("  nginx: not installed; no gateway ratio (apt-get install nginx)"),
        }
    }
    let wasmtime = args.wasmtime.unwrap_or_else(|| PathBuf::from("wasmtime"));
    let peer_port = free_port()?;
    let peer = Command::new(&wasmtime)
        .args([
            "serve",
            "-S",
            "cli",
            "--addr",
            &format!("127.0.0.1:{peer_port}"),
        ])
        .arg(&component)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let Ok(mut peer) = peer else {
        println!(
            "  peer: `{}` is not installed; no ratio (see docs/benchmarks.md)",
            wasmtime.display()
        );
        return Ok(());
    };
    let url = format!("http://127.0.0.1:{peer_port}/bench");
    let ready = Instant::now();
    while reqwest::get(&url).await.is_err() {
        anyhow::ensure!(
            ready.elapsed() < Duration::from_secs(30),
            "wasmtime serve did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (peer_rate, peer_lat) = load(&url, args.clients, args.seconds).await?;
    let _ = peer.kill();
    let _ = peer.wait();
    report("peer: wasmtime serve -S cli", peer_rate, &peer_lat);
    println!(
        "  ratio wasmkube/wasmtime          {:.2}x req/s, p99 {:.2}x",
        rate / peer_rate,
        percentile(&lat, 99.0).as_secs_f64() / percentile(&peer_lat, 99.0).as_secs_f64()
    );
    Ok(())
}
