//! Requests from the API server to the webhooks it calls (the audit
//! backend, CustomResourceDefinition conversion): one JSON POST over
//! HTTP/1.1, in clear or over TLS, answered with its status and body.

use std::sync::Arc;
use std::time::Duration;

use axum::http::{StatusCode, header};
use bytes::Bytes;
use http_body_util::BodyExt;

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
