//! The Configuration controller: every generation of a Configuration's
//! template stamps out one immutable Revision (`NAME-00001`, ..., or the
//! template's own name), labelled with its configuration and generation;
//! the status names the latest created and the latest ready revision.

use std::sync::Arc;

use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use wasmkube_api::knative::{Configuration, Revision, labels};
use wasmkube_controllers::queue::Controller;

use crate::Error;

struct Ctx {
    client: kube::Client,
    revisions: Store<Revision>,
}

/// The name of the revision a configuration's generation makes.
pub fn revision_name(config: &Configuration) -> String {
    config
        .spec
        .template
        .metadata
        .name
        .clone()
        .unwrap_or_else(|| {
            format!(
                "{}-{:05}",
                config.name_any(),
                config.metadata.generation.unwrap_or(1)
            )
        })
}

fn generation_of(rev: &Revision) -> i64 {
    rev.labels()
        .get(labels::CONFIGURATION_GENERATION)
        .and_then(|g| g.parse().ok())
        .unwrap_or(0)
}

async fn reconcile(config: Arc<Configuration>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    if config.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let ns = config.namespace().unwrap_or_default();
    let name = config.name_any();
    let latest = revision_name(&config);
    let generation = config.metadata.generation.unwrap_or(1);
    let revisions: Api<Revision> = Api::namespaced(ctx.client.clone(), &ns);
    let existing = ctx.revisions.get(&ObjectRef::new(&latest).within(&ns));
    if existing.is_none() {
        let template = &config.spec.template;
        let mut rev_labels = template.metadata.labels.clone().unwrap_or_default();
        rev_labels.insert(labels::CONFIGURATION.into(), name.clone());
        rev_labels.insert(
            labels::CONFIGURATION_GENERATION.into(),
            generation.to_string(),
        );
        if let Some(svc) = config.labels().get(labels::SERVICE) {
            rev_labels.insert(labels::SERVICE.into(), svc.clone());
        }
        let mut rev = Revision::default();
        rev.metadata.name = Some(latest.clone());
        rev.metadata.namespace = Some(ns.clone());
        rev.metadata.labels = Some(rev_labels);
        rev.metadata.annotations = template.metadata.annotations.clone();
        rev.metadata.owner_references = Some(vec![crate::controller_ref(config.as_ref())]);
        rev.spec = template.spec.clone();
        crate::create_absent(&revisions, &rev).await?;
        tracing::info!(namespace = %ns, configuration = %name, revision = %latest, "created a revision");
    }

    // The newest ready revision of this configuration, by generation.
    let mine: Vec<Arc<Revision>> = ctx
        .revisions
        .state()
        .into_iter()
        .filter(|r| {
            r.namespace().as_deref() == Some(ns.as_str())
                && r.labels().get(labels::CONFIGURATION) == Some(&name)
        })
        .collect();
    let ready = |r: &Revision| {
        r.status
            .as_ref()
            .is_some_and(|s| crate::status_of(&s.conditions, "Ready") == "True")
    };
    let latest_ready = mine
        .iter()
        .filter(|r| ready(r))
        .max_by_key(|r| generation_of(r))
        .map(|r| r.name_any());
    let old = config.status.clone().unwrap_or_default();
    let mut status = old.clone();
    status.observed_generation = config.metadata.generation;
    status.latest_created_revision_name = Some(latest.clone());
    status.latest_ready_revision_name = latest_ready;
    let latest_rev = mine.iter().find(|r| r.name_any() == latest);
    let latest_ready_cond = latest_rev
        .and_then(|r| r.status.as_ref())
        .and_then(|s| wasmkube_api::knative::condition(&s.conditions, "Ready").cloned());
    match latest_ready_cond {
        Some(c) if c.status == "True" => {
            crate::set_condition(&mut status.conditions, "Ready", "True", None, None)
        }
        Some(c) if c.status == "False" => crate::set_condition(
            &mut status.conditions,
            "Ready",
            "False",
            Some("RevisionFailed"),
            Some(format!(
                "Revision {latest:?} failed with message: {}.",
                c.message.unwrap_or_default()
            )),
        ),
        _ => crate::set_condition(
            &mut status.conditions,
            "Ready",
            "Unknown",
            Some("RevisionMissing"),
            Some(format!(
                "Configuration {name:?} is waiting for a Revision to become ready."
            )),
        ),
    }
    if status != old {
        let api: Api<Configuration> = Api::namespaced(ctx.client.clone(), &ns);
        crate::patch_status(&api, &name, &status).await?;
    }
    Ok(Action::await_change())
}

/// Runs the Configuration controller until its watches end.
pub fn run(
    client: kube::Client,
    informers: &mut wasmkube_controllers::Informers,
) -> impl std::future::Future<Output = Result<(), Error>> + use<> {
    let wasmkube_controllers::Cache {
        store: revisions,
        changes,
    } = informers.cache::<Revision>();
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        revisions: revisions.clone(),
    });
    async move {
        let _ = revisions.wait_until_ready().await;
        // A revision wakes its configuration only once the shared cache
        // holds it, so a reconcile never reads an older revision.
        let controller = Controller::new(
            Api::<Configuration>::all(client),
            watcher::Config::default(),
        )
        .owns_shared_stream(changes);
        controller
            .run("knative-configuration", reconcile, crate::retry_soon, ctx)
            .await;
        Err(Error::WatchEnded {
            what: "Configuration",
        })
    }
}
