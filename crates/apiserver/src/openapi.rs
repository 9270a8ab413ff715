//! OpenAPI v3 documents, one per group version, generated from the
//! `k8s-openapi` schemas. kubectl reads them for `kubectl explain` and to
//! learn that the server does field validation itself (the `fieldValidation`
//! parameter on each kind's PATCH operation), so `kubectl apply` leaves
//! validation to us.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::extract::Path;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use k8s_openapi::api::{
    apps::v1 as apps, batch::v1 as batch, coordination::v1 as coordination, core::v1 as core,
    discovery::v1 as discovery, networking::v1 as networking, node::v1 as node,
    scheduling::v1 as scheduling,
};
use schemars::JsonSchema;
use schemars::generate::SchemaSettings;
use serde_json::{Map, Value, json};
use wasmkube_api::gateway_api as gateway;
use wasmkube_api::registry::{self, ResourceType};

use crate::error::ApiError;

/// Generated documents by group-version path (`api/v1`, `apis/apps/v1`).
/// The OpenAPI v3 documents by group-version path.
type Documents = Arc<BTreeMap<String, Value>>;

/// The documents, rebuilt when CustomResourceDefinitions change what is
/// served.
fn documents() -> Documents {
    static DOCS: Mutex<Option<(u64, Documents)>> = Mutex::new(None);
    let generation = registry::custom_generation();
    let mut docs = DOCS.lock().unwrap_or_else(|e| e.into_inner());
    match &*docs {
        Some((g, d)) if *g == generation => d.clone(),
        _ => {
            let built = Arc::new(build_all());
            *docs = Some((generation, built.clone()));
            built
        }
    }
}

fn gv_path(rt: &ResourceType) -> String {
    if rt.group.is_empty() {
        format!("api/{}", rt.version)
    } else {
        format!("apis/{}/{}", rt.group, rt.version)
    }
}

/// The root schema name of each kind (`io.k8s.api.apps.v1.Deployment`).
fn add_schema(rt: &ResourceType, g: &mut schemars::SchemaGenerator) -> String {
    fn add<T: JsonSchema>(g: &mut schemars::SchemaGenerator) -> String {
        g.subschema_for::<T>();
        T::schema_name().into_owned()
    }
    if let Some(custom) = rt.custom {
        // The CRD's schema, with the metadata every object has.
        let meta = add::<k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>(g);
        let mut schema = custom.schema.clone();
        let reversed: Vec<&str> = rt.group.split('.').rev().collect();
        let name = format!("{}.{}.{}", reversed.join("."), rt.version, rt.kind);
        if let Some(props) = schema.get_mut("properties").and_then(Value::as_object_mut) {
            props.insert("apiVersion".into(), json!({"type": "string", "description": "APIVersion defines the versioned schema of this representation of an object."}));
            props.insert("kind".into(), json!({"type": "string", "description": "Kind is a string value representing the REST resource this object represents."}));
            props.insert("metadata".into(), json!({"$ref": format!("#/components/schemas/{meta}"), "description": "Standard object's metadata."}));
        }
        g.definitions_mut().insert(name.clone(), schema);
        return name;
    }
    match rt.id() {
        "CustomResourceDefinition" => add::<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>(g),
        "Namespace" => add::<core::Namespace>(g),
        "Pod" => add::<core::Pod>(g),
        "Node" => add::<core::Node>(g),
        "Service" => add::<core::Service>(g),
        "Endpoints" => add::<core::Endpoints>(g),
        "ConfigMap" => add::<core::ConfigMap>(g),
        "Secret" => add::<core::Secret>(g),
        "Event" => add::<core::Event>(g),
        "ServiceAccount" => add::<core::ServiceAccount>(g),
        "Deployment" => add::<apps::Deployment>(g),
        "ReplicaSet" => add::<apps::ReplicaSet>(g),
        "DaemonSet" => add::<apps::DaemonSet>(g),
        "StatefulSet" => add::<apps::StatefulSet>(g),
        "ControllerRevision" => add::<apps::ControllerRevision>(g),
        "Job" => add::<batch::Job>(g),
        "CronJob" => add::<batch::CronJob>(g),
        "Lease" => add::<coordination::Lease>(g),
        "EndpointSlice" => add::<discovery::EndpointSlice>(g),
        "RuntimeClass" => add::<node::RuntimeClass>(g),
        "PriorityClass" => add::<scheduling::PriorityClass>(g),
        "MutatingWebhookConfiguration" => {
            add::<k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration>(g)
        }
        "ValidatingWebhookConfiguration" => {
            add::<k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration>(g)
        }
        "ValidatingAdmissionPolicy" => {
            add::<k8s_openapi::api::admissionregistration::v1::ValidatingAdmissionPolicy>(g)
        }
        "ValidatingAdmissionPolicyBinding" => {
            add::<k8s_openapi::api::admissionregistration::v1::ValidatingAdmissionPolicyBinding>(g)
        }
        "Ingress" => add::<networking::Ingress>(g),
        "IngressClass" => add::<networking::IngressClass>(g),
        "NetworkPolicy" => add::<networking::NetworkPolicy>(g),
        "GatewayClass" => add::<gateway::GatewayClass>(g),
        "Gateway" => add::<gateway::Gateway>(g),
        "HTTPRoute" => add::<gateway::HTTPRoute>(g),
        "PodDisruptionBudget" => add::<k8s_openapi::api::policy::v1::PodDisruptionBudget>(g),
        "ResourceQuota" => add::<core::ResourceQuota>(g),
        "PersistentVolume" => add::<core::PersistentVolume>(g),
        "PersistentVolumeClaim" => add::<core::PersistentVolumeClaim>(g),
        "StorageClass" => add::<k8s_openapi::api::storage::v1::StorageClass>(g),
        "LimitRange" => add::<core::LimitRange>(g),
        "HorizontalPodAutoscaler" if rt.version == "v1" => {
            add::<k8s_openapi::api::autoscaling::v1::HorizontalPodAutoscaler>(g)
        }
        "HorizontalPodAutoscaler" => {
            add::<k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler>(g)
        }
        "knative.Service" => add::<wasmkube_api::knative::Service>(g),
        "Configuration" => add::<wasmkube_api::knative::Configuration>(g),
        "Revision" => add::<wasmkube_api::knative::Revision>(g),
        "Route" => add::<wasmkube_api::knative::Route>(g),
        "CertificateSigningRequest" => {
            add::<k8s_openapi::api::certificates::v1::CertificateSigningRequest>(g)
        }
        "Role" => add::<k8s_openapi::api::rbac::v1::Role>(g),
        "ClusterRole" => add::<k8s_openapi::api::rbac::v1::ClusterRole>(g),
        "RoleBinding" => add::<k8s_openapi::api::rbac::v1::RoleBinding>(g),
        "ClusterRoleBinding" => add::<k8s_openapi::api::rbac::v1::ClusterRoleBinding>(g),
        "SelfSubjectReview" => add::<k8s_openapi::api::authentication::v1::SelfSubjectReview>(g),
        "SubjectAccessReview" => add::<k8s_openapi::api::authorization::v1::SubjectAccessReview>(g),
        "SelfSubjectAccessReview" => {
            add::<k8s_openapi::api::authorization::v1::SelfSubjectAccessReview>(g)
        }
        "LocalSubjectAccessReview" => {
            add::<k8s_openapi::api::authorization::v1::LocalSubjectAccessReview>(g)
        }
        "SelfSubjectRulesReview" => {
            add::<k8s_openapi::api::authorization::v1::SelfSubjectRulesReview>(g)
        }
        other => unreachable!("no schema for served kind {other}"),
    }
}

/// Rewrites `{"$ref": r, ...siblings}` into Kubernetes' `{"allOf": [{"$ref": r}], ...}`.
fn normalize_refs(v: &mut Value) {
    match v {
        Value::Object(m) => {
            // (A `$ref` whose value is not a string is a property named
            // `$ref`, as JSONSchemaProps has, not a reference.)
            if m.len() > 1
                && m.get("$ref").is_some_and(Value::is_string)
                && let Some(r) = m.remove("$ref")
            {
                m.insert("allOf".into(), json!([{"$ref": r}]));
            }
            for child in m.values_mut() {
                normalize_refs(child);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(normalize_refs),
        _ => {}
    }
}

fn param(name: &str, location: &str, required: bool) -> Value {
    json!({"name": name, "in": location, "required": required, "schema": {"type": "string", "uniqueItems": true}})
}

fn paths_for(rt: &ResourceType, schema: &str) -> Vec<(String, Value)> {
    let gvk = json!({"group": rt.group, "version": rt.version, "kind": rt.kind});
    let reference = json!({"$ref": format!("#/components/schemas/{schema}")});
    let body = json!({"content": {"application/json": {"schema": reference}}});
    let ok = json!({"200": {"description": "OK", "content": {"application/json": {"schema": reference}}}});
    let base = format!("/{}", gv_path(rt));
    let (collection, mut scope) = if rt.namespaced {
        (
            format!("{base}/namespaces/{{namespace}}/{}", rt.plural),
            vec![param("namespace", "path", true)],
        )
    } else {
        (format!("{base}/{}", rt.plural), Vec::new())
    };
    let op = |verb: &str, action: &str, extra: Vec<Value>, request: bool| {
        let mut o = json!({
            "operationId": format!("{verb}{}", rt.kind),
            "description": format!("{action} {}", rt.kind),
            "responses": ok,
            "x-kubernetes-action": action,
            "x-kubernetes-group-version-kind": gvk,
            "parameters": extra,
        });
        if request {
            o["requestBody"] = body.clone();
        }
        o
    };
    let write_params = || {
        vec![
            param("dryRun", "query", false),
            param("fieldManager", "query", false),
            param("fieldValidation", "query", false),
        ]
    };
    let mut patch_params = write_params();
    patch_params.push(param("force", "query", false));
    let item = format!("{collection}/{{name}}");
    scope.push(param("name", "path", true));
    vec![
        (
            collection,
            json!({
                "get": op("list", "list", vec![param("labelSelector", "query", false), param("fieldSelector", "query", false), param("limit", "query", false), param("continue", "query", false), param("watch", "query", false), param("resourceVersion", "query", false)], false),
                "post": op("create", "post", write_params(), true),
                "delete": op("deletecollection", "deletecollection", Vec::new(), false),
                "parameters": if rt.namespaced { json!([param("namespace", "path", true)]) } else { json!([]) },
            }),
        ),
        (
            item,
            json!({
                "get": op("read", "get", Vec::new(), false),
                "put": op("replace", "put", write_params(), true),
                "patch": op("patch", "patch", patch_params, true),
                "delete": op("delete", "delete", vec![param("gracePeriodSeconds", "query", false), param("propagationPolicy", "query", false)], false),
                "parameters": scope,
            }),
        ),
    ]
}

fn build_all() -> BTreeMap<String, Value> {
    let mut by_gv: BTreeMap<String, Vec<&'static ResourceType>> = BTreeMap::new();
    for rt in registry::all() {
        by_gv.entry(gv_path(rt)).or_default().push(rt);
    }
    by_gv
        .into_iter()
        .map(|(gv, kinds)| {
            let mut generator = SchemaSettings::openapi3().into_generator();
            let mut paths = Map::new();
            let mut roots = Vec::new();
            for rt in &kinds {
                let name = add_schema(rt, &mut generator);
                for (p, item) in paths_for(rt, &name) {
                    paths.insert(p, item);
                }
                roots.push((name, *rt));
            }
            let mut schemas = Value::Object(generator.take_definitions(true).into_iter().collect());
            for (name, rt) in roots {
                if let Some(s) = schemas.get_mut(&name) {
                    s["x-kubernetes-group-version-kind"] =
                        json!([{"group": rt.group, "version": rt.version, "kind": rt.kind}]);
                }
            }
            normalize_refs(&mut schemas);
            let doc = json!({
                "openapi": "3.0.0",
                "info": {"title": "Kubernetes", "version": crate::discovery::KUBERNETES_VERSION},
                "paths": paths,
                "components": {"schemas": schemas},
            });
            (gv, doc)
        })
        .collect()
}

/// A stable hash of a document, so clients can cache it by URL.
fn hash(doc: &Value) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    doc.to_string().hash(&mut h);
    format!("{:016X}", h.finish())
}

pub async fn v3_index() -> Response {
    let paths: Map<String, Value> = documents()
        .iter()
        .map(|(gv, doc)| {
            (
                gv.clone(),
                json!({"serverRelativeURL": format!("/openapi/v3/{gv}?hash={}", hash(doc))}),
            )
        })
        .collect();
    (StatusCode::OK, axum::Json(json!({"paths": paths}))).into_response()
}

pub async fn v3_group_version(Path(path): Path<String>) -> Response {
    match documents().get(path.trim_matches('/')) {
        Some(doc) => (StatusCode::OK, axum::Json(doc.clone())).into_response(),
        None => ApiError::NoRoute.into_response(),
    }
}

/// OpenAPI v2 is not served: clients (kubectl included) use v3.
pub async fn v2() -> Response {
    ApiError::NoRoute.into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_a_schema_with_its_gvk_and_a_validating_patch() {
        let docs = documents();
        for rt in registry::RESOURCES {
            let doc = &docs[&gv_path(rt)];
            let schemas = doc["components"]["schemas"].as_object().unwrap();
            let root = schemas
                .values()
                .find(|s| s["x-kubernetes-group-version-kind"][0]["kind"] == rt.kind)
                .unwrap_or_else(|| panic!("no schema for {}", rt.kind));
            assert!(root["properties"]["metadata"].is_object(), "{}", rt.kind);
            let has_validation = doc["paths"].as_object().unwrap().values().any(|p| {
                p["patch"]["x-kubernetes-group-version-kind"]["kind"] == rt.kind
                    && p["patch"]["parameters"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|q| q["name"] == "fieldValidation")
            });
            assert!(has_validation, "{}", rt.kind);
        }
        // References resolve inside each document.
        let apps = docs["apis/apps/v1"].to_string();
        assert!(apps.contains("#/components/schemas/io.k8s.api.core.v1.PodSpec"));
    }
}
