//! Who may do what in the registry. The registry itself knows no users: a
//! [`Gate`] given by whoever serves it (`wasmkube server` passes the
//! cluster's authentication and RBAC) decides each request from its bearer
//! token. Clients send the token as a bearer token or as the password of
//! HTTP Basic authentication (`docker login`, `skopeo --creds`, `oras -p`),
//! the user name being ignored. With no gate, everyone may do everything.

use axum::http::{HeaderMap, header};
use base64::Engine;
use futures::future::BoxFuture;

/// What a request does to a repository.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Reading manifests, blobs, tags and referrers.
    Pull,
    /// Uploading blobs and putting manifests.
    Push,
    /// Deleting manifests and blobs.
    Delete,
    /// Listing the catalog of repositories.
    List,
}

impl Action {
    /// The Kubernetes verb for this action, as RBAC rules name it.
    pub fn verb(self) -> &'static str {
        match self {
            Self::Pull => "get",
            Self::Push => "create",
            Self::Delete => "delete",
            Self::List => "list",
        }
    }
}

/// Why a request was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No credential, or one that names no one: the client should log in.
    #[error("authentication required")]
    Unauthenticated,
    /// The credential's user may not do this.
    #[error("{0}")]
    Denied(String),
}

/// Decides requests. `access` is `None` for the API version check, which
/// only asks who the client is.
pub trait Gate: Send + Sync + 'static {
    fn check<'a>(
        &'a self,
        token: Option<&'a str>,
        access: Option<(&'a str, Action)>,
    ) -> BoxFuture<'a, Result<(), Refusal>>;
}

/// The token a request carries: `Authorization: Bearer TOKEN`, or the
/// password of `Authorization: Basic base64(USER:TOKEN)`.
pub(crate) fn token(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, rest) = value.split_once(' ')?;
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(rest.trim().to_owned()).filter(|t| !t.is_empty());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest.trim())
            .ok()?;
        let text = String::from_utf8(decoded).ok()?;
        let (_user, password) = text.split_once(':')?;
        return Some(password.to_owned()).filter(|t| !t.is_empty());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, value.parse().unwrap());
        h
    }

    #[test]
    fn tokens_come_from_bearer_and_basic_passwords() {
        assert_eq!(token(&with("Bearer abc")).as_deref(), Some("abc"));
        let basic = base64::engine::general_purpose::STANDARD.encode("anyone:t0k:en");
        assert_eq!(
            token(&with(&format!("Basic {basic}"))).as_deref(),
            Some("t0k:en")
        );
        let empty = base64::engine::general_purpose::STANDARD.encode("user:");
        assert_eq!(token(&with(&format!("Basic {empty}"))), None);
        assert_eq!(token(&with("Digest x")), None);
        assert_eq!(token(&HeaderMap::new()), None);
    }
}
