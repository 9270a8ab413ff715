//! Accepting a TLS connection on a server: the handshake, bounded in time,
//! and who the client certificate it proved names (the API server's and
//! the node agents' listeners).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use crate::Identity;

/// How long a client may take to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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
