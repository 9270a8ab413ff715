//! CustomResourceDefinitions put to work: each accepted CRD's versions are
//! served (routing, discovery, OpenAPI, storage, watch) from the moment its
//! write is acknowledged, and again after a restart; when a CRD is gone, its
//! kinds stop being served and their objects are deleted.
//!
//! The registry of custom types lives in `wasmkube_api::registry`; this
//! module keeps it in step with the stored CRDs by following the store from
//! the API server's start (so another API server on the same store follows
//! as well).

use futures::StreamExt;
use serde_json::Value;
use wasmkube_api::registry::{self, ResourceType};
use wasmkube_store::{EventKind, ListOptions, SharedStore};

use crate::storage::decode_stored;

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

/// Serves every stored CRD; returns the revision it read them at.
async fn load(store: &SharedStore) -> u64 {
    let prefix = crd_type().key_prefix();
    loop {
        match store.list(&prefix, ListOptions::default()).await {
            Ok(list) => {
                for kv in &list.items {
                    match decode_stored(kv) {
                        Ok(crd) => register(&crd),
                        Err(e) => tracing::warn!(key = %kv.key, error = %e, "unreadable CRD"),
                    }
                }
                return list.revision;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot list CRDs; retrying");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
    }
}

/// Follows CRD writes and deletions after `from`.
async fn follow(store: SharedStore, mut from: u64) {
    let prefix = crd_type().key_prefix();
    loop {
        let mut events = match store.watch(&prefix, from) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot follow CRDs from {from}; reloading them");
                from = load(&store).await;
                continue;
            }
        };
        while let Some(event) = events.next().await {
            let event = match event {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(error = %e, "the CRD watch broke; resuming");
                    break;
                }
            };
            from = event.revision();
            match event.kind {
                EventKind::Put => match decode_stored(&event.kv) {
                    Ok(crd) => register(&crd),
                    Err(e) => tracing::warn!(error = %e, "unreadable CRD"),
                },
                EventKind::Delete => {
                    let name = event.kv.key.trim_start_matches(&prefix).to_owned();
                    unregister(&store, &name).await;
                }
            }
        }
    }
}

/// The task that keeps the served custom types in step; stopped on drop.
pub(crate) struct Follower(tokio::task::JoinHandle<()>);

impl Follower {
    /// Serves the stored CRDs, then follows their changes.
    pub(crate) async fn start(store: SharedStore) -> Self {
        let from = load(&store).await;
        Self(tokio::spawn(follow(store, from)))
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.0.abort();
    }
}
