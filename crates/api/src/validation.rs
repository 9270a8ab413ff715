//! Validation of objects on create and update, as Kubernetes' registry
//! strategies do it for the served kinds: metadata syntax, required fields,
//! kind-specific rules and immutable fields.

use std::collections::BTreeMap;
use std::collections::BTreeSet;

use k8s_openapi::api::apps::v1 as apps;
use k8s_openapi::api::batch::v1 as batch;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as networking;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use serde_json::Value;

use crate::field::{Errors, FieldError};
use crate::gateway_api as gw;
use crate::names;
use crate::quantity;
use crate::registry::ResourceType;
use crate::selectors;
use crate::typed::decode_as;

mod network_policy;
mod quota;
mod rbac;
mod routing;
mod serving;
mod storage;

/// Largest total size of an object's annotations, as Kubernetes enforces.
const TOTAL_ANNOTATION_SIZE_LIMIT: usize = 256 * 1024;

/// Validates `obj` (canonical JSON of `rt`'s kind); `old` is the stored object
/// on update.
pub fn validate(rt: &ResourceType, obj: &Value, old: Option<&Value>) -> Vec<FieldError> {
    let mut errs = Errors::default();
    validate_meta(rt, obj, old, &mut errs);
    macro_rules! typed {
        ($ty:ty, $f:expr) => {
            match decode_as::<$ty>(obj) {
                Ok(new) => {
                    let old_typed = old.and_then(|o| decode_as::<$ty>(o).ok());
                    $f(&new, old_typed.as_ref(), &mut errs)
                }
                Err(e) => errs.push(FieldError::invalid(e.path, "", e.message)),
            }
        };
    }
    if let Some(custom) = rt.custom {
        for e in crate::custom::validate(&custom.schema, obj, old) {
            errs.push(e);
        }
        return errs.0;
    }
    match rt.id() {
        "CustomResourceDefinition" => {
            for e in crate::custom::validate_crd(obj) {
                errs.push(e);
            }
        }
        "Pod" => typed!(core::Pod, validate_pod),
        "Service" => typed!(core::Service, validate_service),
        "ConfigMap" => typed!(core::ConfigMap, validate_config_map),
        "Secret" => typed!(core::Secret, validate_secret),
        "Deployment" => typed!(apps::Deployment, validate_deployment),
        "ReplicaSet" => typed!(apps::ReplicaSet, validate_replica_set),
        "DaemonSet" => typed!(apps::DaemonSet, validate_daemon_set),
        "StatefulSet" => typed!(apps::StatefulSet, validate_stateful_set),
        "Job" => typed!(batch::Job, validate_job),
        "CronJob" => typed!(batch::CronJob, validate_cron_job),
        "PriorityClass" => validate_priority_class(obj, old, &mut errs),
        "ValidatingAdmissionPolicy" => {
            for e in crate::admission_policy::validate_policy(obj) {
                errs.push(e);
            }
        }
        "ValidatingAdmissionPolicyBinding" => {
            for e in crate::admission_policy::validate_binding(obj) {
                errs.push(e);
            }
        }
        "MutatingWebhookConfiguration" | "ValidatingWebhookConfiguration" => {
            let mutating = rt.kind == "MutatingWebhookConfiguration";
            for e in crate::webhooks::validate_configuration(obj, mutating) {
                errs.push(e);
            }
        }
        "ResourceQuota" => quota::validate_resource_quota(obj, &mut errs),
        "LimitRange" => quota::validate_limit_range(obj, &mut errs),
        "PersistentVolume" => typed!(core::PersistentVolume, storage::validate_persistent_volume),
        "PersistentVolumeClaim" => typed!(
            core::PersistentVolumeClaim,
            storage::validate_persistent_volume_claim
        ),
        "StorageClass" => typed!(
            k8s_openapi::api::storage::v1::StorageClass,
            storage::validate_storage_class
        ),
        "Ingress" => typed!(networking::Ingress, routing::validate_ingress),
        "IngressClass" => typed!(networking::IngressClass, routing::validate_ingress_class),
        "NetworkPolicy" => typed!(networking::NetworkPolicy, network_policy::validate),
        "GatewayClass" => typed!(gw::GatewayClass, routing::validate_gateway_class),
        "Gateway" => typed!(gw::Gateway, routing::validate_gateway),
        "HTTPRoute" => typed!(gw::HTTPRoute, routing::validate_http_route),
        "PodDisruptionBudget" => typed!(
            k8s_openapi::api::policy::v1::PodDisruptionBudget,
            validate_pdb
        ),
        "HorizontalPodAutoscaler" => typed!(
            k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler,
            validate_hpa
        ),
        "knative.Service" => typed!(crate::knative::Service, serving::validate_service),
        "Configuration" => typed!(
            crate::knative::Configuration,
            serving::validate_configuration
        ),
        "Revision" => typed!(crate::knative::Revision, serving::validate_revision),
        "Route" => typed!(crate::knative::Route, serving::validate_route),
        "Role" => typed!(k8s_openapi::api::rbac::v1::Role, rbac::validate_role),
        "ClusterRole" => typed!(
            k8s_openapi::api::rbac::v1::ClusterRole,
            rbac::validate_cluster_role
        ),
        "RoleBinding" => typed!(
            k8s_openapi::api::rbac::v1::RoleBinding,
            rbac::validate_role_binding
        ),
        "ClusterRoleBinding" => typed!(
            k8s_openapi::api::rbac::v1::ClusterRoleBinding,
            rbac::validate_cluster_role_binding
        ),
        _ => {}
    }
    errs.0
}

/// A PodDisruptionBudget, as Kubernetes' validation checks it: one of
/// `minAvailable` and `maxUnavailable`, each a count or a percentage.
fn validate_pdb(
    pdb: &k8s_openapi::api::policy::v1::PodDisruptionBudget,
    _old: Option<&k8s_openapi::api::policy::v1::PodDisruptionBudget>,
    errs: &mut Errors,
) {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let Some(spec) = &pdb.spec else {
        return;
    };
    if spec.min_available.is_some() && spec.max_unavailable.is_some() {
        errs.push(FieldError::invalid(
            "spec",
            "",
            "minAvailable and maxUnavailable cannot be both set",
        ));
    }
    for (field, v) in [
        ("spec.minAvailable", &spec.min_available),
        ("spec.maxUnavailable", &spec.max_unavailable),
    ] {
        match v {
            Some(IntOrString::Int(n)) if *n < 0 => errs.push(FieldError::invalid(
                field,
                n.to_string(),
                "must be greater than or equal to 0",
            )),
            Some(IntOrString::String(p)) => {
                let pct = p.strip_suffix('%').and_then(|n| n.parse::<u32>().ok());
                match pct {
                    Some(n) if n <= 100 => {}
                    Some(_) => errs.push(FieldError::invalid(
                        field,
                        p.clone(),
                        "must not be greater than 100%",
                    )),
                    None => errs.push(FieldError::invalid(
                        field,
                        p.clone(),
                        "a valid percent string must be a numeric string followed by an ending '%'",
                    )),
                }
            }
            _ => {}
        }
    }
}

/// A HorizontalPodAutoscaler, as Kubernetes' validation checks it.
fn validate_hpa(
    hpa: &k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler,
    _old: Option<&k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler>,
    errs: &mut Errors,
) {
    let Some(spec) = &hpa.spec else {
        errs.push(FieldError::required("spec", ""));
        return;
    };
    if spec.scale_target_ref.kind.is_empty() {
        errs.push(FieldError::required("spec.scaleTargetRef.kind", ""));
    }
    if spec.scale_target_ref.name.is_empty() {
        errs.push(FieldError::required("spec.scaleTargetRef.name", ""));
    }
    let min = spec.min_replicas.unwrap_or(1);
    if min < 1 {
        errs.push(FieldError::invalid(
            "spec.minReplicas",
            min.to_string(),
            "must be greater than or equal to 1",
        ));
    }
    if spec.max_replicas < min.max(1) {
        errs.push(FieldError::invalid(
            "spec.maxReplicas",
            spec.max_replicas.to_string(),
            "must be greater than or equal to `minReplicas`",
        ));
    }
    for (i, m) in spec.metrics.iter().flatten().enumerate() {
        let at = format!("spec.metrics[{i}]");
        let target = match m.type_.as_str() {
            "Resource" => m.resource.as_ref().map(|r| (&r.target, "resource")),
            "Pods" => m.pods.as_ref().map(|p| (&p.target, "pods")),
            "Object" => m.object.as_ref().map(|o| (&o.target, "object")),
            "External" => m.external.as_ref().map(|e| (&e.target, "external")),
            "ContainerResource" => m
                .container_resource
                .as_ref()
                .map(|c| (&c.target, "containerResource")),
            other => {
                errs.push(FieldError::not_supported(
                    format!("{at}.type"),
                    other,
                    &[
                        "ContainerResource",
                        "External",
                        "Object",
                        "Pods",
                        "Resource",
                    ],
                ));
                continue;
            }
        };
        let Some((target, field)) = target else {
            errs.push(FieldError::required(
                format!("{at}.{}", m.type_[..1].to_lowercase() + &m.type_[1..]),
                format!(
                    "must populate information for the given metric source type {}",
                    m.type_
                ),
            ));
            continue;
        };
        let t = format!("{at}.{field}.target");
        match target.type_.as_str() {
            "Utilization" => match target.average_utilization {
                Some(u) if u > 0 => {}
                _ => errs.push(FieldError::required(
                    format!("{t}.averageUtilization"),
                    "must be set and greater than 0 for type Utilization",
                )),
            },
            "Value" if target.value.is_none() => errs.push(FieldError::required(
                format!("{t}.value"),
                "must be set for type Value",
            )),
            "AverageValue" if target.average_value.is_none() => errs.push(FieldError::required(
                format!("{t}.averageValue"),
                "must be set for type AverageValue",
            )),
            "Value" | "AverageValue" => {}
            other => errs.push(FieldError::not_supported(
                format!("{t}.type"),
                other,
                &["AverageValue", "Utilization", "Value"],
            )),
        }
    }
}

fn validate_meta(rt: &ResourceType, obj: &Value, old: Option<&Value>, errs: &mut Errors) {
    let meta = &obj["metadata"];
    match meta["name"].as_str() {
        None | Some("") => errs.push(FieldError::required(
            "metadata.name",
            "name or generateName is required",
        )),
        Some(name) => {
            let check = match rt.id() {
                "Namespace" => names::dns1123_label(name),
                "Service" | "knative.Service" => names::dns1035_label(name),
                // RBAC names are path segments (`system:node` has a colon).
                "Role" | "ClusterRole" | "RoleBinding" | "ClusterRoleBinding" => {
                    names::path_segment(name)
                }
                _ => names::dns1123_subdomain(name).and_then(|()| {
                    if name.contains('/') || name.contains('%') {
                        Err("may not contain '/' or '%'".into())
                    } else {
                        Ok(())
                    }
                }),
            };
            if let Err(detail) = check {
                errs.push(FieldError::invalid("metadata.name", name, detail));
            }
        }
    }
    if let Some(labels) = meta["labels"].as_object() {
        for (k, v) in labels {
            if let Err(d) = names::qualified_name(k) {
                errs.push(FieldError::invalid("metadata.labels", k, d));
            }
            let v = v.as_str().unwrap_or_default();
            if let Err(d) = names::label_value(v) {
                errs.push(FieldError::invalid("metadata.labels".to_string(), v, d));
            }
        }
    }
    if let Some(annotations) = meta["annotations"].as_object() {
        let mut total = 0;
        for (k, v) in annotations {
            total += k.len() + v.as_str().map_or(0, str::len);
            if let Err(d) = names::qualified_name(&k.to_lowercase()) {
                errs.push(FieldError::invalid("metadata.annotations", k, d));
            }
        }
        if total > TOTAL_ANNOTATION_SIZE_LIMIT {
            errs.push(FieldError::new(
                crate::field::FieldErrorType::TooLong,
                "metadata.annotations",
                None,
                format!("may not be more than {TOTAL_ANNOTATION_SIZE_LIMIT} bytes"),
            ));
        }
    }
    if let Some(finalizers) = meta["finalizers"].as_array() {
        for (i, f) in finalizers.iter().enumerate() {
            let f = f.as_str().unwrap_or_default();
            if let Err(d) = names::qualified_name(f) {
                errs.push(FieldError::invalid(
                    format!("metadata.finalizers[{i}]"),
                    f,
                    d,
                ));
            }
        }
    }
    if let Some(old) = old {
        for field in ["name", "namespace", "uid", "creationTimestamp"] {
            if meta[field] != old["metadata"][field] && !meta[field].is_null() {
                errs.push(FieldError::invalid(
                    format!("metadata.{field}"),
                    meta[field].as_str().unwrap_or_default(),
                    "field is immutable",
                ));
            }
        }
    }
}

fn validate_selector_matches(
    sel: Option<&LabelSelector>,
    labels: Option<&BTreeMap<String, String>>,
    path: &str,
    errs: &mut Errors,
) {
    let Some(sel) = sel else {
        errs.push(FieldError::required("spec.selector", ""));
        return;
    };
    let empty = sel.match_labels.as_ref().is_none_or(|m| m.is_empty())
        && sel.match_expressions.as_ref().is_none_or(|m| m.is_empty());
    if empty {
        errs.push(FieldError::invalid(
            "spec.selector",
            "{}",
            "empty selector is invalid for deployment",
        ));
        return;
    }
    match selectors::LabelSelector::from_api(sel) {
        Ok(s) => {
            let empty = BTreeMap::new();
            if !s.matches(labels.unwrap_or(&empty)) {
                let rendered = format!("{:?}", labels.unwrap_or(&empty));
                errs.push(FieldError::invalid(
                    format!("{path}.metadata.labels"),
                    rendered,
                    "`selector` does not match template `labels`",
                ));
            }
        }
        Err(e) => errs.push(FieldError::invalid("spec.selector", "", e)),
    }
}

fn validate_resources(r: Option<&core::ResourceRequirements>, path: &str, errs: &mut Errors) {
    let Some(r) = r else { return };
    let mut parsed = BTreeMap::new();
    for (which, map) in [("limits", &r.limits), ("requests", &r.requests)] {
        for (name, q) in map.iter().flatten() {
            let field = format!("{path}.resources.{which}[{name}]");
            match quantity::parse(&q.0) {
                Ok(v) if v.millis() < 0 => errs.push(FieldError::invalid(
                    field,
                    &q.0,
                    "must be greater than or equal to 0",
                )),
                Ok(v) => {
                    parsed.insert((which, name.clone()), v);
                }
                Err(d) => errs.push(FieldError::invalid(field, &q.0, d)),
            }
        }
    }
    for ((which, name), req) in &parsed {
        if *which == "requests"
            && let Some(limit) = parsed.get(&("limits", name.clone()))
            && req > limit
        {
            errs.push(FieldError::invalid(
                format!("{path}.resources.requests"),
                name.to_string(),
                format!("must be less than or equal to {name} limit"),
            ));
        }
    }
}

fn validate_container(
    c: &core::Container,
    path: &str,
    names_seen: &mut BTreeSet<String>,
    errs: &mut Errors,
) {
    if c.name.is_empty() {
        errs.push(FieldError::required(format!("{path}.name"), ""));
    } else if let Err(d) = names::dns1123_label(&c.name) {
        errs.push(FieldError::invalid(format!("{path}.name"), &c.name, d));
    } else if !names_seen.insert(c.name.clone()) {
        errs.push(FieldError::duplicate(format!("{path}.name"), &c.name));
    }
    if c.image.as_deref().is_none_or(str::is_empty) {
        errs.push(FieldError::required(format!("{path}.image"), ""));
    }
    if let Some(p) = &c.image_pull_policy
        && !["Always", "IfNotPresent", "Never"].contains(&p.as_str())
    {
        errs.push(FieldError::not_supported(
            format!("{path}.imagePullPolicy"),
            p,
            &["Always", "IfNotPresent", "Never"],
        ));
    }
    for (i, port) in c.ports.iter().flatten().enumerate() {
        if !(1..=65535).contains(&port.container_port) {
            errs.push(FieldError::invalid(
                format!("{path}.ports[{i}].containerPort"),
                port.container_port,
                "must be between 1 and 65535, inclusive",
            ));
        }
    }
    for (i, env) in c.env.iter().flatten().enumerate() {
        if env.name.is_empty() {
            errs.push(FieldError::required(format!("{path}.env[{i}].name"), ""));
        }
    }
    validate_resources(c.resources.as_ref(), path, errs);
}

/// A pod's spec at `path`, with the annotations of its metadata (the
/// pod's, or its template's) at `meta_path`.
fn validate_pod_spec(
    spec: Option<&core::PodSpec>,
    meta: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>,
    path: &str,
    meta_path: &str,
    restart_policies: &[&str],
    errs: &mut Errors,
) {
    let Some(spec) = spec else {
        errs.push(FieldError::required(path, ""));
        return;
    };
    crate::apparmor::validate(
        meta.and_then(|m| m.annotations.as_ref()),
        spec,
        path,
        meta_path,
        errs,
    );
    if spec.containers.is_empty() {
        errs.push(FieldError::required(format!("{path}.containers"), ""));
    }
    let mut seen = BTreeSet::new();
    for (i, c) in spec.init_containers.iter().flatten().enumerate() {
        validate_container(c, &format!("{path}.initContainers[{i}]"), &mut seen, errs);
    }
    for (i, c) in spec.containers.iter().enumerate() {
        validate_container(c, &format!("{path}.containers[{i}]"), &mut seen, errs);
    }
    if let Some(rp) = &spec.restart_policy
        && !restart_policies.contains(&rp.as_str())
    {
        errs.push(FieldError::not_supported(
            format!("{path}.restartPolicy"),
            rp,
            restart_policies,
        ));
    }
    // A pod in a user namespace of its own shares none of the node's.
    if spec.host_users == Some(false) {
        for (field, shared) in [
            ("hostNetwork", spec.host_network),
            ("hostPID", spec.host_pid),
            ("hostIPC", spec.host_ipc),
        ] {
            if shared == Some(true) {
                errs.push(FieldError::forbidden(
                    format!("{path}.{field}"),
                    "when `hostUsers` is false",
                ));
            }
        }
    }
    let mut volumes = BTreeSet::new();
    for (i, v) in spec.volumes.iter().flatten().enumerate() {
        if let Err(d) = names::dns1123_label(&v.name) {
            errs.push(FieldError::invalid(
                format!("{path}.volumes[{i}].name"),
                &v.name,
                d,
            ));
        } else if !volumes.insert(v.name.clone()) {
            errs.push(FieldError::duplicate(
                format!("{path}.volumes[{i}].name"),
                &v.name,
            ));
        }
        file_modes(v, &format!("{path}.volumes[{i}]"), errs);
    }
    for (ci, c) in spec.containers.iter().enumerate() {
        for (mi, m) in c.volume_mounts.iter().flatten().enumerate() {
            if !volumes.contains(&m.name) {
                errs.push(FieldError::new(
                    crate::field::FieldErrorType::NotSupported,
                    format!("{path}.containers[{ci}].volumeMounts[{mi}].name"),
                    Some(format!("\"{}\"", m.name)),
                    "volume not found",
                ));
            }
        }
    }
    if let Some(g) = spec.termination_grace_period_seconds
        && g < 0
    {
        errs.push(FieldError::invalid(
            format!("{path}.terminationGracePeriodSeconds"),
            g,
            "must be greater than or equal to 0",
        ));
    }
    if let Some(d) = spec.active_deadline_seconds
        && d <= 0
    {
        errs.push(FieldError::invalid(
            format!("{path}.activeDeadlineSeconds"),
            d,
            "must be between 1 and 2147483647, inclusive",
        ));
    }
}

fn validate_pod(pod: &core::Pod, old: Option<&core::Pod>, errs: &mut Errors) {
    validate_pod_spec(
        pod.spec.as_ref(),
        Some(&pod.metadata),
        "spec",
        "metadata",
        &["Always", "OnFailure", "Never"],
        errs,
    );
    if let (Some(old), Some(new)) = (old.and_then(|o| o.spec.as_ref()), pod.spec.as_ref()) {
        // Only images, activeDeadlineSeconds and added tolerations may change.
        let mut normalized = old.clone();
        for (o, n) in normalized.containers.iter_mut().zip(&new.containers) {
            o.image = n.image.clone();
        }
        for (o, n) in normalized
            .init_containers
            .iter_mut()
            .flatten()
            .zip(new.init_containers.iter().flatten())
        {
            o.image = n.image.clone();
        }
        normalized.active_deadline_seconds = new.active_deadline_seconds;
        normalized.tolerations = new.tolerations.clone();
        normalized.termination_grace_period_seconds = new.termination_grace_period_seconds;
        if normalized.node_name.is_none() {
            normalized.node_name = new.node_name.clone();
        }
        if &normalized != new {
            errs.push(FieldError::forbidden(
                "spec",
                "pod updates may not change fields other than `spec.containers[*].image`,`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing tolerations),`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)",
            ));
        }
    }
}

fn validate_service(svc: &core::Service, old: Option<&core::Service>, errs: &mut Errors) {
    let Some(spec) = &svc.spec else { return };
    let types = ["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"];
    let ty = spec.type_.as_deref().unwrap_or("ClusterIP");
    if !types.contains(&ty) {
        errs.push(FieldError::not_supported("spec.type", ty, &types));
    }
    let ports = spec.ports.as_deref().unwrap_or_default();
    if ports.is_empty() && ty != "ExternalName" && spec.cluster_ip.as_deref() != Some("None") {
        errs.push(FieldError::required("spec.ports", ""));
    }
    let mut seen = BTreeSet::new();
    for (i, p) in ports.iter().enumerate() {
        if !(1..=65535).contains(&p.port) {
            errs.push(FieldError::invalid(
                format!("spec.ports[{i}].port"),
                p.port,
                "must be between 1 and 65535, inclusive",
            ));
        }
        match p.name.as_deref().filter(|n| !n.is_empty()) {
            Some(n) if !seen.insert(n.to_owned()) => {
                errs.push(FieldError::duplicate(format!("spec.ports[{i}].name"), n));
            }
            Some(_) => {}
            // Several ports must each be named.
            None if ports.len() > 1 => {
                errs.push(FieldError::required(format!("spec.ports[{i}].name"), ""))
            }
            None => {}
        }
    }
    if let (Some(old), Some(new_ip)) = (old.and_then(|o| o.spec.as_ref()), spec.cluster_ip.as_ref())
        && old.cluster_ip.as_ref().is_some_and(|ip| ip != new_ip)
    {
        errs.push(FieldError::invalid(
            "spec.clusterIPs[0]",
            new_ip,
            "may not change once set",
        ));
    }
}

fn validate_data_keys<'a>(keys: impl Iterator<Item = &'a String>, path: &str, errs: &mut Errors) {
    for k in keys {
        if let Err(d) = names::config_map_key(k) {
            errs.push(FieldError::invalid(path, k, d));
        }
    }
}

fn immutable_data_unchanged(old_immutable: Option<bool>, changed: bool, errs: &mut Errors) {
    if old_immutable == Some(true) && changed {
        errs.push(FieldError::forbidden(
            "data",
            "field is immutable when `immutable` is set",
        ));
    }
}

fn validate_config_map(cm: &core::ConfigMap, old: Option<&core::ConfigMap>, errs: &mut Errors) {
    validate_data_keys(cm.data.iter().flatten().map(|(k, _)| k), "data", errs);
    validate_data_keys(
        cm.binary_data.iter().flatten().map(|(k, _)| k),
        "binaryData",
        errs,
    );
    if let Some(old) = old {
        immutable_data_unchanged(
            old.immutable,
            old.data != cm.data || old.binary_data != cm.binary_data,
            errs,
        );
    }
}

fn validate_secret(s: &core::Secret, old: Option<&core::Secret>, errs: &mut Errors) {
    validate_data_keys(s.data.iter().flatten().map(|(k, _)| k), "data", errs);
    const ACCOUNT: &str = "kubernetes.io/service-account.name";
    if s.type_.as_deref() == Some("kubernetes.io/service-account-token")
        && s.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ACCOUNT))
            .is_none_or(String::is_empty)
    {
        errs.push(FieldError::required(
            format!("metadata.annotations[{ACCOUNT}]"),
            "",
        ));
    }
    if let Some(old) = old {
        immutable_data_unchanged(old.immutable, old.data != s.data, errs);
        if old.type_ != s.type_ {
            errs.push(FieldError::invalid(
                "type",
                s.type_.as_deref().unwrap_or_default(),
                "field is immutable",
            ));
        }
    }
}

fn non_negative(v: Option<i32>, field: &str, errs: &mut Errors) {
    if let Some(v) = v
        && v < 0
    {
        errs.push(FieldError::invalid(
            field,
            v,
            "must be greater than or equal to 0",
        ));
    }
}

fn selector_immutable(old: Option<&LabelSelector>, new: Option<&LabelSelector>, errs: &mut Errors) {
    if let Some(old) = old
        && Some(old) != new
    {
        errs.push(FieldError::invalid(
            "spec.selector",
            format!("{new:?}"),
            "field is immutable",
        ));
    }
}

/// The pod template of a Deployment, ReplicaSet or DaemonSet: its labels must
/// match the selector and its pods must restart `Always`.
fn validate_workload_template(
    selector: &LabelSelector,
    template: Option<&core::PodTemplateSpec>,
    errs: &mut Errors,
) {
    validate_selector_matches(
        Some(selector),
        template
            .and_then(|t| t.metadata.as_ref())
            .and_then(|m| m.labels.as_ref()),
        "spec.template",
        errs,
    );
    validate_pod_spec(
        template.and_then(|t| t.spec.as_ref()),
        template.and_then(|t| t.metadata.as_ref()),
        "spec.template.spec",
        "spec.template.metadata",
        &["Always"],
        errs,
    );
}

fn validate_deployment(d: &apps::Deployment, old: Option<&apps::Deployment>, errs: &mut Errors) {
    let Some(spec) = &d.spec else {
        errs.push(FieldError::required("spec", ""));
        return;
    };
    non_negative(spec.replicas, "spec.replicas", errs);
    validate_workload_template(&spec.selector, Some(&spec.template), errs);
    if let Some(strategy) = &spec.strategy {
        let t = strategy.type_.as_deref().unwrap_or("RollingUpdate");
        if !["RollingUpdate", "Recreate"].contains(&t) {
            errs.push(FieldError::not_supported(
                "spec.strategy.type",
                t,
                &["Recreate", "RollingUpdate"],
            ));
        }
        if t == "Recreate" && strategy.rolling_update.is_some() {
            errs.push(FieldError::forbidden(
                "spec.strategy.rollingUpdate",
                "may not be specified when strategy `type` is 'Recreate'",
            ));
        }
    }
    if let Some(old) = old.and_then(|o| o.spec.as_ref()) {
        selector_immutable(Some(&old.selector), Some(&spec.selector), errs);
    }
}

fn validate_replica_set(rs: &apps::ReplicaSet, old: Option<&apps::ReplicaSet>, errs: &mut Errors) {
    let Some(spec) = &rs.spec else {
        errs.push(FieldError::required("spec", ""));
        return;
    };
    non_negative(spec.replicas, "spec.replicas", errs);
    validate_workload_template(&spec.selector, spec.template.as_ref(), errs);
    if let Some(old) = old.and_then(|o| o.spec.as_ref()) {
        selector_immutable(Some(&old.selector), Some(&spec.selector), errs);
    }
}

fn validate_daemon_set(ds: &apps::DaemonSet, old: Option<&apps::DaemonSet>, errs: &mut Errors) {
    let Some(spec) = &ds.spec else {
        errs.push(FieldError::required("spec", ""));
        return;
    };
    validate_workload_template(&spec.selector, Some(&spec.template), errs);
    if let Some(old) = old.and_then(|o| o.spec.as_ref()) {
        selector_immutable(Some(&old.selector), Some(&spec.selector), errs);
    }
}

fn validate_stateful_set(
    sts: &apps::StatefulSet,
    old: Option<&apps::StatefulSet>,
    errs: &mut Errors,
) {
    let Some(spec) = &sts.spec else {
        errs.push(FieldError::required("spec", ""));
        return;
    };
    // The containers may mount the claims as volumes: check the template as
    // the pods will be, with a volume per claim template.
    let mut template = spec.template.clone();
    if let Some(pod) = template.spec.as_mut() {
        let volumes = pod.volumes.get_or_insert_with(Vec::new);
        for t in spec.volume_claim_templates.iter().flatten() {
            let name = t.metadata.name.clone().unwrap_or_default();
            if !volumes.iter().any(|v| v.name == name) {
                volumes.push(core::Volume {
                    name: name.clone(),
                    persistent_volume_claim: Some(core::PersistentVolumeClaimVolumeSource {
                        claim_name: name,
                        read_only: None,
                    }),
                    ..Default::default()
                });
            }
        }
    }
    validate_workload_template(&spec.selector, Some(&template), errs);
    non_negative(spec.replicas, "spec.replicas", errs);
    if let Some(policy) = &spec.pod_management_policy
        && !["OrderedReady", "Parallel"].contains(&policy.as_str())
    {
        errs.push(FieldError::not_supported(
            "spec.podManagementPolicy",
            policy,
            &["OrderedReady", "Parallel"],
        ));
    }
    if let Some(kind) = spec.update_strategy.as_ref().and_then(|s| s.type_.as_ref())
        && !["RollingUpdate", "OnDelete"].contains(&kind.as_str())
    {
        errs.push(FieldError::not_supported(
            "spec.updateStrategy.type",
            kind,
            &["RollingUpdate", "OnDelete"],
        ));
    }
    non_negative(
        spec.update_strategy
            .as_ref()
            .and_then(|s| s.rolling_update.as_ref())
            .and_then(|r| r.partition),
        "spec.updateStrategy.rollingUpdate.partition",
        errs,
    );
    let mut claims = BTreeSet::new();
    for (i, t) in spec.volume_claim_templates.iter().flatten().enumerate() {
        let path = format!("spec.volumeClaimTemplates[{i}]");
        let name = t.metadata.name.clone().unwrap_or_default();
        if let Err(e) = names::dns1123_subdomain(&name) {
            errs.push(FieldError::invalid(
                format!("{path}.metadata.name"),
                &name,
                e,
            ));
        } else if !claims.insert(name.clone()) {
            errs.push(FieldError::duplicate(
                format!("{path}.metadata.name"),
                &name,
            ));
        }
        storage::validate_claim_spec(t.spec.as_ref(), &format!("{path}.spec"), errs);
    }
    if let Some(p) = &spec.persistent_volume_claim_retention_policy {
        for (field, v) in [
            ("whenDeleted", &p.when_deleted),
            ("whenScaled", &p.when_scaled),
        ] {
            if let Some(v) = v
                && !["Retain", "Delete"].contains(&v.as_str())
            {
                errs.push(FieldError::not_supported(
                    format!("spec.persistentVolumeClaimRetentionPolicy.{field}"),
                    v,
                    &["Retain", "Delete"],
                ));
            }
        }
    }
    if let Some(old) = old.and_then(|o| o.spec.as_ref()) {
        selector_immutable(Some(&old.selector), Some(&spec.selector), errs);
        // As Kubernetes: only the replicas, template, update strategy,
        // ordinals, retention policy and minReadySeconds may change.
        let frozen = |s: &apps::StatefulSetSpec| {
            (
                s.service_name.clone(),
                s.pod_management_policy.clone(),
                s.volume_claim_templates.clone(),
            )
        };
        if frozen(old) != frozen(spec) {
            errs.push(FieldError::forbidden(
                "spec",
                "updates to statefulset spec for fields other than 'replicas', 'ordinals', 'template', 'updateStrategy', 'revisionHistoryLimit', 'persistentVolumeClaimRetentionPolicy' and 'minReadySeconds' are forbidden",
            ));
        }
    }
}

fn validate_job_spec(spec: &batch::JobSpec, path: &str, errs: &mut Errors) {
    non_negative(spec.parallelism, &format!("{path}.parallelism"), errs);
    non_negative(spec.completions, &format!("{path}.completions"), errs);
    non_negative(spec.backoff_limit, &format!("{path}.backoffLimit"), errs);
    validate_pod_spec(
        spec.template.spec.as_ref(),
        spec.template.metadata.as_ref(),
        &format!("{path}.template.spec"),
        &format!("{path}.template.metadata"),
        &["OnFailure", "Never"],
        errs,
    );
    if let Some(mode) = &spec.completion_mode {
        if !["NonIndexed", "Indexed"].contains(&mode.as_str()) {
            errs.push(FieldError::not_supported(
                format!("{path}.completionMode"),
                mode,
                &["NonIndexed", "Indexed"],
            ));
        }
        if mode == "Indexed" && spec.completions.is_none() {
            errs.push(FieldError::required(
                format!("{path}.completions"),
                "when completion mode is Indexed",
            ));
        }
    }
}

fn validate_job(job: &batch::Job, old: Option<&batch::Job>, errs: &mut Errors) {
    let Some(spec) = &job.spec else {
        errs.push(FieldError::required("spec", ""));
        return;
    };
    validate_job_spec(spec, "spec", errs);
    if let Some(old) = old.and_then(|o| o.spec.as_ref()) {
        selector_immutable(old.selector.as_ref(), spec.selector.as_ref(), errs);
        if old.completions != spec.completions && old.completion_mode.as_deref() != Some("Indexed")
        {
            errs.push(FieldError::invalid(
                "spec.completions",
                spec.completions.unwrap_or_default(),
                "field is immutable",
            ));
        }
    }
}

fn validate_cron_job(cj: &batch::CronJob, _old: Option<&batch::CronJob>, errs: &mut Errors) {
    let Some(spec) = &cj.spec else {
        errs.push(FieldError::required("spec", ""));
        return;
    };
    if spec.schedule.trim().is_empty() {
        errs.push(FieldError::required("spec.schedule", ""));
    } else if !cron_schedule_plausible(&spec.schedule) {
        errs.push(FieldError::invalid(
            "spec.schedule",
            &spec.schedule,
            "unparseable cron schedule",
        ));
    }
    if let Some(p) = &spec.concurrency_policy
        && !["Allow", "Forbid", "Replace"].contains(&p.as_str())
    {
        errs.push(FieldError::not_supported(
            "spec.concurrencyPolicy",
            p,
            &["Allow", "Forbid", "Replace"],
        ));
    }
    if let Some(job_spec) = spec.job_template.spec.as_ref() {
        validate_job_spec(job_spec, "spec.jobTemplate.spec", errs);
    }
}

/// User-defined classes stay at or below one billion; the system classes
/// above that belong to the cluster. Value and preemption policy are immutable.
fn validate_priority_class(obj: &Value, old: Option<&Value>, errs: &mut Errors) {
    const HIGHEST_USER_DEFINABLE_PRIORITY: i64 = 1_000_000_000;
    let name = obj["metadata"]["name"].as_str().unwrap_or_default();
    match obj["value"].as_i64() {
        None => errs.push(FieldError::required("value", "")),
        Some(v) if v > HIGHEST_USER_DEFINABLE_PRIORITY && !name.starts_with("system-") => errs
            .push(FieldError::invalid(
                "value",
                v,
                format!("must be no greater than {HIGHEST_USER_DEFINABLE_PRIORITY}"),
            )),
        _ => {}
    }
    let policy = obj["preemptionPolicy"]
        .as_str()
        .unwrap_or("PreemptLowerPriority");
    if !["PreemptLowerPriority", "Never"].contains(&policy) {
        errs.push(FieldError::not_supported(
            "preemptionPolicy",
            policy,
            &["PreemptLowerPriority", "Never"],
        ));
    }
    if let Some(old) = old {
        for field in ["value", "preemptionPolicy"] {
            if obj[field] != old[field] {
                errs.push(FieldError::forbidden(
                    field,
                    "may not be changed in an update.",
                ));
            }
        }
    }
}

/// Five fields or an `@` macro; the controller parses the schedule fully.
fn cron_schedule_plausible(s: &str) -> bool {
    let s = s.trim();
    let s = s
        .strip_prefix("CRON_TZ=")
        .or_else(|| s.strip_prefix("TZ="))
        .map_or(s, |rest| {
            rest.split_once(' ').map_or("", |(_, sched)| sched)
        });
    if let Some(m) = s.strip_prefix('@') {
        return [
            "yearly", "annually", "monthly", "weekly", "daily", "midnight", "hourly",
        ]
        .contains(&m);
    }
    let fields: Vec<_> = s.split_whitespace().collect();
    fields.len() == 5
        && fields.iter().all(|f| {
            f.bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'*' | b'/' | b',' | b'-' | b'?'))
        })
}

/// The file modes of a configMap, secret, downwardAPI or projected volume
/// (`defaultMode`, each item's `mode`): permission bits only.
fn file_modes(v: &core::Volume, path: &str, errs: &mut Errors) {
    let mut check = |field: String, mode: Option<i32>| {
        if let Some(m) = mode
            && !(0..=0o777).contains(&m)
        {
            errs.push(FieldError::invalid(
                field,
                m,
                "must be a number between 0 and 0777 (octal), both inclusive",
            ));
        }
    };
    let keyed = |items: Option<&Vec<core::KeyToPath>>| {
        items
            .into_iter()
            .flatten()
            .map(|i| i.mode)
            .enumerate()
            .collect::<Vec<_>>()
    };
    if let Some(c) = &v.config_map {
        check(format!("{path}.configMap.defaultMode"), c.default_mode);
        for (j, m) in keyed(c.items.as_ref()) {
            check(format!("{path}.configMap.items[{j}].mode"), m);
        }
    }
    if let Some(sec) = &v.secret {
        check(format!("{path}.secret.defaultMode"), sec.default_mode);
        for (j, m) in keyed(sec.items.as_ref()) {
            check(format!("{path}.secret.items[{j}].mode"), m);
        }
    }
    if let Some(d) = &v.downward_api {
        check(format!("{path}.downwardAPI.defaultMode"), d.default_mode);
        for (j, item) in d.items.iter().flatten().enumerate() {
            check(format!("{path}.downwardAPI.items[{j}].mode"), item.mode);
        }
    }
    if let Some(p) = &v.projected {
        check(format!("{path}.projected.defaultMode"), p.default_mode);
        for (k, src) in p.sources.iter().flatten().enumerate() {
            let at = format!("{path}.projected.sources[{k}]");
            if let Some(c) = &src.config_map {
                for (j, m) in keyed(c.items.as_ref()) {
                    check(format!("{at}.configMap.items[{j}].mode"), m);
                }
            }
            if let Some(sec) = &src.secret {
                for (j, m) in keyed(sec.items.as_ref()) {
                    check(format!("{at}.secret.items[{j}].mode"), m);
                }
            }
            if let Some(d) = &src.downward_api {
                for (j, item) in d.items.iter().flatten().enumerate() {
                    check(format!("{at}.downwardAPI.items[{j}].mode"), item.mode);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::lookup;
    use serde_json::json;

    fn errors(plural: &str, group: &str, obj: Value) -> Vec<String> {
        let rt = lookup(group, "v1", plural).unwrap();
        validate(rt, &obj, None)
            .iter()
            .map(|e| e.to_string())
            .collect()
    }

    #[test]
    fn deployment_selector_must_match_template() {
        let errs = errors(
            "deployments",
            "apps",
            json!({"metadata": {"name": "web"}, "spec": {"selector": {"matchLabels": {"app": "web"}},
                "template": {"metadata": {"labels": {"app": "other"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}}}}),
        );
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].starts_with("spec.template.metadata.labels: Invalid value"),
            "{errs:?}"
        );
    }

    #[test]
    fn service_ports_are_named_when_there_are_several() {
        let svc = |ports: Value| {
            errors(
                "services",
                "",
                json!({"metadata": {"name": "dns"}, "spec": {"ports": ports}}),
            )
        };
        assert_eq!(
            svc(json!([{"name": "dns", "port": 53, "protocol": "UDP"},
                       {"name": "dns-tcp", "port": 53, "protocol": "TCP"}])),
            Vec::<String>::new()
        );
        assert_eq!(svc(json!([{"port": 80}])), Vec::<String>::new());
        let unnamed = svc(json!([{"name": "a", "port": 80}, {"port": 81}]));
        assert_eq!(unnamed.len(), 1, "{unnamed:?}");
        assert!(
            unnamed[0].starts_with("spec.ports[1].name: Required value"),
            "{unnamed:?}"
        );
        let twice = svc(json!([{"name": "a", "port": 80}, {"name": "a", "port": 81}]));
        assert!(
            twice[0].starts_with("spec.ports[1].name: Duplicate value"),
            "{twice:?}"
        );
    }

    #[test]
    fn pod_rules() {
        let errs = errors(
            "pods",
            "",
            json!({"metadata": {"name": "Bad_Name", "labels": {"ok": "bad value"}},
                "spec": {"restartPolicy": "Sometimes", "containers": [
                    {"name": "c", "image": "i", "resources": {"limits": {"memory": "12Qi"}}},
                    {"name": "c"}]}}),
        );
        let fields: Vec<_> = errs.iter().map(|e| e.split(':').next().unwrap()).collect();
        assert_eq!(
            fields,
            [
                "metadata.name",
                "metadata.labels",
                "spec.containers[0].resources.limits[memory]",
                "spec.containers[1].name",
                "spec.containers[1].image",
                "spec.restartPolicy"
            ],
            "{errs:?}"
        );
    }

    #[test]
    fn a_pod_in_its_own_user_namespace_shares_no_host_namespace() {
        let errs = errors(
            "pods",
            "",
            json!({"metadata": {"name": "p"}, "spec": {"hostUsers": false, "hostNetwork": true,
                "hostPID": true, "containers": [{"name": "c", "image": "i"}]}}),
        );
        assert_eq!(
            errs,
            [
                "spec.hostNetwork: Forbidden: when `hostUsers` is false",
                "spec.hostPID: Forbidden: when `hostUsers` is false"
            ],
            "{errs:?}"
        );
    }

    #[test]
    fn volume_file_modes_are_permission_bits() {
        let errs = errors(
            "pods",
            "",
            json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "i"}],
            "volumes": [
                {"name": "s", "secret": {"secretName": "x", "defaultMode": 0o400,
                    "items": [{"key": "k", "path": "k", "mode": 0o1000}]}},
                {"name": "p", "projected": {"defaultMode": -1, "sources": [
                    {"configMap": {"name": "c", "items": [{"key": "k", "path": "k", "mode": 0o777}]}}]}},
            ]}}),
        );
        assert_eq!(
            errs,
            [
                "spec.volumes[0].secret.items[0].mode: Invalid value: 512: must be a number between 0 and 0777 (octal), both inclusive",
                "spec.volumes[1].projected.defaultMode: Invalid value: -1: must be a number between 0 and 0777 (octal), both inclusive"
            ],
            "{errs:?}"
        );
    }

    #[test]
    fn pod_spec_is_immutable_except_images() {
        let rt = lookup("", "v1", "pods").unwrap();
        let old = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "a"}]}});
        let image = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "b"}]}});
        assert!(validate(rt, &image, Some(&old)).is_empty());
        let env = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "a", "env": [{"name": "X"}]}]}});
        let errs = validate(rt, &env, Some(&old));
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].field, "spec");
    }

    #[test]
    fn cron_schedules() {
        assert!(cron_schedule_plausible("*/5 * * * *"));
        assert!(cron_schedule_plausible("CRON_TZ=Europe/Paris 0 9 * * 1-5"));
        assert!(cron_schedule_plausible("@hourly"));
        assert!(!cron_schedule_plausible("every minute"));
    }
}
