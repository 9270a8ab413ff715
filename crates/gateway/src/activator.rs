//! The activator: a request for a Knative revision that has no ready pod
//! (scaled to zero, or not up yet) is held here, not refused. The revision's
//! Deployment is scaled from zero to one (stamped with the time, so the
//! autoscaler keeps it up for a window), and the request goes on as soon as
//! the routing table has a ready endpoint for the revision. A held request
//! ends with a clear error when the revision reports it cannot run (its
//! image does not pull, say: 503 with the revision's reason), or when the
//! wait outlasts the configured limit (504).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::{ObjectRef, Store};
use serde_json::json;
use wasmkube_api::knative;

use crate::routes::Revision;

/// How long a revision is not woken again after a wake (the Deployment
/// needs a moment to show it).
const WAKE_AGAIN_AFTER: Duration = Duration::from_secs(1);

pub(crate) struct Activator {
    client: kube::Client,
    revisions: Store<knative::Revision>,
    /// How long a request may be held.
    pub timeout: Duration,
    woken: Mutex<HashMap<Revision, Instant>>,
}

impl Activator {
    pub fn new(
        client: kube::Client,
        revisions: Store<knative::Revision>,
        timeout: Duration,
    ) -> Self {
        Self {
            client,
            revisions,
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

    /// Why the revision cannot serve, when its status says it cannot.
    pub fn failure(&self, rev: &Revision) -> Option<String> {
        let r = self
            .revisions
            .get(&ObjectRef::new(&rev.name).within(&rev.namespace))?;
        let status = r.status.as_ref()?;
        ["ContainerHealthy", "Ready"].iter().find_map(|t| {
            let c = knative::condition(&status.conditions, t)?;
            (c.status == "False").then(|| {
                format!(
                    "{}: {}",
                    c.reason.clone().unwrap_or_default(),
                    c.message.clone().unwrap_or_default()
                )
            })
        })
    }
}
