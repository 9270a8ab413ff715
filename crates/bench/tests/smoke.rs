//! Every benchmark runs end to end with tiny parameters (the CI smoke run;
//! it checks they work, not how fast).

use std::process::Command;

fn bench(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_wasmkube-bench"))
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{args:?}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn create_bench_smoke() {
    let out = bench(&[
        "create",
        "--clients",
        "4",
        "--objects",
        "100",
        "--etcd-members",
        "1",
    ]);
    assert!(out.contains("API on etcd"), "{out}");
    assert!(out.contains("objects/s"), "{out}");
}

#[test]
fn auth_bench_smoke() {
    let out = bench(&[
        "auth",
        "--clients",
        "4",
        "--objects",
        "50",
        "--rounds",
        "1",
        "--latency-samples",
        "5",
        "--handshakes",
        "10",
    ]);
    assert!(out.contains("secure/plain"), "{out}");
    assert!(out.contains("TLS handshake"), "{out}");
}

#[test]
fn watch_bench_smoke() {
    let out = bench(&["watch", "--watchers", "5", "--events", "5"]);
    assert!(out.contains("p99"), "{out}");
}

#[test]
fn startup_bench_smoke() {
    // Measures the `wasmkube` binary that the workspace build puts next to this one.
    let out = bench(&["startup", "--runs", "1"]);
    assert!(out.contains("idle RSS"), "{out}");
}

#[test]
fn schedule_bench_smoke() {
    let out = bench(&["schedule", "--nodes", "5", "--pods", "20", "--clients", "4"]);
    assert!(out.contains("all bound"), "{out}");
}

#[test]
fn rollout_bench_smoke() {
    let out = bench(&["rollout", "--nodes", "3", "--replicas", "5"]);
    assert!(out.contains("all Ready"), "{out}");
}

#[test]
fn pod_startup_bench_smoke() {
    let out = bench(&[
        "pod-startup",
        "--pods",
        "4",
        "--batch",
        "2",
        "--linux",
        "2",
        "--deploy",
        "4",
    ]);
    assert!(out.contains("cold/cached"), "{out}");
    assert!(out.contains("p99 ratio"), "{out}");
    assert!(out.contains("p50 ratio linux/wasm"), "{out}");
}

#[test]
fn density_bench_smoke() {
    let out = bench(&[
        "density", "--pods", "5", "--probes", "2", "--outage", "1", "--settle", "1",
    ]);
    assert!(out.contains("agent RSS per pod"), "{out}");
    assert!(out.contains("node Ready at the end      yes"), "{out}");
    assert!(out.contains("pods changed               0 of"), "{out}");
}

#[test]
fn http_bench_smoke() {
    let out = bench(&["http", "--clients", "2", "--seconds", "0.5"]);
    assert!(out.contains("pod at a node port"), "{out}");
    // The test script runs as root with the CNI plugins: the pod IP too.
    assert!(out.contains("ratio pod IP/node port"), "{out}");
}

#[test]
fn proxy_bench_smoke() {
    let out = bench(&[
        "proxy",
        "--services",
        "50",
        "--endpoints",
        "2",
        "--changes",
        "5",
    ]);
    assert!(out.contains("rules in place"), "{out}");
}

#[test]
fn netpol_bench_smoke() {
    let out = bench(&[
        "netpol",
        "--policies",
        "20",
        "--namespaces",
        "4",
        "--pods",
        "10",
        "--changes",
        "5",
        "--connections",
        "20",
        "--rounds",
        "1",
    ]);
    assert!(out.contains("policy change to rules in place"), "{out}");
    assert!(out.contains("new connections per second"), "{out}");
}

#[test]
fn custom_resources_bench_smoke() {
    let out = bench(&[
        "custom-resources",
        "--clients",
        "4",
        "--objects",
        "20",
        "--events",
        "5",
    ]);
    assert!(out.contains("ratio custom/built-in"), "{out}");
    assert!(out.contains("watch p99 custom/built-in"), "{out}");
}

#[test]
fn dns_bench_smoke() {
    let out = bench(&["dns", "--services", "20", "--seconds", "1", "--rate", "200"]);
    assert!(out.contains("the queries per second"), "{out}");
}

#[test]
fn serving_bench_smoke() {
    let out = bench(&[
        "serving",
        "--cold",
        "2",
        "--functions",
        "2",
        "--step",
        "2",
        "--idle",
        "2",
        "--later-groups",
        "1",
    ]);
    // The test script runs as root: pods get their own IPs.
    assert!(out.contains("peer: warm pod"), "{out}");
    assert!(out.contains("agent RSS per function"), "{out}");
    assert!(out.contains("agent connections to the API server"), "{out}");
}

#[test]
fn registry_bench_smoke() {
    let out = bench(&["registry", "--mib", "2", "--layers", "2", "--runs", "1"]);
    assert!(out.contains("median push"), "{out}");
    assert!(out.contains("median pull"), "{out}");
}

#[test]
fn push_to_running_bench_smoke() {
    let out = bench(&["push-to-running", "--runs", "1"]);
    assert!(out.contains("push -> Running: p50"), "{out}");
}

#[test]
fn failover_bench_smoke() {
    let out = bench(&["failover", "--runs", "1", "--etcd-members", "1"]);
    assert!(out.contains("next pod bound"), "{out}");
}

#[test]
fn dashboard_bench_smoke() {
    let out = bench(&["dashboard", "--pods", "2", "--loads", "2"]);
    assert!(out.contains("dashboard / kubectl watch (p50)"), "{out}");
}
