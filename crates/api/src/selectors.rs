//! Label and field selectors: the query-string syntax (`app=web,tier!=db`,
//! `env in (a,b)`, `!canary`) and `metav1.LabelSelector`, with matching.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;
use serde_json::Value;

use crate::registry::ResourceType;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

impl Requirement {
    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Self::Equals(k, v) => labels.get(k) == Some(v),
            Self::NotEquals(k, v) => labels.get(k) != Some(v),
            Self::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Self::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Self::Exists(k) => labels.contains_key(k),
            Self::DoesNotExist(k) => !labels.contains_key(k),
        }
    }
}

/// A parsed label selector; the empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSelector {
    requirements: Vec<Requirement>,
}

/// Splits on commas that are not inside parentheses.
fn split_top_level(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn check_key(k: &str) -> Result<String, String> {
    crate::names::qualified_name(k).map_err(|e| format!("invalid label key {k:?}: {e}"))?;
    Ok(k.to_owned())
}

fn check_value(v: &str) -> Result<String, String> {
    crate::names::label_value(v).map_err(|e| format!("invalid label value: {v:?}: {e}"))?;
    Ok(v.to_owned())
}

fn parse_set(s: &str) -> Result<Vec<String>, String> {
    let inner = s
        .trim()
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| format!("expected a parenthesized set, found {s:?}"))?;
    inner.split(',').map(|v| check_value(v.trim())).collect()
}

impl LabelSelector {
    /// Parses the query-string syntax used by `?labelSelector=`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut requirements = Vec::new();
        if s.trim().is_empty() {
            return Ok(Self::default());
        }
        for term in split_top_level(s) {
            let term = term.trim();
            let req = if let Some(k) = term.strip_prefix('!') {
                Requirement::DoesNotExist(check_key(k.trim())?)
            } else if let Some((k, v)) = term.split_once("!=") {
                Requirement::NotEquals(check_key(k.trim())?, check_value(v.trim())?)
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                Requirement::Equals(check_key(k.trim())?, check_value(v.trim())?)
            } else if let Some((k, set)) = term.split_once(" notin ") {
                Requirement::NotIn(check_key(k.trim())?, parse_set(set)?)
            } else if let Some((k, set)) = term.split_once(" in ") {
                Requirement::In(check_key(k.trim())?, parse_set(set)?)
            } else if !term.is_empty() && !term.contains([' ', '(', ')']) {
                Requirement::Exists(check_key(term)?)
            } else {
                return Err(format!("unable to parse requirement: {term:?}"));
            };
            requirements.push(req);
        }
        Ok(Self { requirements })
    }

    /// Whether every object selected carries label `key` (a requirement
    /// `key=v`, `key in (...)` or `key`).
    pub fn requires(&self, key: &str) -> bool {
        self.requirements.iter().any(|r| match r {
            Requirement::Equals(k, _) | Requirement::In(k, _) | Requirement::Exists(k) => k == key,
            _ => false,
        })
    }

    /// The one value every object selected has for label `key` (a
    /// requirement `key=v`, or `key in (v)`), if there is one.
    pub fn exact(&self, key: &str) -> Option<&str> {
        self.requirements.iter().find_map(|r| match r {
            Requirement::Equals(k, v) if k == key => Some(v.as_str()),
            Requirement::In(k, vs) if k == key && vs.len() == 1 => Some(vs[0].as_str()),
            _ => None,
        })
    }

    /// Converts a `metav1.LabelSelector` (matchLabels and matchExpressions).
    pub fn from_api(sel: &meta::LabelSelector) -> Result<Self, String> {
        let mut requirements = Vec::new();
        for (k, v) in sel.match_labels.iter().flatten() {
            requirements.push(Requirement::Equals(check_key(k)?, check_value(v)?));
        }
        for expr in sel.match_expressions.iter().flatten() {
            let key = check_key(&expr.key)?;
            let values = expr.values.clone().unwrap_or_default();
            let req = match expr.operator.as_str() {
                "In" | "NotIn" if values.is_empty() => {
                    return Err(format!(
                        "values: Required value: must be specified when `operator` is '{}'",
                        expr.operator
                    ));
                }
                "In" => Requirement::In(key, values),
                "NotIn" => Requirement::NotIn(key, values),
                "Exists" => Requirement::Exists(key),
                "DoesNotExist" => Requirement::DoesNotExist(key),
                other => return Err(format!("{other:?} is not a valid label selector operator")),
            };
            requirements.push(req);
        }
        Ok(Self { requirements })
    }

    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    /// Matches the `metadata.labels` of a JSON object.
    pub fn matches_object(&self, obj: &Value) -> bool {
        if self.is_empty() {
            return true;
        }
        let labels: BTreeMap<String, String> = obj["metadata"]["labels"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                    .collect()
            })
            .unwrap_or_default();
        self.matches(&labels)
    }
}

impl std::fmt::Display for LabelSelector {
    /// The query-string form, as `kubectl` and the scale subresource show it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, r) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            match r {
                Requirement::Equals(k, v) => write!(f, "{k}={v}")?,
                Requirement::NotEquals(k, v) => write!(f, "{k}!={v}")?,
                Requirement::In(k, vs) => write!(f, "{k} in ({})", vs.join(","))?,
                Requirement::NotIn(k, vs) => write!(f, "{k} notin ({})", vs.join(","))?,
                Requirement::Exists(k) => write!(f, "{k}")?,
                Requirement::DoesNotExist(k) => write!(f, "!{k}")?,
            }
        }
        Ok(())
    }
}

/// Renders a `metav1.LabelSelector` in JSON form as a selector string (empty
/// if it is absent or malformed).
pub fn render(sel: &Value) -> String {
    serde_json::from_value::<meta::LabelSelector>(sel.clone())
        .ok()
        .and_then(|s| LabelSelector::from_api(&s).ok())
        .map(|s| s.to_string())
        .unwrap_or_default()
}

/// A parsed field selector: only `=`, `==` and `!=` on supported fields.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldSelector {
    terms: Vec<(String, bool, String)>,
}

/// The fields a kind can be selected by, beyond `metadata.name` and
/// `metadata.namespace` which every kind supports.
fn supported_fields(kind: &str) -> &'static [&'static str] {
    match kind {
        "Pod" => &[
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        ],
        "Event" => &[
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "reportingComponent",
            "source",
            "type",
        ],
        "Node" => &["spec.unschedulable"],
        "Secret" => &["type"],
        "Namespace" => &["status.phase"],
        "ReplicaSet" => &["status.replicas"],
        "Job" => &["status.successful"],
        _ => &[],
    }
}

/// The value of a selectable field, rendered as Kubernetes renders it.
fn field_value(kind: &str, obj: &Value, field: &str) -> String {
    let v = if kind == "Event" && field == "source" {
        &obj["source"]["component"]
    } else {
        field.split('.').fold(obj, |v, part| &v[part])
    };
    match v {
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::Null if field == "spec.hostNetwork" || field == "spec.unschedulable" => {
            "false".into()
        }
        Value::Null if field == "status.successful" || field == "status.replicas" => "0".into(),
        _ => String::new(),
    }
}

impl FieldSelector {
    pub fn parse(rt: &ResourceType, s: &str) -> Result<Self, String> {
        let parsed = Self::parse_any(s)?;
        for (field, _, _) in &parsed.terms {
            if !matches!(field.as_str(), "metadata.name" | "metadata.namespace")
                && !supported_fields(rt.id()).contains(&field.as_str())
            {
                return Err(format!("field label not supported: {field}"));
            }
        }
        Ok(parsed)
    }

    /// Parses a selector without checking that its fields can be selected
    /// on (for reading what it asks, as authorization does).
    pub fn parse_any(s: &str) -> Result<Self, String> {
        let mut terms = Vec::new();
        for term in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (field, equal, value) = if let Some((f, v)) = term.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                (f, true, v)
            } else {
                return Err(format!(
                    "invalid selector: '{term}'; can't understand '{term}'"
                ));
            };
            terms.push((field.trim().to_owned(), equal, value.trim().to_owned()));
        }
        Ok(Self { terms })
    }

    pub fn is_empty(&self) -> bool {
        self.terms.is_empty()
    }

    pub fn matches(&self, rt: &ResourceType, obj: &Value) -> bool {
        self.terms
            .iter()
            .all(|(field, equal, value)| (field_value(rt.id(), obj, field) == *value) == *equal)
    }

    /// The value an equality term pins `field` to, if any (for indexed lookups).
    pub fn exact(&self, field: &str) -> Option<&str> {
        self.terms
            .iter()
            .find(|(f, equal, _)| f == field && *equal)
            .map(|(_, _, v)| v.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::lookup;
    use serde_json::json;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn label_selector_cases() {
        let l = labels(&[("app", "web"), ("env", "prod"), ("tier", "fe")]);
        let cases = [
            ("", true),
            ("app=web", true),
            ("app==web,env=prod", true),
            ("app!=web", false),
            ("env in (prod, staging)", true),
            ("env notin (prod)", false),
            ("canary", false),
            ("!canary", true),
            ("tier,app in (web),!x", true),
            ("missing!=x", true),
        ];
        for (sel, want) in cases {
            assert_eq!(
                LabelSelector::parse(sel).unwrap().matches(&l),
                want,
                "{sel}"
            );
        }
        for bad in ["app in web", "a b", "app=bad value", "=x"] {
            assert!(LabelSelector::parse(bad).is_err(), "{bad}");
        }
        let rendered = render(&serde_json::json!({"matchLabels": {"app": "web"},
            "matchExpressions": [{"key": "env", "operator": "NotIn", "values": ["a", "b"]}, {"key": "x", "operator": "DoesNotExist"}]}));
        assert_eq!(rendered, "app=web,env notin (a,b),!x");
        assert_eq!(
            LabelSelector::parse(&rendered).unwrap().to_string(),
            rendered,
            "render and parse round trip"
        );
    }

    #[test]
    fn field_selector_on_pods() {
        let pods = lookup("", "v1", "pods").unwrap();
        let pod = json!({"metadata": {"name": "p", "namespace": "ns"}, "spec": {"nodeName": "n1"}, "status": {"phase": "Running"}});
        let sel = FieldSelector::parse(pods, "spec.nodeName=n1,status.phase!=Failed").unwrap();
        assert!(sel.matches(pods, &pod));
        assert_eq!(sel.exact("spec.nodeName"), Some("n1"));
        assert!(
            !FieldSelector::parse(pods, "spec.nodeName=")
                .unwrap()
                .matches(pods, &pod)
        );
        assert!(
            FieldSelector::parse(pods, "spec.nodeName=")
                .unwrap()
                .matches(pods, &json!({"spec": {}}))
        );
        assert!(FieldSelector::parse(pods, "spec.containers=x").is_err());
    }
}
