//! The default RBAC policy every cluster starts with, as kube-apiserver's
//! bootstrap policy: the user-facing ClusterRoles (`cluster-admin`,
//! `admin`, `edit`, `view`, the last three aggregated from labelled
//! roles), the roles every authenticated client needs (discovery, public
//! information, self reviews), and one role per component of the cluster
//! (`system:kube-scheduler`, `system:kube-controller-manager`,
//! `system:node`) with their bindings.
//!
//! Objects are made when missing at start. Ones still annotated
//! `rbac.authorization.kubernetes.io/autoupdate: "true"` are brought back
//! to their default rules and subjects; set it to `"false"` to keep an
//! edited default.

use std::sync::Arc;

use serde_json::{Value, json};
use wasmkube_api::{images, registry};

use crate::ApiServer;
use crate::error::ApiError;

const GROUP: &str = "rbac.authorization.k8s.io";
const AUTOUPDATE: &str = "rbac.authorization.kubernetes.io/autoupdate";

fn rule(groups: &[&str], resources: &[&str], verbs: &[&str]) -> Value {
    json!({"apiGroups": groups, "resources": resources, "verbs": verbs})
}

fn urls(paths: &[&str], verbs: &[&str]) -> Value {
    json!({"nonResourceURLs": paths, "verbs": verbs})
}

const READ: &[&str] = &["get", "list", "watch"];
const WRITE: &[&str] = &["create", "delete", "deletecollection", "patch", "update"];
const ALL_VERBS: &[&str] = crate::discovery::VERBS;

/// Recording events, as every component does (core and events.k8s.io).
fn event_rules() -> [Value; 2] {
    let verbs = &["create", "patch", "update"];
    [
        rule(&[""], &["events"], verbs),
        rule(&["events.k8s.io"], &["events"], verbs),
    ]
}

fn cluster_role(name: &str, labels: Value, rules: Vec<Value>) -> Value {
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": name, "labels": labels,
                     "annotations": {AUTOUPDATE: "true"}},
        "rules": rules,
    })
}

fn aggregated(name: &str, labels: Value, selector: &str) -> Value {
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": name, "labels": labels,
                     "annotations": {AUTOUPDATE: "true"}},
        "aggregationRule": {"clusterRoleSelectors": [{"matchLabels": {selector: "true"}}]},
        "rules": [],
    })
}

fn binding(name: &str, role: &str, subjects: &[(&str, &str)]) -> Value {
    let subjects: Vec<Value> = subjects
        .iter()
        .map(|(kind, name)| json!({"apiGroup": GROUP, "kind": kind, "name": name}))
        .collect();
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": name, "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"},
                     "annotations": {AUTOUPDATE: "true"}},
        "roleRef": {"apiGroup": GROUP, "kind": "ClusterRole", "name": role},
        "subjects": subjects,
    })
}

/// What namespaced users work with (the `view` role reads it, `edit`
/// writes it but for the quotas and limit ranges set on them), by API
/// group. Secrets are apart: `view` does not read them.
fn workload_resources() -> Vec<(&'static str, Vec<&'static str>)> {
    vec![
        (
            "",
            vec![
                "pods",
                "pods/log",
                "pods/status",
                "services",
                "services/status",
                "endpoints",
                "configmaps",
                "events",
                "serviceaccounts",
                "persistentvolumeclaims",
                "persistentvolumeclaims/status",
                "replicationcontrollers",
                "limitranges",
                "resourcequotas",
                "resourcequotas/status",
                "namespaces/status",
            ],
        ),
        (
            "apps",
            vec![
                "deployments",
                "deployments/scale",
                "deployments/status",
                "replicasets",
                "replicasets/scale",
                "replicasets/status",
                "daemonsets",
                "daemonsets/status",
                "statefulsets",
                "statefulsets/scale",
            ],
        ),
        (
            "batch",
            vec!["jobs", "jobs/status", "cronjobs", "cronjobs/status"],
        ),
        (
            "autoscaling",
            vec![
                "horizontalpodautoscalers",
                "horizontalpodautoscalers/status",
            ],
        ),
        (
            "networking.k8s.io",
            vec!["ingresses", "ingresses/status", "networkpolicies"],
        ),
        (
            "policy",
            vec!["poddisruptionbudgets", "poddisruptionbudgets/status"],
        ),
        ("discovery.k8s.io", vec!["endpointslices"]),
        ("coordination.k8s.io", vec!["leases"]),
        (
            "gateway.networking.k8s.io",
            vec![
                "gateways",
                "gateways/status",
                "httproutes",
                "httproutes/status",
            ],
        ),
        (
            "serving.knative.dev",
            vec![
                "services",
                "services/status",
                "configurations",
                "configurations/status",
                "revisions",
                "revisions/status",
                "routes",
                "routes/status",
            ],
        ),
    ]
}

/// The default ClusterRoles and ClusterRoleBindings.
pub(crate) fn policy() -> Vec<Value> {
    let view_rules: Vec<Value> = workload_resources()
        .into_iter()
        .map(|(group, resources)| rule(&[group], &resources, READ))
        .chain([
            rule(&[""], &["namespaces"], READ),
            rule(&["metrics.k8s.io"], &["pods", "nodes"], READ),
            // Pulling the namespace's repositories of the built-in registry.
            rule(&[images::GROUP], &[images::RESOURCE], &["get"]),
        ])
        .collect();
    let edit_rules: Vec<Value> = workload_resources()
        .into_iter()
        .map(|(group, resources)| {
            let resources: Vec<&str> = resources
                .into_iter()
                // A tenant's limits are the cluster administrator's to set.
                .filter(|r| {
                    !r.ends_with("/status")
                        && !matches!(*r, "pods/log" | "limitranges" | "resourcequotas")
                })
                .collect();
            rule(&[group], &resources, WRITE)
        })
        .chain([
            rule(&[""], &["secrets"], ALL_VERBS),
            rule(
                &[""],
                &[
                    "pods/exec",
                    "pods/attach",
                    "pods/portforward",
                    "pods/eviction",
                    "serviceaccounts/token",
                ],
                &["create", "get"],
            ),
            rule(&[""], &["serviceaccounts"], &["impersonate"]),
            // Pushing to and deleting from the namespace's repositories.
            rule(
                &[images::GROUP],
                &[images::RESOURCE],
                &["get", "create", "delete"],
            ),
        ])
        .collect();
    let admin_rules = vec![
        rule(&[GROUP], &["roles", "rolebindings"], ALL_VERBS),
        rule(
            &["authorization.k8s.io"],
            &["localsubjectaccessreviews"],
            &["create"],
        ),
    ];
    let everything = vec![rule(&["*"], &["*"], &["*"]), urls(&["*"], &["*"])];
    let defaults = json!({"kubernetes.io/bootstrapping": "rbac-defaults"});
    let label =
        |extra: &str| json!({"kubernetes.io/bootstrapping": "rbac-defaults", extra: "true"});
    // What every node agent reads and writes. The node authorizer
    // (`auth::node`) narrows it to the node's own pods, Node and Lease, and
    // alone grants the Secrets, ConfigMaps, claims, volumes and tokens its
    // pods use.
    let node_rules = vec![
        rule(
            &[""],
            &["nodes", "nodes/status"],
            &[
                "create", "get", "list", "watch", "patch", "update", "delete",
            ],
        ),
        rule(&[""], &["pods"], &["get", "list", "watch", "delete"]),
        rule(&[""], &["pods/status"], &["patch", "update"]),
        rule(&[""], &["pods/eviction"], &["create"]),
        rule(
            &[""],
            &["services", "endpoints", "namespaces", "serviceaccounts"],
            READ,
        ),
        rule(&["discovery.k8s.io"], &["endpointslices"], READ),
        rule(&["node.k8s.io"], &["runtimeclasses"], READ),
        rule(
            &["coordination.k8s.io"],
            &["leases"],
            &[
                "create", "get", "list", "watch", "patch", "update", "delete",
            ],
        ),
        rule(
            &["networking.k8s.io"],
            &["ingresses", "ingressclasses", "networkpolicies"],
            READ,
        ),
        rule(
            &["gateway.networking.k8s.io"],
            &["gateways", "gatewayclasses", "httproutes"],
            READ,
        ),
        rule(
            &["serving.knative.dev"],
            &["routes", "revisions", "services", "configurations"],
            READ,
        ),
        // The activator on every node wakes revisions scaled to zero.
        rule(
            &["apps"],
            &["deployments", "deployments/scale"],
            &["get", "list", "watch", "patch", "update"],
        ),
        rule(&["authentication.k8s.io"], &["tokenreviews"], &["create"]),
        rule(
            &["authorization.k8s.io"],
            &["subjectaccessreviews"],
            &["create"],
        ),
        rule(
            &["certificates.k8s.io"],
            &["certificatesigningrequests"],
            &["create", "get", "list", "watch"],
        ),
    ];
    let node_rules: Vec<Value> = node_rules.into_iter().chain(event_rules()).collect();
    let scheduler_rules = vec![
        rule(&[""], &["pods"], &["get", "list", "watch", "delete"]),
        rule(&[""], &["pods/binding", "bindings"], &["create"]),
        rule(&[""], &["pods/status"], &["patch", "update"]),
        rule(
            &[""],
            &[
                "nodes",
                "namespaces",
                "services",
                "replicationcontrollers",
                "persistentvolumeclaims",
                "persistentvolumes",
            ],
            READ,
        ),
        // The scheduler names the node of a claim that waits for its first
        // pod (`volume.kubernetes.io/selected-node`).
        rule(&[""], &["persistentvolumeclaims"], &["update", "patch"]),
        rule(&["apps"], &["replicasets", "statefulsets"], READ),
        rule(&["policy"], &["poddisruptionbudgets"], READ),
        rule(&["node.k8s.io"], &["runtimeclasses"], READ),
        rule(&["scheduling.k8s.io"], &["priorityclasses"], READ),
        rule(
            &["storage.k8s.io"],
            &[
                "storageclasses",
                "csinodes",
                "csidrivers",
                "csistoragecapacities",
            ],
            READ,
        ),
        rule(
            &["coordination.k8s.io"],
            &["leases"],
            &["create", "get", "list", "watch", "update", "patch"],
        ),
        rule(&["authentication.k8s.io"], &["tokenreviews"], &["create"]),
        rule(
            &["authorization.k8s.io"],
            &["subjectaccessreviews"],
            &["create"],
        ),
    ];
    let scheduler_rules: Vec<Value> = scheduler_rules.into_iter().chain(event_rules()).collect();
    vec![
        cluster_role("cluster-admin", defaults.clone(), everything),
        aggregated(
            "admin",
            defaults.clone(),
            "rbac.authorization.k8s.io/aggregate-to-admin",
        ),
        aggregated(
            "edit",
            label("rbac.authorization.k8s.io/aggregate-to-admin"),
            "rbac.authorization.k8s.io/aggregate-to-edit",
        ),
        aggregated(
            "view",
            label("rbac.authorization.k8s.io/aggregate-to-edit"),
            "rbac.authorization.k8s.io/aggregate-to-view",
        ),
        cluster_role(
            "system:aggregate-to-admin",
            label("rbac.authorization.k8s.io/aggregate-to-admin"),
            admin_rules,
        ),
        cluster_role(
            "system:aggregate-to-edit",
            label("rbac.authorization.k8s.io/aggregate-to-edit"),
            edit_rules,
        ),
        cluster_role(
            "system:aggregate-to-view",
            label("rbac.authorization.k8s.io/aggregate-to-view"),
            view_rules,
        ),
        cluster_role(
            "system:discovery",
            defaults.clone(),
            vec![urls(
                &[
                    "/api",
                    "/api/*",
                    "/apis",
                    "/apis/*",
                    "/healthz",
                    "/livez",
                    "/readyz",
                    "/version",
                    "/version/",
                    "/openapi",
                    "/openapi/*",
                ],
                &["get"],
            )],
        ),
        cluster_role(
            "system:public-info-viewer",
            defaults.clone(),
            vec![urls(
                &[
                    "/healthz",
                    "/livez",
                    "/readyz",
                    "/version",
                    "/version/",
                    "/cacerts",
                ],
                &["get"],
            )],
        ),
        // The dashboard's page and script: they hold no data (what it
        // shows is the reader's own API requests), so any authenticated
        // user may load them.
        cluster_role(
            "system:dashboard-viewer",
            defaults.clone(),
            vec![urls(&["/dashboard", "/dashboard/*"], &["get"])],
        ),
        // Pulling a namespace's repositories: bound in every namespace to
        // its service accounts (`system:image-pullers`).
        cluster_role(
            images::PULLER_ROLE,
            defaults.clone(),
            vec![rule(&[images::GROUP], &[images::RESOURCE], &["get"])],
        ),
        // A token for the built-in registry naming oneself; what it may do
        // there is RBAC's to say.
        cluster_role(
            "system:registry-user",
            defaults.clone(),
            vec![urls(&[images::TOKEN_PATH], &["get"])],
        ),
        cluster_role(
            "system:basic-user",
            defaults.clone(),
            vec![
                rule(
                    &["authentication.k8s.io"],
                    &["selfsubjectreviews"],
                    &["create"],
                ),
                rule(
                    &["authorization.k8s.io"],
                    &["selfsubjectaccessreviews", "selfsubjectrulesreviews"],
                    &["create"],
                ),
            ],
        ),
        cluster_role(
            "system:monitoring",
            defaults.clone(),
            vec![urls(
                &["/metrics", "/livez", "/readyz", "/healthz"],
                &["get"],
            )],
        ),
        cluster_role("system:kube-scheduler", defaults.clone(), scheduler_rules),
        // The controllers include the garbage collector and the namespace
        // controller, which delete objects of every kind: the controller
        // manager may do anything to any resource (not to non-resource
        // paths, and it impersonates no one).
        cluster_role(
            "system:kube-controller-manager",
            defaults.clone(),
            vec![rule(&["*"], &["*"], ALL_VERBS)],
        ),
        cluster_role("system:node", defaults.clone(), node_rules),
        cluster_role(
            "system:node-bootstrapper",
            defaults.clone(),
            vec![rule(
                &["certificates.k8s.io"],
                &["certificatesigningrequests"],
                &["create", "get", "list", "watch"],
            )],
        ),
        binding(
            "cluster-admin",
            "cluster-admin",
            &[("Group", crate::auth::MASTERS)],
        ),
        binding(
            "system:discovery",
            "system:discovery",
            &[("Group", crate::auth::AUTHENTICATED)],
        ),
        binding(
            "system:public-info-viewer",
            "system:public-info-viewer",
            &[
                ("Group", crate::auth::AUTHENTICATED),
                ("Group", crate::auth::UNAUTHENTICATED),
            ],
        ),
        binding(
            "system:dashboard-viewer",
            "system:dashboard-viewer",
            &[("Group", crate::auth::AUTHENTICATED)],
        ),
        binding(
            "system:registry-user",
            "system:registry-user",
            &[("Group", crate::auth::AUTHENTICATED)],
        ),
        binding(
            "system:basic-user",
            "system:basic-user",
            &[("Group", crate::auth::AUTHENTICATED)],
        ),
        binding(
            "system:monitoring",
            "system:monitoring",
            &[("Group", "system:monitoring")],
        ),
        binding(
            "system:kube-scheduler",
            "system:kube-scheduler",
            &[("User", "system:kube-scheduler")],
        ),
        binding(
            "system:kube-controller-manager",
            "system:kube-controller-manager",
            &[("User", "system:kube-controller-manager")],
        ),
        binding("system:node", "system:node", &[("Group", "system:nodes")]),
        binding(
            "system:node-bootstrapper",
            "system:node-bootstrapper",
            &[("Group", crate::auth::csr::BOOTSTRAPPERS)],
        ),
    ]
}

/// Makes the default policy: missing objects are created, ones still
/// marked for autoupdate are brought back to their defaults.
pub(crate) async fn ensure(server: &Arc<ApiServer>) -> Result<(), ApiError> {
    for object in policy() {
        let kind = object["kind"].as_str().unwrap_or_default();
        let plural = if kind == "ClusterRole" {
            "clusterroles"
        } else {
            "clusterrolebindings"
        };
        let rt = registry::lookup(GROUP, "v1", plural).expect("RBAC is served");
        let name = object["metadata"]["name"].as_str().unwrap_or_default();
        match crate::rest::create_internal(server, rt, None, object.clone()).await {
            Ok(_) => {}
            Err(ApiError::AlreadyExists(_)) => {
                crate::rest::reconcile_internal(server, rt, name, None, |current| {
                    if current["metadata"]["annotations"][AUTOUPDATE] != "true" {
                        return None;
                    }
                    let mut wanted = current.clone();
                    for field in ["rules", "aggregationRule", "roleRef", "subjects"] {
                        match object.get(field) {
                            Some(v) => wanted[field] = v.clone(),
                            None => {
                                if let Some(map) = wanted.as_object_mut() {
                                    map.remove(field);
                                }
                            }
                        }
                    }
                    (wanted != *current).then_some(wanted)
                })
                .await?;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
