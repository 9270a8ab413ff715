//! What the end-to-end tests share: the real `wasmkube` binary started on
//! a loopback port with its kubeconfig, kubectl runs, and waits that read
//! `kubectl get -w` rows.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub fn wasmkube() -> &'static str {
    env!("CARGO_BIN_EXE_wasmkube")
}

pub struct Server {
    pub child: Child,
    pub url: String,
    pub kubeconfig: PathBuf,
    pub data_dir: PathBuf,
    /// `IP:PORT` of its built-in registry (on a free loopback port).
    pub registry: Option<String>,
    /// Lines the server logged after it became ready.
    pub log: mpsc::Receiver<String>,
}

/// A control plane with no local node (pods go to simulated nodes).
pub fn start_server(data_dir: &Path) -> Server {
    start_server_with(data_dir, &[])
}

/// A control plane with no local node, and extra `server` flags.
pub fn start_server_with(data_dir: &Path, extra: &[&str]) -> Server {
    let mut args = vec!["--no-local-node"];
    args.extend_from_slice(extra);
    spawn_server(data_dir, &args)
}

/// A control plane with no local node listening on `listen` (to start a
/// server again where its clients expect it).
pub fn start_server_at(data_dir: &Path, listen: &str, extra: &[&str]) -> Server {
    let mut args = vec!["--no-local-node"];
    args.extend_from_slice(extra);
    spawn(&[wasmkube()], listen, data_dir, &args)
}

/// The whole cluster, local node included, with extra `server` flags. Its
/// pods share the machine's network and it runs no service proxy (the
/// machine's routes and rules stay as they are): both are tested in network
/// namespaces of their own (`pod_network.rs`).
pub fn start_cluster(data_dir: &Path, extra: &[&str]) -> Server {
    let mut args = vec!["--no-pod-network", "--no-service-proxy", "--no-gateway"];
    args.extend_from_slice(extra);
    spawn_server(data_dir, &args)
}

/// The whole cluster run inside network namespace `netns` (made by the
/// test), its API on `ip`, with pod networking on.
pub fn start_cluster_in(netns: &str, ip: &str, data_dir: &Path, extra: &[&str]) -> Server {
    spawn(
        // nsenter enters the network namespace only (`ip netns exec` would
        // also remount /sys, hiding the cgroup hierarchies runc needs).
        &["nsenter", &format!("--net=/run/netns/{netns}"), wasmkube()],
        &format!("{ip}:0"),
        data_dir,
        extra,
    )
}

fn spawn_server(data_dir: &Path, extra: &[&str]) -> Server {
    spawn(&[wasmkube()], "127.0.0.1:0", data_dir, extra)
}

fn spawn(command: &[&str], listen: &str, data_dir: &Path, extra: &[&str]) -> Server {
    let kubeconfig = data_dir.join("kubeconfig");
    let registry_flags: &[&str] = if extra
        .iter()
        .any(|a| a.starts_with("--registry-listen") || *a == "--no-registry")
    {
        &[]
    } else {
        &["--registry-listen", "127.0.0.1:0"]
    };
    let mut child = Command::new(command[0])
        .args(&command[1..])
        .args(["server", "--listen", listen, "--data-dir"])
        .arg(data_dir)
        .args(registry_flags)
        .args(extra)
        .arg("--write-kubeconfig")
        .arg(&kubeconfig)
        .env("RUST_LOG", "warn")
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn wasmkube");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut registry = None;
    let url = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("server became ready");
        if let Some(rest) = line.strip_prefix("wasmkube registry at ") {
            registry = rest.split_whitespace().next().map(str::to_owned);
        }
        if let Some(url) = line.strip_prefix("wasmkube is ready at ") {
            break url.trim().to_owned();
        }
    };
    Server {
        child,
        url,
        kubeconfig,
        data_dir: data_dir.to_owned(),
        registry,
        log: rx,
    }
}

impl Server {
    /// The cluster's join token, for `wasmkube agent --token`.
    pub fn join_token(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("tls/join-token"))
            .expect("the server keeps its join token")
            .trim()
            .to_owned()
    }

    /// SIGKILLs the server and reaps it.
    pub fn kill(&mut self) {
        self.child.kill().expect("kill the server");
        self.child.wait().expect("reap the server");
    }
}

/// Two API servers with no local node on one three-member etcd on loopback,
/// serving plain HTTP (`--insecure-http`): these tests are about the store
/// and failover, and the raw watches read plain HTTP.
pub struct HaCluster {
    pub a: Server,
    pub b: Server,
    pub etcd: wasmkube_testkit::etcd::EtcdCluster,
    /// The servers' data directories: keep them while the servers run.
    pub dirs: (tempfile::TempDir, tempfile::TempDir),
}

pub fn ha_cluster() -> HaCluster {
    let etcd = wasmkube_testkit::etcd::EtcdCluster::start(3);
    let endpoints = etcd.endpoints().join(",");
    let flags = ["--etcd-servers", endpoints.as_str(), "--insecure-http"];
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    HaCluster {
        a: start_server_with(dirs.0.path(), &flags),
        b: start_server_with(dirs.1.path(), &flags),
        etcd,
        dirs,
    }
}

/// One kube client per server, for a test's own concurrent clients (call
/// it inside their Tokio runtime).
pub fn kube_clients(servers: &[&Server]) -> Vec<kube::Client> {
    servers
        .iter()
        .map(|s| kube::Client::try_from(kube::Config::new(s.url.parse().unwrap())).unwrap())
        .collect()
}

/// Waits until `counter` (operations a test's clients completed) reaches
/// `n`.
pub fn reach(counter: &std::sync::atomic::AtomicUsize, n: usize, what: &str) {
    poll(what, Duration::from_secs(120), || {
        let done = counter.load(std::sync::atomic::Ordering::Relaxed);
        if done >= n {
            Ok(())
        } else {
            Err(format!("{done} done"))
        }
    })
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Out {
    pub ok: bool,
    /// The exit code (`None` when a signal ended kubectl).
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

#[track_caller]
pub fn kubectl(s: &Server, args: &[&str], stdin: Option<&str>) -> Out {
    let mut child = Command::new("kubectl")
        .args(args)
        .env("KUBECONFIG", &s.kubeconfig)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl is installed (scripts/test.sh installs it)");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    } else {
        drop(child.stdin.take());
    }
    // No kubectl call may hang a test: one still running after the
    // watchdog's bound is killed, and the failure names it.
    let pid = child.id();
    let (done, watchdog) = mpsc::channel::<()>();
    let bound = Duration::from_secs(150);
    let killer = std::thread::spawn(move || {
        let expired = watchdog.recv_timeout(bound).is_err();
        if expired {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
        expired
    });
    let out = child.wait_with_output().unwrap();
    let _ = done.send(());
    assert!(
        !killer.join().unwrap_or(false),
        "kubectl {args:?} did not finish within {bound:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Out {
        ok: out.status.success(),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[track_caller]
pub fn ok(s: &Server, args: &[&str], stdin: Option<&str>) -> String {
    let out = kubectl(s, args, stdin);
    assert!(
        out.ok,
        "kubectl {args:?} failed: {}{}",
        out.stdout, out.stderr
    );
    out.stdout
}

/// Waits for `what` (`node/x`) to exist and then for `condition` on it:
/// `kubectl wait --for=condition` gives up at once on an object that does
/// not exist yet (a node whose agent has not registered, say).
pub fn wait_for(s: &Server, what: &str, condition: &str, timeout: &str) {
    let timeout = format!("--timeout={timeout}");
    ok(s, &["wait", "--for=create", what, &timeout], None);
    ok(
        s,
        &["wait", &format!("--for={condition}"), what, &timeout],
        None,
    );
}

/// Polls `probe` until it returns `Some`, at most for `timeout`; for what
/// has no watch to wait on (a route or rule in place, a connection that
/// goes through). Panics with `what` and the last failure when it never
/// does.
pub fn poll<T>(what: &str, timeout: Duration, mut probe: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match probe() {
            Ok(v) => return v,
            Err(last) if Instant::now() >= deadline => {
                panic!("{what}: not within {timeout:?}; last: {last}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Reads lines from `kubectl get -w` until one satisfies `pred`.
pub fn watch_until(s: &Server, args: &[&str], trigger: impl FnOnce(), pred: impl Fn(&str) -> bool) {
    let mut child = Command::new("kubectl")
        .args(args)
        .env("KUBECONFIG", &s.kubeconfig)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // The first row printed means the watch is established.
    let first = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("kubectl get -w printed");
    assert!(first.starts_with("NAME"), "{first}");
    let _initial = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("initial row");
    trigger();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if pred(&line) => break,
            Ok(line) => seen.push(line),
            Err(_) => panic!("kubectl get -w never showed the change; saw {seen:?}"),
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Reads rows from `kubectl get -w`, the current state included, until one
/// satisfies `pred`.
pub fn watch_rows_until(s: &Server, args: &[&str], pred: impl Fn(&str) -> bool) {
    let mut child = Command::new("kubectl")
        .args(args)
        .env("KUBECONFIG", &s.kubeconfig)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) if pred(&line) => break,
            Ok(line) => seen.push(line),
            Err(_) => panic!("kubectl {args:?} never showed it; saw {seen:?}"),
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A `wasmkube` process joined to a test server; stopped on drop.
pub struct Joined(pub Child);

impl Drop for Joined {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `wasmkube COMMAND ARGS --kubeconfig <the server's>` (a command that
/// joins the cluster: `sim-nodes`, `scheduler`); stopped on drop.
pub fn join(s: &Server, command: &str, args: &[&str]) -> Joined {
    let child = Command::new(wasmkube())
        .arg(command)
        .args(args)
        .arg("--kubeconfig")
        .arg(&s.kubeconfig)
        .env("RUST_LOG", "warn")
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn wasmkube {command}: {e}"));
    Joined(child)
}

pub fn sim_nodes(s: &Server, args: &[&str]) -> Joined {
    join(s, "sim-nodes", args)
}

/// Pushes a built `wasm32-wasip1` workload to the server's built-in registry
/// as the README does: `wasmkube push FILE NAME:v1`, no registry named.
/// Returns the reference pods run.
pub fn push_builtin(s: &Server, name: &str) -> String {
    push_builtin_as(s, name, "wasm32-wasip1", name)
}

/// As [`push_builtin`], for the built workload `file` of `target`, as
/// `NAME:v1`.
pub fn push_builtin_as(s: &Server, file: &str, target: &str, name: &str) -> String {
    let registry = s
        .registry
        .as_deref()
        .expect("the server serves its registry");
    let out = Command::new(wasmkube())
        .arg("push")
        .arg(wasmkube_testkit::workload_path(file, target))
        .arg(format!("{name}:v1"))
        .env("WASMKUBE_REGISTRY", registry)
        .env("KUBECONFIG", &s.kubeconfig)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reference = format!("{registry}/{name}:v1");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!("pushed {reference}")),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    reference
}

/// Pushes a built workload with `wasmkube push` as `NAME:v1` (`--insecure`:
/// test registries speak plain HTTP, also off loopback); `target` is
/// `wasm32-wasip1` (modules) or `wasm32-wasip2` (components), `file` the
/// built file's stem. Returns the reference.
pub fn push_as(
    registry: &wasmkube_testkit::Registry,
    file: &str,
    target: &str,
    name: &str,
) -> String {
    let reference = format!("{}/{name}:v1", registry.host());
    let out = Command::new(wasmkube())
        .arg("push")
        .arg("--insecure")
        .arg(wasmkube_testkit::workload_path(file, target))
        .arg(&reference)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let digest = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        digest.starts_with("sha256:") && digest.len() == 71,
        "{digest}"
    );
    reference
}

/// A `kubectl port-forward TARGET :PORT`, stopped on drop.
pub struct PortForward {
    child: Child,
    /// The local port kubectl listens on.
    pub local: u16,
}

impl PortForward {
    /// Starts kubectl and waits for it to say where it listens.
    pub fn start(s: &Server, target: &str, port: u16) -> Self {
        let mut child = Command::new("kubectl")
            .args(["port-forward", target, &format!(":{port}")])
            .env("KUBECONFIG", &s.kubeconfig)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        // The first line within a bound; then kubectl prints a line per
        // connection: keep reading, or it dies of a broken pipe.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut first = String::new();
            let _ = stdout.read_line(&mut first);
            let _ = tx.send(first);
            for _ in stdout.lines().map_while(Result::ok) {}
        });
        let line = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_default();
        // "Forwarding from 127.0.0.1:LOCAL -> PORT"
        let local = line
            .split_once("127.0.0.1:")
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .and_then(|p| p.parse().ok());
        let Some(local) = local else {
            let _ = child.kill();
            let mut err = String::new();
            let _ = std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err);
            panic!("kubectl port-forward printed {line:?}: {err}");
        };
        Self { child, local }
    }
}

impl PortForward {
    /// Stops kubectl and returns what it printed on stderr (for a failure's
    /// message).
    pub fn stop(mut self) -> String {
        let _ = self.child.kill();
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        err
    }
}

impl Drop for PortForward {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `command` (a kubectl command line) with a terminal of its own, as
/// a user types it (kubectl asks the container for a terminal only from
/// one, so `script` gives it one), with `input` typed ahead and then the
/// input's end; what the terminal showed.
pub fn on_a_terminal(s: &Server, command: &str, input: &[u8]) -> String {
    let mut script = Command::new("script")
        .args(["-q", "-e", "-c", command, "/dev/null"])
        .env("KUBECONFIG", &s.kubeconfig)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    script.stdin.take().unwrap().write_all(input).unwrap();
    let out = script.wait_with_output().unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
