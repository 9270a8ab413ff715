//! End to end with Wasm workloads: the real `wasmkube` binary (its local
//! node running pods on Wasmtime), modules published with `wasmkube push` to
//! its built-in registry and to a real one beside it (Debian's
//! docker-registry on loopback), and the real kubectl. A second node joins with `wasmkube agent`.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use wasmkube_testkit::Registry;

fn push(registry: &Registry, name: &str) -> String {
    push_as(registry, name, "wasm32-wasip1", name)
}

/// A GET over plain HTTP/1.0; returns the status line's code and the body.
fn http_get(port: u16, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    // An answer that never comes fails the test rather than hanging it.
    s.set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: e2e\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let status = raw[9..12].parse().unwrap();
    (
        status,
        raw.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default(),
    )
}

/// Runs `wasmkube agent` until dropped.
struct AgentProcess(Child);

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn pod_names(s: &Server, selector: &str) -> Vec<String> {
    ok(
        s,
        &[
            "get",
            "pods",
            "-l",
            selector,
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ],
        None,
    )
    .split_whitespace()
    .map(str::to_owned)
    .collect()
}

/// The node port at which the first pod labelled `app=APP` serves its
/// container `APP`'s port 8080 (pods share the node's IP in this cluster;
/// their `wasmkube.dev/NodePorts` condition names the port).
fn node_port(s: &Server, app: &str) -> u16 {
    let ports = ok(
        s,
        &[
            "get",
            "pods",
            "-l",
            &format!("app={app}"),
            "-o",
            r#"jsonpath={.items[0].status.conditions[?(@.type=="wasmkube.dev/NodePorts")].message}"#,
        ],
        None,
    );
    ports
        .split_once(&format!("{app}:8080->"))
        .and_then(|(_, rest)| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no node port in {ports:?}"))
}

#[test]
fn wasm_pods_with_kubectl_push_and_a_real_registry() {
    let registry = Registry::start();
    let sleeper = push(&registry, "sleeper");
    let crasher = push(&registry, "crasher");
    let hog = push(&registry, "memory-hog");
    let dir = tempfile::tempdir().unwrap();
    let s = start_cluster(
        dir.path(),
        &[
            "--node-name",
            "local",
            "--crash-loop-backoff",
            "1",
            "--crash-loop-max-backoff",
            "4",
            "--horizontal-pod-autoscaler-sync-period",
            "1s",
            // The dashboard check reads a pod's recent usage history.
            "--usage-history-interval",
            "1s",
        ],
    );

    // The README's first lines: publish to the server's own registry with
    // no registry named, and run it from there.
    let hello = push_builtin(&s, "hello");

    // The local node is Ready and says what it is.
    common::wait_for(&s, "node/local", "condition=Ready", "60s");
    let nodes = ok(&s, &["get", "nodes", "-o", "wide"], None);
    assert!(
        nodes.contains("v1.33.0-wasmkube") && nodes.contains("wasmtime://48.0.8"),
        "{nodes}"
    );

    // A Job of `hello` completes; its log comes back through pods/log.
    ok(
        &s,
        &["create", "job", "hello", &format!("--image={hello}")],
        None,
    );
    ok(
        &s,
        &[
            "wait",
            "--for=condition=complete",
            "job/hello",
            "--timeout=60s",
        ],
        None,
    );
    let log = ok(&s, &["logs", "job/hello"], None);
    assert_eq!(log, "hello from wasmkube\n");

    // `kubectl run -i --rm`: kubectl's input reaches the guest's WASI stdin
    // through `kubectl attach -i`, and the guest reads end-of-file when it
    // ends (stdinOnce); then kubectl deletes the pod.
    let echo = push_builtin(&s, "echo-lines");
    let out = kubectl(
        &s,
        &[
            "run",
            "echo",
            "-i",
            "--rm",
            "--restart=Never",
            &format!("--image={echo}"),
        ],
        Some("one\ntwo\n"),
    );
    assert!(
        out.ok && out.stdout.contains("got: one\ngot: two\n2 lines\n"),
        "{}{}",
        out.stdout,
        out.stderr
    );
    ok(
        &s,
        &["wait", "--for=delete", "pod/echo", "--timeout=60s"],
        None,
    );
    // `kubectl run -it`: the guest's stdio is a terminal the agent keeps
    // (kubectl asks for one only from one, so `script` gives it one); the
    // input's end is end-of-file to the guest.
    let printed = on_a_terminal(
        &s,
        &format!("kubectl run echo-tty -it --rm --restart=Never --image={echo}"),
        b"typed\n",
    );
    assert!(
        printed.contains("got: typed (on a terminal)") && printed.contains("1 lines"),
        "{printed}"
    );

    // Every pod gets its service account's token, the cluster CA and its
    // namespace at the standard path (a preopened directory for a Wasm
    // guest), and the token authenticates as the account.
    let volumes = push_builtin(&s, "env-and-volumes");
    let manifest = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: sa-reader}}\nspec:\n  restartPolicy: Never\n  containers:\n  - name: app\n    image: {volumes}\n    args: [/var/run/secrets/kubernetes.io/serviceaccount]\n"
    );
    ok(&s, &["apply", "-f", "-"], Some(&manifest));
    ok(
        &s,
        &[
            "wait",
            "--for=jsonpath={.status.phase}=Succeeded",
            "pod/sa-reader",
            "--timeout=60s",
        ],
        None,
    );
    let log = ok(&s, &["logs", "sa-reader"], None);
    let token = log
        .lines()
        .find_map(|l| l.strip_prefix("/var/run/secrets/kubernetes.io/serviceaccount/token: "))
        .unwrap_or_else(|| panic!("no token in {log}"));
    assert!(log.contains("serviceaccount/namespace: default"), "{log}");
    assert!(
        log.contains("serviceaccount/ca.crt: -----BEGIN CERTIFICATE-----"),
        "{log}"
    );
    assert!(log.contains("serviceaccount: read-only"), "{log}");
    let admin = std::fs::read_to_string(&s.kubeconfig).unwrap();
    let ca = admin
        .lines()
        .find_map(|l| l.trim().strip_prefix("certificate-authority-data: "))
        .unwrap();
    let pod_kubeconfig = dir.path().join("pod.kubeconfig");
    std::fs::write(
        &pod_kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {}\n    certificate-authority-data: {ca}\ncontexts:\n- name: c\n  context: {{cluster: c, user: sa}}\ncurrent-context: c\nusers:\n- name: sa\n  user:\n    token: {token}\n",
            s.url
        ),
    )
    .unwrap();
    let out = Command::new("kubectl")
        .args(["auth", "whoami"])
        .env("KUBECONFIG", &pod_kubeconfig)
        .output()
        .unwrap();
    let whoami = String::from_utf8_lossy(&out.stdout);
    assert!(
        whoami.contains("system:serviceaccount:default:default"),
        "{whoami}"
    );

    persistent_volumes(&s, &volumes);

    // A Deployment runs, scales, and streams its log with -f.
    ok(
        &s,
        &[
            "create",
            "deployment",
            "sleepy",
            &format!("--image={sleeper}"),
            "--replicas=2",
        ],
        None,
    );
    ok(
        &s,
        &["rollout", "status", "deployment/sleepy", "--timeout=60s"],
        None,
    );
    ok(&s, &["scale", "deployment/sleepy", "--replicas=3"], None);
    ok(
        &s,
        &["rollout", "status", "deployment/sleepy", "--timeout=60s"],
        None,
    );
    let pods = pod_names(&s, "app=sleepy");
    assert_eq!(pods.len(), 3, "{pods:?}");
    let mut follow = Command::new("kubectl")
        .args(["logs", "-f", &pods[0]])
        .env("KUBECONFIG", &s.kubeconfig)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(follow.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert_eq!(first, "sleeping\n");
    let _ = follow.kill();
    let _ = follow.wait();

    // kubectl top reads the metrics API the agents feed.
    let top = ok(&s, &["top", "pods", "-l", "app=sleepy"], None);
    assert!(
        top.starts_with("NAME") && top.contains("CPU(cores)"),
        "{top}"
    );
    assert_eq!(
        top.lines().filter(|l| l.starts_with("sleepy-")).count(),
        3,
        "{top}"
    );
    let top = ok(&s, &["top", "nodes"], None);
    assert!(top.lines().any(|l| l.starts_with("local ")), "{top}");

    // A crashing container backs off with growing delays.
    ok(
        &s,
        &[
            "run",
            "crasher",
            &format!("--image={crasher}"),
            "--",
            "exit",
            "4",
        ],
        None,
    );
    watch_rows_until(
        &s,
        &["get", "pod", "crasher", "-w", "--no-headers"],
        |row| {
            let cols: Vec<&str> = row.split_whitespace().collect();
            cols.get(2) == Some(&"CrashLoopBackOff")
                && cols
                    .get(3)
                    .is_some_and(|r| r.parse::<u32>().is_ok_and(|n| n >= 2))
        },
    );
    let described = ok(&s, &["describe", "pod", "crasher"], None);
    assert!(
        described.contains("Back-off restarting failed container crasher"),
        "{described}"
    );
    assert!(described.contains("Exit Code:    4"), "{described}");
    assert_eq!(
        ok(&s, &["logs", "crasher", "--previous"], None),
        "crasher: exiting with 4\n"
    );

    // A guest over its memory limit is OOMKilled.
    let manifest = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: hog}}\nspec:\n  restartPolicy: Never\n  containers:\n  - name: hog\n    image: {hog}\n    resources: {{limits: {{memory: 16Mi}}}}\n"
    );
    ok(&s, &["apply", "-f", "-"], Some(&manifest));
    ok(
        &s,
        &[
            "wait",
            "--for=jsonpath={.status.phase}=Failed",
            "pod/hog",
            "--timeout=60s",
        ],
        None,
    );
    let reason = ok(
        &s,
        &[
            "get",
            "pod",
            "hog",
            "-o",
            "jsonpath={.status.containerStatuses[0].state.terminated.reason}",
        ],
        None,
    );
    assert_eq!(reason, "OOMKilled");

    // A missing image: ImagePullBackOff with the registry's reason.
    let missing = format!("{}/not-pushed:v1", registry.host());
    ok(&s, &["run", "missing", &format!("--image={missing}")], None);
    watch_rows_until(
        &s,
        &["get", "pod", "missing", "-w", "--no-headers"],
        |row| row.contains("ImagePullBackOff"),
    );
    let described = ok(&s, &["describe", "pod", "missing"], None);
    assert!(
        described.to_lowercase().contains("manifest unknown"),
        "{described}"
    );

    // An HTTP function, deployed cold: 100 replicas of a component this
    // node has never run. One compile serves them all; every pod starts on
    // its first attempt (no failed start, no restart).
    let http_hello = push_as(&registry, "http_hello", "wasm32-wasip2", "http-hello");
    let manifest = format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: http-hello}}\nspec:\n  replicas: 100\n  selector: {{matchLabels: {{app: http-hello}}}}\n  template:\n    metadata: {{labels: {{app: http-hello}}}}\n    spec:\n      terminationGracePeriodSeconds: 600\n      containers:\n      - name: http-hello\n        image: {http_hello}\n        env: [{{name: GREETING, value: e2e}}]\n        ports: [{{containerPort: 8080}}]\n"
    );
    ok(&s, &["apply", "-f", "-"], Some(&manifest));
    ok(
        &s,
        &[
            "rollout",
            "status",
            "deployment/http-hello",
            "--timeout=120s",
        ],
        None,
    );
    let restarts = ok(
        &s,
        &[
            "get",
            "pods",
            "-l",
            "app=http-hello",
            "-o",
            "jsonpath={.items[*].status.containerStatuses[0].restartCount}",
        ],
        None,
    );
    let restarts: Vec<&str> = restarts.split_whitespace().collect();
    assert_eq!(restarts.len(), 100, "{restarts:?}");
    assert!(restarts.iter().all(|r| *r == "0"), "{restarts:?}");
    let warnings = ok(
        &s,
        &[
            "get",
            "events",
            "--field-selector",
            "type=Warning",
            "-o",
            "jsonpath={range .items[*]}{.involvedObject.name}: {.reason} {.message}{\"\\n\"}{end}",
        ],
        None,
    );
    let cold_failures: Vec<&str> = warnings
        .lines()
        .filter(|l| l.starts_with("http-hello-"))
        .collect();
    assert!(cold_failures.is_empty(), "{cold_failures:?}");
    // Scaled to zero, the idle functions stop at once: their ten-minute
    // grace period is for requests in flight, and they have none.
    let before: Vec<String> = pod_names(&s, "app=http-hello")
        .iter()
        .map(|p| format!("pod/{p}"))
        .collect();
    ok(
        &s,
        &["scale", "deployment/http-hello", "--replicas=0"],
        None,
    );
    let mut wait = vec!["wait", "--for=delete", "--timeout=120s"];
    wait.extend(before.iter().map(String::as_str));
    ok(&s, &wait, None);
    ok(
        &s,
        &["scale", "deployment/http-hello", "--replicas=1"],
        None,
    );
    ok(
        &s,
        &[
            "rollout",
            "status",
            "deployment/http-hello",
            "--timeout=60s",
        ],
        None,
    );
    let pod_ip = ok(
        &s,
        &[
            "get",
            "pods",
            "-l",
            "app=http-hello",
            "-o",
            "jsonpath={.items[0].status.podIP}",
        ],
        None,
    );
    assert_eq!(pod_ip, "127.0.0.1");
    // This cluster gives pods no network of their own: the pod shares the
    // node's IP and says at which node port it serves its port 8080.
    let port = node_port(&s, "http-hello");
    let (status, body) = http_get(port, "/from/kubectl?x=1");
    assert_eq!(status, 200, "{body}");
    assert!(
        body.starts_with("hello from wasmkube: GET /from/kubectl?x=1\n"),
        "{body}"
    );
    assert!(body.lines().any(|l| l == "GREETING=e2e"), "{body}");
    assert_eq!(http_get(port, "/trap").0, 500);
    assert_eq!(http_get(port, "/again").0, 200);
    port_forward(&s, "deployment/http-hello");

    // `kubectl autoscale`: an HTTP function under CPU load (requests that
    // compute, against a 50m request) scales up to its maximum, and back
    // down once the load stops (with no stabilization window).
    let manifest = format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: burner}}\nspec:\n  selector: {{matchLabels: {{app: burner}}}}\n  template:\n    metadata: {{labels: {{app: burner}}}}\n    spec:\n      containers:\n      - name: burner\n        image: {http_hello}\n        ports: [{{containerPort: 8080}}]\n        resources: {{requests: {{cpu: 50m}}}}\n"
    );
    ok(&s, &["apply", "-f", "-"], Some(&manifest));
    ok(
        &s,
        &["rollout", "status", "deployment/burner", "--timeout=60s"],
        None,
    );
    ok(
        &s,
        &[
            "autoscale",
            "deployment",
            "burner",
            "--cpu-percent=50",
            "--min=1",
            "--max=3",
        ],
        None,
    );
    ok(
        &s,
        &[
            "patch",
            "hpa",
            "burner",
            "--type=merge",
            "-p",
            r#"{"spec":{"behavior":{"scaleDown":{"stabilizationWindowSeconds":0}}}}"#,
        ],
        None,
    );
    let burner_port = node_port(&s, "burner");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                assert_eq!(http_get(burner_port, "/burn?ms=200").0, 200);
            }
        })
    };
    ok(
        &s,
        &[
            "wait",
            "--for=jsonpath={.status.desiredReplicas}=3",
            "hpa/burner",
            "--timeout=60s",
        ],
        None,
    );
    let hpa = ok(&s, &["get", "hpa", "burner"], None);
    let header: Vec<&str> = hpa
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        [
            "NAME",
            "REFERENCE",
            "TARGETS",
            "MINPODS",
            "MAXPODS",
            "REPLICAS",
            "AGE"
        ],
        "{hpa}"
    );
    assert!(
        hpa.contains("Deployment/burner") && hpa.contains("%/50%"),
        "{hpa}"
    );
    // The same autoscaler through autoscaling/v1, as older clients and
    // charts read it: the CPU target in v1's field, the behavior kept in
    // Kubernetes' round-trip annotation.
    let v1 = ok(
        &s,
        &[
            "get",
            "horizontalpodautoscalers.v1.autoscaling",
            "burner",
            "-o",
            "jsonpath={.apiVersion} {.spec.targetCPUUtilizationPercentage} {.metadata.annotations.autoscaling\\.alpha\\.kubernetes\\.io/behavior}",
        ],
        None,
    );
    assert!(
        v1.starts_with("autoscaling/v1 50 ") && v1.contains("\"stabilizationWindowSeconds\":0"),
        "{v1}"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    load.join().unwrap();
    ok(
        &s,
        &[
            "wait",
            "--for=jsonpath={.spec.replicas}=1",
            "deployment/burner",
            "--timeout=60s",
        ],
        None,
    );
    let described = ok(&s, &["describe", "hpa", "burner"], None);
    assert!(
        described.contains("SuccessfulRescale") && described.contains("New size: 3"),
        "{described}"
    );
    // Object and External metrics: the requests one burner pod has served
    // (custom.metrics.k8s.io, the object's resource found by discovery)
    // decide; the External one has no adapter in this cluster, which the
    // autoscaler says in an event while the Object metric still scales.
    ok(&s, &["delete", "hpa", "burner"], None);
    let pod = pod_names(&s, "app=burner").remove(0);
    let object_hpa = format!(
        "apiVersion: autoscaling/v2\nkind: HorizontalPodAutoscaler\nmetadata: {{name: burner-object}}\nspec:\n  scaleTargetRef: {{apiVersion: apps/v1, kind: Deployment, name: burner}}\n  minReplicas: 1\n  maxReplicas: 2\n  metrics:\n  - type: Object\n    object:\n      describedObject: {{apiVersion: v1, kind: Pod, name: {pod}}}\n      metric: {{name: http_requests}}\n      target: {{type: Value, value: 1M}}\n  - type: External\n    external:\n      metric: {{name: queue_depth, selector: {{matchLabels: {{queue: jobs}}}}}}\n      target: {{type: AverageValue, averageValue: '10'}}\n"
    );
    ok(&s, &["apply", "-f", "-"], Some(&object_hpa));
    ok(
        &s,
        &[
            "wait",
            "--for=jsonpath={.status.currentMetrics[0].type}=Object",
            "hpa/burner-object",
            "--timeout=60s",
        ],
        None,
    );
    let object = ok(
        &s,
        &[
            "get",
            "hpa",
            "burner-object",
            "-o",
            r#"jsonpath={.status.currentMetrics[0].object.current.value} {.status.conditions[?(@.type=="ScalingActive")].status}"#,
        ],
        None,
    );
    assert!(
        object.ends_with(" True") && object.contains('m'),
        "{object}"
    );
    common::poll(
        "the External metric's event",
        Duration::from_secs(60),
        || {
            let described = ok(&s, &["describe", "hpa", "burner-object"], None);
            if described.contains("FailedGetExternalMetric") {
                Ok(())
            } else {
                Err(described)
            }
        },
    );
    ok(&s, &["delete", "hpa", "burner-object"], None);

    // A Service where pods share the node's network (no pod network, no
    // service proxy): a Wasm guest's request to its name (and so to its
    // cluster IP) is sent in-process to a ready endpoint, at the node port
    // that pod listens on.
    let fetch = push_as(&registry, "http_fetch", "wasm32-wasip2", "http-fetch");
    ok(
        &s,
        &[
            "expose",
            "deployment",
            "burner",
            "--port=80",
            "--target-port=8080",
        ],
        None,
    );
    let manifest = format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: fetcher}}\nspec:\n  selector: {{matchLabels: {{app: fetcher}}}}\n  template:\n    metadata: {{labels: {{app: fetcher}}}}\n    spec:\n      containers:\n      - name: fetcher\n        image: {fetch}\n        env: [{{name: UPSTREAM, value: 'http://burner'}}]\n        ports: [{{containerPort: 8080}}]\n"
    );
    ok(&s, &["apply", "-f", "-"], Some(&manifest));
    ok(
        &s,
        &["rollout", "status", "deployment/fetcher", "--timeout=60s"],
        None,
    );
    let (status, body) = http_get(node_port(&s, "fetcher"), "/through/the/service");
    assert_eq!(status, 200, "{body}");
    assert!(
        body.starts_with("upstream 200\nhello from wasmkube: GET /through/the/service"),
        "{body}"
    );

    // The same for a command's wasi:sockets connection to the cluster IP.
    let tcp_get = push_as(&registry, "tcp-get", "wasm32-wasip2", "tcp-get");
    let cluster_ip = ok(
        &s,
        &[
            "get",
            "service",
            "burner",
            "-o",
            "jsonpath={.spec.clusterIP}",
        ],
        None,
    );
    let manifest = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: tcp-get}}\nspec:\n  restartPolicy: Never\n  containers:\n  - name: get\n    image: {tcp_get}\n    args: ['{cluster_ip}:80', /by/cluster/ip]\n"
    );
    ok(&s, &["apply", "-f", "-"], Some(&manifest));
    ok(
        &s,
        &[
            "wait",
            "--for=jsonpath={.status.phase}=Succeeded",
            "pod/tcp-get",
            "--timeout=60s",
        ],
        None,
    );
    let got = ok(&s, &["logs", "tcp-get"], None);
    assert!(
        got.lines().next().is_some_and(|l| l.ends_with(" 200 OK"))
            && got.contains("hello from wasmkube: GET /by/cluster/ip"),
        "{got}"
    );

    // NetworkPolicy for guests on the node's network, decided in-process
    // where they connect: once the burner's pods admit only clients, a
    // guest without the label cannot connect to them through the Service
    // (tried again under a new name until the node has seen the policy),
    // and one with it can; deleted, the policy lets everyone in again.
    let policy = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: burner-clients}\nspec:\n  podSelector: {matchLabels: {app: burner}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {role: client}}}]\n    ports: [{port: 8080}]\n";
    ok(&s, &["apply", "-f", "-"], Some(policy));
    let get = |name: &str, labels: &str, restart: &str| -> String {
        let manifest = format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, labels: {{{labels}}}}}\nspec:\n  restartPolicy: {restart}\n  containers:\n  - name: get\n    image: {tcp_get}\n    args: ['{cluster_ip}:80', /policy]\n"
        );
        ok(&s, &["apply", "-f", "-"], Some(&manifest));
        let phase = common::poll(
            &format!("pod/{name} to finish"),
            Duration::from_secs(60),
            || {
                let phase = ok(
                    &s,
                    &["get", "pod", name, "-o", "jsonpath={.status.phase}"],
                    None,
                );
                if phase == "Succeeded" || phase == "Failed" {
                    Ok(phase)
                } else {
                    Err(phase)
                }
            },
        );
        let log = ok(&s, &["logs", name], None);
        ok(&s, &["delete", "pod", name, "--wait=false"], None);
        format!("{phase}: {log}")
    };
    let attempt = std::cell::Cell::new(0);
    common::poll(
        "a guest refused by the burner's policy",
        Duration::from_secs(60),
        || {
            attempt.set(attempt.get() + 1);
            let got = get(
                &format!("np-other-{}", attempt.get()),
                "role: other",
                "Never",
            );
            if got.starts_with("Failed: ") {
                Ok(got)
            } else {
                Err(got)
            }
        },
    );
    let refused = get("np-other-last", "role: other", "Never");
    assert!(
        refused.starts_with("Failed: ") && refused.contains("cannot connect"),
        "{refused}"
    );
    let allowed = get("np-client", "role: client", "OnFailure");
    assert!(
        allowed.starts_with("Succeeded: ") && allowed.contains("GET /policy"),
        "{allowed}"
    );
    ok(&s, &["delete", "networkpolicy", "burner-clients"], None);
    let open = get("np-other-open", "role: other", "OnFailure");
    assert!(open.starts_with("Succeeded: "), "{open}");

    dashboard(&s);

    // A second node joins with `wasmkube agent` and runs pods sent to it.
    let agent = AgentProcess(
        Command::new(wasmkube())
            .args([
                "agent",
                "--name",
                "second",
                "--port",
                "0",
                "--no-pod-network",
                "--no-service-proxy",
                "--no-gateway",
            ])
            .arg("--data-dir")
            .arg(dir.path().join("second"))
            .arg("--kubeconfig")
            .arg(&s.kubeconfig)
            .env("RUST_LOG", "warn")
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    ok(
        &s,
        &["wait", "--for=create", "node/second", "--timeout=60s"],
        None,
    );
    ok(
        &s,
        &[
            "wait",
            "--for=condition=Ready",
            "node/second",
            "--timeout=60s",
        ],
        None,
    );
    let manifest = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: remote}}\nspec:\n  restartPolicy: Never\n  nodeSelector: {{kubernetes.io/hostname: second}}\n  containers:\n  - name: hello\n    image: {hello}\n    args: [from, the, second, node]\n"
    );
    ok(&s, &["apply", "-f", "-"], Some(&manifest));
    ok(
        &s,
        &[
            "wait",
            "--for=jsonpath={.status.phase}=Succeeded",
            "pod/remote",
            "--timeout=60s",
        ],
        None,
    );
    assert_eq!(
        ok(
            &s,
            &["get", "pod", "remote", "-o", "jsonpath={.spec.nodeName}"],
            None
        ),
        "second"
    );
    assert_eq!(
        ok(&s, &["logs", "remote"], None),
        "hello from wasmkube\nargs: from the second node\n"
    );
    drop(agent);
}

/// Runs the `helm` that `scripts/test.sh` installs, against the server.
fn helm(s: &Server, args: &[&str]) -> String {
    let out = Command::new("helm")
        .args(args)
        .env("KUBECONFIG", &s.kubeconfig)
        .env("HELM_CACHE_HOME", s.kubeconfig.with_file_name("helm-cache"))
        .env(
            "HELM_CONFIG_HOME",
            s.kubeconfig.with_file_name("helm-config"),
        )
        .env("HELM_DATA_HOME", s.kubeconfig.with_file_name("helm-data"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run helm ({e}); scripts/test.sh installs it"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "helm {args:?}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Helm 4 unchanged (server-side apply, its default): a chart of Wasm
/// images from the built-in registry installed, upgraded with an HPA and an
/// Ingress, rolled back, tested with its hook pod, and uninstalled with
/// nothing left behind.
#[test]
fn helm_installs_upgrades_rolls_back_tests_and_uninstalls_a_wasm_chart() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_cluster(dir.path(), &["--node-name", "local"]);
    let function = push_builtin_as(&s, "http_hello", "wasm32-wasip2", "http-hello");
    let hello = push_builtin(&s, "hello");
    let chart = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/charts/wasm-app");
    let chart = chart.to_str().unwrap();
    let (image, test_image) = (format!("image={function}"), format!("testImage={hello}"));
    let base = [
        "--set",
        &image,
        "--set",
        &test_image,
        "--wait",
        "--timeout",
        "60s",
    ];

    let mut install = vec!["install", "demo", chart];
    install.extend(base);
    let out = helm(&s, &install);
    assert!(out.contains("STATUS: deployed"), "{out}");
    let list = helm(&s, &["list"]);
    assert!(
        list.lines()
            .any(|l| l.starts_with("demo") && l.contains("deployed")),
        "{list}"
    );
    let ready = ok(
        &s,
        &[
            "get",
            "deploy/demo-fn",
            "-o",
            "jsonpath={.status.readyReplicas}",
        ],
        None,
    );
    assert_eq!(ready, "1");
    // The chart's crds/ went in first; its template made a Widget, which
    // the CRD's schema defaulted.
    let widget = ok(
        &s,
        &[
            "get",
            "widgets.charts.wasmkube.dev/demo-widget",
            "-o",
            "jsonpath={.spec.size} {.spec.color}",
        ],
        None,
    );
    assert_eq!(widget, "1 blue");

    // An upgrade that turns on the HPA and the Ingress (served kinds).
    let mut upgrade = vec!["upgrade", "demo", chart];
    upgrade.extend(base);
    upgrade.extend([
        "--set",
        "autoscaling.enabled=true",
        "--set",
        "ingress.enabled=true",
    ]);
    helm(&s, &upgrade);
    ok(&s, &["get", "hpa/demo-fn", "ingress/demo-fn"], None);
    let history = helm(&s, &["history", "demo"]);
    assert_eq!(
        history
            .lines()
            .filter(|l| l.contains("Upgrade complete"))
            .count(),
        1,
        "{history}"
    );

    // Back to revision 1: the HPA and the Ingress go again.
    helm(&s, &["rollback", "demo", "1", "--wait", "--timeout", "60s"]);
    let gone = kubectl(&s, &["get", "hpa/demo-fn"], None);
    assert!(
        !gone.ok && gone.stderr.contains("NotFound"),
        "{}",
        gone.stderr
    );
    let gone = kubectl(&s, &["get", "ingress/demo-fn"], None);
    assert!(
        !gone.ok && gone.stderr.contains("NotFound"),
        "{}",
        gone.stderr
    );
    let status = helm(&s, &["status", "demo"]);
    assert!(status.contains("REVISION: 3"), "{status}");

    // The test hook: a Wasm pod that must succeed.
    let test = helm(&s, &["test", "demo", "--logs", "--timeout", "60s"]);
    assert!(test.contains("Phase:          Succeeded"), "{test}");
    assert!(test.contains("hello from wasmkube"), "{test}");

    // Uninstall deletes the release's objects and its history (Secrets,
    // deleted with protobuf DeleteOptions).
    let out = helm(&s, &["uninstall", "demo", "--wait", "--timeout", "60s"]);
    assert!(out.contains("uninstalled"), "{out}");
    let left = ok(
        &s,
        &["get", "secrets", "-l", "owner=helm", "-o", "name"],
        None,
    );
    assert_eq!(left, "", "release history left behind");
    let gone = kubectl(&s, &["get", "deploy/demo-fn"], None);
    assert!(
        !gone.ok && gone.stderr.contains("NotFound"),
        "{}",
        gone.stderr
    );
    assert_eq!(helm(&s, &["list", "-q"]).trim(), "");
    // The Widget went with the release; Helm leaves CRDs in place.
    let gone = kubectl(
        &s,
        &["get", "widgets.charts.wasmkube.dev/demo-widget"],
        None,
    );
    assert!(
        !gone.ok && gone.stderr.contains("NotFound"),
        "{}",
        gone.stderr
    );
    ok(&s, &["get", "crd/widgets.charts.wasmkube.dev"], None);
}

/// A pod field through jsonpath.
fn pod_field(s: &Server, pod: &str, path: &str) -> String {
    ok(
        s,
        &["get", "pod", pod, "-o", &format!("jsonpath={path}")],
        None,
    )
    .trim()
    .to_owned()
}

#[test]
fn a_node_keeps_serving_while_no_api_server_answers_and_restarts_nothing_when_one_returns() {
    let dir = tempfile::tempdir().unwrap();
    let server_dir = dir.path().join("server");
    let mut s = start_server(&server_dir);
    let function = push_builtin_as(&s, "http_hello", "wasm32-wasip2", "http-hello");
    let _agent = AgentProcess(
        Command::new(wasmkube())
            .args([
                "agent",
                "--name",
                "steady",
                "--port",
                "0",
                "--no-pod-network",
                "--no-service-proxy",
                "--no-gateway",
                "--server",
                &s.url,
                "--token",
                &s.join_token(),
            ])
            .arg("--data-dir")
            .arg(dir.path().join("agent"))
            .env("RUST_LOG", "warn")
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for(&s, "node/steady", "condition=Ready", "60s");
    let manifest = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: steady, labels: {{app: http-hello}}}}\nspec:\n  containers:\n  - name: http-hello\n    image: {function}\n    ports: [{{containerPort: 8080}}]\n"
    );
    ok(&s, &["apply", "-f", "-"], Some(&manifest));
    wait_for(&s, "pod/steady", "condition=Ready", "60s");
    let port = node_port(&s, "http-hello");
    assert_eq!(http_get(port, "/before").0, 200);
    let started = pod_field(
        &s,
        "steady",
        "{.metadata.uid} {.status.containerStatuses[0].state.running.startedAt} {.status.containerStatuses[0].restartCount}",
    );

    // The only API server dies: the function keeps answering.
    let url = s.url.clone();
    s.kill();
    for i in 0..50 {
        let (status, body) = http_get(port, &format!("/during/{i}"));
        assert_eq!(status, 200, "{body}");
    }

    // It comes back where it was: the node reconnects, resumes its watches
    // and changes nothing that was running.
    let listen = url.split("://").nth(1).expect("a URL");
    let s = start_server_at(&server_dir, listen, &[]);
    wait_for(&s, "node/steady", "condition=Ready", "60s");
    assert_eq!(http_get(port, "/after").0, 200);
    assert_eq!(
        pod_field(
            &s,
            "steady",
            "{.metadata.uid} {.status.containerStatuses[0].state.running.startedAt} {.status.containerStatuses[0].restartCount}",
        ),
        started
    );
    // Its watch works again: a deletion made now is carried out by the node
    // (the pod is gone only once the node confirms its container stopped).
    ok(&s, &["delete", "pod", "steady", "--timeout=60s"], None);
    let gone = kubectl(&s, &["get", "pod", "steady"], None);
    assert!(
        !gone.ok && gone.stderr.contains("NotFound"),
        "{}",
        gone.stderr
    );
}

/// Claims and local-path volumes on the local node: each pod of a
/// StatefulSet gets its own claim, bound to a directory provisioned on the
/// node and preopened for the Wasm guest; what a pod's volume holds is
/// there for its replacement and not for its sibling; a claim scaled away
/// or deleted takes its volume and its directory with it, while a retained
/// one outlives its set.
fn persistent_volumes(s: &Server, image: &str) {
    let classes = ok(s, &["get", "storageclass"], None);
    assert!(
        classes.contains("local-path (default)") && classes.contains("WaitForFirstConsumer"),
        "{classes}"
    );
    let manifest = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: vault}}\nspec: {{clusterIP: None, selector: {{app: vault}}}}\n---\napiVersion: apps/v1\nkind: StatefulSet\nmetadata: {{name: vault}}\nspec:\n  serviceName: vault\n  replicas: 2\n  podManagementPolicy: Parallel\n  persistentVolumeClaimRetentionPolicy: {{whenScaled: Delete, whenDeleted: Retain}}\n  selector: {{matchLabels: {{app: vault}}}}\n  template:\n    metadata: {{labels: {{app: vault}}}}\n    spec:\n      containers:\n      - name: app\n        image: {image}\n        args: [/data]\n        volumeMounts: [{{name: data, mountPath: /data}}]\n  volumeClaimTemplates:\n  - metadata: {{name: data}}\n    spec: {{accessModes: [ReadWriteOnce], resources: {{requests: {{storage: 16Mi}}}}}}\n"
    );
    ok(s, &["apply", "-f", "-"], Some(&manifest));
    let mut dirs = Vec::new();
    let mut volumes = Vec::new();
    for i in 0..2 {
        let claim = format!("pvc/data-vault-{i}");
        wait_for(s, &claim, "jsonpath={.status.phase}=Bound", "60s");
        let volume = ok(
            s,
            &["get", &claim, "-o", "jsonpath={.spec.volumeName}"],
            None,
        );
        let path = ok(
            s,
            &[
                "get",
                "pv",
                &volume,
                "-o",
                "jsonpath={.spec.local.path} {.status.phase} {.spec.claimRef.name}",
            ],
            None,
        );
        let (path, rest) = path.split_once(' ').unwrap();
        assert_eq!(rest, format!("Bound data-vault-{i}"));
        volumes.push(volume);
        dirs.push(std::path::PathBuf::from(path));
    }
    let listed = ok(s, &["get", "pvc"], None);
    assert!(
        listed.contains("data-vault-0") && listed.contains("RWO"),
        "{listed}"
    );

    // The guest sees its volume writable; a file put there is seen by the
    // pod that replaces it, and not by its sibling.
    let logs_with = |pod: &str, needle: &str| {
        poll(
            &format!("{pod} logs {needle:?}"),
            std::time::Duration::from_secs(60),
            || {
                let out = kubectl(s, &["logs", pod], None);
                if out.ok && out.stdout.contains(needle) {
                    Ok(())
                } else {
                    Err(out.stdout + &out.stderr)
                }
            },
        )
    };
    logs_with("vault-0", "/data: writable");
    logs_with("vault-1", "/data: writable");
    std::fs::write(dirs[0].join("note.txt"), "kept by vault-0").unwrap();
    let uid = ok(
        s,
        &["get", "pod", "vault-0", "-o", "jsonpath={.metadata.uid}"],
        None,
    );
    ok(s, &["delete", "pod", "vault-0", "--wait=true"], None);
    poll(
        "vault-0 replaced",
        std::time::Duration::from_secs(60),
        || {
            let now = kubectl(
                s,
                &["get", "pod", "vault-0", "-o", "jsonpath={.metadata.uid}"],
                None,
            );
            if now.ok && !now.stdout.is_empty() && now.stdout != uid {
                Ok(())
            } else {
                Err(now.stdout)
            }
        },
    );
    logs_with("vault-0", "/data/note.txt: kept by vault-0");
    let sibling = ok(s, &["logs", "vault-1"], None);
    assert!(!sibling.contains("note.txt"), "{sibling}");

    // Expansion: the local-path class allows it, so a bound claim grows at
    // once (a directory has no size to change); it never shrinks.
    ok(
        s,
        &[
            "patch",
            "pvc",
            "data-vault-0",
            "-p",
            r#"{"spec":{"resources":{"requests":{"storage":"32Mi"}}}}"#,
        ],
        None,
    );
    wait_for(
        s,
        "pvc/data-vault-0",
        "jsonpath={.status.capacity.storage}=32Mi",
        "60s",
    );
    assert_eq!(
        ok(
            s,
            &[
                "get",
                "pv",
                &volumes[0],
                "-o",
                "jsonpath={.spec.capacity.storage}"
            ],
            None
        ),
        "32Mi"
    );
    let shrink = kubectl(
        s,
        &[
            "patch",
            "pvc",
            "data-vault-0",
            "-p",
            r#"{"spec":{"resources":{"requests":{"storage":"8Mi"}}}}"#,
        ],
        None,
    );
    assert!(
        !shrink.ok
            && shrink
                .stderr
                .contains("field can not be less than previous value"),
        "{}",
        shrink.stderr
    );

    // Scaled to one (whenScaled: Delete): the second claim goes with its
    // pod, its volume with the claim, its directory with the volume.
    ok(s, &["scale", "statefulset", "vault", "--replicas=1"], None);
    ok(
        s,
        &[
            "wait",
            "--for=delete",
            &format!("pv/{}", volumes[1]),
            "--timeout=60s",
        ],
        None,
    );
    assert!(!dirs[1].exists(), "{} left behind", dirs[1].display());
    assert!(dirs[0].join("note.txt").exists());

    // A bound volume deleted by mistake waits for its claim (volume
    // protection): it and its directory stay.
    ok(s, &["delete", "pv", &volumes[0], "--wait=false"], None);
    let deleting = ok(
        s,
        &[
            "get",
            "pv",
            &volumes[0],
            "-o",
            "jsonpath={.metadata.deletionTimestamp} {.status.phase}",
        ],
        None,
    );
    assert!(
        deleting.ends_with(" Bound") && deleting.len() > " Bound".len(),
        "{deleting}"
    );
    assert!(
        dirs[0].join("note.txt").exists(),
        "a bound volume's data is kept"
    );

    // The set deleted (whenDeleted: Retain): its claim stays bound; deleted
    // once no pod uses it, it takes its volume and its directory.
    ok(
        s,
        &[
            "delete",
            "statefulset",
            "vault",
            "--wait=true",
            "--timeout=60s",
        ],
        None,
    );
    ok(
        s,
        &["wait", "--for=delete", "pod/vault-0", "--timeout=60s"],
        None,
    );
    assert_eq!(
        ok(
            s,
            &[
                "get",
                "pvc",
                "data-vault-0",
                "-o",
                "jsonpath={.status.phase}"
            ],
            None
        ),
        "Bound"
    );
    ok(
        s,
        &[
            "delete",
            "pvc",
            "data-vault-0",
            "--wait=true",
            "--timeout=60s",
        ],
        None,
    );
    ok(
        s,
        &[
            "wait",
            "--for=delete",
            &format!("pv/{}", volumes[0]),
            "--timeout=60s",
        ],
        None,
    );
    assert!(!dirs[0].exists(), "{} left behind", dirs[0].display());
    ok(s, &["delete", "service", "vault"], None);

    // A static local volume of a class nobody provisions for (Kubernetes'
    // `kubernetes.io/no-provisioner` pattern): the pod goes to its node, the
    // claim binds it, and the guest reads what the directory already holds;
    // the volume is kept (Retain) when the claim goes.
    let disk = tempfile::tempdir().unwrap();
    std::fs::write(disk.path().join("seed.txt"), "was here before").unwrap();
    let manifest = format!(
        "apiVersion: storage.k8s.io/v1\nkind: StorageClass\nmetadata: {{name: local-storage}}\nprovisioner: kubernetes.io/no-provisioner\nvolumeBindingMode: WaitForFirstConsumer\n---\napiVersion: v1\nkind: PersistentVolume\nmetadata: {{name: local-disk}}\nspec:\n  capacity: {{storage: 1Gi}}\n  accessModes: [ReadWriteOnce]\n  storageClassName: local-storage\n  local: {{path: {}}}\n  nodeAffinity: {{required: {{nodeSelectorTerms: [{{matchExpressions: [{{key: kubernetes.io/hostname, operator: In, values: [local]}}]}}]}}}}\n---\napiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {{name: disk}}\nspec: {{storageClassName: local-storage, accessModes: [ReadWriteOnce], resources: {{requests: {{storage: 100Mi}}}}}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {{name: disk-reader}}\nspec:\n  restartPolicy: Never\n  containers:\n  - name: app\n    image: {image}\n    args: [/disk]\n    volumeMounts: [{{name: d, mountPath: /disk}}]\n  volumes: [{{name: d, persistentVolumeClaim: {{claimName: disk}}}}]\n",
        disk.path().display()
    );
    ok(s, &["apply", "-f", "-"], Some(&manifest));
    ok(
        s,
        &[
            "wait",
            "--for=jsonpath={.status.phase}=Succeeded",
            "pod/disk-reader",
            "--timeout=60s",
        ],
        None,
    );
    assert_eq!(
        ok(
            s,
            &[
                "get",
                "pvc",
                "disk",
                "-o",
                "jsonpath={.spec.volumeName} {.status.phase}"
            ],
            None
        ),
        "local-disk Bound"
    );
    let log = ok(s, &["logs", "disk-reader"], None);
    assert!(log.contains("/disk/seed.txt: was here before"), "{log}");
    ok(s, &["delete", "pod", "disk-reader"], None);
    ok(
        s,
        &["delete", "pvc", "disk", "--wait=true", "--timeout=60s"],
        None,
    );
    wait_for(
        s,
        "pv/local-disk",
        "jsonpath={.status.phase}=Released",
        "60s",
    );
    assert!(
        disk.path().join("seed.txt").exists(),
        "a retained volume keeps its data"
    );
    ok(s, &["delete", "pv", "local-disk", "--timeout=60s"], None);
    ok(s, &["delete", "storageclass", "local-storage"], None);
}

/// `kubectl port-forward` to a Wasm HTTP function's container port 8080
/// (served at a node port of its own here): two connections in turn
/// through one session.
fn port_forward(s: &Server, target: &str) {
    let forward = common::PortForward::start(s, target, 8080);
    for path in ["/forwarded/1", "/forwarded/2"] {
        let (status, body) = http_get(forward.local, path);
        assert_eq!(status, 200, "{body}");
        assert!(
            body.starts_with(&format!("hello from wasmkube: GET {path}\n")),
            "{body}"
        );
    }
}

/// The dashboard, in Debian's Chromium driven by Playwright through
/// `kubectl proxy` (`tests/dashboard/dashboard.mjs check`): the page loads
/// with no script error or refused resource, shows a pod created through
/// kubectl while it is open, streams that pod's log, draws its CPU chart
/// from samples (and, opened afresh, from the usage its node kept from
/// before) and shows its Wasm module's facts; every other view draws.
/// Without credentials the page is refused, as the API is.
fn dashboard(s: &Server) {
    let anonymous = Command::new("curl")
        .args(["-sk", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!("{}/dashboard/", s.url))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&anonymous.stdout), "401");
    let page = ok(s, &["get", "--raw", "/dashboard/"], None);
    assert!(page.contains("<title>wasmkube</title>"), "{page}");

    let image = push_builtin(s, "cpu-burner");
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("pod.yaml");
    std::fs::write(
        &manifest,
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: dash-burner\nspec:\n  \
             terminationGracePeriodSeconds: 1\n  containers:\n  - name: burner\n    \
             image: {image}\n    resources:\n      limits: {{cpu: 50m, memory: 16Mi}}\n"
        ),
    )
    .unwrap();
    let shot = dir.path().join("dashboard.png");
    let out = Command::new("node")
        .arg(wasmkube_testkit::repo_root().join("tests/dashboard/dashboard.mjs"))
        .arg("check")
        .arg("--kubeconfig")
        .arg(&s.kubeconfig)
        .arg("--manifest")
        .arg(&manifest)
        .args(["--pod", "dash-burner", "--screenshot"])
        .arg(&shot)
        .output()
        .expect("node is installed (scripts/test.sh)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the dashboard check failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    println!("dashboard: {seen}");
    // Shown after its create (not a row left from before).
    assert!(seen["shownAfterMs"].as_f64().unwrap() >= 0.0, "{seen}");
    assert!(seen["chartPoints"].as_u64().unwrap() >= 2, "{seen}");
    assert!(seen["historySpanMs"].as_f64().unwrap() > 1000.0, "{seen}");
    assert!(
        seen["moduleSize"].as_str().unwrap().ends_with("KiB"),
        "{seen}"
    );
    assert!(
        seen["logText"].as_str().unwrap().contains("rounds/s"),
        "{seen}"
    );
    assert!(
        seen["nodesText"]
            .as_str()
            .unwrap()
            .contains("wasmtime://48.0.8"),
        "{seen}"
    );
    assert!(std::fs::metadata(&shot).unwrap().len() > 10_000);
    ok(s, &["delete", "pod", "dash-burner"], None);
}
