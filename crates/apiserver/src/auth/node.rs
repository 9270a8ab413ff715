//! The Node authorizer and NodeRestriction: a node agent (user
//! `system:node:NAME` in group `system:nodes`) reads only what the pods
//! bound to it use, and writes only its own Node, Lease and pods.
//!
//! As in Kubernetes, the decision comes from a graph of the pods bound to
//! each node and the objects they use (Secrets, ConfigMaps,
//! PersistentVolumeClaims and their volumes, service accounts), followed
//! from the store. For a node the authorizer answers first:
//! - Secrets, ConfigMaps, PersistentVolumeClaims: `get` (and `list`/`watch`
//!   narrowed to one name by `fieldSelector=metadata.name=...`) of one its
//!   pods use; PersistentVolumes bound to such claims; tokens
//!   (`serviceaccounts/token`) of service accounts its pods run as. Nothing
//!   else of these kinds, whatever RBAC says.
//! - Pods: `get`, status writes, deletion and eviction only of its own
//!   pods; no pod creation. `list` and `watch` of every pod: the
//!   NetworkPolicy enforcer beside every agent needs each pod's labels and
//!   address, as the node agents of Calico and Cilium read them (a
//!   controller computing address groups for each node, as Antrea's does,
//!   would keep this narrower).
//! - Nodes and Leases in `kube-node-lease`: writes only of its own.
//!
//! Everything else goes on to RBAC (the `system:node` ClusterRole).
//!
//! Two exceptions serve the components every agent runs beside its pods,
//! and are kept narrow: the gateway, which terminates TLS for every
//! Ingress and Gateway of the cluster, may list and watch Secrets of type
//! `kubernetes.io/tls` (and no other type). And every node may read the
//! node-proxy token with which the API server calls agents.
//!
//! The graph lags the store by a moment: a refusal that the graph gives
//! (a pod just bound, a Secret it names) is checked again against the
//! store before it is final ([`Auth::recheck`](super::Auth)).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use serde_json::Value;
use wasmkube_api::registry;
use wasmkube_store::SharedStore;

use super::{Attributes, ResourceAttributes, UserInfo};
use crate::error::{ApiError, Subject};
use crate::follow::{Change, Follow};

/// The group of node agents.
pub const NODES: &str = "system:nodes";
/// Where each node renews its heartbeat Lease (named after the node).
const LEASE_NAMESPACE: &str = "kube-node-lease";
/// The Secret holding the token the API server presents to agents.
const PROXY_TOKEN: (&str, &str) = ("kube-system", "wasmkube-node-proxy");

/// The node a user is, when it is one.
pub(crate) fn node_of(user: &UserInfo) -> Option<&str> {
    user.name
        .strip_prefix("system:node:")
        .filter(|n| !n.is_empty() && user.groups.iter().any(|g| g == NODES))
}

/// What the node authorizer says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    Allow,
    Deny,
    /// Denied because the graph relates the object to no pod of the node;
    /// the store may know better (see [`NodeAuthorizer::recheck`]).
    Unrelated,
    /// Not the node authorizer's to decide: RBAC decides.
    NoOpinion,
}

/// The kinds of object a pod uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Used {
    Secret,
    ConfigMap,
    Claim,
    ServiceAccount,
}

/// What one bound pod is and uses.
#[derive(Clone, Debug, Default, PartialEq)]
struct PodUse {
    node: String,
    uses: Vec<(Used, String)>,
}

/// What every pod uses, read from its spec.
fn pod_use(pod: &Value) -> PodUse {
    let spec = &pod["spec"];
    let mut uses = HashSet::new();
    let mut add = |kind, name: &Value| {
        if let Some(n) = name.as_str().filter(|n| !n.is_empty()) {
            uses.insert((kind, n.to_owned()));
        }
    };
    add(
        Used::ServiceAccount,
        spec.get("serviceAccountName")
            .unwrap_or(&Value::String("default".into())),
    );
    for s in spec["imagePullSecrets"].as_array().into_iter().flatten() {
        add(Used::Secret, &s["name"]);
    }
    for v in spec["volumes"].as_array().into_iter().flatten() {
        add(Used::Secret, &v["secret"]["secretName"]);
        add(Used::ConfigMap, &v["configMap"]["name"]);
        add(Used::Claim, &v["persistentVolumeClaim"]["claimName"]);
        add(Used::Secret, &v["csi"]["nodePublishSecretRef"]["name"]);
        for source in v["projected"]["sources"].as_array().into_iter().flatten() {
            add(Used::Secret, &source["secret"]["name"]);
            add(Used::ConfigMap, &source["configMap"]["name"]);
        }
    }
    let containers = ["initContainers", "containers", "ephemeralContainers"]
        .iter()
        .flat_map(|k| spec[*k].as_array().into_iter().flatten());
    for c in containers {
        for e in c["env"].as_array().into_iter().flatten() {
            add(Used::Secret, &e["valueFrom"]["secretKeyRef"]["name"]);
            add(Used::ConfigMap, &e["valueFrom"]["configMapKeyRef"]["name"]);
        }
        for e in c["envFrom"].as_array().into_iter().flatten() {
            add(Used::Secret, &e["secretRef"]["name"]);
            add(Used::ConfigMap, &e["configMapRef"]["name"]);
        }
    }
    let mut uses: Vec<_> = uses.into_iter().collect();
    uses.sort_by(|a, b| a.1.cmp(&b.1));
    PodUse {
        node: spec["nodeName"].as_str().unwrap_or_default().to_owned(),
        uses,
    }
}

/// (namespace, name)
type Named = (String, String);

/// The pods bound to nodes and what they use.
#[derive(Default)]
struct Graph {
    /// Bound pods (namespace, name) → their node and what they use.
    pods: HashMap<Named, PodUse>,
    /// (kind, namespace, name) → node → how many of its pods use it.
    used: HashMap<(Used, String, String), HashMap<String, usize>>,
    /// Bound claims (namespace, name) → their PersistentVolume.
    volumes: HashMap<Named, String>,
}

impl Graph {
    fn set_pod(&mut self, key: Named, pod: Option<PodUse>) {
        if let Some(old) = self.pods.remove(&key) {
            for (kind, name) in &old.uses {
                let k = (*kind, key.0.clone(), name.clone());
                if let Some(nodes) = self.used.get_mut(&k) {
                    if let Some(n) = nodes.get_mut(&old.node) {
                        *n -= 1;
                        if *n == 0 {
                            nodes.remove(&old.node);
                        }
                    }
                    if nodes.is_empty() {
                        self.used.remove(&k);
                    }
                }
            }
        }
        let Some(pod) = pod.filter(|p| !p.node.is_empty()) else {
            return;
        };
        for (kind, name) in &pod.uses {
            *self
                .used
                .entry((*kind, key.0.clone(), name.clone()))
                .or_default()
                .entry(pod.node.clone())
                .or_default() += 1;
        }
        self.pods.insert(key, pod);
    }

    fn uses(&self, node: &str, kind: Used, namespace: &str, name: &str) -> bool {
        self.used
            .get(&(kind, namespace.to_owned(), name.to_owned()))
            .is_some_and(|nodes| nodes.contains_key(node))
    }

    /// Whether `volume` is bound to a claim a pod of `node` uses.
    fn uses_volume(&self, node: &str, volume: &str) -> bool {
        self.volumes
            .iter()
            .any(|((ns, claim), pv)| pv == volume && self.uses(node, Used::Claim, ns, claim))
    }
}

fn named(obj: &Value) -> Named {
    let meta = &obj["metadata"];
    (
        meta["namespace"].as_str().unwrap_or_default().to_owned(),
        meta["name"].as_str().unwrap_or_default().to_owned(),
    )
}

/// `(namespace, name)` of a store key `PREFIX/NAMESPACE/NAME`.
fn named_key(prefix: &str, key: &str) -> Named {
    let rest = key.strip_prefix(prefix).unwrap_or(key);
    let (ns, name) = rest.split_once('/').unwrap_or(("", rest));
    (ns.to_owned(), name.to_owned())
}

/// The node authorizer: the graph kept in step with the store.
pub(crate) struct NodeAuthorizer {
    graph: Arc<RwLock<Graph>>,
    store: SharedStore,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for NodeAuthorizer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn rt(plural: &str) -> &'static registry::ResourceType {
    registry::lookup("", "v1", plural).expect("a core kind")
}

impl NodeAuthorizer {
    /// Builds the graph from the stored pods and claims, and follows them.
    pub(crate) async fn start(store: SharedStore) -> Self {
        let graph = Arc::new(RwLock::new(Graph::default()));
        let pods_prefix = rt("pods").key_prefix();
        let claims_prefix = rt("persistentvolumeclaims").key_prefix();
        let (mut pods, objects, _) =
            Follow::start(store.clone(), pods_prefix.clone(), "the pods").await;
        {
            let mut g = graph.write().expect("not poisoned");
            for (_, pod) in &objects {
                g.set_pod(named(pod), Some(pod_use(pod)));
            }
        }
        let (mut claims, objects, _) =
            Follow::start(store.clone(), claims_prefix.clone(), "the claims").await;
        {
            let mut g = graph.write().expect("not poisoned");
            for (_, claim) in &objects {
                set_claim(&mut g, named(claim), Some(claim));
            }
        }
        let pod_graph = graph.clone();
        let pods_task = tokio::spawn(async move {
            loop {
                let change = pods.next().await;
                let mut g = pod_graph.write().expect("not poisoned");
                match change {
                    Change::Reset { objects, .. } => {
                        g.pods.clear();
                        g.used.clear();
                        for (_, pod) in &objects {
                            g.set_pod(named(pod), Some(pod_use(pod)));
                        }
                    }
                    Change::Put { object, .. } => g.set_pod(named(&object), Some(pod_use(&object))),
                    Change::Delete { key, .. } => g.set_pod(named_key(&pods_prefix, &key), None),
                }
            }
        });
        let claim_graph = graph.clone();
        let claims_task = tokio::spawn(async move {
            loop {
                let change = claims.next().await;
                let mut g = claim_graph.write().expect("not poisoned");
                match change {
                    Change::Reset { objects, .. } => {
                        g.volumes.clear();
                        for (_, claim) in &objects {
                            set_claim(&mut g, named(claim), Some(claim));
                        }
                    }
                    Change::Put { object, .. } => set_claim(&mut g, named(&object), Some(&object)),
                    Change::Delete { key, .. } => {
                        set_claim(&mut g, named_key(&claims_prefix, &key), None)
                    }
                }
            }
        });
        Self {
            graph,
            store,
            tasks: vec![pods_task, claims_task],
        }
    }

    /// The verdict on a request of a node (`None`: the user is no node).
    pub(crate) fn decide(&self, attrs: &Attributes) -> Option<Verdict> {
        let node = node_of(&attrs.user)?;
        let Some(r) = &attrs.resource else {
            return Some(Verdict::NoOpinion);
        };
        let graph = self.graph.read().expect("not poisoned");
        Some(decide(&graph, node, &attrs.verb, r))
    }

    /// Decides again a request refused as [`Verdict::Unrelated`], from the
    /// store itself: `Allow` when the object is used by a pod bound to the
    /// node now; for a pod, `NoOpinion` (RBAC decides) when it is the
    /// node's or does not exist; else `Deny`.
    pub(crate) async fn recheck(&self, attrs: &Attributes) -> Verdict {
        let (Some(node), Some(r)) = (node_of(&attrs.user), &attrs.resource) else {
            return Verdict::Deny;
        };
        if (r.group.as_str(), r.resource.as_str()) == ("", "persistentvolumes")
            && let Some(name) = r.name.as_deref()
        {
            return match self
                .store
                .get(&rt("persistentvolumes").key(None, name))
                .await
            {
                Ok(Some(kv)) if pinned_to(&kv, node) => Verdict::Allow,
                _ => Verdict::Deny,
            };
        }
        let (Some(ns), Some(name)) = (r.namespace.as_deref(), r.name.as_deref()) else {
            return Verdict::Deny;
        };
        let used = match (r.group.as_str(), r.resource.as_str()) {
            ("", "pods") => {
                let mine = match self.store.get(&rt("pods").key(Some(ns), name)).await {
                    Ok(None) => true,
                    Ok(Some(kv)) => crate::storage::decode_stored(&kv)
                        .is_ok_and(|p| p["spec"]["nodeName"] == node),
                    Err(_) => false,
                };
                return if mine {
                    Verdict::NoOpinion
                } else {
                    Verdict::Deny
                };
            }
            ("", "secrets") => Used::Secret,
            ("", "configmaps") => Used::ConfigMap,
            ("", "persistentvolumeclaims") => Used::Claim,
            ("", "serviceaccounts") => Used::ServiceAccount,
            _ => return Verdict::Deny,
        };
        let Ok(list) = self
            .store
            .list(
                &rt("pods").list_prefix(Some(ns)),
                wasmkube_store::ListOptions::default(),
            )
            .await
        else {
            return Verdict::Deny;
        };
        let used = list.items.iter().any(|kv| {
            crate::storage::decode_stored(kv).is_ok_and(|p| {
                let u = pod_use(&p);
                u.node == node && u.uses.contains(&(used, name.to_owned()))
            })
        });
        if used { Verdict::Allow } else { Verdict::Deny }
    }
}

/// Whether a stored PersistentVolume is a local volume on `node`.
fn pinned_to(kv: &wasmkube_store::KeyValue, node: &str) -> bool {
    crate::storage::decode_stored(kv)
        .ok()
        .and_then(|v| serde_json::from_value(v).ok())
        .is_some_and(|pv| wasmkube_api::storage::pinned_node(&pv) == Some(node))
}

fn set_claim(g: &mut Graph, key: Named, claim: Option<&Value>) {
    match claim.and_then(|c| c["spec"]["volumeName"].as_str().filter(|v| !v.is_empty())) {
        Some(volume) => {
            g.volumes.insert(key, volume.to_owned());
        }
        None => {
            g.volumes.remove(&key);
        }
    }
}

fn is_read(verb: &str) -> bool {
    matches!(verb, "get" | "list" | "watch")
}

fn decide(graph: &Graph, node: &str, verb: &str, r: &ResourceAttributes) -> Verdict {
    use Verdict::*;
    let ns = r.namespace.as_deref().unwrap_or_default();
    let name = r.name.as_deref();
    let sub = r.subresource.as_deref();
    let related = |kind| match name {
        Some(name) if graph.uses(node, kind, ns, name) => Allow,
        Some(_) => Unrelated,
        None => Deny,
    };
    match (r.group.as_str(), r.resource.as_str(), sub) {
        ("", "secrets", None) if is_read(verb) => {
            if name.is_none() && verb != "get" && r.field("type").as_deref() == Some(TLS_SECRET) {
                return Allow;
            }
            if (ns, name) == (PROXY_TOKEN.0, Some(PROXY_TOKEN.1)) && verb == "get" {
                return Allow;
            }
            related(Used::Secret)
        }
        ("", "configmaps", None) if is_read(verb) => related(Used::ConfigMap),
        ("", "persistentvolumeclaims", None) if is_read(verb) => related(Used::Claim),
        ("", "secrets" | "configmaps" | "persistentvolumeclaims", _) => NoOpinion,
        ("", "persistentvolumes", None) => match (verb, name) {
            ("get" | "list" | "watch", Some(pv)) if graph.uses_volume(node, pv) => Allow,
            // The local-path volumes provisioned on the node, which it keeps.
            ("list" | "watch", None)
                if r.label(wasmkube_api::storage::LOCAL_PATH_NODE_LABEL)
                    .as_deref()
                    == Some(node) =>
            {
                Allow
            }
            // A local volume on this node, which the node keeps and finally
            // removes: the store decides.
            ("get" | "update" | "patch", Some(_)) => Unrelated,
            _ => Deny,
        },
        ("", "serviceaccounts", Some("token")) if verb == "create" => related(Used::ServiceAccount),
        ("", "pods", _) => match (verb, sub) {
            // Every pod's labels and address, for NetworkPolicy (and the
            // activator's revisions); RBAC's `system:node` grants the rest.
            ("list" | "watch", None) => NoOpinion,
            ("create" | "deletecollection", None) => Deny,
            ("get" | "update" | "patch" | "delete", None)
            | ("get" | "update" | "patch", Some("status"))
            | ("create", Some("eviction")) => {
                let key = (ns.to_owned(), name.unwrap_or_default().to_owned());
                match graph.pods.get(&key) {
                    Some(p) if p.node == node => NoOpinion,
                    // Another node's, or unbound; or not seen yet: the
                    // store decides.
                    _ => Unrelated,
                }
            }
            _ => NoOpinion,
        },
        ("", "nodes", None | Some("status")) => match verb {
            "update" | "patch" | "delete" if name != Some(node) => Deny,
            "deletecollection" => Deny,
            _ => NoOpinion,
        },
        ("coordination.k8s.io", "leases", None) if ns == LEASE_NAMESPACE => match verb {
            "update" | "patch" | "delete" if name != Some(node) => Deny,
            "deletecollection" => Deny,
            _ => NoOpinion,
        },
        _ => NoOpinion,
    }
}

/// The type of the Secrets the gateway reads.
const TLS_SECRET: &str = "kubernetes.io/tls";

/// NodeRestriction at creation (where the name is in the body): a node
/// creates only its own Node and Lease, and no pods.
pub(crate) fn admit_create(
    user: Option<&UserInfo>,
    rt: &registry::ResourceType,
    namespace: Option<&str>,
    name: &str,
) -> Result<(), ApiError> {
    let Some(node) = user.and_then(node_of) else {
        return Ok(());
    };
    let refuse = |message: String| {
        Err(ApiError::Forbidden {
            subject: Subject::of(rt, name),
            message: format!("{} \"{name}\" is forbidden: {message}", rt.plural),
        })
    };
    match (rt.group, rt.plural) {
        ("", "nodes") if name != node => refuse(format!(
            "node \"{node}\" is not allowed to modify node \"{name}\""
        )),
        ("coordination.k8s.io", "leases") if namespace == Some(LEASE_NAMESPACE) && name != node => {
            refuse("can only access node lease with the same name as the requesting node".into())
        }
        ("", "pods") => refuse(format!(
            "node \"{node}\" can only create mirror pods, and this cluster has none"
        )),
        _ => Ok(()),
    }
}

/// The labels a node may set on itself among Kubernetes' own
/// (`kubernetes.io`, `k8s.io`): the kubelet's.
const KUBELET_LABELS: &[&str] = &[
    "kubernetes.io/hostname",
    "kubernetes.io/os",
    "kubernetes.io/arch",
    "beta.kubernetes.io/os",
    "beta.kubernetes.io/arch",
    "beta.kubernetes.io/instance-type",
    "node.kubernetes.io/instance-type",
    "failure-domain.beta.kubernetes.io/zone",
    "failure-domain.beta.kubernetes.io/region",
    "topology.kubernetes.io/zone",
    "topology.kubernetes.io/region",
];

/// Whether a node may set (or change, or remove) label `key` on itself:
/// never under `node-restriction.kubernetes.io` (labels the administrator
/// sets to steer workloads, which a node must not claim), and of
/// Kubernetes' own namespaces only the kubelet's labels and its
/// `kubelet.kubernetes.io` and `node.kubernetes.io` namespaces.
fn node_may_label(key: &str) -> bool {
    let Some((namespace, _)) = key.split_once('/') else {
        return true;
    };
    let under = |domain: &str| namespace == domain || namespace.ends_with(&format!(".{domain}"));
    if under("node-restriction.kubernetes.io") {
        return false;
    }
    if !(under("kubernetes.io") || under("k8s.io")) {
        return true;
    }
    KUBELET_LABELS.contains(&key) || under("kubelet.kubernetes.io") || under("node.kubernetes.io")
}

/// NodeRestriction of a node's own Node object, created (`old` `None`) or
/// updated: no labels it may not set, and (on update) no change to its
/// taints, which would let it draw workloads kept away from it.
pub(crate) fn admit_node_object(
    user: Option<&UserInfo>,
    rt: &registry::ResourceType,
    old: Option<&Value>,
    new: &Value,
) -> Result<(), ApiError> {
    let Some(node) = user.and_then(node_of) else {
        return Ok(());
    };
    if (rt.group, rt.plural) != ("", "nodes") {
        return Ok(());
    }
    let name = new["metadata"]["name"].as_str().unwrap_or_default();
    let refuse = |message: String| {
        Err(ApiError::Forbidden {
            subject: Subject::of(rt, name),
            message: format!("nodes \"{name}\" is forbidden: {message}"),
        })
    };
    let labels = |v: Option<&Value>| -> HashMap<String, Value> {
        v.and_then(|v| v["metadata"]["labels"].as_object())
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default()
    };
    let (before, after) = (labels(old), labels(Some(new)));
    let mut forbidden: Vec<&String> = before
        .keys()
        .chain(after.keys())
        .filter(|k| before.get(*k) != after.get(*k) && !node_may_label(k))
        .collect();
    forbidden.sort();
    forbidden.dedup();
    if !forbidden.is_empty() {
        let list = forbidden
            .iter()
            .map(|k| k.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        return match old {
            None => refuse(format!(
                "node \"{node}\" is not allowed to set the following labels: {list}"
            )),
            Some(_) => refuse(format!(
                "node \"{node}\" is not allowed to modify labels: {list}"
            )),
        };
    }
    if let Some(old) = old {
        let taints = |v: &Value| match &v["spec"]["taints"] {
            Value::Array(a) if !a.is_empty() => Value::Array(a.clone()),
            _ => Value::Null,
        };
        if taints(old) != taints(new) {
            return refuse(format!("node \"{node}\" is not allowed to modify taints"));
        }
    }
    Ok(())
}

/// NodeRestriction of a TokenRequest: a node asks only for tokens bound to
/// one of its own pods, which runs as the service account.
pub(crate) fn admit_token(
    user: Option<&UserInfo>,
    account: &str,
    bound: &Value,
    bound_object: Option<&Value>,
) -> Result<(), ApiError> {
    let Some(node) = user.and_then(node_of) else {
        return Ok(());
    };
    let refuse = |message: &str| {
        Err(ApiError::Forbidden {
            subject: Subject {
                group: String::new(),
                kind: "serviceaccounts".into(),
                name: account.into(),
            },
            message: format!("serviceaccounts \"{account}\" is forbidden: {message}"),
        })
    };
    if bound["kind"] != "Pod" {
        return refuse("node requested token not bound to a pod");
    }
    let Some(pod) = bound_object else {
        return refuse("node requested token bound to a pod that does not exist");
    };
    if pod["spec"]["nodeName"] != node {
        return refuse("node requested token bound to a pod scheduled on a different node");
    }
    if pod["spec"]["serviceAccountName"]
        .as_str()
        .unwrap_or("default")
        != account
    {
        return refuse("node requested token for a service account its pod does not run as");
    }
    Ok(())
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_node_sets_only_the_kubelet_s_labels_of_kubernetes_own() {
        for ok in [
            "app",
            "example.com/rack",
            "kubernetes.io/hostname",
            "topology.kubernetes.io/zone",
            "node.kubernetes.io/exclude-from-external-load-balancers",
            "kubelet.kubernetes.io/x",
        ] {
            assert!(node_may_label(ok), "{ok}");
        }
        for refused in [
            "node-restriction.kubernetes.io/trusted",
            "team.node-restriction.kubernetes.io/x",
            "node-role.kubernetes.io/control-plane",
            "kubernetes.io/role",
            "k8s.io/anything",
        ] {
            assert!(!node_may_label(refused), "{refused}");
        }
    }
    use super::*;
    use serde_json::json;

    fn graph() -> Graph {
        let mut g = Graph::default();
        let pod = json!({"metadata": {"namespace": "a", "name": "p1"}, "spec": {
            "nodeName": "n1", "serviceAccountName": "runner",
            "imagePullSecrets": [{"name": "pull"}],
            "volumes": [
                {"name": "v", "secret": {"secretName": "vol"}},
                {"name": "c", "persistentVolumeClaim": {"claimName": "data"}},
                {"name": "t", "projected": {"sources": [{"configMap": {"name": "kube-root-ca.crt"}}]}},
            ],
            "containers": [{"name": "c", "env": [{"name": "E", "valueFrom": {"secretKeyRef": {"name": "env", "key": "k"}}}],
                "envFrom": [{"configMapRef": {"name": "settings"}}]}],
        }});
        g.set_pod(named(&pod), Some(pod_use(&pod)));
        let unbound = json!({"metadata": {"namespace": "a", "name": "p2"}, "spec": {
            "volumes": [{"name": "v", "secret": {"secretName": "other"}}]}});
        g.set_pod(named(&unbound), Some(pod_use(&unbound)));
        set_claim(
            &mut g,
            ("a".into(), "data".into()),
            Some(&json!({"spec": {"volumeName": "pv-1"}})),
        );
        g
    }

    fn attrs(
        verb: &str,
        resource: &str,
        ns: Option<&str>,
        name: Option<&str>,
    ) -> (String, ResourceAttributes) {
        (
            verb.into(),
            ResourceAttributes {
                group: String::new(),
                resource: resource.into(),
                namespace: ns.map(Into::into),
                name: name.map(Into::into),
                ..Default::default()
            },
        )
    }

    #[test]
    fn a_node_reads_what_its_pods_use_and_nothing_else() {
        let g = graph();
        let d = |node: &str, (verb, r): (String, ResourceAttributes)| decide(&g, node, &verb, &r);
        for secret in ["pull", "vol", "env"] {
            assert_eq!(
                d("n1", attrs("get", "secrets", Some("a"), Some(secret))),
                Verdict::Allow,
                "{secret}"
            );
            assert_eq!(
                d("n2", attrs("get", "secrets", Some("a"), Some(secret))),
                Verdict::Unrelated,
                "{secret}"
            );
            assert_eq!(
                d("n1", attrs("get", "secrets", Some("b"), Some(secret))),
                Verdict::Unrelated,
                "{secret}"
            );
        }
        assert_eq!(
            d("n1", attrs("get", "secrets", Some("a"), Some("other"))),
            Verdict::Unrelated
        );
        assert_eq!(
            d("n1", attrs("list", "secrets", Some("a"), None)),
            Verdict::Deny
        );
        assert_eq!(
            d("n1", attrs("update", "secrets", Some("a"), Some("vol"))),
            Verdict::NoOpinion
        );
        for cm in ["kube-root-ca.crt", "settings"] {
            assert_eq!(
                d("n1", attrs("get", "configmaps", Some("a"), Some(cm))),
                Verdict::Allow
            );
        }
        assert_eq!(
            d(
                "n1",
                attrs("get", "persistentvolumeclaims", Some("a"), Some("data"))
            ),
            Verdict::Allow
        );
        assert_eq!(
            d("n1", attrs("get", "persistentvolumes", None, Some("pv-1"))),
            Verdict::Allow
        );
        // Another node's: only a local volume on n2 would be (the store
        // decides); a list is refused unless narrowed to n2's local volumes.
        assert_eq!(
            d("n2", attrs("get", "persistentvolumes", None, Some("pv-1"))),
            Verdict::Unrelated
        );
        let (_, mut local) = attrs("list", "persistentvolumes", None, None);
        assert_eq!(decide(&g, "n2", "list", &local), Verdict::Deny);
        local.label_selector = Some("wasmkube.io/local-path-node=n2".into());
        assert_eq!(decide(&g, "n2", "list", &local), Verdict::Allow);
        assert_eq!(decide(&g, "n1", "list", &local), Verdict::Deny);
        let (_, mut token) = attrs("create", "serviceaccounts", Some("a"), Some("runner"));
        token.subresource = Some("token".into());
        assert_eq!(decide(&g, "n1", "create", &token), Verdict::Allow);
        token.name = Some("default".into());
        assert_eq!(decide(&g, "n1", "create", &token), Verdict::Unrelated);
        // The gateway's TLS Secrets, by type only.
        let (_, mut tls) = attrs("watch", "secrets", None, None);
        tls.field_selector = Some("type=kubernetes.io/tls".into());
        assert_eq!(decide(&g, "n2", "watch", &tls), Verdict::Allow);
        tls.field_selector = Some("type=Opaque".into());
        assert_eq!(decide(&g, "n2", "watch", &tls), Verdict::Deny);
    }

    #[test]
    fn a_node_sees_and_writes_only_its_own_pods_node_and_lease() {
        let g = graph();
        let d = |node: &str, verb: &str, r: ResourceAttributes| decide(&g, node, verb, &r);
        // Every pod is listed and watched, for NetworkPolicy peers.
        let (_, pods) = attrs("list", "pods", None, None);
        assert_eq!(d("n1", "list", pods.clone()), Verdict::NoOpinion);
        assert_eq!(d("n2", "watch", pods), Verdict::NoOpinion);
        assert_eq!(
            d("n2", "get", attrs("get", "pods", Some("a"), Some("p1")).1),
            Verdict::Unrelated
        );
        let (_, mut status) = attrs("patch", "pods", Some("a"), Some("p1"));
        status.subresource = Some("status".into());
        assert_eq!(d("n1", "patch", status.clone()), Verdict::NoOpinion);
        assert_eq!(d("n2", "patch", status.clone()), Verdict::Unrelated);
        assert_eq!(
            d(
                "n2",
                "delete",
                attrs("delete", "pods", Some("a"), Some("p1")).1
            ),
            Verdict::Unrelated
        );
        assert_eq!(
            d("n1", "create", attrs("create", "pods", Some("a"), None).1),
            Verdict::Deny
        );
        assert_eq!(
            d("n1", "patch", attrs("patch", "nodes", None, Some("n1")).1),
            Verdict::NoOpinion
        );
        assert_eq!(
            d("n1", "patch", attrs("patch", "nodes", None, Some("n2")).1),
            Verdict::Deny
        );
        assert_eq!(
            d("n1", "get", attrs("get", "nodes", None, Some("n2")).1),
            Verdict::NoOpinion
        );
        let mut lease = attrs("update", "leases", Some(LEASE_NAMESPACE), Some("n2")).1;
        lease.group = "coordination.k8s.io".into();
        assert_eq!(d("n1", "update", lease.clone()), Verdict::Deny);
        lease.name = Some("n1".into());
        assert_eq!(d("n1", "update", lease), Verdict::NoOpinion);
    }

    #[test]
    fn the_graph_forgets_what_deleted_or_moved_pods_used() {
        let mut g = graph();
        let key = ("a".to_owned(), "p1".to_owned());
        assert!(g.uses("n1", Used::Secret, "a", "vol"));
        g.set_pod(key.clone(), None);
        assert!(!g.uses("n1", Used::Secret, "a", "vol"));
        assert!(g.used.is_empty(), "{:?}", g.used);
        let user = UserInfo::authenticated("system:node:n1", "", &[NODES.to_owned()]);
        assert_eq!(node_of(&user), Some("n1"));
        assert_eq!(
            node_of(&UserInfo::authenticated("system:node:n1", "", &[])),
            None
        );
    }
}
