//! The scheduling loop on kube-rs: watches feed the queue and the
//! incremental [`Cache`]; each popped pod is filtered and scored against the
//! cache, assumed on its node, and bound in the background.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use chrono::Utc;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{
    Event, Namespace, Node, PersistentVolume, PersistentVolumeClaim, Pod,
};
use k8s_openapi::api::node::v1::RuntimeClass;
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use tokio::sync::Semaphore;

use crate::cache::Cache;
use crate::node_info::priority;
use crate::plugins::{self, Cycle};
use crate::preemption;
use crate::queue::{Key, Queue, QueueConfig};

/// Bindings in flight at once; the loop waits for a slot, so a slow API
/// server slows scheduling instead of piling up requests.
const MAX_IN_FLIGHT_BINDINGS: usize = 64;
/// `Scheduled` events in flight at once.
const MAX_IN_FLIGHT_EVENTS: usize = 256;

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

struct Shared {
    client: kube::Client,
    config: Config,
    queue: Queue,
    pods: Store<Pod>,
    cache: Mutex<Cache>,
    bindings: Arc<Semaphore>,
    /// `Scheduled` events in flight; beyond this they are dropped, as
    /// client-go's event broadcaster drops them when its queue is full, so
    /// events never hold binding back.
    events: Arc<Semaphore>,
    /// Keys seen during a pod or node relist, to drop what vanished meanwhile.
    relist_pods: Mutex<Option<HashSet<Key>>>,
    relist_nodes: Mutex<Option<HashSet<String>>>,
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

    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().expect("scheduler cache lock")
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
        let started = std::time::Instant::now();
        let (ns, name) = key.split_once('/').unwrap_or_default();
        let Some(pod) = self.pods.get(&ObjectRef::new(name).within(ns)) else {
            self.queue.forget(&key);
            return;
        };
        if !self.needs_scheduling(&pod) {
            self.queue.forget(&key);
            return;
        }
        if self.cache().is_accounted(&key) {
            // Assumed on a node already: the watch delivered a version from
            // before our binding (our own status write, say). Scheduling it
            // again would count it twice, and could preempt for it twice.
            return;
        }
        let decision = {
            let mut cache = self.cache();
            let decision = plugins::select(&key, &pod, &mut cache);
            if let Ok(node) = &decision {
                cache.add_pod(&key, node, pod.clone(), true);
            }
            decision
        };
        match decision {
            Ok(node) => {
                let permit = self
                    .bindings
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("the binding semaphore is never closed");
                let this = self.clone();
                // Binding is a round trip; the next pod is scheduled meanwhile,
                // seeing this one as assumed on its node.
                tokio::spawn(async move {
                    this.bind(key, pod, node, started).await;
                    drop(permit);
                });
            }
            Err(fit) => {
                let mut message = fit.to_string();
                tracing::debug!(pod = %key, %message, "unschedulable");
                crate::metrics::attempt(
                    &self.config.scheduler_name,
                    crate::metrics::Result::Unschedulable,
                    started.elapsed(),
                );
                let plan = {
                    let cache = self.cache();
                    let cycle = Cycle::prepare(&key, &pod, &cache);
                    if cache.awaits_victims(&key, cycle.priority()) {
                        None
                    } else {
                        preemption::plan(&pod, &cycle, &cache)
                    }
                };
                self.queue.unschedulable(key.clone());
                if let Some(plan) = plan {
                    message.push_str(&format!(
                        " preemption: {} lower-priority pod(s) preempted on node {}.",
                        plan.victims.len(),
                        plan.node
                    ));
                    self.cache().nominate(&key, &plan.node, pod.clone());
                    self.preempt(&pod, plan).await;
                }
                // The event first: whoever waits for the condition then
                // finds the event too (`kubectl wait`, then `describe`).
                self.event(&pod, "Warning", "FailedScheduling", &message)
                    .await;
                self.mark_unschedulable(&pod, &message).await;
            }
        }
    }

    /// Evicts a plan's victims and records the preemptor's nominated node.
    /// The preemptor waits as unschedulable; the victims' deletion is the
    /// cluster change that retries it.
    async fn preempt(&self, preemptor: &Pod, plan: preemption::Plan) {
        let preemptor_name = preemptor.metadata.name.as_deref().unwrap_or_default();
        let preemptor_ns = preemptor.metadata.namespace.as_deref().unwrap_or_default();
        for (key, victim) in &plan.victims {
            let (ns, name) = key.split_once('/').unwrap_or_default();
            let api: Api<Pod> = Api::namespaced(self.client.clone(), ns);
            let message = format!(
                "Preempted by pod {} on node {}",
                preemptor.metadata.uid.as_deref().unwrap_or_default(),
                plan.node
            );
            let condition = json!({"status": {"conditions": [{
                "type": "DisruptionTarget", "status": "True",
                "reason": "PreemptionByScheduler",
                "message": format!("{}: preempting to accommodate a higher priority pod", self.config.scheduler_name),
                "lastTransitionTime": Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            }]}});
            if let Err(e) = api
                .patch_status(name, &PatchParams::default(), &Patch::Strategic(condition))
                .await
            {
                tracing::debug!(pod = %key, error = %e, "could not mark the victim");
            }
            match api.delete(name, &DeleteParams::default()).await {
                Ok(_) => {
                    self.cache().mark_terminating(key);
                    tracing::info!(victim = %key, preemptor = %format!("{preemptor_ns}/{preemptor_name}"), node = %plan.node, "preempted");
                    self.event(victim, "Normal", "Preempted", &message).await;
                }
                Err(e) => tracing::warn!(victim = %key, error = %e, "could not preempt"),
            }
        }
        let api: Api<Pod> = Api::namespaced(self.client.clone(), preemptor_ns);
        let patch = json!({"status": {"nominatedNodeName": plan.node}});
        if let Err(e) = api
            .patch_status(
                preemptor_name,
                &PatchParams::default(),
                &Patch::Merge(patch),
            )
            .await
        {
            tracing::debug!(pod = preemptor_name, error = %e, "could not set nominatedNodeName");
        }
    }

    async fn bind(
        self: &Arc<Self>,
        key: Key,
        pod: Arc<Pod>,
        node: String,
        started: std::time::Instant,
    ) {
        let (ns, name) = key.split_once('/').unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let binding = json!({
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": name, "uid": pod.metadata.uid},
            "target": {"apiVersion": "v1", "kind": "Node", "name": node},
        });
        let bound = async {
            self.select_claims_node(&pod, &node).await?;
            api.create_subresource::<_, serde_json::Value>(
                "binding",
                name,
                &PostParams::default(),
                &binding,
            )
            .await
        };
        match bound.await {
            Ok(_) => {
                tracing::debug!(pod = %key, %node, "bound");
                crate::metrics::attempt(
                    &self.config.scheduler_name,
                    crate::metrics::Result::Scheduled,
                    started.elapsed(),
                );
                match self.events.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let this = self.clone();
                        tokio::spawn(async move {
                            let message = format!("Successfully assigned {key} to {node}");
                            this.event(&pod, "Normal", "Scheduled", &message).await;
                            drop(permit);
                        });
                    }
                    Err(_) => {
                        tracing::debug!(pod = %key, "event queue full; Scheduled event dropped")
                    }
                }
            }
            Err(e) => {
                tracing::info!(pod = %key, %node, error = %e, "binding failed; retrying after backoff");
                crate::metrics::attempt(
                    &self.config.scheduler_name,
                    crate::metrics::Result::Error,
                    started.elapsed(),
                );
                {
                    let mut cache = self.cache();
                    if cache.is_assumed(&key) {
                        cache.remove_pod(&key);
                    }
                }
                self.queue.backoff(key);
            }
        }
    }

    /// Names `node` on the claims of `pod` that wait for their first
    /// consumer (the VolumeBinding plugin's pre-bind), so their volumes are
    /// provisioned where the pod runs.
    async fn select_claims_node(&self, pod: &Pod, node: &str) -> Result<(), kube::Error> {
        let delayed = crate::volumes::VolumeNeeds::of(pod, &self.cache().storage).delayed;
        for (ns, name) in delayed {
            let api: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), &ns);
            let patch = json!({"metadata": {"annotations": {
                wasmkube_api::storage::SELECTED_NODE: node}}});
            api.patch(&name, &PatchParams::default(), &Patch::Merge(patch))
                .await?;
        }
        Ok(())
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
                if let Some(seen) = self.relist_pods.lock().expect("relist lock").as_mut() {
                    seen.insert(key.clone());
                }
                if self.needs_scheduling(pod) {
                    self.queue.add(key, priority(pod));
                    return;
                }
                self.queue.forget(&key);
                let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
                let mut cache = self.cache();
                match node {
                    Some(node) if !node.is_empty() && !is_terminal(pod) => {
                        let was_assumed = cache.is_assumed(&key);
                        // Share the reflector's copy (it has applied this event).
                        let shared_pod = self
                            .pods
                            .get(&ObjectRef::from(pod))
                            .unwrap_or_else(|| Arc::new(pod.clone()));
                        cache.add_pod(&key, &node, shared_pod, false);
                        drop(cache);
                        // A new pod may satisfy another's affinity.
                        if !was_assumed {
                            self.queue.cluster_changed();
                        }
                    }
                    _ => {
                        // Finished (or never ours): its node's resources are free.
                        if cache.remove_pod(&key) {
                            drop(cache);
                            self.queue.cluster_changed();
                        }
                    }
                }
            }
            watcher::Event::Delete(pod) => {
                let key = key_of(pod);
                self.queue.forget(&key);
                if self.cache().remove_pod(&key) {
                    self.queue.cluster_changed();
                }
            }
            watcher::Event::Init => {
                *self.relist_pods.lock().expect("relist lock") = Some(HashSet::new());
            }
            watcher::Event::InitDone => {
                if let Some(seen) = self.relist_pods.lock().expect("relist lock").take() {
                    self.cache().retain_pods(&seen);
                }
                self.queue.cluster_changed();
            }
        }
    }

    fn on_node(&self, event: &watcher::Event<Node>) {
        match event {
            watcher::Event::Apply(node) | watcher::Event::InitApply(node) => {
                if let Some(seen) = self.relist_nodes.lock().expect("relist lock").as_mut() {
                    seen.insert(node.metadata.name.clone().unwrap_or_default());
                }
                self.cache().upsert_node(node);
            }
            watcher::Event::Delete(node) => {
                self.cache()
                    .remove_node(node.metadata.name.as_deref().unwrap_or_default());
            }
            watcher::Event::Init => {
                *self.relist_nodes.lock().expect("relist lock") = Some(HashSet::new());
                return;
            }
            watcher::Event::InitDone => {
                if let Some(seen) = self.relist_nodes.lock().expect("relist lock").take() {
                    self.cache().retain_nodes(&seen);
                }
            }
        }
        self.queue.cluster_changed();
    }
}

/// Follows one kind into the cache: `set` for each object applied, `remove`
/// for each deleted; either may make a waiting pod schedulable.
async fn follow<K>(
    shared: Arc<Shared>,
    what: &'static str,
    set: impl Fn(&mut Cache, K),
    remove: impl Fn(&mut Cache, &K),
) -> Error
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + k8s_openapi::serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + 'static,
{
    let stream = watcher(
        Api::<K>::all(shared.client.clone()),
        watcher::Config::default(),
    )
    .default_backoff();
    let mut s = std::pin::pin!(stream);
    while let Some(event) = s.next().await {
        match event {
            Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => {
                set(&mut shared.cache(), o);
                shared.queue.cluster_changed();
            }
            Ok(watcher::Event::Delete(o)) => {
                remove(&mut shared.cache(), &o);
                shared.queue.cluster_changed();
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, what, "watch error; retrying"),
        }
    }
    Error::WatchEnded { what }
}

/// Runs the scheduler until a watch ends for good.
pub async fn run(client: kube::Client, config: Config) -> Result<(), Error> {
    let (pods, pod_writer) = reflector::store();
    let shared = Arc::new(Shared {
        queue: Queue::new(config.queue.clone()),
        client: client.clone(),
        config,
        pods,
        cache: Mutex::default(),
        bindings: Arc::new(Semaphore::new(MAX_IN_FLIGHT_BINDINGS)),
        events: Arc::new(Semaphore::new(MAX_IN_FLIGHT_EVENTS)),
        relist_pods: Mutex::default(),
        relist_nodes: Mutex::default(),
    });
    let pod_stream = reflector::reflector(
        pod_writer,
        watcher(Api::<Pod>::all(client.clone()), watcher::Config::default()),
    )
    .default_backoff();
    let node_stream =
        watcher(Api::<Node>::all(client.clone()), watcher::Config::default()).default_backoff();
    let (nodes_synced_tx, nodes_synced) = tokio::sync::watch::channel(false);
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
                    Ok(e) => {
                        shared.on_node(&e);
                        if matches!(e, watcher::Event::InitDone) {
                            nodes_synced_tx.send_replace(true);
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "node watch error; retrying"),
                }
            }
            Error::WatchEnded { what: "node" }
        }
    };
    let namespaces_task = {
        let shared = shared.clone();
        let stream = watcher(
            Api::<Namespace>::all(client.clone()),
            watcher::Config::default(),
        )
        .default_backoff()
        .touched_objects();
        async move {
            let mut s = std::pin::pin!(stream);
            while let Some(event) = s.next().await {
                match event {
                    Ok(ns) => {
                        let name = ns.metadata.name.clone().unwrap_or_default();
                        let labels = ns.metadata.labels.clone().unwrap_or_default();
                        shared.cache().set_namespace(name, labels);
                    }
                    Err(e) => tracing::warn!(error = %e, "namespace watch error; retrying"),
                }
            }
            Error::WatchEnded { what: "namespace" }
        }
    };
    let runtime_classes_task = {
        let shared = shared.clone();
        let stream =
            watcher(Api::<RuntimeClass>::all(client), watcher::Config::default()).default_backoff();
        async move {
            let mut s = std::pin::pin!(stream);
            while let Some(event) = s.next().await {
                match event {
                    Ok(watcher::Event::Apply(rc) | watcher::Event::InitApply(rc)) => {
                        let name = rc.metadata.name.clone().unwrap_or_default();
                        shared.cache().set_runtime_class(name, rc.handler.clone());
                        shared.queue.cluster_changed();
                    }
                    Ok(watcher::Event::Delete(rc)) => {
                        shared
                            .cache()
                            .remove_runtime_class(rc.metadata.name.as_deref().unwrap_or_default());
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "runtime class watch error; retrying"),
                }
            }
            Error::WatchEnded {
                what: "runtime class",
            }
        }
    };
    let claims_task = follow(
        shared.clone(),
        "claim",
        |c: &mut Cache, o: PersistentVolumeClaim| c.storage.set_claim(o),
        |c: &mut Cache, o: &PersistentVolumeClaim| c.storage.remove_claim(o),
    );
    let volumes_task = follow(
        shared.clone(),
        "volume",
        |c: &mut Cache, o: PersistentVolume| c.storage.set_volume(o),
        |c: &mut Cache, o: &PersistentVolume| c.storage.remove_volume(o),
    );
    let classes_task = follow(
        shared.clone(),
        "storage class",
        |c: &mut Cache, o: StorageClass| c.storage.set_class(o),
        |c: &mut Cache, o: &StorageClass| c.storage.remove_class(o),
    );
    let schedule_loop = {
        let shared = shared.clone();
        async move {
            // Decide nothing before both caches hold the whole cluster.
            let _ = shared.pods.wait_until_ready().await;
            let mut synced = nodes_synced;
            let _ = synced.wait_for(|s| *s).await;
            tracing::info!("scheduler caches synced");
            loop {
                let key = shared.queue.pop().await;
                shared.schedule(key).await;
                let (active, backoff, unschedulable) = shared.queue.sizes();
                crate::metrics::pending(active, backoff, unschedulable);
            }
        }
    };
    tokio::select! {
        e = pods_task => Err(e),
        e = nodes_task => Err(e),
        e = namespaces_task => Err(e),
        e = runtime_classes_task => Err(e),
        e = claims_task => Err(e),
        e = volumes_task => Err(e),
        e = classes_task => Err(e),
        () = schedule_loop => Ok(()),
    }
}
