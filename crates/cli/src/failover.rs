//! Connecting to one of several API servers, moving to another when the
//! one in use stops answering (the connector under
//! [`crate::api_client`]): each new connection goes to the
//! server that last accepted one, and on a refused or timed-out connect to
//! the next in turn. A dead server's connections fail, the client's watches
//! (kube-runtime watchers) reconnect through this connector to a live server
//! and resume from the last resourceVersion they saw, which every server of
//! one cluster on one etcd hands out alike.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::connect::HttpConnector;

/// How long one connect attempt may take before the next server is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Connects to the first of `servers` that answers, starting with the one
/// that answered last.
#[derive(Clone, Debug)]
pub struct FailoverConnector<C = HttpConnector> {
    inner: C,
    servers: Arc<[http::uri::Authority]>,
    current: Arc<AtomicUsize>,
}

/// The TCP connector under the failover (and under TLS, when the servers
/// speak it).
pub(crate) fn tcp() -> HttpConnector {
    let mut inner = HttpConnector::new();
    inner.set_connect_timeout(Some(CONNECT_TIMEOUT));
    inner.set_nodelay(true);
    // A server that vanished without closing its connections (a machine
    // cut off) is noticed on idle watch connections too.
    inner.set_keepalive(Some(Duration::from_secs(10)));
    inner.enforce_http(false);
    inner
}

impl FailoverConnector {
    pub fn new(servers: Vec<http::uri::Authority>) -> Self {
        Self::over(tcp(), servers)
    }
}

impl<C> FailoverConnector<C> {
    /// Fails over between `servers`, connecting to each through `inner`
    /// (which sees the chosen server's URI, so TLS verifies that server's
    /// name).
    pub fn over(inner: C, servers: Vec<http::uri::Authority>) -> Self {
        Self {
            inner,
            servers: servers.into(),
            current: Arc::new(AtomicUsize::new(0)),
        }
    }
}

impl<C> tower::Service<Uri> for FailoverConnector<C>
where
    C: tower::Service<Uri> + Clone + Send + 'static,
    C::Future: Send,
    C::Error: std::fmt::Display + Send,
    C::Response: Send,
{
    type Response = C::Response;
    type Error = C::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let mut inner = self.inner.clone();
        let servers = self.servers.clone();
        let current = self.current.clone();
        Box::pin(async move {
            let first = current.load(Ordering::Relaxed);
            let mut last_error = None;
            for step in 0..servers.len() {
                let i = (first + step) % servers.len();
                let mut parts = uri.clone().into_parts();
                parts.authority = Some(servers[i].clone());
                let Ok(target) = Uri::from_parts(parts) else {
                    continue;
                };
                match tower::Service::call(&mut inner, target).await {
                    Ok(conn) => {
                        if i != first {
                            current.store(i, Ordering::Relaxed);
                            tracing::info!(server = %servers[i], "API server connection moved to another server");
                        }
                        return Ok(conn);
                    }
                    Err(e) => {
                        tracing::debug!(server = %servers[i], error = %e, "API server not reachable; trying the next");
                        last_error = Some(e);
                    }
                }
            }
            // Every server refused: report the last failure (the client
            // retries as it would with one server).
            match last_error {
                Some(e) => Err(e),
                None => tower::Service::call(&mut inner, uri).await,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connects_to_the_next_server_when_one_refuses_and_stays_there() {
        let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead = {
            // A port nothing listens on: bound, then closed.
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let live_addr = live.local_addr().unwrap();
        let mut c = FailoverConnector::new(vec![
            dead.to_string().parse().unwrap(),
            live_addr.to_string().parse().unwrap(),
        ]);
        let uri: Uri = format!("http://{dead}/api").parse().unwrap();
        let conn = tower::Service::call(&mut c, uri.clone()).await.unwrap();
        let (accepted, _) = live.accept().await.unwrap();
        assert_eq!(
            accepted.peer_addr().unwrap(),
            conn.inner().local_addr().unwrap()
        );
        // The next connection starts with the server that answered.
        assert_eq!(c.current.load(Ordering::Relaxed), 1);
        tower::Service::call(&mut c, uri).await.unwrap();
        live.accept().await.unwrap();
        // With none answering, the connect fails.
        drop(live);
        let mut none = FailoverConnector::new(vec![dead.to_string().parse().unwrap()]);
        let uri: Uri = format!("http://{dead}/").parse().unwrap();
        assert!(tower::Service::call(&mut none, uri).await.is_err());
    }
}
