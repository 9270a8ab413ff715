//! Query parameters and content negotiation of resource requests.

use axum::http::{HeaderMap, header};
use wasmkube_api::ResourceType;
use wasmkube_api::selectors::{FieldSelector, LabelSelector};

use crate::error::{ApiError, ApiResult};

/// How unknown fields in a body are treated (`fieldValidation`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldValidation {
    Strict,
    Warn,
    Ignore,
}

/// The query parameters Kubernetes clients send.
#[derive(Debug, Default)]
pub struct Params {
    pub watch: bool,
    pub resource_version: Option<String>,
    pub resource_version_match: Option<String>,
    pub label_selector: Option<String>,
    pub field_selector: Option<String>,
    pub limit: usize,
    pub continue_token: Option<String>,
    pub timeout_seconds: Option<u64>,
    pub allow_watch_bookmarks: bool,
    pub send_initial_events: Option<bool>,
    pub field_validation: Option<FieldValidation>,
    pub field_manager: Option<String>,
    pub force: bool,
    pub dry_run: bool,
    pub grace_period_seconds: Option<i64>,
    pub propagation_policy: Option<String>,
}

fn boolean(v: &str) -> bool {
    matches!(v, "true" | "1" | "True")
}

impl Params {
    pub fn parse(query: Option<&str>) -> ApiResult<Self> {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query.unwrap_or_default())
            .map_err(|e| ApiError::bad_request(format!("invalid query string: {e}")))?;
        let mut p = Params::default();
        let number = |k: &str, v: &str| -> ApiResult<i64> {
            v.parse().map_err(|_| {
                ApiError::bad_request(format!("invalid value for {k}: {v:?} is not an integer"))
            })
        };
        for (k, v) in pairs {
            match k.as_str() {
                "watch" => p.watch = boolean(&v),
                "resourceVersion" => p.resource_version = Some(v).filter(|s| !s.is_empty()),
                "resourceVersionMatch" => {
                    p.resource_version_match = Some(v).filter(|s| !s.is_empty())
                }
                "labelSelector" => p.label_selector = Some(v),
                "fieldSelector" => p.field_selector = Some(v),
                "limit" => p.limit = number(&k, &v)?.max(0) as usize,
                "continue" => p.continue_token = Some(v).filter(|s| !s.is_empty()),
                "timeoutSeconds" => p.timeout_seconds = Some(number(&k, &v)?.max(0) as u64),
                "allowWatchBookmarks" => p.allow_watch_bookmarks = boolean(&v),
                "sendInitialEvents" => p.send_initial_events = Some(boolean(&v)),
                "fieldValidation" => {
                    p.field_validation = Some(match v.as_str() {
                        "Strict" => FieldValidation::Strict,
                        "Warn" => FieldValidation::Warn,
                        "Ignore" => FieldValidation::Ignore,
                        other => {
                            return Err(ApiError::bad_request(format!(
                                "fieldValidation must be one of Strict, Warn or Ignore, not {other:?}"
                            )));
                        }
                    })
                }
                "fieldManager" => p.field_manager = Some(v),
                "force" => p.force = boolean(&v),
                "dryRun" => {
                    if v != "All" {
                        return Err(ApiError::bad_request(format!(
                            "dryRun must be \"All\", not {v:?}"
                        )));
                    }
                    p.dry_run = true;
                }
                "gracePeriodSeconds" => p.grace_period_seconds = Some(number(&k, &v)?),
                "propagationPolicy" => p.propagation_policy = Some(v),
                _ => {}
            }
        }
        Ok(p)
    }

    pub fn labels(&self) -> ApiResult<LabelSelector> {
        LabelSelector::parse(self.label_selector.as_deref().unwrap_or_default())
            .map_err(|e| ApiError::bad_request(format!("unable to parse requirement: {e}")))
    }

    pub fn fields(&self, rt: &ResourceType) -> ApiResult<FieldSelector> {
        FieldSelector::parse(rt, self.field_selector.as_deref().unwrap_or_default())
            .map_err(ApiError::bad_request)
    }

    /// The manager for field ownership: `fieldManager`, or the user agent's
    /// program name as Kubernetes derives it.
    pub fn manager(&self, headers: &HeaderMap) -> ApiResult<String> {
        if let Some(m) = &self.field_manager {
            if m.len() > 128 || m.chars().any(|c| c.is_control()) {
                return Err(ApiError::bad_request(
                    "fieldManager must be at most 128 printable characters",
                ));
            }
            return Ok(m.clone());
        }
        let ua = headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("unknown");
        Ok(ua
            .split('/')
            .next()
            .unwrap_or("unknown")
            .chars()
            .take(128)
            .collect())
    }
}

/// The representation a client asked for in `Accept`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Object,
    Table,
    PartialMetadata,
}

impl Output {
    pub fn from_headers(headers: &HeaderMap) -> Self {
        let accept = headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if accept.contains("as=Table") {
            Output::Table
        } else if accept.contains("as=PartialObjectMetadata") {
            Output::PartialMetadata
        } else {
            Output::Object
        }
    }
}
