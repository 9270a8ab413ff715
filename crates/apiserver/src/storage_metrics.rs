//! The storage metrics Kubernetes' API server exports, for this server's
//! store (sled, memory or etcd): `etcd_request_duration_seconds` and
//! `etcd_requests_total` for every store call by operation and type (the
//! resource, `pods` or `deployments.apps`), and `apiserver_storage_objects`
//! (objects stored per resource), counted every minute as Kubernetes
//! counts them, and once as the server starts.

use std::collections::BTreeMap;
use std::sync::{LazyLock, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts};
use wasmkube_store::{
    KeyValue, ListOptions, ListResult, Revision, SharedStore, Store, WatchStream,
};

struct Metrics {
    durations: HistogramVec,
    requests: IntCounterVec,
    objects: IntGaugeVec,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let labels = ["operation", "type"];
    let durations = HistogramVec::new(
        HistogramOpts::new(
            "etcd_request_duration_seconds",
            "Etcd request latency in seconds for each operation and object type.",
        )
        .buckets(crate::metrics::LATENCY_BUCKETS.to_vec()),
        &labels,
    )
    .expect("a valid metric");
    let requests = IntCounterVec::new(
        Opts::new(
            "etcd_requests_total",
            "Etcd request counts for each operation and object type.",
        ),
        &labels,
    )
    .expect("a valid metric");
    let objects = IntGaugeVec::new(
        Opts::new(
            "apiserver_storage_objects",
            "Number of stored objects at the time of last check split by kind.",
        ),
        &["resource"],
    )
    .expect("a valid metric");
    let registry = prometheus::default_registry();
    for m in [
        Box::new(durations.clone()) as Box<dyn prometheus::core::Collector>,
        Box::new(requests.clone()),
        Box::new(objects.clone()),
    ] {
        // Another API server in the same process (tests) shares them.
        let _ = registry.register(m);
    }
    Metrics {
        durations,
        requests,
        objects,
    }
});

/// The resource a key or prefix is under: `pods` for
/// `/registry/core/pods/...`, `deployments.apps` for
/// `/registry/apps/deployments/...`; `""` for anything else.
fn resource_of(key: &str) -> String {
    let Some(rest) = key.strip_prefix("/registry/") else {
        return String::new();
    };
    let mut parts = rest.split('/');
    match (parts.next(), parts.next()) {
        (Some("core"), Some(plural)) if !plural.is_empty() => plural.to_owned(),
        (Some(group), Some(plural)) if !plural.is_empty() => format!("{plural}.{group}"),
        _ => String::new(),
    }
}

fn observe(operation: &str, key: &str, started: Instant) {
    let resource = resource_of(key);
    let labels = [operation, resource.as_str()];
    METRICS.requests.with_label_values(&labels).inc();
    METRICS
        .durations
        .with_label_values(&labels)
        .observe(started.elapsed().as_secs_f64());
}

/// `inner`, measured.
pub(crate) fn wrap(inner: SharedStore) -> SharedStore {
    LazyLock::force(&METRICS);
    std::sync::Arc::new(Measured { inner })
}

#[derive(Debug)]
struct Measured {
    inner: SharedStore,
}

#[async_trait::async_trait]
impl Store for Measured {
    fn current_revision(&self) -> Revision {
        self.inner.current_revision()
    }

    fn compacted_revision(&self) -> Revision {
        self.inner.compacted_revision()
    }

    async fn get(&self, key: &str) -> wasmkube_store::Result<Option<KeyValue>> {
        let started = Instant::now();
        let out = self.inner.get(key).await;
        observe("get", key, started);
        out
    }

    async fn list(&self, prefix: &str, opts: ListOptions) -> wasmkube_store::Result<ListResult> {
        let started = Instant::now();
        let out = self.inner.list(prefix, opts).await;
        observe("list", prefix, started);
        out
    }

    async fn create(&self, key: &str, value: Bytes) -> wasmkube_store::Result<KeyValue> {
        let started = Instant::now();
        let out = self.inner.create(key, value).await;
        observe("create", key, started);
        out
    }

    async fn update(
        &self,
        key: &str,
        value: Bytes,
        expected: Option<Revision>,
    ) -> wasmkube_store::Result<KeyValue> {
        let started = Instant::now();
        let out = self.inner.update(key, value, expected).await;
        observe("update", key, started);
        out
    }

    async fn delete(
        &self,
        key: &str,
        expected: Option<Revision>,
    ) -> wasmkube_store::Result<KeyValue> {
        let started = Instant::now();
        let out = self.inner.delete(key, expected).await;
        observe("delete", key, started);
        out
    }

    fn watch(&self, prefix: &str, from: Revision) -> wasmkube_store::Result<WatchStream> {
        let started = Instant::now();
        let out = self.inner.watch(prefix, from);
        observe("watch", prefix, started);
        out
    }

    async fn compact(&self, revision: Revision) -> wasmkube_store::Result<()> {
        let started = Instant::now();
        let out = self.inner.compact(revision).await;
        observe("compact", "", started);
        out
    }
}

/// How often the stored objects are counted (Kubernetes' period).
const COUNT_EVERY: Duration = Duration::from_secs(60);

/// The task counting stored objects; it stops when this is dropped.
pub(crate) struct ObjectCounter(tokio::task::JoinHandle<()>);

impl Drop for ObjectCounter {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Counts the stored objects of every resource now and every minute
/// while `store` lives.
pub(crate) fn count_objects(store: Weak<dyn Store>) -> ObjectCounter {
    ObjectCounter(tokio::spawn(async move {
        loop {
            let Some(s) = store.upgrade() else { return };
            match count(&s).await {
                Ok(counts) => {
                    METRICS.objects.reset();
                    for (resource, n) in counts {
                        METRICS.objects.with_label_values(&[&resource]).set(n);
                    }
                }
                Err(e) => tracing::debug!(error = %e, "cannot count the stored objects"),
            }
            drop(s);
            tokio::time::sleep(COUNT_EVERY).await;
        }
    }))
}

async fn count(store: &SharedStore) -> wasmkube_store::Result<BTreeMap<String, i64>> {
    let mut counts = BTreeMap::new();
    let mut opts = ListOptions {
        limit: 1000,
        ..Default::default()
    };
    loop {
        let page = store.list("/registry/", opts.clone()).await?;
        for kv in &page.items {
            *counts.entry(resource_of(&kv.key)).or_default() += 1;
        }
        match (page.more, page.items.last()) {
            (true, Some(last)) => {
                opts.revision = Some(page.revision);
                opts.start_after = Some(last.key.clone());
            }
            _ => break,
        }
    }
    counts.remove("");
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_their_resource() {
        assert_eq!(resource_of("/registry/core/pods/default/p"), "pods");
        assert_eq!(
            resource_of("/registry/apps/deployments/"),
            "deployments.apps"
        );
        assert_eq!(
            resource_of("/registry/core/namespaces/kube-system"),
            "namespaces"
        );
        assert_eq!(resource_of("/other"), "");
    }

    #[tokio::test]
    async fn stored_objects_are_counted_by_resource() {
        let store = wasmkube_store::memory();
        for key in [
            "/registry/core/pods/a/p",
            "/registry/core/pods/b/q",
            "/registry/apps/deployments/a/d",
        ] {
            store.create(key, Bytes::from_static(b"{}")).await.unwrap();
        }
        let counts = count(&store).await.unwrap();
        assert_eq!(
            counts.into_iter().collect::<Vec<_>>(),
            [("deployments.apps".to_owned(), 1), ("pods".to_owned(), 2)]
        );
    }
}
