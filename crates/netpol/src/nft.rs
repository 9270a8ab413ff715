//! A [`Plan`] as one nftables table, `ip wasmkube-policy`: written whole in
//! one transaction at start and after a failure, otherwise changed by
//! what differs from the last plan written ([`Rendered::diff`]), also in
//! one transaction, so a change costs what it touches.
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

use std::collections::BTreeMap;
use std::fmt::Write;
use std::net::Ipv4Addr;

use sha2::Digest;

use crate::model::{Allow, Peers, Plan, PodPlan, PortMatch, Ranges};

/// The table's name.
pub const TABLE: &str = "wasmkube-policy";

/// A plan as the table's parts: address sets, pod chains (their rules as
/// text) and the two verdict maps. What the sync loop keeps of what it
/// wrote, to write only the difference next time.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rendered {
    sets: BTreeMap<String, Ranges>,
    chains: BTreeMap<String, Vec<String>>,
    ingress: BTreeMap<Ipv4Addr, String>,
    egress: BTreeMap<Ipv4Addr, String>,
}

impl Rendered {
    pub fn of(plan: &Plan) -> Self {
        let mut out = Self {
            sets: plan.sets.clone(),
            ..Self::default()
        };
        for pod in &plan.pods {
            for (dir, allows, peer, map) in [
                ("in", &pod.ingress, "saddr", &mut out.ingress),
                ("out", &pod.egress, "daddr", &mut out.egress),
            ] {
                let Some(allows) = allows else { continue };
                let name = chain(pod, dir);
                // A pod may always reach itself (through its own Service).
                let mut lines = vec![format!("ip {peer} {} return", pod.ip)];
                for allow in allows {
                    lines.extend(
                        rules(allow, peer)
                            .into_iter()
                            .map(|r| format!("{r} return")),
                    );
                }
                lines.push("counter reject with icmp type admin-prohibited".into());
                map.insert(pod.ip, name.clone());
                out.chains.insert(name, lines);
            }
        }
        out
    }

    /// How many pod chains and address sets it has.
    pub fn size(&self) -> (usize, usize) {
        (self.chains.len(), self.sets.len())
    }

    /// A script that replaces the whole table with this one.
    pub fn full(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "add table ip {TABLE}");
        let _ = writeln!(s, "delete table ip {TABLE}");
        let _ = writeln!(s, "table ip {TABLE} {{");
        for (name, ranges) in &self.sets {
            let _ = writeln!(
                s,
                "  set {name} {{ type ipv4_addr; flags interval; elements = {{ {} }} }}",
                elements(ranges)
            );
        }
        for (name, entries) in [("ingress", &self.ingress), ("egress", &self.egress)] {
            let _ = write!(s, "  map {name} {{ type ipv4_addr : verdict;");
            if !entries.is_empty() {
                let _ = write!(s, " elements = {{ {} }}", verdicts(entries.iter()));
            }
            let _ = writeln!(s, " }}");
        }
        let _ = writeln!(
            s,
            "  chain forward {{\n    type filter hook forward priority filter - 10; policy accept;\n    ct state established,related accept\n    ip daddr vmap @ingress\n    ip saddr vmap @egress\n  }}"
        );
        for (name, lines) in &self.chains {
            let _ = writeln!(s, "  chain {name} {{");
            for line in lines {
                let _ = writeln!(s, "    {line}");
            }
            let _ = writeln!(s, "  }}");
        }
        let _ = writeln!(s, "}}");
        s
    }

    /// A script that turns the table `old` describes into this one, in
    /// one transaction: only the sets, chains and map elements that
    /// changed (a changed set or chain is flushed and filled again);
    /// `None` when nothing changed.
    pub fn diff(&self, old: &Rendered) -> Option<String> {
        if self == old {
            return None;
        }
        let mut s = String::new();
        let t = format!("ip {TABLE}");
        for (name, ranges) in &self.sets {
            match old.sets.get(name) {
                Some(before) if before == ranges => continue,
                Some(_) => {
                    let _ = writeln!(s, "flush set {t} {name}");
                }
                None => {
                    let _ = writeln!(
                        s,
                        "add set {t} {name} {{ type ipv4_addr; flags interval; }}"
                    );
                }
            }
            let _ = writeln!(s, "add element {t} {name} {{ {} }}", elements(ranges));
        }
        for (name, lines) in &self.chains {
            match old.chains.get(name) {
                Some(before) if before == lines => continue,
                Some(_) => {
                    let _ = writeln!(s, "flush chain {t} {name}");
                }
                None => {
                    let _ = writeln!(s, "add chain {t} {name}");
                }
            }
            for line in lines {
                let _ = writeln!(s, "add rule {t} {name} {line}");
            }
        }
        for (map, now, before) in [
            ("ingress", &self.ingress, &old.ingress),
            ("egress", &self.egress, &old.egress),
        ] {
            let gone = before
                .iter()
                .filter(|(ip, chain)| now.get(*ip) != Some(*chain));
            let gone = verdicts(gone);
            if !gone.is_empty() {
                let _ = writeln!(s, "delete element {t} {map} {{ {gone} }}");
            }
            let new = now
                .iter()
                .filter(|(ip, chain)| before.get(*ip) != Some(*chain));
            let new = verdicts(new);
            if !new.is_empty() {
                let _ = writeln!(s, "add element {t} {map} {{ {new} }}");
            }
        }
        for name in old.chains.keys().filter(|c| !self.chains.contains_key(*c)) {
            let _ = writeln!(s, "delete chain {t} {name}");
        }
        for name in old.sets.keys().filter(|n| !self.sets.contains_key(*n)) {
            let _ = writeln!(s, "delete set {t} {name}");
        }
        Some(s)
    }
}

/// A script that replaces the whole table with `plan`'s.
pub fn render(plan: &Plan) -> String {
    Rendered::of(plan).full()
}

fn verdicts<'a>(entries: impl Iterator<Item = (&'a Ipv4Addr, &'a String)>) -> String {
    entries
        .map(|(ip, chain)| format!("{ip} : jump {chain}"))
        .collect::<Vec<_>>()
        .join(", ")
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

        // A change writes only what differs.
        let before = Rendered::of(&plan);
        assert_eq!(before.diff(&before), None);
        let mut changed = plan.clone();
        changed.sets.insert("p-x".into(), vec![(1, 2)]);
        changed.pods[0].egress = Some(vec![]);
        let diff = Rendered::of(&changed).diff(&before).unwrap();
        assert!(diff.contains("flush set ip wasmkube-policy p-x\nadd element ip wasmkube-policy p-x { 0.0.0.1-0.0.0.2 }"), "{diff}");
        assert!(diff.contains("add chain ip wasmkube-policy out-"), "{diff}");
        assert!(
            diff.contains("add element ip wasmkube-policy egress { 10.244.0.2 : jump out-"),
            "{diff}"
        );
        assert!(!diff.contains("chain ip wasmkube-policy in-"), "{diff}");
        let back = before.diff(&Rendered::of(&changed)).unwrap();
        assert!(
            back.contains("delete element ip wasmkube-policy egress { 10.244.0.2 : jump out-"),
            "{back}"
        );
        assert!(
            back.contains("delete chain ip wasmkube-policy out-"),
            "{back}"
        );
    }
}
