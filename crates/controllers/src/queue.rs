//! Each controller's work queue with client-go's work-queue metrics.
//!
//! kube-rs's `Controller` keeps its queue (the applier's scheduler) to
//! itself, so this builder makes the same queue from the same public parts
//! (kube-runtime's `applier` and its trigger mappers: the object's own
//! watch, its children's owner references, related objects through a
//! mapper) and watches it from both sides: requests entering, reconciles
//! starting and ending. That gives kube-controller-manager's metrics, per
//! queue `name`:
//!
//! - `workqueue_adds_total`: requests that were not already waiting (the
//!   scheduler, like client-go's queue, keeps one entry per object); a
//!   requeue after a delay counts when it comes due;
//! - `workqueue_depth`: objects waiting, not being reconciled;
//! - `workqueue_queue_duration_seconds`: from the add to the reconcile's
//!   start (a request for an object being reconciled waits for it to end);
//! - `workqueue_work_duration_seconds`: each reconcile;
//! - `workqueue_unfinished_work_seconds` and
//!   `workqueue_longest_running_processor_seconds`: the reconciles running
//!   now (updated every 500 ms, as client-go does);
//! - `workqueue_retries_total`: requeues by the error policy.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use futures::stream::{self, BoxStream};
use futures::{FutureExt, Stream, StreamExt, TryStreamExt};
use kube::api::Api;
use kube::runtime::controller::{self, Action, ReconcileReason, ReconcileRequest};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use prometheus::{Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter};
use prometheus::{IntCounterVec, IntGauge, IntGaugeVec, Opts};
use serde::de::DeserializeOwned;

use crate::ErrorChain;

/// How often the running reconciles' ages are published (client-go: 500 ms).
const UNFINISHED_EVERY: Duration = Duration::from_millis(500);

type Trigger<K> = BoxStream<'static, Result<ReconcileRequest<K>, watcher::Error>>;

/// A controller for `K`: what wakes it, its cache of `K`, and its queue's
/// settings. Built like kube-rs's `Controller`, run with [`Controller::run`].
pub struct Controller<K: Resource<DynamicType = ()> + 'static> {
    store: Store<K>,
    triggers: Vec<Trigger<K>>,
    config: controller::Config,
}

impl<K> Controller<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    /// Reconciles every `K` the watch of `api` sees, whenever it changes.
    pub fn new(api: Api<K>, config: watcher::Config) -> Self {
        let (store, writer) = reflector::store();
        let own =
            reflector::reflector(writer, watcher(api, config).default_backoff()).applied_objects();
        Self {
            store,
            triggers: vec![controller::trigger_self(own, ()).boxed()],
            config: controller::Config::default(),
        }
    }

    /// The cache of `K` the controller reads (filled once it runs).
    pub fn store(&self) -> Store<K> {
        self.store.clone()
    }

    /// The queue's settings (debounce, concurrency).
    pub fn with_config(mut self, config: controller::Config) -> Self {
        self.config = config;
        self
    }

    /// A change of a `C` from a shared stream wakes the `K`s that own it.
    pub fn owns_shared_stream<C>(
        mut self,
        changes: impl Stream<Item = Arc<C>> + Send + 'static,
    ) -> Self
    where
        C: Resource<DynamicType = ()> + Send + Sync + 'static,
    {
        let owners = move |child: Arc<C>| {
            let namespace = child.namespace();
            child
                .owner_references()
                .iter()
                .filter_map(|owner| ObjectRef::<K>::from_owner_ref(namespace.as_deref(), owner, ()))
                .map(|owner| ReconcileRequest {
                    obj_ref: owner,
                    reason: ReconcileReason::RelatedObjectUpdated {
                        obj_ref: Box::new(ObjectRef::from_obj(&*child).erase()),
                    },
                })
                .collect::<Vec<_>>()
        };
        self.triggers
            .push(controller::trigger_with(changes.map(Ok), owners).boxed());
        self
    }

    /// A change of a `C` from its own watch of `api` wakes the `K`s that
    /// own it.
    pub fn owns<C>(mut self, api: Api<C>, config: watcher::Config) -> Self
    where
        C: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    {
        let changes = watcher(api, config).default_backoff().touched_objects();
        self.triggers
            .push(controller::trigger_owners(changes, (), ()).boxed());
        self
    }

    /// A change of an `O` from a shared stream wakes the `K`s `mapper`
    /// names.
    pub fn watches_shared_stream<O, I>(
        mut self,
        changes: impl Stream<Item = Arc<O>> + Send + 'static,
        mapper: impl Fn(Arc<O>) -> I + Send + Sync + 'static,
    ) -> Self
    where
        O: Resource<DynamicType = ()> + Send + Sync + 'static,
        I: IntoIterator<Item = ObjectRef<K>> + 'static,
        I::IntoIter: Send,
    {
        self.triggers
            .push(related::<K, O, _, _>(changes.map(Ok), mapper).boxed());
        self
    }

    /// A change of an `O` from its own watch of `api` wakes the `K`s
    /// `mapper` names.
    pub fn watches<O, I>(
        mut self,
        api: Api<O>,
        config: watcher::Config,
        mapper: impl Fn(O) -> I + Send + Sync + 'static,
    ) -> Self
    where
        O: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
        I: IntoIterator<Item = ObjectRef<K>> + 'static,
        I::IntoIter: Send,
    {
        let changes = watcher(api, config).default_backoff().touched_objects();
        self.triggers
            .push(related::<K, O, _, _>(changes, mapper).boxed());
        self
    }

    /// Each `ObjectRef` from `requests` wakes that `K`.
    pub fn reconcile_on(
        mut self,
        requests: impl Stream<Item = ObjectRef<K>> + Send + 'static,
    ) -> Self {
        self.triggers.push(
            requests
                .map(|obj_ref| {
                    Ok(ReconcileRequest {
                        obj_ref,
                        reason: ReconcileReason::Unknown,
                    })
                })
                .boxed(),
        );
        self
    }

    /// Runs the controller as the queue `name` until its watches end:
    /// `reconcile` for each object that needs it, `error_policy` to requeue
    /// a failed one. Outcomes are counted (controller-runtime's reconcile
    /// metrics) and failures logged; none stops the controller.
    pub async fn run<X, F, Fut, E, P>(
        self,
        name: &str,
        mut reconcile: F,
        error_policy: P,
        ctx: Arc<X>,
    ) where
        X: Send + Sync + 'static,
        F: FnMut(Arc<K>, Arc<X>) -> Fut,
        Fut: std::future::Future<Output = Result<Action, E>> + Send + 'static,
        E: std::error::Error + Send + Sync + 'static,
        P: Fn(Arc<K>, &E, Arc<X>) -> Action,
    {
        let queue = Arc::new(Queue::new(name));
        let unfinished = tokio::spawn(queue.clone().publish_unfinished());
        let added = queue.clone();
        let requests = stream::select_all(self.triggers).inspect_ok(move |request| {
            added.add(key(&request.obj_ref));
        });
        let started = queue.clone();
        let reconciler = move |object: Arc<K>, ctx: Arc<X>| {
            let work = started.start(key(&ObjectRef::from_obj(&*object)));
            Box::pin(reconcile(object, ctx).map(move |result| {
                drop(work);
                result
            }))
        };
        let retried = queue.clone();
        let error_policy = move |object: Arc<K>, error: &E, ctx: Arc<X>| {
            retried.retries.inc();
            error_policy(object, error, ctx)
        };
        controller::applier(reconciler, error_policy, ctx, self.store, requests, self.config)
            .for_each(|result| {
                match result {
                    Ok(_) => crate::metrics::reconciled(name, true),
                    Err(controller::Error::ReconcilerFailed(error, object)) => {
                        crate::metrics::reconciled(name, false);
                        tracing::debug!(controller = name, %object, error = %ErrorChain(&error), "reconcile did not complete");
                    }
                    // Woken for an object that is gone: nothing to reconcile;
                    // its request leaves the queue.
                    Err(controller::Error::ObjectNotFound(object)) => {
                        drop(queue.start((object.namespace.clone(), object.name.clone())));
                    }
                    Err(e) => {
                        tracing::debug!(controller = name, error = %ErrorChain(&e), "controller queue")
                    }
                }
                std::future::ready(())
            })
            .await;
        unfinished.abort();
    }
}

/// Requests for the `K`s `mapper` names from each change of an `O` (owned
/// or shared).
fn related<K, O, T, I>(
    changes: impl Stream<Item = Result<T, watcher::Error>> + Send + 'static,
    mapper: impl Fn(T) -> I + Send + Sync + 'static,
) -> impl Stream<Item = Result<ReconcileRequest<K>, watcher::Error>> + Send + 'static
where
    K: Resource<DynamicType = ()> + 'static,
    O: Resource<DynamicType = ()>,
    T: std::borrow::Borrow<O> + Send + 'static,
    I: IntoIterator<Item = ObjectRef<K>> + 'static,
    I::IntoIter: Send,
{
    controller::trigger_with(changes, move |object: T| {
        let from = ObjectRef::from_obj(object.borrow()).erase();
        mapper(object)
            .into_iter()
            .map(move |obj_ref| ReconcileRequest {
                obj_ref,
                reason: ReconcileReason::RelatedObjectUpdated {
                    obj_ref: Box::new(from.clone()),
                },
            })
            .collect::<Vec<_>>()
    })
}

/// An object's place in its queue: namespace and name.
type Key = (Option<String>, String);

fn key<K: Resource>(object: &ObjectRef<K>) -> Key {
    (object.namespace.clone(), object.name.clone())
}

/// One controller's queue as seen from outside: what waits since when,
/// what runs since when, and the metrics of the queue `name`.
struct Queue {
    state: Mutex<State>,
    adds: IntCounter,
    depth: IntGauge,
    queued: Histogram,
    work: Histogram,
    unfinished: Gauge,
    longest: Gauge,
    retries: IntCounter,
}

#[derive(Default)]
struct State {
    /// Objects with a request not yet started, since their add.
    waiting: HashMap<Key, Instant>,
    /// Objects being reconciled, since their start.
    running: HashMap<Key, Instant>,
}

impl Queue {
    fn new(name: &str) -> Self {
        let m = &*METRICS;
        Self {
            state: Mutex::default(),
            adds: m.adds.with_label_values(&[name]),
            depth: m.depth.with_label_values(&[name]),
            queued: m.queued.with_label_values(&[name]),
            work: m.work.with_label_values(&[name]),
            unfinished: m.unfinished.with_label_values(&[name]),
            longest: m.longest.with_label_values(&[name]),
            retries: m.retries.with_label_values(&[name]),
        }
    }

    /// A request for `key`: counted unless one already waits.
    fn add(&self, key: Key) {
        let mut state = self.state.lock().expect("queue state");
        if state.waiting.contains_key(&key) {
            return;
        }
        self.adds.inc();
        // One for an object being reconciled waits for it to end, outside
        // the depth until then, as in client-go.
        if !state.running.contains_key(&key) {
            self.depth.inc();
        }
        state.waiting.insert(key, Instant::now());
    }

    /// A reconcile of `key` starts; it ends when the returned value drops.
    fn start(self: &Arc<Self>, key: Key) -> Work {
        let now = Instant::now();
        let mut state = self.state.lock().expect("queue state");
        match state.waiting.remove(&key) {
            Some(since) => {
                self.depth.dec();
                self.queued.observe(now.duration_since(since).as_secs_f64());
            }
            // Not added through a watch: a requeue that came due now.
            None => {
                self.adds.inc();
                self.queued.observe(0.0);
            }
        }
        state.running.insert(key.clone(), now);
        Work {
            queue: self.clone(),
            key: Some(key),
        }
    }

    fn done(&self, key: Key) {
        let mut state = self.state.lock().expect("queue state");
        if let Some(since) = state.running.remove(&key) {
            self.work.observe(since.elapsed().as_secs_f64());
        }
        // Added while it ran: it waits in the queue from now.
        if state.waiting.contains_key(&key) {
            self.depth.inc();
        }
    }

    /// Publishes the age of the running reconciles, every 500 ms.
    async fn publish_unfinished(self: Arc<Self>) {
        let mut tick = tokio::time::interval(UNFINISHED_EVERY);
        loop {
            tick.tick().await;
            let (total, longest) = {
                let state = self.state.lock().expect("queue state");
                let ages = state.running.values().map(|t| t.elapsed().as_secs_f64());
                ages.fold((0.0, 0.0), |(sum, max): (f64, f64), age| {
                    (sum + age, max.max(age))
                })
            };
            self.unfinished.set(total);
            self.longest.set(longest);
        }
    }
}

/// A running reconcile: its end is recorded when this drops.
struct Work {
    queue: Arc<Queue>,
    key: Option<Key>,
}

impl Drop for Work {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.queue.done(key);
        }
    }
}

struct Metrics {
    adds: IntCounterVec,
    depth: IntGaugeVec,
    queued: HistogramVec,
    work: HistogramVec,
    unfinished: GaugeVec,
    longest: GaugeVec,
    retries: IntCounterVec,
}

/// client-go's buckets for both durations: 10 ns to 1000 s, by tens
/// (written out: powers of ten multiplied in floating point drift).
fn buckets() -> Vec<f64> {
    vec![
        1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0,
    ]
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let label = &["name"];
    let metrics = Metrics {
        adds: IntCounterVec::new(
            Opts::new("workqueue_adds_total", "Total number of adds handled by workqueue"),
            label,
        )
        .expect("a valid metric"),
        depth: IntGaugeVec::new(Opts::new("workqueue_depth", "Current depth of workqueue"), label)
            .expect("a valid metric"),
        queued: HistogramVec::new(
            HistogramOpts::new(
                "workqueue_queue_duration_seconds",
                "How long in seconds an item stays in workqueue before being requested.",
            )
            .buckets(buckets()),
            label,
        )
        .expect("a valid metric"),
        work: HistogramVec::new(
            HistogramOpts::new(
                "workqueue_work_duration_seconds",
                "How long in seconds processing an item from workqueue takes.",
            )
            .buckets(buckets()),
            label,
        )
        .expect("a valid metric"),
        unfinished: GaugeVec::new(
            Opts::new(
                "workqueue_unfinished_work_seconds",
                "How many seconds of work has done that is in progress and hasn't been observed by work_duration. Large values indicate stuck threads. One can deduce the number of stuck threads by observing the rate at which this increases.",
            ),
            label,
        )
        .expect("a valid metric"),
        longest: GaugeVec::new(
            Opts::new(
                "workqueue_longest_running_processor_seconds",
                "How many seconds has the longest running processor for workqueue been running.",
            ),
            label,
        )
        .expect("a valid metric"),
        retries: IntCounterVec::new(
            Opts::new("workqueue_retries_total", "Total number of retries handled by workqueue"),
            label,
        )
        .expect("a valid metric"),
    };
    let registry = prometheus::default_registry();
    // Controllers started twice in one process (tests) share them.
    let _ = registry.register(Box::new(metrics.adds.clone()));
    let _ = registry.register(Box::new(metrics.depth.clone()));
    let _ = registry.register(Box::new(metrics.queued.clone()));
    let _ = registry.register(Box::new(metrics.work.clone()));
    let _ = registry.register(Box::new(metrics.unfinished.clone()));
    let _ = registry.register(Box::new(metrics.longest.clone()));
    let _ = registry.register(Box::new(metrics.retries.clone()));
    metrics
});

#[cfg(test)]
mod tests {
    use super::*;

    fn k(name: &str) -> Key {
        (Some("ns".into()), name.into())
    }

    #[test]
    fn the_queue_counts_as_client_go_does() {
        let q = Arc::new(Queue::new("test-queue-counts"));
        q.add(k("a"));
        q.add(k("a"));
        q.add(k("b"));
        assert_eq!(
            (q.adds.get(), q.depth.get()),
            (2, 2),
            "a repeat is not an add"
        );
        let a = q.start(k("a"));
        assert_eq!(q.depth.get(), 1);
        // Added while it runs: waits outside the depth until it ends.
        q.add(k("a"));
        assert_eq!((q.adds.get(), q.depth.get()), (3, 1));
        drop(a);
        assert_eq!(q.depth.get(), 2);
        assert_eq!(q.work.get_sample_count(), 1);
        drop(q.start(k("a")));
        drop(q.start(k("b")));
        assert_eq!(q.depth.get(), 0);
        assert_eq!(q.queued.get_sample_count(), 3);
        // A requeue that came due: an add as it starts, nothing waited.
        drop(q.start(k("c")));
        assert_eq!((q.adds.get(), q.depth.get()), (4, 0));
        assert_eq!(q.work.get_sample_count(), 4);
    }
}
