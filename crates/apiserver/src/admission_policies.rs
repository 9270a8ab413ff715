//! ValidatingAdmissionPolicies in force, as kube-apiserver evaluates them:
//! for each binding whose policy matches a create, update or delete (the
//! policy's `matchConstraints`, the binding's `matchResources`, their
//! namespace and object selectors, the policy's match conditions), the
//! policy's validations run in CEL with `object`, `oldObject`, `request`,
//! `params` (the binding's parameter objects, read from the store),
//! `namespaceObject` and `variables`. A validation that fails is a denial
//! (`Deny`: the request's error, with the validation's reason and code),
//! a warning (`Warn`) or an audit annotation (`Audit`), as the binding
//! says; an expression that cannot be evaluated fails the request unless
//! the policy's `failurePolicy` is `Ignore`. The rules and the evaluation
//! are `wasmkube_api::admission_policy`'s.

use serde_json::{Value, json};
use wasmkube_api::admission_policy::{Binding, Input, ParamRef, Policy, reason_code};
use wasmkube_api::registry;

use crate::ApiServer;
use crate::admission_webhooks::{Attributes, NamespaceObject, review_request, selector, selects};
use crate::error::{ApiError, ApiResult};

/// Runs the policies bound to `attrs`'s kind of write.
pub(crate) async fn validate(
    server: &ApiServer,
    attrs: &Attributes<'_>,
    object: Option<&Value>,
    old: Option<&Value>,
    warnings: &mut Vec<String>,
) -> ApiResult<()> {
    let bindings = server.webhooks.bindings.current();
    if bindings.is_empty() {
        return Ok(());
    }
    let policies = server.webhooks.policies.current();
    let rt = attrs.rt;
    let req = attrs.request();
    let mut namespace = NamespaceObject::default();
    let request = review_request(attrs, "", object, old);
    let mut denial = None;
    for binding in bindings.iter() {
        let Some(policy) = policies.iter().find(|p| p.name == binding.policy) else {
            continue;
        };
        if !policy.matcher.covers(&req, attrs.name, false)
            || !binding
                .matcher
                .as_ref()
                .is_none_or(|m| m.covers(&req, attrs.name, true))
        {
            continue;
        }
        let namespace_object = match attrs.namespace.filter(|_| rt.namespaced) {
            Some(ns) => namespace.get(server, ns).await?.clone(),
            None => Value::Null,
        };
        if !selected(
            policy,
            binding,
            rt.id() == "Namespace",
            &namespace_object,
            object,
            old,
        )? {
            continue;
        }
        let denied = |message: String| (policy, binding, message);
        let outcome = evaluate(
            server,
            policy,
            binding,
            attrs,
            &request,
            &namespace_object,
            object,
            old,
        )
        .await;
        let violations = match outcome {
            Ok(v) => v,
            Err(e) if policy.ignore_failure => {
                tracing::warn!(policy = policy.name, binding = binding.name, error = %e, "admission policy failed; ignored (failurePolicy Ignore)");
                continue;
            }
            Err(e) => {
                denial.get_or_insert((denied(e), 403, "Forbidden".to_owned()));
                continue;
            }
        };
        for (message, reason) in violations {
            if binding.actions.iter().any(|a| a == "Deny") {
                let code = reason_code(&reason);
                denial.get_or_insert((denied(message.clone()), code, reason.clone()));
            }
            if binding.actions.iter().any(|a| a == "Warn") {
                warnings.push(format!(
                    "Validation failed for ValidatingAdmissionPolicy '{}' with binding '{}': {message}",
                    policy.name, binding.name
                ));
            }
            if binding.actions.iter().any(|a| a == "Audit") {
                crate::audit::annotate(
                    "validation.policy.admission.k8s.io/validation_failure",
                    json!([{"message": message, "policy": policy.name, "binding": binding.name,
                            "validationActions": binding.actions}])
                    .to_string(),
                );
            }
        }
    }
    match denial {
        None => Ok(()),
        Some(((policy, binding, message), code, reason)) => Err(ApiError::Refused {
            code,
            reason,
            message: format!(
                "ValidatingAdmissionPolicy '{}' with binding '{}' denied request: {message}",
                policy.name, binding.name
            ),
        }),
    }
}

/// Whether the namespace and object selectors of the policy and the
/// binding all select this write.
fn selected(
    policy: &Policy,
    binding: &Binding,
    is_namespace: bool,
    namespace_object: &Value,
    object: Option<&Value>,
    old: Option<&Value>,
) -> ApiResult<bool> {
    let labelled = if is_namespace {
        object.or(old)
    } else {
        Some(namespace_object).filter(|n| !n.is_null())
    };
    for m in std::iter::once(&policy.matcher).chain(binding.matcher.as_ref()) {
        let selected = selects(
            &m.namespace_selector,
            &m.object_selector,
            labelled,
            object,
            old,
        )
        .map_err(|e| ApiError::internal(format!("policy {:?}: invalid {e}", policy.name)))?;
        if !selected {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The policy's violations (message, reason) for this write, over each of
/// the binding's parameter objects; an error is the policy's failure.
#[allow(clippy::too_many_arguments)]
async fn evaluate(
    server: &ApiServer,
    policy: &Policy,
    binding: &Binding,
    attrs: &Attributes<'_>,
    request: &Value,
    namespace_object: &Value,
    object: Option<&Value>,
    old: Option<&Value>,
) -> Result<Vec<(String, String)>, String> {
    let null = Value::Null;
    let input = |params| Input {
        object: object.unwrap_or(&null),
        old_object: old.unwrap_or(&null),
        request,
        params,
        namespace_object,
    };
    if !policy.conditions_hold(&input(&null))? {
        return Ok(Vec::new());
    }
    let params = match (&policy.param_kind, &binding.param_ref) {
        (None, _) => vec![Value::Null],
        (Some(_), None) => {
            return Err(format!(
                "policy {:?} has a paramKind and binding {:?} no paramRef",
                policy.name, binding.name
            ));
        }
        (Some((api_version, kind)), Some(r)) => {
            let found = params_of(server, api_version, kind, r, attrs.namespace).await?;
            if found.is_empty() {
                return Ok(if r.deny_when_missing {
                    vec![(
                        "no params found for policy binding with `Deny` parameterNotFoundAction"
                            .to_owned(),
                        "Invalid".to_owned(),
                    )]
                } else {
                    Vec::new()
                });
            }
            found
        }
    };
    let mut violations = Vec::new();
    for p in &params {
        let found = policy.evaluate(&input(p))?;
        for (key, value) in found.audit_annotations {
            crate::audit::annotate(&format!("{}/{key}", policy.name), value);
        }
        violations.extend(found.violations.into_iter().map(|v| (v.message, v.reason)));
    }
    Ok(violations)
}

/// The parameter objects a binding names: one by name, or those its
/// selector selects, in the namespace it names (else the request's, for a
/// namespaced kind).
async fn params_of(
    server: &ApiServer,
    api_version: &str,
    kind: &str,
    r: &ParamRef,
    request_namespace: Option<&str>,
) -> Result<Vec<Value>, String> {
    let rt = registry::by_kind(api_version, kind)
        .ok_or_else(|| format!("paramKind {api_version}, Kind={kind} is not served"))?;
    let namespace = match (&r.namespace, rt.namespaced) {
        (Some(ns), true) => Some(ns.as_str()),
        (None, true) => request_namespace,
        (_, false) => None,
    };
    if let Some(name) = &r.name {
        let kv = server
            .store
            .get(&rt.key(namespace, name))
            .await
            .map_err(|e| e.to_string())?;
        return kv
            .map(|kv| crate::storage::decode_stored(&kv).map_err(|e| e.to_string()))
            .into_iter()
            .collect();
    }
    let wanted = selector(r.selector.as_ref().unwrap_or(&Value::Null))?;
    let page = server
        .store
        .list(
            &rt.list_prefix(namespace),
            wasmkube_store::ListOptions::default(),
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(page
        .items
        .iter()
        .filter_map(|kv| crate::storage::decode_stored(kv).ok())
        .filter(|o| wanted.matches_object(o))
        .collect())
}
