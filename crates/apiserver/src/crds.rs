//! CustomResourceDefinitions put to work: each accepted CRD's versions are
//! served (routing, discovery, OpenAPI, storage, watch) from the moment its
//! write is acknowledged, and again after a restart.
//!
//! Deleting a CRD works as on Kubernetes: every CRD carries the
//! `customresourcecleanup.apiextensions.k8s.io` finalizer, so a delete only
//! marks it. While it is terminating (condition `Terminating`), its objects
//! can still be read, changed and deleted but no new one is created; each
//! is deleted as a client would delete it, so objects with finalizers of
//! their own wait for their controllers. Once none is left, the finalizer
//! goes and so does the CRD; then its kinds stop being served (and anything
//! still stored under them is removed).
//!
//! The registry of custom types lives in `wasmkube_api::registry`; this
//! module keeps it in step with the stored CRDs by following the store from
//! the API server's start (so another API server on the same store follows
//! as well).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use serde_json::{Value, json};
use wasmkube_api::registry::{self, ResourceType};
use wasmkube_store::{ListOptions, SharedStore};

use crate::ApiServer;
use crate::follow::{Change, Follow};

/// The finalizer every CRD carries until its objects are gone.
pub(crate) const CLEANUP: &str = "customresourcecleanup.apiextensions.k8s.io";

/// CRDs being deleted (by name), and those this process is cleaning up.
static TERMINATING: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
static CLEANING: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

/// Whether the CRD `name` is being deleted: no new object of it is made.
pub(crate) fn terminating(name: &str) -> bool {
    TERMINATING.lock().expect("not poisoned").contains(name)
}

/// Adds or removes `name`; whether the set changed.
fn mark(set: &Mutex<BTreeSet<String>>, name: &str, on: bool) -> bool {
    let mut set = set.lock().expect("not poisoned");
    if on {
        set.insert(name.to_owned())
    } else {
        set.remove(name)
    }
}

/// Notes a stored CRD; one being deleted is cleaned up (once per process).
fn observe(server: &Arc<OnceLock<Weak<ApiServer>>>, crd: &Value) {
    let name = crd["metadata"]["name"].as_str().unwrap_or_default();
    if crd["metadata"]["deletionTimestamp"].is_null() {
        mark(&TERMINATING, name, false);
        return;
    }
    mark(&TERMINATING, name, true);
    if mark(&CLEANING, name, true) {
        let (server, name) = (server.clone(), name.to_owned());
        tokio::spawn(async move {
            cleanup(&server, &name).await;
            mark(&CLEANING, &name, false);
        });
    }
}

/// Deletes the objects of the terminating CRD `name` as clients would,
/// until none is left, then lets the CRD go.
async fn cleanup(server: &OnceLock<Weak<ApiServer>>, name: &str) {
    let crds = crd_type();
    let mut announced = false;
    let mut unattached = 0;
    loop {
        let Some(server) = server.get().and_then(Weak::upgrade) else {
            // Not started yet (a server that never starts is given a
            // minute: the next one to start resumes), or stopped.
            unattached += 1;
            if server.get().is_some() || unattached > 300 {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            continue;
        };
        if !announced {
            let now = crate::rest::now();
            let marked = crate::rest::reconcile_internal(
                &server,
                crds,
                name,
                Some(wasmkube_api::Subresource::Status),
                |crd| {
                    let mut crd = crd.clone();
                    let conditions = &mut crd["status"]["conditions"];
                    if !conditions.is_array() {
                        *conditions = json!([]);
                    }
                    let list = conditions.as_array_mut().expect("just made an array");
                    list.retain(|c| c["type"] != "Terminating");
                    list.push(json!({
                        "type": "Terminating", "status": "True", "reason": "InstanceDeletionInProgress",
                        "message": "CustomResource deletion is in progress", "lastTransitionTime": now,
                    }));
                    Some(crd)
                },
            )
            .await;
            match marked {
                Ok(_) => announced = true,
                Err(crate::error::ApiError::NotFound(..)) => return,
                Err(e) => {
                    tracing::debug!(crd = name, error = %e, "cannot mark a CRD terminating yet")
                }
            }
        }
        let Some(rt) = registry::all()
            .into_iter()
            .find(|t| t.custom.is_some_and(|c| c.crd == name))
        else {
            return;
        };
        let listed = match server
            .store
            .list(&rt.key_prefix(), ListOptions::default())
            .await
        {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(crd = name, error = %e, "cannot list the objects of a terminating CRD");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                continue;
            }
        };
        if listed.items.is_empty() {
            let released = crate::rest::reconcile_internal(&server, crds, name, None, |crd| {
                let finalizers = crd["metadata"]["finalizers"].as_array()?;
                if !finalizers.iter().any(|f| f == CLEANUP) {
                    return None;
                }
                let mut crd = crd.clone();
                crd["metadata"]["finalizers"] = json!(
                    finalizers
                        .iter()
                        .filter(|f| *f != CLEANUP)
                        .cloned()
                        .collect::<Vec<_>>()
                );
                Some(crd)
            })
            .await;
            match released {
                Ok(_) | Err(crate::error::ApiError::NotFound(..)) => return,
                Err(e) => tracing::debug!(crd = name, error = %e, "cannot release a CRD yet"),
            }
        } else {
            for kv in &listed.items {
                let Ok(object) = crate::storage::decode_stored(kv) else {
                    continue;
                };
                if !object["metadata"]["deletionTimestamp"].is_null() {
                    // Marked already: its finalizers' controllers finish it.
                    continue;
                }
                let ns = object["metadata"]["namespace"].as_str();
                let object_name = object["metadata"]["name"].as_str().unwrap_or_default();
                match crate::rest::delete_internal(&server, rt, ns, object_name).await {
                    Ok(_) | Err(crate::error::ApiError::NotFound(..)) => {}
                    Err(e) => {
                        tracing::warn!(crd = name, object = object_name, error = %e, "cannot delete a custom resource of a terminating CRD")
                    }
                }
            }
        }
        drop(server);
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

fn crd_type() -> &'static ResourceType {
    registry::lookup("apiextensions.k8s.io", "v1", "customresourcedefinitions")
        .expect("CRDs are served")
}

/// Serves the kinds of `crd` (a stored, validated definition).
pub(crate) fn register(crd: &Value) {
    let name = crd["metadata"]["name"].as_str().unwrap_or_default();
    registry::set_custom(name, wasmkube_api::custom::types_of(crd));
    tracing::info!(crd = name, "serving custom resources");
}

/// Stops serving the kinds of the CRD `name` and deletes what is still
/// stored of them.
async fn unregister(store: &SharedStore, name: &str) {
    mark(&TERMINATING, name, false);
    let gone = registry::remove_custom(name);
    // Every version shares one storage prefix.
    if let Some(rt) = gone.first() {
        let prefix = rt.key_prefix();
        let mut deleted = 0usize;
        loop {
            let page = match store
                .list(
                    &prefix,
                    ListOptions {
                        limit: 500,
                        ..Default::default()
                    },
                )
                .await
            {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(crd = name, error = %e, "cannot list the custom resources of a deleted CRD");
                    return;
                }
            };
            for kv in &page.items {
                if store.delete(&kv.key, None).await.is_ok() {
                    deleted += 1;
                }
            }
            if !page.more || page.items.is_empty() {
                break;
            }
        }
        tracing::info!(
            crd = name,
            deleted,
            "custom resources removed with their definition"
        );
    }
}

/// Follows CRD writes and deletions.
async fn follow(store: SharedStore, mut follow: Follow, server: Arc<OnceLock<Weak<ApiServer>>>) {
    let prefix = crd_type().key_prefix();
    loop {
        match follow.next().await {
            Change::Reset { objects, .. } => {
                for (_, crd) in &objects {
                    register(crd);
                    observe(&server, crd);
                }
            }
            Change::Put { object, .. } => {
                register(&object);
                observe(&server, &object);
            }
            Change::Delete { key, .. } => {
                unregister(&store, key.trim_start_matches(&prefix)).await;
            }
        }
    }
}

/// The task that keeps the served custom types in step; stopped on drop.
pub(crate) struct Follower {
    task: tokio::task::JoinHandle<()>,
    /// The server the cleanup of terminating CRDs deletes through, once
    /// it exists.
    server: Arc<OnceLock<Weak<ApiServer>>>,
}

impl Follower {
    /// Serves the stored CRDs, then follows their changes.
    pub(crate) async fn start(store: SharedStore) -> Self {
        let (follower, crds, _) =
            Follow::start(store.clone(), crd_type().key_prefix(), "CRDs").await;
        let server = Arc::new(OnceLock::new());
        for (_, crd) in &crds {
            register(crd);
            observe(&server, crd);
        }
        Self {
            task: tokio::spawn(follow(store, follower, server.clone())),
            server,
        }
    }

    /// The server is up: terminating CRDs can be cleaned up through it.
    pub(crate) fn attach(&self, server: &Arc<ApiServer>) {
        let _ = self.server.set(Arc::downgrade(server));
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.task.abort();
    }
}
