//! Level-triggered controllers on kube-runtime, as kube-controller-manager
//! runs them: each reconciles desired against observed state, idempotently,
//! never branching on why it was woken, and requeues instead of looping.
//!
//! **Architecture invariant:** controllers are API clients only (kube-rs);
//! they read through reflector caches and write through the API server.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use serde::de::DeserializeOwned;
use tokio_stream::wrappers::ReceiverStream;

pub mod apiserver_endpoints;
pub mod cronjob;
pub mod csrcleaner;
pub mod daemonset;
pub mod deployment;
mod disruption;
pub mod endpoints;
mod expectations;
pub mod gc;
mod hpa;
pub mod job;
pub mod leader;
mod metrics;
pub mod nodeipam;
pub mod nodelifecycle;
mod pods;
pub mod queue;
pub mod replicaset;
mod resourcequota;
pub mod serviceaccount;
mod servicelb;
mod statefulset;
mod volumes;

use std::time::Duration;

/// Controller manager settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// The first wait before a failed Job pod is replaced; it doubles with
    /// each failure, up to six minutes (Kubernetes: 10 s).
    pub job_backoff: Duration,
    /// How long a node may go without a heartbeat before it is marked
    /// `Ready=Unknown` and tainted unreachable (Kubernetes: 40 s).
    pub node_monitor_grace_period: Duration,
    /// How often node heartbeats and NoExecute taints are checked.
    pub node_monitor_period: Duration,
    /// Pod CIDRs for nodes are carved from this (`None`: nodes get none).
    pub cluster_cidr: Option<nodeipam::Cidr>,
    /// The prefix length of each node's pod CIDR.
    pub node_cidr_mask_size: u8,
    /// How often HorizontalPodAutoscalers are evaluated (Kubernetes: 15 s).
    pub hpa_sync_period: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            job_backoff: Duration::from_secs(10),
            node_monitor_grace_period: Duration::from_secs(40),
            node_monitor_period: Duration::from_secs(5),
            cluster_cidr: Some(nodeipam::Cidr {
                base: [10, 244, 0, 0].into(),
                prefix: 16,
            }),
            node_cidr_mask_size: 24,
            hpa_sync_period: Duration::from_secs(15),
        }
    }
}

/// Runs every controller, on shared informers, until one stops.
pub async fn run_all(client: kube::Client, config: Config) -> Result<(), Error> {
    let mut inf = Informers::new(client.clone());
    let replicaset = replicaset::run(client.clone(), &mut inf);
    let deployment = deployment::run(client.clone(), &mut inf);
    let daemonset = daemonset::run(client.clone(), &mut inf);
    let statefulset = statefulset::run(client.clone(), &mut inf);
    let job = job::run(client.clone(), &mut inf, &config);
    let cronjob = cronjob::run(client.clone(), &mut inf);
    let nodelifecycle = nodelifecycle::run(client.clone(), &mut inf, &config);
    let endpoints = endpoints::run(client.clone(), &mut inf);
    let servicelb = servicelb::run(client.clone(), &mut inf);
    let hpa = hpa::run(client.clone(), &mut inf, config.hpa_sync_period);
    let disruption = disruption::run(client.clone(), &mut inf);
    let resourcequota = resourcequota::run(client.clone(), &mut inf);
    let volumes = volumes::run(client.clone(), &mut inf);
    let ipam = async {
        match config.cluster_cidr {
            Some(cidr) => nodeipam::run(client.clone(), cidr, config.node_cidr_mask_size).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        () = inf.run() => Err(Error::WatchEnded { what: "informer" }),
        r = replicaset => r,
        r = deployment => r,
        r = daemonset => r,
        r = statefulset => r,
        r = job => r,
        r = cronjob => r,
        r = nodelifecycle => r,
        r = gc::run(client.clone()) => r,
        r = serviceaccount::run(client.clone()) => r,
        r = csrcleaner::run(client.clone()) => r,
        r = endpoints => r,
        r = servicelb => r,
        r = hpa => r,
        r = disruption => r,
        r = resourcequota => r,
        r = volumes => r,
        r = ipam => r,
    }
}

pub(crate) use wasmkube_api::ErrorChain;

/// Records an Event about `obj` from `component` (best effort: a failure is
/// logged, never returned).
pub(crate) async fn record_event<K>(
    client: &kube::Client,
    obj: &K,
    component: &str,
    kind: &str,
    reason: &str,
    message: String,
) where
    K: kube::Resource<DynamicType = ()>,
{
    use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use kube::ResourceExt;
    let ns = obj.namespace().unwrap_or_else(|| "default".into());
    let now = Some(Time(k8s_openapi::jiff::Timestamp::now()));
    let event = Event {
        metadata: kube::api::ObjectMeta {
            generate_name: Some(format!("{}.", obj.name_any())),
            namespace: Some(ns.clone()),
            ..Default::default()
        },
        involved_object: ObjectReference {
            api_version: Some(K::api_version(&()).into_owned()),
            kind: Some(K::kind(&()).into_owned()),
            name: Some(obj.name_any()),
            namespace: obj.namespace(),
            uid: obj.uid(),
            ..Default::default()
        },
        reason: Some(reason.into()),
        message: Some(message),
        type_: Some(kind.into()),
        count: Some(1),
        first_timestamp: now.clone(),
        last_timestamp: now,
        source: Some(EventSource {
            component: Some(component.into()),
            host: None,
        }),
        ..Default::default()
    };
    let api: Api<Event> = Api::namespaced(client.clone(), &ns);
    if let Err(e) = api.create(&Default::default(), &event).await {
        tracing::debug!(error = %e, reason, "cannot record an event");
    }
}

/// A controller's view of one kind: the shared cache, plus its own stream
/// of the objects the cache has just applied.
///
/// The reflector updates the store first and only then forwards the object,
/// Apply and Delete alike, so a reconcile woken by an event never reads a
/// store older than that event. (kube's shared-store subscribers forward only
/// references for applied objects and resolve them later, so a pod updated and
/// then deleted at once would wake nobody.)
pub struct Cache<K: kube::Resource<DynamicType = ()> + 'static> {
    pub store: Store<K>,
    pub changes: ReceiverStream<Arc<K>>,
}

/// The controller manager's shared informers: one watch and one cache per
/// kind, however many controllers read it (client-go's
/// SharedInformerFactory), so each object is decoded and held once.
/// Controllers subscribe while they are built; [`Informers::run`] then
/// drives every watch.
pub struct Informers {
    client: kube::Client,
    kinds: HashMap<TypeId, Box<dyn Any + Send>>,
    drivers: Vec<BoxFuture<'static, ()>>,
}

type Subscribers<K> = Arc<Mutex<Vec<tokio::sync::mpsc::Sender<Arc<K>>>>>;

impl Informers {
    pub fn new(client: kube::Client) -> Self {
        Self {
            client,
            kinds: HashMap::new(),
            drivers: Vec::new(),
        }
    }

    /// The shared cache of `K`, with a change stream of its own.
    pub fn cache<K>(&mut self) -> Cache<K>
    where
        K: kube::Resource<DynamicType = ()>
            + Clone
            + DeserializeOwned
            + std::fmt::Debug
            + Send
            + Sync
            + 'static,
    {
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        let (store, subscribers) = self.shared::<K>();
        subscribers.lock().expect("subscribers lock").push(tx);
        Cache {
            store,
            changes: ReceiverStream::new(rx),
        }
    }

    /// The shared cache of `K` alone, for a reader that polls it.
    pub fn store<K>(&mut self) -> Store<K>
    where
        K: kube::Resource<DynamicType = ()>
            + Clone
            + DeserializeOwned
            + std::fmt::Debug
            + Send
            + Sync
            + 'static,
    {
        self.shared::<K>().0
    }

    fn shared<K>(&mut self) -> (Store<K>, Subscribers<K>)
    where
        K: kube::Resource<DynamicType = ()>
            + Clone
            + DeserializeOwned
            + std::fmt::Debug
            + Send
            + Sync
            + 'static,
    {
        match self
            .kinds
            .get(&TypeId::of::<K>())
            .and_then(|k| k.downcast_ref::<(Store<K>, Subscribers<K>)>())
        {
            Some((store, subs)) => (store.clone(), subs.clone()),
            None => {
                let (store, writer) = reflector::store();
                let subs: Subscribers<K> = Arc::default();
                let feed = subs.clone();
                let driver = reflector::reflector(
                    writer,
                    watcher(
                        Api::<K>::all(self.client.clone()),
                        watcher::Config::default(),
                    ),
                )
                .default_backoff()
                .touched_objects()
                .for_each(move |touched| {
                    let targets = feed.lock().expect("subscribers lock").clone();
                    async move {
                        if let Ok(obj) = touched {
                            // One allocation shared by every subscriber, not
                            // a deep copy of the object for each.
                            let obj = Arc::new(obj);
                            for tx in targets {
                                let _ = tx.send(obj.clone()).await;
                            }
                        }
                    }
                })
                .boxed();
                self.drivers.push(driver);
                self.kinds
                    .insert(TypeId::of::<K>(), Box::new((store.clone(), subs.clone())));
                (store, subs)
            }
        }
    }

    /// Drives every watch; returns only if one ends for good.
    pub async fn run(self) {
        futures::future::select_all(self.drivers).await;
    }
}

/// Runs the controller for `K` that owns objects of `C`: waits for the
/// shared cache of `C` to sync, then reconciles every `K` whenever it or one
/// of its children changes.
pub(crate) async fn run_owning<K, C, X, F, Fut>(
    client: kube::Client,
    children: Cache<C>,
    reconcile: F,
    ctx: Arc<X>,
) -> Result<(), Error>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    C: kube::Resource<DynamicType = ()> + Clone + std::fmt::Debug + Send + Sync + 'static,
    X: Send + Sync + 'static,
    F: FnMut(Arc<K>, Arc<X>) -> Fut,
    Fut: std::future::Future<Output = Result<kube::runtime::controller::Action, Error>>
        + Send
        + 'static,
{
    let _ = children.store.wait_until_ready().await;
    let name = K::kind(&()).to_lowercase();
    queue::Controller::new(Api::<K>::all(client), watcher::Config::default())
        .owns_shared_stream(children.changes)
        .run(&name, reconcile, retry_soon, ctx)
        .await;
    Ok(())
}

/// Every controller's error policy: log the whole error and retry soon.
pub(crate) fn retry_soon<K, C>(
    obj: std::sync::Arc<K>,
    error: &Error,
    _ctx: std::sync::Arc<C>,
) -> kube::runtime::controller::Action
where
    K: kube::Resource<DynamicType = ()>,
{
    use kube::ResourceExt;
    tracing::warn!(kind = %K::kind(&()), name = %obj.name_any(), error = %ErrorChain(error), "reconcile failed; retrying");
    kube::runtime::controller::Action::requeue(std::time::Duration::from_secs(2))
}

/// A delete's outcome, with "already gone" counted as done.
pub(crate) fn gone_ok<T>(result: Result<T, kube::Error>) -> Result<(), kube::Error> {
    match result {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
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
