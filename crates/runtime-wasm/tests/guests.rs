//! The example workloads (`workloads/`, Rust built for wasm32-wasip1 by
//! `scripts/build-workloads.sh`, which `scripts/test.sh` runs first) on the
//! Wasm runtime: what real guests do with args, env, exit codes, aborts,
//! allocation failures and sleeps.

use std::path::PathBuf;

use wasmkube_runtime_wasm::{Config, ContainerSpec, Exit, WasmRuntime};

fn guest(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../workloads/target/wasm32-wasip1/release")
        .join(format!("{name}.wasm"));
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; build the workloads with scripts/build-workloads.sh",
            path.display()
        )
    })
}

fn setup() -> (tempfile::TempDir, WasmRuntime) {
    let dir = tempfile::tempdir().unwrap();
    let rt = WasmRuntime::new(Config {
        cache_dir: dir.path().join("cache"),
        max_instances: 8,
        max_memory_bytes: 256 << 20,
        guest_ca_pem: None,
    })
    .unwrap();
    (dir, rt)
}

fn spec(dir: &tempfile::TempDir, args: &[&str]) -> ContainerSpec {
    ContainerSpec {
        args: args.iter().map(|a| (*a).to_owned()).collect(),
        stdout: dir.path().join(format!("{}.out", args.join("-"))).into(),
        stderr: dir.path().join(format!("{}.err", args.join("-"))).into(),
        ..Default::default()
    }
}

fn read(p: &std::path::Path) -> String {
    std::fs::read_to_string(p).unwrap()
}

#[tokio::test]
async fn hello_sees_only_its_args_and_env() {
    let (dir, rt) = setup();
    let m = rt.load(&guest("hello")).unwrap();
    let mut s = spec(&dir, &["hello", "a", "b"]);
    s.env = vec![("GREETING".into(), "hi".into())];
    let (exit, _) = rt.run(&m, &s).await.unwrap();
    assert_eq!(exit, Exit::Code(0));
    assert_eq!(
        read(s.stdout.path().unwrap()),
        "hi from wasmkube\nargs: a b\n"
    );
}

#[tokio::test]
async fn a_guest_reads_its_stdin_pipe_until_it_ends() {
    use std::io::Write;
    let (dir, rt) = setup();
    let m = rt.load(&guest("echo-lines")).unwrap();
    let mut s = spec(&dir, &["echo-lines"]);
    let (reader, mut writer) = std::io::pipe().unwrap();
    s.stdin = Some(std::sync::Arc::new(std::fs::File::from(
        std::os::fd::OwnedFd::from(reader),
    )));
    let run = tokio::spawn(async move {
        let exit = rt.run(&m, &s).await.unwrap().0;
        (exit, read(s.stdout.path().unwrap()))
    });
    // Written while the guest waits for it; end of input when closed.
    writer.write_all(b"one\ntwo\n").unwrap();
    drop(writer);
    let (exit, out) = run.await.unwrap();
    assert_eq!(exit, Exit::Code(0));
    assert_eq!(out, "ready for input\ngot: one\ngot: two\n2 lines\n");
    // Without a pipe, stdin is empty.
    let (dir, rt) = setup();
    let m = rt.load(&guest("echo-lines")).unwrap();
    let s = spec(&dir, &["echo-lines"]);
    assert_eq!(rt.run(&m, &s).await.unwrap().0, Exit::Code(0));
    assert_eq!(read(s.stdout.path().unwrap()), "ready for input\n0 lines\n");
}

#[tokio::test]
async fn crashers_exit_with_their_code_or_trap() {
    let (dir, rt) = setup();
    let m = rt.load(&guest("crasher")).unwrap();
    let s = spec(&dir, &["crasher", "exit", "7"]);
    assert_eq!(rt.run(&m, &s).await.unwrap().0, Exit::Code(7));
    assert_eq!(read(s.stderr.path().unwrap()), "crasher: exiting with 7\n");
    let s = spec(&dir, &["crasher", "trap"]);
    match rt.run(&m, &s).await.unwrap().0 {
        Exit::Trap { message } => assert!(message.contains("unreachable"), "{message}"),
        other => panic!("expected a trap, got {other:?}"),
    }
}

#[tokio::test]
async fn a_rust_memory_hog_is_oom_killed_at_its_limit() {
    let (dir, rt) = setup();
    let m = rt.load(&guest("memory-hog")).unwrap();
    let mut s = spec(&dir, &["memory-hog"]);
    s.memory_limit = Some(32 << 20);
    let (exit, usage) = rt.run(&m, &s).await.unwrap();
    assert!(matches!(exit, Exit::OomKilled { .. }), "{exit:?}");
    assert!(usage.memory_high_water <= 32 << 20, "{usage:?}");
    assert!(
        read(s.stdout.path().unwrap()).contains("holding 24 MiB"),
        "{}",
        read(s.stdout.path().unwrap())
    );
    // Under its limit the same guest finishes.
    let mut s = spec(&dir, &["memory-hog", "8"]);
    s.memory_limit = Some(32 << 20);
    assert_eq!(rt.run(&m, &s).await.unwrap().0, Exit::Code(0));
}

#[tokio::test]
async fn a_sleeper_sleeps_without_holding_a_thread() {
    let (dir, rt) = setup();
    let m = rt.load(&guest("sleeper")).unwrap();
    let s = spec(&dir, &["sleeper", "1"]);
    let hello = rt.load(&guest("hello")).unwrap();
    // While it sleeps, another guest on the same executor runs to the end.
    let sleeping = rt.run(&m, &s);
    tokio::pin!(sleeping);
    let other_spec = spec(&dir, &["hello"]);
    let other = rt.run(&hello, &other_spec);
    tokio::select! {
        _ = &mut sleeping => panic!("the sleeper finished before the other guest ran"),
        other = other => assert_eq!(other.unwrap().0, Exit::Code(0)),
    }
    assert_eq!(sleeping.await.unwrap().0, Exit::Code(0));
    assert_eq!(read(s.stdout.path().unwrap()), "sleeping\ndone\n");
}

fn component(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../workloads/target/wasm32-wasip2/release")
        .join(format!("{name}.wasm"));
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; build the workloads with scripts/build-workloads.sh",
            path.display()
        )
    })
}

#[tokio::test]
async fn preview2_components_run_with_the_same_limits() {
    let (dir, rt) = setup();
    let hello = rt
        .prepare_component(&rt.load_component(&component("hello")).unwrap())
        .unwrap();
    let s = spec(&dir, &["hello", "x"]);
    let (exit, _) = rt.run_component(&hello, &s).await.unwrap();
    assert_eq!(exit, Exit::Code(0));
    assert_eq!(
        read(s.stdout.path().unwrap()),
        "hello from wasmkube\nargs: x\n"
    );

    let crasher = rt
        .prepare_component(&rt.load_component(&component("crasher")).unwrap())
        .unwrap();
    let (exit, _) = rt
        .run_component(&crasher, &spec(&dir, &["crasher", "exit", "7"]))
        .await
        .unwrap();
    // wasi:cli/exit in preview 2 carries only success or failure.
    assert_eq!(exit.code(), 1, "{exit:?}");

    let hog = rt
        .prepare_component(&rt.load_component(&component("memory-hog")).unwrap())
        .unwrap();
    let mut s = spec(&dir, &["memory-hog"]);
    s.memory_limit = Some(32 << 20);
    let (exit, usage) = rt.run_component(&hog, &s).await.unwrap();
    assert!(matches!(exit, Exit::OomKilled { .. }), "{exit:?}");
    assert!(usage.memory_high_water <= 32 << 20, "{usage:?}");

    // A core module is not a component, and the other way round.
    assert!(rt.load_component(&guest("hello")).is_err());
    assert!(rt.load(&component("hello")).is_err());
}

/// A GET over a fresh connection; returns (status, body).
async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let status = raw[9..12].parse().unwrap();
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test]
async fn an_http_function_serves_each_request_in_a_fresh_instance() {
    let (dir, rt) = setup();
    let bytes = std::fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../workloads/target/wasm32-wasip2/release/http_hello.wasm"),
    )
    .expect("build the workloads with scripts/build-workloads.sh");
    let component = rt.load_component(&bytes).unwrap();
    // It is not a command, and it is an HTTP function.
    assert!(rt.prepare_component(&component).is_err());
    let proxy = rt.prepare_proxy(&component).unwrap();
    let mut s = spec(&dir, &["http-hello"]);
    s.env.push(("GREETING".into(), "hi".into()));
    s.memory_limit = Some(64 << 20);
    let live = s.live.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let rt = std::sync::Arc::new(rt);
    let server = tokio::spawn(rt.serve_http(
        proxy,
        std::sync::Arc::new(s),
        listener,
        4,
        std::future::pending(),
    ));

    let (status, body) = get(addr, "/some/path?x=1").await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.starts_with("hello from wasmkube: GET /some/path?x=1\n"),
        "{body}"
    );
    assert!(body.lines().any(|l| l == "GREETING=hi"), "{body}");
    // A request whose instance traps fails alone; the next one is served.
    let (status, body) = get(addr, "/trap").await;
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("the function failed"), "{body}");
    // Many at once, beyond the concurrency bound: all are answered.
    let all =
        futures::future::join_all((0..16).map(|i| get(addr, if i % 2 == 0 { "/a" } else { "/b" })))
            .await;
    assert!(all.iter().all(|(s, _)| *s == 200), "{all:?}");
    assert_eq!(live.requests(), 18);
    assert_eq!(live.instances(), 0);
    server.abort();
}

/// A stop drains the function: a slow request in flight is answered, an
/// idle keep-alive connection is closed at once, no new connection is
/// accepted, and the server returns as soon as the last request is done.
#[tokio::test]
async fn an_http_function_stops_gracefully() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (dir, rt) = setup();
    let bytes = std::fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../workloads/target/wasm32-wasip2/release/http_hello.wasm"),
    )
    .expect("build the workloads with scripts/build-workloads.sh");
    let proxy = rt
        .prepare_proxy(&rt.load_component(&bytes).unwrap())
        .unwrap();
    let s = spec(&dir, &["http-hello"]);
    let live = s.live.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let rt = std::sync::Arc::new(rt);
    let server =
        tokio::spawn(
            rt.serve_http(proxy, std::sync::Arc::new(s), listener, 4, async move {
                let _ = stopped.await;
            }),
        );

    // An idle keep-alive connection (one request answered, then quiet).
    let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET /first HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 12];
    idle.read_exact(&mut head).await.unwrap();
    assert_eq!(&head[9..12], b"200");
    // A slow request, in flight when the stop comes: its instance is live.
    let slow = tokio::spawn(get(addr, "/sleep?ms=300"));
    while live.instances() == 0 {
        tokio::task::yield_now().await;
    }
    stop.send(()).unwrap();
    let (status, body) = slow.await.unwrap();
    assert_eq!((status, body.as_str()), (200, "slept 300 ms\n"));
    server.await.unwrap().unwrap();
    // The idle connection was closed (the rest of the first response, then
    // end of stream), and the port no longer accepts.
    let mut rest = Vec::new();
    idle.read_to_end(&mut rest).await.unwrap();
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

/// A pod network namespace that is the test's own: it counts the sockets
/// the runtime makes "inside" it.
#[derive(Debug, Default)]
struct CountingNetns(std::sync::atomic::AtomicUsize);

impl wasmkube_runtime::PodNetns for CountingNetns {
    fn enter(&self, f: &mut dyn FnMut()) -> std::io::Result<()> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        f();
        Ok(())
    }
}

impl CountingNetns {
    fn entered(&self) -> usize {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Cluster names as a pod's resolver sees them: `upstream` (through the
/// search path) and its full name are the test's loopback upstream.
#[derive(Debug)]
struct ClusterNames;

impl wasmkube_runtime::NameLookup for ClusterNames {
    fn lookup(
        &self,
        host: &str,
    ) -> std::pin::Pin<
        Box<dyn Future<Output = std::io::Result<Vec<std::net::IpAddr>>> + Send + 'static>,
    > {
        let found = self.lookup_cluster(host);
        Box::pin(async move { found.ok_or_else(|| std::io::ErrorKind::NotFound.into()) })
    }

    fn lookup_cluster(&self, host: &str) -> Option<Vec<std::net::IpAddr>> {
        matches!(host, "upstream" | "upstream.shop.svc.cluster.local")
            .then(|| vec![std::net::Ipv4Addr::LOCALHOST.into()])
    }
}

/// An HTTP/1.0 upstream on loopback that answers every request with what
/// it was asked.
/// Answers one HTTP/1.1 request with the request line it saw.
async fn answer<S>(mut s: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let line = String::from_utf8_lossy(&head);
    let line = line.lines().next().unwrap_or_default().to_owned();
    let body = format!("upstream saw {line}");
    let reply = format!(
        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = s.write_all(reply.as_bytes()).await;
    let _ = s.shutdown().await;
}

/// Serves an HTTP function on a loopback port: its address and the task.
async fn serve_http(
    rt: std::sync::Arc<WasmRuntime>,
    proxy: wasmkube_runtime_wasm::PreparedProxy,
    spec: ContainerSpec,
) -> (
    std::net::SocketAddr,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(rt.serve_http(
        proxy,
        std::sync::Arc::new(spec),
        listener,
        4,
        std::future::pending(),
    ));
    (addr, server)
}

/// An upstream on loopback, over TLS with `tls`.
async fn upstream_with(tls: Option<tokio_rustls::TlsAcceptor>) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = listener.accept().await.unwrap();
            let tls = tls.clone();
            tokio::spawn(async move {
                match tls {
                    Some(tls) => {
                        if let Ok(s) = tls.accept(s).await {
                            answer(s).await
                        }
                    }
                    None => answer(s).await,
                }
            });
        }
    });
    addr
}

async fn upstream() -> std::net::SocketAddr {
    upstream_with(None).await
}

/// `https` from a guest: TLS over a connection made in its network, the
/// server checked for the name the guest asked for against the system's
/// roots and the certificates the node adds (its cluster CA); a server the
/// guest cannot trust fails the call with `TlsCertificateError`.
#[tokio::test]
async fn an_http_function_calls_out_over_https_trusting_the_cluster_ca() {
    use wasmkube_runtime_wasm::GuestNetwork;
    let ca = wasmkube_pki::Ca::create("cluster-ca").unwrap();
    let names = wasmkube_pki::ServingNames {
        dns: vec!["localhost".into()],
        ips: vec!["127.0.0.1".parse().unwrap()],
    };
    let serving = ca.issue_serving("upstream", &names).unwrap();
    let up = upstream_with(Some(tokio_rustls::TlsAcceptor::from(
        ca.server_tls(&serving).unwrap(),
    )))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let trusting = std::sync::Arc::new(
        WasmRuntime::new(Config {
            cache_dir: dir.path().join("cache"),
            max_instances: 8,
            max_memory_bytes: 256 << 20,
            guest_ca_pem: Some(ca.cert_pem().to_owned()),
        })
        .unwrap(),
    );
    let (_other, untrusting) = setup();
    let untrusting = std::sync::Arc::new(untrusting);
    let call = |rt: std::sync::Arc<WasmRuntime>, upstream: String| {
        let mut s = spec(&dir, &["http-fetch"]);
        s.env.push(("UPSTREAM".into(), upstream));
        s.network = GuestNetwork::Pod(std::sync::Arc::new(CountingNetns::default()));
        async move {
            let proxy = rt
                .prepare_proxy(&rt.load_component(&component("http_fetch")).unwrap())
                .unwrap();
            let (addr, server) = serve_http(rt, proxy, s).await;
            let answer = get(addr, "/secure?x=1").await;
            server.abort();
            answer
        }
    };
    for upstream in [
        format!("https://{up}"),
        format!("https://localhost:{}", up.port()),
    ] {
        let (status, body) = call(trusting.clone(), upstream).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body, "upstream 200\nupstream saw GET /secure?x=1 HTTP/1.1");
    }
    let (status, body) = call(untrusting, format!("https://{up}")).await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("TlsCertificateError"), "{body}");
}

#[tokio::test]
async fn an_http_function_calls_out_from_its_pod_network_and_only_there() {
    use wasmkube_runtime_wasm::GuestNetwork;
    let (dir, rt) = setup();
    let proxy = rt
        .prepare_proxy(&rt.load_component(&component("http_fetch")).unwrap())
        .unwrap();
    let up = upstream().await;
    let rt = std::sync::Arc::new(rt);
    let serve = |network: GuestNetwork| {
        let mut s = spec(&dir, &["http-fetch"]);
        s.env.push(("UPSTREAM".into(), format!("http://{up}")));
        s.network = network;
        let rt = rt.clone();
        let proxy = proxy.clone();
        async move { serve_http(rt, proxy, s).await }
    };

    // In its pod's network: the connection is made there and goes through.
    let netns = std::sync::Arc::new(CountingNetns::default());
    let (addr, server) = serve(GuestNetwork::Pod(netns.clone())).await;
    let (status, body) = get(addr, "/some/path?x=1").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        "upstream 200\nupstream saw GET /some/path?x=1 HTTP/1.1"
    );
    assert_eq!(netns.entered(), 1);
    server.abort();

    // Sharing the node's network, the node's loopback is not the pod's.
    let (addr, server) = serve(GuestNetwork::Node(None)).await;
    let (status, body) = get(addr, "/").await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("DestinationIpProhibited"), "{body}");
    server.abort();

    // With no network, nothing leaves.
    let (addr, server) = serve(GuestNetwork::Denied).await;
    let (status, body) = get(addr, "/").await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("HttpRequestDenied"), "{body}");
    server.abort();
}

#[tokio::test]
async fn a_command_connects_with_wasi_sockets_from_its_pod_network_and_only_there() {
    use wasmkube_runtime_wasm::GuestNetwork;
    let (dir, rt) = setup();
    let tcp_get = rt
        .prepare_component(&rt.load_component(&component("tcp-get")).unwrap())
        .unwrap();
    let up = upstream().await.to_string();

    let netns = std::sync::Arc::new(CountingNetns::default());
    // (Named output files: the args hold slashes.)
    let mut s = spec(&dir, &["tcp-get"]);
    s.args.extend([up.clone(), "/x".into()]);
    s.network = GuestNetwork::Pod(netns.clone());
    let (exit, _) = rt.run_component(&tcp_get, &s).await.unwrap();
    let out = read(s.stdout.path().unwrap());
    assert_eq!(
        exit,
        Exit::Code(0),
        "{out}{}",
        read(s.stderr.path().unwrap())
    );
    assert!(
        out.ends_with("\r\n\r\nupstream saw GET /x HTTP/1.0"),
        "{out:?}"
    );
    assert_eq!(netns.entered(), 1, "one socket, made in the pod's network");

    // By name: `wasi:sockets/ip-name-lookup` answers a cluster name from
    // the pod's cluster records (here: `upstream`, short for a Service), and
    // leaves other names to the node's resolvers.
    let port = up.rsplit_once(':').unwrap().1.to_owned();
    let mut s = spec(&dir, &["tcp-get"]);
    s.args
        .extend([format!("upstream:{port}"), "/by-name".into()]);
    s.network = GuestNetwork::Pod(netns.clone());
    s.names = Some(std::sync::Arc::new(ClusterNames));
    let (exit, _) = rt.run_component(&tcp_get, &s).await.unwrap();
    let out = read(s.stdout.path().unwrap());
    assert_eq!(
        exit,
        Exit::Code(0),
        "{out}{}",
        read(s.stderr.path().unwrap())
    );
    assert!(
        out.ends_with("upstream saw GET /by-name HTTP/1.0"),
        "{out:?}"
    );
    let mut s = spec(&dir, &["tcp-get"]);
    s.args
        .extend([format!("no-such-name.invalid:{port}"), "/".into()]);
    s.network = GuestNetwork::Pod(netns.clone());
    s.names = Some(std::sync::Arc::new(ClusterNames));
    let (exit, _) = rt.run_component(&tcp_get, &s).await.unwrap();
    let err = read(s.stderr.path().unwrap());
    assert_eq!(exit.code(), 1, "{err}");
    assert!(err.contains("cannot connect"), "{err}");

    for network in [GuestNetwork::Node(None), GuestNetwork::Denied] {
        let mut s = spec(&dir, &["tcp-get"]);
        s.args.extend([up.clone(), "/y".into()]);
        s.network = network.clone();
        let (exit, _) = rt.run_component(&tcp_get, &s).await.unwrap();
        let err = read(s.stderr.path().unwrap());
        // wasi:cli/exit in preview 2 carries only success or failure.
        assert_eq!(exit.code(), 1, "{network:?}: {err}");
        assert!(err.contains("cannot connect"), "{network:?}: {err}");
    }
}
