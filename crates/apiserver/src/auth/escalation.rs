//! RBAC escalation prevention, as Kubernetes': a user may write a Role or
//! ClusterRole only with rules they hold themselves (or the `escalate`
//! verb on it), and bind a role only if they hold its rules (or the `bind`
//! verb on it). Otherwise anyone allowed to write RBAC objects in a
//! namespace could grant themselves anything there.

use k8s_openapi::api::rbac::v1::{PolicyRule, RoleRef};
use serde_json::Value;
use wasmkube_api::registry::ResourceType;

use super::{Attributes, MASTERS, ResourceAttributes, UserInfo};
use crate::ApiServer;
use crate::error::{ApiError, Subject};

const GROUP: &str = "rbac.authorization.k8s.io";

/// Refuses a write of `obj` (`rt`, named `name`) that would grant what
/// `user` does not hold.
pub(crate) fn check(
    server: &ApiServer,
    user: Option<&UserInfo>,
    rt: &ResourceType,
    name: &str,
    obj: &Value,
) -> Result<(), ApiError> {
    if rt.group != GROUP {
        return Ok(());
    }
    let (Some(auth), Some(user)) = (&server.auth, user) else {
        return Ok(());
    };
    if user.groups.iter().any(|g| g == MASTERS) {
        return Ok(());
    }
    let namespace = obj["metadata"]["namespace"]
        .as_str()
        .filter(|_| rt.namespaced);
    let may = |verb: &str, resource: &str, target: &str| {
        auth.allows(&Attributes {
            user: user.clone(),
            verb: verb.into(),
            path: String::new(),
            resource: Some(ResourceAttributes {
                group: GROUP.into(),
                resource: resource.into(),
                subresource: None,
                namespace: namespace.map(Into::into),
                name: Some(target.into()),
                ..Default::default()
            }),
        })
    };
    let wanted: Vec<PolicyRule> = match rt.kind {
        "Role" | "ClusterRole" => {
            if may("escalate", rt.plural, name) {
                return Ok(());
            }
            serde_json::from_value(obj["rules"].clone()).unwrap_or_default()
        }
        "RoleBinding" | "ClusterRoleBinding" => {
            let Ok(role_ref) = serde_json::from_value::<RoleRef>(obj["roleRef"].clone()) else {
                return Ok(()); // validation reports it
            };
            let plural = if role_ref.kind == "Role" {
                "roles"
            } else {
                "clusterroles"
            };
            if may("bind", plural, &role_ref.name) {
                return Ok(());
            }
            auth.rbac
                .rules_of_role(&role_ref, namespace.unwrap_or_default())
        }
        _ => return Ok(()),
    };
    let missing: Vec<String> = wanted
        .iter()
        .flat_map(|rule| uncovered(auth, user, namespace, rule))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let message = format!(
        "{} \"{name}\" is forbidden: user \"{}\" (groups={:?}) is attempting to grant RBAC permissions not currently held:\n{}",
        rt.qualified_resource(),
        user.name,
        user.groups,
        missing.join("\n")
    );
    Err(ApiError::Forbidden {
        subject: Subject::of(rt, name),
        message,
    })
}

/// The parts of `rule` that `user` does not hold in `namespace`, each as
/// Kubernetes prints a rule. A wildcard asked is held only as a wildcard.
fn uncovered(
    auth: &super::Auth,
    user: &UserInfo,
    namespace: Option<&str>,
    rule: &PolicyRule,
) -> Vec<String> {
    let mut missing = Vec::new();
    let holds = |verb: &str, resource: Option<ResourceAttributes>, path: &str| {
        auth.allows(&Attributes {
            user: user.clone(),
            verb: verb.into(),
            path: path.into(),
            resource,
        })
    };
    for verb in &rule.verbs {
        for url in rule.non_resource_urls.iter().flatten() {
            if !holds(verb, None, url) {
                missing.push(format!(
                    "{{NonResourceURLs:[\"{url}\"], Verbs:[\"{verb}\"]}}"
                ));
            }
        }
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                let (resource, subresource) = match resource.split_once('/') {
                    Some((r, s)) => (r.to_owned(), Some(s.to_owned())),
                    None => (resource.clone(), None),
                };
                let names: Vec<Option<String>> = match rule.resource_names.as_deref() {
                    None | Some([]) => vec![None],
                    Some(names) => names.iter().cloned().map(Some).collect(),
                };
                for name in names {
                    let attrs = ResourceAttributes {
                        group: group.clone(),
                        resource: resource.clone(),
                        subresource: subresource.clone(),
                        namespace: namespace.map(Into::into),
                        name: name.clone(),
                        ..Default::default()
                    };
                    if !holds(verb, Some(attrs), "") {
                        let shown = match &subresource {
                            Some(s) => format!("{resource}/{s}"),
                            None => resource.clone(),
                        };
                        let names = name
                            .map(|n| format!(", ResourceNames:[\"{n}\"]"))
                            .unwrap_or_default();
                        missing.push(format!(
                            "{{APIGroups:[\"{group}\"], Resources:[\"{shown}\"]{names}, Verbs:[\"{verb}\"]}}"
                        ));
                    }
                }
            }
        }
    }
    missing
}
