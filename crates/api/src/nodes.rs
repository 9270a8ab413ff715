//! Facts about Nodes that several components read the same way.

use k8s_openapi::api::core::v1::Node;

/// The InternalIPs of the Ready nodes not being deleted, sorted: the
/// addresses a built-in load balancer (ServiceLB, the gateway) hands out,
/// since every node serves them.
pub fn ready_internal_ips<'a>(nodes: impl IntoIterator<Item = &'a Node>) -> Vec<String> {
    let mut ips: Vec<String> = nodes
        .into_iter()
        .filter(|n| n.metadata.deletion_timestamp.is_none())
        .filter(|n| {
            n.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .filter_map(|n| {
            n.status
                .as_ref()?
                .addresses
                .as_ref()?
                .iter()
                .find(|a| a.type_ == "InternalIP")
                .map(|a| a.address.clone())
        })
        .collect();
    ips.sort();
    ips.dedup();
    ips
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str, ip: &str, ready: &str) -> Node {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "status": {
                "addresses": [{"type": "Hostname", "address": name}, {"type": "InternalIP", "address": ip}],
                "conditions": [{"type": "Ready", "status": ready}],
            },
        }))
        .unwrap()
    }

    #[test]
    fn ready_nodes_internal_ips_in_order() {
        let nodes = [
            node("b", "10.0.0.2", "True"),
            node("a", "10.0.0.1", "True"),
            node("c", "10.0.0.3", "Unknown"),
        ];
        assert_eq!(ready_internal_ips(&nodes), ["10.0.0.1", "10.0.0.2"]);
    }
}
