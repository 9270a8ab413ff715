//! The three patch formats: JSON patch (RFC 6902), JSON merge patch (RFC 7386)
//! and Kubernetes' strategic merge patch with its directives (`$patch`,
//! `$retainKeys`, `$deleteFromPrimitiveList/…`, `$setElementOrder/…`).

use serde_json::{Map, Value};

use crate::merge_keys::{ListKind, Lists, list_kind_of};

/// Which patch a `Content-Type` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchType {
    Json,
    Merge,
    Strategic,
    Apply,
}

impl PatchType {
    pub fn from_content_type(ct: &str) -> Option<Self> {
        let mime = ct.split(';').next().unwrap_or_default().trim();
        match mime {
            "application/json-patch+json" => Some(Self::Json),
            "application/merge-patch+json" => Some(Self::Merge),
            "application/strategic-merge-patch+json" => Some(Self::Strategic),
            "application/apply-patch+yaml" | "application/apply-patch+json" => Some(Self::Apply),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    #[error("the patch is malformed: {0}")]
    Malformed(String),
    #[error("the patch could not be applied: {0}")]
    Failed(String),
}

/// Applies a JSON patch document.
pub fn json_patch(target: &Value, patch: &Value) -> Result<Value, PatchError> {
    let ops: json_patch::Patch =
        serde_json::from_value(patch.clone()).map_err(|e| PatchError::Malformed(e.to_string()))?;
    let mut out = target.clone();
    json_patch::patch(&mut out, &ops).map_err(|e| PatchError::Failed(e.to_string()))?;
    Ok(out)
}

/// Applies a JSON merge patch.
pub fn merge_patch(target: &Value, patch: &Value) -> Result<Value, PatchError> {
    if !patch.is_object() {
        return Err(PatchError::Malformed(
            "a merge patch must be a JSON object".into(),
        ));
    }
    let mut out = target.clone();
    json_patch::merge(&mut out, patch);
    Ok(out)
}

/// Applies a strategic merge patch to an object of `kind`.
pub fn strategic_merge_patch(
    kind: Lists,
    target: &Value,
    patch: &Value,
) -> Result<Value, PatchError> {
    let (Value::Object(t), Value::Object(p)) = (target, patch) else {
        return Err(PatchError::Malformed(
            "a strategic merge patch must be a JSON object".into(),
        ));
    };
    let mut path = Vec::new();
    Ok(Value::Object(merge_map(kind, t.clone(), p, &mut path)?))
}

fn merge_map(
    kind: Lists,
    mut target: Map<String, Value>,
    patch: &Map<String, Value>,
    path: &mut Vec<String>,
) -> Result<Map<String, Value>, PatchError> {
    match patch.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            let mut out = patch.clone();
            out.remove("$patch");
            return Ok(strip_directives(out));
        }
        Some("delete") => return Ok(Map::new()),
        Some("merge") | None => {}
        Some(other) => {
            return Err(PatchError::Malformed(format!(
                "unknown patch directive {other:?}"
            )));
        }
    }
    if let Some(retain) = patch.get("$retainKeys") {
        let keep: Vec<&str> = retain
            .as_array()
            .ok_or_else(|| PatchError::Malformed("$retainKeys must be a list".into()))?
            .iter()
            .filter_map(Value::as_str)
            .collect();
        target.retain(|k, _| keep.contains(&k.as_str()));
    }
    for (key, pv) in patch {
        if key == "$patch" || key == "$retainKeys" || key.starts_with("$setElementOrder/") {
            continue;
        }
        if let Some(field) = key.strip_prefix("$deleteFromPrimitiveList/") {
            let remove = pv.as_array().cloned().unwrap_or_default();
            if let Some(Value::Array(list)) = target.get_mut(field) {
                list.retain(|v| !remove.contains(v));
            }
            continue;
        }
        if pv.is_null() {
            target.remove(key);
            continue;
        }
        path.push(key.clone());
        let merged = match (target.remove(key), pv) {
            (Some(Value::Object(tm)), Value::Object(pm)) => {
                Value::Object(merge_map(kind, tm, pm, path)?)
            }
            (Some(Value::Array(tl)), Value::Array(pl)) => {
                Value::Array(merge_list(kind, tl, pl, path)?)
            }
            (_, Value::Object(pm)) => Value::Object(merge_map(kind, Map::new(), pm, path)?),
            (_, Value::Array(pl)) => Value::Array(merge_list(kind, Vec::new(), pl, path)?),
            (_, v) => v.clone(),
        };
        path.pop();
        target.insert(key.clone(), merged);
    }
    Ok(target)
}

fn strip_directives(mut m: Map<String, Value>) -> Map<String, Value> {
    m.retain(|k, _| !k.starts_with('$'));
    m
}

fn merge_list(
    kind: Lists,
    target: Vec<Value>,
    patch: &[Value],
    path: &mut Vec<String>,
) -> Result<Vec<Value>, PatchError> {
    let (strategy, field_path) = {
        let names: Vec<&str> = path.iter().map(String::as_str).collect();
        (list_kind_of(kind, &names), names.join("."))
    };
    // `{"$patch": "replace"}` as an item replaces the whole list with the rest.
    if patch
        .iter()
        .any(|v| v.get("$patch").and_then(Value::as_str) == Some("replace"))
    {
        return Ok(patch
            .iter()
            .filter(|v| v.get("$patch").is_none())
            .cloned()
            .collect());
    }
    match strategy {
        ListKind::Atomic => Ok(patch.to_vec()),
        ListKind::Set => {
            let mut out = target;
            for v in patch {
                if !out.contains(v) {
                    out.push(v.clone());
                }
            }
            Ok(out)
        }
        ListKind::Keyed(_) | ListKind::Map(_) => {
            let keys = strategy.keys().unwrap_or_default();
            let mut out = target;
            for item in patch {
                let Value::Object(pm) = item else {
                    return Err(PatchError::Malformed(format!(
                        "items of {field_path} must be objects"
                    )));
                };
                if let Some(key) = keys.iter().find(|k| !pm.contains_key(**k)) {
                    return Err(PatchError::Malformed(format!(
                        "map: {item} does not contain declared merge key: {key}"
                    )));
                }
                let pos = out
                    .iter()
                    .position(|t| keys.iter().all(|k| t.get(*k) == pm.get(*k)));
                if pm.get("$patch").and_then(Value::as_str) == Some("delete") {
                    if let Some(pos) = pos {
                        out.remove(pos);
                    }
                    continue;
                }
                match pos {
                    Some(pos) => {
                        let Value::Object(tm) = std::mem::take(&mut out[pos]) else {
                            out[pos] = item.clone();
                            continue;
                        };
                        out[pos] = Value::Object(merge_map(kind, tm, pm, path)?);
                    }
                    None => out.push(Value::Object(merge_map(kind, Map::new(), pm, path)?)),
                }
            }
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn deployment() -> Value {
        json!({"metadata": {"name": "web", "labels": {"app": "web", "tier": "fe"}, "finalizers": ["a"]},
            "spec": {"replicas": 1, "template": {"spec": {"containers": [
                {"name": "web", "image": "nginx:1", "env": [{"name": "A", "value": "1"}], "args": ["x", "y"]},
                {"name": "sidecar", "image": "proxy"}]}}}})
    }

    #[test]
    fn strategic_merge_merges_containers_by_name() {
        let patch = json!({"metadata": {"labels": {"tier": null}, "finalizers": ["b"]},
            "spec": {"template": {"spec": {
                "$setElementOrder/containers": [{"name": "web"}, {"name": "sidecar"}],
                "containers": [{"name": "web", "image": "nginx:2", "env": [{"name": "B", "value": "2"}], "args": ["z"]}]}}}});
        let out =
            strategic_merge_patch(Lists::Builtin("Deployment"), &deployment(), &patch).unwrap();
        assert_eq!(out["metadata"]["labels"], json!({"app": "web"}));
        assert_eq!(out["metadata"]["finalizers"], json!(["a", "b"]));
        let containers = &out["spec"]["template"]["spec"]["containers"];
        assert_eq!(containers.as_array().unwrap().len(), 2);
        assert_eq!(containers[0]["image"], "nginx:2");
        assert_eq!(
            containers[0]["env"],
            json!([{"name": "A", "value": "1"}, {"name": "B", "value": "2"}])
        );
        assert_eq!(
            containers[0]["args"],
            json!(["z"]),
            "atomic lists are replaced"
        );
        assert_eq!(containers[1]["name"], "sidecar");
    }

    #[test]
    fn strategic_merge_directives() {
        let patch = json!({"metadata": {"$deleteFromPrimitiveList/finalizers": ["a"]},
            "spec": {"template": {"spec": {"containers": [{"name": "sidecar", "$patch": "delete"}]}}}});
        let out =
            strategic_merge_patch(Lists::Builtin("Deployment"), &deployment(), &patch).unwrap();
        assert_eq!(out["metadata"]["finalizers"], json!([]));
        assert_eq!(
            out["spec"]["template"]["spec"]["containers"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
        let replace = json!({"spec": {"$patch": "replace", "replicas": 5}});
        let out =
            strategic_merge_patch(Lists::Builtin("Deployment"), &deployment(), &replace).unwrap();
        assert_eq!(out["spec"], json!({"replicas": 5}));
        let missing_key = json!({"spec": {"template": {"spec": {"containers": [{"image": "x"}]}}}});
        assert!(matches!(
            strategic_merge_patch(Lists::Builtin("Deployment"), &deployment(), &missing_key),
            Err(PatchError::Malformed(_))
        ));
    }

    #[test]
    fn json_and_merge_patches() {
        let out = json_patch(
            &deployment(),
            &json!([{"op": "replace", "path": "/spec/replicas", "value": 3}]),
        )
        .unwrap();
        assert_eq!(out["spec"]["replicas"], 3);
        assert!(matches!(
            json_patch(
                &deployment(),
                &json!([{"op": "test", "path": "/spec/replicas", "value": 9}])
            ),
            Err(PatchError::Failed(_))
        ));
        assert!(matches!(
            json_patch(&deployment(), &json!({"op": "x"})),
            Err(PatchError::Malformed(_))
        ));
        let out = merge_patch(
            &deployment(),
            &json!({"spec": {"replicas": 2, "template": null}}),
        )
        .unwrap();
        assert_eq!(out["spec"], json!({"replicas": 2}));
    }
}
