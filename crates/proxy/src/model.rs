//! What the node should do for each Service port, computed from Services and
//! EndpointSlices alone (no IO): the addresses it is reached at and the
//! endpoints each kind of traffic goes to, chosen as kube-proxy chooses them
//! (ready endpoints; serving-and-terminating ones when none is ready; only
//! this node's under a `Local` traffic policy).

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

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

/// Each Service with its IPv4 EndpointSlices (found by their
/// `kubernetes.io/service-name` label), in the order of `services`.
pub fn with_slices<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
) -> Vec<(&'a Service, Vec<&'a EndpointSlice>)> {
    let mut by_service: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::new();
    for s in slices {
        if s.address_type != "IPv4" {
            continue;
        }
        if let Some(service) = s
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
        {
            let ns = s.metadata.namespace.as_deref().unwrap_or_default();
            by_service
                .entry((ns, service.as_str()))
                .or_default()
                .push(s);
        }
    }
    services
        .into_iter()
        .map(|svc| {
            let ns = svc.metadata.namespace.as_deref().unwrap_or_default();
            let name = svc.metadata.name.as_deref().unwrap_or_default();
            (svc, by_service.remove(&(ns, name)).unwrap_or_default())
        })
        .collect()
}

/// The Service ports of all Services, keyed by name.
pub fn service_ports<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
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

fn service(svc: &Service, slices: &[&EndpointSlice], node: &str) -> Vec<ServicePort> {
    let Some(spec) = &svc.spec else {
        return Vec::new();
    };
    let ty = spec.type_.as_deref().unwrap_or("ClusterIP");
    if ty == "ExternalName" {
        return Vec::new();
    }
    let cluster_ip = spec
        .cluster_ip
        .as_deref()
        .and_then(|ip| ip.parse::<Ipv4Addr>().ok());
    let headless = spec.cluster_ip.as_deref() == Some("None");
    if headless {
        return Vec::new();
    }
    let mut external_ips: Vec<Ipv4Addr> = spec
        .external_ips
        .iter()
        .flatten()
        .filter_map(|ip| ip.parse().ok())
        .collect();
    if ty == "LoadBalancer" {
        external_ips.extend(
            svc.status
                .as_ref()
                .and_then(|s| s.load_balancer.as_ref())
                .and_then(|lb| lb.ingress.as_ref())
                .into_iter()
                .flatten()
                .filter_map(|i| i.ip.as_deref()?.parse::<Ipv4Addr>().ok()),
        );
    }
    external_ips.sort();
    external_ips.dedup();
    let affinity_seconds = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .and_then(|t| u32::try_from(t).ok())
            .filter(|t| *t > 0)
            .unwrap_or(10_800)
    });
    let internal_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    let external_local = spec.external_traffic_policy.as_deref() == Some("Local")
        && matches!(ty, "NodePort" | "LoadBalancer");
    let mut out = Vec::new();
    for p in spec.ports.iter().flatten() {
        let Some(protocol) = Protocol::parse(p.protocol.as_deref()) else {
            continue;
        };
        let Ok(port) = u16::try_from(p.port) else {
            continue;
        };
        let port_name = p.name.clone().unwrap_or_default();
        // A slice's port of the same name and protocol says where each of
        // its endpoints listens for this service port.
        let mut candidates = Vec::new();
        for slice in slices {
            let Some(target) = slice.ports.iter().flatten().find(|sp| {
                sp.name.clone().unwrap_or_default() == port_name
                    && Protocol::parse(sp.protocol.as_deref()) == Some(protocol)
            }) else {
                continue;
            };
            let Some(target) = target.port.and_then(|p| u16::try_from(p).ok()) else {
                continue;
            };
            for e in &slice.endpoints {
                let c = e.conditions.as_ref();
                // Kubernetes: a missing `ready` means ready, `serving`
                // defaults to `ready`, `terminating` to false.
                let ready = c.and_then(|c| c.ready).unwrap_or(true);
                let serving = c.and_then(|c| c.serving).unwrap_or(ready);
                let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
                let local = e.node_name.as_deref() == Some(node);
                for ip in e.addresses.iter().filter_map(|a| a.parse().ok()) {
                    candidates.push(Candidate {
                        endpoint: Endpoint { ip, port: target },
                        ready: ready && !terminating,
                        serving,
                        terminating,
                        local,
                    });
                }
            }
        }
        let cluster_endpoints = usable(&candidates, internal_local);
        let external_endpoints = if external_local {
            usable(&candidates, true)
        } else {
            usable(&candidates, false)
        };
        let node_port = p
            .node_port
            .filter(|_| matches!(ty, "NodePort" | "LoadBalancer"))
            .and_then(|n| u16::try_from(n).ok());
        out.push(ServicePort {
            name: PortName {
                namespace: svc.metadata.namespace.clone().unwrap_or_default(),
                name: svc.metadata.name.clone().unwrap_or_default(),
                port: port_name,
                protocol,
            },
            cluster_ip,
            port,
            node_port,
            external_ips: external_ips.clone(),
            affinity_seconds,
            cluster_endpoints,
            external_endpoints,
            external_local,
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
    services: impl IntoIterator<Item = &'a Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    to: std::net::SocketAddrV4,
) -> Option<Vec<Backend>> {
    let ip = to.ip().to_string();
    let (svc, port) = services.into_iter().find_map(|svc| {
        let spec = svc.spec.as_ref()?;
        if spec.cluster_ip.as_deref() != Some(ip.as_str()) {
            return None;
        }
        let port = spec.ports.iter().flatten().find(|p| {
            p.port == i32::from(to.port())
                && Protocol::parse(p.protocol.as_deref()) == Some(Protocol::Tcp)
        })?;
        Some((svc, port))
    })?;
    let ns = svc.metadata.namespace.as_deref().unwrap_or_default();
    let name = svc.metadata.name.as_deref().unwrap_or_default();
    let port_name = port.name.clone().unwrap_or_default();
    let mut ready = Vec::new();
    let mut draining = Vec::new();
    for slice in slices.into_iter().filter(|s| {
        s.address_type == "IPv4"
            && s.metadata.namespace.as_deref() == Some(ns)
            && s.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
                .is_some_and(|n| n == name)
    }) {
        let Some(target) = slice
            .ports
            .iter()
            .flatten()
            .find(|sp| {
                sp.name.clone().unwrap_or_default() == port_name
                    && Protocol::parse(sp.protocol.as_deref()) == Some(Protocol::Tcp)
            })
            .and_then(|sp| u16::try_from(sp.port?).ok())
        else {
            continue;
        };
        for e in &slice.endpoints {
            let c = e.conditions.as_ref();
            let is_ready = c.and_then(|c| c.ready).unwrap_or(true);
            let serving = c.and_then(|c| c.serving).unwrap_or(is_ready);
            let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
            let pod = e
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .and_then(|r| {
                    Some((
                        r.namespace.clone().unwrap_or_else(|| ns.to_owned()),
                        r.name.clone()?,
                    ))
                });
            for ip in e.addresses.iter().filter_map(|a| a.parse().ok()) {
                let b = Backend {
                    endpoint: Endpoint { ip, port: target },
                    pod: pod.clone(),
                };
                if is_ready && !terminating {
                    ready.push(b);
                } else if serving && terminating {
                    draining.push(b);
                }
            }
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
        LoadBalancerIngress, LoadBalancerStatus, ServicePort as K8sPort, ServiceSpec, ServiceStatus,
    };
    use k8s_openapi::api::discovery::v1::{
        Endpoint as K8sEndpoint, EndpointConditions, EndpointPort,
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

    fn one(services: &[Service], slices: &[EndpointSlice]) -> ServicePort {
        let mut ports = service_ports(services, slices, "n1");
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
        let s = svc("web", http_spec("ClusterIP"));
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
        let found = backends([&s], &slices, to("10.96.0.10:80")).unwrap();
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
        assert!(backends([&s], &slices, to("10.96.0.10:81")).is_none());
        assert!(backends([&s], &slices, to("10.96.0.11:80")).is_none());
        // Only a terminating endpoint still serving: it is used.
        let only = [slice("web", vec![draining])];
        assert_eq!(backends([&s], &only, to("10.96.0.10:80")).unwrap().len(), 1);
        assert!(backends([&s], &[], to("10.96.0.10:80")).unwrap().is_empty());
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
            &[svc("headless", headless), svc("ext", external)],
            &[slice(
                "headless",
                vec![ep("10.244.0.5", "n1", true, true, false)],
            )],
            "n1",
        );
        assert!(ports.is_empty(), "{ports:?}");
    }
}
