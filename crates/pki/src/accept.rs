//! Accepting connections on the cluster's servers (the API server's and
//! the node agents' listeners): the next TCP connection, then the TLS
//! handshake, bounded in time, and who the client certificate it proved
//! names.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;

use crate::Identity;

/// How long a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The next connection on `listener` and where it comes from, with
/// `TCP_NODELAY` (watch streams write small frames, which Nagle's
/// algorithm would hold back for delayed ACKs, tens of ms). Failures to
/// accept (out of file descriptors and the like) are logged and retried:
/// a server keeps serving.
pub async fn next_connection(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok((socket, remote)) => {
                let _ = socket.set_nodelay(true);
                return (socket, remote);
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Completes the TLS handshake of `socket`, a connection from `remote`,
/// within [`HANDSHAKE_TIMEOUT`]: the stream, and the identity the client
/// certificate names when the client presented one (verified by the
/// acceptor's configuration). `None` when the handshake fails or times out
/// (logged at debug level: a port scan is not news).
pub async fn accept(
    acceptor: &tokio_rustls::TlsAcceptor,
    socket: TcpStream,
    remote: SocketAddr,
) -> Option<(TlsStream<TcpStream>, Option<Identity>)> {
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(socket)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            tracing::debug!(%remote, error = %e, "TLS handshake failed");
            return None;
        }
        Err(_) => {
            tracing::debug!(%remote, "TLS handshake timed out");
            return None;
        }
    };
    let who = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|leaf| crate::identity_of(leaf));
    Some((stream, who))
}
