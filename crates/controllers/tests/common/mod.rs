//! The in-process cluster the controller tests share: API server, scheduler,
//! simulated nodes and the controllers, over loopback HTTP, plus waits that
//! are watches with deadlines.
#![allow(dead_code)]

use std::time::Duration;

use futures::TryStreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::runtime::{WatchStreamExt, watcher};

/// How to build a test cluster.
pub struct Options {
    pub sim: wasmkube_sim::SimConfig,
    pub controllers: wasmkube_controllers::Config,
    pub api: wasmkube_apiserver::Config,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            sim: wasmkube_sim::SimConfig {
                count: 3,
                ..Default::default()
            },
            controllers: wasmkube_controllers::Config {
                job_backoff: Duration::from_millis(200),
                ..Default::default()
            },
            api: Default::default(),
        }
    }
}

pub struct Cluster {
    pub client: kube::Client,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Cluster {
    /// Starts more simulated nodes; aborting the handle stops their
    /// heartbeats and pod handling, like a machine dropping off the network.
    pub fn start_sim(&self, config: wasmkube_sim::SimConfig) -> tokio::task::JoinHandle<()> {
        let client = self.client.clone();
        tokio::spawn(async move { wasmkube_sim::run(client, config).await.unwrap() })
    }
}

pub async fn cluster() -> Cluster {
    cluster_with(Options::default()).await
}

pub async fn cluster_with(options: Options) -> Cluster {
    // Controller logs show up with the failing test's output.
    let _ = tracing_subscriber::fmt()
        .with_env_filter("wasmkube_controllers=debug,wasmkube_scheduler=debug")
        .with_test_writer()
        .try_init();
    let api = wasmkube_apiserver::ApiServer::start(wasmkube_store::memory(), options.api)
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let client = kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap();
    let (c1, c2) = (client.clone(), client.clone());
    let controllers = options.controllers;
    let mut cluster = Cluster {
        client,
        tasks: vec![
            tokio::spawn(async move { api.serve(listener).await.unwrap() }),
            tokio::spawn(async move {
                wasmkube_scheduler::run(c1, Default::default())
                    .await
                    .unwrap()
            }),
            tokio::spawn(async move {
                wasmkube_controllers::run_all(c2, controllers)
                    .await
                    .unwrap()
            }),
        ],
    };
    if options.sim.count > 0 {
        let sim = cluster.start_sim(options.sim);
        cluster.tasks.push(sim);
    }
    cluster
}

/// One line per pod: name, phase, node, and whether it is being deleted.
pub fn describe_pods(pods: &[Pod]) -> String {
    pods.iter()
        .map(|p| {
            format!(
                "{}:{}:{}:{}",
                p.metadata.name.as_deref().unwrap_or_default(),
                p.status
                    .as_ref()
                    .and_then(|s| s.phase.as_deref())
                    .unwrap_or("-"),
                p.spec
                    .as_ref()
                    .and_then(|s| s.node_name.as_deref())
                    .unwrap_or("-"),
                if p.metadata.deletion_timestamp.is_some() {
                    "deleting"
                } else {
                    "live"
                }
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Waits, through a watch on `api`, until `done` holds for its listing.
pub async fn wait_list<K>(api: &Api<K>, what: &str, done: impl Fn(&[K]) -> bool) -> Vec<K>
where
    K: kube::Resource
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let mut changes =
        std::pin::pin!(watcher(api.clone(), watcher::Config::default()).default_backoff());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let items = api.list(&ListParams::default()).await.unwrap().items;
        if done(&items) {
            return items;
        }
        tokio::time::timeout_at(deadline, changes.try_next())
            .await
            .unwrap_or_else(|_| panic!("{what}: not reached in time"))
            .unwrap();
    }
}
