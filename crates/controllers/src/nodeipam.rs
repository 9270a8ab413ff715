//! The node IPAM controller: gives every Node a pod CIDR (`spec.podCIDR`,
//! `spec.podCIDRs`) carved from the cluster CIDR, as kube-controller-manager
//! does with `--allocate-node-cidrs`. The agents address their pods from it
//! and route to each other's.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

use crate::queue::Controller;
use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use serde_json::json;

use crate::Error;

/// An IPv4 network.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cidr {
    pub base: Ipv4Addr,
    pub prefix: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (ip, prefix) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not a CIDR (want A.B.C.D/N)"))?;
        let ip: Ipv4Addr = ip.parse().map_err(|e| format!("{s:?}: {e}"))?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| format!("{s:?}: bad prefix length"))?;
        let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
        Ok(Self {
            base: Ipv4Addr::from(u32::from(ip) & mask),
            prefix,
        })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix)
    }
}

impl Cidr {
    /// The `index`th subnet of length `prefix` inside this network.
    fn subnet(&self, prefix: u8, index: u32) -> Option<Cidr> {
        if prefix < self.prefix || prefix > 32 {
            return None;
        }
        let count = 1u64 << (prefix - self.prefix);
        if u64::from(index) >= count {
            return None;
        }
        let size = 1u64 << (32 - prefix);
        let base = u64::from(u32::from(self.base)) + u64::from(index) * size;
        Some(Cidr {
            base: Ipv4Addr::from(base as u32),
            prefix,
        })
    }
}

/// The lowest subnet of `cluster` with `node_prefix` that is not in `used`.
pub fn next_free(cluster: Cidr, node_prefix: u8, used: &BTreeSet<String>) -> Option<Cidr> {
    (0..u32::MAX)
        .map_while(|i| cluster.subnet(node_prefix, i))
        .find(|c| !used.contains(&c.to_string()))
}

struct Ctx {
    client: kube::Client,
    cluster: Cidr,
    node_prefix: u8,
    nodes: Store<Node>,
    /// Handed out by this process but maybe not yet seen in the cache.
    assigned: Mutex<BTreeSet<String>>,
}

async fn reconcile(node: Arc<Node>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    if node
        .spec
        .as_ref()
        .and_then(|s| s.pod_cidr.as_ref())
        .is_some()
    {
        return Ok(Action::await_change());
    }
    let cidr = {
        let mut assigned = ctx.assigned.lock().expect("assigned");
        let mut used = assigned.clone();
        used.extend(
            ctx.nodes
                .state()
                .iter()
                .filter_map(|n| n.spec.as_ref()?.pod_cidr.clone()),
        );
        let Some(cidr) = next_free(ctx.cluster, ctx.node_prefix, &used) else {
            tracing::warn!(node = %node.name_any(), cluster = %ctx.cluster, "the cluster CIDR is exhausted");
            return Ok(Action::await_change());
        };
        assigned.insert(cidr.to_string());
        cidr
    };
    let api: Api<Node> = Api::all(ctx.client.clone());
    let patch = json!({"spec": {"podCIDR": cidr.to_string(), "podCIDRs": [cidr.to_string()]}});
    api.patch(
        &node.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
    .map_err(Error::Kube)?;
    tracing::info!(node = %node.name_any(), %cidr, "assigned the node's pod CIDR");
    Ok(Action::await_change())
}

/// Runs the controller until its watch ends.
pub async fn run(client: kube::Client, cluster: Cidr, node_prefix: u8) -> Result<(), Error> {
    let controller = Controller::new(Api::<Node>::all(client.clone()), watcher::Config::default());
    let nodes = controller.store();
    let ctx = Arc::new(Ctx {
        client,
        cluster,
        node_prefix,
        nodes,
        assigned: Mutex::default(),
    });
    controller
        .run("nodeipam", reconcile, crate::retry_soon, ctx)
        .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn carves_node_subnets_in_order_skipping_used_ones() {
        let cluster: Cidr = "10.244.7.9/16".parse().unwrap();
        assert_eq!(cluster.to_string(), "10.244.0.0/16");
        let mut used = BTreeSet::new();
        assert_eq!(
            next_free(cluster, 24, &used).unwrap().to_string(),
            "10.244.0.0/24"
        );
        used.insert("10.244.0.0/24".to_owned());
        used.insert("10.244.2.0/24".to_owned());
        assert_eq!(
            next_free(cluster, 24, &used).unwrap().to_string(),
            "10.244.1.0/24"
        );
        let tiny: Cidr = "10.9.0.0/23".parse().unwrap();
        let full: BTreeSet<String> = ["10.9.0.0/24", "10.9.1.0/24"].map(String::from).into();
        assert_eq!(next_free(tiny, 24, &full), None);
        assert!("10.0.0.0".parse::<Cidr>().is_err());
    }
}
