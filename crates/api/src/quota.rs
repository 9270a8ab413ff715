//! Resource quotas and limit ranges, evaluated as Kubernetes' ResourceQuota
//! and LimitRanger admission plugins and its quota controller evaluate
//! them: what an object uses of the resources a ResourceQuota names, which
//! quotas' scopes a pod falls in, and a LimitRange's defaults and bounds
//! for a pod. The API server admits with it; the controller recounts with it.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Value, json};

use crate::quantity::{self, Quantity};

/// Resource name to amount (`pods`, `requests.cpu`, `count/deployments.apps`).
pub type Usage = BTreeMap<String, Quantity>;

const ONE: Quantity = Quantity(1000);

/// The core kinds a quota may also count under their plain plural
/// (`pods` as well as `count/pods`).
const LEGACY_COUNTS: &[&str] = &[
    "pods",
    "services",
    "secrets",
    "configmaps",
    "persistentvolumeclaims",
    "replicationcontrollers",
    "resourcequotas",
];

/// The compute resources a pod's requests are also counted under without
/// the `requests.` prefix, and that have limits counted as `limits.*`.
const STANDARD_COMPUTE: &[&str] = &["cpu", "memory", "ephemeral-storage"];

/// The names under which a quota counts objects of `group`/`plural`.
pub fn count_names(group: &str, plural: &str) -> Vec<String> {
    let mut names = vec![if group.is_empty() {
        format!("count/{plural}")
    } else {
        format!("count/{plural}.{group}")
    }];
    if group.is_empty() && LEGACY_COUNTS.contains(&plural) {
        names.push(plural.to_owned());
    }
    names
}

/// The kind (`group`, `plural`) a resource name counts objects of, for a
/// name that counts objects (`pods`, `count/deployments.apps`).
pub fn counted_kind(resource: &str) -> Option<(String, String)> {
    if let Some(qualified) = resource.strip_prefix("count/") {
        return Some(match qualified.split_once('.') {
            Some((plural, group)) => (group.to_owned(), plural.to_owned()),
            None => (String::new(), qualified.to_owned()),
        });
    }
    LEGACY_COUNTS
        .contains(&resource)
        .then(|| (String::new(), resource.to_owned()))
}

/// The kind whose objects a resource name is measured on: the counted kind,
/// pods for compute resources, services for their ports and balancers,
/// claims for storage.
pub fn measured_kind(resource: &str) -> Option<(String, String)> {
    if let Some(kind) = counted_kind(resource) {
        return Some(kind);
    }
    let core = |plural: &str| Some((String::new(), plural.to_owned()));
    match resource {
        "services.nodeports" | "services.loadbalancers" => core("services"),
        "requests.storage" => core("persistentvolumeclaims"),
        r if r.ends_with(".storageclass.storage.k8s.io/requests.storage")
            || r.ends_with(".storageclass.storage.k8s.io/persistentvolumeclaims") =>
        {
            core("persistentvolumeclaims")
        }
        r if r.starts_with("requests.")
            || r.starts_with("limits.")
            || STANDARD_COMPUTE.contains(&r) =>
        {
            core("pods")
        }
        _ => None,
    }
}

/// Whether a pod still holds what it asked for: it is not finished.
pub fn pod_counts(pod: &Value) -> bool {
    !matches!(
        pod["status"]["phase"].as_str(),
        Some("Succeeded" | "Failed")
    )
}

fn quantity_of(v: &Value) -> Option<Quantity> {
    v.as_str()
        .and_then(|s| quantity::parse(s).ok())
        .or_else(|| v.as_f64().map(|f| Quantity((f * 1000.0).round() as i128)))
}

fn resource_map(v: &Value) -> BTreeMap<String, Quantity> {
    v.as_object()
        .into_iter()
        .flatten()
        .filter_map(|(k, q)| Some((k.clone(), quantity_of(q)?)))
        .collect()
}

fn containers<'a>(spec: &'a Value, kind: &str) -> impl Iterator<Item = &'a Value> {
    spec[kind].as_array().into_iter().flatten()
}

/// A pod's effective requests or limits (`which`), as the scheduler sees
/// them: the larger of its containers' sum and any one init container's,
/// plus the runtime's overhead. A resource no container names is absent.
fn pod_resources(pod: &Value, which: &str) -> BTreeMap<String, Quantity> {
    let spec = &pod["spec"];
    let mut sum: BTreeMap<String, Quantity> = BTreeMap::new();
    for c in containers(spec, "containers") {
        for (k, q) in resource_map(&c["resources"][which]) {
            sum.entry(k).or_insert(Quantity(0)).0 += q.0;
        }
    }
    for c in containers(spec, "initContainers") {
        for (k, q) in resource_map(&c["resources"][which]) {
            let e = sum.entry(k).or_insert(Quantity(0));
            e.0 = e.0.max(q.0);
        }
    }
    for (k, q) in resource_map(&spec["overhead"]) {
        if let Some(e) = sum.get_mut(&k) {
            e.0 += q.0;
        }
    }
    sum
}

/// What `obj`, an object of `group`/`plural`, uses of every resource a
/// quota can name: one of its kind's count and, for pods, services and
/// claims, what they hold. A finished pod uses nothing.
pub fn usage(group: &str, plural: &str, obj: &Value) -> Usage {
    let mut u = Usage::new();
    if group.is_empty() && plural == "pods" && !pod_counts(obj) {
        return u;
    }
    for name in count_names(group, plural) {
        u.insert(name, ONE);
    }
    match (group, plural) {
        ("", "pods") => {
            for (k, q) in pod_resources(obj, "requests") {
                if STANDARD_COMPUTE.contains(&k.as_str()) {
                    u.insert(k.clone(), q);
                }
                u.insert(format!("requests.{k}"), q);
            }
            for (k, q) in pod_resources(obj, "limits") {
                if STANDARD_COMPUTE.contains(&k.as_str()) {
                    u.insert(format!("limits.{k}"), q);
                }
            }
        }
        ("", "services") => {
            let kind = obj["spec"]["type"].as_str().unwrap_or("ClusterIP");
            let node_ports = if matches!(kind, "NodePort" | "LoadBalancer") {
                obj["spec"]["ports"].as_array().map_or(0, Vec::len)
            } else {
                0
            };
            u.insert(
                "services.nodeports".into(),
                Quantity(node_ports as i128 * 1000),
            );
            u.insert(
                "services.loadbalancers".into(),
                Quantity(if kind == "LoadBalancer" { 1000 } else { 0 }),
            );
        }
        ("", "persistentvolumeclaims") => {
            let storage = quantity_of(&obj["spec"]["resources"]["requests"]["storage"])
                .unwrap_or(Quantity(0));
            u.insert("requests.storage".into(), storage);
            if let Some(class) = obj["spec"]["storageClassName"].as_str() {
                let prefix = format!("{class}.storageclass.storage.k8s.io");
                u.insert(format!("{prefix}/requests.storage"), storage);
                u.insert(format!("{prefix}/persistentvolumeclaims"), ONE);
            }
        }
        _ => {}
    }
    u
}

/// A pod's QoS class: `BestEffort` with no CPU or memory requests or
/// limits anywhere, `Guaranteed` with limits equal to requests for both in
/// every container, else `Burstable`.
pub fn qos_class(pod: &Value) -> &'static str {
    let mut any = false;
    let mut guaranteed = true;
    for c in
        containers(&pod["spec"], "containers").chain(containers(&pod["spec"], "initContainers"))
    {
        let (req, lim) = (&c["resources"]["requests"], &c["resources"]["limits"]);
        for res in ["cpu", "memory"] {
            if !req[res].is_null() || !lim[res].is_null() {
                any = true;
            }
            if lim[res].is_null() || (!req[res].is_null() && req[res] != lim[res]) {
                guaranteed = false;
            }
        }
    }
    match (any, guaranteed) {
        (false, _) => "BestEffort",
        (true, true) => "Guaranteed",
        (true, false) => "Burstable",
    }
}

/// Whether a pod falls in one quota scope.
fn in_scope(scope: &str, pod: &Value) -> bool {
    let terminating = pod["spec"]["activeDeadlineSeconds"].as_i64().is_some();
    match scope {
        "Terminating" => terminating,
        "NotTerminating" => !terminating,
        "BestEffort" => qos_class(pod) == "BestEffort",
        "NotBestEffort" => qos_class(pod) != "BestEffort",
        "PriorityClass" => pod["spec"]["priorityClassName"]
            .as_str()
            .is_some_and(|c| !c.is_empty()),
        "CrossNamespacePodAffinity" => ["podAffinity", "podAntiAffinity"].iter().any(|a| {
            let aff = &pod["spec"]["affinity"][*a];
            let required = aff["requiredDuringSchedulingIgnoredDuringExecution"]
                .as_array()
                .into_iter()
                .flatten();
            let preferred = aff["preferredDuringSchedulingIgnoredDuringExecution"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|w| &w["podAffinityTerm"]);
            required.chain(preferred).any(|t| {
                !t["namespaceSelector"].is_null()
                    || t["namespaces"].as_array().is_some_and(|n| !n.is_empty())
            })
        }),
        _ => false,
    }
}

/// The strings of a JSON array (none if it is not one).
pub fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect()
}

/// One `scopeSelector` expression on a pod.
fn selector_matches(expr: &Value, pod: &Value) -> bool {
    let scope = expr["scopeName"].as_str().unwrap_or_default();
    let values = strings(&expr["values"]);
    if scope != "PriorityClass" {
        return match expr["operator"].as_str() {
            Some("Exists") => in_scope(scope, pod),
            Some("DoesNotExist") => !in_scope(scope, pod),
            _ => false,
        };
    }
    let class = pod["spec"]["priorityClassName"]
        .as_str()
        .filter(|c| !c.is_empty());
    match expr["operator"].as_str() {
        Some("In") => class.is_some_and(|c| values.contains(&c)),
        Some("NotIn") => !class.is_some_and(|c| values.contains(&c)),
        Some("Exists") => class.is_some(),
        Some("DoesNotExist") => class.is_none(),
        _ => false,
    }
}

/// Whether a quota covers `obj` (of `group`/`plural`): a quota with scopes
/// covers only pods in all of its scopes and selector expressions.
pub fn covers(quota: &Value, group: &str, plural: &str, obj: &Value) -> bool {
    let spec = &quota["spec"];
    let scopes = strings(&spec["scopes"]);
    let exprs: Vec<&Value> = spec["scopeSelector"]["matchExpressions"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    if scopes.is_empty() && exprs.is_empty() {
        return true;
    }
    group.is_empty()
        && plural == "pods"
        && scopes.iter().all(|s| in_scope(s, obj))
        && exprs.iter().all(|e| selector_matches(e, obj))
}

/// The hard limits of a quota's spec.
pub fn hard(quota: &Value) -> Usage {
    resource_map(&quota["spec"]["hard"])
}

/// What a quota's status says is used, when that status was taken for the
/// quota's current limits (`None` if it has not caught up with them).
pub fn recorded_used(quota: &Value) -> Option<Usage> {
    let spec_hard: BTreeSet<&String> = quota["spec"]["hard"].as_object()?.keys().collect();
    let status_hard: BTreeSet<&String> = quota["status"]["hard"].as_object()?.keys().collect();
    if spec_hard != status_hard || quota["spec"]["hard"] != quota["status"]["hard"] {
        return None;
    }
    Some(resource_map(&quota["status"]["used"]))
}

/// The status of a quota that has `used` of its resources: `hard` from the
/// spec, `used` for every resource in it, printed like the limit.
pub fn status(quota: &Value, used: &Usage) -> Value {
    let spec_hard = &quota["spec"]["hard"];
    let mut rendered = serde_json::Map::new();
    for (name, limit) in spec_hard.as_object().into_iter().flatten() {
        let like = limit.as_str().unwrap_or_default();
        let q = used.get(name).copied().unwrap_or(Quantity(0));
        rendered.insert(name.clone(), json!(quantity::format(q, like)));
    }
    json!({"hard": spec_hard, "used": rendered})
}

/// The compute resources a quota makes every container state.
const MUST_SPECIFY: &[&str] = &[
    "requests.cpu",
    "cpu",
    "requests.memory",
    "memory",
    "limits.cpu",
    "limits.memory",
];

/// Kubernetes' requirement that a pod under a quota of CPU or memory states
/// them in every container: `must specify limits.cpu for: a,b; ...`.
pub fn missing_compute(quota: &Value, pod: &Value) -> Option<String> {
    let hard = &quota["spec"]["hard"];
    let mut missing: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    let spec = &pod["spec"];
    for c in containers(spec, "containers").chain(containers(spec, "initContainers")) {
        for required in MUST_SPECIFY {
            if hard.get(*required).is_none() {
                continue;
            }
            let (which, res) = required.split_once('.').unwrap_or(("requests", required));
            if c["resources"][which][res].is_null() {
                missing
                    .entry(required)
                    .or_default()
                    .insert(c["name"].as_str().unwrap_or_default());
            }
        }
    }
    if missing.is_empty() {
        return None;
    }
    let parts: Vec<String> = missing
        .iter()
        .map(|(res, names)| {
            format!(
                "{res} for: {}",
                names.iter().copied().collect::<Vec<_>>().join(",")
            )
        })
        .collect();
    Some(format!("must specify {}", parts.join("; ")))
}

/// `k=v,k=v` in key order, as Kubernetes prints resource lists in quota
/// errors.
fn pretty(list: &[(&str, String)]) -> String {
    list.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Checks a charge of `delta` against a quota that has `used`: the
/// message of Kubernetes' refusal (`exceeded quota: NAME, requested: ...,
/// used: ..., limited: ...`) for the resources it would take past their
/// limit, or the new usage.
pub fn charge(quota: &Value, used: &Usage, delta: &Usage) -> Result<Usage, String> {
    let hard = hard(quota);
    let mut next = used.clone();
    let (mut requested, mut was, mut limited) = (Vec::new(), Vec::new(), Vec::new());
    for (name, limit) in &hard {
        let Some(d) = delta.get(name) else { continue };
        let before = used.get(name).copied().unwrap_or(Quantity(0));
        let after = Quantity(before.0 + d.0);
        next.insert(name.clone(), after);
        if after > *limit {
            let like = quota["spec"]["hard"][name].as_str().unwrap_or_default();
            requested.push((name.as_str(), quantity::format(*d, like)));
            was.push((name.as_str(), quantity::format(before, like)));
            limited.push((name.as_str(), like.to_owned()));
        }
    }
    if requested.is_empty() {
        return Ok(next);
    }
    Err(format!(
        "exceeded quota: {}, requested: {}, used: {}, limited: {}",
        quota["metadata"]["name"].as_str().unwrap_or_default(),
        pretty(&requested),
        pretty(&was),
        pretty(&limited)
    ))
}

/// Kubernetes' defaults of a LimitRange's Container item: the default
/// limit from `max`, the default request from the default limit, else from
/// `min`.
pub fn default_limit_range_item(item: &mut Value) {
    if item["type"] != "Container" {
        return;
    }
    for (from, to) in [
        ("max", "default"),
        ("default", "defaultRequest"),
        ("min", "defaultRequest"),
    ] {
        let Some(source) = item[from].as_object().cloned() else {
            continue;
        };
        if !item[to].is_object() {
            item[to] = json!({});
        }
        for (k, v) in source {
            if item[to].get(&k).is_none() {
                item[to][k] = v;
            }
        }
    }
}

/// LimitRanger's defaults: each container (and init container) without a
/// request or limit of a resource gets the first range's default. Returns
/// the `kubernetes.io/limit-ranger` annotation's text, if anything was set.
pub fn apply_limit_defaults(ranges: &[Value], pod: &mut Value) -> Option<String> {
    let mut notes = Vec::new();
    for range in ranges {
        for item in range["spec"]["limits"].as_array().into_iter().flatten() {
            let mut item = item.clone();
            default_limit_range_item(&mut item);
            if item["type"] != "Container" {
                continue;
            }
            for (kind, label) in [
                ("containers", "container"),
                ("initContainers", "init container"),
            ] {
                let Some(list) = pod["spec"][kind].as_array_mut() else {
                    continue;
                };
                for c in list {
                    let name = c["name"].as_str().unwrap_or_default().to_owned();
                    for (from, which, what) in [
                        ("defaultRequest", "requests", "request"),
                        ("default", "limits", "limit"),
                    ] {
                        let mut set = Vec::new();
                        for (k, v) in item[from].as_object().into_iter().flatten() {
                            let resources = &mut c["resources"];
                            if !resources.is_object() {
                                *resources = json!({});
                            }
                            if !resources[which].is_object() {
                                resources[which] = json!({});
                            }
                            if resources[which].get(k).is_none() {
                                resources[which][k] = v.clone();
                                set.push(k.clone());
                            }
                        }
                        if !set.is_empty() {
                            set.sort();
                            notes.push(format!("{} {what} for {label} {name}", set.join(", ")));
                        }
                    }
                }
            }
        }
    }
    (!notes.is_empty()).then(|| format!("LimitRanger plugin set: {}", notes.join("; ")))
}

/// One bound of a LimitRange item on one request and limit, with
/// Kubernetes' messages.
fn bounds(
    limit_type: &str,
    item: &Value,
    requests: &BTreeMap<String, Quantity>,
    limits: &BTreeMap<String, Quantity>,
    errs: &mut Vec<String>,
) {
    let shown = |m: &BTreeMap<String, Quantity>, k: &str, like: &str| {
        m.get(k).map(|q| quantity::format(*q, like))
    };
    for (k, v) in item["min"].as_object().into_iter().flatten() {
        let (Some(min), like) = (quantity_of(v), v.as_str().unwrap_or_default()) else {
            continue;
        };
        match requests.get(k) {
            None => errs.push(format!(
                "minimum {k} usage per {limit_type} is {like}.  No request is specified"
            )),
            Some(r) if *r < min => errs.push(format!(
                "minimum {k} usage per {limit_type} is {like}, but request is {}",
                shown(requests, k, like).unwrap_or_default()
            )),
            Some(_) => {
                if limits.get(k).is_some_and(|l| *l < min) {
                    errs.push(format!(
                        "minimum {k} usage per {limit_type} is {like}, but limit is {}",
                        shown(limits, k, like).unwrap_or_default()
                    ));
                }
            }
        }
    }
    for (k, v) in item["max"].as_object().into_iter().flatten() {
        let (Some(max), like) = (quantity_of(v), v.as_str().unwrap_or_default()) else {
            continue;
        };
        match limits.get(k) {
            None => errs.push(format!(
                "maximum {k} usage per {limit_type} is {like}.  No limit is specified"
            )),
            Some(l) if *l > max => errs.push(format!(
                "maximum {k} usage per {limit_type} is {like}, but limit is {}",
                shown(limits, k, like).unwrap_or_default()
            )),
            Some(_) => {
                if requests.get(k).is_some_and(|r| *r > max) {
                    errs.push(format!(
                        "maximum {k} usage per {limit_type} is {like}, but request is {}",
                        shown(requests, k, like).unwrap_or_default()
                    ));
                }
            }
        }
    }
    for (k, v) in item["maxLimitRequestRatio"]
        .as_object()
        .into_iter()
        .flatten()
    {
        let (Some(ratio), like) = (quantity_of(v), v.as_str().unwrap_or_default()) else {
            continue;
        };
        let request = requests.get(k).filter(|r| r.0 != 0);
        let limit = limits.get(k).filter(|l| l.0 != 0);
        match (request, limit) {
            (None, _) => errs.push(format!(
                "{k} max limit to request ratio per {limit_type} is {like}, but no request is specified or request is 0"
            )),
            (_, None) => errs.push(format!(
                "{k} max limit to request ratio per {limit_type} is {like}, but no limit is specified or limit is 0"
            )),
            (Some(r), Some(l)) => {
                let observed = l.0 as f64 / r.0 as f64;
                if observed > ratio.0 as f64 / 1000.0 {
                    errs.push(format!(
                        "{k} max limit to request ratio per {limit_type} is {like}, but provided ratio is {observed:.6}"
                    ));
                }
            }
        }
    }
}

/// LimitRanger's checks of a pod against the namespace's ranges: each
/// Container item's bounds on every container, each Pod item's on the
/// pod's totals. The messages, in Kubernetes' words.
pub fn check_limits(ranges: &[Value], pod: &Value) -> Vec<String> {
    let mut errs = Vec::new();
    for range in ranges {
        for item in range["spec"]["limits"].as_array().into_iter().flatten() {
            match item["type"].as_str() {
                Some("Container") => {
                    let spec = &pod["spec"];
                    for c in
                        containers(spec, "containers").chain(containers(spec, "initContainers"))
                    {
                        bounds(
                            "Container",
                            item,
                            &resource_map(&c["resources"]["requests"]),
                            &resource_map(&c["resources"]["limits"]),
                            &mut errs,
                        );
                    }
                }
                Some("Pod") => bounds(
                    "Pod",
                    item,
                    &pod_resources(pod, "requests"),
                    &pod_resources(pod, "limits"),
                    &mut errs,
                ),
                _ => {}
            }
        }
    }
    errs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(s: &str) -> Quantity {
        quantity::parse(s).unwrap()
    }

    fn pod(containers: Value) -> Value {
        json!({"metadata": {"name": "p"}, "spec": {"containers": containers}, "status": {"phase": "Pending"}})
    }

    #[test]
    fn a_pod_uses_its_count_and_its_effective_requests_and_limits() {
        let mut p = pod(json!([
            {"name": "a", "resources": {"requests": {"cpu": "250m", "memory": "64Mi"}, "limits": {"cpu": "500m"}}},
            {"name": "b", "resources": {"requests": {"cpu": "250m"}}}
        ]));
        p["spec"]["initContainers"] =
            json!([{"name": "i", "resources": {"requests": {"cpu": "2"}}}]);
        let u = usage("", "pods", &p);
        assert_eq!(u["pods"], ONE);
        assert_eq!(u["count/pods"], ONE);
        // The init container's 2 CPUs outweigh the 500m the others sum to.
        assert_eq!(u["requests.cpu"], q("2"));
        assert_eq!(u["cpu"], q("2"));
        assert_eq!(u["requests.memory"], q("64Mi"));
        assert_eq!(u["limits.cpu"], q("500m"));
        assert!(!u.contains_key("limits.memory"));
        p["status"]["phase"] = json!("Succeeded");
        assert!(usage("", "pods", &p).is_empty());
        let deploy = usage("apps", "deployments", &json!({}));
        assert_eq!(
            deploy.keys().collect::<Vec<_>>(),
            ["count/deployments.apps"]
        );
        assert_eq!(
            counted_kind("count/deployments.apps"),
            Some(("apps".into(), "deployments".into()))
        );
        assert_eq!(
            measured_kind("limits.memory"),
            Some((String::new(), "pods".into()))
        );
    }

    #[test]
    fn a_charge_past_the_limit_is_refused_in_kubernetes_words() {
        let quota = json!({"metadata": {"name": "compute"},
            "spec": {"hard": {"pods": "2", "requests.cpu": "1", "requests.memory": "1Gi"}}});
        let used: Usage = [
            ("pods".to_owned(), q("1")),
            ("requests.cpu".to_owned(), q("800m")),
        ]
        .into();
        let delta: Usage = [
            ("pods".to_owned(), q("1")),
            ("requests.cpu".to_owned(), q("500m")),
            ("requests.memory".to_owned(), q("512Mi")),
        ]
        .into();
        assert_eq!(
            charge(&quota, &used, &delta).unwrap_err(),
            "exceeded quota: compute, requested: requests.cpu=500m, used: requests.cpu=800m, limited: requests.cpu=1"
        );
        let delta: Usage = [
            ("pods".to_owned(), q("1")),
            ("requests.cpu".to_owned(), q("200m")),
        ]
        .into();
        let next = charge(&quota, &used, &delta).unwrap();
        assert_eq!(
            status(&quota, &next)["used"],
            json!({"pods": "2", "requests.cpu": "1", "requests.memory": "0"})
        );
        assert!(recorded_used(&quota).is_none());
    }

    #[test]
    fn scopes_and_required_compute() {
        let best_effort = pod(json!([{"name": "a"}]));
        let mut burstable = pod(json!([{"name": "a", "resources": {"requests": {"cpu": "1"}}}]));
        let scoped = json!({"spec": {"hard": {"pods": "1"}, "scopes": ["BestEffort"]}});
        assert!(covers(&scoped, "", "pods", &best_effort));
        assert!(!covers(&scoped, "", "pods", &burstable));
        assert!(!covers(&scoped, "", "services", &json!({})));
        let by_class = json!({"spec": {"hard": {"pods": "1"}, "scopeSelector": {"matchExpressions": [
            {"scopeName": "PriorityClass", "operator": "In", "values": ["high"]}]}}});
        assert!(!covers(&by_class, "", "pods", &burstable));
        burstable["spec"]["priorityClassName"] = json!("high");
        assert!(covers(&by_class, "", "pods", &burstable));
        let compute = json!({"spec": {"hard": {"requests.cpu": "1", "limits.memory": "1Gi"}}});
        assert_eq!(
            missing_compute(&compute, &burstable).unwrap(),
            "must specify limits.memory for: a"
        );
        assert_eq!(
            missing_compute(&compute, &best_effort).unwrap(),
            "must specify limits.memory for: a; requests.cpu for: a"
        );
    }

    #[test]
    fn limit_ranges_default_then_bound_containers_and_pods() {
        let ranges = [json!({"spec": {"limits": [
            {"type": "Container", "default": {"cpu": "500m"}, "defaultRequest": {"cpu": "100m"},
             "max": {"cpu": "1", "memory": "1Gi"}, "min": {"cpu": "50m"}, "maxLimitRequestRatio": {"cpu": "5"}},
            {"type": "Pod", "max": {"cpu": "1500m"}}
        ]}})];
        let mut p = pod(json!([
            {"name": "a"},
            {"name": "b", "resources": {"requests": {"cpu": "300m", "memory": "2Gi"}, "limits": {"memory": "2Gi"}}}
        ]));
        let note = apply_limit_defaults(&ranges, &mut p).unwrap();
        // `max` also defaults the memory limit, and the memory request from it.
        assert_eq!(
            note,
            "LimitRanger plugin set: cpu, memory request for container a; cpu, memory limit for container a; cpu limit for container b"
        );
        assert_eq!(
            p["spec"]["containers"][0]["resources"]["limits"]["cpu"],
            "500m"
        );
        assert_eq!(
            p["spec"]["containers"][1]["resources"]["requests"]["cpu"],
            "300m"
        );
        assert_eq!(
            check_limits(&ranges, &p),
            ["maximum memory usage per Container is 1Gi, but limit is 2Gi"]
        );
        let greedy = pod(json!([
            {"name": "a", "resources": {"requests": {"cpu": "100m"}, "limits": {"cpu": "1", "memory": "1Gi"}}},
            {"name": "b", "resources": {"requests": {"cpu": "20m"}, "limits": {"cpu": "1", "memory": "1Gi"}}}
        ]));
        assert_eq!(
            check_limits(&ranges, &greedy),
            [
                "cpu max limit to request ratio per Container is 5, but provided ratio is 10.000000",
                "minimum cpu usage per Container is 50m, but request is 20m",
                "cpu max limit to request ratio per Container is 5, but provided ratio is 50.000000",
                "maximum cpu usage per Pod is 1500m, but limit is 2",
            ]
        );
    }
}
