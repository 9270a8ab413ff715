//! A kube-rs operator against the cluster, written as kube-rs users write
//! one: a `#[derive(CustomResource)]` kind whose CRD the operator registers
//! itself, and a `Controller` that reconciles each object into a ConfigMap
//! it owns and reports back through the status subresource. The garbage
//! collector removes the ConfigMap with its custom owner.

mod common;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::{conditions, wait::await_condition, watcher};
use kube::{CustomResource, CustomResourceExt, Resource, ResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, JsonSchema)]
#[kube(
    group = "demo.wasmkube.dev",
    version = "v1",
    kind = "Greeting",
    namespaced,
    status = "GreetingStatus",
    shortname = "gr",
    printcolumn = r#"{"name":"Message","type":"string","jsonPath":".status.message"}"#
)]
pub struct GreetingSpec {
    /// Whom to greet.
    name: String,
    /// How many times.
    #[serde(default)]
    times: u32,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, JsonSchema)]
pub struct GreetingStatus {
    message: String,
    observed_generation: Option<i64>,
}

#[derive(Debug, thiserror::Error)]
#[error(transparent)]
struct ReconcileError(#[from] kube::Error);

async fn reconcile(g: Arc<Greeting>, client: Arc<kube::Client>) -> Result<Action, ReconcileError> {
    let ns = g.namespace().unwrap_or_default();
    let message = format!(
        "hello, {}{}",
        g.spec.name,
        "!".repeat(g.spec.times as usize)
    );
    let owner = g
        .controller_owner_ref(&())
        .expect("a stored object has a uid");
    let cm = json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": format!("greeting-{}", g.name_any()), "ownerReferences": [owner]},
        "data": {"message": message},
    });
    let apply = PatchParams::apply("greeter").force();
    Api::<ConfigMap>::namespaced((*client).clone(), &ns)
        .patch(
            &format!("greeting-{}", g.name_any()),
            &apply,
            &Patch::Apply(&cm),
        )
        .await?;
    let status = json!({
        "apiVersion": "demo.wasmkube.dev/v1", "kind": "Greeting",
        "status": {"message": message, "observed_generation": g.meta().generation},
    });
    Api::<Greeting>::namespaced((*client).clone(), &ns)
        .patch_status(&g.name_any(), &apply, &Patch::Apply(&status))
        .await?;
    Ok(Action::await_change())
}

fn error_policy(_: Arc<Greeting>, e: &ReconcileError, _: Arc<kube::Client>) -> Action {
    eprintln!("reconcile failed: {e}");
    Action::requeue(Duration::from_millis(200))
}

/// Waits (on a watch) until `f` holds for the named object.
async fn until<K, F>(api: &Api<K>, name: &str, f: F) -> K
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
    F: Fn(Option<&K>) -> bool,
{
    let cond = |o: Option<&K>| f(o);
    match tokio::time::timeout(
        Duration::from_secs(20),
        await_condition(api.clone(), name, cond),
    )
    .await
    {
        Ok(got) => got.unwrap().unwrap_or_else(|| panic!("{name} is gone")),
        Err(_) => panic!(
            "{name} never reached its condition: {:?}",
            api.get_opt(name).await
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kube_rs_operator_registers_its_crd_and_reconciles_its_resources() {
    let cluster = common::cluster_with(common::Options {
        sim: wasmkube_sim::SimConfig {
            count: 0,
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let client = cluster.client.clone();

    // The operator registers its CRD, generated from the Rust type.
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.create(&PostParams::default(), &Greeting::crd())
        .await
        .unwrap();
    tokio::time::timeout(
        Duration::from_secs(10),
        await_condition(
            crds.clone(),
            "greetings.demo.wasmkube.dev",
            conditions::is_crd_established(),
        ),
    )
    .await
    .expect("the CRD is established")
    .unwrap();

    let greetings: Api<Greeting> = Api::namespaced(client.clone(), "default");
    let operator = Controller::new(greetings.clone(), watcher::Config::default())
        .owns(
            Api::<ConfigMap>::namespaced(client.clone(), "default"),
            watcher::Config::default(),
        )
        .run(reconcile, error_policy, Arc::new(client.clone()))
        .for_each(|_| async {});
    let operator = tokio::spawn(operator);

    greetings
        .create(
            &PostParams::default(),
            &Greeting::new(
                "world",
                GreetingSpec {
                    name: "world".into(),
                    times: 1,
                },
            ),
        )
        .await
        .unwrap();
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let cm = until(&configmaps, "greeting-world", |o| o.is_some()).await;
    assert_eq!(cm.data.unwrap()["message"], "hello, world!");
    let g = until(&greetings, "world", |o| {
        o.and_then(|g| g.status.as_ref())
            .is_some_and(|s| s.observed_generation == Some(1))
    })
    .await;
    assert_eq!(g.status.unwrap().message, "hello, world!");

    // A spec change is reconciled (the generation moves; status did not).
    greetings
        .patch(
            "world",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"times": 3}})),
        )
        .await
        .unwrap();
    until(&configmaps, "greeting-world", |o| {
        o.and_then(|c| c.data.as_ref())
            .is_some_and(|d| d["message"] == "hello, world!!!")
    })
    .await;
    let g = until(&greetings, "world", |o| {
        o.and_then(|g| g.status.as_ref())
            .is_some_and(|s| s.observed_generation == Some(2))
    })
    .await;
    assert_eq!(g.metadata.generation, Some(2));

    // Deleting the custom resource collects the ConfigMap it owns.
    greetings
        .delete("world", &DeleteParams::default())
        .await
        .unwrap();
    tokio::time::timeout(
        Duration::from_secs(20),
        await_condition(
            configmaps.clone(),
            "greeting-world",
            conditions::is_deleted(""),
        ),
    )
    .await
    .expect("the owned ConfigMap is collected")
    .unwrap();
    operator.abort();
}
