//! Service-account tokens, as Kubernetes' bound tokens: JWTs signed with
//! the cluster's service-account key, issued by the TokenRequest API
//! (`POST .../serviceaccounts/NAME/token`, `kubectl create token NAME`),
//! bound to the service account's uid and optionally to a pod or Secret,
//! with an expiry. A bearer token that verifies authenticates as
//! `system:serviceaccount:NAMESPACE:NAME` (groups `system:serviceaccounts`
//! and `system:serviceaccounts:NAMESPACE`) for as long as the account (and
//! the object it is bound to) still exists with the same uid.

use std::sync::Arc;

use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::{Value, json};
use wasmkube_api::registry;

use super::UserInfo;
use crate::ApiServer;
use crate::error::ApiError;

/// The issuer of the tokens, and their default audience (Kubernetes' default
/// `--service-account-issuer` for a cluster.local cluster).
pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// Expiry bounds of a requested token, in seconds (Kubernetes: at least
/// ten minutes; the default one hour; at most 48 hours here).
const MIN_SECONDS: i64 = 600;
const DEFAULT_SECONDS: i64 = 3600;
const MAX_SECONDS: i64 = 48 * 3600;
/// What the service-account volume asks for, and what it gets.
const VOLUME_SECONDS: i64 = 3607;
const EXTENDED_SECONDS: i64 = 365 * 24 * 3600;

/// The type of a Secret holding a service account's long-lived token.
pub(crate) const LEGACY_TOKEN_TYPE: &str = "kubernetes.io/service-account-token";
const ACCOUNT_NAME: &str = "kubernetes.io/service-account.name";
const ACCOUNT_UID: &str = "kubernetes.io/service-account.uid";
/// A legacy token lasts until its Secret or its account goes; the JWT
/// still needs an expiry, so it is a century away.
const LEGACY_SECONDS: i64 = 100 * 365 * 24 * 3600;

/// The stored object `kind` `namespace`/`name`, if it exists.
async fn stored(
    server: &ApiServer,
    plural: &str,
    namespace: &str,
    name: &str,
) -> Result<Option<Value>, ApiError> {
    let rt = registry::lookup("", "v1", plural).expect("a core kind");
    match server
        .store
        .get(&rt.key(Some(namespace), name))
        .await
        .map_err(ApiError::internal)?
    {
        Some(kv) => Ok(Some(
            crate::storage::decode_stored(&kv).map_err(ApiError::internal)?,
        )),
        None => Ok(None),
    }
}

fn uid(obj: &Value) -> &str {
    obj["metadata"]["uid"].as_str().unwrap_or_default()
}

/// Answers `POST` of a TokenRequest for service account `name`.
pub(crate) async fn request(
    server: &Arc<ApiServer>,
    namespace: &str,
    name: &str,
    user: Option<&UserInfo>,
    headers: &HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    let sa_rt = registry::lookup("", "v1", "serviceaccounts").expect("served");
    let Some(signer) = &server.config.service_accounts else {
        return Err(ApiError::NoRoute);
    };
    let raw = crate::rest::read_bytes(server, body).await?;
    let content_type = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    let mut request = if raw.is_empty() {
        json!({})
    } else {
        crate::rest::parse_value(content_type, &raw)?
    };
    let account = stored(server, "serviceaccounts", namespace, name)
        .await?
        .ok_or_else(|| ApiError::not_found(sa_rt, name))?;
    let spec = &request["spec"];
    let seconds = spec["expirationSeconds"]
        .as_i64()
        .unwrap_or(DEFAULT_SECONDS);
    if seconds < MIN_SECONDS {
        return Err(ApiError::invalid(
            sa_rt,
            name,
            vec![wasmkube_api::field::FieldError::invalid(
                "spec.expirationSeconds",
                seconds.to_string(),
                "may not specify a duration less than 10 minutes",
            )],
        ));
    }
    // The service-account volume asks for 3607 s; as Kubernetes does
    // (--service-account-extend-token-expiration), such a pod-bound token is
    // issued for a year, so a client that never rereads the file keeps
    // working.
    let seconds = if seconds == VOLUME_SECONDS && spec["boundObjectRef"]["kind"] == "Pod" {
        EXTENDED_SECONDS
    } else {
        seconds.min(MAX_SECONDS)
    };
    let audiences: Vec<String> = match spec["audiences"].as_array() {
        Some(a) if !a.is_empty() => a
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        _ => vec![ISSUER.to_owned()],
    };
    let mut kubernetes = json!({
        "namespace": namespace,
        "serviceaccount": {"name": name, "uid": uid(&account)},
    });
    let bound = &spec["boundObjectRef"];
    if bound.is_object() {
        let kind = bound["kind"].as_str().unwrap_or_default();
        let plural = match kind {
            "Pod" => "pods",
            "Secret" => "secrets",
            other => {
                return Err(ApiError::bad_request(format!(
                    "spec.boundObjectRef.kind: Unsupported value: {other:?}: supported values: \"Pod\", \"Secret\""
                )));
            }
        };
        let bound_name = bound["name"].as_str().unwrap_or_default();
        let object = stored(server, plural, namespace, bound_name)
            .await?
            .ok_or_else(|| {
                ApiError::not_found(
                    registry::lookup("", "v1", plural).expect("served"),
                    bound_name,
                )
            })?;
        if let Some(want) = bound["uid"].as_str().filter(|u| !u.is_empty())
            && want != uid(&object)
        {
            return Err(ApiError::Conflict(
                crate::error::Subject::of(sa_rt, name),
                format!(
                    "the UID in the bound object reference ({want}) does not match the {kind}'s"
                ),
            ));
        }
        super::node::admit_token(user, name, bound, Some(&object))?;
        kubernetes[kind.to_ascii_lowercase()] = json!({"name": bound_name, "uid": uid(&object)});
    } else {
        super::node::admit_token(user, name, bound, None)?;
    }
    let now = chrono::Utc::now();
    let expires = now + chrono::Duration::seconds(seconds);
    let claims = json!({
        "iss": ISSUER,
        "sub": format!("system:serviceaccount:{namespace}:{name}"),
        "aud": audiences,
        "iat": now.timestamp(),
        "nbf": now.timestamp(),
        "exp": expires.timestamp(),
        "jti": uuid::Uuid::new_v4().to_string(),
        "kubernetes.io": kubernetes,
    });
    let token = signer.sign(&claims).map_err(ApiError::internal)?;
    request["apiVersion"] = json!("authentication.k8s.io/v1");
    request["kind"] = json!("TokenRequest");
    request["metadata"]["name"] = json!(name);
    request["metadata"]["namespace"] = json!(namespace);
    request["metadata"]["creationTimestamp"] = json!(crate::rest::now());
    request["spec"]["audiences"] = json!(audiences);
    request["spec"]["expirationSeconds"] = json!(seconds);
    request["status"] = json!({
        "token": token,
        "expirationTimestamp": expires.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    });
    Ok(crate::rest::json_response(
        StatusCode::CREATED,
        &request,
        &[],
    ))
}

/// Kubernetes' tokens controller, done as the Secret is created: a Secret
/// of type [`LEGACY_TOKEN_TYPE`] naming an existing account (annotation
/// `kubernetes.io/service-account.name`) and holding no token yet gets one,
/// bound to the account and to the Secret (so deleting either revokes it),
/// with the cluster CA and the namespace, and the account's uid in
/// `kubernetes.io/service-account.uid`. An account that does not exist yet
/// leaves the Secret empty, with a warning.
pub(crate) async fn legacy_secret(
    server: &ApiServer,
    secret: &mut Value,
    warnings: &mut Vec<String>,
) -> Result<(), ApiError> {
    use base64::Engine;
    if secret["type"] != LEGACY_TOKEN_TYPE || !secret["data"]["token"].is_null() {
        return Ok(());
    }
    let Some(signer) = &server.config.service_accounts else {
        return Ok(());
    };
    let namespace = secret["metadata"]["namespace"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let account_name = secret["metadata"]["annotations"][ACCOUNT_NAME]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let Some(account) = stored(server, "serviceaccounts", &namespace, &account_name).await? else {
        warnings.push(format!(
            "service account {account_name:?} does not exist: the Secret holds no token"
        ));
        return Ok(());
    };
    let now = chrono::Utc::now();
    let claims = json!({
        "iss": ISSUER,
        "sub": format!("system:serviceaccount:{namespace}:{account_name}"),
        "aud": [ISSUER],
        "iat": now.timestamp(),
        "nbf": now.timestamp(),
        "exp": (now + chrono::Duration::seconds(LEGACY_SECONDS)).timestamp(),
        "jti": uuid::Uuid::new_v4().to_string(),
        "kubernetes.io": {
            "namespace": namespace,
            "serviceaccount": {"name": account_name, "uid": uid(&account)},
            "secret": {"name": secret["metadata"]["name"], "uid": secret["metadata"]["uid"]},
        },
    });
    let token = signer.sign(&claims).map_err(ApiError::internal)?;
    let b64 = |s: &str| json!(base64::engine::general_purpose::STANDARD.encode(s));
    if !secret["data"].is_object() {
        secret["data"] = json!({});
    }
    secret["data"]["token"] = b64(&token);
    secret["data"]["namespace"] = b64(&namespace);
    if let Some(ca) = &server.config.ca {
        secret["data"]["ca.crt"] = b64(ca.cert_pem());
    }
    secret["metadata"]["annotations"][ACCOUNT_UID] = json!(uid(&account));
    Ok(())
}

/// Who a service-account token names, if it is one of ours, for this API
/// server, unexpired, and what it is bound to still exists.
pub(crate) async fn authenticate(server: &ApiServer, token: &str) -> Result<UserInfo, ApiError> {
    authenticate_for(server, token, &[ISSUER]).await
}

/// As [`authenticate`], for a token meant for one of `audiences`.
pub(crate) async fn authenticate_for(
    server: &ApiServer,
    token: &str,
    audiences: &[&str],
) -> Result<UserInfo, ApiError> {
    let Some(signer) = &server.config.service_accounts else {
        return Err(ApiError::Unauthorized);
    };
    let claims = signer
        .verify(token, ISSUER, audiences)
        .map_err(|_| ApiError::Unauthorized)?;
    if claims.get("kubernetes.io").is_none() {
        return Err(ApiError::Unauthorized);
    }
    let k = &claims["kubernetes.io"];
    let namespace = k["namespace"].as_str().unwrap_or_default();
    let name = k["serviceaccount"]["name"].as_str().unwrap_or_default();
    let account = stored(server, "serviceaccounts", namespace, name)
        .await?
        .ok_or(ApiError::Unauthorized)?;
    if uid(&account) != k["serviceaccount"]["uid"] {
        return Err(ApiError::Unauthorized);
    }
    let mut extra = std::collections::BTreeMap::new();
    for (kind, plural) in [("pod", "pods"), ("secret", "secrets")] {
        if let Some(bound_name) = k[kind]["name"].as_str() {
            let object = stored(server, plural, namespace, bound_name)
                .await?
                .ok_or(ApiError::Unauthorized)?;
            if uid(&object) != k[kind]["uid"] {
                return Err(ApiError::Unauthorized);
            }
            if kind == "pod" {
                extra.insert(
                    "authentication.kubernetes.io/pod-name".to_owned(),
                    vec![bound_name.to_owned()],
                );
            }
        }
    }
    let mut user = UserInfo::authenticated(
        &format!("system:serviceaccount:{namespace}:{name}"),
        uid(&account),
        &[
            "system:serviceaccounts".to_owned(),
            format!("system:serviceaccounts:{namespace}"),
        ],
    );
    user.extra = extra;
    Ok(user)
}
