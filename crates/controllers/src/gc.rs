//! The object graph: metadata-only caches of every served kind, from which
//! sweeps do the garbage collector's work (ownerReferences with background,
//! foreground and orphan propagation) and the namespace controller's (empty a
//! Terminating namespace, then finalize it).
//!
//! The graph indexes owners → dependents and namespaces → contents. A change
//! marks the objects whose outcome it can affect (the object, its owners, its
//! dependents, its namespace) dirty, and a sweep re-evaluates just those, from
//! the current graph, so the work per change does not grow with the cluster
//! and stays level-triggered. Before deleting an object whose owner looks gone
//! it asks the API server for the owner, since caches of different kinds can
//! lag one another.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams,
    PropagationPolicy,
};
use kube::core::PartialObjectMeta;
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use tokio::sync::Notify;
use wasmkube_api::{conversion, registry};

use crate::Error;

const FOREGROUND: &str = "foregroundDeletion";
const ORPHAN: &str = "orphan";
const NAMESPACE_FINALIZER: &str = "kubernetes";

/// What the graph keeps of one object.
#[derive(Clone, Debug)]
struct Node {
    kind: usize,
    namespace: Option<String>,
    name: String,
    resource_version: Option<String>,
    owners: Vec<OwnerReference>,
    finalizers: Vec<String>,
    deleting: bool,
}

#[derive(Default)]
struct Graph {
    objects: HashMap<String, Node>,
    /// Owner uid → dependent uids.
    dependents: HashMap<String, HashSet<String>>,
    /// Namespace name → uids of the objects in it.
    contents: HashMap<String, HashSet<String>>,
    /// Namespace name → its uid.
    namespaces: HashMap<String, String>,
    synced: HashSet<usize>,
    /// Objects to re-evaluate.
    dirty: HashSet<String>,
}

impl Graph {
    /// Marks what a change to `uid` can decide: itself, owners that wait
    /// for their dependents (being deleted), its dependents when it is gone
    /// (their owner is), and its namespace if that is being emptied. Nothing
    /// else is marked, so a change to one of many pods (or a status update
    /// of their ReplicaSet) costs one evaluation, not one per sibling.
    fn mark_related(&mut self, uid: &str, node: &Node, removed: bool) {
        self.dirty.insert(uid.to_owned());
        for o in &node.owners {
            if self.objects.get(&o.uid).is_none_or(|n| n.deleting) {
                self.dirty.insert(o.uid.clone());
            }
        }
        if removed && let Some(deps) = self.dependents.get(uid) {
            self.dirty.extend(deps.iter().cloned());
        }
        if let Some(ns) = node.namespace.as_ref().and_then(|n| self.namespaces.get(n))
            && self.objects.get(ns).is_some_and(|n| n.deleting)
        {
            self.dirty.insert(ns.clone());
        }
    }

    fn insert(&mut self, uid: String, node: Node, namespace_kind: usize) {
        if let Some(old) = self.unindex(&uid) {
            // An owner this object just left (orphaning) may be done waiting.
            for o in &old.owners {
                if self.objects.get(&o.uid).is_some_and(|n| n.deleting) {
                    self.dirty.insert(o.uid.clone());
                }
            }
        }
        for o in &node.owners {
            self.dependents
                .entry(o.uid.clone())
                .or_default()
                .insert(uid.clone());
        }
        if let Some(ns) = &node.namespace {
            self.contents
                .entry(ns.clone())
                .or_default()
                .insert(uid.clone());
        }
        if node.kind == namespace_kind {
            self.namespaces.insert(node.name.clone(), uid.clone());
        }
        self.mark_related(&uid, &node, false);
        self.objects.insert(uid, node);
    }

    fn remove(&mut self, uid: &str) -> Option<Node> {
        let node = self.unindex(uid)?;
        self.mark_related(uid, &node, true);
        Some(node)
    }

    /// Takes an object out of the graph and its indexes.
    fn unindex(&mut self, uid: &str) -> Option<Node> {
        let node = self.objects.remove(uid)?;
        for o in &node.owners {
            if let Some(deps) = self.dependents.get_mut(&o.uid) {
                deps.remove(uid);
                if deps.is_empty() {
                    self.dependents.remove(&o.uid);
                }
            }
        }
        if let Some(ns) = &node.namespace
            && let Some(c) = self.contents.get_mut(ns)
        {
            c.remove(uid);
            if c.is_empty() {
                self.contents.remove(ns);
            }
        }
        if self.namespaces.get(&node.name).is_some_and(|u| u == uid) {
            self.namespaces.remove(&node.name);
        }
        Some(node)
    }

    fn nodes<'a>(&'a self, uids: Option<&'a HashSet<String>>) -> Vec<Node> {
        uids.into_iter()
            .flatten()
            .filter_map(|u| self.objects.get(u).cloned())
            .collect()
    }
}

/// What a sweep needs to decide about one dirty object, copied out of the
/// graph so no lock is held across API calls.
struct Work {
    uid: String,
    node: Node,
    dependents: Vec<Node>,
    /// Some owner is still in the graph.
    owner_present: bool,
    /// For a namespace being deleted: what is still in it.
    contents: Vec<Node>,
}

struct Ctx {
    client: kube::Client,
    kinds: Vec<(ApiResource, bool)>,
    graph: Mutex<Graph>,
    changed: Notify,
    namespace_kind: usize,
}

fn api_resources() -> Vec<(ApiResource, bool)> {
    registry::RESOURCES
        .iter()
        // Each object once: in the version it is stored in.
        .filter(|rt| {
            rt.kind != "Event" && conversion::is_storage_version(rt) && !registry::is_review(rt)
        })
        .map(|rt| {
            let ar = ApiResource {
                group: rt.group.into(),
                version: rt.version.into(),
                api_version: rt.api_version(),
                kind: rt.kind.into(),
                plural: rt.plural.into(),
            };
            (ar, rt.namespaced)
        })
        .collect()
}

impl Ctx {
    fn api(&self, kind: usize, namespace: Option<&str>) -> Api<DynamicObject> {
        let (ar, namespaced) = &self.kinds[kind];
        match (namespaced, namespace) {
            (true, Some(ns)) => Api::namespaced_with(self.client.clone(), ns, ar),
            _ => Api::all_with(self.client.clone(), ar),
        }
    }

    fn kind_of(&self, api_version: &str, kind: &str) -> Option<usize> {
        self.kinds
            .iter()
            .position(|(ar, _)| ar.api_version == api_version && ar.kind == kind)
    }

    async fn delete(&self, node: &Node, policy: PropagationPolicy) -> Result<(), Error> {
        let params = DeleteParams {
            propagation_policy: Some(policy),
            ..Default::default()
        };
        match self
            .api(node.kind, node.namespace.as_deref())
            .delete(&node.name, &params)
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(e) => Err(Error::Kube(e)),
        }
    }

    /// Rewrites metadata guarded by the version we saw (a conflict means the
    /// next sweep sees fresher state).
    async fn patch_meta(&self, node: &Node, meta: serde_json::Value) -> Result<(), Error> {
        let mut meta = meta;
        meta["resourceVersion"] = json!(node.resource_version);
        let patch = Patch::Merge(json!({"metadata": meta}));
        match self
            .api(node.kind, node.namespace.as_deref())
            .patch(&node.name, &PatchParams::default(), &patch)
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(()),
            Err(e) => Err(Error::Kube(e)),
        }
    }

    async fn remove_finalizer(&self, node: &Node, finalizer: &str) -> Result<(), Error> {
        let rest: Vec<&String> = node.finalizers.iter().filter(|f| *f != finalizer).collect();
        self.patch_meta(node, json!({"finalizers": rest})).await
    }

    /// Whether the owner `r` of an object in `namespace` still exists (asked of the API server).
    async fn owner_exists(
        &self,
        r: &OwnerReference,
        namespace: Option<&str>,
    ) -> Result<bool, Error> {
        let api = match self.kind_of(&r.api_version, &r.kind) {
            Some(kind) => {
                let ns = if self.kinds[kind].1 { namespace } else { None };
                self.api(kind, ns)
            }
            // A kind outside the built-in table (a custom resource): the
            // API server's discovery says where it is served, if anywhere.
            None => {
                let (group, version) = r
                    .api_version
                    .split_once('/')
                    .unwrap_or(("", &r.api_version));
                let gvk = kube::api::GroupVersionKind::gvk(group, version, &r.kind);
                match kube::discovery::pinned_kind(&self.client, &gvk).await {
                    Ok((ar, caps)) => match (caps.scope, namespace) {
                        (kube::discovery::Scope::Namespaced, Some(ns)) => {
                            Api::namespaced_with(self.client.clone(), ns, &ar)
                        }
                        _ => Api::all_with(self.client.clone(), &ar),
                    },
                    // Not served (its definition is gone): it cannot exist.
                    Err(kube::Error::Discovery(_)) => return Ok(false),
                    Err(kube::Error::Api(e)) if e.code == 404 => return Ok(false),
                    Err(e) => return Err(Error::Kube(e)),
                }
            }
        };
        match api.get_metadata_opt(&r.name).await {
            Ok(Some(o)) => Ok(o.metadata.uid.as_deref() == Some(r.uid.as_str())),
            Ok(None) => Ok(false),
            Err(e) => Err(Error::Kube(e)),
        }
    }

    /// Takes the dirty set and copies out what deciding each needs.
    fn take_work(&self) -> Vec<Work> {
        let mut g = self.graph.lock().expect("graph lock");
        if g.synced.len() != self.kinds.len() {
            return Vec::new();
        }
        let dirty: Vec<String> = g.dirty.drain().collect();
        dirty
            .into_iter()
            .filter_map(|uid| {
                let node = g.objects.get(&uid)?.clone();
                let contents = if node.kind == self.namespace_kind && node.deleting {
                    g.nodes(g.contents.get(&node.name))
                } else {
                    Vec::new()
                };
                // Only an owner being deleted needs its dependents.
                let dependents = if node.deleting {
                    g.nodes(g.dependents.get(&uid))
                } else {
                    Vec::new()
                };
                Some(Work {
                    dependents,
                    owner_present: node.owners.iter().any(|o| g.objects.contains_key(&o.uid)),
                    contents,
                    uid,
                    node,
                })
            })
            .collect()
    }

    async fn sweep(self: &Arc<Self>) -> Result<(), Error> {
        let work = self.take_work();
        for (i, w) in work.iter().enumerate() {
            if let Err(e) = self.decide(w).await {
                // Whatever was not done is looked at again.
                let mut g = self.graph.lock().expect("graph lock");
                g.dirty.extend(work[i..].iter().map(|w| w.uid.clone()));
                return Err(e);
            }
        }
        Ok(())
    }

    async fn decide(self: &Arc<Self>, w: &Work) -> Result<(), Error> {
        let (uid, node, deps) = (&w.uid, &w.node, &w.dependents);
        if node.deleting && node.finalizers.iter().any(|f| f == ORPHAN) {
            // Orphan: release every dependent, then let the owner go.
            for d in deps {
                let owners: Vec<&OwnerReference> =
                    d.owners.iter().filter(|o| o.uid != *uid).collect();
                self.patch_meta(d, json!({"ownerReferences": owners}))
                    .await?;
            }
            if deps.is_empty() {
                self.remove_finalizer(node, ORPHAN).await?;
            }
        } else if node.deleting && node.finalizers.iter().any(|f| f == FOREGROUND) {
            // Foreground: dependents go first (themselves in the foreground).
            for d in deps.iter().filter(|d| !d.deleting) {
                self.delete(d, PropagationPolicy::Foreground).await?;
            }
            if deps.is_empty() {
                self.remove_finalizer(node, FOREGROUND).await?;
            }
        }
        if !node.owners.is_empty() && !node.deleting && !w.owner_present {
            // Every owner looks gone; confirm before deleting (background).
            let mut gone = true;
            for o in &node.owners {
                if self.owner_exists(o, node.namespace.as_deref()).await? {
                    gone = false;
                    break;
                }
            }
            if gone {
                tracing::debug!(kind = %self.kinds[node.kind].0.kind, name = %node.name, "collecting an object whose owners are gone");
                self.delete(node, PropagationPolicy::Background).await?;
            }
        }
        if node.kind == self.namespace_kind && node.deleting {
            // A namespace being deleted: empty it, then finalize it.
            for o in w.contents.iter().filter(|o| !o.deleting) {
                self.delete(o, PropagationPolicy::Background).await?;
            }
            if w.contents.is_empty() {
                if self.empty_of_custom_resources(&node.name).await? {
                    self.finalize_namespace(&node.name).await?;
                } else {
                    // Custom objects are not in the graph: no event of
                    // theirs wakes the namespace, so look again shortly.
                    let (ctx, uid) = (self.clone(), uid.clone());
                    tokio::spawn(async move {
                        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                        ctx.graph.lock().expect("graph lock").dirty.insert(uid);
                        ctx.changed.notify_one();
                    });
                }
            }
        }
        Ok(())
    }

    /// Deletes the custom resources in the namespace `ns` (the kinds of
    /// CustomResourceDefinitions, found through discovery); true once none
    /// is left.
    async fn empty_of_custom_resources(&self, ns: &str) -> Result<bool, Error> {
        let discovery = kube::discovery::Discovery::new(self.client.clone())
            .run()
            .await
            .map_err(Error::Kube)?;
        let mut empty = true;
        for group in discovery
            .groups()
            .filter(|g| !registry::is_builtin_group(g.name()) && !g.name().is_empty())
        {
            for (ar, caps) in group.recommended_resources() {
                if caps.scope != kube::discovery::Scope::Namespaced
                    || !caps.supports_operation(kube::discovery::verbs::DELETE_COLLECTION)
                {
                    continue;
                }
                let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), ns, &ar);
                match api
                    .delete_collection(&DeleteParams::background(), &ListParams::default())
                    .await
                {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 404 => continue,
                    Err(e) => return Err(Error::Kube(e)),
                }
                // Objects with finalizers stay until those are done.
                let left = api
                    .list_metadata(&ListParams::default().limit(1))
                    .await
                    .map_err(Error::Kube)?;
                if !left.items.is_empty() {
                    tracing::debug!(namespace = ns, kind = %ar.kind, "custom resources left in a namespace being deleted");
                    empty = false;
                }
            }
        }
        Ok(empty)
    }

    async fn finalize_namespace(&self, name: &str) -> Result<(), Error> {
        let api: Api<Namespace> = Api::all(self.client.clone());
        let ns = match api.get(name).await {
            Ok(ns) => ns,
            Err(kube::Error::Api(e)) if e.code == 404 => return Ok(()),
            Err(e) => return Err(Error::Kube(e)),
        };
        let finalizers: Vec<String> = ns
            .spec
            .and_then(|s| s.finalizers)
            .unwrap_or_default()
            .into_iter()
            .filter(|f| f != NAMESPACE_FINALIZER)
            .collect();
        let patch = Patch::Merge(json!({"spec": {"finalizers": finalizers}}));
        match api
            .patch_subresource("finalize", name, &PatchParams::default(), &patch)
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(()),
            Err(e) => Err(Error::Kube(e)),
        }
    }
}

fn node_of(
    kind: usize,
    o: &kube::core::PartialObjectMeta<DynamicObject>,
) -> Option<(String, Node)> {
    let m = &o.metadata;
    Some((
        m.uid.clone()?,
        Node {
            kind,
            namespace: m.namespace.clone(),
            name: m.name.clone()?,
            resource_version: m.resource_version.clone(),
            owners: m.owner_references.clone().unwrap_or_default(),
            finalizers: m.finalizers.clone().unwrap_or_default(),
            deleting: m.deletion_timestamp.is_some(),
        },
    ))
}

/// Runs the garbage collector and the namespace controller until a watch ends.
pub async fn run(client: kube::Client) -> Result<(), Error> {
    let kinds = api_resources();
    let namespace_kind = kinds
        .iter()
        .position(|(ar, _)| ar.api_version == "v1" && ar.kind == "Namespace")
        .expect("namespaces are served");
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        kinds,
        graph: Mutex::default(),
        changed: Notify::new(),
        namespace_kind,
    });
    let mut watches = Vec::new();
    for kind in 0..ctx.kinds.len() {
        let ctx = ctx.clone();
        // Metadata-only requests: the graph needs owners and finalizers, not bodies.
        let api: Api<PartialObjectMeta<DynamicObject>> =
            Api::all_with(client.clone(), &ctx.kinds[kind].0);
        watches.push(async move {
            let mut stream =
                std::pin::pin!(watcher(api, watcher::Config::default()).default_backoff());
            let mut fresh: HashMap<String, Node> = HashMap::new();
            while let Some(event) = stream.next().await {
                let mut g = ctx.graph.lock().expect("graph lock");
                match event {
                    Ok(watcher::Event::Apply(o)) => {
                        if let Some((uid, n)) = node_of(kind, &o) {
                            g.insert(uid, n, namespace_kind);
                        }
                    }
                    Ok(watcher::Event::Delete(o)) => {
                        if let Some(uid) = &o.metadata.uid {
                            g.remove(uid);
                        }
                    }
                    // A relist replaces this kind's objects wholesale.
                    Ok(watcher::Event::Init) => fresh.clear(),
                    Ok(watcher::Event::InitApply(o)) => {
                        if let Some((uid, n)) = node_of(kind, &o) {
                            fresh.insert(uid, n);
                        }
                    }
                    Ok(watcher::Event::InitDone) => {
                        let stale: Vec<String> = g
                            .objects
                            .iter()
                            .filter(|(u, n)| n.kind == kind && !fresh.contains_key(*u))
                            .map(|(u, _)| u.clone())
                            .collect();
                        for uid in stale {
                            g.remove(&uid);
                        }
                        for (uid, n) in fresh.drain() {
                            g.insert(uid, n, namespace_kind);
                        }
                        g.synced.insert(kind);
                        if g.synced.len() == ctx.kinds.len() {
                            // Everything is known now: judge it all once.
                            let all: Vec<String> = g.objects.keys().cloned().collect();
                            g.dirty.extend(all);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "object graph watch error; retrying");
                        continue;
                    }
                }
                drop(g);
                ctx.changed.notify_one();
            }
        });
    }
    let sweeper = {
        let ctx = ctx.clone();
        async move {
            loop {
                ctx.changed.notified().await;
                if let Err(e) = ctx.sweep().await {
                    tracing::warn!(error = %crate::ErrorChain(&e), "garbage collection sweep failed; retrying");
                    // A failed sweep is retried even if nothing else changes.
                    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                    ctx.changed.notify_one();
                }
            }
        }
    };
    tokio::select! {
        _ = futures::future::join_all(watches) => Err(Error::WatchEnded { what: "object graph" }),
        () = sweeper => Ok(()),
    }
}
