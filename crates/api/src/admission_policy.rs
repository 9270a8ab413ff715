//! ValidatingAdmissionPolicy (`admissionregistration.k8s.io/v1`): CEL
//! validations of writes, declared in a policy and put in force by a
//! binding, as Kubernetes evaluates them. This module holds their
//! defaults, validation and evaluation (pure: the objects, the request and
//! the parameters come in as values); the API server finds which policies
//! a write matches and reads their parameters.

use serde_json::{Value, json};

use crate::custom::{bad, strings};
use crate::field::FieldError;
use crate::webhooks::{Request, Rule};

/// A rule with the resource names it is limited to.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedRule {
    pub rule: Rule,
    pub resource_names: Vec<String>,
}

impl NamedRule {
    fn of(v: &Value) -> Self {
        let mut rule = v.clone();
        if rule["scope"].is_null() {
            rule["scope"] = json!("*");
        }
        Self {
            rule: Rule::of(&rule),
            resource_names: strings(&v["resourceNames"]),
        }
    }

    fn matches(&self, req: &Request<'_>, name: &str) -> bool {
        self.rule.matches(req)
            && (self.resource_names.is_empty() || self.resource_names.iter().any(|n| n == name))
    }
}

/// `matchConstraints` of a policy or `matchResources` of a binding.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Matcher {
    pub rules: Vec<NamedRule>,
    pub excluded: Vec<NamedRule>,
    pub namespace_selector: Value,
    pub object_selector: Value,
}

impl Matcher {
    fn of(v: &Value) -> Self {
        let rules = |key: &str| {
            v[key]
                .as_array()
                .into_iter()
                .flatten()
                .map(NamedRule::of)
                .collect()
        };
        Self {
            rules: rules("resourceRules"),
            excluded: rules("excludeResourceRules"),
            namespace_selector: v["namespaceSelector"].clone(),
            object_selector: v["objectSelector"].clone(),
        }
    }

    /// Whether the rules (not the selectors) cover `req` on object `name`;
    /// a binding's matcher with no rules covers what its policy does.
    pub fn covers(&self, req: &Request<'_>, name: &str, empty_covers: bool) -> bool {
        let included = if self.rules.is_empty() {
            empty_covers
        } else {
            self.rules.iter().any(|r| r.matches(req, name))
        };
        included && !self.excluded.iter().any(|r| r.matches(req, name))
    }
}

/// One validation of a policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Validation {
    pub expression: String,
    pub message: Option<String>,
    pub message_expression: Option<String>,
    /// `Invalid` (422) unless set.
    pub reason: String,
}

/// A policy, defaulted and validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub name: String,
    pub ignore_failure: bool,
    /// `apiVersion` and `kind` of its parameters.
    pub param_kind: Option<(String, String)>,
    pub matcher: Matcher,
    pub match_conditions: Vec<(String, String)>,
    pub variables: Vec<(String, String)>,
    pub validations: Vec<Validation>,
    pub audit_annotations: Vec<(String, String)>,
}

/// Where a binding's parameters are.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamRef {
    pub name: Option<String>,
    pub namespace: Option<String>,
    pub selector: Option<Value>,
    /// `parameterNotFoundAction: Deny`.
    pub deny_when_missing: bool,
}

/// A binding, defaulted and validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Binding {
    pub name: String,
    pub policy: String,
    pub param_ref: Option<ParamRef>,
    pub matcher: Option<Matcher>,
    /// `Deny`, `Warn` and/or `Audit`.
    pub actions: Vec<String>,
}

fn pairs(v: &Value, key: &str, value: &str) -> Vec<(String, String)> {
    v.as_array()
        .into_iter()
        .flatten()
        .map(|x| {
            (
                x[key].as_str().unwrap_or_default().to_owned(),
                x[value].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

impl Policy {
    pub fn of(obj: &Value) -> Self {
        let spec = &obj["spec"];
        Self {
            name: obj["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            ignore_failure: spec["failurePolicy"] == "Ignore",
            param_kind: spec["paramKind"].is_object().then(|| {
                (
                    spec["paramKind"]["apiVersion"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                    spec["paramKind"]["kind"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                )
            }),
            matcher: Matcher::of(&spec["matchConstraints"]),
            match_conditions: pairs(&spec["matchConditions"], "name", "expression"),
            variables: pairs(&spec["variables"], "name", "expression"),
            validations: spec["validations"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|v| Validation {
                    expression: v["expression"].as_str().unwrap_or_default().to_owned(),
                    message: v["message"]
                        .as_str()
                        .filter(|m| !m.is_empty())
                        .map(str::to_owned),
                    message_expression: v["messageExpression"]
                        .as_str()
                        .filter(|m| !m.is_empty())
                        .map(str::to_owned),
                    reason: v["reason"].as_str().unwrap_or("Invalid").to_owned(),
                })
                .collect(),
            audit_annotations: pairs(&spec["auditAnnotations"], "key", "valueExpression"),
        }
    }
}

impl Binding {
    pub fn of(obj: &Value) -> Self {
        let spec = &obj["spec"];
        Self {
            name: obj["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            policy: spec["policyName"].as_str().unwrap_or_default().to_owned(),
            param_ref: spec["paramRef"].is_object().then(|| {
                let r = &spec["paramRef"];
                ParamRef {
                    name: r["name"].as_str().map(str::to_owned),
                    namespace: r["namespace"].as_str().map(str::to_owned),
                    selector: r.get("selector").filter(|s| !s.is_null()).cloned(),
                    deny_when_missing: r["parameterNotFoundAction"] != "Allow",
                }
            }),
            matcher: spec["matchResources"]
                .is_object()
                .then(|| Matcher::of(&spec["matchResources"])),
            actions: strings(&spec["validationActions"]),
        }
    }
}

/// Kubernetes' defaults for a policy.
pub fn default_policy(obj: &mut Value) {
    let Some(spec) = obj.get_mut("spec").filter(|s| s.is_object()) else {
        return;
    };
    if spec.get("failurePolicy").is_none_or(Value::is_null) {
        spec["failurePolicy"] = json!("Fail");
    }
    if let Some(m) = spec.get_mut("matchConstraints").filter(|m| m.is_object()) {
        default_matcher(m);
    }
}

/// Kubernetes' defaults for a binding.
pub fn default_binding(obj: &mut Value) {
    if let Some(m) = obj
        .pointer_mut("/spec/matchResources")
        .filter(|m| m.is_object())
    {
        default_matcher(m);
    }
}

fn default_matcher(m: &mut Value) {
    for key in ["namespaceSelector", "objectSelector"] {
        if m.get(key).is_none_or(Value::is_null) {
            m[key] = json!({});
        }
    }
    if m.get("matchPolicy").is_none_or(Value::is_null) {
        m["matchPolicy"] = json!("Equivalent");
    }
    for key in ["resourceRules", "excludeResourceRules"] {
        for r in m
            .get_mut(key)
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
        {
            if r.is_object() && r.get("scope").is_none_or(Value::is_null) {
                r["scope"] = json!("*");
            }
        }
    }
}

/// Reasons a validation may give, with their HTTP codes.
const REASONS: &[(&str, u16)] = &[
    ("Unauthorized", 401),
    ("Forbidden", 403),
    ("Invalid", 422),
    ("RequestEntityTooLarge", 413),
];

/// The HTTP code of a validation's reason.
pub fn reason_code(reason: &str) -> u16 {
    REASONS
        .iter()
        .find(|(r, _)| *r == reason)
        .map_or(422, |(_, c)| *c)
}

fn check_cel(errs: &mut Vec<FieldError>, path: String, expr: &str) {
    if expr.is_empty() {
        errs.push(FieldError::required(path, ""));
    } else if let Err(e) = crate::custom::program(expr) {
        errs.push(bad(&path, expr, format!("compilation failed: {e}")));
    }
}

/// A policy, as Kubernetes' validation checks it (the parts this server
/// relies on): rules, CEL that compiles, reasons and failure policy.
pub fn validate_policy(obj: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let spec = &obj["spec"];
    match spec["failurePolicy"].as_str() {
        Some("Fail" | "Ignore") | None => {}
        Some(other) => errs.push(FieldError::not_supported(
            "spec.failurePolicy",
            other,
            &["Fail", "Ignore"],
        )),
    }
    if spec["matchConstraints"]["resourceRules"]
        .as_array()
        .is_none_or(Vec::is_empty)
    {
        errs.push(FieldError::required(
            "spec.matchConstraints.resourceRules",
            "",
        ));
    }
    let validations = spec["validations"].as_array().cloned().unwrap_or_default();
    let annotations = spec["auditAnnotations"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if validations.is_empty() && annotations.is_empty() {
        errs.push(FieldError::required(
            "spec.validations",
            "validations or auditAnnotations must contain at least one item",
        ));
    }
    for (i, v) in validations.iter().enumerate() {
        let at = format!("spec.validations[{i}]");
        check_cel(
            &mut errs,
            format!("{at}.expression"),
            v["expression"].as_str().unwrap_or_default(),
        );
        if let Some(m) = v["messageExpression"].as_str().filter(|m| !m.is_empty()) {
            check_cel(&mut errs, format!("{at}.messageExpression"), m);
        }
        if let Some(r) = v["reason"].as_str()
            && !REASONS.iter().any(|(x, _)| *x == r)
        {
            errs.push(FieldError::not_supported(
                format!("{at}.reason"),
                r,
                &REASONS.iter().map(|(r, _)| *r).collect::<Vec<_>>(),
            ));
        }
    }
    for (i, a) in annotations.iter().enumerate() {
        let at = format!("spec.auditAnnotations[{i}]");
        if a["key"].as_str().is_none_or(str::is_empty) {
            errs.push(FieldError::required(format!("{at}.key"), ""));
        }
        check_cel(
            &mut errs,
            format!("{at}.valueExpression"),
            a["valueExpression"].as_str().unwrap_or_default(),
        );
    }
    for (key, what) in [
        ("variables", "expression"),
        ("matchConditions", "expression"),
    ] {
        for (i, v) in spec[key].as_array().into_iter().flatten().enumerate() {
            let at = format!("spec.{key}[{i}]");
            if v["name"].as_str().is_none_or(str::is_empty) {
                errs.push(FieldError::required(format!("{at}.name"), ""));
            }
            check_cel(
                &mut errs,
                format!("{at}.{what}"),
                v[what].as_str().unwrap_or_default(),
            );
        }
    }
    errs
}

/// A binding, as Kubernetes' validation checks it.
pub fn validate_binding(obj: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let spec = &obj["spec"];
    if spec["policyName"].as_str().is_none_or(str::is_empty) {
        errs.push(FieldError::required("spec.policyName", ""));
    }
    let actions = strings(&spec["validationActions"]);
    if actions.is_empty() {
        errs.push(FieldError::required("spec.validationActions", ""));
    }
    for a in &actions {
        if !["Deny", "Warn", "Audit"].contains(&a.as_str()) {
            errs.push(FieldError::not_supported(
                "spec.validationActions",
                a,
                &["Audit", "Deny", "Warn"],
            ));
        }
    }
    if actions.iter().any(|a| a == "Deny") && actions.iter().any(|a| a == "Warn") {
        errs.push(bad(
            "spec.validationActions",
            json!(actions),
            "must not contain both Deny and Warn (repeating the same validation failure information in the API response and headers serves no purpose)",
        ));
    }
    let r = &spec["paramRef"];
    if r.is_object() {
        if r["name"].is_string() == r["selector"].is_object() {
            errs.push(FieldError::required(
                "spec.paramRef",
                "one of name or selector must be set",
            ));
        }
        match r["parameterNotFoundAction"].as_str() {
            Some("Deny" | "Allow") => {}
            Some(other) => errs.push(FieldError::not_supported(
                "spec.paramRef.parameterNotFoundAction",
                other,
                &["Allow", "Deny"],
            )),
            None => errs.push(FieldError::required(
                "spec.paramRef.parameterNotFoundAction",
                "",
            )),
        }
    }
    errs
}

/// A CEL value as JSON, for a variable later expressions read.
fn cel_to_json(v: &cel_interpreter::Value) -> Result<Value, String> {
    use cel_interpreter::Value as Cel;
    use cel_interpreter::objects::Key;
    Ok(match v {
        Cel::Null => Value::Null,
        Cel::Bool(b) => json!(b),
        Cel::Int(i) => json!(i),
        Cel::UInt(u) => json!(u),
        Cel::Float(f) => json!(f),
        Cel::String(s) => json!(s.as_str()),
        Cel::List(items) => Value::Array(items.iter().map(cel_to_json).collect::<Result<_, _>>()?),
        Cel::Map(m) => Value::Object(
            m.map
                .iter()
                .map(|(k, v)| {
                    let key = match k {
                        Key::String(s) => s.to_string(),
                        Key::Int(i) => i.to_string(),
                        Key::Uint(u) => u.to_string(),
                        Key::Bool(b) => b.to_string(),
                    };
                    Ok((key, cel_to_json(v)?))
                })
                .collect::<Result<_, String>>()?,
        ),
        other => return Err(format!("{other:?} cannot be a variable's value here")),
    })
}

/// What a policy's expressions see.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    pub object: &'a Value,
    pub old_object: &'a Value,
    pub request: &'a Value,
    pub params: &'a Value,
    pub namespace_object: &'a Value,
}

/// A validation that did not hold.
#[derive(Debug, Clone, PartialEq)]
pub struct Violation {
    pub message: String,
    pub reason: String,
    pub expression_index: usize,
}

/// What evaluating a policy found.
#[derive(Debug, Default, PartialEq)]
pub struct Evaluation {
    pub violations: Vec<Violation>,
    pub audit_annotations: Vec<(String, String)>,
}

impl Policy {
    fn vars<'a>(input: &Input<'a>, variables: &'a Value) -> [(&'static str, &'a Value); 6] {
        [
            ("object", input.object),
            ("oldObject", input.old_object),
            ("request", input.request),
            ("params", input.params),
            ("namespaceObject", input.namespace_object),
            ("variables", variables),
        ]
    }

    /// Whether every match condition holds; an evaluation error is the
    /// policy's failure.
    pub fn conditions_hold(&self, input: &Input<'_>) -> Result<bool, String> {
        let none = json!({});
        for (name, expr) in &self.match_conditions {
            match crate::custom::run_cel(expr, &Self::vars(input, &none)) {
                Ok(cel_interpreter::Value::Bool(true)) => {}
                Ok(cel_interpreter::Value::Bool(false)) => return Ok(false),
                Ok(other) => {
                    return Err(format!(
                        "match condition {name:?} gave {other:?}, not a boolean"
                    ));
                }
                Err(e) => return Err(format!("match condition {name:?}: {e}")),
            }
        }
        Ok(true)
    }

    /// Runs the validations (and audit annotations); an expression that
    /// cannot be evaluated is the policy's failure.
    pub fn evaluate(&self, input: &Input<'_>) -> Result<Evaluation, String> {
        let mut variables = serde_json::Map::new();
        for (name, expr) in &self.variables {
            let vars_so_far = Value::Object(variables.clone());
            let value = crate::custom::run_cel(expr, &Self::vars(input, &vars_so_far))
                .map_err(|e| format!("variable {name:?}: {e}"))?;
            let value = cel_to_json(&value).map_err(|e| format!("variable {name:?}: {e}"))?;
            variables.insert(name.clone(), value);
        }
        let variables = Value::Object(variables);
        let vars = Self::vars(input, &variables);
        let mut out = Evaluation::default();
        for (i, v) in self.validations.iter().enumerate() {
            match crate::custom::run_cel(&v.expression, &vars) {
                Ok(cel_interpreter::Value::Bool(true)) => {}
                Ok(cel_interpreter::Value::Bool(false)) => {
                    let message = v
                        .message_expression
                        .as_ref()
                        .and_then(|m| match crate::custom::run_cel(m, &vars) {
                            Ok(cel_interpreter::Value::String(s)) if !s.trim().is_empty() => {
                                Some(s.to_string())
                            }
                            _ => None,
                        })
                        .or_else(|| v.message.clone())
                        .unwrap_or_else(|| format!("failed expression: {}", v.expression));
                    out.violations.push(Violation {
                        message,
                        reason: v.reason.clone(),
                        expression_index: i,
                    });
                }
                Ok(other) => {
                    return Err(format!(
                        "expression '{}' resulted in {other:?}, not a boolean",
                        v.expression
                    ));
                }
                Err(e) => {
                    return Err(format!(
                        "expression '{}' resulted in error: {e}",
                        v.expression
                    ));
                }
            }
        }
        for (key, expr) in &self.audit_annotations {
            match crate::custom::run_cel(expr, &vars) {
                Ok(cel_interpreter::Value::String(s)) => {
                    out.audit_annotations.push((key.clone(), s.to_string()))
                }
                Ok(cel_interpreter::Value::Null) => {}
                Ok(other) => {
                    return Err(format!(
                        "audit annotation {key:?} gave {other:?}, not a string"
                    ));
                }
                Err(e) => return Err(format!("audit annotation {key:?}: {e}")),
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Value {
        json!({"metadata": {"name": "replicas.example.com"}, "spec": {
            "paramKind": {"apiVersion": "v1", "kind": "ConfigMap"},
            "matchConstraints": {"resourceRules": [{"apiGroups": ["apps"], "apiVersions": ["v1"],
                "operations": ["CREATE", "UPDATE"], "resources": ["deployments"]}]},
            "variables": [{"name": "most", "expression": "int(params.data.most)"}],
            "validations": [
                {"expression": "object.spec.replicas <= variables.most",
                 "messageExpression": "'replicas must be at most ' + string(variables.most)",
                 "reason": "Forbidden"},
                {"expression": "has(object.metadata.labels) && 'team' in object.metadata.labels"},
            ],
            "auditAnnotations": [{"key": "replicas", "valueExpression": "string(object.spec.replicas)"}],
        }})
    }

    #[test]
    fn policies_evaluate_with_params_variables_and_messages() {
        let mut obj = policy();
        default_policy(&mut obj);
        assert!(
            validate_policy(&obj).is_empty(),
            "{:?}",
            validate_policy(&obj)
        );
        let p = Policy::of(&obj);
        let params = json!({"data": {"most": "3"}});
        let deployment = json!({"metadata": {"name": "web"}, "spec": {"replicas": 5}});
        let input = Input {
            object: &deployment,
            old_object: &Value::Null,
            request: &json!({"operation": "CREATE"}),
            params: &params,
            namespace_object: &Value::Null,
        };
        let found = p.evaluate(&input).unwrap();
        assert_eq!(
            found.violations,
            [
                Violation {
                    message: "replicas must be at most 3".into(),
                    reason: "Forbidden".into(),
                    expression_index: 0
                },
                Violation {
                    message: "failed expression: has(object.metadata.labels) && 'team' in object.metadata.labels".into(),
                    reason: "Invalid".into(),
                    expression_index: 1
                },
            ]
        );
        assert_eq!(
            found.audit_annotations,
            [("replicas".to_owned(), "5".to_owned())]
        );
        let fine =
            json!({"metadata": {"name": "web", "labels": {"team": "a"}}, "spec": {"replicas": 2}});
        let ok = p
            .evaluate(&Input {
                object: &fine,
                ..input
            })
            .unwrap();
        assert!(ok.violations.is_empty());
        assert_eq!(reason_code("Forbidden"), 403);
    }

    #[test]
    fn bad_policies_and_bindings_are_refused_with_their_field() {
        let mut obj = policy();
        obj["spec"]["validations"][0]["expression"] = json!("object.spec.(");
        obj["spec"]["validations"][1]["reason"] = json!("Teapot");
        let fields: Vec<String> = validate_policy(&obj).into_iter().map(|e| e.field).collect();
        assert_eq!(
            fields,
            [
                "spec.validations[0].expression",
                "spec.validations[1].reason"
            ]
        );
        let binding = json!({"spec": {"policyName": "p", "validationActions": ["Deny", "Warn"],
            "paramRef": {"name": "a", "selector": {}, "parameterNotFoundAction": "Deny"}}});
        let fields: Vec<String> = validate_binding(&binding)
            .into_iter()
            .map(|e| e.field)
            .collect();
        assert_eq!(fields, ["spec.validationActions", "spec.paramRef"]);
    }
}
