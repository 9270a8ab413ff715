//! A [`Plan`] as one nftables table, `ip wasmkube-policy`, written whole in
//! one transaction.
//!
//! Its one base chain filters forwarded packets, the traffic that passes
//! through the node between a pod's interface and anything else (another
//! pod of this node, another node, the outside): packets of connections
//! already admitted pass at once; a new one goes, by destination, to the
//! ingress chain of the isolated local pod it is for (one verdict-map
//! lookup), then, by source, to the egress chain of the isolated local pod
//! that sends it. Each pod chain returns for what its rules allow and
//! rejects the rest (ICMP admin-prohibited, so a refused connection fails
//! at once instead of timing out). Traffic between a pod and its own node
//! never passes the forward hook, so it is always allowed, as Kubernetes
//! says it is; a pod's traffic to itself is allowed by the first rule of
//! each of its chains.

use std::fmt::Write;
use std::net::Ipv4Addr;

use sha2::Digest;

use crate::model::{Allow, Peers, Plan, PodPlan, PortMatch, Ranges};

/// The table's name.
pub const TABLE: &str = "wasmkube-policy";

/// A script that replaces the whole table with `plan`'s.
pub fn render(plan: &Plan) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "add table ip {TABLE}");
    let _ = writeln!(s, "delete table ip {TABLE}");
    let _ = writeln!(s, "table ip {TABLE} {{");
    for (name, ranges) in &plan.sets {
        let _ = writeln!(
            s,
            "  set {name} {{ type ipv4_addr; flags interval; elements = {{ {} }} }}",
            elements(ranges)
        );
    }
    let mut ingress = Vec::new();
    let mut egress = Vec::new();
    for pod in &plan.pods {
        if pod.ingress.is_some() {
            ingress.push(format!("{} : jump {}", pod.ip, chain(pod, "in")));
        }
        if pod.egress.is_some() {
            egress.push(format!("{} : jump {}", pod.ip, chain(pod, "out")));
        }
    }
    for (name, entries) in [("ingress", &ingress), ("egress", &egress)] {
        let _ = write!(s, "  map {name} {{ type ipv4_addr : verdict;");
        if !entries.is_empty() {
            let _ = write!(s, " elements = {{ {} }}", entries.join(", "));
        }
        let _ = writeln!(s, " }}");
    }
    let _ = writeln!(
        s,
        "  chain forward {{\n    type filter hook forward priority filter - 10; policy accept;\n    ct state established,related accept\n    ip daddr vmap @ingress\n    ip saddr vmap @egress\n  }}"
    );
    for pod in &plan.pods {
        for (dir, allows, peer) in [("in", &pod.ingress, "saddr"), ("out", &pod.egress, "daddr")] {
            let Some(allows) = allows else { continue };
            let _ = writeln!(s, "  chain {} {{", chain(pod, dir));
            // A pod may always reach itself (through its own Service).
            let _ = writeln!(s, "    ip {peer} {} return", pod.ip);
            for allow in allows {
                for rule in rules(allow, peer) {
                    let _ = writeln!(s, "    {rule} return");
                }
            }
            let _ = writeln!(
                s,
                "    counter reject with icmp type admin-prohibited\n  }}"
            );
        }
    }
    let _ = writeln!(s, "}}");
    s
}

/// A script that removes the table.
pub fn remove() -> String {
    format!("add table ip {TABLE}\ndelete table ip {TABLE}\n")
}

/// The matches of one allow (one per port; one for all ports).
fn rules(allow: &Allow, peer: &str) -> Vec<String> {
    let who = match &allow.peers {
        Peers::Any => String::new(),
        Peers::Set(name) => format!("ip {peer} @{name} "),
        Peers::Addr(ip) => format!("ip {peer} {ip} "),
    };
    if allow.ports.is_empty() {
        return vec![who.trim_end().to_owned()];
    }
    allow
        .ports
        .iter()
        .map(|PortMatch { protocol, range }| {
            let proto = protocol.nft();
            match range {
                None => format!("{who}meta l4proto {proto}"),
                Some((a, b)) if a == b => format!("{who}meta l4proto {proto} th dport {a}"),
                Some((a, b)) => format!("{who}meta l4proto {proto} th dport {a}-{b}"),
            }
        })
        .collect()
}

/// A pod chain's name: short and unique to the pod and its address.
fn chain(pod: &PodPlan, dir: &str) -> String {
    let digest =
        sha2::Sha256::digest(format!("{}/{}/{}", pod.namespace, pod.name, pod.ip).as_bytes());
    format!(
        "{dir}-{}",
        &data_encoding::BASE32_NOPAD.encode(&digest)[..10]
    )
}

fn elements(ranges: &Ranges) -> String {
    ranges
        .iter()
        .map(|&(a, b)| {
            if a == b {
                Ipv4Addr::from(a).to_string()
            } else {
                format!("{}-{}", Ipv4Addr::from(a), Ipv4Addr::from(b))
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Protocol;

    #[test]
    fn renders_chains_maps_and_sets() {
        let plan = Plan {
            pods: vec![PodPlan {
                namespace: "a".into(),
                name: "web".into(),
                ip: "10.244.0.2".parse().unwrap(),
                ingress: Some(vec![
                    Allow {
                        peers: Peers::Set("p-x".into()),
                        ports: vec![PortMatch {
                            protocol: Protocol::Tcp,
                            range: Some((80, 80)),
                        }],
                    },
                    Allow {
                        peers: Peers::Any,
                        ports: vec![PortMatch {
                            protocol: Protocol::Udp,
                            range: Some((9000, 9010)),
                        }],
                    },
                ]),
                egress: None,
            }],
            sets: [("p-x".to_owned(), vec![(1, 1), (16, 31)])].into(),
        };
        let s = render(&plan);
        assert!(
            s.contains("elements = { 0.0.0.1, 0.0.0.16-0.0.0.31 }"),
            "{s}"
        );
        assert!(
            s.contains("ip saddr @p-x meta l4proto tcp th dport 80 return"),
            "{s}"
        );
        assert!(
            s.contains("meta l4proto udp th dport 9000-9010 return"),
            "{s}"
        );
        assert!(s.contains("ip saddr 10.244.0.2 return"), "{s}");
        assert!(
            s.contains("map egress { type ipv4_addr : verdict; }"),
            "{s}"
        );
        assert!(s.contains("10.244.0.2 : jump in-"), "{s}");
    }
}
