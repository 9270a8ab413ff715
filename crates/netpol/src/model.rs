//! What the node's NetworkPolicies mean for its pods, with no IO: from the
//! cluster's pods, namespaces and policies, each local pod that a policy
//! isolates gets the list of what it may receive (ingress) and send
//! (egress), as address sets and ports.
//!
//! The semantics are Kubernetes' (`networking.k8s.io/v1`):
//! - a pod is isolated for ingress (egress) once a policy of its namespace
//!   selects it and has `Ingress` (`Egress`) among its policy types; an
//!   isolated pod admits only what some such policy's rules allow, the
//!   union of them all;
//! - a rule allows traffic that matches one of its peers (all sources or
//!   destinations when it has none) on one of its ports (all ports when it
//!   has none);
//! - a peer is a `podSelector` (pods of the policy's namespace), a
//!   `namespaceSelector` (every pod of the namespaces selected), both
//!   (pods selected in the namespaces selected), or an `ipBlock` (a CIDR
//!   less its exceptions);
//! - a port is a protocol (TCP by default), optionally a number, a range up
//!   to `endPort`, or a container port's name: for ingress the selected
//!   pod's own port of that name, for egress the port of that name on each
//!   destination pod;
//! - without `policyTypes`, a policy is of type `Ingress`, and of `Egress`
//!   too when it has egress rules.
//!
//! Pods on the node's own network (`hostNetwork`) and pods without an
//! address yet are neither isolated nor peers; finished pods are ignored.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use sha2::Digest;
use wasmkube_api::selectors::LabelSelector;

/// The label every namespace carries with its own name.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// A transport protocol a policy port names (the service proxy's).
pub use wasmkube_proxy::model::Protocol;

/// A container port with a name, for named policy ports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamedPort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

/// What policies need of a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodView {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub ip: Ipv4Addr,
    pub node: String,
    pub ports: Vec<NamedPort>,
}

impl PodView {
    /// The pod as policies see it; `None` for a pod that is neither
    /// isolated nor a peer (on the node's network, no address yet, or
    /// finished).
    pub fn of(pod: &Pod) -> Option<Self> {
        let spec = pod.spec.as_ref()?;
        if spec.host_network == Some(true) {
            return None;
        }
        let status = pod.status.as_ref()?;
        if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
            return None;
        }
        let ip = status.pod_ip.as_deref()?.parse().ok()?;
        let ports = spec
            .containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .filter_map(|p| {
                Some(NamedPort {
                    name: p.name.clone()?,
                    protocol: Protocol::parse(p.protocol.as_deref())?,
                    port: u16::try_from(p.container_port).ok()?,
                })
            })
            .collect();
        Some(Self {
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            namespace: pod.metadata.namespace.clone()?,
            name: pod.metadata.name.clone()?,
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            ip,
            node: spec.node_name.clone()?,
            ports,
        })
    }
}

impl PodView {
    /// A pod of this node as the agent holds it, for in-process decisions:
    /// its address is its own, its node's, or none yet (0.0.0.0).
    pub fn local(pod: &Pod) -> Option<Self> {
        let status = pod.status.as_ref();
        let ip = status
            .and_then(|s| s.pod_ip.as_deref().or(s.host_ip.as_deref()))
            .and_then(|ip| ip.parse().ok())
            .unwrap_or(Ipv4Addr::UNSPECIFIED);
        Self::at(pod, ip)
    }

    /// A pod of this node at `ip`, whatever its status says yet (the
    /// agent's own knowledge of a pod it runs).
    pub fn at(pod: &Pod, ip: Ipv4Addr) -> Option<Self> {
        let mut seen = pod.clone();
        let status = seen.status.get_or_insert_with(Default::default);
        status.pod_ip = Some(ip.to_string());
        status.phase = Some("Running".into());
        if let Some(spec) = seen.spec.as_mut() {
            spec.host_network = None;
        }
        Self::of(&seen)
    }
}

/// A namespace's labels, with its name label (which the API server sets;
/// added here too, so selectors on it always work).
pub fn namespace_labels(ns: &Namespace) -> (String, BTreeMap<String, String>) {
    let name = ns.metadata.name.clone().unwrap_or_default();
    let mut labels = ns.metadata.labels.clone().unwrap_or_default();
    labels
        .entry(NAMESPACE_NAME_LABEL.to_owned())
        .or_insert_with(|| name.clone());
    (name, labels)
}

/// Inclusive ranges of IPv4 addresses, sorted, disjoint and not adjacent.
pub type Ranges = Vec<(u32, u32)>;

/// Ports of one protocol: all of them, or an inclusive range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortMatch {
    pub protocol: Protocol,
    pub range: Option<(u16, u16)>,
}

/// Whom a rule admits.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Peers {
    /// Every address.
    Any,
    /// The addresses of a named set of the plan.
    Set(String),
    /// One pod (a named port's destination).
    Addr(Ipv4Addr),
}

/// One allowed kind of traffic: from (to) these peers on these ports.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Allow {
    pub peers: Peers,
    /// Empty: every port and protocol.
    pub ports: Vec<PortMatch>,
}

/// An isolated local pod and what it may receive and send; `None`: not
/// isolated in that direction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodPlan {
    pub namespace: String,
    pub name: String,
    pub ip: Ipv4Addr,
    pub ingress: Option<Vec<Allow>>,
    pub egress: Option<Vec<Allow>>,
}

/// What the node programs: its isolated pods and the address sets their
/// rules name (non-empty ones only: a rule whose peers are no address
/// admits nothing and is left out).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub pods: Vec<PodPlan>,
    pub sets: BTreeMap<String, Ranges>,
}

/// A rule's peers and ports (either direction).
type Rule<'a> = (
    Option<&'a Vec<NetworkPolicyPeer>>,
    Option<&'a Vec<NetworkPolicyPort>>,
);

/// A policy ready to evaluate.
struct Parsed<'a> {
    namespace: &'a str,
    name: &'a str,
    selector: LabelSelector,
    spec: &'a NetworkPolicySpec,
    ingress: bool,
    egress: bool,
}

impl<'a> Parsed<'a> {
    /// Its rules of one direction, as peers and ports.
    fn rules(&self, direction: Direction) -> Vec<Rule<'a>> {
        match direction {
            Direction::Ingress => self
                .spec
                .ingress
                .iter()
                .flatten()
                .map(|r| (r.from.as_ref(), r.ports.as_ref()))
                .collect(),
            Direction::Egress => self
                .spec
                .egress
                .iter()
                .flatten()
                .map(|r| (r.to.as_ref(), r.ports.as_ref()))
                .collect(),
        }
    }
}

fn parse(policy: &NetworkPolicy) -> Option<Parsed<'_>> {
    let spec = policy.spec.as_ref()?;
    let selector = match LabelSelector::from_api(&spec.pod_selector.clone().unwrap_or_default()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(policy = ?policy.metadata.name, error = %e, "NetworkPolicy with a bad pod selector ignored");
            return None;
        }
    };
    let (ingress, egress) = match spec.policy_types.as_deref() {
        Some(types) if !types.is_empty() => (
            types.iter().any(|t| t == "Ingress"),
            types.iter().any(|t| t == "Egress"),
        ),
        _ => (
            true,
            spec.egress.as_ref().is_some_and(|rules| !rules.is_empty()),
        ),
    };
    Some(Parsed {
        namespace: policy.metadata.namespace.as_deref()?,
        name: policy.metadata.name.as_deref()?,
        selector,
        spec,
        ingress,
        egress,
    })
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Direction {
    Ingress,
    Egress,
}

/// The cluster's pods and namespaces, indexed for peer selection.
struct Index<'a> {
    pods_by_namespace: HashMap<&'a str, Vec<&'a PodView>>,
    namespaces: &'a BTreeMap<String, BTreeMap<String, String>>,
}

impl Index<'_> {
    /// The addresses of a rule's peers (`None`: no peers, every address).
    fn peers(&self, namespace: &str, peers: Option<&Vec<NetworkPolicyPeer>>) -> Option<Ranges> {
        let peers = peers.filter(|p| !p.is_empty())?;
        let mut ranges = Vec::new();
        for peer in peers {
            if let Some(block) = &peer.ip_block {
                ranges.extend(cidr_less(
                    &block.cidr,
                    block.except.as_deref().unwrap_or_default(),
                ));
                continue;
            }
            let pod_selector = match peer.pod_selector.as_ref().map(LabelSelector::from_api) {
                None => None,
                Some(Ok(s)) => Some(s),
                Some(Err(_)) => continue,
            };
            let namespaces: Vec<&str> = match &peer.namespace_selector {
                None if pod_selector.is_none() => continue,
                None => vec![namespace],
                Some(sel) => {
                    let Ok(sel) = LabelSelector::from_api(sel) else {
                        continue;
                    };
                    self.namespaces
                        .iter()
                        .filter(|(_, labels)| sel.matches(labels))
                        .map(|(name, _)| name.as_str())
                        .collect()
                }
            };
            for ns in namespaces {
                for pod in self.pods_by_namespace.get(ns).into_iter().flatten() {
                    if pod_selector.as_ref().is_none_or(|s| s.matches(&pod.labels)) {
                        let ip = u32::from(pod.ip);
                        ranges.push((ip, ip));
                    }
                }
            }
        }
        Some(merge(ranges))
    }
}

/// Computes what the node `node` programs.
pub fn plan(
    policies: &[&NetworkPolicy],
    pods: &[PodView],
    namespaces: &BTreeMap<String, BTreeMap<String, String>>,
    node: &str,
) -> Plan {
    let mut pods_by_namespace: HashMap<&str, Vec<&PodView>> = HashMap::new();
    for pod in pods {
        pods_by_namespace
            .entry(pod.namespace.as_str())
            .or_default()
            .push(pod);
    }
    let index = Index {
        pods_by_namespace,
        namespaces,
    };
    let mut by_namespace: HashMap<&str, Vec<Parsed<'_>>> = HashMap::new();
    for policy in policies.iter().filter_map(|p| parse(p)) {
        by_namespace
            .entry(policy.namespace)
            .or_default()
            .push(policy);
    }
    for list in by_namespace.values_mut() {
        list.sort_by_key(|p| p.name);
    }
    // Peer sets by (policy, direction, rule), computed once for all the
    // local pods a policy selects.
    let mut peer_sets: HashMap<(&str, &str, Direction, usize), Option<String>> = HashMap::new();
    let mut plan = Plan::default();
    for pod in pods.iter().filter(|p| p.node == node) {
        let mut ingress: Option<BTreeSet<Allow>> = None;
        let mut egress: Option<BTreeSet<Allow>> = None;
        for policy in by_namespace
            .get(pod.namespace.as_str())
            .into_iter()
            .flatten()
        {
            if !policy.selector.matches(&pod.labels) {
                continue;
            }
            for (direction, isolates, out) in [
                (Direction::Ingress, policy.ingress, &mut ingress),
                (Direction::Egress, policy.egress, &mut egress),
            ] {
                if !isolates {
                    continue;
                }
                let out = out.get_or_insert_with(BTreeSet::new);
                let rules = policy.rules(direction);
                for (i, (peers, ports)) in rules.into_iter().enumerate() {
                    let key = (policy.namespace, policy.name, direction, i);
                    let set = peer_sets
                        .entry(key)
                        .or_insert_with(|| {
                            let ranges = index.peers(policy.namespace, peers)?;
                            let name = set_name(&key);
                            plan.sets.insert(name.clone(), ranges);
                            Some(name)
                        })
                        .clone();
                    let peers = match set {
                        None => Peers::Any,
                        Some(name) if plan.sets[&name].is_empty() => continue,
                        Some(name) => Peers::Set(name),
                    };
                    rule_allows(&index, pod, direction, peers, ports, &plan.sets, out);
                }
            }
        }
        if ingress.is_some() || egress.is_some() {
            plan.pods.push(PodPlan {
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
                ip: pod.ip,
                ingress: ingress.map(|s| s.into_iter().collect()),
                egress: egress.map(|s| s.into_iter().collect()),
            });
        }
    }
    plan.sets.retain(|_, ranges| !ranges.is_empty());
    plan
}

/// What one rule admits for `pod`, added to `out`.
fn rule_allows(
    index: &Index<'_>,
    pod: &PodView,
    direction: Direction,
    peers: Peers,
    ports: Option<&Vec<NetworkPolicyPort>>,
    sets: &BTreeMap<String, Ranges>,
    out: &mut BTreeSet<Allow>,
) {
    let ports = ports.filter(|p| !p.is_empty());
    let Some(ports) = ports else {
        out.insert(Allow {
            peers,
            ports: Vec::new(),
        });
        return;
    };
    let mut matches = Vec::new();
    for port in ports {
        let Some(protocol) = Protocol::parse(port.protocol.as_deref()) else {
            continue;
        };
        match &port.port {
            None => matches.push(PortMatch {
                protocol,
                range: None,
            }),
            Some(IntOrString::Int(p)) => {
                let Ok(from) = u16::try_from(*p) else {
                    continue;
                };
                let to = port
                    .end_port
                    .and_then(|e| u16::try_from(e).ok())
                    .filter(|e| *e >= from)
                    .unwrap_or(from);
                matches.push(PortMatch {
                    protocol,
                    range: Some((from, to)),
                });
            }
            Some(IntOrString::String(name)) => match direction {
                // The selected pod's own port of that name.
                Direction::Ingress => {
                    if let Some(p) = pod
                        .ports
                        .iter()
                        .find(|p| &p.name == name && p.protocol == protocol)
                    {
                        matches.push(PortMatch {
                            protocol,
                            range: Some((p.port, p.port)),
                        });
                    }
                }
                // Each destination pod's port of that name: an allow of
                // its own per pod.
                Direction::Egress => {
                    let within = |ip: Ipv4Addr| match &peers {
                        Peers::Any => true,
                        Peers::Set(name) => contains(&sets[name], ip),
                        Peers::Addr(a) => *a == ip,
                    };
                    for dest in index.pods_by_namespace.values().flatten() {
                        if !within(dest.ip) {
                            continue;
                        }
                        for p in dest
                            .ports
                            .iter()
                            .filter(|p| &p.name == name && p.protocol == protocol)
                        {
                            out.insert(Allow {
                                peers: Peers::Addr(dest.ip),
                                ports: vec![PortMatch {
                                    protocol,
                                    range: Some((p.port, p.port)),
                                }],
                            });
                        }
                    }
                }
            },
        }
    }
    if !matches.is_empty() {
        matches.sort();
        matches.dedup();
        out.insert(Allow {
            peers,
            ports: matches,
        });
    }
}

/// One end of a connection decided in-process.
#[derive(Clone, Copy, Debug)]
pub enum Party<'a> {
    /// A pod (whose address may be its node's, when it shares the node's
    /// network).
    Pod(&'a PodView),
    /// Anything else, by address (another node's pod is found by it).
    Addr(Ipv4Addr),
}

/// Whether the policies let `from` open a connection to `to` on `port`:
/// the egress policies of `from` and the ingress policies of `to`, each
/// checked when it is a pod (for ingress, the port is `to`'s container
/// port). The node's own traffic is the caller's to allow.
pub fn allows<'a>(
    policies: &[&NetworkPolicy],
    pods: &'a [PodView],
    namespaces: &BTreeMap<String, BTreeMap<String, String>>,
    (from, to): (Party<'a>, Party<'a>),
    protocol: Protocol,
    port: u16,
) -> bool {
    // An address that is exactly one pod's is that pod.
    let resolve = |p: Party<'a>| -> Party<'a> {
        let Party::Addr(ip) = p else { return p };
        let mut found = pods.iter().filter(|v| v.ip == ip);
        match (found.next(), found.next()) {
            (Some(pod), None) => Party::Pod(pod),
            _ => p,
        }
    };
    let (from, to) = (resolve(from), resolve(to));
    let parsed: Vec<Parsed<'_>> = policies.iter().filter_map(|p| parse(p)).collect();
    let side = |subject: Party<'_>, other: Party<'_>, direction: Direction| -> bool {
        let Party::Pod(pod) = subject else {
            return true;
        };
        let mut isolated = false;
        for policy in parsed.iter().filter(|p| {
            p.namespace == pod.namespace
                && p.selector.matches(&pod.labels)
                && match direction {
                    Direction::Ingress => p.ingress,
                    Direction::Egress => p.egress,
                }
        }) {
            isolated = true;
            let rules = policy.rules(direction);
            // The named ports are the listening side's: the subject's
            // for ingress, the other's for egress.
            let listener = match direction {
                Direction::Ingress => Some(pod),
                Direction::Egress => match other {
                    Party::Pod(p) => Some(p),
                    Party::Addr(_) => None,
                },
            };
            if rules.iter().any(|(peers, ports)| {
                peer_matches(policy.namespace, *peers, other, namespaces)
                    && port_matches(*ports, listener, protocol, port)
            }) {
                return true;
            }
        }
        !isolated
    };
    side(from, to, Direction::Egress) && side(to, from, Direction::Ingress)
}

/// Whether `other` is among a rule's peers (all, when it names none).
fn peer_matches(
    namespace: &str,
    peers: Option<&Vec<NetworkPolicyPeer>>,
    other: Party<'_>,
    namespaces: &BTreeMap<String, BTreeMap<String, String>>,
) -> bool {
    let Some(peers) = peers.filter(|p| !p.is_empty()) else {
        return true;
    };
    let ip = match other {
        Party::Pod(p) => p.ip,
        Party::Addr(ip) => ip,
    };
    peers.iter().any(|peer| {
        if let Some(block) = &peer.ip_block {
            let ranges = cidr_less(&block.cidr, block.except.as_deref().unwrap_or_default());
            return contains(&merge(ranges), ip);
        }
        let Party::Pod(pod) = other else {
            return false;
        };
        let in_namespace = match &peer.namespace_selector {
            None => pod.namespace == namespace,
            Some(sel) => LabelSelector::from_api(sel).is_ok_and(|sel| {
                namespaces
                    .get(&pod.namespace)
                    .is_some_and(|labels| sel.matches(labels))
            }),
        };
        let selected = match &peer.pod_selector {
            None => true,
            Some(sel) => LabelSelector::from_api(sel).is_ok_and(|sel| sel.matches(&pod.labels)),
        };
        in_namespace && selected
    })
}

/// Whether `port` (of `protocol`) is among a rule's ports (all, when it
/// names none); a named port is looked up on `listener`.
fn port_matches(
    ports: Option<&Vec<NetworkPolicyPort>>,
    listener: Option<&PodView>,
    protocol: Protocol,
    port: u16,
) -> bool {
    let Some(ports) = ports.filter(|p| !p.is_empty()) else {
        return true;
    };
    ports.iter().any(|p| {
        if Protocol::parse(p.protocol.as_deref()) != Some(protocol) {
            return false;
        }
        match &p.port {
            None => true,
            Some(IntOrString::Int(from)) => {
                let end = p.end_port.unwrap_or(*from);
                (*from..=end).contains(&i32::from(port))
            }
            Some(IntOrString::String(name)) => listener.is_some_and(|l| {
                l.ports
                    .iter()
                    .any(|n| &n.name == name && n.protocol == protocol && n.port == port)
            }),
        }
    })
}

/// A set's name: short, stable, and unique to its policy rule.
fn set_name(key: &(&str, &str, Direction, usize)) -> String {
    let (ns, name, direction, i) = key;
    let d = match direction {
        Direction::Ingress => "in",
        Direction::Egress => "out",
    };
    let digest = sha2::Sha256::digest(format!("{ns}/{name}/{d}/{i}").as_bytes());
    format!("p-{}", &data_encoding::BASE32_NOPAD.encode(&digest)[..10])
}

/// `cidr` less the `except` blocks, as ranges (nothing for a malformed
/// CIDR: validation refuses those before they are stored).
fn cidr_less(cidr: &str, except: &[String]) -> Ranges {
    let Some(block) = parse_cidr(cidr) else {
        return Vec::new();
    };
    let mut out = vec![block];
    for ex in except.iter().filter_map(|e| parse_cidr(e)) {
        out = out
            .into_iter()
            .flat_map(|(a, b)| {
                let mut left = Vec::new();
                if ex.1 < a || ex.0 > b {
                    left.push((a, b));
                } else {
                    if ex.0 > a {
                        left.push((a, ex.0 - 1));
                    }
                    if ex.1 < b {
                        left.push((ex.1 + 1, b));
                    }
                }
                left
            })
            .collect();
    }
    out
}

/// An IPv4 CIDR as its first and last address.
fn parse_cidr(cidr: &str) -> Option<(u32, u32)> {
    let (addr, len) = cidr.split_once('/')?;
    let addr: Ipv4Addr = addr.parse().ok()?;
    let len: u32 = len.parse().ok().filter(|l| *l <= 32)?;
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    let first = u32::from(addr) & mask;
    Some((first, first | !mask))
}

/// Sorts ranges and joins the overlapping and adjacent ones.
fn merge(mut ranges: Ranges) -> Ranges {
    ranges.sort_unstable();
    let mut out: Ranges = Vec::with_capacity(ranges.len());
    for (a, b) in ranges {
        match out.last_mut() {
            Some(last) if a <= last.1.saturating_add(1) => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

/// Whether merged `ranges` hold `ip`.
pub fn contains(ranges: &Ranges, ip: Ipv4Addr) -> bool {
    let ip = u32::from(ip);
    let i = ranges.partition_point(|(a, _)| *a <= ip);
    i > 0 && ranges[i - 1].1 >= ip
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(ns: &str, name: &str, ip: &str, node: &str, labels: &[(&str, &str)]) -> PodView {
        PodView {
            uid: format!("{ns}/{name}"),
            namespace: ns.into(),
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ip: ip.parse().unwrap(),
            node: node.into(),
            ports: vec![NamedPort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 8080,
            }],
        }
    }

    fn policy(ns: &str, name: &str, spec: serde_json::Value) -> NetworkPolicy {
        serde_json::from_value(json!({
            "metadata": {"namespace": ns, "name": name},
            "spec": spec,
        }))
        .unwrap()
    }

    fn namespaces() -> BTreeMap<String, BTreeMap<String, String>> {
        ["a", "b"]
            .iter()
            .map(|n| {
                let mut labels =
                    BTreeMap::from([(NAMESPACE_NAME_LABEL.to_owned(), (*n).to_owned())]);
                if *n == "b" {
                    labels.insert("team".into(), "blue".into());
                }
                ((*n).to_owned(), labels)
            })
            .collect()
    }

    fn pods() -> Vec<PodView> {
        vec![
            pod("a", "web", "10.244.0.2", "n1", &[("app", "web")]),
            pod("a", "client", "10.244.0.3", "n1", &[("app", "client")]),
            pod("a", "other", "10.244.1.2", "n2", &[("app", "client")]),
            pod("b", "blue", "10.244.1.3", "n2", &[("app", "client")]),
        ]
    }

    fn ip(s: &str) -> u32 {
        u32::from(s.parse::<Ipv4Addr>().unwrap())
    }

    #[test]
    fn unselected_pods_are_not_isolated() {
        let p = policy(
            "a",
            "web",
            json!({"podSelector": {"matchLabels": {"app": "web"}}}),
        );
        let plan = plan(&[&p], &pods(), &namespaces(), "n1");
        assert_eq!(plan.pods.len(), 1);
        assert_eq!(plan.pods[0].name, "web");
        // Default deny for ingress only: no rules, egress open.
        assert_eq!(plan.pods[0].ingress, Some(vec![]));
        assert_eq!(plan.pods[0].egress, None);
    }

    #[test]
    fn pod_and_namespace_selectors_pick_their_peers() {
        let p = policy(
            "a",
            "web",
            json!({
                "podSelector": {"matchLabels": {"app": "web"}},
                "ingress": [
                    {"from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                     "ports": [{"port": "http"}, {"port": 9000, "endPort": 9010, "protocol": "UDP"}]},
                    {"from": [{"namespaceSelector": {"matchLabels": {"team": "blue"}}}]},
                ],
            }),
        );
        let plan = plan(&[&p], &pods(), &namespaces(), "n1");
        let ingress = plan.pods[0].ingress.as_ref().unwrap();
        assert_eq!(ingress.len(), 2);
        let sets: Vec<&Ranges> = ingress
            .iter()
            .map(|a| match &a.peers {
                Peers::Set(s) => &plan.sets[s],
                other => panic!("{other:?}"),
            })
            .collect();
        // Same-namespace clients on both nodes (not b's client).
        assert!(sets.contains(&&vec![
            (ip("10.244.0.3"), ip("10.244.0.3")),
            (ip("10.244.1.2"), ip("10.244.1.2"))
        ]));
        // Every pod of namespace b.
        assert!(sets.contains(&&vec![(ip("10.244.1.3"), ip("10.244.1.3"))]));
        let with_ports = ingress.iter().find(|a| !a.ports.is_empty()).unwrap();
        assert_eq!(
            with_ports.ports,
            vec![
                PortMatch {
                    protocol: Protocol::Tcp,
                    range: Some((8080, 8080))
                },
                PortMatch {
                    protocol: Protocol::Udp,
                    range: Some((9000, 9010))
                },
            ]
        );
    }

    #[test]
    fn ip_blocks_leave_out_their_exceptions() {
        assert_eq!(
            cidr_less(
                "10.0.0.0/8",
                &["10.1.0.0/16".into(), "10.255.255.255/32".into()]
            ),
            vec![
                (ip("10.0.0.0"), ip("10.0.255.255")),
                (ip("10.2.0.0"), ip("10.255.255.254"))
            ]
        );
        assert_eq!(
            merge(vec![(5, 6), (1, 2), (3, 4), (10, 12)]),
            vec![(1, 6), (10, 12)]
        );
        assert!(contains(&vec![(1, 6), (10, 12)], Ipv4Addr::from(11)));
        assert!(!contains(&vec![(1, 6), (10, 12)], Ipv4Addr::from(8)));
        assert_eq!(parse_cidr("0.0.0.0/0"), Some((0, u32::MAX)));
    }

    #[test]
    fn egress_named_ports_resolve_on_each_destination() {
        let p = policy(
            "a",
            "client",
            json!({
                "podSelector": {"matchLabels": {"app": "client"}},
                "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                            "ports": [{"port": "http"}]}],
            }),
        );
        let plan = plan(&[&p], &pods(), &namespaces(), "n1");
        assert_eq!(plan.pods.len(), 1);
        let client = &plan.pods[0];
        // Without policyTypes, egress rules make the policy of both types:
        // the client is isolated for ingress too.
        assert_eq!(client.ingress, Some(vec![]));
        assert_eq!(
            client.egress.as_ref().unwrap(),
            &vec![Allow {
                peers: Peers::Addr("10.244.0.2".parse().unwrap()),
                ports: vec![PortMatch {
                    protocol: Protocol::Tcp,
                    range: Some((8080, 8080))
                }],
            }]
        );
    }

    #[test]
    fn in_process_decisions_follow_the_same_rules() {
        let p = policy(
            "a",
            "web",
            json!({
                "podSelector": {"matchLabels": {"app": "web"}},
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}},
                                      {"ipBlock": {"cidr": "192.168.0.0/16", "except": ["192.168.1.0/24"]}}],
                             "ports": [{"port": "http"}]}],
            }),
        );
        let pods = pods();
        let ns = namespaces();
        let (web, client, blue) = (&pods[0], &pods[1], &pods[3]);
        let decide = |from: Party<'_>, to: Party<'_>, port| {
            allows(&[&p], &pods, &ns, (from, to), Protocol::Tcp, port)
        };
        assert!(decide(Party::Pod(client), Party::Pod(web), 8080));
        assert!(!decide(Party::Pod(client), Party::Pod(web), 9090));
        // Another namespace's client, by pod or by its address.
        assert!(!decide(Party::Pod(blue), Party::Pod(web), 8080));
        assert!(!decide(Party::Addr(blue.ip), Party::Pod(web), 8080));
        assert!(decide(Party::Addr(client.ip), Party::Addr(web.ip), 8080));
        assert!(decide(
            Party::Addr("192.168.2.9".parse().unwrap()),
            Party::Pod(web),
            8080
        ));
        assert!(!decide(
            Party::Addr("192.168.1.9".parse().unwrap()),
            Party::Pod(web),
            8080
        ));
        // Pods no policy selects are open.
        assert!(decide(Party::Pod(web), Party::Pod(blue), 1234));
        // The protocol counts: a UDP-only rule admits no TCP.
        let dns = policy(
            "b",
            "dns",
            json!({"podSelector": {}, "ingress": [{"ports": [{"port": 53, "protocol": "UDP"}]}]}),
        );
        let to_blue = |protocol| {
            allows(
                &[&dns],
                &pods,
                &ns,
                (Party::Pod(client), Party::Pod(blue)),
                protocol,
                53,
            )
        };
        assert!(to_blue(Protocol::Udp));
        assert!(!to_blue(Protocol::Tcp));
    }

    #[test]
    fn a_rule_whose_peers_match_nothing_admits_nothing() {
        let p = policy(
            "a",
            "web",
            json!({
                "podSelector": {},
                "policyTypes": ["Egress"],
                "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "nobody"}}}]}],
            }),
        );
        let plan = plan(&[&p], &pods(), &namespaces(), "n1");
        assert_eq!(plan.pods.len(), 2);
        for pod in &plan.pods {
            assert_eq!(pod.ingress, None);
            assert_eq!(pod.egress, Some(vec![]));
        }
        assert!(plan.sets.is_empty());
    }
}
