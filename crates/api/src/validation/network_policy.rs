//! Validation of NetworkPolicy as Kubernetes' networking validation does
//! it: selectors, peers (one kind each: selectors or an ipBlock), ipBlock
//! CIDRs and their exceptions, ports and port ranges, policy types.

use k8s_openapi::api::networking::v1 as networking;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::field::{Errors, FieldError};
use crate::selectors;

pub(super) fn validate(
    np: &networking::NetworkPolicy,
    _old: Option<&networking::NetworkPolicy>,
    errs: &mut Errors,
) {
    let Some(spec) = &np.spec else {
        return;
    };
    if let Some(sel) = &spec.pod_selector {
        check_selector("spec.podSelector", sel, errs);
    }
    for (i, rule) in spec.ingress.iter().flatten().enumerate() {
        let path = format!("spec.ingress[{i}]");
        for (j, port) in rule.ports.iter().flatten().enumerate() {
            check_port(&format!("{path}.ports[{j}]"), port, errs);
        }
        for (j, peer) in rule.from.iter().flatten().enumerate() {
            check_peer(&format!("{path}.from[{j}]"), peer, errs);
        }
    }
    for (i, rule) in spec.egress.iter().flatten().enumerate() {
        let path = format!("spec.egress[{i}]");
        for (j, port) in rule.ports.iter().flatten().enumerate() {
            check_port(&format!("{path}.ports[{j}]"), port, errs);
        }
        for (j, peer) in rule.to.iter().flatten().enumerate() {
            check_peer(&format!("{path}.to[{j}]"), peer, errs);
        }
    }
    let types = spec.policy_types.as_deref().unwrap_or_default();
    for (i, t) in types.iter().enumerate() {
        if t != "Ingress" && t != "Egress" {
            errs.push(FieldError::not_supported(
                format!("spec.policyTypes[{i}]"),
                t,
                &["Ingress", "Egress"],
            ));
        }
    }
    if types.len() > 2 {
        errs.push(FieldError::invalid(
            "spec.policyTypes",
            types.join(","),
            "may not specify more than two policyTypes",
        ));
    }
}

fn check_selector(path: &str, sel: &LabelSelector, errs: &mut Errors) {
    if let Err(e) = selectors::LabelSelector::from_api(sel) {
        errs.push(FieldError::invalid(path, "", e));
    }
}

fn check_port(path: &str, port: &networking::NetworkPolicyPort, errs: &mut Errors) {
    if let Some(p) = &port.protocol
        && !["TCP", "UDP", "SCTP"].contains(&p.as_str())
    {
        errs.push(FieldError::not_supported(
            format!("{path}.protocol"),
            p,
            &["SCTP", "TCP", "UDP"],
        ));
    }
    let in_range = |n: i32| (1..=65535).contains(&n);
    match &port.port {
        Some(IntOrString::Int(n)) => {
            if !in_range(*n) {
                errs.push(FieldError::invalid(
                    format!("{path}.port"),
                    n.to_string(),
                    "must be between 1 and 65535, inclusive",
                ));
            }
            if let Some(end) = port.end_port {
                if !in_range(end) {
                    errs.push(FieldError::invalid(
                        format!("{path}.endPort"),
                        end.to_string(),
                        "must be between 1 and 65535, inclusive",
                    ));
                }
                if end < *n {
                    errs.push(FieldError::invalid(
                        format!("{path}.endPort"),
                        end.to_string(),
                        "must be greater than or equal to `port`",
                    ));
                }
            }
        }
        Some(IntOrString::String(name)) => {
            if let Err(d) = iana_svc_name(name) {
                errs.push(FieldError::invalid(format!("{path}.port"), name, d));
            }
            if let Some(end) = port.end_port {
                errs.push(FieldError::invalid(
                    format!("{path}.endPort"),
                    end.to_string(),
                    "may not be specified when `port` is non-numeric",
                ));
            }
        }
        None => {
            if let Some(end) = port.end_port {
                errs.push(FieldError::invalid(
                    format!("{path}.endPort"),
                    end.to_string(),
                    "may not be specified when `port` is not specified",
                ));
            }
        }
    }
}

fn check_peer(path: &str, peer: &networking::NetworkPolicyPeer, errs: &mut Errors) {
    let mut selectors = 0;
    if let Some(sel) = &peer.pod_selector {
        selectors += 1;
        check_selector(&format!("{path}.podSelector"), sel, errs);
    }
    if let Some(sel) = &peer.namespace_selector {
        selectors += 1;
        check_selector(&format!("{path}.namespaceSelector"), sel, errs);
    }
    let Some(block) = &peer.ip_block else {
        if selectors == 0 {
            errs.push(FieldError::required(path, "must specify a peer"));
        }
        return;
    };
    if selectors > 0 {
        errs.push(FieldError::forbidden(
            path,
            "may not specify both ipBlock and another peer",
        ));
    }
    let cidr_path = format!("{path}.ipBlock.cidr");
    if block.cidr.is_empty() {
        errs.push(FieldError::required(cidr_path, ""));
        return;
    }
    let Some(outer) = cidr(&cidr_path, &block.cidr, errs) else {
        return;
    };
    for (i, ex) in block.except.iter().flatten().enumerate() {
        let ex_path = format!("{path}.ipBlock.except[{i}]");
        if let Some(inner) = cidr(&ex_path, ex, errs)
            && !(inner.2 == outer.2 && inner.0 >= outer.0 && inner.1 <= outer.1 && inner != outer)
        {
            errs.push(FieldError::invalid(
                ex_path,
                ex,
                "must be a strict subset of `cidr`",
            ));
        }
    }
}

/// A CIDR as the first and last addresses it holds (as u128, so IPv4 and
/// IPv6 blocks compare alike within their family), or an error pushed.
fn cidr(path: &str, value: &str, errs: &mut Errors) -> Option<(u128, u128, bool)> {
    let parsed = value.split_once('/').and_then(|(addr, len)| {
        let addr: std::net::IpAddr = addr.parse().ok()?;
        let len: u32 = len.parse().ok()?;
        let (bits, n) = match addr {
            std::net::IpAddr::V4(a) => (32, u128::from(u32::from(a))),
            std::net::IpAddr::V6(a) => (128, u128::from(a)),
        };
        if len > bits {
            return None;
        }
        let host = if len == bits {
            0
        } else {
            (1u128 << (bits - len)) - 1
        };
        Some((n & !host, n | host, addr.is_ipv4()))
    });
    if parsed.is_none() {
        errs.push(FieldError::invalid(
            path,
            value,
            "must be a valid CIDR value, (e.g. 10.9.8.0/24 or 2001:db8::/64)",
        ));
    }
    parsed
}

/// An IANA service name, as a named port: at most 15 lowercase letters,
/// digits and hyphens, with a letter, no hyphen at either end or twice in
/// a row.
fn iana_svc_name(s: &str) -> Result<(), &'static str> {
    if s.is_empty() || s.len() > 15 {
        return Err("must be no more than 15 characters");
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err("must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)");
    }
    if s.contains("--") {
        return Err("must not contain consecutive hyphens");
    }
    if !s.bytes().any(|b| b.is_ascii_lowercase()) {
        return Err("must contain at least one letter (a-z)");
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Err("must not begin or end with a hyphen");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::registry;

    fn errors(spec: serde_json::Value) -> Vec<String> {
        let rt = registry::lookup("networking.k8s.io", "v1", "networkpolicies").unwrap();
        let obj = json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "np", "namespace": "a"},
            "spec": spec,
        });
        crate::validation::validate(rt, &obj, None)
            .iter()
            .map(|e| format!("{}: {}", e.field, e.message()))
            .collect()
    }

    #[test]
    fn good_policies_pass() {
        assert_eq!(
            errors(json!({
                "podSelector": {"matchLabels": {"app": "web"}},
                "policyTypes": ["Ingress", "Egress"],
                "ingress": [{"from": [{"podSelector": {}, "namespaceSelector": {}},
                                      {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}],
                             "ports": [{"port": "http"}, {"port": 8000, "endPort": 8080, "protocol": "UDP"}]}],
                "egress": [{}],
            })),
            Vec::<String>::new()
        );
    }

    #[test]
    fn bad_fields_are_named() {
        let errs = errors(json!({
            "podSelector": {},
            "policyTypes": ["Inbound"],
            "ingress": [{"from": [{}, {"podSelector": {}, "ipBlock": {"cidr": "10.0.0.0/8"}},
                                  {"ipBlock": {"cidr": "10.0.0.0/33"}},
                                  {"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.0.0.0/16"]}}],
                         "ports": [{"port": 0}, {"port": "http", "endPort": 90},
                                   {"port": 90, "endPort": 80}, {"protocol": "ICMP"}]}],
        }));
        let has = |needle: &str| {
            assert!(
                errs.iter().any(|e| e.contains(needle)),
                "{needle} not in {errs:?}"
            )
        };
        has("spec.policyTypes[0]: Unsupported value: \"Inbound\"");
        has("spec.ingress[0].from[0]: Required value: must specify a peer");
        has("spec.ingress[0].from[1]: Forbidden: may not specify both ipBlock and another peer");
        has("spec.ingress[0].from[2].ipBlock.cidr: Invalid value: \"10.0.0.0/33\"");
        has(
            "spec.ingress[0].from[3].ipBlock.except[0]: Invalid value: \"10.0.0.0/16\": must be a strict subset of `cidr`",
        );
        has(
            "spec.ingress[0].ports[0].port: Invalid value: \"0\": must be between 1 and 65535, inclusive",
        );
        has(
            "spec.ingress[0].ports[1].endPort: Invalid value: \"90\": may not be specified when `port` is non-numeric",
        );
        has(
            "spec.ingress[0].ports[2].endPort: Invalid value: \"80\": must be greater than or equal to `port`",
        );
        has("spec.ingress[0].ports[3].protocol: Unsupported value: \"ICMP\"");
    }
}
