//! The ServiceAccount controller: every active namespace has a `default`
//! service account (recreated if deleted), as pods name it by default, and,
//! when the API server has a CA (it serves `/cacerts`), the
//! `kube-root-ca.crt` ConfigMap with it (Kubernetes' root CA publisher), which
//! pods' service-account volumes project as `ca.crt`. Every namespace also
//! gets the `system:image-pullers` RoleBinding, which lets its service
//! accounts pull its repositories from the built-in registry (nodes pull a
//! pod's images with its service account's token). It is made when missing;
//! to stop a namespace's accounts pulling, empty its subjects.

use std::sync::Arc;

use crate::queue::Controller;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, ServiceAccount};
use kube::ResourceExt;
use kube::api::{Api, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use serde_json::json;

use crate::Error;

struct Ctx {
    client: kube::Client,
    /// The cluster CA (PEM), when the API server serves one.
    ca: Option<String>,
}

/// The ConfigMap every namespace gets with the cluster CA.
pub const ROOT_CA_CONFIG_MAP: &str = "kube-root-ca.crt";

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
    image_pullers(&ctx.client, &ns.name_any()).await?;
    if let Some(ca) = &ctx.ca {
        let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns.name_any());
        let current = api.get_opt(ROOT_CA_CONFIG_MAP).await.map_err(Error::Kube)?;
        let wanted = json!({"ca.crt": ca});
        match current {
            Some(cm) if cm.data.as_ref().map(|d| json!(d)) == Some(wanted.clone()) => {}
            Some(_) => {
                let patch = json!({"data": wanted});
                api.patch(
                    ROOT_CA_CONFIG_MAP,
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Merge(&patch),
                )
                .await
                .map_err(Error::Kube)?;
            }
            None => {
                let cm: ConfigMap = serde_json::from_value(
                    json!({"metadata": {"name": ROOT_CA_CONFIG_MAP}, "data": wanted}),
                )
                .map_err(|e| Error::Encode(e.to_string()))?;
                match api.create(&PostParams::default(), &cm).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 409 || e.code == 403 => {}
                    Err(e) => return Err(Error::Kube(e)),
                }
            }
        }
    }
    Ok(Action::await_change())
}

/// The namespace's `system:image-pullers` RoleBinding, made when missing.
async fn image_pullers(client: &kube::Client, namespace: &str) -> Result<(), Error> {
    use k8s_openapi::api::rbac::v1::RoleBinding;
    use wasmkube_api::images::{PULLER_ROLE, PULLERS_BINDING};
    let api: Api<RoleBinding> = Api::namespaced(client.clone(), namespace);
    if api
        .get_opt(PULLERS_BINDING)
        .await
        .map_err(Error::Kube)?
        .is_some()
    {
        return Ok(());
    }
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": PULLERS_BINDING, "annotations": {
            "kubernetes.io/description": "Allows the namespace's service accounts to pull its repositories from the built-in registry"}},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": PULLER_ROLE},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group",
                      "name": format!("system:serviceaccounts:{namespace}")}],
    }))
    .map_err(|e| Error::Encode(e.to_string()))?;
    match api.create(&PostParams::default(), &binding).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 || e.code == 403 => Ok(()),
        Err(e) => Err(Error::Kube(e)),
    }
}

/// The cluster CA the API server serves at `/cacerts`, if any.
async fn cluster_ca(client: &kube::Client) -> Option<String> {
    let request = http::Request::get("/cacerts").body(Vec::new()).ok()?;
    client
        .request_text(request)
        .await
        .ok()
        .filter(|pem| pem.contains("BEGIN CERTIFICATE"))
}

/// Runs the ServiceAccount controller until its watches end.
pub async fn run(client: kube::Client) -> Result<(), Error> {
    let accounts = Api::<ServiceAccount>::all(client.clone());
    let ca = cluster_ca(&client).await;
    let config_maps = Api::<ConfigMap>::all(client.clone());
    Controller::new(
        Api::<Namespace>::all(client.clone()),
        watcher::Config::default(),
    )
    // A deleted default account wakes its namespace.
    .watches(
        accounts,
        watcher::Config::default().fields("metadata.name=default"),
        |sa| sa.namespace().map(|ns| ObjectRef::<Namespace>::new(&ns)),
    )
    // So does a changed or deleted root CA ConfigMap.
    .watches(
        config_maps,
        watcher::Config::default().fields(&format!("metadata.name={ROOT_CA_CONFIG_MAP}")),
        |cm| cm.namespace().map(|ns| ObjectRef::<Namespace>::new(&ns)),
    )
    .run(
        "serviceaccount",
        reconcile,
        crate::retry_soon,
        Arc::new(Ctx { client, ca }),
    )
    .await;
    Ok(())
}
