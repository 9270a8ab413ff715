//! The built-in registry under the cluster's authentication and RBAC (see
//! `wasmkube_api::images` for how repositories map to RBAC). The registry
//! asks [`ApiServer::registry_user`] who a token names and
//! [`ApiServer::registry_allows`] whether they may act; `GET
//! /registry/token` gives any authenticated client of the API server
//! (client certificates included, which an OCI client cannot present) a
//! short-lived token for the registry.

use std::sync::Arc;

use axum::Extension;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use wasmkube_api::images;

use super::{Attributes, ResourceAttributes, UserInfo};
use crate::ApiServer;
use crate::error::ApiError;

/// How long a token from `/registry/token` lasts.
const TOKEN_SECONDS: i64 = 3600;
/// The claim of a registry token naming its user.
const USER_CLAIM: &str = "wasmkube.dev/user";

impl ApiServer {
    /// Who a registry client's token names: a static token, a
    /// service-account token for the API server or for the registry
    /// audience, or a token from `/registry/token`. Anything else is 401.
    pub async fn registry_user(&self, token: &str) -> Result<UserInfo, ApiError> {
        let Some(auth) = &self.auth else {
            return Err(ApiError::Unauthorized);
        };
        if let Some(user) = auth.authentication.tokens.get(token) {
            return Ok(user.clone());
        }
        if token.matches('.').count() != 2 {
            return Err(ApiError::Unauthorized);
        }
        if let Some(signer) = &self.config.service_accounts
            && let Ok(claims) = signer.verify(token, super::token::ISSUER, &[images::AUDIENCE])
            && let Some(user) = claims.get(USER_CLAIM)
        {
            return serde_json::from_value(user.clone()).map_err(|_| ApiError::Unauthorized);
        }
        super::token::authenticate_for(self, token, &[super::token::ISSUER, images::AUDIENCE]).await
    }

    /// Whether `user` may `verb` (`get` pulls, `create` pushes, `delete`,
    /// `list` for the catalog) the repository, or why not.
    pub fn registry_allows(
        &self,
        user: &UserInfo,
        repository: &str,
        verb: &str,
    ) -> Result<(), String> {
        let Some(auth) = &self.auth else {
            return Ok(());
        };
        let (namespace, name) = images::split(repository);
        if namespace.is_none() && verb == "get" && !user.is_anonymous() {
            return Ok(());
        }
        let attrs = Attributes {
            user: user.clone(),
            verb: verb.to_owned(),
            path: format!("/v2/{repository}"),
            resource: Some(ResourceAttributes {
                group: images::GROUP.to_owned(),
                resource: images::RESOURCE.to_owned(),
                namespace: namespace.map(str::to_owned),
                name: (!name.is_empty()).then(|| name.to_owned()),
                ..Default::default()
            }),
        };
        if auth.allows(&attrs) {
            Ok(())
        } else {
            Err(attrs.forbidden_message())
        }
    }
}

/// `GET /registry/token`: a token for the registry naming the caller, in
/// the Docker token service's response format, with the registry it is
/// for (clients send it nowhere else).
pub(crate) async fn issue(
    State(server): State<Arc<ApiServer>>,
    user: Option<Extension<UserInfo>>,
) -> Response {
    let (Some(signer), Some(registry), Some(Extension(user))) = (
        &server.config.service_accounts,
        &server.config.registry,
        user,
    ) else {
        return ApiError::NoRoute.into_response();
    };
    if user.is_anonymous() {
        return ApiError::Unauthorized.into_response();
    }
    let now = chrono::Utc::now();
    let claims = json!({
        "iss": super::token::ISSUER,
        "sub": user.name,
        "aud": [images::AUDIENCE],
        "iat": now.timestamp(),
        "nbf": now.timestamp(),
        "exp": now.timestamp() + TOKEN_SECONDS,
        "jti": uuid::Uuid::new_v4().to_string(),
        USER_CLAIM: user,
    });
    match signer.sign(&claims) {
        Ok(token) => axum::Json(json!({
            "token": token,
            "access_token": token,
            "expires_in": TOKEN_SECONDS,
            "issued_at": now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            "registry": registry,
        }))
        .into_response(),
        Err(e) => ApiError::internal(e).into_response(),
    }
}
