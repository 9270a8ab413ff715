//! ClusterIP and NodePort allocation for Services.
//!
//! Each allocated IP or port is a key in the store (`/ranges/...`), taken with
//! a create, so two concurrent Services can never get the same address even
//! across API servers sharing a store.

use std::net::Ipv4Addr;

use bytes::Bytes;
use rand::Rng;
use serde_json::{Value, json};
use wasmkube_api::field::FieldError;
use wasmkube_api::registry;
use wasmkube_store::StoreError;

use crate::ApiServer;
use crate::error::{ApiError, ApiResult};

const IP_PREFIX: &str = "/ranges/serviceips/";
const PORT_PREFIX: &str = "/ranges/servicenodeports/";

fn invalid(obj: &Value, field: &str, value: &str, detail: &str) -> ApiError {
    let rt = registry::lookup("", "v1", "services").expect("services are served");
    ApiError::invalid(
        rt,
        obj["metadata"]["name"].as_str().unwrap_or_default(),
        vec![FieldError::invalid(field, value, detail)],
    )
}

async fn claim(server: &ApiServer, key: String, owner: &str) -> ApiResult<bool> {
    match server
        .store
        .create(&key, Bytes::from(owner.to_owned()))
        .await
    {
        Ok(_) => Ok(true),
        Err(StoreError::AlreadyExists { .. }) => Ok(false),
        Err(e) => Err(ApiError::internal(e)),
    }
}

fn owner(obj: &Value) -> String {
    format!(
        "{}/{}",
        obj["metadata"]["namespace"].as_str().unwrap_or_default(),
        obj["metadata"]["name"].as_str().unwrap_or_default()
    )
}

/// Claims node port `np` for `spec.ports[i]` of `obj`: it must be in the
/// range and free.
async fn claim_node_port(server: &ApiServer, obj: &Value, i: usize, np: u64) -> ApiResult<u16> {
    let range = &server.config.node_ports;
    let field = format!("spec.ports[{i}].nodePort");
    let port = u16::try_from(np)
        .ok()
        .filter(|p| range.contains(p))
        .ok_or_else(|| {
            invalid(
                obj,
                &field,
                &np.to_string(),
                &format!(
                    "provided port is not in the valid range. The range of valid ports is {}-{}",
                    range.start(),
                    range.end()
                ),
            )
        })?;
    if !claim(server, format!("{PORT_PREFIX}{port}"), &owner(obj)).await? {
        return Err(invalid(
            obj,
            &field,
            &np.to_string(),
            "provided port is already allocated",
        ));
    }
    Ok(port)
}

/// Claims a free node port from the range.
async fn any_node_port(server: &ApiServer, obj: &Value) -> ApiResult<u16> {
    for _ in 0..64 {
        let np = rand::rng().random_range(server.config.node_ports.clone());
        if claim(server, format!("{PORT_PREFIX}{np}"), &owner(obj)).await? {
            return Ok(np);
        }
    }
    Err(ApiError::internal(
        "failed to allocate a node port: range is full",
    ))
}

/// Assigns `spec.clusterIP(s)` and node ports to a new Service.
pub async fn allocate(server: &ApiServer, obj: &mut Value) -> ApiResult<()> {
    let ty = obj["spec"]["type"]
        .as_str()
        .unwrap_or("ClusterIP")
        .to_owned();
    if ty == "ExternalName" {
        return Ok(());
    }
    let who = owner(obj);
    let (base, bits) = server.config.service_cidr;
    let size = 1u32 << (32 - bits);
    match obj["spec"]["clusterIP"].as_str().filter(|s| !s.is_empty()) {
        Some("None") => {}
        Some(ip) => {
            let addr: Ipv4Addr = ip.parse().map_err(|_| {
                invalid(obj, "spec.clusterIPs[0]", ip, "must be a valid IP address")
            })?;
            let offset = u32::from(addr).wrapping_sub(u32::from(base));
            if offset >= size {
                return Err(invalid(
                    obj,
                    "spec.clusterIPs[0]",
                    ip,
                    &format!(
                        "provided IP is not in the valid range. The range of valid IPs is {base}/{bits}"
                    ),
                ));
            }
            if !claim(server, format!("{IP_PREFIX}{ip}"), &who).await? {
                return Err(invalid(
                    obj,
                    "spec.clusterIPs[0]",
                    ip,
                    "provided IP is already allocated",
                ));
            }
        }
        None => {
            let mut chosen = None;
            for _ in 0..64 {
                // Skip the network address and the first host (the API service's).
                let offset = rand::rng().random_range(2..size - 1);
                let ip = Ipv4Addr::from(u32::from(base) + offset).to_string();
                if claim(server, format!("{IP_PREFIX}{ip}"), &who).await? {
                    chosen = Some(ip);
                    break;
                }
            }
            let ip = chosen.ok_or_else(|| {
                ApiError::internal("failed to allocate a service IP: range is full")
            })?;
            obj["spec"]["clusterIP"] = json!(ip);
        }
    }
    obj["spec"]["clusterIPs"] = json!([obj["spec"]["clusterIP"]]);
    if ty == "NodePort" || ty == "LoadBalancer" {
        let ports = obj["spec"]["ports"].as_array().cloned().unwrap_or_default();
        let mut out = Vec::new();
        let mut claimed = Vec::new();
        for (i, mut p) in ports.into_iter().enumerate() {
            let np = match p["nodePort"].as_u64() {
                Some(np) => claim_node_port(server, obj, i, np).await,
                None => any_node_port(server, obj).await,
            };
            match np {
                Ok(np) => {
                    claimed.push(format!("{PORT_PREFIX}{np}"));
                    p["nodePort"] = json!(np);
                }
                Err(e) => {
                    // The ports already taken for this Service go back.
                    release_keys(server, claimed).await;
                    return Err(e);
                }
            }
            out.push(p);
        }
        obj["spec"]["ports"] = Value::Array(out);
    }
    Ok(())
}

/// The address keys an update of a Service claimed, and those it no longer
/// uses: the claims are given back if the update is not stored, the unused
/// ones once it is.
#[derive(Debug, Default)]
pub(crate) struct Reallocation {
    claimed: Vec<String>,
    unused: Vec<String>,
}

impl Reallocation {
    /// The update was stored.
    pub async fn commit(self, server: &ApiServer) {
        release_keys(server, self.unused).await;
    }

    /// The update was not stored (a conflict, an error, a dry run).
    pub async fn undo(self, server: &ApiServer) {
        release_keys(server, self.claimed).await;
    }
}

fn node_port_of(p: &Value) -> Option<u16> {
    p["nodePort"].as_u64().and_then(|n| u16::try_from(n).ok())
}

/// What an update of a Service keeps of its addresses, as Kubernetes does:
/// a cluster IP left out carries over (a Service that becomes ExternalName
/// gives it up); node ports left out carry over per port (matched by name,
/// else by port and protocol) or are allocated when the Service becomes a
/// NodePort or LoadBalancer; node ports it stops using are given back.
pub(crate) async fn reallocate(
    server: &ApiServer,
    old: &Value,
    new: &mut Value,
) -> ApiResult<Reallocation> {
    let mut change = Reallocation::default();
    let ty = new["spec"]["type"]
        .as_str()
        .unwrap_or("ClusterIP")
        .to_owned();
    let old_ip = old["spec"]["clusterIP"]
        .as_str()
        .filter(|ip| !ip.is_empty())
        .map(str::to_owned);
    let new_ip = new["spec"]["clusterIP"]
        .as_str()
        .filter(|ip| !ip.is_empty())
        .map(str::to_owned);
    if ty == "ExternalName" {
        if let Some(ip) = old_ip.filter(|ip| ip != "None") {
            change.unused.push(format!("{IP_PREFIX}{ip}"));
        }
        if let Some(spec) = new["spec"].as_object_mut() {
            spec.remove("clusterIP");
            spec.remove("clusterIPs");
        }
    } else {
        match (new_ip, old_ip) {
            (None, Some(ip)) => {
                new["spec"]["clusterIP"] = json!(ip);
                new["spec"]["clusterIPs"] = json!([ip]);
            }
            // Coming from ExternalName: a new address, as on create.
            (_, None) => {
                let mut fresh = new.clone();
                if let Some(ports) = fresh["spec"]["ports"].as_array_mut() {
                    for p in ports {
                        if let Some(p) = p.as_object_mut() {
                            p.remove("nodePort");
                        }
                    }
                }
                fresh["spec"]["type"] = json!("ClusterIP");
                allocate(server, &mut fresh).await?;
                if let Some(ip) = fresh["spec"]["clusterIP"]
                    .as_str()
                    .filter(|ip| *ip != "None")
                {
                    change.claimed.push(format!("{IP_PREFIX}{ip}"));
                }
                new["spec"]["clusterIP"] = fresh["spec"]["clusterIP"].clone();
                new["spec"]["clusterIPs"] = fresh["spec"]["clusterIPs"].clone();
            }
            // A change of a set address is refused by validation.
            (Some(_), Some(_)) => {}
        }
    }
    let old_ports: Vec<Value> = old["spec"]["ports"].as_array().cloned().unwrap_or_default();
    let held: Vec<u16> = old_ports.iter().filter_map(node_port_of).collect();
    let mut kept = Vec::new();
    if ty == "NodePort" || ty == "LoadBalancer" {
        let mut ports = new["spec"]["ports"].as_array().cloned().unwrap_or_default();
        for (i, p) in ports.iter_mut().enumerate() {
            let same = |o: &&Value| match (p["name"].as_str(), o["name"].as_str()) {
                (Some(a), Some(b)) if !a.is_empty() => a == b,
                _ => o["port"] == p["port"] && o["protocol"] == p["protocol"],
            };
            let np = match node_port_of(p) {
                Some(np) => np,
                None => match old_ports.iter().find(same).and_then(node_port_of) {
                    Some(np) => {
                        p["nodePort"] = json!(np);
                        np
                    }
                    None => match any_node_port(server, new).await {
                        Ok(np) => {
                            change.claimed.push(format!("{PORT_PREFIX}{np}"));
                            p["nodePort"] = json!(np);
                            np
                        }
                        Err(e) => {
                            change.undo(server).await;
                            return Err(e);
                        }
                    },
                },
            };
            if !held.contains(&np) && !change.claimed.contains(&format!("{PORT_PREFIX}{np}")) {
                match claim_node_port(server, new, i, np.into()).await {
                    Ok(_) => change.claimed.push(format!("{PORT_PREFIX}{np}")),
                    Err(e) => {
                        change.undo(server).await;
                        return Err(e);
                    }
                }
            }
            kept.push(np);
        }
        new["spec"]["ports"] = Value::Array(ports);
    } else if let Some(ports) = new["spec"]["ports"].as_array_mut() {
        for p in ports {
            if let Some(p) = p.as_object_mut() {
                p.remove("nodePort");
            }
        }
    }
    change.unused.extend(
        held.iter()
            .filter(|np| !kept.contains(np))
            .map(|np| format!("{PORT_PREFIX}{np}")),
    );
    Ok(change)
}

async fn release_keys(server: &ApiServer, keys: Vec<String>) {
    for key in keys {
        if let Err(e) = server.store.delete(&key, None).await
            && !matches!(e, StoreError::NotFound { .. })
        {
            tracing::warn!(%key, error = %e, "could not release service address");
        }
    }
}

/// Returns a deleted Service's addresses to the pool.
pub async fn release(server: &ApiServer, obj: &Value) {
    let mut keys = Vec::new();
    if let Some(ip) = obj["spec"]["clusterIP"]
        .as_str()
        .filter(|ip| *ip != "None" && !ip.is_empty())
    {
        keys.push(format!("{IP_PREFIX}{ip}"));
    }
    for p in obj["spec"]["ports"].as_array().into_iter().flatten() {
        if let Some(np) = p["nodePort"].as_u64() {
            keys.push(format!("{PORT_PREFIX}{np}"));
        }
    }
    release_keys(server, keys).await;
}

/// The `kubernetes` Service in `default` (the first address of the service
/// range, port 443; its endpoints are the API servers, written by whoever
/// runs them, as Kubernetes' endpoint reconciler does) and, with a cluster
/// DNS address, the `kube-dns` Service in `kube-system` on it (no
/// endpoints: every node answers DNS on that address itself).
pub(crate) async fn ensure_system_services(server: &std::sync::Arc<ApiServer>) -> ApiResult<()> {
    let rt = registry::lookup("", "v1", "services").expect("services are served");
    let (base, _) = server.config.service_cidr;
    let mut wanted = vec![(
        "default",
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "kubernetes", "namespace": "default",
                         "labels": {"component": "apiserver", "provider": "kubernetes"}},
            "spec": {
                "type": "ClusterIP",
                "clusterIP": Ipv4Addr::from(u32::from(base) + 1).to_string(),
                "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": 6443}],
                "sessionAffinity": "None",
            },
        }),
    )];
    if let Some(dns) = server.config.cluster_dns {
        wanted.push((
            "kube-system",
            json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "kube-dns", "namespace": "kube-system",
                             "labels": {"k8s-app": "kube-dns", "kubernetes.io/name": "CoreDNS"}},
                "spec": {
                    "type": "ClusterIP",
                    "clusterIP": dns.to_string(),
                    "ports": [
                        {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
                        {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53},
                    ],
                },
            }),
        ));
    }
    for (ns, body) in wanted {
        let name = body["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        match crate::rest::create_internal(server, rt, Some(ns), body).await {
            Ok(_) | Err(ApiError::AlreadyExists(_)) => {}
            // Its address taken by a user's Service in an older cluster:
            // the cluster works on without it.
            Err(e @ ApiError::Invalid { .. }) => {
                tracing::warn!(service = %name, namespace = ns, error = %e, "cannot create a system Service")
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
