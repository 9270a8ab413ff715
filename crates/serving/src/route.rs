//! The Route controller: each traffic target resolves to a revision (a
//! configuration's target to its latest ready revision), and the Route's
//! status carries the resolved traffic, its URL
//! (`http://NAME.NAMESPACE.DOMAIN`) and each tag's
//! (`http://TAG-NAME.NAMESPACE.DOMAIN`). The gateway serves Routes from this
//! status, so a Route is Ready when all its traffic is assigned.

use std::sync::Arc;

use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use wasmkube_api::knative::{Addressable, Configuration, Revision, Route, TrafficTarget};
use wasmkube_controllers::queue::Controller;

use crate::{Config, Error};

struct Ctx {
    client: kube::Client,
    config: Arc<Config>,
    configurations: Store<Configuration>,
    revisions: Store<Revision>,
}

/// Why a target does not resolve: the condition's reason and message.
type Unresolved = (&'static str, String);

fn resolve(ctx: &Ctx, ns: &str, t: &TrafficTarget) -> Result<String, Unresolved> {
    if let Some(config) = &t.configuration_name {
        let Some(c) = ctx.configurations.get(&ObjectRef::new(config).within(ns)) else {
            return Err((
                "ConfigurationMissing",
                format!("Configuration {config:?} referenced in traffic not found."),
            ));
        };
        return c
            .status
            .as_ref()
            .and_then(|s| s.latest_ready_revision_name.clone())
            .ok_or((
                "RevisionMissing",
                format!("Configuration {config:?} does not have any ready Revision."),
            ));
    }
    let Some(name) = &t.revision_name else {
        return Err((
            "RevisionMissing",
            "a traffic target names no revision".into(),
        ));
    };
    match ctx.revisions.get(&ObjectRef::new(name).within(ns)) {
        None => Err((
            "RevisionMissing",
            format!("Revision {name:?} referenced in traffic not found."),
        )),
        Some(r) => match r
            .status
            .as_ref()
            .map(|s| crate::status_of(&s.conditions, "Ready"))
        {
            Some(s) if s == "True" => Ok(name.clone()),
            Some(s) if s == "False" => Err((
                "RevisionFailed",
                format!("Revision {name:?} failed to become ready."),
            )),
            _ => Err((
                "RevisionMissing",
                format!("Revision {name:?} is not ready yet."),
            )),
        },
    }
}

async fn reconcile(route: Arc<Route>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    if route.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let ns = route.namespace().unwrap_or_default();
    let name = route.name_any();
    let host = format!("{name}.{ns}.{}", ctx.config.domain);
    let mut traffic = Vec::new();
    let mut problem: Option<Unresolved> = None;
    for t in &route.spec.traffic {
        match resolve(&ctx, &ns, t) {
            Ok(revision) => traffic.push(TrafficTarget {
                tag: t.tag.clone(),
                revision_name: Some(revision),
                configuration_name: None,
                latest_revision: Some(t.configuration_name.is_some()),
                percent: t.percent.filter(|p| *p > 0),
                url: t.tag.as_ref().map(|tag| format!("http://{tag}-{host}")),
            }),
            Err(why) => {
                problem.get_or_insert(why);
            }
        }
    }
    let old = route.status.clone().unwrap_or_default();
    let mut status = old.clone();
    status.observed_generation = route.metadata.generation;
    status.url = Some(format!("http://{host}"));
    status.address = Some(Addressable {
        url: Some(format!("http://{host}")),
    });
    let conds = &mut status.conditions;
    match problem {
        None => {
            status.traffic = traffic;
            crate::set_condition(conds, "AllTrafficAssigned", "True", None, None);
            crate::set_condition(conds, "IngressReady", "True", None, None);
        }
        Some((reason, message)) => {
            // The last traffic that resolved keeps being served.
            let failed = reason == "RevisionFailed" || reason == "ConfigurationMissing";
            let s = if failed { "False" } else { "Unknown" };
            crate::set_condition(conds, "AllTrafficAssigned", s, Some(reason), Some(message));
        }
    }
    crate::set_ready_from(conds, &["AllTrafficAssigned", "IngressReady"]);
    if status != old {
        let api: Api<Route> = Api::namespaced(ctx.client.clone(), &ns);
        crate::patch_status(&api, &name, &status).await?;
    }
    Ok(Action::await_change())
}

/// Runs the Route controller until its watches end.
pub fn run(
    client: kube::Client,
    informers: &mut wasmkube_controllers::Informers,
    config: Arc<Config>,
) -> impl std::future::Future<Output = Result<(), Error>> + use<> {
    let configurations = informers.cache::<Configuration>();
    let revisions = informers.cache::<Revision>();
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        config,
        configurations: configurations.store.clone(),
        revisions: revisions.store.clone(),
    });
    async move {
        let _ = tokio::join!(
            ctx.configurations.wait_until_ready(),
            ctx.revisions.wait_until_ready()
        );
        let controller = Controller::new(Api::<Route>::all(client), watcher::Config::default());
        let routes = controller.store();
        // A configuration or revision wakes the routes of its namespace
        // (few; each reconcile reads only caches).
        let in_namespace = move |ns: Option<String>| {
            routes
                .state()
                .into_iter()
                .filter(|r| r.namespace() == ns)
                .map(|r| ObjectRef::from_obj(&*r))
                .collect::<Vec<_>>()
        };
        let by_config = {
            let f = in_namespace.clone();
            move |c: Arc<Configuration>| f(c.namespace())
        };
        let by_revision = move |r: Arc<Revision>| in_namespace(r.namespace());
        let controller = controller
            .watches_shared_stream(configurations.changes, by_config)
            .watches_shared_stream(revisions.changes, by_revision);
        controller
            .run("knative-route", reconcile, crate::retry_soon, ctx)
            .await;
        Err(Error::WatchEnded { what: "Route" })
    }
}
