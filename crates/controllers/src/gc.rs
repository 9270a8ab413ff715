//! The object graph: metadata-only caches of every served kind, from which
//! one sweep does the garbage collector's work (ownerReferences with
//! background, foreground and orphan propagation) and the namespace
//! controller's (empty a Terminating namespace, then finalize it).
//!
//! A sweep re-evaluates the whole graph each time anything changes (events
//! that arrive during a sweep coalesce into one more sweep), so it is
//! level-triggered. Before deleting an object whose owner looks gone it asks
//! the API server for the owner, since caches of different kinds can lag one
//! another.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PropagationPolicy,
};
use kube::core::PartialObjectMeta;
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use tokio::sync::Notify;
use wasmkube_api::registry;

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
    synced: HashSet<usize>,
}

struct Ctx {
    client: kube::Client,
    kinds: Vec<(ApiResource, bool)>,
    graph: Mutex<Graph>,
    changed: Notify,
}

fn api_resources() -> Vec<(ApiResource, bool)> {
    registry::RESOURCES
        .iter()
        .filter(|rt| rt.kind != "Event")
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
        let Some(kind) = self.kind_of(&r.api_version, &r.kind) else {
            // An owner of a kind we do not serve cannot exist here.
            return Ok(false);
        };
        let ns = if self.kinds[kind].1 { namespace } else { None };
        match self.api(kind, ns).get_metadata_opt(&r.name).await {
            Ok(Some(o)) => Ok(o.metadata.uid.as_deref() == Some(r.uid.as_str())),
            Ok(None) => Ok(false),
            Err(e) => Err(Error::Kube(e)),
        }
    }

    async fn sweep(&self) -> Result<(), Error> {
        let (objects, all_synced) = {
            let g = self.graph.lock().expect("graph lock");
            (g.objects.clone(), g.synced.len() == self.kinds.len())
        };
        if !all_synced {
            return Ok(());
        }
        let mut dependents: HashMap<&str, Vec<&Node>> = HashMap::new();
        for node in objects.values() {
            for o in &node.owners {
                dependents.entry(o.uid.as_str()).or_default().push(node);
            }
        }
        let mut by_namespace: BTreeMap<&str, usize> = BTreeMap::new();
        for node in objects.values() {
            if let Some(ns) = node.namespace.as_deref() {
                *by_namespace.entry(ns).or_default() += 1;
            }
        }
        for (uid, node) in &objects {
            let deps = dependents
                .get(uid.as_str())
                .map(Vec::as_slice)
                .unwrap_or_default();
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
            if !node.owners.is_empty()
                && !node.deleting
                && node.owners.iter().all(|o| !objects.contains_key(&o.uid))
            {
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
        }
        // Namespaces being deleted: empty them, then finalize.
        let ns_kind = self
            .kind_of("v1", "Namespace")
            .expect("namespaces are served");
        for node in objects.values().filter(|n| n.kind == ns_kind && n.deleting) {
            let inside: Vec<&Node> = objects
                .values()
                .filter(|o| o.namespace.as_deref() == Some(node.name.as_str()))
                .collect();
            for o in inside.iter().filter(|o| !o.deleting) {
                self.delete(o, PropagationPolicy::Background).await?;
            }
            if by_namespace.get(node.name.as_str()).copied().unwrap_or(0) == 0 {
                let api: Api<Namespace> = Api::all(self.client.clone());
                let ns = api.get(&node.name).await.map_err(Error::Kube)?;
                let finalizers: Vec<String> = ns
                    .spec
                    .and_then(|s| s.finalizers)
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|f| f != NAMESPACE_FINALIZER)
                    .collect();
                let patch = Patch::Merge(json!({"spec": {"finalizers": finalizers}}));
                match api
                    .patch_subresource("finalize", &node.name, &PatchParams::default(), &patch)
                    .await
                {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
                    Err(e) => return Err(Error::Kube(e)),
                }
            }
        }
        Ok(())
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
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        kinds: api_resources(),
        graph: Mutex::default(),
        changed: Notify::new(),
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
                            g.objects.insert(uid, n);
                        }
                    }
                    Ok(watcher::Event::Delete(o)) => {
                        if let Some(uid) = &o.metadata.uid {
                            g.objects.remove(uid);
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
                        g.objects.retain(|_, n| n.kind != kind);
                        g.objects.extend(fresh.drain());
                        g.synced.insert(kind);
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
