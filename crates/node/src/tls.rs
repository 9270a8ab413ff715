//! The agent endpoint over mutual TLS, in a cluster with a CA (every
//! cluster `wasmkube server` makes unless `--insecure-http`).
//!
//! The agent has a serving certificate of the cluster CA for its own names
//! (asked for with a `kubernetes.io/kubelet-serving` CertificateSigningRequest
//! once its Node is registered; the API server approves it when the names
//! are the Node's), so the API server can verify whom it streams logs and
//! exec sessions to. It serves only a client certificate of the same CA
//! naming the API server's agent client ([`wasmkube_pki::AGENT_CLIENT`]):
//! other nodes, whose certificates the same CA signed, are refused. No
//! shared secret is involved. The certificate is renewed while the agent
//! runs, at 80 % of its lifetime (as the kubelet rotates its serving
//! certificate); new connections get the new one.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use tokio::net::TcpListener;

use crate::Error;

/// The cluster CA (PEM) the API server publishes at `/cacerts`, read over
/// the client's connection (which verified the server); `None` when the
/// server has no CA (plain HTTP clusters: the agent then serves plain HTTP
/// to the node-proxy token).
pub(crate) async fn cluster_ca(client: &kube::Client) -> Result<Option<String>, Error> {
    let request = axum::http::Request::get("/cacerts")
        .body(Vec::new())
        .expect("a static request");
    match client.request_text(request).await {
        Ok(pem) => Ok(Some(pem)),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(None),
        Err(source) => Err(Error::Api {
            context: "reading the cluster CA (/cacerts)".into(),
            source,
        }),
    }
}

/// The endpoint's TLS configuration, and when to renew its certificate.
pub(crate) struct Serving {
    pub config: Arc<rustls::ServerConfig>,
    pub renew_at: SystemTime,
}

use wasmkube_pki::renew_at;

/// A serving certificate for this node's `names`, signed by the cluster CA
/// through a CertificateSigningRequest, and the TLS configuration serving
/// it to the API server.
pub(crate) async fn serving(
    client: &kube::Client,
    node: &str,
    ca_pem: &str,
    names: &wasmkube_pki::ServingNames,
) -> Result<Serving, Error> {
    let issued = SystemTime::now();
    use base64::Engine;
    let who = wasmkube_pki::Identity::new(&format!("system:node:{node}"), &["system:nodes"]);
    let invalid = |e: wasmkube_pki::PkiError| Error::Tls(e.to_string());
    let (request, key_pem) = wasmkube_pki::new_serving_csr(&who, names).map_err(invalid)?;
    let csr: CertificateSigningRequest = serde_json::from_value(serde_json::json!({
        "apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
        "metadata": {"generateName": format!("node-serving-{node}-")},
        "spec": {
            "request": base64::engine::general_purpose::STANDARD.encode(&request),
            "signerName": "kubernetes.io/kubelet-serving",
            "usages": ["digital signature", "key encipherment", "server auth"],
        },
    }))
    .map_err(|e| Error::Tls(e.to_string()))?;
    let csrs: kube::Api<CertificateSigningRequest> = kube::Api::all(client.clone());
    let created = csrs
        .create(&Default::default(), &csr)
        .await
        .map_err(|source| Error::Api {
            context: "asking for the agent's serving certificate".into(),
            source,
        })?;
    let Some(cert) = created.status.and_then(|s| s.certificate) else {
        let ips: Vec<String> = names.ips.iter().map(|ip| ip.to_string()).collect();
        return Err(Error::Tls(format!(
            "the API server did not sign the agent's serving certificate request {} for {} and {}: it signs one at once only when the node asks with its own credentials (a join token or the node's kubeconfig) or an administrator's, for the Node's own name and addresses (check the agent's --name, --address and credentials)",
            created.metadata.name.unwrap_or_default(),
            names.dns.join(", "),
            ips.join(", "),
        )));
    };
    let cert_pem = String::from_utf8(cert.0).map_err(|e| Error::Tls(e.to_string()))?;
    let expires = wasmkube_pki::not_after(&cert_pem).map_err(invalid)?;
    let expires = UNIX_EPOCH + Duration::from_secs(u64::try_from(expires).unwrap_or_default());
    let serving = wasmkube_pki::Issued { cert_pem, key_pem };
    Ok(Serving {
        config: wasmkube_pki::agent_server_tls(ca_pem, &serving).map_err(invalid)?,
        renew_at: renew_at(issued, expires),
    })
}

/// Renews the serving certificate when `first` says, and each new one at
/// 80 % of its life, publishing every new configuration on `tx`; a failed
/// request is asked again a minute later (the current certificate serves
/// meanwhile).
pub(crate) async fn rotate(
    client: kube::Client,
    node: String,
    ca_pem: String,
    names: wasmkube_pki::ServingNames,
    first: SystemTime,
    tx: tokio::sync::watch::Sender<Arc<rustls::ServerConfig>>,
) {
    let mut renew_at = first;
    loop {
        let wait = renew_at
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        tokio::time::sleep(wait).await;
        match serving(&client, &node, &ca_pem, &names).await {
            Ok(next) => {
                tracing::info!(node, "renewed the agent's serving certificate");
                renew_at = next.renew_at;
                if tx.send(next.config).is_err() {
                    return;
                }
            }
            Err(e) => {
                tracing::warn!(node, error = %e, "cannot renew the agent's serving certificate; asking again in a minute");
                renew_at = SystemTime::now() + Duration::from_secs(60);
            }
        }
    }
}

/// Serves `router` over `tls` on `listener` to the API server only: a
/// connection whose client certificate (which rustls verified against the
/// cluster CA) names anyone else is closed before any request is read.
pub(crate) async fn serve(
    listener: TcpListener,
    tls: tokio::sync::watch::Receiver<Arc<rustls::ServerConfig>>,
    router: Router,
) {
    loop {
        let (socket, remote) = wasmkube_pki::next_connection(&listener).await;
        // The certificate current now: a renewed one serves new connections.
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.borrow().clone());
        let router = router.clone();
        tokio::spawn(async move {
            let Some((stream, who)) = wasmkube_pki::accept(&acceptor, socket, remote).await else {
                return;
            };
            if who.as_ref().map(|w| w.user.as_str()) != Some(wasmkube_pki::AGENT_CLIENT) {
                tracing::warn!(%remote, client = ?who.map(|w| w.user), "refused a client that is not the API server");
                return;
            }
            let service = hyper_util::service::TowerToHyperService::new(router);
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(e) = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%remote, error = %e, "connection ended with an error");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificates_are_renewed_at_four_fifths_of_their_life() {
        let issued = UNIX_EPOCH + Duration::from_secs(1_000);
        let expires = issued + Duration::from_secs(1_000);
        assert_eq!(renew_at(issued, expires), issued + Duration::from_secs(800));
        // An expiry already past renews at once.
        assert_eq!(renew_at(expires, issued), expires);
    }

    /// The certificate an agent endpoint presents to the API server's client.
    async fn presented(addr: std::net::SocketAddr, client: Arc<rustls::ClientConfig>) -> Vec<u8> {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("node-a").unwrap();
        let tls = tokio_rustls::TlsConnector::from(client)
            .connect(name, tcp)
            .await
            .unwrap();
        tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
    }

    #[tokio::test]
    async fn a_renewed_certificate_serves_the_next_connections() {
        let ca = wasmkube_pki::Ca::create("test").unwrap();
        let names = wasmkube_pki::ServingNames {
            dns: vec!["node-a".into()],
            ips: vec![],
        };
        let first = ca.issue_serving("system:node:node-a", &names).unwrap();
        let second = ca.issue_serving("system:node:node-a", &names).unwrap();
        let config = |issued: &wasmkube_pki::Issued| {
            wasmkube_pki::agent_server_tls(ca.cert_pem(), issued).unwrap()
        };
        let (tx, rx) = tokio::sync::watch::channel(config(&first));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, rx, Router::new()));
        let who = wasmkube_pki::Identity::new(wasmkube_pki::AGENT_CLIENT, &[]);
        let client_cert = ca.issue_client(&who, Duration::from_secs(3600)).unwrap();
        let client = wasmkube_pki::agent_client_tls(ca.cert_pem(), &client_cert).unwrap();
        let der = |issued: &wasmkube_pki::Issued| {
            use rustls::pki_types::pem::PemObject;
            rustls::pki_types::CertificateDer::pem_slice_iter(issued.cert_pem.as_bytes())
                .next()
                .unwrap()
                .unwrap()
                .to_vec()
        };
        assert_eq!(presented(addr, client.clone()).await, der(&first));
        tx.send(config(&second)).unwrap();
        assert_eq!(presented(addr, client).await, der(&second));
        server.abort();
    }
}
