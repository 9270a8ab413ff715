//! Following one key prefix of the store into memory: the list that starts
//! it, then every write and deletion in revision order, and a fresh list
//! whenever the watch cannot resume (its revision compacted away, the
//! store gone for a moment). What the API server keeps in step with the
//! store (the RBAC policy, the served custom kinds, the node authorizer's
//! graph) reads its changes from here.

use futures::StreamExt;
use serde_json::Value;
use wasmkube_store::{EventKind, ListOptions, SharedStore, WatchStream};

use crate::storage::decode_stored;

/// One change under the followed prefix.
pub(crate) enum Change {
    /// Everything under the prefix as of `revision`: what was known before
    /// is to be forgotten.
    Reset {
        objects: Vec<(String, Value)>,
        revision: u64,
    },
    Put {
        key: String,
        object: Value,
        revision: u64,
    },
    Delete {
        key: String,
        revision: u64,
    },
}

/// A prefix of the store, followed.
pub(crate) struct Follow {
    store: SharedStore,
    prefix: String,
    /// What is followed, for logs ("the RBAC policy", "CRDs").
    what: &'static str,
    /// The revision of the last change handed out.
    from: u64,
    events: Option<WatchStream>,
}

impl Follow {
    /// Lists the prefix (retrying until the store answers) and returns the
    /// objects with the follower of their later changes.
    pub(crate) async fn start(
        store: SharedStore,
        prefix: impl Into<String>,
        what: &'static str,
    ) -> (Self, Vec<(String, Value)>, u64) {
        let prefix = prefix.into();
        let (objects, revision) = list(&store, &prefix, what).await;
        let follow = Self {
            store,
            prefix,
            what,
            from: revision,
            events: None,
        };
        (follow, objects, revision)
    }

    /// The next change; waits for one.
    pub(crate) async fn next(&mut self) -> Change {
        loop {
            let events = match &mut self.events {
                Some(events) => events,
                None => match self.store.watch(&self.prefix, self.from) {
                    Ok(events) => self.events.insert(events),
                    Err(e) => {
                        tracing::warn!(error = %e, from = self.from, "cannot follow {} from this revision; listing again", self.what);
                        let (objects, revision) = list(&self.store, &self.prefix, self.what).await;
                        self.from = revision;
                        return Change::Reset { objects, revision };
                    }
                },
            };
            let event = match events.next().await {
                Some(Ok(event)) => event,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "the watch of {} broke; resuming", self.what);
                    self.events = None;
                    continue;
                }
                None => {
                    self.events = None;
                    continue;
                }
            };
            self.from = event.revision();
            let key = event.kv.key.clone();
            match event.kind {
                EventKind::Put => match decode_stored(&event.kv) {
                    Ok(object) => {
                        return Change::Put {
                            key,
                            object,
                            revision: self.from,
                        };
                    }
                    Err(e) => {
                        tracing::warn!(%key, error = %e, "unreadable object in {}", self.what)
                    }
                },
                EventKind::Delete => {
                    return Change::Delete {
                        key,
                        revision: self.from,
                    };
                }
            }
        }
    }
}

/// Everything under `prefix` and the revision it was read at; retries
/// until the store answers.
async fn list(store: &SharedStore, prefix: &str, what: &str) -> (Vec<(String, Value)>, u64) {
    loop {
        match store.list(prefix, ListOptions::default()).await {
            Ok(list) => {
                let objects = list
                    .items
                    .iter()
                    .filter_map(|kv| match decode_stored(kv) {
                        Ok(obj) => Some((kv.key.clone(), obj)),
                        Err(e) => {
                            tracing::warn!(key = %kv.key, error = %e, "unreadable object in {what}");
                            None
                        }
                    })
                    .collect();
                return (objects, list.revision);
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot list {what}; retrying");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
    }
}

/// What the server keeps built from one followed prefix (the admission
/// webhooks, the admission policies): rebuilt on every change, with the
/// revision it reflects so a write of it can be acknowledged once in force.
pub(crate) struct Followed<T> {
    current: std::sync::RwLock<std::sync::Arc<T>>,
    applied: tokio::sync::watch::Sender<u64>,
    task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl<T> Drop for Followed<T> {
    fn drop(&mut self) {
        if let Some(task) = self.task.lock().expect("not poisoned").take() {
            task.abort();
        }
    }
}

impl<T: Send + Sync + 'static> Followed<T> {
    /// Follows the objects under `prefix` (`what` they are, for logs),
    /// building `T` from all of them (by key) at each change.
    pub(crate) async fn start(
        store: SharedStore,
        prefix: String,
        what: &'static str,
        build: fn(&std::collections::BTreeMap<String, Value>) -> T,
    ) -> std::sync::Arc<Self> {
        let (mut follow, objects, from) = Follow::start(store, prefix, what).await;
        let mut all: std::collections::BTreeMap<String, Value> = objects.into_iter().collect();
        let followed = std::sync::Arc::new(Self {
            current: std::sync::RwLock::new(std::sync::Arc::new(build(&all))),
            applied: tokio::sync::watch::Sender::new(from),
            task: Default::default(),
        });
        let weak = std::sync::Arc::downgrade(&followed);
        let task = tokio::spawn(async move {
            loop {
                let revision = match follow.next().await {
                    Change::Reset { objects, revision } => {
                        all = objects.into_iter().collect();
                        revision
                    }
                    Change::Put {
                        key,
                        object,
                        revision,
                    } => {
                        all.insert(key, object);
                        revision
                    }
                    Change::Delete { key, revision } => {
                        all.remove(&key);
                        revision
                    }
                };
                let Some(followed) = weak.upgrade() else {
                    return;
                };
                *followed.current.write().expect("not poisoned") = std::sync::Arc::new(build(&all));
                followed.applied.send_replace(revision);
            }
        });
        *followed.task.lock().expect("not poisoned") = Some(task);
        followed
    }

    pub(crate) fn current(&self) -> std::sync::Arc<T> {
        self.current.read().expect("not poisoned").clone()
    }

    /// Waits (at most five seconds) until what is built reflects the store
    /// at `revision`.
    pub(crate) async fn wait_for(&self, revision: u64) {
        let mut applied = self.applied.subscribe();
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            applied.wait_for(|r| *r >= revision),
        )
        .await;
    }
}
