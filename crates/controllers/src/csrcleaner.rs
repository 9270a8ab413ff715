//! The CertificateSigningRequest cleaner, as kube-controller-manager's
//! `csrcleaner`: requests are records of a moment, and every node start
//! makes one (its serving certificate), so they are deleted once done with:
//! an issued or denied or failed request an hour after that happened, a
//! request still pending after a day, and any whose certificate has
//! expired. It looks every hour.

use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams};

use crate::Error;

/// How often every request is looked at (Kubernetes: an hour).
const POLL: Duration = Duration::from_secs(3600);
/// How long an issued, denied or failed request is kept.
const DONE_FOR: chrono::Duration = chrono::Duration::hours(1);
/// How long a request may wait for a decision.
const PENDING_FOR: chrono::Duration = chrono::Duration::hours(24);

/// Why `csr` is due for deletion at `now`, if it is.
pub fn stale(csr: &CertificateSigningRequest, now: DateTime<Utc>) -> Option<&'static str> {
    let status = csr.status.as_ref();
    let condition = |kind: &str| {
        status
            .and_then(|s| s.conditions.as_ref())
            .and_then(|c| c.iter().find(|c| c.type_ == kind && c.status == "True"))
            .map(|c| {
                c.last_update_time
                    .as_ref()
                    .or(c.last_transition_time.as_ref())
                    .map(|t| t.0.as_millisecond())
            })
    };
    let older_than = |at: Option<i64>, age: chrono::Duration| {
        at.and_then(DateTime::<Utc>::from_timestamp_millis)
            .is_some_and(|at| at + age < now)
    };
    let certificate = status
        .and_then(|s| s.certificate.as_ref())
        .filter(|c| !c.0.is_empty());
    if let Some(cert) = certificate {
        let pem = String::from_utf8_lossy(&cert.0);
        if wasmkube_pki::not_after(&pem).is_ok_and(|end| end < now.timestamp()) {
            return Some("its certificate has expired");
        }
        if let Some(approved) = condition("Approved")
            && older_than(approved, DONE_FOR)
        {
            return Some("issued more than an hour ago");
        }
        return None;
    }
    if let Some(denied) = condition("Denied") {
        return older_than(denied, DONE_FOR).then_some("denied more than an hour ago");
    }
    if let Some(failed) = condition("Failed") {
        return older_than(failed, DONE_FOR).then_some("failed more than an hour ago");
    }
    if condition("Approved").is_some() {
        // Approved and waiting for its signer: not pending, not done.
        return None;
    }
    let created = csr
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.as_millisecond());
    older_than(created, PENDING_FOR).then_some("pending for more than a day")
}

/// Deletes every request [`stale`] at `now`; returns how many.
pub async fn sweep(client: &kube::Client, now: DateTime<Utc>) -> Result<usize, Error> {
    let api: Api<CertificateSigningRequest> = Api::all(client.clone());
    let mut deleted = 0;
    for csr in api
        .list(&ListParams::default())
        .await
        .map_err(Error::Kube)?
    {
        let Some(reason) = stale(&csr, now) else {
            continue;
        };
        let name = csr.name_any();
        crate::gone_ok(api.delete(&name, &DeleteParams::default()).await).map_err(Error::Kube)?;
        tracing::info!(csr = %name, reason, "deleted a CertificateSigningRequest");
        deleted += 1;
    }
    Ok(deleted)
}

/// Runs the cleaner: a sweep now and every hour.
pub async fn run(client: kube::Client) -> Result<(), Error> {
    loop {
        if let Err(e) = sweep(&client, Utc::now()).await {
            tracing::warn!(error = %crate::ErrorChain(&e), "cannot clean CertificateSigningRequests");
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn csr(status: serde_json::Value, created: &str) -> CertificateSigningRequest {
        serde_json::from_value(json!({
            "metadata": {"name": "n", "creationTimestamp": created},
            "spec": {"request": "", "signerName": "kubernetes.io/kube-apiserver-client-kubelet"},
            "status": status,
        }))
        .unwrap()
    }

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn condition(kind: &str, time: &str) -> serde_json::Value {
        json!({"type": kind, "status": "True", "lastUpdateTime": time, "lastTransitionTime": time})
    }

    #[test]
    fn requests_go_an_hour_after_a_decision_or_a_day_pending() {
        let created = "2026-12-01T10:00:00Z";
        let pending = csr(json!({}), created);
        assert_eq!(stale(&pending, at("2026-12-02T09:59:00Z")), None);
        assert_eq!(
            stale(&pending, at("2026-12-02T10:01:00Z")),
            Some("pending for more than a day")
        );
        let denied = csr(
            json!({"conditions": [condition("Denied", "2026-12-01T10:05:00Z")]}),
            created,
        );
        assert_eq!(stale(&denied, at("2026-12-01T11:04:00Z")), None);
        assert!(stale(&denied, at("2026-12-01T11:06:00Z")).is_some());
        let failed = csr(
            json!({"conditions": [condition("Failed", "2026-12-01T10:05:00Z")]}),
            created,
        );
        assert!(stale(&failed, at("2026-12-01T11:06:00Z")).is_some());
        // Approved, not yet signed: left to its signer, however old.
        let approved = csr(
            json!({"conditions": [condition("Approved", "2026-12-01T10:05:00Z")]}),
            created,
        );
        assert_eq!(stale(&approved, at("2026-12-09T00:00:00Z")), None);
    }

    #[test]
    fn issued_requests_go_an_hour_after_approval_or_when_expired() {
        let ca = wasmkube_pki::Ca::create("test").unwrap();
        let identity = wasmkube_pki::Identity::new("system:node:n", &["system:nodes"]);
        let (csr_pem, _key) = wasmkube_pki::new_csr(&identity).unwrap();
        let cert = ca
            .sign_client_csr(&csr_pem, Duration::from_secs(3600))
            .unwrap();
        let end = wasmkube_pki::not_after(&cert).unwrap();
        let now = Utc::now();
        let issued = |approved: DateTime<Utc>| {
            let time = approved.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
            // The certificate as the API carries it: bytes, base64 in JSON.
            let certificate = base64_of(cert.as_bytes());
            csr(
                json!({"certificate": certificate, "conditions": [condition("Approved", &time)]}),
                &time,
            )
        };
        let fresh = issued(now - chrono::Duration::minutes(5));
        assert_eq!(stale(&fresh, now), None);
        let old = issued(now - chrono::Duration::minutes(61));
        assert_eq!(stale(&old, now), Some("issued more than an hour ago"));
        let after_expiry = DateTime::<Utc>::from_timestamp(end + 1, 0).unwrap();
        assert_eq!(
            stale(&fresh, after_expiry),
            Some("its certificate has expired")
        );
    }

    fn base64_of(bytes: &[u8]) -> String {
        serde_json::to_value(k8s_openapi::ByteString(bytes.to_vec()))
            .unwrap()
            .as_str()
            .unwrap()
            .to_owned()
    }
}
