//! The Knative Service controller: a Service owns a Configuration and a
//! Route of its name (its template and its traffic), and reports their
//! state as its own: `ConfigurationsReady`, `RoutesReady`, `Ready`, the
//! URL, the traffic and the latest revisions.

use std::sync::Arc;

use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::watcher;
use serde_json::json;
use wasmkube_api::knative::{Configuration, Route, Service, ServiceStatus, TrafficTarget, labels};
use wasmkube_controllers::queue::Controller;

use crate::{Error, MANAGER};

struct Ctx {
    client: kube::Client,
}

/// A Service's traffic as its Route takes it: "the latest revision" is its
/// Configuration's latest ready one.
fn route_traffic(svc: &Service) -> Vec<TrafficTarget> {
    let name = svc.name_any();
    svc.spec
        .traffic
        .iter()
        .map(|t| {
            let latest = t.latest_revision.unwrap_or(t.revision_name.is_none());
            TrafficTarget {
                tag: t.tag.clone(),
                revision_name: t.revision_name.clone().filter(|_| !latest),
                configuration_name: latest.then(|| name.clone()),
                latest_revision: Some(latest),
                percent: t.percent,
                url: None,
            }
        })
        .collect()
}

async fn reconcile(svc: Arc<Service>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    if svc.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let ns = svc.namespace().unwrap_or_default();
    let name = svc.name_any();
    let owner = crate::controller_ref(svc.as_ref());
    let mut child_labels = svc.labels().clone();
    child_labels.insert(labels::SERVICE.into(), name.clone());
    let params = PatchParams::apply(MANAGER).force();

    // The children, applied: created the first time, kept in step after.
    let configs: Api<Configuration> = Api::namespaced(ctx.client.clone(), &ns);
    let config = json!({
        "apiVersion": "serving.knative.dev/v1", "kind": "Configuration",
        "metadata": {"name": name, "labels": child_labels, "ownerReferences": [owner]},
        "spec": {"template": svc.spec.template},
    });
    let config = configs.patch(&name, &params, &Patch::Apply(config)).await?;
    let routes: Api<Route> = Api::namespaced(ctx.client.clone(), &ns);
    let route = json!({
        "apiVersion": "serving.knative.dev/v1", "kind": "Route",
        "metadata": {"name": name, "labels": child_labels, "ownerReferences": [owner]},
        "spec": {"traffic": route_traffic(&svc)},
    });
    let route = routes.patch(&name, &params, &Patch::Apply(route)).await?;

    // The status, from theirs.
    let old = svc.status.clone().unwrap_or_default();
    let mut status = old.clone();
    status.observed_generation = svc.metadata.generation;
    let cs = config.status.clone().unwrap_or_default();
    let rs = route.status.clone().unwrap_or_default();
    let config_current = cs.observed_generation == config.metadata.generation;
    let route_current = rs.observed_generation == route.metadata.generation;
    status.latest_created_revision_name = cs.latest_created_revision_name.clone();
    status.latest_ready_revision_name = cs.latest_ready_revision_name.clone();
    status.url = rs.url.clone();
    status.address = rs.address.clone();
    status.traffic = rs.traffic.clone();
    let mirror = |status: &mut ServiceStatus,
                  type_: &str,
                  from: &[wasmkube_api::knative::Condition],
                  current: bool,
                  what: &str| {
        let ready = wasmkube_api::knative::condition(from, "Ready");
        match ready {
            Some(c) if current => crate::set_condition(
                &mut status.conditions,
                type_,
                &c.status,
                c.reason.as_deref(),
                c.message.clone(),
            ),
            _ => crate::set_condition(
                &mut status.conditions,
                type_,
                "Unknown",
                Some("Outdated"),
                Some(format!("the {what} has not caught up with the Service yet")),
            ),
        }
    };
    mirror(
        &mut status,
        "ConfigurationsReady",
        &cs.conditions,
        config_current,
        "Configuration",
    );
    mirror(
        &mut status,
        "RoutesReady",
        &rs.conditions,
        route_current,
        "Route",
    );
    crate::set_ready_from(
        &mut status.conditions,
        &["ConfigurationsReady", "RoutesReady"],
    );
    if status != old {
        let api: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
        crate::patch_status(&api, &name, &status).await?;
    }
    Ok(Action::await_change())
}

/// Runs the Service controller until its watches end.
pub async fn run(client: kube::Client) -> Result<(), Error> {
    let ctx = Arc::new(Ctx {
        client: client.clone(),
    });
    let controller = Controller::new(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
    )
    .owns(
        Api::<Configuration>::all(client.clone()),
        watcher::Config::default(),
    )
    .owns(Api::<Route>::all(client), watcher::Config::default());
    controller
        .run("knative-service", reconcile, crate::retry_soon, ctx)
        .await;
    Err(Error::WatchEnded {
        what: "Knative Service",
    })
}
