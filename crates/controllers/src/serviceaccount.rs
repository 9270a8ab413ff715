//! The ServiceAccount controller: every active namespace has a `default`
//! service account (recreated if deleted), as pods name it by default.

use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::ResourceExt;
use kube::api::{Api, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use serde_json::json;

use crate::Error;

struct Ctx {
    client: kube::Client,
}

async fn reconcile(ns: Arc<Namespace>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    if ns.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let api: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), &ns.name_any());
    if api.get_opt("default").await.map_err(Error::Kube)?.is_none() {
        let sa: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": "default"}}))
            .map_err(|e| Error::Encode(e.to_string()))?;
        match api.create(&PostParams::default(), &sa).await {
            Ok(_) => {}
            // Created meanwhile, or the namespace started terminating.
            Err(kube::Error::Api(e)) if e.code == 409 || e.code == 403 => {}
            Err(e) => return Err(Error::Kube(e)),
        }
    }
    Ok(Action::await_change())
}

/// Runs the ServiceAccount controller until its watches end.
pub async fn run(client: kube::Client) -> Result<(), Error> {
    let accounts = Api::<ServiceAccount>::all(client.clone());
    let results = Controller::new(
        Api::<Namespace>::all(client.clone()),
        watcher::Config::default(),
    )
    // A deleted default account wakes its namespace.
    .watches(
        accounts,
        watcher::Config::default().fields("metadata.name=default"),
        |sa| sa.namespace().map(|ns| ObjectRef::<Namespace>::new(&ns)),
    )
    .run(reconcile, crate::retry_soon, Arc::new(Ctx { client }));
    crate::drain("serviceaccount", results).await;
    Ok(())
}
