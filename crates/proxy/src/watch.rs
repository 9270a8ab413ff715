//! One watch of Services and EndpointSlices per node, shared by the service
//! proxy and the cluster DNS (both read the same two kinds; one watch each
//! would double what every node costs the API server).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use kube::runtime::reflector::{self, Store, reflector};
use kube::runtime::{WatchStreamExt, watcher};

use crate::view::{ServiceView, SliceView};
use crate::views::{Views, views};

/// A Service by namespace and name.
pub type ServiceKey = (String, String);

/// The Services whose object or EndpointSlices changed since it was last
/// taken (one per reader that rebuilds only what changed).
#[derive(Clone, Debug, Default)]
pub struct Changed(Arc<Mutex<BTreeSet<ServiceKey>>>);

impl Changed {
    /// The changed Services, leaving none.
    pub fn take(&self) -> BTreeSet<ServiceKey> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn insert(&self, key: ServiceKey) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).insert(key);
    }
}

/// The caches, and a counter bumped after every change they applied.
#[derive(Clone)]
pub struct ServiceWatch {
    pub services: Views<ServiceView>,
    pub slices: Views<SliceView>,
    /// Every [`Changed`] handed out by [`ServiceWatch::changed`].
    trackers: Arc<Mutex<Vec<Changed>>>,
    changes: tokio::sync::watch::Receiver<u64>,
    /// Set once both caches hold a complete list. (A reflector store's own
    /// readiness wakes only one of several tasks waiting on it at once, so
    /// only the driver waits on it and tells everyone else here.)
    ready: tokio::sync::watch::Receiver<bool>,
}

impl std::fmt::Debug for ServiceWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceWatch").finish_non_exhaustive()
    }
}

/// A kind a node keeps a cache of.
pub trait Cached:
    kube::Resource<DynamicType = ()>
    + Clone
    + std::fmt::Debug
    + serde::de::DeserializeOwned
    + Send
    + Sync
    + 'static
{
}

impl<K> Cached for K where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static
{
}

/// A cache of one kind kept by a reflector, and the stream that feeds it
/// (every object the watch touched; run it for as long as the cache is
/// read).
pub fn cache<K>(
    client: &kube::Client,
) -> (
    Store<K>,
    impl Stream<Item = Result<K, watcher::Error>> + Send + use<K>,
)
where
    K: Cached,
{
    cache_with(client, watcher::Config::default())
}

/// As [`cache`], of the objects `config` selects (by label, say).
pub fn cache_with<K>(
    client: &kube::Client,
    config: watcher::Config,
) -> (
    Store<K>,
    impl Stream<Item = Result<K, watcher::Error>> + Send + use<K>,
)
where
    K: Cached,
{
    cache_trimmed(client, config, |_| {})
}

/// kubectl's copy of what it last applied: no cache reader needs it.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// As [`cache_with`], each object cut down by `trim` (to what its readers
/// use) before it is kept. Every cache drops what no reader here needs and
/// every object carries: its managed fields (often as large as the rest
/// of the object) and kubectl's last-applied copy. (Kinds a node keeps one
/// of per function, however long it stays at zero, are kept as views
/// instead: [`crate::views`].)
pub fn cache_trimmed<K>(
    client: &kube::Client,
    config: watcher::Config,
    trim: fn(&mut K),
) -> (
    Store<K>,
    impl Stream<Item = Result<K, watcher::Error>> + Send + use<K>,
)
where
    K: Cached,
{
    let (reader, writer) = reflector::store();
    let api: Api<K> = Api::all(client.clone());
    let watch = watcher(api, config).modify(move |o: &mut K| {
        let meta = o.meta_mut();
        meta.managed_fields = None;
        if let Some(a) = meta.annotations.as_mut() {
            a.remove(LAST_APPLIED);
        }
        trim(o);
    });
    let stream = reflector(writer, watch).default_backoff().touched_objects();
    (reader, stream)
}

impl ServiceWatch {
    /// The caches and the future that fills them (run it for as long as
    /// they are read).
    pub fn new(client: &kube::Client) -> (Self, impl Future<Output = ()> + Send + use<>) {
        let (services, service_events) =
            views::<Service, _>(client, watcher::Config::default(), ServiceView::of);
        let (slices, slice_events) =
            views::<EndpointSlice, _>(client, watcher::Config::default(), SliceView::of);
        let (tx, changes) = tokio::sync::watch::channel(0u64);
        let tx = Arc::new(tx);
        let trackers: Arc<Mutex<Vec<Changed>>> = Arc::default();
        let tracked = trackers.clone();
        let (ready_tx, ready) = tokio::sync::watch::channel(false);
        let (s, e) = (services.clone(), slices.clone());
        let readiness = async move {
            let _ = tokio::join!(s.wait_until_ready(), e.wait_until_ready());
            let _ = ready_tx.send(true);
            // Keeps the sender, so waiters never see it gone.
            std::future::pending::<()>().await;
        };
        let events = async move {
            let events = futures::stream::select(
                service_events.map(|r| r.map(|t| Some((t.namespace, t.name)))),
                slice_events.map(|r| {
                    r.map(|t| {
                        let slice = t.view?;
                        Some((slice.namespace.clone(), slice.service.clone()))
                    })
                }),
            );
            let mut events = std::pin::pin!(events);
            while let Some(event) = events.next().await {
                match event {
                    Ok(key) => {
                        if let Some(key) = key {
                            for t in tracked.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                                t.insert(key.clone());
                            }
                        }
                        tx.send_modify(|n| *n += 1);
                    }
                    Err(e) => tracing::warn!(error = %e, "Service watch error; retrying"),
                }
            }
        };
        let drive = async move {
            tokio::select! {
                () = events => {}
                () = readiness => {}
            }
        };
        (
            Self {
                services,
                slices,
                trackers,
                changes,
                ready,
            },
            drive,
        )
    }

    /// Waits until both caches hold a complete list.
    pub async fn ready(&self) {
        let _ = self.ready.clone().wait_for(|r| *r).await;
    }

    /// A new record of the Services that change from now on.
    pub fn changed(&self) -> Changed {
        let c = Changed::default();
        self.trackers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(c.clone());
        c
    }

    /// A receiver that sees a change after every applied event (several
    /// events between two looks are one change).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        let mut rx = self.changes.clone();
        rx.mark_changed();
        rx
    }
}
