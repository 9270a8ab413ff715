//! CertificateSigningRequests (`certificates.k8s.io/v1`): the server
//! records who asked (`spec.username`, `groups`, `uid`), and signs with the
//! cluster CA, at once, the two kinds of request it approves by itself: a
//! node's client certificate (`kubernetes.io/kube-apiserver-client-kubelet`,
//! `CN=system:node:NAME`, `O=system:nodes`) asked by a holder of the join
//! token (group `system:bootstrappers`) or by that same node renewing its
//! own; and a node agent's serving certificate
//! (`kubernetes.io/kubelet-serving`) asked by the node itself (or by an
//! agent run with an administrator's credentials) for names that are the
//! node's own (its name and the addresses its Node reports).
//! Anything else waits for an approver.

use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use base64::Engine;
use serde_json::{Value, json};
use wasmkube_api::Subresource;
use wasmkube_api::registry::ResourceType;

use super::UserInfo;
use crate::ApiServer;
use crate::error::ApiError;

/// The signer of node client certificates.
pub const NODE_CLIENT_SIGNER: &str = "kubernetes.io/kube-apiserver-client-kubelet";
/// The group of join-token holders.
pub const BOOTSTRAPPERS: &str = "system:bootstrappers";
/// How long a node's certificate is valid unless the request asks for less.
const NODE_CERT_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

/// The signer of node agents' serving certificates.
pub const NODE_SERVING_SIGNER: &str = "kubernetes.io/kubelet-serving";

/// A node certificate request `user` may have signed without an approver.
struct NodeRequest {
    pem: String,
    node: String,
    /// Asked with the join token (not by the node renewing its own).
    bootstrapping: bool,
    /// A serving certificate (`kubernetes.io/kubelet-serving`), not a
    /// client one.
    serving: bool,
}

/// Whether `user` may have the node certificate `csr` signed without an
/// approver: a node's client certificate asked with the join token or by
/// the node itself, or a node's serving certificate asked by the node
/// itself (its names are checked against the Node in [`create`]).
fn auto_approvable(csr: &Value, user: &UserInfo) -> Option<NodeRequest> {
    let signer = csr["spec"]["signerName"].as_str()?;
    if signer != NODE_CLIENT_SIGNER && signer != NODE_SERVING_SIGNER {
        return None;
    }
    let pem = base64::engine::general_purpose::STANDARD
        .decode(csr["spec"]["request"].as_str()?)
        .ok()?;
    let pem = String::from_utf8(pem).ok()?;
    let who = wasmkube_pki::csr_identity(&pem).ok()?;
    let node = who.user.strip_prefix("system:node:")?;
    let for_a_node = !node.is_empty() && who.groups == ["system:nodes"];
    let bootstrapping = user.groups.iter().any(|g| g == BOOTSTRAPPERS);
    let renewing = user.name == who.user;
    let serving = signer == NODE_SERVING_SIGNER;
    // A serving certificate only for the node itself, or for an agent run
    // with an administrator's credentials (who could approve it anyway);
    // never on a join token alone.
    let administrator = user.groups.iter().any(|g| g == crate::auth::MASTERS);
    let allowed = if serving {
        renewing || administrator
    } else {
        bootstrapping || renewing
    };
    (for_a_node && allowed).then(|| NodeRequest {
        node: node.to_owned(),
        pem: pem.clone(),
        bootstrapping: bootstrapping && !renewing,
        serving,
    })
}

/// Whether every name a node's serving certificate request asks for is the
/// node's own: its name, and the addresses its Node reports (as
/// kubelet-csr-approver checks), so a node cannot have a certificate for
/// another node's address.
async fn names_are_the_nodes(server: &ApiServer, r: &NodeRequest) -> Result<(), String> {
    let names = wasmkube_pki::csr_serving_names(&r.pem).map_err(|e| e.to_string())?;
    let nodes = wasmkube_api::registry::lookup("", "v1", "nodes").expect("nodes are served");
    let node = match server.store.get(&nodes.key(None, &r.node)).await {
        Ok(Some(kv)) => crate::storage::decode_stored(&kv).map_err(|e| e.to_string())?,
        _ => return Err(format!("node \"{}\" is not registered", r.node)),
    };
    let addresses: Vec<&str> = node["status"]["addresses"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a["address"].as_str())
        .collect();
    if names.ips.is_empty() && names.dns.is_empty() {
        return Err("a serving certificate must name the node's addresses".into());
    }
    for ip in &names.ips {
        if !addresses.iter().any(|a| a.parse() == Ok(*ip)) {
            return Err(format!("{ip} is not an address of node \"{}\"", r.node));
        }
    }
    for dns in &names.dns {
        if *dns != r.node && !addresses.contains(&dns.as_str()) {
            return Err(format!("{dns} is not a name of node \"{}\"", r.node));
        }
    }
    Ok(())
}

/// Answers `POST` of a CertificateSigningRequest.
pub(crate) async fn create(
    server: &Arc<ApiServer>,
    rt: &'static ResourceType,
    user: Option<UserInfo>,
    headers: &HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    let raw = crate::rest::read_bytes(server, body).await?;
    let content_type = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    let mut csr = crate::rest::parse_value(content_type, &raw)?;
    if !csr["spec"].is_object() {
        return Err(ApiError::bad_request("spec: Required value"));
    }
    if let Some(user) = &user {
        csr["spec"]["username"] = json!(user.name);
        csr["spec"]["groups"] = json!(user.groups);
        if !user.uid.is_empty() {
            csr["spec"]["uid"] = json!(user.uid);
        }
    }
    let request = user.as_ref().and_then(|u| auto_approvable(&csr, u));
    // A join token makes new nodes: it cannot take over the name of one
    // that is registered (a stolen token would otherwise act as it).
    if let Some(r) = &request
        && r.bootstrapping
    {
        let nodes = wasmkube_api::registry::lookup("", "v1", "nodes").expect("nodes are served");
        let existing = server
            .store
            .get(&nodes.key(None, &r.node))
            .await
            .map_err(ApiError::internal)?;
        if existing.is_some() {
            return Err(ApiError::Forbidden {
                subject: crate::error::Subject::of(rt, ""),
                message: format!(
                    "node \"{}\" is already registered: a join token cannot take over a node's name (delete the Node to join again under it)",
                    r.node
                ),
            });
        }
    }
    // A serving certificate naming what is not the node's waits for an
    // approver (none comes by itself), as any other request.
    let request = match request {
        Some(r) if r.serving => match names_are_the_nodes(server, &r).await {
            Ok(()) => Some(r),
            Err(why) => {
                tracing::warn!(node = %r.node, "not approving a serving certificate: {why}");
                None
            }
        },
        other => other,
    };
    let created = crate::rest::create_internal(server, rt, None, csr).await?;
    let signed = match (&server.config.ca, request) {
        (Some(ca), Some(NodeRequest { pem, serving, .. })) => {
            let lifetime = created["spec"]["expirationSeconds"]
                .as_u64()
                .map(|s| Duration::from_secs(s.max(600)))
                .unwrap_or(NODE_CERT_LIFETIME)
                .min(NODE_CERT_LIFETIME);
            let signed = if serving {
                ca.sign_serving_csr(&pem, lifetime)
            } else {
                ca.sign_client_csr(&pem, lifetime)
            };
            Some(signed.map_err(|e| ApiError::bad_request(format!("spec.request: {e}")))?)
        }
        _ => None,
    };
    let Some(cert) = signed else {
        return Ok(crate::rest::json_response(
            StatusCode::CREATED,
            &created,
            &[],
        ));
    };
    let name = created["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let now = crate::rest::now();
    let status = json!({
        "conditions": [{
            "type": "Approved", "status": "True", "reason": "AutoApproved",
            "message": "Auto approving a node's certificate: a client one for a join token holder or the node itself, a serving one for the node's own names",
            "lastUpdateTime": now, "lastTransitionTime": now,
        }],
        "certificate": base64::engine::general_purpose::STANDARD.encode(cert),
    });
    let stored =
        crate::rest::reconcile_internal(server, rt, &name, Some(Subresource::Status), |current| {
            let mut v = current.clone();
            v["status"] = status.clone();
            Some(v)
        })
        .await?;
    tracing::info!(csr = %name, requester = ?user.map(|u| u.name), "node client certificate signed");
    Ok(crate::rest::json_response(
        StatusCode::CREATED,
        &stored,
        &[],
    ))
}
