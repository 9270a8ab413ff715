//! The resource quota controller: keeps each ResourceQuota's `status`
//! (`hard` from the spec, `used` counted from the objects of its
//! namespace), as Kubernetes' does. The API server charges each create to
//! the quotas before it stores the object; this controller gives back what
//! deleted and finished objects held, and corrects charges for creates that
//! then failed.
//!
//! It is woken by the quota itself, by pods (from the shared cache), and
//! by a metadata-only watch of every other kind a quota counts, started the
//! first time a quota names it (Kubernetes' replenishment), so a freed slot
//! is seen at once; and it recounts every five minutes regardless.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::queue::Controller;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, ResourceQuota};
use kube::ResourceExt;
use kube::api::{Api, ApiResource, DynamicObject, ListParams, PostParams};
use kube::core::PartialObjectMeta;
use kube::discovery::{ApiCapabilities, Scope};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use wasmkube_api::quantity::Quantity;
use wasmkube_api::quota::{self, Usage};

use crate::Error;

/// How often every quota is recounted even if nothing woke it (Kubernetes'
/// `--resource-quota-sync-period`).
const RESYNC: Duration = Duration::from_secs(300);

/// How quiet a quota must be before it is recounted.
const DEBOUNCE: Duration = Duration::from_secs(1);

struct Ctx {
    client: kube::Client,
    pods: Store<Pod>,
    /// The served resources found so far, by (group, plural): discovery
    /// is asked once per kind, not on every count.
    resources: Mutex<std::collections::HashMap<(String, String), (ApiResource, ApiCapabilities)>>,
    /// The kinds whose objects wake the quotas of their namespace.
    watched: Mutex<BTreeSet<(String, String)>>,
    /// Namespaces whose quotas a watched kind's change should recount.
    wake: mpsc::UnboundedSender<String>,
}

/// The served resource of `group`/`plural`, found by discovery (custom
/// kinds included).
async fn resource_of(
    ctx: &Ctx,
    group: &str,
    plural: &str,
) -> Result<Option<(ApiResource, ApiCapabilities)>, Error> {
    let key = (group.to_owned(), plural.to_owned());
    if let Some(found) = ctx.resources.lock().expect("not poisoned").get(&key) {
        return Ok(Some(found.clone()));
    }
    let client = &ctx.client;
    // The core group is "" here as in discovery.
    let group = match kube::discovery::group(client, group).await {
        Ok(g) => g,
        Err(kube::Error::Discovery(_)) => return Ok(None),
        Err(kube::Error::Api(e)) if e.code == 404 => return Ok(None),
        Err(e) => return Err(Error::Kube(e)),
    };
    let found = group
        .recommended_resources()
        .into_iter()
        .find(|(r, _)| r.plural == plural);
    // Only what is served is remembered: a kind not served yet (a CRD to
    // come) is asked about again.
    if let Some(found) = &found {
        ctx.resources
            .lock()
            .expect("not poisoned")
            .insert(key, found.clone());
    }
    Ok(found)
}

/// What the objects of the quota's namespace use of its resources.
async fn count(q: &ResourceQuota, ctx: &Ctx) -> Result<Usage, Error> {
    let ns = q.namespace().unwrap_or_default();
    let qv = serde_json::to_value(q).map_err(|e| Error::Encode(e.to_string()))?;
    let hard = quota::hard(&qv);
    let kinds: BTreeSet<(String, String)> = hard
        .keys()
        .filter_map(|k| quota::measured_kind(k))
        .collect();
    let mut used = Usage::new();
    let mut add = |u: Usage| {
        for (k, v) in u {
            if hard.contains_key(&k) {
                used.entry(k).or_insert(Quantity(0)).0 += v.0;
            }
        }
    };
    for (group, plural) in kinds {
        if group.is_empty() && plural == "pods" {
            for pod in ctx.pods.state() {
                if pod.namespace().as_deref() != Some(&ns) {
                    continue;
                }
                let pod = serde_json::to_value(&*pod).map_err(|e| Error::Encode(e.to_string()))?;
                if quota::covers(&qv, "", "pods", &pod) {
                    add(quota::usage("", "pods", &pod));
                }
            }
            continue;
        }
        let Some((resource, caps)) = resource_of(ctx, &group, &plural).await? else {
            continue;
        };
        if caps.scope != Scope::Namespaced {
            continue;
        }
        watch_kind(ctx, &group, &plural, &resource);
        let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), &ns, &resource);
        // Only services and claims are measured beyond their count; the
        // others (Secrets among them) are counted from their metadata.
        if group.is_empty() && matches!(plural.as_str(), "services" | "persistentvolumeclaims") {
            for obj in api
                .list(&ListParams::default())
                .await
                .map_err(Error::Kube)?
            {
                let obj = serde_json::to_value(&obj).map_err(|e| Error::Encode(e.to_string()))?;
                if quota::covers(&qv, &group, &plural, &obj) {
                    add(quota::usage(&group, &plural, &obj));
                }
            }
        } else if quota::covers(&qv, &group, &plural, &Value::Null) {
            let listed = match api.list_metadata(&ListParams::default()).await {
                Ok(listed) => listed,
                // Served no more (a CRD deleted, or served at another
                // version now): forget it, so the retry asks discovery.
                Err(kube::Error::Api(e)) if e.code == 404 => {
                    ctx.resources
                        .lock()
                        .expect("not poisoned")
                        .remove(&(group.clone(), plural.clone()));
                    return Err(Error::Kube(kube::Error::Api(e)));
                }
                Err(e) => return Err(Error::Kube(e)),
            };
            for _ in listed.items {
                add(quota::usage(&group, &plural, &Value::Null));
            }
        }
    }
    Ok(used)
}

/// Starts a metadata watch of a counted kind, once, that wakes the quotas
/// of the namespace of every object that comes, changes or goes.
fn watch_kind(ctx: &Ctx, group: &str, plural: &str, resource: &ApiResource) {
    let key = (group.to_owned(), plural.to_owned());
    if !ctx.watched.lock().expect("not poisoned").insert(key) {
        return;
    }
    let api: Api<PartialObjectMeta<DynamicObject>> = Api::all_with(ctx.client.clone(), resource);
    let wake = ctx.wake.clone();
    tokio::spawn(async move {
        let mut events = watcher(api, watcher::Config::default())
            .default_backoff()
            .boxed();
        while let Some(event) = events.next().await {
            let namespaces: Vec<String> = match event {
                Ok(watcher::Event::Apply(o) | watcher::Event::Delete(o)) => {
                    o.namespace().into_iter().collect()
                }
                // A relist: every namespace with quotas is recounted by the
                // periodic resync; nothing to single out.
                _ => Vec::new(),
            };
            for ns in namespaces {
                if wake.send(ns).is_err() {
                    return;
                }
            }
        }
    });
}

async fn reconcile(q: Arc<ResourceQuota>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let used = count(&q, &ctx).await?;
    let qv = serde_json::to_value(&*q).map_err(|e| Error::Encode(e.to_string()))?;
    let status = quota::status(&qv, &used);
    let current = json!({
        "hard": qv["status"]["hard"],
        "used": qv["status"]["used"],
    });
    if current == status {
        return Ok(Action::requeue(RESYNC));
    }
    let mut updated = qv;
    updated["status"] = status;
    if let Some(meta) = updated["metadata"].as_object_mut() {
        meta.remove("managedFields");
    }
    let api: Api<ResourceQuota> =
        Api::namespaced(ctx.client.clone(), &q.namespace().unwrap_or_default());
    // Under the read version: a charge the API server made meanwhile makes
    // this fail, and the next pass counts it.
    let updated: ResourceQuota =
        serde_json::from_value(updated).map_err(|e| Error::Encode(e.to_string()))?;
    match api
        .replace_status(&q.name_any(), &PostParams::default(), &updated)
        .await
    {
        Ok(_) => Ok(Action::requeue(RESYNC)),
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {
            Ok(Action::requeue(Duration::from_millis(100)))
        }
        Err(e) => Err(Error::Kube(e)),
    }
}

/// The quotas of a namespace, as references to reconcile.
fn quotas_of(quotas: &Store<ResourceQuota>, ns: &str) -> Vec<ObjectRef<ResourceQuota>> {
    quotas
        .state()
        .into_iter()
        .filter(|q| q.namespace().as_deref() == Some(ns))
        .map(|q| ObjectRef::from_obj(&*q))
        .collect()
}

/// Runs the resource quota controller until its watches end.
pub(crate) fn run(
    client: kube::Client,
    informers: &mut crate::Informers,
) -> impl std::future::Future<Output = Result<(), Error>> + use<> {
    let crate::Cache {
        store: pods,
        changes,
    } = informers.cache::<Pod>();
    let (wake, woken) = mpsc::unbounded_channel();
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        pods: pods.clone(),
        resources: Mutex::default(),
        watched: Mutex::default(),
        wake,
    });
    async move {
        let _ = pods.wait_until_ready().await;
        // Debounced: a charge wakes this controller before the object it
        // was charged for is stored; a count taken in that moment would
        // miss it and hand its share back. Counting once the namespace has
        // been quiet for a moment leaves the window to a create that takes
        // longer than that to store (Kubernetes' controller, counting from
        // caches, has the same window).
        let controller = Controller::new(
            Api::<ResourceQuota>::all(client),
            watcher::Config::default(),
        )
        .with_config(kube::runtime::controller::Config::default().debounce(DEBOUNCE));
        let quotas = controller.store();
        let by_pod = quotas.clone();
        let covering =
            move |pod: Arc<Pod>| quotas_of(&by_pod, &pod.namespace().unwrap_or_default());
        let woken = UnboundedReceiverStream::new(woken)
            .flat_map(move |ns| futures::stream::iter(quotas_of(&quotas, &ns)));
        controller
            .watches_shared_stream(changes, covering)
            .reconcile_on(woken)
            .run("resourcequota", reconcile, crate::retry_soon, ctx)
            .await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotas_of_a_namespace_are_found_in_the_cache() {
        let (store, mut writer) = kube::runtime::reflector::store::<ResourceQuota>();
        for (ns, name) in [("a", "q1"), ("a", "q2"), ("b", "q3")] {
            let q: ResourceQuota = serde_json::from_value(
                json!({"metadata": {"name": name, "namespace": ns}, "spec": {"hard": {"pods": "1"}}}),
            )
            .unwrap();
            writer.apply_watcher_event(&watcher::Event::Apply(q));
        }
        let mut names: Vec<String> = quotas_of(&store, "a").into_iter().map(|r| r.name).collect();
        names.sort();
        assert_eq!(names, ["q1", "q2"]);
    }
}
