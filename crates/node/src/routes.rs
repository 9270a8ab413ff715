//! Services for Wasm guests on a node whose pods share its network (no pod
//! network, so no service proxy can route to them): a guest's connection to
//! a Service's address goes, in-process, to one of its ready endpoints at
//! the node port where that pod really listens.

use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use crate::Ctx;

/// One endpoint behind a Service's address: where the EndpointSlice says it
/// is, and the pod it is (namespace, name).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceBackend {
    pub addr: SocketAddr,
    pub pod: Option<(String, String)>,
}

/// The ready endpoints behind a Service's cluster IP and port, as the
/// service proxy would choose them (`None`: no Service has that address).
pub trait ServiceBackends: Send + Sync + std::fmt::Debug {
    fn backends(&self, to: SocketAddrV4) -> Option<Vec<ServiceBackend>>;
}

/// The routes the node's guests use.
#[derive(Debug)]
pub(crate) struct NodeRoutes {
    backends: Arc<dyn ServiceBackends>,
    ctx: Weak<Ctx>,
    /// Where the node's pods listen: its address.
    address: IpAddr,
    /// Spreads connections over the endpoints in turn.
    next: AtomicUsize,
}

impl NodeRoutes {
    pub(crate) fn new(backends: Arc<dyn ServiceBackends>, ctx: &Arc<Ctx>) -> Arc<Self> {
        Arc::new(Self {
            backends,
            ctx: Arc::downgrade(ctx),
            address: ctx.config.address,
            next: AtomicUsize::new(0),
        })
    }

    /// Where `backend` really listens: a pod of this node that shares its
    /// network listens at the node port its container port is mapped to;
    /// any other endpoint where the slice says.
    fn locate(&self, ctx: &Ctx, backend: &ServiceBackend) -> SocketAddr {
        let mapped = backend.pod.as_ref().and_then(|(ns, name)| {
            let state = ctx.pod_state(ns, name)?;
            let st = state.lock().expect("pod state");
            st.node_ports
                .iter()
                .find(|m| m.container_port == backend.addr.port())
                .map(|m| SocketAddr::new(self.address, m.node_port))
        });
        mapped.unwrap_or(backend.addr)
    }
}

impl wasmkube_runtime::ServiceRoutes for NodeRoutes {
    fn route(&self, to: SocketAddr) -> Option<SocketAddr> {
        let SocketAddr::V4(v4) = to else {
            return None;
        };
        let backends = self.backends.backends(v4)?;
        let ctx = self.ctx.upgrade()?;
        if backends.is_empty() {
            // A Service with no ready endpoint: as the proxy's rules, the
            // connection is refused (its address routes nowhere).
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % backends.len();
        Some(self.locate(&ctx, &backends[i]))
    }

    fn is_endpoint(&self, to: SocketAddr) -> bool {
        to.ip() == self.address
            && self
                .ctx
                .upgrade()
                .is_some_and(|ctx| ctx.node_ports.lock().expect("node ports").holds(to.port()))
    }
}
