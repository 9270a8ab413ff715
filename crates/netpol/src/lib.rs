//! NetworkPolicy on every node: run beside each node agent, it watches the
//! cluster's NetworkPolicies, pods and namespaces and programs one nftables
//! table ([`nft::TABLE`]) that admits to and from the node's pods only what
//! their policies allow.
//!
//! Linux and Wasm pods are enforced alike: both have their sockets in the
//! pod's network namespace (a Wasm guest's listeners and connections are
//! made there by the agent), so their traffic passes the node through the
//! pod's interface, where the table filters it. Traffic between a pod and
//! its own node (probes, the gateway and activator, port-forward, the
//! cluster DNS the node serves) is always allowed, as Kubernetes specifies.
//!
//! A pod is programmed before it runs: the node agent tells the enforcer
//! each new pod's address ([`Enforcer::admit`]) and starts its containers
//! once the table includes it, so a pod's first connection already meets
//! its policies.
//!
//! One sync loop owns the table: after any change of the three caches it
//! recomputes the plan ([`model::plan`]) and writes what differs from the
//! last one written ([`nft::Rendered::diff`]) in one `nft` transaction, so
//! the rules change atomically and connections already admitted keep
//! flowing. The table exists only while a pod of the node is isolated (a
//! node without policies keeps nothing of this in its kernel); it is
//! removed on a clean stop, and rewritten whole or removed at start, so
//! nothing a crashed agent left survives.
//!
//! A node reads every pod's labels and address for this, as the node
//! agents of Calico and Cilium do (the Node authorizer allows nodes to list
//! and watch pods cluster-wide; Secrets and the rest stay restricted).

pub mod model;
pub mod nft;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use wasmkube_proxy::watch::{cache, cache_trimmed};

/// Why network policy cannot be enforced, or a step of it failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The node cannot be programmed (not root, no `nft`).
    #[error("network policy cannot be enforced: {0}")]
    Unavailable(String),
    #[error("programming network policy: {0}")]
    Nft(#[from] wasmkube_proxy::Error),
}

/// How the enforcer is set up on its node.
#[derive(Clone, Debug)]
pub struct Config {
    /// The node's name: only its pods are programmed here.
    pub node: String,
    /// How often the table is rewritten even when nothing changed
    /// (repairs what someone else changed in it).
    pub resync: Duration,
    /// Program the node's table (root and `nft`); otherwise only decide
    /// in-process, for Wasm guests of pods on the node's network.
    pub program: bool,
}

impl Config {
    pub fn new(node: impl Into<String>) -> Self {
        Self {
            node: node.into(),
            resync: Duration::from_secs(300),
            program: true,
        }
    }
}

/// Checks that this process can program the node: root and `nft`.
pub fn check() -> Result<(), Error> {
    wasmkube_proxy::check().map_err(|e| Error::Unavailable(e.to_string()))
}

/// Keeps of a pod only what policies read: labels, node, network mode,
/// named ports, phase and address.
fn trim_pod(pod: &mut Pod) {
    pod.metadata.annotations = None;
    pod.metadata.owner_references = None;
    if let Some(spec) = pod.spec.as_mut() {
        spec.init_containers = None;
        spec.volumes = None;
        spec.affinity = None;
        spec.tolerations = None;
        for c in &mut spec.containers {
            c.env = None;
            c.env_from = None;
            c.command = None;
            c.args = None;
            c.volume_mounts = None;
            c.liveness_probe = None;
            c.readiness_probe = None;
            c.startup_probe = None;
            c.resources = None;
        }
    }
    if let Some(status) = pod.status.as_mut() {
        status.conditions = None;
        status.container_statuses = None;
        status.init_container_statuses = None;
    }
}

/// How long [`Enforcer::admit`] waits for a new pod's rules before it lets
/// the pod start anyway (Calico's `policy_setup_timeout_seconds`, which is
/// off by default, waits the same way).
pub const ADMIT_TIMEOUT: Duration = Duration::from_secs(10);

/// A pod told to the enforcer by its own node before the API shows its
/// address, forgotten once the API does (or after this long).
const PENDING_FOR: Duration = Duration::from_secs(120);

/// The node's enforcer: [`Enforcer::run`] keeps the table, and the node
/// agent calls [`Enforcer::admit`] with each new pod's address before it
/// starts the pod's containers, so no pod runs before its policies are in
/// place (its own isolation, and its address in the peer sets of this
/// node's rules).
#[derive(Clone, Debug, Default)]
pub struct Enforcer {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Pods of this node with an address the API does not show yet, by uid.
    pending: Mutex<HashMap<String, (model::PodView, Instant)>>,
    /// Bumped by every change a sync must see.
    changes: tokio::sync::watch::Sender<u64>,
    /// The last change a written (or unchanged) table includes.
    applied: tokio::sync::watch::Sender<u64>,
    /// The caches, once running, for in-process decisions.
    caches: std::sync::OnceLock<Caches>,
}

impl Enforcer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Programs `pod` of this node at `ip` and returns once the table
    /// includes it (or after [`ADMIT_TIMEOUT`], with a warning).
    pub async fn admit(&self, pod: &Pod, ip: IpAddr) {
        let IpAddr::V4(ip) = ip else { return };
        let Some(view) = model::PodView::at(pod, ip) else {
            return;
        };
        let name = format!("{}/{}", view.namespace, view.name);
        self.inner
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(view.uid.clone(), (view, Instant::now()));
        let mut wanted = 0;
        self.inner.changes.send_modify(|n| {
            *n += 1;
            wanted = *n;
        });
        let mut applied = self.inner.applied.subscribe();
        if tokio::time::timeout(ADMIT_TIMEOUT, applied.wait_for(|a| *a >= wanted))
            .await
            .is_err()
        {
            tracing::warn!(pod = %name, "network policy not programmed in time; starting the pod anyway");
        }
    }

    /// In-process: whether `from`, a pod of this node on the node's
    /// network, may connect (or send) to `to` over `protocol` (`to_pod`:
    /// the pod of this node listening there, and its container port).
    /// Until the caches are filled, nothing is isolated.
    pub fn may_connect(
        &self,
        from: &Pod,
        to: SocketAddr,
        to_pod: Option<(&Pod, u16)>,
        protocol: model::Protocol,
    ) -> bool {
        let Some(caches) = self.inner.caches.get() else {
            return true;
        };
        let Some(from) = model::PodView::local(from) else {
            return true;
        };
        let to_view = to_pod.and_then(|(p, _)| model::PodView::local(p));
        let port = to_pod.map_or(to.port(), |(_, port)| port);
        let to = match (&to_view, to.ip()) {
            (Some(view), _) => model::Party::Pod(view),
            (None, IpAddr::V4(ip)) => model::Party::Addr(ip),
            (None, IpAddr::V6(_)) => return true,
        };
        caches.decide((model::Party::Pod(&from), to), protocol, port)
    }

    /// In-process: whether `to`, a pod of this node on the node's network,
    /// may accept a connection from `from` at its container port `port`.
    pub fn may_accept(&self, to: &Pod, from: SocketAddr, port: u16) -> bool {
        let (Some(caches), Some(to), IpAddr::V4(from)) = (
            self.inner.caches.get(),
            model::PodView::local(to),
            from.ip().to_canonical(),
        ) else {
            return true;
        };
        // Only HTTP servers accept in-process: TCP.
        caches.decide(
            (model::Party::Addr(from), model::Party::Pod(&to)),
            model::Protocol::Tcp,
            port,
        )
    }

    /// Runs the enforcer until `shutdown` completes, then removes its
    /// table. Returns early only if the node cannot be programmed at all.
    pub async fn run(
        &self,
        client: kube::Client,
        config: Config,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), Error> {
        if config.program {
            check()?;
        }
        let (policies, policy_events) = cache::<NetworkPolicy>(&client);
        let (pods, pod_events) =
            cache_trimmed::<Pod>(&client, watcher::Config::default(), trim_pod);
        let (namespaces, namespace_events) = cache::<Namespace>(&client);
        let inner = &self.inner;
        let events = async {
            let events = futures::stream::select(
                policy_events.map(|r| r.map(|_| ())),
                futures::stream::select(
                    pod_events.map(|r| r.map(|_| ())),
                    namespace_events.map(|r| r.map(|_| ())),
                ),
            );
            let mut events = std::pin::pin!(events);
            while let Some(event) = events.next().await {
                if let Err(e) = event {
                    tracing::warn!(error = %e, "network policy watch error; retrying");
                }
                inner.changes.send_modify(|n| *n += 1);
            }
        };
        let caches = inner.caches.get_or_init(|| Caches {
            policies,
            pods,
            namespaces,
        });
        let sync = async {
            let _ = tokio::join!(
                caches.policies.wait_until_ready(),
                caches.pods.wait_until_ready(),
                caches.namespaces.wait_until_ready()
            );
            let mut changes = inner.changes.subscribe();
            // What the node holds: `None` unknown (rewrite or remove the
            // table whole), `Some(None)` no table, `Some(Some(r))` r.
            let mut written: Option<Option<nft::Rendered>> = None;
            let mut next_resync = tokio::time::Instant::now() + config.resync;
            loop {
                if tokio::time::Instant::now() >= next_resync {
                    written = None;
                    next_resync = tokio::time::Instant::now() + config.resync;
                }
                let generation = *changes.borrow_and_update();
                if !config.program {
                    inner.applied.send_modify(|a| *a = (*a).max(generation));
                    if changes.changed().await.is_err() {
                        return;
                    }
                    continue;
                }
                let plan = caches.plan(&config.node, &inner.pending);
                // No pod of this node isolated: no table at all, so a node
                // without policies keeps nothing of this in its kernel.
                let rendered = (!plan.pods.is_empty()).then(|| nft::Rendered::of(&plan));
                let script = match (&written, &rendered) {
                    (Some(None), None) => None,
                    (None | Some(Some(_)), None) => Some(nft::remove()),
                    (None | Some(None), Some(new)) => Some(new.full()),
                    (Some(Some(old)), Some(new)) => new.diff(old),
                };
                if let Some(script) = script {
                    if let Err(e) = wasmkube_proxy::nft::apply(&script).await {
                        tracing::warn!(error = %e, "programming network policy failed; retrying in 1s");
                        written = None;
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                    tracing::debug!(
                        isolated_pods = plan.pods.len(),
                        sets = plan.sets.len(),
                        "network policy programmed"
                    );
                    written = Some(rendered);
                }
                inner.applied.send_modify(|a| *a = (*a).max(generation));
                tokio::select! {
                    r = changes.changed() => if r.is_err() { return },
                    _ = tokio::time::sleep_until(next_resync) => {}
                }
            }
        };
        tokio::select! {
            _ = events => {}
            _ = sync => {}
            _ = shutdown => {}
        }
        if config.program
            && let Err(e) = wasmkube_proxy::nft::apply(&nft::remove()).await
        {
            tracing::warn!(error = %e, "removing the network policy table");
        }
        tracing::info!(
            programmed = config.program,
            "network policy enforcer stopped (and its table removed, when it wrote one)"
        );
        Ok(())
    }
}

/// The node's caches: every NetworkPolicy, pod and namespace.
#[derive(Debug)]
struct Caches {
    policies: Store<NetworkPolicy>,
    pods: Store<Pod>,
    namespaces: Store<Namespace>,
}

impl Caches {
    /// An in-process decision on the caches.
    fn decide(
        &self,
        parties: (model::Party<'_>, model::Party<'_>),
        protocol: model::Protocol,
        port: u16,
    ) -> bool {
        let policies = self.policies.state();
        if policies.is_empty() {
            return true;
        }
        let policies: Vec<&NetworkPolicy> = policies.iter().map(|p| p.as_ref()).collect();
        let (pods, namespaces) = (self.pods(), self.namespaces());
        model::allows(&policies, &pods, &namespaces, parties, protocol, port)
    }

    /// What the node programs now: the cached pods, and this node's pods
    /// whose address the cache does not hold yet.
    fn plan(
        &self,
        node: &str,
        pending: &Mutex<HashMap<String, (model::PodView, Instant)>>,
    ) -> model::Plan {
        let policies = self.policies.state();
        if policies.is_empty() {
            // Nothing isolated: the common case costs nothing per pod.
            pending.lock().unwrap_or_else(|e| e.into_inner()).clear();
            return model::Plan::default();
        }
        let policies: Vec<&NetworkPolicy> = policies.iter().map(|p| p.as_ref()).collect();
        let mut pods = self.pods();
        {
            let mut pending = pending.lock().unwrap_or_else(|e| e.into_inner());
            let known: HashSet<&str> = pods.iter().map(|p| p.uid.as_str()).collect();
            pending.retain(|uid, (_, since)| {
                !known.contains(uid.as_str()) && since.elapsed() < PENDING_FOR
            });
            pods.extend(pending.values().map(|(view, _)| view.clone()));
        }
        model::plan(&policies, &pods, &self.namespaces(), node)
    }

    /// The cached pods that policies see.
    fn pods(&self) -> Vec<model::PodView> {
        self.pods
            .state()
            .iter()
            .filter_map(|p| model::PodView::of(p))
            .collect()
    }

    /// Each cached namespace's labels.
    fn namespaces(&self) -> BTreeMap<String, BTreeMap<String, String>> {
        self.namespaces
            .state()
            .iter()
            .map(|n| model::namespace_labels(n))
            .collect()
    }
}
