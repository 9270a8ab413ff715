//! Custom resources: the resource types a CustomResourceDefinition adds at
//! run time, and what their structural schema does to an object (validation
//! with field paths, pruning of unknown fields, defaulting) and how they print
//! (`additionalPrinterColumns`).
//!
//! A CRD becomes one [`ResourceType`] per served version, leaked so it lives
//! as long as the built-in ones (a CRD changes rarely; each change leaks a few
//! hundred bytes). [`registry`](crate::registry) serves them beside the
//! built-in table.

use serde_json::{Map, Value};

use crate::field::{FieldError, FieldErrorType};
use crate::registry::{ResourceType, Subresource};

/// What a CRD says about one served version of its kind.
#[derive(Debug, PartialEq, Eq)]
pub struct CustomType {
    /// The CRD's name (`PLURAL.GROUP`).
    pub crd: String,
    /// The version's `openAPIV3Schema`.
    pub schema: Value,
    pub printer_columns: Vec<PrinterColumn>,
    /// The `scale` subresource's paths, when it has one.
    pub scale: Option<ScalePaths>,
    /// The version objects are stored in.
    pub storage_version: String,
    /// The CRD's conversion webhook (`strategy: Webhook`); `None` for the
    /// `None` strategy, where only `apiVersion` changes.
    pub conversion: Option<ConversionWebhook>,
}

/// Where a CRD's conversion webhook is and how to speak to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversionWebhook {
    pub client: crate::webhooks::WebhookClient,
    /// The `ConversionReview` versions the webhook accepts (`v1`,
    /// `v1beta1`).
    pub review_versions: Vec<String>,
}

impl ConversionWebhook {
    /// The conversion webhook of a (validated, defaulted) CRD, if its
    /// strategy is `Webhook`.
    pub fn of(crd: &Value) -> Option<Self> {
        let conversion = &crd["spec"]["conversion"];
        if conversion["strategy"] != "Webhook" {
            return None;
        }
        let webhook = &conversion["webhook"];
        Some(Self {
            client: crate::webhooks::WebhookClient::of(&webhook["clientConfig"]),
            review_versions: strings(&webhook["conversionReviewVersions"]),
        })
    }
}

/// One `additionalPrinterColumns` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrinterColumn {
    pub name: String,
    /// `integer`, `number`, `string`, `boolean` or `date`.
    pub type_: String,
    pub format: String,
    pub description: String,
    pub priority: i64,
    pub json_path: String,
}

/// Where the `scale` subresource reads and writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScalePaths {
    pub spec_replicas: String,
    pub status_replicas: String,
    pub label_selector: Option<String>,
}

fn leak(s: &str) -> &'static str {
    Box::leak(s.to_owned().into_boxed_str())
}

/// The strings of a JSON array (others skipped; nothing for a non-array).
pub(crate) fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The resource types a (validated) CRD serves: one per served version.
pub fn types_of(crd: &Value) -> Vec<&'static ResourceType> {
    let spec = &crd["spec"];
    let names = &spec["names"];
    let name = crd["metadata"]["name"].as_str().unwrap_or_default();
    let (group, kind, plural) = (
        spec["group"].as_str().unwrap_or_default(),
        names["kind"].as_str().unwrap_or_default(),
        names["plural"].as_str().unwrap_or_default(),
    );
    let singular = names["singular"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| kind.to_lowercase());
    let short: &'static [&'static str] = Box::leak(
        strings(&names["shortNames"])
            .iter()
            .map(|s| leak(s))
            .collect::<Vec<_>>()
            .into_boxed_slice(),
    );
    let categories: &'static [&'static str] = Box::leak(
        strings(&names["categories"])
            .iter()
            .map(|s| leak(s))
            .collect::<Vec<_>>()
            .into_boxed_slice(),
    );
    let namespaced = spec["scope"] != "Cluster";
    let storage_version = spec["versions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["storage"] == true)
        .and_then(|v| v["name"].as_str())
        .unwrap_or_default()
        .to_owned();
    let conversion = ConversionWebhook::of(crd);
    let mut out = Vec::new();
    for version in spec["versions"].as_array().into_iter().flatten() {
        if version["served"] == false {
            continue;
        }
        let subresources = &version["subresources"];
        let mut subs = Vec::new();
        if subresources["status"].is_object() {
            subs.push(Subresource::Status);
        }
        let scale = subresources["scale"].as_object().map(|s| ScalePaths {
            spec_replicas: s["specReplicasPath"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            status_replicas: s["statusReplicasPath"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            label_selector: s
                .get("labelSelectorPath")
                .and_then(Value::as_str)
                .map(str::to_owned),
        });
        if scale.is_some() {
            subs.push(Subresource::Scale);
        }
        let printer_columns = version["additionalPrinterColumns"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| PrinterColumn {
                name: c["name"].as_str().unwrap_or_default().to_owned(),
                type_: c["type"].as_str().unwrap_or("string").to_owned(),
                format: c["format"].as_str().unwrap_or_default().to_owned(),
                description: c["description"].as_str().unwrap_or_default().to_owned(),
                priority: c["priority"].as_i64().unwrap_or(0),
                json_path: c["jsonPath"].as_str().unwrap_or_default().to_owned(),
            })
            .collect();
        let custom = Box::leak(Box::new(CustomType {
            crd: name.to_owned(),
            schema: version["schema"]["openAPIV3Schema"].clone(),
            printer_columns,
            scale,
            storage_version: storage_version.clone(),
            conversion: conversion.clone(),
        }));
        out.push(&*Box::leak(Box::new(ResourceType {
            group: leak(group),
            version: leak(version["name"].as_str().unwrap_or_default()),
            kind: leak(kind),
            plural: leak(plural),
            singular: leak(&singular),
            namespaced,
            short_names: short,
            categories,
            subresources: Box::leak(subs.into_boxed_slice()),
            custom: Some(custom),
        })));
    }
    out
}

/// Removes the fields the schema does not have (outside the object's
/// `apiVersion`, `kind` and `metadata`, and below
/// `x-kubernetes-preserve-unknown-fields`); returns their paths.
pub fn prune(schema: &Value, obj: &mut Value) -> Vec<String> {
    let mut pruned = Vec::new();
    if let Value::Object(map) = obj {
        for (k, v) in map.iter_mut() {
            if matches!(k.as_str(), "apiVersion" | "kind" | "metadata") {
                continue;
            }
            match schema["properties"].get(k) {
                Some(s) => prune_value(s, v, k, &mut pruned),
                None if preserves(schema) => {}
                None => pruned.push(k.clone()),
            }
        }
        if !preserves(schema) {
            let props = &schema["properties"];
            map.retain(|k, _| {
                matches!(k.as_str(), "apiVersion" | "kind" | "metadata") || props.get(k).is_some()
            });
        }
    }
    pruned
}

fn preserves(schema: &Value) -> bool {
    schema["x-kubernetes-preserve-unknown-fields"] == true
}

fn prune_value(schema: &Value, v: &mut Value, path: &str, pruned: &mut Vec<String>) {
    if schema["x-kubernetes-embedded-resource"] == true {
        // An embedded object keeps its own type meta and metadata.
        let mut inner = Vec::new();
        let mut copy = v.clone();
        for p in prune(schema, &mut copy) {
            inner.push(format!("{path}.{p}"));
        }
        *v = copy;
        pruned.extend(inner);
        return;
    }
    match v {
        Value::Object(map) => {
            if let Some(additional) = schema.get("additionalProperties").filter(|a| a.is_object()) {
                for (k, item) in map.iter_mut() {
                    prune_value(additional, item, &format!("{path}.{k}"), pruned);
                }
                return;
            }
            let props = &schema["properties"];
            if !preserves(schema) {
                let unknown: Vec<String> = map
                    .keys()
                    .filter(|k| props.get(*k).is_none())
                    .cloned()
                    .collect();
                for k in unknown {
                    map.remove(&k);
                    pruned.push(format!("{path}.{k}"));
                }
            }
            for (k, item) in map.iter_mut() {
                if let Some(s) = props.get(k) {
                    prune_value(s, item, &format!("{path}.{k}"), pruned);
                }
            }
        }
        Value::Array(items) => {
            if let Some(s) = schema.get("items") {
                for (i, item) in items.iter_mut().enumerate() {
                    prune_value(s, item, &format!("{path}[{i}]"), pruned);
                }
            }
        }
        _ => {}
    }
}

/// Prunes one value (such as a status written alone) against its schema,
/// naming pruned fields from `path`.
pub fn prune_at(schema: &Value, v: &mut Value, path: &str) -> Vec<String> {
    let mut pruned = Vec::new();
    prune_value(schema, v, path, &mut pruned);
    pruned
}

/// Fills in the schema's `default`s for absent fields, recursively.
pub fn apply_defaults(schema: &Value, obj: &mut Value) {
    let Value::Object(map) = obj else { return };
    let Some(props) = schema["properties"].as_object() else {
        if let Some(additional) = schema.get("additionalProperties").filter(|a| a.is_object()) {
            for v in map.values_mut() {
                default_value(additional, v);
            }
        }
        return;
    };
    for (k, s) in props {
        match map.get_mut(k) {
            Some(v) => default_value(s, v),
            None => {
                if let Some(d) = s.get("default") {
                    let mut d = d.clone();
                    default_value(s, &mut d);
                    map.insert(k.clone(), d);
                }
            }
        }
    }
}

fn default_value(schema: &Value, v: &mut Value) {
    match v {
        Value::Object(_) => apply_defaults(schema, v),
        Value::Array(items) => {
            if let Some(s) = schema.get("items") {
                for item in items {
                    default_value(s, item);
                }
            }
        }
        _ => {}
    }
}

/// Checks an object against the schema: types, required fields, enums,
/// bounds, lengths, patterns, item counts and uniqueness, with field paths,
/// then its CEL rules; transition rules (`oldSelf`) run on an update
/// (`old`, the stored object), where the value had a previous one.
/// The root's `apiVersion`, `kind` and `metadata` are the API server's.
pub fn validate(schema: &Value, obj: &Value, old: Option<&Value>) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let Value::Object(map) = obj else {
        errors.push(bad("", obj.clone(), "must be an object"));
        return errors;
    };
    let mut root = Map::new();
    for (k, v) in map {
        if !matches!(k.as_str(), "apiVersion" | "kind" | "metadata") {
            root.insert(k.clone(), v.clone());
        }
    }
    let mut root_schema = schema.clone();
    if let Some(required) = root_schema
        .get_mut("required")
        .and_then(Value::as_array_mut)
    {
        required.retain(|r| !matches!(r.as_str(), Some("apiVersion" | "kind" | "metadata")));
    }
    if let Some(props) = root_schema
        .get_mut("properties")
        .and_then(Value::as_object_mut)
    {
        for k in ["apiVersion", "kind", "metadata"] {
            props.remove(k);
        }
    }
    let old_root = old.map(|o| {
        let mut o = o.clone();
        if let Some(m) = o.as_object_mut() {
            for k in ["apiVersion", "kind", "metadata"] {
                m.remove(k);
            }
        }
        o
    });
    check(
        &root_schema,
        &Value::Object(root),
        old_root.as_ref(),
        "",
        &mut errors,
    );
    errors
}

fn join(path: &str, k: &str) -> String {
    if path.is_empty() {
        k.to_owned()
    } else {
        format!("{path}.{k}")
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// `Invalid value: VALUE: detail`, the value rendered as JSON.
/// An `Invalid` field error showing the value as JSON.
pub(crate) fn bad(path: &str, v: impl Into<Value>, detail: impl Into<String>) -> FieldError {
    let v: Value = v.into();
    FieldError::new(FieldErrorType::Invalid, path, Some(v.to_string()), detail)
}

/// Compiled CEL programs by their source (rules are compiled once, however
/// many objects they check).
static PROGRAMS: std::sync::LazyLock<
    std::sync::Mutex<std::collections::HashMap<String, std::sync::Arc<cel_interpreter::Program>>>,
> = std::sync::LazyLock::new(Default::default);

/// A CEL rule compiled, or why it does not compile.
/// Runs the CEL expression `expr` with `vars` bound. The interpreter's
/// integer arithmetic panics on overflow where overflow checks are on: the
/// evaluation fails, the server does not.
pub(crate) fn run_cel(
    expr: &str,
    vars: &[(&str, &Value)],
) -> Result<cel_interpreter::Value, String> {
    let p = program(expr)?;
    let mut ctx = cel_interpreter::Context::default();
    for (name, value) in vars {
        let value = cel_interpreter::to_value(value).map_err(|e| e.to_string())?;
        ctx.add_variable_from_value(*name, value);
    }
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| p.execute(&ctx)))
        .map_err(|_| "the evaluation failed (integer overflow?)".to_owned())?
        .map_err(|e| e.to_string())
}

pub(crate) fn program(rule: &str) -> Result<std::sync::Arc<cel_interpreter::Program>, String> {
    let mut cache = PROGRAMS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = cache.get(rule) {
        return Ok(p.clone());
    }
    let compiled = std::panic::catch_unwind(|| cel_interpreter::Program::compile(rule))
        .map_err(|_| "the parser failed on it".to_owned())?;
    let p = std::sync::Arc::new(compiled.map_err(|e| e.to_string().trim().to_owned())?);
    cache.insert(rule.to_owned(), p.clone());
    Ok(p)
}

/// Whether a rule is a transition rule (it compares with the object's
/// previous value, `oldSelf`).
fn transition_rule(rule: &str) -> bool {
    rule.contains("oldSelf")
}

/// Runs the node's `x-kubernetes-validations` CEL rules with `self` bound
/// to `v`, and a transition rule's `oldSelf` to `old`: as in Kubernetes, a
/// transition rule runs only where the value had a previous one (an
/// update, and the same place in the old object: object properties and map
/// keys; list items are not correlated, so their transition rules do not
/// run).
fn check_rules(
    schema: &Value,
    v: &Value,
    old: Option<&Value>,
    path: &str,
    errors: &mut Vec<FieldError>,
) {
    let Some(rules) = schema["x-kubernetes-validations"].as_array() else {
        return;
    };
    for r in rules {
        let Some(rule) = r["rule"].as_str() else {
            continue;
        };
        let old = match (transition_rule(rule), old) {
            (false, _) => None,
            (true, Some(old)) => Some(old),
            (true, None) => continue,
        };
        let at = match r["fieldPath"].as_str() {
            Some(f) => join(path, f.trim_start_matches('.')),
            None => path.to_owned(),
        };
        let failed = |detail: String| {
            FieldError::new(
                FieldErrorType::Invalid,
                &at,
                Some(format!("\"{}\"", type_name(v))),
                detail,
            )
        };
        let mut vars = vec![("self", v)];
        vars.extend(old.map(|old| ("oldSelf", old)));
        let outcome = run_cel(rule, &vars);
        match outcome {
            Ok(cel_interpreter::Value::Bool(true)) => {}
            Ok(cel_interpreter::Value::Bool(false)) => errors.push(failed(
                r["message"]
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| format!("failed rule: {rule}")),
            )),
            Ok(other) => errors.push(failed(format!("rule {rule} gave {other:?}, not a boolean"))),
            Err(e) => errors.push(failed(format!("rule {rule} could not be evaluated: {e}"))),
        }
    }
}

/// A CEL rule of a schema: its place, its text, the schema it checks and
/// how many times one object can make it run (once per element of every
/// list or map above it).
struct RuleAt<'a> {
    path: String,
    rule: String,
    schema: &'a Value,
    runs: u64,
}

/// Every CEL rule in a schema, for the CRD's validation.
fn rules_of<'a>(schema: &'a Value, path: &str, runs: u64, out: &mut Vec<RuleAt<'a>>) {
    if let Some(rules) = schema["x-kubernetes-validations"].as_array() {
        for (i, r) in rules.iter().enumerate() {
            out.push(RuleAt {
                path: format!("{path}.x-kubernetes-validations[{i}].rule"),
                rule: r["rule"].as_str().unwrap_or_default().to_owned(),
                schema,
                runs,
            });
        }
    }
    if let Some(props) = schema["properties"].as_object() {
        for (k, s) in props {
            rules_of(s, &format!("{path}.properties[{k}]"), runs, out);
        }
    }
    for k in ["items", "additionalProperties"] {
        if schema[k].is_object() {
            let each = runs.saturating_mul(crate::cel_cost::bound(Some(schema)));
            rules_of(&schema[k], &format!("{path}.{k}"), each, out);
        }
    }
}

/// Kubernetes' advice when a rule is estimated too costly.
const COST_ADVICE: &str = "try simplifying the rule, or adding maxItems, maxProperties, and maxLength where arrays, maps, and strings are declared";

fn check(schema: &Value, v: &Value, old: Option<&Value>, path: &str, errors: &mut Vec<FieldError>) {
    if v.is_null() {
        if schema["nullable"] != true && schema.get("type").is_some() {
            errors.push(bad(path, Value::Null, "must not be null"));
        }
        return;
    }
    let before = errors.len();
    check_shape(schema, v, old, path, errors);
    // Rules run on values that are well-formed underneath, as Kubernetes
    // runs them only after the schema's own checks passed.
    if errors.len() == before {
        check_rules(schema, v, old.filter(|o| !o.is_null()), path, errors);
    }
}

fn check_shape(
    schema: &Value,
    v: &Value,
    old: Option<&Value>,
    path: &str,
    errors: &mut Vec<FieldError>,
) {
    let actual = type_name(v);
    let int_or_string = schema["x-kubernetes-int-or-string"] == true;
    if int_or_string {
        if !matches!(actual, "integer" | "string") {
            errors.push(bad(
                path,
                v.clone(),
                format!("must be an integer or a string, not {actual}"),
            ));
            return;
        }
    } else if let Some(want) = schema["type"].as_str() {
        let fits = want == actual || (want == "number" && actual == "integer");
        if !fits {
            errors.push(FieldError::new(
                FieldErrorType::Invalid,
                path,
                Some(format!("\"{actual}\"")),
                format!("{path} in body must be of type {want}: \"{actual}\""),
            ));
            return;
        }
    }
    if let Some(options) = schema["enum"].as_array()
        && !options.contains(v)
    {
        let list: Vec<String> = options.iter().map(Value::to_string).collect();
        errors.push(FieldError::new(
            FieldErrorType::NotSupported,
            path,
            Some(v.to_string()),
            format!("supported values: {}", list.join(", ")),
        ));
    }
    match v {
        Value::Number(n) => {
            let x = n.as_f64().unwrap_or(0.0);
            if let Some(min) = schema["minimum"].as_f64() {
                let exclusive = schema["exclusiveMinimum"] == true;
                if x < min || (exclusive && x == min) {
                    let rel = if exclusive {
                        "greater than"
                    } else {
                        "greater than or equal to"
                    };
                    errors.push(bad(path, v.clone(), format!("should be {rel} {min}")));
                }
            }
            if let Some(max) = schema["maximum"].as_f64() {
                let exclusive = schema["exclusiveMaximum"] == true;
                if x > max || (exclusive && x == max) {
                    let rel = if exclusive {
                        "less than"
                    } else {
                        "less than or equal to"
                    };
                    errors.push(bad(path, v.clone(), format!("should be {rel} {max}")));
                }
            }
        }
        Value::String(s) => {
            let len = s.chars().count() as u64;
            if let Some(min) = schema["minLength"].as_u64()
                && len < min
            {
                errors.push(bad(
                    path,
                    s.as_str(),
                    format!("should be at least {min} chars long"),
                ));
            }
            if let Some(max) = schema["maxLength"].as_u64()
                && len > max
            {
                errors.push(FieldError::new(
                    FieldErrorType::TooLong,
                    path,
                    None,
                    format!("may not be more than {max} bytes"),
                ));
            }
            if let Some(pattern) = schema["pattern"].as_str() {
                match regex::Regex::new(pattern) {
                    Ok(re) if !re.is_match(s) => {
                        errors.push(bad(path, s.as_str(), format!("should match '{pattern}'")))
                    }
                    _ => {}
                }
            }
        }
        Value::Array(items) => {
            if let Some(min) = schema["minItems"].as_u64()
                && (items.len() as u64) < min
            {
                errors.push(bad(
                    path,
                    items.len(),
                    format!("should have at least {min} items"),
                ));
            }
            if let Some(max) = schema["maxItems"].as_u64()
                && items.len() as u64 > max
            {
                errors.push(FieldError::new(
                    FieldErrorType::TooLong,
                    path,
                    None,
                    format!("must have at most {max} items"),
                ));
            }
            let set = schema["x-kubernetes-list-type"] == "set" || schema["uniqueItems"] == true;
            if set {
                for (i, item) in items.iter().enumerate() {
                    if items[..i].contains(item) {
                        errors.push(FieldError::new(
                            FieldErrorType::Duplicate,
                            format!("{path}[{i}]"),
                            Some(item.to_string()),
                            "",
                        ));
                    }
                }
            }
            if let Some(s) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    check(s, item, None, &format!("{path}[{i}]"), errors);
                }
            }
        }
        Value::Object(map) => {
            for r in strings(&schema["required"]) {
                if !map.contains_key(&r) {
                    errors.push(FieldError::required(join(path, &r), ""));
                }
            }
            if schema["x-kubernetes-embedded-resource"] == true {
                for k in ["apiVersion", "kind"] {
                    if !map.get(k).is_some_and(Value::is_string) {
                        errors.push(FieldError::required(join(path, k), ""));
                    }
                }
            }
            let props = &schema["properties"];
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            for (k, item) in map {
                let was = old.and_then(|o| o.get(k));
                if let Some(s) = props.get(k) {
                    check(s, item, was, &join(path, k), errors);
                } else if let Some(s) = additional {
                    check(s, item, was, &join(path, k), errors);
                }
            }
        }
        _ => {}
    }
}

/// A CustomResourceDefinition, as Kubernetes' validation checks it (the
/// parts this server relies on).
pub fn validate_crd(crd: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let spec = &crd["spec"];
    let group = spec["group"].as_str().unwrap_or_default();
    let plural = spec["names"]["plural"].as_str().unwrap_or_default();
    let name = crd["metadata"]["name"].as_str().unwrap_or_default();
    if group.is_empty() {
        errs.push(FieldError::required("spec.group", ""));
    } else if !group.contains('.') {
        errs.push(FieldError::invalid(
            "spec.group",
            group,
            "should be a domain with at least one dot",
        ));
    } else if crate::registry::is_builtin_group(group) {
        errs.push(FieldError::invalid(
            "spec.group",
            group,
            "is a built-in API group of this server",
        ));
    }
    if plural.is_empty() {
        errs.push(FieldError::required("spec.names.plural", ""));
    } else if plural != plural.to_lowercase() || crate::names::dns1123_label(plural).is_err() {
        errs.push(FieldError::invalid(
            "spec.names.plural",
            plural,
            "a lowercase RFC 1123 label is required",
        ));
    }
    if spec["names"]["kind"]
        .as_str()
        .unwrap_or_default()
        .is_empty()
    {
        errs.push(FieldError::required("spec.names.kind", ""));
    }
    if !group.is_empty() && !plural.is_empty() && name != format!("{plural}.{group}") {
        errs.push(FieldError::invalid(
            "metadata.name",
            name,
            format!("must be spec.names.plural+\".\"+spec.group ({plural}.{group})"),
        ));
    }
    match spec["scope"].as_str() {
        Some("Namespaced" | "Cluster") => {}
        Some(other) => errs.push(FieldError::not_supported(
            "spec.scope",
            other,
            &["Cluster", "Namespaced"],
        )),
        None => errs.push(FieldError::required("spec.scope", "")),
    }
    let versions = spec["versions"].as_array().cloned().unwrap_or_default();
    if versions.is_empty() {
        errs.push(FieldError::required(
            "spec.versions",
            "must have exactly one version marked as storage version",
        ));
    }
    let storage = versions.iter().filter(|v| v["storage"] == true).count();
    if !versions.is_empty() && storage != 1 {
        errs.push(FieldError::invalid(
            "spec.versions",
            storage,
            "must have exactly one version marked as storage version",
        ));
    }
    for (i, v) in versions.iter().enumerate() {
        let at = format!("spec.versions[{i}]");
        if v["name"]
            .as_str()
            .is_none_or(|n| crate::names::dns1035_label(n).is_err())
        {
            errs.push(bad(
                &format!("{at}.name"),
                v["name"].clone(),
                "a DNS-1035 label is required",
            ));
        }
        let schema = &v["schema"]["openAPIV3Schema"];
        if !schema.is_object() {
            errs.push(FieldError::required(
                format!("{at}.schema.openAPIV3Schema"),
                "schemas are required",
            ));
            continue;
        }
        if schema["type"] != "object" {
            errs.push(bad(
                &format!("{at}.schema.openAPIV3Schema.type"),
                schema["type"].clone(),
                "must be object at the root",
            ));
        }
        if let Some(path) = structural_error(schema, &format!("{at}.schema.openAPIV3Schema")) {
            errs.push(FieldError::required(
                path,
                "must not be empty for specified object fields",
            ));
        }
        let mut rules = Vec::new();
        let root = format!("{at}.schema.openAPIV3Schema");
        rules_of(schema, &root, 1, &mut rules);
        let mut total = 0u64;
        // Kubernetes' refusal of a cost over its budget.
        let over = |path: &str, what: &str, cost: u64, limit: u64| {
            FieldError::forbidden(
                path,
                format!(
                    "{what} exceeds budget by factor of {:.1}x ({COST_ADVICE})",
                    cost as f64 / limit as f64
                ),
            )
        };
        for RuleAt {
            path,
            rule,
            schema,
            runs,
        } in rules
        {
            if rule.is_empty() {
                errs.push(FieldError::required(path, ""));
            } else if let Err(e) = program(&rule) {
                errs.push(bad(&path, rule, format!("compilation failed: {e}")));
            } else if let Some(cost) = crate::cel_cost::estimate(&rule, schema) {
                let limit = crate::cel_cost::PER_CALL_LIMIT;
                if cost > limit {
                    errs.push(over(&path, "estimated rule cost", cost, limit));
                }
                total = total.saturating_add(cost.saturating_mul(runs));
            }
        }
        let limit = crate::cel_cost::PER_CRD_LIMIT;
        if total > limit {
            errs.push(over(
                &root,
                "x-kubernetes-validations estimated rule cost total for entire OpenAPIv3 schema",
                total,
                limit,
            ));
        }
        if let Some(scale) = v["subresources"]["scale"].as_object() {
            for key in ["specReplicasPath", "statusReplicasPath"] {
                if !scale
                    .get(key)
                    .and_then(Value::as_str)
                    .is_some_and(|p| p.starts_with('.'))
                {
                    errs.push(bad(
                        &format!("{at}.subresources.scale.{key}"),
                        scale.get(key).cloned().unwrap_or_default(),
                        "should be a JSON path under .spec or .status",
                    ));
                }
            }
        }
    }
    validate_conversion(&spec["conversion"], &mut errs);
    errs
}

/// `spec.conversion`, as Kubernetes validates it.
fn validate_conversion(conversion: &Value, errs: &mut Vec<FieldError>) {
    const AT: &str = "spec.conversion";
    let webhook = &conversion["webhook"];
    match conversion["strategy"].as_str() {
        // Defaulted; absent only in a body not defaulted yet.
        None | Some("None") => {
            if !webhook.is_null() {
                errs.push(FieldError::forbidden(
                    format!("{AT}.webhook"),
                    "should not be set when strategy is not set to Webhook",
                ));
            }
            return;
        }
        Some("Webhook") => {}
        Some(other) => {
            errs.push(FieldError::not_supported(
                format!("{AT}.strategy"),
                other,
                &["None", "Webhook"],
            ));
            return;
        }
    }
    if !webhook.is_object() {
        errs.push(FieldError::required(
            format!("{AT}.webhook"),
            "required when strategy is set to Webhook",
        ));
        return;
    }
    let reviews = strings(&webhook["conversionReviewVersions"]);
    if !reviews.iter().any(|v| v == "v1" || v == "v1beta1") {
        errs.push(bad(
            &format!("{AT}.webhook.conversionReviewVersions"),
            webhook["conversionReviewVersions"].clone(),
            "must include at least one of v1, v1beta1",
        ));
    }
    let config = &webhook["clientConfig"];
    let at = format!("{AT}.webhook.clientConfig");
    if !config.is_object() {
        errs.push(FieldError::required(
            at,
            "required when strategy is set to Webhook",
        ));
        return;
    }
    crate::webhooks::validate_client_config(config, &at, errs);
}

/// The status the server gives a CRD it accepted: its names accepted, the
/// kind established, its storage version recorded.
pub fn crd_status(crd: &Value, now: &str) -> Value {
    let spec = &crd["spec"];
    let mut stored: Vec<Value> = crd["status"]["storedVersions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for v in spec["versions"].as_array().into_iter().flatten() {
        if v["storage"] == true && !stored.contains(&v["name"]) {
            stored.push(v["name"].clone());
        }
    }
    let condition = |type_: &str, reason: &str, message: &str| {
        serde_json::json!({"type": type_, "status": "True", "lastTransitionTime": now,
                           "reason": reason, "message": message})
    };
    serde_json::json!({
        "acceptedNames": spec["names"],
        "conditions": [
            condition("NamesAccepted", "NoConflicts", "no conflicts found"),
            condition("Established", "InitialNamesAccepted", "the initial names have been accepted"),
        ],
        "storedVersions": stored,
    })
}

/// The table columns of a custom type: Name, then its printer columns (or
/// Age when it has none), as Kubernetes prints custom resources.
pub fn table_columns(custom: &CustomType) -> Value {
    let mut cols = vec![
        serde_json::json!({"name": "Name", "type": "string", "format": "name",
        "description": "Name must be unique within a namespace.", "priority": 0}),
    ];
    if custom.printer_columns.is_empty() {
        cols.push(serde_json::json!({"name": "Age", "type": "date", "format": "",
            "description": "CreationTimestamp is a timestamp representing the server time when this object was created.", "priority": 0}));
    }
    for c in &custom.printer_columns {
        cols.push(
            serde_json::json!({"name": c.name, "type": c.type_, "format": c.format,
            "description": c.description, "priority": c.priority}),
        );
    }
    Value::Array(cols)
}

/// One row's cells for [`table_columns`]; `age` renders a timestamp as an
/// age, as `date` columns print.
pub fn table_cells(custom: &CustomType, obj: &Value, age: impl Fn(&Value) -> String) -> Vec<Value> {
    let mut cells = vec![obj["metadata"]["name"].clone()];
    if custom.printer_columns.is_empty() {
        cells.push(Value::String(age(&obj["metadata"]["creationTimestamp"])));
    }
    for c in &custom.printer_columns {
        let v = select(obj, &c.json_path).cloned().unwrap_or(Value::Null);
        cells.push(match (c.type_.as_str(), &v) {
            ("date", Value::String(_)) => Value::String(age(&v)),
            (_, Value::Object(_) | Value::Array(_)) => Value::String(v.to_string()),
            _ => v,
        });
    }
    cells
}

/// Whether a CRD's version schema is structural enough to serve: an object
/// at the root, and a type (or int-or-string, or preserve-unknown-fields)
/// on every property. Returns the first offending path.
pub fn structural_error(schema: &Value, path: &str) -> Option<String> {
    let typed = schema.get("type").is_some()
        || schema["x-kubernetes-int-or-string"] == true
        || schema["x-kubernetes-preserve-unknown-fields"] == true;
    if !typed {
        return Some(format!("{path}.type"));
    }
    for (k, s) in schema["properties"].as_object().into_iter().flatten() {
        if let Some(e) = structural_error(s, &format!("{path}.properties[{k}]")) {
            return Some(e);
        }
    }
    for key in ["items", "additionalProperties"] {
        if let Some(s) = schema.get(key).filter(|s| s.is_object())
            && let Some(e) = structural_error(s, &format!("{path}.{key}"))
        {
            return Some(e);
        }
    }
    None
}

/// The value a printer column's JSONPath selects: `.a.b`, `.a[0].b` and
/// `.a[?(@.k=="v")].b` steps.
pub fn select<'a>(obj: &'a Value, path: &str) -> Option<&'a Value> {
    let path = path.trim().trim_start_matches('{').trim_end_matches('}');
    let mut cur = obj;
    let mut rest = path.trim_start_matches('$');
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('.') {
            let end = r.find(['.', '[']).unwrap_or(r.len());
            cur = cur.get(&r[..end])?;
            rest = &r[end..];
        } else if let Some(r) = rest.strip_prefix('[') {
            let end = r.find(']')?;
            let inner = &r[..end];
            rest = &r[end + 1..];
            if let Some(filter) = inner.strip_prefix("?(@.").and_then(|f| f.strip_suffix(')')) {
                let (field, want) = filter.split_once("==")?;
                let want = want.trim().trim_matches(|c| c == '"' || c == '\'');
                cur = cur.as_array()?.iter().find(|item| {
                    item.get(field.trim()).is_some_and(|v| match v {
                        Value::String(s) => s == want,
                        other => *other == want.parse::<Value>().unwrap_or(Value::Null),
                    })
                })?;
            } else {
                cur = cur.get(inner.trim().parse::<usize>().ok()?)?;
            }
        } else {
            return None;
        }
    }
    Some(cur)
}

/// The replica count a `scale` path (`.spec.replicas`) holds.
pub fn replicas_at(obj: &Value, path: &str) -> Option<i64> {
    select(obj, path).and_then(Value::as_i64)
}

/// Sets the value at a `.a.b` path, making objects on the way.
pub fn set_at(obj: &mut Value, path: &str, value: Value) {
    let keys: Vec<&str> = path.trim_start_matches('.').split('.').collect();
    let mut cur = obj;
    for (i, k) in keys.iter().enumerate() {
        if !cur.is_object() {
            *cur = Value::Object(Map::new());
        }
        let map = cur.as_object_mut().expect("made an object");
        if i == keys.len() - 1 {
            map.insert((*k).to_owned(), value);
            return;
        }
        cur = map
            .entry((*k).to_owned())
            .or_insert_with(|| Value::Object(Map::new()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn transition_rules_run_on_updates_where_the_value_was_there_before() {
        let schema = json!({"type": "object", "properties": {"spec": {
        "type": "object",
        "x-kubernetes-validations": [
            {"rule": "self.max >= oldSelf.max", "message": "max may only grow"}],
        "properties": {
            "max": {"type": "integer"},
            "labels": {"type": "object", "additionalProperties": {"type": "string",
                "x-kubernetes-validations": [
                    {"rule": "self == oldSelf", "message": "a label is immutable"}]}}
        }}}});
        let obj = |max: i64, labels: Value| {
            json!({"apiVersion": "x/v1", "kind": "K",
            "metadata": {"name": "a"}, "spec": {"max": max, "labels": labels}})
        };
        let messages = |new: &Value, old: Option<&Value>| -> Vec<String> {
            validate(&schema, new, old)
                .iter()
                .map(|e| e.to_string())
                .collect()
        };
        let before = obj(5, json!({"team": "a"}));
        // On create there is no old value: the rules do not run.
        assert!(messages(&obj(1, json!({"team": "b"})), None).is_empty());
        assert!(messages(&obj(6, json!({"team": "a", "new": "x"})), Some(&before)).is_empty());
        assert_eq!(
            messages(&obj(6, json!({"team": "b"})), Some(&before)),
            ["spec.labels.team: Invalid value: \"string\": a label is immutable"]
        );
        assert_eq!(
            messages(&obj(4, json!({"team": "a"})), Some(&before)),
            ["spec: Invalid value: \"object\": max may only grow"]
        );
    }

    #[test]
    fn cel_rules_check_objects_and_bad_rules_refuse_the_crd() {
        let schema = json!({"type": "object", "properties": {"spec": {
        "type": "object",
        "x-kubernetes-validations": [
            {"rule": "self.min <= self.max", "message": "min must not exceed max"},
            {"rule": "self.name.startsWith('fn-')", "fieldPath": ".name"},
            {"rule": "self.max <= oldSelf.max"}
        ],
        "properties": {
            "min": {"type": "integer"}, "max": {"type": "integer"},
            "name": {"type": "string"},
            "tags": {"type": "array", "items": {"type": "string"},
                     "x-kubernetes-validations": [{"rule": "size(self) <= 2"}]}
        }}}});
        let ok = json!({"spec": {"min": 1, "max": 3, "name": "fn-a", "tags": ["x"]}});
        assert!(
            validate(&schema, &ok, None).is_empty(),
            "{:?}",
            validate(&schema, &ok, None)
        );
        let errors = |obj: &Value| -> Vec<String> {
            validate(&schema, obj, None)
                .iter()
                .map(|e| e.to_string())
                .collect()
        };
        let bad = json!({"spec": {"min": 5, "max": 3, "name": "a", "tags": ["x", "y", "z"]}});
        let errs = errors(&bad);
        assert_eq!(
            errs,
            ["spec.tags: Invalid value: \"array\": failed rule: size(self) <= 2",],
            "a rule runs only where the schema's own checks below it passed"
        );
        let bad = json!({"spec": {"min": 5, "max": 3, "name": "a", "tags": []}});
        let errs = errors(&bad);
        assert_eq!(
            errs,
            [
                "spec: Invalid value: \"object\": min must not exceed max",
                "spec.name: Invalid value: \"object\": failed rule: self.name.startsWith('fn-')",
            ]
        );
        // Arithmetic that overflows fails the rule, never a panic.
        let big = json!({"type": "object", "properties": {"spec": {"type": "object",
            "x-kubernetes-validations": [{"rule": "self.n + 1 > 0"}, {"rule": "self.n * self.n > 0"}],
            "properties": {"n": {"type": "integer"}}}}});
        let errs = validate(&big, &json!({"spec": {"n": i64::MAX}}), None);
        assert_eq!(errs.len(), 2, "{errs:?}");
        // Hostile rules are refused, never a panic.
        for rule in [
            "(((",
            "self.",
            "'open",
            "a ? b",
            "}{",
            "self.min <=",
            "1 +",
            "[1,",
            "\\",
        ] {
            assert!(program(rule).is_err(), "{rule}");
        }
        // A rule that does not compile refuses the CRD, naming the rule.
        let crd = json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": "things.demo.dev"},
            "spec": {"group": "demo.dev", "scope": "Namespaced",
                "names": {"kind": "Thing", "plural": "things"},
                "versions": [{"name": "v1", "served": true, "storage": true, "schema": {"openAPIV3Schema":
                    {"type": "object", "properties": {"spec": {"type": "object",
                        "x-kubernetes-validations": [{"rule": "self.min <="}]}}}}}]}});
        let errs: Vec<String> = validate_crd(&crd).iter().map(|e| e.to_string()).collect();
        assert!(
            errs.iter().any(|e| e.starts_with("spec.versions[0].schema.openAPIV3Schema.properties[spec].x-kubernetes-validations[0].rule: Invalid value: \"self.min <=\": compilation failed")),
            "{errs:?}"
        );
    }

    /// A rule whose worst case costs too much refuses the CRD, as
    /// Kubernetes' cost estimate does; a bound in the schema makes it fit.
    #[test]
    fn costly_rules_refuse_the_crd_until_the_schema_bounds_them() {
        let crd = |tags: Value, rule: &str| {
            json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
                "metadata": {"name": "things.demo.dev"},
                "spec": {"group": "demo.dev", "scope": "Namespaced",
                    "names": {"kind": "Thing", "plural": "things"},
                    "versions": [{"name": "v1", "served": true, "storage": true, "schema": {"openAPIV3Schema":
                        {"type": "object", "properties": {"spec": {"type": "object",
                            "x-kubernetes-validations": [{"rule": rule}],
                            "properties": {"tags": tags}}}}}}]}})
        };
        let open = json!({"type": "array", "items": {"type": "string"}});
        let nested = "self.tags.all(a, self.tags.all(b, a == b || a != b))";
        let errs: Vec<String> = validate_crd(&crd(open.clone(), nested))
            .iter()
            .map(|e| e.to_string())
            .collect();
        assert!(
            errs.iter().any(|e| e.starts_with("spec.versions[0].schema.openAPIV3Schema.properties[spec].x-kubernetes-validations[0].rule: Forbidden: estimated rule cost exceeds budget by factor of")),
            "{errs:?}"
        );
        // Cheap over the same list: a size check.
        assert!(validate_crd(&crd(open, "size(self.tags) < 10")).is_empty());
        let bounded = json!({"type": "array", "maxItems": 50, "items": {"type": "string"}});
        assert!(validate_crd(&crd(bounded, nested)).is_empty());
        // A rule on every element of a list in a list of unknown sizes runs
        // too many times in all.
        let deep = json!({"type": "array", "items": {"type": "array", "items": {"type": "string",
            "x-kubernetes-validations": [{"rule": "self != ''"}]}}});
        let errs: Vec<String> = validate_crd(&crd(deep, "true"))
            .iter()
            .map(|e| e.to_string())
            .collect();
        assert!(
            errs.iter().any(|e| e
                .contains("estimated rule cost total for entire OpenAPIv3 schema exceeds budget")),
            "{errs:?}"
        );
    }

    fn schema() -> Value {
        json!({
            "type": "object",
            "properties": {
                "spec": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {
                        "image": {"type": "string", "minLength": 1},
                        "replicas": {"type": "integer", "minimum": 0, "maximum": 10, "default": 1},
                        "mode": {"type": "string", "enum": ["fast", "safe"], "default": "safe"},
                        "port": {"x-kubernetes-int-or-string": true},
                        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                        "extra": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                        "tags": {"type": "array", "x-kubernetes-list-type": "set", "items": {"type": "string", "pattern": "^[a-z]+$"}},
                        "template": {"type": "object", "x-kubernetes-embedded-resource": true, "x-kubernetes-preserve-unknown-fields": true},
                    }
                },
                "status": {"type": "object", "properties": {"ready": {"type": "boolean"}}}
            }
        })
    }

    #[test]
    fn validation_names_each_field() {
        let obj = json!({
            "apiVersion": "x.example/v1", "kind": "App", "metadata": {"name": "a"},
            "spec": {"replicas": 11, "mode": "slow", "port": 1.5, "labels": {"a": 1},
                     "tags": ["ok", "ok", "Bad"], "template": {"spec": {}}},
        });
        let errors = validate(&schema(), &obj, None);
        let got: Vec<(String, &str)> = errors
            .iter()
            .map(|e| (e.field.clone(), e.kind.reason()))
            .collect();
        for want in [
            ("spec.image", "FieldValueRequired"),
            ("spec.replicas", "FieldValueInvalid"),
            ("spec.mode", "FieldValueNotSupported"),
            ("spec.port", "FieldValueInvalid"),
            ("spec.labels.a", "FieldValueInvalid"),
            ("spec.tags[1]", "FieldValueDuplicate"),
            ("spec.tags[2]", "FieldValueInvalid"),
            ("spec.template.apiVersion", "FieldValueRequired"),
        ] {
            assert!(
                got.iter().any(|(f, r)| f == want.0 && *r == want.1),
                "{want:?} not in {got:?}"
            );
        }
        let fine = json!({"spec": {"image": "x", "port": "http", "extra": {"any": [1]}}});
        assert_eq!(validate(&schema(), &fine, None), vec![]);
    }

    #[test]
    fn pruning_and_defaults() {
        let mut obj = json!({
            "apiVersion": "x.example/v1", "kind": "App", "metadata": {"name": "a", "labels": {"k": "v"}},
            "spec": {"image": "x", "bogus": 1, "extra": {"kept": true},
                     "template": {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"kept": 1}}},
            "top": 1,
        });
        let mut pruned = prune(&schema(), &mut obj);
        pruned.sort();
        assert_eq!(pruned, vec!["spec.bogus", "top"]);
        assert_eq!(obj["metadata"]["labels"]["k"], "v");
        assert_eq!(obj["spec"]["extra"]["kept"], true);
        assert_eq!(obj["spec"]["template"]["spec"]["kept"], 1);
        apply_defaults(&schema(), &mut obj);
        assert_eq!(obj["spec"]["replicas"], 1);
        assert_eq!(obj["spec"]["mode"], "safe");
        assert!(obj.get("status").is_none());
    }

    #[test]
    fn json_paths_select_like_kubectl() {
        let obj = json!({"spec": {"replicas": 3}, "status": {"conditions": [
            {"type": "Synced", "status": "False"}, {"type": "Ready", "status": "True"}]}});
        assert_eq!(select(&obj, ".spec.replicas"), Some(&json!(3)));
        assert_eq!(
            select(&obj, ".status.conditions[?(@.type==\"Ready\")].status"),
            Some(&json!("True"))
        );
        assert_eq!(
            select(&obj, ".status.conditions[0].type"),
            Some(&json!("Synced"))
        );
        assert_eq!(select(&obj, ".spec.missing"), None);
        let mut o = json!({});
        set_at(&mut o, ".status.replicas", json!(2));
        assert_eq!(o, json!({"status": {"replicas": 2}}));
    }

    #[test]
    fn structural_schemas_type_every_property() {
        assert_eq!(structural_error(&schema(), "spec"), None);
        let bad = json!({"type": "object", "properties": {"spec": {"properties": {"a": {"type": "string"}}}}});
        assert_eq!(
            structural_error(&bad, "openAPIV3Schema").as_deref(),
            Some("openAPIV3Schema.properties[spec].type")
        );
    }
}
