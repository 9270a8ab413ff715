//! Conversion between the versions of a kind served at several versions:
//! objects are stored in one version and read, listed and watched in the
//! version a client asks for.
//!
//! - Custom resources convert with the `None` strategy (only `apiVersion`
//!   changes), as Kubernetes does without a conversion webhook (the API
//!   server calls a CRD's webhook itself).
//! - `autoscaling/v1` HorizontalPodAutoscalers are stored as
//!   `autoscaling/v2`, as Kubernetes stores them. v1 holds a CPU target
//!   only; what it has no field for (other metrics, current metrics,
//!   conditions, behavior) travels in Kubernetes' round-trip annotations,
//!   so a v1 client's read-modify-write keeps it.

use serde_json::{Map, Value, json};

use crate::registry::ResourceType;

/// Other metrics than a CPU utilization target, as v1 `MetricSpec`s.
pub const METRIC_SPECS_ANNOTATION: &str = "autoscaling.alpha.kubernetes.io/metrics";
/// The current metrics, as v1 `MetricStatus`es.
pub const METRIC_STATUSES_ANNOTATION: &str = "autoscaling.alpha.kubernetes.io/current-metrics";
/// The scaling behavior, as v2 writes it.
pub const BEHAVIOR_ANNOTATION: &str = "autoscaling.alpha.kubernetes.io/behavior";
/// The status conditions.
pub const CONDITIONS_ANNOTATION: &str = "autoscaling.alpha.kubernetes.io/conditions";

const ROUND_TRIP_ANNOTATIONS: &[&str] = &[
    METRIC_SPECS_ANNOTATION,
    METRIC_STATUSES_ANNOTATION,
    BEHAVIOR_ANNOTATION,
    CONDITIONS_ANNOTATION,
];

/// Whether objects of `rt` are stored in another version's shape (not
/// only with another `apiVersion`).
pub fn converts(rt: &ResourceType) -> bool {
    rt.custom.is_none() && rt.group == "autoscaling" && rt.version == "v1"
}

/// The `apiVersion` objects of `rt` are stored with.
pub fn stored_api_version(rt: &ResourceType) -> String {
    if converts(rt) {
        "autoscaling/v2".into()
    } else {
        rt.api_version()
    }
}

/// Whether `rt` is the version its objects are stored in (one type per
/// stored object, for whoever walks every object once).
pub fn is_storage_version(rt: &ResourceType) -> bool {
    !converts(rt)
}

/// A stored object as `rt`'s version shows it.
pub fn to_served(rt: &ResourceType, obj: &mut Value) {
    let served = rt.api_version();
    if obj["apiVersion"].as_str() == Some(&served) {
        return;
    }
    if converts(rt) {
        *obj = hpa_v2_to_v1(obj);
    } else if rt.custom.is_some_and(|c| c.conversion.is_none()) {
        // A CRD's conversion webhook is called by the API server, which
        // hands out only objects it converted.
        obj["apiVersion"] = Value::String(served);
    }
}

/// An object written in `rt`'s version, in the version it is stored in.
/// A partial object (an apply configuration) stays partial.
pub fn to_stored(rt: &ResourceType, obj: Value) -> Value {
    if converts(rt) && obj["apiVersion"].as_str() == Some(&rt.api_version()) {
        hpa_v1_to_v2(&obj)
    } else {
        obj
    }
}

fn copy(from: &Value, to: &mut Map<String, Value>, keys: &[&str]) {
    for k in keys {
        if let Some(v) = from.get(*k).filter(|v| !v.is_null()) {
            to.insert((*k).into(), v.clone());
        }
    }
}

fn annotation_json(meta: &Value, key: &str) -> Option<Vec<Value>> {
    let text = meta["annotations"][key].as_str()?;
    // As Kubernetes: an annotation that does not parse is ignored.
    match serde_json::from_str(text).ok()? {
        Value::Array(items) => Some(items),
        other => Some(vec![other]),
    }
}

fn is_cpu_utilization(metric: &Value) -> bool {
    metric["type"] == "Resource"
        && metric["resource"]["name"] == "cpu"
        && metric["resource"]["target"]["averageUtilization"].is_number()
}

fn hpa_v2_to_v1(v2: &Value) -> Value {
    let mut meta = v2["metadata"].clone();
    let mut annotations = meta["annotations"].as_object().cloned().unwrap_or_default();
    for k in ROUND_TRIP_ANNOTATIONS {
        annotations.remove(*k);
    }
    let spec = &v2["spec"];
    let mut out_spec = Map::new();
    copy(
        spec,
        &mut out_spec,
        &["scaleTargetRef", "minReplicas", "maxReplicas"],
    );
    let metrics = spec["metrics"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    if let Some(cpu) = metrics.iter().find(|m| is_cpu_utilization(m)) {
        out_spec.insert(
            "targetCPUUtilizationPercentage".into(),
            cpu["resource"]["target"]["averageUtilization"].clone(),
        );
    }
    let others: Vec<Value> = metrics
        .iter()
        .filter(|m| !is_cpu_utilization(m))
        .map(|m| metric_to_v1(m, false))
        .collect();
    let status = &v2["status"];
    let current = status["currentMetrics"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    let mut put = |key: &str, value: &Value| {
        annotations.insert(key.into(), Value::String(value.to_string()));
    };
    if !others.is_empty() {
        put(METRIC_SPECS_ANNOTATION, &Value::Array(others));
    }
    if !current.is_empty() {
        let v1: Vec<Value> = current.iter().map(|m| metric_to_v1(m, true)).collect();
        put(METRIC_STATUSES_ANNOTATION, &Value::Array(v1));
    }
    if spec["behavior"].is_object() {
        put(BEHAVIOR_ANNOTATION, &spec["behavior"]);
    }
    if status["conditions"]
        .as_array()
        .is_some_and(|c| !c.is_empty())
    {
        put(CONDITIONS_ANNOTATION, &status["conditions"]);
    }
    if annotations.is_empty() {
        if let Some(m) = meta.as_object_mut() {
            m.remove("annotations");
        }
    } else {
        meta["annotations"] = Value::Object(annotations);
    }
    let mut out = json!({
        "apiVersion": "autoscaling/v1",
        "kind": "HorizontalPodAutoscaler",
        "metadata": meta,
        "spec": out_spec,
    });
    if status.is_object() {
        let mut out_status = Map::new();
        copy(
            status,
            &mut out_status,
            &[
                "observedGeneration",
                "lastScaleTime",
                "currentReplicas",
                "desiredReplicas",
            ],
        );
        if let Some(cpu) = current
            .iter()
            .find(|m| m["type"] == "Resource" && m["resource"]["name"] == "cpu")
            .and_then(|m| m["resource"]["current"].get("averageUtilization"))
        {
            out_status.insert("currentCPUUtilizationPercentage".into(), cpu.clone());
        }
        out["status"] = Value::Object(out_status);
    }
    out
}

fn hpa_v1_to_v2(v1: &Value) -> Value {
    let mut meta = v1["metadata"].clone();
    let spec = &v1["spec"];
    let mut out_spec = Map::new();
    copy(
        spec,
        &mut out_spec,
        &["scaleTargetRef", "minReplicas", "maxReplicas"],
    );
    let mut metrics: Vec<Value> = annotation_json(&meta, METRIC_SPECS_ANNOTATION)
        .unwrap_or_default()
        .iter()
        .map(|m| metric_to_v2(m, false))
        .collect();
    if let Some(cpu) = spec
        .get("targetCPUUtilizationPercentage")
        .filter(|v| v.is_number())
    {
        metrics.push(json!({"type": "Resource", "resource": {"name": "cpu",
            "target": {"type": "Utilization", "averageUtilization": cpu}}}));
    }
    if !metrics.is_empty() {
        out_spec.insert("metrics".into(), Value::Array(metrics));
    }
    if let Some(behavior) =
        annotation_json(&meta, BEHAVIOR_ANNOTATION).and_then(|b| b.into_iter().next())
    {
        out_spec.insert("behavior".into(), behavior);
    }
    let mut out = json!({
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": Value::Null,
        "spec": out_spec,
    });
    if let Some(status) = v1.get("status").filter(|s| s.is_object()) {
        let mut out_status = Map::new();
        copy(
            status,
            &mut out_status,
            &[
                "observedGeneration",
                "lastScaleTime",
                "currentReplicas",
                "desiredReplicas",
            ],
        );
        let current = match annotation_json(&meta, METRIC_STATUSES_ANNOTATION) {
            // The annotation has more than the percentage: it wins.
            Some(current) => current.iter().map(|m| metric_to_v2(m, true)).collect(),
            None => match status.get("currentCPUUtilizationPercentage") {
                Some(cpu) if cpu.is_number() => vec![json!({"type": "Resource", "resource": {
                    "name": "cpu", "current": {"averageUtilization": cpu}}})],
                _ => Vec::new(),
            },
        };
        if !current.is_empty() {
            out_status.insert("currentMetrics".into(), Value::Array(current));
        }
        if let Some(conditions) = annotation_json(&meta, CONDITIONS_ANNOTATION) {
            out_status.insert("conditions".into(), Value::Array(conditions));
        }
        out["status"] = Value::Object(out_status);
    }
    if let Some(a) = meta["annotations"].as_object_mut() {
        for k in ROUND_TRIP_ANNOTATIONS {
            a.remove(*k);
        }
        if a.is_empty()
            && let Some(m) = meta.as_object_mut()
        {
            m.remove("annotations");
        }
    }
    out["metadata"] = meta;
    out
}

/// How a v1 (annotation) metric's fields lie in v2, per source type: the
/// v1 field and the v2 path, `target`/`current` standing for the spec's
/// target or the status's current value.
fn metric_fields(ty: &str, status: bool) -> &'static [(&'static str, &'static [&'static str])] {
    match (ty, status) {
        ("Resource" | "ContainerResource", false) => &[
            ("name", &["name"]),
            ("container", &["container"]),
            (
                "targetAverageUtilization",
                &["target", "averageUtilization"],
            ),
            ("targetAverageValue", &["target", "averageValue"]),
        ],
        ("Resource" | "ContainerResource", true) => &[
            ("name", &["name"]),
            ("container", &["container"]),
            (
                "currentAverageUtilization",
                &["current", "averageUtilization"],
            ),
            ("currentAverageValue", &["current", "averageValue"]),
        ],
        ("Pods", false) => &[
            ("metricName", &["metric", "name"]),
            ("selector", &["metric", "selector"]),
            ("targetAverageValue", &["target", "averageValue"]),
        ],
        ("Pods", true) => &[
            ("metricName", &["metric", "name"]),
            ("selector", &["metric", "selector"]),
            ("currentAverageValue", &["current", "averageValue"]),
        ],
        ("Object", false) => &[
            ("target", &["describedObject"]),
            ("metricName", &["metric", "name"]),
            ("selector", &["metric", "selector"]),
            ("targetValue", &["target", "value"]),
            ("averageValue", &["target", "averageValue"]),
        ],
        ("Object", true) => &[
            ("target", &["describedObject"]),
            ("metricName", &["metric", "name"]),
            ("selector", &["metric", "selector"]),
            ("currentValue", &["current", "value"]),
            ("averageValue", &["current", "averageValue"]),
        ],
        ("External", false) => &[
            ("metricName", &["metric", "name"]),
            ("metricSelector", &["metric", "selector"]),
            ("targetValue", &["target", "value"]),
            ("targetAverageValue", &["target", "averageValue"]),
        ],
        ("External", true) => &[
            ("metricName", &["metric", "name"]),
            ("metricSelector", &["metric", "selector"]),
            ("currentValue", &["current", "value"]),
            ("currentAverageValue", &["current", "averageValue"]),
        ],
        _ => &[],
    }
}

/// A v2 metric (`status`: a `MetricStatus`, else a `MetricSpec`) in the
/// v1 annotation shape; one of a type v1 does not know is kept as it is.
fn metric_to_v1(m: &Value, status: bool) -> Value {
    let ty = m["type"].as_str().unwrap_or_default();
    let fields = metric_fields(ty, status);
    if fields.is_empty() {
        return m.clone();
    }
    let src = &m[source_key(ty)];
    let mut v1 = Map::new();
    for (field, path) in fields {
        let value = path.iter().fold(src, |v, k| &v[*k]);
        if !value.is_null() {
            v1.insert((*field).into(), value.clone());
        }
    }
    let mut out = json!({"type": ty});
    out[source_key(ty)] = Value::Object(v1);
    out
}

/// A v1 annotation metric in the v2 shape; a spec's target gets its type
/// from the value it has (`Utilization`, `AverageValue`, else `Value`).
fn metric_to_v2(m: &Value, status: bool) -> Value {
    let ty = m["type"].as_str().unwrap_or_default();
    let fields = metric_fields(ty, status);
    if fields.is_empty() {
        return m.clone();
    }
    let src = &m[source_key(ty)];
    let mut v2 = json!({});
    for (field, path) in fields {
        if let Some(value) = src.get(*field).filter(|v| !v.is_null()) {
            let (last, parents) = path.split_last().expect("paths are not empty");
            let parent = parents.iter().fold(&mut v2, |v, k| &mut v[*k]);
            parent[*last] = value.clone();
        }
    }
    if !status {
        let target = &v2["target"];
        let kind = if !target["averageUtilization"].is_null() {
            "Utilization"
        } else if !target["averageValue"].is_null() {
            "AverageValue"
        } else {
            "Value"
        };
        v2["target"]["type"] = json!(kind);
    }
    let mut out = json!({"type": ty});
    out[source_key(ty)] = v2;
    out
}

/// The member of a metric naming its source: `containerResource` for
/// `ContainerResource`, `pods` for `Pods`.
fn source_key(ty: &str) -> &'static str {
    match ty {
        "Resource" => "resource",
        "ContainerResource" => "containerResource",
        "Pods" => "pods",
        "Object" => "object",
        "External" => "external",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::lookup;

    fn v1() -> &'static ResourceType {
        lookup("autoscaling", "v1", "horizontalpodautoscalers").unwrap()
    }

    #[test]
    fn a_cpu_target_maps_to_v1_fields_and_back() {
        let v1_obj = json!({"apiVersion": "autoscaling/v1", "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": "web", "annotations": {"team": "a"}},
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
                "minReplicas": 1, "maxReplicas": 5, "targetCPUUtilizationPercentage": 50}});
        let stored = to_stored(v1(), v1_obj.clone());
        assert_eq!(stored["apiVersion"], "autoscaling/v2");
        assert_eq!(
            stored["spec"]["metrics"],
            json!([{"type": "Resource", "resource": {"name": "cpu",
                "target": {"type": "Utilization", "averageUtilization": 50}}}])
        );
        let mut back = stored;
        to_served(v1(), &mut back);
        assert_eq!(back, v1_obj);
    }

    #[test]
    fn what_v1_cannot_say_survives_a_v1_round_trip_in_annotations() {
        let v2_obj = json!({"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": "web"},
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
                "minReplicas": 1, "maxReplicas": 5,
                "metrics": [
                    {"type": "Resource", "resource": {"name": "memory", "target": {"type": "AverageValue", "averageValue": "100Mi"}}},
                    {"type": "Pods", "pods": {"metric": {"name": "http_requests"}, "target": {"type": "AverageValue", "averageValue": "10"}}},
                    {"type": "Object", "object": {"describedObject": {"kind": "Ingress", "name": "main"}, "metric": {"name": "hits"}, "target": {"type": "Value", "value": "2k"}}},
                    {"type": "External", "external": {"metric": {"name": "queue", "selector": {"matchLabels": {"q": "a"}}}, "target": {"type": "AverageValue", "averageValue": "30"}}},
                    {"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}}],
                "behavior": {"scaleDown": {"stabilizationWindowSeconds": 60}}},
            "status": {"currentReplicas": 2, "desiredReplicas": 3,
                "currentMetrics": [{"type": "Resource", "resource": {"name": "cpu", "current": {"averageUtilization": 85, "averageValue": "170m"}}}],
                "conditions": [{"type": "AbleToScale", "status": "True", "reason": "SucceededRescale"}]}});
        let mut served = v2_obj.clone();
        to_served(v1(), &mut served);
        assert_eq!(served["spec"]["targetCPUUtilizationPercentage"], 70);
        assert_eq!(served["status"]["currentCPUUtilizationPercentage"], 85);
        assert!(served["spec"].get("metrics").is_none());
        let specs: Value = serde_json::from_str(
            served["metadata"]["annotations"][METRIC_SPECS_ANNOTATION]
                .as_str()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(
            specs[0],
            json!({"type": "Resource", "resource": {"name": "memory", "targetAverageValue": "100Mi"}})
        );
        assert_eq!(
            specs[1],
            json!({"type": "Pods", "pods": {"metricName": "http_requests", "targetAverageValue": "10"}})
        );
        // The v1 object decodes as Kubernetes' v1 type.
        serde_json::from_value::<k8s_openapi::api::autoscaling::v1::HorizontalPodAutoscaler>(
            served.clone(),
        )
        .unwrap();
        let back = to_stored(v1(), served);
        // The CPU target is last after a round trip, as in Kubernetes.
        let mut want = v2_obj;
        let metrics = want["spec"]["metrics"].as_array_mut().unwrap();
        let cpu = metrics.remove(4);
        metrics.push(cpu);
        assert_eq!(back, want);
    }

    #[test]
    fn a_partial_apply_configuration_stays_partial() {
        let partial = json!({"apiVersion": "autoscaling/v1", "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": "web"}, "spec": {"maxReplicas": 7}});
        let stored = to_stored(v1(), partial);
        assert_eq!(stored["spec"], json!({"maxReplicas": 7}));
        assert!(stored.get("status").is_none());
    }

    #[test]
    fn a_broken_annotation_is_ignored() {
        let obj = json!({"apiVersion": "autoscaling/v1", "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": "web", "annotations": {METRIC_SPECS_ANNOTATION: "{not json"}},
            "spec": {"maxReplicas": 2, "targetCPUUtilizationPercentage": 40}});
        let stored = to_stored(v1(), obj);
        assert_eq!(stored["spec"]["metrics"].as_array().unwrap().len(), 1);
        assert!(stored["metadata"].get("annotations").is_none());
    }
}
