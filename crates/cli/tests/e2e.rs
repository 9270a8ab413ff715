//! End to end: the real `wasmkube` binary with the real kubectl and the
//! official Python client, on loopback.

mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

use serde_json::Value;

const MANIFEST: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: e2e
  labels: {app: web, tier: frontend}
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: web
        image: registry.local/http-hello:1.0
        ports:
        - containerPort: 8080
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: e2e
spec:
  selector: {app: web}
  ports:
  - port: 80
    targetPort: 8080
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: settings
  namespace: e2e
data:
  greeting: hello
---
apiVersion: v1
kind: Secret
metadata:
  name: creds
  namespace: e2e
stringData:
  password: hunter2
"#;

fn header(table: &str) -> Vec<String> {
    table
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

#[test]
fn kubectl_journey() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_server(dir.path());
    let version = ok(&s, &["version", "-o", "json"], None);
    let v: Value = serde_json::from_str(&version).unwrap();
    assert!(
        v["serverVersion"]["gitVersion"]
            .as_str()
            .unwrap()
            .starts_with("v1.33.")
    );

    // kubectl's generators send protobuf bodies.
    ok(&s, &["create", "namespace", "e2e"], None);
    let applied = ok(&s, &["apply", "-f", "-"], Some(MANIFEST));
    for line in [
        "deployment.apps/web created",
        "service/web created",
        "configmap/settings created",
        "secret/creds created",
    ] {
        assert!(applied.contains(line), "{applied}");
    }
    // Real columns from server-side tables.
    assert_eq!(
        header(&ok(&s, &["-n", "e2e", "get", "deploy"], None)),
        ["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"]
    );
    let deploy_row = ok(
        &s,
        &["-n", "e2e", "get", "deploy", "web", "--no-headers"],
        None,
    );
    assert!(
        deploy_row.split_whitespace().nth(1) == Some("0/2"),
        "{deploy_row}"
    );
    assert_eq!(
        header(&ok(&s, &["-n", "e2e", "get", "svc"], None)),
        [
            "NAME",
            "TYPE",
            "CLUSTER-IP",
            "EXTERNAL-IP",
            "PORT(S)",
            "AGE"
        ]
    );
    assert_eq!(
        header(&ok(&s, &["-n", "e2e", "get", "cm", "settings"], None)),
        ["NAME", "DATA", "AGE"]
    );
    assert_eq!(
        header(&ok(&s, &["-n", "e2e", "get", "secret"], None)),
        ["NAME", "TYPE", "DATA", "AGE"]
    );
    let wide = ok(&s, &["-n", "e2e", "get", "deploy", "-o", "wide"], None);
    assert_eq!(header(&wide)[5..], ["CONTAINERS", "IMAGES", "SELECTOR"]);
    let password = ok(
        &s,
        &[
            "-n",
            "e2e",
            "get",
            "secret",
            "creds",
            "-o",
            "jsonpath={.data.password}",
        ],
        None,
    );
    assert_eq!(password, "aHVudGVyMg==", "stringData was folded into data");
    assert!(ok(&s, &["get", "ns"], None).contains("e2e"));

    // `kubectl get -w` sees a later change.
    watch_until(
        &s,
        &[
            "-n",
            "e2e",
            "get",
            "deploy",
            "web",
            "-w",
            "--no-headers=false",
        ],
        || {
            ok(
                &s,
                &["-n", "e2e", "scale", "deploy", "web", "--replicas=5"],
                None,
            );
        },
        |line| line.split_whitespace().nth(1) == Some("0/5"),
    );

    // Apply again after editing: the three-way merge removes a dropped label.
    let edited = MANIFEST.replace("labels: {app: web, tier: frontend}", "labels: {app: web}");
    let reapplied = ok(&s, &["apply", "-f", "-"], Some(&edited));
    assert!(
        reapplied.contains("deployment.apps/web configured"),
        "{reapplied}"
    );
    let labels = ok(
        &s,
        &[
            "-n",
            "e2e",
            "get",
            "deploy",
            "web",
            "-o",
            "jsonpath={.metadata.labels}",
        ],
        None,
    );
    assert_eq!(labels, r#"{"app":"web"}"#);

    // Each patch type.
    ok(
        &s,
        &[
            "-n",
            "e2e",
            "patch",
            "deploy",
            "web",
            "--type=merge",
            "-p",
            r#"{"spec":{"replicas":3}}"#,
        ],
        None,
    );
    ok(
        &s,
        &[
            "-n",
            "e2e",
            "patch",
            "deploy",
            "web",
            "--type=json",
            "-p",
            r#"[{"op":"add","path":"/metadata/labels/patched","value":"json"}]"#,
        ],
        None,
    );
    ok(
        &s,
        &[
            "-n",
            "e2e",
            "patch",
            "deploy",
            "web",
            "--type=strategic",
            "-p",
            r#"{"spec":{"template":{"spec":{"containers":[{"name":"web","image":"registry.local/http-hello:2.0"}]}}}}"#,
        ],
        None,
    );
    let state = ok(
        &s,
        &[
            "-n",
            "e2e",
            "get",
            "deploy",
            "web",
            "-o",
            "jsonpath={.spec.replicas} {.metadata.labels.patched} {.spec.template.spec.containers[0].image} {.spec.template.spec.containers[0].ports[0].containerPort} {.metadata.generation}",
        ],
        None,
    );
    assert_eq!(state, "3 json registry.local/http-hello:2.0 8080 5");

    // Server-side apply with a conflict, then forced.
    let ssa = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\n  namespace: e2e\nspec:\n  replicas: 7\n";
    let conflict = kubectl(&s, &["apply", "--server-side", "-f", "-"], Some(ssa));
    assert!(!conflict.ok);
    assert!(
        conflict.stderr.contains("conflict with \"kubectl-patch\"")
            && conflict.stderr.contains(".spec.replicas"),
        "{}",
        conflict.stderr
    );
    ok(
        &s,
        &["apply", "--server-side", "--force-conflicts", "-f", "-"],
        Some(ssa),
    );
    assert_eq!(
        ok(
            &s,
            &[
                "-n",
                "e2e",
                "get",
                "deploy",
                "web",
                "-o",
                "jsonpath={.spec.replicas}"
            ],
            None
        ),
        "7"
    );

    // Explain reads our OpenAPI v3.
    let explain = ok(&s, &["explain", "deployment.spec"], None);
    assert!(
        explain.contains("KIND:       Deployment") && explain.contains("replicas\t<integer>"),
        "{explain}"
    );

    // A bad manifest gets kubectl's usual readable error naming the field.
    let bad = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: bad\n  namespace: e2e\nspec:\n  replicas: 1\n  selector:\n    matchLabels: {app: bad}\n  template:\n    metadata:\n      labels: {app: other}\n    spec:\n      containers:\n      - name: c\n        image: x\n";
    let rejected = kubectl(&s, &["apply", "-f", "-"], Some(bad));
    assert!(!rejected.ok);
    assert!(
        rejected.stderr.contains(
            "The Deployment \"bad\" is invalid: spec.template.metadata.labels: Invalid value"
        ),
        "{}",
        rejected.stderr
    );
    let unknown = kubectl(
        &s,
        &["apply", "-f", "-"],
        Some(
            &bad.replace("image: x", "image: x\n        imagePolicy: Always")
                .replace("{app: other}", "{app: bad}"),
        ),
    );
    assert!(
        unknown
            .stderr
            .contains("unknown field \"spec.template.spec.containers[0].imagePolicy\""),
        "{}",
        unknown.stderr
    );

    // More generators (protobuf), with an explicit zero that must survive.
    ok(
        &s,
        &[
            "-n",
            "e2e",
            "create",
            "deployment",
            "gen",
            "--image=registry.local/hello:1",
            "--replicas=0",
            "--port=8080",
        ],
        None,
    );
    let generated = ok(
        &s,
        &[
            "-n",
            "e2e",
            "get",
            "deploy",
            "gen",
            "-o",
            "jsonpath={.spec.replicas} {.spec.template.spec.containers[0].ports[0].containerPort} {.spec.strategy.type}",
        ],
        None,
    );
    assert_eq!(generated, "0 8080 RollingUpdate");
    ok(
        &s,
        &[
            "-n",
            "e2e",
            "create",
            "secret",
            "generic",
            "gen",
            "--from-literal=k=v",
        ],
        None,
    );
    ok(
        &s,
        &[
            "-n",
            "e2e",
            "create",
            "job",
            "gen",
            "--image=registry.local/hello:1",
            "--",
            "echo",
            "hi",
        ],
        None,
    );
    let job = ok(
        &s,
        &[
            "-n",
            "e2e",
            "get",
            "job",
            "gen",
            "-o",
            "jsonpath={.spec.template.spec.containers[0].command} {.spec.template.spec.restartPolicy}",
        ],
        None,
    );
    assert_eq!(job, r#"["echo","hi"] Never"#);

    // Delete.
    let deleted = ok(&s, &["-n", "e2e", "delete", "deploy", "web"], None);
    assert!(
        deleted.contains("deployment.apps \"web\" deleted"),
        "{deleted}"
    );
    let gone = kubectl(&s, &["-n", "e2e", "get", "deploy", "web"], None);
    assert!(
        !gone.ok && gone.stderr.contains("NotFound"),
        "{}",
        gone.stderr
    );
    ok(
        &s,
        &["-n", "e2e", "delete", "-f", "-"],
        Some(&edited.split("---").skip(1).collect::<Vec<_>>().join("---")),
    );
}

#[test]
fn a_second_server_on_the_same_data_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _first = start_server(dir.path());
    let out = Command::new(wasmkube())
        .args(["server", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("another wasmkube server is already using the data directory"),
        "{stderr}"
    );
}

#[test]
fn a_node_cidr_larger_than_the_cluster_cidr_is_refused_with_both_flags_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(wasmkube())
        .args([
            "server",
            "--listen",
            "127.0.0.1:0",
            "--node-cidr-mask-size",
            "16",
        ])
        .args(["--cluster-cidr", "10.244.0.0/16", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr
            .contains("--node-cidr-mask-size 16 does not fit inside --cluster-cidr 10.244.0.0/16"),
        "{stderr}"
    );
}

#[test]
fn sigterm_shuts_down_cleanly_and_data_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = start_server(dir.path());
    ok(
        &s,
        &["apply", "-f", "-"],
        Some("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: kept\ndata:\n  a: b\n"),
    );
    let pid = s.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = s.child.wait().unwrap();
    assert!(status.success(), "exit status after SIGTERM: {status}");
    let s = start_server(dir.path());
    assert_eq!(
        ok(
            &s,
            &["get", "configmap", "kept", "-o", "jsonpath={.data.a}"],
            None
        ),
        "b"
    );
}

/// Whether any file under `dir` (the store's files; not the keys) holds
/// `needle`.
fn files_contain(dir: &Path, needle: &[u8]) -> bool {
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if std::fs::read(&path)
                .map(|bytes| bytes.windows(needle.len()).any(|w| w == needle))
                .unwrap_or(false)
            {
                return true;
            }
        }
    }
    false
}

#[test]
fn secrets_are_encrypted_at_rest_and_rotated_at_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("server");
    let mut s = start_server_with(&data, &["--secrets-encryption"]);
    ok(
        &s,
        &[
            "create",
            "secret",
            "generic",
            "db",
            "--from-literal=password=hunter2-at-rest",
        ],
        None,
    );
    ok(
        &s,
        &[
            "create",
            "configmap",
            "shown",
            "--from-literal=note=plain-at-rest",
        ],
        None,
    );
    s.kill();
    let store = data.join("store");
    assert!(store.is_dir(), "the sled store lives in DATA_DIR/store");
    // The control: what is not encrypted is found in the store's files.
    assert!(files_contain(&store, b"plain-at-rest"));
    // The Secret is in neither its plain nor its base64 form.
    let b64 = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        "hunter2-at-rest",
    );
    assert!(!files_contain(&store, b"hunter2-at-rest"));
    assert!(!files_contain(&store, b64.as_bytes()));
    assert!(files_contain(&store, b"k8s:enc:aesgcm:v1:key1:"));

    // Rotation: a new key first, the old one kept to read; at the restart
    // the Secret is sealed again under the new key.
    let config = std::fs::read_to_string(data.join("encryption-config.yaml")).unwrap();
    let old_key = config
        .lines()
        .find_map(|l| l.trim().strip_prefix("secret: "))
        .unwrap()
        .to_owned();
    let new_key = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [7u8; 32]);
    let rotated = dir.path().join("rotated.yaml");
    std::fs::write(
        &rotated,
        format!(
            "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n- resources: [secrets]\n  providers:\n  - aesgcm:\n      keys:\n      - name: key2\n        secret: {new_key}\n      - name: key1\n        secret: {old_key}\n"
        ),
    )
    .unwrap();
    let rotated_arg = rotated.to_str().unwrap();
    let s = start_server_with(&data, &["--encryption-provider-config", rotated_arg]);
    assert!(files_contain(&store, b"k8s:enc:aesgcm:v1:key2:"));
    let got = ok(
        &s,
        &["get", "secret", "db", "-o", "jsonpath={.data.password}"],
        None,
    );
    assert_eq!(got, b64);
    drop(s);
    // Without the key it is sealed with, the server cannot read it, and
    // says so.
    std::fs::write(
        &rotated,
        format!(
            "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n- resources: [secrets]\n  providers:\n  - aesgcm:\n      keys:\n      - name: key1\n        secret: {old_key}\n"
        ),
    )
    .unwrap();
    let s = start_server_with(&data, &["--encryption-provider-config", rotated_arg]);
    let out = kubectl(&s, &["get", "secret", "db"], None);
    assert!(!out.ok && out.stderr.contains("key2"), "{}", out.stderr);
}

#[test]
fn official_python_client() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_server(dir.path());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/e2e/python_client.py");
    let mut child = Command::new(wasmkube_testkit::python())
        .arg(script)
        .env("KUBECONFIG", &s.kubeconfig)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "python client checks failed against {}:\n{out}\n{err}",
        s.url
    );
    assert!(out.contains("all python client checks passed"), "{out}");
}

#[test]
fn scheduler_binds_pods_to_simulated_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_server(dir.path());
    let _sim = sim_nodes(&s, &["--count", "2", "--memory", "4Gi"]);
    // `kubectl wait` watches; no sleeps.
    ok(
        &s,
        &["wait", "--for=create", "node/sim-1", "--timeout=30s"],
        None,
    );
    ok(&s, &["run", "web", "--image=registry.local/hello:1"], None);
    ok(
        &s,
        &[
            "wait",
            "--for=jsonpath={.status.phase}=Running",
            "pod/web",
            "--timeout=30s",
        ],
        None,
    );
    let node = ok(
        &s,
        &["get", "pod", "web", "-o", "jsonpath={.spec.nodeName}"],
        None,
    );
    assert!(node.starts_with("sim-"), "{node}");
    let row = ok(&s, &["get", "pod", "web", "--no-headers"], None);
    assert_eq!(
        row.split_whitespace().take(3).collect::<Vec<_>>(),
        ["web", "1/1", "Running"]
    );

    let huge = r#"{"spec":{"containers":[{"name":"huge","image":"x","resources":{"requests":{"memory":"64Gi"}}}]}}"#;
    ok(
        &s,
        &["run", "huge", "--image=x", &format!("--overrides={huge}")],
        None,
    );
    ok(
        &s,
        &[
            "wait",
            "--for=condition=PodScheduled=false",
            "pod/huge",
            "--timeout=30s",
        ],
        None,
    );
    let described = ok(&s, &["describe", "pod", "huge"], None);
    assert!(
        described.contains("FailedScheduling")
            && described.contains("0/2 nodes are available: 2 Insufficient memory."),
        "{described}"
    );

    // cordon, drain and uncordon: the drained node keeps no pod of the
    // Deployment, whose replacements land on the other node (`--force`:
    // the bare pod `web` goes too).
    ok(
        &s,
        &[
            "create",
            "deployment",
            "spread",
            "--image=registry.local/hello:1",
            "--replicas=4",
        ],
        None,
    );
    ok(
        &s,
        &["rollout", "status", "deployment/spread", "--timeout=60s"],
        None,
    );
    // A PodDisruptionBudget keeps three of the four: drain evicts through
    // it (one pod at a time, each once its replacement is Ready).
    ok(
        &s,
        &[
            "create",
            "poddisruptionbudget",
            "spread",
            "--selector=app=spread",
            "--min-available=3",
        ],
        None,
    );
    ok(
        &s,
        &[
            "wait",
            "--for=jsonpath={.status.disruptionsAllowed}=1",
            "pdb/spread",
            "--timeout=30s",
        ],
        None,
    );
    let pdb = ok(&s, &["get", "pdb", "spread"], None);
    assert!(
        pdb.starts_with("NAME")
            && pdb.contains("MIN AVAILABLE")
            && pdb.contains("ALLOWED DISRUPTIONS")
            && pdb.lines().nth(1).is_some_and(|l| {
                l.split_whitespace().take(4).collect::<Vec<_>>() == ["spread", "3", "N/A", "1"]
            }),
        "{pdb}"
    );
    // An eviction the budget cannot afford is refused with 429 and why.
    ok(
        &s,
        &[
            "patch",
            "pdb",
            "spread",
            "--type=merge",
            "-p",
            r#"{"spec":{"minAvailable":4}}"#,
        ],
        None,
    );
    ok(
        &s,
        &[
            "wait",
            "--for=jsonpath={.status.disruptionsAllowed}=0",
            "pdb/spread",
            "--timeout=30s",
        ],
        None,
    );
    let victim = ok(
        &s,
        &[
            "get",
            "pods",
            "-l",
            "app=spread",
            "-o",
            "jsonpath={.items[0].metadata.name}",
        ],
        None,
    );
    let refused = common::kubectl(
        &s,
        &[
            "create",
            "--raw",
            &format!("/api/v1/namespaces/default/pods/{victim}/eviction"),
            "-f",
            "-",
        ],
        Some(&format!(
            r#"{{"apiVersion":"policy/v1","kind":"Eviction","metadata":{{"name":"{victim}"}}}}"#
        )),
    );
    assert!(
        !refused.ok
            && refused
                .stderr
                .contains("Cannot evict pod as it would violate the pod's disruption budget"),
        "{}{}",
        refused.stdout,
        refused.stderr
    );
    ok(
        &s,
        &[
            "patch",
            "pdb",
            "spread",
            "--type=merge",
            "-p",
            r#"{"spec":{"minAvailable":3}}"#,
        ],
        None,
    );
    let drained = ok(
        &s,
        &[
            "drain",
            &node,
            "--ignore-daemonsets",
            "--force",
            "--timeout=60s",
        ],
        None,
    );
    assert!(
        drained.contains(&format!("node/{node} drained")),
        "{drained}"
    );
    let row = ok(&s, &["get", "node", &node, "--no-headers"], None);
    assert!(row.contains("SchedulingDisabled"), "{row}");
    ok(
        &s,
        &["rollout", "status", "deployment/spread", "--timeout=60s"],
        None,
    );
    let nodes = ok(
        &s,
        &[
            "get",
            "pods",
            "-l",
            "app=spread",
            "-o",
            "jsonpath={.items[*].spec.nodeName}",
        ],
        None,
    );
    assert!(
        nodes.split_whitespace().count() == 4 && !nodes.contains(&node),
        "{nodes}"
    );
    ok(&s, &["uncordon", &node], None);
    let row = ok(&s, &["get", "node", &node, "--no-headers"], None);
    assert!(!row.contains("SchedulingDisabled"), "{row}");
}

#[test]
fn a_scheduler_process_binds_what_a_server_without_one_leaves_pending() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_server_with(dir.path(), &["--no-scheduler"]);
    let _sim = sim_nodes(&s, &["--count", "1"]);
    ok(
        &s,
        &["wait", "--for=create", "node/sim-0", "--timeout=30s"],
        None,
    );
    // The server's electors run at start: the controller manager's Lease
    // exists, the scheduler's does not.
    ok(
        &s,
        &[
            "wait",
            "--for=create",
            "-n",
            "kube-system",
            "lease/kube-controller-manager",
            "--timeout=30s",
        ],
        None,
    );
    let leases = ok(
        &s,
        &["get", "leases", "-n", "kube-system", "-o", "name"],
        None,
    );
    assert!(!leases.contains("kube-scheduler"), "{leases}");
    ok(&s, &["run", "web", "--image=registry.local/hello:1"], None);
    let node_of_web = || {
        ok(
            &s,
            &["get", "pod", "web", "-o", "jsonpath={.spec.nodeName}"],
            None,
        )
        .trim()
        .to_owned()
    };
    assert_eq!(node_of_web(), "");

    let metrics = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let _scheduler = join(&s, "scheduler", &["--metrics-listen", &metrics.to_string()]);
    ok(
        &s,
        &[
            "wait",
            "--for=jsonpath={.status.phase}=Running",
            "pod/web",
            "--timeout=30s",
        ],
        None,
    );
    assert_eq!(node_of_web(), "sim-0");
    let holder = ok(
        &s,
        &[
            "get",
            "lease",
            "-n",
            "kube-system",
            "kube-scheduler",
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ],
        None,
    );
    assert!(!holder.is_empty(), "the scheduler holds its Lease");
    // Its own metrics page counts the attempt that bound `web`.
    let page = {
        use std::io::Write;
        let mut conn = std::net::TcpStream::connect(metrics).unwrap();
        conn.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut response = String::new();
        conn.read_to_string(&mut response).unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or_default();
        assert!(head.starts_with("HTTP/1.0 200"), "{head}");
        body.to_owned()
    };
    assert!(
        page.lines()
            .any(|l| l.starts_with("scheduler_schedule_attempts_total{") && l.contains("scheduled")),
        "{page}"
    );
    wasmkube_testkit::promtool_check(&page);
}

#[test]
fn deployment_rollout_with_kubectl() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_server(dir.path());
    let _sim = sim_nodes(&s, &["--count", "3"]);
    ok(
        &s,
        &["wait", "--for=create", "node/sim-2", "--timeout=30s"],
        None,
    );
    ok(
        &s,
        &[
            "create",
            "deployment",
            "web",
            "--image=example/web:1",
            "--replicas=3",
        ],
        None,
    );
    let status = ok(
        &s,
        &["rollout", "status", "deployment/web", "--timeout=60s"],
        None,
    );
    assert!(status.contains("successfully rolled out"), "{status}");
    let pods = ok(
        &s,
        &[
            "get",
            "pods",
            "-l",
            "app=web",
            "-o",
            "jsonpath={.items[*].spec.nodeName}",
        ],
        None,
    );
    let mut nodes: Vec<&str> = pods.split_whitespace().collect();
    nodes.sort_unstable();
    nodes.dedup();
    assert_eq!(nodes.len(), 3, "three pods spread over three nodes: {pods}");
    assert_eq!(
        header(&ok(&s, &["get", "rs"], None)),
        ["NAME", "DESIRED", "CURRENT", "READY", "AGE"]
    );

    ok(&s, &["scale", "deployment", "web", "--replicas=5"], None);
    ok(
        &s,
        &["rollout", "status", "deployment/web", "--timeout=60s"],
        None,
    );
    assert_eq!(
        ok(
            &s,
            &[
                "get",
                "deploy",
                "web",
                "-o",
                "jsonpath={.status.availableReplicas}"
            ],
            None
        ),
        "5"
    );

    ok(
        &s,
        &["set", "image", "deployment/web", "web=example/web:2"],
        None,
    );
    ok(
        &s,
        &["rollout", "status", "deployment/web", "--timeout=60s"],
        None,
    );
    let images = ok(
        &s,
        &[
            "get",
            "pods",
            "-l",
            "app=web",
            "--field-selector=status.phase=Running",
            "-o",
            "jsonpath={.items[*].spec.containers[0].image}",
        ],
        None,
    );
    assert!(
        images.split_whitespace().all(|i| i == "example/web:2"),
        "{images}"
    );

    ok(&s, &["rollout", "undo", "deployment/web"], None);
    ok(
        &s,
        &["rollout", "status", "deployment/web", "--timeout=60s"],
        None,
    );
    assert_eq!(
        ok(
            &s,
            &[
                "get",
                "deploy",
                "web",
                "-o",
                "jsonpath={.spec.template.spec.containers[0].image} {.metadata.annotations.deployment\\.kubernetes\\.io/revision}"
            ],
            None
        ),
        "example/web:1 3"
    );
    let history = ok(&s, &["rollout", "history", "deployment/web"], None);
    assert!(
        history.contains("REVISION") && history.contains('2') && history.contains('3'),
        "{history}"
    );

    // Cascading deletes as on Kubernetes.
    ok(
        &s,
        &["delete", "deployment", "web", "--cascade=foreground"],
        None,
    );
    ok(
        &s,
        &[
            "wait",
            "--for=delete",
            "pod",
            "-l",
            "app=web",
            "--timeout=30s",
        ],
        None,
    );
    assert_eq!(
        ok(&s, &["get", "rs", "-l", "app=web", "-o", "name"], None),
        ""
    );
    ok(
        &s,
        &[
            "create",
            "deployment",
            "kept",
            "--image=example/web:1",
            "--replicas=2",
        ],
        None,
    );
    ok(
        &s,
        &["rollout", "status", "deployment/kept", "--timeout=60s"],
        None,
    );
    ok(
        &s,
        &["delete", "deployment", "kept", "--cascade=orphan"],
        None,
    );
    // `kubectl delete` waits until the Deployment is gone, which the collector
    // allows only after releasing its ReplicaSet.
    assert_eq!(
        ok(
            &s,
            &[
                "get",
                "rs",
                "-l",
                "app=kept",
                "-o",
                "jsonpath={.items[*].metadata.ownerReferences}"
            ],
            None
        ),
        ""
    );
    assert_eq!(
        ok(&s, &["get", "pods", "-l", "app=kept", "--no-headers"], None)
            .lines()
            .count(),
        2,
        "orphaned pods keep running"
    );

    // Deleting a namespace removes everything in it.
    ok(&s, &["create", "namespace", "doomed"], None);
    ok(
        &s,
        &[
            "-n",
            "doomed",
            "create",
            "deployment",
            "web",
            "--image=example/web:1",
            "--replicas=2",
        ],
        None,
    );
    ok(
        &s,
        &[
            "-n",
            "doomed",
            "rollout",
            "status",
            "deployment/web",
            "--timeout=60s",
        ],
        None,
    );
    ok(
        &s,
        &["delete", "namespace", "doomed", "--timeout=60s"],
        None,
    );
    assert!(!kubectl(&s, &["get", "namespace", "doomed"], None).ok);
    statefulset_rollout_with_kubectl(&s);
}

/// A StatefulSet on the same cluster: pods made in order with stable
/// names and DNS identities, a partitioned then full rolling update
/// (`kubectl rollout status` and `history`), a scale down from the top.
fn statefulset_rollout_with_kubectl(s: &Server) {
    ok(
        s,
        &["apply", "-f", "-"],
        Some(
            "apiVersion: v1\nkind: Service\nmetadata: {name: db}\nspec:\n  clusterIP: None\n  selector: {app: db}\n  ports: [{port: 80}]\n---\napiVersion: apps/v1\nkind: StatefulSet\nmetadata: {name: db}\nspec:\n  serviceName: db\n  replicas: 3\n  selector: {matchLabels: {app: db}}\n  template:\n    metadata: {labels: {app: db}}\n    spec:\n      containers: [{name: db, image: 'example/db:1', ports: [{containerPort: 80}]}]\n",
        ),
    );
    let status = ok(s, &["rollout", "status", "sts/db", "--timeout=60s"], None);
    assert!(
        status.contains("partitioned roll out complete: 3 new pods have been updated"),
        "{status}"
    );
    assert_eq!(
        header(&ok(s, &["get", "sts"], None)),
        ["NAME", "READY", "AGE"]
    );
    assert!(ok(s, &["get", "sts", "db"], None).contains("3/3"));
    // OrderedReady: each pod was made once the one before it was ready.
    let times = ok(
        s,
        &[
            "get",
            "pods",
            "-l",
            "app=db",
            "-o",
            "jsonpath={range .items[*]}{.metadata.name} {.metadata.creationTimestamp} {.status.conditions[?(@.type==\"Ready\")].lastTransitionTime}{\"\\n\"}{end}",
        ],
        None,
    );
    let mut rows: Vec<Vec<&str>> = times.lines().map(|l| l.split(' ').collect()).collect();
    rows.sort();
    assert_eq!(
        rows.iter().map(|r| r[0]).collect::<Vec<_>>(),
        ["db-0", "db-1", "db-2"],
        "{times}"
    );
    for pair in rows.windows(2) {
        assert!(
            pair[1][1] >= pair[0][2],
            "made before the previous was ready: {times}"
        );
    }
    assert_eq!(
        ok(
            s,
            &[
                "get",
                "pod",
                "db-1",
                "-o",
                "jsonpath={.spec.hostname}.{.spec.subdomain}"
            ],
            None
        ),
        "db-1.db"
    );
    poll(
        "the headless Service's endpoints named by hostname",
        Duration::from_secs(30),
        || {
            let names = ok(
                s,
                &[
                    "get",
                    "endpointslices",
                    "-l",
                    "kubernetes.io/service-name=db",
                    "-o",
                    "jsonpath={.items[*].endpoints[*].hostname}",
                ],
                None,
            );
            (names == "db-0 db-1 db-2").then_some(()).ok_or(names)
        },
    );

    // A partitioned update touches only the pods at or above it.
    ok(
        s,
        &[
            "patch",
            "sts",
            "db",
            "-p",
            r#"{"spec":{"updateStrategy":{"rollingUpdate":{"partition":2}}}}"#,
        ],
        None,
    );
    ok(s, &["set", "image", "sts/db", "db=example/db:2"], None);
    let status = ok(s, &["rollout", "status", "sts/db", "--timeout=60s"], None);
    assert!(
        status.contains("partitioned roll out complete: 1 new pods have been updated"),
        "{status}"
    );
    let images = || {
        ok(
            s,
            &[
                "get",
                "pods",
                "-l",
                "app=db",
                "-o",
                "jsonpath={.items[*].spec.containers[0].image}",
            ],
            None,
        )
    };
    assert_eq!(images(), "example/db:1 example/db:1 example/db:2");
    ok(
        s,
        &[
            "patch",
            "sts",
            "db",
            "-p",
            r#"{"spec":{"updateStrategy":{"rollingUpdate":{"partition":0}}}}"#,
        ],
        None,
    );
    let status = ok(s, &["rollout", "status", "sts/db", "--timeout=60s"], None);
    assert!(
        status.contains("partitioned roll out complete: 3 new pods have been updated"),
        "{status}"
    );
    assert_eq!(images(), "example/db:2 example/db:2 example/db:2");
    // (kubectl words every RollingUpdate set as partitioned, even at 0.)
    let revisions = ok(
        s,
        &[
            "get",
            "sts",
            "db",
            "-o",
            "jsonpath={.status.currentRevision} {.status.updateRevision}",
        ],
        None,
    );
    let (current, update) = revisions.split_once(' ').unwrap();
    assert!(
        current == update && current.starts_with("db-"),
        "{revisions}"
    );
    let history = ok(s, &["rollout", "history", "sts/db"], None);
    assert!(
        history
            .lines()
            .filter(|l| l.starts_with('1') || l.starts_with('2'))
            .count()
            == 2,
        "{history}"
    );

    // Scaling down removes the highest ordinals.
    ok(s, &["scale", "sts", "db", "--replicas=1"], None);
    ok(
        s,
        &[
            "wait",
            "--for=delete",
            "pod/db-2",
            "pod/db-1",
            "--timeout=60s",
        ],
        None,
    );
    assert_eq!(
        ok(s, &["get", "pods", "-l", "app=db", "-o", "name"], None).trim(),
        "pod/db-0"
    );
}

const BATCH: &str = r#"
apiVersion: batch/v1
kind: Job
metadata: {name: pi}
spec:
  completions: 2
  parallelism: 2
  template:
    metadata:
      annotations: {sim.wasmkube.io/phase: Succeeded}
    spec:
      restartPolicy: Never
      containers: [{name: pi, image: example/pi:1}]
---
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: agent}
spec:
  selector: {matchLabels: {app: agent}}
  template:
    metadata: {labels: {app: agent}}
    spec:
      containers: [{name: agent, image: example/agent:1}]
"#;

const TOLERANT_WEB: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 6
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers: [{name: web, image: example/web:1}]
      tolerations:
      - {key: node.kubernetes.io/unreachable, operator: Exists, effect: NoExecute, tolerationSeconds: 1}
"#;

#[test]
fn jobs_cronjobs_daemonsets_and_a_failed_node_with_kubectl() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_server_with(dir.path(), &["--node-monitor-grace-period", "3"]);
    let _sim = sim_nodes(&s, &["--count", "2", "--heartbeat-interval", "0.5"]);
    let doomed = sim_nodes(
        &s,
        &[
            "--count",
            "1",
            "--prefix",
            "doomed",
            "--heartbeat-interval",
            "0.5",
        ],
    );
    for node in ["node/sim-1", "node/doomed-0"] {
        ok(&s, &["wait", "--for=create", node, "--timeout=30s"], None);
    }
    ok(&s, &["apply", "-f", "-"], Some(BATCH));
    ok(
        &s,
        &[
            "wait",
            "--for=condition=complete",
            "job/pi",
            "--timeout=60s",
        ],
        None,
    );
    let jobs = ok(&s, &["get", "job", "pi", "--no-headers"], None);
    assert!(jobs.contains("2/2"), "{jobs}");
    let ds = ok(
        &s,
        &["rollout", "status", "ds/agent", "--timeout=60s"],
        None,
    );
    assert!(ds.contains("successfully rolled out"), "{ds}");
    assert_eq!(
        ok(
            &s,
            &["get", "ds", "agent", "-o", "jsonpath={.status.numberReady}"],
            None
        ),
        "3"
    );
    // A CronJob as kubectl makes one, and a Job started from it by hand.
    ok(
        &s,
        &[
            "create",
            "cronjob",
            "tick",
            "--image=example/tick:1",
            "--schedule=*/5 * * * *",
        ],
        None,
    );
    let cj = ok(&s, &["get", "cronjob", "tick", "--no-headers"], None);
    assert!(cj.contains("*/5 * * * *"), "{cj}");
    ok(
        &s,
        &["create", "job", "--from=cronjob/tick", "tick-manual"],
        None,
    );
    ok(
        &s,
        &[
            "wait",
            "--for=jsonpath={.status.active}=1",
            "job/tick-manual",
            "--timeout=30s",
        ],
        None,
    );

    // A node that stops heartbeating goes Unknown, is tainted, and its pods
    // are replaced on the others.
    ok(&s, &["apply", "-f", "-"], Some(TOLERANT_WEB));
    ok(
        &s,
        &["rollout", "status", "deployment/web", "--timeout=60s"],
        None,
    );
    let on_doomed = ok(
        &s,
        &[
            "get",
            "pods",
            "-l",
            "app=web",
            "--field-selector=spec.nodeName=doomed-0",
            "-o",
            "name",
        ],
        None,
    );
    assert!(!on_doomed.is_empty(), "the spread put pods on doomed-0");
    drop(doomed);
    ok(
        &s,
        &[
            "wait",
            "--for=condition=Ready=Unknown",
            "node/doomed-0",
            "--timeout=60s",
        ],
        None,
    );
    // The taints follow the condition.
    watch_rows_until(
        &s,
        &[
            "get",
            "node",
            "doomed-0",
            "-w",
            "-o",
            "custom-columns=TAINTS:.spec.taints[*].key",
        ],
        |row| row.contains("node.kubernetes.io/unreachable"),
    );
    // Evicted pods stay Terminating (nobody on the node can confirm); the
    // Deployment is whole again on the healthy nodes.
    for pod in on_doomed.lines() {
        ok(
            &s,
            &[
                "wait",
                "--for=jsonpath={.metadata.deletionTimestamp}",
                pod,
                "--timeout=60s",
            ],
            None,
        );
    }
    ok(
        &s,
        &["rollout", "status", "deployment/web", "--timeout=60s"],
        None,
    );
    let pods: serde_json::Value = serde_json::from_str(&ok(
        &s,
        &["get", "pods", "-l", "app=web", "-o", "json"],
        None,
    ))
    .unwrap();
    let healthy: Vec<&str> = pods["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .map(|p| p["spec"]["nodeName"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(healthy.len(), 6, "{healthy:?}");
    assert!(healthy.iter().all(|n| n.starts_with("sim-")), "{healthy:?}");
}

/// CustomResourceDefinitions through kubectl: a CRD served at once and after
/// a restart, its objects validated, pruned and defaulted by its schema,
/// printed with its columns, scaled and given a status through their
/// subresources, watched, and removed with it.
#[test]
fn custom_resources_with_kubectl() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = start_server(dir.path());
    let crd = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/charts/function-crd.yaml"),
    )
    .unwrap();
    ok(&s, &["apply", "-f", "-"], Some(&crd));
    ok(
        &s,
        &[
            "wait",
            "--for=condition=established",
            "crd/functions.demo.wasmkube.dev",
            "--timeout=10s",
        ],
        None,
    );
    let resources = ok(
        &s,
        &["api-resources", "--api-group=demo.wasmkube.dev"],
        None,
    );
    assert!(
        resources.contains("functions")
            && resources.contains(" fn ")
            && resources.contains("Function"),
        "{resources}"
    );

    // Defaults fill in; printer columns print.
    ok(
        &s,
        &["apply", "-f", "-"],
        Some(
            "apiVersion: demo.wasmkube.dev/v1\nkind: Function\nmetadata:\n  name: hello\nspec:\n  image: reg/hello:v1\n",
        ),
    );
    let obj: Value =
        serde_json::from_str(&ok(&s, &["get", "fn", "hello", "-o", "json"], None)).unwrap();
    assert_eq!(obj["spec"]["replicas"], 1);
    assert_eq!(obj["spec"]["tier"], "free");
    assert_eq!(obj["metadata"]["generation"], 1);
    let table = ok(&s, &["get", "functions"], None);
    assert_eq!(
        header(&table),
        ["NAME", "IMAGE", "REPLICAS", "READY", "AGE"],
        "{table}"
    );
    assert!(
        table
            .lines()
            .nth(1)
            .unwrap()
            .starts_with("hello   reg/hello:v1   1"),
        "{table}"
    );

    // The schema refuses bad objects with every field named; unknown
    // fields are refused under kubectl's strict validation and pruned
    // without it.
    let bad = kubectl(
        &s,
        &["create", "-f", "-"],
        Some(
            r#"{"apiVersion":"demo.wasmkube.dev/v1","kind":"Function","metadata":{"name":"bad"},"spec":{"replicas":-1,"tier":"gold"}}"#,
        ),
    );
    assert!(!bad.ok);
    for want in [
        "spec.image: Required value",
        "spec.replicas: Invalid value: -1: should be greater than or equal to 0",
        r#"spec.tier: Unsupported value: "gold": supported values: "free", "paid""#,
    ] {
        assert!(bad.stderr.contains(want), "{want} not in {}", bad.stderr);
    }
    // A CEL rule (x-kubernetes-validations) with its message.
    let over = kubectl(
        &s,
        &["create", "-f", "-"],
        Some(
            r#"{"apiVersion":"demo.wasmkube.dev/v1","kind":"Function","metadata":{"name":"big"},"spec":{"image":"x","replicas":20}}"#,
        ),
    );
    assert!(
        !over.ok
            && over.stderr.contains(
                r#"spec: Invalid value: "object": free functions run at most 10 replicas"#
            ),
        "{}",
        over.stderr
    );
    let strict = kubectl(
        &s,
        &["create", "-f", "-"],
        Some(
            r#"{"apiVersion":"demo.wasmkube.dev/v1","kind":"Function","metadata":{"name":"extra"},"spec":{"image":"x","bogus":1}}"#,
        ),
    );
    assert!(
        !strict.ok && strict.stderr.contains(r#"unknown field "spec.bogus""#),
        "{}",
        strict.stderr
    );
    ok(
        &s,
        &["create", "--validate=false", "-f", "-"],
        Some(
            r#"{"apiVersion":"demo.wasmkube.dev/v1","kind":"Function","metadata":{"name":"extra"},"spec":{"image":"x","bogus":1}}"#,
        ),
    );
    let spec = ok(&s, &["get", "fn", "extra", "-o", "jsonpath={.spec}"], None);
    assert!(!spec.contains("bogus"), "{spec}");

    // The scale and status subresources; kubectl explain reads the schema.
    ok(&s, &["scale", "fn/hello", "--replicas=3"], None);
    ok(
        &s,
        &[
            "patch",
            "fn",
            "hello",
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"replicas":3,"conditions":[{"type":"Ready","status":"True"}]}}"#,
        ],
        None,
    );
    let row = ok(&s, &["get", "fn", "hello", "--no-headers"], None);
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells[..4], ["hello", "reg/hello:v1", "3", "True"], "{row}");
    // Server-side apply of status: the applier owns the status fields it
    // sent, in a managedFields entry for the status subresource.
    ok(
        &s,
        &[
            "apply",
            "--server-side",
            "--subresource=status",
            "--field-manager=status-writer",
            "-f",
            "-",
        ],
        Some(
            r#"{"apiVersion":"demo.wasmkube.dev/v1","kind":"Function","metadata":{"name":"hello"},"status":{"replicas":3}}"#,
        ),
    );
    let managed = ok(
        &s,
        &[
            "get",
            "fn",
            "hello",
            "--show-managed-fields",
            "-o",
            "jsonpath={.metadata.managedFields}",
        ],
        None,
    );
    let managed: Value = serde_json::from_str(&managed).unwrap();
    let entry = managed
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["manager"] == "status-writer")
        .cloned()
        .unwrap_or_else(|| panic!("no entry of status-writer: {managed}"));
    assert_eq!(
        (&entry["operation"], &entry["subresource"]),
        (&serde_json::json!("Apply"), &serde_json::json!("status")),
        "{entry}"
    );
    assert!(
        entry["fieldsV1"]["f:status"]["f:replicas"].is_object(),
        "{entry}"
    );
    assert_eq!(
        ok(
            &s,
            &[
                "get",
                "fn",
                "hello",
                "-o",
                "jsonpath={.metadata.generation}"
            ],
            None
        ),
        "2"
    );
    let explain = ok(&s, &["explain", "functions.spec"], None);
    assert!(
        explain.contains("image") && explain.contains("enum: free, paid"),
        "{explain}"
    );

    // Several versions, converted with the `None` strategy: an object
    // written through one version reads with the other's apiVersion.
    let schema = "{openAPIV3Schema: {type: object, properties: {spec: {type: object, properties: {size: {type: integer}}}}}}";
    let gadgets = format!(
        "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata:\n  name: gadgets.demo.wasmkube.dev\nspec:\n  group: demo.wasmkube.dev\n  scope: Namespaced\n  names: {{kind: Gadget, plural: gadgets}}\n  versions:\n    - {{name: v1beta1, served: true, storage: false, schema: {schema}}}\n    - {{name: v1, served: true, storage: true, schema: {schema}}}\n"
    );
    ok(&s, &["apply", "-f", "-"], Some(&gadgets));
    ok(
        &s,
        &[
            "wait",
            "--for=condition=established",
            "crd/gadgets.demo.wasmkube.dev",
            "--timeout=10s",
        ],
        None,
    );
    ok(
        &s,
        &["apply", "-f", "-"],
        Some(
            "apiVersion: demo.wasmkube.dev/v1beta1\nkind: Gadget\nmetadata:\n  name: g1\nspec:\n  size: 2\n",
        ),
    );
    for (version, want) in [
        ("v1", "demo.wasmkube.dev/v1 2"),
        ("v1beta1", "demo.wasmkube.dev/v1beta1 2"),
    ] {
        let got = ok(
            &s,
            &[
                "get",
                &format!("gadgets.{version}.demo.wasmkube.dev"),
                "g1",
                "-o",
                "jsonpath={.apiVersion} {.spec.size}",
            ],
            None,
        );
        assert_eq!(got, want);
    }
    ok(&s, &["delete", "crd", "gadgets.demo.wasmkube.dev"], None);

    // After a restart the kind is still served, with its objects.
    let pid = s.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    s.child.wait().unwrap();
    let s = start_server(dir.path());
    assert_eq!(
        ok(
            &s,
            &["get", "fn", "hello", "-o", "jsonpath={.spec.replicas}"],
            None
        ),
        "3"
    );

    // Deleting a namespace deletes the custom resources in it first.
    ok(&s, &["create", "namespace", "fns"], None);
    ok(
        &s,
        &["apply", "-n", "fns", "-f", "-"],
        Some(
            "apiVersion: demo.wasmkube.dev/v1\nkind: Function\nmetadata:\n  name: inside\nspec:\n  image: reg/inside:v1\n",
        ),
    );
    ok(
        &s,
        &["delete", "namespace", "fns", "--wait=true", "--timeout=60s"],
        None,
    );
    let left = ok(&s, &["get", "fn", "-A", "-o", "name"], None);
    assert!(
        !left.contains("inside") && left.contains("/hello"),
        "{left}"
    );

    // Deleting the CRD deletes its objects (a watcher sees them go) and
    // the kind is no longer served. The watcher lists first and watches
    // from the list's revision; a label written after the list is seen
    // proves its watch is open before the CRD goes.
    let mut watch = Command::new("kubectl")
        .args([
            "get",
            "fn",
            "--watch",
            "--output-watch-events",
            "-o",
            "json",
        ])
        .env("KUBECONFIG", &s.kubeconfig)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = watch.stdout.take().unwrap();
    let mut seen = String::new();
    let mut read_until = |want: &str| {
        let mut buf = [0u8; 4096];
        while !seen.contains(want) {
            let n = out.read(&mut buf).unwrap();
            assert!(n > 0, "the watch ended before {want}: {seen}");
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    };
    read_until(r#""type":"ADDED""#);
    ok(&s, &["label", "fn", "hello", "watched=yes"], None);
    read_until(r#""type":"MODIFIED""#);
    // As on Kubernetes, the CRD goes after its objects: it carries the
    // cleanup finalizer, and an object held by a finalizer of its own
    // keeps it (Terminating, refusing new objects) until released.
    let finalizers = ok(
        &s,
        &[
            "get",
            "crd",
            "functions.demo.wasmkube.dev",
            "-o",
            "jsonpath={.metadata.finalizers}",
        ],
        None,
    );
    assert!(
        finalizers.contains("customresourcecleanup.apiextensions.k8s.io"),
        "{finalizers}"
    );
    let function = |name: &str| {
        format!(
            "apiVersion: demo.wasmkube.dev/v1\nkind: Function\nmetadata:\n  name: {name}\n  finalizers: [demo.wasmkube.dev/hold]\nspec:\n  image: reg/{name}:v1\n"
        )
    };
    ok(&s, &["apply", "-f", "-"], Some(&function("held")));
    ok(
        &s,
        &[
            "delete",
            "crd",
            "functions.demo.wasmkube.dev",
            "--wait=false",
        ],
        None,
    );
    read_until(r#""type":"DELETED""#);
    common::wait_for(
        &s,
        "crd/functions.demo.wasmkube.dev",
        "condition=Terminating",
        "60s",
    );
    let refused = kubectl(&s, &["apply", "-f", "-"], Some(&function("late")));
    assert!(
        !refused.ok
            && refused
                .stderr
                .contains("create not allowed while custom resource definition is terminating"),
        "{}",
        refused.stderr
    );
    let held = ok(
        &s,
        &[
            "get",
            "fn",
            "held",
            "-o",
            "jsonpath={.metadata.deletionTimestamp}",
        ],
        None,
    );
    assert!(!held.is_empty(), "the held object is being deleted");
    ok(
        &s,
        &[
            "patch",
            "fn",
            "held",
            "--type=merge",
            "-p",
            r#"{"metadata":{"finalizers":null}}"#,
        ],
        None,
    );
    ok(
        &s,
        &[
            "wait",
            "--for=delete",
            "crd/functions.demo.wasmkube.dev",
            "--timeout=60s",
        ],
        None,
    );
    let _ = watch.kill();
    let _ = watch.wait();
    let gone = kubectl(
        &s,
        &[
            "get",
            "--raw",
            "/apis/demo.wasmkube.dev/v1/namespaces/default/functions",
        ],
        None,
    );
    assert!(
        !gone.ok && gone.stderr.contains("NotFound"),
        "{}",
        gone.stderr
    );
}

/// A ValidatingAdmissionPolicy written with kubectl: `kubectl get` shows
/// it and its binding in Kubernetes' columns, a Deployment over the bound
/// limit is refused with the policy's message as kubectl prints it, and
/// one within it is created.
#[test]
fn validating_admission_policies_with_kubectl() {
    const POLICY: &str = r#"
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicy
metadata:
  name: replicas.example.com
spec:
  failurePolicy: Fail
  matchConstraints:
    resourceRules:
    - apiGroups: ["apps"]
      apiVersions: ["v1"]
      operations: ["CREATE", "UPDATE"]
      resources: ["deployments"]
  validations:
  - expression: "object.spec.replicas <= 3"
    message: "at most 3 replicas here"
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicyBinding
metadata:
  name: replicas-binding
spec:
  policyName: replicas.example.com
  validationActions: [Deny]
"#;
    let dir = tempfile::tempdir().unwrap();
    let s = start_server(dir.path());
    let applied = ok(&s, &["apply", "-f", "-"], Some(POLICY));
    assert!(
        applied.contains(
            "validatingadmissionpolicy.admissionregistration.k8s.io/replicas.example.com created"
        ),
        "{applied}"
    );
    let policies = ok(&s, &["get", "validatingadmissionpolicies"], None);
    assert_eq!(
        header(&policies),
        ["NAME", "VALIDATIONS", "PARAMKIND", "AGE"]
    );
    assert!(policies.contains("replicas.example.com"), "{policies}");
    let bindings = ok(&s, &["get", "validatingadmissionpolicybindings"], None);
    assert_eq!(header(&bindings), ["NAME", "POLICYNAME", "PARAMREF", "AGE"]);
    let refused = kubectl(
        &s,
        &[
            "create",
            "deployment",
            "big",
            "--image=registry.local/x:1",
            "--replicas=5",
        ],
        None,
    );
    assert!(!refused.ok, "{}", refused.stdout);
    assert!(
        refused.stderr.contains(
            "ValidatingAdmissionPolicy 'replicas.example.com' with binding 'replicas-binding' denied request: at most 3 replicas here"
        ),
        "{}",
        refused.stderr
    );
    ok(
        &s,
        &[
            "create",
            "deployment",
            "small",
            "--image=registry.local/x:1",
            "--replicas=2",
        ],
        None,
    );
}

/// The server's Prometheus metrics: the API server's, the scheduler's and
/// the controllers' under the names Kubernetes and its tools use, a watch counted while it is open,
/// and the whole page accepted by `promtool check metrics` (Prometheus'
/// own linter).
#[test]
fn api_server_metrics_pass_promtool() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_server(dir.path());
    ok(
        &s,
        &["create", "configmap", "metered", "--from-literal=a=b"],
        None,
    );
    // No node: the scheduler's attempt is unschedulable; the Deployment
    // controller reconciles.
    ok(&s, &["run", "pending", "--image=registry.local/x:1"], None);
    ok(
        &s,
        &[
            "create",
            "deployment",
            "metered",
            "--image=registry.local/x:1",
        ],
        None,
    );
    let reconciled =
        "controller_runtime_reconcile_total{controller=\"deployment\",result=\"success\"}";
    let unschedulable =
        "scheduler_schedule_attempts_total{profile=\"default-scheduler\",result=\"unschedulable\"}";
    // The Deployment controller's work queue, under client-go's names.
    let worked = "workqueue_work_duration_seconds_count{name=\"deployment\"}";
    let mut watch = Command::new("kubectl")
        .args(["get", "configmaps", "--watch", "-o", "name"])
        .env("KUBECONFIG", &s.kubeconfig)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let open_watch = "apiserver_longrunning_requests{component=\"apiserver\",group=\"\",resource=\"configmaps\",scope=\"namespace\",subresource=\"\",verb=\"WATCH\",version=\"v1\"} 1";
    let page = common::poll(
        "a watch and a scheduling attempt counted",
        Duration::from_secs(20),
        || {
            let page = ok(&s, &["get", "--raw", "/metrics"], None);
            if page.contains(open_watch)
                && page.contains("apiserver_storage_objects{resource=\"namespaces\"}")
                && page.contains(unschedulable)
                && page.contains(reconciled)
                && page.contains(worked)
            {
                Ok(page)
            } else {
                Err(page)
            }
        },
    );
    let _ = watch.kill();
    let _ = watch.wait();
    // The test's create, and the controllers' kube-root-ca.crt ConfigMaps.
    let creates = page
        .lines()
        .find_map(|l| l.strip_prefix("apiserver_request_total{code=\"201\",component=\"apiserver\",group=\"\",resource=\"configmaps\",scope=\"namespace\",subresource=\"\",verb=\"POST\",version=\"v1\"} "))
        .and_then(|n| n.trim().parse::<u64>().ok());
    assert!(creates.is_some_and(|n| n >= 1), "{page}");
    assert!(
        page.contains("apiserver_request_duration_seconds_bucket{component=\"apiserver\",group=\"\",resource=\"configmaps\",scope=\"namespace\",subresource=\"\",verb=\"POST\",version=\"v1\",le=\"0.005\"}"),
        "{page}"
    );
    let value = |prefix: &str| {
        page.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|n| n.trim().parse::<f64>().ok())
    };
    // The store's metrics: calls by operation and type, objects stored.
    let stored_creates = value("etcd_requests_total{operation=\"create\",type=\"configmaps\"} ");
    assert!(stored_creates.is_some_and(|n| n >= 1.0), "{page}");
    assert!(
        page.contains("etcd_request_duration_seconds_bucket{operation=\"get\",type=\"namespaces\",le=\"0.005\"}"),
        "{page}"
    );
    // default, kube-system, kube-public and kube-node-lease at least.
    let namespaces = value("apiserver_storage_objects{resource=\"namespaces\"} ");
    assert!(namespaces.is_some_and(|n| n >= 4.0), "{page}");
    let adds = value("workqueue_adds_total{name=\"deployment\"} ");
    assert!(adds.is_some_and(|n| n >= 1.0), "{page}");
    for gauge in [
        "workqueue_depth{name=\"deployment\"} ",
        "workqueue_longest_running_processor_seconds{name=\"deployment\"} ",
        "workqueue_unfinished_work_seconds{name=\"deployment\"} ",
    ] {
        assert!(value(gauge).is_some(), "{gauge}: {page}");
    }
    assert!(
        page.contains(
            "workqueue_queue_duration_seconds_bucket{name=\"deployment\",le=\"0.00000001\"}"
        ),
        "{page}"
    );
    wasmkube_testkit::promtool_check(&page);
}
