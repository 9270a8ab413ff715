//! The node agent: the kubelet's job for wasmkube. It registers its Node
//! (capacity, addresses, runtime handlers, images, conditions), renews its
//! Lease, watches only the pods bound to it and runs each through one
//! lifecycle state machine ([`pod`]) on a [`Runtime`] (Wasm, in-process),
//! reporting their status and events through the API, and serves their logs
//! and usage on an authenticated HTTP endpoint ([`server`]) that the API
//! server proxies `pods/log` to.
//!
//! `wasmkube agent` runs it against a remote API server; `wasmkube server`
//! embeds one as the cluster's local node.

mod apparmor;
mod attach;
mod dns;
mod events;
mod exec;
mod history;
mod logs;
mod node;
mod pod;
mod portforward;
mod ports;
mod probe;
mod projected;
mod routes;
mod server;
mod spec;
mod status;
mod terminal;
mod tls;
mod volumes;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use wasmkube_runtime::Runtime;

pub use dns::ClusterDns;
pub use logs::LogOptions;
pub use routes::{NetworkPolicies, ServiceBackend, ServiceBackends};
pub use wasmkube_runtime::Transport;

/// Restart back-off for crashing containers (CrashLoopBackOff).
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    /// The first delay (Kubernetes: 10 s), doubled after every crash.
    pub initial: Duration,
    /// The longest delay (Kubernetes: 5 min).
    pub max: Duration,
    /// A container that ran this long starts from `initial` again
    /// (Kubernetes: 10 min).
    pub reset_after: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_secs(10),
            max: Duration::from_secs(300),
            reset_after: Duration::from_secs(600),
        }
    }
}

/// How the agent and its node are set up.
#[derive(Clone, Debug)]
pub struct Config {
    /// The Node's name.
    pub name: String,
    /// Where images, compiled modules, pod volumes and logs are kept.
    pub data_dir: PathBuf,
    /// The node's InternalIP: pods report it as hostIP and, until pods get
    /// their own network namespaces, as podIP.
    pub address: IpAddr,
    /// Where the agent endpoint (logs, metrics) listens; port 0 picks one.
    pub listen: SocketAddr,
    /// Pod capacity. Wasm pods are cheap: thousands fit on one node.
    pub max_pods: u32,
    /// CPU and memory capacity to advertise [default: the machine's].
    pub cpu: Option<String>,
    pub memory: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// Registries (host:port) reached over plain HTTP besides loopback ones.
    pub insecure_registries: Vec<String>,
    /// The cluster's built-in registry (`HOST:PORT`), from which a pod's
    /// images are pulled with a token of the pod's service account unless
    /// its `imagePullSecrets` hold credentials for it. `None`: the address
    /// the API server names (`GET /registry/token`).
    pub cluster_registry: Option<String>,
    pub backoff: Backoff,
    /// How often the Lease is renewed.
    pub heartbeat_interval: Duration,
    /// How long after issue a projected service-account token is replaced
    /// (`None`: the kubelet's rule, at 80 % of its lifetime and at most a
    /// day).
    pub token_refresh: Option<Duration>,
    /// How often the files of a running pod's configMap, secret,
    /// downwardAPI and projected volumes are brought up to date (the
    /// kubelet's `--sync-frequency`).
    pub sync_frequency: Duration,
    pub lease_duration_seconds: i32,
    /// Log files are rotated beyond this size.
    pub log_max_bytes: u64,
    /// How often running containers' usage is sampled for their recent
    /// history (`history.rs`).
    pub usage_history_interval: Duration,
    /// Wasm instances that can be live at once (the engine's pool slots);
    /// `None` sizes it from `max_pods`: one per pod and 1,024 more for HTTP
    /// functions' per-request instances.
    pub max_instances: Option<u32>,
    /// Run Linux images with runc when it is installed and the agent is
    /// root.
    pub linux: bool,
    /// Whether privileged Linux containers may run.
    pub allow_privileged: bool,
    /// Give each pod its own network namespace and IP from the node's pod
    /// CIDR (needs root); otherwise pods share the node's network.
    pub pod_network: bool,
    /// Set pods' networks up with the CNI plugins in this directory
    /// instead of in-process.
    pub cni_bin: Option<PathBuf>,
    /// A CNI configuration directory whose first network configuration
    /// sets pods up (with the plugins in `cni_bin`).
    pub cni_conf_dir: Option<PathBuf>,
    /// Node ports for Wasm containers' ports when pods share the node's
    /// network (see `ports.rs`).
    pub node_ports: std::ops::RangeInclusive<u16>,
    /// The largest linear memory a module may have.
    pub max_module_memory_bytes: usize,
    /// The cluster DNS pods are pointed at (`dnsPolicy: ClusterFirst`);
    /// `None`: pods use the node's resolvers.
    pub cluster_dns: Option<ClusterDns>,
    /// Requests this node's gateway forwarded to Knative revisions, published
    /// beside the pods' figures in `/stats/pods`.
    pub routed_load: Option<RoutedLoad>,
    /// Service endpoints, for Wasm guests' connections to Service addresses
    /// when pods share the node's network (no service proxy routes them).
    pub service_backends: Option<Arc<dyn ServiceBackends>>,
    /// Told each new pod's address before its containers start, and
    /// awaited (the node's NetworkPolicy enforcer).
    pub pod_network_gate: Option<Arc<dyn PodNetworkGate>>,
    /// NetworkPolicy decisions for Wasm guests of pods that share the
    /// node's network (no node rules can filter their traffic).
    pub network_policies: Option<Arc<dyn NetworkPolicies>>,
}

/// What must see a pod's address before the pod's containers start: the
/// node's NetworkPolicy enforcer, so no pod runs before its policies are
/// in place. It bounds its own wait.
pub trait PodNetworkGate: Send + Sync + std::fmt::Debug {
    fn admit<'a>(
        &'a self,
        pod: &'a k8s_openapi::api::core::v1::Pod,
        ip: IpAddr,
    ) -> futures::future::BoxFuture<'a, ()>;
}

/// Reads the gateway's per-revision request counters (`namespace`, `name`,
/// `requests`, `requestsInFlight`, `requestSeconds` per revision).
#[derive(Clone)]
pub struct RoutedLoad(pub Arc<dyn Fn() -> Vec<serde_json::Value> + Send + Sync>);

impl std::fmt::Debug for RoutedLoad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RoutedLoad")
    }
}

impl Config {
    /// Defaults for a node called `name` keeping its state in `data_dir`.
    pub fn new(name: impl Into<String>, data_dir: impl Into<PathBuf>) -> Self {
        Self {
            name: name.into(),
            data_dir: data_dir.into(),
            address: IpAddr::from([127, 0, 0, 1]),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            max_pods: 2000,
            cpu: None,
            memory: None,
            labels: BTreeMap::new(),
            insecure_registries: Vec::new(),
            backoff: Backoff::default(),
            heartbeat_interval: Duration::from_secs(10),
            token_refresh: None,
            sync_frequency: Duration::from_secs(60),
            lease_duration_seconds: 40,
            log_max_bytes: 10 << 20,
            usage_history_interval: Duration::from_secs(15),
            max_instances: None,
            linux: true,
            allow_privileged: false,
            pod_network: true,
            cni_bin: None,
            cni_conf_dir: None,
            node_ports: 40000..=49999,
            max_module_memory_bytes: 4 << 30,
            cluster_dns: None,
            routed_load: None,
            service_backends: None,
            pod_network_gate: None,
            network_policies: None,
            cluster_registry: None,
        }
    }
}

impl Config {
    /// Where the local-path volumes provisioned on this node live (one
    /// directory each), as an absolute path: the node publishes it and
    /// volumes name their directory under it.
    pub fn local_path_root(&self) -> PathBuf {
        let root = self.data_dir.join("storage");
        std::path::absolute(&root).unwrap_or(root)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("could not set up the Wasm runtime: {0}")]
    Runtime(#[from] wasmkube_runtime_wasm::Error),
    #[error("could not open the image store: {0}")]
    Images(#[from] wasmkube_oci::Error),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{context}: {source}")]
    Api {
        context: String,
        #[source]
        source: kube::Error,
    },
    #[error("the pod watch ended")]
    WatchEnded,
    #[error("the agent endpoint's TLS: {0}")]
    Tls(String),
}

/// What every part of the agent shares.
pub(crate) struct Ctx {
    pub client: kube::Client,
    pub config: Config,
    pub images: wasmkube_oci::ImageStore,
    /// The node's runtimes: Wasm first, then runc when available.
    pub runtimes: Vec<Arc<dyn Runtime>>,
    /// The pod network, once the node has its pod CIDR (unset: pods share
    /// the node's network).
    pub network: std::sync::OnceLock<wasmkube_runtime_linux::net::PodNetwork>,
    /// Pods this agent runs, by uid.
    pub pods: Mutex<HashMap<String, pod::Handle>>,
    /// Uids of pods whose workers are done because the pod is gone, so a
    /// late watch event (one sent before the deletion, delivered after it)
    /// cannot start the pod again.
    pub(crate) gone: Mutex<pod::Tombstones>,
    /// The id ranges of pods with `hostUsers: false`, by uid.
    pub(crate) user_ranges: Mutex<pod::UserRanges>,
    /// The token the API server presents to the agent endpoint in a
    /// cluster without a CA; `None` in one with a CA, whose API server is
    /// known by its client certificate instead (see `tls.rs`).
    pub token: Option<String>,
    /// The agent endpoint's port, reported in `daemonEndpoints`.
    pub port: u16,
    /// Pokes the node status loop (a new image arrived, say).
    pub node_changed: tokio::sync::Notify,
    /// The previous usage sample per container and for the machine, from
    /// which `/stats/pods` computes CPU rates.
    pub samples: Mutex<server::Samples>,
    /// Node ports held by pods that share the node's network.
    pub node_ports: Mutex<ports::NodePorts>,
    /// The node's own resolv.conf, read at start (pods' `dnsPolicy:
    /// Default`, and the search domains `ClusterFirst` adds).
    pub node_resolv: dns::ResolvConf,
    /// The cluster's built-in registry, once known (see
    /// [`Config::cluster_registry`]).
    pub cluster_registry: tokio::sync::OnceCell<Option<String>>,
    /// When the cluster's registry last let a namespace's service account
    /// read an image on the node, by (namespace, account, image id).
    pub verified_images: tokio::sync::Mutex<HashMap<(String, String, String), std::time::Instant>>,
    /// ConfigMaps and Secrets read lately for pods' volume updates.
    pub sources: projected::SourceCache,
}

impl Ctx {
    /// The cluster's built-in registry (`HOST:PORT`), if it has one: the
    /// configured one, else the one the API server names. (A token sent to
    /// another registry at that address, a loopback one on another machine,
    /// is for the built-in registry's audience only, bound to its pod, and
    /// short-lived.) Asked once; a failed request is asked again at the
    /// next pull.
    pub(crate) async fn cluster_registry(&self) -> Option<&str> {
        let known = self
            .cluster_registry
            .get_or_try_init(|| async {
                if let Some(r) = &self.config.cluster_registry {
                    return Ok(Some(r.clone()));
                }
                let request = axum::http::Request::get(wasmkube_api::images::TOKEN_PATH)
                    .body(Vec::new())
                    .expect("a valid request");
                match self.client.request::<serde_json::Value>(request).await {
                    Ok(answer) => Ok(answer["registry"].as_str().map(str::to_owned)),
                    // A cluster without a registry or authentication.
                    Err(kube::Error::Api(e)) if e.code == 404 => Ok(None),
                    Err(e) => Err(e),
                }
            })
            .await;
        match known {
            Ok(registry) => registry.as_deref(),
            Err(e) => {
                tracing::debug!(error = %e, "cannot learn the cluster's registry");
                None
            }
        }
    }

    /// The state of the pod `namespace/name` this agent runs, if it runs it.
    pub(crate) fn pod_state(
        &self,
        namespace: &str,
        name: &str,
    ) -> Option<Arc<Mutex<pod::PodState>>> {
        self.pods
            .lock()
            .expect("pods lock")
            .values()
            .find(|h| h.namespace == namespace && h.name == name)
            .map(|h| h.state.clone())
    }

    /// The pod of this node serving at node port `port`, and the container
    /// port mapped there.
    pub(crate) fn pod_at_node_port(
        &self,
        port: u16,
    ) -> Option<(Arc<k8s_openapi::api::core::v1::Pod>, u16)> {
        let handles: Vec<(Arc<Mutex<pod::PodState>>, _)> = self
            .pods
            .lock()
            .expect("pods lock")
            .values()
            .map(|h| (h.state.clone(), h.pod()))
            .collect();
        handles.into_iter().find_map(|(state, pod)| {
            let st = state.lock().expect("pod state");
            let m = st.node_ports.iter().find(|m| m.node_port == port)?;
            Some((pod?, m.container_port))
        })
    }

    pub fn pods_dir(&self) -> PathBuf {
        self.config.data_dir.join("pods")
    }
}

/// A started agent: its node is registered and its endpoint listens.
pub struct Agent {
    ctx: Arc<Ctx>,
    listener: tokio::net::TcpListener,
    /// The endpoint's TLS, in a cluster with a CA, and its renewal.
    tls: Option<EndpointTls>,
}

/// The endpoint's current TLS configuration and what renews it.
struct EndpointTls {
    current: tokio::sync::watch::Receiver<Arc<rustls::ServerConfig>>,
    rotation: futures::future::BoxFuture<'static, ()>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("name", &self.ctx.config.name)
            .field("port", &self.ctx.port)
            .finish()
    }
}

impl Agent {
    /// Sets up the runtime and image store, binds the endpoint, makes sure
    /// the `wasmtime` RuntimeClass exists and registers the Node.
    pub async fn start(client: kube::Client, config: Config) -> Result<Self, Error> {
        let io = |context: String| move |source| Error::Io { context, source };
        std::fs::create_dir_all(&config.data_dir)
            .map_err(io(format!("creating {}", config.data_dir.display())))?;
        let images = wasmkube_oci::ImageStore::open(
            &config.data_dir.join("images"),
            config.insecure_registries.clone(),
        )?;
        // A cluster with a CA: the endpoint is served over mutual TLS once
        // the node is registered; otherwise to the node-proxy token. Guests'
        // HTTPS trusts it too, so they reach the cluster's own services.
        let cluster_ca = tls::cluster_ca(&client).await?;
        let wasm = wasmkube_runtime_wasm::WasmRuntime::new(wasmkube_runtime_wasm::Config {
            guest_ca_pem: cluster_ca.clone(),
            cache_dir: config.data_dir.join("modules"),
            max_instances: config
                .max_instances
                .unwrap_or(config.max_pods.saturating_add(1024)),
            max_memory_bytes: config.max_module_memory_bytes,
        })?;
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(io(format!("listening on {}", config.listen)))?;
        let port = listener
            .local_addr()
            .map_err(io("reading the endpoint address".into()))?
            .port();
        // The cluster CA signs the built-in registry's certificate when it
        // listens off loopback.
        let images = images.with_roots(cluster_ca.iter().cloned().collect());
        let token = match cluster_ca {
            Some(_) => None,
            None => Some(node::read_proxy_token(&client).await?),
        };
        let mut runtimes: Vec<Arc<dyn Runtime>> =
            vec![Arc::new(wasmkube_runtime_wasm::WasmContainers::new(
                wasm,
                std::thread::available_parallelism().map_or(2, |n| n.get()),
            )?)];
        if config.linux {
            let mut linux = wasmkube_runtime_linux::Config::new(config.data_dir.join("linux"));
            linux.allow_privileged = config.allow_privileged;
            match wasmkube_runtime_linux::LinuxRuntime::new(linux) {
                Ok(rt) => {
                    tracing::info!(runc = rt.version(), "Linux containers run with runc");
                    runtimes.push(Arc::new(rt));
                }
                Err(e) => tracing::warn!(error = %e, "this node runs Wasm pods only"),
            }
        }
        let ctx = Arc::new(Ctx {
            node_ports: Mutex::new(ports::NodePorts::new(config.node_ports.clone())),
            client,
            config,
            images,
            runtimes,
            network: std::sync::OnceLock::new(),
            pods: Mutex::default(),
            gone: Mutex::default(),
            user_ranges: Mutex::default(),
            token,
            port,
            node_changed: tokio::sync::Notify::new(),
            samples: Mutex::default(),
            cluster_registry: tokio::sync::OnceCell::new(),
            verified_images: tokio::sync::Mutex::default(),
            sources: Default::default(),
            node_resolv: dns::ResolvConf::parse(
                &std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
            ),
        });
        node::ensure_runtime_classes(&ctx).await?;
        node::register(&ctx).await?;
        tracing::info!(node = %ctx.config.name, port, "node agent registered");
        let tls = match &cluster_ca {
            Some(ca) => {
                let names = wasmkube_pki::ServingNames {
                    dns: vec![ctx.config.name.clone()],
                    ips: vec![ctx.config.address],
                };
                let serving = tls::serving(&ctx.client, &ctx.config.name, ca, &names).await?;
                let (tx, current) = tokio::sync::watch::channel(serving.config);
                let rotation = tls::rotate(
                    ctx.client.clone(),
                    ctx.config.name.clone(),
                    ca.clone(),
                    names,
                    serving.renew_at,
                    tx,
                );
                Some(EndpointTls {
                    current,
                    rotation: Box::pin(rotation),
                })
            }
            None => None,
        };
        if ctx.config.pod_network {
            node::set_up_pod_network(&ctx).await;
        }
        if ctx.network.get().is_none() {
            let range = &ctx.config.node_ports;
            tracing::warn!(
                address = %ctx.config.address,
                node_ports = %format!("{}-{}", range.start(), range.end()),
                "no pod network: pods share the node's IP, and Wasm containers' ports are served at node ports, reported in each pod's {} condition",
                ports::CONDITION
            );
        }
        Ok(Self { ctx, listener, tls })
    }

    /// The agent endpoint's address.
    pub fn endpoint(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from((self.ctx.config.address, self.ctx.port)))
    }

    /// Runs the node: heartbeats, node status, the endpoint and the pods,
    /// until the pod watch ends for good or the future is dropped.
    pub async fn run(self) -> Result<(), Error> {
        let ctx = self.ctx;
        let (tls, rotation) = match self.tls {
            Some(t) => (Some(t.current), Some(tokio::spawn(t.rotation))),
            None => (None, None),
        };
        let server = tokio::spawn(server::serve(ctx.clone(), self.listener, tls));
        let heartbeat = tokio::spawn(node::heartbeat(ctx.clone()));
        let status = tokio::spawn(node::status_loop(ctx.clone()));
        let routes = tokio::spawn(node::route_to_other_nodes(ctx.clone()));
        let volumes = tokio::spawn(volumes::keep_local_volumes(ctx.clone()));
        let history = tokio::spawn(history::keep(
            ctx.clone(),
            ctx.config
                .usage_history_interval
                .max(Duration::from_millis(100)),
        ));
        let result = watch_pods(ctx.clone()).await;
        history.abort();
        server.abort();
        heartbeat.abort();
        status.abort();
        routes.abort();
        volumes.abort();
        if let Some(rotation) = rotation {
            rotation.abort();
        }
        result
    }
}

/// Watches the pods bound to this node and hands every change to the pod's
/// worker, starting one for a pod seen for the first time.
async fn watch_pods(ctx: Arc<Ctx>) -> Result<(), Error> {
    let api: Api<Pod> = Api::all(ctx.client.clone());
    let selector = watcher::Config::default().fields(&format!("spec.nodeName={}", ctx.config.name));
    // Who wrote which field is for the API server: kept, it would be most
    // of every copy of a pod the agent holds.
    let pods = watcher(api, selector).modify(|p: &mut Pod| p.metadata.managed_fields = None);
    let mut stream = std::pin::pin!(pods.default_backoff());
    // Uids seen in a relist: pods missing from it were deleted meanwhile.
    let mut relisted = std::collections::HashSet::new();
    let mut reaped = false;
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Init) => relisted.clear(),
            Ok(watcher::Event::InitApply(p)) => {
                relisted.insert(p.metadata.uid.clone().unwrap_or_default());
                pod::update(&ctx, p);
            }
            Ok(watcher::Event::InitDone) => {
                pod::gone_unless(&ctx, &relisted);
                if !reaped {
                    pod::reap_orphans(&ctx, &relisted);
                    if let Some(network) = ctx.network.get() {
                        // Namespaces of pods that went while the agent was
                        // down (or crashed mid-teardown).
                        for id in network.sandboxes() {
                            if !relisted.contains(&id) {
                                tracing::info!(uid = %id, "removing the network of a pod that is gone");
                                network.teardown(&id).await;
                            }
                        }
                    }
                    reaped = true;
                }
            }
            Ok(watcher::Event::Apply(p)) => pod::update(&ctx, p),
            Ok(watcher::Event::Delete(p)) => pod::gone(&ctx, &p),
            Err(e) => tracing::warn!(error = %e, "pod watch error; retrying"),
        }
    }
    Err(Error::WatchEnded)
}
