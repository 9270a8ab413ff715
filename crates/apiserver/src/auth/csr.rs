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
//! Anything else waits for an approver: `kubectl certificate approve|deny`
//! writes the `approval` subresource ([`approve`]), which takes `approve`
//! on the request's signer (`certificates.k8s.io/signers`), and the server
//! then signs an approved request of the signers it runs (Kubernetes'
//! `csrsigning`): `kubernetes.io/kube-apiserver-client` (a user's client
//! certificate: how an administrator adds a user), the node client and the
//! node serving signers.

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
/// How long a signed certificate is valid at most, unless the server is
/// told otherwise (`--cluster-signing-duration`; Kubernetes: a year).
pub const SIGNING_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// The signer of node agents' serving certificates.
pub const NODE_SERVING_SIGNER: &str = "kubernetes.io/kubelet-serving";
/// The signer of users' client certificates.
pub const CLIENT_SIGNER: &str = "kubernetes.io/kube-apiserver-client";

/// Condition types the approval subresource sets.
const DECISIONS: &[&str] = &["Approved", "Denied", "Failed"];

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
    let mut csr = crate::rest::read_body(server, headers, body).await?;
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
            let signed = sign(ca, &pem, &created, serving, server.config.signing_duration);
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

/// `PUT .../certificatesigningrequests/NAME/approval`: sets the request's
/// `Approved`/`Denied` conditions (nothing else of the body is kept), as
/// `kubectl certificate approve|deny` does. The caller needs `approve` on
/// the signer besides `update` on the subresource (which the middleware
/// checked). An approved request of a signer this server runs is signed at
/// once; a request its signer refuses gets a `Failed` condition.
pub(crate) async fn approve(
    server: &Arc<ApiServer>,
    rt: &'static ResourceType,
    name: &str,
    user: Option<UserInfo>,
    headers: &HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    use wasmkube_api::field::FieldError;
    let sent = crate::rest::read_body(server, headers, body).await?;
    let key = rt.key(None, name);
    let current = match server.store.get(&key).await.map_err(ApiError::internal)? {
        Some(kv) => crate::storage::decode_stored(&kv).map_err(ApiError::internal)?,
        None => return Err(ApiError::not_found(rt, name)),
    };
    let signer = current["spec"]["signerName"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    if let (Some(auth), Some(user)) = (&server.auth, &user) {
        let may = |resource_name: &str| {
            auth.allows(&super::Attributes {
                user: user.clone(),
                verb: "approve".into(),
                path: String::new(),
                resource: Some(super::ResourceAttributes {
                    group: "certificates.k8s.io".into(),
                    resource: "signers".into(),
                    name: Some(resource_name.to_owned()),
                    ..Default::default()
                }),
            })
        };
        let domain = signer.split_once('/').map(|(d, _)| format!("{d}/*"));
        if !may(&signer) && !domain.as_deref().is_some_and(may) {
            return Err(ApiError::Forbidden {
                subject: crate::error::Subject::of(rt, name),
                message: format!(
                    "certificatesigningrequests.certificates.k8s.io \"{name}\" is forbidden: user not permitted to approve requests with signerName \"{signer}\""
                ),
            });
        }
    }
    // The conditions sent, checked as Kubernetes' validation does.
    let now = crate::rest::now();
    let mut conditions: Vec<Value> = sent["status"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut causes = Vec::new();
    for (i, c) in conditions.iter_mut().enumerate() {
        let kind = c["type"].as_str().unwrap_or_default().to_owned();
        if !DECISIONS.contains(&kind.as_str()) {
            causes.push(FieldError::not_supported(
                format!("status.conditions[{i}].type"),
                &kind,
                DECISIONS,
            ));
        }
        if c["status"].as_str().unwrap_or_default().is_empty() {
            c["status"] = json!("True");
        }
        for field in ["lastUpdateTime", "lastTransitionTime"] {
            if c[field].is_null() {
                c[field] = json!(now);
            }
        }
    }
    let holds = |conditions: &[Value], kind: &str| {
        conditions
            .iter()
            .any(|c| c["type"] == kind && c["status"] == "True")
    };
    if holds(&conditions, "Approved") && holds(&conditions, "Denied") {
        causes.push(FieldError::invalid(
            "status.conditions",
            "Approved, Denied",
            "Approved and Denied conditions are mutually exclusive",
        ));
    }
    let previous = current["status"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for kind in ["Approved", "Denied"] {
        if holds(&previous, kind) && !holds(&conditions, kind) {
            causes.push(FieldError::forbidden(
                "status.conditions",
                format!("updates may not remove a condition of type \"{kind}\""),
            ));
        }
    }
    if !causes.is_empty() {
        return Err(ApiError::invalid(rt, name, causes));
    }
    let approved = holds(&conditions, "Approved");
    let written = conditions.clone();
    let mut stored =
        crate::rest::reconcile_internal(server, rt, name, Some(Subresource::Status), |current| {
            let mut v = current.clone();
            v["status"]["conditions"] = json!(written);
            Some(v)
        })
        .await?;
    let unsigned = stored["status"]["certificate"]
        .as_str()
        .is_none_or(str::is_empty);
    if approved
        && unsigned
        && let Some(ca) = &server.config.ca
    {
        let outcome = sign_approved(ca, &stored, &signer, server.config.signing_duration);
        if let Some(outcome) = outcome {
            stored = crate::rest::reconcile_internal(
                server,
                rt,
                name,
                Some(Subresource::Status),
                |current| {
                    let mut v = current.clone();
                    match &outcome {
                        Ok(cert) => {
                            v["status"]["certificate"] =
                                json!(base64::engine::general_purpose::STANDARD.encode(cert));
                        }
                        Err(why) => {
                            let failed = json!({
                                "type": "Failed", "status": "True",
                                "reason": "SignerValidationFailure", "message": why,
                                "lastUpdateTime": now, "lastTransitionTime": now,
                            });
                            match v["status"]["conditions"].as_array_mut() {
                                Some(c) => c.push(failed),
                                None => v["status"]["conditions"] = json!([failed]),
                            }
                        }
                    }
                    Some(v)
                },
            )
            .await?;
            match &outcome {
                Ok(_) => tracing::info!(csr = name, signer, "approved request signed"),
                Err(why) => {
                    tracing::info!(csr = name, signer, "approved request not signed: {why}")
                }
            }
        }
    }
    Ok(crate::rest::json_response(StatusCode::OK, &stored, &[]))
}

/// The certificate for an approved request of a signer this server runs
/// (`None`: another signer's, left for it), or why its signer refuses it.
fn sign_approved(
    ca: &wasmkube_pki::Ca,
    csr: &Value,
    signer: &str,
    longest: Duration,
) -> Option<Result<String, String>> {
    if ![CLIENT_SIGNER, NODE_CLIENT_SIGNER, NODE_SERVING_SIGNER].contains(&signer) {
        return None;
    }
    let pem = base64::engine::general_purpose::STANDARD
        .decode(csr["spec"]["request"].as_str().unwrap_or_default())
        .ok()
        .and_then(|b| String::from_utf8(b).ok());
    let Some(pem) = pem else {
        return Some(Err("spec.request is not a PEM certificate request".into()));
    };
    let usages: Vec<&str> = csr["spec"]["usages"]
        .as_array()
        .map(|u| u.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let (wanted, allowed): (&str, &[&str]) = if signer == NODE_SERVING_SIGNER {
        (
            "server auth",
            &["server auth", "digital signature", "key encipherment"],
        )
    } else {
        (
            "client auth",
            &["client auth", "digital signature", "key encipherment"],
        )
    };
    if !usages.contains(&wanted) || usages.iter().any(|u| !allowed.contains(u)) {
        return Some(Err(format!(
            "usages {usages:?} do not fit signer {signer}: it needs \"{wanted}\" and allows only {allowed:?}"
        )));
    }
    if signer == NODE_CLIENT_SIGNER {
        match wasmkube_pki::csr_identity(&pem) {
            Ok(who)
                if who.user.starts_with("system:node:")
                    && who.groups == ["system:nodes".to_owned()] => {}
            Ok(who) => {
                return Some(Err(format!(
                    "{signer} signs only system:node:NAME in group system:nodes, not {:?} in {:?}",
                    who.user, who.groups
                )));
            }
            Err(e) => return Some(Err(e.to_string())),
        }
    }
    let signed = sign(ca, &pem, csr, signer == NODE_SERVING_SIGNER, longest);
    Some(signed.map_err(|e| e.to_string()))
}

/// Signs the request `pem` of `csr` (a serving or a client certificate) for
/// its `expirationSeconds` (at least ten minutes), at most `longest`.
fn sign(
    ca: &wasmkube_pki::Ca,
    pem: &str,
    csr: &Value,
    serving: bool,
    longest: Duration,
) -> Result<String, wasmkube_pki::PkiError> {
    let lifetime = csr["spec"]["expirationSeconds"]
        .as_u64()
        .map(|s| Duration::from_secs(s.max(600)))
        .unwrap_or(longest)
        .min(longest);
    if serving {
        ca.sign_serving_csr(pem, lifetime)
    } else {
        ca.sign_client_csr(pem, lifetime)
    }
}
