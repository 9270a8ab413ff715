//! AppArmor profiles of a pod's containers, read as Kubernetes reads them:
//! the container's `securityContext.appArmorProfile`, else the pod's, else
//! the deprecated annotation `container.apparmor.security.beta.kubernetes.io/NAME`.
//! The API server validates them here; the node agent asks here which
//! profile a container runs with and whether a pod needs AppArmor at all.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1 as core;

use crate::field::{Errors, FieldError};

/// The deprecated per-container annotation (the container's name follows).
pub const ANNOTATION_PREFIX: &str = "container.apparmor.security.beta.kubernetes.io/";

/// The longest `localhostProfile` (PATH_MAX - 1).
const MAX_LOCALHOST_PROFILE: usize = 4095;

/// An AppArmor profile a pod asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Profile {
    /// The container runtime's default profile.
    RuntimeDefault,
    /// No AppArmor enforcement.
    Unconfined,
    /// A profile loaded on the node, by name.
    Localhost(String),
}

impl Profile {
    /// The profile a valid `appArmorProfile` field names.
    pub fn from_field(p: &core::AppArmorProfile) -> Option<Self> {
        match p.type_.as_str() {
            "RuntimeDefault" => Some(Self::RuntimeDefault),
            "Unconfined" => Some(Self::Unconfined),
            "Localhost" => p.localhost_profile.clone().map(Self::Localhost),
            _ => None,
        }
    }

    /// The profile an annotation's value names (`runtime/default`,
    /// `unconfined`, `localhost/NAME`).
    pub fn from_annotation(value: &str) -> Result<Self, String> {
        match value {
            "runtime/default" => Ok(Self::RuntimeDefault),
            "unconfined" => Ok(Self::Unconfined),
            _ => match value.strip_prefix("localhost/") {
                Some(name) if !name.is_empty() => Ok(Self::Localhost(name.to_owned())),
                _ => Err(format!("invalid AppArmor profile name: {value:?}")),
            },
        }
    }

    /// The annotation's value for this profile (`runtime/default`,
    /// `unconfined`, `localhost/NAME`).
    pub fn annotation(&self) -> String {
        match self {
            Self::RuntimeDefault => "runtime/default".into(),
            Self::Unconfined => "unconfined".into(),
            Self::Localhost(name) => format!("localhost/{name}"),
        }
    }

    /// The `appArmorProfile` field for this profile.
    pub fn field(&self) -> core::AppArmorProfile {
        core::AppArmorProfile {
            type_: self.type_name().into(),
            localhost_profile: match self {
                Self::Localhost(name) => Some(name.clone()),
                _ => None,
            },
        }
    }

    /// The field's `type` for this profile.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::RuntimeDefault => "RuntimeDefault",
            Self::Unconfined => "Unconfined",
            Self::Localhost(_) => "Localhost",
        }
    }
}

fn field_of(sc: Option<&core::SecurityContext>) -> Option<&core::AppArmorProfile> {
    sc.and_then(|s| s.app_armor_profile.as_ref())
}

fn pod_field(spec: &core::PodSpec) -> Option<&core::AppArmorProfile> {
    spec.security_context
        .as_ref()
        .and_then(|s| s.app_armor_profile.as_ref())
}

/// The profile `container` of the pod runs with, if the pod names one:
/// the container's field, the pod's field, then the annotation.
pub fn of_container(
    annotations: Option<&BTreeMap<String, String>>,
    spec: &core::PodSpec,
    container: &core::Container,
) -> Option<Profile> {
    field_of(container.security_context.as_ref())
        .or_else(|| pod_field(spec))
        .and_then(Profile::from_field)
        .or_else(|| {
            annotations
                .and_then(|a| a.get(&format!("{ANNOTATION_PREFIX}{}", container.name)))
                .and_then(|v| Profile::from_annotation(v).ok())
        })
}

/// Whether the pod asks for AppArmor enforcement anywhere (a profile other
/// than `Unconfined`): the kubelet refuses such a pod on a host without
/// AppArmor.
pub fn required(annotations: Option<&BTreeMap<String, String>>, spec: &core::PodSpec) -> bool {
    let enforcing = |p: &core::AppArmorProfile| p.type_ != "Unconfined";
    pod_field(spec).is_some_and(enforcing)
        || containers(spec)
            .any(|(_, _, c)| field_of(c.security_context.as_ref()).is_some_and(enforcing))
        || annotations
            .into_iter()
            .flatten()
            .any(|(k, v)| k.starts_with(ANNOTATION_PREFIX) && v != "unconfined")
}

/// Kubernetes' rule for a new pod's AppArmor settings (its version-skew
/// strategy, on create only): a container with a profile in a field but
/// no annotation gets the annotation, and one with an annotation but no
/// field of its own gets the field, unless the pod's field already says
/// the same. Readers of either form then see the profile.
pub fn sync_on_create(pod: &mut serde_json::Value) {
    use serde_json::{Value, json};
    let profile_of = |p: &Value| {
        serde_json::from_value::<core::AppArmorProfile>(p.clone())
            .ok()
            .and_then(|p| Profile::from_field(&p))
    };
    let pod_profile = pod["spec"]["securityContext"]["appArmorProfile"].clone();
    let annotations = pod["metadata"]["annotations"].clone();
    let mut added = Vec::new();
    for list in ["initContainers", "containers", "ephemeralContainers"] {
        let Some(containers) = pod["spec"][list].as_array_mut() else {
            continue;
        };
        for c in containers {
            let key = format!(
                "{ANNOTATION_PREFIX}{}",
                c["name"].as_str().unwrap_or_default()
            );
            let own = &c["securityContext"]["appArmorProfile"];
            match annotations[&key].as_str() {
                None => {
                    let from = if own.is_null() { &pod_profile } else { own };
                    if let Some(p) = profile_of(from) {
                        added.push((key, p.annotation()));
                    }
                }
                Some(value) if own.is_null() => {
                    // An invalid value is not copied (validation names it).
                    let field = match Profile::from_annotation(value) {
                        Ok(Profile::Localhost(name)) if name.trim() != name => continue,
                        Ok(p) => json!(p.field()),
                        Err(_) => continue,
                    };
                    if field != pod_profile {
                        if !c["securityContext"].is_object() {
                            c["securityContext"] = json!({});
                        }
                        c["securityContext"]["appArmorProfile"] = field;
                    }
                }
                Some(_) => {}
            }
        }
    }
    if !added.is_empty() {
        if !pod["metadata"]["annotations"].is_object() {
            pod["metadata"]["annotations"] = json!({});
        }
        for (key, value) in added {
            pod["metadata"]["annotations"][key] = Value::String(value);
        }
    }
}

/// Kubernetes' warnings for the deprecated annotations of a new pod or of
/// a workload's pod template (`kind` is the object's kind).
pub fn deprecation_warnings(kind: &str, obj: &serde_json::Value) -> Vec<String> {
    let (meta, path) = match kind {
        "Pod" => (&obj["metadata"], "metadata"),
        "Deployment" | "ReplicaSet" | "DaemonSet" | "StatefulSet" | "Job" => (
            &obj["spec"]["template"]["metadata"],
            "spec.template.metadata",
        ),
        "CronJob" => (
            &obj["spec"]["jobTemplate"]["spec"]["template"]["metadata"],
            "spec.jobTemplate.spec.template.metadata",
        ),
        _ => return Vec::new(),
    };
    meta["annotations"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, _)| k.starts_with(ANNOTATION_PREFIX))
        .map(|(k, _)| {
            format!(
                "{path}.annotations[{k}]: deprecated since v1.30; use the \"appArmorProfile\" field instead"
            )
        })
        .collect()
}

/// Every container of the pod with its list's field name and index.
fn containers(
    spec: &core::PodSpec,
) -> impl Iterator<Item = (&'static str, usize, &core::Container)> {
    let init = spec.init_containers.iter().flatten().enumerate();
    let main = spec.containers.iter().enumerate();
    init.map(|(i, c)| ("initContainers", i, c))
        .chain(main.map(|(i, c)| ("containers", i, c)))
}

/// Checks one `appArmorProfile` field at `path`.
fn validate_field(p: &core::AppArmorProfile, path: &str, errs: &mut Errors) {
    let localhost = format!("{path}.localhostProfile");
    match p.type_.as_str() {
        "Localhost" => match &p.localhost_profile {
            None => errs.push(FieldError::required(
                localhost,
                "must be set when AppArmor type is Localhost",
            )),
            Some(name) if name.trim() != name => errs.push(FieldError::invalid(
                localhost,
                name,
                "must not be padded with whitespace",
            )),
            Some(name) if name.is_empty() => errs.push(FieldError::required(
                localhost,
                "must be set when AppArmor type is Localhost",
            )),
            Some(name) if name.len() > MAX_LOCALHOST_PROFILE => errs.push(FieldError::invalid(
                localhost,
                name,
                format!("may not be more than {MAX_LOCALHOST_PROFILE} bytes"),
            )),
            Some(_) => {}
        },
        "RuntimeDefault" | "Unconfined" => {
            if let Some(name) = &p.localhost_profile {
                errs.push(FieldError::invalid(
                    localhost,
                    name,
                    "can only be set when AppArmor type is Localhost",
                ));
            }
        }
        "" => errs.push(FieldError::required(
            format!("{path}.type"),
            "type is required when appArmorProfile is set",
        )),
        other => errs.push(FieldError::not_supported(
            format!("{path}.type"),
            other,
            &["Localhost", "RuntimeDefault", "Unconfined"],
        )),
    }
}

/// Validates a pod's (or pod template's) AppArmor settings: the fields of
/// the pod and its containers at `spec_path`, and the annotations at
/// `meta_path`, which must name a container, a valid profile, and agree
/// with the field the container would otherwise take its profile from.
pub fn validate(
    annotations: Option<&BTreeMap<String, String>>,
    spec: &core::PodSpec,
    spec_path: &str,
    meta_path: &str,
    errs: &mut Errors,
) {
    if let Some(p) = pod_field(spec) {
        validate_field(
            p,
            &format!("{spec_path}.securityContext.appArmorProfile"),
            errs,
        );
    }
    for (list, i, c) in containers(spec) {
        if let Some(p) = field_of(c.security_context.as_ref()) {
            validate_field(
                p,
                &format!("{spec_path}.{list}[{i}].securityContext.appArmorProfile"),
                errs,
            );
        }
    }
    for (key, value) in annotations.into_iter().flatten() {
        let Some(name) = key.strip_prefix(ANNOTATION_PREFIX) else {
            continue;
        };
        let at = format!("{meta_path}.annotations[{key}]");
        let Some((list, i, c)) = containers(spec).find(|(_, _, c)| c.name == name) else {
            errs.push(FieldError::invalid(at, name, "container not found"));
            continue;
        };
        let annotated = match Profile::from_annotation(value) {
            Ok(p) => p,
            Err(e) => {
                errs.push(FieldError::invalid(at, value, e));
                continue;
            }
        };
        let (field, field_path) = match field_of(c.security_context.as_ref()) {
            Some(p) => (
                p,
                format!("{spec_path}.{list}[{i}].securityContext.appArmorProfile"),
            ),
            None => match pod_field(spec) {
                Some(p) => (p, format!("{spec_path}.securityContext.appArmorProfile")),
                None => continue,
            },
        };
        if field.type_ != annotated.type_name() {
            errs.push(FieldError::forbidden(
                format!("{field_path}.type"),
                "apparmor type in annotation and field must match",
            ));
        } else if let Profile::Localhost(name) = &annotated
            && field.localhost_profile.as_deref() != Some(name.as_str())
        {
            errs.push(FieldError::forbidden(
                format!("{field_path}.localhostProfile"),
                "apparmor profile in annotation and field must match",
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(v: serde_json::Value) -> core::Pod {
        serde_json::from_value(v).unwrap()
    }

    fn errors(p: &core::Pod) -> Vec<String> {
        let mut errs = Errors::default();
        validate(
            p.metadata.annotations.as_ref(),
            p.spec.as_ref().unwrap(),
            "spec",
            "metadata",
            &mut errs,
        );
        errs.0.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn a_container_takes_its_own_field_then_the_pods_then_the_annotation() {
        let p = pod(json!({
        "metadata": {"name": "p", "annotations": {
            "container.apparmor.security.beta.kubernetes.io/b": "localhost/k8s-b",
            "container.apparmor.security.beta.kubernetes.io/c": "unconfined"}},
        "spec": {
            "securityContext": {"appArmorProfile": {"type": "RuntimeDefault"}},
            "containers": [
                {"name": "a", "image": "i", "securityContext": {"appArmorProfile": {"type": "Localhost", "localhostProfile": "k8s-a"}}},
                {"name": "b", "image": "i"},
            ]}}));
        let spec = p.spec.as_ref().unwrap();
        let of =
            |i: usize| of_container(p.metadata.annotations.as_ref(), spec, &spec.containers[i]);
        assert_eq!(of(0), Some(Profile::Localhost("k8s-a".into())));
        // The pod's field comes before the annotation.
        assert_eq!(of(1), Some(Profile::RuntimeDefault));
        assert!(required(p.metadata.annotations.as_ref(), spec));
        let unconfined = pod(json!({"metadata": {"name": "p", "annotations": {
                "container.apparmor.security.beta.kubernetes.io/a": "unconfined"}},
            "spec": {"containers": [{"name": "a", "image": "i"}]}}));
        assert!(!required(
            unconfined.metadata.annotations.as_ref(),
            unconfined.spec.as_ref().unwrap()
        ));
    }

    #[test]
    fn a_new_pod_gets_each_profile_as_field_and_annotation() {
        let mut p = json!({
        "metadata": {"name": "p", "annotations": {
            "container.apparmor.security.beta.kubernetes.io/b": "localhost/k8s-b",
            "container.apparmor.security.beta.kubernetes.io/c": "runtime/default"}},
        "spec": {
            "securityContext": {"appArmorProfile": {"type": "RuntimeDefault"}},
            "containers": [
                {"name": "a", "image": "i", "securityContext": {"appArmorProfile": {"type": "Unconfined"}}},
                {"name": "b", "image": "i"},
                {"name": "c", "image": "i"},
                {"name": "d", "image": "i"},
            ]}});
        sync_on_create(&mut p);
        let annotation =
            |c: &str| p["metadata"]["annotations"][format!("{ANNOTATION_PREFIX}{c}")].clone();
        assert_eq!(annotation("a"), "unconfined");
        assert_eq!(annotation("d"), "runtime/default");
        let field =
            |i: usize| p["spec"]["containers"][i]["securityContext"]["appArmorProfile"].clone();
        assert_eq!(
            field(1),
            json!({"type": "Localhost", "localhostProfile": "k8s-b"})
        );
        // The same as the pod's: not copied.
        assert!(field(2).is_null());
        assert!(field(3).is_null());
    }

    #[test]
    fn the_annotations_are_deprecated_with_kubernetes_words() {
        let deployment = json!({"spec": {"template": {"metadata": {"annotations": {
            "container.apparmor.security.beta.kubernetes.io/web": "runtime/default",
            "other": "x"}}}}});
        assert_eq!(
            deprecation_warnings("Deployment", &deployment),
            [
                "spec.template.metadata.annotations[container.apparmor.security.beta.kubernetes.io/web]: deprecated since v1.30; use the \"appArmorProfile\" field instead"
            ]
        );
        assert!(deprecation_warnings("Service", &deployment).is_empty());
    }

    #[test]
    fn fields_and_annotations_are_validated_as_kubernetes_does() {
        let p = pod(json!({
        "metadata": {"name": "p", "annotations": {
            "container.apparmor.security.beta.kubernetes.io/a": "localhost/other",
            "container.apparmor.security.beta.kubernetes.io/b": "runtime/default",
            "container.apparmor.security.beta.kubernetes.io/ghost": "runtime/default",
            "container.apparmor.security.beta.kubernetes.io/c": "strict"}},
        "spec": {
            "securityContext": {"appArmorProfile": {"type": "Unconfined"}},
            "containers": [
                {"name": "a", "image": "i", "securityContext": {"appArmorProfile": {"type": "Localhost", "localhostProfile": "mine"}}},
                {"name": "b", "image": "i"},
                {"name": "c", "image": "i", "securityContext": {"appArmorProfile": {"type": "Localhost"}}},
                {"name": "d", "image": "i", "securityContext": {"appArmorProfile": {"type": "Strict"}}},
            ]}}));
        assert_eq!(
            errors(&p),
            [
                "spec.containers[2].securityContext.appArmorProfile.localhostProfile: Required value: must be set when AppArmor type is Localhost",
                "spec.containers[3].securityContext.appArmorProfile.type: Unsupported value: \"Strict\": supported values: \"Localhost\", \"RuntimeDefault\", \"Unconfined\"",
                "spec.containers[0].securityContext.appArmorProfile.localhostProfile: Forbidden: apparmor profile in annotation and field must match",
                "spec.securityContext.appArmorProfile.type: Forbidden: apparmor type in annotation and field must match",
                "metadata.annotations[container.apparmor.security.beta.kubernetes.io/c]: Invalid value: \"strict\": invalid AppArmor profile name: \"strict\"",
                "metadata.annotations[container.apparmor.security.beta.kubernetes.io/ghost]: Invalid value: \"ghost\": container not found",
            ]
        );
    }
}
