//! Services and EndpointSlices as a node reads them: the fields the service
//! proxy, the cluster DNS and the gateway use, parsed once when the watch
//! delivers the object (addresses as addresses, defaults applied), and
//! nothing else. A node keeps one of each per Service of the cluster, a
//! function at zero included; see [`crate::views`] for why not the API
//! objects.

use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::model::{Protocol, SERVICE_NAME_LABEL};

/// A Service's type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServiceType {
    ClusterIp,
    NodePort,
    LoadBalancer,
    /// A DNS alias of this name, with no address of its own.
    ExternalName(String),
}

/// A Service's `spec.clusterIP`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClusterIp {
    /// `None`: a headless Service (DNS answers with its endpoints).
    Headless,
    Ip(Ipv4Addr),
    /// Not set yet, or not an IPv4 address.
    Unset,
}

/// One port of a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePortView {
    /// Empty for a Service's only, unnamed port.
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    /// Set only where the type has node ports (NodePort, LoadBalancer).
    pub node_port: Option<u16>,
}

/// A Service as a node reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceView {
    pub namespace: String,
    pub name: String,
    pub type_: ServiceType,
    pub cluster_ip: ClusterIp,
    /// Ports with a protocol and number a node can serve.
    pub ports: Vec<ServicePortView>,
    /// `spec.externalIPs` and, for a LoadBalancer, its ingress IPs: sorted,
    /// without repeats.
    pub external_ips: Vec<Ipv4Addr>,
    /// `sessionAffinity: ClientIP`: how long a client sticks to its endpoint.
    pub affinity_seconds: Option<u32>,
    /// `internalTrafficPolicy: Local`.
    pub internal_local: bool,
    /// `externalTrafficPolicy: Local` on a type that is reached from outside.
    pub external_local: bool,
    /// `publishNotReadyAddresses`.
    pub publish_not_ready: bool,
}

impl ServiceView {
    /// The view of a Service; `None` for one without a spec.
    pub fn of(svc: &Service) -> Option<Self> {
        let spec = svc.spec.as_ref()?;
        let type_ = match spec.type_.as_deref().unwrap_or("ClusterIP") {
            "NodePort" => ServiceType::NodePort,
            "LoadBalancer" => ServiceType::LoadBalancer,
            "ExternalName" => {
                ServiceType::ExternalName(spec.external_name.clone().unwrap_or_default())
            }
            _ => ServiceType::ClusterIp,
        };
        let outside = matches!(type_, ServiceType::NodePort | ServiceType::LoadBalancer);
        let cluster_ip = match spec.cluster_ip.as_deref() {
            Some("None") => ClusterIp::Headless,
            Some(ip) => ip.parse().map_or(ClusterIp::Unset, ClusterIp::Ip),
            None => ClusterIp::Unset,
        };
        let mut external_ips: Vec<Ipv4Addr> = spec
            .external_ips
            .iter()
            .flatten()
            .filter_map(|ip| ip.parse().ok())
            .collect();
        if type_ == ServiceType::LoadBalancer {
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
        let ports = spec
            .ports
            .iter()
            .flatten()
            .filter_map(|p| {
                Some(ServicePortView {
                    name: p.name.clone().unwrap_or_default(),
                    protocol: Protocol::parse(p.protocol.as_deref())?,
                    port: u16::try_from(p.port).ok()?,
                    node_port: p
                        .node_port
                        .filter(|_| outside)
                        .and_then(|n| u16::try_from(n).ok()),
                })
            })
            .collect();
        Some(Self {
            namespace: svc.metadata.namespace.clone().unwrap_or_default(),
            name: svc.metadata.name.clone().unwrap_or_default(),
            type_,
            cluster_ip,
            ports,
            external_ips,
            affinity_seconds,
            internal_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
            external_local: spec.external_traffic_policy.as_deref() == Some("Local") && outside,
            publish_not_ready: spec.publish_not_ready_addresses == Some(true),
        })
    }
}

/// One port of an EndpointSlice: where its endpoints listen for the
/// Service port of the same name and protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

/// One endpoint of an EndpointSlice, its conditions defaulted as
/// Kubernetes defines them (a missing `ready` means ready, `serving`
/// defaults to `ready`, `terminating` to false).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceEndpoint {
    pub addresses: Vec<Ipv4Addr>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// The node it runs on.
    pub node: Option<String>,
    pub hostname: Option<String>,
    /// The pod it is (`targetRef` of kind Pod): namespace and name.
    pub pod: Option<(String, String)>,
}

/// An IPv4 EndpointSlice of a Service as a node reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceView {
    pub namespace: String,
    /// The Service it serves (its `kubernetes.io/service-name` label).
    pub service: String,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<SliceEndpoint>,
}

impl SliceView {
    /// The view of an EndpointSlice; `None` for one that serves no Service
    /// (no label) or holds other than IPv4 addresses, which no node reads.
    pub fn of(slice: &EndpointSlice) -> Option<Self> {
        if slice.address_type != "IPv4" {
            return None;
        }
        let namespace = slice.metadata.namespace.clone().unwrap_or_default();
        let service = slice
            .metadata
            .labels
            .as_ref()?
            .get(SERVICE_NAME_LABEL)?
            .clone();
        let ports = slice
            .ports
            .iter()
            .flatten()
            .filter_map(|p| {
                Some(SlicePort {
                    name: p.name.clone().unwrap_or_default(),
                    protocol: Protocol::parse(p.protocol.as_deref())?,
                    port: u16::try_from(p.port?).ok()?,
                })
            })
            .collect();
        let endpoints = slice
            .endpoints
            .iter()
            .map(|e| {
                let c = e.conditions.as_ref();
                let ready = c.and_then(|c| c.ready).unwrap_or(true);
                SliceEndpoint {
                    addresses: e.addresses.iter().filter_map(|a| a.parse().ok()).collect(),
                    ready,
                    serving: c.and_then(|c| c.serving).unwrap_or(ready),
                    terminating: c.and_then(|c| c.terminating).unwrap_or(false),
                    node: e.node_name.clone(),
                    hostname: e.hostname.clone(),
                    pod: e
                        .target_ref
                        .as_ref()
                        .filter(|r| r.kind.as_deref() == Some("Pod"))
                        .and_then(|r| {
                            Some((
                                r.namespace.clone().unwrap_or_else(|| namespace.clone()),
                                r.name.clone()?,
                            ))
                        }),
                }
            })
            .collect();
        Some(Self {
            namespace,
            service,
            ports,
            endpoints,
        })
    }
}
