//! Real etcd clusters for tests: Debian's `etcd` (package `etcd-server`,
//! which `scripts/test.sh` installs), one or more members on free loopback
//! ports with their data in a temporary directory, killed and removed on
//! drop. Members can be killed and restarted to inject faults, and can
//! serve clients over TLS with client-certificate authentication. Health
//! and leadership are read from each member's plain-HTTP metrics listener.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One member: its addresses and, while it runs, its process.
#[derive(Debug)]
struct Member {
    name: String,
    client: SocketAddr,
    peer: SocketAddr,
    /// `/health` and `/metrics`, plain HTTP whatever the client URLs speak.
    metrics: SocketAddr,
    data_dir: PathBuf,
    child: Option<Child>,
}

/// The PEM files of a TLS member: its serving certificate and key, and the
/// CA its clients' certificates must be signed by.
#[derive(Clone, Debug)]
pub struct ServerTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub client_ca_file: PathBuf,
}

/// An etcd cluster on loopback.
#[derive(Debug)]
pub struct EtcdCluster {
    members: Vec<Member>,
    tls: Option<ServerTls>,
    initial_cluster: String,
    token: String,
    _dir: tempfile::TempDir,
}

fn free_port() -> SocketAddr {
    TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
}

fn etcd_binary() -> PathBuf {
    for p in ["/usr/bin/etcd", "/usr/local/bin/etcd"] {
        if std::path::Path::new(p).exists() {
            return p.into();
        }
    }
    "etcd".into()
}

impl EtcdCluster {
    /// Starts `members` members and waits until every one is healthy (has
    /// a leader).
    pub fn start(members: usize) -> Self {
        Self::start_with(members, None)
    }

    /// As [`EtcdCluster::start`], the members serving clients over TLS
    /// (`https://` endpoints) and accepting only clients with a
    /// certificate from `tls.client_ca_file`.
    pub fn start_tls(members: usize, tls: ServerTls) -> Self {
        Self::start_with(members, Some(tls))
    }

    fn start_with(members: usize, tls: Option<ServerTls>) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let members: Vec<Member> = (0..members.max(1))
            .map(|i| Member {
                name: format!("m{i}"),
                client: free_port(),
                peer: free_port(),
                metrics: free_port(),
                data_dir: dir.path().join(format!("m{i}")),
                child: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = Self {
            members,
            tls,
            initial_cluster,
            token: format!("wasmkube-test-{}", std::process::id()),
            _dir: dir,
        };
        for i in 0..cluster.members.len() {
            cluster.spawn(i);
        }
        for i in 0..cluster.members.len() {
            cluster.wait_healthy(i);
        }
        cluster
    }

    fn spawn(&mut self, i: usize) {
        let m = &self.members[i];
        let scheme = self.scheme();
        let mut command = Command::new(etcd_binary());
        if let Some(tls) = &self.tls {
            command
                .arg("--cert-file")
                .arg(&tls.cert_file)
                .arg("--key-file")
                .arg(&tls.key_file)
                .arg("--trusted-ca-file")
                .arg(&tls.client_ca_file)
                .arg("--client-cert-auth");
        }
        let child = command
            .arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&m.data_dir)
            .arg(format!("--listen-client-urls={scheme}://{}", m.client))
            .arg(format!("--advertise-client-urls={scheme}://{}", m.client))
            .arg(format!("--listen-metrics-urls=http://{}", m.metrics))
            .arg(format!("--listen-peer-urls=http://{}", m.peer))
            .arg(format!("--initial-advertise-peer-urls=http://{}", m.peer))
            .arg(format!("--initial-cluster={}", self.initial_cluster))
            .arg("--initial-cluster-state=new")
            .arg(format!("--initial-cluster-token={}", self.token))
            .arg("--logger=zap")
            .arg("--log-level=warn")
            .stdout(Stdio::null())
            // Kept beside its data (appended across restarts), for the
            // failure message of a member that never becomes healthy.
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.log_of(i))
                    .map(Stdio::from)
                    .unwrap_or_else(|_| Stdio::null()),
            )
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start etcd ({e}); scripts/test.sh installs it"));
        self.members[i].child = Some(child);
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    /// The members' client URLs.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("{}://{}", self.scheme(), m.client))
            .collect()
    }

    /// Kills member `i` (SIGKILL) and waits for it to be gone.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts member `i` again on its data and waits until it is healthy.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
        self.wait_healthy(i);
    }

    /// Which member leads now: the one whose `/metrics` reports
    /// `etcd_server_is_leader 1`.
    pub fn leader(&self) -> Option<usize> {
        (0..self.members.len()).find(|&i| {
            self.members[i].child.is_some()
                && http_get(self.members[i].metrics, "/metrics")
                    .is_some_and(|body| body.contains("\netcd_server_is_leader 1"))
        })
    }

    /// Each member's state, for a failure's message: running or not,
    /// healthy, leading, and the last lines of its log.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for (i, m) in self.members.iter().enumerate() {
            let health = http_get(m.metrics, "/health").unwrap_or_else(|| "no answer".into());
            let leads = http_get(m.metrics, "/metrics")
                .is_some_and(|b| b.contains("\netcd_server_is_leader 1"));
            let log = std::fs::read_to_string(self.log_of(i)).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(5).collect();
            out.push_str(&format!(
                "{}: running {}, health {}, leader {leads}; log ends:\n  {}\n",
                m.name,
                m.child.is_some(),
                health.trim(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n  ")
            ));
        }
        out
    }

    fn log_of(&self, i: usize) -> PathBuf {
        self._dir
            .path()
            .join(format!("{}.log", self.members[i].name))
    }

    /// Polls `/health` until the member answers healthy (it has a leader).
    /// The bound is generous: a member rejoining after a kill, on two
    /// cores shared with the rest of the suite, may wait out several
    /// elections.
    fn wait_healthy(&self, i: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let addr = self.members[i].metrics;
        loop {
            if http_get(addr, "/health").is_some_and(|body| body.contains("\"health\":\"true\"")) {
                return;
            }
            if Instant::now() >= deadline {
                let log = std::fs::read_to_string(self.log_of(i)).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                panic!(
                    "etcd member {} did not become healthy; its log ends:\n{}",
                    self.members[i].name,
                    tail.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

/// A plain HTTP/1.0 GET's body, if the server answered 200.
fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: etcd\r\n\r\n").as_bytes())
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.0 200")
        .then(|| body.to_owned())
        .or_else(|| head.starts_with("HTTP/1.1 200").then(|| body.to_owned()))
}
