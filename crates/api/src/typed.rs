//! Decoding request bodies into the `k8s-openapi` types: type errors with the
//! field path, unknown-field detection for `fieldValidation`, and the canonical
//! JSON form that is stored.

use k8s_openapi::api::{
    apps::v1 as apps, autoscaling::v2 as autoscaling, batch::v1 as batch,
    coordination::v1 as coordination, core::v1 as core, discovery::v1 as discovery,
    networking::v1 as networking, node::v1 as node, policy::v1 as policy, rbac::v1 as rbac,
    scheduling::v1 as scheduling,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::gateway_api as gateway;
use crate::knative;
use crate::registry::ResourceType;

/// A body that does not decode into its kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct DecodeError {
    /// Dotted field path such as `spec.replicas` (empty for the top level).
    pub path: String,
    pub message: String,
}

/// The decoded object in canonical form plus the unknown fields it had.
#[derive(Debug)]
pub struct Decoded {
    pub object: Value,
    /// Dotted paths of fields the kind does not have, e.g. `spec.replica`.
    pub unknown_fields: Vec<String>,
}

fn round_trip<T: DeserializeOwned + Serialize>(value: &Value) -> Result<Value, DecodeError> {
    serde_json::to_value(decode_as::<T>(value)?).map_err(|e| DecodeError {
        path: String::new(),
        message: e.to_string(),
    })
}

macro_rules! decode_kind {
    ($rt:expr, $value:expr, { $($kind:literal => $ty:ty),* $(,)? }) => {
        match $rt.id() {
            $($kind => round_trip::<$ty>($value),)*
            other => Err(DecodeError { path: "kind".into(), message: format!("no codec for kind {other}") }),
        }
    };
}

/// Decodes `value` as an object of `rt`'s kind.
pub fn decode(rt: &ResourceType, value: &Value) -> Result<Decoded, DecodeError> {
    if let Some(custom) = rt.custom {
        return decode_custom(custom, value);
    }
    if crate::conversion::converts(rt) {
        // autoscaling/v1, decoded as its own version (then converted).
        let canonical =
            round_trip::<k8s_openapi::api::autoscaling::v1::HorizontalPodAutoscaler>(value)?;
        let mut unknown_fields = Vec::new();
        collect_unknown(value, &canonical, &mut String::new(), &mut unknown_fields);
        return Ok(Decoded {
            object: canonical,
            unknown_fields,
        });
    }
    let canonical = decode_kind!(rt, value, {
        "CustomResourceDefinition" => k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
        "Namespace" => core::Namespace,
        "Pod" => core::Pod,
        "Node" => core::Node,
        "Service" => core::Service,
        "Endpoints" => core::Endpoints,
        "ConfigMap" => core::ConfigMap,
        "Secret" => core::Secret,
        "ResourceQuota" => core::ResourceQuota,
        "LimitRange" => core::LimitRange,
        "PersistentVolume" => core::PersistentVolume,
        "PersistentVolumeClaim" => core::PersistentVolumeClaim,
        "StorageClass" => k8s_openapi::api::storage::v1::StorageClass,
        "Event" => core::Event,
        "ServiceAccount" => core::ServiceAccount,
        "Deployment" => apps::Deployment,
        "ReplicaSet" => apps::ReplicaSet,
        "DaemonSet" => apps::DaemonSet,
        "StatefulSet" => apps::StatefulSet,
        "ControllerRevision" => apps::ControllerRevision,
        "Job" => batch::Job,
        "CronJob" => batch::CronJob,
        "Lease" => coordination::Lease,
        "EndpointSlice" => discovery::EndpointSlice,
        "RuntimeClass" => node::RuntimeClass,
        "PriorityClass" => scheduling::PriorityClass,
        "MutatingWebhookConfiguration" => k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration,
        "ValidatingWebhookConfiguration" => k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration,
        "ValidatingAdmissionPolicy" => k8s_openapi::api::admissionregistration::v1::ValidatingAdmissionPolicy,
        "ValidatingAdmissionPolicyBinding" => k8s_openapi::api::admissionregistration::v1::ValidatingAdmissionPolicyBinding,
        "Ingress" => networking::Ingress,
        "IngressClass" => networking::IngressClass,
        "NetworkPolicy" => networking::NetworkPolicy,
        "GatewayClass" => gateway::GatewayClass,
        "Gateway" => gateway::Gateway,
        "HTTPRoute" => gateway::HTTPRoute,
        "HorizontalPodAutoscaler" => autoscaling::HorizontalPodAutoscaler,
        "PodDisruptionBudget" => policy::PodDisruptionBudget,
        "knative.Service" => knative::Service,
        "Configuration" => knative::Configuration,
        "Revision" => knative::Revision,
        "Route" => knative::Route,
        "CertificateSigningRequest" => k8s_openapi::api::certificates::v1::CertificateSigningRequest,
        "Role" => rbac::Role,
        "ClusterRole" => rbac::ClusterRole,
        "RoleBinding" => rbac::RoleBinding,
        "ClusterRoleBinding" => rbac::ClusterRoleBinding,
        "SelfSubjectReview" => k8s_openapi::api::authentication::v1::SelfSubjectReview,
        "SubjectAccessReview" => k8s_openapi::api::authorization::v1::SubjectAccessReview,
        "SelfSubjectAccessReview" => k8s_openapi::api::authorization::v1::SelfSubjectAccessReview,
        "LocalSubjectAccessReview" => k8s_openapi::api::authorization::v1::LocalSubjectAccessReview,
        "SelfSubjectRulesReview" => k8s_openapi::api::authorization::v1::SelfSubjectRulesReview,
    })?;
    let mut unknown_fields = Vec::new();
    collect_unknown(value, &canonical, &mut String::new(), &mut unknown_fields);
    Ok(Decoded {
        object: canonical,
        unknown_fields,
    })
}

/// A custom resource: its metadata decoded as every object's, the rest
/// pruned to its schema (what was pruned is the unknown fields).
fn decode_custom(
    custom: &crate::custom::CustomType,
    value: &Value,
) -> Result<Decoded, DecodeError> {
    let mut object = value.clone();
    let mut unknown_fields = Vec::new();
    if let Some(meta) = value.get("metadata") {
        let canonical =
            round_trip::<k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>(meta)
                .map_err(|e| DecodeError {
                    path: format!("metadata.{}", e.path)
                        .trim_end_matches('.')
                        .to_owned(),
                    message: e.message,
                })?;
        collect_unknown(
            meta,
            &canonical,
            &mut "metadata".to_owned(),
            &mut unknown_fields,
        );
        object["metadata"] = canonical;
    }
    unknown_fields.extend(crate::custom::prune(&custom.schema, &mut object));
    Ok(Decoded {
        object,
        unknown_fields,
    })
}

/// Decodes the `status` of an object of `rt`'s kind alone, for a write to
/// its status subresource, which takes nothing else from the request. Paths
/// in errors and unknown fields start with `status`. `None` for a kind
/// without a typed status here (decode the whole object instead).
pub fn decode_status(rt: &ResourceType, status: &Value) -> Option<Result<Decoded, DecodeError>> {
    if let Some(custom) = rt.custom {
        let mut object = status.clone();
        let unknown_fields = crate::custom::prune_at(
            &custom.schema["properties"]["status"],
            &mut object,
            "status",
        );
        return Some(Ok(Decoded {
            object,
            unknown_fields,
        }));
    }
    if crate::conversion::converts(rt) {
        return None;
    }
    let canonical = match rt.id() {
        "CustomResourceDefinition" => round_trip::<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinitionStatus>(status),
        "Pod" => round_trip::<core::PodStatus>(status),
        "Node" => round_trip::<core::NodeStatus>(status),
        "Service" => round_trip::<core::ServiceStatus>(status),
        "Namespace" => round_trip::<core::NamespaceStatus>(status),
        "ResourceQuota" => round_trip::<core::ResourceQuotaStatus>(status),
        "PersistentVolume" => round_trip::<core::PersistentVolumeStatus>(status),
        "PersistentVolumeClaim" => round_trip::<core::PersistentVolumeClaimStatus>(status),
        "Deployment" => round_trip::<apps::DeploymentStatus>(status),
        "ReplicaSet" => round_trip::<apps::ReplicaSetStatus>(status),
        "DaemonSet" => round_trip::<apps::DaemonSetStatus>(status),
        "StatefulSet" => round_trip::<apps::StatefulSetStatus>(status),
        "Job" => round_trip::<batch::JobStatus>(status),
        "CronJob" => round_trip::<batch::CronJobStatus>(status),
        "Ingress" => round_trip::<networking::IngressStatus>(status),
        "GatewayClass" => round_trip::<gateway::GatewayClassStatus>(status),
        "Gateway" => round_trip::<gateway::GatewayStatus>(status),
        "HTTPRoute" => round_trip::<gateway::HTTPRouteStatus>(status),
        "PodDisruptionBudget" => round_trip::<policy::PodDisruptionBudgetStatus>(status),
        "HorizontalPodAutoscaler" => {
            round_trip::<autoscaling::HorizontalPodAutoscalerStatus>(status)
        }
        "knative.Service" => round_trip::<knative::ServiceStatus>(status),
        "Configuration" => round_trip::<knative::ConfigurationStatus>(status),
        "Revision" => round_trip::<knative::RevisionStatus>(status),
        "Route" => round_trip::<knative::RouteStatus>(status),
        "CertificateSigningRequest" => round_trip::<
            k8s_openapi::api::certificates::v1::CertificateSigningRequestStatus,
        >(status),
        _ => return None,
    };
    Some(
        canonical
            .map_err(|e| DecodeError {
                path: if e.path.is_empty() {
                    "status".into()
                } else {
                    format!("status.{}", e.path)
                },
                message: e.message,
            })
            .map(|object| {
                let mut unknown_fields = Vec::new();
                collect_unknown(
                    status,
                    &object,
                    &mut "status".to_owned(),
                    &mut unknown_fields,
                );
                Decoded {
                    object,
                    unknown_fields,
                }
            }),
    )
}

/// Decodes any `k8s-openapi` type with the field path in errors.
pub fn decode_as<T: DeserializeOwned>(value: &Value) -> Result<T, DecodeError> {
    serde_path_to_error::deserialize(value).map_err(|e| DecodeError {
        path: e
            .path()
            .to_string()
            .trim_start_matches('.')
            .replace("?", ""),
        message: e.inner().to_string(),
    })
}

/// Fields present (and not null) in `input` that decoding dropped.
fn collect_unknown(input: &Value, canonical: &Value, path: &mut String, out: &mut Vec<String>) {
    match (input, canonical) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                if v.is_null() {
                    continue;
                }
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(k);
                match b.get(k) {
                    Some(cv) => collect_unknown(v, cv, path, out),
                    // Maps of free-form data (labels, data) keep every key, so a
                    // missing key is a field the schema does not have.
                    None => out.push(path.clone()),
                }
                path.truncate(len);
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for (i, (v, cv)) in a.iter().zip(b).enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                collect_unknown(v, cv, path, out);
                path.truncate(len);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::lookup;
    use serde_json::json;

    #[test]
    fn a_status_decodes_alone_as_it_does_inside_its_object() {
        let pods = lookup("", "v1", "pods").unwrap();
        let status = json!({"phase": "Running", "podIP": "10.0.0.1", "bogus": 1,
            "conditions": [{"type": "Ready", "status": "True", "extra": "x"}]});
        let alone = decode_status(pods, &status).unwrap().unwrap();
        let whole = decode(
            pods,
            &json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "status": status}),
        )
        .unwrap();
        assert_eq!(alone.object, whole.object["status"]);
        assert_eq!(
            alone.unknown_fields,
            ["status.bogus", "status.conditions[0].extra"]
        );
        assert_eq!(alone.unknown_fields, whole.unknown_fields);
        let err = decode_status(pods, &json!({"phase": 3}))
            .unwrap()
            .unwrap_err();
        assert_eq!(err.path, "status.phase");
        assert!(decode_status(lookup("", "v1", "configmaps").unwrap(), &json!({})).is_none());
    }

    #[test]
    fn type_errors_name_the_field() {
        let deploy = lookup("apps", "v1", "deployments").unwrap();
        let err = decode(
            deploy,
            &json!({"apiVersion": "apps/v1", "kind": "Deployment", "spec": {"replicas": "three"}}),
        )
        .unwrap_err();
        assert_eq!(err.path, "spec.replicas");
    }

    #[test]
    fn unknown_fields_are_listed_with_paths() {
        let pods = lookup("", "v1", "pods").unwrap();
        let d = decode(
            pods,
            &json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a", "labels": {"x": "y"}},
                "spec": {"containers": [{"name": "c", "image": "i", "imagePolicy": "x"}], "bogus": 1}}),
        )
        .unwrap();
        assert_eq!(
            d.unknown_fields,
            vec!["spec.bogus", "spec.containers[0].imagePolicy"]
        );
        assert_eq!(d.object["metadata"]["labels"]["x"], "y");
        assert!(d.object["spec"].get("bogus").is_none());
    }
}
