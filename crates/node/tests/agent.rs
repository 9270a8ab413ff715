//! The node agent against an in-process API server and a real registry
//! (Debian's docker-registry on loopback): pods bound to the node pull their
//! Wasm images, run, restart with back-off, hit their limits, stop within
//! their grace period, and report all of it the way kubectl expects.

use std::time::Duration;

use futures::{AsyncBufReadExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Event, Node, Pod, Secret};
use k8s_openapi::api::node::v1::RuntimeClass;
use kube::api::{Api, DeleteParams, ListParams, LogParams, PostParams};
use kube::runtime::wait::await_condition;
use serde_json::{Value, json};
use wasmkube_node::{Agent, Backoff, Config};
use wasmkube_oci::{PushOptions, push_wasm};
use wasmkube_testkit::{Registry, component, workload};

const NODE: &str = "agent-test";

struct Harness {
    client: kube::Client,
    registry: Registry,
    _dir: tempfile::TempDir,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Harness {
    fn image(&self, name: &str) -> String {
        format!("{}/{name}:v1", self.registry.host())
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), "default")
    }

    async fn create(&self, name: &str, spec: Value) -> Pod {
        let mut spec = spec;
        spec["nodeName"] = json!(NODE);
        let pod: Pod = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default"},
            "spec": spec,
        }))
        .unwrap();
        self.pods()
            .create(&PostParams::default(), &pod)
            .await
            .unwrap()
    }

    /// Waits (on a watch) until the pod satisfies `cond`.
    async fn wait(&self, name: &str, what: &str, cond: impl Fn(&Pod) -> bool) -> Pod {
        let waited = tokio::time::timeout(
            Duration::from_secs(60),
            await_condition(self.pods(), name, move |p: Option<&Pod>| {
                p.is_some_and(&cond)
            }),
        )
        .await;
        match waited {
            Ok(Ok(Some(pod))) => pod,
            _ => {
                let now = self.pods().get_opt(name).await.unwrap();
                panic!(
                    "pod {name} never became {what}; now: {}",
                    serde_json::to_string_pretty(&now.map(|p| p.status)).unwrap()
                )
            }
        }
    }

    async fn log(&self, pod: &str, params: &LogParams) -> String {
        self.pods().logs(pod, params).await.unwrap()
    }

    /// The pod's events (reason, message) as recorded so far.
    async fn events(&self, pod: &str) -> Vec<(String, String)> {
        let api: Api<Event> = Api::namespaced(self.client.clone(), "default");
        api.list(&ListParams::default().fields(&format!("involvedObject.name={pod}")))
            .await
            .unwrap()
            .items
            .into_iter()
            .map(|e| (e.reason.unwrap_or_default(), e.message.unwrap_or_default()))
            .collect()
    }

    /// The pod's events once `done` holds for them. The agent records
    /// events in the background, after what they tell of, so a test waits
    /// for them through a watch.
    async fn events_until(
        &self,
        pod: &str,
        done: impl Fn(&[(String, String)]) -> bool,
    ) -> Vec<(String, String)> {
        use kube::runtime::WatchStreamExt;
        let api: Api<Event> = Api::namespaced(self.client.clone(), "default");
        let config =
            kube::runtime::watcher::Config::default().fields(&format!("involvedObject.name={pod}"));
        let mut stream = std::pin::pin!(kube::runtime::watcher(api, config).applied_objects());
        let mut seen = std::collections::BTreeMap::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let events: Vec<(String, String)> = seen.values().cloned().collect();
            if done(&events) {
                return events;
            }
            let event: Event = tokio::time::timeout_at(deadline, stream.try_next())
                .await
                .unwrap_or_else(|_| panic!("{pod}'s events in time; seen {events:?}"))
                .unwrap()
                .unwrap();
            seen.insert(
                event.metadata.name.unwrap_or_default(),
                (
                    event.reason.unwrap_or_default(),
                    event.message.unwrap_or_default(),
                ),
            );
        }
    }
}

fn phase(p: &Pod) -> &str {
    p.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}

fn container(p: &Pod) -> Value {
    serde_json::to_value(
        &p.status
            .as_ref()
            .unwrap()
            .container_statuses
            .as_ref()
            .unwrap()[0],
    )
    .unwrap()
}

async fn harness() -> Harness {
    harness_with(|_| {}).await
}

/// A harness whose agent directory `prepare` may fill first.
async fn harness_with(prepare: impl FnOnce(&std::path::Path)) -> Harness {
    let mut h = cluster().await;
    h.start_agent(prepare).await;
    h
}

/// The API server and the registry with the images, but no agent yet.
async fn cluster() -> Harness {
    cluster_with(Default::default()).await
}

async fn cluster_with(api_config: wasmkube_apiserver::Config) -> Harness {
    let api = wasmkube_apiserver::ApiServer::start(wasmkube_store::memory(), api_config)
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let client = kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap();
    let tasks = vec![tokio::spawn(async move {
        api.serve(listener).await.unwrap();
    })];
    let registry = Registry::start();
    for name in [
        "hello",
        "crasher",
        "memory-hog",
        "sleeper",
        "env-and-volumes",
        "cpu-burner",
    ] {
        let reference = format!("{}/{name}:v1", registry.host());
        push_wasm(workload(name), &reference, &PushOptions::default())
            .await
            .unwrap();
    }
    for (name, file) in [
        ("hello-component", "hello"),
        ("config-http", "config_http"),
        ("http-hello", "http_hello"),
    ] {
        let reference = format!("{}/{name}:v1", registry.host());
        push_wasm(component(file), &reference, &PushOptions::default())
            .await
            .unwrap();
    }
    Harness {
        client,
        registry,
        _dir: tempfile::tempdir().unwrap(),
        tasks,
    }
}

impl Harness {
    /// Starts the agent, once `prepare` has had its directory.
    async fn start_agent(&mut self, prepare: impl FnOnce(&std::path::Path)) {
        self.start_agent_with(prepare, |_| {}).await;
    }

    /// Starts the agent with `tune` applied to its configuration.
    async fn start_agent_with(
        &mut self,
        prepare: impl FnOnce(&std::path::Path),
        tune: impl FnOnce(&mut Config),
    ) {
        let dir = self._dir.path().join("agent");
        prepare(&dir);
        let mut config = Config::new(NODE, dir);
        // Pods share the machine's network here; pod networking is tested in
        // namespaces of its own.
        config.pod_network = false;
        config.backoff = Backoff {
            initial: Duration::from_millis(300),
            max: Duration::from_secs(2),
            reset_after: Duration::from_secs(600),
        };
        tune(&mut config);
        let agent = Agent::start(self.client.clone(), config).await.unwrap();
        self.tasks.push(tokio::spawn(async move {
            agent.run().await.unwrap();
        }));
    }
}

#[tokio::test]
async fn a_command_module_runs_to_completion_and_reports_like_kubectl_expects() {
    let h = harness().await;
    // The node: registered with its handler, and a RuntimeClass for it.
    let node = Api::<Node>::all(h.client.clone()).get(NODE).await.unwrap();
    let status = serde_json::to_value(node.status.unwrap()).unwrap();
    assert_eq!(status["runtimeHandlers"][0]["name"], "wasmtime");
    assert!(
        status["daemonEndpoints"]["kubeletEndpoint"]["Port"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert_eq!(status["conditions"].as_array().unwrap().len(), 4);
    Api::<RuntimeClass>::all(h.client.clone())
        .get("wasmtime")
        .await
        .unwrap();

    h.create(
        "hello",
        json!({
            "restartPolicy": "Never",
            "containers": [{"name": "hello", "image": h.image("hello"), "args": ["a", "b"],
                            "env": [{"name": "GREETING", "value": "hi"}]}],
        }),
    )
    .await;
    let pod = h
        .wait("hello", "Succeeded", |p| phase(p) == "Succeeded")
        .await;
    let c = container(&pod);
    assert_eq!(c["state"]["terminated"]["exitCode"], 0);
    assert_eq!(c["state"]["terminated"]["reason"], "Completed");
    assert!(c["imageID"].as_str().unwrap().contains("@sha256:"), "{c}");
    let status = pod.status.unwrap();
    assert_eq!(status.host_ip.as_deref(), Some("127.0.0.1"));
    assert!(status.start_time.is_some());
    let ready = status
        .conditions
        .unwrap()
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_deref()),
        ("False", Some("PodCompleted"))
    );

    // Logs through the API server's pods/log, proxied to the agent.
    let log = h.log("hello", &LogParams::default()).await;
    assert_eq!(log, "hi from wasmkube\nargs: a b\n");
    let stamped = h
        .log(
            "hello",
            &LogParams {
                timestamps: true,
                tail_lines: Some(1),
                ..Default::default()
            },
        )
        .await;
    assert!(
        stamped.starts_with("20") && stamped.ends_with(" args: a b\n"),
        "{stamped:?}"
    );

    let all = ["Pulling", "Pulled", "Created", "Started"];
    h.events_until("hello", |events| {
        all.iter().all(|r| events.iter().any(|(x, _)| x == r))
    })
    .await;
    // The node lists the pulled image in its status (posted shortly after).
    let wanted = h.image("hello");
    tokio::time::timeout(
        Duration::from_secs(30),
        await_condition(
            Api::<Node>::all(h.client.clone()),
            NODE,
            move |n: Option<&Node>| {
                n.and_then(|n| n.status.as_ref()?.images.as_ref())
                    .is_some_and(|imgs| {
                        imgs.iter()
                            .any(|i| i.names.iter().flatten().any(|n| *n == wanted))
                    })
            },
        ),
    )
    .await
    .expect("the node lists the pulled image")
    .unwrap();
}

#[tokio::test]
async fn a_crashing_container_backs_off_and_keeps_its_previous_log() {
    let h = harness().await;
    h.create(
        "crasher",
        json!({"containers": [{"name": "crasher", "image": h.image("crasher"), "args": ["exit", "7"]}]}),
    )
    .await;
    let pod = h
        .wait("crasher", "CrashLoopBackOff with 2 restarts", |p| {
            let Some(c) = p
                .status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
            else {
                return false;
            };
            c[0].restart_count >= 2
                && c[0]
                    .state
                    .as_ref()
                    .and_then(|s| s.waiting.as_ref())
                    .is_some_and(|w| w.reason.as_deref() == Some("CrashLoopBackOff"))
        })
        .await;
    assert_eq!(phase(&pod), "Running");
    let c = container(&pod);
    assert_eq!(c["lastState"]["terminated"]["exitCode"], 7);
    assert_eq!(c["lastState"]["terminated"]["reason"], "Error");
    assert!(
        c["state"]["waiting"]["message"]
            .as_str()
            .unwrap()
            .contains("restarting failed container=crasher"),
        "{c}"
    );
    let previous = h
        .log(
            "crasher",
            &LogParams {
                previous: true,
                ..Default::default()
            },
        )
        .await;
    assert_eq!(previous, "crasher: exiting with 7\n");
    h.events_until("crasher", |events| {
        events.iter().any(|(r, _)| r == "BackOff")
    })
    .await;
}

#[tokio::test]
async fn limits_are_enforced_and_deletion_honours_the_grace_period() {
    let h = harness().await;
    h.create(
        "hog",
        json!({
            "restartPolicy": "Never",
            "containers": [{"name": "hog", "image": h.image("memory-hog"),
                            "resources": {"limits": {"memory": "16Mi"}}}],
        }),
    )
    .await;
    let pod = h.wait("hog", "Failed", |p| phase(p) == "Failed").await;
    let c = container(&pod);
    assert_eq!(c["state"]["terminated"]["reason"], "OOMKilled", "{c}");
    assert_eq!(c["state"]["terminated"]["exitCode"], 137);
    h.events_until("hog", |events| {
        events.iter().any(|(r, _)| r == "OOMKilling")
    })
    .await;

    // activeDeadlineSeconds ends a pod that runs too long.
    h.create(
        "deadline",
        json!({
            "activeDeadlineSeconds": 1,
            "terminationGracePeriodSeconds": 0,
            "containers": [{"name": "sleeper", "image": h.image("sleeper")}],
        }),
    )
    .await;
    let pod = h.wait("deadline", "Failed", |p| phase(p) == "Failed").await;
    assert_eq!(
        pod.status.as_ref().unwrap().reason.as_deref(),
        Some("DeadlineExceeded")
    );

    // A guest that never exits is interrupted when its grace period ends.
    h.create(
        "sleeper",
        json!({
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "sleeper", "image": h.image("sleeper")}],
        }),
    )
    .await;
    let pod = h
        .wait("sleeper", "Ready", |p| {
            p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .await;
    assert_eq!(phase(&pod), "Running");
    // Follow the live log: the first line arrives, then the stream stays open.
    let mut lines = h
        .pods()
        .log_stream(
            "sleeper",
            &LogParams {
                follow: true,
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .lines();
    assert_eq!(lines.try_next().await.unwrap().as_deref(), Some("sleeping"));
    let uid = pod.metadata.uid.clone().unwrap();
    h.pods()
        .delete("sleeper", &DeleteParams::default())
        .await
        .unwrap();
    let started = std::time::Instant::now();
    tokio::time::timeout(
        Duration::from_secs(20),
        await_condition(
            h.pods(),
            "sleeper",
            kube::runtime::conditions::is_deleted(&uid),
        ),
    )
    .await
    .expect("the pod is deleted after its grace period")
    .unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    // The follow stream ends when the container does.
    let rest = tokio::time::timeout(Duration::from_secs(10), lines.try_next())
        .await
        .expect("the log stream ends");
    assert!(matches!(rest, Ok(None) | Err(_)), "{rest:?}");
}

#[tokio::test]
async fn missing_and_linux_images_fail_the_pod_with_a_clear_reason() {
    let h = harness().await;
    h.create(
        "missing",
        json!({"containers": [{"name": "app", "image": h.image("no-such-module")}]}),
    )
    .await;
    let pod = h
        .wait("missing", "ImagePullBackOff", |p| {
            p.status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .and_then(|c| c[0].state.as_ref()?.waiting.as_ref()?.reason.clone())
                .is_some_and(|r| r == "ImagePullBackOff")
        })
        .await;
    let message = container(&pod)["state"]["waiting"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(message.contains("no-such-module"), "{message}");
    assert!(
        message.to_lowercase().contains("manifest unknown"),
        "{message}"
    );

    // A Linux image asked to run on the Wasm runtime.
    let linux = format!("{}/busybox:v1", h.registry.host());
    push_busybox(&linux).await;
    h.create(
        "linux",
        json!({"runtimeClassName": "wasmtime", "containers": [{"name": "app", "image": linux}]}),
    )
    .await;
    let pod = h
        .wait("linux", "CreateContainerError", |p| {
            p.status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .and_then(|c| c[0].state.as_ref()?.waiting.as_ref()?.reason.clone())
                .is_some_and(|r| r == "CreateContainerError")
        })
        .await;
    let message = container(&pod)["state"]["waiting"]["message"].to_string();
    assert!(message.contains("is a Linux container image"), "{message}");
}

async fn push_busybox(reference: &str) {
    let (layer, config) = wasmkube_testkit::busybox_image(None);
    wasmkube_oci::push_image(vec![layer], config, reference, &Default::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_linux_image_runs_on_runc_beside_wasm_with_logs_and_its_exit_code() {
    let h = harness().await;
    let image = format!("{}/busybox:v1", h.registry.host());
    push_busybox(&image).await;
    h.create(
        "linux-job",
        json!({
            "restartPolicy": "Never",
            "containers": [
                {"name": "shell", "image": image, "command": ["sh", "-c"],
                 "args": ["echo hello from $(hostname) as $(id -u); exit 4"]},
                {"name": "wasm", "image": h.image("hello")},
            ],
        }),
    )
    .await;
    let pod = h
        .wait("linux-job", "Failed", |p| {
            p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Failed")
        })
        .await;
    let statuses = pod.status.unwrap().container_statuses.unwrap();
    let by_name = |n: &str| statuses.iter().find(|c| c.name == n).unwrap().clone();
    let shell = by_name("shell");
    let terminated = shell.state.unwrap().terminated.unwrap();
    assert_eq!(
        (terminated.exit_code, terminated.reason.as_deref()),
        (4, Some("Error"))
    );
    assert!(shell.container_id.unwrap().starts_with("runc://"));
    let wasm = by_name("wasm");
    assert!(wasm.container_id.unwrap().starts_with("wasmtime://"));
    assert_eq!(wasm.state.unwrap().terminated.unwrap().exit_code, 0);
    let pods: Api<Pod> = Api::namespaced(h.client.clone(), "default");
    let log = pods
        .logs(
            "linux-job",
            &kube::api::LogParams {
                container: Some("shell".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(log, "hello from linux-job as 0\n");
    // The node advertises both handlers.
    let nodes: Api<Node> = Api::all(h.client.clone());
    let node = nodes.get(NODE).await.unwrap();
    let handlers: Vec<String> = node
        .status
        .unwrap()
        .runtime_handlers
        .unwrap()
        .into_iter()
        .filter_map(|h| h.name)
        .collect();
    assert_eq!(handlers, ["wasmtime", "runc"]);
}

/// A `subPath` mount of a ConfigMap key is that one file in a Linux
/// container; a link a container left in its emptyDir pointing out of it
/// is refused as another container's `subPath` (the node's `/` is never
/// mounted), with the reason in the container's waiting state.
#[tokio::test]
async fn sub_paths_mount_one_key_and_never_leave_their_volume() {
    let h = harness().await;
    let image = format!("{}/busybox:v1", h.registry.host());
    push_busybox(&image).await;
    let cms: Api<ConfigMap> = Api::namespaced(h.client.clone(), "default");
    cms.create(
        &PostParams::default(),
        &serde_json::from_value(
            json!({"metadata": {"name": "app"}, "data": {"app.conf": "listen 8080", "other": "x"}}),
        )
        .unwrap(),
    )
    .await
    .unwrap();
    h.create(
        "one-key",
        json!({
            "restartPolicy": "Never",
            "volumes": [{"name": "config", "configMap": {"name": "app"}}],
            "containers": [{"name": "shell", "image": image, "command": ["sh", "-c"],
                "args": ["cat /etc/app.conf; echo; ls /etc/other 2>&1 | head -1"],
                "volumeMounts": [{"name": "config", "mountPath": "/etc/app.conf", "subPath": "app.conf"}]}],
        }),
    )
    .await;
    h.wait("one-key", "Succeeded", |p| phase(p) == "Succeeded")
        .await;
    let log = h.log("one-key", &LogParams::default()).await;
    assert!(log.starts_with("listen 8080\n"), "{log}");
    assert!(
        log.contains("No such file"),
        "only the key is mounted: {log}"
    );

    h.create(
        "escape",
        json!({
            "restartPolicy": "Never",
            "volumes": [{"name": "scratch", "emptyDir": {}}],
            "initContainers": [{"name": "plant", "image": image, "command": ["busybox", "ln", "-s", "/", "/scratch/root"],
                "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]}],
            "containers": [{"name": "shell", "image": image, "command": ["ls", "/host"],
                "volumeMounts": [{"name": "scratch", "mountPath": "/host", "subPath": "root"}]}],
        }),
    )
    .await;
    let pod = h
        .wait("escape", "refused", |p| {
            p.status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .is_some()
                && container(p)["state"]["waiting"]["reason"] == "CreateContainerConfigError"
        })
        .await;
    let message = container(&pod)["state"]["waiting"]["message"].clone();
    assert!(
        message
            .as_str()
            .unwrap()
            .contains("leads outside its volume"),
        "{message}"
    );
}

/// `hostUsers: false`: the container's root is an unprivileged id range of
/// the node (its uid map says so), and it still reads the image's files as
/// their owners and writes its own root filesystem (through an idmapped
/// image root).
#[tokio::test]
async fn a_pod_without_host_users_runs_as_root_of_its_own_user_namespace() {
    let h = harness().await;
    let image = format!("{}/busybox:v1", h.registry.host());
    push_busybox(&image).await;
    let secrets: Api<Secret> = Api::namespaced(h.client.clone(), "default");
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(
                json!({"metadata": {"name": "only-root"}, "stringData": {"key": "s3cret"}}),
            )
            .unwrap(),
        )
        .await
        .unwrap();
    // A directory of the node that only its root may write.
    let host_dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        host_dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let script = [
        "cat /proc/self/uid_map",
        "id -u",
        "stat -c '%u' /bin/busybox",
        "echo mine > /made-here && cat /made-here",
        "echo kept > /scratch/f && cat /scratch/f",
        // Volumes are idmapped: the node's root is root here.
        "stat -L -c '%u %a' /secret/key && cat /secret/key && echo",
        "stat -c '%u' /host && echo written > /host/by-the-pod && cat /host/by-the-pod",
        "stat -c '%u' /etc/hosts && echo '# mine' >> /etc/hosts && tail -n 1 /etc/hosts",
    ]
    .join("; ");
    h.create(
        "userns",
        json!({
            "restartPolicy": "Never",
            "hostUsers": false,
            "volumes": [
                {"name": "scratch", "emptyDir": {}},
                {"name": "secret", "secret": {"secretName": "only-root", "defaultMode": 0o400}},
                {"name": "host", "hostPath": {"path": host_dir.path()}},
            ],
            "containers": [
                {"name": "shell", "image": image, "command": ["sh", "-c"],
                 "args": [script],
                 "volumeMounts": [
                    {"name": "scratch", "mountPath": "/scratch"},
                    {"name": "secret", "mountPath": "/secret"},
                    {"name": "host", "mountPath": "/host"},
                 ]},
            ],
        }),
    )
    .await;
    let pod = h
        .wait("userns", "Succeeded", |p| {
            matches!(
                p.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            )
        })
        .await;
    let pods: Api<Pod> = Api::namespaced(h.client.clone(), "default");
    let log = pods
        .logs("userns", &kube::api::LogParams::default())
        .await
        .unwrap();
    assert_eq!(
        pod.status.and_then(|s| s.phase).as_deref(),
        Some("Succeeded"),
        "{log}"
    );
    let lines: Vec<&str> = log.lines().collect();
    let map: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(map[0], "0", "{log}");
    let host: u64 = map[1].parse().unwrap();
    assert!(host >= 65_536 && map[2] == "65536", "{log}");
    // Root inside; the image's files are root's; its writes land, in its
    // root filesystem and in its emptyDir; a Secret only root may read is
    // read; the node's directory is root's and written; /etc/hosts is the
    // container's own.
    assert_eq!(
        lines[1..],
        [
            "0", "0", "mine", "kept", "0 400", "s3cret", "0", "written", "0", "# mine"
        ],
        "{log}"
    );
    // What it wrote to the node's directory is the node's root's.
    let written = host_dir.path().join("by-the-pod");
    assert_eq!(std::fs::read_to_string(&written).unwrap(), "written\n");
    assert_eq!(
        std::os::unix::fs::MetadataExt::uid(&written.metadata().unwrap()),
        0
    );
}

#[tokio::test]
async fn env_volumes_and_init_containers_are_wired_as_the_spec_says() {
    let h = harness().await;
    let cms: Api<ConfigMap> = Api::namespaced(h.client.clone(), "default");
    cms.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "settings"}, "data": {"mode": "fast", "greeting.txt": "hello file"}})).unwrap(),
    )
    .await
    .unwrap();
    let secrets: Api<Secret> = Api::namespaced(h.client.clone(), "default");
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(
                json!({"metadata": {"name": "creds"}, "stringData": {"token": "t0ps3cret"}}),
            )
            .unwrap(),
        )
        .await
        .unwrap();
    h.create(
        "wired",
        json!({
            "restartPolicy": "Never",
            "initContainers": [{"name": "prepare", "image": h.image("hello")}],
            "volumes": [
                {"name": "config", "configMap": {"name": "settings"}},
                {"name": "secret", "secret": {"secretName": "creds"}},
                {"name": "scratch", "emptyDir": {}},
                {"name": "info", "downwardAPI": {"items": [{"path": "name", "fieldRef": {"fieldPath": "metadata.name"}}]}},
            ],
            "containers": [{
                "name": "app", "image": h.image("env-and-volumes"),
                "args": ["/config", "/secret", "/scratch", "/info", "/etc"],
                "env": [
                    {"name": "PLAIN", "value": "x-$(MODE)"},
                    {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
                    {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "MEM", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}}},
                ],
                "envFrom": [{"configMapRef": {"name": "settings"}, "prefix": "CM_"}],
                "resources": {"limits": {"memory": "64Mi"}},
                "volumeMounts": [
                    {"name": "config", "mountPath": "/config"},
                    {"name": "secret", "mountPath": "/secret"},
                    {"name": "scratch", "mountPath": "/scratch"},
                    {"name": "info", "mountPath": "/info"},
                ],
            }],
        }),
    )
    .await;
    let pod = h
        .wait("wired", "Succeeded", |p| phase(p) == "Succeeded")
        .await;
    let init = &pod
        .status
        .as_ref()
        .unwrap()
        .init_container_statuses
        .as_ref()
        .unwrap()[0];
    assert_eq!(
        init.state
            .as_ref()
            .unwrap()
            .terminated
            .as_ref()
            .unwrap()
            .reason
            .as_deref(),
        Some("Completed")
    );
    let log = h
        .log(
            "wired",
            &LogParams {
                container: Some("app".into()),
                ..Default::default()
            },
        )
        .await;
    for want in [
        "PLAIN=x-$(MODE)",
        "TOKEN=t0ps3cret",
        "POD=wired",
        "MEM=64",
        "CM_mode=fast",
        "/config/greeting.txt: hello file",
        "/config: read-only",
        "/secret/token: t0ps3cret",
        "/scratch: writable",
        "/info/name: wired",
        "/etc: cannot open",
    ] {
        assert!(
            log.lines().any(|l| l.starts_with(want)),
            "{want:?} missing from:\n{log}"
        );
    }
}

/// GET on the agent endpoint over plain HTTP/1.0; returns (status, body).
async fn agent_get(port: u64, path: &str, token: Option<&str>) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port as u16))
        .await
        .unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: agent\r\n{auth}\r\n").as_bytes())
        .await
        .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.unwrap();
    let status = raw[9..12].parse().unwrap();
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test]
async fn a_cpu_limit_holds_a_guest_to_its_share_and_usage_is_reported() {
    let h = harness().await;
    h.create(
        "burner",
        json!({
            "restartPolicy": "Never",
            "containers": [{"name": "burner", "image": h.image("cpu-burner"), "args": ["2"],
                            "resources": {"limits": {"cpu": "100m"}}}],
        }),
    )
    .await;
    h.wait("burner", "Succeeded", |p| phase(p) == "Succeeded")
        .await;
    let node = Api::<Node>::all(h.client.clone()).get(NODE).await.unwrap();
    let port = serde_json::to_value(node.status.unwrap()).unwrap()["daemonEndpoints"]["kubeletEndpoint"]["Port"]
        .as_u64()
        .unwrap();
    // The endpoint needs the node-proxy token.
    assert_eq!(agent_get(port, "/metrics", None).await.0, 401);
    assert_eq!(agent_get(port, "/metrics", Some("wrong")).await.0, 401);
    let secret = Api::<Secret>::namespaced(h.client.clone(), "kube-system")
        .get("wasmkube-node-proxy")
        .await
        .unwrap();
    let token = String::from_utf8(secret.data.unwrap()["token"].0.clone()).unwrap();
    let (status, metrics) = agent_get(port, "/metrics", Some(&token)).await;
    assert_eq!(status, 200);
    let cpu: f64 = metrics
        .lines()
        .find(|l| {
            l.starts_with("wasmkube_container_cpu_usage_seconds_total{")
                && l.contains("pod=\"burner\"")
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no cpu figure for the burner in:\n{metrics}"));
    // 2 s of wall time at 100m is 0.2 s of CPU; one 10 ms tick of overshoot
    // per 100 ms period at most doubles it. Unlimited, it would be ~2 s.
    assert!(cpu > 0.02 && cpu < 0.6, "cpu seconds {cpu}");
    assert!(metrics.contains("wasmkube_node_pods 1"), "{metrics}");
    // The Wasm runtime's compile cache: the burner was compiled here.
    let compiles: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("wasmkube_wasm_compiles_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no compile count in:\n{metrics}"));
    assert!(compiles >= 1, "{metrics}");
    assert!(
        metrics.contains("wasmkube_wasm_compile_cache_hits_total "),
        "{metrics}"
    );
    // The whole page passes Prometheus' own linter.
    wasmkube_testkit::promtool_check(&metrics);
}

#[tokio::test]
async fn a_preview2_component_runs_as_a_pod() {
    let h = harness().await;
    h.create(
        "component",
        json!({
            "restartPolicy": "Never",
            "containers": [{"name": "hello", "image": h.image("hello-component"), "args": ["p2"]}],
        }),
    )
    .await;
    h.wait("component", "Succeeded", |p| phase(p) == "Succeeded")
        .await;
    assert_eq!(
        h.log("component", &LogParams::default()).await,
        "hello from wasmkube\nargs: p2\n"
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An HTTP function reads its mounted ConfigMap on every request; the
/// ConfigMap edited, its files follow while the pods run (a key changed
/// and one added, then one removed), as the kubelet keeps them.
#[tokio::test]
async fn an_http_function_pod_serves_its_mounted_config() {
    let mut h = cluster().await;
    h.start_agent_with(|_| {}, |c| c.sync_frequency = Duration::from_millis(200))
        .await;
    let cms: Api<ConfigMap> = Api::namespaced(h.client.clone(), "default");
    cms.create(
        &PostParams::default(),
        &serde_json::from_value(
            json!({"metadata": {"name": "web"}, "data": {"greeting": "hello from a configmap"}}),
        )
        .unwrap(),
    )
    .await
    .unwrap();
    // Two pods on the same container port: the node gives pods no network
    // of their own here, so each is served at a node port of its own,
    // which its status reports.
    // `web2` sees the ConfigMap and its own labels in one projected volume.
    for name in ["web", "web2"] {
        let volume = if name == "web" {
            json!({"name": "config", "configMap": {"name": "web"}})
        } else {
            json!({"name": "config", "projected": {"sources": [
                {"configMap": {"name": "web"}},
                {"downwardAPI": {"items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]}},
            ]}})
        };
        h.create(
            name,
            json!({
                "volumes": [volume],
                "containers": [{
                    "name": "web", "image": h.image("config-http"),
                    "ports": [{"containerPort": 8080}],
                    "resources": {"limits": {"memory": "32Mi"}},
                    "volumeMounts": [{"name": "config", "mountPath": "/config"}],
                }],
            }),
        )
        .await;
    }
    let mut ports = Vec::new();
    for name in ["web", "web2"] {
        let pod = h.wait(name, "Running", |p| phase(p) == "Running").await;
        let port = node_port(&pod, "web", 8080);
        let (status, body) = agent_get(u64::from(port), "/greeting", None).await;
        assert_eq!((status, body.as_str()), (200, "hello from a configmap"));
        let (status, _) = agent_get(u64::from(port), "/nothing", None).await;
        assert_eq!(status, 404);
        ports.push(port);
    }
    assert_ne!(ports[0], ports[1]);

    // Polled: what each pod answers is all there is to watch.
    let until = |path: &'static str, want: (u16, &'static str)| {
        let ports = ports.clone();
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            for port in ports {
                loop {
                    let (status, body) = agent_get(u64::from(port), path, None).await;
                    if (status, body.as_str()) == want || (want.0 == 404 && status == 404) {
                        break;
                    }
                    assert!(
                        std::time::Instant::now() < deadline,
                        "{path} on port {port}: {status} {body:?}, want {want:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    };
    let edit = |data: Value| {
        let cms = cms.clone();
        async move {
            cms.patch(
                "web",
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(json!({ "data": data })),
            )
            .await
            .unwrap();
        }
    };
    edit(json!({"greeting": "hello again", "extra": "more"})).await;
    until("/greeting", (200, "hello again")).await;
    until("/extra", (200, "more")).await;
    edit(json!({"extra": null})).await;
    until("/extra", (404, "")).await;
    until("/greeting", (200, "hello again")).await;
    // A label given to the pod shows in its downwardAPI file.
    h.pods()
        .patch(
            "web2",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"metadata": {"labels": {"tier": "gold"}}})),
        )
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = agent_get(u64::from(ports[1]), "/labels", None).await;
        if status == 200 && body.contains("tier=\"gold\"") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "labels: {status} {body:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A deleted HTTP function runs its `preStop` hook, then drains: an idle
/// one is gone long before its grace period, and one with a request in
/// flight answers it before it stops.
#[tokio::test]
async fn a_deleted_http_function_runs_its_pre_stop_hook_and_drains() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = harness().await;
    let function = |hook: &str| {
        json!({
            "terminationGracePeriodSeconds": 600,
            "containers": [{
                "name": "fn", "image": h.image("http-hello"),
                "ports": [{"containerPort": 8080}],
                "lifecycle": {"preStop": {"httpGet": {"path": hook, "port": 8080}}},
            }],
        })
    };
    // The hook calls the function itself, while it still serves; a
    // failing hook is an event and does not hold the stop.
    h.create("idle", function("/sleep?ms=100")).await;
    h.create("busy", function("/trap")).await;
    let mut ports = std::collections::HashMap::new();
    for name in ["idle", "busy"] {
        let pod = h.wait(name, "Running", |p| phase(p) == "Running").await;
        ports.insert(name, node_port(&pod, "fn", 8080));
    }

    // A slow request to `busy`: its response head is here, its body is not.
    let mut slow = tokio::net::TcpStream::connect(("127.0.0.1", ports["busy"]))
        .await
        .unwrap();
    slow.write_all(b"GET /sleep?ms=1500 HTTP/1.1\r\nHost: fn\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8];
        slow.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 200"), "{head:?}");

    let mut deleted = Vec::new();
    for name in ["idle", "busy"] {
        let uid = h.pods().get(name).await.unwrap().metadata.uid.unwrap();
        h.pods()
            .delete(name, &DeleteParams::default())
            .await
            .unwrap();
        deleted.push((name, uid));
    }
    // The slow request is answered in full, then the connection closes.
    let mut rest = String::new();
    slow.read_to_string(&mut rest).await.unwrap();
    assert!(rest.contains("slept 1500 ms\n"), "{rest:?}");
    // Both pods go without waiting for their ten-minute grace period.
    for (name, uid) in deleted {
        tokio::time::timeout(
            Duration::from_secs(60),
            await_condition(h.pods(), name, kube::runtime::conditions::is_deleted(&uid)),
        )
        .await
        .unwrap_or_else(|_| panic!("{name} still waits for its grace period"))
        .unwrap();
    }
    h.events_until("busy", |events| {
        events
            .iter()
            .any(|(r, m)| r == "FailedPreStopHook" && m.contains("statuscode: 500"))
    })
    .await;
    assert!(
        !h.events("idle")
            .await
            .iter()
            .any(|(r, _)| r == "FailedPreStopHook"),
        "the idle function's hook succeeded"
    );
}

/// The node port that `container`'s `port` is served at, from the pod's
/// `wasmkube.dev/NodePorts` condition (pods share the node's IP here).
fn node_port(p: &Pod, container: &str, port: u16) -> u16 {
    let conditions = p.status.as_ref().and_then(|s| s.conditions.clone());
    let message = conditions
        .into_iter()
        .flatten()
        .find(|c| c.type_ == "wasmkube.dev/NodePorts" && c.status == "True")
        .and_then(|c| c.message)
        .unwrap_or_else(|| panic!("no NodePorts condition: {:?}", p.status));
    let key = format!("{container}:{port}->");
    let at = message
        .find(&key)
        .unwrap_or_else(|| panic!("{key} not in {message}"));
    message[at + key.len()..]
        .split(|ch: char| !ch.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no port after {key} in {message}"))
}

fn ready(p: &Pod) -> Option<bool> {
    let c = p.status.as_ref()?.conditions.as_ref()?;
    c.iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.status == "True")
}

#[tokio::test]
async fn probes_decide_readiness_and_restarts() {
    let h = harness().await;
    let cms: Api<ConfigMap> = Api::namespaced(h.client.clone(), "default");
    cms.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "probed"}, "data": {"healthz": "ok"}}))
            .unwrap(),
    )
    .await
    .unwrap();
    // Ready once its readiness probe passes; restarted when liveness fails.
    let port = free_port();
    h.create(
        "probed",
        json!({
            "volumes": [{"name": "config", "configMap": {"name": "probed"}}],
            "containers": [{
                "name": "web", "image": h.image("config-http"),
                "ports": [{"name": "http", "containerPort": port}],
                "volumeMounts": [{"name": "config", "mountPath": "/config"}],
                "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 1},
                "livenessProbe": {"httpGet": {"path": "/missing", "port": port}, "periodSeconds": 1, "failureThreshold": 2},
            }],
        }),
    )
    .await;
    h.wait("probed", "Ready", |p| ready(p) == Some(true)).await;
    let pod = h
        .wait("probed", "restarted by its liveness probe", |p| {
            p.status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .is_some_and(|c| c[0].restart_count >= 1)
        })
        .await;
    let last = container(&pod)["lastState"]["terminated"].clone();
    assert!(
        last["message"]
            .as_str()
            .unwrap_or_default()
            .contains("failed liveness probe"),
        "{last}"
    );
    h.events_until("probed", |events| {
        events.iter().any(|(r, m)| {
            r == "Unhealthy"
                && m.contains("Liveness probe failed: HTTP probe failed with statuscode: 404")
        })
    })
    .await;

    // A readiness probe that cannot connect keeps the pod unready but running;
    // an exec probe cannot run in a Wasm guest and says so.
    h.create(
        "unready",
        json!({
            "containers": [{
                "name": "sleeper", "image": h.image("sleeper"),
                "readinessProbe": {"tcpSocket": {"port": free_port()}, "periodSeconds": 1},
                "livenessProbe": {"exec": {"command": ["true"]}},
            }],
        }),
    )
    .await;
    let pod = h
        .wait("unready", "Running", |p| phase(p) == "Running")
        .await;
    assert_eq!(ready(&pod), Some(false));
    // Watch the pod's events until both show up.
    let api: Api<Event> = Api::namespaced(h.client.clone(), "default");
    let events = kube::runtime::watcher(
        api,
        kube::runtime::watcher::Config::default().fields("involvedObject.name=unready"),
    );
    let warned = tokio::time::timeout(Duration::from_secs(30), async {
        use kube::runtime::WatchStreamExt;
        let mut events = std::pin::pin!(events.applied_objects());
        let (mut exec_warning, mut readiness_failure) = (false, false);
        while let Some(e) = events.try_next().await.unwrap() {
            let m = e.message.unwrap_or_default();
            exec_warning |= m.contains("exec probes are not supported for Wasm containers");
            readiness_failure |= m.starts_with("Readiness probe failed: dial tcp");
            if exec_warning && readiness_failure {
                return;
            }
        }
    })
    .await;
    assert!(
        warned.is_ok(),
        "no probe warning and readiness failure events"
    );
    assert_eq!(ready(&h.pods().get("unready").await.unwrap()), Some(false));
}

#[tokio::test]
async fn a_runaway_guest_does_not_stall_its_neighbours() {
    let h = harness().await;
    // Two guests that never stop computing, with no CPU limit.
    for name in ["runaway-a", "runaway-b"] {
        h.create(
            name,
            json!({"containers": [{"name": "burn", "image": h.image("cpu-burner")}]}),
        )
        .await;
    }
    for name in ["runaway-a", "runaway-b"] {
        h.wait(name, "Running", |p| phase(p) == "Running").await;
    }
    // An HTTP function beside them still answers every request, and a new
    // pod still starts and finishes: the guests yield at every epoch tick,
    // so the agent's executor keeps serving everything else.
    h.create(
        "neighbour",
        json!({"containers": [{"name": "web", "image": h.image("config-http"),
                               "ports": [{"containerPort": 8080}]}]}),
    )
    .await;
    let pod = h
        .wait("neighbour", "Running", |p| phase(p) == "Running")
        .await;
    let port = node_port(&pod, "web", 8080);
    for _ in 0..20 {
        let (status, _) = tokio::time::timeout(
            Duration::from_secs(5),
            agent_get(u64::from(port), "/missing", None),
        )
        .await
        .expect("the neighbour answers while the runaways burn");
        assert_eq!(status, 404);
    }
    h.create(
        "after",
        json!({"restartPolicy": "Never", "containers": [{"name": "hello", "image": h.image("hello")}]}),
    )
    .await;
    h.wait("after", "Succeeded", |p| phase(p) == "Succeeded")
        .await;
}

#[tokio::test]
async fn private_images_are_pulled_with_the_pods_pull_secret() {
    let h = harness().await;
    let private = Registry::with_login("puller", "s3cret");
    let image = format!("{}/private-hello:v1", private.host());
    let credentials = wasmkube_oci::Credentials {
        username: "puller".into(),
        password: "s3cret".into(),
    };
    let options = PushOptions {
        credentials: Some(credentials),
        ..Default::default()
    };
    push_wasm(workload("hello"), &image, &options)
        .await
        .unwrap();
    let auth = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, "puller:s3cret");
    let config = json!({"auths": {private.host(): {"auth": auth}}}).to_string();
    Api::<Secret>::namespaced(h.client.clone(), "default")
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "pull"}, "type": "kubernetes.io/dockerconfigjson",
                "stringData": {".dockerconfigjson": config},
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    h.create(
        "with-secret",
        json!({"restartPolicy": "Never", "imagePullSecrets": [{"name": "pull"}],
               "containers": [{"name": "hello", "image": image}]}),
    )
    .await;
    h.wait("with-secret", "Succeeded", |p| phase(p) == "Succeeded")
        .await;
    // The image is on the node now; as on Kubernetes, only a pull (here
    // forced by imagePullPolicy: Always) asks the registry, and without the
    // secret it is refused.
    h.create(
        "without-secret",
        json!({"restartPolicy": "Never",
               "containers": [{"name": "hello", "image": image, "imagePullPolicy": "Always"}]}),
    )
    .await;
    let pod = h
        .wait("without-secret", "ImagePullBackOff", |p| {
            container_reason(p).as_deref() == Some("ImagePullBackOff")
        })
        .await;
    let message = container(&pod)["state"]["waiting"]["message"].to_string();
    assert!(message.contains("Not authorized"), "{message}");
}

fn container_reason(p: &Pod) -> Option<String> {
    p.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .first()?
        .state
        .as_ref()?
        .waiting
        .as_ref()?
        .reason
        .clone()
}

#[tokio::test]
async fn files_of_pods_gone_while_the_agent_was_down_are_removed_at_start() {
    let stale = std::sync::Arc::new(std::sync::Mutex::new(std::path::PathBuf::new()));
    let h = {
        let stale = stale.clone();
        harness_with(move |agent_dir| {
            let dir = agent_dir.join("pods/00000000-dead-pod0-0000-000000000000");
            std::fs::create_dir_all(dir.join("logs/app")).unwrap();
            std::fs::write(dir.join("logs/app/0.log"), "old\n").unwrap();
            *stale.lock().unwrap() = dir;
        })
        .await
    };
    // Once a pod created after the start has run, the first list is in and
    // the agent has reconciled its disk against it.
    h.create(
        "fresh",
        json!({"restartPolicy": "Never", "containers": [{"name": "hello", "image": h.image("hello")}]}),
    )
    .await;
    h.wait("fresh", "Succeeded", |p| phase(p) == "Succeeded")
        .await;
    let stale = stale.lock().unwrap().clone();
    assert!(!stale.exists(), "{} is still there", stale.display());
}

/// The kubelet's AppArmor admission: a pod naming a profile this node
/// cannot enforce (no AppArmor in the kernel, or the profile not loaded)
/// fails before anything of it runs; its Wasm container is never pulled.
#[tokio::test]
async fn a_pod_asking_for_an_app_armor_profile_the_node_cannot_enforce_is_rejected() {
    let h = harness().await;
    h.create(
        "confined",
        json!({
            "containers": [{"name": "c", "image": h.image("hello"), "securityContext":
                {"appArmorProfile": {"type": "Localhost", "localhostProfile": "wasmkube-test-not-loaded"}}}],
        }),
    )
    .await;
    let pod = h.wait("confined", "Failed", |p| phase(p) == "Failed").await;
    let status = pod.status.unwrap();
    assert_eq!(status.reason.as_deref(), Some("AppArmor"));
    let why = if wasmkube_runtime_linux::apparmor::enabled() {
        "profile \"wasmkube-test-not-loaded\" is not loaded"
    } else {
        "AppArmor is not enabled on the host"
    };
    assert_eq!(
        status.message.as_deref(),
        Some(format!("Pod was rejected: Cannot enforce AppArmor: {why}").as_str())
    );
    let events = h
        .events_until("confined", |events| {
            events.iter().any(|(r, _)| r == "AppArmor")
        })
        .await;
    assert!(
        !events.iter().any(|(r, _)| r == "Pulling" || r == "Started"),
        "{events:?}"
    );
}

#[tokio::test]
async fn a_pod_first_seen_while_being_deleted_is_never_started() {
    let mut h = cluster().await;
    // Bound to the node and deleted while no agent ran; a finalizer keeps
    // it in the API after the agent is done with it.
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "doomed", "finalizers": ["wasmkube.test/hold"]},
        "spec": {"nodeName": NODE, "containers": [{"name": "sleeper", "image": h.image("sleeper")}]},
    }))
    .unwrap();
    h.pods().create(&PostParams::default(), &pod).await.unwrap();
    h.pods()
        .delete("doomed", &DeleteParams::default())
        .await
        .unwrap();
    h.start_agent(|_| {}).await;
    // The agent confirms the deletion (grace 0) without starting anything.
    let p = h
        .wait("doomed", "the deletion confirmed", |p| {
            p.metadata.deletion_grace_period_seconds == Some(0)
        })
        .await;
    let state = container(&p)["state"].clone();
    assert!(
        state.get("running").is_none() && state.get("terminated").is_none(),
        "{state}"
    );
    let events: Api<Event> = Api::default_namespaced(h.client.clone());
    let reasons: Vec<String> = events
        .list(&ListParams::default().fields("involvedObject.name=doomed"))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|e| e.reason)
        .collect();
    assert!(
        !reasons.iter().any(|r| r == "Pulling" || r == "Started"),
        "{reasons:?}"
    );
}

#[tokio::test]
async fn projected_service_account_tokens_are_replaced_while_the_pod_runs() {
    let signer = wasmkube_pki::TokenSigner::generate().unwrap();
    let mut h = cluster_with(wasmkube_apiserver::Config {
        service_accounts: Some(std::sync::Arc::new(signer)),
        ..Default::default()
    })
    .await;
    // The kubelet's rule would wait 80 % of ten minutes; replace at once.
    h.start_agent_with(
        |_| {},
        |c| c.token_refresh = Some(Duration::from_millis(300)),
    )
    .await;
    let accounts: Api<k8s_openapi::api::core::v1::ServiceAccount> =
        Api::namespaced(h.client.clone(), "default");
    accounts
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "default"}})).unwrap(),
        )
        .await
        .unwrap();
    let pod = h
        .create(
            "tokens",
            json!({
                "automountServiceAccountToken": false,
                "terminationGracePeriodSeconds": 0,
                "volumes": [{"name": "vault", "projected": {"sources": [{"serviceAccountToken":
                    {"path": "token", "audience": "vault", "expirationSeconds": 600}}]}}],
                "containers": [{"name": "sleeper", "image": h.image("sleeper"),
                    "volumeMounts": [{"name": "vault", "mountPath": "/vault"}]}],
            }),
        )
        .await;
    h.wait("tokens", "Running", |p| phase(p) == "Running").await;
    let file = h
        ._dir
        .path()
        .join("agent/pods")
        .join(pod.metadata.uid.unwrap())
        .join("volumes/vault/token");
    let claims = |token: &str| -> Value {
        use base64::Engine as _;
        let payload = token.split('.').nth(1).expect("a JWT");
        serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload)
                .unwrap(),
        )
        .unwrap()
    };
    let first = std::fs::read_to_string(&file).unwrap();
    assert_eq!(claims(&first)["aud"], json!(["vault"]));
    // Polled: the file is all there is to watch.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let second = loop {
        let now = std::fs::read_to_string(&file).unwrap();
        if now != first {
            break now;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the token was never replaced"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (a, b) = (claims(&first), claims(&second));
    assert_ne!(a["jti"], b["jti"]);
    assert_eq!(b["aud"], json!(["vault"]));
    assert_eq!(b["kubernetes.io"]["pod"]["name"], "tokens");
    assert_eq!(b["exp"].as_i64().unwrap() - b["iat"].as_i64().unwrap(), 600);
}
