//! Webhooks the API server calls: how a `clientConfig` names one (shared by
//! CRD conversion and admission), and the admission webhook configurations
//! (`admissionregistration.k8s.io/v1` Mutating- and
//! ValidatingWebhookConfiguration): their defaults, validation and which
//! requests each webhook's rules match. Data only: the calls themselves
//! are the API server's.

use serde_json::{Value, json};

use crate::custom::{bad, strings};
use crate::field::{FieldError, FieldErrorType};

/// Where a webhook is: a URL, or a Service in the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WebhookEndpoint {
    Url(String),
    Service {
        namespace: String,
        name: String,
        /// The Service port (443 unless set).
        port: u16,
        /// The request path, `/` unless set.
        path: String,
    },
}

/// A webhook's `clientConfig`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookClient {
    pub endpoint: WebhookEndpoint,
    /// PEM certificates to trust for the webhook (`caBundle`); empty for
    /// the system's roots.
    pub ca_bundle: Vec<u8>,
}

impl WebhookClient {
    /// The client config of a validated `clientConfig`.
    pub fn of(config: &Value) -> Self {
        use base64::Engine;
        let endpoint = match config["url"].as_str() {
            Some(url) => WebhookEndpoint::Url(url.to_owned()),
            None => {
                let s = &config["service"];
                WebhookEndpoint::Service {
                    namespace: s["namespace"].as_str().unwrap_or_default().to_owned(),
                    name: s["name"].as_str().unwrap_or_default().to_owned(),
                    port: s["port"]
                        .as_u64()
                        .and_then(|p| u16::try_from(p).ok())
                        .unwrap_or(443),
                    path: s["path"].as_str().unwrap_or("/").to_owned(),
                }
            }
        };
        let ca_bundle = config["caBundle"]
            .as_str()
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
            .unwrap_or_default();
        Self {
            endpoint,
            ca_bundle,
        }
    }
}

/// A `clientConfig` at `at`, as Kubernetes validates it: exactly one of an
/// `https` URL (no user, query or fragment) or a Service (name, namespace,
/// a path starting with `/`, a valid port), and a base64 `caBundle`.
pub fn validate_client_config(config: &Value, at: &str, errs: &mut Vec<FieldError>) {
    if !config.is_object() {
        errs.push(FieldError::required(at, ""));
        return;
    }
    if let Some(b) = config.get("caBundle").and_then(Value::as_str) {
        use base64::Engine;
        if base64::engine::general_purpose::STANDARD.decode(b).is_err() {
            errs.push(bad(&format!("{at}.caBundle"), "", "must be base64-encoded"));
        }
    }
    match (config.get("url"), config.get("service")) {
        (Some(url), None) => {
            let path = format!("{at}.url");
            let text = url.as_str().unwrap_or_default();
            let (scheme, rest) = text.split_once("://").unwrap_or(("", text));
            let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
            if scheme != "https" {
                errs.push(bad(&path, text, "'https' is the only allowed URL scheme"));
            }
            if authority.contains('@') {
                errs.push(bad(
                    &path,
                    text,
                    "user information is not permitted in the URL",
                ));
            } else if authority.is_empty() {
                errs.push(bad(&path, text, "host must be specified"));
            }
            if rest.contains('#') {
                errs.push(bad(&path, text, "fragments are not permitted in the URL"));
            }
            if rest.contains('?') {
                errs.push(bad(
                    &path,
                    text,
                    "query parameters are not permitted in the URL",
                ));
            }
        }
        (None, Some(service)) => {
            let at = format!("{at}.service");
            for key in ["name", "namespace"] {
                if service[key].as_str().is_none_or(str::is_empty) {
                    errs.push(FieldError::required(
                        format!("{at}.{key}"),
                        format!("service {key} is required"),
                    ));
                }
            }
            if let Some(path) = service.get("path")
                && !path.as_str().is_some_and(|p| p.starts_with('/'))
            {
                errs.push(bad(
                    &format!("{at}.path"),
                    path.clone(),
                    "must start with a '/'",
                ));
            }
            if let Some(port) = service.get("port")
                && !port.as_u64().is_some_and(|p| (1..=65535).contains(&p))
            {
                errs.push(bad(
                    &format!("{at}.port"),
                    port.clone(),
                    "port is not valid: must be between 1 and 65535, inclusive",
                ));
            }
        }
        _ => errs.push(FieldError::required(
            at,
            "exactly one of url or service is required",
        )),
    }
}

/// Review versions a webhook must accept one of.
fn validate_review_versions(v: &Value, at: &str, errs: &mut Vec<FieldError>) {
    if !strings(v).iter().any(|v| v == "v1" || v == "v1beta1") {
        errs.push(bad(
            at,
            v.clone(),
            "must include at least one of v1, v1beta1",
        ));
    }
}

/// Fills in a `clientConfig.service`'s default port.
pub fn default_client_config(config: &mut Value) {
    if let Some(service) = config.get_mut("service").filter(|s| s.is_object())
        && service.get("port").is_none_or(Value::is_null)
    {
        service["port"] = json!(443);
    }
}

/// What decides whether an admission webhook is called for a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub operations: Vec<String>,
    pub api_groups: Vec<String>,
    pub api_versions: Vec<String>,
    /// `pods`, `pods/status`, `pods/*`, `*/scale`, `*` or `*/*`.
    pub resources: Vec<String>,
    /// `Cluster`, `Namespaced` or `*`.
    pub scope: String,
}

/// The request an admission rule is matched against.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// `CREATE`, `UPDATE`, `DELETE` or `CONNECT`.
    pub operation: &'a str,
    pub group: &'a str,
    pub version: &'a str,
    pub resource: &'a str,
    /// The subresource, or `""`.
    pub subresource: &'a str,
    pub namespaced: bool,
}

impl Rule {
    pub fn of(v: &Value) -> Self {
        Self {
            operations: strings(&v["operations"]),
            api_groups: strings(&v["apiGroups"]),
            api_versions: strings(&v["apiVersions"]),
            resources: strings(&v["resources"]),
            scope: v["scope"].as_str().unwrap_or("*").to_owned(),
        }
    }

    /// Whether the rule covers `req`, as Kubernetes' rule matcher decides.
    pub fn matches(&self, req: &Request<'_>) -> bool {
        let any = |list: &[String], want: &str| list.iter().any(|x| x == "*" || x == want);
        let scope = match self.scope.as_str() {
            "Cluster" => !req.namespaced,
            "Namespaced" => req.namespaced,
            _ => true,
        };
        scope
            && any(&self.operations, req.operation)
            && any(&self.api_groups, req.group)
            && any(&self.api_versions, req.version)
            && self.resources.iter().any(|r| {
                let (res, sub) = r.split_once('/').unwrap_or((r, ""));
                let resource = res == "*" || res == req.resource;
                let subresource = match (sub, req.subresource) {
                    ("*", _) => true,
                    (s, want) => s == want,
                };
                // `*` alone is every resource but no subresource.
                resource && subresource
            })
    }
}

/// One webhook of a configuration, defaulted and validated.
#[derive(Debug, Clone, PartialEq)]
pub struct AdmissionWebhook {
    /// The configuration it belongs to, then its own name.
    pub configuration: String,
    pub name: String,
    pub client: WebhookClient,
    pub rules: Vec<Rule>,
    /// `failurePolicy: Ignore`: a failed call lets the request through.
    pub ignore_failure: bool,
    pub namespace_selector: Value,
    pub object_selector: Value,
    /// `None` or `NoneOnDryRun` (what v1 allows): called for dry runs too.
    pub side_effects: String,
    pub timeout_seconds: u64,
    pub review_versions: Vec<String>,
    /// `reinvocationPolicy: IfNeeded` (mutating webhooks).
    pub reinvoke: bool,
    /// `matchConditions`: (name, CEL expression), all of which must hold.
    pub match_conditions: Vec<(String, String)>,
}

impl AdmissionWebhook {
    /// The webhooks of a stored configuration, in its order.
    pub fn all_of(configuration: &Value) -> Vec<Self> {
        let name = configuration["metadata"]["name"]
            .as_str()
            .unwrap_or_default();
        configuration["webhooks"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|w| Self {
                configuration: name.to_owned(),
                name: w["name"].as_str().unwrap_or_default().to_owned(),
                client: WebhookClient::of(&w["clientConfig"]),
                rules: w["rules"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(Rule::of)
                    .collect(),
                ignore_failure: w["failurePolicy"] == "Ignore",
                namespace_selector: w["namespaceSelector"].clone(),
                object_selector: w["objectSelector"].clone(),
                side_effects: w["sideEffects"].as_str().unwrap_or_default().to_owned(),
                timeout_seconds: w["timeoutSeconds"].as_u64().unwrap_or(10),
                review_versions: strings(&w["admissionReviewVersions"]),
                reinvoke: w["reinvocationPolicy"] == "IfNeeded",
                match_conditions: w["matchConditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|c| {
                        (
                            c["name"].as_str().unwrap_or_default().to_owned(),
                            c["expression"].as_str().unwrap_or_default().to_owned(),
                        )
                    })
                    .collect(),
            })
            .collect()
    }

    /// Whether every `matchConditions` expression holds, with `object`,
    /// `oldObject` and `request` (the AdmissionReview's request) bound as
    /// in Kubernetes; the first that does not, by name, or an evaluation
    /// error.
    pub fn conditions_hold(
        &self,
        object: &Value,
        old_object: &Value,
        request: &Value,
    ) -> Result<Result<(), String>, String> {
        for (name, expression) in &self.match_conditions {
            let vars = [
                ("object", object),
                ("oldObject", old_object),
                ("request", request),
            ];
            match crate::custom::run_cel(expression, &vars) {
                Ok(cel_interpreter::Value::Bool(true)) => {}
                Ok(cel_interpreter::Value::Bool(false)) => return Ok(Err(name.clone())),
                Ok(other) => {
                    return Err(format!(
                        "match condition {name:?} gave {other:?}, not a boolean"
                    ));
                }
                Err(e) => return Err(format!("match condition {name:?}: {e}")),
            }
        }
        Ok(Ok(()))
    }

    /// Whether a rule of this webhook covers `req`.
    pub fn matches(&self, req: &Request<'_>) -> bool {
        self.rules.iter().any(|r| r.matches(req))
    }
}

/// Kubernetes' defaults for a webhook configuration's webhooks.
pub fn default_configuration(obj: &mut Value, mutating: bool) {
    let Some(webhooks) = obj.get_mut("webhooks").and_then(Value::as_array_mut) else {
        return;
    };
    for w in webhooks.iter_mut().filter(|w| w.is_object()) {
        let mut set = |key: &str, v: Value| {
            if w.get(key).is_none_or(Value::is_null) {
                w[key] = v;
            }
        };
        set("failurePolicy", json!("Fail"));
        set("matchPolicy", json!("Equivalent"));
        set("namespaceSelector", json!({}));
        set("objectSelector", json!({}));
        set("timeoutSeconds", json!(10));
        if mutating {
            set("reinvocationPolicy", json!("Never"));
        }
        if let Some(rules) = w.get_mut("rules").and_then(Value::as_array_mut) {
            for r in rules.iter_mut().filter(|r| r.is_object()) {
                if r.get("scope").is_none_or(Value::is_null) {
                    r["scope"] = json!("*");
                }
            }
        }
        if let Some(config) = w.get_mut("clientConfig") {
            default_client_config(config);
        }
    }
}

/// A webhook configuration, as Kubernetes' validation checks it.
pub fn validate_configuration(obj: &Value, mutating: bool) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let mut names = std::collections::BTreeSet::new();
    for (i, w) in obj["webhooks"].as_array().into_iter().flatten().enumerate() {
        let at = format!("webhooks[{i}]");
        let name = w["name"].as_str().unwrap_or_default();
        if name.is_empty() {
            errs.push(FieldError::required(format!("{at}.name"), ""));
        } else if crate::names::dns1123_subdomain(name).is_err() || name.split('.').count() < 3 {
            errs.push(bad(
                &format!("{at}.name"),
                name,
                "should be a domain with at least three segments separated by dots",
            ));
        } else if !names.insert(name) {
            errs.push(FieldError::new(
                FieldErrorType::Duplicate,
                format!("{at}.name"),
                Some(format!("\"{name}\"")),
                "",
            ));
        }
        validate_client_config(&w["clientConfig"], &format!("{at}.clientConfig"), &mut errs);
        validate_review_versions(
            &w["admissionReviewVersions"],
            &format!("{at}.admissionReviewVersions"),
            &mut errs,
        );
        let choice = |key: &str, allowed: &[&str], errs: &mut Vec<FieldError>| match w[key].as_str()
        {
            Some(v) if allowed.contains(&v) => {}
            Some(v) => errs.push(FieldError::not_supported(format!("{at}.{key}"), v, allowed)),
            None => errs.push(FieldError::required(format!("{at}.{key}"), "")),
        };
        choice("sideEffects", &["None", "NoneOnDryRun"], &mut errs);
        choice("failurePolicy", &["Fail", "Ignore"], &mut errs);
        choice("matchPolicy", &["Equivalent", "Exact"], &mut errs);
        if mutating {
            choice("reinvocationPolicy", &["IfNeeded", "Never"], &mut errs);
        }
        if let Some(t) = w.get("timeoutSeconds")
            && !t.as_u64().is_some_and(|t| (1..=30).contains(&t))
        {
            errs.push(bad(
                &format!("{at}.timeoutSeconds"),
                t.clone(),
                "the timeout value must be between 1 and 30 seconds",
            ));
        }
        for key in ["namespaceSelector", "objectSelector"] {
            if let Some(sel) = w.get(key).filter(|s| !s.is_null())
                && let Err(e) = serde_json::from_value::<
                    k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
                >(sel.clone())
                .map_err(|e| e.to_string())
                .and_then(|s| crate::selectors::LabelSelector::from_api(&s))
            {
                errs.push(bad(&format!("{at}.{key}"), sel.clone(), e));
            }
        }
        for (j, r) in w["rules"].as_array().into_iter().flatten().enumerate() {
            let at = format!("{at}.rules[{j}]");
            let ops = strings(&r["operations"]);
            if ops.is_empty() {
                errs.push(FieldError::required(format!("{at}.operations"), ""));
            }
            for op in &ops {
                if !["*", "CREATE", "UPDATE", "DELETE", "CONNECT"].contains(&op.as_str()) {
                    errs.push(FieldError::not_supported(
                        format!("{at}.operations"),
                        op,
                        &["*", "CONNECT", "CREATE", "DELETE", "UPDATE"],
                    ));
                }
            }
            for key in ["apiGroups", "apiVersions", "resources"] {
                if strings(&r[key]).is_empty() {
                    errs.push(FieldError::required(format!("{at}.{key}"), ""));
                }
            }
            if let Some(scope) = r["scope"].as_str()
                && !["*", "Cluster", "Namespaced"].contains(&scope)
            {
                errs.push(FieldError::not_supported(
                    format!("{at}.scope"),
                    scope,
                    &["*", "Cluster", "Namespaced"],
                ));
            }
        }
        let mut condition_names = std::collections::BTreeSet::new();
        for (j, c) in w["matchConditions"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            let at = format!("{at}.matchConditions[{j}]");
            let name = c["name"].as_str().unwrap_or_default();
            if name.is_empty() {
                errs.push(FieldError::required(format!("{at}.name"), ""));
            } else if !condition_names.insert(name) {
                errs.push(FieldError::new(
                    FieldErrorType::Duplicate,
                    format!("{at}.name"),
                    Some(format!("\"{name}\"")),
                    "",
                ));
            }
            match c["expression"].as_str() {
                None | Some("") => errs.push(FieldError::required(format!("{at}.expression"), "")),
                Some(e) => {
                    if let Err(why) = crate::custom::program(e) {
                        errs.push(bad(
                            &format!("{at}.expression"),
                            e,
                            format!("compilation failed: {why}"),
                        ));
                    }
                }
            }
        }
    }
    errs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req<'a>(op: &'a str, resource: &'a str, sub: &'a str) -> Request<'a> {
        Request {
            operation: op,
            group: "",
            version: "v1",
            resource,
            subresource: sub,
            namespaced: true,
        }
    }

    #[test]
    fn rules_match_operations_resources_subresources_and_scope() {
        let rule = |resources: Value, scope: &str| {
            Rule::of(
                &json!({"operations": ["CREATE", "UPDATE"], "apiGroups": [""],
                             "apiVersions": ["*"], "resources": resources, "scope": scope}),
            )
        };
        let pods = rule(json!(["pods"]), "*");
        assert!(pods.matches(&req("CREATE", "pods", "")));
        assert!(!pods.matches(&req("DELETE", "pods", "")));
        assert!(!pods.matches(&req("UPDATE", "pods", "status")));
        assert!(!pods.matches(&req("CREATE", "services", "")));
        assert!(rule(json!(["pods/status"]), "*").matches(&req("UPDATE", "pods", "status")));
        assert!(rule(json!(["pods/*"]), "*").matches(&req("UPDATE", "pods", "status")));
        assert!(rule(json!(["*/*"]), "*").matches(&req("UPDATE", "services", "status")));
        assert!(!rule(json!(["*"]), "*").matches(&req("UPDATE", "pods", "status")));
        assert!(rule(json!(["*"]), "*").matches(&req("CREATE", "configmaps", "")));
        assert!(!rule(json!(["pods"]), "Cluster").matches(&req("CREATE", "pods", "")));
    }

    #[test]
    fn configurations_are_defaulted_and_validated_as_kubernetes_does() {
        let mut config = json!({"webhooks": [{
            "name": "pods.demo.example.com", "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
            "clientConfig": {"service": {"namespace": "w", "name": "hook"}},
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}],
        }]});
        default_configuration(&mut config, true);
        let w = &config["webhooks"][0];
        assert_eq!(
            (
                &w["failurePolicy"],
                &w["timeoutSeconds"],
                &w["reinvocationPolicy"]
            ),
            (&json!("Fail"), &json!(10), &json!("Never"))
        );
        assert_eq!(w["clientConfig"]["service"]["port"], 443);
        assert_eq!(w["rules"][0]["scope"], "*");
        assert!(validate_configuration(&config, true).is_empty());
        let hook = &AdmissionWebhook::all_of(&config)[0];
        assert_eq!(
            hook.client.endpoint,
            WebhookEndpoint::Service {
                namespace: "w".into(),
                name: "hook".into(),
                port: 443,
                path: "/".into()
            }
        );

        let mut broken = config.clone();
        broken["webhooks"][0]["name"] = json!("short.name");
        broken["webhooks"][0]["sideEffects"] = json!("Some");
        broken["webhooks"][0]["timeoutSeconds"] = json!(31);
        broken["webhooks"][0]["clientConfig"] = json!({"url": "http://x/y?z"});
        broken["webhooks"][0]["rules"][0]["operations"] = json!(["PATCH"]);
        broken["webhooks"][0]["matchConditions"] = json!([{"name": "a", "expression": "object.("}]);
        let fields: Vec<String> = validate_configuration(&broken, true)
            .into_iter()
            .map(|e| e.field)
            .collect();
        assert_eq!(
            fields,
            [
                "webhooks[0].name",
                "webhooks[0].clientConfig.url",
                "webhooks[0].clientConfig.url",
                "webhooks[0].sideEffects",
                "webhooks[0].timeoutSeconds",
                "webhooks[0].rules[0].operations",
                "webhooks[0].matchConditions[0].expression",
            ]
        );
    }
}
