//! Simulated nodes, like kwok's or kubemark's hollow nodes: they register
//! Nodes, renew their Leases and move pods bound to them to Running and Ready
//! (or Succeeded/Failed when a pod asks through [`PHASE_ANNOTATION`]), all
//! through the real API. They let the control plane be tested and benchmarked
//! at scale before real node agents exist.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use chrono::Utc;
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod, Taint};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::{Value, json};

/// A pod annotated `sim.wasmkube.io/phase: Succeeded` (or `Failed`) ends that
/// way on a simulated node instead of running forever.
pub const PHASE_ANNOTATION: &str = "sim.wasmkube.io/phase";
const LEASE_NAMESPACE: &str = "kube-node-lease";
/// API requests the simulated nodes keep in flight at once.
const CONCURRENCY: usize = 32;

/// What the simulated nodes look like.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub count: usize,
    /// Nodes are named `{prefix}-{index}`.
    pub prefix: String,
    pub cpu: String,
    pub memory: String,
    pub pods: u32,
    pub labels: BTreeMap<String, String>,
    pub taints: Vec<Taint>,
    /// Runtime handlers advertised in `status.runtimeHandlers`.
    pub runtime_handlers: Vec<String>,
    pub lease_duration_seconds: i32,
    pub renew_interval: Duration,
    /// Move bound pods to Running (off only for scheduler benchmarks, which,
    /// like kube-scheduler's, measure binding without kubelets).
    pub run_pods: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            count: 3,
            prefix: "sim".into(),
            cpu: "4".into(),
            memory: "8Gi".into(),
            pods: 110,
            labels: BTreeMap::new(),
            taints: Vec::new(),
            runtime_handlers: vec!["wasmtime".into(), "runc".into()],
            lease_duration_seconds: 40,
            renew_interval: Duration::from_secs(10),
            run_pods: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("could not register node {node}")]
    Register {
        node: String,
        #[source]
        source: kube::Error,
    },
    #[error("the pod watch ended")]
    WatchEnded,
}

/// The InternalIP of simulated node `index`.
fn node_ip(index: usize) -> String {
    format!("10.0.{}.{}", index / 250, index % 250 + 2)
}

fn node_object(config: &SimConfig, index: usize, name: &str) -> Node {
    let mut labels = config.labels.clone();
    labels.insert("kubernetes.io/hostname".into(), name.into());
    labels.insert("kubernetes.io/os".into(), "linux".into());
    labels.insert("kubernetes.io/arch".into(), "amd64".into());
    labels.insert("type".into(), "sim".into());
    let capacity: BTreeMap<String, Quantity> = [
        ("cpu", config.cpu.clone()),
        ("memory", config.memory.clone()),
        ("pods", config.pods.to_string()),
        ("ephemeral-storage", "100Gi".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), Quantity(v)))
    .collect();
    let now = Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let condition = |t: &str, status: &str, reason: &str| json!({"type": t, "status": status, "reason": reason, "lastHeartbeatTime": now, "lastTransitionTime": now});
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels},
        "spec": {"taints": config.taints, "podCIDR": format!("10.244.{index}.0/24")},
        "status": {
            "capacity": capacity,
            "allocatable": capacity,
            "conditions": [
                condition("Ready", "True", "KubeletReady"),
                condition("MemoryPressure", "False", "KubeletHasSufficientMemory"),
                condition("DiskPressure", "False", "KubeletHasNoDiskPressure"),
                condition("PIDPressure", "False", "KubeletHasSufficientPID"),
            ],
            "addresses": [{"type": "InternalIP", "address": node_ip(index)}, {"type": "Hostname", "address": name}],
            "runtimeHandlers": config.runtime_handlers.iter().map(|h| json!({"name": h, "features": {"recursiveReadOnlyMounts": false, "userNamespaces": false}})).collect::<Vec<_>>(),
            "nodeInfo": {
                "kubeletVersion": "v1.33.0-wasmkube-sim",
                "kubeProxyVersion": "",
                "containerRuntimeVersion": "sim://0.1",
                "osImage": "wasmkube simulated node",
                "kernelVersion": std::env::consts::OS,
                "operatingSystem": "linux",
                "architecture": "amd64",
                "machineID": name, "systemUUID": name, "bootID": name,
            },
        },
    }))
    .expect("a node object deserializes")
}

struct Sim {
    client: kube::Client,
    /// Node name -> index, for pod IPs.
    nodes: HashMap<String, usize>,
    next_ip: Vec<AtomicU32>,
    /// Pod uids whose start was reported: events handled concurrently must
    /// not start a pod twice.
    started: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl Sim {
    async fn register(&self, config: &SimConfig, index: usize, name: &str) -> Result<(), Error> {
        let api: Api<Node> = Api::all(self.client.clone());
        let node = node_object(config, index, name);
        let err = |source| Error::Register {
            node: name.into(),
            source,
        };
        match api.create(&PostParams::default(), &node).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {
                let status = serde_json::to_value(&node.status).expect("status serializes");
                api.patch_status(
                    name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"status": status})),
                )
                .await
                .map_err(err)?;
            }
            Err(e) => return Err(err(e)),
        }
        self.take_lease(name, config.lease_duration_seconds).await;
        Ok(())
    }

    /// Creates or takes over the node's Lease (server-side apply, once).
    async fn take_lease(&self, node: &str, duration: i32) {
        let api: Api<Lease> = Api::namespaced(self.client.clone(), LEASE_NAMESPACE);
        let now = Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        let lease = json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": node, "namespace": LEASE_NAMESPACE},
            "spec": {"holderIdentity": node, "leaseDurationSeconds": duration, "renewTime": now},
        });
        let params = PatchParams::apply("wasmkube-sim").force();
        if let Err(e) = api.patch(node, &params, &Patch::Apply(lease)).await {
            tracing::warn!(node, error = %e, "could not take the lease");
        }
    }

    /// Renews the Lease with a small merge patch, the cheap write a kubelet's
    /// heartbeat is; a missing Lease is taken again.
    async fn renew_lease(&self, node: &str, duration: i32) {
        let api: Api<Lease> = Api::namespaced(self.client.clone(), LEASE_NAMESPACE);
        let now = Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        let patch = Patch::Merge(json!({"spec": {"renewTime": now}}));
        match api.patch(node, &PatchParams::default(), &patch).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => self.take_lease(node, duration).await,
            Err(e) => tracing::warn!(node, error = %e, "lease renewal failed"),
        }
    }

    fn pod_ip(&self, node: &str) -> String {
        let i = self.nodes[node];
        let n = self.next_ip[i].fetch_add(1, Ordering::Relaxed);
        format!("10.244.{i}.{}", n % 250 + 2)
    }

    async fn handle(&self, pod: &Pod) {
        let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) else {
            return;
        };
        if !self.nodes.contains_key(node) {
            return;
        }
        let ns = pod.metadata.namespace.as_deref().unwrap_or_default();
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        if pod.metadata.deletion_timestamp.is_some() {
            self.started.lock().expect("started lock").remove(&uid);
            // The containers "stop" at once; confirm the deletion as a kubelet does.
            let params = DeleteParams {
                grace_period_seconds: Some(0),
                ..Default::default()
            };
            if let Err(e) = api.delete(name, &params).await
                && !matches!(&e, kube::Error::Api(s) if s.code == 404)
            {
                tracing::warn!(pod = name, error = %e, "could not finish deleting pod");
            }
            return;
        }
        let phase = pod
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .unwrap_or("Pending");
        if phase != "Pending" || !self.started.lock().expect("started lock").insert(uid) {
            return;
        }
        let target = pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(PHASE_ANNOTATION))
            .map(String::as_str)
            .filter(|p| matches!(*p, "Succeeded" | "Failed"))
            .unwrap_or("Running");
        let now = Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let running = target == "Running";
        let state = match target {
            "Running" => json!({"running": {"startedAt": now}}),
            "Succeeded" => {
                json!({"terminated": {"exitCode": 0, "reason": "Completed", "startedAt": now, "finishedAt": now}})
            }
            _ => {
                json!({"terminated": {"exitCode": 1, "reason": "Error", "startedAt": now, "finishedAt": now}})
            }
        };
        let containers: Vec<Value> = pod
            .spec
            .iter()
            .flat_map(|s| s.containers.iter())
            .map(|c| {
                json!({
                    "name": c.name, "image": c.image, "imageID": format!("sim://{}", c.image.as_deref().unwrap_or_default()),
                    "ready": running, "started": running, "restartCount": 0, "state": state,
                })
            })
            .collect();
        let ready = if running { "True" } else { "False" };
        let condition = |t: &str, s: &str| json!({"type": t, "status": s, "lastProbeTime": null, "lastTransitionTime": now});
        let status = json!({"status": {
            "phase": target,
            "hostIP": node_ip(self.nodes[node]),
            "podIP": self.pod_ip(node),
            "startTime": now,
            "conditions": [condition("PodScheduled", "True"), condition("Initialized", "True"), condition("ContainersReady", ready), condition("Ready", ready)],
            "containerStatuses": containers,
        }});
        if let Err(e) = api
            .patch_status(name, &PatchParams::default(), &Patch::Merge(status))
            .await
        {
            tracing::warn!(pod = name, error = %e, "could not report pod status");
        }
    }
}

/// Registers the nodes, then keeps their leases fresh and runs their pods
/// until the pod watch ends for good.
pub async fn run(client: kube::Client, config: SimConfig) -> Result<(), Error> {
    let names: Vec<String> = (0..config.count)
        .map(|i| format!("{}-{i}", config.prefix))
        .collect();
    let sim = Arc::new(Sim {
        client: client.clone(),
        nodes: names
            .iter()
            .cloned()
            .enumerate()
            .map(|(i, n)| (n, i))
            .collect(),
        next_ip: (0..config.count).map(|_| AtomicU32::new(0)).collect(),
        started: Default::default(),
    });
    // Register a few dozen at a time: thousands of nodes come up in seconds.
    futures::stream::iter(names.clone().into_iter().enumerate())
        .map(|(i, name)| {
            let (sim, config) = (sim.clone(), config.clone());
            async move { sim.register(&config, i, &name).await }
        })
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<()>, Error>>()?;
    tracing::info!(count = config.count, prefix = %config.prefix, "simulated nodes registered");
    let heartbeat = {
        let (sim, names, config) = (sim.clone(), names.clone(), config.clone());
        async move {
            loop {
                tokio::time::sleep(config.renew_interval).await;
                futures::stream::iter(names.clone())
                    .for_each_concurrent(CONCURRENCY, |name| {
                        let sim = sim.clone();
                        async move { sim.renew_lease(&name, config.lease_duration_seconds).await }
                    })
                    .await;
            }
        }
    };
    let run_pods = config.run_pods;
    let pods = async move {
        if !run_pods {
            return std::future::pending().await;
        }
        let selector = watcher::Config::default().fields("spec.nodeName!=");
        let mut stream =
            std::pin::pin!(watcher(Api::<Pod>::all(client), selector).default_backoff());
        let slots = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
        while let Some(event) = stream.next().await {
            match event {
                Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod)) => {
                    // Pods are independent: report many at once, as many
                    // kubelets would, with a bound on requests in flight.
                    let permit = slots
                        .clone()
                        .acquire_owned()
                        .await
                        .expect("the semaphore is never closed");
                    let sim = sim.clone();
                    tokio::spawn(async move {
                        sim.handle(&pod).await;
                        drop(permit);
                    });
                }
                Ok(watcher::Event::Delete(pod)) => {
                    let uid = pod.metadata.uid.unwrap_or_default();
                    sim.started.lock().expect("started lock").remove(&uid);
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "pod watch error; retrying"),
            }
        }
        Error::WatchEnded
    };
    tokio::select! {
        () = heartbeat => Ok(()),
        e = pods => Err(e),
    }
}
