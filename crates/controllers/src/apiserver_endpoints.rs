//! The `kubernetes` Service's endpoints: every live API server, as
//! Kubernetes' lease endpoint reconciler keeps them.
//!
//! Each API server holds a `coordination.k8s.io/v1` Lease in `kube-system`
//! (named `apiserver-<hash of host and address>`, labelled
//! `apiserver.kubernetes.io/identity: kube-apiserver` like kube-apiserver's
//! identity leases, its advertised address in an annotation), renews it
//! every [`EndpointsConfig::renew_period`], and rewrites the `kubernetes`
//! Endpoints and EndpointSlices from the leases that have not expired. A
//! server that stops deletes its lease and takes itself out at once; one that
//! dies drops out when its lease expires. Every server runs this (it is not
//! leader-elected): the result depends only on the leases, so concurrent
//! writers agree, and writes happen only when the set changes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Endpoints;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};

/// The label kube-apiserver puts on its identity leases.
pub const IDENTITY_LABEL: &str = "apiserver.kubernetes.io/identity";
/// The address (`IP:PORT`) the `kubernetes` Service should reach this
/// server at.
pub const ADDRESS_ANNOTATION: &str = "wasmkube.io/advertise-address";
const NAMESPACE: &str = "kube-system";
const MANAGER: &str = "wasmkube-apiserver-endpoints";
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
const MANAGED_BY: &str = "endpointslicemirroring-controller.k8s.io";

/// How leases are kept.
#[derive(Clone, Debug)]
pub struct EndpointsConfig {
    /// How long a lease lasts without renewal (kube-apiserver: 15 s for its
    /// endpoint leases).
    pub lease_duration: Duration,
    /// How often this server renews its lease and reconciles the endpoints.
    pub renew_period: Duration,
    /// A lease expired for this long is deleted (a server that died and never
    /// came back).
    pub forget_after: Duration,
}

impl Default for EndpointsConfig {
    fn default() -> Self {
        Self {
            lease_duration: Duration::from_secs(15),
            renew_period: Duration::from_secs(5),
            forget_after: Duration::from_secs(3600),
        }
    }
}

/// One API server's place in the `kubernetes` Service's endpoints.
pub struct ApiServerEndpoints {
    leases: Api<Lease>,
    endpoints: Api<Endpoints>,
    slices: Api<EndpointSlice>,
    name: String,
    address: SocketAddr,
    config: EndpointsConfig,
}

impl std::fmt::Debug for ApiServerEndpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServerEndpoints")
            .field("lease", &self.name)
            .field("address", &self.address)
            .finish()
    }
}

/// The lease name for a server on `host` advertising `address`: stable across
/// restarts, so a restarted server takes its own lease back.
pub fn lease_name(host: &str, address: SocketAddr) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("{host}/{address}").as_bytes());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("apiserver-{hex}")
}

impl ApiServerEndpoints {
    pub fn new(
        client: kube::Client,
        host: &str,
        address: SocketAddr,
        config: EndpointsConfig,
    ) -> Self {
        Self {
            leases: Api::namespaced(client.clone(), NAMESPACE),
            endpoints: Api::namespaced(client.clone(), "default"),
            slices: Api::namespaced(client, "default"),
            name: lease_name(host, address),
            address,
            config,
        }
    }

    /// Renews the lease and reconciles the endpoints until the future is
    /// dropped; failures are logged and retried at the next period.
    pub async fn run(&self) {
        let mut tick = tokio::time::interval(self.config.renew_period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = self.renew().await {
                tracing::warn!(error = %e, lease = %self.name, "cannot renew this API server's lease");
                continue;
            }
            if let Err(e) = self.reconcile().await {
                tracing::warn!(error = %e, "cannot reconcile the kubernetes Service's endpoints");
            }
        }
    }

    /// Takes this server out: deletes its lease and rewrites the endpoints
    /// without it.
    pub async fn release(&self) -> Result<(), kube::Error> {
        match self
            .leases
            .delete(&self.name, &DeleteParams::default())
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e),
        }
        self.reconcile().await
    }

    /// Creates or renews this server's lease.
    pub async fn renew(&self) -> Result<(), kube::Error> {
        let seconds = i32::try_from(self.config.lease_duration.as_secs()).unwrap_or(i32::MAX);
        let spec = LeaseSpec {
            holder_identity: Some(self.name.clone()),
            lease_duration_seconds: Some(seconds),
            renew_time: Some(MicroTime(Timestamp::now())),
            ..Default::default()
        };
        match self.leases.get_opt(&self.name).await? {
            Some(mut lease) => {
                lease
                    .metadata
                    .annotations
                    .get_or_insert_default()
                    .insert(ADDRESS_ANNOTATION.into(), self.address.to_string());
                let acquired = lease.spec.as_ref().and_then(|s| s.acquire_time.clone());
                lease.spec = Some(LeaseSpec {
                    acquire_time: acquired,
                    ..spec
                });
                // A conflict means another writer (this server's previous
                // life) raced us; the next period retries.
                self.leases
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await?;
            }
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        namespace: Some(NAMESPACE.into()),
                        labels: Some(BTreeMap::from([(
                            IDENTITY_LABEL.into(),
                            "kube-apiserver".into(),
                        )])),
                        annotations: Some(BTreeMap::from([(
                            ADDRESS_ANNOTATION.into(),
                            self.address.to_string(),
                        )])),
                        ..Default::default()
                    },
                    spec: Some(LeaseSpec {
                        acquire_time: Some(MicroTime(Timestamp::now())),
                        ..spec
                    }),
                };
                match self.leases.create(&PostParams::default(), &lease).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 409 => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }

    /// Rewrites the endpoints from the live leases (and deletes leases long
    /// expired).
    pub async fn reconcile(&self) -> Result<(), kube::Error> {
        let selector = format!("{IDENTITY_LABEL}=kube-apiserver");
        let leases = self
            .leases
            .list(&ListParams::default().labels(&selector))
            .await?;
        let now = Timestamp::now();
        let mut live = Vec::new();
        for lease in leases.items {
            let Some(address) = lease
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(ADDRESS_ANNOTATION))
                .and_then(|a| a.parse::<SocketAddr>().ok())
            else {
                continue;
            };
            let expired_for = expired_for(&lease, now);
            match expired_for {
                None => live.push(address),
                Some(d) if d > self.config.forget_after => {
                    let name = lease.metadata.name.clone().unwrap_or_default();
                    tracing::info!(lease = %name, %address, "forgetting an API server that has not renewed its lease for an hour");
                    let _ = self.leases.delete(&name, &DeleteParams::default()).await;
                }
                Some(_) => {}
            }
        }
        self.write(live).await
    }

    async fn write(&self, mut live: Vec<SocketAddr>) -> Result<(), kube::Error> {
        live.sort();
        live.dedup();
        // Subsets (and slices) group the servers by port.
        let mut by_port: BTreeMap<u16, Vec<String>> = BTreeMap::new();
        for a in &live {
            by_port
                .entry(a.port())
                .or_default()
                .push(a.ip().to_string());
        }
        let port = |p: u16| serde_json::json!([{"name": "https", "port": p, "protocol": "TCP"}]);
        let subsets: Vec<_> = by_port
            .iter()
            .map(|(p, ips)| {
                let addresses: Vec<_> =
                    ips.iter().map(|ip| serde_json::json!({"ip": ip})).collect();
                serde_json::json!({"addresses": addresses, "ports": port(*p)})
            })
            .collect();
        let current = self.endpoints.get_opt("kubernetes").await?;
        let current_subsets = current
            .as_ref()
            .and_then(|e| e.subsets.as_ref())
            .map(|s| serde_json::to_value(s).unwrap_or_default())
            .unwrap_or_else(|| serde_json::json!([]));
        let params = PatchParams::apply(MANAGER).force();
        if current.is_none() || current_subsets != serde_json::Value::from(subsets.clone()) {
            let endpoints = serde_json::json!({
                "apiVersion": "v1", "kind": "Endpoints",
                "metadata": {"name": "kubernetes", "namespace": "default"},
                "subsets": subsets,
            });
            self.endpoints
                .patch("kubernetes", &params, &Patch::Apply(endpoints))
                .await?;
        }
        // One slice per port: `kubernetes` for the first (every server on
        // the usual single port), `kubernetes-PORT` for any other.
        let mut wanted = BTreeMap::new();
        for (i, (p, ips)) in by_port.iter().enumerate() {
            let name = if i == 0 {
                "kubernetes".to_owned()
            } else {
                format!("kubernetes-{p}")
            };
            let endpoints: Vec<_> = ips
                .iter()
                .map(|ip| serde_json::json!({"addresses": [ip], "conditions": {"ready": true}}))
                .collect();
            wanted.insert(
                name.clone(),
                serde_json::json!({
                    "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                    "metadata": {"name": name, "namespace": "default",
                                 "labels": {SERVICE_NAME_LABEL: "kubernetes",
                                            MANAGED_BY_LABEL: MANAGED_BY}},
                    "addressType": "IPv4",
                    "endpoints": endpoints,
                    "ports": port(*p),
                }),
            );
        }
        if wanted.is_empty() {
            // No live server (this one is leaving): an empty slice, as the
            // mirroring controller leaves for a Service without endpoints.
            wanted.insert(
                "kubernetes".to_owned(),
                serde_json::json!({
                    "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                    "metadata": {"name": "kubernetes", "namespace": "default",
                                 "labels": {SERVICE_NAME_LABEL: "kubernetes",
                                            MANAGED_BY_LABEL: MANAGED_BY}},
                    "addressType": "IPv4",
                    "endpoints": [],
                    "ports": port(443),
                }),
            );
        }
        let existing = self
            .slices
            .list(&ListParams::default().labels(&format!(
                "{SERVICE_NAME_LABEL}=kubernetes,{MANAGED_BY_LABEL}={MANAGED_BY}"
            )))
            .await?;
        for slice in &existing.items {
            let name = slice.metadata.name.clone().unwrap_or_default();
            if !wanted.contains_key(&name) {
                match self.slices.delete(&name, &DeleteParams::default()).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(e) => return Err(e),
                }
            }
        }
        for (name, slice) in wanted {
            let same = existing.items.iter().any(|s| {
                s.metadata.name.as_deref() == Some(name.as_str())
                    && serde_json::to_value(&s.endpoints).ok().as_ref() == Some(&slice["endpoints"])
                    && serde_json::to_value(&s.ports).ok().as_ref() == Some(&slice["ports"])
            });
            if !same {
                self.slices
                    .patch(&name, &params, &Patch::Apply(slice))
                    .await?;
            }
        }
        Ok(())
    }
}

/// How long ago `lease` expired (`None`: it is live).
fn expired_for(lease: &Lease, now: Timestamp) -> Option<Duration> {
    let spec = lease.spec.as_ref()?;
    let Some(renewed) = spec.renew_time.as_ref().or(spec.acquire_time.as_ref()) else {
        return Some(Duration::MAX);
    };
    let seconds = spec.lease_duration_seconds.unwrap_or(15).max(0);
    let expires = renewed.0 + SignedDuration::from_secs(i64::from(seconds));
    if expires > now {
        None
    } else {
        Some(Duration::try_from(now.duration_since(expires)).unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(renewed_secs_ago: i64, duration: i32) -> Lease {
        Lease {
            spec: Some(LeaseSpec {
                renew_time: Some(MicroTime(
                    Timestamp::now() - SignedDuration::from_secs(renewed_secs_ago),
                )),
                lease_duration_seconds: Some(duration),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_lease_renewed_within_its_duration_is_live() {
        assert_eq!(expired_for(&lease(5, 15), Timestamp::now()), None);
        let expired = expired_for(&lease(20, 15), Timestamp::now()).expect("expired");
        assert!(
            (Duration::from_secs(4)..Duration::from_secs(6)).contains(&expired),
            "{expired:?}"
        );
        // A lease with no times at all counts as long expired.
        let empty = Lease {
            spec: Some(LeaseSpec::default()),
            ..Default::default()
        };
        assert_eq!(expired_for(&empty, Timestamp::now()), Some(Duration::MAX));
    }

    #[test]
    fn lease_names_are_stable_and_tell_servers_apart() {
        let a: SocketAddr = "10.0.0.1:6443".parse().unwrap();
        let b: SocketAddr = "10.0.0.1:6444".parse().unwrap();
        assert_eq!(lease_name("host", a), lease_name("host", a));
        assert_ne!(lease_name("host", a), lease_name("host", b));
        assert_ne!(lease_name("host", a), lease_name("other", a));
        assert!(lease_name("host", a).starts_with("apiserver-"));
    }
}
