//! The built-in gateway: Ingress (class `wasmkube`) and Gateway API
//! HTTPRoutes on Gateways of the class `wasmkube`, served by every node.
//!
//! Two parts, as an ingress controller has them:
//! - the data plane ([`run`], in every node agent): watches the routing
//!   kinds, Services, EndpointSlices, TLS Secrets and Namespaces; compiles them
//!   into one routing table ([`routes`]); listens on the Ingress ports
//!   (`--gateway-listen`, and the HTTPS one for Ingresses with `tls`) and on
//!   every Gateway listener's port at the node's address; proxies each
//!   request to a ready endpoint of the chosen backend ([`serve`]);
//! - the status writer ([`status::run`], one per cluster under the
//!   controller manager's lease): `Accepted`/`Programmed`/`ResolvedRefs`
//!   conditions on GatewayClasses, Gateways and HTTPRoutes, and the nodes'
//!   addresses in Gateways' and Ingresses' status.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use kube::runtime::reflector::Store;
use wasmkube_api::gateway_api::{Gateway, GatewayClass, HTTPRoute};
use wasmkube_api::knative;
use wasmkube_proxy::views::Views;
use wasmkube_proxy::{ServiceView, ServiceWatch, SliceView};

use crate::routes::KnativeRoute;

mod activator;
mod load;
pub mod routes;
mod serve;
pub mod status;

pub use load::{Load, RevisionLoad};
pub use routes::CONTROLLER;

/// Where a node's gateway listens.
#[derive(Clone, Debug)]
pub struct Config {
    /// The node's address: Gateway listeners open their ports on it.
    pub address: IpAddr,
    /// The Ingresses' plain HTTP port (`None`: Ingresses are not served).
    pub ingress_http_port: Option<u16>,
    /// The Ingresses' HTTPS port, for Ingresses with `tls`.
    pub ingress_https_port: Option<u16>,
    /// How long a request for a Knative revision with no ready pod is held
    /// while the revision scales up from zero.
    pub activation_timeout: std::time::Duration,
    /// Where requests to Knative revisions are counted (the node agent
    /// publishes it for the autoscaler).
    pub load: Arc<Load>,
}

/// The caches of everything routing reads, and a counter bumped after
/// every change any of them applied.
#[derive(Clone)]
pub(crate) struct Caches {
    pub ingresses: Store<Ingress>,
    pub ingress_classes: Store<IngressClass>,
    pub gateway_classes: Store<GatewayClass>,
    pub gateways: Store<Gateway>,
    pub routes: Store<HTTPRoute>,
    pub namespaces: Store<Namespace>,
    pub knative_routes: Views<KnativeRoute>,
    /// Why each Revision that cannot serve cannot.
    pub revisions: Views<String>,
    pub changes: tokio::sync::watch::Receiver<u64>,
}

/// Drives a cache's watch, bumping the change counter after every event.
async fn merge<S>(stream: S, tx: Arc<tokio::sync::watch::Sender<u64>>, what: &'static str)
where
    S: Stream<Item = Result<(), kube::runtime::watcher::Error>> + Send,
{
    let mut stream = std::pin::pin!(stream);
    while let Some(event) = stream.next().await {
        match event {
            Ok(()) => {
                tx.send_modify(|n| *n += 1);
            }
            Err(e) => tracing::warn!(kind = what, error = %e, "gateway watch error; retrying"),
        }
    }
}

/// A cache of the views `view` makes of the objects of `K`, whose changes
/// poke `tx`.
fn viewed<K: wasmkube_proxy::watch::Cached, V: PartialEq + Send + Sync + 'static>(
    client: &kube::Client,
    tx: &Arc<tokio::sync::watch::Sender<u64>>,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
    what: &'static str,
    view: fn(&K) -> Option<V>,
) -> Views<V> {
    let (views, stream) = wasmkube_proxy::views::views::<K, V>(client, Default::default(), view);
    tasks.push(tokio::spawn(merge(
        stream.map(|r| r.map(|_| ())),
        tx.clone(),
        what,
    )));
    views
}

/// Why a Knative Revision cannot serve, when its status says it cannot
/// (its `ContainerHealthy` or `Ready` condition is False): all the
/// activator reads of Revisions, so one that can serve is not kept.
fn revision_failure(r: &knative::Revision) -> Option<String> {
    let status = r.status.as_ref()?;
    ["ContainerHealthy", "Ready"].iter().find_map(|t| {
        let c = knative::condition(&status.conditions, t)?;
        (c.status == "False").then(|| {
            format!(
                "{}: {}",
                c.reason.clone().unwrap_or_default(),
                c.message.clone().unwrap_or_default()
            )
        })
    })
}

macro_rules! caches {
    ($client:expr, $tx:expr, $tasks:expr, $($ty:ty => $what:literal),*) => {
        ($({
            let (store, stream) = wasmkube_proxy::watch::cache::<$ty>($client);
            $tasks.push(tokio::spawn(merge(stream.map(|r| r.map(|_| ())), $tx.clone(), $what)));
            store
        }),*)
    };
}

impl Caches {
    fn start(client: &kube::Client, tasks: &mut Vec<tokio::task::JoinHandle<()>>) -> Self {
        let (tx, changes) = tokio::sync::watch::channel(0u64);
        let tx = Arc::new(tx);
        let (ingresses, ingress_classes, gateway_classes, gateways, routes, namespaces) = caches!(
            client, tx, tasks,
            Ingress => "Ingress",
            IngressClass => "IngressClass",
            GatewayClass => "GatewayClass",
            Gateway => "Gateway",
            HTTPRoute => "HTTPRoute",
            Namespace => "Namespace"
        );
        // Knative objects, one per function however long it stays at zero,
        // are kept as views of what is read of them.
        let knative_routes = viewed(client, &tx, tasks, "Knative Route", KnativeRoute::of);
        let revisions = viewed(client, &tx, tasks, "Knative Revision", revision_failure);
        Self {
            ingresses,
            ingress_classes,
            gateway_classes,
            gateways,
            routes,
            namespaces,
            knative_routes,
            revisions,
            changes,
        }
    }

    async fn ready(&self) {
        let _ = tokio::join!(
            self.ingresses.wait_until_ready(),
            self.ingress_classes.wait_until_ready(),
            self.gateway_classes.wait_until_ready(),
            self.gateways.wait_until_ready(),
            self.routes.wait_until_ready(),
            self.namespaces.wait_until_ready(),
            self.knative_routes.wait_until_ready(),
            self.revisions.wait_until_ready(),
        );
    }

    /// The names of the classes whose controller is the built-in gateway.
    fn our_classes(
        &self,
    ) -> (
        std::collections::BTreeSet<String>,
        std::collections::BTreeSet<String>,
    ) {
        let ingress = self
            .ingress_classes
            .state()
            .iter()
            .filter(|c| c.spec.as_ref().and_then(|s| s.controller.as_deref()) == Some(CONTROLLER))
            .filter_map(|c| c.metadata.name.clone())
            .collect();
        let gateway = self
            .gateway_classes
            .state()
            .iter()
            .filter(|c| c.spec.controller_name == CONTROLLER)
            .filter_map(|c| c.metadata.name.clone())
            .collect();
        (ingress, gateway)
    }
}

/// The caches' contents at one moment, held while a table or a status is
/// computed from them.
pub(crate) struct Held {
    ingresses: Vec<Arc<Ingress>>,
    gateways: Vec<Arc<Gateway>>,
    routes: Vec<Arc<HTTPRoute>>,
    namespaces: Vec<Arc<Namespace>>,
    knative_routes: Vec<Arc<KnativeRoute>>,
    services: Vec<Arc<ServiceView>>,
    slices: Vec<Arc<SliceView>>,
    secrets: Vec<Arc<Secret>>,
    ingress_classes: BTreeSet<String>,
    gateway_classes: BTreeSet<String>,
}

impl Held {
    pub fn new(
        caches: &Caches,
        services: Vec<Arc<ServiceView>>,
        slices: Vec<Arc<SliceView>>,
        secrets: Vec<Arc<Secret>>,
    ) -> Self {
        let (ingress_classes, gateway_classes) = caches.our_classes();
        Self {
            ingresses: caches.ingresses.state(),
            gateways: caches.gateways.state(),
            routes: caches.routes.state(),
            namespaces: caches.namespaces.state(),
            knative_routes: caches.knative_routes.state(),
            services,
            slices,
            secrets,
            ingress_classes,
            gateway_classes,
        }
    }

    /// What the routing table and the status are computed from.
    pub fn inputs(&self, ports: (Option<u16>, Option<u16>)) -> routes::Inputs<'_> {
        fn refs<K>(v: &[Arc<K>]) -> Vec<&K> {
            v.iter().map(|a| a.as_ref()).collect()
        }
        routes::Inputs {
            ingresses: refs(&self.ingresses),
            ingress_classes: self.ingress_classes.clone(),
            gateway_classes: self.gateway_classes.clone(),
            gateways: refs(&self.gateways),
            routes: refs(&self.routes),
            services: refs(&self.services),
            slices: refs(&self.slices),
            namespaces: refs(&self.namespaces),
            secrets: refs(&self.secrets),
            knative_routes: refs(&self.knative_routes),
            ingress_http_port: ports.0,
            ingress_https_port: ports.1,
        }
    }
}

/// Runs a node's gateway until `shutdown` resolves: keeps the routing table
/// and the listeners in step with the cluster.
pub async fn run(
    client: kube::Client,
    services: ServiceWatch,
    config: Config,
    shutdown: impl Future<Output = ()>,
) {
    let mut tasks = Vec::new();
    let caches = Caches::start(&client, &mut tasks);
    // Only TLS Secrets: all a gateway terminates with, and all a node may
    // read beyond what its own pods use (the API server's node authorizer).
    let (secrets, secret_events) = wasmkube_proxy::watch::cache_with::<Secret>(
        &client,
        kube::runtime::watcher::Config::default().fields("type=kubernetes.io/tls"),
    );
    let mut changes = caches.changes.clone();
    let mut service_changes = services.subscribe();
    let (secret_tx, mut secret_changes) = tokio::sync::watch::channel(0u64);
    tasks.push(tokio::spawn(merge(
        secret_events.map(|r| r.map(|_| ())),
        Arc::new(secret_tx),
        "Secret",
    )));
    let (pods, pod_events) = wasmkube_proxy::watch::cache_with::<Pod>(
        &client,
        kube::runtime::watcher::Config::default().labels(knative::labels::REVISION),
    );
    let (pod_tx, pod_changes) = tokio::sync::watch::channel(0u64);
    tasks.push(tokio::spawn(merge(
        pod_events.map(|r| r.map(|_| ())),
        Arc::new(pod_tx),
        "Knative revision Pod",
    )));
    let activator = activator::Activator::new(
        client.clone(),
        caches.revisions.clone(),
        (pods, pod_changes),
        config.activation_timeout,
    );
    let shared = serve::Shared::new(Some(Arc::new(activator)), config.load.clone());
    let mut listeners = serve::Listeners::new(config.address);
    let work = async {
        let _ = tokio::join!(caches.ready(), services.ready(), secrets.wait_until_ready());
        loop {
            let held = Held::new(
                &caches,
                services.services.state(),
                services.slices.state(),
                secrets.state(),
            );
            let table =
                routes::build(&held.inputs((config.ingress_http_port, config.ingress_https_port)));
            listeners.reconcile(&table, &shared);
            tracing::debug!(ports = ?listeners.ports(), "gateway routing table updated");
            shared.set_table(table);
            tokio::select! {
                r = changes.changed() => if r.is_err() { break },
                r = service_changes.changed() => if r.is_err() { break },
                r = secret_changes.changed() => if r.is_err() { break },
            }
        }
    };
    tokio::select! {
        () = work => {}
        () = shutdown => {}
    }
    drop(listeners);
    for t in tasks {
        t.abort();
    }
}
