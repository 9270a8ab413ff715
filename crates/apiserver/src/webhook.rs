//! Requests from the API server to the webhooks it calls (the audit
//! backend, CustomResourceDefinition conversion, admission): one JSON POST
//! over HTTP/1.1, in clear or over TLS, answered with its status and body;
//! and where a webhook's `clientConfig` (a URL or a Service) is reached.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use axum::http::{StatusCode, header};
use bytes::Bytes;
use http_body_util::BodyExt;
use wasmkube_api::webhooks::{WebhookClient, WebhookEndpoint};

use crate::ApiServer;
use crate::storage::decode_stored;

/// Where a webhook is reached.
#[derive(Clone)]
pub(crate) struct Endpoint {
    /// The address dialled.
    pub host: String,
    pub port: u16,
    /// The name the server's certificate must carry (TLS only).
    pub server_name: String,
    /// The request's path and query.
    pub path: String,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// A bearer token to send.
    pub token: Option<String>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        write!(
            f,
            "{scheme}://{}:{}{}",
            self.server_name, self.port, self.path
        )
    }
}

impl Endpoint {
    /// The endpoint a URL names; `tls` is required for `https`.
    pub fn from_uri(
        uri: &axum::http::Uri,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<Self, String> {
        let host = uri
            .host()
            .ok_or("the URL has no host")?
            .trim_matches(|c| c == '[' || c == ']')
            .to_owned();
        let secure = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            other => return Err(format!("URL scheme {other:?}: want http or https")),
        };
        if secure && tls.is_none() {
            return Err("an https URL needs TLS settings".into());
        }
        Ok(Self {
            port: uri.port_u16().unwrap_or(if secure { 443 } else { 80 }),
            server_name: host.clone(),
            host,
            path: uri
                .path_and_query()
                .map(|p| p.as_str().to_owned())
                .unwrap_or_else(|| "/".into()),
            tls: if secure { tls } else { None },
            token: None,
        })
    }

    /// POSTs `body` as JSON; the whole exchange is bounded by `timeout`.
    pub async fn post_json(
        &self,
        body: Bytes,
        timeout: Duration,
    ) -> Result<(StatusCode, Bytes), String> {
        tokio::time::timeout(timeout, self.exchange(body))
            .await
            .map_err(|_| format!("no answer within {timeout:?}"))?
    }

    async fn exchange(&self, body: Bytes) -> Result<(StatusCode, Bytes), String> {
        let stream = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| e.to_string())?;
        let _ = stream.set_nodelay(true);
        let authority = match self.host.contains(':') {
            true => format!("[{}]:{}", self.server_name, self.port),
            false => format!("{}:{}", self.server_name, self.port),
        };
        let mut request = axum::http::Request::post(&self.path)
            .header(header::HOST, authority)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ACCEPT, "application/json");
        if let Some(token) = &self.token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = request
            .body(http_body_util::Full::new(body))
            .map_err(|e| e.to_string())?;
        match &self.tls {
            Some(tls) => {
                let name = rustls::pki_types::ServerName::try_from(self.server_name.clone())
                    .map_err(|e| e.to_string())?;
                let stream = tokio_rustls::TlsConnector::from(tls.clone())
                    .connect(name, stream)
                    .await
                    .map_err(|e| format!("TLS: {e}"))?;
                send(stream, request).await
            }
            None => send(stream, request).await,
        }
    }
}

async fn send<S>(
    io: S,
    request: axum::http::Request<http_body_util::Full<Bytes>>,
) -> Result<(StatusCode, Bytes), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, body))
}

/// Where a webhook's `clientConfig` points: the URL, or a ready endpoint
/// of the Service (dialled directly, its certificate checked for
/// `NAME.NAMESPACE.svc`, as kube-apiserver does with endpoint routing).
pub(crate) async fn resolve(
    server: &ApiServer,
    client: &WebhookClient,
) -> Result<Endpoint, String> {
    let tls = tls(&client.ca_bundle)?;
    match &client.endpoint {
        WebhookEndpoint::Url(url) => {
            let uri: axum::http::Uri = url.parse().map_err(|e| format!("URL {url:?}: {e}"))?;
            Endpoint::from_uri(&uri, Some(tls))
        }
        WebhookEndpoint::Service {
            namespace,
            name,
            port,
            path,
        } => {
            let (host, target) = service_endpoint(server, namespace, name, *port).await?;
            Ok(Endpoint {
                host,
                port: target,
                server_name: format!("{name}.{namespace}.svc"),
                path: path.clone(),
                tls: Some(tls),
                token: None,
            })
        }
    }
}

/// A ready address of Service `namespace/name` and the port its `port`
/// reaches there.
async fn service_endpoint(
    server: &ApiServer,
    namespace: &str,
    name: &str,
    port: u16,
) -> Result<(String, u16), String> {
    let services = wasmkube_api::registry::lookup("", "v1", "services").expect("services served");
    let slices = wasmkube_api::registry::lookup("discovery.k8s.io", "v1", "endpointslices")
        .expect("endpointslices served");
    let what = format!("service \"{namespace}/{name}\"");
    let service = server
        .store
        .get(&services.key(Some(namespace), name))
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("{what} not found"))?;
    let service = decode_stored(&service).map_err(|e| e.to_string())?;
    let service_port = service["spec"]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["port"].as_u64() == Some(u64::from(port)))
        .ok_or_else(|| format!("{what} has no port {port}"))?;
    let port_name = service_port["name"].as_str().unwrap_or_default();
    let page = server
        .store
        .list(
            &slices.list_prefix(Some(namespace)),
            wasmkube_store::ListOptions::default(),
        )
        .await
        .map_err(|e| e.to_string())?;
    for kv in &page.items {
        let Ok(slice) = decode_stored(kv) else {
            continue;
        };
        if slice["metadata"]["labels"]["kubernetes.io/service-name"] != name {
            continue;
        }
        let Some(target) = slice["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"].as_str().unwrap_or_default() == port_name)
            .and_then(|p| p["port"].as_u64())
            .and_then(|p| u16::try_from(p).ok())
        else {
            continue;
        };
        let ready = slice["endpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["conditions"]["ready"] != false)
            .find_map(|e| e["addresses"][0].as_str());
        if let Some(address) = ready {
            return Ok((address.to_owned(), target));
        }
    }
    Err(format!("{what} has no ready endpoint"))
}

/// TLS settings trusting `ca_bundle` (PEM), or the system's roots when it
/// is empty; made once per bundle.
fn tls(ca_bundle: &[u8]) -> Result<Arc<rustls::ClientConfig>, String> {
    static MADE: LazyLock<Mutex<HashMap<Vec<u8>, Arc<rustls::ClientConfig>>>> =
        LazyLock::new(Default::default);
    if let Some(made) = MADE.lock().expect("tls cache").get(ca_bundle) {
        return Ok(made.clone());
    }
    let config = if ca_bundle.is_empty() {
        wasmkube_pki::client_tls_system_roots(None).map_err(|e| e.to_string())?
    } else {
        let pem = std::str::from_utf8(ca_bundle).map_err(|_| "caBundle is not PEM text")?;
        wasmkube_pki::client_tls(pem, None).map_err(|e| format!("caBundle: {e}"))?
    };
    MADE.lock()
        .expect("tls cache")
        .insert(ca_bundle.to_vec(), config.clone());
    Ok(config)
}
