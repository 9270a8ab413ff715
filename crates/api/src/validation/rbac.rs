//! Validation of the RBAC kinds, as Kubernetes' RBAC validation: every
//! rule names verbs, and either resources (with API groups) or
//! non-resource URLs (the latter only in ClusterRoles); a binding's
//! `roleRef` names a Role or ClusterRole of the RBAC group and never
//! changes; subjects are users, groups or service accounts.

use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject,
};

use crate::field::{Errors, FieldError};

const GROUP: &str = "rbac.authorization.k8s.io";

fn check_rules(rules: &[PolicyRule], cluster: bool, errs: &mut Errors) {
    for (i, rule) in rules.iter().enumerate() {
        let path = format!("rules[{i}]");
        if rule.verbs.is_empty() {
            errs.push(FieldError::required(
                format!("{path}.verbs"),
                "verbs must contain at least one value",
            ));
        }
        let urls = rule.non_resource_urls.as_deref().unwrap_or_default();
        let resources = rule.resources.as_deref().unwrap_or_default();
        if !urls.is_empty() {
            if !cluster {
                errs.push(FieldError::invalid(
                    format!("{path}.nonResourceURLs"),
                    urls.join(","),
                    "namespaced rules cannot apply to non-resource URLs",
                ));
            }
            if !resources.is_empty() || rule.api_groups.as_ref().is_some_and(|g| !g.is_empty()) {
                errs.push(FieldError::invalid(
                    format!("{path}.nonResourceURLs"),
                    urls.join(","),
                    "rules cannot apply to both regular resources and non-resource URLs",
                ));
            }
            continue;
        }
        if rule.api_groups.as_ref().is_none_or(Vec::is_empty) {
            errs.push(FieldError::required(
                format!("{path}.apiGroups"),
                "resource rules must supply at least one api group",
            ));
        }
        if resources.is_empty() {
            errs.push(FieldError::required(
                format!("{path}.resources"),
                "resource rules must supply at least one resource",
            ));
        }
    }
}

fn check_role_ref(role_ref: &RoleRef, old: Option<&RoleRef>, namespaced: bool, errs: &mut Errors) {
    if role_ref.api_group != GROUP {
        errs.push(FieldError::not_supported(
            "roleRef.apiGroup",
            &role_ref.api_group,
            &[GROUP],
        ));
    }
    let kinds: &[&str] = if namespaced {
        &["ClusterRole", "Role"]
    } else {
        &["ClusterRole"]
    };
    if !kinds.contains(&role_ref.kind.as_str()) {
        errs.push(FieldError::not_supported(
            "roleRef.kind",
            &role_ref.kind,
            kinds,
        ));
    }
    if role_ref.name.is_empty() {
        errs.push(FieldError::required("roleRef.name", ""));
    }
    if let Some(old) = old
        && old != role_ref
    {
        errs.push(FieldError::invalid(
            "roleRef",
            format!("{}/{}", role_ref.kind, role_ref.name),
            "cannot change roleRef",
        ));
    }
}

fn check_subjects(subjects: &[Subject], namespaced: bool, errs: &mut Errors) {
    for (i, s) in subjects.iter().enumerate() {
        let path = format!("subjects[{i}]");
        if s.name.is_empty() {
            errs.push(FieldError::required(format!("{path}.name"), ""));
        }
        match s.kind.as_str() {
            "User" | "Group" => {
                if s.api_group.as_deref() != Some(GROUP) {
                    errs.push(FieldError::not_supported(
                        format!("{path}.apiGroup"),
                        s.api_group.as_deref().unwrap_or_default(),
                        &[GROUP],
                    ));
                }
            }
            "ServiceAccount" => {
                if s.api_group.as_deref().is_some_and(|g| !g.is_empty()) {
                    errs.push(FieldError::not_supported(
                        format!("{path}.apiGroup"),
                        s.api_group.as_deref().unwrap_or_default(),
                        &[""],
                    ));
                }
                if !namespaced && s.namespace.as_deref().unwrap_or_default().is_empty() {
                    errs.push(FieldError::required(format!("{path}.namespace"), ""));
                }
            }
            other => errs.push(FieldError::not_supported(
                format!("{path}.kind"),
                other,
                &["Group", "ServiceAccount", "User"],
            )),
        }
    }
}

pub(super) fn validate_role(role: &Role, _old: Option<&Role>, errs: &mut Errors) {
    check_rules(role.rules.as_deref().unwrap_or_default(), false, errs);
}

pub(super) fn validate_cluster_role(
    role: &ClusterRole,
    _old: Option<&ClusterRole>,
    errs: &mut Errors,
) {
    check_rules(role.rules.as_deref().unwrap_or_default(), true, errs);
}

pub(super) fn validate_role_binding(b: &RoleBinding, old: Option<&RoleBinding>, errs: &mut Errors) {
    check_role_ref(&b.role_ref, old.map(|o| &o.role_ref), true, errs);
    check_subjects(b.subjects.as_deref().unwrap_or_default(), true, errs);
}

pub(super) fn validate_cluster_role_binding(
    b: &ClusterRoleBinding,
    old: Option<&ClusterRoleBinding>,
    errs: &mut Errors,
) {
    check_role_ref(&b.role_ref, old.map(|o| &o.role_ref), false, errs);
    check_subjects(b.subjects.as_deref().unwrap_or_default(), false, errs);
}
