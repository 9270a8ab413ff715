//! API errors and their rendering as Kubernetes `Status` bodies.
//!
//! Every failure a client can see goes through [`ApiError`], so each carries
//! the HTTP code, the `reason` clients branch on (`NotFound`, `AlreadyExists`,
//! `Conflict`, `Invalid`, `Expired`...) and, for validation, the causes naming
//! each field.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use wasmkube_api::field::FieldError;
use wasmkube_api::{ErrorChain, ResourceType};
use wasmkube_store::StoreError;

/// Who the error is about, for the `details` member.
#[derive(Clone, Debug, Default)]
pub struct Subject {
    pub group: String,
    pub kind: String,
    pub name: String,
}

impl Subject {
    pub fn of(rt: &ResourceType, name: &str) -> Self {
        Self {
            group: rt.group.to_owned(),
            kind: rt.plural.to_owned(),
            name: name.to_owned(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    BadRequest { message: String },
    #[error("{}", not_found_message(.0))]
    NotFound(Subject, String),
    #[error("{} \"{}\" already exists", .0.qualified(), .0.name)]
    AlreadyExists(Subject),
    #[error("Operation cannot be fulfilled on {} \"{}\": {}", .0.qualified(), .0.name, .1)]
    Conflict(Subject, String),
    #[error("{} \"{}\" is invalid: {}", .kind, .subject.name, render_causes(.causes))]
    Invalid {
        subject: Subject,
        /// The qualified kind, e.g. `Deployment.apps`.
        kind: String,
        causes: Vec<FieldError>,
    },
    #[error("{message}")]
    Forbidden { subject: Subject, message: String },
    #[error("{message}")]
    Gone {
        message: String,
        reason: &'static str,
    },
    #[error("the server does not allow this method on the requested resource")]
    MethodNotAllowed,
    /// A method the resource has, refused for now (a create of a custom
    /// resource while its definition is being deleted).
    #[error("{message}")]
    NotAllowedNow { message: String },
    #[error("the server could not find the requested resource")]
    NoRoute,
    #[error("the body of the request was too large; limit is {limit} bytes")]
    TooLarge { limit: usize },
    #[error("{message}")]
    UnsupportedMediaType { message: String },
    #[error("{message}")]
    NotAcceptable { message: String },
    #[error("Apply failed with {} conflict{}: {}", .causes.len(), if .causes.len() == 1 { "" } else { "s" }, render_conflicts(.causes))]
    ApplyConflict {
        subject: Subject,
        causes: Vec<FieldError>,
    },
    #[error("{message}")]
    Timeout { message: String },
    /// 429: try again later (an eviction a disruption budget refuses);
    /// `causes` are (reason, message) pairs.
    #[error("{message}")]
    TooManyRequests {
        message: String,
        causes: Vec<(String, String)>,
    },
    /// 401: the request's credentials name no one (or it had none and
    /// anonymous access may not do this).
    #[error("Unauthorized")]
    Unauthorized,
    #[error("Internal error occurred: {message}")]
    Internal { message: String },
    /// A refusal with a code and reason of its own (an admission
    /// webhook's).
    #[error("{message}")]
    Refused {
        code: u16,
        reason: String,
        message: String,
    },
}

impl Subject {
    fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.kind.clone()
        } else {
            format!("{}.{}", self.kind, self.group)
        }
    }
}

fn not_found_message(s: &Subject) -> String {
    if s.name.is_empty() {
        format!("{} not found", s.qualified())
    } else {
        format!("{} \"{}\" not found", s.qualified(), s.name)
    }
}

fn render_causes(causes: &[FieldError]) -> String {
    let rendered: Vec<String> = causes.iter().map(ToString::to_string).collect();
    if rendered.len() == 1 {
        rendered[0].clone()
    } else {
        format!("[{}]", rendered.join(", "))
    }
}

fn render_conflicts(causes: &[FieldError]) -> String {
    causes
        .iter()
        .map(|c| format!("{}: {}", c.detail, c.field))
        .collect::<Vec<_>>()
        .join("\n")
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::BadRequest {
            message: message.into(),
        }
    }

    pub fn internal(e: impl std::fmt::Display) -> Self {
        Self::Internal {
            message: e.to_string(),
        }
    }

    pub fn invalid(rt: &ResourceType, name: &str, causes: Vec<FieldError>) -> Self {
        Self::Invalid {
            subject: Subject::of(rt, name),
            kind: rt.qualified_kind(),
            causes,
        }
    }

    pub fn not_found(rt: &ResourceType, name: &str) -> Self {
        Self::NotFound(Subject::of(rt, name), String::new())
    }

    /// Maps a store failure on `rt`/`name`.
    pub fn from_store(e: StoreError, rt: &ResourceType, name: &str) -> Self {
        match e {
            StoreError::AlreadyExists { .. } => Self::AlreadyExists(Subject::of(rt, name)),
            StoreError::NotFound { .. } => Self::not_found(rt, name),
            StoreError::Conflict { .. } => Self::Conflict(
                Subject::of(rt, name),
                "the object has been modified; please apply your changes to the latest version and try again".into(),
            ),
            StoreError::Gone { requested, compacted } => Self::Gone {
                message: format!("too old resource version: {requested} ({compacted})"),
                reason: "Expired",
            },
            StoreError::FutureRevision { requested, current } => Self::Timeout {
                message: format!("Too large resource version: {requested}, current: {current}"),
            },
            other => Self::internal(format!("{:#}", ErrorChain(&other))),
        }
    }

    pub fn code(&self) -> StatusCode {
        match self {
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::NotFound(..) | Self::NoRoute => StatusCode::NOT_FOUND,
            Self::AlreadyExists(_) | Self::Conflict(..) | Self::ApplyConflict { .. } => {
                StatusCode::CONFLICT
            }
            Self::Invalid { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Forbidden { .. } => StatusCode::FORBIDDEN,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Gone { .. } => StatusCode::GONE,
            Self::MethodNotAllowed | Self::NotAllowedNow { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::NotAcceptable { .. } => StatusCode::NOT_ACCEPTABLE,
            Self::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Internal { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Refused { code, .. } => {
                StatusCode::from_u16(*code).unwrap_or(StatusCode::BAD_REQUEST)
            }
        }
    }

    pub fn reason(&self) -> &'static str {
        match self {
            Self::BadRequest { .. } => "BadRequest",
            Self::NotFound(..) | Self::NoRoute => "NotFound",
            Self::AlreadyExists(_) => "AlreadyExists",
            Self::Conflict(..) | Self::ApplyConflict { .. } => "Conflict",
            Self::Invalid { .. } => "Invalid",
            Self::Forbidden { .. } => "Forbidden",
            Self::Unauthorized => "Unauthorized",
            Self::Gone { reason, .. } => reason,
            Self::MethodNotAllowed | Self::NotAllowedNow { .. } => "MethodNotAllowed",
            Self::TooLarge { .. } => "RequestEntityTooLarge",
            Self::UnsupportedMediaType { .. } => "UnsupportedMediaType",
            Self::NotAcceptable { .. } => "NotAcceptable",
            Self::Timeout { .. } => "Timeout",
            Self::TooManyRequests { .. } => "TooManyRequests",
            Self::Internal { .. } => "InternalError",
            // Its own (see `status`).
            Self::Refused { .. } => "",
        }
    }

    /// The `Status` object for this error.
    pub fn status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.to_string(),
            "reason": self.reason(),
            "code": self.code().as_u16(),
        });
        let details = match self {
            Self::NotFound(s, _)
            | Self::AlreadyExists(s)
            | Self::Conflict(s, _)
            | Self::Forbidden { subject: s, .. } => {
                Some(json!({"name": s.name, "group": s.group, "kind": s.kind}))
            }
            Self::Invalid {
                subject, causes, ..
            }
            | Self::ApplyConflict { subject, causes } => Some(json!({
                "name": subject.name,
                "group": subject.group,
                "kind": if let Self::Invalid { kind, .. } = self { kind.split('.').next().unwrap_or_default().to_owned() } else { subject.kind.clone() },
                "causes": causes.iter().map(|c| json!({
                    "reason": if matches!(self, Self::ApplyConflict { .. }) { "FieldManagerConflict" } else { c.kind.reason() },
                    "message": if matches!(self, Self::ApplyConflict { .. }) { c.detail.clone() } else { c.message() },
                    "field": c.field,
                })).collect::<Vec<_>>(),
            })),
            Self::TooManyRequests { causes, .. } => Some(json!({
                "causes": causes.iter().map(|(reason, message)| json!({"reason": reason, "message": message})).collect::<Vec<_>>(),
            })),
            _ => None,
        };
        if let Some(d) = details {
            status["details"] = d;
        }
        if let Self::Refused { reason, .. } = self {
            status["reason"] = json!(reason);
        }
        status
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if matches!(self, Self::Internal { .. }) {
            tracing::error!(error = %self, "request failed");
        }
        let body = serde_json::to_vec(&self.status()).unwrap_or_default();
        let mut resp = (self.code(), body).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        resp
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
