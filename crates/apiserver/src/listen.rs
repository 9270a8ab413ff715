//! Serving the API on a listener, plain or over TLS: each connection runs
//! in its own task (a slow handshake holds up no one), its remote address
//! and, over TLS, the client certificate it proved are attached to every
//! request of the connection (as [`RemoteAddr`] and [`Peer`]), and
//! HTTP/1.1 (with upgrades, for exec) or HTTP/2 is served as the client
//! chose: by ALPN over TLS, by the connection preface on plain TCP (HTTP/2
//! with prior knowledge). The cluster's own components talk HTTP/2, so
//! each keeps one connection however many requests it has in flight.

use std::sync::Arc;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tower::ServiceExt;

use crate::auth::{Peer, RemoteAddr};

/// How many requests one HTTP/2 connection may have in flight, as
/// kube-apiserver's `--http2-max-streams-per-connection` default: a node
/// agent's watches and a burst of its pods' requests share one connection.
const MAX_STREAMS_PER_CONNECTION: u32 = 1000;

/// Serves `router` on `listener` until the future is dropped: over TLS
/// when `tls` is given, plain TCP otherwise. Dropping it also ends its
/// connections once their requests in flight are answered (a restarted
/// server's clients reconnect to the new one, not to the old state).
pub(crate) async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    router: Router,
) -> std::io::Result<()> {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    // Closed when this future is dropped: the connections' signal to stop.
    let (stop, _serving) = tokio::sync::watch::channel(());
    loop {
        let (socket, remote) = wasmkube_pki::next_connection(&listener).await;
        let (acceptor, router, stop) = (acceptor.clone(), router.clone(), stop.clone());
        tokio::spawn(async move {
            let Some(acceptor) = acceptor else {
                return connection(socket, None, remote, router, stop).await;
            };
            let Some((stream, who)) = wasmkube_pki::accept(&acceptor, socket, remote).await else {
                return;
            };
            let peer = Peer(who);
            connection(stream, Some(peer), remote, router, stop).await
        });
    }
}

/// Serves one connection's requests until it ends, or until `stop` is
/// closed and the requests in flight are answered.
async fn connection<S>(
    stream: S,
    peer: Option<Peer>,
    remote: std::net::SocketAddr,
    router: Router,
    stop: tokio::sync::watch::Sender<()>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = router.map_request(
        move |mut req: axum::extract::Request<hyper::body::Incoming>| {
            if let Some(peer) = &peer {
                req.extensions_mut().insert(peer.clone());
            }
            req.extensions_mut().insert(RemoteAddr(remote));
            req
        },
    );
    let service = hyper_util::service::TowerToHyperService::new(service);
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http2()
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    let mut conn = std::pin::pin!(conn);
    let ended = tokio::select! {
        ended = conn.as_mut() => ended,
        () = stop.closed() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = ended {
        tracing::debug!(%remote, error = %e, "connection ended with an error");
    }
}
