//! The cluster's DNS records, computed from Services and EndpointSlices
//! alone (no IO), as the Kubernetes DNS-based service discovery
//! specification lays them out under the cluster domain:
//!
//! - `svc.ns.svc.DOMAIN`: A with the cluster IP; for a headless Service,
//!   one A per ready endpoint; for an ExternalName Service, a CNAME;
//! - `host.svc.ns.svc.DOMAIN`: a headless Service's endpoint, by its
//!   `hostname` or, without one, its dashed address (`10-244-0-5`);
//! - `_port._proto.svc.ns.svc.DOMAIN`: SRV for each named port;
//! - `a-b-c-d.ns.pod.DOMAIN`: A with the pod's address (CoreDNS's
//!   `pods insecure`, which answers without looking the pod up);
//! - PTR for cluster IPs and headless endpoints.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::Arc;

use wasmkube_proxy::view::{ClusterIp, ServiceType};
use wasmkube_proxy::{ServiceView, SliceView};

/// The TTL of the cluster's records (CoreDNS's kubernetes plugin default).
pub const TTL: u32 = 5;

/// One record of an answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    A(String, Ipv4Addr),
    Cname(String, String),
    /// name, port, weight, target
    Srv(String, u16, u16, String),
    Ptr(String, String),
}

/// The query types the zone tells apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    A,
    Srv,
    Ptr,
    Cname,
    Any,
    /// AAAA, TXT, ...: the zone has none (an IPv4 cluster).
    Other,
}

/// What the zone says of a name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// The records, and targets worth adding (SRV targets' addresses).
    Records(Vec<Record>, Vec<Record>),
    /// The name exists, without records of that type.
    NoData,
    NxDomain,
    /// Not under the cluster domain (nor a reverse name the zone knows):
    /// ask upstream.
    NotOurs,
}

/// A name in the zone, shared by the records that hold it (a Service's
/// name is an A record's, a PTR's target, its SRV records' target and a
/// name that exists: one allocation, kept for as long as the Service is,
/// at zero pods or not).
type Name = Arc<str>;

#[derive(Debug, Default)]
pub struct Zone {
    domain: String,
    /// `.DOMAIN` and `.pod.DOMAIN`, made once (every query asks).
    dot_domain: String,
    pod_suffix: String,
    a: HashMap<Name, Vec<Ipv4Addr>>,
    cname: HashMap<Name, Name>,
    srv: HashMap<Name, Vec<(u16, u16, Name)>>,
    ptr: HashMap<Ipv4Addr, Name>,
    /// Every name that exists, records or not (for NODATA vs NXDOMAIN).
    names: HashSet<Name>,
}

/// A name as the zone keys it: lower case, no trailing dot.
pub fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// A name as the zone keys and shares it.
fn shared(name: &str) -> Name {
    normalize(name).into()
}

fn dashed(ip: Ipv4Addr) -> String {
    ip.to_string().replace('.', "-")
}

impl Zone {
    /// An empty zone for `domain` (`cluster.local`).
    pub fn new(domain: &str) -> Self {
        let domain = normalize(domain);
        Self {
            dot_domain: format!(".{domain}"),
            pod_suffix: format!(".pod.{domain}"),
            domain,
            ..Default::default()
        }
    }

    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The records of all these Services.
    pub fn build<'a>(
        domain: &str,
        services: impl IntoIterator<Item = &'a ServiceView>,
        slices: impl IntoIterator<Item = &'a SliceView>,
    ) -> Self {
        let mut zone = Self::new(domain);
        for (svc, slices) in wasmkube_proxy::model::with_slices(services, slices) {
            zone.add_service(svc, &slices);
        }
        zone
    }

    fn exists(&mut self, name: &Name) {
        // The name and every name between it and the domain exist.
        if name.len() <= self.domain.len() || !self.names.insert(name.clone()) {
            return;
        }
        let mut n: &str = name;
        while let Some((_, rest)) = n.split_once('.') {
            n = rest;
            if n.len() <= self.domain.len() || self.names.contains(n) {
                break;
            }
            self.names.insert(n.into());
        }
    }

    fn add_service(&mut self, svc: &ServiceView, slices: &[&SliceView]) {
        let base = shared(&format!(
            "{}.{}.svc.{}",
            svc.name, svc.namespace, self.domain
        ));
        self.exists(&base);
        if let ServiceType::ExternalName(target) = &svc.type_ {
            if !target.is_empty() {
                self.cname.insert(base, shared(target));
            }
            return;
        }
        match svc.cluster_ip {
            ClusterIp::Headless => {
                for slice in slices {
                    for e in &slice.endpoints {
                        if !e.ready && !svc.publish_not_ready {
                            continue;
                        }
                        for &ip in &e.addresses {
                            let host = e.hostname.clone().unwrap_or_else(|| dashed(ip));
                            let host_name = shared(&format!("{host}.{base}"));
                            self.a.entry(base.clone()).or_default().push(ip);
                            self.a.entry(host_name.clone()).or_default().push(ip);
                            self.exists(&host_name);
                            if e.hostname.is_some() {
                                self.ptr.insert(ip, host_name.clone());
                            }
                            for p in slice.ports.iter().filter(|p| !p.name.is_empty()) {
                                let srv =
                                    shared(&format!("_{}._{}.{base}", p.name, p.protocol.nft()));
                                self.exists(&srv);
                                self.srv.entry(srv).or_default().push((
                                    p.port,
                                    0,
                                    host_name.clone(),
                                ));
                            }
                        }
                    }
                }
                // Weights share 100 among a name's targets, as CoreDNS's.
                for targets in self.srv.values_mut() {
                    let n = targets.len().max(1) as u16;
                    for t in targets.iter_mut() {
                        t.1 = 100 / n;
                    }
                }
            }
            ClusterIp::Ip(ip) => {
                self.a.insert(base.clone(), vec![ip]);
                self.ptr.insert(ip, base.clone());
                for p in svc.ports.iter().filter(|p| !p.name.is_empty()) {
                    let srv = shared(&format!("_{}._{}.{base}", p.name, p.protocol.nft()));
                    self.exists(&srv);
                    self.srv.insert(srv, vec![(p.port, 100, base.clone())]);
                }
            }
            ClusterIp::Unset => {}
        }
    }

    /// Whether `name` is under the cluster domain.
    pub fn is_ours(&self, name: &str) -> bool {
        let name = name.trim_end_matches('.');
        name.eq_ignore_ascii_case(&self.domain)
            || (name.len() > self.dot_domain.len()
                && name.is_char_boundary(name.len() - self.dot_domain.len())
                && name[name.len() - self.dot_domain.len()..]
                    .eq_ignore_ascii_case(&self.dot_domain))
    }

    /// The addresses of `name` in the zone (following a CNAME inside it);
    /// `None` for a name the zone does not hold.
    pub fn addresses(&self, name: &str) -> Option<Vec<Ipv4Addr>> {
        match self.answer(name, Kind::A) {
            Answer::Records(records, _) => {
                let ips: Vec<Ipv4Addr> = records
                    .iter()
                    .filter_map(|r| match r {
                        Record::A(_, ip) => Some(*ip),
                        _ => None,
                    })
                    .collect();
                (!ips.is_empty()).then_some(ips)
            }
            _ => None,
        }
    }

    /// What the zone answers to a query for `name` of `kind`.
    pub fn answer(&self, name: &str, kind: Kind) -> Answer {
        if !name.ends_with(".in-addr.arpa")
            && !name.ends_with(".in-addr.arpa.")
            && !self.is_ours(name)
        {
            return Answer::NotOurs;
        }
        let name = normalize(name);
        if let Some(rev) = name.strip_suffix(".in-addr.arpa") {
            let mut octets: Vec<&str> = rev.split('.').collect();
            octets.reverse();
            let Ok(ip) = octets.join(".").parse::<Ipv4Addr>() else {
                return Answer::NotOurs;
            };
            return match (self.ptr.get(&ip), kind) {
                (Some(target), Kind::Ptr | Kind::Any) => {
                    Answer::Records(vec![Record::Ptr(name, target.to_string())], Vec::new())
                }
                (Some(_), _) => Answer::NoData,
                (None, _) => Answer::NotOurs,
            };
        }
        if !self.is_ours(&name) {
            return Answer::NotOurs;
        }
        if let Some(target) = self.cname.get(name.as_str()) {
            let mut records = vec![Record::Cname(name.clone(), target.to_string())];
            if matches!(kind, Kind::A | Kind::Any)
                && let Some(ips) = self.a.get(target)
            {
                records.extend(ips.iter().map(|ip| Record::A(target.to_string(), *ip)));
            }
            return Answer::Records(records, Vec::new());
        }
        if let Some(ip) = self.pod_address(&name) {
            return match kind {
                Kind::A | Kind::Any => Answer::Records(vec![Record::A(name, ip)], Vec::new()),
                _ => Answer::NoData,
            };
        }
        match kind {
            Kind::A | Kind::Any if self.a.contains_key(name.as_str()) => Answer::Records(
                self.a[name.as_str()]
                    .iter()
                    .map(|ip| Record::A(name.clone(), *ip))
                    .collect(),
                Vec::new(),
            ),
            Kind::Srv | Kind::Any if self.srv.contains_key(name.as_str()) => {
                let targets = &self.srv[name.as_str()];
                let records = targets
                    .iter()
                    .map(|(port, weight, target)| {
                        Record::Srv(name.clone(), *port, *weight, target.to_string())
                    })
                    .collect();
                let extra = targets
                    .iter()
                    .flat_map(|(_, _, t)| {
                        self.a
                            .get(t)
                            .into_iter()
                            .flatten()
                            .map(|ip| Record::A(t.to_string(), *ip))
                    })
                    .collect();
                Answer::Records(records, extra)
            }
            _ if self.names.contains(name.as_str()) => Answer::NoData,
            _ => Answer::NxDomain,
        }
    }

    /// `a-b-c-d.ns.pod.DOMAIN`.
    fn pod_address(&self, name: &str) -> Option<Ipv4Addr> {
        let rest = name.strip_suffix(self.pod_suffix.as_str())?;
        let (host, ns) = rest.split_once('.')?;
        if ns.is_empty() || ns.contains('.') {
            return None;
        }
        host.replace('-', ".").parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Service;
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use serde_json::json;

    fn zone() -> Zone {
        let services: Vec<Service> = [
            json!({"metadata": {"name": "web", "namespace": "shop"},
                   "spec": {"clusterIP": "10.96.0.20", "ports": [{"name": "http", "port": 80}, {"port": 81}]}}),
            json!({"metadata": {"name": "db", "namespace": "shop"},
                   "spec": {"clusterIP": "None", "ports": [{"name": "pg", "port": 5432}]}}),
            json!({"metadata": {"name": "ext", "namespace": "shop"},
                   "spec": {"type": "ExternalName", "externalName": "db.example.org."}}),
        ]
        .into_iter()
        .map(|v| serde_json::from_value(v).unwrap())
        .collect();
        let slices: Vec<EndpointSlice> = [json!({
            "metadata": {"name": "db-x", "namespace": "shop", "labels": {"kubernetes.io/service-name": "db"}},
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["10.244.0.5"], "hostname": "db-0", "conditions": {"ready": true}},
                {"addresses": ["10.244.1.6"], "conditions": {"ready": true}},
                {"addresses": ["10.244.1.7"], "conditions": {"ready": false}},
            ],
            "ports": [{"name": "pg", "port": 5432, "protocol": "TCP"}],
        })]
        .into_iter()
        .map(|v| serde_json::from_value(v).unwrap())
        .collect();
        let services: Vec<ServiceView> = services.iter().filter_map(ServiceView::of).collect();
        let slices: Vec<SliceView> = slices.iter().filter_map(SliceView::of).collect();
        Zone::build("cluster.local", &services, &slices)
    }

    fn a(name: &str, ip: &str) -> Record {
        Record::A(name.into(), ip.parse().unwrap())
    }

    #[test]
    fn answers_as_the_dns_specification_says() {
        let z = zone();
        let cases: Vec<(&str, Kind, Answer)> = vec![
            (
                "web.shop.svc.cluster.local.",
                Kind::A,
                Answer::Records(vec![a("web.shop.svc.cluster.local", "10.96.0.20")], vec![]),
            ),
            ("WEB.shop.svc.cluster.local", Kind::Other, Answer::NoData),
            ("nope.shop.svc.cluster.local", Kind::A, Answer::NxDomain),
            ("shop.svc.cluster.local", Kind::A, Answer::NoData),
            (
                "_http._tcp.web.shop.svc.cluster.local",
                Kind::Srv,
                Answer::Records(
                    vec![Record::Srv(
                        "_http._tcp.web.shop.svc.cluster.local".into(),
                        80,
                        100,
                        "web.shop.svc.cluster.local".into(),
                    )],
                    vec![a("web.shop.svc.cluster.local", "10.96.0.20")],
                ),
            ),
            (
                "db.shop.svc.cluster.local",
                Kind::A,
                Answer::Records(
                    vec![
                        a("db.shop.svc.cluster.local", "10.244.0.5"),
                        a("db.shop.svc.cluster.local", "10.244.1.6"),
                    ],
                    vec![],
                ),
            ),
            (
                "db-0.db.shop.svc.cluster.local",
                Kind::A,
                Answer::Records(
                    vec![a("db-0.db.shop.svc.cluster.local", "10.244.0.5")],
                    vec![],
                ),
            ),
            (
                "10-244-1-6.db.shop.svc.cluster.local",
                Kind::A,
                Answer::Records(
                    vec![a("10-244-1-6.db.shop.svc.cluster.local", "10.244.1.6")],
                    vec![],
                ),
            ),
            (
                "ext.shop.svc.cluster.local",
                Kind::A,
                Answer::Records(
                    vec![Record::Cname(
                        "ext.shop.svc.cluster.local".into(),
                        "db.example.org".into(),
                    )],
                    vec![],
                ),
            ),
            (
                "10-244-3-4.shop.pod.cluster.local",
                Kind::A,
                Answer::Records(
                    vec![a("10-244-3-4.shop.pod.cluster.local", "10.244.3.4")],
                    vec![],
                ),
            ),
            (
                "20.0.96.10.in-addr.arpa",
                Kind::Ptr,
                Answer::Records(
                    vec![Record::Ptr(
                        "20.0.96.10.in-addr.arpa".into(),
                        "web.shop.svc.cluster.local".into(),
                    )],
                    vec![],
                ),
            ),
            ("1.1.168.192.in-addr.arpa", Kind::Ptr, Answer::NotOurs),
            ("example.org", Kind::A, Answer::NotOurs),
        ];
        for (name, kind, want) in cases {
            assert_eq!(z.answer(name, kind), want, "{name} {kind:?}");
        }
        let srv = z.answer("_pg._tcp.db.shop.svc.cluster.local", Kind::Srv);
        let Answer::Records(records, extra) = srv else {
            panic!("{srv:?}")
        };
        assert_eq!(records.len(), 2);
        assert!(records.contains(&Record::Srv(
            "_pg._tcp.db.shop.svc.cluster.local".into(),
            5432,
            50,
            "db-0.db.shop.svc.cluster.local".into()
        )));
        assert_eq!(extra.len(), 2);
        assert_eq!(
            z.addresses("web.shop.svc.cluster.local"),
            Some(vec!["10.96.0.20".parse().unwrap()])
        );
    }
}
