//! The watch cache: one store watch over everything the API serves, decoded
//! once and fanned out to every API watcher, with a ring of recent events so
//! watchers can start from a recent resourceVersion without reading the store.
//!
//! The feeder appends to the ring and broadcasts under one lock, and
//! subscribers take their backlog and their receiver under that same lock, so
//! a watcher sees every event after its starting revision exactly once.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use futures::StreamExt;
use serde_json::Value;
use tokio::sync::broadcast;
use wasmkube_store::{EventKind, SharedStore, StoreError};

use crate::storage::decode_stored;

/// Where every API object lives in the store.
pub const REGISTRY_PREFIX: &str = "/registry/";

/// `ADDED`, `MODIFIED` or `DELETED`, as the watch protocol names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WatchEventType {
    Added,
    Modified,
    Deleted,
}

impl WatchEventType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Added => "ADDED",
            Self::Modified => "MODIFIED",
            Self::Deleted => "DELETED",
        }
    }
}

/// One change, decoded once for all watchers.
#[derive(Debug)]
pub struct CachedEvent {
    pub revision: u64,
    pub key: String,
    pub kind: WatchEventType,
    /// The object after the change (for deletes: its last state).
    pub object: Arc<Value>,
    /// The object before the change, for selector transitions.
    pub prev: Option<Arc<Value>>,
    /// Encoded watch lines, one per event type a watcher may see, built on
    /// first use and shared by every watcher (a refcount, not a copy).
    lines: [OnceLock<Bytes>; 3],
}

impl CachedEvent {
    /// The `{"type": ..., "object": ...}` line for this event seen as `ty`
    /// (a selector can turn a modification into an add or a delete).
    pub fn line(&self, ty: WatchEventType) -> Bytes {
        self.lines[ty as usize]
            .get_or_init(|| watch_line(ty.as_str(), &*self.object))
            .clone()
    }
}

/// One line of a watch stream, `"type"` first as Kubernetes writes it:
/// clients decoding the event as a tagged enum (client-go's and kube-rs'
/// watch events) then read the object straight into its type, instead of
/// buffering all of it until they learn which variant it is.
pub fn watch_line(ty: &str, object: &impl serde::Serialize) -> Bytes {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"{\"type\":");
    serde_json::to_writer(&mut out, ty).expect("a string serializes");
    out.extend_from_slice(b",\"object\":");
    serde_json::to_writer(&mut out, object).expect("JSON values always serialize");
    out.extend_from_slice(b"}\n");
    Bytes::from(out)
}

struct Ring {
    events: VecDeque<Arc<CachedEvent>>,
    /// History is complete for every revision after this one.
    oldest: u64,
}

/// See the module docs.
pub struct WatchCache {
    ring: Mutex<Ring>,
    tx: broadcast::Sender<Arc<CachedEvent>>,
    capacity: usize,
    /// Dropped with the cache, which stops the feeder and releases the store.
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl std::fmt::Debug for WatchCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ring = self.ring.lock().expect("watch cache lock");
        f.debug_struct("WatchCache")
            .field("oldest", &ring.oldest)
            .field("latest", &ring.events.back().map(|e| e.revision))
            .field("len", &ring.events.len())
            .finish()
    }
}

/// The starting point is older than the cache's history.
#[derive(Debug)]
pub struct TooOld {
    pub requested: u64,
    pub oldest: u64,
}

/// A subscription: the backlog after the starting revision, then live events.
pub struct Subscription {
    pub backlog: Vec<Arc<CachedEvent>>,
    pub live: broadcast::Receiver<Arc<CachedEvent>>,
}

impl WatchCache {
    /// Starts a cache that follows `store` from its current revision.
    pub fn start(store: SharedStore, capacity: usize) -> Arc<Self> {
        let start = store.current_revision();
        let (tx, _) = broadcast::channel(capacity.max(16));
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let cache = Arc::new(Self {
            ring: Mutex::new(Ring {
                events: VecDeque::new(),
                oldest: start,
            }),
            tx,
            capacity: capacity.max(1),
            _stop: stop,
        });
        let weak = Arc::downgrade(&cache);
        tokio::spawn(async move {
            tokio::select! {
                () = feed(weak, store, start) => {}
                _ = stopped => {}
            }
        });
        cache
    }

    /// Events after `from` and a receiver for everything later.
    pub fn subscribe(&self, from: u64) -> Result<Subscription, TooOld> {
        let ring = self.ring.lock().expect("watch cache lock");
        if from < ring.oldest {
            return Err(TooOld {
                requested: from,
                oldest: ring.oldest,
            });
        }
        let skip = ring.events.partition_point(|e| e.revision <= from);
        Ok(Subscription {
            backlog: ring.events.iter().skip(skip).cloned().collect(),
            live: self.tx.subscribe(),
        })
    }

    /// Forgets history up to `revision`, after the store was compacted.
    pub fn truncate(&self, revision: u64) {
        let mut ring = self.ring.lock().expect("watch cache lock");
        while ring.events.front().is_some_and(|e| e.revision <= revision) {
            ring.events.pop_front();
        }
        ring.oldest = ring.oldest.max(revision);
    }

    fn push(&self, event: CachedEvent) {
        let event = Arc::new(event);
        let mut ring = self.ring.lock().expect("watch cache lock");
        ring.events.push_back(event.clone());
        while ring.events.len() > self.capacity {
            if let Some(old) = ring.events.pop_front() {
                ring.oldest = old.revision;
            }
        }
        let _ = self.tx.send(event);
    }

    /// Restarts history at `revision` after the store watch broke.
    fn reset(&self, revision: u64) {
        let mut ring = self.ring.lock().expect("watch cache lock");
        ring.events.clear();
        ring.oldest = revision;
    }
}

async fn feed(cache: std::sync::Weak<WatchCache>, store: SharedStore, mut from: u64) {
    loop {
        let mut stream = match store.watch(REGISTRY_PREFIX, from) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, from, "watch cache could not resume; restarting at the current revision");
                from = store.current_revision();
                match cache.upgrade() {
                    Some(c) => c.reset(from),
                    None => return,
                }
                continue;
            }
        };
        while let Some(item) = stream.next().await {
            let Some(cache) = cache.upgrade() else { return };
            match item {
                Ok(e) => {
                    from = e.revision();
                    let kind = match (e.kind, &e.prev) {
                        (EventKind::Delete, _) => WatchEventType::Deleted,
                        (EventKind::Put, None) => WatchEventType::Added,
                        (EventKind::Put, Some(_)) => WatchEventType::Modified,
                    };
                    let object = match decode_stored(&e.kv) {
                        Ok(v) => v,
                        Err(err) => {
                            tracing::error!(key = %e.kv.key, error = %err, "undecodable object in store; skipped by watchers");
                            continue;
                        }
                    };
                    let prev = e
                        .prev
                        .as_ref()
                        .and_then(|p| decode_stored(p).ok())
                        .map(Arc::new);
                    cache.push(CachedEvent {
                        revision: from,
                        key: e.kv.key.clone(),
                        kind,
                        object: Arc::new(object),
                        prev,
                        lines: Default::default(),
                    });
                }
                Err(StoreError::Gone { .. }) => break,
                Err(e) => {
                    tracing::error!(error = %e, "watch cache stream failed");
                    break;
                }
            }
        }
        if cache.strong_count() == 0 {
            return;
        }
        // The store stream ended (compaction overtook it or the store closed):
        // anything older than now can no longer be served exactly.
        let now = store.current_revision();
        if let Some(c) = cache.upgrade() {
            c.reset(now);
        }
        from = now;
        tokio::task::yield_now().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_watch_line_names_its_type_before_its_object() {
        let line = watch_line(
            "ADDED",
            &serde_json::json!({"kind": "Pod", "apiVersion": "v1"}),
        );
        assert_eq!(
            &line[..],
            b"{\"type\":\"ADDED\",\"object\":{\"apiVersion\":\"v1\",\"kind\":\"Pod\"}}\n"
        );
        // And it is one JSON document a client can decode.
        let parsed: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(parsed["object"]["kind"], "Pod");
    }
}
