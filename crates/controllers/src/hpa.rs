//! The HorizontalPodAutoscaler controller (`autoscaling/v2`), with the
//! standard algorithm of kube-controller-manager's:
//!
//! - every sync period, each HPA reads its target's scale subresource
//!   (Deployment or ReplicaSet: replicas and pod selector) and its metrics:
//!   `Resource` (cpu, memory; `Utilization` against the pods' requests, or
//!   `AverageValue`) from `metrics.k8s.io`, `Pods` (`AverageValue`) from
//!   `custom.metrics.k8s.io`;
//! - per metric, Kubernetes' replica calculator: the ready pods' usage
//!   ratio against the target, `desired = ceil(ratio × ready pods)`, left
//!   alone within a 10 % tolerance; pods without a metric count at 100 % of
//!   their request (or the target) on a scale-down and at 0 on a scale-up,
//!   as do pods not ready yet (pending, or for CPU within the 5-minute
//!   initialization and their first metric window after turning ready) on
//!   a scale-up, with no move when that correction turns the direction;
//!   the largest proposal wins;
//! - `behavior`: the scale-down (default 300 s) and scale-up (0 s)
//!   stabilization windows over the recommendations, and the rate policies
//!   (`Pods`/`Percent` per period, `selectPolicy` Max, Min or Disabled;
//!   defaults 4 pods or 100 % per 15 s up, 100 % per 15 s down); then
//!   `minReplicas`/`maxReplicas`;
//! - the status (current and desired replicas, current metrics, last scale
//!   time, `AbleToScale`, `ScalingActive`, `ScalingLimited`) and
//!   `SuccessfulRescale` / `FailedGetResourceMetric` events, as kubectl
//!   shows them.
//!
//! `Object` metrics read the described object's value from
//! `custom.metrics.k8s.io` (its resource found by discovery), `External`
//! ones the sum of `external.metrics.k8s.io`'s values (this cluster serves
//! no external metrics itself: an adapter registered for them answers);
//! against a `Value` target they propose `ceil(value / target × ready
//! pods)`, against an `AverageValue` `ceil(value / average)`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::autoscaling::v2::{
    HPAScalingRules, HorizontalPodAutoscaler, HorizontalPodAutoscalerStatus, MetricSpec,
};
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use crate::Error;

/// Proposals within this ratio of the target change nothing (Kubernetes'
/// `--horizontal-pod-autoscaler-tolerance`).
const TOLERANCE: f64 = 0.1;

/// What an HPA remembers between syncs: its recommendations (for the
/// stabilization windows) and its scale events (for the rate policies).
#[derive(Default)]
struct Memory {
    recommendations: VecDeque<(Instant, i32)>,
    /// (when, replicas before, replicas after)
    changes: VecDeque<(Instant, i32, i32)>,
}

/// One metric's proposal and what was measured.
struct Measured {
    replicas: i32,
    status: Value,
    /// `cpu resource utilization (percentage of request)`, as events say.
    describe: String,
}

async fn get_json(client: &kube::Client, path: &str) -> Result<Value, Error> {
    let request = http::Request::get(path)
        .body(Vec::new())
        .map_err(|e| Error::Kube(kube::Error::HttpError(e)))?;
    client.request::<Value>(request).await.map_err(Error::Kube)
}

/// A quantity in base units (cores, bytes).
fn units(s: &str) -> Option<f64> {
    wasmkube_api::quantity::parse(s)
        .ok()
        .map(|q| q.millis() as f64 / 1000.0)
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// How the replica calculator counts a pod of the target.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Counted {
    /// Ready, with this value of the metric.
    Ready(f64),
    /// Not ready yet (pending, or for CPU still starting up): its value,
    /// if any, is set aside.
    Unready,
    /// Running, but the metrics API has no value for it.
    Missing,
}

/// One pod for the replica calculator: how it counts and its request of
/// the resource (for utilization targets; 0 otherwise).
#[derive(Clone, Copy, Debug)]
struct PodValue {
    counted: Counted,
    request: f64,
}

/// What the calculator proposes: replicas, and the current value to report
/// (the ready pods' utilization in percent or average value).
#[derive(Debug, PartialEq)]
struct Calculated {
    replicas: i32,
    current: f64,
}

/// Kubernetes' replica calculator (`GetResourceReplicas`,
/// `GetMetricReplicas`) for one metric: the usage ratio of the ready pods
/// against `target` (a utilization percentage of the pods' requests when
/// `utilization`, otherwise an average value). When pods are missing
/// metrics or not ready, the ratio is taken again assuming the worst for
/// the move: on a scale-down, missing pods at 100 % of their request (or
/// the target value); on a scale-up, missing and unready pods at 0. No
/// change when that lands within the tolerance or turns the direction.
fn calculate(
    current: i32,
    pods: &[PodValue],
    target: f64,
    utilization: bool,
) -> Result<Calculated, String> {
    let target = target.max(f64::MIN_POSITIVE);
    // (value, request) of every pod counted.
    let ratio = |metrics: &[(f64, f64)]| -> f64 {
        if utilization {
            let used: f64 = metrics.iter().map(|m| m.0).sum();
            let requested: f64 = metrics.iter().map(|m| m.1).sum();
            let percent = if requested > 0.0 {
                used / requested * 100.0
            } else {
                0.0
            };
            percent / target
        } else {
            let n = metrics.len().max(1) as f64;
            metrics.iter().map(|m| m.0).sum::<f64>() / n / target
        }
    };
    let mut metrics: Vec<(f64, f64)> = pods
        .iter()
        .filter_map(|p| match p.counted {
            Counted::Ready(v) => Some((v, p.request)),
            _ => None,
        })
        .collect();
    if metrics.is_empty() {
        return Err("did not receive metrics for targeted pods (pods might be unready)".into());
    }
    let usage_ratio = ratio(&metrics);
    let reported = usage_ratio * target;
    let unchanged = Calculated {
        replicas: current,
        current: reported,
    };
    let unready: Vec<&PodValue> = pods
        .iter()
        .filter(|p| p.counted == Counted::Unready)
        .collect();
    let missing: Vec<&PodValue> = pods
        .iter()
        .filter(|p| p.counted == Counted::Missing)
        .collect();
    let scale_up_with_unready = !unready.is_empty() && usage_ratio > 1.0;
    if !scale_up_with_unready && missing.is_empty() {
        if (usage_ratio - 1.0).abs() <= TOLERANCE {
            return Ok(unchanged);
        }
        return Ok(Calculated {
            replicas: (usage_ratio * metrics.len() as f64).ceil() as i32,
            current: reported,
        });
    }
    if usage_ratio < 1.0 {
        for p in &missing {
            let full = if utilization {
                p.request * target.max(100.0) / 100.0
            } else {
                target
            };
            metrics.push((full, p.request));
        }
    } else if usage_ratio > 1.0 {
        metrics.extend(missing.iter().map(|p| (0.0, p.request)));
    }
    if scale_up_with_unready {
        metrics.extend(unready.iter().map(|p| (0.0, p.request)));
    }
    let new_ratio = ratio(&metrics);
    let turned = (usage_ratio < 1.0 && new_ratio > 1.0) || (usage_ratio > 1.0 && new_ratio < 1.0);
    if (new_ratio - 1.0).abs() <= TOLERANCE || turned {
        return Ok(unchanged);
    }
    let replicas = (new_ratio * metrics.len() as f64).ceil() as i32;
    if (new_ratio < 1.0 && replicas > current) || (new_ratio > 1.0 && replicas < current) {
        return Ok(unchanged);
    }
    Ok(Calculated {
        replicas,
        current: reported,
    })
}

/// Kubernetes' proposal for one value measured for the whole target (an
/// `Object` or `External` metric): against a `Value` target, `ceil(value /
/// target × ready pods)`; against an `AverageValue`, `ceil(value /
/// average)`; the current count within the tolerance.
fn whole_target(current: i32, ready_pods: i32, value: f64, target: f64, average: bool) -> i32 {
    let target = target.max(f64::MIN_POSITIVE);
    if average {
        let ratio = value / (target * current.max(1) as f64);
        if (ratio - 1.0).abs() <= TOLERANCE {
            current
        } else {
            (value / target).ceil() as i32
        }
    } else {
        let ratio = value / target;
        if (ratio - 1.0).abs() <= TOLERANCE {
            current
        } else {
            (ratio * ready_pods as f64).ceil() as i32
        }
    }
}

/// The proposal for a whole-target value (see [`whole_target`]) and the
/// current value as the status reports it.
async fn propose_whole(
    client: &kube::Client,
    ns: &str,
    selector: &str,
    current: i32,
    value: f64,
    target: f64,
    average: bool,
) -> Result<(i32, Value), String> {
    let milli = |v: f64| format!("{}m", (v * 1000.0).round() as i64);
    if average {
        let per_pod = value / current.max(1) as f64;
        let replicas = whole_target(current, current, value, target, true);
        Ok((replicas, json!({"averageValue": milli(per_pod)})))
    } else {
        let ready = ready_pods(client, ns, selector).await?;
        let replicas = whole_target(current, ready, value, target, false);
        Ok((replicas, json!({"value": milli(value)})))
    }
}

/// The target's pods that are ready (what an `Object` metric's `Value`
/// proposal scales from).
async fn ready_pods(client: &kube::Client, ns: &str, selector: &str) -> Result<i32, String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let listed = pods
        .list(&ListParams::default().labels(selector))
        .await
        .map_err(|e| e.to_string())?;
    Ok(listed
        .items
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .count() as i32)
}

/// A target's value and whether it is an `AverageValue`, in base units.
fn whole_target_value(
    target: &k8s_openapi::api::autoscaling::v2::MetricTarget,
) -> Result<(f64, bool), (String, String)> {
    let invalid = |m: &str| ("InvalidMetricSourceType".to_owned(), m.to_owned());
    match target.type_.as_str() {
        "Value" => target
            .value
            .as_ref()
            .and_then(|q| units(&q.0))
            .map(|v| (v, false))
            .ok_or_else(|| invalid("a Value target needs a value")),
        "AverageValue" => target
            .average_value
            .as_ref()
            .and_then(|q| units(&q.0))
            .map(|v| (v, true))
            .ok_or_else(|| invalid("an AverageValue target needs an averageValue")),
        other => Err(invalid(&format!(
            "the target type {other} does not apply to this metric (Value or AverageValue)"
        ))),
    }
}

/// A label selector of a metric, as a query parameter.
fn selector_query(
    selector: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector>,
) -> String {
    let Some(selector) = selector else {
        return String::new();
    };
    let mut terms: Vec<String> = selector
        .match_labels
        .iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    for e in selector.match_expressions.iter().flatten() {
        let values = e.values.clone().unwrap_or_default().join(",");
        terms.push(match e.operator.as_str() {
            "In" => format!("{} in ({values})", e.key),
            "NotIn" => format!("{} notin ({values})", e.key),
            "Exists" => e.key.clone(),
            _ => format!("!{}", e.key),
        });
    }
    if terms.is_empty() {
        String::new()
    } else {
        format!("?labelSelector={}", encode(&terms.join(",")))
    }
}

/// How long after a pod starts its CPU may not count (Kubernetes'
/// `--horizontal-pod-autoscaler-cpu-initialization-period`).
const CPU_INITIALIZATION: chrono::Duration = chrono::Duration::minutes(5);
/// How long after start a pod's first readiness change is taken as its
/// first (`--horizontal-pod-autoscaler-initial-readiness-delay`).
const INITIAL_READINESS_DELAY: chrono::Duration = chrono::Duration::seconds(30);

/// How the calculator counts `pod` given its metric `value` (taken at
/// `sampled` over `window`), as Kubernetes' `groupPods`: `None` for a pod
/// left out (being deleted, or failed).
fn count(
    pod: &Pod,
    value: Option<f64>,
    cpu: bool,
    sampled: chrono::DateTime<chrono::Utc>,
    window: chrono::Duration,
) -> Option<Counted> {
    let status = pod.status.as_ref();
    let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
    if pod.metadata.deletion_timestamp.is_some() || phase == "Failed" {
        return None;
    }
    if phase == "Pending" {
        return Some(Counted::Unready);
    }
    let Some(value) = value else {
        return Some(Counted::Missing);
    };
    if cpu {
        let ready = status
            .and_then(|s| s.conditions.as_ref())
            .and_then(|c| c.iter().find(|c| c.type_ == "Ready"));
        let instant = |t: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time| {
            chrono::DateTime::from_timestamp_millis(t.0.as_millisecond())
        };
        let started = status.and_then(|s| s.start_time.as_ref()).and_then(instant);
        let unready = match (ready, started) {
            (Some(ready), Some(started)) => {
                let changed = ready
                    .last_transition_time
                    .as_ref()
                    .and_then(instant)
                    .unwrap_or(started);
                if started + CPU_INITIALIZATION > chrono::Utc::now() {
                    // Starting up: its CPU counts once it has been ready
                    // for a whole metric window.
                    ready.status == "False" || sampled < changed + window
                } else {
                    // Unready and never ready yet.
                    ready.status == "False" && started + INITIAL_READINESS_DELAY > changed
                }
            }
            _ => true,
        };
        if unready {
            return Some(Counted::Unready);
        }
    }
    Some(Counted::Ready(value))
}

/// A resource's total request over the pods (in cores or bytes), or why
/// there is none.
fn requests(pods: &[Pod], resource: &str) -> Result<f64, String> {
    let mut total = 0.0;
    for p in pods {
        for c in p.spec.iter().flat_map(|s| &s.containers) {
            let request = c
                .resources
                .as_ref()
                .and_then(|r| r.requests.as_ref())
                .and_then(|r| r.get(resource));
            match request.and_then(|q| units(&q.0)) {
                Some(v) => total += v,
                None => {
                    return Err(format!(
                        "missing request for {resource} in container {} of Pod {}",
                        c.name,
                        p.name_any()
                    ));
                }
            }
        }
    }
    Ok(total)
}

/// A target's `averageValue`, in base units.
fn average_value(
    target: &k8s_openapi::api::autoscaling::v2::MetricTarget,
) -> Result<f64, (String, String)> {
    target
        .average_value
        .as_ref()
        .and_then(|q| units(&q.0))
        .ok_or_else(|| {
            (
                "InvalidMetricSourceType".to_owned(),
                "the target needs an averageValue".to_owned(),
            )
        })
}

async fn measure(
    client: &kube::Client,
    ns: &str,
    selector: &str,
    current: i32,
    metric: &MetricSpec,
) -> Result<Measured, (String, String)> {
    let fail = |reason: &str, m: String| (reason.to_owned(), m);
    match metric.type_.as_str() {
        "Resource" => {
            let r = metric.resource.as_ref().ok_or_else(|| {
                fail(
                    "InvalidMetricSourceType",
                    "a Resource metric without resource".into(),
                )
            })?;
            let path = format!(
                "/apis/metrics.k8s.io/v1beta1/namespaces/{ns}/pods?labelSelector={}",
                encode(selector)
            );
            let list = get_json(client, &path).await.map_err(|e| {
                fail(
                    "FailedGetResourceMetric",
                    format!("failed to get {} utilization: {e}", r.name),
                )
            })?;
            let usage: HashMap<String, (f64, chrono::DateTime<chrono::Utc>, chrono::Duration)> =
                list["items"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|m| {
                        let total = m["containers"]
                            .as_array()?
                            .iter()
                            .filter_map(|c| units(c["usage"][&r.name].as_str()?))
                            .sum();
                        let sampled = m["timestamp"]
                            .as_str()
                            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                            .map(|t| t.with_timezone(&chrono::Utc))
                            .unwrap_or_else(chrono::Utc::now);
                        let window = m["window"]
                            .as_str()
                            .and_then(|w| w.strip_suffix('s')?.parse::<i64>().ok())
                            .map(chrono::Duration::seconds)
                            .unwrap_or_default();
                        Some((
                            m["metadata"]["name"].as_str()?.to_owned(),
                            (total, sampled, window),
                        ))
                    })
                    .collect();
            if usage.is_empty() {
                return Err(fail(
                    "FailedGetResourceMetric",
                    format!(
                        "failed to get {} utilization: unable to get metrics for resource {}: no metrics returned from resource metrics API",
                        r.name, r.name
                    ),
                ));
            }
            let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
            let listed = pods
                .list(&ListParams::default().labels(selector))
                .await
                .map_err(|e| fail("FailedGetResourceMetric", e.to_string()))?;
            let utilization = r.target.average_utilization;
            let mut counted = Vec::new();
            for pod in &listed.items {
                let sample = usage.get(&pod.name_any());
                let Some(how) = count(
                    pod,
                    sample.map(|s| s.0),
                    r.name == "cpu",
                    sample.map(|s| s.1).unwrap_or_else(chrono::Utc::now),
                    sample.map(|s| s.2).unwrap_or_default(),
                ) else {
                    continue;
                };
                let request = if utilization.is_some() {
                    requests(std::slice::from_ref(pod), &r.name)
                        .map_err(|m| fail("FailedGetResourceMetric", m))?
                } else {
                    0.0
                };
                counted.push(PodValue {
                    counted: how,
                    request,
                });
            }
            let format_value = |v: f64| {
                if r.name == "cpu" {
                    format!("{}m", (v * 1000.0).round() as i64)
                } else {
                    format!("{}", v.round() as i64)
                }
            };
            let ready: Vec<f64> = counted
                .iter()
                .filter_map(|p| match p.counted {
                    Counted::Ready(v) => Some(v),
                    _ => None,
                })
                .collect();
            let average = ready.iter().sum::<f64>() / ready.len().max(1) as f64;
            let failed = |m: String| {
                fail(
                    "FailedGetResourceMetric",
                    format!("failed to get {} utilization: {m}", r.name),
                )
            };
            if let Some(target) = utilization {
                let c = calculate(current, &counted, target as f64, true).map_err(failed)?;
                Ok(Measured {
                    replicas: c.replicas,
                    status: json!({"type": "Resource", "resource": {"name": r.name, "current": {
                        "averageUtilization": c.current.round() as i64,
                        "averageValue": format_value(average)}}}),
                    describe: format!("{} resource utilization (percentage of request)", r.name),
                })
            } else {
                let target = average_value(&r.target)?;
                let c = calculate(current, &counted, target, false).map_err(failed)?;
                Ok(Measured {
                    replicas: c.replicas,
                    status: json!({"type": "Resource", "resource": {"name": r.name, "current": {
                        "averageValue": format_value(c.current)}}}),
                    describe: format!("{} resource", r.name),
                })
            }
        }
        "Pods" => {
            let p = metric.pods.as_ref().ok_or_else(|| {
                fail(
                    "InvalidMetricSourceType",
                    "a Pods metric without pods".into(),
                )
            })?;
            let name = &p.metric.name;
            let path = format!(
                "/apis/custom.metrics.k8s.io/v1beta2/namespaces/{ns}/pods/*/{name}?labelSelector={}",
                encode(selector)
            );
            let list = get_json(client, &path).await.map_err(|e| {
                fail(
                    "FailedGetPodsMetric",
                    format!("unable to get metric {name}: {e}"),
                )
            })?;
            let values: HashMap<String, f64> = list["items"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|i| {
                    Some((
                        i["describedObject"]["name"].as_str()?.to_owned(),
                        units(i["value"].as_str()?)?,
                    ))
                })
                .collect();
            if values.is_empty() {
                return Err(fail(
                    "FailedGetPodsMetric",
                    format!("unable to get metric {name}: no metrics returned"),
                ));
            }
            let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
            let listed = pods
                .list(&ListParams::default().labels(selector))
                .await
                .map_err(|e| fail("FailedGetPodsMetric", e.to_string()))?;
            let now = chrono::Utc::now();
            let counted: Vec<PodValue> = listed
                .items
                .iter()
                .filter_map(|pod| {
                    let value = values.get(&pod.name_any()).copied();
                    Some(PodValue {
                        counted: count(pod, value, false, now, chrono::Duration::zero())?,
                        request: 0.0,
                    })
                })
                .collect();
            let target = average_value(&p.target)?;
            let c = calculate(current, &counted, target, false).map_err(|m| {
                fail(
                    "FailedGetPodsMetric",
                    format!("unable to get metric {name}: {m}"),
                )
            })?;
            Ok(Measured {
                replicas: c.replicas,
                status: json!({"type": "Pods", "pods": {"metric": {"name": name}, "current": {
                    "averageValue": format!("{}m", (c.current * 1000.0).round() as i64)}}}),
                describe: format!("pods metric {name}"),
            })
        }
        "Object" => {
            let o = metric.object.as_ref().ok_or_else(|| {
                fail(
                    "InvalidMetricSourceType",
                    "an Object metric without object".into(),
                )
            })?;
            let name = &o.metric.name;
            let failed = |m: String| {
                fail(
                    "FailedGetObjectMetric",
                    format!("unable to get metric {name}: {m}"),
                )
            };
            let described = &o.described_object;
            let (group, version) = match described
                .api_version
                .as_deref()
                .unwrap_or("v1")
                .split_once('/')
            {
                Some((g, v)) => (g.to_owned(), v.to_owned()),
                None => (
                    String::new(),
                    described.api_version.clone().unwrap_or_else(|| "v1".into()),
                ),
            };
            // The object's resource name, as discovery has it.
            let gvk = kube::api::GroupVersionKind::gvk(&group, &version, &described.kind);
            let (resource, _) = kube::discovery::pinned_kind(client, &gvk)
                .await
                .map_err(|e| failed(format!("{} {}: {e}", described.kind, described.name)))?;
            let resource = if group.is_empty() {
                resource.plural
            } else {
                format!("{}.{group}", resource.plural)
            };
            let path = format!(
                "/apis/custom.metrics.k8s.io/v1beta2/namespaces/{ns}/{resource}/{}/{name}{}",
                described.name,
                selector_query(o.metric.selector.as_ref())
            );
            let list = get_json(client, &path)
                .await
                .map_err(|e| failed(e.to_string()))?;
            let value = list["items"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|i| units(i["value"].as_str()?))
                .next()
                .ok_or_else(|| failed("no metrics returned".into()))?;
            let (target, average) = whole_target_value(&o.target)?;
            let (replicas, current_value) =
                propose_whole(client, ns, selector, current, value, target, average)
                    .await
                    .map_err(failed)?;
            Ok(Measured {
                replicas,
                status: json!({"type": "Object", "object": {
                    "describedObject": {"apiVersion": described.api_version, "kind": described.kind, "name": described.name},
                    "metric": {"name": name}, "current": current_value}}),
                describe: format!("{} metric {name}", described.kind),
            })
        }
        "External" => {
            let e = metric.external.as_ref().ok_or_else(|| {
                fail(
                    "InvalidMetricSourceType",
                    "an External metric without external".into(),
                )
            })?;
            let name = &e.metric.name;
            let failed = |m: String| {
                fail(
                    "FailedGetExternalMetric",
                    format!(
                        "unable to get external metric {ns}/{name}/{:?}: {m}",
                        e.metric.selector
                    ),
                )
            };
            let path = format!(
                "/apis/external.metrics.k8s.io/v1beta1/namespaces/{ns}/{name}{}",
                selector_query(e.metric.selector.as_ref())
            );
            let list = get_json(client, &path)
                .await
                .map_err(|err| failed(err.to_string()))?;
            let values: Vec<f64> = list["items"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|i| units(i["value"].as_str()?))
                .collect();
            if values.is_empty() {
                return Err(failed("no metrics returned".into()));
            }
            let value: f64 = values.iter().sum();
            let (target, average) = whole_target_value(&e.target)?;
            let (replicas, current_value) =
                propose_whole(client, ns, selector, current, value, target, average)
                    .await
                    .map_err(failed)?;
            Ok(Measured {
                replicas,
                status: json!({"type": "External", "external": {
                    "metric": {"name": name}, "current": current_value}}),
                describe: format!("external metric {name}"),
            })
        }
        other => Err(fail(
            "InvalidMetricSourceType",
            format!("metrics of type {other} are not supported"),
        )),
    }
}

/// The rules for one direction, with Kubernetes' defaults.
fn rules(hpa: &HorizontalPodAutoscaler, up: bool) -> HPAScalingRules {
    let given = hpa
        .spec
        .as_ref()
        .and_then(|s| s.behavior.as_ref())
        .and_then(|b| {
            if up {
                b.scale_up.clone()
            } else {
                b.scale_down.clone()
            }
        });
    let default: HPAScalingRules = serde_json::from_value(if up {
        json!({"stabilizationWindowSeconds": 0, "selectPolicy": "Max",
               "policies": [{"type": "Pods", "value": 4, "periodSeconds": 15},
                            {"type": "Percent", "value": 100, "periodSeconds": 15}]})
    } else {
        json!({"stabilizationWindowSeconds": 300, "selectPolicy": "Max",
               "policies": [{"type": "Percent", "value": 100, "periodSeconds": 15}]})
    })
    .expect("the default rules decode");
    match given {
        None => default,
        Some(mut g) => {
            g.stabilization_window_seconds = g
                .stabilization_window_seconds
                .or(default.stabilization_window_seconds);
            g.select_policy = g.select_policy.or(default.select_policy);
            if g.policies.as_ref().is_none_or(Vec::is_empty) {
                g.policies = default.policies;
            }
            g
        }
    }
}

/// Applies the stabilization windows and rate policies to a proposal.
fn behave(
    hpa: &HorizontalPodAutoscaler,
    memory: &mut Memory,
    now: Instant,
    current: i32,
    proposed: i32,
) -> i32 {
    let (up, down) = (rules(hpa, true), rules(hpa, false));
    memory.recommendations.push_back((now, proposed));
    let longest = Duration::from_secs(
        up.stabilization_window_seconds
            .unwrap_or(0)
            .max(down.stabilization_window_seconds.unwrap_or(300))
            .max(0) as u64,
    );
    while memory
        .recommendations
        .front()
        .is_some_and(|(t, _)| now.duration_since(*t) > longest)
    {
        memory.recommendations.pop_front();
    }
    let within = |secs: Option<i32>| {
        let d = Duration::from_secs(secs.unwrap_or(0).max(0) as u64);
        memory
            .recommendations
            .iter()
            .filter(move |(t, _)| now.duration_since(*t) <= d)
            .map(|(_, r)| *r)
    };
    // Up: the smallest recommendation of the up window; down: the largest
    // of the down window.
    let up_floor = within(up.stabilization_window_seconds)
        .min()
        .unwrap_or(proposed);
    let down_ceiling = within(down.stabilization_window_seconds)
        .max()
        .unwrap_or(proposed);
    let mut desired = if proposed > current {
        up_floor.max(current)
    } else if proposed < current {
        down_ceiling.min(current)
    } else {
        current
    };
    // Rate limits from the scale events within each policy's period.
    let limit = |rules: &HPAScalingRules, scaling_up: bool| -> Option<i32> {
        if rules.select_policy.as_deref() == Some("Disabled") {
            return Some(current);
        }
        let limits: Vec<i32> = rules
            .policies
            .iter()
            .flatten()
            .map(|p| {
                let period = Duration::from_secs(p.period_seconds.max(1) as u64);
                let changed: i32 = memory
                    .changes
                    .iter()
                    .filter(|(t, _, _)| now.duration_since(*t) <= period)
                    .map(|(_, from, to)| to - from)
                    .sum();
                let start = current - changed;
                match (p.type_.as_str(), scaling_up) {
                    ("Pods", true) => start + p.value,
                    ("Percent", true) => {
                        (start as f64 * (1.0 + p.value as f64 / 100.0)).ceil() as i32
                    }
                    ("Pods", false) => start - p.value,
                    (_, false) => (start as f64 * (1.0 - p.value as f64 / 100.0)).ceil() as i32,
                    _ => current,
                }
            })
            .collect();
        let pick_max = rules.select_policy.as_deref() != Some("Min");
        match (scaling_up, pick_max) {
            (true, true) | (false, false) => limits.into_iter().max(),
            (true, false) | (false, true) => limits.into_iter().min(),
        }
    };
    if desired > current
        && let Some(l) = limit(&up, true)
    {
        desired = desired.min(l.max(current));
    }
    if desired < current
        && let Some(l) = limit(&down, false)
    {
        desired = desired.max(l.min(current));
    }
    desired
}

fn condition(type_: &str, status: &str, reason: &str, message: String) -> Value {
    json!({"type": type_, "status": status, "reason": reason, "message": message,
           "lastTransitionTime": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)})
}

async fn event(
    client: &kube::Client,
    hpa: &HorizontalPodAutoscaler,
    kind: &str,
    reason: &str,
    message: String,
) {
    crate::record_event(
        client,
        hpa,
        "horizontal-pod-autoscaler",
        kind,
        reason,
        message,
    )
    .await;
}

/// One HPA's sync: measure, decide, scale, report.
async fn sync(
    client: &kube::Client,
    hpa: &HorizontalPodAutoscaler,
    memory: &mut Memory,
) -> Result<(), Error> {
    let Some(spec) = &hpa.spec else { return Ok(()) };
    let ns = hpa.namespace().unwrap_or_default();
    let target = &spec.scale_target_ref;
    let scale = match target.kind.as_str() {
        "Deployment" => {
            Api::<Deployment>::namespaced(client.clone(), &ns)
                .get_scale(&target.name)
                .await
        }
        "ReplicaSet" => {
            Api::<ReplicaSet>::namespaced(client.clone(), &ns)
                .get_scale(&target.name)
                .await
        }
        other => {
            let conditions = vec![condition(
                "AbleToScale",
                "False",
                "FailedGetScale",
                format!(
                    "the HPA controller was unable to get the target's current scale: {other} is not a kind this controller scales (Deployment, ReplicaSet)"
                ),
            )];
            return write_status(client, hpa, json!({"conditions": conditions})).await;
        }
    };
    let scale = match scale {
        Ok(s) => s,
        Err(e) => {
            let message =
                format!("the HPA controller was unable to get the target's current scale: {e}");
            event(client, hpa, "Warning", "FailedGetScale", message.clone()).await;
            let conditions = vec![condition("AbleToScale", "False", "FailedGetScale", message)];
            return write_status(client, hpa, json!({"conditions": conditions})).await;
        }
    };
    let current = scale.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0);
    let selector = scale
        .status
        .as_ref()
        .and_then(|s| s.selector.clone())
        .unwrap_or_default();
    let (min, max) = (spec.min_replicas.unwrap_or(1), spec.max_replicas);
    let now = Instant::now();
    let mut conditions = Vec::new();
    if current == 0 && min > 0 {
        conditions.push(condition(
            "AbleToScale",
            "True",
            "SucceededGetScale",
            "the HPA controller was able to get the target's current scale".into(),
        ));
        conditions.push(condition(
            "ScalingActive",
            "False",
            "ScalingDisabled",
            "scaling is disabled since the replica count of the target is zero".into(),
        ));
        return write_status(
            client,
            hpa,
            json!({"currentReplicas": 0, "desiredReplicas": 0, "conditions": conditions}),
        )
        .await;
    }
    let mut proposed: Option<(i32, String)> = None;
    let mut statuses = Vec::new();
    let mut failure = None;
    for m in spec.metrics.iter().flatten() {
        match measure(client, &ns, &selector, current, m).await {
            Ok(measured) => {
                statuses.push(measured.status);
                if proposed
                    .as_ref()
                    .is_none_or(|(r, _)| measured.replicas > *r)
                {
                    proposed = Some((measured.replicas, measured.describe));
                }
            }
            Err((reason, message)) => {
                // Each metric that cannot be read is an event, as on
                // Kubernetes, even when another one decides.
                event(client, hpa, "Warning", &reason, message.clone()).await;
                statuses.push(json!({"type": m.type_}));
                failure.get_or_insert((reason, message));
            }
        }
    }
    let Some((raw, describe)) = proposed else {
        let (reason, message) =
            failure.unwrap_or(("FailedGetResourceMetric".into(), "no metrics".into()));
        conditions.push(condition(
            "AbleToScale",
            "True",
            "SucceededGetScale",
            "the HPA controller was able to get the target's current scale".into(),
        ));
        conditions.push(condition("ScalingActive", "False", &reason, message));
        return write_status(client, hpa, json!({"currentReplicas": current, "desiredReplicas": current, "currentMetrics": statuses, "conditions": conditions})).await;
    };
    let behaved = behave(hpa, memory, now, current, raw);
    let desired = behaved.clamp(min, max.max(min));
    conditions.push(condition(
        "AbleToScale",
        "True",
        if desired != current {
            "SucceededRescale"
        } else {
            "ReadyForNewScale"
        },
        if desired != current {
            format!("the HPA controller was able to update the target scale to {desired}")
        } else {
            "recommended size matches current size".into()
        },
    ));
    conditions.push(condition(
        "ScalingActive",
        "True",
        "ValidMetricFound",
        format!("the HPA was able to successfully calculate a replica count from {describe}"),
    ));
    conditions.push(if behaved > max {
        condition(
            "ScalingLimited",
            "True",
            "TooManyReplicas",
            "the desired replica count is more than the maximum replica count".into(),
        )
    } else if behaved < min {
        condition(
            "ScalingLimited",
            "True",
            "TooFewReplicas",
            "the desired replica count is less than the minimum replica count".into(),
        )
    } else {
        condition(
            "ScalingLimited",
            "False",
            "DesiredWithinRange",
            "the desired count is within the acceptable range".into(),
        )
    });
    let mut status = json!({
        "currentReplicas": current, "desiredReplicas": desired,
        "currentMetrics": statuses, "conditions": conditions,
    });
    if desired != current {
        let patch = json!({"spec": {"replicas": desired}});
        let params = PatchParams::default();
        match target.kind.as_str() {
            "Deployment" => {
                Api::<Deployment>::namespaced(client.clone(), &ns)
                    .patch_scale(&target.name, &params, &Patch::Merge(&patch))
                    .await
                    .map_err(Error::Kube)?;
            }
            _ => {
                Api::<ReplicaSet>::namespaced(client.clone(), &ns)
                    .patch_scale(&target.name, &params, &Patch::Merge(&patch))
                    .await
                    .map_err(Error::Kube)?;
            }
        }
        memory.changes.push_back((now, current, desired));
        while memory
            .changes
            .front()
            .is_some_and(|(t, _, _)| now.duration_since(*t) > Duration::from_secs(1800))
        {
            memory.changes.pop_front();
        }
        let direction = if desired > current { "above" } else { "below" };
        event(
            client,
            hpa,
            "Normal",
            "SuccessfulRescale",
            format!("New size: {desired}; reason: {describe} {direction} target"),
        )
        .await;
        status["lastScaleTime"] =
            json!(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
    }
    write_status(client, hpa, status).await
}

async fn write_status(
    client: &kube::Client,
    hpa: &HorizontalPodAutoscaler,
    mut status: Value,
) -> Result<(), Error> {
    let old: HorizontalPodAutoscalerStatus = hpa.status.clone().unwrap_or_default();
    status["observedGeneration"] = json!(hpa.metadata.generation);
    if status.get("lastScaleTime").is_none()
        && let Some(t) = &old.last_scale_time
    {
        status["lastScaleTime"] = json!(t);
    }
    // Keep transition times of conditions whose status holds.
    if let Some(conds) = status["conditions"].as_array_mut() {
        for c in conds {
            if let Some(prev) = old
                .conditions
                .iter()
                .flatten()
                .find(|p| c["type"] == p.type_.as_str())
                && c["status"] == prev.status.as_str()
                && let Some(t) = &prev.last_transition_time
            {
                c["lastTransitionTime"] = json!(t);
            }
        }
    }
    let new: HorizontalPodAutoscalerStatus =
        serde_json::from_value(status.clone()).unwrap_or_default();
    if new == old {
        return Ok(());
    }
    let api: Api<HorizontalPodAutoscaler> =
        Api::namespaced(client.clone(), &hpa.namespace().unwrap_or_default());
    // The whole status, replaced (a merge patch would keep stale metrics).
    let mut replaced = hpa.clone();
    replaced.status = Some(new);
    match api
        .replace_status(&hpa.name_any(), &PostParams::default(), &replaced)
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(()),
        Err(e) => Err(Error::Kube(e)),
    }
}

/// Runs the HPA controller: every `period`, each HPA is synced.
pub(crate) fn run(
    client: kube::Client,
    informers: &mut crate::Informers,
    period: Duration,
) -> impl std::future::Future<Output = Result<(), Error>> + use<> {
    let hpas = informers.store::<HorizontalPodAutoscaler>();
    async move {
        let _ = hpas.wait_until_ready().await;
        let memories: Mutex<BTreeMap<String, Memory>> = Mutex::default();
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let all: Vec<Arc<HorizontalPodAutoscaler>> = hpas.state();
            let mut live = std::collections::BTreeSet::new();
            for hpa in all {
                let key = format!(
                    "{}/{}/{}",
                    hpa.namespace().unwrap_or_default(),
                    hpa.name_any(),
                    hpa.uid().unwrap_or_default()
                );
                live.insert(key.clone());
                let mut memory = memories
                    .lock()
                    .expect("hpa memory")
                    .remove(&key)
                    .unwrap_or_default();
                if let Err(e) = sync(&client, &hpa, &mut memory).await {
                    tracing::warn!(hpa = %hpa.name_any(), error = %crate::ErrorChain(&e), "HPA sync failed");
                }
                memories.lock().expect("hpa memory").insert(key, memory);
            }
            memories
                .lock()
                .expect("hpa memory")
                .retain(|k, _| live.contains(k));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hpa(behavior: Value) -> HorizontalPodAutoscaler {
        serde_json::from_value(json!({
            "metadata": {"name": "h"},
            "spec": {"scaleTargetRef": {"kind": "Deployment", "name": "d", "apiVersion": "apps/v1"},
                     "maxReplicas": 10, "behavior": behavior},
        }))
        .unwrap()
    }

    fn ready(v: f64, request: f64) -> PodValue {
        PodValue {
            counted: Counted::Ready(v),
            request,
        }
    }

    fn other(counted: Counted, request: f64) -> PodValue {
        PodValue { counted, request }
    }

    #[test]
    fn the_calculator_proposes_from_the_ready_pods_within_the_tolerance() {
        // 200 % of a 50 % target over two pods: four times as many.
        let two = [ready(0.1, 0.05), ready(0.1, 0.05)];
        let c = calculate(2, &two, 50.0, true).unwrap();
        assert_eq!(
            c,
            Calculated {
                replicas: 8,
                current: 200.0
            }
        );
        // Within 10 %: no change.
        let near = [ready(0.105, 0.2), ready(0.105, 0.2)];
        assert_eq!(calculate(2, &near, 50.0, true).unwrap().replicas, 2);
        // Average value: 30 against 10 over two pods.
        let avg = [ready(30.0, 0.0), ready(30.0, 0.0)];
        assert_eq!(calculate(2, &avg, 10.0, false).unwrap().replicas, 6);
        // No ready pod with a metric: nothing to go on.
        let none = [other(Counted::Unready, 1.0), other(Counted::Missing, 1.0)];
        assert!(calculate(2, &none, 50.0, true).is_err());
    }

    #[test]
    fn the_calculator_assumes_the_worst_for_pods_it_cannot_count() {
        // Scale-down with a pod missing its metric: it counts at its full
        // request, so the cluster shrinks to 3, not to 1.
        let down = [
            ready(0.1, 1.0),
            ready(0.1, 1.0),
            ready(0.1, 1.0),
            other(Counted::Missing, 1.0),
        ];
        assert_eq!(calculate(4, &down, 50.0, true).unwrap().replicas, 3);
        // Scale-up while three pods are still starting: at 0 they turn the
        // move into a scale-down, so nothing moves.
        let up = [
            ready(2.0, 1.0),
            other(Counted::Unready, 1.0),
            other(Counted::Unready, 1.0),
            other(Counted::Unready, 1.0),
        ];
        assert_eq!(calculate(4, &up, 100.0, true).unwrap().replicas, 4);
        // One unready pod beside much load: still up, counting it at 0.
        let busy = [
            ready(4.0, 1.0),
            ready(4.0, 1.0),
            other(Counted::Unready, 1.0),
        ];
        assert_eq!(calculate(3, &busy, 100.0, true).unwrap().replicas, 8);
        // Scale-up with a missing pod that brings the ratio within the
        // tolerance: no change.
        let flat = [
            ready(1.5, 0.0),
            ready(1.5, 0.0),
            other(Counted::Missing, 0.0),
        ];
        assert_eq!(calculate(3, &flat, 1.0, false).unwrap().replicas, 3);
    }

    #[test]
    fn whole_target_metrics_propose_as_kubernetes() {
        // Value: 300 against 100 with 2 ready pods: 6.
        assert_eq!(whole_target(2, 2, 300.0, 100.0, false), 6);
        // Within the tolerance: no change.
        assert_eq!(whole_target(4, 4, 105.0, 100.0, false), 4);
        // AverageValue: 900 over pods averaging 100 each: 9.
        assert_eq!(whole_target(3, 3, 900.0, 100.0, true), 9);
        assert_eq!(whole_target(3, 3, 310.0, 100.0, true), 3);
    }

    #[test]
    fn metric_selectors_become_label_selectors() {
        let selector = serde_json::from_value(json!({
            "matchLabels": {"queue": "jobs"},
            "matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "b"]}],
        }))
        .unwrap();
        assert_eq!(
            selector_query(Some(&selector)),
            "?labelSelector=queue%3Djobs%2Ctier%20in%20%28a%2Cb%29"
        );
        assert_eq!(selector_query(None), "");
    }

    #[test]
    fn pods_count_as_kubernetes_groups_them() {
        let now = chrono::Utc::now();
        let pod = |phase: &str, started_ago: i64, ready: &str, changed_ago: i64| -> Pod {
            let at = |ago: i64| (now - chrono::Duration::seconds(ago)).to_rfc3339();
            serde_json::from_value(json!({
                "metadata": {"name": "p"},
                "status": {"phase": phase, "startTime": at(started_ago), "conditions": [
                    {"type": "Ready", "status": ready, "lastTransitionTime": at(changed_ago)}]},
            }))
            .unwrap()
        };
        let window = chrono::Duration::seconds(10);
        let running = pod("Running", 60, "True", 50);
        assert_eq!(
            count(&running, Some(1.0), true, now, window),
            Some(Counted::Ready(1.0))
        );
        assert_eq!(
            count(&running, None, true, now, window),
            Some(Counted::Missing)
        );
        assert_eq!(
            count(
                &pod("Pending", 1, "False", 1),
                Some(1.0),
                false,
                now,
                window
            ),
            Some(Counted::Unready)
        );
        assert_eq!(
            count(
                &pod("Failed", 60, "False", 1),
                Some(1.0),
                false,
                now,
                window
            ),
            None
        );
        // Ready for less than a metric window while starting up: its CPU
        // is the start's, set aside (other metrics count).
        let fresh = pod("Running", 20, "True", 5);
        assert_eq!(
            count(&fresh, Some(1.0), true, now, window),
            Some(Counted::Unready)
        );
        assert_eq!(
            count(&fresh, Some(1.0), false, now, window),
            Some(Counted::Ready(1.0))
        );
        // Long started, unready now after having been ready: it counts.
        let flapped = pod("Running", 3600, "False", 600);
        assert_eq!(
            count(&flapped, Some(1.0), true, now, window),
            Some(Counted::Ready(1.0))
        );
        // Long started and never ready yet: set aside.
        let never = pod("Running", 3600, "False", 3590);
        assert_eq!(
            count(&never, Some(1.0), true, now, window),
            Some(Counted::Unready)
        );
    }

    #[test]
    fn scale_down_waits_out_its_stabilization_window() {
        let h = hpa(json!({"scaleDown": {"stabilizationWindowSeconds": 60}}));
        let mut m = Memory::default();
        let t0 = Instant::now();
        assert_eq!(behave(&h, &mut m, t0, 4, 4), 4);
        // Load went away: the window still holds the earlier 4.
        assert_eq!(behave(&h, &mut m, t0 + Duration::from_secs(30), 4, 1), 4);
        // A window later, down it goes.
        assert_eq!(behave(&h, &mut m, t0 + Duration::from_secs(91), 4, 1), 1);
    }

    #[test]
    fn scale_up_follows_the_rate_policies() {
        let h = hpa(
            json!({"scaleUp": {"policies": [{"type": "Pods", "value": 2, "periodSeconds": 60}]}}),
        );
        let mut m = Memory::default();
        let t0 = Instant::now();
        assert_eq!(behave(&h, &mut m, t0, 1, 10), 3);
        m.changes.push_back((t0, 1, 3));
        // Within the same period the budget is spent.
        assert_eq!(behave(&h, &mut m, t0 + Duration::from_secs(10), 3, 10), 3);
        assert_eq!(behave(&h, &mut m, t0 + Duration::from_secs(61), 3, 10), 5);
        // The default: 4 pods or 100 % per 15 s, whichever is more.
        let d = hpa(Value::Null);
        let mut m = Memory::default();
        assert_eq!(behave(&d, &mut m, t0, 1, 10), 5);
        assert_eq!(behave(&d, &mut Memory::default(), t0, 8, 40), 16);
    }
}
