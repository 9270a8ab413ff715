//! IP-per-pod networking end to end, on two simulated hosts: network
//! namespaces `host1` and `host2` the test makes, joined with the test's own
//! namespace through a bridge in a fourth (`lan`), so nothing of the
//! machine's network changes but one veth that goes with the namespaces.
//! `wasmkube server` runs in host1 with its local node, `wasmkube agent` in
//! host2; images come from a real registry on the test's end of the lan.
//! A busybox httpd Deployment (runc) and a Wasm HTTP function get their own
//! pod IPs on host1, pods reach each other on one host and across the two,
//! Wasm guests' own connections (outgoing `wasi:http`, `wasi:sockets`)
//! leave from their pod IPs, and deleting the pods leaves no namespace,
//! veth, mount or cgroup behind.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Server, ok, start_cluster_in, wasmkube, watch_rows_until};
use serde_json::json;
use wasmkube_testkit::{Registry, busybox_image};

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("iproute2");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ip_out(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("iproute2");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Two hosts and the test on one /24; removed on drop with everything the
/// agents made in them.
struct Lan {
    tag: String,
    subnet: u8,
}

impl Lan {
    fn new() -> Self {
        let pid = std::process::id();
        let tag = format!("{}", pid % 100_000);
        let subnet = (pid % 200) as u8 + 20;
        let lan = Self { tag, subnet };
        let (l, h1, h2) = (lan.ns("lan"), lan.ns("host1"), lan.ns("host2"));
        for ns in [&l, &h1, &h2] {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        ip(&["-n", &l, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &l, "link", "set", "br0", "up"]);
        // The test's own end: a veth whose peer is in the lan namespace.
        let mine = format!("wkt{}", lan.tag);
        ip(&[
            "link", "add", &mine, "type", "veth", "peer", "name", "to-test", "netns", &l,
        ]);
        ip(&[
            "addr",
            "add",
            &format!("{}/24", lan.addr(254)),
            "dev",
            &mine,
        ]);
        ip(&["link", "set", &mine, "up"]);
        for (ns, n, port) in [(&h1, 1, "to-h1"), (&h2, 2, "to-h2")] {
            ip(&[
                "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", port, "netns", &l,
            ]);
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{}/24", lan.addr(n)),
                "dev",
                "eth0",
            ]);
            ip(&["-n", ns, "link", "set", "eth0", "up"]);
        }
        for port in ["to-test", "to-h1", "to-h2"] {
            ip(&["-n", &l, "link", "set", port, "master", "br0"]);
            ip(&["-n", &l, "link", "set", port, "up"]);
        }
        lan
    }

    fn ns(&self, name: &str) -> String {
        format!("wkt-{name}-{}", self.tag)
    }

    fn addr(&self, host: u8) -> String {
        format!("10.199.{}.{host}", self.subnet)
    }

    /// Runs `busybox ARGS` inside a host's namespace.
    fn busybox_in(&self, host: &str, args: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.ns(host), "busybox"])
            .args(args)
            .output()
            .unwrap()
    }

    /// The namespace of the pod whose address is `pod_ip`.
    fn pod_netns_with(&self, pod_ip: &str) -> String {
        self.pod_namespaces()
            .into_iter()
            .find(|n| {
                ip_out(&["-n", n, "-4", "-o", "addr", "show", "dev", "eth0"])
                    .contains(&format!(" {pod_ip}/32 "))
            })
            .unwrap_or_else(|| panic!("no pod namespace has {pod_ip}"))
    }

    /// How many packets a host's kernel dropped for failing the reverse-path
    /// check (`IPReversePathFilter` of its `/proc/net/netstat`).
    fn reverse_path_drops(&self, host: &str) -> u64 {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns(host), "cat", "/proc/net/netstat"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let tcp_ext: Vec<&str> = text.lines().filter(|l| l.starts_with("TcpExt:")).collect();
        let [names, values] = tcp_ext[..] else {
            panic!("no TcpExt counters: {text}");
        };
        names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(name, _)| *name == "IPReversePathFilter")
            .and_then(|(_, v)| v.parse().ok())
            .expect("the IPReversePathFilter counter")
    }

    /// Pod namespaces the agents made that still exist.
    fn pod_namespaces(&self) -> Vec<String> {
        ip_out(&["netns", "list"])
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| {
                n.starts_with(&format!("wk-{}-", self.ns("host1")))
                    || n.starts_with(&format!("wk-{}-", self.ns("host2")))
            })
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for n in self.pod_namespaces() {
            let _ = Command::new("ip").args(["netns", "delete", &n]).status();
        }
        for ns in ["host1", "host2", "lan"] {
            let _ = Command::new("ip")
                .args(["netns", "delete", &self.ns(ns)])
                .status();
        }
    }
}

/// Removes the runc containers and overlay mounts under a test directory
/// (the agents do it themselves on a pod's deletion; this is for a test that
/// failed before it deleted its pods).
struct Containers(std::path::PathBuf);

impl Drop for Containers {
    fn drop(&mut self) {
        for state in ["server/node/linux/state", "agent/linux/state"] {
            let root = self.0.join(state);
            let listed = Command::new("runc")
                .arg("--root")
                .arg(&root)
                .args(["list", "--quiet"])
                .output();
            for id in listed
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default()
                .lines()
            {
                let _ = Command::new("runc")
                    .arg("--root")
                    .arg(&root)
                    .args(["delete", "--force", id])
                    .status();
            }
        }
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let prefix = self.0.to_string_lossy().into_owned();
        for m in mounts.lines().filter_map(|l| l.split(' ').nth(4)) {
            if m.starts_with(&prefix) {
                let _ = Command::new("umount").args(["-l", m]).status();
            }
        }
    }
}

struct Agent(Child);

impl Agent {
    /// SIGKILL, as a crash.
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The images the test runs, pushed to its registry.
struct Images {
    busybox: String,
    /// `http-hello`, an HTTP function.
    hello: String,
    /// `http-fetch`, an HTTP function calling `UPSTREAM` over `wasi:http`.
    fetch: String,
    /// `tcp-get`, a command connecting with `wasi:sockets`.
    tcp_get: String,
}

fn push(registry: &Registry) -> Images {
    let busybox = format!("{}/busybox:v1", registry.host());
    let (layer, config) = busybox_image(None);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let options = wasmkube_oci::PushOptions {
        insecure: vec![registry.host()],
        ..Default::default()
    };
    rt.block_on(wasmkube_oci::push_image(
        vec![layer],
        config,
        &busybox,
        &options,
    ))
    .unwrap();
    let wasm = |file: &str, name: &str| common::push_as(registry, file, "wasm32-wasip2", name);
    Images {
        hello: wasm("http_hello", "http-hello"),
        fetch: wasm("http_fetch", "http-fetch"),
        tcp_get: wasm("tcp-get", "tcp-get"),
        busybox,
    }
}

/// Whether the CGI script's answer names `ip` as the client (busybox
/// httpd listens on IPv6 and shows IPv4 clients mapped).
fn answered_to(response: &str, ip: &str) -> bool {
    response.ends_with(&format!("client {ip}\n"))
        || response.ends_with(&format!("client [::ffff:{ip}]\n"))
}

fn pod_ip(s: &Server, selector: &[&str]) -> String {
    let mut args = vec!["get", "pods"];
    args.extend_from_slice(selector);
    args.extend_from_slice(&["-o", "jsonpath={.items[0].status.podIP}"]);
    ok(s, &args, None)
}

fn wait_ready(s: &Server, what: &str) {
    checked(s, &["wait", "--for=condition=Ready", what, "--timeout=60s"]);
}

/// As `ok`, and on failure shows the pods as `kubectl describe` does.
#[track_caller]
fn checked(s: &Server, args: &[&str]) -> String {
    let out = common::kubectl(s, args, None);
    if !out.ok {
        let pods = common::kubectl(s, &["describe", "pods"], None);
        let logs = common::kubectl(s, &["logs", "deploy/web", "--previous"], None);
        eprintln!("web's log: {}{}", logs.stdout, logs.stderr);
        panic!(
            "kubectl {args:?} failed: {}{}\n{}",
            out.stdout, out.stderr, pods.stdout
        );
    }
    out.stdout
}

/// A shell line that sends `GET path` to `ip:8080` and prints the whole
/// response (busybox `nc`: the static busybox's `wget` crashes resolving).
fn http_get(ip: &str, path: &str) -> String {
    http_get_at(ip, 8080, path)
}

fn http_get_at(ip: &str, port: u16, path: &str) -> String {
    format!("printf 'GET {path} HTTP/1.0\\r\\nHost: pod\\r\\n\\r\\n' | nc -w 10 {ip} {port}")
}

/// A one-shot busybox pod on `node` fetching `path` from `ip:8080`; returns
/// the response (its log) once it has Succeeded.
fn fetch_from_pod(s: &Server, name: &str, node: &str, image: &str, ip: &str, path: &str) -> String {
    fetch_from_pod_at(s, name, node, image, ip, 8080, path)
}

fn fetch_from_pod_at(
    s: &Server,
    name: &str,
    node: &str,
    image: &str,
    ip: &str,
    port: u16,
    path: &str,
) -> String {
    let manifest = json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {"nodeName": node, "restartPolicy": "Never",
                 "containers": [{"name": "c", "image": image,
                                 "command": ["sh", "-c", http_get_at(ip, port, path)]}]},
    })
    .to_string();
    ok(s, &["apply", "-f", "-"], Some(&manifest));
    ok(
        s,
        &[
            "wait",
            "--for=jsonpath={.status.phase}=Succeeded",
            &format!("pod/{name}"),
            "--timeout=90s",
        ],
        None,
    );
    ok(s, &["logs", name], None)
}

/// The service proxy's table in a host's namespace.
fn nft_table(lan: &Lan, host: &str) -> String {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lan.ns(host),
            "nft",
            "list",
            "table",
            "ip",
            "wasmkube",
        ])
        .output()
        .expect("nft");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits until a host's service proxy has programmed a rule containing
/// `needle`.
fn wait_rules(lan: &Lan, host: &str, needle: &str) {
    common::poll(
        &format!("{host}'s rules with {needle:?}"),
        Duration::from_secs(30),
        || {
            let table = nft_table(lan, host);
            if table.contains(needle) {
                Ok(())
            } else {
                Err(table)
            }
        },
    );
}

/// Waits until no rule of a host's service proxy contains `needle`.
fn wait_rules_gone(lan: &Lan, host: &str, needle: &str) {
    common::poll(
        &format!("{host}'s rules without {needle:?}"),
        Duration::from_secs(30),
        || {
            let table = nft_table(lan, host);
            if table.contains(needle) {
                Err(table)
            } else {
                Ok(())
            }
        },
    );
}

fn cluster_ip(s: &Server, service: &str) -> String {
    ok(
        s,
        &["get", "svc", service, "-o", "jsonpath={.spec.clusterIP}"],
        None,
    )
}

/// `GET path` with a Host header from the test's own namespace: the status
/// and the body.
fn get_host(addr: &str, host: &str, path: &str) -> Result<(u16, String), String> {
    use std::io::{Read, Write};
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    let mut conn = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| e.to_string())?;
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    write!(conn, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut got = String::new();
    conn.read_to_string(&mut got).map_err(|e| e.to_string())?;
    let status = got
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status line in {got:?}"))?;
    let body = got
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// `GET /` from the test's own namespace; the whole response.
fn http_from_test(addr: &str) -> Result<String, String> {
    use std::io::{Read, Write};
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    let mut conn = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| e.to_string())?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    conn.write_all(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut got = String::new();
    conn.read_to_string(&mut got).map_err(|e| e.to_string())?;
    Ok(got)
}

#[test]
fn pods_get_their_own_ips_and_reach_each_other_on_one_host_and_across_two() {
    let lan = Lan::new();
    let registry = Registry::start_on(lan.addr(254).parse().unwrap());
    let images = push(&registry);
    let (busybox, hello) = (&images.busybox, &images.hello);
    let dir = tempfile::tempdir().unwrap();
    // Dropped after the server and agent (declared before them): whatever
    // containers a failed run left are removed.
    let _containers = Containers(dir.path().to_path_buf());
    let (host1, host2) = (lan.ns("host1"), lan.ns("host2"));
    let s = start_cluster_in(
        &host1,
        &lan.addr(1),
        &dir.path().join("server"),
        &[
            "--node-name",
            &host1,
            "--node-address",
            &lan.addr(1),
            "--insecure-registry",
            &registry.host(),
            // The built-in registry off loopback: TLS from the cluster CA.
            "--registry-listen",
            &format!("{}:0", lan.addr(1)),
            // A node lost is noticed in seconds (the node-loss phase).
            "--node-monitor-grace-period",
            "5",
            "--node-lease-duration-seconds",
            "4",
        ],
    );
    let spawn_agent = || {
        Agent(
            Command::new("nsenter")
                .arg(format!("--net=/run/netns/{host2}"))
                .args([wasmkube(), "agent", "--server", &s.url])
                .args(["--token", &s.join_token()])
                .args(["--name", &host2, "--address", &lan.addr(2), "--port", "0"])
                .args(["--insecure-registry", &registry.host()])
                .args(["--node-lease-duration-seconds", "4", "--data-dir"])
                .arg(dir.path().join("agent"))
                .env("RUST_LOG", "warn")
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    };
    let mut agent = spawn_agent();
    for node in [&host1, &host2] {
        common::wait_for(&s, &format!("node/{node}"), "condition=Ready", "60s");
    }
    let cidrs = ok(
        &s,
        &["get", "nodes", "-o", "jsonpath={.items[*].spec.podCIDR}"],
        None,
    );
    assert_eq!(cidrs.split_whitespace().count(), 2, "{cidrs}");

    // The built-in registry listens off loopback, so it speaks TLS from the
    // cluster CA: `wasmkube push` trusts it through the kubeconfig, and the
    // other host's node, which learns the registry from the API server,
    // pulls from it over TLS with the pod's service-account token.
    let builtin = common::push_builtin_as(&s, "hello", "wasm32-wasip1", "builtin-hello");
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "from-builtin"},
        "spec": {"nodeName": host2, "restartPolicy": "Never",
                 "containers": [{"name": "hello", "image": builtin}]},
    })
    .to_string();
    ok(&s, &["apply", "-f", "-"], Some(&pod));
    ok(
        &s,
        &[
            "wait",
            "--for=jsonpath={.status.phase}=Succeeded",
            "pod/from-builtin",
            "--timeout=60s",
        ],
        None,
    );
    assert_eq!(
        ok(&s, &["logs", "from-builtin"], None),
        "hello from wasmkube\n"
    );
    ok(&s, &["delete", "pod", "from-builtin"], None);
    let plain = std::process::Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!("http://{}/v2/", s.registry.as_deref().unwrap()))
        .output()
        .unwrap();
    assert_ne!(
        String::from_utf8_lossy(&plain.stdout),
        "401",
        "the registry off loopback does not speak plain HTTP"
    );

    // A busybox httpd Deployment on runc and a Wasm HTTP function, both on host1.
    let deployment = json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "web"}},
          "template": {"metadata": {"labels": {"app": "web"}},
            "spec": {"nodeName": host1, "terminationGracePeriodSeconds": 2, "containers": [{"name": "httpd", "image": busybox,
              "command": ["httpd", "-f", "-p", "8080", "-h", "/www"],
              "ports": [{"containerPort": 8080}],
              // Ready only once an exec probe ran in the container.
              "readinessProbe": {"exec": {"command": ["cat", "/www/index.html"]}, "periodSeconds": 1},
              "livenessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1}}]}}},
    })
    .to_string();
    ok(&s, &["apply", "-f", "-"], Some(&deployment));
    let function = json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "fn", "labels": {"app": "fn"}},
        "spec": {"nodeName": host1, "terminationGracePeriodSeconds": 2, "containers": [{"name": "hello", "image": hello,
          "env": [{"name": "GREETING", "value": "hi"}],
          "ports": [{"containerPort": 8080}],
          "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}, "periodSeconds": 1}}]},
    })
    .to_string();
    ok(&s, &["apply", "-f", "-"], Some(&function));
    checked(
        &s,
        &["rollout", "status", "deployment/web", "--timeout=30s"],
    );
    wait_ready(&s, "pod/fn");
    let web_ip = pod_ip(&s, &["-l", "app=web"]);
    let fn_ip = pod_ip(&s, &["-l", "app=fn"]);
    let pod_net = "10.244.";
    assert!(
        web_ip.starts_with(pod_net) && fn_ip.starts_with(pod_net),
        "{web_ip} {fn_ip}"
    );
    assert_ne!(web_ip, fn_ip);
    assert_ne!(web_ip, lan.addr(1));

    // `kubectl port-forward` reaches a Linux container at its own IP.
    {
        use std::io::{Read, Write};
        let forward = common::PortForward::start(&s, "deployment/web", 8080);
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", forward.local)).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        write!(conn, "GET / HTTP/1.0\r\n\r\n").unwrap();
        let mut got = String::new();
        let read = conn.read_to_string(&mut got);
        assert!(
            read.is_ok() && got.ends_with("\r\n\r\nhello from busybox httpd\n"),
            "{read:?} {got:?}; kubectl: {}",
            forward.stop()
        );
    }

    // `kubectl cp` both ways (tar through exec, stdin half-closed).
    {
        let web = ok(
            &s,
            &[
                "get",
                "pods",
                "-l",
                "app=web",
                "-o",
                "jsonpath={.items[0].metadata.name}",
            ],
            None,
        );
        let dir = tempfile::tempdir().unwrap();
        let local = dir.path().join("note.txt");
        std::fs::write(&local, "copied in\n").unwrap();
        checked(
            &s,
            &[
                "cp",
                local.to_str().unwrap(),
                &format!("{web}:/tmp/note.txt"),
            ],
        );
        assert_eq!(
            checked(&s, &["exec", &web, "--", "cat", "/tmp/note.txt"]),
            "copied in\n"
        );
        let back = dir.path().join("index.html");
        checked(
            &s,
            &[
                "cp",
                &format!("{web}:/www/index.html"),
                back.to_str().unwrap(),
            ],
        );
        assert_eq!(
            std::fs::read_to_string(&back).unwrap(),
            "hello from busybox httpd\n"
        );
        // A command the image lacks fails with runc's exit code and words.
        let missing = common::kubectl(&s, &["exec", &web, "--", "nosuch"], None);
        assert!(
            !missing.ok && missing.stderr.contains("executable file not found"),
            "{}",
            missing.stderr
        );
        assert!(
            missing.stderr.contains("command terminated with exit code"),
            "{}",
            missing.stderr
        );
        // The same while kubectl still streams stdin to it: the status
        // still reaches kubectl.
        let input = "x".repeat(4 << 20);
        let streaming = common::kubectl(&s, &["exec", "-i", &web, "--", "nosuch"], Some(&input));
        assert!(
            !streaming.ok
                && streaming
                    .stderr
                    .contains("command terminated with exit code"),
            "{}",
            streaming.stderr
        );
        // A copy whose tar fails part way: kubectl gets tar's error, not a
        // connection reset under it.
        let big = dir.path().join("big.bin");
        std::fs::write(&big, vec![7u8; 8 << 20]).unwrap();
        let refused = common::kubectl(
            &s,
            &[
                "cp",
                big.to_str().unwrap(),
                &format!("{web}:/nonexistent/dir/big.bin"),
            ],
            None,
        );
        assert!(
            !refused.ok && !refused.stderr.contains("1006"),
            "{}",
            refused.stderr
        );
    }

    // `kubectl attach` streams a running container's output from now on.
    {
        let talker = json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "talker"},
            "spec": {"nodeName": host1, "terminationGracePeriodSeconds": 1, "containers": [{
                "name": "talk", "image": busybox,
                "command": ["sh", "-c", "i=0; while true; do echo tick $i; i=$((i+1)); sleep 1; done"]}]},
        })
        .to_string();
        ok(&s, &["apply", "-f", "-"], Some(&talker));
        wait_ready(&s, "pod/talker");
        let mut attach = std::process::Command::new("kubectl")
            .args(["attach", "talker"])
            .env("KUBECONFIG", &s.kubeconfig)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = attach.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut ticks = Vec::new();
        while ticks.len() < 2 {
            let line = rx
                .recv_timeout(Duration::from_secs(20))
                .expect("kubectl attach printed the container's output");
            if line.starts_with("tick ") {
                ticks.push(line);
            }
        }
        let _ = attach.kill();
        let _ = attach.wait();
        let n = |l: &str| l["tick ".len()..].parse::<u64>().unwrap();
        assert_eq!(n(&ticks[1]), n(&ticks[0]) + 1, "{ticks:?}");
        ok(&s, &["delete", "pod", "talker", "--wait=false"], None);
    }

    // `kubectl run -i --rm`: kubectl's input reaches the process's stdin
    // (a pipe the agent keeps for `stdin: true`), which reads end-of-file
    // when it ends (stdinOnce).
    let out = common::kubectl(
        &s,
        &[
            "run",
            "reader",
            "-i",
            "--rm",
            "--restart=Never",
            &format!("--image={busybox}"),
            "--",
            "sh",
            "-c",
            "while read l; do echo \"got: $l\"; done; echo done",
        ],
        Some("one\ntwo\n"),
    );
    assert!(
        out.ok && out.stdout.contains("got: one\ngot: two\ndone\n"),
        "{}{}",
        out.stdout,
        out.stderr
    );
    // `kubectl run -it`: with a terminal of its own (kubectl asks for one
    // only from one, so `script` gives it one), the container runs on a
    // terminal the agent keeps, which the attach reaches; the input's end
    // is end-of-file to the shell.
    let printed = common::on_a_terminal(
        &s,
        &format!(
            "kubectl run term -it --rm --restart=Never --image={busybox} -- sh -c 'read l; [ -t 0 ] && [ -t 1 ] && echo on a terminal; echo \"got: $l\"'"
        ),
        b"typed\n",
    );
    assert!(
        printed.contains("on a terminal") && printed.contains("got: typed"),
        "{printed}"
    );

    // The host reaches both at their own IPs, on the same port.
    let got = lan.busybox_in("host1", &["sh", "-c", &http_get(&web_ip, "/")]);
    let got = String::from_utf8_lossy(&got.stdout).into_owned();
    assert!(
        got.ends_with("\r\n\r\nhello from busybox httpd\n"),
        "{got:?}"
    );
    let got = lan.busybox_in("host1", &["sh", "-c", &http_get(&fn_ip, "/from-host")]);
    let got = String::from_utf8_lossy(&got.stdout).into_owned();
    assert!(
        got.starts_with("HTTP/1.") && got.contains("/from-host"),
        "{got:?}"
    );

    // A Linux pod reaches the Wasm pod on the same host, and pods on host2
    // reach both across the hosts.
    let body = fetch_from_pod(&s, "local-client", &host1, busybox, &fn_ip, "/from-linux");
    assert!(body.contains("/from-linux"), "{body}");
    let body = fetch_from_pod(&s, "remote-web", &host2, busybox, &web_ip, "/");
    assert!(
        body.ends_with("\r\n\r\nhello from busybox httpd\n"),
        "{body}"
    );
    let body = fetch_from_pod(&s, "remote-fn", &host2, busybox, &fn_ip, "/across");
    assert!(body.contains("/across"), "{body}");
    // A pod in a user namespace of its own (`hostUsers: false`) has its
    // pod IP and reaches others the same: root in it is an id range of the
    // node.
    let manifest = json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "userns-client"},
        "spec": {"nodeName": host1, "restartPolicy": "Never", "hostUsers": false,
                 "containers": [{"name": "c", "image": busybox,
                                 "command": ["sh", "-c", format!("cat /proc/self/uid_map; {}", http_get(&web_ip, "/"))]}]},
    })
    .to_string();
    ok(&s, &["apply", "-f", "-"], Some(&manifest));
    ok(
        &s,
        &[
            "wait",
            "--for=jsonpath={.status.phase}=Succeeded",
            "pod/userns-client",
            "--timeout=90s",
        ],
        None,
    );
    let got = ok(&s, &["logs", "userns-client"], None);
    let map: Vec<&str> = got
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert!(
        map.len() == 3 && map[0] == "0" && map[1] != "0" && map[2] == "65536",
        "{got}"
    );
    assert!(got.ends_with("hello from busybox httpd\n"), "{got}");
    let remote_ip = ok(
        &s,
        &["get", "pod", "remote-fn", "-o", "jsonpath={.status.podIP}"],
        None,
    );
    assert!(
        remote_ip.starts_with(pod_net) && remote_ip != web_ip,
        "{remote_ip}"
    );

    // No pod passes as another: host1 drops what a pod sends from an
    // address that is not its own (strict reverse-path filtering on its
    // veth). The web pod's namespace is given the remote pod's address too
    // (as a pod with NET_ADMIN could), then pings host2 from each address.
    let web_ns = lan.pod_netns_with(&web_ip);
    let forged = format!("{remote_ip}/32");
    ip(&["-n", &web_ns, "addr", "add", &forged, "dev", "eth0"]);
    let ping_from = |source: &str, wait: &str| {
        Command::new("ip")
            .args(["netns", "exec", &web_ns, "busybox", "ping", "-c", "1"])
            .args(["-W", wait, "-I", source, &lan.addr(2)])
            .output()
            .unwrap()
    };
    let own = ping_from(&web_ip, "5");
    assert!(
        own.status.success(),
        "{}",
        String::from_utf8_lossy(&own.stdout)
    );
    let before = lan.reverse_path_drops("host1");
    let _ = ping_from(&remote_ip, "1");
    common::poll("the forged packet dropped", Duration::from_secs(10), || {
        let now = lan.reverse_path_drops("host1");
        if now > before {
            Ok(())
        } else {
            Err(format!("{now} drops"))
        }
    });
    ip(&["-n", &web_ns, "addr", "del", &forged, "dev", "eth0"]);

    // And the other way: Wasm guests reach the Linux pod, and their
    // connections leave from their own pod IPs (the httpd's CGI script
    // answers with the client's address). An HTTP function's outgoing
    // `wasi:http` request, on host1:
    let gateway = json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "gateway", "labels": {"app": "gateway"}},
        "spec": {"nodeName": host1, "terminationGracePeriodSeconds": 2, "containers": [{"name": "fetch", "image": images.fetch,
          "env": [{"name": "UPSTREAM", "value": format!("http://{web_ip}:8080")}],
          "ports": [{"containerPort": 8080}]}]},
    })
    .to_string();
    ok(&s, &["apply", "-f", "-"], Some(&gateway));
    wait_ready(&s, "pod/gateway");
    let gateway_ip = pod_ip(&s, &["-l", "app=gateway"]);
    let got = lan.busybox_in(
        "host1",
        &["sh", "-c", &http_get(&gateway_ip, "/cgi-bin/whoami")],
    );
    let got = String::from_utf8_lossy(&got.stdout).into_owned();
    assert!(
        got.contains("upstream 200\nclient ") && answered_to(&got, &gateway_ip),
        "{got:?}"
    );
    // A command's `wasi:sockets` connection, from host2 across the hosts:
    let client = json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "wasm-client"},
        "spec": {"nodeName": host2, "restartPolicy": "Never", "containers": [{"name": "get", "image": images.tcp_get,
          "args": [format!("{web_ip}:8080"), "/cgi-bin/whoami"]}]},
    })
    .to_string();
    ok(&s, &["apply", "-f", "-"], Some(&client));
    checked(
        &s,
        &[
            "wait",
            "--for=jsonpath={.status.phase}=Succeeded",
            "pod/wasm-client",
            "--timeout=60s",
        ],
    );
    let client_ip = ok(
        &s,
        &[
            "get",
            "pod",
            "wasm-client",
            "-o",
            "jsonpath={.status.podIP}",
        ],
        None,
    );
    let log = ok(&s, &["logs", "wasm-client"], None);
    assert!(
        client_ip.starts_with(pod_net) && answered_to(&log, &client_ip),
        "{client_ip}: {log:?}"
    );

    // Services. The busybox httpd and the Wasm function behind ClusterIP
    // Services: reached by cluster IP from the node itself, from a Linux pod
    // on the other host and from a Wasm guest's outgoing `wasi:http`.
    ok(
        &s,
        &[
            "expose",
            "deployment",
            "web",
            "--port=80",
            "--target-port=8080",
        ],
        None,
    );
    ok(
        &s,
        &[
            "expose",
            "pod",
            "fn",
            "--name=fn-svc",
            "--port=80",
            "--target-port=8080",
        ],
        None,
    );
    let web_vip = cluster_ip(&s, "web");
    let fn_vip = cluster_ip(&s, "fn-svc");
    // In the default service range, 10.96.0.0/12.
    let second_octet: u8 = web_vip.split('.').nth(1).unwrap().parse().unwrap();
    assert!(
        web_vip.starts_with("10.") && (96..112).contains(&second_octet),
        "{web_vip}"
    );
    for host in ["host1", "host2"] {
        wait_rules(&lan, host, &format!("{web_vip} . tcp . 80 : goto service-"));
        wait_rules(&lan, host, &format!("{fn_vip} . tcp . 80 : goto service-"));
    }
    let raw = lan.busybox_in("host1", &["sh", "-c", &http_get_at(&web_vip, 80, "/")]);
    let got = String::from_utf8_lossy(&raw.stdout).into_owned();
    assert!(
        got.ends_with("\r\n\r\nhello from busybox httpd\n"),
        "{got:?} {} routes: {} {}",
        String::from_utf8_lossy(&raw.stderr),
        ip_out(&["-n", &lan.ns("host1"), "route", "show", "table", "all"]),
        nft_table(&lan, "host1"),
    );
    // Hairpin: the only web pod reaches itself through its own Service
    // (masqueraded, or its reply would come from its own address).
    let own = checked(
        &s,
        &[
            "exec",
            "deploy/web",
            "--",
            "sh",
            "-c",
            &http_get_at(&web_vip, 80, "/"),
        ],
    );
    assert!(
        own.ends_with("\r\n\r\nhello from busybox httpd\n"),
        "{own:?} {}",
        nft_table(&lan, "host1")
    );
    let got = lan.busybox_in(
        "host1",
        &["sh", "-c", &http_get_at(&fn_vip, 80, "/via-service")],
    );
    let got = String::from_utf8_lossy(&got.stdout).into_owned();
    assert!(got.contains("/via-service"), "{got:?}");
    let body = fetch_from_pod_at(&s, "svc-client", &host2, busybox, &web_vip, 80, "/");
    assert!(
        body.ends_with("\r\n\r\nhello from busybox httpd\n"),
        "{body}"
    );
    // A Wasm HTTP function on host2 calling the Service's cluster IP.
    let caller = json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "svc-caller", "labels": {"app": "svc-caller"}},
        "spec": {"nodeName": host2, "terminationGracePeriodSeconds": 2, "containers": [{"name": "fetch", "image": images.fetch,
          "env": [{"name": "UPSTREAM", "value": format!("http://{web_vip}:80")}],
          "ports": [{"containerPort": 8080}]}]},
    })
    .to_string();
    ok(&s, &["apply", "-f", "-"], Some(&caller));
    wait_ready(&s, "pod/svc-caller");
    let caller_ip = pod_ip(&s, &["-l", "app=svc-caller"]);
    let got = lan.busybox_in(
        "host2",
        &["sh", "-c", &http_get(&caller_ip, "/cgi-bin/whoami")],
    );
    let got = String::from_utf8_lossy(&got.stdout).into_owned();
    // Pod to pod through a cluster IP keeps the caller's address.
    assert!(
        got.contains("upstream 200\nclient ") && answered_to(&got, &caller_ip),
        "{got:?}"
    );

    // Cluster DNS. A busybox pod on host2 asks the DNS its resolv.conf
    // names (its node's): a Service by its full name and by its short name
    // through the search path, a headless Service (the pod's own address)
    // and an ExternalName Service (a CNAME).
    ok(
        &s,
        &[
            "expose",
            "deployment",
            "web",
            "--name=web-headless",
            "--cluster-ip=None",
            "--port=8080",
        ],
        None,
    );
    ok(
        &s,
        &[
            "create",
            "service",
            "externalname",
            "web-alias",
            "--external-name=web.default.svc.cluster.local",
        ],
        None,
    );
    let script = "cat /etc/resolv.conf; \
        nslookup web.default.svc.cluster.local; nslookup web; \
        nslookup web-headless; nslookup web-alias; nslookup nope || echo nope: none";
    let manifest = json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "dns-client"},
        "spec": {"nodeName": host2, "restartPolicy": "Never",
                 "containers": [{"name": "c", "image": busybox, "command": ["sh", "-c", script]}]},
    })
    .to_string();
    ok(&s, &["apply", "-f", "-"], Some(&manifest));
    checked(
        &s,
        &[
            "wait",
            "--for=jsonpath={.status.phase}=Succeeded",
            "pod/dns-client",
            "--timeout=60s",
        ],
    );
    let answers = ok(&s, &["logs", "dns-client"], None);
    assert!(
        answers.starts_with("search default.svc.cluster.local svc.cluster.local cluster.local")
            && answers.contains("nameserver 10.96.0.10\noptions ndots:5\n"),
        "{answers}"
    );
    assert!(
        answers.contains(&format!("Address: {web_vip}")),
        "{answers}"
    );
    assert!(answers.contains(&format!("Address: {web_ip}")), "{answers}");
    assert!(
        answers.contains(
            "web-alias.default.svc.cluster.local\tcanonical name = web.default.svc.cluster.local"
        ),
        "{answers}"
    );
    // A Wasm function on host1 calls the Service by its short name: the
    // guest's lookup is answered in-process with the pod's search path.
    let by_name = json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "by-name", "labels": {"app": "by-name"}},
        "spec": {"nodeName": host1, "terminationGracePeriodSeconds": 2, "containers": [{"name": "fetch", "image": images.fetch,
          "env": [{"name": "UPSTREAM", "value": "http://web:80"}],
          "ports": [{"containerPort": 8080}]}]},
    })
    .to_string();
    ok(&s, &["apply", "-f", "-"], Some(&by_name));
    wait_ready(&s, "pod/by-name");
    let by_name_ip = pod_ip(&s, &["-l", "app=by-name"]);
    let got = lan.busybox_in("host1", &["sh", "-c", &http_get(&by_name_ip, "/")]);
    let got = String::from_utf8_lossy(&got.stdout).into_owned();
    assert!(
        got.contains("upstream 200\n") && got.contains("hello from busybox httpd"),
        "{got:?}"
    );

    // NodePort and LoadBalancer (ServiceLB: the nodes' addresses), reached
    // from the test's own namespace at either host's address.
    ok(
        &s,
        &[
            "expose",
            "deployment",
            "web",
            "--name=web-np",
            "--type=NodePort",
            "--port=80",
            "--target-port=8080",
        ],
        None,
    );
    ok(
        &s,
        &[
            "expose",
            "deployment",
            "web",
            "--name=web-lb",
            "--type=LoadBalancer",
            "--port=8081",
            "--target-port=8080",
        ],
        None,
    );
    let node_port: u16 = ok(
        &s,
        &[
            "get",
            "svc",
            "web-np",
            "-o",
            "jsonpath={.spec.ports[0].nodePort}",
        ],
        None,
    )
    .parse()
    .unwrap();
    let lb = common::poll(
        "web-lb's load-balancer addresses",
        Duration::from_secs(60),
        || {
            let ips = ok(
                &s,
                &[
                    "get",
                    "svc",
                    "web-lb",
                    "-o",
                    "jsonpath={.status.loadBalancer.ingress[*].ip}",
                ],
                None,
            );
            if ips.split_whitespace().count() == 2 {
                Ok(ips)
            } else {
                Err(ips)
            }
        },
    );
    assert_eq!(lb, format!("{} {}", lan.addr(1), lan.addr(2)));
    for host in [1, 2] {
        for port in [node_port, 8081] {
            let addr = format!("{}:{port}", lan.addr(host));
            let got = common::poll(&format!("GET {addr}"), Duration::from_secs(30), || {
                http_from_test(&addr)
            });
            assert!(
                got.ends_with("\r\n\r\nhello from busybox httpd\n"),
                "{addr}: {got:?}"
            );
        }
    }

    // `externalTrafficPolicy: Local`: the node port answers only on the
    // host with an endpoint (host1); host2 has none and drops the packet
    // (a load balancer in front would try another node), never forwarding
    // it to host1.
    ok(
        &s,
        &[
            "patch",
            "svc",
            "web-np",
            "-p",
            r#"{"spec":{"externalTrafficPolicy":"Local"}}"#,
        ],
        None,
    );
    wait_rules(&lan, "host2", &format!("tcp . {node_port} : drop"));
    let local = format!("{}:{node_port}", lan.addr(1));
    let got = common::poll(&format!("GET {local}"), Duration::from_secs(30), || {
        http_from_test(&local)
    });
    assert!(got.ends_with("hello from busybox httpd\n"), "{got:?}");
    let dropped = http_from_test(&format!("{}:{node_port}", lan.addr(2)));
    assert!(
        dropped.as_ref().is_err_and(|e| e.contains("timed out")),
        "host2 without a local endpoint answered: {dropped:?}"
    );

    // Endpoints on both hosts: a second replica of the function, on host2,
    // behind the same Service. Requests from host1 reach both; under
    // `sessionAffinity: ClientIP` a client sticks to one.
    let fn2 = json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "fn2", "labels": {"app": "fn"}},
        "spec": {"nodeName": host2, "terminationGracePeriodSeconds": 2, "containers": [{"name": "hello", "image": hello,
          "env": [{"name": "GREETING", "value": "ho"}],
          "ports": [{"containerPort": 8080}],
          "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}, "periodSeconds": 1}}]},
    })
    .to_string();
    ok(&s, &["apply", "-f", "-"], Some(&fn2));
    wait_ready(&s, "pod/fn2");
    let greetings = |requests: usize| -> std::collections::BTreeSet<String> {
        (0..requests)
            .filter_map(|_| {
                let got = lan.busybox_in("host1", &["sh", "-c", &http_get_at(&fn_vip, 80, "/")]);
                String::from_utf8_lossy(&got.stdout)
                    .lines()
                    .find_map(|l| l.strip_prefix("GREETING=").map(str::to_owned))
            })
            .collect()
    };
    common::poll(
        "both replicas answering through fn-svc",
        Duration::from_secs(30),
        || {
            let seen = greetings(20);
            if seen.len() == 2 {
                Ok(())
            } else {
                Err(format!("{seen:?}"))
            }
        },
    );
    ok(
        &s,
        &[
            "patch",
            "svc",
            "fn-svc",
            "-p",
            r#"{"spec":{"sessionAffinity":"ClientIP"}}"#,
        ],
        None,
    );
    wait_rules(&lan, "host1", "update @affinity-");
    let seen = greetings(20);
    assert_eq!(seen.len(), 1, "a client with affinity reached {seen:?}");

    // The built-in gateway (every node serves it): Ingress host and path
    // routing and TLS with a Secret's certificate, a Gateway's listener with
    // a 90/10 HTTPRoute split, header matches, response header filters, a
    // redirect, and a route to a missing Service (500 and ResolvedRefs=False
    // for that route only). The two replicas get a Service each.
    ok(
        &s,
        &[
            "patch",
            "svc",
            "fn-svc",
            "-p",
            r#"{"spec":{"sessionAffinity":"None"}}"#,
        ],
        None,
    );
    for (pod, greeting) in [("fn", "hi"), ("fn2", "ho")] {
        ok(
            &s,
            &["label", "pod", pod, &format!("greeting={greeting}")],
            None,
        );
        let svc = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": greeting},
            "spec": {"selector": {"greeting": greeting}, "ports": [{"port": 80, "targetPort": 8080}]}});
        ok(&s, &["apply", "-f", "-"], Some(&svc.to_string()));
    }
    let gateway_ip = lan.addr(1);
    let curl = |args: &[&str]| -> String {
        let out = Command::new("curl")
            .args(["-s", "--max-time", "20"])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let greeting_of = |body: &str| {
        body.lines()
            .find_map(|l| l.strip_prefix("GREETING="))
            .unwrap_or("none")
            .to_owned()
    };
    let ingress = json!({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
        "metadata": {"name": "shop"},
        "spec": {
            "tls": [{"hosts": ["secure.example"], "secretName": "secure-tls"}],
            "rules": [
                {"host": "a.example", "http": {"paths": [
                    {"path": "/", "pathType": "Prefix", "backend": {"service": {"name": "hi", "port": {"number": 80}}}},
                    {"path": "/two", "pathType": "Prefix", "backend": {"service": {"name": "ho", "port": {"number": 80}}}}]}},
                {"host": "secure.example", "http": {"paths": [
                    {"path": "/", "pathType": "Prefix", "backend": {"service": {"name": "ho", "port": {"number": 80}}}}]}}]}});
    ok(&s, &["apply", "-f", "-"], Some(&ingress.to_string()));
    let url = format!("http://{gateway_ip}/");
    common::poll("the Ingress routing", Duration::from_secs(30), || {
        let (a, two, b) = (
            greeting_of(&curl(&["-H", "Host: a.example", &url])),
            greeting_of(&curl(&["-H", "Host: a.example", &format!("{url}two/x")])),
            curl(&[
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-H",
                "Host: other.example",
                &url,
            ]),
        );
        if (a.as_str(), two.as_str(), b.as_str()) == ("hi", "ho", "404") {
            Ok(())
        } else {
            Err(format!(
                "a.example/ -> {a}, a.example/two/x -> {two}, other.example -> {b}"
            ))
        }
    });
    // `/twox` is not under the element-wise prefix `/two`.
    assert_eq!(
        greeting_of(&curl(&["-H", "Host: a.example", &format!("{url}twox")])),
        "hi"
    );
    common::poll("the Ingress's address", Duration::from_secs(30), || {
        let got = ok(
            &s,
            &[
                "get",
                "ingress",
                "shop",
                "-o",
                "jsonpath={.status.loadBalancer.ingress[*].ip}",
            ],
            None,
        );
        if got.split_whitespace().any(|ip| ip == gateway_ip) {
            Ok(())
        } else {
            Err(got)
        }
    });
    // TLS with a certificate from a Secret, chosen by SNI.
    let certs = dir.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    let (crt, key) = (certs.join("tls.crt"), certs.join("tls.key"));
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
        ])
        .args([
            "-subj",
            "/CN=secure.example",
            "-addext",
            "subjectAltName=DNS:secure.example",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&crt)
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    ok(
        &s,
        &[
            "create",
            "secret",
            "tls",
            "secure-tls",
            "--cert",
            crt.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
        ],
        None,
    );
    let resolve = format!("secure.example:443:{gateway_ip}");
    common::poll("TLS on the Ingress", Duration::from_secs(30), || {
        let got = curl(&[
            "--cacert",
            crt.to_str().unwrap(),
            "--resolve",
            &resolve,
            "https://secure.example/",
        ]);
        if greeting_of(&got) == "ho" {
            Ok(())
        } else {
            Err(got)
        }
    });
    let h2 = curl(&[
        "--http2",
        "-o",
        "/dev/null",
        "-w",
        "%{http_version}",
        "--cacert",
        crt.to_str().unwrap(),
        "--resolve",
        &resolve,
        "https://secure.example/",
    ]);
    assert_eq!(h2, "2", "HTTP/2 over TLS");

    // A Gateway of the built-in class with a listener on 8080, and routes.
    let gateway = json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": "gw"},
        "spec": {"gatewayClassName": "wasmkube", "listeners": [{"name": "web", "port": 8080, "protocol": "HTTP"}]}});
    let split = json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "split"},
        "spec": {"parentRefs": [{"name": "gw"}], "hostnames": ["split.example"], "rules": [
            {"matches": [{"headers": [{"name": "x-canary", "value": "yes"}]}],
             "filters": [{"type": "ResponseHeaderModifier", "responseHeaderModifier": {"add": [{"name": "x-route", "value": "canary"}]}}],
             "backendRefs": [{"name": "ho", "port": 80}]},
            {"matches": [{"path": {"type": "Exact", "value": "/old"}}],
             "filters": [{"type": "RequestRedirect", "requestRedirect": {"path": {"type": "ReplaceFullPath", "replaceFullPath": "/new"}, "statusCode": 301}}]},
            {"backendRefs": [{"name": "hi", "port": 80, "weight": 90}, {"name": "ho", "port": 80, "weight": 10}]}]}});
    let broken = json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "broken"},
        "spec": {"parentRefs": [{"name": "gw"}], "hostnames": ["broken.example"],
                 "rules": [{"backendRefs": [{"name": "missing", "port": 80}]}]}});
    for obj in [&gateway, &split, &broken] {
        ok(&s, &["apply", "-f", "-"], Some(&obj.to_string()));
    }
    let gw_url = format!("http://{gateway_ip}:8080");
    common::poll(
        "the HTTPRoute on the Gateway's listener",
        Duration::from_secs(30),
        || {
            let got = curl(&[
                "-i",
                "-H",
                "Host: split.example",
                "-H",
                "x-canary: yes",
                &format!("{gw_url}/"),
            ]);
            if greeting_of(&got) == "ho" && got.to_ascii_lowercase().contains("x-route: canary") {
                Ok(())
            } else {
                Err(got)
            }
        },
    );
    let redirect = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{redirect_url}",
        "-H",
        "Host: split.example",
        &format!("{gw_url}/old"),
    ]);
    assert_eq!(redirect, "301 http://split.example:8080/new");
    // 1,000 requests over one keep-alive connection (curl's URL range).
    let bodies = curl(&["-H", "Host: split.example", &format!("{gw_url}/[1-1000]")]);
    let (hi, ho) = (
        bodies.matches("GREETING=hi").count(),
        bodies.matches("GREETING=ho").count(),
    );
    assert_eq!(hi + ho, 1000, "every request answered");
    assert!((850..=950).contains(&hi), "a 90/10 split gave {hi}/{ho}");
    // The missing backend: 500 on its route only, and the condition says why.
    let code = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-H",
        "Host: broken.example",
        &format!("{gw_url}/"),
    ]);
    assert_eq!(code, "500");
    common::poll("the routes' status", Duration::from_secs(30), || {
        let conditions = |route: &str| {
            ok(
                &s,
                &[
                    "get",
                    "httproute",
                    route,
                    "-o",
                    "jsonpath={range .status.parents[*].conditions[*]}{.type}={.status}/{.reason} {end}",
                ],
                None,
            )
        };
        let (good, bad) = (conditions("split"), conditions("broken"));
        let attached = ok(
            &s,
            &[
                "get",
                "gateway",
                "gw",
                "-o",
                "jsonpath={.status.listeners[0].attachedRoutes} {.status.conditions[?(@.type==\"Programmed\")].status}",
            ],
            None,
        );
        if good.trim() == "Accepted=True/Accepted ResolvedRefs=True/ResolvedRefs"
            && bad.trim() == "Accepted=True/Accepted ResolvedRefs=False/BackendNotFound"
            && attached == "2 True"
        {
            Ok(())
        } else {
            Err(format!("split: {good}; broken: {bad}; gateway: {attached}"))
        }
    });
    for obj in [
        "ingress/shop",
        "httproute/split",
        "httproute/broken",
        "gateway/gw",
        "svc/hi",
        "svc/ho",
        "secret/secure-tls",
    ] {
        ok(&s, &["delete", obj], None);
    }
    common::poll(
        "the Gateway's listener closed",
        Duration::from_secs(30),
        || match std::net::TcpStream::connect_timeout(
            &format!("{gateway_ip}:8080").parse().unwrap(),
            Duration::from_secs(2),
        ) {
            Ok(_) => Err("still listening".into()),
            Err(_) => Ok(()),
        },
    );

    // A pod deleted while a request through its Service is in flight: the
    // request finishes (its connection keeps its translation; the HTTP
    // function drains before it stops), and the pod goes right after.
    let slow = json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "slow", "labels": {"app": "slow"}},
        "spec": {"nodeName": host1, "terminationGracePeriodSeconds": 30, "containers": [{"name": "hello", "image": hello,
          "ports": [{"containerPort": 8080}],
          "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}, "periodSeconds": 1}}]},
    })
    .to_string();
    ok(&s, &["apply", "-f", "-"], Some(&slow));
    wait_ready(&s, "pod/slow");
    ok(
        &s,
        &[
            "expose",
            "pod",
            "slow",
            "--name=slow-svc",
            "--port=80",
            "--target-port=8080",
        ],
        None,
    );
    let slow_vip = cluster_ip(&s, "slow-svc");
    wait_rules(
        &lan,
        "host1",
        &format!("{slow_vip} . tcp . 80 : goto service-"),
    );
    let in_flight = std::thread::scope(|scope| {
        let request = scope.spawn(|| {
            let out = lan.busybox_in(
                "host1",
                &["sh", "-c", &http_get_at(&slow_vip, 80, "/burn?ms=3000")],
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        });
        common::poll(
            "the slow request in flight",
            Duration::from_secs(30),
            || {
                let v: serde_json::Value = serde_json::from_str(&ok(
                &s,
                &[
                    "get",
                    "--raw",
                    "/apis/custom.metrics.k8s.io/v1beta2/namespaces/default/pods/slow/http_requests_in_flight",
                ],
                None,
            ))
            .map_err(|e| e.to_string())?;
                match v["items"][0]["value"].as_str() {
                    Some("0") | None => Err(v.to_string()),
                    Some(_) => Ok(()),
                }
            },
        );
        ok(&s, &["delete", "pod", "slow", "--wait=false"], None);
        request.join().unwrap()
    });
    assert!(
        in_flight.starts_with("HTTP/1.")
            && in_flight.contains(" 200 ")
            && in_flight.contains("burned 3000 ms"),
        "{in_flight:?}"
    );
    checked(&s, &["wait", "--for=delete", "pod/slow", "--timeout=30s"]);
    ok(&s, &["delete", "svc", "slow-svc"], None);

    // An agent killed with SIGKILL leaves the rules in the kernel, so
    // routing goes on; once restarted it rewrites the table from scratch,
    // and a Service deleted meanwhile leaves nothing behind.
    agent.kill();
    ok(&s, &["delete", "svc", "web-np"], None);
    let addr = format!("{}:8081", lan.addr(2));
    let got = http_from_test(&addr).unwrap();
    assert!(got.ends_with("hello from busybox httpd\n"), "{got:?}");
    agent = spawn_agent();
    wait_rules_gone(&lan, "host2", &format!("tcp . {node_port} :"));
    wait_rules_gone(&lan, "host1", &format!("tcp . {node_port} :"));
    let got = common::poll(&format!("GET {addr}"), Duration::from_secs(30), || {
        http_from_test(&addr)
    });
    assert!(got.ends_with("hello from busybox httpd\n"), "{got:?}");
    let table = nft_table(&lan, "host2");
    assert!(
        !table.contains(&format!(" {node_port} ")),
        "host2 still has node port {node_port}:\n{table}"
    );

    // `kubectl exec` through the API server and the agent, over the
    // WebSocket protocol: output, stderr and the exit code; stdin; a
    // terminal; a Wasm container refused with the reason.
    let out = common::kubectl(
        &s,
        &[
            "exec",
            "deploy/web",
            "--",
            "sh",
            "-c",
            "echo out $(hostname); echo err >&2; exit 3",
        ],
        None,
    );
    assert_eq!(out.code, Some(3), "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.starts_with("out web-"), "{}", out.stdout);
    assert!(out.stderr.starts_with("err\n"), "{}", out.stderr);
    assert!(
        out.stderr.contains("command terminated with exit code 3"),
        "{}",
        out.stderr
    );
    let out = ok(
        &s,
        &["exec", "-i", "deploy/web", "--", "cat"],
        Some("through stdin\n"),
    );
    assert_eq!(out, "through stdin\n");
    let kubeconfig = s.kubeconfig.to_string_lossy().into_owned();
    let tty = Command::new("script")
        .args([
            "-qec",
            "kubectl exec -it deploy/web -- sh -c 'tty; stty size'",
            "/dev/null",
        ])
        .env("KUBECONFIG", &kubeconfig)
        .env("COLUMNS", "91")
        .env("LINES", "27")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let tty_out = String::from_utf8_lossy(&tty.stdout).into_owned();
    assert!(
        tty.status.success(),
        "{tty_out}{}",
        String::from_utf8_lossy(&tty.stderr)
    );
    assert!(tty_out.contains("/dev/pts/"), "{tty_out:?}");
    let out = common::kubectl(&s, &["exec", "fn", "--", "ls"], None);
    assert!(!out.ok);
    assert!(
        out.stderr.contains("Wasm guest run in-process by Wasmtime"),
        "{}",
        out.stderr
    );
    // The exec readiness probe runs in the container: once the file it
    // reads is gone, the pod is no longer Ready, and says why.
    ok(
        &s,
        &["exec", "deploy/web", "--", "rm", "/www/index.html"],
        None,
    );
    checked(
        &s,
        &[
            "wait",
            "--for=condition=Ready=false",
            "pod",
            "-l",
            "app=web",
            "--timeout=30s",
        ],
    );
    // A pod that is not Ready gets no traffic: with its only endpoint not
    // ready, the cluster IP refuses.
    wait_rules(
        &lan,
        "host1",
        &format!("{web_vip} . tcp . 80 : goto reject-chain"),
    );
    let refused = lan.busybox_in("host1", &["sh", "-c", &http_get_at(&web_vip, 80, "/")]);
    assert!(
        refused.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&refused.stdout)
    );
    // The agent records the event in the background: watched for.
    watch_rows_until(
        &s,
        &[
            "get",
            "events",
            "--field-selector",
            "reason=Unhealthy",
            "-w",
        ],
        |row| row.contains("Readiness probe failed") && row.contains("index.html"),
    );

    // Through the whole cluster: a Linux container over its memory limit
    // is OOMKilled, and one that ignores SIGTERM is killed once its grace
    // period is over (so its deletion takes at least that long).
    let linux_pod = |name: &str, script: &str, extra: serde_json::Value| {
        let mut container = json!({"name": "c", "image": busybox, "command": ["sh", "-c", script]});
        container
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"nodeName": host1, "restartPolicy": "Never", "terminationGracePeriodSeconds": 2,
                     "containers": [container]},
        })
        .to_string()
    };
    let hog = linux_pod(
        "hog",
        "head -c 300000000 /dev/zero | tail",
        json!({"resources": {"limits": {"memory": "32Mi"}}}),
    );
    ok(&s, &["apply", "-f", "-"], Some(&hog));
    // Its preStop hook (exec, in the container) runs before the stop: it
    // leaves a file in a hostPath volume the test reads afterwards.
    let hook_dir = dir.path().join("hook");
    std::fs::create_dir_all(&hook_dir).unwrap();
    let mut stubborn: serde_json::Value = serde_json::from_str(&linux_pod(
        "stubborn",
        "trap '' TERM; touch /tmp/ready; sleep 1000",
        json!({"readinessProbe": {"exec": {"command": ["cat", "/tmp/ready"]}, "periodSeconds": 1},
               "lifecycle": {"preStop": {"exec": {"command": ["sh", "-c", "echo ran before the stop > /hook/out"]}}},
               "volumeMounts": [{"name": "hook", "mountPath": "/hook"}]}),
    ))
    .unwrap();
    stubborn["spec"]["volumes"] = json!([{"name": "hook", "hostPath": {"path": hook_dir}}]);
    let stubborn = stubborn.to_string();
    ok(&s, &["apply", "-f", "-"], Some(&stubborn));
    checked(
        &s,
        &[
            "wait",
            "--for=jsonpath={.status.containerStatuses[0].state.terminated.reason}=OOMKilled",
            "pod/hog",
            "--timeout=60s",
        ],
    );
    wait_ready(&s, "pod/stubborn");
    let asked = std::time::Instant::now();
    ok(
        &s,
        &["delete", "pod/stubborn", "--wait=true", "--timeout=60s"],
        None,
    );
    let took = asked.elapsed();
    assert!(
        took >= std::time::Duration::from_secs(2),
        "a container ignoring SIGTERM was gone after {took:?}, before its 2 s grace period"
    );
    assert_eq!(
        std::fs::read_to_string(hook_dir.join("out")).unwrap_or_default(),
        "ran before the stop\n"
    );
    ok(
        &s,
        &["delete", "pod/hog", "--wait=true", "--timeout=60s"],
        None,
    );

    // Knative Serving through the gateway: a Knative Service's URL answers,
    // a second revision takes 20 % of the traffic and a tag of its own, an
    // idle revision goes to zero and the next request wakes it, min-scale
    // holds, a burst of slow requests raises the pod count, and bad input
    // is refused or reported.
    // NetworkPolicy: Linux and Wasm pods both ways, across the hosts.
    network_policy(&s, &lan, (&host1, &host2), &images);

    knative(&s, &lan.addr(1), hello, busybox);

    node_loss(&s, &lan, (&host1, &host2), hello, busybox);

    // Deleting everything leaves nothing behind: an agent removes a pod's
    // containers, mounts, cgroups and network before it confirms the
    // deletion.
    let uids = ok(
        &s,
        &[
            "get",
            "pods",
            "-o",
            "jsonpath={range .items[*]}{.metadata.name}={.metadata.uid} {end}",
        ],
        None,
    );
    ok(
        &s,
        &[
            "delete",
            "deployment/web",
            "pod/fn",
            "pod/local-client",
            "pod/remote-web",
            "pod/remote-fn",
            "pod/gateway",
            "pod/wasm-client",
            "pod/svc-client",
            "pod/svc-caller",
            "pod/fn2",
            "pod/dns-client",
            "pod/by-name",
            "pod/userns-client",
            "svc/web-headless",
            "svc/web-alias",
            "svc/web",
            "svc/fn-svc",
            "svc/web-lb",
            "--wait=true",
            "--timeout=90s",
        ],
        None,
    );
    ok(
        &s,
        &[
            "wait",
            "--for=delete",
            "pods",
            "-l",
            "app=web",
            "--timeout=90s",
        ],
        None,
    );
    for host in ["host1", "host2"] {
        for vip in [&web_vip, &fn_vip] {
            wait_rules_gone(&lan, host, vip);
        }
    }
    let left = lan.pod_namespaces();
    if !left.is_empty() {
        let log: Vec<String> = s.log.try_iter().collect();
        panic!(
            "pod namespaces left: {left:?} (pods were {uids})\nserver log:\n{}",
            log.join("\n")
        );
    }
    for h in [&host1, &host2] {
        let veths = ip_out(&["-n", h, "-o", "link", "show", "type", "veth"]);
        let pods: Vec<&str> = veths.lines().filter(|l| !l.contains(" eth0@")).collect();
        assert!(pods.is_empty(), "veths left in {h}: {pods:?}");
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(&*dir.path().to_string_lossy()),
        "mounts left behind"
    );
    let cgroups: Vec<String> = std::fs::read_dir("/sys/fs/cgroup/memory/wasmkube")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    for uid in uids
        .split_whitespace()
        .filter_map(|p| p.split_once('='))
        .map(|p| p.1)
    {
        assert!(
            !cgroups.iter().any(|c| c.starts_with(uid)),
            "a cgroup of pod {uid} is left"
        );
    }
    drop(agent);
}

/// The Knative part of the journey above (see its comment there).
/// A node cut off (its link down) goes Ready=Unknown after the grace
/// period and gets the unreachable taints; its pod is evicted once its
/// toleration runs out and replaced on the other node; back, the node stops
/// the pod that was replaced and confirms its deletion.
fn node_loss(s: &Server, lan: &Lan, (host1, host2): (&str, &str), hello: &str, busybox: &str) {
    let tolerate = |key: &str| json!({"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 2});
    let deployment = json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "survivor"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "survivor"}},
          "template": {"metadata": {"labels": {"app": "survivor"}},
            "spec": {"terminationGracePeriodSeconds": 2,
              "affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 100, "preference": {"matchFields": [
                  {"key": "metadata.name", "operator": "In", "values": [host2]}]}}]}},
              "tolerations": [tolerate("node.kubernetes.io/unreachable"), tolerate("node.kubernetes.io/not-ready")],
              "containers": [{"name": "hello", "image": hello, "ports": [{"containerPort": 8080}],
                "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}, "periodSeconds": 1}}]}}},
    })
    .to_string();
    ok(s, &["apply", "-f", "-"], Some(&deployment));
    checked(
        s,
        &["rollout", "status", "deployment/survivor", "--timeout=60s"],
    );
    let first = ok(
        s,
        &[
            "get",
            "pods",
            "-l",
            "app=survivor",
            "-o",
            "jsonpath={.items[0].metadata.name} {.items[0].spec.nodeName}",
        ],
        None,
    );
    let (first, node) = first.split_once(' ').unwrap();
    assert_eq!(node, host2, "the pod prefers {host2}");

    let cut = std::time::Instant::now();
    ip(&["-n", &lan.ns("host2"), "link", "set", "eth0", "down"]);
    checked(
        s,
        &[
            "wait",
            "--for=condition=Ready=Unknown",
            &format!("node/{host2}"),
            "--timeout=60s",
        ],
    );
    let unknown = cut.elapsed();
    // The taints follow the condition.
    common::poll("the unreachable taint", Duration::from_secs(30), || {
        let taints = ok(
            s,
            &["get", "node", host2, "-o", "jsonpath={.spec.taints[*].key}"],
            None,
        );
        taints
            .contains("node.kubernetes.io/unreachable")
            .then_some(())
            .ok_or(taints)
    });
    common::poll(
        "a replacement ready on the other node",
        Duration::from_secs(60),
        || {
            let ready = ok(
                s,
                &[
                    "get",
                    "pods",
                    "-l",
                    "app=survivor",
                    &format!("--field-selector=spec.nodeName={host1}"),
                    "-o",
                    r#"jsonpath={.items[*].status.conditions[?(@.type=="Ready")].status}"#,
                ],
                None,
            );
            (ready == "True").then_some(()).ok_or(ready)
        },
    );
    let recovered = cut.elapsed();
    eprintln!(
        "node loss: {host2} Ready=Unknown {:.1}s after its link went down; its pod replaced and ready on {host1} after {:.1}s",
        unknown.as_secs_f64(),
        recovered.as_secs_f64()
    );
    let ip_now = pod_ip(
        s,
        &[
            "-l",
            "app=survivor",
            &format!("--field-selector=spec.nodeName={host1}"),
        ],
    );
    let got = fetch_from_pod(s, "ask-survivor", host1, busybox, &ip_now, "/");
    assert!(
        got.ends_with("\r\n\r\nhello from wasmkube: GET /\n"),
        "the replacement answers: {got:?}"
    );
    ok(s, &["delete", "pod", "ask-survivor"], None);
    // The evicted pod waits for its node to confirm it stopped.
    let stuck = ok(
        s,
        &[
            "get",
            "pod",
            first,
            "-o",
            "jsonpath={.metadata.deletionTimestamp}",
        ],
        None,
    );
    assert!(!stuck.is_empty(), "{first} is being deleted");

    ip(&["-n", &lan.ns("host2"), "link", "set", "eth0", "up"]);
    checked(
        s,
        &[
            "wait",
            "--for=condition=Ready",
            &format!("node/{host2}"),
            "--timeout=60s",
        ],
    );
    checked(
        s,
        &[
            "wait",
            "--for=delete",
            &format!("pod/{first}"),
            "--timeout=60s",
        ],
    );
    ok(s, &["delete", "deployment", "survivor"], None);
    checked(
        s,
        &[
            "wait",
            "--for=delete",
            "pod",
            "-l",
            "app=survivor",
            "--timeout=60s",
        ],
    );
}

fn knative(s: &Server, gateway_ip: &str, image: &str, busybox: &str) {
    let gateway = format!("{gateway_ip}:80");
    let ksvc = |name: &str,
                annotations: serde_json::Value,
                env: &str,
                traffic: serde_json::Value| {
        let mut obj = json!({
            "apiVersion": "serving.knative.dev/v1", "kind": "Service",
            "metadata": {"name": name},
            "spec": {"template": {
                "metadata": {"annotations": annotations},
                "spec": {"containers": [{"image": image, "env": [{"name": "GREETING", "value": env}]}]}}},
        });
        if !traffic.is_null() {
            obj["spec"]["traffic"] = traffic;
        }
        obj.to_string()
    };
    let window = json!({"autoscaling.knative.dev/window": "6s"});
    ok(
        s,
        &["apply", "-f", "-"],
        Some(&ksvc("hello", window.clone(), "kn1", json!(null))),
    );
    checked(
        s,
        &[
            "wait",
            "--for=condition=Ready",
            "ksvc/hello",
            "--timeout=60s",
        ],
    );
    let url = ok(
        s,
        &["get", "ksvc", "hello", "-o", "jsonpath={.status.url}"],
        None,
    );
    assert_eq!(url, "http://hello.default.example.com");
    let table = ok(s, &["get", "ksvc"], None);
    assert!(
        table.starts_with("NAME")
            && table.contains("http://hello.default.example.com")
            && table.contains("hello-00001"),
        "{table}"
    );
    let greeting = |host: &str| -> Result<String, String> {
        let (status, body) = get_host(&gateway, host, "/")?;
        body.lines()
            .find_map(|l| l.strip_prefix("GREETING="))
            .map(str::to_owned)
            .ok_or_else(|| format!("{status}: {body}"))
    };
    let host = "hello.default.example.com";
    assert_eq!(
        common::poll("the Knative URL", Duration::from_secs(30), || greeting(
            host
        )),
        "kn1"
    );

    // Bad input: traffic that does not sum to 100 names the field.
    let bad = ksvc(
        "hello",
        window.clone(),
        "kn2",
        json!([
        {"revisionName": "hello-00001", "percent": 70},
        {"latestRevision": true, "percent": 20}]),
    );
    let out = common::kubectl(s, &["apply", "-f", "-"], Some(&bad));
    assert!(
        !out.ok && out.stderr.contains("spec.traffic"),
        "{}",
        out.stderr
    );

    // A second revision with 20 % and a tag; 80/20 over 1,000 requests.
    let split = ksvc(
        "hello",
        window.clone(),
        "kn2",
        json!([
        {"revisionName": "hello-00001", "percent": 80},
        {"latestRevision": true, "percent": 20, "tag": "next"}]),
    );
    ok(s, &["apply", "-f", "-"], Some(&split));
    common::poll(
        "the second revision in the traffic",
        Duration::from_secs(60),
        || {
            let got = ok(
                s,
                &[
                    "get",
                    "ksvc",
                    "hello",
                    "-o",
                    "jsonpath={.status.traffic[*].revisionName} {.status.conditions[?(@.type==\"Ready\")].status}",
                ],
                None,
            );
            if got == "hello-00001 hello-00002 True" {
                Ok(())
            } else {
                Err(got)
            }
        },
    );
    assert_eq!(
        common::poll("the tag", Duration::from_secs(30), || greeting(
            "next-hello.default.example.com"
        )),
        "kn2"
    );
    let mut second = 0;
    for _ in 0..1000 {
        match greeting(host).unwrap().as_str() {
            "kn1" => {}
            "kn2" => second += 1,
            other => panic!("answered by {other}"),
        }
    }
    assert!(
        (150..=250).contains(&second),
        "{second} of 1000 went to the 20 % revision"
    );

    // min-scale keeps its pods however idle; watched while hello's idle
    // revisions go to zero (after their 6 s window).
    let pinned = ksvc(
        "pinned",
        json!({"autoscaling.knative.dev/min-scale": "2",
        "autoscaling.knative.dev/window": "6s"}),
        "pinned",
        json!(null),
    );
    ok(s, &["apply", "-f", "-"], Some(&pinned));
    for rev in ["hello-00001", "hello-00002"] {
        checked(
            s,
            &[
                "wait",
                "--for=jsonpath={.status.actualReplicas}=0",
                &format!("revision/{rev}"),
                "--timeout=90s",
            ],
        );
    }
    checked(
        s,
        &[
            "wait",
            "--for=condition=Ready",
            "ksvc/pinned",
            "--timeout=60s",
        ],
    );
    assert_eq!(
        ok(
            s,
            &[
                "get",
                "deploy",
                "pinned-00001-deployment",
                "-o",
                "jsonpath={.spec.replicas}"
            ],
            None
        ),
        "2"
    );
    let revisions = ok(s, &["get", "revisions"], None);
    assert!(
        revisions.contains("Desired Replicas") || revisions.contains("DESIRED REPLICAS"),
        "{revisions}"
    );

    // From zero: the next request is held, wakes the revision, and is
    // answered.
    let asked = std::time::Instant::now();
    assert_eq!(greeting("next-hello.default.example.com").unwrap(), "kn2");
    eprintln!(
        "first request to a revision at zero answered in {:?}",
        asked.elapsed()
    );

    // `initial-scale: 0`: Ready without ever having had a pod; the first
    // request starts one.
    let lazy = ksvc(
        "lazy",
        json!({"autoscaling.knative.dev/initial-scale": "0",
        "autoscaling.knative.dev/window": "6s"}),
        "lazy",
        json!(null),
    );
    ok(s, &["apply", "-f", "-"], Some(&lazy));
    checked(
        s,
        &[
            "wait",
            "--for=condition=Ready",
            "ksvc/lazy",
            "--timeout=60s",
        ],
    );
    assert_eq!(
        ok(
            s,
            &[
                "get",
                "pods",
                "-l",
                "serving.knative.dev/service=lazy",
                "-o",
                "name"
            ],
            None
        ),
        "",
        "no pod before the first request"
    );
    assert_eq!(greeting("lazy.default.example.com").unwrap(), "lazy");

    // A burst of slow requests against a target of one in flight per pod
    // raises the pod count; it falls back to zero after the load.
    let burst = ksvc(
        "burst",
        json!({"autoscaling.knative.dev/target": "1",
        "autoscaling.knative.dev/window": "6s"}),
        "burst",
        json!(null),
    );
    ok(s, &["apply", "-f", "-"], Some(&burst));
    checked(
        s,
        &[
            "wait",
            "--for=condition=Ready",
            "ksvc/burst",
            "--timeout=60s",
        ],
    );
    let load: Vec<_> = (0..6)
        .map(|_| {
            let gateway = gateway.clone();
            std::thread::spawn(move || {
                for _ in 0..4 {
                    let _ = get_host(&gateway, "burst.default.example.com", "/sleep?ms=1500");
                }
            })
        })
        .collect();
    common::poll("the burst's pods", Duration::from_secs(60), || {
        let want = ok(
            s,
            &[
                "get",
                "revision",
                "burst-00001",
                "-o",
                "jsonpath={.status.desiredReplicas}",
            ],
            None,
        );
        match want.parse::<u32>() {
            Ok(n) if n >= 4 => Ok(()),
            _ => Err(format!("desired replicas {want}")),
        }
    });
    for l in load {
        l.join().unwrap();
    }
    checked(
        s,
        &[
            "wait",
            "--for=jsonpath={.status.actualReplicas}=0",
            "revision/burst-00001",
            "--timeout=90s",
        ],
    );

    // An image that does not exist: the revision and the service say why.
    let missing = format!(
        "{}/not-pushed:v1",
        image.rsplit_once('/').map(|(r, _)| r).unwrap_or(image)
    );
    let broken = ksvc("broken", json!({}), "x", json!(null)).replace(image, &missing);
    ok(s, &["apply", "-f", "-"], Some(&broken));
    checked(
        s,
        &[
            "wait",
            "--for=condition=Ready=false",
            "revision/broken-00001",
            "--timeout=60s",
        ],
    );
    let why = ok(
        s,
        &[
            "get",
            "ksvc",
            "broken",
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Ready\")].message}",
        ],
        None,
    );
    assert!(
        why.contains("ImagePull") || why.contains("ErrImagePull") || why.contains("not-pushed"),
        "{why}"
    );
    // A request for it is answered at once with the reason, not held.
    let answer = common::poll(
        "the broken service's answer",
        Duration::from_secs(30),
        || match get_host(&gateway, "broken.default.example.com", "/")? {
            (503, body) if body.contains("cannot serve") => Ok(body),
            other => Err(format!("{other:?}")),
        },
    );
    assert!(answer.contains("broken"), "{answer}");

    // A Linux image as a function: its requests are counted where they
    // enter (the gateway), so it too goes to zero when idle, and the next
    // request wakes a new runc container.
    let linux = json!({
        "apiVersion": "serving.knative.dev/v1", "kind": "Service", "metadata": {"name": "linux"},
        "spec": {"template": {
            "metadata": {"annotations": {"autoscaling.knative.dev/window": "6s"}},
            // httpd as PID 1 ignores SIGTERM: the request timeout (the grace
            // period Knative gives a revision's pods) is kept short.
            "spec": {"timeoutSeconds": 5, "containers": [{"image": busybox,
                "command": ["httpd", "-f", "-p", "8080", "-h", "/www"],
                "ports": [{"containerPort": 8080}]}]}}},
    })
    .to_string();
    ok(s, &["apply", "-f", "-"], Some(&linux));
    checked(
        s,
        &[
            "wait",
            "--for=condition=Ready",
            "ksvc/linux",
            "--timeout=60s",
        ],
    );
    let from_linux = || match get_host(&gateway, "linux.default.example.com", "/")? {
        (200, body) if body.ends_with("hello from busybox httpd\n") => Ok(()),
        other => Err(format!("{other:?}")),
    };
    common::poll("the Linux function", Duration::from_secs(30), from_linux);
    checked(
        s,
        &[
            "wait",
            "--for=jsonpath={.status.actualReplicas}=0",
            "revision/linux-00001",
            "--timeout=90s",
        ],
    );
    from_linux().unwrap();

    // Deleted, a Knative Service takes everything it made with it.
    ok(
        s,
        &[
            "delete",
            "ksvc",
            "hello",
            "pinned",
            "burst",
            "broken",
            "linux",
            "--wait=true",
            "--timeout=60s",
        ],
        None,
    );
    common::poll("the Knative pods to go", Duration::from_secs(90), || {
        let left = ok(
            s,
            &[
                "get",
                "pods",
                "-l",
                "serving.knative.dev/service",
                "-o",
                "name",
            ],
            None,
        );
        if left.is_empty() { Ok(()) } else { Err(left) }
    });
}

/// The network policy table in a host's namespace.
fn policy_table(lan: &Lan, host: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", &lan.ns(host), "nft", "list", "table", "ip"])
        .arg(wasmkube_netpol::nft::TABLE)
        .output()
        .expect("nft");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits until a host's network policy table satisfies `test`.
fn wait_policy(lan: &Lan, host: &str, what: &str, test: impl Fn(&str) -> bool) {
    common::poll(
        &format!("{host}'s network policy: {what}"),
        Duration::from_secs(30),
        || {
            let table = policy_table(lan, host);
            if test(&table) { Ok(()) } else { Err(table) }
        },
    );
}

/// The ingress (or egress) verdict-map line of a policy table.
fn policy_map<'a>(table: &'a str, map: &str) -> &'a str {
    let start = table.find(&format!("map {map} {{")).unwrap_or(table.len());
    let rest = &table[start..];
    &rest[..rest.find('}').map_or(rest.len(), |i| i + 1)]
}

/// A one-shot client: busybox `nc` (Linux) or, with `wasm`, the `tcp-get`
/// guest connecting over `wasi:sockets`.
#[derive(Clone, Copy)]
struct Client<'a> {
    image: &'a str,
    wasm: bool,
}

/// Whether a one-shot pod `name` in namespace `ns` on `node`, with
/// `labels`, gets an HTTP answer from `ip:port`. Expected to (`expect`),
/// it restarts on failure until it does (a new pod's address reaches
/// other nodes' peer sets through the API, a moment after it starts);
/// expected not to, it runs once, and its refusal must be the network's.
#[allow(clippy::too_many_arguments)]
fn connects(
    s: &Server,
    ns: &str,
    name: &str,
    node: &str,
    labels: serde_json::Value,
    client: Client<'_>,
    to: (&str, u16),
    expect: bool,
) -> bool {
    let (ip, port) = to;
    let container = if client.wasm {
        json!({"name": "c", "image": client.image, "args": [format!("{ip}:{port}"), "/"]})
    } else {
        let probe =
            format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {ip} {port} | grep HTTP/1");
        json!({"name": "c", "image": client.image, "command": ["sh", "-c", probe]})
    };
    let restart = if expect { "OnFailure" } else { "Never" };
    let manifest = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"nodeName": node, "restartPolicy": restart, "containers": [container]},
    })
    .to_string();
    ok(s, &["apply", "-f", "-"], Some(&manifest));
    let phase = common::poll(
        &format!("{ns}/{name} to finish"),
        Duration::from_secs(90),
        || {
            let phase = ok(
                s,
                &[
                    "-n",
                    ns,
                    "get",
                    "pod",
                    name,
                    "-o",
                    "jsonpath={.status.phase}",
                ],
                None,
            );
            if phase == "Succeeded" || phase == "Failed" {
                Ok(phase)
            } else {
                Err(phase)
            }
        },
    );
    let log = ok(s, &["-n", ns, "logs", name], None);
    ok(s, &["-n", ns, "delete", "pod", name, "--wait=false"], None);
    if phase == "Failed" {
        // tcp-get says it cannot connect; nc prints nothing from HTTP.
        assert!(
            !log.contains("HTTP/1") && (!client.wasm || log.contains("cannot connect")),
            "{ns}/{name} failed otherwise: {log}"
        );
    }
    phase == "Succeeded"
}

/// NetworkPolicy on both hosts, checked by traffic between Linux and Wasm
/// pods both ways and across the hosts: open by default, default-deny
/// ingress, then allowed by label and port from the same namespace only,
/// then an egress allow-list for a Wasm client; deleting the namespace
/// leaves no rules behind.
fn network_policy(s: &Server, lan: &Lan, hosts: (&str, &str), images: &Images) {
    let (host1, host2) = hosts;
    let (busybox, hello, tcp_get) = (
        images.busybox.as_str(),
        images.hello.as_str(),
        images.tcp_get.as_str(),
    );
    ok(s, &["create", "namespace", "np"], None);
    // A Linux httpd on host1 and a Wasm HTTP function on host2.
    let servers = [
        json!({"apiVersion": "v1", "kind": "Pod",
         "metadata": {"name": "web", "namespace": "np", "labels": {"app": "web"}},
         "spec": {"nodeName": host1, "terminationGracePeriodSeconds": 1, "containers": [{"name": "httpd", "image": busybox,
           "command": ["httpd", "-f", "-p", "8080", "-h", "/www"],
           "ports": [{"name": "http", "containerPort": 8080}],
           "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1}}]}}),
        json!({"apiVersion": "v1", "kind": "Pod",
         "metadata": {"name": "fn", "namespace": "np", "labels": {"app": "fn"}},
         "spec": {"nodeName": host2, "terminationGracePeriodSeconds": 1, "containers": [{"name": "hello", "image": hello,
           "ports": [{"name": "http", "containerPort": 8080}],
           "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}, "periodSeconds": 1}}]}}),
    ];
    for pod in servers {
        ok(s, &["apply", "-f", "-"], Some(&pod.to_string()));
    }
    for pod in ["pod/web", "pod/fn"] {
        checked(
            s,
            &[
                "-n",
                "np",
                "wait",
                "--for=condition=Ready",
                pod,
                "--timeout=60s",
            ],
        );
    }
    let ip_of = |pod: &str| {
        ok(
            s,
            &[
                "-n",
                "np",
                "get",
                "pod",
                pod,
                "-o",
                "jsonpath={.status.podIP}",
            ],
            None,
        )
    };
    let (web, func) = (ip_of("web"), ip_of("fn"));
    let client = json!({"role": "client"});
    let linux = Client {
        image: busybox,
        wasm: false,
    };
    let wasm = Client {
        image: tcp_get,
        wasm: true,
    };
    let reaches =
        |ns: &str, name: &str, node: &str, labels: &serde_json::Value, c: Client<'_>, ip: &str| {
            connects(s, ns, name, node, labels.clone(), c, (ip, 8080), true)
        };
    let blocked =
        |ns: &str, name: &str, node: &str, labels: &serde_json::Value, c: Client<'_>, ip: &str| {
            !connects(s, ns, name, node, labels.clone(), c, (ip, 8080), false)
        };

    // No policy: open.
    assert!(reaches("np", "open", host2, &client, linux, &web));

    // Bad input is refused with the field.
    let bad = json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "bad", "namespace": "np"},
        "spec": {"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.1.0.0/24"]}}]}]}})
    .to_string();
    let refused = common::kubectl(s, &["apply", "-f", "-"], Some(&bad));
    assert!(
        !refused.ok
            && refused
                .stderr
                .contains("spec.ingress[0].from[0].ipBlock.except[0]: Invalid value: \"10.1.0.0/24\": must be a strict subset of `cidr`"),
        "{}{}",
        refused.stdout,
        refused.stderr
    );

    // Default deny for ingress: every pod of the namespace isolated, on
    // each host its own.
    let deny = json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "default-deny", "namespace": "np"},
        "spec": {"podSelector": {}}})
    .to_string();
    ok(s, &["apply", "-f", "-"], Some(&deny));
    let listed = ok(s, &["-n", "np", "get", "netpol"], None);
    assert!(
        listed.starts_with("NAME")
            && listed.contains("POD-SELECTOR")
            && listed.contains("default-deny   <none>"),
        "{listed}"
    );
    wait_policy(lan, "host1", "web isolated", |t| {
        policy_map(t, "ingress").contains(&format!("{web} : jump in-"))
    });
    wait_policy(lan, "host2", "fn isolated", |t| {
        policy_map(t, "ingress").contains(&format!("{func} : jump in-"))
    });
    // Linux to Linux across the hosts, Linux to Wasm on one host.
    assert!(blocked("np", "deny-1", host2, &client, linux, &web));
    assert!(blocked("np", "deny-2", host2, &client, linux, &func));

    // Allowed: clients of the same namespace, on the http port.
    let allow = json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "allow-clients", "namespace": "np"},
        "spec": {"podSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["web", "fn"]}]},
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "client"}}}],
                              "ports": [{"port": "http"}]}]}})
    .to_string();
    ok(s, &["apply", "-f", "-"], Some(&allow));
    // (No rule shows before a client exists; the clients expected through
    // retry until their node and the server's have both seen them.)
    // Linux to Linux across the hosts; Linux to Wasm across the hosts;
    // Wasm to Linux on one host; Wasm to Wasm across the hosts.
    assert!(reaches("np", "allow-1", host2, &client, linux, &web));
    assert!(reaches("np", "allow-2", host1, &client, linux, &func));
    assert!(reaches("np", "allow-3", host1, &client, wasm, &web));
    assert!(reaches("np", "allow-4", host1, &client, wasm, &func));
    // Not a client, or another namespace's client: refused.
    let other = json!({"role": "other"});
    assert!(blocked("np", "other-1", host2, &other, linux, &web));
    assert!(blocked("np", "other-2", host2, &other, wasm, &func));
    assert!(blocked(
        "default",
        "np-outsider",
        host2,
        &client,
        linux,
        &web
    ));

    // Egress: the namespace's clients may reach the Linux httpd only (and
    // nothing else, DNS on their own node aside).
    let egress = json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "clients-to-web", "namespace": "np"},
        "spec": {"podSelector": {"matchLabels": {"role": "client"}}, "policyTypes": ["Egress"],
                 "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "web"}}}]}]}})
    .to_string();
    ok(s, &["apply", "-f", "-"], Some(&egress));
    // (Until host1 has seen the policy, a new client is not isolated yet:
    // tried again under a new name.)
    let attempt = std::cell::Cell::new(0);
    common::poll(
        "a Wasm client isolated for egress",
        Duration::from_secs(60),
        || {
            attempt.set(attempt.get() + 1);
            let name = format!("egress-fn-{}", attempt.get());
            if blocked("np", &name, host1, &client, wasm, &func) {
                Ok(())
            } else {
                Err("the Wasm client still reaches fn".to_owned())
            }
        },
    );
    assert!(reaches("np", "egress-web", host1, &client, wasm, &web));
    assert!(blocked(
        "np",
        "egress-fn-linux",
        host2,
        &client,
        linux,
        &func
    ));

    // Deleting the namespace takes its pods and policies, and their rules.
    ok(
        s,
        &["delete", "namespace", "np", "--wait=true", "--timeout=90s"],
        None,
    );
    for host in ["host1", "host2"] {
        wait_policy(lan, host, "no pod isolated", |t| {
            !policy_map(t, "ingress").contains("jump") && !policy_map(t, "egress").contains("jump")
        });
    }
}
