//! Level-triggered controllers on kube-runtime, as kube-controller-manager
//! runs them: each reconciles desired against observed state, idempotently,
//! never branching on why it was woken, and requeues instead of looping.
//!
//! **Architecture invariant:** controllers are API clients only (kube-rs);
//! they read through reflector caches and write through the API server.

use futures::future::BoxFuture;
use futures::{FutureExt, Stream, StreamExt};
use kube::api::Api;
use kube::runtime::reflector::{self, ReflectHandle, Store};
use kube::runtime::{WatchStreamExt, watcher};
use serde::de::DeserializeOwned;

pub mod deployment;
pub mod endpoints;
pub mod gc;
mod pods;
pub mod replicaset;
pub mod serviceaccount;

/// Runs every controller until one stops.
pub async fn run_all(client: kube::Client) -> Result<(), Error> {
    tokio::select! {
        r = replicaset::run(client.clone()) => r,
        r = deployment::run(client.clone()) => r,
        r = gc::run(client.clone()) => r,
        r = serviceaccount::run(client.clone()) => r,
        r = endpoints::run(client) => r,
    }
}

pub(crate) use wasmkube_api::ErrorChain;

/// A reflector over every `K` whose store answers reads and whose trigger
/// wakes reconciles only after the store is updated, so a reconcile never
/// reads state older than the event that woke it.
pub(crate) struct SharedCache<K: kube::Resource<DynamicType = ()> + Clone + 'static> {
    pub store: Store<K>,
    pub trigger: ReflectHandle<K>,
    /// Drives the watch; it ends only if the watch does.
    pub driver: BoxFuture<'static, ()>,
}

pub(crate) fn shared_cache<K>(client: &kube::Client) -> SharedCache<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store_shared(1024);
    let trigger = writer
        .subscribe()
        .expect("a shared store hands out subscribers");
    let driver = watcher(Api::<K>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .reflect_shared(writer)
        .for_each(|_| async {})
        .boxed();
    SharedCache {
        store,
        trigger,
        driver,
    }
}

/// Drives a controller's results. Failures are retried by its error policy;
/// here they are only logged, so no object's failure stops the controller.
pub(crate) async fn drain<T, E: std::error::Error>(results: impl Stream<Item = Result<T, E>>) {
    results
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %ErrorChain(&e), "reconcile did not complete");
            }
        })
        .await;
}

/// A reconcile failure; the controller retries after a short delay.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("API request failed")]
    Kube(#[source] kube::Error),
    #[error("invalid selector: {0}")]
    Selector(String),
    #[error("object has no uid")]
    MissingUid,
    #[error("the {what} watch ended")]
    WatchEnded { what: &'static str },
    #[error("could not build the object: {0}")]
    Encode(String),
}
