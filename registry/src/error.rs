//! The registry's errors, answered in the distribution specification's JSON
//! error format (`{"errors": [{"code", "message", "detail"}]}`).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// A request the registry refused or could not serve.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("blob unknown to registry: {0}")]
    BlobUnknown(String),
    #[error("blob upload unknown to registry")]
    BlobUploadUnknown,
    #[error("blob upload invalid: {0}")]
    BlobUploadInvalid(String),
    /// A chunk that does not start where the upload ends.
    #[error("the chunk starts at {start} but the upload has {size} bytes")]
    RangeInvalid { start: u64, size: u64 },
    /// A ranged read outside the blob.
    #[error("range not satisfiable for a blob of {size} bytes")]
    RangeNotSatisfiable { size: u64 },
    #[error("provided digest did not match uploaded content: {0}")]
    DigestInvalid(String),
    #[error("manifest references an unknown blob or manifest: {0}")]
    ManifestBlobUnknown(String),
    #[error("manifest invalid: {0}")]
    ManifestInvalid(String),
    #[error("manifest is larger than the registry's limit of {limit} bytes")]
    ManifestTooLarge { limit: usize },
    #[error("manifest unknown: {0}")]
    ManifestUnknown(String),
    #[error("invalid repository name: {0:?}")]
    NameInvalid(String),
    #[error("repository name not known to registry: {0}")]
    NameUnknown(String),
    #[error("invalid tag: {0:?}")]
    TagInvalid(String),
    #[error("the operation is unsupported: {0}")]
    Unsupported(String),
    /// No credential, or one that names no one.
    #[error("authentication required")]
    Unauthorized,
    /// The client's user may not do this.
    #[error("requested access to the resource is denied: {0}")]
    Denied(String),
    #[error("storage: {0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// The specification's error code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::BlobUnknown(_) => "BLOB_UNKNOWN",
            Self::BlobUploadUnknown => "BLOB_UPLOAD_UNKNOWN",
            Self::BlobUploadInvalid(_) | Self::RangeInvalid { .. } => "BLOB_UPLOAD_INVALID",
            Self::RangeNotSatisfiable { .. } => "RANGE_INVALID",
            Self::DigestInvalid(_) => "DIGEST_INVALID",
            Self::ManifestBlobUnknown(_) => "MANIFEST_BLOB_UNKNOWN",
            Self::ManifestInvalid(_) | Self::ManifestTooLarge { .. } => "MANIFEST_INVALID",
            Self::ManifestUnknown(_) => "MANIFEST_UNKNOWN",
            Self::NameInvalid(_) => "NAME_INVALID",
            Self::NameUnknown(_) => "NAME_UNKNOWN",
            Self::TagInvalid(_) => "TAG_INVALID",
            Self::Unsupported(_) => "UNSUPPORTED",
            Self::Unauthorized => "UNAUTHORIZED",
            Self::Denied(_) => "DENIED",
            Self::Io(_) => "UNKNOWN",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::BlobUnknown(_)
            | Self::BlobUploadUnknown
            | Self::ManifestUnknown(_)
            | Self::NameUnknown(_) => StatusCode::NOT_FOUND,
            Self::RangeInvalid { .. } | Self::RangeNotSatisfiable { .. } => {
                StatusCode::RANGE_NOT_SATISFIABLE
            }
            Self::ManifestTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Unsupported(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Denied(_) => StatusCode::FORBIDDEN,
            Self::Io(_) => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        if let Self::Io(e) = &self {
            tracing::error!(error = %e, "registry storage failed");
        }
        let body = serde_json::json!({"errors": [{
            "code": self.code(),
            "message": self.to_string(),
            "detail": serde_json::Value::Null,
        }]});
        let mut response = (self.status(), axum::Json(body)).into_response();
        let headers = response.headers_mut();
        match self {
            Self::RangeInvalid { size, .. } => {
                // Where the client should resume.
                let end = size.saturating_sub(1);
                if let Ok(v) = HeaderValue::try_from(format!("0-{end}")) {
                    headers.insert(header::RANGE, v);
                }
            }
            Self::RangeNotSatisfiable { size } => {
                if let Ok(v) = HeaderValue::try_from(format!("bytes */{size}")) {
                    headers.insert(header::CONTENT_RANGE, v);
                }
            }
            Self::Unauthorized => {
                // Clients log in with HTTP Basic: any user name, a cluster
                // token as the password.
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Basic realm=\"wasmkube registry\""),
                );
            }
            _ => {}
        }
        response
    }
}
