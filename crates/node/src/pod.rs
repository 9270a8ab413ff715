//! One worker per pod: the lifecycle state machine.
//!
//! ```text
//!  new ─▶ volumes ─▶ init containers, in order ─▶ containers, together ─▶ done
//!                         │  each: pull ─▶ configure ─▶ start ─▶ run ─▶ exit
//!                         │        └── restartPolicy: restart after back-off
//!  deletionTimestamp / activeDeadlineSeconds ─▶ stop (grace, then kill)
//!  deletion ─▶ final status ─▶ confirm the delete ─▶ remove the pod's files
//! ```
//!
//! Every state change updates the pod's [`PodState`]; a status writer turns
//! the latest state into the pod's `status` and patches it when it changed.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::{Container, Pod, PodSpec, Secret};
use k8s_openapi::api::node::v1::RuntimeClass;
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use serde_json::{Value, json};
use tokio::sync::{Notify, watch};
use wasmkube_oci::{Credentials, Progress, PullPolicy};
use wasmkube_runtime::{ContainerConfig, Image, PodNetns, Runtime, Usage};
use wasmkube_runtime_linux::net::{Netns, Sandbox, listen_in};

use crate::events::{self, Kind};
use crate::spec::{self, Volume};
use crate::status::{self, ContainerStatus, Forced, State, Terminated};
use crate::{Ctx, logs, ports, probe};

/// The first retry of a pod's volume setup (it doubles up to the crash-loop
/// back-off's maximum).
const MOUNT_RETRY_INITIAL: Duration = Duration::from_millis(200);

/// How long an image pull failure shows as `ErrImagePull` before the
/// back-off (`ImagePullBackOff`).
const ERR_IMAGE_PULL_HOLD: Duration = Duration::from_secs(2);

/// What the agent keeps per pod for the endpoint (logs, usage).
#[derive(Debug)]
pub(crate) struct Handle {
    pub namespace: String,
    pub name: String,
    tx: watch::Sender<Option<Arc<Pod>>>,
    pub state: Arc<Mutex<PodState>>,
}

impl Handle {
    /// The pod as last seen.
    pub fn pod(&self) -> Option<Arc<Pod>> {
        self.tx.borrow().clone()
    }

    /// The pod's labels as last seen.
    pub fn labels(&self) -> std::collections::BTreeMap<String, String> {
        self.tx
            .borrow()
            .as_ref()
            .and_then(|p| p.metadata.labels.clone())
            .unwrap_or_default()
    }
}

/// A container's run-time facts the endpoint reads.
#[derive(Debug, Clone)]
pub(crate) struct Run {
    pub restart_count: i32,
    /// The log of the current run, while it is written.
    pub live_log: Option<watch::Receiver<u64>>,
    pub usage: Arc<Usage>,
    pub running: bool,
    /// When this run started (for its average CPU rate).
    pub started: Instant,
    /// Runs commands in the container (`kubectl exec`, exec probes); `None`
    /// for Wasm guests.
    pub exec: Option<Arc<dyn wasmkube_runtime::Exec>>,
    /// The write end of the run's stdin (`stdin: true`), for `kubectl
    /// attach -i`.
    pub stdin: Option<Arc<crate::attach::Stdin>>,
    /// Resizes the run's terminal (`tty: true`).
    pub terminal: Option<wasmkube_runtime::Resize>,
    /// Its recent usage, sampled while it runs.
    pub history: crate::history::Shared,
}

/// How `kubectl attach -t` resizes a run's terminal: the agent sets the
/// size, then the runtime tells the container (runc passes `SIGWINCH` on; a
/// Wasm guest has no signal to hear it by).
fn resize(
    terminal: &Arc<crate::terminal::Terminal>,
    tell: Option<wasmkube_runtime::Resize>,
) -> wasmkube_runtime::Resize {
    let terminal = terminal.clone();
    wasmkube_runtime::Resize(Arc::new(move |cols, rows| {
        terminal.set_size(cols, rows);
        if let Some(tell) = &tell {
            (tell.0)(cols, rows);
        }
    }))
}

/// What a registry's yes is remembered by: the pod's namespace, its
/// service account and the image.
fn verified_key(pod: &Pod, image: &Image) -> (String, String, String) {
    (
        crate::spec::pod_ns(pod).to_owned(),
        crate::spec::service_account(pod),
        image.id.clone(),
    )
}

/// How long the registry may take to say whether a pod may use an image on
/// the node.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a registry's yes to a namespace's service account for an image
/// on the node holds (the registry token it was asked with lasts as long).
const VERIFIED_FOR: Duration = Duration::from_secs(600);

/// Everything the worker knows about its pod.
#[derive(Debug)]
pub(crate) struct PodState {
    pub dir: PathBuf,
    pub containers: Vec<ContainerStatus>,
    pub runs: HashMap<String, Run>,
    forced: Option<Forced>,
    sandbox_ready: bool,
    /// The pod's own network, when the node gives pods one.
    sandbox: Option<Sandbox>,
    /// Setting up its network failed at least once (it is being retried).
    sandbox_failed: bool,
    /// Without one: the node ports its Wasm containers' ports are served at.
    pub(crate) node_ports: Vec<ports::Mapping>,
}

impl PodState {
    /// Where the pod's `port` is reached from the node: its own IP, the node
    /// port one of its Wasm containers serves that port at, or the node's
    /// `address` when it shares the node's network.
    pub(crate) fn reach(&self, address: std::net::IpAddr, port: u16) -> std::net::SocketAddr {
        if let Some(sb) = &self.sandbox {
            return std::net::SocketAddr::new(sb.ip, port);
        }
        let port = self
            .node_ports
            .iter()
            .find(|m| m.container_port == port)
            .map_or(port, |m| m.node_port);
        std::net::SocketAddr::new(address, port)
    }

    fn container(&mut self, name: &str) -> &mut ContainerStatus {
        self.containers
            .iter_mut()
            .find(|c| c.name == name)
            .expect("a container of this pod")
    }
}

/// A pod change from the watch.
pub(crate) fn update(ctx: &Arc<Ctx>, pod: Pod) {
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let mut pods = ctx.pods.lock().expect("pods lock");
    if let Some(h) = pods.get(&uid) {
        h.tx.send_replace(Some(Arc::new(pod)));
        return;
    }
    if ctx.gone.lock().expect("gone lock").contains(&uid) {
        tracing::debug!(%uid, "an event for a pod that is gone; ignored");
        return;
    }
    let containers = spec::all_containers(&pod)
        .map(|c| {
            let init = pod
                .spec
                .as_ref()
                .and_then(|s| s.init_containers.as_ref())
                .is_some_and(|ics| ics.iter().any(|i| i.name == c.name));
            let mut s = ContainerStatus::new(&c.name, c.image.as_deref().unwrap_or_default(), init);
            // Restart counts survive an agent restart.
            if let Some(prev) = previous_status(&pod, &c.name) {
                s.restart_count = prev.restart_count;
            }
            s
        })
        .collect();
    let state = Arc::new(Mutex::new(PodState {
        dir: ctx.pods_dir().join(&uid),
        containers,
        runs: HashMap::new(),
        forced: None,
        sandbox_ready: false,
        sandbox: None,
        sandbox_failed: false,
        node_ports: Vec::new(),
    }));
    let pod = Arc::new(pod);
    let (tx, rx) = watch::channel(Some(pod.clone()));
    pods.insert(
        uid.clone(),
        Handle {
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            name: pod.metadata.name.clone().unwrap_or_default(),
            tx,
            state: state.clone(),
        },
    );
    drop(pods);
    let worker = Worker {
        ctx: ctx.clone(),
        uid,
        pod: rx,
        state,
        changed: Arc::new(Notify::new()),
    };
    tokio::spawn(worker.run());
}

/// Uids of pods that are gone, kept for [`Tombstones::KEEP`]: long enough for
/// any event sent before a deletion to have arrived after it.
#[derive(Debug, Default)]
pub(crate) struct Tombstones {
    uids: HashMap<String, Instant>,
}

impl Tombstones {
    const KEEP: Duration = Duration::from_secs(600);

    pub(crate) fn insert(&mut self, uid: String) {
        let now = Instant::now();
        self.uids
            .retain(|_, at| now.saturating_duration_since(*at) < Self::KEEP);
        self.uids.insert(uid, now);
    }

    pub(crate) fn contains(&self, uid: &str) -> bool {
        self.uids
            .get(uid)
            .is_some_and(|at| at.elapsed() < Self::KEEP)
    }
}

/// The node's id ranges for pods in user namespaces (`hostUsers: false`):
/// 65,536 ids each, as the kubelet gives, from 2^29 up to 2^31 (above the
/// ranges `/etc/subuid` usually hands out), one per pod, never shared by
/// two pods at once.
#[derive(Debug, Default)]
pub(crate) struct UserRanges {
    by_pod: HashMap<String, u32>,
}

impl UserRanges {
    const SIZE: u32 = 65_536;
    const FIRST: u32 = 8_192;
    const END: u32 = 32_768;

    /// The pod's range, given on its first ask (`None` when all are taken).
    pub(crate) fn of(&mut self, uid: &str) -> Option<wasmkube_runtime::IdRange> {
        let index = match self.by_pod.get(uid) {
            Some(i) => *i,
            None => {
                use std::hash::{Hash, Hasher};
                let mut h = std::collections::hash_map::DefaultHasher::new();
                uid.hash(&mut h);
                let slots = Self::END - Self::FIRST;
                let start = (h.finish() % u64::from(slots)) as u32;
                let taken: std::collections::HashSet<u32> = self.by_pod.values().copied().collect();
                let i = (0..slots)
                    .map(|k| Self::FIRST + (start + k) % slots)
                    .find(|i| !taken.contains(i))?;
                self.by_pod.insert(uid.to_owned(), i);
                i
            }
        };
        Some(wasmkube_runtime::IdRange {
            host_id: index * Self::SIZE,
            size: Self::SIZE,
        })
    }

    pub(crate) fn release(&mut self, uid: &str) {
        self.by_pod.remove(uid);
    }
}

/// The pod is gone from the API (force-deleted, or deleted while the watch
/// was down): stop at once.
pub(crate) fn gone(ctx: &Ctx, pod: &Pod) {
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    if let Some(h) = ctx.pods.lock().expect("pods lock").get(&uid) {
        h.tx.send_replace(None);
    }
}

/// Pods whose uid is not in `seen` are gone (a relist after the watch was
/// down does not report deletions).
pub(crate) fn gone_unless(ctx: &Ctx, seen: &std::collections::HashSet<String>) {
    for (uid, h) in ctx.pods.lock().expect("pods lock").iter() {
        if !seen.contains(uid) {
            h.tx.send_replace(None);
        }
    }
}

/// Removes what pods this agent no longer has left on disk (after a crash
/// or while the agent was down): called once the first list of the node's
/// pods is in, with the uids it holds. A pod that still exists keeps its
/// logs; its worker rebuilds its volumes.
pub(crate) fn reap_orphans(ctx: &Ctx, existing: &std::collections::HashSet<String>) {
    let Ok(entries) = std::fs::read_dir(ctx.pods_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let uid = e.file_name().to_string_lossy().into_owned();
        if existing.contains(&uid) {
            continue;
        }
        match std::fs::remove_dir_all(e.path()) {
            Ok(()) => tracing::info!(uid, "removed the files of a pod that is gone"),
            Err(err) => tracing::warn!(uid, error = %err, "could not remove a gone pod's files"),
        }
    }
}

fn previous_status<'a>(
    pod: &'a Pod,
    name: &str,
) -> Option<&'a k8s_openapi::api::core::v1::ContainerStatus> {
    let s = pod.status.as_ref()?;
    s.container_statuses
        .iter()
        .flatten()
        .chain(s.init_container_statuses.iter().flatten())
        .find(|c| c.name == name)
}

fn pod_key(pod: &Pod) -> String {
    format!(
        "{}_{}({})",
        pod.metadata.name.as_deref().unwrap_or_default(),
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        pod.metadata.uid.as_deref().unwrap_or_default()
    )
}

/// When containers must stop: `None` while the pod runs; the instant their
/// grace period ends once it is being deleted or past its deadline.
type Stop = Option<Instant>;

struct Worker {
    ctx: Arc<Ctx>,
    uid: String,
    pod: watch::Receiver<Option<Arc<Pod>>>,
    state: Arc<Mutex<PodState>>,
    changed: Arc<Notify>,
}

/// What a container's runs came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Succeeded,
    Failed,
    Stopped,
}

impl Worker {
    fn latest(&self) -> Option<Arc<Pod>> {
        self.pod.borrow().clone()
    }

    async fn run(mut self) {
        let Some(pod) = self.latest() else { return };
        let terminal = matches!(
            pod.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        );
        // First seen while being deleted (after an agent restart, say):
        // nothing is started for it; its deletion is confirmed at once.
        let deleted_before_start = pod.metadata.deletion_timestamp.is_some();
        let start_time = pod
            .status
            .as_ref()
            .and_then(|s| s.start_time.as_ref())
            .map(status::from_k8s)
            .unwrap_or_else(Utc::now);
        // The kubelet's admission: a pod this node cannot run as asked is
        // failed before anything of it runs.
        let rejected = !terminal && !deleted_before_start && {
            match crate::apparmor::admit(&pod, crate::apparmor::Host::now) {
                Ok(()) => false,
                Err(message) => {
                    let reason = crate::apparmor::REASON;
                    tracing::warn!(uid = %self.uid, reason, message, "pod rejected");
                    events::record(
                        &self.ctx.client,
                        &self.ctx.config.name,
                        &pod,
                        None,
                        Kind::Warning,
                        reason,
                        message.clone(),
                    );
                    self.state.lock().expect("pod state").forced = Some(Forced {
                        phase: "Failed",
                        reason: reason.into(),
                        message: format!("Pod was rejected: {message}"),
                    });
                    true
                }
            }
        };
        let (stop_tx, stop_rx) = watch::channel::<Stop>(None);
        let writer = tokio::spawn(status_writer(
            self.ctx.clone(),
            self.pod.clone(),
            self.state.clone(),
            self.changed.clone(),
            start_time,
            terminal,
        ));
        let run = Arc::new(PodRun {
            ctx: self.ctx.clone(),
            pod: self.pod.clone(),
            last: Mutex::new(Seen {
                pod: pod.clone(),
                with_ip: pod.clone(),
            }),
            state: self.state.clone(),
            changed: self.changed.clone(),
            stop: stop_rx,
        });
        let mut lifecycle = tokio::spawn({
            let run = run.clone();
            async move {
                if terminal || deleted_before_start || rejected {
                    // Finished before an agent restart, being deleted
                    // already, or refused here: nothing runs (again).
                    return;
                }
                run.lifecycle().await;
            }
        });
        let deadline = pod
            .spec
            .as_ref()
            .and_then(|s| s.active_deadline_seconds)
            .map(|s| {
                let elapsed = (Utc::now() - start_time).to_std().unwrap_or_default();
                Instant::now() + Duration::from_secs(s.max(0) as u64).saturating_sub(elapsed)
            });
        let mut finished = false;
        let mut deleting = false;
        loop {
            let deadline_sleep = async {
                match deadline {
                    Some(d) if !deleting && !finished => tokio::time::sleep_until(d.into()).await,
                    _ => std::future::pending().await,
                }
            };
            tokio::select! {
                r = &mut lifecycle, if !finished => {
                    if let Err(e) = r {
                        tracing::error!(uid = %self.uid, error = %e, "pod lifecycle task failed");
                    }
                    finished = true;
                    self.changed.notify_one();
                    if deleting { break; }
                }
                () = deadline_sleep => {
                    let pod = self.latest();
                    if let Some(pod) = &pod {
                        let message = "Pod was active on the node longer than the specified deadline".to_owned();
                        events::record(&self.ctx.client, &self.ctx.config.name, pod, None, Kind::Warning, "DeadlineExceeded", message.clone());
                        self.state.lock().expect("pod state").forced = Some(Forced { phase: "Failed", reason: "DeadlineExceeded".into(), message });
                        stop_tx.send_replace(Some(Instant::now() + grace(pod)));
                    }
                    self.changed.notify_one();
                    // Stop only; the pod stays until it is deleted.
                    if finished { continue; }
                    let _ = (&mut lifecycle).await;
                    finished = true;
                    self.changed.notify_one();
                }
                changed = self.pod.changed() => {
                    let current = self.pod.borrow_and_update().clone();
                    match current {
                        None => {
                            // Gone from the API: stop now.
                            stop_tx.send_replace(Some(Instant::now()));
                            if !finished { let _ = (&mut lifecycle).await; }
                            writer.abort();
                            self.cleanup().await;
                            self.forget();
                            return;
                        }
                        Some(pod) if pod.metadata.deletion_timestamp.is_some() && !deleting => {
                            deleting = true;
                            let grace = pod
                                .metadata
                                .deletion_grace_period_seconds
                                .map(|s| Duration::from_secs(s.max(0) as u64))
                                .unwrap_or_else(|| grace(&pod));
                            if stop_tx.borrow().is_none_or(|t| Instant::now() + grace < t) {
                                stop_tx.send_replace(Some(Instant::now() + grace));
                            }
                            if finished { break; }
                        }
                        Some(_) => self.changed.notify_one(),
                    }
                    if changed.is_err() { break; }
                }
            }
        }
        // Deleting: every container has stopped; report it, then confirm.
        self.changed.notify_one();
        let final_status = if terminal {
            None
        } else {
            self.final_status(start_time)
        };
        writer.abort();
        // Everything the pod had goes before its deletion is confirmed.
        self.cleanup().await;
        if let (Some(pod), Some(status)) = (self.latest(), final_status) {
            let api: Api<Pod> = Api::namespaced(
                self.ctx.client.clone(),
                pod.metadata.namespace.as_deref().unwrap_or_default(),
            );
            let name = pod.metadata.name.clone().unwrap_or_default();
            let _ = api
                .patch_status(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"status": status})),
                )
                .await;
            let params = DeleteParams {
                grace_period_seconds: Some(0),
                preconditions: Some(Preconditions {
                    uid: Some(self.uid.clone()),
                    resource_version: None,
                }),
                ..Default::default()
            };
            if let Err(e) = api.delete(&name, &params).await
                && !matches!(&e, kube::Error::Api(s) if s.code == 404 || s.code == 409)
            {
                tracing::warn!(pod = %name, error = %e, "could not confirm the pod's deletion");
            }
        }
        // Only now: an event for the pod before its deletion was confirmed
        // (the final status) must not start it again.
        self.forget();
    }

    fn final_status(&self, start_time: DateTime<Utc>) -> Option<Value> {
        let pod = self.latest()?;
        let st = self.state.lock().expect("pod state");
        Some(status::build(
            &pod,
            &st.containers,
            st.forced.as_ref(),
            &start_time,
            &status::Network {
                host_ip: &self.ctx.config.address.to_string(),
                pod_ip: st.sandbox.as_ref().map(|s| s.ip),
                node_ports: &st.node_ports,
                sandbox_ready: false,
                own_network: own_network(&self.ctx, &pod),
            },
        ))
    }

    async fn cleanup(&self) {
        let (dir, node_ports) = {
            let mut st = self.state.lock().expect("pod state");
            (st.dir.clone(), std::mem::take(&mut st.node_ports))
        };
        {
            let mut held = self.ctx.node_ports.lock().expect("node ports");
            for m in node_ports {
                held.release(m.node_port);
            }
        }
        // Also when this worker made none: an agent that crashed left it.
        if let Some(network) = self.ctx.network.get() {
            network.teardown(&self.uid).await;
        }
        if let Err(e) = tokio::fs::remove_dir_all(&dir).await
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %dir.display(), error = %e, "could not remove the pod's files");
        }
    }

    /// The worker is done and its pod gone: a later event for the pod
    /// (sent before its deletion) is ignored.
    fn forget(&self) {
        self.ctx
            .user_ranges
            .lock()
            .expect("user ranges lock")
            .release(&self.uid);
        let mut pods = self.ctx.pods.lock().expect("pods lock");
        self.ctx
            .gone
            .lock()
            .expect("gone lock")
            .insert(self.uid.clone());
        pods.remove(&self.uid);
    }
}

/// The pod's grace period: `terminationGracePeriodSeconds`, default 30 s.
fn grace(pod: &Pod) -> Duration {
    let s = pod
        .spec
        .as_ref()
        .and_then(|s| s.termination_grace_period_seconds)
        .unwrap_or(30);
    Duration::from_secs(s.max(0) as u64)
}

/// Conditions keep their transition times from what the status writer
/// last wrote, not from the pod as watched: a watch event may carry an
/// older write of ours, and judging by it would flip the times back and
/// forth, one patch per event, for ever (at thousands of pods, thousands of
/// patches a second).
fn keep_written_conditions(pod: &mut Pod, written: Option<&Value>) {
    if let Some(conditions) =
        written.and_then(|w| serde_json::from_value(w["conditions"].clone()).ok())
    {
        pod.status.get_or_insert_default().conditions = Some(conditions);
    }
}

/// Writes the pod's status whenever its state changed, one write at a time,
/// skipping writes that would change nothing.
async fn status_writer(
    ctx: Arc<Ctx>,
    pod_rx: watch::Receiver<Option<Arc<Pod>>>,
    state: Arc<Mutex<PodState>>,
    changed: Arc<Notify>,
    start_time: DateTime<Utc>,
    terminal: bool,
) {
    let mut last: Option<Value> = None;
    loop {
        // A copy for this write only (none is held while waiting), boxed:
        // the writer's task keeps a pointer's room for it, not a pod's.
        let Some(mut pod) = pod_rx.borrow().as_deref().cloned().map(Box::new) else {
            return;
        };
        keep_written_conditions(&mut pod, last.as_ref());
        // A pod whose own network is being set up (milliseconds) has nothing
        // new to report yet: its first write waits for its IP, which is one
        // write less on the path of a pod's start.
        let first_awaits_network = !terminal && last.is_none() && own_network(&ctx, &pod) && {
            let st = state.lock().expect("pod state");
            st.sandbox.is_none() && !st.sandbox_failed && st.forced.is_none()
        };
        if first_awaits_network {
            drop(pod);
            changed.notified().await;
            continue;
        }
        let status = if terminal {
            None
        } else {
            let st = state.lock().expect("pod state");
            Some(status::build(
                &pod,
                &st.containers,
                st.forced.as_ref(),
                &start_time,
                &status::Network {
                    host_ip: &ctx.config.address.to_string(),
                    pod_ip: st.sandbox.as_ref().map(|s| s.ip),
                    node_ports: &st.node_ports,
                    sandbox_ready: st.sandbox_ready,
                    own_network: own_network(&ctx, &pod),
                },
            ))
        };
        if let Some(status) = status
            && last.as_ref() != Some(&status)
        {
            let api: Api<Pod> = Api::namespaced(
                ctx.client.clone(),
                pod.metadata.namespace.as_deref().unwrap_or_default(),
            );
            let name = pod.metadata.name.clone().unwrap_or_default();
            // Boxed: the writer waits far longer than it writes.
            let (params, patch) = (
                PatchParams::default(),
                Patch::Merge(json!({"status": status})),
            );
            match Box::pin(api.patch_status(&name, &params, &patch)).await {
                Ok(_) => last = Some(status),
                Err(kube::Error::Api(e)) if e.code == 404 => return,
                Err(e) => {
                    tracing::warn!(pod = %name, error = %e, "could not report pod status; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            }
        }
        drop(pod);
        changed.notified().await;
    }
}

/// A pod while its containers run.
struct PodRun {
    ctx: Arc<Ctx>,
    pod: watch::Receiver<Option<Arc<Pod>>>,
    /// The pod as last seen: what the containers go on with while they are
    /// stopped after it is gone from the API.
    last: Mutex<Seen>,
    state: Arc<Mutex<PodState>>,
    changed: Arc<Notify>,
    stop: watch::Receiver<Stop>,
}

/// The pod as last seen, and the same with its IP: the copy every task of a
/// running pod shares, made again only when either changes.
struct Seen {
    pod: Arc<Pod>,
    with_ip: Arc<Pod>,
}

impl Seen {
    /// The pod with its IP, after `current` (the API's latest, unless it is
    /// gone) and the sandbox's `ip` (once it has one).
    fn update(&mut self, current: Option<Arc<Pod>>, ip: Option<String>) -> Arc<Pod> {
        if let Some(p) = current
            && !Arc::ptr_eq(&p, &self.pod)
        {
            self.with_ip = p.clone();
            self.pod = p;
        }
        let pod_ip = self.with_ip.status.as_ref().and_then(|s| s.pod_ip.as_ref());
        if ip.is_some() && pod_ip != ip.as_ref() {
            let mut pod = (*self.pod).clone();
            pod.status.get_or_insert_with(Default::default).pod_ip = ip;
            self.with_ip = Arc::new(pod);
        }
        self.with_ip.clone()
    }
}

impl PodRun {
    /// The pod as last seen, with its IP once it has one (for the
    /// downward API).
    fn pod(&self) -> Arc<Pod> {
        let current = self.pod.borrow().clone();
        let ip =
            (self.state.lock().expect("pod state").sandbox.as_ref()).map(|sb| sb.ip.to_string());
        self.last.lock().expect("last pod").update(current, ip)
    }

    /// The container waits with `reason` (its state says so) for `delay`;
    /// true when the pod stopped meanwhile.
    async fn hold(&self, name: &str, reason: &str, message: String, delay: Duration) -> bool {
        self.set(|s| {
            s.container(name).state = State::Waiting {
                reason: reason.into(),
                message: Some(message),
            }
        });
        self.wait_or_stop(delay).await
    }

    /// The pod's IP: its own, or the node's when it shares the node's
    /// network.
    fn ip(&self) -> std::net::IpAddr {
        self.state
            .lock()
            .expect("pod state")
            .sandbox
            .as_ref()
            .map_or(self.ctx.config.address, |s| s.ip)
    }

    /// Whether the pod shares the node's network because the node gives
    /// pods none (not because it asked for `hostNetwork`).
    fn shares_node_network(&self, pod: &Pod) -> bool {
        self.ctx.network.get().is_none()
            && pod.spec.as_ref().and_then(|s| s.host_network) != Some(true)
    }

    /// Listeners at node ports for the container's `ports`, in order: the
    /// ports the pod already holds (a restart), else new ones (its
    /// `hostPort` when given).
    fn node_port_listeners(
        &self,
        name: &str,
        c: &Container,
        ports: &[u16],
    ) -> std::io::Result<Vec<std::net::TcpListener>> {
        let address = self.ctx.config.address;
        let held = self.state.lock().expect("pod state").node_ports.clone();
        let mut listeners = Vec::new();
        let mut taken = Vec::new();
        let mut node_ports = self.ctx.node_ports.lock().expect("node ports");
        for &port in ports {
            let mapping = held
                .iter()
                .find(|m| m.container == name && m.container_port == port);
            let opened = match mapping {
                Some(m) => node_ports.reopen(address, m.node_port),
                None => {
                    let host_port = c
                        .ports
                        .iter()
                        .flatten()
                        .find(|p| p.container_port == i32::from(port))
                        .and_then(|p| p.host_port)
                        .and_then(|p| u16::try_from(p).ok())
                        .filter(|p| *p > 0);
                    node_ports.take(address, host_port).map(|(node_port, l)| {
                        taken.push(ports::Mapping {
                            container: name.to_owned(),
                            container_port: port,
                            node_port,
                        });
                        l
                    })
                }
            };
            match opened {
                Ok(l) => listeners.push(l),
                Err(e) => {
                    for m in &taken {
                        node_ports.release(m.node_port);
                    }
                    return Err(e);
                }
            }
        }
        drop(node_ports);
        if !taken.is_empty() {
            self.set(|s| s.node_ports.extend(taken));
        }
        Ok(listeners)
    }

    /// Gives the pod its network namespace and address, retrying with
    /// back-off (`FailedCreatePodSandBox`) until it works or the pod stops.
    /// Returns false when the pod stopped first.
    async fn sandbox(&self, pod: &Pod) -> bool {
        let Some(network) = self.ctx.network.get() else {
            return true;
        };
        if pod.spec.as_ref().and_then(|s| s.host_network) == Some(true) {
            return true;
        }
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let mut delay = self.ctx.config.backoff.initial;
        loop {
            match network.setup(&uid).await {
                Ok(sb) => {
                    if let Some(gate) = &self.ctx.config.pod_network_gate {
                        gate.admit(pod, sb.ip).await;
                    }
                    self.set(|s| s.sandbox = Some(sb));
                    return true;
                }
                Err(e) => {
                    self.set(|s| s.sandbox_failed = true);
                    self.event(
                        None,
                        Kind::Warning,
                        "FailedCreatePodSandBox",
                        format!("Failed to create pod sandbox: {e}"),
                    );
                    if self.wait_or_stop(delay).await {
                        return false;
                    }
                    delay = (delay * 2).min(self.ctx.config.backoff.max);
                }
            }
        }
    }

    fn set(&self, f: impl FnOnce(&mut PodState)) {
        f(&mut self.state.lock().expect("pod state"));
        self.changed.notify_one();
    }

    fn event(&self, container: Option<&str>, kind: Kind, reason: &str, message: String) {
        events::record(
            &self.ctx.client,
            &self.ctx.config.name,
            &self.pod(),
            container,
            kind,
            reason,
            message,
        );
    }

    /// When the containers must have stopped (now if no stop was asked).
    fn stop_at(&self) -> Instant {
        let at = *self.stop.borrow();
        at.unwrap_or_else(Instant::now)
    }

    fn stopping(&self) -> bool {
        self.stop.borrow().is_some()
    }

    /// Waits `d`, or less when the pod is told to stop; true if it was.
    async fn wait_or_stop(&self, d: Duration) -> bool {
        tokio::select! {
            () = tokio::time::sleep(d) => self.stopping(),
            () = stop_requested(self.stop.clone()) => true,
        }
    }

    async fn lifecycle(self: Arc<Self>) {
        if !Box::pin(self.sandbox(&self.pod())).await {
            return;
        }
        // Gone from the API while its network was being made: the worker
        // cleans up.
        if self.pod.borrow().is_none() {
            return;
        }
        let pod = self.pod();
        let dir = self.state.lock().expect("pod state").dir.clone();
        // A volume's source often lags the pod by milliseconds (a new
        // namespace's service account and kube-root-ca.crt): retry soon
        // at first, as the kubelet's volume manager does, then back off.
        let mut delay = MOUNT_RETRY_INITIAL.min(self.ctx.config.backoff.initial);
        let (volumes, _fresh_tokens) = loop {
            // Boxed: the pod's task holds none of it once it is done.
            match Box::pin(spec::volumes(&self.ctx, &pod, &dir)).await {
                Ok((v, projected)) => {
                    // Kept up to date (tokens replaced before they
                    // expire) for as long as this lifecycle (the pod) runs.
                    let refresher = tokio::spawn(crate::projected::keep_fresh(
                        self.ctx.clone(),
                        pod.clone(),
                        projected,
                    ));
                    break (Arc::new(v), AbortOnDrop(refresher));
                }
                Err(e) => {
                    self.event(
                        None,
                        Kind::Warning,
                        "FailedMount",
                        format!("MountVolume.SetUp failed: {}", e.0),
                    );
                    if self.wait_or_stop(delay).await {
                        return;
                    }
                    delay = (delay * 2).min(self.ctx.config.backoff.max);
                }
            }
        };
        self.set(|s| s.sandbox_ready = true);
        let no_spec = PodSpec::default();
        let spec = pod.spec.as_ref().unwrap_or(&no_spec);
        for c in spec.init_containers.iter().flatten() {
            // Boxed: an init container's run is over before the pod's.
            match Box::pin(
                self.clone()
                    .container(Box::new(c.clone()), true, volumes.clone()),
            )
            .await
            {
                Outcome::Succeeded => {}
                Outcome::Failed | Outcome::Stopped => return,
            }
        }
        let runs = spec.containers.iter().map(|c| {
            let c = Box::new(c.clone());
            tokio::spawn(self.clone().container(c, false, volumes.clone()))
        });
        for r in futures::future::join_all(runs).await {
            if let Err(e) = r {
                tracing::error!(error = %e, "a container task failed");
            }
        }
    }

    /// Runs the container's probes while it runs and keeps its readiness
    /// current; resolves only when a startup or liveness probe failed
    /// `failureThreshold` times in a row, with the reason to restart it.
    /// What a container's probes and hooks reach: the pod's address, the
    /// node ports its ports are served at when it shares the node's, and
    /// its processes when it has them.
    fn probe_target(
        &self,
        container: &str,
        exec: Option<Arc<dyn wasmkube_runtime::Exec>>,
    ) -> probe::Target {
        probe::Target {
            ip: self.ip(),
            node_ports: self
                .state
                .lock()
                .expect("pod state")
                .node_ports
                .iter()
                .filter(|m| m.container == container)
                .map(|m| (m.container_port, m.node_port))
                .collect(),
            exec,
        }
    }

    /// Stops a running container as the kubelet does: its `preStop` hook
    /// (while it still serves), then the stop request, then a kill when the
    /// grace period ends first.
    async fn stop_container(
        &self,
        c: &Container,
        running: &mut Box<dyn wasmkube_runtime::Container>,
        deadline: Instant,
    ) -> wasmkube_runtime::Exit {
        let exec = running.exec();
        let ended = tokio::select! {
            exit = running.wait() => Some(exit),
            () = self.pre_stop(c, exec, deadline) => None,
        };
        if let Some(exit) = ended {
            return exit;
        }
        running.terminate();
        match tokio::time::timeout_at(deadline.into(), running.wait()).await {
            Ok(exit) => exit,
            Err(_) => {
                running.kill();
                let mut exit = running.wait().await;
                let how = exit.message.map(|m| format!(" ({m})")).unwrap_or_default();
                exit.message = Some(format!(
                    "the container did not stop within its grace period and was killed{how}"
                ));
                exit
            }
        }
    }

    /// Runs the container's `preStop` hook, if it has one, until it ends or
    /// the grace period does; a failure is an event, and the stop goes on.
    async fn pre_stop(
        &self,
        c: &Container,
        exec: Option<Arc<dyn wasmkube_runtime::Exec>>,
        deadline: Instant,
    ) {
        let Some(hook) = c.lifecycle.as_ref().and_then(|l| l.pre_stop.as_ref()) else {
            return;
        };
        let target = self.probe_target(&c.name, exec);
        let outcome = tokio::time::timeout_at(deadline.into(), probe::hook(hook, c, &target)).await;
        let failure = match outcome {
            Ok(Ok(())) => return,
            Ok(Err(why)) => why,
            Err(_) => "the grace period ended before the hook did".to_owned(),
        };
        self.event(
            Some(&c.name),
            Kind::Warning,
            "FailedPreStopHook",
            format!("PreStopHook failed: {failure}"),
        );
    }

    async fn probes(
        &self,
        c: &Container,
        init: bool,
        exec: Option<Arc<dyn wasmkube_runtime::Exec>>,
    ) -> String {
        if init {
            return std::future::pending().await;
        }
        let name = c.name.clone();
        let target = self.probe_target(&name, exec);
        let exec = target.exec.is_some();
        let usable = |kind: &str, p: &'_ k8s_openapi::api::core::v1::Probe| match probe::unsupported(
            p, exec,
        ) {
            Some(why) => {
                self.event(
                    Some(&name),
                    Kind::Warning,
                    "ProbeWarning",
                    format!("{kind} probe ignored: {why}"),
                );
                false
            }
            None => true,
        };
        let startup = c.startup_probe.as_ref().filter(|p| usable("Startup", p));
        let liveness = c.liveness_probe.as_ref().filter(|p| usable("Liveness", p));
        let readiness = c
            .readiness_probe
            .as_ref()
            .filter(|p| usable("Readiness", p));
        let set_ready = |ready: bool| {
            let changed = {
                let mut st = self.state.lock().expect("pod state");
                let cs = st.container(&name);
                let changed = cs.ready != ready;
                cs.ready = ready;
                changed
            };
            if changed {
                self.changed.notify_one();
            }
        };
        let unhealthy = |kind: &str, e: &str| {
            self.event(
                Some(&name),
                Kind::Warning,
                "Unhealthy",
                format!("{kind} probe failed: {e}"),
            );
        };
        if let Some(p) = startup {
            let failed = probe::run(p, c, &target, |result, _, failures, t| match result {
                Ok(()) => Some(None),
                Err(e) => {
                    unhealthy("Startup", &e);
                    (failures >= t.failure_threshold).then(|| {
                        Some(format!(
                            "Container {name} failed startup probe, will be restarted"
                        ))
                    })
                }
            })
            .await;
            if let Some(reason) = failed {
                return reason;
            }
        }
        if readiness.is_none() {
            set_ready(true);
        }
        let readiness_loop = async {
            let Some(p) = readiness else {
                return std::future::pending::<String>().await;
            };
            probe::run(p, c, &target, |result, successes, failures, t| {
                match result {
                    Ok(()) if successes >= t.success_threshold => set_ready(true),
                    Ok(()) => {}
                    Err(e) => {
                        unhealthy("Readiness", &e);
                        if failures >= t.failure_threshold {
                            set_ready(false);
                        }
                    }
                }
                None
            })
            .await
        };
        let liveness_loop = async {
            let Some(p) = liveness else {
                return std::future::pending::<String>().await;
            };
            probe::run(p, c, &target, |result, _, failures, t| {
                let e = result.err()?;
                unhealthy("Liveness", &e);
                (failures >= t.failure_threshold)
                    .then(|| format!("Container {name} failed liveness probe, will be restarted"))
            })
            .await
        };
        tokio::select! {
            reason = liveness_loop => reason,
            reason = readiness_loop => reason,
        }
    }

    /// Pulls the container's image as its pull policy says, reporting
    /// progress in events.
    async fn pull(&self, c: &Container) -> Result<(Image, Duration, bool), wasmkube_oci::Error> {
        let pod = self.pod();
        let reference = c.image.clone().unwrap_or_default();
        let policy = PullPolicy::for_container(c.image_pull_policy.as_deref(), &reference);
        // Credentials are looked for only when the registry is asked.
        let credentials = self.pull_credentials(&pod, &reference);
        let started = Instant::now();
        let name = c.name.clone();
        let announced = std::sync::atomic::AtomicBool::new(false);
        let progress = |p: Progress| {
            let Progress::Blob {
                digest,
                size,
                index,
                count,
            } = p;
            if !announced.swap(true, std::sync::atomic::Ordering::Relaxed) {
                self.event(
                    Some(&name),
                    Kind::Normal,
                    "Pulling",
                    format!("Pulling image {reference:?}"),
                );
            }
            if count > 1 {
                self.event(
                    Some(&name),
                    Kind::Normal,
                    "Pulling",
                    format!(
                        "Pulling layer {index}/{count} {} ({})",
                        &digest[..digest.len().min(19)],
                        human_bytes(size)
                    ),
                );
            }
        };
        let (image, pulled) = self
            .ctx
            .images
            .ensure_with(&reference, policy, credentials, &progress)
            .await?;
        if pulled {
            self.ctx.node_changed.notify_one();
        }
        if self.access_is_checked(&reference).await {
            if pulled {
                // The registry let this pod's credentials read it just now.
                let mut verified = self.ctx.verified_images.lock().await;
                verified.retain(|_, at| at.elapsed() < VERIFIED_FOR);
                verified.insert(verified_key(&pod, &image), Instant::now());
            } else {
                self.check_cached_access(&pod, &reference, &image).await?;
            }
        }
        Ok((image, started.elapsed(), pulled))
    }

    /// Whether `reference` is in a namespace's repository of the cluster's
    /// registry: the images whose use on the node is checked.
    async fn access_is_checked(&self, reference: &str) -> bool {
        let Some((registry, rest)) = reference.split_once('/') else {
            return false;
        };
        let repository = rest.split(['@', ':']).next().unwrap_or_default();
        wasmkube_api::images::split(repository).0.is_some()
            && self.ctx.cluster_registry().await == Some(registry)
    }

    /// An image already on the node from a namespace's repository of the
    /// cluster's registry starts only for a pod whose service account may
    /// pull it (as Kubernetes' "ensure secret pulled images"): otherwise a
    /// tenant could run another's image once it is here. The registry is
    /// asked once per namespace, service account and image every
    /// [`VERIFIED_FOR`]. A refusal fails the pull; a registry or API server
    /// that cannot be asked lets the image start (it was pulled with a
    /// right once, and the node keeps running pods while they are away).
    async fn check_cached_access(
        &self,
        pod: &Pod,
        reference: &str,
        image: &Image,
    ) -> Result<(), wasmkube_oci::Error> {
        let key = verified_key(pod, image);
        // Held while the registry is asked: the pods of a new rollout ask
        // once, not each.
        let mut verified = self.ctx.verified_images.lock().await;
        if verified
            .get(&key)
            .is_some_and(|at| at.elapsed() < VERIFIED_FOR)
        {
            return Ok(());
        }
        let Some(credentials) = self.pull_credentials(pod, reference).await else {
            return Ok(());
        };
        let asked = tokio::time::timeout(
            CHECK_TIMEOUT,
            self.ctx.images.check_access(reference, Some(credentials)),
        )
        .await
        .unwrap_or_else(|_| {
            Err(wasmkube_oci::Error::Pull {
                reference: reference.to_owned(),
                reason: format!("no answer within {CHECK_TIMEOUT:?}"),
            })
        });
        match asked {
            Ok(()) => {
                verified.retain(|_, at| at.elapsed() < VERIFIED_FOR);
                verified.insert(key, Instant::now());
                Ok(())
            }
            Err(e @ wasmkube_oci::Error::Denied { .. }) => Err(e),
            Err(e) => {
                tracing::warn!(image = reference, error = %e, "cannot ask the registry whether the pod may use the image here; starting it");
                Ok(())
            }
        }
    }

    /// The runtime for a container: its pod's RuntimeClass handler, else
    /// the one for the image's kind (Wasm for Wasm images, runc for Linux
    /// images).
    async fn runtime_for(&self, pod: &Pod, image: &Image) -> Result<Arc<dyn Runtime>, String> {
        let class = pod.spec.as_ref().and_then(|s| s.runtime_class_name.clone());
        let handler = match class {
            Some(class) => {
                let api: Api<RuntimeClass> = Api::all(self.ctx.client.clone());
                match api.get_opt(&class).await {
                    Ok(Some(rc)) => rc.handler,
                    Ok(None) => return Err(format!("RuntimeClass {class:?} not found")),
                    Err(e) => return Err(format!("reading RuntimeClass {class:?}: {e}")),
                }
            }
            None if image.is_wasm() => wasmkube_runtime_wasm::HANDLER.to_owned(),
            None => wasmkube_runtime_linux::HANDLER.to_owned(),
        };
        self.ctx
            .runtimes
            .iter()
            .find(|r| r.handler() == handler)
            .cloned()
            .ok_or_else(|| {
                if handler == wasmkube_runtime_linux::HANDLER {
                    format!("{} is a Linux image and this node has no runc runtime (runc missing or the agent not root)", image.reference)
                } else {
                    format!("this node has no runtime handler {handler:?}")
                }
            })
    }

    /// Credentials from the pod's `imagePullSecrets` for the image's
    /// registry, else, for the cluster's built-in registry, a token of the
    /// pod's service account.
    async fn pull_credentials(&self, pod: &Pod, reference: &str) -> Option<Credentials> {
        let registry = reference
            .split('/')
            .next()
            .filter(|r| r.contains(['.', ':']) || *r == "localhost")?;
        let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
        let api: Api<Secret> = Api::namespaced(self.ctx.client.clone(), ns);
        for s in pod
            .spec
            .iter()
            .flat_map(|s| s.image_pull_secrets.iter().flatten())
        {
            let Ok(Some(secret)) = api.get_opt(&s.name).await else {
                continue;
            };
            let Some(doc) = secret
                .data
                .as_ref()
                .and_then(|d| d.get(".dockerconfigjson"))
            else {
                continue;
            };
            if let Some(c) = wasmkube_oci::credentials_for(&doc.0, registry) {
                return Some(c);
            }
        }
        if self.ctx.cluster_registry().await != Some(registry) {
            return None;
        }
        match crate::spec::registry_token(&self.ctx, pod).await {
            Ok(token) => Some(Credentials {
                username: "serviceaccount".into(),
                password: token,
            }),
            Err(e) => {
                tracing::warn!(pod = ?pod.metadata.name, error = %e.0, "pulling without the service account's token");
                None
            }
        }
    }

    /// Runs one container through its restarts until it is done for good or
    /// the pod stops.
    async fn container(
        self: Arc<Self>,
        // Boxed: the container's task holds it for its whole run.
        c: Box<Container>,
        init: bool,
        volumes: Arc<HashMap<String, Volume>>,
    ) -> Outcome {
        let pod = self.pod();
        let policy = pod
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.clone())
            .unwrap_or_else(|| "Always".into());
        let name = c.name.clone();
        let reference = c.image.clone().unwrap_or_default();
        let backoff = self.ctx.config.backoff;
        let mut crash_delay: Option<Duration> = None;
        let mut pull_delay = backoff.initial;
        let mut config_delay = backoff.initial;
        loop {
            if self.stopping() {
                return Outcome::Stopped;
            }
            // 1. The image.
            // Boxed, as every large step before the run: a running pod's
            // task holds only what its run needs, not the largest step's
            // state.
            let image = match Box::pin(self.pull(&c)).await {
                Ok((image, took, pulled)) => {
                    pull_delay = backoff.initial;
                    let message = if pulled {
                        format!(
                            "Successfully pulled image {reference:?} in {took:.1?}. Image size: {} bytes.",
                            image.size
                        )
                    } else {
                        format!("Container image {reference:?} already present on machine")
                    };
                    self.event(Some(&name), Kind::Normal, "Pulled", message);
                    image
                }
                Err(e) => {
                    let (reason, message) = match &e {
                        wasmkube_oci::Error::NeverPull(_) => ("ErrImageNeverPull", e.to_string()),
                        _ => ("ErrImagePull", e.to_string()),
                    };
                    self.event(
                        Some(&name),
                        Kind::Warning,
                        "Failed",
                        format!("Failed to pull image {reference:?}: {message}"),
                    );
                    self.event(
                        Some(&name),
                        Kind::Warning,
                        "Failed",
                        format!("Error: {reason}"),
                    );
                    self.set(|s| {
                        s.container(&name).state = State::Waiting {
                            reason: reason.into(),
                            message: Some(message.clone()),
                        }
                    });
                    if self.wait_or_stop(ERR_IMAGE_PULL_HOLD).await {
                        return Outcome::Stopped;
                    }
                    if reason == "ErrImagePull" {
                        self.event(
                            Some(&name),
                            Kind::Normal,
                            "BackOff",
                            format!("Back-off pulling image {reference:?}"),
                        );
                        self.set(|s| {
                            s.container(&name).state = State::Waiting {
                                reason: "ImagePullBackOff".into(),
                                message: Some(format!(
                                    "Back-off pulling image {reference:?}: ErrImagePull: {message}"
                                )),
                            }
                        });
                    }
                    if self.wait_or_stop(pull_delay).await {
                        return Outcome::Stopped;
                    }
                    pull_delay = (pull_delay * 2).min(backoff.max);
                    continue;
                }
            };
            // 2. Its configuration, and the image made ready to start.
            let prepared = match Box::pin(spec::container(&self.ctx, &pod, &c, &volumes)).await {
                Err(e) => Err(("CreateContainerConfigError", e.0)),
                Ok(resolved) => match Box::pin(self.runtime_for(&pod, &image)).await {
                    Err(m) => Err(("CreateContainerError", m)),
                    Ok(runtime) => match runtime.prepare(&image).await {
                        Ok(()) => Ok((resolved, runtime)),
                        Err(e) => Err(("CreateContainerError", e.to_string())),
                    },
                },
            };
            let (resolved, runtime) = match prepared {
                Ok(r) => r,
                Err((reason, message)) => {
                    self.event(
                        Some(&name),
                        Kind::Warning,
                        "Failed",
                        format!("Error: {message}"),
                    );
                    self.set(|s| {
                        s.container(&name).state = State::Waiting {
                            reason: reason.into(),
                            message: Some(message.clone()),
                        }
                    });
                    if self.wait_or_stop(config_delay).await {
                        return Outcome::Stopped;
                    }
                    config_delay = (config_delay * 2).min(backoff.max);
                    continue;
                }
            };
            // 3. Start.
            let (restart, dir) = {
                let st = self.state.lock().expect("pod state");
                let restart = st
                    .containers
                    .iter()
                    .find(|s| s.name == name)
                    .map_or(0, |s| s.restart_count);
                (restart, st.dir.clone())
            };
            let log_path = logs::path(&dir, &name, restart);
            // An in-process Wasm guest writes its log straight into the
            // writer; a process gets pipes.
            let max = self.ctx.config.log_max_bytes;
            let tty = c.tty == Some(true);
            // A terminal's output is logged by the agent (see below), as a
            // Wasm guest's is.
            let opened = if image.is_wasm() || tty {
                logs::open_sinks(&log_path, max)
            } else {
                logs::open(&log_path, max)
            };
            let (stdout, stderr, live) = match opened {
                Ok(x) => x,
                Err(e) => {
                    let message = format!("cannot open the log file: {e}");
                    if self
                        .hold(&name, "CreateContainerError", message, config_delay)
                        .await
                    {
                        return Outcome::Stopped;
                    }
                    continue;
                }
            };
            // A container with `stdin: true` reads a pipe that attaches
            // write to; each run gets its own.
            let (stdin, stdin_end) = if c.stdin == Some(true) {
                match crate::attach::Stdin::open(c.stdin_once == Some(true)) {
                    Ok((stdin, end)) => (Some(stdin), Some(end)),
                    Err(e) => {
                        let message = format!("cannot make the container's stdin: {e}");
                        if self
                            .hold(&name, "CreateContainerError", message, config_delay)
                            .await
                        {
                            return Outcome::Stopped;
                        }
                        continue;
                    }
                }
            } else {
                (None, None)
            };
            // With a terminal, the container's stdio is its slave end; the
            // agent logs its output and types the stdin pipe into it.
            let (terminal, stdin_end, stdout, stderr) = match (tty, stdout) {
                (true, wasmkube_runtime::Output::Sink(log)) => {
                    match crate::terminal::Terminal::open(log, stdin_end) {
                        Ok((terminal, ends)) => (
                            Some(Arc::new(terminal)),
                            Some(ends.stdin),
                            wasmkube_runtime::Output::File(ends.stdout),
                            wasmkube_runtime::Output::File(ends.stderr),
                        ),
                        Err(e) => {
                            let message = format!("cannot make the container's terminal: {e}");
                            if self
                                .hold(&name, "CreateContainerError", message, config_delay)
                                .await
                            {
                                return Outcome::Stopped;
                            }
                            continue;
                        }
                    }
                }
                (_, stdout) => (None, stdin_end, stdout, stderr),
            };
            // A Wasm guest shares the agent's process: no AppArmor profile
            // can confine it alone (its default is the Wasm sandbox).
            if image.is_wasm()
                && let Some(wasmkube_runtime::AppArmor::Localhost(profile)) =
                    &resolved.security.app_armor
            {
                let message = format!(
                    "AppArmor profile {profile:?} cannot confine a Wasm guest: it runs in the agent's process, sandboxed by the Wasm runtime; name no profile, or RuntimeDefault (the Wasm sandbox)"
                );
                if self
                    .hold(&name, "CreateContainerError", message, config_delay)
                    .await
                {
                    return Outcome::Stopped;
                }
                continue;
            }
            // `hostUsers: false`: the pod's own id range (Wasm guests have no
            // ids to map).
            let user_namespace = if !image.is_wasm()
                && pod.spec.as_ref().and_then(|s| s.host_users) == Some(false)
            {
                let uid = pod.metadata.uid.as_deref().unwrap_or_default();
                let range = self
                    .ctx
                    .user_ranges
                    .lock()
                    .expect("user ranges lock")
                    .of(uid);
                if range.is_none() {
                    let message = "no user namespace id range is free on this node".to_owned();
                    if self
                        .hold(&name, "CreateContainerError", message, config_delay)
                        .await
                    {
                        return Outcome::Stopped;
                    }
                    continue;
                }
                range
            } else {
                None
            };
            let usage = Arc::new(Usage::default());
            let run_id = format!(
                "{}-{name}-{restart}",
                pod.metadata.uid.as_deref().unwrap_or_default()
            );
            let container_id = format!("{}://{run_id}", runtime.handler());
            let started_at = Utc::now();
            let ran_from = Instant::now();
            let ports: Vec<u16> = c
                .ports
                .iter()
                .flatten()
                .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
                .map(|p| p.container_port as u16)
                .collect();
            let sandbox = self.state.lock().expect("pod state").sandbox.clone();
            // A Wasm server runs in the agent's process: its sockets are made
            // for it inside the pod's namespace, or at node ports when pods
            // share the node's network.
            // Its own connections are made there too.
            let sockets = match (&sandbox, image.is_wasm()) {
                (Some(sb), true) => Netns::open(&sb.netns)
                    .and_then(|netns| {
                        let listeners = ports
                            .iter()
                            .map(|p| listen_in(&netns, std::net::SocketAddr::new(sb.ip, *p)))
                            .collect::<Result<Vec<_>, _>>()?;
                        Ok((listeners, Some(Arc::new(netns) as Arc<dyn PodNetns>)))
                    })
                    .map_err(|e| format!("cannot listen in the pod's network: {e}")),
                (None, true) if self.shares_node_network(&pod) => self
                    .node_port_listeners(&name, &c, &ports)
                    .map(|l| (l, None))
                    .map_err(|e| format!("cannot serve the container's ports at node ports: {e}")),
                _ => Ok((Vec::new(), None)),
            };
            let (listeners, pod_netns) = match sockets {
                Ok(s) => s,
                Err(message) => {
                    if self
                        .hold(&name, "CreateContainerError", message, config_delay)
                        .await
                    {
                        return Outcome::Stopped;
                    }
                    config_delay = (config_delay * 2).min(backoff.max);
                    continue;
                }
            };
            let resolv = crate::dns::resolv_conf(
                &pod,
                &self.ctx.node_resolv,
                self.ctx.config.cluster_dns.as_ref(),
            );
            let config = ContainerConfig {
                id: run_id,
                name: name.clone(),
                hostname: pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.hostname.clone())
                    .or_else(|| pod.metadata.name.clone())
                    .unwrap_or_default(),
                image: image.clone(),
                command: resolved.command,
                args: resolved.args,
                env: resolved.env,
                working_dir: resolved.working_dir,
                mounts: resolved.mounts,
                stdout,
                stderr,
                stdin: stdin_end,
                tty,
                user_namespace,
                memory_limit: resolved.memory_limit,
                cpu_millis: resolved.cpu_millis,
                cpu_request_millis: resolved.cpu_request_millis,
                security: resolved.security,
                usage: usage.clone(),
                pod_ip: self.ip(),
                ports: ports.clone(),
                netns: sandbox.as_ref().map(|s| s.netns.clone()),
                pod_netns,
                listeners,
                resolv_conf: Some(resolv.render()),
                names: self.ctx.config.cluster_dns.as_ref().map(|c| {
                    crate::dns::PodNames::new(c.resolver.clone(), &resolv)
                        as Arc<dyn wasmkube_runtime::NameLookup>
                }),
                service_routes: self.shares_node_network(&pod).then(|| {
                    crate::routes::NodeRoutes::new(pod.clone(), &self.ctx)
                        as Arc<dyn wasmkube_runtime::ServiceRoutes>
                }),
            };
            let started = runtime.start(config).await;
            if let Err(wasmkube_runtime::Error::Config(message)) = &started {
                // As the kubelet: the container is never created.
                self.event(
                    Some(&name),
                    Kind::Warning,
                    "Failed",
                    format!("Error: {message}"),
                );
                if self
                    .hold(
                        &name,
                        "CreateContainerConfigError",
                        message.clone(),
                        config_delay,
                    )
                    .await
                {
                    return Outcome::Stopped;
                }
                config_delay = (config_delay * 2).min(backoff.max);
                continue;
            }
            config_delay = backoff.initial;
            self.event(
                Some(&name),
                Kind::Normal,
                "Created",
                format!("Created container: {name}"),
            );
            let exit = match started {
                Err(e) => wasmkube_runtime::Exit {
                    code: 128,
                    reason: "StartError".into(),
                    message: Some(e.to_string()),
                },
                Ok(mut running) => {
                    self.set(|s| {
                        let cs = s.container(&name);
                        cs.state = State::Running { started_at };
                        cs.image_id = image.id.clone();
                        cs.container_id = Some(container_id.clone());
                        // Ready at once unless a probe has to say so.
                        cs.ready =
                            !init && c.readiness_probe.is_none() && c.startup_probe.is_none();
                        s.runs.insert(
                            name.clone(),
                            Run {
                                restart_count: restart,
                                live_log: Some(live.written.clone()),
                                usage: usage.clone(),
                                running: true,
                                started: ran_from,
                                exec: running.exec(),
                                stdin: stdin.clone(),
                                terminal: terminal.as_ref().map(|t| resize(t, running.terminal())),
                                history: Default::default(),
                            },
                        );
                    });
                    self.event(
                        Some(&name),
                        Kind::Normal,
                        "Started",
                        format!("Started container {name}"),
                    );
                    let exec = running.exec();
                    tokio::select! {
                        exit = running.wait() => exit,
                        reason = self.probes(&c, init, exec) => {
                            self.event(Some(&name), Kind::Normal, "Killing", reason.clone());
                            running.kill();
                            let mut exit = running.wait().await;
                            exit.message = Some(reason);
                            exit
                        }
                        () = stop_requested(self.stop.clone()) => {
                            let deadline = self.stop_at();
                            self.event(Some(&name), Kind::Normal, "Killing", format!("Stopping container {name}"));
                            Box::pin(self.stop_container(&c, &mut running, deadline)).await
                        }
                    }
                }
            };
            // 4. It ended. Its output is in the log file before the exit is
            // reported, so a reader who saw the exit sees all of it (what is
            // left in its terminal is read, then the terminal closes).
            if let Some(terminal) = &terminal {
                terminal.end();
            }
            let mut written = live.written.clone();
            let _ =
                tokio::time::timeout(Duration::from_secs(5), written.wait_for(|w| *w == u64::MAX))
                    .await;
            let terminated = Terminated {
                exit_code: exit.code,
                reason: exit.reason.clone(),
                message: exit.message.clone(),
                started_at: Some(started_at),
                finished_at: Utc::now(),
                container_id: Some(container_id.clone()),
            };
            if exit.reason == "OOMKilled" {
                self.event(
                    Some(&name),
                    Kind::Warning,
                    "OOMKilling",
                    format!(
                        "Container {name} was OOM-killed: {}",
                        exit.message.clone().unwrap_or_default()
                    ),
                );
            }
            if exit.reason == "StartError" {
                self.event(
                    Some(&name),
                    Kind::Warning,
                    "Failed",
                    format!("Error: {}", exit.message.clone().unwrap_or_default()),
                );
            }
            self.set(|s| {
                let cs = s.container(&name);
                cs.state = State::Terminated(terminated.clone());
                cs.ready = false;
                if let Some(r) = s.runs.get_mut(&name) {
                    r.running = false;
                }
            });
            if self.stopping() {
                return Outcome::Stopped;
            }
            let again = match (init, policy.as_str()) {
                (_, "Never") => false,
                (true, _) | (false, "OnFailure") => exit.code != 0,
                _ => true,
            };
            if !again {
                return if exit.code == 0 {
                    Outcome::Succeeded
                } else {
                    Outcome::Failed
                };
            }
            // 5. Restart, after a back-off that grows with every crash.
            if ran_from.elapsed() >= backoff.reset_after {
                crash_delay = None;
            }
            let delay = crash_delay.unwrap_or(Duration::ZERO);
            crash_delay = Some(crash_delay.map_or(backoff.initial, |d| (d * 2).min(backoff.max)));
            self.set(|s| {
                let cs = s.container(&name);
                cs.last = Some(terminated.clone());
                cs.restart_count += 1;
                if !delay.is_zero() {
                    cs.state = State::Waiting {
                        reason: "CrashLoopBackOff".into(),
                        message: Some(format!(
                            "back-off {delay:?} restarting failed container={name} pod={}",
                            pod_key(&pod)
                        )),
                    };
                }
            });
            if !delay.is_zero() {
                self.event(
                    Some(&name),
                    Kind::Warning,
                    "BackOff",
                    format!(
                        "Back-off restarting failed container {name} in pod {}",
                        pod_key(&pod)
                    ),
                );
                if self.wait_or_stop(delay).await {
                    return Outcome::Stopped;
                }
            }
        }
    }
}

/// Resolves once the pod's containers are told to stop.
async fn stop_requested(mut stop: watch::Receiver<Stop>) {
    if stop.wait_for(Option::is_some).await.is_err() {
        // The worker is gone: nothing will ever ask again.
        std::future::pending::<()>().await;
    }
}

fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

/// Whether the pod gets a network namespace of its own on this node.
fn own_network(ctx: &crate::Ctx, pod: &Pod) -> bool {
    ctx.network.get().is_some() && pod.spec.as_ref().and_then(|s| s.host_network) != Some(true)
}

/// A task that ends when its handle is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_running_pods_tasks_share_one_copy_of_it_with_its_ip() {
        let pod = |rv: &str| {
            let mut p = Pod::default();
            p.metadata.resource_version = Some(rv.into());
            Arc::new(p)
        };
        let first = pod("1");
        let mut seen = Seen {
            pod: first.clone(),
            with_ip: first.clone(),
        };
        // No IP yet: the watched copy itself.
        assert!(Arc::ptr_eq(&seen.update(Some(first.clone()), None), &first));
        // With its IP: one copy, made once and then shared.
        let ip = Some("10.88.0.7".to_owned());
        let a = seen.update(Some(first.clone()), ip.clone());
        assert_eq!(a.status.as_ref().unwrap().pod_ip, ip);
        assert!(!Arc::ptr_eq(&a, &first));
        assert!(Arc::ptr_eq(
            &seen.update(Some(first.clone()), ip.clone()),
            &a
        ));
        // A newer pod from the API: its fields, still with the IP.
        let second = pod("2");
        let b = seen.update(Some(second.clone()), ip.clone());
        assert_eq!(b.metadata.resource_version.as_deref(), Some("2"));
        assert_eq!(b.status.as_ref().unwrap().pod_ip, ip);
        // Gone from the API: the containers go on with the last one seen.
        assert!(Arc::ptr_eq(&seen.update(None, ip.clone()), &b));
        // A pod that already reports the IP is shared as it is.
        let reported = Arc::new(Pod {
            status: Some(k8s_openapi::api::core::v1::PodStatus {
                pod_ip: ip.clone(),
                ..Default::default()
            }),
            ..Default::default()
        });
        assert!(Arc::ptr_eq(
            &seen.update(Some(reported.clone()), ip),
            &reported
        ));
    }

    #[test]
    fn transition_times_come_from_the_last_write_not_an_older_watched_one() {
        let condition =
            |t: &str| json!({"type": "PodScheduled", "status": "True", "lastTransitionTime": t});
        // The watch delivers our first write while we already wrote a second.
        let mut pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p"},
            "status": {"conditions": [condition("2026-01-01T00:00:01Z")]},
        }))
        .unwrap();
        let written = json!({"conditions": [condition("2026-01-01T00:00:02Z")]});
        keep_written_conditions(&mut pod, Some(&written));
        let status = status::build(
            &pod,
            &[],
            None,
            &Utc::now(),
            &status::Network {
                host_ip: "10.0.0.1",
                pod_ip: None,
                node_ports: &[],
                sandbox_ready: true,
                own_network: false,
            },
        );
        let scheduled = status["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "PodScheduled")
            .unwrap()
            .clone();
        assert_eq!(scheduled["lastTransitionTime"], "2026-01-01T00:00:02Z");
        // Before any write of ours (an agent restart), the pod's own count.
        let mut fresh: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p"},
            "status": {"conditions": [condition("2026-01-01T00:00:01Z")]},
        }))
        .unwrap();
        keep_written_conditions(&mut fresh, None);
        let kept = serde_json::to_value(fresh.status.unwrap().conditions.unwrap()).unwrap();
        assert_eq!(kept[0]["lastTransitionTime"], "2026-01-01T00:00:01Z");
    }
}
