//! Caches that keep of each object only a view of it: what its readers
//! read, in a type of their own, instead of the API object. A node keeps
//! one Service, EndpointSlice, Knative Route and Revision per function
//! however long the function stays at zero, and an API object costs its
//! struct before it holds anything (a `Service` is 824 bytes, its
//! `ObjectMeta` alone 360), plus a B-tree node of about half a KiB for any
//! label or selector map with an entry. A view is a few small fields.
//!
//! A view may also decline an object (`None`): a cache of the Revisions
//! that cannot run keeps nothing for the ones that can.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use futures::{Stream, StreamExt};
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};

use crate::watch::Cached;

/// Namespace → name → view.
type Map<V> = HashMap<Box<str>, HashMap<Box<str>, Arc<V>>>;

fn read<V>(map: &RwLock<Map<V>>) -> std::sync::RwLockReadGuard<'_, Map<V>> {
    map.read().unwrap_or_else(|e| e.into_inner())
}

fn write<V>(map: &RwLock<Map<V>>) -> std::sync::RwLockWriteGuard<'_, Map<V>> {
    map.write().unwrap_or_else(|e| e.into_inner())
}

/// The views of the watched objects, by namespace and name.
pub struct Views<V> {
    map: Arc<RwLock<Map<V>>>,
    ready: tokio::sync::watch::Receiver<bool>,
}

impl<V> Clone for Views<V> {
    fn clone(&self) -> Self {
        Self {
            map: self.map.clone(),
            ready: self.ready.clone(),
        }
    }
}

impl<V> std::fmt::Debug for Views<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Views").finish_non_exhaustive()
    }
}

impl<V> Views<V> {
    /// A cache that holds nothing and is complete (for readers that have
    /// nothing to watch, and tests).
    pub fn empty() -> Self {
        Self {
            map: Arc::default(),
            ready: tokio::sync::watch::channel(true).1,
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Map<V>> {
        read(&self.map)
    }

    /// The view of one object, if it is kept.
    pub fn get(&self, namespace: &str, name: &str) -> Option<Arc<V>> {
        self.read().get(namespace)?.get(name).cloned()
    }

    /// Every kept view.
    pub fn state(&self) -> Vec<Arc<V>> {
        self.read()
            .values()
            .flat_map(|names| names.values().cloned())
            .collect()
    }

    /// The kept views that `keep` accepts.
    pub fn state_filter(&self, keep: impl Fn(&V) -> bool) -> Vec<Arc<V>> {
        self.read()
            .values()
            .flat_map(|names| names.values())
            .filter(|v| keep(v))
            .cloned()
            .collect()
    }

    /// Waits until the cache has held a complete list once.
    pub async fn wait_until_ready(&self) {
        let _ = self.ready.clone().wait_for(|r| *r).await;
    }
}

/// What the watch changed of one object's view.
#[derive(Debug)]
pub struct Touched<V> {
    pub namespace: String,
    pub name: String,
    /// The view kept now or, when `gone`, the last one kept.
    pub view: Option<Arc<V>>,
    /// The object's view is no longer kept: the object was deleted, its
    /// view declines it now, or a new list lacks it.
    pub gone: bool,
}

/// The state a cache's stream updates.
struct Writer<V, K> {
    map: Arc<RwLock<Map<V>>>,
    /// A new list being received, swapped in when it is complete.
    buffer: Map<V>,
    ready: tokio::sync::watch::Sender<bool>,
    view: fn(&K) -> Option<V>,
}

fn name_of<K: kube::Resource>(o: &K) -> (String, String) {
    let meta = o.meta();
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// Keeps `view` for the object (none: drops it); the view it replaces.
fn put<V>(map: &mut Map<V>, namespace: &str, name: &str, view: Option<&Arc<V>>) -> Option<Arc<V>> {
    match view {
        Some(v) => map
            .entry(namespace.into())
            .or_default()
            .insert(name.into(), v.clone()),
        None => {
            let names = map.get_mut(namespace)?;
            let old = names.remove(name);
            if names.is_empty() {
                map.remove(namespace);
            }
            old
        }
    }
}

impl<V: PartialEq, K: kube::Resource> Writer<V, K> {
    /// Keeps the object's view now (none when `deleted`), and reports it
    /// if that changed what is kept: a status update that changes nothing
    /// a reader reads (a Revision's replica counts, say) wakes no reader.
    fn change(&self, o: &K, deleted: bool) -> Vec<Touched<V>> {
        let (namespace, name) = name_of(o);
        let view = if deleted {
            None
        } else {
            (self.view)(o).map(Arc::new)
        };
        let old = put(&mut write(&self.map), &namespace, &name, view.as_ref());
        if old == view {
            return Vec::new();
        }
        let gone = view.is_none();
        vec![Touched {
            namespace,
            name,
            view: view.or(old),
            gone,
        }]
    }

    fn apply(&mut self, event: watcher::Event<K>) -> Vec<Touched<V>> {
        match event {
            watcher::Event::Apply(o) => self.change(&o, false),
            watcher::Event::Delete(o) => self.change(&o, true),
            watcher::Event::Init => {
                self.buffer = Map::default();
                Vec::new()
            }
            watcher::Event::InitApply(o) => {
                let (namespace, name) = name_of(&o);
                let Some(view) = (self.view)(&o).map(Arc::new) else {
                    // Kept before? The end of the list reports it gone.
                    return Vec::new();
                };
                put(&mut self.buffer, &namespace, &name, Some(&view));
                let now = read(&self.map)
                    .get(namespace.as_str())
                    .and_then(|names| names.get(name.as_str()).cloned());
                if now.as_ref() == Some(&view) {
                    return Vec::new();
                }
                vec![Touched {
                    namespace,
                    name,
                    view: Some(view),
                    gone: false,
                }]
            }
            watcher::Event::InitDone => {
                let new = std::mem::take(&mut self.buffer);
                let old = std::mem::replace(&mut *write(&self.map), new);
                let _ = self.ready.send(true);
                // What the new list lacks went while the watch was away.
                let map = read(&self.map);
                let mut gone = Vec::new();
                for (namespace, names) in old {
                    for (name, view) in names {
                        if map.get(&namespace).is_none_or(|n| !n.contains_key(&name)) {
                            gone.push(Touched {
                                namespace: namespace.to_string(),
                                name: name.to_string(),
                                view: Some(view),
                                gone: true,
                            });
                        }
                    }
                }
                gone
            }
        }
    }
}

/// A cache of the views `view` makes of the objects `config` selects, and
/// the stream that feeds it (every object whose view changed, kept or
/// dropped; run it for as long as the cache is read).
pub fn views<K, V>(
    client: &kube::Client,
    config: watcher::Config,
    view: fn(&K) -> Option<V>,
) -> (
    Views<V>,
    impl Stream<Item = Result<Touched<V>, watcher::Error>> + Send + use<K, V>,
)
where
    K: Cached,
    V: PartialEq + Send + Sync + 'static,
{
    let map: Arc<RwLock<Map<V>>> = Arc::default();
    let (ready_tx, ready) = tokio::sync::watch::channel(false);
    let mut writer = Writer {
        map: map.clone(),
        buffer: Map::default(),
        ready: ready_tx,
        view,
    };
    let api: Api<K> = Api::all(client.clone());
    let stream = watcher(api, config)
        .default_backoff()
        .map(move |event| match event {
            Ok(event) => writer.apply(event).into_iter().map(Ok).collect(),
            Err(e) => vec![Err(e)],
        })
        .flat_map(futures::stream::iter);
    (Views { map, ready }, stream)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;

    fn cm(ns: &str, name: &str, value: Option<&str>) -> ConfigMap {
        ConfigMap {
            metadata: kube::api::ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(name.into()),
                ..Default::default()
            },
            data: value.map(|v| [("v".to_owned(), v.to_owned())].into()),
            ..Default::default()
        }
    }

    fn value(c: &ConfigMap) -> Option<String> {
        c.data.as_ref()?.get("v").cloned()
    }

    fn writer() -> (Writer<String, ConfigMap>, Views<String>) {
        let map: Arc<RwLock<Map<String>>> = Arc::default();
        let (ready_tx, ready) = tokio::sync::watch::channel(false);
        let w = Writer {
            map: map.clone(),
            buffer: Map::default(),
            ready: ready_tx,
            view: value,
        };
        (w, Views { map, ready })
    }

    /// Applied views are kept, declined ones and deleted ones are not; only
    /// a change of what is kept is reported; a new list replaces the old
    /// one whole and reports what it lacks.
    #[test]
    fn keeps_views_and_reports_what_changed_them() {
        let (mut w, views) = writer();
        w.apply(watcher::Event::Init);
        let t = w.apply(watcher::Event::InitApply(cm("a", "x", Some("1"))));
        assert_eq!(t.len(), 1, "new in the first list");
        assert!(
            w.apply(watcher::Event::InitApply(cm("a", "y", None)))
                .is_empty()
        );
        assert!(views.state().is_empty(), "a list is kept once complete");
        assert!(w.apply(watcher::Event::InitDone).is_empty());
        assert!(*views.ready.borrow());
        assert_eq!(
            views.get("a", "x").as_deref().map(String::as_str),
            Some("1")
        );
        assert!(views.get("a", "y").is_none(), "declined");
        let t = w.apply(watcher::Event::Apply(cm("b", "z", Some("2"))));
        assert_eq!((t[0].namespace.as_str(), t[0].gone), ("b", false));
        assert_eq!(views.state().len(), 2);
        // The same view again, or a declined object again: nothing to say.
        assert!(
            w.apply(watcher::Event::Apply(cm("b", "z", Some("2"))))
                .is_empty()
        );
        assert!(
            w.apply(watcher::Event::Apply(cm("a", "y", None)))
                .is_empty()
        );
        assert!(
            w.apply(watcher::Event::Delete(cm("a", "y", None)))
                .is_empty()
        );
        // Declining an object that was kept drops it, reported with the
        // view it had.
        let t = w.apply(watcher::Event::Apply(cm("b", "z", None)));
        assert!(t[0].gone && t[0].view.as_deref().map(String::as_str) == Some("2"));
        assert!(views.get("b", "z").is_none());
        w.apply(watcher::Event::Apply(cm("b", "z", Some("3"))));
        let t = w.apply(watcher::Event::Delete(cm("b", "z", Some("3"))));
        assert!(
            t[0].gone && t[0].view.is_some(),
            "a deletion carries the last view"
        );
        assert!(
            views.read().get("b").is_none(),
            "an empty namespace is dropped"
        );
        // A relist: `a/x` unchanged is not reported, `c/w` new is, and
        // `a/x` missing from the next one is reported gone.
        w.apply(watcher::Event::Init);
        assert!(
            w.apply(watcher::Event::InitApply(cm("a", "x", Some("1"))))
                .is_empty()
        );
        assert!(w.apply(watcher::Event::InitDone).is_empty());
        w.apply(watcher::Event::Init);
        assert_eq!(
            w.apply(watcher::Event::InitApply(cm("c", "w", Some("4"))))
                .len(),
            1
        );
        let t = w.apply(watcher::Event::InitDone);
        assert_eq!(t.len(), 1);
        assert_eq!((t[0].name.as_str(), t[0].gone), ("x", true));
        let all: Vec<String> = views.state().iter().map(|v| v.to_string()).collect();
        assert_eq!(all, ["4"]);
        assert_eq!(views.state_filter(|v| v == "5").len(), 0);
    }
}
