//! Defaulting, as Kubernetes' defaulters and built-in admission fill in
//! omitted fields for the served kinds. Runs on canonical JSON before
//! validation, on create and update alike, so it must be idempotent.

use base64::Engine as _;
use serde_json::{Map, Value, json};

use crate::registry::ResourceType;

/// Sets `obj[path]` to `value` unless present (creating parent objects).
fn default_at(obj: &mut Value, path: &[&str], value: Value) {
    let mut cur = obj;
    for (i, part) in path.iter().enumerate() {
        if !cur.is_object() {
            return;
        }
        let map = cur.as_object_mut().expect("checked object");
        if i == path.len() - 1 {
            if map.get(*part).is_none_or(Value::is_null) {
                map.insert((*part).to_owned(), value);
            }
            return;
        }
        cur = map
            .entry((*part).to_owned())
            .or_insert_with(|| Value::Object(Map::new()));
    }
}

fn each_mut<'a>(v: &'a mut Value, key: &str) -> impl Iterator<Item = &'a mut Value> {
    v.get_mut(key)
        .and_then(Value::as_array_mut)
        .into_iter()
        .flat_map(|a| a.iter_mut())
}

/// The image tag, for the imagePullPolicy default.
fn image_tag(image: &str) -> Option<&str> {
    if image.contains('@') {
        return Some("@digest");
    }
    let last = image.rsplit('/').next().unwrap_or(image);
    last.split_once(':').map(|(_, t)| t)
}

fn default_container(c: &mut Value) {
    let policy = match c["image"].as_str().and_then(image_tag) {
        None | Some("latest") => "Always",
        Some(_) => "IfNotPresent",
    };
    default_at(c, &["imagePullPolicy"], json!(policy));
    default_at(
        c,
        &["terminationMessagePath"],
        json!("/dev/termination-log"),
    );
    default_at(c, &["terminationMessagePolicy"], json!("File"));
    for port in each_mut(c, "ports") {
        default_at(port, &["protocol"], json!("TCP"));
    }
    // Requests default to limits when only limits are given.
    if let Some(limits) = c["resources"]["limits"].as_object().cloned() {
        for (k, v) in limits {
            default_at(c, &["resources", "requests", &k], v);
        }
    }
}

fn default_pod_spec(spec: &mut Value) {
    default_at(spec, &["restartPolicy"], json!("Always"));
    default_at(spec, &["terminationGracePeriodSeconds"], json!(30));
    default_at(spec, &["dnsPolicy"], json!("ClusterFirst"));
    default_at(spec, &["schedulerName"], json!("default-scheduler"));
    default_at(spec, &["securityContext"], json!({}));
    default_at(spec, &["enableServiceLinks"], json!(true));
    for key in ["containers", "initContainers"] {
        for c in each_mut(spec, key) {
            default_container(c);
        }
    }
    for v in each_mut(spec, "volumes") {
        for (source, mode) in [
            ("configMap", "defaultMode"),
            ("secret", "defaultMode"),
            ("downwardAPI", "defaultMode"),
        ] {
            if v.get(source).is_some_and(Value::is_object) {
                default_at(v, &[source, mode], json!(0o644));
            }
        }
    }
}

/// Admission defaults for a pod: service account and priority. (The
/// not-ready/unreachable tolerations are the API server's admission, whose
/// toleration seconds are configurable.)
fn default_pod_admission(spec: &mut Value) {
    default_at(spec, &["serviceAccountName"], json!("default"));
    default_at(spec, &["priority"], json!(0));
}

fn default_template(obj: &mut Value, path: &[&str]) {
    let mut cur = &mut *obj;
    for p in path {
        match cur.get_mut(*p) {
            Some(v) => cur = v,
            None => return,
        }
    }
    if let Some(spec) = cur.get_mut("spec") {
        default_pod_spec(spec);
    }
}

/// Knative's defaults for a revision's spec: the request timeout, no
/// concurrency limit, no service links, and container names.
fn default_revision_spec(spec: &mut Value) {
    default_at(spec, &["timeoutSeconds"], json!(300));
    default_at(spec, &["containerConcurrency"], json!(0));
    default_at(spec, &["enableServiceLinks"], json!(false));
    let containers = each_mut(spec, "containers").collect::<Vec<_>>();
    let several = containers.len() > 1;
    for (i, c) in containers.into_iter().enumerate() {
        let name = if several {
            format!("user-container-{i}")
        } else {
            "user-container".to_owned()
        };
        if c.get("name")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
            && let Some(c) = c.as_object_mut()
        {
            c.insert("name".into(), json!(name));
        }
    }
}

/// Knative's traffic defaults: all of it to the latest revision when none
/// is given; a target naming no revision follows the latest one.
fn default_traffic(spec: &mut Value) {
    if spec
        .get("traffic")
        .and_then(Value::as_array)
        .is_none_or(Vec::is_empty)
        && let Some(s) = spec.as_object_mut()
    {
        s.insert(
            "traffic".into(),
            json!([{"latestRevision": true, "percent": 100}]),
        );
    }
    for t in each_mut(spec, "traffic") {
        let latest = t.get("revisionName").is_none();
        default_at(t, &["latestRevision"], json!(latest));
    }
}

/// Fills defaults into `obj` of type `rt`.
pub fn apply_defaults(rt: &ResourceType, obj: &mut Value) {
    if let Some(custom) = rt.custom {
        crate::custom::apply_defaults(&custom.schema, obj);
        return;
    }
    match rt.id() {
        "CustomResourceDefinition" => {
            if let Some(versions) = obj["spec"]["versions"].as_array_mut() {
                for v in versions {
                    default_at(v, &["served"], json!(true));
                }
            }
            if obj["spec"]["names"].is_object() {
                let kind = obj["spec"]["names"]["kind"]
                    .as_str()
                    .unwrap_or_default()
                    .to_lowercase();
                let list = format!(
                    "{}List",
                    obj["spec"]["names"]["kind"].as_str().unwrap_or_default()
                );
                default_at(&mut obj["spec"]["names"], &["singular"], json!(kind));
                default_at(&mut obj["spec"]["names"], &["listKind"], json!(list));
            }
            if obj["spec"].is_object() {
                default_at(
                    &mut obj["spec"],
                    &["conversion"],
                    json!({"strategy": "None"}),
                );
                if obj["spec"]["conversion"]["strategy"] == "Webhook"
                    && let Some(config) = obj.pointer_mut("/spec/conversion/webhook/clientConfig")
                {
                    crate::webhooks::default_client_config(config);
                }
            }
        }
        "MutatingWebhookConfiguration" => crate::webhooks::default_configuration(obj, true),
        "ValidatingWebhookConfiguration" => crate::webhooks::default_configuration(obj, false),
        "ValidatingAdmissionPolicy" => crate::admission_policy::default_policy(obj),
        "ValidatingAdmissionPolicyBinding" => crate::admission_policy::default_binding(obj),
        "HorizontalPodAutoscaler" => {
            if let Some(spec) = obj.get_mut("spec") {
                default_at(spec, &["minReplicas"], json!(1));
                default_at(
                    spec,
                    &["metrics"],
                    json!([{"type": "Resource", "resource": {"name": "cpu",
                        "target": {"type": "Utilization", "averageUtilization": 80}}}]),
                );
                // As Kubernetes: a behavior given in part is completed.
                if spec.get("behavior").is_some_and(Value::is_object) {
                    let behavior = &mut spec["behavior"];
                    default_at(
                        behavior,
                        &["scaleUp"],
                        json!({"stabilizationWindowSeconds": 0, "selectPolicy": "Max",
                               "policies": [{"type": "Pods", "value": 4, "periodSeconds": 15},
                                            {"type": "Percent", "value": 100, "periodSeconds": 15}]}),
                    );
                    default_at(
                        behavior,
                        &["scaleDown"],
                        json!({"stabilizationWindowSeconds": 300, "selectPolicy": "Max",
                               "policies": [{"type": "Percent", "value": 100, "periodSeconds": 15}]}),
                    );
                    let up = json!([{"type": "Pods", "value": 4, "periodSeconds": 15},
                                    {"type": "Percent", "value": 100, "periodSeconds": 15}]);
                    let down = json!([{"type": "Percent", "value": 100, "periodSeconds": 15}]);
                    for (dir, window, policies) in [("scaleUp", 0, up), ("scaleDown", 300, down)] {
                        if let Some(rules) = behavior.get_mut(dir) {
                            default_at(rules, &["stabilizationWindowSeconds"], json!(window));
                            default_at(rules, &["selectPolicy"], json!("Max"));
                            default_at(rules, &["policies"], policies);
                        }
                    }
                }
            }
        }
        "knative.Service" => {
            if let Some(spec) = obj.get_mut("spec") {
                if let Some(t) = spec.pointer_mut("/template/spec") {
                    default_revision_spec(t);
                }
                default_traffic(spec);
            }
        }
        "Configuration" => {
            if let Some(t) = obj.pointer_mut("/spec/template/spec") {
                default_revision_spec(t);
            }
        }
        "Revision" => {
            if let Some(spec) = obj.get_mut("spec") {
                default_revision_spec(spec);
            }
        }
        "Route" => {
            if let Some(spec) = obj.get_mut("spec") {
                default_traffic(spec);
            }
        }
        "Pod" => {
            if let Some(spec) = obj.get_mut("spec") {
                default_pod_spec(spec);
                default_pod_admission(spec);
            }
        }
        "Deployment" => {
            default_at(obj, &["spec", "replicas"], json!(1));
            default_at(obj, &["spec", "revisionHistoryLimit"], json!(10));
            default_at(obj, &["spec", "progressDeadlineSeconds"], json!(600));
            default_at(obj, &["spec", "strategy", "type"], json!("RollingUpdate"));
            if obj["spec"]["strategy"]["type"] == "RollingUpdate" {
                default_at(
                    obj,
                    &["spec", "strategy", "rollingUpdate", "maxSurge"],
                    json!("25%"),
                );
                default_at(
                    obj,
                    &["spec", "strategy", "rollingUpdate", "maxUnavailable"],
                    json!("25%"),
                );
            }
            default_template(obj, &["spec", "template"]);
        }
        "ReplicaSet" => {
            default_at(obj, &["spec", "replicas"], json!(1));
            default_template(obj, &["spec", "template"]);
        }
        "DaemonSet" => {
            default_at(obj, &["spec", "revisionHistoryLimit"], json!(10));
            default_at(
                obj,
                &["spec", "updateStrategy", "type"],
                json!("RollingUpdate"),
            );
            if obj["spec"]["updateStrategy"]["type"] == "RollingUpdate" {
                default_at(
                    obj,
                    &["spec", "updateStrategy", "rollingUpdate", "maxUnavailable"],
                    json!(1),
                );
                default_at(
                    obj,
                    &["spec", "updateStrategy", "rollingUpdate", "maxSurge"],
                    json!(0),
                );
            }
            default_template(obj, &["spec", "template"]);
        }
        "StatefulSet" => {
            default_at(obj, &["spec", "replicas"], json!(1));
            default_at(obj, &["spec", "revisionHistoryLimit"], json!(10));
            default_at(obj, &["spec", "podManagementPolicy"], json!("OrderedReady"));
            default_at(
                obj,
                &["spec", "updateStrategy", "type"],
                json!("RollingUpdate"),
            );
            if obj["spec"]["updateStrategy"]["type"] == "RollingUpdate" {
                default_at(
                    obj,
                    &["spec", "updateStrategy", "rollingUpdate", "partition"],
                    json!(0),
                );
            }
            default_at(
                obj,
                &["spec", "persistentVolumeClaimRetentionPolicy"],
                json!({"whenDeleted": "Retain", "whenScaled": "Retain"}),
            );
            default_template(obj, &["spec", "template"]);
            if let Some(templates) = obj["spec"]
                .get_mut("volumeClaimTemplates")
                .and_then(Value::as_array_mut)
            {
                for t in templates {
                    default_at(t, &["spec", "volumeMode"], json!("Filesystem"));
                    default_at(t, &["status", "phase"], json!("Pending"));
                }
            }
        }
        "Job" => default_job_spec(obj.get_mut("spec")),
        "CronJob" => {
            default_at(obj, &["spec", "concurrencyPolicy"], json!("Allow"));
            default_at(obj, &["spec", "suspend"], json!(false));
            default_at(obj, &["spec", "successfulJobsHistoryLimit"], json!(3));
            default_at(obj, &["spec", "failedJobsHistoryLimit"], json!(1));
            default_job_spec(
                obj.get_mut("spec")
                    .and_then(|s| s.get_mut("jobTemplate"))
                    .and_then(|t| t.get_mut("spec")),
            );
        }
        "Service" => {
            default_at(obj, &["spec", "type"], json!("ClusterIP"));
            default_at(obj, &["spec", "sessionAffinity"], json!("None"));
            if obj["spec"]["type"] != "ExternalName" {
                default_at(obj, &["spec", "internalTrafficPolicy"], json!("Cluster"));
                default_at(obj, &["spec", "ipFamilies"], json!(["IPv4"]));
                default_at(obj, &["spec", "ipFamilyPolicy"], json!("SingleStack"));
            }
            if let Some(spec) = obj.get_mut("spec") {
                for p in each_mut(spec, "ports") {
                    default_at(p, &["protocol"], json!("TCP"));
                    let port = p["port"].clone();
                    default_at(p, &["targetPort"], port);
                }
            }
        }
        "Gateway" => {
            if let Some(spec) = obj.get_mut("spec") {
                for l in each_mut(spec, "listeners") {
                    default_at(l, &["allowedRoutes", "namespaces", "from"], json!("Same"));
                    if let Some(tls) = l.get_mut("tls").filter(|t| t.is_object()) {
                        default_at(tls, &["mode"], json!("Terminate"));
                        for r in each_mut(tls, "certificateRefs") {
                            default_at(r, &["group"], json!(""));
                            default_at(r, &["kind"], json!("Secret"));
                        }
                    }
                }
            }
        }
        "HTTPRoute" => {
            if let Some(spec) = obj.get_mut("spec") {
                for p in each_mut(spec, "parentRefs") {
                    default_at(p, &["group"], json!(crate::gateway_api::GROUP));
                    default_at(p, &["kind"], json!("Gateway"));
                }
                default_at(spec, &["rules"], json!([{}]));
                for rule in each_mut(spec, "rules") {
                    if rule
                        .get("matches")
                        .and_then(Value::as_array)
                        .is_none_or(Vec::is_empty)
                        && let Some(r) = rule.as_object_mut()
                    {
                        r.insert("matches".into(), json!([{}]));
                    }
                    for m in each_mut(rule, "matches") {
                        default_at(m, &["path", "type"], json!("PathPrefix"));
                        default_at(m, &["path", "value"], json!("/"));
                        for h in each_mut(m, "headers") {
                            default_at(h, &["type"], json!("Exact"));
                        }
                        for q in each_mut(m, "queryParams") {
                            default_at(q, &["type"], json!("Exact"));
                        }
                    }
                    for b in each_mut(rule, "backendRefs") {
                        default_at(b, &["group"], json!(""));
                        default_at(b, &["kind"], json!("Service"));
                        default_at(b, &["weight"], json!(1));
                    }
                    for f in each_mut(rule, "filters") {
                        if let Some(r) = f.get_mut("requestRedirect").filter(|r| r.is_object()) {
                            default_at(r, &["statusCode"], json!(302));
                        }
                    }
                }
            }
        }
        "LimitRange" => {
            for item in each_mut(&mut obj["spec"], "limits") {
                crate::quota::default_limit_range_item(item);
            }
        }
        "NetworkPolicy" => {
            // As Kubernetes: ports are TCP unless named otherwise; without
            // policy types, a policy is an Ingress one, and an Egress one
            // too when it has egress rules.
            default_at(obj, &["spec", "podSelector"], json!({}));
            let spec = &mut obj["spec"];
            for dir in ["ingress", "egress"] {
                for rule in each_mut(spec, dir) {
                    for port in each_mut(rule, "ports") {
                        default_at(port, &["protocol"], json!("TCP"));
                    }
                }
            }
            if spec["policyTypes"].as_array().is_none_or(Vec::is_empty) {
                let egress = spec["egress"].as_array().is_some_and(|e| !e.is_empty());
                spec["policyTypes"] = if egress {
                    json!(["Ingress", "Egress"])
                } else {
                    json!(["Ingress"])
                };
            }
        }
        "PriorityClass" => default_at(obj, &["preemptionPolicy"], json!("PreemptLowerPriority")),
        "PersistentVolume" => {
            default_at(
                obj,
                &["spec", "persistentVolumeReclaimPolicy"],
                json!("Retain"),
            );
            default_at(obj, &["spec", "volumeMode"], json!("Filesystem"));
            default_at(obj, &["status", "phase"], json!("Pending"));
        }
        "PersistentVolumeClaim" => {
            default_at(obj, &["spec", "volumeMode"], json!("Filesystem"));
            default_at(obj, &["status", "phase"], json!("Pending"));
        }
        "StorageClass" => {
            default_at(obj, &["reclaimPolicy"], json!("Delete"));
            default_at(obj, &["volumeBindingMode"], json!("Immediate"));
        }
        "Secret" => {
            default_at(obj, &["type"], json!("Opaque"));
            fold_string_data(obj);
        }
        "Namespace" => {
            let name = obj["metadata"]["name"].clone();
            default_at(
                obj,
                &["metadata", "labels", "kubernetes.io/metadata.name"],
                name,
            );
            default_at(obj, &["spec", "finalizers"], json!(["kubernetes"]));
            default_at(obj, &["status", "phase"], json!("Active"));
        }
        _ => {}
    }
}

fn default_job_spec(spec: Option<&mut Value>) {
    let Some(spec) = spec else { return };
    if spec["completions"].is_null() && spec["parallelism"].is_null() {
        default_at(spec, &["completions"], json!(1));
    }
    default_at(spec, &["parallelism"], json!(1));
    default_at(spec, &["backoffLimit"], json!(6));
    default_at(spec, &["completionMode"], json!("NonIndexed"));
    default_at(spec, &["suspend"], json!(false));
    default_at(
        spec,
        &["podReplacementPolicy"],
        json!("TerminatingOrFailed"),
    );
    if let Some(template) = spec.get_mut("template")
        && let Some(pod_spec) = template.get_mut("spec")
    {
        default_pod_spec(pod_spec);
    }
}

/// Moves Secret `stringData` into base64 `data` (write-only convenience field).
fn fold_string_data(obj: &mut Value) {
    let Some(map) = obj.as_object_mut() else {
        return;
    };
    let Some(Value::Object(string_data)) = map.remove("stringData") else {
        return;
    };
    let data = map.entry("data").or_insert_with(|| json!({}));
    if let Some(data) = data.as_object_mut() {
        for (k, v) in string_data {
            let encoded =
                base64::engine::general_purpose::STANDARD.encode(v.as_str().unwrap_or_default());
            data.insert(k, Value::String(encoded));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::lookup;

    #[test]
    fn pod_defaults() {
        let rt = lookup("", "v1", "pods").unwrap();
        let mut pod = json!({"spec": {"containers": [
            {"name": "a", "image": "nginx"}, {"name": "b", "image": "reg:5000/x:1.2", "ports": [{"containerPort": 80}]},
            {"name": "c", "image": "x:latest", "resources": {"limits": {"cpu": "1"}}}]}});
        apply_defaults(rt, &mut pod);
        let policies: Vec<_> = pod["spec"]["containers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["imagePullPolicy"].clone())
            .collect();
        assert_eq!(
            policies,
            [json!("Always"), json!("IfNotPresent"), json!("Always")]
        );
        assert_eq!(pod["spec"]["restartPolicy"], "Always");
        assert_eq!(pod["spec"]["terminationGracePeriodSeconds"], 30);
        assert_eq!(pod["spec"]["containers"][1]["ports"][0]["protocol"], "TCP");
        assert_eq!(
            pod["spec"]["containers"][2]["resources"]["requests"]["cpu"],
            "1"
        );
        // The not-ready/unreachable tolerations are the API server's admission.
        assert!(pod["spec"]["tolerations"].is_null());
        let once = pod.clone();
        apply_defaults(rt, &mut pod);
        assert_eq!(pod, once, "defaulting is idempotent");
    }

    #[test]
    fn secret_string_data_is_folded() {
        let rt = lookup("", "v1", "secrets").unwrap();
        let mut s = json!({"stringData": {"password": "hunter2"}, "data": {"user": "YWRtaW4="}});
        apply_defaults(rt, &mut s);
        assert_eq!(
            s,
            json!({"type": "Opaque", "data": {"user": "YWRtaW4=", "password": "aHVudGVyMg=="}})
        );
    }

    #[test]
    fn deployment_strategy_defaults() {
        let rt = lookup("apps", "v1", "deployments").unwrap();
        let mut d = json!({"spec": {"template": {"spec": {"containers": []}}}});
        apply_defaults(rt, &mut d);
        assert_eq!(
            d["spec"]["strategy"],
            json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}})
        );
        assert_eq!(d["spec"]["replicas"], 1);
    }
}
