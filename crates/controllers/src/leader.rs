//! Leader election through a `coordination.k8s.io/v1` Lease, as client-go's
//! leaderelection does: a candidate takes the Lease when it is free or its
//! holder has not renewed it for `lease_duration` (judged by when this
//! candidate saw it change, so clocks need not agree), renews it every
//! `retry_period`, and stops its work if it cannot renew within
//! `renew_deadline`. Two `wasmkube server` processes on one store therefore
//! never run two schedulers or controller managers at once.

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use chrono::Utc;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, PostParams};
use tokio::time::Instant;

/// Timing, with client-go's defaults.
#[derive(Clone, Debug)]
pub struct ElectionConfig {
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

impl Default for ElectionConfig {
    fn default() -> Self {
        Self {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// One candidate for one Lease.
pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    config: ElectionConfig,
    /// The holder record last seen and when it was first seen.
    observed: Mutex<Option<(String, Instant)>>,
}

impl std::fmt::Debug for LeaderElector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaderElector")
            .field("name", &self.name)
            .field("identity", &self.identity)
            .finish()
    }
}

fn now() -> MicroTime {
    MicroTime(
        Utc::now()
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
            .parse()
            .expect("an RFC 3339 time parses"),
    )
}

impl LeaderElector {
    pub fn new(
        client: kube::Client,
        namespace: &str,
        name: &str,
        identity: &str,
        config: ElectionConfig,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
            config,
            observed: Mutex::new(None),
        }
    }

    /// Takes or renews the Lease; true while we hold it.
    pub async fn try_acquire_or_renew(&self) -> bool {
        let lease = match self.api.get_opt(&self.name).await {
            Ok(l) => l,
            Err(e) => {
                tracing::debug!(lease = %self.name, error = %e, "could not read the lease");
                return false;
            }
        };
        let duration = i32::try_from(self.config.lease_duration.as_secs()).unwrap_or(15);
        let Some(mut lease) = lease else {
            let mut fresh = Lease::default();
            fresh.metadata.name = Some(self.name.clone());
            fresh.spec = Some(k8s_openapi::api::coordination::v1::LeaseSpec {
                holder_identity: Some(self.identity.clone()),
                lease_duration_seconds: Some(duration),
                acquire_time: Some(now()),
                renew_time: Some(now()),
                lease_transitions: Some(0),
                ..Default::default()
            });
            return self
                .api
                .create(&PostParams::default(), &fresh)
                .await
                .is_ok();
        };
        let spec = lease.spec.get_or_insert_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let record = format!(
            "{holder}|{}",
            spec.renew_time
                .as_ref()
                .map(|t| t.0.to_string())
                .unwrap_or_default()
        );
        let expired = {
            let mut observed = self.observed.lock().expect("observed lock");
            let at = match observed.as_ref() {
                Some((r, at)) if *r == record => *at,
                _ => {
                    *observed = Some((record, Instant::now()));
                    Instant::now()
                }
            };
            let held_for = spec
                .lease_duration_seconds
                .map_or(self.config.lease_duration, |s| {
                    Duration::from_secs(u64::try_from(s).unwrap_or(0))
                });
            at.elapsed() > held_for
        };
        if holder != self.identity {
            if !holder.is_empty() && !expired {
                return false;
            }
            tracing::info!(lease = %self.name, previous = %holder, identity = %self.identity, "taking the lease");
            spec.acquire_time = Some(now());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.holder_identity = Some(self.identity.clone());
        spec.lease_duration_seconds = Some(duration);
        spec.renew_time = Some(now());
        // Guarded by the resourceVersion just read: of two candidates, one wins.
        self.api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
            .is_ok()
    }

    /// Runs `work` whenever this candidate leads; stops it when leadership
    /// is lost and campaigns again. Returns when `work` returns.
    pub async fn run<F, Fut, T>(&self, mut work: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = T>,
    {
        loop {
            while !self.try_acquire_or_renew().await {
                tokio::time::sleep(self.config.retry_period).await;
            }
            tracing::info!(lease = %self.name, identity = %self.identity, "became leader");
            let renew = async {
                let mut last = Instant::now();
                loop {
                    tokio::time::sleep(self.config.retry_period).await;
                    if self.try_acquire_or_renew().await {
                        last = Instant::now();
                    } else if last.elapsed() > self.config.renew_deadline {
                        return;
                    }
                }
            };
            tokio::select! {
                out = work() => return out,
                () = renew => {
                    tracing::warn!(lease = %self.name, identity = %self.identity, "lost leadership; stopping work");
                }
            }
        }
    }

    /// Gives the Lease up if we hold it, so another candidate can take it at
    /// once (on a clean shutdown).
    pub async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await else {
            return;
        };
        let spec = lease.spec.get_or_insert_default();
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(now());
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => tracing::info!(lease = %self.name, "released the lease"),
            Err(e) => {
                tracing::debug!(lease = %self.name, error = %e, "could not release the lease")
            }
        }
    }
}
