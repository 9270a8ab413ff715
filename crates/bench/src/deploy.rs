//! The cold path of a deploy, inside `pod-startup`: a Deployment of an HTTP
//! function this node has never run (its module neither pulled nor
//! compiled), timed from the create to every replica Ready, next to the same
//! Deployment again with the module cached; and each scaled to zero, timed
//! until its last pod is gone (idle functions stop without waiting for
//! their grace period).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use serde_json::json;

use crate::support::ms;

/// What one Deployment's round took.
pub struct Round {
    pub ready: Duration,
    pub gone: Duration,
}

/// Creates `name` with `replicas` pods of `image` on `node`, waits for all
/// of them to be Ready, scales it to zero and waits for its pods to go.
pub async fn round(
    client: &kube::Client,
    name: &str,
    image: &str,
    node: &str,
    replicas: i32,
) -> anyhow::Result<Round> {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "nodeSelector": {"kubernetes.io/hostname": node},
                    // Long enough that waiting for it would show.
                    "terminationGracePeriodSeconds": 30,
                    "containers": [{
                        "name": "fn", "image": image,
                        "ports": [{"containerPort": 8080}],
                        "resources": {"requests": {"memory": "1Mi"}},
                    }],
                },
            },
        },
    }))?;
    let created = Instant::now();
    deployments
        .create(&PostParams::default(), &deployment)
        .await?;
    let want = replicas;
    wait_deployment(&deployments, name, move |d| {
        d.status
            .as_ref()
            .and_then(|s| s.ready_replicas)
            .unwrap_or(0)
            >= want
    })
    .await?;
    let ready = created.elapsed();
    let failures = restarted(&pods, name).await?;
    anyhow::ensure!(
        failures.is_empty(),
        "pods of {name} did not start on their first attempt: {failures:?}"
    );

    let scaled = Instant::now();
    deployments
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 0}})),
        )
        .await?;
    wait_no_pods(&pods, name).await?;
    let gone = scaled.elapsed();
    deployments.delete(name, &Default::default()).await?;
    Ok(Round { ready, gone })
}

pub fn print(replicas: i32, cold: &Round, cached: &Round) {
    println!("deploy of an HTTP function (http-hello), {replicas} replicas, create -> all Ready");
    println!(
        "  module never seen (pull + one compile)   {}",
        ms(cold.ready)
    );
    println!(
        "  module cached                            {}",
        ms(cached.ready)
    );
    println!(
        "  cold/cached                              {:.2}x",
        cold.ready.as_secs_f64() / cached.ready.as_secs_f64().max(1e-9)
    );
    println!("scale {replicas} idle function pods to zero -> all gone (grace period 30 s)");
    println!(
        "  after the cold deploy                    {}",
        ms(cold.gone)
    );
    println!(
        "  after the cached deploy                  {}",
        ms(cached.gone)
    );
}

async fn wait_deployment(
    api: &Api<Deployment>,
    name: &str,
    cond: impl Fn(&Deployment) -> bool,
) -> anyhow::Result<()> {
    let wait =
        kube::runtime::wait::await_condition(api.clone(), name, move |d: Option<&Deployment>| {
            d.is_some_and(&cond)
        });
    tokio::time::timeout(Duration::from_secs(300), wait)
        .await
        .map_err(|_| anyhow::anyhow!("deployment {name} not ready in 300 s"))??;
    Ok(())
}

/// Pods of the Deployment whose container restarted (a failed first start).
async fn restarted(pods: &Api<Pod>, app: &str) -> anyhow::Result<Vec<String>> {
    let list = pods
        .list(&kube::api::ListParams::default().labels(&format!("app={app}")))
        .await?;
    Ok(list
        .items
        .into_iter()
        .filter(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.restart_count > 0))
        })
        .filter_map(|p| p.metadata.name)
        .collect())
}

/// Waits, on a watch, until no pod of the Deployment is left.
async fn wait_no_pods(pods: &Api<Pod>, app: &str) -> anyhow::Result<()> {
    let config = watcher::Config::default().labels(&format!("app={app}"));
    let mut stream = watcher(pods.clone(), config).boxed();
    let mut present = HashSet::new();
    let mut listing = HashSet::new();
    let mut listed = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    loop {
        if listed && present.is_empty() {
            return Ok(());
        }
        let event = tokio::time::timeout_at(deadline, stream.try_next())
            .await
            .map_err(|_| anyhow::anyhow!("{} pods of {app} left after 300 s", present.len()))??;
        let Some(event) = event else {
            anyhow::bail!("the pod watch ended");
        };
        match event {
            watcher::Event::Init => listing.clear(),
            watcher::Event::InitApply(p) => {
                listing.insert(p.metadata.name.unwrap_or_default());
            }
            watcher::Event::InitDone => {
                present = std::mem::take(&mut listing);
                listed = true;
            }
            watcher::Event::Apply(p) => {
                present.insert(p.metadata.name.unwrap_or_default());
            }
            watcher::Event::Delete(p) => {
                present.remove(&p.metadata.name.unwrap_or_default());
            }
        }
    }
}
