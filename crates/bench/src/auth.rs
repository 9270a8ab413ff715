//! The cost of security: the same API server (in process, on sled) with
//! TLS, authentication and RBAC against one serving plain HTTP with
//! authorization off (and one with TLS alone, to tell the two costs
//! apart), in alternating rounds of one run. The secure client
//! is an ordinary user (a client certificate bound to `edit` in its
//! namespace), so every request is decided by RBAC, not by the
//! `system:masters` shortcut. Measured: create throughput with concurrent
//! clients, create-to-watch-event latency, and TLS handshakes per second
//! on new connections.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, PostParams, WatchParams};
use wasmkube_pki::{Ca, Identity, ServingNames};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Concurrent clients for the create rounds.
    #[arg(long, default_value = "64")]
    clients: usize,
    /// Objects created per round.
    #[arg(long, default_value = "5000")]
    objects: usize,
    /// Rounds of each (secure and plain alternate).
    #[arg(long, default_value = "3")]
    rounds: usize,
    /// Creates whose watch event is timed, per round.
    #[arg(long, default_value = "200")]
    latency_samples: usize,
    /// New connections (TLS handshakes) timed.
    #[arg(long, default_value = "500")]
    handshakes: usize,
}

struct Served {
    client: kube::Client,
    /// A client with no connection reuse: every request a new connection.
    fresh: kube::Client,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    _dir: tempfile::TempDir,
}

fn kubeconfig(url: &str, ca: Option<&Ca>, who: Option<&wasmkube_pki::Issued>) -> String {
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let ca = ca
        .map(|c| format!("\n    certificate-authority-data: {}", b64(c.cert_pem())))
        .unwrap_or_default();
    let user = match who {
        Some(i) => format!(
            "\n    client-certificate-data: {}\n    client-key-data: {}",
            b64(&i.cert_pem),
            b64(&i.key_pem)
        ),
        None => " {}".into(),
    };
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {url}{ca}\ncontexts:\n- name: c\n  context: {{cluster: c, user: u, namespace: bench}}\ncurrent-context: c\nusers:\n- name: u\n  user:{user}\n"
    )
}

async fn client_from(text: &str, reuse: bool) -> anyhow::Result<kube::Client> {
    let kc = kube::config::Kubeconfig::from_yaml(text)?;
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
    if reuse {
        return Ok(kube::Client::try_from(config)?);
    }
    // No pooled connections: each request dials (and handshakes) anew.
    use kube::client::ConfigExt;
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    let connector = config.rustls_https_connector_with_connector(http)?;
    let client: hyper_util::client::legacy::Client<_, kube::client::Body> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build(connector);
    let service = tower::ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(config.auth_layer()?)
        .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
        .service(client);
    Ok(kube::Client::new(service, config.default_namespace))
}

/// How a server is run.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// TLS, authentication and RBAC.
    Secure,
    /// TLS alone: every request allowed.
    Tls,
    /// Plain HTTP, every request allowed.
    Plain,
}

/// An API server on a fresh sled store, and a client that is a user with
/// `edit` in `bench`.
async fn serve(mode: Mode) -> anyhow::Result<Served> {
    use wasmkube_apiserver::{ApiServer, Authentication, Config};
    let dir = tempfile::tempdir()?;
    let store = wasmkube_store::open_sled(dir.path())?;
    let ca = (mode != Mode::Plain)
        .then(|| Ca::create("bench-ca"))
        .transpose()?;
    let config = Config {
        authentication: (mode == Mode::Secure).then(Authentication::default),
        ca: None,
        ..Default::default()
    };
    let api = ApiServer::start(store, config).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (admin_text, user_text, task) = match &ca {
        Some(ca) => {
            let names = ServingNames {
                dns: vec!["localhost".into()],
                ips: vec![addr.ip()],
            };
            let serving = ca.issue_serving("bench", &names)?;
            let tls = ca.server_tls(&serving)?;
            let api = api.clone();
            let task = tokio::spawn(async move { api.serve_tls(listener, tls).await });
            let url = format!("https://{addr}");
            let day = Duration::from_secs(86400);
            let admin = ca.issue_client(&Identity::new("admin", &["system:masters"]), day)?;
            let user = ca.issue_client(&Identity::new("bench-user", &[]), day)?;
            (
                kubeconfig(&url, Some(ca), Some(&admin)),
                kubeconfig(&url, Some(ca), Some(&user)),
                task,
            )
        }
        None => {
            let api = api.clone();
            let task = tokio::spawn(async move { api.serve(listener).await });
            let url = format!("http://{addr}");
            let text = kubeconfig(&url, None, None);
            (text.clone(), text, task)
        }
    };
    // The namespace and the user's grant, made as the administrator.
    let admin = client_from(&admin_text, true).await?;
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(admin.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({"metadata": {"name": "bench"}}))?,
        )
        .await?;
    let bindings: Api<k8s_openapi::api::rbac::v1::RoleBinding> = Api::namespaced(admin, "bench");
    bindings
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({
                "metadata": {"name": "bench-edit"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "edit"},
                "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "bench-user"}],
            }))?,
        )
        .await?;
    Ok(Served {
        client: client_from(&user_text, true).await?,
        fresh: client_from(&user_text, false).await?,
        task,
        _dir: dir,
    })
}

fn config_map(name: &str) -> anyhow::Result<ConfigMap> {
    Ok(serde_json::from_value(serde_json::json!({
        "metadata": {"name": name}, "data": {"k": "v"},
    }))?)
}

async fn create_rate(
    client: &kube::Client,
    round: usize,
    clients: usize,
    objects: usize,
) -> anyhow::Result<f64> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "bench");
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (api, next) = (api.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= objects {
                    return Ok::<_, anyhow::Error>(());
                }
                api.create(
                    &PostParams::default(),
                    &config_map(&format!("r{round}-{i}"))?,
                )
                .await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(objects as f64 / started.elapsed().as_secs_f64())
}

/// Create-to-watch-event latencies (one create at a time).
async fn watch_latencies(
    client: &kube::Client,
    round: usize,
    samples: usize,
) -> anyhow::Result<Vec<Duration>> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "bench");
    let mut events = api
        .watch(&WatchParams::default().labels("latency=yes"), "0")
        .await?
        .boxed();
    let mut out = Vec::with_capacity(samples);
    for i in 0..samples {
        let mut cm = config_map(&format!("lat-{round}-{i}"))?;
        cm.metadata.labels = Some([("latency".to_owned(), "yes".to_owned())].into());
        let started = Instant::now();
        api.create(&PostParams::default(), &cm).await?;
        loop {
            match events.next().await {
                Some(Ok(kube::api::WatchEvent::Added(got)))
                    if got.metadata.name == cm.metadata.name =>
                {
                    out.push(started.elapsed());
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => anyhow::bail!("watch failed: {e}"),
                None => anyhow::bail!("the watch ended"),
            }
        }
    }
    Ok(out)
}

async fn handshake_rate(fresh: &kube::Client, n: usize) -> anyhow::Result<f64> {
    let api: Api<ConfigMap> = Api::namespaced(fresh.clone(), "bench");
    let started = Instant::now();
    for _ in 0..n {
        api.get_opt("none").await?;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let servers = [
        serve(Mode::Secure).await?,
        serve(Mode::Tls).await?,
        serve(Mode::Plain).await?,
    ];
    let (mut rates, mut lat) = (
        [Vec::new(), Vec::new(), Vec::new()],
        [Vec::new(), Vec::new(), Vec::new()],
    );
    // Each round starts with another server: whichever runs first meets
    // the store flushes and allocator state the previous one left.
    for round in 0..args.rounds {
        for k in 0..servers.len() {
            let i = (round + k) % servers.len();
            let served = &servers[i];
            rates[i].push(create_rate(&served.client, round, args.clients, args.objects).await?);
            lat[i].extend(watch_latencies(&served.client, round, args.latency_samples).await?);
        }
    }
    let handshakes = [
        handshake_rate(&servers[0].fresh, args.handshakes).await?,
        handshake_rate(&servers[2].fresh, args.handshakes).await?,
    ];
    for served in servers {
        served.task.abort();
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    for l in &mut lat {
        l.sort();
    }
    println!(
        "TLS + authentication + RBAC against plain HTTP with authorization off, {} alternating rounds",
        args.rounds
    );
    println!(
        "creates ({} objects per round, {} clients; a user with edit in the namespace)",
        args.objects, args.clients
    );
    let names = ["secure  ", "TLS only", "plain   "];
    for (name, r) in names.iter().zip(&rates) {
        let rounds: Vec<f64> = r.iter().map(|r| r.round()).collect();
        println!(
            "  {name}   {:>9.0} objects/s  (rounds: {rounds:?})",
            mean(r)
        );
    }
    println!(
        "  secure/plain {:.2}   TLS only/plain {:.2}",
        mean(&rates[0]) / mean(&rates[2]),
        mean(&rates[1]) / mean(&rates[2])
    );
    println!("create -> watch event ({} samples each)", lat[0].len());
    for (name, l) in names.iter().zip(&lat) {
        println!(
            "  {name}   p50 {:.2} ms  p99 {:.2} ms",
            percentile(l, 0.5),
            percentile(l, 0.99)
        );
    }
    println!(
        "new connections ({} sequential requests, each on its own connection)",
        args.handshakes
    );
    println!("  TLS handshake + request  {:>7.0} per s", handshakes[0]);
    println!("  TCP connect + request    {:>7.0} per s", handshakes[1]);
    Ok(())
}
