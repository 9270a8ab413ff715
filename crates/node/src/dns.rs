//! A pod's DNS, as the kubelet configures it from `dnsPolicy` and
//! `dnsConfig`: the `/etc/resolv.conf` of its Linux containers, and the
//! same rules as an in-process lookup for its Wasm guests (which run in the
//! agent and read no resolv.conf).
//!
//! - `ClusterFirst` (the default): the cluster DNS, searching
//!   `NS.svc.DOMAIN svc.DOMAIN DOMAIN` and the node's own search domains,
//!   `ndots:5`. A `hostNetwork` pod gets `Default` instead unless it asks
//!   for `ClusterFirstWithHostNet`.
//! - `Default`: the node's resolv.conf.
//! - `None`: only what `dnsConfig` says.
//!
//! `dnsConfig` adds nameservers (three at most are kept), search domains
//! (32 at most) and options (a later option replaces one of the same name).

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;

/// The node's cluster DNS settings.
#[derive(Clone, Debug)]
pub struct ClusterDns {
    /// The cluster DNS address (`--cluster-dns`).
    pub address: Ipv4Addr,
    /// The cluster domain (`--cluster-domain`).
    pub domain: String,
    /// The cluster's records for in-process lookups.
    pub resolver: wasmkube_dns::Resolver,
}

/// The parts of a resolv.conf.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct ResolvConf {
    pub nameservers: Vec<String>,
    pub searches: Vec<String>,
    /// `name` or `name:value`, in order.
    pub options: Vec<String>,
}

impl ResolvConf {
    pub fn parse(text: &str) -> Self {
        let mut conf = Self::default();
        for line in text.lines() {
            let mut words = line.split_whitespace();
            match words.next() {
                Some("nameserver") => conf.nameservers.extend(words.next().map(str::to_owned)),
                Some("search") | Some("domain") => {
                    conf.searches = words.map(str::to_owned).collect()
                }
                Some("options") => conf.options.extend(words.map(str::to_owned)),
                _ => {}
            }
        }
        conf
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        if !self.searches.is_empty() {
            out.push_str(&format!("search {}\n", self.searches.join(" ")));
        }
        for ns in &self.nameservers {
            out.push_str(&format!("nameserver {ns}\n"));
        }
        if !self.options.is_empty() {
            out.push_str(&format!("options {}\n", self.options.join(" ")));
        }
        out
    }

    /// `ndots` from the options (resolv.conf's default: 1).
    pub fn ndots(&self) -> usize {
        self.options
            .iter()
            .rev()
            .find_map(|o| o.strip_prefix("ndots:")?.parse().ok())
            .unwrap_or(1)
    }

    fn set_option(&mut self, option: String) {
        let name = option.split(':').next().unwrap_or_default().to_owned();
        self.options
            .retain(|o| o.split(':').next().unwrap_or_default() != name);
        self.options.push(option);
    }
}

/// The pod's resolv.conf from its spec, the node's own resolv.conf and the
/// cluster DNS (`None`: the cluster has none).
pub(crate) fn resolv_conf(
    pod: &Pod,
    node: &ResolvConf,
    cluster: Option<&ClusterDns>,
) -> ResolvConf {
    let spec = pod.spec.as_ref();
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
    let policy = match spec
        .and_then(|s| s.dns_policy.as_deref())
        .unwrap_or("ClusterFirst")
    {
        "ClusterFirst" if host_network => "Default",
        "ClusterFirstWithHostNet" => "ClusterFirst",
        other => other,
    };
    let mut conf = match (policy, cluster) {
        ("None", _) => ResolvConf::default(),
        ("ClusterFirst", Some(c)) => {
            let d = &c.domain;
            let mut searches = vec![format!("{ns}.svc.{d}"), format!("svc.{d}"), d.clone()];
            for s in &node.searches {
                if !searches.contains(s) {
                    searches.push(s.clone());
                }
            }
            ResolvConf {
                nameservers: vec![c.address.to_string()],
                searches,
                options: vec!["ndots:5".into()],
            }
        }
        _ => node.clone(),
    };
    if let Some(extra) = spec.and_then(|s| s.dns_config.as_ref()) {
        conf.nameservers
            .extend(extra.nameservers.iter().flatten().cloned());
        conf.searches
            .extend(extra.searches.iter().flatten().cloned());
        for o in extra.options.iter().flatten() {
            let Some(name) = o.name.clone() else { continue };
            conf.set_option(match &o.value {
                Some(v) => format!("{name}:{v}"),
                None => name,
            });
        }
    }
    conf.nameservers.dedup();
    conf.nameservers.truncate(3);
    conf.searches.dedup();
    conf.searches.truncate(32);
    conf
}

/// A pod's name lookups, answered in-process with its search path.
#[derive(Debug)]
pub(crate) struct PodNames {
    resolver: wasmkube_dns::Resolver,
    searches: Vec<String>,
    ndots: usize,
}

impl PodNames {
    pub fn new(resolver: wasmkube_dns::Resolver, conf: &ResolvConf) -> Arc<Self> {
        Arc::new(Self {
            resolver,
            searches: conf.searches.clone(),
            ndots: conf.ndots(),
        })
    }
}

impl wasmkube_runtime::NameLookup for PodNames {
    fn lookup(
        &self,
        host: &str,
    ) -> std::pin::Pin<Box<dyn Future<Output = std::io::Result<Vec<IpAddr>>> + Send + 'static>>
    {
        let (resolver, host) = (self.resolver.clone(), host.to_owned());
        let (searches, ndots) = (self.searches.clone(), self.ndots);
        Box::pin(async move {
            resolver
                .lookup(&host, &searches, ndots)
                .await
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::NotFound, e))
        })
    }

    fn lookup_cluster(&self, host: &str) -> Option<Vec<IpAddr>> {
        self.resolver
            .lookup_cluster(host, &self.searches, self.ndots)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(spec: serde_json::Value) -> Pod {
        serde_json::from_value(
            json!({"metadata": {"name": "p", "namespace": "shop"}, "spec": spec}),
        )
        .unwrap()
    }

    fn cluster() -> ClusterDns {
        let config = wasmkube_dns::Config {
            domain: "cluster.local".into(),
            listen: None,
            upstreams: vec![],
        };
        ClusterDns {
            address: "10.96.0.10".parse().unwrap(),
            domain: "cluster.local".into(),
            resolver: wasmkube_dns::Resolver::new(&config),
        }
    }

    #[test]
    fn resolv_conf_follows_the_dns_policy() {
        let node =
            ResolvConf::parse("search corp.example\nnameserver 192.168.1.1\noptions edns0\n");
        let c = cluster();
        let conf = |spec| resolv_conf(&pod(spec), &node, Some(&c)).render();
        let containers = json!([{"name": "c", "image": "x"}]);
        assert_eq!(
            conf(json!({"containers": containers})),
            "search shop.svc.cluster.local svc.cluster.local cluster.local corp.example\nnameserver 10.96.0.10\noptions ndots:5\n"
        );
        assert_eq!(
            conf(json!({"containers": containers, "hostNetwork": true})),
            "search corp.example\nnameserver 192.168.1.1\noptions edns0\n"
        );
        assert_eq!(
            conf(json!({"containers": containers, "hostNetwork": true, "dnsPolicy": "ClusterFirstWithHostNet"}))
                .lines()
                .nth(1),
            Some("nameserver 10.96.0.10")
        );
        assert_eq!(
            conf(
                json!({"containers": containers, "dnsPolicy": "None", "dnsConfig": {
                "nameservers": ["1.2.3.4"], "searches": ["a.example"],
                "options": [{"name": "ndots", "value": "2"}, {"name": "edns0"}]}})
            ),
            "search a.example\nnameserver 1.2.3.4\noptions ndots:2 edns0\n"
        );
        assert_eq!(
            conf(json!({"containers": containers, "dnsConfig": {"options": [{"name": "ndots", "value": "1"}]}}))
                .lines()
                .last(),
            Some("options ndots:1")
        );
        // No cluster DNS: ClusterFirst falls back to the node's.
        assert_eq!(
            resolv_conf(&pod(json!({"containers": containers})), &node, None).render(),
            "search corp.example\nnameserver 192.168.1.1\noptions edns0\n"
        );
    }
}
