//! kube-rs, the Rust client our own controllers use, against the API server:
//! a `watcher` keeps going through a compaction (by relisting after 410 Gone)
//! and through a server restart on the same store.

use std::net::SocketAddr;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use wasmkube_apiserver::{ApiServer, Config};

struct Running {
    api: std::sync::Arc<ApiServer>,
    task: tokio::task::JoinHandle<()>,
}

async fn serve(store: wasmkube_store::SharedStore, addr: SocketAddr) -> (Running, SocketAddr) {
    let api = ApiServer::start(store, Config::default()).await.unwrap();
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = {
        let api = api.clone();
        tokio::spawn(async move { api.serve(listener).await.unwrap() })
    };
    (Running { api, task }, addr)
}

fn client(addr: SocketAddr) -> kube::Client {
    let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
    kube::Client::try_from(config).unwrap()
}

fn cm(name: &str) -> ConfigMap {
    ConfigMap {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        ..Default::default()
    }
}

/// Waits until the watcher reports `name` (applied), failing after a deadline.
async fn wait_applied<S>(events: &mut S, name: &str) -> usize
where
    S: Stream<Item = Result<watcher::Event<ConfigMap>, watcher::Error>> + Unpin,
{
    let mut relists = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let event = tokio::time::timeout_at(deadline, events.next())
            .await
            .unwrap_or_else(|_| panic!("watcher never saw {name}"))
            .expect("watcher stream ended");
        match event {
            Ok(watcher::Event::Init) => relists += 1,
            Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o))
                if o.metadata.name.as_deref() == Some(name) =>
            {
                return relists;
            }
            Ok(_) => {}
            Err(e) => eprintln!("watcher error (retried): {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_survives_compaction_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let store = wasmkube_store::open_sled(dir.path()).unwrap();
    let (running, addr) = serve(store, "127.0.0.1:0".parse().unwrap()).await;
    let cms: Api<ConfigMap> = Api::namespaced(client(addr), "default");
    // Short watch timeouts make the watcher re-watch from its last version often.
    let config = watcher::Config::default().timeout(1);
    let mut events = watcher(cms.clone(), config).default_backoff().boxed();
    cms.create(&PostParams::default(), &cm("before"))
        .await
        .unwrap();
    assert_eq!(
        wait_applied(&mut events, "before").await,
        1,
        "the initial list"
    );

    // Writes the watcher does not see move the store on; compacting past them
    // leaves the watcher's version behind, so its next watch gets 410 and relists.
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client(addr), "default");
    for i in 0..3 {
        let s = k8s_openapi::api::core::v1::Secret {
            metadata: kube::api::ObjectMeta {
                name: Some(format!("s{i}")),
                ..Default::default()
            },
            ..Default::default()
        };
        secrets.create(&PostParams::default(), &s).await.unwrap();
    }
    running
        .api
        .compact(running.api.current_revision())
        .await
        .unwrap();
    let relists = wait_applied(&mut events, "before").await;
    assert_eq!(relists, 1, "the watcher relisted after the compaction");
    cms.create(&PostParams::default(), &cm("after-compaction"))
        .await
        .unwrap();
    wait_applied(&mut events, "after-compaction").await;

    // Restart the server on the same store and port.
    running.task.abort();
    let _ = running.task.await;
    drop(running.api);
    let store = loop {
        match wasmkube_store::open_sled(dir.path()) {
            Ok(s) => break s,
            Err(wasmkube_store::StoreError::Locked { .. }) => tokio::task::yield_now().await,
            Err(e) => panic!("{e}"),
        }
    };
    let (_running, _) = serve(store, addr).await;
    cms.create(&PostParams::default(), &cm("after-restart"))
        .await
        .unwrap();
    wait_applied(&mut events, "after-restart").await;
}
