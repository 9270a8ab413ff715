//! The review kinds, answered from the request and never stored:
//! `SelfSubjectReview` (`kubectl auth whoami`), `SelfSubjectAccessReview`
//! and `SelfSubjectRulesReview` (`kubectl auth can-i`, also `--list`),
//! `SubjectAccessReview` and `LocalSubjectAccessReview` (asking for
//! someone else, which needs the right to create them).

use std::sync::Arc;

use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::{Value, json};
use wasmkube_api::registry::ResourceType;

use super::{Attributes, ResourceAttributes, UserInfo};
use crate::ApiServer;
use crate::error::ApiError;

type ApiResult<T> = Result<T, ApiError>;

fn user_json(user: &UserInfo) -> Value {
    let mut v = json!({"username": user.name, "groups": user.groups});
    if !user.uid.is_empty() {
        v["uid"] = json!(user.uid);
    }
    if !user.extra.is_empty() {
        v["extra"] = json!(user.extra);
    }
    v
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// The attributes a review's `spec` asks about, for `user`.
fn spec_attributes(spec: &Value, user: UserInfo) -> ApiResult<Attributes> {
    if let Some(r) = spec.get("resourceAttributes").filter(|v| v.is_object()) {
        let s = |k: &str| r[k].as_str().unwrap_or_default().to_owned();
        let opt = |k: &str| r[k].as_str().filter(|s| !s.is_empty()).map(str::to_owned);
        return Ok(Attributes {
            user,
            verb: s("verb"),
            path: String::new(),
            resource: Some(ResourceAttributes {
                group: s("group"),
                resource: s("resource"),
                subresource: opt("subresource"),
                namespace: opt("namespace"),
                name: opt("name"),
                ..Default::default()
            }),
        });
    }
    if let Some(n) = spec.get("nonResourceAttributes").filter(|v| v.is_object()) {
        return Ok(Attributes {
            user,
            verb: n["verb"].as_str().unwrap_or_default().to_owned(),
            path: n["path"].as_str().unwrap_or_default().to_owned(),
            resource: None,
        });
    }
    Err(ApiError::bad_request(
        "spec: Invalid value: exactly one of nonResourceAttributes or resourceAttributes must be specified",
    ))
}

/// Answers `POST` of a review kind.
pub(crate) async fn create(
    server: &Arc<ApiServer>,
    rt: &'static ResourceType,
    namespace: Option<&str>,
    user: Option<UserInfo>,
    headers: &HeaderMap,
    body: axum::body::Body,
) -> ApiResult<Response> {
    let raw = crate::rest::read_bytes(server, body).await?;
    let content_type = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    let mut review = crate::rest::parse_value(content_type, &raw)?;
    if !review.is_object() {
        return Err(ApiError::bad_request("the body is not an object"));
    }
    // With authorization off, the caller is everyone and may do anything.
    let me = user.unwrap_or_else(|| UserInfo {
        name: "system:admin".into(),
        groups: vec![super::MASTERS.into(), super::AUTHENTICATED.into()],
        ..Default::default()
    });
    let decide = |attrs: &Attributes| match &server.auth {
        Some(auth) => auth.authorize(attrs),
        None => super::rbac::Decision {
            allowed: true,
            reason: "authorization is off".into(),
        },
    };
    let spec = review["spec"].clone();
    let status = match rt.kind {
        "SelfSubjectReview" => json!({"userInfo": user_json(&me)}),
        "SelfSubjectAccessReview" => access_status(decide(&spec_attributes(&spec, me)?)),
        "SubjectAccessReview" | "LocalSubjectAccessReview" => {
            let subject = UserInfo {
                name: spec["user"].as_str().unwrap_or_default().to_owned(),
                uid: spec["uid"].as_str().unwrap_or_default().to_owned(),
                groups: strings(&spec["groups"]),
                extra: Default::default(),
            };
            if subject.name.is_empty() && subject.groups.is_empty() {
                return Err(ApiError::invalid(
                    rt,
                    "",
                    vec![wasmkube_api::field::FieldError::required(
                        "spec.user",
                        "at least one of user or group must be specified",
                    )],
                ));
            }
            let attrs = spec_attributes(&spec, subject)?;
            if rt.kind == "LocalSubjectAccessReview" {
                let asked = attrs.resource.as_ref().and_then(|r| r.namespace.as_deref());
                if attrs.resource.is_none() || asked != namespace {
                    return Err(ApiError::bad_request(format!(
                        "spec.resourceAttributes.namespace: Invalid value: {:?}: must match metadata.namespace",
                        asked.unwrap_or_default()
                    )));
                }
            }
            access_status(decide(&attrs))
        }
        "SelfSubjectRulesReview" => {
            let ns = spec["namespace"].as_str().unwrap_or_default();
            rules_status(server, &me, ns)
        }
        other => unreachable!("{other} is not a review"),
    };
    review["status"] = status;
    review["metadata"]["creationTimestamp"] = json!(crate::rest::now());
    review["apiVersion"] = json!(rt.api_version());
    review["kind"] = json!(rt.kind);
    Ok(crate::rest::json_response(
        StatusCode::CREATED,
        &review,
        &[],
    ))
}

fn access_status(decision: super::rbac::Decision) -> Value {
    let mut status = json!({"allowed": decision.allowed});
    if !decision.reason.is_empty() {
        status["reason"] = json!(decision.reason);
    }
    status
}

fn rules_status(server: &ApiServer, user: &UserInfo, namespace: &str) -> Value {
    let rules = match &server.auth {
        Some(auth) if !user.groups.iter().any(|g| g == super::MASTERS) => {
            auth.rbac.rules_for(user, namespace)
        }
        _ => serde_json::from_value(json!([
            {"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]},
            {"nonResourceURLs": ["*"], "verbs": ["*"]},
        ]))
        .expect("valid rules"),
    };
    let mut resource_rules = Vec::new();
    let mut non_resource_rules = Vec::new();
    for rule in rules {
        if let Some(urls) = rule.non_resource_urls.filter(|u| !u.is_empty()) {
            non_resource_rules.push(json!({"verbs": rule.verbs, "nonResourceURLs": urls}));
        } else {
            let mut r = json!({"verbs": rule.verbs});
            if let Some(g) = rule.api_groups {
                r["apiGroups"] = json!(g);
            }
            if let Some(res) = rule.resources {
                r["resources"] = json!(res);
            }
            if let Some(names) = rule.resource_names.filter(|n| !n.is_empty()) {
                r["resourceNames"] = json!(names);
            }
            resource_rules.push(r);
        }
    }
    json!({
        "resourceRules": resource_rules,
        "nonResourceRules": non_resource_rules,
        "incomplete": false,
    })
}
