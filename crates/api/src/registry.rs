//! The resource registry: every kind the API server serves, with its group,
//! version, plural, scope, short names and subresources.
//!
//! This table drives routing, discovery, storage keys and OpenAPI, so adding a
//! kind starts here.

/// A subresource such as `pods/status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subresource {
    Status,
    Scale,
    Binding,
    Finalize,
    /// `pods/log`: proxied to the pod's node agent.
    Log,
    /// `pods/exec`: an upgraded stream proxied to the pod's node agent.
    Exec,
    /// `pods/portforward`: an upgraded stream proxied to the pod's node
    /// agent.
    PortForward,
    /// `pods/attach`: an upgraded stream proxied to the pod's node agent.
    Attach,
    /// `pods/eviction`: a deletion that honours PodDisruptionBudgets.
    Eviction,
    /// `serviceaccounts/token`: the TokenRequest API.
    Token,
    /// `certificatesigningrequests/approval`: approving or denying.
    Approval,
}

impl Subresource {
    pub fn name(self) -> &'static str {
        match self {
            Subresource::Status => "status",
            Subresource::Scale => "scale",
            Subresource::Binding => "binding",
            Subresource::Finalize => "finalize",
            Subresource::Log => "log",
            Subresource::Exec => "exec",
            Subresource::PortForward => "portforward",
            Subresource::Attach => "attach",
            Subresource::Eviction => "eviction",
            Subresource::Token => "token",
            Subresource::Approval => "approval",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Status,
            Self::Scale,
            Self::Binding,
            Self::Finalize,
            Self::Log,
            Self::Exec,
            Self::PortForward,
            Self::Attach,
            Self::Eviction,
            Self::Token,
            Self::Approval,
        ]
        .into_iter()
        .find(|sub| sub.name() == s)
    }
}

/// One served resource type.
#[derive(Debug, PartialEq, Eq)]
pub struct ResourceType {
    /// API group; empty for the core (legacy) group.
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
    pub singular: &'static str,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
    pub categories: &'static [&'static str],
    pub subresources: &'static [Subresource],
    /// What its CustomResourceDefinition says (schema, printer columns),
    /// for custom resources; `None` for the built-in kinds.
    pub custom: Option<&'static crate::custom::CustomType>,
}

impl ResourceType {
    /// `v1` or `apps/v1`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// The kind as code dispatches on it, unique across groups: the kind,
    /// except Knative's Service (`serving.knative.dev`), which is
    /// `knative.Service` so it is never taken for the core Service.
    pub fn id(&self) -> &'static str {
        match (self.group, self.kind) {
            _ if self.custom.is_some() => "custom",
            ("serving.knative.dev", "Service") => "knative.Service",
            (_, kind) => kind,
        }
    }

    /// `Deployment.apps` or `Pod`, as Kubernetes names kinds in messages.
    pub fn qualified_kind(&self) -> String {
        if self.group.is_empty() {
            self.kind.to_owned()
        } else {
            format!("{}.{}", self.kind, self.group)
        }
    }

    /// `deployments.apps` or `pods`, as Kubernetes names resources in messages.
    pub fn qualified_resource(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_owned()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    pub fn has(&self, sub: Subresource) -> bool {
        self.subresources.contains(&sub)
    }

    /// The store key prefix holding every object of this type.
    pub fn key_prefix(&self) -> String {
        let group = if self.group.is_empty() {
            "core"
        } else {
            self.group
        };
        format!("/registry/{group}/{}/", self.plural)
    }

    /// The store key of one object (namespace ignored for cluster-scoped types).
    pub fn key(&self, namespace: Option<&str>, name: &str) -> String {
        match (self.namespaced, namespace) {
            (true, Some(ns)) => format!("{}{ns}/{name}", self.key_prefix()),
            _ => format!("{}{name}", self.key_prefix()),
        }
    }

    /// The key prefix listing one namespace (or everything).
    pub fn list_prefix(&self, namespace: Option<&str>) -> String {
        match (self.namespaced, namespace) {
            (true, Some(ns)) => format!("{}{ns}/", self.key_prefix()),
            _ => self.key_prefix(),
        }
    }
}

use Subresource::*;

const ALL: &[&str] = &["all"];
const GATEWAY_API: &[&str] = &["gateway-api"];
const KNATIVE: &[&str] = &["all", "knative", "serving"];

macro_rules! resource {
    ($group:literal, $version:literal, $kind:literal, $plural:literal, $singular:literal, $namespaced:literal, [$($short:literal),*], $cats:expr, [$($sub:ident),*]) => {
        ResourceType {
            group: $group,
            version: $version,
            kind: $kind,
            plural: $plural,
            singular: $singular,
            namespaced: $namespaced,
            short_names: &[$($short),*],
            categories: $cats,
            subresources: &[$($sub),*],
            custom: None,
        }
    };
}

/// Every served resource type.
pub static RESOURCES: &[ResourceType] = &[
    resource!(
        "",
        "v1",
        "Namespace",
        "namespaces",
        "namespace",
        false,
        ["ns"],
        &[],
        [Status, Finalize]
    ),
    resource!(
        "",
        "v1",
        "Pod",
        "pods",
        "pod",
        true,
        ["po"],
        ALL,
        [Status, Binding, Log, Exec, Attach, PortForward, Eviction]
    ),
    resource!(
        "",
        "v1",
        "Node",
        "nodes",
        "node",
        false,
        ["no"],
        &[],
        [Status]
    ),
    resource!(
        "",
        "v1",
        "Service",
        "services",
        "service",
        true,
        ["svc"],
        ALL,
        [Status]
    ),
    resource!(
        "",
        "v1",
        "Endpoints",
        "endpoints",
        "endpoints",
        true,
        ["ep"],
        &[],
        []
    ),
    resource!(
        "",
        "v1",
        "ConfigMap",
        "configmaps",
        "configmap",
        true,
        ["cm"],
        &[],
        []
    ),
    resource!("", "v1", "Secret", "secrets", "secret", true, [], &[], []),
    resource!(
        "",
        "v1",
        "ResourceQuota",
        "resourcequotas",
        "resourcequota",
        true,
        ["quota"],
        &[],
        [Status]
    ),
    resource!(
        "",
        "v1",
        "LimitRange",
        "limitranges",
        "limitrange",
        true,
        ["limits"],
        &[],
        []
    ),
    resource!(
        "",
        "v1",
        "PersistentVolume",
        "persistentvolumes",
        "persistentvolume",
        false,
        ["pv"],
        &[],
        [Status]
    ),
    resource!(
        "",
        "v1",
        "PersistentVolumeClaim",
        "persistentvolumeclaims",
        "persistentvolumeclaim",
        true,
        ["pvc"],
        &[],
        [Status]
    ),
    resource!("", "v1", "Event", "events", "event", true, ["ev"], &[], []),
    resource!(
        "",
        "v1",
        "ServiceAccount",
        "serviceaccounts",
        "serviceaccount",
        true,
        ["sa"],
        &[],
        [Token]
    ),
    resource!(
        "apps",
        "v1",
        "Deployment",
        "deployments",
        "deployment",
        true,
        ["deploy"],
        ALL,
        [Status, Scale]
    ),
    resource!(
        "apps",
        "v1",
        "ReplicaSet",
        "replicasets",
        "replicaset",
        true,
        ["rs"],
        ALL,
        [Status, Scale]
    ),
    resource!(
        "apps",
        "v1",
        "DaemonSet",
        "daemonsets",
        "daemonset",
        true,
        ["ds"],
        ALL,
        [Status]
    ),
    resource!(
        "apps",
        "v1",
        "StatefulSet",
        "statefulsets",
        "statefulset",
        true,
        ["sts"],
        ALL,
        [Status, Scale]
    ),
    resource!(
        "apps",
        "v1",
        "ControllerRevision",
        "controllerrevisions",
        "controllerrevision",
        true,
        [],
        &[],
        []
    ),
    resource!("batch", "v1", "Job", "jobs", "job", true, [], ALL, [Status]),
    resource!(
        "batch",
        "v1",
        "CronJob",
        "cronjobs",
        "cronjob",
        true,
        ["cj"],
        ALL,
        [Status]
    ),
    resource!(
        "coordination.k8s.io",
        "v1",
        "Lease",
        "leases",
        "lease",
        true,
        [],
        &[],
        []
    ),
    resource!(
        "discovery.k8s.io",
        "v1",
        "EndpointSlice",
        "endpointslices",
        "endpointslice",
        true,
        [],
        &[],
        []
    ),
    resource!(
        "networking.k8s.io",
        "v1",
        "Ingress",
        "ingresses",
        "ingress",
        true,
        ["ing"],
        &[],
        [Status]
    ),
    resource!(
        "networking.k8s.io",
        "v1",
        "NetworkPolicy",
        "networkpolicies",
        "networkpolicy",
        true,
        ["netpol"],
        &[],
        []
    ),
    resource!(
        "networking.k8s.io",
        "v1",
        "IngressClass",
        "ingressclasses",
        "ingressclass",
        false,
        [],
        &[],
        []
    ),
    resource!(
        "gateway.networking.k8s.io",
        "v1",
        "GatewayClass",
        "gatewayclasses",
        "gatewayclass",
        false,
        ["gc"],
        GATEWAY_API,
        [Status]
    ),
    resource!(
        "gateway.networking.k8s.io",
        "v1",
        "Gateway",
        "gateways",
        "gateway",
        true,
        ["gtw"],
        GATEWAY_API,
        [Status]
    ),
    resource!(
        "gateway.networking.k8s.io",
        "v1",
        "HTTPRoute",
        "httproutes",
        "httproute",
        true,
        [],
        GATEWAY_API,
        [Status]
    ),
    resource!(
        "autoscaling",
        "v2",
        "HorizontalPodAutoscaler",
        "horizontalpodautoscalers",
        "horizontalpodautoscaler",
        true,
        ["hpa"],
        ALL,
        [Status]
    ),
    resource!(
        "autoscaling",
        "v1",
        "HorizontalPodAutoscaler",
        "horizontalpodautoscalers",
        "horizontalpodautoscaler",
        true,
        ["hpa"],
        ALL,
        [Status]
    ),
    resource!(
        "policy",
        "v1",
        "PodDisruptionBudget",
        "poddisruptionbudgets",
        "poddisruptionbudget",
        true,
        ["pdb"],
        &[],
        [Status]
    ),
    resource!(
        "serving.knative.dev",
        "v1",
        "Service",
        "services",
        "service",
        true,
        ["kservice", "ksvc"],
        KNATIVE,
        [Status]
    ),
    resource!(
        "serving.knative.dev",
        "v1",
        "Configuration",
        "configurations",
        "configuration",
        true,
        ["config", "cfg"],
        KNATIVE,
        [Status]
    ),
    resource!(
        "serving.knative.dev",
        "v1",
        "Revision",
        "revisions",
        "revision",
        true,
        ["rev"],
        KNATIVE,
        [Status]
    ),
    resource!(
        "serving.knative.dev",
        "v1",
        "Route",
        "routes",
        "route",
        true,
        ["rt"],
        KNATIVE,
        [Status]
    ),
    resource!(
        "node.k8s.io",
        "v1",
        "RuntimeClass",
        "runtimeclasses",
        "runtimeclass",
        false,
        [],
        &[],
        []
    ),
    resource!(
        "storage.k8s.io",
        "v1",
        "StorageClass",
        "storageclasses",
        "storageclass",
        false,
        ["sc"],
        &[],
        []
    ),
    resource!(
        "admissionregistration.k8s.io",
        "v1",
        "MutatingWebhookConfiguration",
        "mutatingwebhookconfigurations",
        "mutatingwebhookconfiguration",
        false,
        [],
        &["api-extensions"],
        []
    ),
    resource!(
        "admissionregistration.k8s.io",
        "v1",
        "ValidatingWebhookConfiguration",
        "validatingwebhookconfigurations",
        "validatingwebhookconfiguration",
        false,
        [],
        &["api-extensions"],
        []
    ),
    resource!(
        "admissionregistration.k8s.io",
        "v1",
        "ValidatingAdmissionPolicy",
        "validatingadmissionpolicies",
        "validatingadmissionpolicy",
        false,
        [],
        &["api-extensions"],
        [Status]
    ),
    resource!(
        "admissionregistration.k8s.io",
        "v1",
        "ValidatingAdmissionPolicyBinding",
        "validatingadmissionpolicybindings",
        "validatingadmissionpolicybinding",
        false,
        [],
        &["api-extensions"],
        []
    ),
    resource!(
        "scheduling.k8s.io",
        "v1",
        "PriorityClass",
        "priorityclasses",
        "priorityclass",
        false,
        ["pc"],
        &[],
        []
    ),
    resource!(
        "rbac.authorization.k8s.io",
        "v1",
        "Role",
        "roles",
        "role",
        true,
        [],
        &[],
        []
    ),
    resource!(
        "rbac.authorization.k8s.io",
        "v1",
        "ClusterRole",
        "clusterroles",
        "clusterrole",
        false,
        [],
        &[],
        []
    ),
    resource!(
        "rbac.authorization.k8s.io",
        "v1",
        "RoleBinding",
        "rolebindings",
        "rolebinding",
        true,
        [],
        &[],
        []
    ),
    resource!(
        "rbac.authorization.k8s.io",
        "v1",
        "ClusterRoleBinding",
        "clusterrolebindings",
        "clusterrolebinding",
        false,
        [],
        &[],
        []
    ),
    resource!(
        "certificates.k8s.io",
        "v1",
        "CertificateSigningRequest",
        "certificatesigningrequests",
        "certificatesigningrequest",
        false,
        ["csr"],
        &[],
        [Status, Approval]
    ),
    // Reviews: asked by creating them, answered in the response, never
    // stored (see `is_review`).
    resource!(
        "authentication.k8s.io",
        "v1",
        "SelfSubjectReview",
        "selfsubjectreviews",
        "selfsubjectreview",
        false,
        [],
        &[],
        []
    ),
    resource!(
        "authorization.k8s.io",
        "v1",
        "SubjectAccessReview",
        "subjectaccessreviews",
        "subjectaccessreview",
        false,
        [],
        &[],
        []
    ),
    resource!(
        "authorization.k8s.io",
        "v1",
        "SelfSubjectAccessReview",
        "selfsubjectaccessreviews",
        "selfsubjectaccessreview",
        false,
        [],
        &[],
        []
    ),
    resource!(
        "authorization.k8s.io",
        "v1",
        "LocalSubjectAccessReview",
        "localsubjectaccessreviews",
        "localsubjectaccessreview",
        true,
        [],
        &[],
        []
    ),
    resource!(
        "authorization.k8s.io",
        "v1",
        "SelfSubjectRulesReview",
        "selfsubjectrulesreviews",
        "selfsubjectrulesreview",
        false,
        [],
        &[],
        []
    ),
    resource!(
        "apiextensions.k8s.io",
        "v1",
        "CustomResourceDefinition",
        "customresourcedefinitions",
        "customresourcedefinition",
        false,
        ["crd", "crds"],
        &["api-extensions"],
        [Status]
    ),
];

/// Whether `rt` is a review (authentication or authorization): only
/// `create` is served, the answer comes back in the response, and nothing
/// is stored.
pub fn is_review(rt: &ResourceType) -> bool {
    matches!(rt.group, "authentication.k8s.io" | "authorization.k8s.io")
}

/// The types CustomResourceDefinitions add, beside the built-in table.
static CUSTOM: std::sync::RwLock<Vec<&'static ResourceType>> = std::sync::RwLock::new(Vec::new());
/// Bumped whenever [`CUSTOM`] changes (discovery and OpenAPI caches key on it).
static CUSTOM_GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn custom() -> Vec<&'static ResourceType> {
    CUSTOM.read().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Serves `types` for the CRD `crd` (replacing what it served before).
pub fn set_custom(crd: &str, types: Vec<&'static ResourceType>) {
    let mut table = CUSTOM.write().unwrap_or_else(|e| e.into_inner());
    table.retain(|t| t.custom.is_none_or(|c| c.crd != crd));
    table.extend(types);
    CUSTOM_GENERATION.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
}

/// Stops serving the types of the CRD `crd`; returns them.
pub fn remove_custom(crd: &str) -> Vec<&'static ResourceType> {
    let mut table = CUSTOM.write().unwrap_or_else(|e| e.into_inner());
    let (gone, kept): (Vec<_>, Vec<_>) = table
        .iter()
        .partition(|t| t.custom.is_some_and(|c| c.crd == crd));
    *table = kept;
    CUSTOM_GENERATION.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    gone
}

/// Changes with every change of the custom types.
pub fn custom_generation() -> u64 {
    CUSTOM_GENERATION.load(std::sync::atomic::Ordering::SeqCst)
}

/// Every served type: the built-in ones, then the custom ones.
pub fn all() -> Vec<&'static ResourceType> {
    RESOURCES.iter().chain(custom()).collect()
}

/// The type served at `group`/`version`/`plural`.
pub fn lookup(group: &str, version: &str, plural: &str) -> Option<&'static ResourceType> {
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.version == version && r.plural == plural)
        .or_else(|| {
            custom()
                .into_iter()
                .find(|r| r.group == group && r.version == version && r.plural == plural)
        })
}

/// The type with this apiVersion and kind.
pub fn by_kind(api_version: &str, kind: &str) -> Option<&'static ResourceType> {
    all()
        .into_iter()
        .find(|r| r.kind == kind && r.api_version() == api_version)
}

/// Whether `group` holds built-in kinds (a CRD may not add to it).
pub fn is_builtin_group(group: &str) -> bool {
    RESOURCES.iter().any(|r| r.group == group)
}

/// The API groups other than core, in a stable order, each with its versions.
pub fn groups() -> Vec<(&'static str, Vec<&'static str>)> {
    let mut out: Vec<(&'static str, Vec<&'static str>)> = Vec::new();
    for r in all().into_iter().filter(|r| !r.group.is_empty()) {
        match out.iter_mut().find(|(g, _)| *g == r.group) {
            Some((_, versions)) if !versions.contains(&r.version) => versions.push(r.version),
            Some(_) => {}
            None => out.push((r.group, vec![r.version])),
        }
    }
    out
}

/// The types served in one group version.
pub fn in_group_version<'a>(
    group: &'a str,
    version: &'a str,
) -> impl Iterator<Item = &'static ResourceType> + 'a {
    all()
        .into_iter()
        .filter(move |r| r.group == group && r.version == version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_nest_by_namespace() {
        let pods = lookup("", "v1", "pods").unwrap();
        assert_eq!(pods.key(Some("ns"), "p"), "/registry/core/pods/ns/p");
        assert_eq!(pods.list_prefix(Some("ns")), "/registry/core/pods/ns/");
        let nodes = lookup("", "v1", "nodes").unwrap();
        assert_eq!(nodes.key(Some("ignored"), "n1"), "/registry/core/nodes/n1");
        let deploy = by_kind("apps/v1", "Deployment").unwrap();
        assert_eq!(deploy.qualified_resource(), "deployments.apps");
    }

    #[test]
    fn plurals_are_unique_per_group_version() {
        for (i, a) in RESOURCES.iter().enumerate() {
            for b in &RESOURCES[i + 1..] {
                assert!(
                    !(a.group == b.group && a.version == b.version && a.plural == b.plural),
                    "{}",
                    a.plural
                );
            }
        }
    }
}
