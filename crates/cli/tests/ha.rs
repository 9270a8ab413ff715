//! Several API servers on one etcd (three members the test starts on
//! loopback): writes through one are read and watched through another, a
//! watch resumed on another server from the last resourceVersion it saw
//! has no gap and no duplicate, the `kubernetes` Service lists the live
//! servers, and the scheduler and controller manager move to a surviving
//! server when the one running them is killed, while a node that knows
//! both servers moves to the survivor.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use serde_json::Value;
use wasmkube_testkit::etcd::EtcdCluster;

/// A raw watch on `server` (HTTP/1.0, so the body is not chunked): each
/// event as it arrives.
fn watch(server: &Server, path_and_query: &str) -> mpsc::Receiver<Value> {
    let addr = server.url.trim_start_matches("http://").to_owned();
    let mut conn = TcpStream::connect(&addr).expect("connect to the API server");
    write!(
        conn,
        "GET {path_and_query} HTTP/1.0\r\nHost: {addr}\r\n\r\n"
    )
    .unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(conn).lines().map_while(Result::ok);
        let status = lines.next().unwrap_or_default();
        assert!(status.contains(" 200 "), "watch refused: {status}");
        for line in lines.skip_while(|l| !l.is_empty()).skip(1) {
            let Ok(event) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if tx.send(event).is_err() {
                break;
            }
        }
    });
    rx
}

fn next_event(events: &mpsc::Receiver<Value>) -> (String, String, u64) {
    let e = events
        .recv_timeout(Duration::from_secs(30))
        .expect("a watch event");
    let rv = e["object"]["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("an event with a resourceVersion: {e}"));
    (
        e["type"].as_str().unwrap_or_default().to_owned(),
        e["object"]["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        rv,
    )
}

/// Creates or changes a ConfigMap through `s`; returns the write's
/// resourceVersion.
fn write_configmap(s: &Server, name: &str, value: &str) -> u64 {
    let manifest = format!(
        "{{\"apiVersion\":\"v1\",\"kind\":\"ConfigMap\",\"metadata\":{{\"name\":\"{name}\"}},\"data\":{{\"v\":\"{value}\"}}}}"
    );
    ok(
        s,
        &[
            "apply",
            "--server-side",
            "-f",
            "-",
            "-o",
            "jsonpath={.metadata.resourceVersion}",
        ],
        Some(&manifest),
    )
    .trim()
    .parse()
    .expect("a resourceVersion")
}

fn holder(s: &Server, lease: &str) -> String {
    ok(
        s,
        &[
            "get",
            "lease",
            "-n",
            "kube-system",
            lease,
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ],
        None,
    )
    .trim()
    .to_owned()
}

/// The `kubernetes` Endpoints' addresses as sorted `IP:PORT`s.
fn api_endpoints(s: &Server) -> Vec<String> {
    let out = kubectl(s, &["get", "endpoints", "kubernetes", "-o", "json"], None);
    if !out.ok {
        return Vec::new();
    }
    let e: Value = serde_json::from_str(&out.stdout).expect("JSON");
    let mut found = Vec::new();
    for subset in e["subsets"].as_array().into_iter().flatten() {
        for port in subset["ports"].as_array().into_iter().flatten() {
            for a in subset["addresses"].as_array().into_iter().flatten() {
                found.push(format!(
                    "{}:{}",
                    a["ip"].as_str().unwrap_or_default(),
                    port["port"]
                ));
            }
        }
    }
    found.sort();
    found
}

fn host_port(s: &Server) -> String {
    s.url.trim_start_matches("http://").to_owned()
}

#[test]
fn several_api_servers_serve_one_cluster_on_etcd() {
    let etcd = EtcdCluster::start(3);
    let endpoints = etcd.endpoints().join(",");
    let flags = ["--etcd-servers", endpoints.as_str(), "--insecure-http"];
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = start_server_with(dir_a.path(), &flags);
    // A started first, so it runs the scheduler and the controller manager.
    for lease in ["kube-scheduler", "kube-controller-manager"] {
        let what = format!("lease/{lease}");
        ok(
            &a,
            &[
                "wait",
                "--for=create",
                "-n",
                "kube-system",
                &what,
                "--timeout=30s",
            ],
            None,
        );
    }
    let (scheduler_a, controllers_a) = (
        holder(&a, "kube-scheduler"),
        holder(&a, "kube-controller-manager"),
    );
    let b = start_server_with(dir_b.path(), &flags);

    // A write through A is read through B at once: a get or a list without
    // a resourceVersion is a quorum read.
    let first = write_configmap(&a, "shared", "one");
    let seen = ok(
        &b,
        &[
            "get",
            "configmap",
            "shared",
            "-o",
            "jsonpath={.metadata.resourceVersion} {.data.v}",
        ],
        None,
    );
    assert_eq!(seen.trim(), format!("{first} one"));

    // A client watching through A, then resuming through B from the last
    // resourceVersion it saw, misses nothing and sees nothing twice.
    let on_a = watch(
        &a,
        &format!("/api/v1/namespaces/default/configmaps?watch=1&resourceVersion={first}"),
    );
    let second = write_configmap(&b, "shared", "two");
    let third = write_configmap(&a, "other", "one");
    assert_eq!(
        next_event(&on_a),
        ("MODIFIED".into(), "shared".into(), second)
    );
    assert_eq!(next_event(&on_a), ("ADDED".into(), "other".into(), third));
    drop(on_a);
    // Written while the client is between servers.
    let fourth = write_configmap(&a, "shared", "three");
    let fifth = write_configmap(&b, "other", "two");
    let on_b = watch(
        &b,
        &format!("/api/v1/namespaces/default/configmaps?watch=1&resourceVersion={third}"),
    );
    let sixth = write_configmap(&a, "third", "one");
    assert_eq!(
        next_event(&on_b),
        ("MODIFIED".into(), "shared".into(), fourth)
    );
    assert_eq!(
        next_event(&on_b),
        ("MODIFIED".into(), "other".into(), fifth)
    );
    assert_eq!(next_event(&on_b), ("ADDED".into(), "third".into(), sixth));
    assert!(
        on_b.recv_timeout(Duration::from_millis(200)).is_err(),
        "no event after the last write"
    );

    // The `kubernetes` Service's endpoints list both servers.
    let both = {
        let mut v = vec![host_port(&a), host_port(&b)];
        v.sort();
        v
    };
    poll(
        "both API servers in the kubernetes endpoints",
        Duration::from_secs(30),
        || {
            let found = api_endpoints(&b);
            if found == both {
                Ok(())
            } else {
                Err(format!("{found:?}"))
            }
        },
    );
    // Exactly one scheduler and one controller manager: A's. B waits.
    assert_eq!(holder(&b, "kube-scheduler"), scheduler_a);
    assert_eq!(holder(&b, "kube-controller-manager"), controllers_a);

    // A node that knows both servers registers through A, the first.
    let _sim = sim_nodes(
        &a,
        &["--count", "1", "--server", &a.url, "--server", &b.url],
    );
    ok(
        &a,
        &["wait", "--for=create", "node/sim-0", "--timeout=30s"],
        None,
    );

    // A dies without a word (the node's client moves to B and its watches
    // resume there): B's scheduler and controller manager take
    // over once A's leases expire, and A leaves the endpoints when its
    // endpoint lease does.
    a.kill();
    ok(
        &b,
        &[
            "create",
            "deployment",
            "after",
            "--image=registry.local/hello:1",
        ],
        None,
    );
    // Available needs the controllers to make its pod, the scheduler to
    // bind it to the simulated node and the node, now on B, to run it.
    ok(
        &b,
        &[
            "wait",
            "--for=condition=Available",
            "deployment/after",
            "--timeout=90s",
        ],
        None,
    );
    assert_ne!(holder(&b, "kube-scheduler"), scheduler_a);
    assert_ne!(holder(&b, "kube-controller-manager"), controllers_a);
    poll(
        "only B in the kubernetes endpoints",
        Duration::from_secs(40),
        || {
            let found = api_endpoints(&b);
            if found == [host_port(&b)] {
                Ok(())
            } else {
                Err(format!("{found:?}"))
            }
        },
    );
    drop(etcd);
}

/// What the load's clients share: how many writes were acknowledged, and
/// each acknowledged write's name and resourceVersion.
#[derive(Default)]
struct Load {
    acknowledged: std::sync::atomic::AtomicUsize,
    writes: std::sync::Mutex<Vec<(String, u64)>>,
    stop: std::sync::atomic::AtomicBool,
}

/// One client of the load: creates ConfigMaps through its first server
/// and, when a request fails (a dead server, etcd between leaders), tries
/// again through the next. Only a create the API answered with its object
/// counts as acknowledged; one whose answer was lost and that then exists
/// (409 on the retry) is left out, as a client cannot know it succeeded.
async fn load_client(id: usize, servers: Vec<kube::Client>, load: std::sync::Arc<Load>) {
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::{Api, PostParams};
    use std::sync::atomic::Ordering;
    let apis: Vec<Api<ConfigMap>> = servers
        .into_iter()
        .map(|c| Api::namespaced(c, "load"))
        .collect();
    let mut server = id % apis.len();
    let mut seq = 0;
    while !load.stop.load(Ordering::Relaxed) {
        let name = format!("w-{id}-{seq}");
        seq += 1;
        let cm: ConfigMap = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name}, "data": {"client": id.to_string()},
        }))
        .unwrap();
        loop {
            match apis[server].create(&PostParams::default(), &cm).await {
                Ok(created) => {
                    let rv = created
                        .metadata
                        .resource_version
                        .and_then(|v| v.parse().ok())
                        .expect("a created object has a resourceVersion");
                    load.writes.lock().unwrap().push((name, rv));
                    load.acknowledged.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Err(kube::Error::Api(e)) if e.code == 409 => break,
                Err(_) => {
                    server = (server + 1) % apis.len();
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }
}

#[test]
fn no_acknowledged_write_is_lost_when_an_api_server_and_etcd_members_die_under_load() {
    use std::sync::Arc;
    use std::sync::atomic::Ordering;
    const CLIENTS: usize = 64;
    let HaCluster {
        mut a,
        b,
        mut etcd,
        dirs: _dirs,
    } = ha_cluster();
    ok(&a, &["create", "namespace", "load"], None);
    let start: u64 = ok(
        &b,
        &[
            "get",
            "namespace",
            "load",
            "-o",
            "jsonpath={.metadata.resourceVersion}",
        ],
        None,
    )
    .trim()
    .parse()
    .unwrap();
    // A watcher on B from before the load: it must see every create exactly
    // once, in order, across every fault.
    let events = watch(
        &b,
        &format!("/api/v1/namespaces/load/configmaps?watch=1&resourceVersion={start}"),
    );

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let load = Arc::new(Load::default());
    let clients = {
        let _guard = runtime.enter();
        (0..CLIENTS)
            .map(|id| runtime.spawn(load_client(id, kube_clients(&[&a, &b]), load.clone())))
            .collect::<Vec<_>>()
    };
    let reach = |n: usize, what: &str| reach(&load.acknowledged, n, what);
    let leader = |etcd: &EtcdCluster| {
        poll("an etcd leader", Duration::from_secs(30), || {
            etcd.leader().ok_or_else(|| "none".to_owned())
        })
    };
    reach(200, "writes before any fault");
    a.kill();
    reach(400, "writes after API server A was killed");
    let first = leader(&etcd);
    etcd.kill(first);
    reach(600, "writes after the etcd leader was killed");
    etcd.restart(first);
    let now_leading = leader(&etcd);
    let follower = (0..3).find(|&i| i != now_leading).unwrap();
    etcd.kill(follower);
    reach(800, "writes after an etcd follower was killed");
    etcd.restart(follower);
    reach(1000, "writes with every member back");
    load.stop.store(true, Ordering::Relaxed);
    runtime.block_on(async {
        for c in clients {
            c.await.unwrap();
        }
    });

    // Every acknowledged write is there, at the resourceVersion it was
    // acknowledged with.
    let acknowledged: std::collections::BTreeMap<String, u64> =
        load.writes.lock().unwrap().iter().cloned().collect();
    let list: Value = serde_json::from_str(&ok(
        &b,
        &["get", "configmaps", "-n", "load", "-o", "json"],
        None,
    ))
    .unwrap();
    let stored: std::collections::BTreeMap<String, u64> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| {
            let name = o["metadata"]["name"].as_str()?;
            let rv = o["metadata"]["resourceVersion"].as_str()?.parse().ok()?;
            name.starts_with("w-").then(|| (name.to_owned(), rv))
        })
        .collect();
    for (name, rv) in &acknowledged {
        assert_eq!(
            stored.get(name),
            Some(rv),
            "acknowledged write {name} at {rv}"
        );
    }
    // The watcher saw each stored object's create once, in revision order,
    // and nothing else.
    let mut seen = std::collections::BTreeMap::new();
    let mut last = start;
    while seen.len() < stored.len() {
        let (kind, name, rv) = next_event(&events);
        assert_eq!(kind, "ADDED", "{name} at {rv}");
        assert!(rv > last, "{name} at {rv} after {last}: out of order");
        last = rv;
        assert!(seen.insert(name.clone(), rv).is_none(), "{name} twice");
    }
    assert_eq!(seen, stored, "the watch saw exactly what is stored");
    assert!(
        events.recv_timeout(Duration::from_millis(200)).is_err(),
        "no event after the last write"
    );
    eprintln!(
        "{} acknowledged, {} stored, {} watched",
        acknowledged.len(),
        stored.len(),
        seen.len()
    );
}

/// Runs `wasmkube ARGS`; returns whether it succeeded and its output.
fn wasmkube_cli(args: &[&std::ffi::OsStr]) -> (bool, String) {
    let out = std::process::Command::new(wasmkube())
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run wasmkube");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn snapshot_restore_and_migration_to_etcd() {
    use std::ffi::OsStr;
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let file = dirs[0].path().join("cluster.snapshot");
    let (first, restored_dir, etcd_dir) = (dirs[0].path(), dirs[1].path(), dirs[2].path());

    // A snapshot of a running server's embedded store.
    let mut s = start_server_with(first, &["--insecure-http"]);
    ok(
        &s,
        &["create", "configmap", "kept", "--from-literal=k=v"],
        None,
    );
    let old_rv: u64 = ok(
        &s,
        &[
            "get",
            "configmap",
            "kept",
            "-o",
            "jsonpath={.metadata.resourceVersion}",
        ],
        None,
    )
    .trim()
    .parse()
    .unwrap();
    let (saved, out) = wasmkube_cli(&[
        OsStr::new("snapshot"),
        OsStr::new("save"),
        file.as_os_str(),
        OsStr::new("--kubeconfig"),
        s.kubeconfig.as_os_str(),
    ]);
    assert!(saved, "{out}");
    assert!(out.starts_with("Snapshot saved at "), "{out}");
    ok(
        &s,
        &["create", "configmap", "later", "--from-literal=k=v"],
        None,
    );
    s.kill();

    // Restored into a new data directory: what the snapshot held, past
    // every resourceVersion the old store handed out.
    let (restored, out) = wasmkube_cli(&[
        OsStr::new("snapshot"),
        OsStr::new("restore"),
        file.as_os_str(),
        OsStr::new("--data-dir"),
        restored_dir.as_os_str(),
    ]);
    assert!(restored, "{out}");
    let (again, out) = wasmkube_cli(&[
        OsStr::new("snapshot"),
        OsStr::new("restore"),
        file.as_os_str(),
        OsStr::new("--data-dir"),
        restored_dir.as_os_str(),
    ]);
    assert!(!again && out.contains("already holds a store"), "{out}");
    let mut s = start_server_with(restored_dir, &["--insecure-http"]);
    let kept = ok(
        &s,
        &[
            "get",
            "configmap",
            "kept",
            "-o",
            "jsonpath={.data.k} {.metadata.resourceVersion}",
        ],
        None,
    );
    let (value, rv) = kept.trim().split_once(' ').unwrap();
    assert_eq!(value, "v");
    assert!(rv.parse::<u64>().unwrap() > old_rv + 1000, "{kept}");
    let later = kubectl(&s, &["get", "configmap", "later"], None);
    assert!(
        !later.ok && later.stderr.contains("NotFound"),
        "{}",
        later.stderr
    );
    // A watch from before the restore is told to relist.
    let events = watch(
        &s,
        &format!("/api/v1/namespaces/default/configmaps?watch=1&resourceVersion={old_rv}"),
    );
    let e = events.recv_timeout(Duration::from_secs(30)).unwrap();
    assert_eq!(
        (e["type"].as_str(), e["object"]["code"].as_u64()),
        (Some("ERROR"), Some(410)),
        "{e}"
    );
    s.kill();

    // Moved into etcd: a server on etcd serves the same objects.
    let etcd = EtcdCluster::start(1);
    let endpoints = etcd.endpoints().join(",");
    let migrate = [
        OsStr::new("migrate"),
        OsStr::new("--data-dir"),
        restored_dir.as_os_str(),
        OsStr::new("--to-etcd"),
        OsStr::new(&endpoints),
    ];
    let (migrated, out) = wasmkube_cli(&migrate);
    assert!(migrated, "{out}");
    assert!(out.starts_with("Copied "), "{out}");
    let (twice, out) = wasmkube_cli(&migrate);
    assert!(!twice && out.contains("already holds keys"), "{out}");
    let s = start_server_with(etcd_dir, &["--etcd-servers", &endpoints, "--insecure-http"]);
    assert_eq!(
        ok(
            &s,
            &["get", "configmap", "kept", "-o", "jsonpath={.data.k}"],
            None
        ),
        "v"
    );
}

/// Servers started with one `--token` on one etcd share the cluster's CA
/// and join token: a kubeconfig from one works against the other over
/// TLS, a node knowing both moves to the survivor over TLS when the one it
/// used dies, and a server with another token refuses to start.
#[test]
fn servers_given_one_token_share_the_cluster_identity() {
    let etcd = EtcdCluster::start(1);
    let endpoints = etcd.endpoints().join(",");
    let flags = [
        "--etcd-servers",
        endpoints.as_str(),
        "--token",
        "one-cluster-secret",
    ];
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = start_server_with(dir_a.path(), &flags);
    let b = start_server_with(dir_b.path(), &flags);
    assert!(a.url.starts_with("https://") && b.url.starts_with("https://"));
    let read = |dir: &tempfile::TempDir, file: &str| {
        std::fs::read_to_string(dir.path().join("tls").join(file)).unwrap()
    };
    assert_eq!(read(&dir_a, "ca.crt"), read(&dir_b, "ca.crt"));
    assert_eq!(a.join_token(), b.join_token());
    assert!(a.join_token().ends_with("::node:one-cluster-secret"));
    // A's administrator kubeconfig, pointed at B.
    let names = ok(
        &a,
        &["--server", &b.url, "get", "namespaces", "-o", "name"],
        None,
    );
    assert!(names.contains("namespace/kube-system"), "{names}");

    // A node that knows both servers, with A's credentials, over TLS.
    let _sim = sim_nodes(
        &a,
        &["--count", "1", "--server", &a.url, "--server", &b.url],
    );
    ok(
        &a,
        &["wait", "--for=create", "node/sim-0", "--timeout=30s"],
        None,
    );
    let renewed = |s: &Server| {
        ok(
            s,
            &[
                "--server",
                &b.url,
                "-n",
                "kube-node-lease",
                "get",
                "lease",
                "sim-0",
                "-o",
                "jsonpath={.spec.renewTime}",
            ],
            None,
        )
    };
    let before = renewed(&a);
    a.kill();
    // Its lease keeps being renewed, now through B.
    poll(
        "the node's lease renewed through B",
        Duration::from_secs(60),
        || {
            let now = renewed(&b);
            if now != before { Ok(()) } else { Err(now) }
        },
    );

    // Another token cannot open the cluster's identity.
    let dir_c = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(wasmkube())
        .args([
            "server",
            "--listen",
            "127.0.0.1:0",
            "--no-local-node",
            "--no-registry",
            "--data-dir",
        ])
        .arg(dir_c.path())
        .args(["--etcd-servers", &endpoints, "--token", "another-secret"])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("started with another --token"), "{stderr}");
}
