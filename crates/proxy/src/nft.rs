//! The node's nftables program, as kube-proxy's nftables mode lays it out:
//! one table, verdict maps keyed by address, protocol and port that send a
//! packet to its Service's chain in one lookup, a chain per Service port
//! that picks an endpoint at random (or the client's last one, under
//! `sessionAffinity: ClientIP`), and a chain per endpoint that DNATs.
//!
//! [`Ruleset`] is the per-Service part as data; [`full`] writes the whole
//! table from scratch in one transaction (at start, and after anything went
//! wrong) and [`diff`] writes only what changed between two rulesets, so an
//! endpoint change costs a few lines however many Services there are.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

use sha2::Digest;

use crate::model::{Endpoint, NodeNetwork, PortName, ServicePort};

/// The table the proxy owns; nothing else of the node's rules is touched.
pub const TABLE: &str = "wasmkube";
/// The packet mark that asks `masquerading` to SNAT a connection.
const MASQUERADE_MARK: &str = "0x4000";

/// Service map names.
const SERVICE_IPS: &str = "service-ips";
const SERVICE_NODEPORTS: &str = "service-nodeports";
const NO_ENDPOINT_SERVICES: &str = "no-endpoint-services";
const NO_ENDPOINT_NODEPORTS: &str = "no-endpoint-nodeports";

/// The per-Service part of the table: chains, affinity sets and map
/// elements, each keyed by its name so two rulesets compare piecewise.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ruleset {
    /// Chain name to its rules.
    chains: BTreeMap<String, Vec<String>>,
    /// Affinity sets (their timeout is part of the name).
    sets: BTreeMap<String, u32>,
    /// (map, key) to verdict.
    elements: BTreeMap<(&'static str, String), String>,
}

impl Ruleset {
    /// How many chains, sets and map elements it has.
    pub fn size(&self) -> (usize, usize, usize) {
        (self.chains.len(), self.sets.len(), self.elements.len())
    }
}

/// A short, stable hash of a name, as kube-proxy prefixes its chain names
/// (names are long and several Services may share a prefix once truncated).
fn hash(name: &str) -> String {
    let digest = sha2::Sha256::digest(name.as_bytes());
    data_encoding::BASE32_NOPAD.encode(&digest)[..8].to_owned()
}

/// The readable part of a Service port's chain names.
fn base(name: &PortName, port: u16) -> String {
    let port_name = if name.port.is_empty() {
        port.to_string()
    } else {
        name.port.clone()
    };
    format!(
        "{}/{}/{}/{port_name}",
        name.namespace,
        name.name,
        name.protocol.nft()
    )
}

fn endpoint_chain(base: &str, e: &Endpoint) -> String {
    let suffix = format!("{base}__{}/{}", e.ip, e.port);
    format!("endpoint-{}-{suffix}", hash(&suffix))
}

fn affinity_set(chain: &str, seconds: u32) -> String {
    format!("affinity-{}", hash(&format!("{chain}/{seconds}")))
}

/// The per-Service part of the table for these Service ports.
pub fn build<'a>(ports: impl IntoIterator<Item = &'a ServicePort>, net: &NodeNetwork) -> Ruleset {
    let mut r = Ruleset::default();
    for p in ports {
        let base = base(&p.name, p.port);
        let proto = p.name.protocol.nft();
        let service_chain = format!("service-{}-{base}", hash(&base));
        let external_chain = format!("external-{}-{base}", hash(&base));
        let endpoint_chains = |endpoints: &[Endpoint], r: &mut Ruleset| -> Vec<String> {
            endpoints
                .iter()
                .map(|e| {
                    let chain = endpoint_chain(&base, e);
                    let mut rules = vec![format!("ip saddr {} jump mark-for-masquerade", e.ip)];
                    if let Some(seconds) = p.affinity_seconds {
                        let set = affinity_set(&chain, seconds);
                        rules.push(format!("update @{set} {{ ip saddr }}"));
                        r.sets.insert(set, seconds);
                    }
                    rules.push(format!("meta l4proto {proto} dnat to {}:{}", e.ip, e.port));
                    r.chains.insert(chain.clone(), rules);
                    chain
                })
                .collect()
        };
        // Picks an endpoint: the client's last one under affinity, else one
        // at random.
        let pick = |chains: &[String]| -> Vec<String> {
            let mut rules = Vec::new();
            if let Some(seconds) = p.affinity_seconds {
                for c in chains {
                    rules.push(format!("ip saddr @{} goto {c}", affinity_set(c, seconds)));
                }
            }
            let arms: Vec<String> = chains
                .iter()
                .enumerate()
                .map(|(i, c)| format!("{i} : goto {c}"))
                .collect();
            rules.push(format!(
                "numgen random mod {} vmap {{ {} }}",
                chains.len(),
                arms.join(", ")
            ));
            rules
        };

        let cluster = endpoint_chains(&p.cluster_endpoints, &mut r);
        if !cluster.is_empty() {
            // Traffic to a cluster IP from outside the pod network (the node
            // itself, say) is masqueraded, so replies come back through
            // this node.
            let mut rules = vec![match net.cluster_cidr {
                Some(cidr) => format!("ip saddr != {cidr} jump mark-for-masquerade"),
                None => "jump mark-for-masquerade".to_owned(),
            }];
            rules.extend(pick(&cluster));
            r.chains.insert(service_chain.clone(), rules);
        }
        if let Some(ip) = p.cluster_ip {
            let key = format!("{ip} . {proto} . {}", p.port);
            if cluster.is_empty() {
                r.elements
                    .insert((NO_ENDPOINT_SERVICES, key), "goto reject-chain".to_owned());
            } else {
                r.elements
                    .insert((SERVICE_IPS, key), format!("goto {service_chain}"));
            }
        }
        if !p.external() {
            continue;
        }
        let external_target = if p.external_local {
            let local = endpoint_chains(&p.external_endpoints, &mut r);
            (!local.is_empty()).then(|| pick(&local))
        } else {
            (!cluster.is_empty()).then(|| {
                vec![
                    "jump mark-for-masquerade".to_owned(),
                    format!("goto {service_chain}"),
                ]
            })
        };
        // No endpoint to send it to: refused, or, under a Local policy,
        // dropped (another node may have endpoints; a load balancer in front
        // would retry there).
        let none = if p.external_local {
            "drop"
        } else {
            "goto reject-chain"
        };
        let mut keys: Vec<(&'static str, &'static str, String)> = p
            .external_ips
            .iter()
            .map(|ip| {
                (
                    SERVICE_IPS,
                    NO_ENDPOINT_SERVICES,
                    format!("{ip} . {proto} . {}", p.port),
                )
            })
            .collect();
        if let Some(np) = p.node_port {
            keys.push((
                SERVICE_NODEPORTS,
                NO_ENDPOINT_NODEPORTS,
                format!("{proto} . {np}"),
            ));
        }
        match external_target {
            Some(rules) => {
                r.chains.insert(external_chain.clone(), rules);
                for (map, _, key) in keys {
                    r.elements
                        .insert((map, key), format!("goto {external_chain}"));
                }
            }
            None => {
                for (_, map, key) in keys {
                    r.elements.insert((map, key), none.to_owned());
                }
            }
        }
    }
    r
}

/// The fixed part of the table: maps, dispatch and NAT chains, the hooks.
fn skeleton(net: &NodeNetwork) -> String {
    let svc = net.service_cidr;
    let mut t = String::new();
    let _ = writeln!(t, "table ip {TABLE} {{");
    for (map, key) in [
        (SERVICE_IPS, "ipv4_addr . inet_proto . inet_service"),
        (SERVICE_NODEPORTS, "inet_proto . inet_service"),
        (
            NO_ENDPOINT_SERVICES,
            "ipv4_addr . inet_proto . inet_service",
        ),
        (NO_ENDPOINT_NODEPORTS, "inet_proto . inet_service"),
    ] {
        let _ = writeln!(t, "  map {map} {{ type {key} : verdict; }}");
    }
    let _ = writeln!(
        t,
        "  chain mark-for-masquerade {{ meta mark set meta mark | {MASQUERADE_MARK}; }}"
    );
    let _ = writeln!(
        t,
        "  chain masquerading {{ meta mark & {MASQUERADE_MARK} == 0 return; meta mark set meta mark ^ {MASQUERADE_MARK}; masquerade fully-random; }}"
    );
    let _ = writeln!(t, "  chain reject-chain {{ reject; }}");
    // Node ports answer on every local address but loopback ones (which
    // would need route_localnet) and the cluster IPs (local routes too).
    let local = format!("ip daddr != {svc} fib daddr type local ip daddr != 127.0.0.0/8");
    let _ = writeln!(
        t,
        "  chain services {{ ip daddr . meta l4proto . th dport vmap @{SERVICE_IPS}; {local} meta l4proto . th dport vmap @{SERVICE_NODEPORTS}; }}"
    );
    let _ = writeln!(
        t,
        "  chain endpoints-check {{ ip daddr . meta l4proto . th dport vmap @{NO_ENDPOINT_SERVICES}; {local} meta l4proto . th dport vmap @{NO_ENDPOINT_NODEPORTS}; }}"
    );
    let _ = writeln!(
        t,
        "  chain nat-prerouting {{ type nat hook prerouting priority dstnat; policy accept; jump services; }}"
    );
    let _ = writeln!(
        t,
        "  chain nat-output {{ type nat hook output priority -100; policy accept; jump services; }}"
    );
    // Pods' own traffic leaving the cluster network leaves from the node's
    // address (the pod network's masquerade).
    let egress = net
        .cluster_cidr
        .map(|c| format!(" ip saddr {c} ip daddr != {c} masquerade;"))
        .unwrap_or_default();
    let _ = writeln!(
        t,
        "  chain nat-postrouting {{ type nat hook postrouting priority srcnat; policy accept; jump masquerading;{egress} }}"
    );
    // A cluster IP is a local address of the node (so the node's own
    // connections route to it); a new connection that reaches it
    // untranslated (a port the Service does not have) is refused, never
    // handed to a process of the node listening on that port. (Replies to
    // the node's own translated connections arrive addressed to a cluster
    // IP too: they are not new.)
    let served_here = if net.node_local.is_empty() {
        String::new()
    } else {
        let ips: Vec<String> = net.node_local.iter().map(|ip| ip.to_string()).collect();
        format!(" ip daddr != {{ {} }}", ips.join(", "))
    };
    let _ = writeln!(
        t,
        "  chain filter-input {{ type filter hook input priority filter - 10; policy accept; ct state new jump endpoints-check; ct state new ip daddr {svc}{served_here} reject; }}"
    );
    for hook in ["forward", "output"] {
        let _ = writeln!(
            t,
            "  chain filter-{hook} {{ type filter hook {hook} priority filter - 10; policy accept; ct state new jump endpoints-check; }}"
        );
    }
    t.push_str("}\n");
    t
}

/// A script that replaces the whole table with `rules` in one transaction.
pub fn full(net: &NodeNetwork, rules: &Ruleset) -> String {
    let mut s = format!("add table ip {TABLE}\ndelete table ip {TABLE}\n");
    s.push_str(&skeleton(net));
    s.push_str(&diff(&Ruleset::default(), rules));
    s
}

/// A script that turns the table holding `old` into one holding `new`.
/// Everything that references a chain or set is removed before it, and
/// everything a new rule references is added before the rule.
pub fn diff(old: &Ruleset, new: &Ruleset) -> String {
    let mut s = String::new();
    let changed_elements: BTreeSet<&(&str, String)> = new
        .elements
        .iter()
        .filter(|(k, v)| old.elements.get(*k) != Some(*v))
        .map(|(k, _)| k)
        .collect();
    for (map, key) in old.elements.keys() {
        if !new.elements.contains_key(&(*map, key.clone()))
            || changed_elements.contains(&(*map, key.clone()))
        {
            let _ = writeln!(s, "delete element ip {TABLE} {map} {{ {key} }}");
        }
    }
    for (set, seconds) in &new.sets {
        if !old.sets.contains_key(set) {
            let _ = writeln!(
                s,
                "add set ip {TABLE} {set} {{ type ipv4_addr; flags dynamic,timeout; timeout {seconds}s; }}"
            );
        }
    }
    let changed_chains: Vec<(&String, &Vec<String>)> = new
        .chains
        .iter()
        .filter(|(k, v)| old.chains.get(*k) != Some(*v))
        .collect();
    for (chain, _) in &changed_chains {
        if !old.chains.contains_key(*chain) {
            let _ = writeln!(s, "add chain ip {TABLE} {chain}");
        }
    }
    for (chain, rules) in &changed_chains {
        if old.chains.contains_key(*chain) {
            let _ = writeln!(s, "flush chain ip {TABLE} {chain}");
        }
        for rule in *rules {
            let _ = writeln!(s, "add rule ip {TABLE} {chain} {rule}");
        }
    }
    let gone_chains: Vec<String> = removed(&old.chains, &new.chains);
    for chain in &gone_chains {
        let _ = writeln!(s, "flush chain ip {TABLE} {chain}");
    }
    for key in changed_elements {
        let (map, key) = key;
        let _ = writeln!(
            s,
            "add element ip {TABLE} {map} {{ {key} : {} }}",
            new.elements[&(*map, key.clone())]
        );
    }
    for chain in &gone_chains {
        let _ = writeln!(s, "delete chain ip {TABLE} {chain}");
    }
    for set in removed(&old.sets, &new.sets) {
        let _ = writeln!(s, "delete set ip {TABLE} {set}");
    }
    s
}

/// The keys of `a` that `b` lacks.
fn removed<K: Ord + Clone, V, W>(a: &BTreeMap<K, V>, b: &BTreeMap<K, W>) -> Vec<K> {
    a.keys().filter(|k| !b.contains_key(*k)).cloned().collect()
}

/// A script that removes the table.
pub fn remove() -> String {
    format!("add table ip {TABLE}\ndelete table ip {TABLE}\n")
}

/// Where `nft` is, or why the node has none.
pub fn available() -> Result<(), String> {
    match std::process::Command::new("nft")
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
    {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(format!("`nft --version` failed ({s})")),
        Err(e) => Err(format!(
            "`nft` not found ({e}): install nftables to route Services"
        )),
    }
}

/// Runs a script as one `nft` transaction: all of it or nothing.
pub async fn apply(script: &str) -> Result<(), crate::Error> {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|source| crate::Error::Spawn {
            command: "nft",
            source,
        })?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let write = stdin.write_all(script.as_bytes()).await;
    drop(stdin);
    let out = child
        .wait_with_output()
        .await
        .map_err(|source| crate::Error::Spawn {
            command: "nft",
            source,
        })?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let first = stderr.lines().take(3).collect::<Vec<_>>().join(" | ");
    Err(crate::Error::Nft(match write {
        Err(e) => format!("{first} (writing the script: {e})"),
        Ok(()) => first,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Protocol;

    fn net() -> NodeNetwork {
        NodeNetwork {
            cluster_cidr: Some("10.244.0.0/16".parse().unwrap()),
            service_cidr: "10.96.0.0/12".parse().unwrap(),
            node_local: vec!["10.96.0.10".parse().unwrap()],
        }
    }

    fn port(endpoints: &[&str]) -> ServicePort {
        let endpoints: Vec<Endpoint> = endpoints
            .iter()
            .map(|ip| Endpoint {
                ip: ip.parse().unwrap(),
                port: 8080,
            })
            .collect();
        ServicePort {
            name: PortName {
                namespace: "ns".into(),
                name: "web".into(),
                port: "http".into(),
                protocol: Protocol::Tcp,
            },
            cluster_ip: Some("10.96.0.10".parse().unwrap()),
            port: 80,
            node_port: None,
            external_ips: Vec::new(),
            affinity_seconds: None,
            cluster_endpoints: endpoints.clone(),
            external_endpoints: endpoints,
            external_local: false,
        }
    }

    /// The script's lines without the chain hashes, for stable expectations.
    fn lines(script: &str) -> Vec<String> {
        script
            .lines()
            .map(|l| {
                l.split(' ')
                    .map(|w| {
                        let (at, w) = w.strip_prefix('@').map_or(("", w), |w| ("@", w));
                        match w.split_once('-') {
                            Some((kind, rest))
                                if ["service", "endpoint", "external", "affinity"]
                                    .contains(&kind)
                                    && rest.len() >= 8
                                    && rest[..8]
                                        .bytes()
                                        .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit()) =>
                            {
                                format!("{at}{kind}-H{}", &rest[8..])
                            }
                            _ => format!("{at}{w}"),
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect()
    }

    #[test]
    fn a_cluster_ip_service_dispatches_at_random_to_its_endpoints() {
        let r = build(&[port(&["10.244.0.5", "10.244.1.5"])], &net());
        assert_eq!(
            lines(&diff(&Ruleset::default(), &r)),
            [
                "add chain ip wasmkube endpoint-H-ns/web/tcp/http__10.244.0.5/8080",
                "add chain ip wasmkube endpoint-H-ns/web/tcp/http__10.244.1.5/8080",
                "add chain ip wasmkube service-H-ns/web/tcp/http",
                "add rule ip wasmkube endpoint-H-ns/web/tcp/http__10.244.0.5/8080 ip saddr 10.244.0.5 jump mark-for-masquerade",
                "add rule ip wasmkube endpoint-H-ns/web/tcp/http__10.244.0.5/8080 meta l4proto tcp dnat to 10.244.0.5:8080",
                "add rule ip wasmkube endpoint-H-ns/web/tcp/http__10.244.1.5/8080 ip saddr 10.244.1.5 jump mark-for-masquerade",
                "add rule ip wasmkube endpoint-H-ns/web/tcp/http__10.244.1.5/8080 meta l4proto tcp dnat to 10.244.1.5:8080",
                "add rule ip wasmkube service-H-ns/web/tcp/http ip saddr != 10.244.0.0/16 jump mark-for-masquerade",
                "add rule ip wasmkube service-H-ns/web/tcp/http numgen random mod 2 vmap { 0 : goto endpoint-H-ns/web/tcp/http__10.244.0.5/8080, 1 : goto endpoint-H-ns/web/tcp/http__10.244.1.5/8080 }",
                "add element ip wasmkube service-ips { 10.96.0.10 . tcp . 80 : goto service-H-ns/web/tcp/http }",
            ]
        );
    }

    #[test]
    fn an_endpoint_change_rewrites_only_its_service_and_the_chains_that_go() {
        let before = build(&[port(&["10.244.0.5", "10.244.1.5"])], &net());
        let after = build(&[port(&["10.244.1.5"])], &net());
        assert_eq!(
            lines(&diff(&before, &after)),
            [
                "flush chain ip wasmkube service-H-ns/web/tcp/http",
                "add rule ip wasmkube service-H-ns/web/tcp/http ip saddr != 10.244.0.0/16 jump mark-for-masquerade",
                "add rule ip wasmkube service-H-ns/web/tcp/http numgen random mod 1 vmap { 0 : goto endpoint-H-ns/web/tcp/http__10.244.1.5/8080 }",
                "flush chain ip wasmkube endpoint-H-ns/web/tcp/http__10.244.0.5/8080",
                "delete chain ip wasmkube endpoint-H-ns/web/tcp/http__10.244.0.5/8080",
            ]
        );
        assert_eq!(diff(&after, &after), "");
        // The last endpoint gone: the cluster IP refuses instead.
        let none = build(&[port(&[])], &net());
        assert_eq!(
            lines(&diff(&after, &none)),
            [
                "delete element ip wasmkube service-ips { 10.96.0.10 . tcp . 80 }",
                "flush chain ip wasmkube endpoint-H-ns/web/tcp/http__10.244.1.5/8080",
                "flush chain ip wasmkube service-H-ns/web/tcp/http",
                "add element ip wasmkube no-endpoint-services { 10.96.0.10 . tcp . 80 : goto reject-chain }",
                "delete chain ip wasmkube endpoint-H-ns/web/tcp/http__10.244.1.5/8080",
                "delete chain ip wasmkube service-H-ns/web/tcp/http",
            ]
        );
    }

    #[test]
    fn node_ports_affinity_and_local_policy() {
        let mut p = port(&["10.244.0.5"]);
        p.node_port = Some(30080);
        p.external_ips = vec!["192.168.1.2".parse().unwrap()];
        p.affinity_seconds = Some(60);
        let script = lines(&diff(&Ruleset::default(), &build(&[p.clone()], &net())));
        for want in [
            "add set ip wasmkube affinity-H { type ipv4_addr; flags dynamic,timeout; timeout 60s; }",
            "add rule ip wasmkube endpoint-H-ns/web/tcp/http__10.244.0.5/8080 update @affinity-H { ip saddr }",
            "add rule ip wasmkube service-H-ns/web/tcp/http ip saddr @affinity-H goto endpoint-H-ns/web/tcp/http__10.244.0.5/8080",
            "add rule ip wasmkube external-H-ns/web/tcp/http jump mark-for-masquerade",
            "add rule ip wasmkube external-H-ns/web/tcp/http goto service-H-ns/web/tcp/http",
            "add element ip wasmkube service-nodeports { tcp . 30080 : goto external-H-ns/web/tcp/http }",
            "add element ip wasmkube service-ips { 192.168.1.2 . tcp . 80 : goto external-H-ns/web/tcp/http }",
        ] {
            assert!(
                script.contains(&want.to_owned()),
                "{want}\nnot in {script:#?}"
            );
        }
        // Local: no masquerade, and with no local endpoint, dropped.
        p.external_local = true;
        p.external_endpoints.clear();
        p.affinity_seconds = None;
        let script = lines(&diff(&Ruleset::default(), &build(&[p], &net())));
        assert!(
            script.contains(
                &"add element ip wasmkube no-endpoint-nodeports { tcp . 30080 : drop }".to_owned()
            ),
            "{script:#?}"
        );
        assert!(
            !script.iter().any(|l| l.contains("external-H")),
            "{script:#?}"
        );
    }

    #[test]
    fn the_full_script_replaces_the_table_in_one_transaction() {
        let s = full(&net(), &build(&[port(&["10.244.0.5"])], &net()));
        assert!(
            s.starts_with("add table ip wasmkube\ndelete table ip wasmkube\ntable ip wasmkube {\n")
        );
        assert!(s.contains("ip saddr 10.244.0.0/16 ip daddr != 10.244.0.0/16 masquerade"));
        assert!(s.contains("ct state new ip daddr 10.96.0.0/12 ip daddr != { 10.96.0.10 } reject"));
        assert!(s.ends_with("add element ip wasmkube service-ips { 10.96.0.10 . tcp . 80 : goto service-H-ns/web/tcp/http }\n".replace("service-H", &format!("service-{}", hash("ns/web/tcp/http"))).as_str()));
    }
}
