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
const NODE_PORTS: std::ops::RangeInclusive<u16> = 30000..=32767;

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
        for (i, mut p) in ports.into_iter().enumerate() {
            match p["nodePort"].as_u64() {
                Some(np) => {
                    if !NODE_PORTS.contains(&(np as u16)) || np > u16::MAX as u64 {
                        return Err(invalid(
                            obj,
                            &format!("spec.ports[{i}].nodePort"),
                            &np.to_string(),
                            "provided port is not in the valid range. The range of valid ports is 30000-32767",
                        ));
                    }
                    if !claim(server, format!("{PORT_PREFIX}{np}"), &who).await? {
                        return Err(invalid(
                            obj,
                            &format!("spec.ports[{i}].nodePort"),
                            &np.to_string(),
                            "provided port is already allocated",
                        ));
                    }
                }
                None => {
                    let mut got = None;
                    for _ in 0..64 {
                        let np = rand::rng().random_range(NODE_PORTS);
                        if claim(server, format!("{PORT_PREFIX}{np}"), &who).await? {
                            got = Some(np);
                            break;
                        }
                    }
                    p["nodePort"] = json!(got.ok_or_else(|| ApiError::internal(
                        "failed to allocate a node port: range is full"
                    ))?);
                }
            }
            out.push(p);
        }
        obj["spec"]["ports"] = Value::Array(out);
    }
    Ok(())
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
    for key in keys {
        if let Err(e) = server.store.delete(&key, None).await
            && !matches!(e, StoreError::NotFound { .. })
        {
            tracing::warn!(%key, error = %e, "could not release service address");
        }
    }
}
