//! Services and NetworkPolicy for Wasm guests on a node whose pods share
//! its network (no pod network, so no service proxy can route to them and
//! no node rules can filter them): a guest's connection to a Service's
//! address goes, in-process, to one of its ready endpoints at the node port
//! where that pod really listens; and its connections, and those its HTTP
//! server accepts, are allowed or refused in-process as the pods'
//! NetworkPolicies say.

use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use k8s_openapi::api::core::v1::Pod;

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

/// NetworkPolicy decisions for pods on the node's network, taken where
/// their guests connect and accept.
pub trait NetworkPolicies: Send + Sync + std::fmt::Debug {
    /// Whether `from` (a pod of this node on its network) may open a
    /// connection to `to` (or send it a datagram) over `transport`;
    /// `to_pod` is the pod of this node listening there and its container
    /// port, when one does.
    fn may_connect(
        &self,
        from: &Pod,
        to: SocketAddr,
        to_pod: Option<(&Pod, u16)>,
        transport: wasmkube_runtime::Transport,
    ) -> bool;

    /// Whether `to` (a pod of this node on its network) may accept a
    /// connection from `from` at its container port `port`.
    fn may_accept(&self, to: &Pod, from: SocketAddr, port: u16) -> bool;
}

/// The routes and policy decisions of one guest's pod.
#[derive(Debug)]
pub(crate) struct NodeRoutes {
    backends: Option<Arc<dyn ServiceBackends>>,
    policies: Option<Arc<dyn NetworkPolicies>>,
    /// The guest's pod.
    pod: Arc<Pod>,
    ctx: Weak<Ctx>,
    /// Where the node's pods listen: its address.
    address: IpAddr,
    /// Spreads connections over the endpoints in turn.
    next: AtomicUsize,
}

impl NodeRoutes {
    pub(crate) fn new(pod: Arc<Pod>, ctx: &Arc<Ctx>) -> Arc<Self> {
        Arc::new(Self {
            backends: ctx.config.service_backends.clone(),
            policies: ctx.config.network_policies.clone(),
            pod,
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
        let backends = self.backends.as_ref()?.backends(v4)?;
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

    fn may_connect(&self, to: SocketAddr, transport: wasmkube_runtime::Transport) -> bool {
        let (Some(policies), Some(ctx)) = (&self.policies, self.ctx.upgrade()) else {
            return true;
        };
        // Node ports serve TCP only.
        let to_pod = (to.ip() == self.address && transport == wasmkube_runtime::Transport::Tcp)
            .then(|| ctx.pod_at_node_port(to.port()))
            .flatten();
        if to_pod.is_none() && (to.ip() == self.address || to.ip().is_loopback()) {
            // The node itself: always allowed, as Kubernetes says.
            return true;
        }
        policies.may_connect(
            &self.pod,
            to,
            to_pod.as_ref().map(|(p, port)| (&**p, *port)),
            transport,
        )
    }

    fn may_accept(&self, from: SocketAddr, local: SocketAddr) -> bool {
        let (Some(policies), Some(ctx)) = (&self.policies, self.ctx.upgrade()) else {
            return true;
        };
        if from.ip() == self.address || from.ip().is_loopback() {
            // From the node (its own processes, and this node's guests,
            // whose connections were decided as they were opened).
            return true;
        }
        // The container port behind the node port the guest listens at.
        let port = ctx
            .pod_at_node_port(local.port())
            .map_or(local.port(), |(_, port)| port);
        policies.may_accept(&self.pod, from, port)
    }
}
