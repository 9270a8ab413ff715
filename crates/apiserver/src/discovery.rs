//! Discovery (`/api`, `/apis`, group and group-version resource lists),
//! `/version` and the health endpoints.

use serde_json::{Value, json};
use wasmkube_api::Subresource;
use wasmkube_api::registry::{self, ResourceType};

/// The Kubernetes version this server reports; kubectl picks its client
/// version from it.
pub const KUBERNETES_VERSION: &str = "v1.33.0";

pub fn version() -> Value {
    json!({
        "major": "1",
        "minor": "33",
        "gitVersion": format!("{KUBERNETES_VERSION}+wasmkube.{}", env!("CARGO_PKG_VERSION")),
        "gitCommit": "",
        "gitTreeState": "clean",
        "buildDate": "1970-01-01T00:00:00Z",
        "goVersion": "rust",
        "compiler": "rustc",
        "platform": format!("{}/{}", std::env::consts::OS, if cfg!(target_arch = "x86_64") { "amd64" } else { std::env::consts::ARCH }),
    })
}

pub fn api_versions() -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}],
    })
}

fn group_json(name: &str, versions: &[&str]) -> Value {
    let gvs: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{name}/{v}"), "version": v}))
        .collect();
    json!({"name": name, "versions": gvs, "preferredVersion": gvs[0]})
}

/// The resource metrics API, served from the node agents' usage (as
/// metrics-server would serve it through aggregation).
const METRICS_GROUP: &str = "metrics.k8s.io";
/// The custom metrics API: HTTP functions' request figures per pod, from
/// the same agents (as a Prometheus adapter would serve them).
pub const CUSTOM_METRICS_GROUP: &str = "custom.metrics.k8s.io";

pub fn api_groups() -> Value {
    let mut groups: Vec<Value> = registry::groups()
        .iter()
        .map(|(g, vs)| group_json(g, vs))
        .collect();
    groups.push(group_json(METRICS_GROUP, &["v1beta1"]));
    groups.push(group_json(CUSTOM_METRICS_GROUP, &["v1beta2"]));
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

pub fn api_group(name: &str) -> Option<Value> {
    registry::groups()
        .into_iter()
        .chain((name == METRICS_GROUP).then_some((METRICS_GROUP, vec!["v1beta1"])))
        .chain((name == CUSTOM_METRICS_GROUP).then_some((CUSTOM_METRICS_GROUP, vec!["v1beta2"])))
        .find(|(g, _)| *g == name)
        .map(|(g, vs)| {
            let mut v = group_json(g, &vs);
            v["kind"] = json!("APIGroup");
            v["apiVersion"] = json!("v1");
            v
        })
}

/// The verbs every served resource has (what RBAC's `*` stands for).
pub(crate) const VERBS: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

fn resource_json(rt: &ResourceType) -> Value {
    let mut v = json!({
        "name": rt.plural,
        "singularName": rt.singular,
        "namespaced": rt.namespaced,
        "kind": rt.kind,
        "verbs": if registry::is_review(rt) { &["create"][..] } else { VERBS },
    });
    if !rt.short_names.is_empty() {
        v["shortNames"] = json!(rt.short_names);
    }
    if !rt.categories.is_empty() {
        v["categories"] = json!(rt.categories);
    }
    v
}

fn subresource_json(rt: &ResourceType, sub: Subresource) -> Value {
    let name = format!("{}/{}", rt.plural, sub.name());
    match sub {
        Subresource::Status => {
            json!({"name": name, "singularName": "", "namespaced": rt.namespaced, "kind": rt.kind, "verbs": ["get", "patch", "update"]})
        }
        Subresource::Scale => {
            json!({"name": name, "singularName": "", "namespaced": rt.namespaced, "group": "autoscaling", "version": "v1", "kind": "Scale", "verbs": ["get", "patch", "update"]})
        }
        Subresource::Binding => {
            json!({"name": name, "singularName": "", "namespaced": rt.namespaced, "kind": "Binding", "verbs": ["create"]})
        }
        Subresource::Approval => {
            json!({"name": name, "singularName": "", "namespaced": rt.namespaced, "kind": rt.kind, "verbs": ["get", "patch", "update"]})
        }
        Subresource::Finalize => {
            json!({"name": name, "singularName": "", "namespaced": rt.namespaced, "kind": rt.kind, "verbs": ["update"]})
        }
        Subresource::Log => {
            json!({"name": name, "singularName": "", "namespaced": rt.namespaced, "kind": rt.kind, "verbs": ["get"]})
        }
        Subresource::Token => {
            json!({"name": name, "singularName": "", "namespaced": rt.namespaced, "group": "authentication.k8s.io", "version": "v1", "kind": "TokenRequest", "verbs": ["create"]})
        }
        Subresource::Eviction => {
            json!({"name": name, "singularName": "", "namespaced": rt.namespaced, "group": "policy", "version": "v1", "kind": "Eviction", "verbs": ["create"]})
        }
        Subresource::Exec => {
            json!({"name": name, "singularName": "", "namespaced": rt.namespaced, "kind": "PodExecOptions", "verbs": ["create", "get"]})
        }
        Subresource::Attach => {
            json!({"name": name, "singularName": "", "namespaced": rt.namespaced, "kind": "PodAttachOptions", "verbs": ["create", "get"]})
        }
        Subresource::PortForward => {
            json!({"name": name, "singularName": "", "namespaced": rt.namespaced, "kind": "PodPortForwardOptions", "verbs": ["create", "get"]})
        }
    }
}

/// The resource list of one group version (`/api/v1`, `/apis/apps/v1`).
pub fn resource_list(group: &str, version: &str) -> Option<Value> {
    if (group, version) == (METRICS_GROUP, "v1beta1") {
        return Some(json!({
            "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "metrics.k8s.io/v1beta1",
            "resources": [
                {"name": "nodes", "singularName": "", "namespaced": false, "kind": "NodeMetrics", "verbs": ["get", "list"]},
                {"name": "pods", "singularName": "", "namespaced": true, "kind": "PodMetrics", "verbs": ["get", "list"]},
            ],
        }));
    }
    if (group, version) == (CUSTOM_METRICS_GROUP, "v1beta2") {
        let resources: Vec<Value> = ["pods", crate::node_proxy::REVISIONS]
            .iter()
            .flat_map(|r| crate::node_proxy::CUSTOM_METRICS.iter().map(move |m| (r, m)))
            .filter(|(r, m)| **r == "pods" || !crate::node_proxy::POD_ONLY_METRICS.contains(m))
            .map(|(r, m)| json!({"name": format!("{r}/{m}"), "singularName": "", "namespaced": true, "kind": "MetricValueList", "verbs": ["get"]}))
            .collect();
        return Some(json!({
            "kind": "APIResourceList", "apiVersion": "v1",
            "groupVersion": "custom.metrics.k8s.io/v1beta2", "resources": resources,
        }));
    }
    let mut resources = Vec::new();
    for rt in registry::in_group_version(group, version) {
        resources.push(resource_json(rt));
        for sub in rt.subresources {
            resources.push(subresource_json(rt, *sub));
        }
    }
    if resources.is_empty() {
        return None;
    }
    let gv = if group.is_empty() {
        version.to_owned()
    } else {
        format!("{group}/{version}")
    };
    Some(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}),
    )
}
