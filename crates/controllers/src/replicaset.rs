//! The ReplicaSet controller: keeps `spec.replicas` active pods that match the
//! selector, creating from the template and deleting surplus (unscheduled and
//! not-ready pods first), and reports counts in the status.
//!
//! Creates and deletes are remembered ("expectations") until the pod cache
//! shows them, so a reconcile that runs before the cache catches up neither
//! creates twice nor deletes twice.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::Store;
use kube::{Resource, ResourceExt};
use serde_json::json;
use wasmkube_api::selectors::LabelSelector;

use crate::Error;
use crate::expectations::Expectations;
use crate::pods;

/// Pods created (or deleted) concurrently per reconcile.
const CREATE_CONCURRENCY: usize = 16;
/// Most pods created or deleted by one reconcile.
const BURST: usize = 500;

pub(crate) struct Ctx {
    client: kube::Client,
    pods: Store<Pod>,
    expectations: Expectations,
}

/// Pods owned (as controller) by the object with `uid`, in `ns`.
pub(crate) fn owned_pods(store: &Store<Pod>, ns: &str, uid: &str) -> Vec<Arc<Pod>> {
    store
        .state()
        .into_iter()
        .filter(|p| p.metadata.namespace.as_deref() == Some(ns))
        .filter(|p| {
            p.owner_references()
                .iter()
                .any(|o| o.controller == Some(true) && o.uid == uid)
        })
        .collect()
}

fn pod_from_template(rs: &ReplicaSet) -> Result<Pod, Error> {
    let template = rs
        .spec
        .as_ref()
        .and_then(|s| s.template.clone())
        .unwrap_or_default();
    let mut meta = template.metadata.unwrap_or_default();
    meta.name = None;
    meta.generate_name = Some(format!("{}-", rs.name_any()));
    meta.namespace = rs.namespace();
    meta.owner_references = Some(vec![rs.controller_owner_ref(&()).ok_or(Error::MissingUid)?]);
    Ok(Pod {
        metadata: meta,
        spec: template.spec,
        status: None,
    })
}

async fn reconcile(rs: Arc<ReplicaSet>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let ns = rs.namespace().unwrap_or_default();
    let uid = rs.uid().ok_or(Error::MissingUid)?;
    if rs.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let spec = rs.spec.clone().unwrap_or_default();
    let selector = LabelSelector::from_api(&spec.selector).map_err(Error::Selector)?;
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);

    // Adopt active orphans the selector matches, as Kubernetes does.
    for orphan in ctx.pods.state().iter().filter(|p| {
        p.metadata.namespace.as_deref() == Some(ns.as_str())
            && pods::is_active(p)
            && !p
                .owner_references()
                .iter()
                .any(|o| o.controller == Some(true))
            && selector.matches(p.metadata.labels.as_ref().unwrap_or(&Default::default()))
    }) {
        let owner = rs.controller_owner_ref(&()).ok_or(Error::MissingUid)?;
        let patch = json!({"metadata": {"ownerReferences": [owner], "uid": orphan.metadata.uid}});
        pods_api
            .patch(
                &orphan.name_any(),
                &PatchParams::default(),
                &Patch::Strategic(patch),
            )
            .await
            .map_err(Error::Kube)?;
    }

    let owned = owned_pods(&ctx.pods, &ns, &uid);
    let (pending_creates, pending_deletes) = ctx.expectations.observe(&uid, &owned);
    let mut active: Vec<Arc<Pod>> = owned
        .iter()
        .filter(|p| {
            pods::is_active(p)
                && !p
                    .metadata
                    .uid
                    .as_ref()
                    .is_some_and(|u| pending_deletes.contains(u))
        })
        .cloned()
        .collect();
    let want = spec.replicas.unwrap_or(1).max(0) as usize;
    let have = active.len() + pending_creates;
    // Creates beyond this reconcile's burst: it comes back for them soon,
    // after writing the status (so a long scale-up shows its progress).
    let mut more = false;
    tracing::debug!(replicaset = %rs.name_any(), want, active = active.len(), pending_creates, pending_deletes = pending_deletes.len(), "reconcile");
    if have < want {
        let template = pod_from_template(&rs)?;
        // At most a burst per reconcile (Kubernetes' burstReplicas); the
        // rest follow as soon as the cache shows these.
        let count = (want - have).min(BURST);
        let created: Vec<Result<Pod, kube::Error>> = futures::stream::iter(0..count)
            .map(|_| {
                let (api, template) = (pods_api.clone(), template.clone());
                async move { api.create(&PostParams::default(), &template).await }
            })
            .buffer_unordered(CREATE_CONCURRENCY)
            .collect()
            .await;
        // Every pod that was created is expected, even if another create failed.
        let mut failure = None;
        for result in created {
            match result {
                Ok(pod) => ctx.expectations.expect_create(&uid, pod.name_any()),
                Err(e) => failure = Some(e),
            }
        }
        if let Some(e) = failure {
            return Err(Error::Kube(e));
        }
        more = count < want - have;
    } else if active.len() > want && pending_creates == 0 {
        active.sort_by_key(|p| pods::deletion_rank(p));
        let surplus: Vec<Arc<Pod>> = active
            .iter()
            .take((active.len() - want).min(BURST))
            .cloned()
            .collect();
        let names: Vec<String> = surplus.iter().map(|p| p.name_any()).collect();
        let deleted: Vec<Result<(), kube::Error>> = futures::stream::iter(names)
            .map(|name| {
                let api = pods_api.clone();
                async move { crate::gone_ok(api.delete(&name, &DeleteParams::default()).await) }
            })
            .buffer_unordered(CREATE_CONCURRENCY)
            .collect()
            .await;
        for pod in &surplus {
            if let Some(u) = pod.metadata.uid.clone() {
                ctx.expectations.expect_delete(&uid, u);
            }
        }
        if let Some(e) = deleted.into_iter().find_map(Result::err) {
            return Err(Error::Kube(e));
        }
    }

    // Status from what the cache shows.
    let now = Utc::now();
    let min_ready = spec.min_ready_seconds.unwrap_or(0);
    let counted: Vec<&Arc<Pod>> = owned.iter().filter(|p| pods::is_active(p)).collect();
    let ready = counted.iter().filter(|p| pods::is_ready(p)).count();
    let available = counted
        .iter()
        .filter(|p| pods::is_available(p, min_ready, now))
        .count();
    let status = json!({
        "replicas": counted.len(),
        "fullyLabeledReplicas": counted.len(),
        "readyReplicas": ready,
        "availableReplicas": available,
        "observedGeneration": rs.metadata.generation,
    });
    // Always written: the object this reconcile was handed may predate our
    // own last status write, so comparing with it could skip a needed write.
    // The API server turns an identical write into a no-op (no new revision).
    let api: Api<ReplicaSet> = Api::namespaced(ctx.client.clone(), &ns);
    api.patch_status(
        &rs.name_any(),
        &PatchParams::default(),
        &Patch::Merge(json!({"status": status})),
    )
    .await
    .map_err(Error::Kube)?;
    if more {
        return Ok(Action::requeue(Duration::from_millis(100)));
    }
    if ready > available {
        // Pods become available once ready for minReadySeconds; look again then.
        return Ok(Action::requeue(Duration::from_secs(
            u64::try_from(min_ready.max(1)).unwrap_or(1),
        )));
    }
    Ok(Action::requeue(Duration::from_secs(300)))
}

/// Runs the ReplicaSet controller until its watches end.
pub(crate) fn run(
    client: kube::Client,
    informers: &mut crate::Informers,
) -> impl std::future::Future<Output = Result<(), Error>> + use<> {
    let children = informers.cache::<Pod>();
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        pods: children.store.clone(),
        expectations: Expectations::default(),
    });
    crate::run_owning::<ReplicaSet, _, _, _, _>(client, children, reconcile, ctx)
}
