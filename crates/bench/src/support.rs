//! Shared benchmark plumbing: an API server on loopback (in-process, or the
//! real `wasmkube server` as a child), percentiles, RSS.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmkube_apiserver::{ApiServer, Config};

/// An API server on a durable sled store in a temp dir, served on loopback.
pub struct Server {
    pub base: String,
    pub api: Arc<ApiServer>,
    _dir: tempfile::TempDir,
}

pub async fn start_server() -> anyhow::Result<Server> {
    let dir = tempfile::tempdir()?;
    let store = wasmkube_store::open_sled(dir.path())?;
    let api = ApiServer::start(store, Config::default()).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let serving = api.clone();
    tokio::spawn(async move { serving.serve(listener).await });
    Ok(Server {
        base,
        api,
        _dir: dir,
    })
}

/// The `p`th percentile (0..=100) of sorted durations.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

pub fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// Resident set size of a process, in KiB.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    status_kib(pid, "VmRSS:")
}

/// The process's anonymous resident memory (heap, stacks, Wasm memory
/// slots): its RSS less the binary's and libraries' pages, which the page
/// cache shares and can drop.
pub fn rss_anon_kib(pid: u32) -> anyhow::Result<u64> {
    status_kib(pid, "RssAnon:")
}

fn status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .ok_or_else(|| anyhow::anyhow!("no {field}"))?;
    Ok(line.split_whitespace().nth(1).unwrap_or("0").parse()?)
}

pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The `wasmkube` binary to measure: `explicit`, or the one next to this.
pub fn wasmkube_binary(explicit: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let binary = match explicit {
        Some(b) => b,
        None => std::env::current_exe()?.with_file_name("wasmkube"),
    };
    anyhow::ensure!(
        binary.exists(),
        "{} not found: build it first (cargo build --release -p wasmkube)",
        binary.display()
    );
    Ok(binary)
}

/// A `wasmkube server` child process on a fresh data dir; killed on drop.
pub struct ChildServer {
    pub child: Child,
    pub url: String,
    binary: PathBuf,
    port: u16,
    flags: Vec<String>,
    /// Its data dir, kept across a restart and removed on drop.
    dir: tempfile::TempDir,
}

impl ChildServer {
    /// The loopback port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Starts the server and waits for `/readyz`; returns it with the time
    /// from exec to ready.
    pub async fn start(binary: &std::path::Path) -> anyhow::Result<(Self, Duration)> {
        Self::start_with(binary, &["--no-local-node"]).await
    }

    /// As [`ChildServer::start`], with these `server` flags (and the local
    /// node unless they say `--no-local-node`).
    pub async fn start_with(
        binary: &std::path::Path,
        flags: &[&str],
    ) -> anyhow::Result<(Self, Duration)> {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let flags: Vec<String> = flags.iter().map(|f| f.to_string()).collect();
        let started = Instant::now();
        let child = spawn_server(binary, port, dir.path(), &flags)?;
        let server = Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            binary: binary.to_owned(),
            port,
            flags,
            dir,
        };
        server.wait_ready(started).await?;
        Ok((server, started.elapsed()))
    }

    /// SIGKILLs the server; [`ChildServer::start_again`] brings it back.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// Starts the server again on the same address, data dir and flags
    /// (after [`ChildServer::kill`]); returns the time from exec to ready.
    pub async fn start_again(&mut self) -> anyhow::Result<Duration> {
        let started = Instant::now();
        self.child = spawn_server(&self.binary, self.port, self.dir.path(), &self.flags)?;
        self.wait_ready(started).await?;
        Ok(started.elapsed())
    }

    async fn wait_ready(&self, started: Instant) -> anyhow::Result<()> {
        let http = reqwest::Client::new();
        loop {
            if let Ok(r) = http.get(format!("{}/readyz", self.url)).send().await
                && r.status().is_success()
            {
                return Ok(());
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(120),
                "server not ready in 120 s"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    pub fn rss_mib(&self) -> f64 {
        rss_kib(self.child.id()).unwrap_or(0) as f64 / 1024.0
    }

    pub fn client(&self) -> anyhow::Result<kube::Client> {
        Ok(kube::Client::try_from(kube::Config::new(
            self.url.parse()?,
        ))?)
    }

    /// A server with its local node `node` (no pod network, service proxy
    /// or gateway) and its built-in registry at `registry`, once the node
    /// is Ready.
    pub async fn start_with_local_node(
        binary: &std::path::Path,
        node: &str,
        registry: &str,
    ) -> anyhow::Result<Self> {
        let (server, _) = Self::start_with(
            binary,
            &[
                "--node-name",
                node,
                "--no-pod-network",
                "--no-service-proxy",
                "--no-gateway",
                "--registry-listen",
                registry,
            ],
        )
        .await?;
        let nodes: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(server.client()?);
        let ready = kube::runtime::wait::await_condition(
            nodes,
            node,
            |n: Option<&k8s_openapi::api::core::v1::Node>| {
                n.and_then(|n| n.status.as_ref()?.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            },
        );
        tokio::time::timeout(Duration::from_secs(60), ready).await??;
        Ok(server)
    }

    /// The kubeconfig the server wrote for kubectl.
    pub fn kubeconfig(&self) -> std::path::PathBuf {
        self.dir.path().join("kubeconfig")
    }
}

impl Drop for ChildServer {
    /// SIGTERM first, so a server with a local node stops cleanly (its
    /// service proxy removes its rules and routes); SIGKILL after 10 s.
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `wasmkube server` child on loopback `port` with its data in `dir`.
fn spawn_server(
    binary: &std::path::Path,
    port: u16,
    dir: &std::path::Path,
    flags: &[String],
) -> anyhow::Result<Child> {
    Ok(Command::new(binary)
        .args([
            "server",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
        ])
        .arg(dir)
        // Benchmarks measure the cluster's own work on loopback; the
        // cost of TLS and RBAC is measured apart.
        .arg("--insecure-http")
        .args(flags)
        .env("RUST_LOG", "warn")
        // WASMKUBE_BENCH_SERVER_LOG=FILE keeps the server's log (appended
        // to, so a restarted server's log follows the first one's).
        .stderr(match std::env::var_os("WASMKUBE_BENCH_SERVER_LOG") {
            Some(path) => Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            ),
            None => Stdio::null(),
        })
        .spawn()?)
}

/// Any other child process of a benchmark; killed on drop.
pub struct KillOnDrop(pub Child);

impl KillOnDrop {
    pub fn rss_mib(&self) -> f64 {
        rss_kib(self.0.id()).unwrap_or(0) as f64 / 1024.0
    }

    pub fn rss_anon_mib(&self) -> f64 {
        rss_anon_kib(self.0.id()).unwrap_or(0) as f64 / 1024.0
    }

    /// The process's anonymous memory once it has stopped moving: read
    /// every half second until the last ten readings lie within a quarter
    /// of a MiB (the allocator hands freed pages back a while after the
    /// work that freed them ends), or for a minute at most.
    pub async fn settled_anon_mib(&self) -> f64 {
        let mut readings = std::collections::VecDeque::new();
        for _ in 0..120 {
            readings.push_back(self.rss_anon_mib());
            if readings.len() > 10 {
                readings.pop_front();
                let (lo, hi) = readings
                    .iter()
                    .fold((f64::MAX, f64::MIN), |(lo, hi), r| (lo.min(*r), hi.max(*r)));
                if hi - lo < 0.25 {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        readings.back().copied().unwrap_or_default()
    }
}

/// How many established TCP connections process `pid` holds to `port`
/// (its sockets, found through its file descriptors, in its network
/// namespace's TCP tables).
pub fn connections_to(pid: u32, port: u16) -> std::io::Result<usize> {
    let mut sockets = std::collections::HashSet::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let Ok(target) = std::fs::read_link(fd?.path()) else {
            continue;
        };
        if let Some(inode) = target
            .to_str()
            .and_then(|t| t.strip_prefix("socket:["))
            .and_then(|t| t.strip_suffix(']'))
            .and_then(|t| t.parse::<u64>().ok())
        {
            sockets.insert(inode);
        }
    }
    let mut established = 0;
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}"))?;
        for line in text.lines().skip(1) {
            // sl local_address rem_address st ... inode (the tenth field)
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(remote), Some(state), Some(inode)) =
                (fields.get(2), fields.get(3), fields.get(9))
            else {
                continue;
            };
            let remote_port = remote
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if *state == "01"
                && remote_port == Some(port)
                && inode.parse().is_ok_and(|i: u64| sockets.contains(&i))
            {
                established += 1;
            }
        }
    }
    Ok(established)
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What a run with the pod network leaves on the machine's own network:
/// the node's address in its pod CIDR on `lo` and the `unreachable` route
/// for that CIDR (an agent keeps both when it stops, as the node's). Taken
/// before the run; dropped, it removes what the run added and nothing that
/// was there before (declare it before the server, so it goes after it).
#[derive(Debug)]
pub struct NodeNetworkLeftovers {
    addresses: Vec<String>,
    routes: Vec<String>,
}

fn ip_lines(args: &[&str]) -> Vec<String> {
    Command::new("ip")
        .args(args)
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// `lo`'s IPv4 addresses with their prefix (`10.244.0.1/32`).
fn lo_addresses() -> Vec<String> {
    ip_lines(&["-o", "-4", "addr", "show", "dev", "lo"])
        .iter()
        .filter_map(|l| l.split_whitespace().skip_while(|w| *w != "inet").nth(1))
        .map(str::to_owned)
        .collect()
}

/// The destinations of `unreachable` routes (`10.244.0.0/24`).
fn unreachable_routes() -> Vec<String> {
    ip_lines(&["route", "show", "type", "unreachable"])
        .iter()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(str::to_owned)
        .collect()
}

impl NodeNetworkLeftovers {
    pub fn before() -> Self {
        Self {
            addresses: lo_addresses(),
            routes: unreachable_routes(),
        }
    }
}

impl Drop for NodeNetworkLeftovers {
    fn drop(&mut self) {
        for a in lo_addresses() {
            if !self.addresses.contains(&a) {
                let _ = Command::new("ip")
                    .args(["addr", "del", &a, "dev", "lo"])
                    .status();
            }
        }
        for r in unreachable_routes() {
            if !self.routes.contains(&r) {
                let _ = Command::new("ip")
                    .args(["route", "del", "unreachable", &r])
                    .status();
            }
        }
    }
}

/// Pods seen Running on a watch of one namespace, by name, with when.
#[derive(Clone)]
pub struct RunningPods {
    seen: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, Instant>>>,
    notify: std::sync::Arc<tokio::sync::Notify>,
}

impl RunningPods {
    /// Starts watching `pods`.
    pub fn watch(pods: kube::Api<k8s_openapi::api::core::v1::Pod>) -> Self {
        use futures::{StreamExt, TryStreamExt};
        use kube::runtime::{WatchStreamExt, watcher};
        let this = Self {
            seen: Default::default(),
            notify: Default::default(),
        };
        let (seen, notify) = (this.seen.clone(), this.notify.clone());
        let mut stream = watcher(pods, watcher::Config::default())
            .applied_objects()
            .boxed();
        tokio::spawn(async move {
            while let Ok(Some(p)) = stream.try_next().await {
                let running = p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
                if running && let Some(name) = p.metadata.name {
                    seen.lock()
                        .unwrap()
                        .entry(name)
                        .or_insert_with(Instant::now);
                    notify.notify_waiters();
                }
            }
        });
        this
    }

    /// When the watch first saw `name` Running.
    pub fn seen_at(&self, name: &str) -> Option<Instant> {
        self.seen.lock().unwrap().get(name).copied()
    }

    /// Waits until every one of `names` has been seen Running (2 minutes at
    /// most).
    pub async fn wait(&self, names: &[String]) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let wait = self.notify.notified();
            if names.iter().all(|n| self.seen_at(n).is_some()) {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "pods {names:?} not Running in 120 s"
            );
            let _ = tokio::time::timeout_at(deadline.into(), wait).await;
        }
    }
}
