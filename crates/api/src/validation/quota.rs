//! Validation of ResourceQuotas and LimitRanges, as Kubernetes' core
//! validation: limits are quantities of resources a quota can measure,
//! scopes are known and do not contradict each other, and a range's
//! minimum, defaults and maximum are in order.

use serde_json::Value;

use crate::field::{Errors, FieldError};
use crate::quantity::{self, Quantity};

const SCOPES: &[&str] = &[
    "Terminating",
    "NotTerminating",
    "BestEffort",
    "NotBestEffort",
    "PriorityClass",
    "CrossNamespacePodAffinity",
];

const OPERATORS: &[&str] = &["In", "NotIn", "Exists", "DoesNotExist"];

/// A map of resource name to non-negative quantity, each checked.
fn quantities<'a>(map: &'a Value, path: &str, errs: &mut Errors) -> Vec<(&'a str, Quantity)> {
    let mut out = Vec::new();
    for (name, v) in map.as_object().into_iter().flatten() {
        let field = format!("{path}[{name}]");
        let text = v.as_str().unwrap_or_default();
        match quantity::parse(text) {
            Ok(q) if q.millis() < 0 => errs.push(FieldError::invalid(
                field,
                text,
                "must be greater than or equal to 0",
            )),
            Ok(q) => out.push((name.as_str(), q)),
            Err(e) => errs.push(FieldError::invalid(field, text, e)),
        }
    }
    out
}

pub(super) fn validate_resource_quota(obj: &Value, errs: &mut Errors) {
    let spec = &obj["spec"];
    for (name, _) in quantities(&spec["hard"], "spec.hard", errs) {
        if crate::quota::measured_kind(name).is_none() && !name.contains('/') {
            errs.push(FieldError::invalid(
                format!("spec.hard[{name}]"),
                name,
                "must be a standard resource for quota",
            ));
        }
    }
    let scopes = crate::quota::strings(&spec["scopes"]);
    for (i, scope) in scopes.iter().enumerate() {
        if !SCOPES.contains(scope) {
            errs.push(FieldError::not_supported(
                format!("spec.scopes[{i}]"),
                scope,
                SCOPES,
            ));
        }
    }
    for (a, b) in [
        ("Terminating", "NotTerminating"),
        ("BestEffort", "NotBestEffort"),
    ] {
        if scopes.contains(&a) && scopes.contains(&b) {
            errs.push(FieldError::invalid(
                "spec.scopes",
                scopes.join(","),
                format!("conflicting scopes: {a}, {b}"),
            ));
        }
    }
    let exprs = spec["scopeSelector"]["matchExpressions"]
        .as_array()
        .into_iter()
        .flatten();
    for (i, e) in exprs.enumerate() {
        let path = format!("spec.scopeSelector.matchExpressions[{i}]");
        let scope = e["scopeName"].as_str().unwrap_or_default();
        if !SCOPES.contains(&scope) {
            errs.push(FieldError::not_supported(
                format!("{path}.scopeName"),
                scope,
                SCOPES,
            ));
        }
        let op = e["operator"].as_str().unwrap_or_default();
        let values = e["values"].as_array().map_or(0, Vec::len);
        match op {
            "In" | "NotIn" if values == 0 => errs.push(FieldError::required(
                format!("{path}.values"),
                "must be at least one value when `operator` is 'In' or 'NotIn' for scope selector",
            )),
            "Exists" | "DoesNotExist" if values > 0 => errs.push(FieldError::invalid(
                format!("{path}.values"),
                values,
                "may not be specified when `operator` is 'Exists' or 'DoesNotExist' for scope selector",
            )),
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            _ => errs.push(FieldError::not_supported(
                format!("{path}.operator"),
                op,
                OPERATORS,
            )),
        }
        if scope != "PriorityClass" && matches!(op, "In" | "NotIn") {
            errs.push(FieldError::invalid(
                format!("{path}.operator"),
                op,
                "must be 'Exist' when scope is any of ResourceQuotaScopeTerminating, ResourceQuotaScopeNotTerminating, ResourceQuotaScopeBestEffort, ResourceQuotaScopeNotBestEffort or ResourceQuotaScopeCrossNamespacePodAffinity",
            ));
        }
    }
}

pub(super) fn validate_limit_range(obj: &Value, errs: &mut Errors) {
    const TYPES: &[&str] = &["Container", "Pod", "PersistentVolumeClaim"];
    let items = obj["spec"]["limits"].as_array().into_iter().flatten();
    for (i, item) in items.enumerate() {
        let path = format!("spec.limits[{i}]");
        let kind = item["type"].as_str().unwrap_or_default();
        if !TYPES.contains(&kind) {
            errs.push(FieldError::not_supported(
                format!("{path}.type"),
                kind,
                TYPES,
            ));
        }
        let part = |errs: &mut Errors, key: &str| {
            quantities(&item[key], &format!("{path}.{key}"), errs)
                .into_iter()
                .map(|(k, q)| (k.to_owned(), q))
                .collect::<std::collections::BTreeMap<String, Quantity>>()
        };
        let min = part(errs, "min");
        let max = part(errs, "max");
        let default = part(errs, "default");
        let default_request = part(errs, "defaultRequest");
        let ratio = part(errs, "maxLimitRequestRatio");
        if kind == "Pod" {
            for key in ["default", "defaultRequest"] {
                if item[key].as_object().is_some_and(|m| !m.is_empty()) {
                    errs.push(FieldError::forbidden(
                        format!("{path}.{key}"),
                        "may not be specified when `type` is 'Pod'",
                    ));
                }
            }
        }
        let shown = |key: &str, name: &str| item[key][name].as_str().unwrap_or_default().to_owned();
        let mut order =
            |lower: (&str, &str, &std::collections::BTreeMap<String, Quantity>),
             upper: (&str, &str, &std::collections::BTreeMap<String, Quantity>)| {
                for (name, low) in lower.2 {
                    if let Some(high) = upper.2.get(name)
                        && low > high
                    {
                        errs.push(FieldError::invalid(
                            format!("{path}.{}[{name}]", lower.0),
                            shown(lower.0, name),
                            format!(
                                "{} value {} is greater than {} value {}",
                                lower.1,
                                shown(lower.0, name),
                                upper.1,
                                shown(upper.0, name)
                            ),
                        ));
                    }
                }
            };
        order(("min", "min", &min), ("max", "max", &max));
        order(
            ("defaultRequest", "default request", &default_request),
            ("default", "default limit", &default),
        );
        order(("default", "default", &default), ("max", "max", &max));
        order(
            ("min", "min", &min),
            ("defaultRequest", "default request", &default_request),
        );
        for (name, r) in &ratio {
            if r.millis() < 1000 {
                errs.push(FieldError::invalid(
                    format!("{path}.maxLimitRequestRatio[{name}]"),
                    shown("maxLimitRequestRatio", name),
                    format!(
                        "ratio {} is less than 1",
                        shown("maxLimitRequestRatio", name)
                    ),
                ));
            }
        }
    }
}
