//! Test support shared by the crates' tests: a real OCI distribution
//! registry (Debian's `docker-registry`, which `scripts/test.sh` installs)
//! started on a free loopback port and stopped on drop, etcd clusters on
//! loopback ([`etcd`]), and the paths of the example workloads built by
//! `scripts/build-workloads.sh`.

pub mod etcd;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `docker-registry` process serving on loopback.
#[derive(Debug)]
pub struct Registry {
    child: Child,
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Registry {
    /// An anonymous registry.
    pub fn start() -> Self {
        Self::spawn(None, [127, 0, 0, 1].into())
    }

    /// An anonymous registry on `ip` (an address of a network the test made).
    pub fn start_on(ip: std::net::IpAddr) -> Self {
        Self::spawn(None, ip)
    }

    /// A registry that needs a user name and password (htpasswd, bcrypt).
    pub fn with_login(user: &str, password: &str) -> Self {
        Self::spawn(Some((user, password)), [127, 0, 0, 1].into())
    }

    fn spawn(login: Option<(&str, &str)>, ip: std::net::IpAddr) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        // Find a free port; the registry binds it right after.
        let port = TcpListener::bind((ip, 0))
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let addr = SocketAddr::new(ip, port);
        let auth = match login {
            Some((user, password)) => {
                let hash = bcrypt::hash(password, 4).expect("bcrypt");
                let htpasswd = dir.path().join("htpasswd");
                std::fs::write(&htpasswd, format!("{user}:{hash}\n")).expect("htpasswd");
                format!(
                    "auth:\n  htpasswd:\n    realm: wasmkube-test\n    path: {}\n",
                    htpasswd.display()
                )
            }
            None => String::new(),
        };
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n{auth}",
                dir.path().join("data").display()
            ),
        )
        .expect("registry config");
        let child = Command::new(registry_binary())
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start docker-registry ({e}); scripts/test.sh installs it")
            });
        let registry = Self {
            child,
            addr,
            _dir: dir,
        };
        registry.wait_ready();
        registry
    }

    /// `IP:PORT`, the registry part of image references.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Polls `/v2/` until the registry answers (it takes ~0.1 s).
    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut s) = TcpStream::connect(self.addr) {
                let _ = s.write_all(b"GET /v2/ HTTP/1.0\r\nHost: r\r\n\r\n");
                let mut head = [0u8; 12];
                if s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.") {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "docker-registry did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn registry_binary() -> PathBuf {
    for p in ["/usr/bin/docker-registry", "/usr/sbin/docker-registry"] {
        if std::path::Path::new(p).exists() {
            return p.into();
        }
    }
    "docker-registry".into()
}

/// The repository root.
/// Checks a Prometheus metrics page with `promtool check metrics`
/// (Prometheus' own parser and linter; `scripts/test.sh` installs Debian's
/// `prometheus` for it); panics with what it said and the page.
pub fn promtool_check(page: &str) {
    use std::io::Write;
    let mut check = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus; scripts/test.sh installs it)");
    check
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(page.as_bytes())
        .expect("writing to promtool");
    let out = check.wait_with_output().expect("promtool's output");
    assert!(
        out.status.success(),
        "promtool: {}{}\n{page}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The Python of the tests' venv (the official Kubernetes client, oras),
/// `WASMKUBE_TEST_VENV` or `.venv` in the repository.
pub fn python() -> PathBuf {
    let venv = std::env::var_os("WASMKUBE_TEST_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".venv"));
    let python = venv.join("bin/python");
    assert!(
        python.exists(),
        "no Python venv at {}: run scripts/test.sh, which creates it",
        venv.display()
    );
    python
}

/// A gzipped tar of `files` (path, contents), each with `mode`: an image
/// layer.
pub fn tar_gz(files: &[(&str, &[u8])], mode: u32) -> Vec<u8> {
    use std::io::Write;
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_cksum();
        tar.append_data(&mut h, name, *data).expect("a tar entry");
    }
    let mut gz = tar.into_inner().expect("the tar");
    gz.flush().expect("gzip");
    gz.finish().expect("gzip")
}

/// A built example workload, `target` being `wasm32-wasip1` or
/// `wasm32-wasip2`.
pub fn workload_path(name: &str, target: &str) -> PathBuf {
    let path = repo_root()
        .join("workloads/target")
        .join(target)
        .join("release")
        .join(format!("{name}.wasm"));
    assert!(
        path.exists(),
        "{} is missing; build the workloads with scripts/build-workloads.sh",
        path.display()
    );
    path
}

/// The bytes of a built wasm32-wasip1 workload.
pub fn workload(name: &str) -> Vec<u8> {
    std::fs::read(workload_path(name, "wasm32-wasip1")).expect("reading the workload")
}

/// The bytes of a built wasm32-wasip2 workload (a component).
pub fn component(name: &str) -> Vec<u8> {
    std::fs::read(workload_path(name, "wasm32-wasip2")).expect("reading the workload")
}

/// A small Linux image made from the machine's static busybox (Debian's
/// `busybox-static`, which `scripts/test.sh` installs): `/bin/busybox` with
/// its applets as symlinks, `/etc/passwd` and `/etc/group` with root and
/// nobody, `/tmp`. `user` becomes the config's `User`. Returns the gzipped
/// layer and the image config, as a registry would hold them.
pub fn busybox_image(user: Option<&str>) -> (Vec<u8>, Vec<u8>) {
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("busybox is installed (scripts/test.sh installs busybox-static)");
    let binary = std::fs::read(busybox).expect("reading busybox");
    let mut tar = tar::Builder::new(Vec::new());
    let mut add = |path: &str, kind: tar::EntryType, mode: u32, data: &[u8], link: Option<&str>| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(data.len() as u64);
        if let Some(target) = link {
            h.set_link_name(target).expect("link name");
        }
        tar.append_data(&mut h, path, data).expect("tar entry");
    };
    for dir in ["bin", "etc", "proc", "sys", "dev", "root", "www"] {
        add(dir, tar::EntryType::Directory, 0o755, &[], None);
    }
    add("tmp", tar::EntryType::Directory, 0o1777, &[], None);
    add("bin/busybox", tar::EntryType::Regular, 0o755, &binary, None);
    for applet in [
        "sh", "echo", "cat", "ls", "sleep", "id", "hostname", "env", "true", "false", "kill",
        "head", "tail", "wget", "httpd", "nc", "ps", "mkdir", "touch", "dd", "pwd", "test", "grep",
        "ip", "ifconfig", "rm", "tty", "stty", "tar",
    ] {
        add(
            &format!("bin/{applet}"),
            tar::EntryType::Symlink,
            0o777,
            &[],
            Some("busybox"),
        );
    }
    add(
        "etc/passwd",
        tar::EntryType::Regular,
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        None,
    );
    add(
        "etc/group",
        tar::EntryType::Regular,
        0o644,
        b"root:x:0:\nnogroup:x:65534:\n",
        None,
    );
    add(
        "www/index.html",
        tar::EntryType::Regular,
        0o644,
        b"hello from busybox httpd\n",
        None,
    );
    // busybox httpd runs it for `GET /cgi-bin/whoami`: who is asking.
    add("www/cgi-bin", tar::EntryType::Directory, 0o755, &[], None);
    add(
        "www/cgi-bin/whoami",
        tar::EntryType::Regular,
        0o755,
        b"#!/bin/sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\nclient %s\\n' \"$REMOTE_ADDR\"\n",
        None,
    );
    let layer = tar.into_inner().expect("tar");
    let diff_id = {
        use sha2::Digest;
        format!("sha256:{:x}", sha2::Sha256::digest(&layer))
    };
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&layer).expect("gzip");
    let layer = gz.finish().expect("gzip");
    let mut config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["sh"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    });
    if let Some(u) = user {
        config["config"]["User"] = u.into();
    }
    (layer, serde_json::to_vec(&config).expect("config"))
}

/// A network namespace a test makes (`ip netns add`, so the test needs
/// root) and removes on drop: a node of its own, whose routes and rules are
/// not the machine's.
#[derive(Debug)]
pub struct TestNetns(String);

impl TestNetns {
    /// A namespace named `name` and this process's id.
    pub fn new(name: &str) -> Self {
        let name = format!("{name}-{}", std::process::id());
        let made = std::process::Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("iproute2");
        assert!(made.success(), "ip netns add {name} (the test needs root)");
        Self(name)
    }

    pub fn name(&self) -> &str {
        &self.0
    }

    /// Runs `f` on a thread inside the namespace; processes it starts, and
    /// threads and sockets it makes, are in the namespace too.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| {
                let file = std::fs::File::open(format!("/run/netns/{}", self.0)).unwrap();
                rustix::thread::move_into_link_name_space(
                    std::os::fd::AsFd::as_fd(&file),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )
                .unwrap();
                f()
            })
            .join()
            .unwrap()
        })
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "delete", &self.0])
            .status();
    }
}
