//! Tenants apart, through the real binary and kubectl: the server speaks
//! TLS from its own CA, authenticates client certificates and bearer
//! tokens, and authorizes every request by RBAC. Two tenants with `edit`
//! in their own namespace and a `view` user run a matrix of operations in
//! both namespaces; nothing crosses between tenants, what RBAC allows
//! works, `kubectl auth can-i` agrees with what the server then does, and
//! a join token cannot take over a registered node's name; a node reads
//! only what its own pods use.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// A kubeconfig for `server` that trusts the cluster CA and proves `token`
/// (or nothing).
fn user_kubeconfig(
    s: &Server,
    dir: &std::path::Path,
    user: &str,
    token: Option<&str>,
) -> std::path::PathBuf {
    let admin = std::fs::read_to_string(&s.kubeconfig).unwrap();
    let ca = admin
        .lines()
        .find_map(|l| l.trim().strip_prefix("certificate-authority-data: "))
        .expect("the admin kubeconfig carries the CA");
    let auth = match token {
        Some(t) => format!("\n    token: {t}"),
        None => " {}".into(),
    };
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {}\n    certificate-authority-data: {ca}\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: {user}\ncurrent-context: c\nusers:\n- name: {user}\n  user:{auth}\n",
        s.url
    );
    let path = dir.join(format!("{user}.kubeconfig"));
    std::fs::write(&path, text).unwrap();
    path
}

fn kubectl_as(kubeconfig: &std::path::Path, args: &[&str]) -> Out {
    let out = Command::new("kubectl")
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .stdin(Stdio::null())
        .output()
        .expect("kubectl is installed");
    to_out(out)
}

/// As [`kubectl_as`], with `stdin` fed to kubectl.
fn kubectl_as_with(kubeconfig: &std::path::Path, args: &[&str], stdin: &str) -> Out {
    use std::io::Write;
    let mut child = Command::new("kubectl")
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl is installed");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    to_out(child.wait_with_output().unwrap())
}

fn to_out(out: std::process::Output) -> Out {
    Out {
        ok: out.status.success(),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// One operation of the matrix: what kubectl runs in namespace NS, the
/// `kubectl auth can-i` question it is, and whether `edit` and `view`
/// grant it.
struct Op {
    name: &'static str,
    args: &'static [&'static str],
    can_i: &'static [&'static str],
    edit: bool,
    view: bool,
}

const OPS: &[Op] = &[
    Op {
        name: "list pods",
        args: &["get", "pods"],
        can_i: &["list", "pods"],
        edit: true,
        view: true,
    },
    Op {
        name: "list secrets",
        args: &["get", "secrets"],
        can_i: &["list", "secrets"],
        edit: true,
        view: false,
    },
    Op {
        name: "get a secret",
        args: &["get", "secret", "s1"],
        can_i: &["get", "secrets/s1"],
        edit: true,
        view: false,
    },
    Op {
        name: "watch secrets",
        args: &["get", "secrets", "--watch-only", "--request-timeout=1s"],
        can_i: &["watch", "secrets"],
        edit: true,
        view: false,
    },
    Op {
        name: "create a configmap",
        args: &["create", "configmap", "made-USER"],
        can_i: &["create", "configmaps"],
        edit: true,
        view: false,
    },
    Op {
        name: "delete a configmap",
        args: &["delete", "configmap", "seed", "--ignore-not-found"],
        can_i: &["delete", "configmaps"],
        edit: true,
        view: false,
    },
    Op {
        name: "list deployments",
        args: &["get", "deployments.apps"],
        can_i: &["list", "deployments.apps"],
        edit: true,
        view: true,
    },
    Op {
        name: "create a deployment",
        args: &[
            "create",
            "deployment",
            "web-USER",
            "--image=example.invalid/none:v1",
        ],
        can_i: &["create", "deployments.apps"],
        edit: true,
        view: false,
    },
    Op {
        name: "read a pod's log",
        args: &["logs", "p"],
        can_i: &["get", "pods/log"],
        edit: true,
        view: true,
    },
    Op {
        name: "exec into a pod",
        args: &["exec", "p", "--", "true"],
        can_i: &["create", "pods/exec"],
        edit: true,
        view: false,
    },
    Op {
        name: "bind a role",
        args: &[
            "create",
            "rolebinding",
            "grab-USER",
            "--clusterrole=admin",
            "--user=USER",
        ],
        can_i: &["create", "rolebindings.rbac.authorization.k8s.io"],
        edit: false,
        view: false,
    },
    Op {
        name: "impersonate the other tenant",
        args: &["get", "pods", "--as=OTHER"],
        can_i: &["impersonate", "users/OTHER"],
        edit: false,
        view: false,
    },
];

fn refused(out: &Out) -> bool {
    !out.ok && out.stderr.contains("forbidden")
}

#[test]
fn tenants_are_kept_apart_by_tls_authentication_and_rbac() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.csv");
    std::fs::write(
        &tokens,
        "alice-token,alice,1001,\"tenant-a\"\nbob-token,bob,1002,\"tenant-b\"\nvictor-token,victor,1003\ncarol-token,carol,1004\n",
    )
    .unwrap();
    let audit_policy = dir.path().join("audit.yaml");
    std::fs::write(
        &audit_policy,
        "apiVersion: audit.k8s.io/v1\nkind: Policy\nrules:\n- level: None\n  resources: [{group: coordination.k8s.io, resources: [leases]}]\n- level: Metadata\n  omitStages: [RequestReceived]\n  resources: [{group: \"\", resources: [secrets]}]\n- level: RequestResponse\n  users: [alice]\n  resources: [{group: \"\", resources: [configmaps]}]\n- level: Metadata\n",
    )
    .unwrap();
    // An audit webhook receiver: every POSTed body, kept.
    let (webhook_port, received) = audit_receiver();
    let webhook = dir.path().join("audit-webhook.kubeconfig");
    std::fs::write(
        &webhook,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: audit\n  cluster:\n    server: http://127.0.0.1:{webhook_port}/events\nusers:\n- name: api\n  user:\n    token: audit-secret\ncontexts:\n- name: c\n  context: {{cluster: audit, user: api}}\ncurrent-context: c\n"
        ),
    )
    .unwrap();
    let s = start_server_with(
        &dir.path().join("server"),
        &[
            "--token-auth-file",
            tokens.to_str().unwrap(),
            "--audit-policy-file",
            audit_policy.to_str().unwrap(),
            "--audit-webhook-config-file",
            webhook.to_str().unwrap(),
            "--audit-webhook-batch-max-wait",
            "200ms",
        ],
    );
    assert!(s.url.starts_with("https://"), "{}", s.url);

    // The administrator (the kubeconfig the server wrote) sets the tenants
    // up, with a running pod in each namespace (on a simulated node).
    let _sim = sim_nodes(&s, &["--count", "1"]);
    for ns in ["a", "b"] {
        ok(&s, &["create", "namespace", ns], None);
        ok(
            &s,
            &[
                "-n",
                ns,
                "create",
                "secret",
                "generic",
                "s1",
                "--from-literal=k=secret-of-",
            ],
            None,
        );
        ok(&s, &["-n", ns, "create", "configmap", "seed"], None);
        ok(
            &s,
            &[
                "-n",
                ns,
                "run",
                "p",
                "--image=example.invalid/none:v1",
                "--restart=Never",
            ],
            None,
        );
        // `kubectl run` returned: the pod exists.
        ok(
            &s,
            &[
                "-n",
                ns,
                "wait",
                "--for=condition=Ready",
                "pod/p",
                "--timeout=60s",
            ],
            None,
        );
    }
    ok(
        &s,
        &[
            "-n",
            "a",
            "create",
            "rolebinding",
            "alice-edit",
            "--clusterrole=edit",
            "--user=alice",
        ],
        None,
    );
    ok(
        &s,
        &[
            "-n",
            "b",
            "create",
            "rolebinding",
            "bob-edit",
            "--clusterrole=edit",
            "--group=tenant-b",
        ],
        None,
    );
    ok(
        &s,
        &[
            "create",
            "clusterrolebinding",
            "victor-view",
            "--clusterrole=view",
            "--user=victor",
        ],
        None,
    );

    let users = [
        ("alice", "alice-token", Some("a"), "bob"),
        ("bob", "bob-token", Some("b"), "alice"),
        ("victor", "victor-token", None, "alice"),
    ];
    let (mut allowed_ok, mut refused_ok, mut crossings, mut disagreements) = (0, 0, 0, 0);
    let mut failures = Vec::new();
    for (user, token, home, other) in users {
        let kc = user_kubeconfig(&s, dir.path(), user, Some(token));
        let whoami = kubectl_as(&kc, &["auth", "whoami"]);
        assert!(
            whoami.ok && whoami.stdout.contains(user),
            "{user}: {}{}",
            whoami.stdout,
            whoami.stderr
        );
        for ns in ["a", "b"] {
            for op in OPS {
                let args: Vec<String> = op
                    .args
                    .iter()
                    .map(|a| a.replace("USER", user).replace("OTHER", other))
                    .collect();
                let mut full: Vec<&str> = vec!["-n", ns];
                full.extend(args.iter().map(String::as_str));
                let out = kubectl_as(&kc, &full);
                let grants = if home == Some(ns) {
                    op.edit
                } else {
                    home.is_none() && op.view
                };
                let can_i: Vec<String> =
                    op.can_i.iter().map(|a| a.replace("OTHER", other)).collect();
                let mut question: Vec<&str> = vec!["auth", "can-i", "-n", ns];
                question.extend(can_i.iter().map(String::as_str));
                let answer = kubectl_as(&kc, &question).stdout.trim().to_owned();
                let was_refused = refused(&out);
                if (answer == "yes") == was_refused {
                    disagreements += 1;
                    failures.push(format!(
                        "{user} {ns} {}: can-i says {answer}, the server refused: {was_refused}",
                        op.name
                    ));
                }
                match (grants, was_refused) {
                    (true, false) => allowed_ok += 1,
                    (false, true) => refused_ok += 1,
                    (false, false) => {
                        crossings += 1;
                        failures.push(format!(
                            "{user} {ns} {}: allowed: {}{}",
                            op.name, out.stdout, out.stderr
                        ));
                    }
                    (true, true) => {
                        failures.push(format!("{user} {ns} {}: refused: {}", op.name, out.stderr))
                    }
                }
            }
        }
    }
    println!(
        "tenant matrix: {allowed_ok} allowed and done, {refused_ok} refused, {crossings} crossings, {disagreements} can-i disagreements"
    );
    assert!(failures.is_empty(), "{failures:#?}");
    assert_eq!(crossings, 0);

    // Kubernetes' words for a refusal.
    let alice = user_kubeconfig(&s, dir.path(), "alice", Some("alice-token"));
    dashboard_for_a_tenant(&alice);
    let out = kubectl_as(&alice, &["-n", "b", "get", "secrets"]);
    assert!(
        out.stderr.contains(
            r#"User "alice" cannot list resource "secrets" in API group "" in the namespace "b""#
        ),
        "{}",
        out.stderr
    );
    // The administrator may act as alice, and is then refused as alice.
    let out = kubectl(&s, &["-n", "b", "get", "secrets", "--as=alice"], None);
    assert!(
        out.stderr.contains(r#"User "alice" cannot list"#),
        "{}",
        out.stderr
    );
    assert!(
        ok(
            &s,
            &["-n", "a", "get", "secrets", "--as=alice", "-o", "name"],
            None
        )
        .contains("secret/s1")
    );

    // No credentials, or a token no one has: 401; the public information
    // is readable anonymously.
    let admin = std::fs::read_to_string(&s.kubeconfig).unwrap();
    let ca = admin
        .lines()
        .find_map(|l| l.trim().strip_prefix("certificate-authority-data: "))
        .unwrap();
    let ca_file = dir.path().join("ca.crt");
    std::fs::write(
        &ca_file,
        base64::Engine::decode(&base64::engine::general_purpose::STANDARD, ca).unwrap(),
    )
    .unwrap();
    let curl = |path: &str, headers: &[&str]| -> String {
        let mut c = Command::new("curl");
        c.args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
            .arg(&ca_file);
        for h in headers {
            c.args(["-H", h]);
        }
        let out = c.arg(format!("{}{path}", s.url)).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(curl("/api/v1/namespaces/a/secrets", &[]), "401");
    assert_eq!(
        curl(
            "/api/v1/namespaces/a/pods",
            &["Authorization: Bearer guessed"]
        ),
        "401"
    );
    assert_eq!(curl("/readyz", &[]), "200");
    assert_eq!(
        curl(
            "/api/v1/namespaces/a/pods",
            &["Authorization: Bearer alice-token"]
        ),
        "200"
    );

    // No one grants what they do not hold: carol administers namespace a,
    // so she may bind `edit` there, but not `cluster-admin`, nor write a
    // role with rules she lacks.
    ok(
        &s,
        &[
            "-n",
            "a",
            "create",
            "rolebinding",
            "carol-admin",
            "--clusterrole=admin",
            "--user=carol",
        ],
        None,
    );
    let carol = user_kubeconfig(&s, dir.path(), "carol", Some("carol-token"));
    let out = kubectl_as(
        &carol,
        &[
            "-n",
            "a",
            "create",
            "rolebinding",
            "dave-edit",
            "--clusterrole=edit",
            "--user=dave",
        ],
    );
    assert!(out.ok, "{}", out.stderr);
    for args in [
        &[
            "-n",
            "a",
            "create",
            "rolebinding",
            "carol-all",
            "--clusterrole=cluster-admin",
            "--user=carol",
        ][..],
        &[
            "-n",
            "a",
            "create",
            "role",
            "node-reader",
            "--verb=get",
            "--resource=nodes",
        ][..],
    ] {
        let out = kubectl_as(&carol, args);
        assert!(
            !out.ok
                && out
                    .stderr
                    .contains("is attempting to grant RBAC permissions not currently held"),
            "{args:?}: {}",
            out.stderr
        );
    }

    // Service-account tokens: alice (edit in a) asks for one in a, not in
    // b; it authenticates as the account, RBAC decides what it may do, and
    // it dies with the account.
    ok(&s, &["-n", "a", "create", "serviceaccount", "robot"], None);
    ok(&s, &["-n", "b", "create", "serviceaccount", "robot"], None);
    let out = kubectl_as(&alice, &["-n", "b", "create", "token", "robot"]);
    assert!(
        !out.ok
            && out
                .stderr
                .contains(r#"cannot create resource "serviceaccounts/token""#),
        "{}",
        out.stderr
    );
    let token = kubectl_as(
        &alice,
        &["-n", "a", "create", "token", "robot", "--duration=15m"],
    );
    assert!(token.ok, "{}", token.stderr);
    let robot = user_kubeconfig(&s, dir.path(), "robot", Some(token.stdout.trim()));
    let whoami = kubectl_as(&robot, &["auth", "whoami"]);
    assert!(
        whoami.stdout.contains("system:serviceaccount:a:robot"),
        "{}{}",
        whoami.stdout,
        whoami.stderr
    );
    assert!(
        whoami.stdout.contains("system:serviceaccounts:a"),
        "{}",
        whoami.stdout
    );
    assert!(refused(&kubectl_as(&robot, &["-n", "a", "get", "pods"])));
    ok(
        &s,
        &[
            "-n",
            "a",
            "create",
            "rolebinding",
            "robot-view",
            "--clusterrole=view",
            "--serviceaccount=a:robot",
        ],
        None,
    );
    assert!(kubectl_as(&robot, &["-n", "a", "get", "pods"]).ok);
    // A legacy token Secret, on request: filled at once, valid while the
    // Secret lives.
    ok(
        &s,
        &["-n", "a", "apply", "-f", "-"],
        Some(
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: robot-token\n  annotations: {kubernetes.io/service-account.name: robot}\ntype: kubernetes.io/service-account-token\n",
        ),
    );
    let legacy = ok(
        &s,
        &[
            "-n",
            "a",
            "get",
            "secret",
            "robot-token",
            "-o",
            "jsonpath={.data.token}",
        ],
        None,
    );
    use base64::Engine as _;
    let legacy = String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(legacy.trim())
            .unwrap(),
    )
    .unwrap();
    let legacy_user = user_kubeconfig(&s, dir.path(), "robot-legacy", Some(&legacy));
    assert!(kubectl_as(&legacy_user, &["-n", "a", "get", "pods"]).ok);
    let fields = ok(
        &s,
        &[
            "-n",
            "a",
            "get",
            "secret",
            "robot-token",
            "-o",
            "jsonpath={.data.namespace} {.data.ca\\.crt}",
        ],
        None,
    );
    assert!(fields.starts_with("YQ== LS0t"), "{fields}");
    ok(&s, &["-n", "a", "delete", "secret", "robot-token"], None);
    let out = kubectl_as(&legacy_user, &["-n", "a", "get", "pods"]);
    assert!(
        !out.ok && out.stderr.contains("Unauthorized"),
        "{}",
        out.stderr
    );
    let unnamed = kubectl(
        &s,
        &["-n", "a", "apply", "-f", "-"],
        Some(
            "apiVersion: v1\nkind: Secret\nmetadata: {name: nameless}\ntype: kubernetes.io/service-account-token\n",
        ),
    );
    assert!(
        unnamed
            .stderr
            .contains("metadata.annotations[kubernetes.io/service-account.name]: Required value"),
        "{}",
        unnamed.stderr
    );
    ok(&s, &["-n", "a", "delete", "serviceaccount", "robot"], None);
    let out = kubectl_as(&robot, &["-n", "a", "get", "pods"]);
    assert!(
        !out.ok && out.stderr.contains("Unauthorized"),
        "{}",
        out.stderr
    );

    // Pod Security: a namespace enforcing `restricted` refuses a privileged
    // pod and a hostPath pod with the standard's reasons, takes a hardened
    // Linux pod and a plain Wasm pod, and warns about a Deployment whose
    // template would be refused.
    ok(&s, &["create", "namespace", "locked"], None);
    ok(
        &s,
        &[
            "label",
            "namespace",
            "locked",
            "pod-security.kubernetes.io/enforce=restricted",
        ],
        None,
    );
    let pod = |name: &str, spec: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: locked}}\nspec:\n{spec}"
        )
    };
    let privileged = pod(
        "root",
        "  containers:\n  - name: c\n    image: busybox\n    securityContext: {privileged: true}\n",
    );
    let out = kubectl(&s, &["apply", "-f", "-"], Some(&privileged));
    assert!(
        !out.ok
            && out
                .stderr
                .contains(r#"violates PodSecurity "restricted:latest""#)
            && out.stderr.contains(
                r#"privileged (container "c" must not set securityContext.privileged=true)"#
            ),
        "{}",
        out.stderr
    );
    let host_path = pod(
        "hp",
        "  volumes: [{name: root, hostPath: {path: /}}]\n  containers:\n  - name: c\n    image: busybox\n",
    );
    let out = kubectl(&s, &["apply", "-f", "-"], Some(&host_path));
    assert!(
        !out.ok && out.stderr.contains(r#"hostPath volumes (volume "root")"#),
        "{}",
        out.stderr
    );
    let hardened = pod(
        "hardened",
        "  securityContext: {runAsNonRoot: true, seccompProfile: {type: RuntimeDefault}}\n  containers:\n  - name: c\n    image: busybox\n    securityContext: {allowPrivilegeEscalation: false, capabilities: {drop: [ALL]}}\n",
    );
    ok(&s, &["apply", "-f", "-"], Some(&hardened));
    let wasm = pod(
        "function",
        "  runtimeClassName: wasmtime\n  containers:\n  - name: f\n    image: example.invalid/f:v1\n",
    );
    ok(&s, &["apply", "-f", "-"], Some(&wasm));
    // A pod admitted before its namespace enforced `restricted` may still
    // be labelled, but not given a new image: that update is checked as a
    // new pod would be.
    ok(&s, &["create", "namespace", "raised"], None);
    ok(
        &s,
        &[
            "-n",
            "raised",
            "run",
            "legacy",
            "--image=busybox",
            "--restart=Never",
        ],
        None,
    );
    ok(
        &s,
        &[
            "label",
            "namespace",
            "raised",
            "pod-security.kubernetes.io/enforce=restricted",
        ],
        None,
    );
    ok(
        &s,
        &["-n", "raised", "label", "pod", "legacy", "tier=old"],
        None,
    );
    let out = kubectl(
        &s,
        &[
            "-n",
            "raised",
            "set",
            "image",
            "pod/legacy",
            "legacy=busybox:2",
        ],
        None,
    );
    assert!(
        !out.ok
            && out
                .stderr
                .contains(r#"violates PodSecurity "restricted:latest""#)
            && out.stderr.contains("runAsNonRoot != true"),
        "{}",
        out.stderr
    );
    let out = kubectl(
        &s,
        &[
            "-n",
            "locked",
            "create",
            "deployment",
            "web",
            "--image=busybox",
        ],
        None,
    );
    assert!(
        out.ok
            && out
                .stderr
                .contains(r#"Warning: would violate PodSecurity "restricted:latest""#),
        "{}{}",
        out.stdout,
        out.stderr
    );

    // Audit mode: a `baseline` audit level records the privileged pod it
    // lets in on the request's audit event.
    ok(&s, &["create", "namespace", "watched"], None);
    ok(
        &s,
        &[
            "label",
            "namespace",
            "watched",
            "pod-security.kubernetes.io/audit=baseline",
        ],
        None,
    );
    ok(
        &s,
        &["apply", "-f", "-"],
        Some(&privileged.replace("namespace: locked", "namespace: watched")),
    );

    // The audit log: one JSON line per audited request, with the levels the
    // policy gives (alice's ConfigMap writes with both bodies, Secrets with
    // metadata only, Leases not at all) and refusals with their decision.
    let events: Vec<serde_json::Value> = std::fs::read_to_string(s.data_dir.join("audit.log"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let made = events
        .iter()
        .find(|e| {
            e["verb"] == "create"
                && e["objectRef"]["name"].is_null()
                && e["requestObject"]["metadata"]["name"] == "made-alice"
        })
        .expect("alice's ConfigMap create is audited with its body");
    assert_eq!(made["level"], "RequestResponse");
    assert_eq!(made["user"]["username"], "alice");
    assert_eq!(made["responseStatus"]["code"], 201);
    assert!(
        made["responseObject"]["metadata"]["uid"].is_string(),
        "{made}"
    );
    // Every request's events share its auditID: received first (but where
    // the rule omits that stage), complete last; a watch is also started.
    let stages = |id: &serde_json::Value| -> Vec<String> {
        events
            .iter()
            .filter(|e| e["auditID"] == *id)
            .map(|e| e["stage"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    assert_eq!(made["stage"], "ResponseComplete");
    assert_eq!(
        stages(&made["auditID"]),
        ["RequestReceived", "ResponseComplete"]
    );
    let watch = events
        .iter()
        .find(|e| e["verb"] == "watch" && e["stage"] == "ResponseComplete")
        .expect("a watch (kubectl wait) is audited");
    assert_eq!(
        stages(&watch["auditID"]),
        ["RequestReceived", "ResponseStarted", "ResponseComplete"]
    );
    assert!(
        !events
            .iter()
            .any(|e| e["objectRef"]["resource"] == "secrets" && e["stage"] == "RequestReceived"),
        "omitStages leaves out RequestReceived for Secrets"
    );
    // The webhook received the same events, as EventLists with the token.
    common::poll(
        "alice's create at the audit webhook",
        Duration::from_secs(30),
        || {
            let bodies = received.lock().unwrap();
            let found = bodies.iter().any(|(authorization, body)| {
                authorization == "Bearer audit-secret"
                    && body["kind"] == "EventList"
                    && body["items"].as_array().into_iter().flatten().any(|e| {
                        e["auditID"] == made["auditID"] && e["stage"] == "ResponseComplete"
                    })
            });
            if found {
                Ok(())
            } else {
                Err(format!("{} batches", bodies.len()))
            }
        },
    );
    let refused = events
        .iter()
        .find(|e| {
            e["stage"] == "ResponseComplete"
                && e["user"]["username"] == "alice"
                && e["verb"] == "list"
                && e["objectRef"]["resource"] == "secrets"
                && e["objectRef"]["namespace"] == "b"
        })
        .expect("alice's refused list of b's Secrets is audited");
    assert_eq!(refused["responseStatus"]["code"], 403);
    assert_eq!(
        refused["annotations"]["authorization.k8s.io/decision"],
        "forbid"
    );
    assert!(
        events
            .iter()
            .filter(|e| e["objectRef"]["resource"] == "secrets")
            .all(|e| e["level"] == "Metadata" && e.get("requestObject").is_none())
    );
    assert!(
        !events
            .iter()
            .any(|e| e["objectRef"]["resource"] == "leases")
    );
    let audited = events
        .iter()
        .find(|e| {
            e["objectRef"]["namespace"] == "watched"
                && e["objectRef"]["resource"] == "pods"
                && e["responseStatus"]["code"] == 201
        })
        .expect("the privileged pod's create is audited");
    assert_eq!(
        audited["annotations"]["pod-security.kubernetes.io/audit-violations"],
        r#"would violate PodSecurity "baseline:latest": privileged (container "c" must not set securityContext.privileged=true)"#
    );

    // A join token makes new nodes, but cannot take over a registered
    // node's name.
    let out = Command::new(wasmkube())
        .args([
            "agent",
            "--server",
            &s.url,
            "--token",
            &s.join_token(),
            "--name",
            "sim-0",
        ])
        .args([
            "--port",
            "0",
            "--no-pod-network",
            "--no-service-proxy",
            "--no-gateway",
            "--data-dir",
        ])
        .arg(dir.path().join("thief"))
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("already registered"), "{stderr}");
    // A token for another cluster's CA is refused before anything is sent.
    let mut wrong = s.join_token();
    wrong.replace_range(
        3..7,
        if &wrong[3..7] == "0000" {
            "1111"
        } else {
            "0000"
        },
    );
    let out = Command::new(wasmkube())
        .args([
            "agent", "--server", &s.url, "--token", &wrong, "--name", "n-new",
        ])
        .args([
            "--port",
            "0",
            "--no-pod-network",
            "--no-service-proxy",
            "--no-gateway",
            "--data-dir",
        ])
        .arg(dir.path().join("wrong"))
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("is not the one the join token names"),
        "{stderr}"
    );

    the_registry_answers_to_rbac(&s, dir.path(), &alice);
    an_approved_request_adds_a_user(&s, dir.path(), &alice);
    quotas_and_limit_ranges_bound_a_tenant(&s, &alice);
    // Last: the node it joins stays registered (and schedulable) after its
    // agent stops.
    node_authorizer_keeps_nodes_to_their_own_pods(&s, dir.path());
}

/// A node `name` joined with the join token: a Wasm-only agent without
/// pod networking, its data in `data_dir`; stopped on drop.
fn join_wasm_node(s: &Server, name: &str, data_dir: &std::path::Path) -> Joined {
    Joined(
        Command::new(wasmkube())
            .args(["agent", "--server", &s.url, "--token", &s.join_token()])
            .args(["--name", name, "--port", "0", "--no-pod-network"])
            .args(["--no-service-proxy", "--no-gateway", "--no-linux"])
            .arg("--data-dir")
            .arg(data_dir)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// `wasmkube push FILE NAME:v1` with `env` (a login, a kubeconfig), its
/// output.
fn push_with(s: &Server, name: &str, env: &[(&str, &str)]) -> Out {
    let registry = s
        .registry
        .as_deref()
        .expect("the server serves its registry");
    let out = Command::new(wasmkube())
        .arg("push")
        .arg(wasmkube_testkit::workload_path("sleeper", "wasm32-wasip1"))
        .arg(format!("{name}:v1"))
        .env("WASMKUBE_REGISTRY", registry)
        .env_remove("KUBECONFIG")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    Out {
        ok: out.status.success(),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The built-in registry under the cluster's authentication and RBAC: no
/// anonymous access; a tenant pushes to and pulls from its namespace's
/// repositories only (with a token, or through its kubeconfig); the
/// administrator, with a client certificate, pushes through the token the
/// API server gives; a node pulls a pod's images with the pod's service
/// account, so a pod runs its namespace's images and shared ones, and not
/// another namespace's.
fn the_registry_answers_to_rbac(s: &Server, dir: &std::path::Path, alice: &std::path::Path) {
    let registry = s.registry.clone().expect("the server serves its registry");
    let status = |path: &str, login: Option<&str>| {
        let mut curl = Command::new("curl");
        curl.args(["-s", "-o", "/dev/null", "-w", "%{http_code}"]);
        if let Some(login) = login {
            curl.args(["-u", login]);
        }
        let out = curl
            .arg(format!("http://{registry}{path}"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(status("/v2/", None), "401");
    assert_eq!(status("/v2/", Some("x:guessed")), "401");
    assert_eq!(status("/v2/", Some("alice:alice-token")), "200");

    // Without a login, a push is told how to get one.
    let out = push_with(s, "anon", &[]);
    assert!(
        !out.ok && out.stderr.contains("asks for a login") && out.stderr.contains("KUBECONFIG"),
        "{}",
        out.stderr
    );
    // The administrator's kubeconfig holds a client certificate: the push
    // logs in with a registry token from the API server.
    let kubeconfig = s.kubeconfig.to_str().unwrap();
    for name in ["shared", "b/secret"] {
        let out = push_with(s, name, &[("KUBECONFIG", kubeconfig)]);
        assert!(out.ok, "admin pushes {name}: {}", out.stderr);
    }
    // Other OCI clients log in with a token from `wasmkube registry-token`
    // (any user name); the administrator may list the catalog.
    let out = Command::new(wasmkube())
        .arg("registry-token")
        .env("KUBECONFIG", kubeconfig)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let admin_token = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let admin_login = format!("admin:{admin_token}");
    assert_eq!(status("/v2/_catalog", Some(&admin_login)), "200");
    let skopeo = |creds: Option<&str>| {
        let mut cmd = Command::new("skopeo");
        cmd.args(["list-tags", "--tls-verify=false"]);
        if let Some(creds) = creds {
            cmd.args(["--creds", creds]);
        }
        cmd.arg(format!("docker://{registry}/b/secret"))
            .output()
            .unwrap()
    };
    let listed = skopeo(Some(&admin_login));
    assert!(
        String::from_utf8_lossy(&listed.stdout).contains("\"v1\""),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    assert!(!skopeo(None).status.success(), "skopeo without a login");

    // alice (edit in a) pushes to a, with her token or her kubeconfig, and
    // to nothing else; she pulls a's and shared repositories, not b's.
    let as_alice = [
        ("WASMKUBE_REGISTRY_USER", "alice"),
        ("WASMKUBE_REGISTRY_PASSWORD", "alice-token"),
    ];
    let out = push_with(s, "a/app", &as_alice);
    assert!(out.ok, "alice pushes a/app: {}", out.stderr);
    let out = push_with(s, "a/viakube", &[("KUBECONFIG", alice.to_str().unwrap())]);
    assert!(out.ok, "alice pushes with her kubeconfig: {}", out.stderr);
    for name in ["b/app", "mine"] {
        let out = push_with(s, name, &as_alice);
        assert!(
            !out.ok && out.stderr.to_lowercase().contains("denied"),
            "alice may not push {name}: {}",
            out.stderr
        );
    }
    let alice_login = Some("alice:alice-token");
    assert_eq!(status("/v2/a/app/manifests/v1", alice_login), "200");
    assert_eq!(status("/v2/shared/manifests/v1", alice_login), "200");
    assert_eq!(status("/v2/b/secret/manifests/v1", alice_login), "403");
    assert_eq!(status("/v2/_catalog", alice_login), "403");
    // The access reviews agree (kubectl's `auth can-i` cannot name the
    // group of a resource no discovery lists, so the review is sent whole).
    for (ns, allowed) in [("a", "true"), ("b", "false")] {
        let review = format!(
            "apiVersion: authorization.k8s.io/v1\nkind: SelfSubjectAccessReview\nspec:\n  resourceAttributes: {{group: registry.wasmkube.dev, resource: repositories, verb: create, namespace: {ns}}}\n"
        );
        let out = kubectl_as_with(
            alice,
            &["create", "-f", "-", "-o", "jsonpath={.status.allowed}"],
            &review,
        );
        assert_eq!(out.stdout.trim(), allowed, "push to {ns}: {}", out.stderr);
    }

    // Every namespace lets its service accounts pull its repositories.
    assert_eq!(
        ok(
            s,
            &[
                "-n",
                "a",
                "get",
                "rolebinding",
                "system:image-pullers",
                "-o",
                "jsonpath={.roleRef.name} {.subjects[0].name}"
            ],
            None,
        ),
        "system:image-puller system:serviceaccounts:a"
    );

    // A node pulls with the pod's service account: a pod in a runs a's
    // image and the shared one; b's is refused with the registry's reason.
    let agent = join_wasm_node(s, "n-reg", &dir.join("n-reg"));
    wait_for(s, "node/n-reg", "condition=Ready", "60s");
    let pod = |name: &str, image: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  nodeName: n-reg\n  containers:\n  - name: c\n    image: {registry}/{image}:v1\n"
        )
    };
    let manifests = [
        pod("runs-own", "a/app"),
        pod("runs-shared", "shared"),
        pod("runs-other", "b/secret"),
    ]
    .join("---\n");
    ok(s, &["-n", "a", "apply", "-f", "-"], Some(&manifests));
    for name in ["runs-own", "runs-shared"] {
        ok(
            s,
            &[
                "-n",
                "a",
                "wait",
                "--for=condition=Ready",
                &format!("pod/{name}"),
                "--timeout=120s",
            ],
            None,
        );
    }
    // The pull fails at once, with the registry's reason in the status
    // (ErrImagePull, then ImagePullBackOff while it waits to try again).
    let refused_with = |ns: &str, pod: &str, refusal: &str| {
        poll(
            "the refused pull's reason",
            Duration::from_secs(120),
            || {
                let message = kubectl(
                    s,
                    &[
                        "-n",
                        ns,
                        "get",
                        "pod",
                        pod,
                        "-o",
                        "jsonpath={.status.containerStatuses[0].state.waiting.message}",
                    ],
                    None,
                )
                .stdout;
                if message.contains(refusal) {
                    Ok(())
                } else {
                    Err(message)
                }
            },
        )
    };
    refused_with(
        "a",
        "runs-other",
        r#"User "system:serviceaccount:a:default" cannot get resource "repositories""#,
    );
    // a's image is now on the node: another pod of a starts from it, and a
    // pod of b may not (the registry is asked for b's service account).
    ok(
        s,
        &["-n", "a", "apply", "-f", "-"],
        Some(&pod("runs-own-again", "a/app")),
    );
    ok(
        s,
        &["-n", "b", "apply", "-f", "-"],
        Some(&pod("borrows", "a/app")),
    );
    ok(
        s,
        &[
            "-n",
            "a",
            "wait",
            "--for=condition=Ready",
            "pod/runs-own-again",
            "--timeout=60s",
        ],
        None,
    );
    refused_with(
        "b",
        "borrows",
        r#"User "system:serviceaccount:b:default" cannot get resource "repositories""#,
    );
    ok(
        s,
        &[
            "-n",
            "b",
            "delete",
            "pod",
            "borrows",
            "--grace-period=1",
            "--timeout=60s",
        ],
        None,
    );
    ok(
        s,
        &[
            "-n",
            "a",
            "delete",
            "pod",
            "runs-own",
            "runs-shared",
            "runs-other",
            "runs-own-again",
            "--grace-period=1",
            "--timeout=60s",
        ],
        None,
    );
    // The node goes with its agent, so later pods are not bound to it.
    drop(agent);
    ok(s, &["delete", "node", "n-reg"], None);
}

/// Adding a user as Kubernetes' documentation does: the user's key and
/// certificate request, a CertificateSigningRequest for the
/// `kube-apiserver-client` signer, `kubectl certificate approve` by the
/// administrator (a tenant may not), and the signed certificate in the
/// user's kubeconfig authenticates them with the groups they asked for. A
/// denied request gets no certificate; one whose usages its signer refuses
/// fails with the reason.
fn an_approved_request_adds_a_user(s: &Server, dir: &std::path::Path, alice: &std::path::Path) {
    use base64::Engine;
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    let request = |name: &str, usages: &str| {
        let who = wasmkube_pki::Identity::new(name, &["team-d"]);
        let (pem, key) = wasmkube_pki::new_csr(&who).unwrap();
        let manifest = format!(
            "apiVersion: certificates.k8s.io/v1\nkind: CertificateSigningRequest\nmetadata: {{name: {name}}}\nspec:\n  request: {}\n  signerName: kubernetes.io/kube-apiserver-client\n  expirationSeconds: 86400\n  usages: [{usages}]\n",
            b64(pem.as_bytes())
        );
        ok(s, &["apply", "-f", "-"], Some(&manifest));
        key
    };
    let key = request("dave", "client auth");
    request("eve", "client auth");
    request("mallory", "server auth");

    // A tenant may not approve.
    let out = kubectl_as(alice, &["certificate", "approve", "dave"]);
    assert!(
        refused(&out) && out.stderr.contains(r#"User "alice" cannot"#),
        "{}",
        out.stderr
    );
    ok(s, &["certificate", "approve", "dave", "mallory"], None);
    ok(s, &["certificate", "deny", "eve"], None);
    let csrs = ok(s, &["get", "csr", "dave", "eve", "mallory"], None);
    assert!(csrs.contains("Approved,Issued"), "{csrs}");
    assert!(csrs.contains("Denied"), "{csrs}");
    assert!(csrs.contains("Approved,Failed"), "{csrs}");
    let get = |name: &str, path: &str| {
        ok(
            s,
            &["get", "csr", name, "-o", &format!("jsonpath={path}")],
            None,
        )
    };
    assert_eq!(get("eve", "{.status.certificate}"), "");
    assert!(
        get(
            "mallory",
            "{.status.conditions[?(@.type==\"Failed\")].message}"
        )
        .contains("client auth"),
    );

    // The certificate authenticates dave, with the group he asked for.
    let cert = get("dave", "{.status.certificate}");
    assert!(!cert.is_empty(), "dave's request was signed");
    let kubeconfig = user_kubeconfig(s, dir, "dave", None);
    let text = std::fs::read_to_string(&kubeconfig).unwrap().replace(
        "  user: {}",
        &format!(
            "  user:\n    client-certificate-data: {cert}\n    client-key-data: {}",
            b64(key.as_bytes())
        ),
    );
    std::fs::write(&kubeconfig, text).unwrap();
    let out = kubectl_as(
        &kubeconfig,
        &[
            "auth",
            "whoami",
            "-o",
            "jsonpath={.status.userInfo.username} {.status.userInfo.groups}",
        ],
    );
    assert!(
        out.ok && out.stdout.starts_with("dave ") && out.stdout.contains("team-d"),
        "{}{}",
        out.stdout,
        out.stderr
    );
}

/// A tenant under a ResourceQuota and a LimitRange set by the
/// administrator: defaults fill what its pods leave out, a pod past the
/// range's bound or a create past the quota is refused in Kubernetes'
/// words, the quota's status counts what is used, and a deleted object's
/// share comes back. The tenant cannot raise its own limits.
fn quotas_and_limit_ranges_bound_a_tenant(s: &Server, alice: &std::path::Path) {
    fn with<'a>(args: &[&'a str]) -> Vec<&'a str> {
        [&["-n", "quota"][..], args].concat()
    }
    ok(s, &["create", "namespace", "quota"], None);
    ok(
        s,
        &with(&[
            "create",
            "rolebinding",
            "alice-edit",
            "--clusterrole=edit",
            "--user=alice",
        ]),
        None,
    );
    ok(
        s,
        &with(&[
            "create",
            "quota",
            "compute",
            "--hard=pods=2,requests.cpu=1,limits.memory=1Gi,count/configmaps=2",
        ]),
        None,
    );
    ok(
        s,
        &with(&["apply", "-f", "-"]),
        Some(
            "apiVersion: v1\nkind: LimitRange\nmetadata: {name: defaults}\nspec:\n  limits:\n  - type: Container\n    default: {cpu: 500m, memory: 256Mi}\n    defaultRequest: {cpu: 250m, memory: 128Mi}\n    max: {cpu: '1'}\n",
        ),
    );
    // The tenant reads its limits but cannot change them.
    let mine = kubectl_as(alice, &with(&["get", "quota,limits", "-o", "name"]));
    assert!(mine.ok, "{}", mine.stderr);
    assert_eq!(
        mine.stdout.trim(),
        "resourcequota/compute\nlimitrange/defaults"
    );
    let raise = kubectl_as(
        alice,
        &with(&["create", "quota", "mine", "--hard=pods=100"]),
    );
    assert!(
        refused(&raise)
            && raise
                .stderr
                .contains("cannot create resource \"resourcequotas\""),
        "{}",
        raise.stderr
    );

    // Pods with nothing stated get the range's defaults, and count.
    for pod in ["w1", "w2"] {
        let out = kubectl_as(
            alice,
            &with(&[
                "run",
                pod,
                "--image=example.invalid/none:v1",
                "--restart=Never",
            ]),
        );
        assert!(out.ok, "{}", out.stderr);
    }
    let resources = ok(
        s,
        &with(&[
            "get",
            "pod",
            "w1",
            "-o",
            "jsonpath={.spec.containers[0].resources}",
        ]),
        None,
    );
    let resources: serde_json::Value = serde_json::from_str(&resources).unwrap();
    assert_eq!(
        resources,
        serde_json::json!({"requests": {"cpu": "250m", "memory": "128Mi"},
            "limits": {"cpu": "500m", "memory": "256Mi"}})
    );
    let note = ok(
        s,
        &with(&[
            "get",
            "pod",
            "w1",
            "-o",
            "jsonpath={.metadata.annotations.kubernetes\\.io/limit-ranger}",
        ]),
        None,
    );
    assert_eq!(
        note,
        "LimitRanger plugin set: cpu, memory request for container w1; cpu, memory limit for container w1"
    );
    let table = ok(s, &with(&["get", "quota", "compute"]), None);
    assert!(
        table.contains("count/configmaps: 1/2, pods: 2/2, requests.cpu: 500m/1")
            && table.contains("limits.memory: 512Mi/1Gi"),
        "{table}"
    );

    // Past the quota, and past the range.
    let third = kubectl_as(
        alice,
        &with(&[
            "run",
            "w3",
            "--image=example.invalid/none:v1",
            "--restart=Never",
        ]),
    );
    assert!(
        third.stderr.contains(
            "pods \"w3\" is forbidden: exceeded quota: compute, requested: pods=1, used: pods=2, limited: pods=2"
        ),
        "{}",
        third.stderr
    );
    let big = kubectl(
        s,
        &with(&["apply", "-f", "-"]),
        Some(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: big}\nspec:\n  containers:\n  - name: c\n    image: example.invalid/none:v1\n    resources: {limits: {cpu: '2'}}\n",
        ),
    );
    assert!(
        big.stderr.contains(
            "pods \"big\" is forbidden: maximum cpu usage per Container is 1, but limit is 2"
        ),
        "{}",
        big.stderr
    );
    ok(s, &with(&["create", "configmap", "c1"]), None);
    let c2 = kubectl_as(alice, &with(&["create", "configmap", "c2"]));
    assert!(
        c2.stderr.contains(
            "configmaps \"c2\" is forbidden: exceeded quota: compute, requested: count/configmaps=1, used: count/configmaps=2, limited: count/configmaps=2"
        ),
        "{}",
        c2.stderr
    );

    // An update is charged with what it adds: a Service made a LoadBalancer.
    ok(
        s,
        &with(&["create", "quota", "lb", "--hard=services.loadbalancers=0"]),
        None,
    );
    ok(
        s,
        &with(&["create", "service", "clusterip", "s1", "--tcp=80"]),
        None,
    );
    let lb = kubectl_as(
        alice,
        &with(&[
            "patch",
            "service",
            "s1",
            "-p",
            r#"{"spec":{"type":"LoadBalancer"}}"#,
        ]),
    );
    assert!(
        lb.stderr.contains(
            "services \"s1\" is forbidden: exceeded quota: lb, requested: services.loadbalancers=1, used: services.loadbalancers=0, limited: services.loadbalancers=0"
        ),
        "{}",
        lb.stderr
    );

    // What deleted objects held comes back (the quota controller recounts),
    // and the refused creates then go through.
    ok(s, &with(&["delete", "pod", "w1", "--wait=false"]), None);
    ok(s, &with(&["delete", "configmap", "c1"]), None);
    ok(
        s,
        &with(&[
            "wait",
            "--for=jsonpath={.status.used.pods}=1",
            "quota/compute",
            "--timeout=60s",
        ]),
        None,
    );
    ok(
        s,
        &with(&[
            "wait",
            "--for=jsonpath={.status.used['count/configmaps']}=1",
            "quota/compute",
            "--timeout=60s",
        ]),
        None,
    );
    for args in [
        &[
            "run",
            "w3",
            "--image=example.invalid/none:v1",
            "--restart=Never",
        ][..],
        &["create", "configmap", "c2"],
    ] {
        let out = kubectl_as(alice, &with(args));
        assert!(out.ok, "{args:?}: {}", out.stderr);
    }
}

/// A node joined with the token reads what the pods bound to it use and
/// nothing of other nodes' pods, and writes only its own Node and pods
/// (the node authorizer and NodeRestriction).
fn node_authorizer_keeps_nodes_to_their_own_pods(s: &Server, dir: &std::path::Path) {
    let data_dir = dir.join("n2");
    let agent = join_wasm_node(s, "n2", &data_dir);
    ok(
        s,
        &["wait", "--for=create", "node/n2", "--timeout=60s"],
        None,
    );
    // The node's credentials stay in its data directory; the agent itself
    // is not needed (the pods bound to it below are never run).
    drop(agent);
    let n2 = data_dir.join("kubeconfig");
    ok(
        s,
        &[
            "-n",
            "a",
            "create",
            "secret",
            "generic",
            "for-n2",
            "--from-literal=k=only-n2",
        ],
        None,
    );
    ok(
        s,
        &["-n", "a", "apply", "-f", "-"],
        Some(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: on-n2}\nspec:\n  nodeName: n2\n  containers:\n  - name: c\n    image: example.invalid/none:v1\n    env:\n    - name: K\n      valueFrom: {secretKeyRef: {name: for-n2, key: k}}\n",
        ),
    );
    let as_n2 = |args: &[&str]| kubectl_as(&n2, args);
    let allowed = |args: &[&str]| {
        let out = as_n2(args);
        assert!(out.ok, "n2 {args:?}: {}", out.stderr);
        out.stdout
    };
    let refused_with = |args: &[&str], message: &str| {
        let out = as_n2(args);
        assert!(
            refused(&out) && out.stderr.contains(message),
            "n2 {args:?} should be refused with {message:?}: {}{}",
            out.stdout,
            out.stderr
        );
    };
    // What its pod uses: the Secret, the service account's token bound to
    // the pod, the CA bundle of the service-account volume.
    assert_eq!(
        allowed(&[
            "-n",
            "a",
            "get",
            "secret",
            "for-n2",
            "-o",
            "jsonpath={.data.k}"
        ]),
        "b25seS1uMg=="
    );
    allowed(&["-n", "a", "get", "configmap", "kube-root-ca.crt"]);
    allowed(&[
        "-n",
        "a",
        "create",
        "token",
        "default",
        "--bound-object-kind=Pod",
        "--bound-object-name=on-n2",
    ]);
    assert_eq!(
        allowed(&["-n", "a", "auth", "can-i", "get", "secret/for-n2"]).trim(),
        "yes"
    );
    // Nothing else: other pods' Secrets and ConfigMaps, lists of them,
    // unbound tokens.
    refused_with(
        &["-n", "a", "get", "secret", "s1"],
        "User \"system:node:n2\" cannot get resource \"secrets\" in API group \"\" in the namespace \"a\"",
    );
    refused_with(
        &["-n", "b", "get", "secret", "for-n2"],
        "cannot get resource \"secrets\"",
    );
    refused_with(
        &["-n", "a", "get", "secrets"],
        "cannot list resource \"secrets\"",
    );
    refused_with(
        &["-n", "a", "get", "configmap", "seed"],
        "cannot get resource \"configmaps\"",
    );
    refused_with(
        &["-n", "a", "create", "token", "default"],
        "node requested token not bound to a pod",
    );
    assert_eq!(
        as_n2(&["-n", "a", "auth", "can-i", "get", "secret/s1"])
            .stdout
            .trim(),
        "no - the node authorizer refuses: no pod bound to the node uses it, or it is another node's"
    );
    // Its own pods only.
    let mine = allowed(&[
        "get",
        "pods",
        "-A",
        "--field-selector=spec.nodeName=n2",
        "-o",
        "name",
    ]);
    assert_eq!(mine.trim(), "pod/on-n2");
    allowed(&["-n", "a", "get", "pod", "on-n2"]);
    // Every pod is listed (its NetworkPolicy enforcer needs their labels
    // and addresses), but another node's pod is not read by name.
    allowed(&["get", "pods", "-A", "-o", "name"]);
    refused_with(
        &["-n", "a", "get", "pod", "p"],
        "cannot get resource \"pods\"",
    );
    refused_with(
        &["-n", "a", "delete", "pod", "p", "--wait=false"],
        "cannot delete resource \"pods\"",
    );
    refused_with(
        &[
            "-n",
            "a",
            "run",
            "planted",
            "--image=example.invalid/none:v1",
        ],
        "cannot create resource \"pods\"",
    );
    // Its own Node only.
    allowed(&[
        "label",
        "node",
        "n2",
        "checked=yes",
        "topology.kubernetes.io/zone=z1",
    ]);
    // Not the labels an administrator steers workloads by, nor its taints.
    refused_with(
        &[
            "label",
            "node",
            "n2",
            "node-restriction.kubernetes.io/trusted=yes",
        ],
        "node \"n2\" is not allowed to modify labels: node-restriction.kubernetes.io/trusted",
    );
    refused_with(
        &[
            "label",
            "node",
            "n2",
            "node-role.kubernetes.io/control-plane=",
        ],
        "is not allowed to modify labels: node-role.kubernetes.io/control-plane",
    );
    refused_with(
        &["taint", "node", "n2", "dedicated=me:NoSchedule"],
        "node \"n2\" is not allowed to modify taints",
    );
    refused_with(
        &["label", "node", "sim-0", "stolen=yes"],
        "cannot patch resource \"nodes\"",
    );
    ok(
        s,
        &["-n", "a", "delete", "pod", "on-n2", "--wait=false"],
        None,
    );
}

/// The dashboard in Chromium through `kubectl proxy` with a tenant's
/// credentials (`tests/dashboard/dashboard.mjs tenant`): its namespace's pod
/// shows and no other's; asked for every namespace, the page shows the
/// refusal and no pod. What the page shows is what RBAC lets the reader
/// read.
fn dashboard_for_a_tenant(kubeconfig: &std::path::Path) {
    let out = std::process::Command::new("node")
        .arg(wasmkube_testkit::repo_root().join("tests/dashboard/dashboard.mjs"))
        .arg("tenant")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(["--namespace", "a", "--pod", "p"])
        .output()
        .expect("node is installed (scripts/test.sh)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the tenant's dashboard: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(r#"User \"alice\" cannot list resource \"pods\""#),
        "{stdout}"
    );
}

/// An HTTP receiver on a loopback port for the audit webhook: each POST's
/// `Authorization` and JSON body, kept; every POST answered 200.
#[allow(clippy::type_complexity)]
fn audit_receiver() -> (
    u16,
    std::sync::Arc<std::sync::Mutex<Vec<(String, serde_json::Value)>>>,
) {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = received.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let keep = keep.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                loop {
                    let (mut length, mut authorization) = (0usize, String::new());
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    loop {
                        let mut header = String::new();
                        if reader.read_line(&mut header).unwrap_or(0) == 0 {
                            return;
                        }
                        let header = header.trim_end();
                        if header.is_empty() {
                            break;
                        }
                        let (name, value) = header.split_once(':').unwrap_or((header, ""));
                        match name.to_ascii_lowercase().as_str() {
                            "content-length" => length = value.trim().parse().unwrap_or(0),
                            "authorization" => authorization = value.trim().to_owned(),
                            _ => {}
                        }
                    }
                    let mut body = vec![0; length];
                    if reader.read_exact(&mut body).is_err() {
                        return;
                    }
                    if let Ok(body) = serde_json::from_slice(&body) {
                        keep.lock().unwrap().push((authorization, body));
                    }
                    let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
                }
            });
        }
    });
    (port, received)
}

/// The client certificate in a joined node's kubeconfig (PEM).
fn node_client_cert(data_dir: &std::path::Path) -> String {
    use base64::Engine;
    let kubeconfig = std::fs::read_to_string(data_dir.join("kubeconfig")).unwrap();
    let b64 = kubeconfig
        .lines()
        .find_map(|l| l.trim().strip_prefix("client-certificate-data: "))
        .expect("the node's kubeconfig has its certificate");
    String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap(),
    )
    .unwrap()
}

/// A joined node renews its client certificate while it runs (at 80 % of
/// its life; the server signs certificates for 20 s here) and uses only
/// the new one: after the old one has expired, the API server restarts,
/// which ends every connection, and the node comes back on new ones: it
/// renews its Lease and takes a new pod.
#[test]
fn a_joined_node_renews_its_client_certificate_while_it_runs() {
    let dir = tempfile::tempdir().unwrap();
    let server_dir = dir.path().join("server");
    let signing = ["--cluster-signing-duration", "20s"];
    let mut s = start_server_with(&server_dir, &signing);
    let node_dir = dir.path().join("n-rot");
    let _agent = join_wasm_node(&s, "n-rot", &node_dir);
    wait_for(&s, "node/n-rot", "condition=Ready", "60s");
    let first = node_client_cert(&node_dir);
    let (_, first_expires) = wasmkube_pki::valid_between(&first).unwrap();

    let renewed = poll(
        "the node's client certificate renewed",
        Duration::from_secs(60),
        || {
            let now = node_client_cert(&node_dir);
            if now != first {
                Ok(now)
            } else {
                Err("the first certificate".into())
            }
        },
    );
    let (_, renewed_expires) = wasmkube_pki::valid_between(&renewed).unwrap();
    assert!(renewed_expires > first_expires);
    // Past the first certificate's end, every connection is made anew.
    poll(
        "the first certificate expired",
        Duration::from_secs(30),
        || {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs() as i64;
            if now > first_expires {
                Ok(())
            } else {
                Err(format!("{now}"))
            }
        },
    );
    let url = s.url.clone();
    s.kill();
    let listen = url.split("://").nth(1).expect("a URL");
    let s = start_server_at(&server_dir, listen, &signing);
    let renew_time = |s: &Server| {
        ok(
            s,
            &[
                "-n",
                "kube-node-lease",
                "get",
                "lease",
                "n-rot",
                "-o",
                "jsonpath={.spec.renewTime}",
            ],
            None,
        )
    };
    let before = renew_time(&s);
    poll(
        "the node renews its Lease after the restart",
        Duration::from_secs(30),
        || {
            let now = renew_time(&s);
            if now != before { Ok(()) } else { Err(now) }
        },
    );
    // Its pod watch works: a pod for it gets the node's status (its image
    // is not in the built-in registry).
    let registry = s.registry.clone().expect("the server serves its registry");
    ok(
        &s,
        &[
            "run",
            "after-renewal",
            &format!("--image={registry}/absent:v1"),
            "--overrides",
            r#"{"spec":{"nodeName":"n-rot"}}"#,
        ],
        None,
    );
    poll("the node reports the pod", Duration::from_secs(60), || {
        let reason = ok(
            &s,
            &[
                "get",
                "pod",
                "after-renewal",
                "-o",
                "jsonpath={.status.containerStatuses[0].state.waiting.reason}",
            ],
            None,
        );
        if reason.contains("ImagePull") {
            Ok(())
        } else {
            Err(reason)
        }
    });
}
