//! The scheduling loop on kube-rs: reflectors feed the queue; each popped pod
//! is filtered and scored against a fresh view of the nodes, then bound.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::Utc;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Event, Node, Pod};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;

use crate::node_info::NodeInfo;
use crate::plugins;
use crate::queue::{Key, Queue, QueueConfig};

/// Scheduler settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// Pods naming this `schedulerName` are ours.
    pub scheduler_name: String,
    pub queue: QueueConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            scheduler_name: "default-scheduler".into(),
            queue: QueueConfig::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the {what} watch ended")]
    WatchEnded { what: &'static str },
}

fn key_of(pod: &Pod) -> Key {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        pod.metadata.name.as_deref().unwrap_or_default()
    )
}

fn is_bound(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .is_some_and(|n| !n.is_empty())
}

fn is_terminal(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// Pods the scheduler has bound whose binding its pod reflector has not shown yet.
type Assumed = Arc<Mutex<HashMap<Key, (String, Arc<Pod>)>>>;

struct Shared {
    client: kube::Client,
    config: Config,
    queue: Queue,
    pods: Store<Pod>,
    nodes: Store<Node>,
    assumed: Assumed,
}

impl Shared {
    fn ours(&self, pod: &Pod) -> bool {
        pod.spec
            .as_ref()
            .and_then(|s| s.scheduler_name.as_deref())
            .unwrap_or("default-scheduler")
            == self.config.scheduler_name
    }

    fn needs_scheduling(&self, pod: &Pod) -> bool {
        !is_bound(pod)
            && pod.metadata.deletion_timestamp.is_none()
            && self.ours(pod)
            && !is_terminal(pod)
    }

    /// Every node with what is bound (or assumed bound) to it.
    fn node_infos(&self) -> Vec<NodeInfo> {
        let mut infos: Vec<NodeInfo> = self
            .nodes
            .state()
            .iter()
            .map(|n| NodeInfo::from_node(n))
            .collect();
        let index: HashMap<String, usize> = infos
            .iter()
            .enumerate()
            .map(|(i, n)| (n.name.clone(), i))
            .collect();
        let assumed = self.assumed.lock().expect("assumed lock");
        for pod in self.pods.state() {
            if is_terminal(&pod) || assumed.contains_key(&key_of(&pod)) {
                continue;
            }
            if let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.as_ref())
                && let Some(&i) = index.get(node)
            {
                infos[i].add_pod(&pod);
            }
        }
        for (node, pod) in assumed.values() {
            if let Some(&i) = index.get(node) {
                infos[i].add_pod(pod);
            }
        }
        infos
    }

    async fn event(&self, pod: &Pod, kind: &str, reason: &str, message: &str) {
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let now = Utc::now();
        let name = format!(
            "{}.{:x}",
            pod.metadata.name.as_deref().unwrap_or_default(),
            now.timestamp_nanos_opt().unwrap_or_default()
        );
        let time = now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let event: Event = serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": ns},
            "involvedObject": {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": pod.metadata.name,
                "namespace": ns,
                "uid": pod.metadata.uid,
                "resourceVersion": pod.metadata.resource_version,
            },
            "reason": reason,
            "message": message,
            "type": kind,
            "source": {"component": self.config.scheduler_name},
            "reportingComponent": self.config.scheduler_name,
            "firstTimestamp": time,
            "lastTimestamp": time,
            "count": 1,
        }))
        .expect("an event deserializes");
        let api: Api<Event> = Api::namespaced(self.client.clone(), &ns);
        if let Err(e) = api.create(&PostParams::default(), &event).await {
            tracing::warn!(error = %e, reason, "could not record event");
        }
    }

    async fn schedule(self: &Arc<Self>, key: Key) {
        let (ns, name) = key.split_once('/').unwrap_or_default();
        let Some(pod) = self.pods.get(&ObjectRef::new(name).within(ns)) else {
            self.queue.forget(&key);
            return;
        };
        if !self.needs_scheduling(&pod) {
            self.queue.forget(&key);
            return;
        }
        match plugins::select(&pod, &self.node_infos()) {
            Ok(node) => {
                self.assumed
                    .lock()
                    .expect("assumed lock")
                    .insert(key.clone(), (node.clone(), pod.clone()));
                let this = self.clone();
                // Binding is a round trip; the next pod is scheduled meanwhile,
                // seeing this one as assumed on its node.
                tokio::spawn(async move { this.bind(key, pod, node).await });
            }
            Err(fit) => {
                let message = fit.to_string();
                tracing::debug!(pod = %key, %message, "unschedulable");
                self.queue.unschedulable(key);
                self.mark_unschedulable(&pod, &message).await;
                self.event(&pod, "Warning", "FailedScheduling", &message)
                    .await;
            }
        }
    }

    async fn bind(&self, key: Key, pod: Arc<Pod>, node: String) {
        let (ns, name) = key.split_once('/').unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let binding = json!({
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": name, "uid": pod.metadata.uid},
            "target": {"apiVersion": "v1", "kind": "Node", "name": node},
        });
        match api
            .create_subresource::<_, serde_json::Value>(
                "binding",
                name,
                &PostParams::default(),
                &binding,
            )
            .await
        {
            Ok(_) => {
                tracing::debug!(pod = %key, %node, "bound");
                self.event(
                    &pod,
                    "Normal",
                    "Scheduled",
                    &format!("Successfully assigned {key} to {node}"),
                )
                .await;
            }
            Err(e) => {
                tracing::info!(pod = %key, %node, error = %e, "binding failed; retrying after backoff");
                self.assumed.lock().expect("assumed lock").remove(&key);
                self.queue.backoff(key);
            }
        }
    }

    async fn mark_unschedulable(&self, pod: &Pod, message: &str) {
        let api: Api<Pod> = Api::namespaced(
            self.client.clone(),
            pod.metadata.namespace.as_deref().unwrap_or_default(),
        );
        let already = pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|c| c.iter().find(|c| c.type_ == "PodScheduled"))
            .is_some_and(|c| c.status == "False" && c.message.as_deref() == Some(message));
        if already {
            return;
        }
        let patch = json!({"status": {"conditions": [{
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": message,
            "lastProbeTime": null,
            "lastTransitionTime": Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        }]}});
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        if let Err(e) = api
            .patch_status(name, &PatchParams::default(), &Patch::Strategic(patch))
            .await
        {
            tracing::warn!(pod = name, error = %e, "could not set PodScheduled=False");
        }
    }

    fn on_pod(&self, event: &watcher::Event<Pod>) {
        match event {
            watcher::Event::Apply(pod) | watcher::Event::InitApply(pod) => {
                let key = key_of(pod);
                if self.needs_scheduling(pod) {
                    self.queue.add(key);
                } else {
                    self.queue.forget(&key);
                    let was_assumed = self
                        .assumed
                        .lock()
                        .expect("assumed lock")
                        .remove(&key)
                        .is_some();
                    // A pod that finished frees its node's resources.
                    if !was_assumed && is_terminal(pod) {
                        self.queue.cluster_changed();
                    }
                }
            }
            watcher::Event::Delete(pod) => {
                let key = key_of(pod);
                self.queue.forget(&key);
                self.assumed.lock().expect("assumed lock").remove(&key);
                if is_bound(pod) {
                    self.queue.cluster_changed();
                }
            }
            watcher::Event::Init | watcher::Event::InitDone => {}
        }
    }
}

/// Runs the scheduler until a watch ends for good.
pub async fn run(client: kube::Client, config: Config) -> Result<(), Error> {
    let (pods, pod_writer) = reflector::store();
    let (nodes, node_writer) = reflector::store();
    let shared = Arc::new(Shared {
        queue: Queue::new(config.queue.clone()),
        client: client.clone(),
        config,
        pods,
        nodes,
        assumed: Arc::default(),
    });
    let pod_stream = reflector::reflector(
        pod_writer,
        watcher(Api::<Pod>::all(client.clone()), watcher::Config::default()),
    )
    .default_backoff();
    let node_stream = reflector::reflector(
        node_writer,
        watcher(Api::<Node>::all(client), watcher::Config::default()),
    )
    .default_backoff();
    let pods_task = {
        let shared = shared.clone();
        async move {
            let mut s = std::pin::pin!(pod_stream);
            while let Some(event) = s.next().await {
                match event {
                    Ok(e) => shared.on_pod(&e),
                    Err(e) => tracing::warn!(error = %e, "pod watch error; retrying"),
                }
            }
            Error::WatchEnded { what: "pod" }
        }
    };
    let nodes_task = {
        let shared = shared.clone();
        async move {
            let mut s = std::pin::pin!(node_stream);
            while let Some(event) = s.next().await {
                match event {
                    Ok(
                        watcher::Event::Apply(_)
                        | watcher::Event::Delete(_)
                        | watcher::Event::InitDone,
                    ) => shared.queue.cluster_changed(),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "node watch error; retrying"),
                }
            }
            Error::WatchEnded { what: "node" }
        }
    };
    let schedule_loop = {
        let shared = shared.clone();
        async move {
            // Decide nothing before both caches hold the whole cluster.
            let _ = shared.pods.wait_until_ready().await;
            let _ = shared.nodes.wait_until_ready().await;
            tracing::info!("scheduler caches synced");
            loop {
                let key = shared.queue.pop().await;
                shared.schedule(key).await;
            }
        }
    };
    tokio::select! {
        e = pods_task => Err(e),
        e = nodes_task => Err(e),
        () = schedule_loop => Ok(()),
    }
}
