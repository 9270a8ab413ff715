//! The client the cluster's own components (node agents, the scheduler,
//! the controller manager, the server's loopback client) talk to the API
//! server with: kube's middleware (base URI, authentication, retries of
//! throttled requests, extra headers) over a hyper client that speaks
//! HTTP/2 only, as every API server of the cluster does (ALPN `h2` over
//! TLS, prior knowledge over plain HTTP with `--insecure-http`). One
//! connection per server carries all of a component's requests and
//! watches: a burst of a node's pods leaves one connection behind, not one
//! per request that was in flight, and concurrent first requests wait for
//! the one connection being made instead of each opening its own (as a
//! client that learns the protocol from each new connection's ALPN does:
//! the TLS test below caught that). Connections go
//! through [`FailoverConnector`], so a client given several servers moves
//! to another when one stops answering.

use std::time::Duration;

use http::Uri;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use kube::client::ConfigExt;

use crate::failover::{FailoverConnector, tcp};

/// How long an HTTP/2 connection may be silent before the client pings the
/// server (client-go's `ReadIdleTimeout`), and how long the answer may
/// take before the connection is given up (its `PingTimeout`): a server
/// that vanished without closing the connection (a machine cut off) is
/// noticed within 45 s, and every watch on the connection reconnects.
const PING_AFTER: Duration = Duration::from_secs(30);
const PING_TIMEOUT: Duration = Duration::from_secs(15);

/// A client for `config` that connects to the first of `servers` that
/// answers (URLs of one cluster's API servers, all with one scheme), or to
/// `config.cluster_url` when none are given.
pub fn client(config: kube::Config, servers: &[Uri]) -> anyhow::Result<kube::Client> {
    let servers = match servers {
        [] => std::slice::from_ref(&config.cluster_url),
        servers => servers,
    };
    let mut authorities = Vec::new();
    let scheme = servers.first().and_then(|s| s.scheme().cloned());
    for s in servers {
        if s.scheme() != scheme.as_ref() {
            anyhow::bail!("every --server URL must use the same scheme (got {s})");
        }
        let authority = s
            .authority()
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("--server {s} names no host"))?;
        authorities.push(authority);
    }
    if scheme == Some(http::uri::Scheme::HTTPS) {
        let mut tls = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(config.rustls_client_config()?)
            .https_only();
        if let Some(name) = &config.tls_server_name {
            tls = tls.with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(
                name.clone().try_into()?,
            ));
        }
        let tls = tls.enable_http2().wrap_connector(tcp());
        build(config, FailoverConnector::over(tls, authorities))
    } else {
        build(config, FailoverConnector::new(authorities))
    }
}

/// A client for `config` whose connections `connector` makes (over TLS,
/// offering only `h2` by ALPN).
pub(crate) fn build<C>(
    config: kube::Config,
    connector: FailoverConnector<C>,
) -> anyhow::Result<kube::Client>
where
    FailoverConnector<C>: tower::Service<Uri> + Clone + Send + Sync + 'static,
    <FailoverConnector<C> as tower::Service<Uri>>::Response:
        hyper::rt::Read
            + hyper::rt::Write
            + hyper_util::client::legacy::connect::Connection
            + Unpin
            + Send,
    <FailoverConnector<C> as tower::Service<Uri>>::Future: Send + Unpin,
    <FailoverConnector<C> as tower::Service<Uri>>::Error:
        Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let http: hyper_util::client::legacy::Client<_, kube::client::Body> =
        hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            // Without a pool timer, idle connections past their timeout
            // are only noticed when the pool is next asked for one.
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .http2_only(true)
            .http2_keep_alive_interval(PING_AFTER)
            .http2_keep_alive_timeout(PING_TIMEOUT)
            .http2_keep_alive_while_idle(true)
            .build(connector);
    let retry = config
        .default_retry
        .then(|| tower::retry::RetryLayer::new(kube::client::retry::RetryPolicy::server_retry()));
    let service = tower::ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(retry)
        .option_layer(config.auth_layer()?)
        .layer(config.extra_headers_layer()?)
        .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
        .service(http);
    Ok(kube::Client::new(service, config.default_namespace))
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use hyper_util::rt::TokioIo;
    use tokio::sync::Barrier;

    /// How many requests the tests keep in flight at once.
    const IN_FLIGHT: usize = 20;

    /// What a test server saw: how many connections it accepted and the
    /// HTTP version of each request.
    #[derive(Default)]
    struct Seen {
        connections: usize,
        versions: Vec<http::Version>,
    }

    /// A server on loopback (over TLS with `tls`) whose responses wait
    /// until `IN_FLIGHT` requests have arrived, so the client must have
    /// them all in flight at once; HTTP/1.1 or HTTP/2, as the API server.
    async fn server(
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> (std::net::SocketAddr, Arc<Mutex<Seen>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let barrier = Arc::new(Barrier::new(IN_FLIGHT));
        let recorded = seen.clone();
        tokio::spawn(async move {
            loop {
                let (socket, _) = listener.accept().await.unwrap();
                recorded.lock().unwrap().connections += 1;
                let (seen, barrier, tls) = (recorded.clone(), barrier.clone(), tls.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: http::Request<_>| {
                        let (seen, barrier) = (seen.clone(), barrier.clone());
                        async move {
                            let _: &hyper::body::Incoming = req.body();
                            seen.lock().unwrap().versions.push(req.version());
                            barrier.wait().await;
                            Ok::<_, std::convert::Infallible>(http::Response::new(
                                http_body_util::Full::new(bytes::Bytes::from_static(b"{}")),
                            ))
                        }
                    });
                    let builder = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    );
                    match tls {
                        Some(tls) => {
                            let stream = tokio_rustls::TlsAcceptor::from(tls)
                                .accept(socket)
                                .await
                                .unwrap();
                            let _ = builder
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        }
                        None => {
                            let _ = builder
                                .serve_connection(TokioIo::new(socket), service)
                                .await;
                        }
                    }
                });
            }
        });
        (addr, seen)
    }

    async fn in_flight_at_once(client: &kube::Client) {
        let requests = (0..IN_FLIGHT).map(|i| {
            let request = http::Request::get(format!("/version?n={i}"))
                .body(Vec::new())
                .unwrap();
            client.request_text(request)
        });
        for answer in futures::future::join_all(requests).await {
            assert_eq!(answer.unwrap(), "{}");
        }
    }

    #[tokio::test]
    async fn requests_in_flight_share_one_http2_connection_over_plain_http() {
        let (addr, seen) = server(None).await;
        let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
        let client = super::client(config, &[]).unwrap();
        in_flight_at_once(&client).await;
        let seen = seen.lock().unwrap();
        assert_eq!(seen.connections, 1);
        assert_eq!(seen.versions, vec![http::Version::HTTP_2; IN_FLIGHT]);
    }

    #[tokio::test]
    async fn requests_in_flight_share_one_http2_connection_over_tls() {
        let ca = wasmkube_pki::Ca::create("test").unwrap();
        let serving = ca
            .issue_serving(
                "api",
                &wasmkube_pki::ServingNames {
                    ips: vec![std::net::Ipv4Addr::LOCALHOST.into()],
                    ..Default::default()
                },
            )
            .unwrap();
        let (addr, seen) = server(Some(ca.server_tls(&serving).unwrap())).await;
        let who = wasmkube_pki::Identity::new("system:node:n1", &["system:nodes"]);
        let client_cert = ca
            .issue_client(&who, std::time::Duration::from_secs(3600))
            .unwrap();
        let credentials = crate::kubeconfig::Credentials {
            ca_pem: ca.cert_pem().to_owned(),
            cert_pem: client_cert.cert_pem,
            key_pem: client_cert.key_pem,
        };
        let client = crate::kubeconfig::client_with(
            &format!("https://{addr}"),
            &who.user,
            Some(&credentials),
        )
        .await
        .unwrap();
        in_flight_at_once(&client).await;
        let seen = seen.lock().unwrap();
        assert_eq!(seen.connections, 1);
        assert_eq!(seen.versions, vec![http::Version::HTTP_2; IN_FLIGHT]);
    }
}
