//! CustomResourceDefinitions put to work: each accepted CRD's versions are
//! served (routing, discovery, OpenAPI, storage, watch) from the moment its
//! write is acknowledged, and again after a restart; when a CRD is gone, its
//! kinds stop being served and their objects are deleted.
//!
//! The registry of custom types lives in `wasmkube_api::registry`; this
//! module keeps it in step with the stored CRDs by following the store from
//! the API server's start (so another API server on the same store follows
//! as well).

use serde_json::Value;
use wasmkube_api::registry::{self, ResourceType};
use wasmkube_store::{ListOptions, SharedStore};

use crate::follow::{Change, Follow};

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

/// Stops serving the kinds of the CRD `name` and deletes their objects.
async fn unregister(store: &SharedStore, name: &str) {
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
async fn follow(store: SharedStore, mut follow: Follow) {
    let prefix = crd_type().key_prefix();
    loop {
        match follow.next().await {
            Change::Reset { objects, .. } => {
                for (_, crd) in &objects {
                    register(crd);
                }
            }
            Change::Put { object, .. } => register(&object),
            Change::Delete { key, .. } => {
                unregister(&store, key.trim_start_matches(&prefix)).await;
            }
        }
    }
}

/// The task that keeps the served custom types in step; stopped on drop.
pub(crate) struct Follower(tokio::task::JoinHandle<()>);

impl Follower {
    /// Serves the stored CRDs, then follows their changes.
    pub(crate) async fn start(store: SharedStore) -> Self {
        let (follower, crds, _) =
            Follow::start(store.clone(), crd_type().key_prefix(), "CRDs").await;
        for (_, crd) in &crds {
            register(crd);
        }
        Self(tokio::spawn(follow(store, follower)))
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.0.abort();
    }
}
