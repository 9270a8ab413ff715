//! The service proxy (kube-proxy's job), run beside every node agent: it
//! watches Services and EndpointSlices and programs the node's nftables
//! table so a Service's cluster IP, node ports and load-balancer addresses
//! reach its ready endpoints, from pods (Linux and Wasm alike: both have
//! their sockets in pod network namespaces) and from the node itself.
//!
//! One sync loop owns the table: for each Service whose object or
//! EndpointSlices changed since it last looked (the watch records which),
//! it recomputes what the Service's ports need ([`model`]), turns that into
//! rules ([`nft::build`]) and writes only the difference from what it wrote
//! for that Service last ([`nft::Table::update`]), all in one `nft`
//! transaction; its cost follows the change, not the cluster. The first
//! sync after a start, and any sync after a failure, rewrites the whole
//! table ([`nft::Table::full`]), so nothing a crashed agent left survives.
//!
//! Beside the table, the proxy keeps the node's routes for the address
//! ranges: an `unreachable` route for the service range and the cluster's
//! pod range (so a packet for a cluster IP not programmed yet, or for a pod
//! that is gone, is refused on the node and never leaves it; routes to pods
//! and other nodes' pod ranges are more specific and win), and a `local`
//! route per programmed cluster IP, so the node's own connections to it
//! are routed and then translated by the table.

pub mod model;
pub mod nft;
mod routes;
pub mod view;
pub mod views;
pub mod watch;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

pub use view::{ServiceView, SliceView};
use views::Views;

pub use model::NodeNetwork;
pub use watch::{ServiceKey, ServiceWatch};

/// Why the proxy cannot run, or a step of it failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The node cannot be programmed (not root, no `nft`).
    #[error("the service proxy cannot run: {0}")]
    Unavailable(String),
    #[error("nft: {0}")]
    Nft(String),
    #[error("ip: {0}")]
    Routes(String),
    #[error("running {command}: {source}")]
    Spawn {
        command: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// How the proxy is set up on its node.
#[derive(Clone, Debug)]
pub struct Config {
    /// The node's name: `Local` traffic policies keep to its endpoints.
    pub node: String,
    pub network: NodeNetwork,
    /// How often the whole table is rewritten even when nothing changed
    /// (repairs what someone else changed in it).
    pub resync: Duration,
}

impl Config {
    pub fn new(node: impl Into<String>, network: NodeNetwork) -> Self {
        Self {
            node: node.into(),
            network,
            resync: Duration::from_secs(300),
        }
    }
}

/// Checks that this process can program the node: root and `nft`.
pub fn check() -> Result<(), Error> {
    if !rustix::process::geteuid().is_root() {
        return Err(Error::Unavailable("the agent does not run as root".into()));
    }
    nft::available().map_err(Error::Unavailable)
}

/// Runs the proxy until `shutdown` completes, then removes its table and
/// routes. Returns early only if the node cannot be programmed at all.
pub async fn run(
    watch: ServiceWatch,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    check()?;
    let routes = routes::Routes::new(config.network.clone());
    routes.start().await?;
    // Bridged pod-to-pod replies must pass the node's conntrack to be
    // translated back (pods on one bridge reaching each other through a
    // cluster IP).
    if let Err(e) = std::fs::write("/proc/sys/net/bridge/bridge-nf-call-iptables", "1") {
        tracing::debug!(error = %e, "bridge netfilter is not available");
    }
    let mut changes = watch.subscribe();
    let changed = watch.changed();
    let sync = async {
        watch.ready().await;
        let mut state = SyncState::default();
        let mut next_resync = Instant::now() + config.resync;
        loop {
            if Instant::now() >= next_resync {
                state.applied = None;
                next_resync = Instant::now() + config.resync;
            }
            changes.mark_unchanged();
            match state
                .sync(&config, &watch.services, &watch.slices, &changed, &routes)
                .await
            {
                Ok(()) => {
                    tokio::select! {
                        r = changes.changed() => if r.is_err() { return },
                        _ = tokio::time::sleep_until(next_resync.into()) => {}
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "programming services failed; rewriting the table in 1s");
                    state.applied = None;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    };
    tokio::select! {
        _ = sync => {}
        _ = shutdown => {}
    }
    if let Err(e) = nft::apply(&nft::remove()).await {
        tracing::warn!(error = %e, "removing the service proxy's table");
    }
    routes.stop().await;
    tracing::info!("service proxy stopped; its rules and routes are removed");
    Ok(())
}

/// What the last successful sync wrote.
#[derive(Default)]
struct SyncState {
    /// The table's per-Service part; `None`: rewrite the whole table.
    applied: Option<nft::Table<ServiceKey>>,
    /// Each Service's cluster IPs that have ports programmed.
    cluster_ips: BTreeMap<ServiceKey, Vec<Ipv4Addr>>,
    /// Cluster IPs with a local route.
    routed: BTreeSet<Ipv4Addr>,
}

/// The ports of `services` (with the EndpointSlices among `slices`) the
/// proxy programs, by Service; Services whose cluster IP the node serves
/// itself (the cluster DNS) are left out.
pub fn ports_by_service<'a>(
    config: &Config,
    services: impl IntoIterator<Item = &'a ServiceView>,
    slices: impl IntoIterator<Item = &'a SliceView>,
) -> Vec<(ServiceKey, Vec<model::ServicePort>)> {
    let node_local = &config.network.node_local;
    model::with_slices(services, slices)
        .into_iter()
        .map(|(svc, slices)| {
            let key = (svc.namespace.clone(), svc.name.clone());
            let served_here =
                matches!(svc.cluster_ip, view::ClusterIp::Ip(ip) if node_local.contains(&ip));
            let ports = if served_here {
                Vec::new()
            } else {
                model::service_ports([svc], slices, &config.node)
                    .into_values()
                    .collect()
            };
            (key, ports)
        })
        .collect()
}

/// The ports now of each Service in `dirty` (none for one that is gone):
/// `services` are the dirty ones still present, `slices` all of them.
pub fn changed_ports<'a>(
    config: &Config,
    dirty: &BTreeSet<ServiceKey>,
    services: impl IntoIterator<Item = &'a ServiceView>,
    slices: impl IntoIterator<Item = &'a SliceView>,
) -> Vec<(ServiceKey, Vec<model::ServicePort>)> {
    let slices = slices
        .into_iter()
        .filter(|s| dirty.contains(&(s.namespace.clone(), s.service.clone())));
    let mut ports = ports_by_service(config, services, slices);
    let present: BTreeSet<ServiceKey> = ports.iter().map(|(k, _)| k.clone()).collect();
    ports.extend(
        dirty
            .iter()
            .filter(|k| !present.contains(*k))
            .map(|k| (k.clone(), Vec::new())),
    );
    ports
}

impl SyncState {
    async fn sync(
        &mut self,
        config: &Config,
        services: &Views<ServiceView>,
        slices: &Views<SliceView>,
        changed: &watch::Changed,
        routes: &routes::Routes,
    ) -> Result<(), Error> {
        let started = Instant::now();
        // Taken before the caches are read: a change after this is seen
        // in the caches now and again, harmlessly, next time.
        let dirty = changed.take();
        let full = self.applied.is_none();
        let (by_service, script) = match &mut self.applied {
            None => {
                let (services, slices) = (services.state(), slices.state());
                let ports = ports_by_service(
                    config,
                    services.iter().map(AsRef::as_ref),
                    slices.iter().map(AsRef::as_ref),
                );
                self.cluster_ips.clear();
                let (table, script) = nft::Table::full(&config.network, ports.iter().cloned());
                self.applied = Some(table);
                (ports, script)
            }
            Some(table) => {
                if dirty.is_empty() {
                    return Ok(());
                }
                let services: Vec<_> = dirty
                    .iter()
                    .filter_map(|(ns, name)| services.get(ns, name))
                    .collect();
                let slices = slices.state();
                let ports = changed_ports(
                    config,
                    &dirty,
                    services.iter().map(AsRef::as_ref),
                    slices.iter().map(AsRef::as_ref),
                );
                let script = table.update(&config.network, ports.iter().cloned());
                (ports, script)
            }
        };
        if !script.is_empty()
            && let Err(e) = nft::apply(&script).await
        {
            self.applied = None;
            return Err(e);
        }
        let table = self.applied.as_mut().expect("set above");
        table.applied();
        let (chains, sets, elements) = table.size();
        let changed_services = by_service.len();
        for (key, ports) in by_service {
            let ips: Vec<Ipv4Addr> = ports.iter().filter_map(|p| p.cluster_ip).collect();
            if ips.is_empty() {
                self.cluster_ips.remove(&key);
            } else {
                self.cluster_ips.insert(key, ips);
            }
        }
        let wanted: BTreeSet<Ipv4Addr> = self
            .cluster_ips
            .values()
            .flatten()
            .chain(config.network.node_local.iter())
            .copied()
            .collect();
        routes.sync(&self.routed, &wanted).await?;
        self.routed = wanted;
        if full || !script.is_empty() {
            tracing::debug!(
                full,
                services = changed_services,
                chains,
                sets,
                elements,
                lines = script.lines().count(),
                took_ms = started.elapsed().as_secs_f64() * 1e3,
                "services programmed"
            );
        }
        Ok(())
    }
}
