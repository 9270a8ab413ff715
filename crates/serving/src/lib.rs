//! Knative Serving, natively: the `serving.knative.dev/v1` kinds reconciled
//! as Knative's controllers do, and its request-driven autoscaler.
//!
//! ```text
//!  Service ──▶ Configuration ──▶ Revision ──▶ Deployment {rev}-deployment
//!     │                                  └──▶ Service {rev} (ClusterIP :80)
//!     └──────▶ Route ── status.traffic ──▶ the gateway (one routing table)
//!
//!  autoscaler: pods' request-seconds (custom.metrics.k8s.io) ─▶ KPA ─▶ replicas
//! ```
//!
//! - [`service`]: a Knative Service owns a Configuration and a Route of its
//!   name and reports their state as its own.
//! - [`configuration`]: each template generation stamps out an immutable
//!   Revision; the latest created and latest ready ones are in its status.
//! - [`revision`]: a Revision runs as a Deployment with Knative's labels and
//!   is reached through a ClusterIP Service of its name.
//! - [`route`]: traffic targets resolve to revisions, with percentages and
//!   tags; `status.url` is `http://NAME.NAMESPACE.DOMAIN`. The gateway on
//!   every node serves Routes from their status, in the same table as
//!   Ingresses and HTTPRoutes, and holds requests for a revision at zero
//!   until it has a pod (the activator).
//! - [`autoscaler`]: Knative's KPA (stable and panic windows) on the
//!   average requests in flight per pod, measured where requests enter the
//!   pods, and scale to zero after a window without traffic.
//!
//! All of it runs under the controller manager's lease.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use wasmkube_api::knative::Condition;

pub mod autoscaler;
pub mod configuration;
pub mod revision;
pub mod route;
pub mod service;

pub use wasmkube_api::knative::ACTIVATED_AT;

/// Field manager of everything this crate writes.
const MANAGER: &str = "wasmkube-serving";

/// Settings of Knative Serving.
#[derive(Clone, Debug)]
pub struct Config {
    /// The domain of `status.url` (Knative's default `example.com`).
    pub domain: String,
    /// How often the autoscaler decides (Knative: 2 s).
    pub tick: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            domain: wasmkube_api::knative::DEFAULT_DOMAIN.into(),
            tick: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("API request failed: {0}")]
    Kube(#[from] kube::Error),
    #[error("{what} watch ended")]
    WatchEnded { what: &'static str },
    #[error("encoding {what}: {source}")]
    Encode {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
}

/// Runs every Knative Serving controller and the autoscaler until one
/// stops.
pub async fn run(client: kube::Client, config: Config) -> Result<(), Error> {
    let config = Arc::new(config);
    let mut inf = wasmkube_controllers::Informers::new(client.clone());
    let service = service::run(client.clone());
    let configuration = configuration::run(client.clone(), &mut inf);
    let revision = revision::run(client.clone(), &mut inf);
    let route = route::run(client.clone(), &mut inf, config.clone());
    let autoscaler = autoscaler::run(client.clone(), &mut inf, config.clone());
    tokio::select! {
        () = inf.run() => Err(Error::WatchEnded { what: "informer" }),
        r = service => r,
        r = configuration => r,
        r = revision => r,
        r = route => r,
        r = autoscaler => r,
    }
}

/// An owner reference that makes `owner` the controller of what carries it.
fn controller_ref<K: kube::Resource<DynamicType = ()>>(owner: &K) -> OwnerReference {
    OwnerReference {
        api_version: K::api_version(&()).into_owned(),
        kind: K::kind(&()).into_owned(),
        name: owner.meta().name.clone().unwrap_or_default(),
        uid: owner.meta().uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// Sets a condition, keeping its transition time when its status holds.
fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: &str,
    reason: Option<&str>,
    message: Option<String>,
) {
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            if c.status != status {
                c.last_transition_time = Some(now);
            }
            c.status = status.into();
            c.reason = reason.map(str::to_owned);
            c.message = message;
        }
        None => conditions.push(Condition {
            type_: type_.into(),
            status: status.into(),
            severity: None,
            last_transition_time: Some(now),
            reason: reason.map(str::to_owned),
            message,
        }),
    }
    conditions.sort_by(|a, b| a.type_.cmp(&b.type_));
}

/// The status of a condition: `True`, `False` or `Unknown`.
fn status_of(conditions: &[Condition], type_: &str) -> String {
    wasmkube_api::knative::condition(conditions, type_)
        .map(|c| c.status.clone())
        .unwrap_or_else(|| "Unknown".into())
}

/// Sets `Ready` from the conditions it is made of: False if one is, True
/// if all are, Unknown otherwise (with the first non-True one's reason).
fn set_ready_from(conditions: &mut Vec<Condition>, parts: &[&str]) {
    let mut status = "True";
    let mut why: (Option<String>, Option<String>) = (None, None);
    for part in parts {
        let c = wasmkube_api::knative::condition(conditions, part).cloned();
        let s = c.as_ref().map(|c| c.status.as_str()).unwrap_or("Unknown");
        if s == "False" || (s == "Unknown" && status == "True") {
            status = if s == "False" { "False" } else { "Unknown" };
            why = c.map(|c| (c.reason, c.message)).unwrap_or_default();
        }
        if status == "False" {
            break;
        }
    }
    set_condition(conditions, "Ready", status, why.0.as_deref(), why.1);
}

/// Patches `status` of an object through its status subresource (gone
/// already is fine).
async fn patch_status<K>(
    api: &kube::Api<K>,
    name: &str,
    status: &impl serde::Serialize,
) -> Result<(), Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let patch = serde_json::json!({ "status": status });
    match api
        .patch_status(
            name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Creates an object unless it exists (a 409 is someone else's create).
async fn create_absent<K>(api: &kube::Api<K>, obj: &K) -> Result<(), Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    match api.create(&kube::api::PostParams::default(), obj).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn retry_soon<K, C>(obj: Arc<K>, error: &Error, _ctx: Arc<C>) -> kube::runtime::controller::Action
where
    K: kube::Resource<DynamicType = ()>,
{
    use kube::ResourceExt;
    tracing::warn!(kind = %K::kind(&()), name = %obj.name_any(), error = %wasmkube_api::ErrorChain(error), "reconcile failed; retrying");
    kube::runtime::controller::Action::requeue(Duration::from_secs(1))
}
