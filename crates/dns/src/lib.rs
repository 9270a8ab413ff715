//! Cluster DNS, run beside every node agent (a node-local CoreDNS with its
//! `kubernetes` plugin, in the binary). It watches Services and
//! EndpointSlices, keeps the cluster domain's records in memory ([`zone`])
//! and serves them over UDP and TCP on the cluster DNS address
//! (`--cluster-dns`, the `kube-dns` Service's cluster IP), which the node's
//! service proxy routes to the node itself; names outside the cluster
//! domain are relayed to the node's own resolvers ([`server`]).
//!
//! The same records answer in-process lookups ([`Resolver`]): a Wasm guest
//! runs inside the agent, so its name lookups need no socket at all.

pub mod server;
pub mod zone;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, RwLock};

use wasmkube_proxy::ServiceWatch;

pub use zone::Zone;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// How a node's DNS is set up.
#[derive(Clone, Debug)]
pub struct Config {
    /// The cluster domain (`cluster.local`).
    pub domain: String,
    /// Where it serves: the cluster DNS address, port 53. `None`: no
    /// listener, in-process lookups only (an agent that is not root).
    pub listen: Option<SocketAddr>,
    /// The node's own resolvers, for every other name.
    pub upstreams: Vec<SocketAddr>,
}

impl Config {
    /// The node's resolvers from `/etc/resolv.conf`, leaving out `skip`
    /// (the cluster DNS itself: asking it would loop).
    pub fn upstreams_from_resolv_conf(skip: &[IpAddr]) -> Vec<SocketAddr> {
        std::fs::read_to_string("/etc/resolv.conf")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().strip_prefix("nameserver"))
            .filter_map(|ip| ip.trim().parse::<IpAddr>().ok())
            .filter(|ip| !skip.contains(ip))
            .map(|ip| SocketAddr::new(ip, 53))
            .collect()
    }
}

/// Binds a socket to `addr` even when the address is not (yet) the node's:
/// the cluster DNS address is routed locally by the service proxy.
fn bind(addr: SocketAddr, ty: socket2::Type) -> std::io::Result<socket2::Socket> {
    let domain = socket2::Domain::for_address(addr);
    let socket = socket2::Socket::new(domain, ty, None)?;
    socket.set_freebind_v4(true)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket)
}

/// The cluster's records, for in-process lookups.
#[derive(Clone)]
pub struct Resolver {
    state: Arc<server::State>,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver").finish_non_exhaustive()
    }
}

/// A name did not resolve.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("no such host {0:?}")]
    NotFound(String),
    #[error("looking up {name:?}: {source}")]
    Io {
        name: String,
        #[source]
        source: std::io::Error,
    },
}

impl Resolver {
    /// An empty zone for `domain`, filled by [`run`].
    pub fn new(config: &Config) -> Self {
        Self {
            state: Arc::new(server::State {
                zone: RwLock::new(Arc::new(Zone::new(&config.domain))),
                upstreams: config.upstreams.clone(),
            }),
        }
    }

    /// Resolves `host` as a pod's stub resolver would with these search
    /// domains and `ndots`: a name with fewer dots is tried under each
    /// search domain first, then as it is (a trailing dot means as it is
    /// only). Cluster names come from the zone; other names from the
    /// node's resolver.
    pub async fn lookup(
        &self,
        host: &str,
        search: &[String],
        ndots: usize,
    ) -> Result<Vec<IpAddr>, LookupError> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(vec![ip]);
        }
        let zone = self.state.zone();
        let candidates = candidates(host, search, ndots);
        let mut failed = None;
        for name in candidates {
            if zone.is_ours(&name) {
                if let Some(ips) = zone.addresses(&name) {
                    return Ok(ips.into_iter().map(IpAddr::V4).collect());
                }
                continue;
            }
            let looked_up = tokio::net::lookup_host((name.as_str(), 0))
                .await
                .map(|addrs| addrs.map(|a| a.ip()).collect::<Vec<IpAddr>>());
            match looked_up {
                Ok(ips) => {
                    if !ips.is_empty() {
                        return Ok(ips);
                    }
                }
                // The node's resolver could not answer (as opposed to: no
                // such name): said if nothing else answers either.
                Err(source) => failed = Some(LookupError::Io { name, source }),
            }
        }
        Err(failed.unwrap_or_else(|| LookupError::NotFound(host.to_owned())))
    }
}

impl Resolver {
    /// The addresses of `host` if, with these search domains and `ndots`,
    /// it names something in the cluster domain that has addresses: the
    /// part of [`Resolver::lookup`] that needs no upstream, answered
    /// synchronously. `None` otherwise.
    pub fn lookup_cluster(
        &self,
        host: &str,
        search: &[String],
        ndots: usize,
    ) -> Option<Vec<IpAddr>> {
        let zone = self.state.zone();
        candidates(host, search, ndots)
            .iter()
            .filter(|name| zone.is_ours(name))
            .find_map(|name| zone.addresses(name))
            .map(|ips| ips.into_iter().map(IpAddr::V4).collect())
    }
}

/// The names a stub resolver tries for `host`, in order: a name with fewer
/// than `ndots` dots under each search domain first, then as it is (a
/// trailing dot means as it is only).
fn candidates(host: &str, search: &[String], ndots: usize) -> Vec<String> {
    let absolute = host.ends_with('.');
    let bare = host.trim_end_matches('.');
    let searched: Vec<String> = if absolute {
        Vec::new()
    } else {
        search.iter().map(|s| format!("{bare}.{s}")).collect()
    };
    let mut out = Vec::new();
    if absolute || bare.matches('.').count() >= ndots {
        out.push(bare.to_owned());
        out.extend(searched);
    } else {
        out.extend(searched);
        out.push(bare.to_owned());
    }
    out
}

/// Keeps the zone current from watches and, with a listen address, serves
/// it, until the future is dropped.
pub async fn run(watch: ServiceWatch, config: Config, resolver: Resolver) -> Result<(), Error> {
    let state = resolver.state.clone();
    let mut listeners = Vec::new();
    if let Some(addr) = config.listen {
        let listen = |source| Error::Listen { addr, source };
        let udp: std::net::UdpSocket = bind(addr, socket2::Type::DGRAM).map_err(listen)?.into();
        let tcp = bind(addr, socket2::Type::STREAM).map_err(listen)?;
        tcp.listen(1024).map_err(listen)?;
        let tcp = tokio::net::TcpListener::from_std(tcp.into()).map_err(listen)?;
        let (udp_state, rt) = (state.clone(), tokio::runtime::Handle::current());
        std::thread::Builder::new()
            .name("cluster-dns".into())
            .spawn(move || {
                if let Err(e) = server::serve_udp(udp, udp_state, rt) {
                    tracing::error!(error = %e, "cluster DNS (UDP) stopped");
                }
            })
            .map_err(listen)?;
        listeners.push(tokio::spawn(server::serve_tcp(tcp, state.clone())));
        tracing::info!(%addr, domain = %config.domain, upstreams = ?config.upstreams, "cluster DNS serving");
    }
    let _abort = AbortOnDrop(listeners);
    let mut changes = watch.subscribe();
    watch.ready().await;
    loop {
        changes.mark_unchanged();
        let zone = Zone::build(
            &config.domain,
            watch.services.state().iter().map(AsRef::as_ref),
            watch.slices.state().iter().map(AsRef::as_ref),
        );
        *state.zone.write().expect("zone lock") = Arc::new(zone);
        if changes.changed().await.is_err() {
            return Ok(());
        }
    }
}

struct AbortOnDrop(Vec<tokio::task::JoinHandle<std::io::Result<()>>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// The default cluster DNS address: the tenth of the service range, as
/// kubeadm picks it.
pub fn default_address(service_range: Ipv4Addr) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(service_range) + 10)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn cluster_names_resolve_with_the_search_path_and_others_are_left_alone() {
        let resolver = Resolver::new(&Config {
            domain: "cluster.local".into(),
            listen: None,
            upstreams: Vec::new(),
        });
        let svc: k8s_openapi::api::core::v1::Service = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.0.20", "ports": [{"port": 80}]},
        }))
        .unwrap();
        *resolver.state.zone.write().unwrap() = Arc::new(Zone::build(
            "cluster.local",
            wasmkube_proxy::ServiceView::of(&svc).as_ref(),
            [],
        ));
        let search: Vec<String> = [
            "shop.svc.cluster.local",
            "svc.cluster.local",
            "cluster.local",
        ]
        .map(str::to_owned)
        .to_vec();
        let web: Vec<IpAddr> = vec!["10.96.0.20".parse().unwrap()];
        for name in [
            "web",
            "web.shop",
            "web.shop.svc.cluster.local",
            "web.shop.svc.cluster.local.",
        ] {
            assert_eq!(
                resolver.lookup_cluster(name, &search, 5),
                Some(web.clone()),
                "{name}"
            );
        }
        for name in ["web.other", "example.org", "nope"] {
            assert_eq!(resolver.lookup_cluster(name, &search, 5), None, "{name}");
        }
    }
}
