//! The cluster's identity shared through the store: API servers given the
//! same cluster secret (`wasmkube server --token`) on one store serve with
//! one CA and accept one join token. The first to start keeps its CA there,
//! sealed with a key derived from the secret (as k3s keeps its bootstrap
//! data encrypted with its token); the others read it back. A server with
//! another secret cannot open it and refuses to start.

use bytes::Bytes;
use wasmkube_store::{SharedStore, StoreError};

/// Where the sealed identity is kept.
pub const IDENTITY_KEY: &str = "/wasmkube/identity";

/// Why the shared identity could not be had.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "the store holds the identity of a cluster started with another --token: give this server the token the first server was started with"
    )]
    WrongSecret,
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

/// The identity kept in `store` for `secret`, or, when there is none yet,
/// `local` (this server's own), which is then kept there for the others.
pub async fn shared_identity(
    store: &SharedStore,
    secret: &str,
    local: &[u8],
) -> Result<Vec<u8>, IdentityError> {
    loop {
        if let Some(kv) = store.get(IDENTITY_KEY).await? {
            return wasmkube_pki::unseal(secret, &kv.value).map_err(|_| IdentityError::WrongSecret);
        }
        let sealed = Bytes::from(wasmkube_pki::seal(secret, local));
        match store.create(IDENTITY_KEY, sealed).await {
            Ok(_) => return Ok(local.to_vec()),
            // Another server kept its own first: take that one.
            Err(StoreError::AlreadyExists { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}
