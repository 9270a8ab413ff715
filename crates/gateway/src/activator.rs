//! The activator: a request for a Knative revision that has no ready pod
//! (scaled to zero, or not up yet) is held here, not refused. The revision's
//! Deployment is scaled from zero to one (stamped with the time, so the
//! autoscaler keeps it up for a window), and the request goes on as soon as
//! one of the revision's pods accepts connections: the activator watches
//! the revisions' pods and probes a new pod's port as soon as it has an
//! address, as Knative's activator does, without waiting for the pod's
//! Ready status and its EndpointSlice to go round the API (or, whichever
//! comes first, when the routing table has a ready endpoint for it). A held request
//! ends with a clear error when the revision reports it cannot run (its
//! image does not pull, say: 503 with the revision's reason), or when the
//! wait outlasts the configured limit (504).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::Store;
use serde_json::json;
use wasmkube_api::knative;
use wasmkube_proxy::views::Views;

use crate::routes::Revision;

/// How long a revision is not woken again after a wake (the Deployment
/// needs a moment to show it).
const WAKE_AGAIN_AFTER: Duration = Duration::from_secs(1);

pub(crate) struct Activator {
    client: kube::Client,
    /// Why each revision that cannot serve cannot.
    revisions: Views<String>,
    /// The revisions' pods (labelled `serving.knative.dev/revision`).
    pods: Store<Pod>,
    /// Bumped after every change of `pods`.
    pub pod_changes: tokio::sync::watch::Receiver<u64>,
    /// How long a request may be held.
    pub timeout: Duration,
    woken: Mutex<HashMap<Revision, Instant>>,
}

impl Activator {
    pub fn new(
        client: kube::Client,
        revisions: Views<String>,
        (pods, pod_changes): (Store<Pod>, tokio::sync::watch::Receiver<u64>),
        timeout: Duration,
    ) -> Self {
        Self {
            client,
            revisions,
            pods,
            pod_changes,
            timeout,
            woken: Mutex::default(),
        }
    }

    /// Scales the revision's Deployment from zero to one, once per burst of
    /// held requests. A Deployment that already asks for pods is left alone.
    pub async fn wake(&self, rev: &Revision) {
        {
            let mut woken = self.woken.lock().expect("woken lock");
            let now = Instant::now();
            if woken
                .get(rev)
                .is_some_and(|t| now.duration_since(*t) < WAKE_AGAIN_AFTER)
            {
                return;
            }
            woken.insert(rev.clone(), now);
            woken.retain(|_, t| now.duration_since(*t) < Duration::from_secs(60));
        }
        let api: Api<Deployment> = Api::namespaced(self.client.clone(), &rev.namespace);
        let name = format!("{}-deployment", rev.name);
        // Read, then write with that resourceVersion: a concurrent change
        // (the autoscaler's) wins, and this wake is retried by the next
        // held request.
        let current = match api.get(&name).await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(revision = %rev.name, error = %e, "activator: cannot read the revision's Deployment");
                return;
            }
        };
        if current.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0) > 0 {
            return;
        }
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let patch = json!({
            "metadata": {
                "resourceVersion": current.metadata.resource_version,
                "annotations": {knative::ACTIVATED_AT: now},
            },
            "spec": {"replicas": 1},
        });
        match api
            .patch(&name, &PatchParams::default(), &Patch::Merge(patch))
            .await
        {
            Ok(_) => {
                tracing::info!(namespace = %rev.namespace, revision = %rev.name, "activator: scaled a revision from zero")
            }
            Err(e) => {
                tracing::debug!(revision = %rev.name, error = %e, "activator: wake lost a race; the next request retries")
            }
        }
    }

    /// The revision's pods that have an address of their own and are not
    /// going away, with the port the revision serves on.
    pub fn pod_addresses(&self, rev: &Revision) -> Vec<SocketAddr> {
        self.pods
            .state()
            .iter()
            .filter(|p| {
                p.metadata.namespace.as_deref() == Some(rev.namespace.as_str())
                    && p.metadata.deletion_timestamp.is_none()
                    && p.metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get(knative::labels::REVISION))
                        == Some(&rev.name)
            })
            .filter_map(|p| {
                let status = p.status.as_ref()?;
                if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
                    return None;
                }
                // The node's address until the pod's own network is up.
                let ip: IpAddr = status.pod_ip.as_deref()?.parse().ok()?;
                if status.host_ip.as_deref() == status.pod_ip.as_deref() {
                    return None;
                }
                let port = p
                    .spec
                    .as_ref()?
                    .containers
                    .iter()
                    .flat_map(|c| c.ports.iter().flatten())
                    .map(|p| p.container_port)
                    .next()?;
                Some(SocketAddr::new(ip, u16::try_from(port).ok()?))
            })
            .collect()
    }

    /// Why the revision cannot serve, when its status says it cannot.
    pub fn failure(&self, rev: &Revision) -> Option<String> {
        Some(self.revisions.get(&rev.namespace, &rev.name)?.to_string())
    }
}
