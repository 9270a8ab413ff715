//! A joined node's client certificate, renewed while the agent runs.
//!
//! At 80 % of its lifetime the agent asks for a new one: a
//! `kubernetes.io/kube-apiserver-client-kubelet` CertificateSigningRequest
//! in the node's own name, which the API server signs at once for the node
//! itself. The agent keeps it in its kubeconfig for later starts, presents
//! it from the next TLS handshake on, and closes the connections made with
//! the old one, as the kubelet does: the API server checks a certificate
//! only at the handshake, so a connection would otherwise outlive its
//! certificate. Watches resume on new connections from their last
//! resourceVersion.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use base64::Engine;
use futures::task::AtomicWaker;
use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;

use crate::kubeconfig::Credentials;

/// The longest wait before a failed renewal is asked again.
const RETRY: Duration = Duration::from_secs(60);

/// A joined node's client with a renewable certificate, and what renews it.
pub struct NodeClient {
    pub client: kube::Client,
    pub renewal: Renewal,
}

/// The client of the node whose kubeconfig (written by
/// [`crate::join::join`]) is `path`, for its server or `servers`.
pub fn client(path: &Path, servers: &[String]) -> anyhow::Result<NodeClient> {
    let stored = Stored::read(path)?;
    let mut urls = Vec::new();
    for s in servers
        .iter()
        .chain(servers.is_empty().then_some(&stored.server))
    {
        urls.push(
            s.parse::<Uri>()
                .with_context(|| format!("invalid --server URL {s:?}"))?,
        );
    }
    let mut authorities = Vec::new();
    for url in &urls {
        if url.scheme() != Some(&http::uri::Scheme::HTTPS) {
            anyhow::bail!("a joined node talks to its servers over https:// (got {url})");
        }
        authorities.push(
            url.authority()
                .cloned()
                .with_context(|| format!("--server {url} names no host"))?,
        );
    }
    let slot = wasmkube_pki::ClientCertSlot::new(&stored.issued())?;
    let tls = wasmkube_pki::client_tls_rotating(&stored.credentials.ca_pem, slot.clone())?;
    let rotation = Arc::new(Rotation::default());
    let connector = Connector {
        tcp: crate::failover::tcp(),
        tls: tokio_rustls::TlsConnector::from(tls),
        rotation: rotation.clone(),
    };
    let config = kube::Config::new(urls[0].clone());
    let client = crate::api_client::build(
        config,
        crate::failover::FailoverConnector::over(connector, authorities),
    )?;
    Ok(NodeClient {
        client,
        renewal: Renewal {
            path: path.to_owned(),
            stored,
            slot,
            rotation,
        },
    })
}

/// Renews the node's client certificate while the agent runs.
pub struct Renewal {
    path: PathBuf,
    stored: Stored,
    slot: Arc<wasmkube_pki::ClientCertSlot>,
    rotation: Arc<Rotation>,
}

impl Renewal {
    /// Renews the certificate at 80 % of each one's lifetime, through
    /// `client` (the node's own); a failed request is asked again after a
    /// tenth of what is left, at most a minute.
    pub async fn run(mut self, client: kube::Client, node: String) {
        loop {
            let (from, until) = match wasmkube_pki::valid_between(&self.stored.credentials.cert_pem)
            {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(error = %e, "the node's client certificate cannot be read; not renewing it");
                    return;
                }
            };
            let at = |secs: i64| UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0));
            let renew = wasmkube_pki::renew_at(at(from), at(until));
            tokio::time::sleep(renew.duration_since(SystemTime::now()).unwrap_or_default()).await;
            loop {
                match self.renew(&client, &node).await {
                    Ok(()) => break,
                    Err(e) => {
                        let left = at(until)
                            .duration_since(SystemTime::now())
                            .unwrap_or_default();
                        tracing::warn!(node, error = %format!("{e:#}"), "cannot renew the node's client certificate; asking again");
                        tokio::time::sleep((left / 10).clamp(Duration::from_secs(1), RETRY)).await;
                    }
                }
            }
        }
    }

    async fn renew(&mut self, client: &kube::Client, node: &str) -> anyhow::Result<()> {
        let (who, issued) = ask(client, node)
            .await
            .context("asking for a new node client certificate")?;
        let credentials = Credentials {
            ca_pem: self.stored.credentials.ca_pem.clone(),
            cert_pem: issued.cert_pem.clone(),
            key_pem: issued.key_pem.clone(),
        };
        // Kept first: a restart from here on starts with the new one.
        crate::kubeconfig::write(&self.path, &self.stored.server, &who, Some(&credentials))?;
        self.slot.replace(&issued)?;
        self.stored.credentials = credentials;
        let closed = self.rotation.rotate();
        tracing::info!(
            node,
            connections_closed = closed,
            "renewed the node's client certificate"
        );
        Ok(())
    }
}

/// Asks through `client` for a client certificate of node `node` (a new
/// key, a `kubernetes.io/kube-apiserver-client-kubelet` request, which the
/// server signs at once for a join-token holder or the node itself): the
/// node's user name, and the certificate with its key.
pub async fn ask(
    client: &kube::Client,
    node: &str,
) -> anyhow::Result<(String, wasmkube_pki::Issued)> {
    let who = wasmkube_pki::Identity::new(&format!("system:node:{node}"), &["system:nodes"]);
    let (request, key_pem) = wasmkube_pki::new_csr(&who)?;
    let csr = serde_json::from_value(serde_json::json!({
        "apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
        "metadata": {"generateName": format!("node-csr-{node}-")},
        "spec": {
            "request": base64::engine::general_purpose::STANDARD.encode(&request),
            "signerName": "kubernetes.io/kube-apiserver-client-kubelet",
            "usages": ["digital signature", "client auth"],
        },
    }))?;
    let csrs: kube::Api<k8s_openapi::api::certificates::v1::CertificateSigningRequest> =
        kube::Api::all(client.clone());
    let created = csrs.create(&Default::default(), &csr).await?;
    let Some(cert) = created.status.and_then(|s| s.certificate) else {
        anyhow::bail!(
            "the server did not sign this node's certificate request; it waits for an approver (kubectl certificate approve)"
        );
    };
    let cert_pem = String::from_utf8(cert.0).context("the signed certificate is not PEM")?;
    Ok((who.user, wasmkube_pki::Issued { cert_pem, key_pem }))
}

/// What a joined node's kubeconfig holds.
struct Stored {
    server: String,
    credentials: Credentials,
}

impl Stored {
    fn read(path: &Path) -> anyhow::Result<Self> {
        use secrecy::ExposeSecret;
        let kc = kube::config::Kubeconfig::read_from(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let cluster = kc
            .clusters
            .first()
            .and_then(|c| c.cluster.as_ref())
            .context("the node's kubeconfig names no cluster")?;
        let user = kc
            .auth_infos
            .first()
            .and_then(|u| u.auth_info.as_ref())
            .context("the node's kubeconfig names no user")?;
        let decode = |what: &str, b64: Option<&str>| -> anyhow::Result<String> {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64.with_context(|| format!("the node's kubeconfig has no {what}"))?)
                .with_context(|| format!("the node's kubeconfig's {what} is not base64"))?;
            String::from_utf8(bytes)
                .with_context(|| format!("the node's kubeconfig's {what} is not PEM"))
        };
        Ok(Self {
            server: cluster
                .server
                .clone()
                .context("the node's kubeconfig names no server")?,
            credentials: Credentials {
                ca_pem: decode(
                    "certificate-authority-data",
                    cluster.certificate_authority_data.as_deref(),
                )?,
                cert_pem: decode(
                    "client-certificate-data",
                    user.client_certificate_data.as_deref(),
                )?,
                key_pem: decode(
                    "client-key-data",
                    user.client_key_data.as_ref().map(|k| k.expose_secret()),
                )?,
            },
        })
    }

    fn issued(&self) -> wasmkube_pki::Issued {
        wasmkube_pki::Issued {
            cert_pem: self.credentials.cert_pem.clone(),
            key_pem: self.credentials.key_pem.clone(),
        }
    }
}

/// The certificate's generation, and the connections that wait to hear of
/// a new one.
#[derive(Default)]
struct Rotation {
    generation: AtomicU64,
    connections: Mutex<Vec<Weak<AtomicWaker>>>,
}

impl Rotation {
    /// A new connection's generation, and where it is woken on a rotation.
    fn join(&self) -> (u64, Arc<AtomicWaker>) {
        let waker = Arc::new(AtomicWaker::new());
        let mut connections = self.connections.lock().expect("connections");
        connections.retain(|c| c.strong_count() > 0);
        connections.push(Arc::downgrade(&waker));
        (self.generation.load(Ordering::SeqCst), waker)
    }

    /// A new certificate: every connection made before ends. Returns how
    /// many were open.
    fn rotate(&self) -> usize {
        self.generation.fetch_add(1, Ordering::SeqCst);
        let connections = std::mem::take(&mut *self.connections.lock().expect("connections"));
        let live: Vec<_> = connections.iter().filter_map(Weak::upgrade).collect();
        for waker in &live {
            waker.wake();
        }
        live.len()
    }
}

/// TLS connections to the API servers presenting the current certificate.
#[derive(Clone)]
struct Connector {
    tcp: HttpConnector,
    tls: tokio_rustls::TlsConnector,
    rotation: Arc<Rotation>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower::Service<Uri> for Connector {
    type Response = Conn;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Conn, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        tower::Service::<Uri>::poll_ready(&mut self.tcp, cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let mut tcp = self.tcp.clone();
        let tls = self.tls.clone();
        let rotation = self.rotation.clone();
        Box::pin(async move {
            let host = uri.host().ok_or("the server's URL names no host")?;
            let name = rustls::pki_types::ServerName::try_from(
                host.trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_owned(),
            )?;
            // Joined before the handshake: a rotation during it ends it too.
            let (generation, waker) = rotation.join();
            let tcp = tower::Service::call(&mut tcp, uri).await?;
            let stream = tls.connect(name, tcp.into_inner()).await?;
            Ok(Conn {
                io: TokioIo::new(stream),
                generation,
                waker,
                rotation,
            })
        })
    }
}

/// A connection to an API server that ends once the certificate it was
/// made with is replaced.
struct Conn {
    io: TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
    generation: u64,
    waker: Arc<AtomicWaker>,
    rotation: Arc<Rotation>,
}

impl Conn {
    fn stale(&self) -> bool {
        self.rotation.generation.load(Ordering::SeqCst) != self.generation
    }
}

impl hyper::rt::Read for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        this.waker.register(cx.waker());
        if this.stale() {
            // End of stream: the client drops the connection.
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if this.stale() {
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "the node's client certificate was renewed: this connection used the old one",
            )));
        }
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl Connection for Conn {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}
