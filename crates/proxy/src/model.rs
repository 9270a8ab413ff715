//! What the node should do for each Service port, computed from Services and
//! EndpointSlices alone (no IO): the addresses it is reached at and the
//! endpoints each kind of traffic goes to, chosen as kube-proxy chooses them
//! (ready endpoints; serving-and-terminating ones when none is ready; only
//! this node's under a `Local` traffic policy).

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::view::{ClusterIp, ServiceType, ServiceView, SliceEndpoint, SliceView};

/// The label an EndpointSlice names its Service with.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// A transport protocol a Service port can have.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// A Kubernetes protocol name (TCP when absent).
    pub fn parse(s: Option<&str>) -> Option<Self> {
        match s.unwrap_or("TCP") {
            "TCP" => Some(Self::Tcp),
            "UDP" => Some(Self::Udp),
            "SCTP" => Some(Self::Sctp),
            _ => None,
        }
    }

    /// The name nftables gives it.
    pub fn nft(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Sctp => "sctp",
        }
    }
}

/// One port of one Service: kube-proxy's `ServicePortName`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortName {
    pub namespace: String,
    pub name: String,
    /// The port's name (empty for a Service's only, unnamed port).
    pub port: String,
    pub protocol: Protocol,
}

impl std::fmt::Display for PortName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{}/{}/{}",
            self.namespace,
            self.name,
            self.protocol.nft(),
            self.port
        )
    }
}

/// An endpoint traffic may be sent to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    pub port: u16,
}

/// Everything the node does for one Service port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub name: PortName,
    pub cluster_ip: Option<Ipv4Addr>,
    pub port: u16,
    pub node_port: Option<u16>,
    /// Load-balancer ingress IPs (ServiceLB's are the nodes' addresses) and
    /// `spec.externalIPs`: reached like the node port, on the service port.
    pub external_ips: Vec<Ipv4Addr>,
    /// `sessionAffinity: ClientIP`: how long a client sticks to its endpoint.
    pub affinity_seconds: Option<u32>,
    /// Where traffic to the cluster IP goes.
    pub cluster_endpoints: Vec<Endpoint>,
    /// Where traffic from outside (node port, external IPs) goes; the same as
    /// `cluster_endpoints` unless `externalTrafficPolicy: Local`.
    pub external_endpoints: Vec<Endpoint>,
    /// `externalTrafficPolicy: Local`: external traffic keeps its source
    /// address (no masquerade) and only reaches this node's endpoints.
    pub external_local: bool,
}

impl ServicePort {
    /// Whether the port is reached from outside the cluster network at all.
    pub fn external(&self) -> bool {
        self.node_port.is_some() || !self.external_ips.is_empty()
    }
}

/// One endpoint as a slice describes it.
#[derive(Clone, Copy, Debug)]
struct Candidate {
    endpoint: Endpoint,
    ready: bool,
    serving: bool,
    terminating: bool,
    local: bool,
}

/// kube-proxy's choice: ready endpoints, else those still serving while
/// they terminate (so connections drain instead of being refused).
fn usable(candidates: &[Candidate], only_local: bool) -> Vec<Endpoint> {
    let pool: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| !only_local || c.local)
        .collect();
    let ready: Vec<Endpoint> = pool
        .iter()
        .filter(|c| c.ready)
        .map(|c| c.endpoint)
        .collect();
    let mut chosen = if ready.is_empty() {
        pool.iter()
            .filter(|c| c.serving && c.terminating)
            .map(|c| c.endpoint)
            .collect()
    } else {
        ready
    };
    chosen.sort();
    chosen.dedup();
    chosen
}

/// Each Service with its EndpointSlices, in the order of `services`.
pub fn with_slices<'a>(
    services: impl IntoIterator<Item = &'a ServiceView>,
    slices: impl IntoIterator<Item = &'a SliceView>,
) -> Vec<(&'a ServiceView, Vec<&'a SliceView>)> {
    let mut by_service: HashMap<(&str, &str), Vec<&SliceView>> = HashMap::new();
    for s in slices {
        by_service
            .entry((s.namespace.as_str(), s.service.as_str()))
            .or_default()
            .push(s);
    }
    services
        .into_iter()
        .map(|svc| {
            let key = (svc.namespace.as_str(), svc.name.as_str());
            (svc, by_service.remove(&key).unwrap_or_default())
        })
        .collect()
}

/// The Service ports of all Services, keyed by name.
pub fn service_ports<'a>(
    services: impl IntoIterator<Item = &'a ServiceView>,
    slices: impl IntoIterator<Item = &'a SliceView>,
    node: &str,
) -> BTreeMap<PortName, ServicePort> {
    let mut out = BTreeMap::new();
    for (svc, slices) in with_slices(services, slices) {
        for p in service(svc, &slices, node) {
            out.insert(p.name.clone(), p);
        }
    }
    out
}

/// Where each endpoint of `slices` listens for the Service port `name`
/// over `protocol`: a slice's port of the same name and protocol says.
fn targets<'a>(
    slices: &'a [&'a SliceView],
    name: &'a str,
    protocol: Protocol,
) -> impl Iterator<Item = (&'a SliceEndpoint, Endpoint)> + 'a {
    slices.iter().copied().flat_map(move |slice| {
        let target = slice
            .ports
            .iter()
            .find(|sp| sp.name == name && sp.protocol == protocol)
            .map(|sp| sp.port);
        target.into_iter().flat_map(move |port| {
            slice.endpoints.iter().flat_map(move |e| {
                e.addresses
                    .iter()
                    .map(move |&ip| (e, Endpoint { ip, port }))
            })
        })
    })
}

fn service(svc: &ServiceView, slices: &[&SliceView], node: &str) -> Vec<ServicePort> {
    if matches!(svc.type_, ServiceType::ExternalName(_)) {
        return Vec::new();
    }
    let cluster_ip = match svc.cluster_ip {
        ClusterIp::Headless => return Vec::new(),
        ClusterIp::Ip(ip) => Some(ip),
        ClusterIp::Unset => None,
    };
    let mut out = Vec::new();
    for p in &svc.ports {
        let candidates: Vec<Candidate> = targets(slices, &p.name, p.protocol)
            .map(|(e, endpoint)| Candidate {
                endpoint,
                ready: e.ready && !e.terminating,
                serving: e.serving,
                terminating: e.terminating,
                local: e.node.as_deref() == Some(node),
            })
            .collect();
        let cluster_endpoints = usable(&candidates, svc.internal_local);
        let external_endpoints = usable(&candidates, svc.external_local);
        out.push(ServicePort {
            name: PortName {
                namespace: svc.namespace.clone(),
                name: svc.name.clone(),
                port: p.name.clone(),
                protocol: p.protocol,
            },
            cluster_ip,
            port: p.port,
            node_port: p.node_port,
            external_ips: svc.external_ips.clone(),
            affinity_seconds: svc.affinity_seconds,
            cluster_endpoints,
            external_endpoints,
            external_local: svc.external_local,
        });
    }
    out
}

/// One endpoint behind a Service's address, with the pod it is (the
/// slice's `targetRef`): pods that share their node's network share its
/// address, so only the pod says where it really listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    pub endpoint: Endpoint,
    /// The pod's namespace and name.
    pub pod: Option<(String, String)>,
}

/// The endpoints a TCP connection to `to` reaches when `to` is a Service's
/// cluster IP and port, chosen as the rules choose them (ready ones, else
/// serving ones that terminate); `None` when `to` is no Service's. For
/// connections resolved in-process where no rules are programmed.
pub fn backends<'a>(
    services: impl IntoIterator<Item = &'a ServiceView>,
    slices: impl IntoIterator<Item = &'a SliceView>,
    to: std::net::SocketAddrV4,
) -> Option<Vec<Backend>> {
    let (svc, port) = services.into_iter().find_map(|svc| {
        if svc.cluster_ip != ClusterIp::Ip(*to.ip()) {
            return None;
        }
        let port = svc
            .ports
            .iter()
            .find(|p| p.port == to.port() && p.protocol == Protocol::Tcp)?;
        Some((svc, port))
    })?;
    let slices: Vec<&SliceView> = slices
        .into_iter()
        .filter(|s| s.namespace == svc.namespace && s.service == svc.name)
        .collect();
    let mut ready = Vec::new();
    let mut draining = Vec::new();
    for (e, endpoint) in targets(&slices, &port.name, Protocol::Tcp) {
        let b = Backend {
            endpoint,
            pod: e.pod.clone(),
        };
        if e.ready && !e.terminating {
            ready.push(b);
        } else if e.serving && e.terminating {
            draining.push(b);
        }
    }
    Some(if ready.is_empty() { draining } else { ready })
}

/// The node-wide facts the rules depend on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeNetwork {
    /// Pod addresses of the whole cluster (`--cluster-cidr`): traffic from
    /// them to a cluster IP keeps its source; traffic from them leaving the
    /// range is masqueraded.
    pub cluster_cidr: Option<Ipv4Net>,
    /// Service cluster IPs (`--service-cluster-ip-range`).
    pub service_cidr: Ipv4Net,
    /// Cluster IPs served by the node itself (the cluster DNS address):
    /// routed to the node and delivered there, never translated.
    pub node_local: Vec<std::net::Ipv4Addr>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        LoadBalancerIngress, LoadBalancerStatus, Service, ServicePort as K8sPort, ServiceSpec,
        ServiceStatus,
    };
    use k8s_openapi::api::discovery::v1::{
        Endpoint as K8sEndpoint, EndpointConditions, EndpointPort, EndpointSlice,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn svc(name: &str, spec: ServiceSpec) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                ..Default::default()
            },
            spec: Some(spec),
            status: None,
        }
    }

    fn http_spec(ty: &str) -> ServiceSpec {
        ServiceSpec {
            type_: Some(ty.into()),
            cluster_ip: Some("10.96.0.10".into()),
            ports: Some(vec![K8sPort {
                name: Some("http".into()),
                port: 80,
                node_port: (ty != "ClusterIP").then_some(30080),
                ..Default::default()
            }]),
            ..Default::default()
        }
    }

    fn ep(ip: &str, node: &str, ready: bool, serving: bool, terminating: bool) -> K8sEndpoint {
        K8sEndpoint {
            addresses: vec![ip.into()],
            node_name: Some(node.into()),
            conditions: Some(EndpointConditions {
                ready: Some(ready),
                serving: Some(serving),
                terminating: Some(terminating),
            }),
            ..Default::default()
        }
    }

    fn slice(service: &str, endpoints: Vec<K8sEndpoint>) -> EndpointSlice {
        EndpointSlice {
            address_type: "IPv4".into(),
            metadata: ObjectMeta {
                name: Some(format!("{service}-abc")),
                namespace: Some("ns".into()),
                labels: Some([(SERVICE_NAME_LABEL.to_owned(), service.to_owned())].into()),
                ..Default::default()
            },
            endpoints,
            ports: Some(vec![EndpointPort {
                name: Some("http".into()),
                port: Some(8080),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
        }
    }

    fn sv(services: &[Service]) -> Vec<ServiceView> {
        services.iter().filter_map(ServiceView::of).collect()
    }

    fn lv(slices: &[EndpointSlice]) -> Vec<SliceView> {
        slices.iter().filter_map(SliceView::of).collect()
    }

    fn one(services: &[Service], slices: &[EndpointSlice]) -> ServicePort {
        let mut ports = service_ports(&sv(services), &lv(slices), "n1");
        assert_eq!(ports.len(), 1, "{ports:?}");
        ports.pop_first().unwrap().1
    }

    fn ips(e: &[Endpoint]) -> Vec<String> {
        e.iter().map(|e| format!("{}:{}", e.ip, e.port)).collect()
    }

    #[test]
    fn ready_endpoints_only_and_terminating_ones_as_a_fallback() {
        let s = svc("web", http_spec("ClusterIP"));
        let p = one(
            std::slice::from_ref(&s),
            &[slice(
                "web",
                vec![
                    ep("10.244.0.5", "n1", true, true, false),
                    ep("10.244.0.6", "n1", false, false, false),
                    ep("10.244.0.7", "n2", false, true, true),
                ],
            )],
        );
        assert_eq!(p.name.to_string(), "ns/web/tcp/http");
        assert_eq!(p.cluster_ip, Some("10.96.0.10".parse().unwrap()));
        assert_eq!(ips(&p.cluster_endpoints), ["10.244.0.5:8080"]);
        assert!(!p.external());
        let p = one(
            &[s],
            &[slice(
                "web",
                vec![
                    ep("10.244.0.6", "n1", false, false, false),
                    ep("10.244.0.7", "n2", false, true, true),
                ],
            )],
        );
        assert_eq!(ips(&p.cluster_endpoints), ["10.244.0.7:8080"]);
    }

    #[test]
    fn backends_of_a_service_address_name_their_pods() {
        let s = sv(&[svc("web", http_spec("ClusterIP"))]);
        let mut a = ep("192.168.1.2", "n1", true, true, false);
        a.target_ref = Some(k8s_openapi::api::core::v1::ObjectReference {
            kind: Some("Pod".into()),
            name: Some("web-a".into()),
            namespace: Some("ns".into()),
            ..Default::default()
        });
        let draining = ep("192.168.1.2", "n1", false, true, true);
        let slices = [slice("web", vec![a, draining.clone()])];
        let to = |a: &str| a.parse::<std::net::SocketAddrV4>().unwrap();
        let found = backends(&s, &lv(&slices), to("10.96.0.10:80")).unwrap();
        assert_eq!(
            found,
            [Backend {
                endpoint: Endpoint {
                    ip: "192.168.1.2".parse().unwrap(),
                    port: 8080
                },
                pod: Some(("ns".into(), "web-a".into())),
            }]
        );
        // Another port, another address: no Service's.
        assert!(backends(&s, &lv(&slices), to("10.96.0.10:81")).is_none());
        assert!(backends(&s, &lv(&slices), to("10.96.0.11:80")).is_none());
        // Only a terminating endpoint still serving: it is used.
        let only = [slice("web", vec![draining])];
        assert_eq!(
            backends(&s, &lv(&only), to("10.96.0.10:80")).unwrap().len(),
            1
        );
        assert!(backends(&s, &[], to("10.96.0.10:80")).unwrap().is_empty());
    }

    #[test]
    fn local_traffic_policies_keep_to_this_nodes_endpoints() {
        let mut spec = http_spec("NodePort");
        spec.external_traffic_policy = Some("Local".into());
        let slices = [slice(
            "web",
            vec![
                ep("10.244.0.5", "n1", true, true, false),
                ep("10.244.1.5", "n2", true, true, false),
            ],
        )];
        let p = one(&[svc("web", spec.clone())], &slices);
        assert!(p.external_local);
        assert_eq!(p.node_port, Some(30080));
        assert_eq!(ips(&p.cluster_endpoints).len(), 2);
        assert_eq!(ips(&p.external_endpoints), ["10.244.0.5:8080"]);
        spec.external_traffic_policy = None;
        spec.internal_traffic_policy = Some("Local".into());
        let p = one(&[svc("web", spec)], &slices);
        assert_eq!(ips(&p.cluster_endpoints), ["10.244.0.5:8080"]);
        assert_eq!(ips(&p.external_endpoints).len(), 2);
    }

    #[test]
    fn load_balancer_ingress_affinity_and_what_is_not_proxied() {
        let mut spec = http_spec("LoadBalancer");
        spec.session_affinity = Some("ClientIP".into());
        let mut lb = svc("lb", spec);
        lb.status = Some(ServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: Some(vec![LoadBalancerIngress {
                    ip: Some("192.168.1.2".into()),
                    ..Default::default()
                }]),
            }),
            ..Default::default()
        });
        let p = one(&[lb], &[]);
        assert_eq!(p.external_ips, ["192.168.1.2".parse::<Ipv4Addr>().unwrap()]);
        assert_eq!(p.affinity_seconds, Some(10_800));
        assert!(p.cluster_endpoints.is_empty());

        let mut headless = http_spec("ClusterIP");
        headless.cluster_ip = Some("None".into());
        let external = ServiceSpec {
            type_: Some("ExternalName".into()),
            external_name: Some("example.org".into()),
            ..Default::default()
        };
        let ports = service_ports(
            &sv(&[svc("headless", headless), svc("ext", external)]),
            &lv(&[slice(
                "headless",
                vec![ep("10.244.0.5", "n1", true, true, false)],
            )]),
            "n1",
        );
        assert!(ports.is_empty(), "{ports:?}");
    }
}
