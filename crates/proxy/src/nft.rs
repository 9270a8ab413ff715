//! The node's nftables program, as kube-proxy's nftables mode lays it out:
//! one table, verdict maps keyed by address, protocol and port that send a
//! packet to its Service's chain in one lookup, and a chain per Service port
//! that picks an endpoint at random (or the client's last one, under
//! `sessionAffinity: ClientIP`).
//!
//! The pick is one rule, `dnat ip to numgen random mod N offset K map
//! @endpoints-S`: each Service port owns a slot (`K = slot << 16`, so up to
//! 65,536 endpoints) whose endpoints are elements of one of a fixed set of
//! shared maps. An endpoint replaced is one element rewritten; a Service
//! costs one chain, not one per endpoint (kube-proxy's chain per endpoint
//! made 60,000 chains at 10,000 Services, which `nft` could not load in
//! minutes). The maps are sharded because the kernel checks every element
//! added to a map against every rule bound to it: one map for all Services
//! made a full sync at 10,000 Services × 5 endpoints cost 6 s, quadratic.
//! Only affinity keeps a chain per endpoint (it records the client there).
//! A pod reaching itself through its Service is masqueraded by one set of
//! `address . address` pairs (hairpin) instead of a rule per endpoint.
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
/// `endpoint . endpoint` address pairs: a connection DNATed back to its
/// own source (a pod through its own Service) is masqueraded.
const HAIRPIN: &str = "hairpin";
/// How many endpoint maps the slots are spread over.
const ENDPOINT_MAPS: u32 = 64;
/// Endpoints one slot holds (its offset is `slot << SLOT_BITS`).
const SLOT_BITS: u32 = 16;

fn endpoint_map(slot: u32) -> String {
    format!("endpoints-{}", slot % ENDPOINT_MAPS)
}

/// The per-Service part of the table: chains, affinity sets, map and set
/// elements, each keyed by its name so two rulesets compare piecewise.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ruleset {
    /// Chain name to its rules.
    chains: BTreeMap<String, Vec<String>>,
    /// Affinity sets (their timeout is part of the name).
    sets: BTreeMap<String, u32>,
    /// (map, key) to verdict or value.
    elements: BTreeMap<(String, String), String>,
    /// Elements of the hairpin set its endpoints need (shared between
    /// Services: [`Table`] counts who needs each).
    hairpin: BTreeSet<String>,
    /// The endpoint slot of each chain that picks from a map.
    slots: BTreeMap<String, u32>,
}

impl Ruleset {
    /// How many chains, sets and map elements it has.
    pub fn size(&self) -> (usize, usize, usize) {
        (
            self.chains.len(),
            self.sets.len(),
            self.elements.len() + self.hairpin.len(),
        )
    }

    /// Adds `other`'s chains, sets and elements to this one.
    fn absorb(&mut self, other: &Ruleset) {
        self.chains
            .extend(other.chains.iter().map(|(k, v)| (k.clone(), v.clone())));
        self.sets
            .extend(other.sets.iter().map(|(k, v)| (k.clone(), *v)));
        self.elements
            .extend(other.elements.iter().map(|(k, v)| (k.clone(), v.clone())));
        self.hairpin.extend(other.hairpin.iter().cloned());
        self.slots
            .extend(other.slots.iter().map(|(k, v)| (k.clone(), *v)));
    }
}

/// Hands out endpoint slots: a chain keeps the one it has; a new chain gets
/// the lowest free one. A slot given back is free again only after
/// [`Slots::commit`] (once the script deleting its elements is applied), so
/// a script never deletes and adds the same element.
#[derive(Clone, Debug, Default)]
pub struct Slots {
    by_chain: BTreeMap<String, u32>,
    free: BTreeSet<u32>,
    released: Vec<u32>,
    next: u32,
}

impl Slots {
    fn get(&mut self, chain: &str) -> u32 {
        if let Some(slot) = self.by_chain.get(chain) {
            return *slot;
        }
        let slot = match self.free.pop_first() {
            Some(slot) => slot,
            None => {
                self.next += 1;
                self.next - 1
            }
        };
        self.by_chain.insert(chain.to_owned(), slot);
        slot
    }

    fn release(&mut self, chain: &str) {
        if let Some(slot) = self.by_chain.remove(chain) {
            self.released.push(slot);
        }
    }

    /// Frees the slots released since the last commit.
    pub fn commit(&mut self) {
        self.free.extend(self.released.drain(..));
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

/// The per-Service part of the table for these Service ports, their
/// endpoints in slots from `slots` (a chain keeps the slot it had).
pub fn build<'a>(
    ports: impl IntoIterator<Item = &'a ServicePort>,
    net: &NodeNetwork,
    slots: &mut Slots,
) -> Ruleset {
    let mut r = Ruleset::default();
    for p in ports {
        let base = base(&p.name, p.port);
        let proto = p.name.protocol.nft();
        let service_chain = format!("service-{}-{base}", hash(&base));
        let external_chain = format!("external-{}-{base}", hash(&base));
        // The rules that send a packet to one of `endpoints`, picked for
        // the chain `chain`: the client's last one under affinity, else one
        // at random. None when there is no endpoint.
        let mut pick = |chain: &str, endpoints: &[Endpoint], r: &mut Ruleset| {
            if endpoints.is_empty() {
                return None;
            }
            let endpoints = &endpoints[..endpoints.len().min(1 << SLOT_BITS)];
            for e in endpoints {
                r.hairpin.insert(format!("{} . {}", e.ip, e.ip));
            }
            let Some(seconds) = p.affinity_seconds else {
                let slot = slots.get(chain);
                r.slots.insert(chain.to_owned(), slot);
                let (map, offset) = (endpoint_map(slot), slot << SLOT_BITS);
                for (i, e) in endpoints.iter().enumerate() {
                    r.elements.insert(
                        (map.clone(), (offset + i as u32).to_string()),
                        format!("{} . {}", e.ip, e.port),
                    );
                }
                return Some(vec![format!(
                    "meta l4proto {proto} dnat ip to numgen random mod {} offset {offset} map @{map}",
                    endpoints.len()
                )]);
            };
            // Affinity: a chain per endpoint records the client in the
            // endpoint's set and DNATs; the client's set sends it back.
            let chains: Vec<String> = endpoints
                .iter()
                .map(|e| {
                    let chain = endpoint_chain(&base, e);
                    let set = affinity_set(&chain, seconds);
                    r.chains.insert(
                        chain.clone(),
                        vec![
                            format!("update @{set} {{ ip saddr }}"),
                            format!("meta l4proto {proto} dnat to {}:{}", e.ip, e.port),
                        ],
                    );
                    r.sets.insert(set, seconds);
                    chain
                })
                .collect();
            let mut rules: Vec<String> = chains
                .iter()
                .map(|c| format!("ip saddr @{} goto {c}", affinity_set(c, seconds)))
                .collect();
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
            Some(rules)
        };

        let cluster = pick(&service_chain, &p.cluster_endpoints, &mut r);
        let has_cluster = cluster.is_some();
        if let Some(picking) = cluster {
            // Traffic to a cluster IP from outside the pod network (the node
            // itself, say) is masqueraded, so replies come back through
            // this node.
            let mut rules = vec![match net.cluster_cidr {
                Some(cidr) => format!("ip saddr != {cidr} jump mark-for-masquerade"),
                None => "jump mark-for-masquerade".to_owned(),
            }];
            rules.extend(picking);
            r.chains.insert(service_chain.clone(), rules);
        }
        if let Some(ip) = p.cluster_ip {
            let key = format!("{ip} . {proto} . {}", p.port);
            if has_cluster {
                r.elements.insert(
                    (SERVICE_IPS.to_owned(), key),
                    format!("goto {service_chain}"),
                );
            } else {
                r.elements.insert(
                    (NO_ENDPOINT_SERVICES.to_owned(), key),
                    "goto reject-chain".to_owned(),
                );
            }
        }
        if !p.external() {
            continue;
        }
        let external_target = if p.external_local {
            pick(&external_chain, &p.external_endpoints, &mut r)
        } else {
            has_cluster.then(|| {
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
                        .insert((map.to_owned(), key), format!("goto {external_chain}"));
                }
            }
            None => {
                for (_, map, key) in keys {
                    r.elements.insert((map.to_owned(), key), none.to_owned());
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
    for i in 0..ENDPOINT_MAPS {
        let _ = writeln!(
            t,
            "  map endpoints-{i} {{ typeof numgen random mod 1 : ip daddr . tcp dport; }}"
        );
    }
    let _ = writeln!(t, "  set {HAIRPIN} {{ type ipv4_addr . ipv4_addr; }}");
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
        "  chain nat-postrouting {{ type nat hook postrouting priority srcnat; policy accept; jump masquerading; ct status dnat ip saddr . ip daddr @{HAIRPIN} masquerade;{egress} }}"
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

/// A script that replaces the whole table with `rules` in one transaction:
/// the table in `nft`'s block form (much faster for `nft` to load than a
/// command per chain and rule), then the elements, a map at a time.
pub fn full(net: &NodeNetwork, rules: &Ruleset) -> String {
    let mut s = format!("add table ip {TABLE}\ndelete table ip {TABLE}\n");
    s.push_str(&skeleton(net));
    let _ = writeln!(s, "table ip {TABLE} {{");
    for (set, seconds) in &rules.sets {
        let _ = writeln!(s, "  {}", affinity_set_decl(set, *seconds));
    }
    for (chain, body) in &rules.chains {
        let _ = writeln!(s, "  chain {chain} {{ {}; }}", body.join("; "));
    }
    s.push_str("}\n");
    if !rules.hairpin.is_empty() {
        let keys: Vec<&str> = rules.hairpin.iter().map(String::as_str).collect();
        let _ = writeln!(
            s,
            "add element ip {TABLE} {HAIRPIN} {{ {} }}",
            keys.join(", ")
        );
    }
    let mut elements = rules.elements.iter().peekable();
    while let Some(((map, _), _)) = elements.peek() {
        let map = map.clone();
        let mut line = Vec::new();
        while let Some(((_, key), value)) = elements.next_if(|((m, _), _)| *m == map) {
            line.push(element(key, value));
        }
        let _ = writeln!(s, "add element ip {TABLE} {map} {{ {} }}", line.join(", "));
    }
    s
}

/// A map element as `nft` writes it.
fn element(key: &str, value: &str) -> String {
    format!("{key} : {value}")
}

fn affinity_set_decl(set: &str, seconds: u32) -> String {
    format!("set {set} {{ type ipv4_addr; flags dynamic,timeout; timeout {seconds}s; }}")
}

/// A script that turns the table holding `old` into one holding `new`.
/// Everything that references a chain or set is removed before it, and
/// everything a new rule references is added before the rule.
pub fn diff(old: &Ruleset, new: &Ruleset) -> String {
    let mut s = String::new();
    for key in old.hairpin.difference(&new.hairpin) {
        let _ = writeln!(s, "delete element ip {TABLE} {HAIRPIN} {{ {key} }}");
    }
    s.push_str(&diff_owned(old, new));
    for key in new.hairpin.difference(&old.hairpin) {
        let _ = writeln!(s, "add element ip {TABLE} {HAIRPIN} {{ {key} }}");
    }
    s
}

/// [`diff`] without the hairpin set, whose elements Services share.
fn diff_owned(old: &Ruleset, new: &Ruleset) -> String {
    let mut s = String::new();
    let changed_elements: BTreeSet<&(String, String)> = new
        .elements
        .iter()
        .filter(|(k, v)| old.elements.get(*k) != Some(*v))
        .map(|(k, _)| k)
        .collect();
    for k @ (map, key) in old.elements.keys() {
        if !new.elements.contains_key(k) || changed_elements.contains(k) {
            let _ = writeln!(s, "delete element ip {TABLE} {map} {{ {key} }}");
        }
    }
    for (set, seconds) in &new.sets {
        if !old.sets.contains_key(set) {
            let _ = writeln!(
                s,
                "add {}",
                affinity_set_decl(set, *seconds).replacen("set ", &format!("set ip {TABLE} "), 1)
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
    for k @ (map, key) in changed_elements {
        let _ = writeln!(
            s,
            "add element ip {TABLE} {map} {{ {} }}",
            element(key, &new.elements[k])
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

/// What the proxy has programmed, as a fragment per Service, so a change
/// to one Service is rebuilt and diffed alone however many there are; the
/// hairpin elements, which Services share, are counted.
#[derive(Debug)]
pub struct Table<K> {
    fragments: BTreeMap<K, Ruleset>,
    hairpin: BTreeMap<String, usize>,
    slots: Slots,
}

impl<K: Ord> Table<K> {
    /// The table for every Service (a key and its ports), and the script
    /// that replaces the node's table with it in one transaction.
    pub fn full(
        net: &NodeNetwork,
        services: impl IntoIterator<Item = (K, Vec<ServicePort>)>,
    ) -> (Self, String) {
        let mut table = Self {
            fragments: BTreeMap::new(),
            hairpin: BTreeMap::new(),
            slots: Slots::default(),
        };
        let mut all = Ruleset::default();
        for (key, ports) in services {
            let r = build(&ports, net, &mut table.slots);
            for h in &r.hairpin {
                *table.hairpin.entry(h.clone()).or_default() += 1;
            }
            all.absorb(&r);
            table.fragments.insert(key, r);
        }
        let script = full(net, &all);
        (table, script)
    }

    /// Replaces the Services in `changes` (a key and its ports now, none
    /// when it is gone) and returns the script that does the same to the
    /// node's table. Call [`Table::applied`] once the script is in place.
    pub fn update(
        &mut self,
        net: &NodeNetwork,
        changes: impl IntoIterator<Item = (K, Vec<ServicePort>)>,
    ) -> String {
        let mut script = String::new();
        // Each hairpin element touched, with its count before.
        let mut touched: BTreeMap<String, usize> = BTreeMap::new();
        for (key, ports) in changes {
            let old = self.fragments.remove(&key).unwrap_or_default();
            let new = build(&ports, net, &mut self.slots);
            for chain in old.slots.keys() {
                if !new.slots.contains_key(chain) {
                    self.slots.release(chain);
                }
            }
            script.push_str(&diff_owned(&old, &new));
            for h in &old.hairpin {
                if let Some(count) = self.hairpin.get_mut(h) {
                    touched.entry(h.clone()).or_insert(*count);
                    *count -= 1;
                }
            }
            for h in &new.hairpin {
                let count = self.hairpin.entry(h.clone()).or_default();
                touched.entry(h.clone()).or_insert(*count);
                *count += 1;
            }
            if !ports.is_empty() {
                self.fragments.insert(key, new);
            }
        }
        for (h, before) in touched {
            let now = self.hairpin.get(&h).copied().unwrap_or_default();
            if now == 0 {
                self.hairpin.remove(&h);
            }
            match (before, now) {
                (0, 1..) => {
                    let _ = writeln!(script, "add element ip {TABLE} {HAIRPIN} {{ {h} }}");
                }
                (1.., 0) => {
                    let _ = writeln!(script, "delete element ip {TABLE} {HAIRPIN} {{ {h} }}");
                }
                _ => {}
            }
        }
        script
    }

    /// The last script is in place: the slots it emptied can be reused.
    pub fn applied(&mut self) {
        self.slots.commit();
    }

    /// How many chains, sets and map elements the table has.
    pub fn size(&self) -> (usize, usize, usize) {
        let (mut chains, mut sets, mut elements) = (0, 0, self.hairpin.len());
        for r in self.fragments.values() {
            chains += r.chains.len();
            sets += r.sets.len();
            elements += r.elements.len();
        }
        (chains, sets, elements)
    }
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
        let r = build(
            &[port(&["10.244.0.5", "10.244.1.5"])],
            &net(),
            &mut Slots::default(),
        );
        assert_eq!(
            lines(&diff(&Ruleset::default(), &r)),
            [
                "add chain ip wasmkube service-H-ns/web/tcp/http",
                "add rule ip wasmkube service-H-ns/web/tcp/http ip saddr != 10.244.0.0/16 jump mark-for-masquerade",
                "add rule ip wasmkube service-H-ns/web/tcp/http meta l4proto tcp dnat ip to numgen random mod 2 offset 0 map @endpoints-0",
                "add element ip wasmkube endpoints-0 { 0 : 10.244.0.5 . 8080 }",
                "add element ip wasmkube endpoints-0 { 1 : 10.244.1.5 . 8080 }",
                "add element ip wasmkube service-ips { 10.96.0.10 . tcp . 80 : goto service-H-ns/web/tcp/http }",
                "add element ip wasmkube hairpin { 10.244.0.5 . 10.244.0.5 }",
                "add element ip wasmkube hairpin { 10.244.1.5 . 10.244.1.5 }",
            ]
        );
    }

    #[test]
    fn an_endpoint_change_rewrites_only_its_service_and_its_elements() {
        let slots = &mut Slots::default();
        let before = build(&[port(&["10.244.0.5", "10.244.1.5"])], &net(), slots);
        let after = build(&[port(&["10.244.1.5"])], &net(), slots);
        assert_eq!(
            lines(&diff(&before, &after)),
            [
                "delete element ip wasmkube hairpin { 10.244.0.5 . 10.244.0.5 }",
                "delete element ip wasmkube endpoints-0 { 0 }",
                "delete element ip wasmkube endpoints-0 { 1 }",
                "flush chain ip wasmkube service-H-ns/web/tcp/http",
                "add rule ip wasmkube service-H-ns/web/tcp/http ip saddr != 10.244.0.0/16 jump mark-for-masquerade",
                "add rule ip wasmkube service-H-ns/web/tcp/http meta l4proto tcp dnat ip to numgen random mod 1 offset 0 map @endpoints-0",
                "add element ip wasmkube endpoints-0 { 0 : 10.244.1.5 . 8080 }",
            ]
        );
        assert_eq!(diff(&after, &after), "");
        // An endpoint replaced by another: one element rewritten.
        let replaced = build(&[port(&["10.244.2.7"])], &net(), slots);
        assert_eq!(
            lines(&diff(&after, &replaced)),
            [
                "delete element ip wasmkube hairpin { 10.244.1.5 . 10.244.1.5 }",
                "delete element ip wasmkube endpoints-0 { 0 }",
                "add element ip wasmkube endpoints-0 { 0 : 10.244.2.7 . 8080 }",
                "add element ip wasmkube hairpin { 10.244.2.7 . 10.244.2.7 }",
            ]
        );
        // The last endpoint gone: the cluster IP refuses instead.
        let none = build(&[port(&[])], &net(), slots);
        assert_eq!(
            lines(&diff(&replaced, &none)),
            [
                "delete element ip wasmkube hairpin { 10.244.2.7 . 10.244.2.7 }",
                "delete element ip wasmkube endpoints-0 { 0 }",
                "delete element ip wasmkube service-ips { 10.96.0.10 . tcp . 80 }",
                "flush chain ip wasmkube service-H-ns/web/tcp/http",
                "add element ip wasmkube no-endpoint-services { 10.96.0.10 . tcp . 80 : goto reject-chain }",
                "delete chain ip wasmkube service-H-ns/web/tcp/http",
            ]
        );
    }

    #[test]
    fn a_table_updates_one_service_and_reuses_a_slot_only_once_applied() {
        let named = |name: &str, ips: &[&str]| {
            let mut p = port(ips);
            p.name.name = name.into();
            p.cluster_ip = Some(format!("10.96.0.{}", 20 + name.len()).parse().unwrap());
            (("ns".to_owned(), name.to_owned()), vec![p])
        };
        let (mut table, script) = Table::full(
            &net(),
            [
                named("a", &["10.244.0.1"]),
                named("bb", &["10.244.0.1", "10.244.0.2"]),
            ],
        );
        assert!(script.contains("add element ip wasmkube hairpin { 10.244.0.1 . 10.244.0.1, 10.244.0.2 . 10.244.0.2 }"), "{script}");
        assert!(script.contains("offset 65536 map @endpoints-1"), "{script}");
        table.applied();
        // a goes and ccc comes in the same update: ccc must not take a's
        // slot, whose element this very script deletes; the hairpin element
        // bb still needs stays.
        let script = table.update(
            &net(),
            [
                (("ns".to_owned(), "a".to_owned()), vec![]),
                named("ccc", &["10.244.0.3"]),
            ],
        );
        assert_eq!(
            lines(&script),
            [
                "delete element ip wasmkube endpoints-0 { 0 }",
                "delete element ip wasmkube service-ips { 10.96.0.21 . tcp . 80 }",
                "flush chain ip wasmkube service-H-ns/a/tcp/http",
                "delete chain ip wasmkube service-H-ns/a/tcp/http",
                "add chain ip wasmkube service-H-ns/ccc/tcp/http",
                "add rule ip wasmkube service-H-ns/ccc/tcp/http ip saddr != 10.244.0.0/16 jump mark-for-masquerade",
                "add rule ip wasmkube service-H-ns/ccc/tcp/http meta l4proto tcp dnat ip to numgen random mod 1 offset 131072 map @endpoints-2",
                "add element ip wasmkube endpoints-2 { 131072 : 10.244.0.3 . 8080 }",
                "add element ip wasmkube service-ips { 10.96.0.23 . tcp . 80 : goto service-H-ns/ccc/tcp/http }",
                "add element ip wasmkube hairpin { 10.244.0.3 . 10.244.0.3 }",
            ]
        );
        table.applied();
        // Once applied, the freed slot 0 is the next one given.
        let script = table.update(&net(), [named("a", &["10.244.0.9"])]);
        assert!(script.contains("offset 0 map @endpoints-0"), "{script}");
        assert_eq!(table.size(), (3, 0, 3 + 4 + 4));
        // The last Service needing an address gone: its hairpin element goes.
        let script = table.update(&net(), [(("ns".to_owned(), "bb".to_owned()), vec![])]);
        assert!(
            script.contains("delete element ip wasmkube hairpin { 10.244.0.2 . 10.244.0.2 }"),
            "{script}"
        );
        assert!(
            script.contains("delete element ip wasmkube hairpin { 10.244.0.1 . 10.244.0.1 }"),
            "{script}"
        );
        assert_eq!(endpoint_map(64), "endpoints-0");
    }

    #[test]
    fn node_ports_affinity_and_local_policy() {
        let mut p = port(&["10.244.0.5"]);
        p.node_port = Some(30080);
        p.external_ips = vec!["192.168.1.2".parse().unwrap()];
        p.affinity_seconds = Some(60);
        let script = lines(&diff(
            &Ruleset::default(),
            &build(&[p.clone()], &net(), &mut Slots::default()),
        ));
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
        let script = lines(&diff(
            &Ruleset::default(),
            &build(&[p], &net(), &mut Slots::default()),
        ));
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
        let s = full(
            &net(),
            &build(&[port(&["10.244.0.5"])], &net(), &mut Slots::default()),
        );
        assert!(
            s.starts_with("add table ip wasmkube\ndelete table ip wasmkube\ntable ip wasmkube {\n")
        );
        assert!(s.contains("ip saddr 10.244.0.0/16 ip daddr != 10.244.0.0/16 masquerade"));
        assert!(s.contains("ct state new ip daddr 10.96.0.0/12 ip daddr != { 10.96.0.10 } reject"));
        assert!(s.ends_with("add element ip wasmkube service-ips { 10.96.0.10 . tcp . 80 : goto service-H-ns/web/tcp/http }\n".replace("service-H", &format!("service-{}", hash("ns/web/tcp/http"))).as_str()));
    }
}
