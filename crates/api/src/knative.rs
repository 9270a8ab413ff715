//! Knative Serving (`serving.knative.dev/v1`) Service, Configuration,
//! Revision and Route, served as built-in kinds so manifests written for
//! Knative work unchanged.
//!
//! Field for field from Knative's v1 schemas; a Revision's spec is a PodSpec
//! with Knative's own fields beside it. The types implement
//! `k8s_openapi::Resource`, so kube-rs clients use them as they use the
//! built-in kinds.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::PodSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group.
pub const GROUP: &str = "serving.knative.dev";
/// The domain of `status.url` when the server names none (Knative's).
pub const DEFAULT_DOMAIN: &str = "example.com";

/// The annotation the activator stamps on a revision's Deployment when it
/// scales it up from zero for a held request; the autoscaler keeps such a
/// revision up for a whole window after.
pub const ACTIVATED_AT: &str = "serving.wasmkube.dev/activated-at";

/// Labels Knative puts on what it creates.
pub mod labels {
    pub const SERVICE: &str = "serving.knative.dev/service";
    pub const CONFIGURATION: &str = "serving.knative.dev/configuration";
    pub const CONFIGURATION_GENERATION: &str = "serving.knative.dev/configurationGeneration";
    pub const REVISION: &str = "serving.knative.dev/revision";
    pub const REVISION_UID: &str = "serving.knative.dev/revisionUID";
    pub const ROUTE: &str = "serving.knative.dev/route";
}

/// Autoscaling annotations (on a Revision's template).
pub mod autoscaling {
    pub const MIN_SCALE: &str = "autoscaling.knative.dev/min-scale";
    pub const MAX_SCALE: &str = "autoscaling.knative.dev/max-scale";
    pub const INITIAL_SCALE: &str = "autoscaling.knative.dev/initial-scale";
    pub const TARGET: &str = "autoscaling.knative.dev/target";
    pub const METRIC: &str = "autoscaling.knative.dev/metric";
    pub const WINDOW: &str = "autoscaling.knative.dev/window";
    pub const PANIC_WINDOW_PERCENTAGE: &str = "autoscaling.knative.dev/panic-window-percentage";
    pub const PANIC_THRESHOLD_PERCENTAGE: &str =
        "autoscaling.knative.dev/panic-threshold-percentage";
    pub const RETENTION: &str = "autoscaling.knative.dev/scale-to-zero-pod-retention-period";
}

crate::api_kind!(
    "serving.knative.dev/v1",
    spec(#[serde(default)]),
    /// A function: a Configuration (its template) and a Route (its traffic)
    /// managed together.
    Service,
    ServiceSpec,
    ServiceStatus,
    "services",
    k8s_openapi::NamespaceResourceScope,
    "dev.knative.serving.v1.Service"
);
crate::api_kind!(
    "serving.knative.dev/v1",
    spec(#[serde(default)]),
    /// The latest desired state of a function; every template change stamps
    /// out a new Revision.
    Configuration,
    ConfigurationSpec,
    ConfigurationStatus,
    "configurations",
    k8s_openapi::NamespaceResourceScope,
    "dev.knative.serving.v1.Configuration"
);
crate::api_kind!(
    "serving.knative.dev/v1",
    spec(#[serde(default)]),
    /// An immutable snapshot of a function's code and configuration.
    Revision,
    RevisionSpec,
    RevisionStatus,
    "revisions",
    k8s_openapi::NamespaceResourceScope,
    "dev.knative.serving.v1.Revision"
);
crate::api_kind!(
    "serving.knative.dev/v1",
    spec(#[serde(default)]),
    /// Named endpoints: traffic split between revisions by percent, and
    /// tagged addresses for single revisions.
    Route,
    RouteSpec,
    RouteStatus,
    "routes",
    k8s_openapi::NamespaceResourceScope,
    "dev.knative.serving.v1.Route"
);

/// A Revision's spec: a pod's, and Knative's fields beside it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RevisionSpec {
    #[serde(flatten)]
    pub pod: PodSpec,
    /// Requests one pod serves at once (0: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_concurrency: Option<i64>,
    /// The longest a request may take, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_start_timeout_seconds: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_seconds: Option<i64>,
}

/// The template a Configuration stamps Revisions from.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RevisionTemplateSpec {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: RevisionSpec,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConfigurationSpec {
    #[serde(default)]
    pub template: RevisionTemplateSpec,
}

/// Where a share of a Route's traffic goes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrafficTarget {
    /// A name of its own: `TAG-ROUTE.NAMESPACE.DOMAIN` reaches this target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub configuration_name: Option<String>,
    /// Follow the configuration's latest ready revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_revision: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<i64>,
    /// Status only: the tag's address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub traffic: Vec<TrafficTarget>,
}

/// A Service's spec: its Configuration's and its Route's.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    #[serde(default)]
    pub template: RevisionTemplateSpec,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub traffic: Vec<TrafficTarget>,
}

/// Knative's condition (`knative.dev/pkg/apis.Condition`): Kubernetes'
/// with a severity, and no observed generation of its own.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub severity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// An address (`status.address`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Addressable {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<Addressable>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_created_revision_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_ready_revision_name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub traffic: Vec<TrafficTarget>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConfigurationStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_created_revision_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_ready_revision_name: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RevisionStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actual_replicas: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_replicas: Option<i32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub container_statuses: Vec<ContainerStatus>,
}

/// A revision's container and the image digest it resolved to.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ContainerStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_digest: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<Addressable>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub traffic: Vec<TrafficTarget>,
}

/// The condition of `type_` in `conditions`, if set.
pub fn condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// The container port a revision serves on: its first container's first
/// port, or Knative's default 8080.
pub fn revision_port(spec: &RevisionSpec) -> i32 {
    spec.pod
        .containers
        .first()
        .and_then(|c| c.ports.as_ref())
        .and_then(|p| p.first())
        .map(|p| p.container_port)
        .unwrap_or(8080)
}

/// Annotation values parsed, with Knative's defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct Scaling {
    pub min: i32,
    /// 0: no bound.
    pub max: i32,
    pub initial: i32,
    /// Target in-flight requests (or requests per second) per pod.
    pub target: f64,
    pub rps: bool,
    pub window: std::time::Duration,
    pub panic_window_percentage: f64,
    pub panic_threshold_percentage: f64,
    pub retention: std::time::Duration,
}

impl Scaling {
    /// From a revision's annotations (Knative's defaults where absent:
    /// concurrency target 100, window 60 s, panic window 10 %, panic
    /// threshold 200 %, initial scale 1).
    pub fn from_annotations(a: &BTreeMap<String, String>, container_concurrency: i64) -> Self {
        let get = |k: &str| a.get(k).map(|v| v.trim());
        let int = |k: &str, d: i32| get(k).and_then(|v| v.parse().ok()).unwrap_or(d);
        let float = |k: &str, d: f64| get(k).and_then(|v| v.parse().ok()).unwrap_or(d);
        let rps = get(autoscaling::METRIC) == Some("rps");
        let default_target = if rps {
            200.0
        } else if container_concurrency > 0 {
            // Knative's target utilisation of a hard limit: 70 %.
            container_concurrency as f64 * 0.7
        } else {
            100.0
        };
        Self {
            min: int(autoscaling::MIN_SCALE, 0).max(0),
            max: int(autoscaling::MAX_SCALE, 0).max(0),
            initial: int(autoscaling::INITIAL_SCALE, 1).max(0),
            target: float(autoscaling::TARGET, default_target).max(0.01),
            rps,
            window: get(autoscaling::WINDOW)
                .and_then(parse_duration)
                .unwrap_or(std::time::Duration::from_secs(60)),
            panic_window_percentage: float(autoscaling::PANIC_WINDOW_PERCENTAGE, 10.0),
            panic_threshold_percentage: float(autoscaling::PANIC_THRESHOLD_PERCENTAGE, 200.0),
            retention: get(autoscaling::RETENTION)
                .and_then(parse_duration)
                .unwrap_or_default(),
        }
    }
}

/// A Go-style duration as Knative's annotations carry them: `60s`, `2m`,
/// `1m30s`, `500ms`.
pub fn parse_duration(s: &str) -> Option<std::time::Duration> {
    let mut total = std::time::Duration::ZERO;
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let n: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let secs = match &rest[..unit_len] {
            "h" => n * 3600.0,
            "m" => n * 60.0,
            "s" => n,
            "ms" => n / 1e3,
            _ => return None,
        };
        total += std::time::Duration::from_secs_f64(secs);
        rest = &rest[unit_len..];
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_as_go_writes_them() {
        use std::time::Duration;
        assert_eq!(parse_duration("60s"), Some(Duration::from_secs(60)));
        assert_eq!(parse_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("6s"), Some(Duration::from_secs(6)));
        assert_eq!(parse_duration("soon"), None);
        assert_eq!(parse_duration("10"), None);
        assert_eq!(parse_duration(""), None);
    }

    #[test]
    fn scaling_defaults_are_knatives() {
        let s = Scaling::from_annotations(&BTreeMap::new(), 0);
        assert_eq!((s.min, s.max, s.initial), (0, 0, 1));
        assert_eq!(s.target, 100.0);
        assert_eq!(s.window, std::time::Duration::from_secs(60));
        let a = BTreeMap::from([
            (autoscaling::MIN_SCALE.to_owned(), "2".to_owned()),
            (autoscaling::TARGET.to_owned(), "10".to_owned()),
            (autoscaling::WINDOW.to_owned(), "6s".to_owned()),
        ]);
        let s = Scaling::from_annotations(&a, 0);
        assert_eq!((s.min, s.target), (2, 10.0));
        assert_eq!(s.window, std::time::Duration::from_secs(6));
        assert_eq!(Scaling::from_annotations(&BTreeMap::new(), 10).target, 7.0);
    }
}
