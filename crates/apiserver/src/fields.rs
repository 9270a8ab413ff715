//! Field ownership (`metadata.managedFields`) and server-side apply.
//!
//! A field set is the set of leaf paths a manager owns, each path a list of
//! FieldsV1 elements: `f:<field>`, `k:<key json>` for an item of a keyed list
//! (with a trailing `.` for the item itself), `v:<value json>` for a member of
//! a set. Updates give the writer every leaf whose value it changed; apply
//! checks the applied leaves against other owners (409 with the conflicting
//! fields unless forced) and removes leaves the applier owned before but no
//! longer applies, when nobody else owns them.

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};
use wasmkube_api::ResourceType;

use crate::merge_keys::{ListKind, Lists, list_kind_of};
use crate::patch;

type Path = Vec<String>;
pub type FieldSet = BTreeSet<Path>;

/// Metadata fields that belong to the server, never to a manager.
const SERVER_METADATA: &[&str] = &[
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "selfLink",
    "generateName",
];

/// Which part of an object a write manages: the main resource or `status`.
fn in_scope(field: &str, subresource: Option<&str>) -> bool {
    match subresource {
        Some("status") => field == "status",
        _ => !matches!(field, "apiVersion" | "kind" | "status"),
    }
}

/// The leaves of `obj` a write to `subresource` can own.
pub fn leaves(kind: Lists, obj: &Value, subresource: Option<&str>) -> FieldSet {
    let mut out = FieldSet::new();
    let Value::Object(top) = obj else { return out };
    let mut names = Vec::new();
    let mut path = Vec::new();
    for (k, v) in top {
        if !in_scope(k, subresource) {
            continue;
        }
        if k == "metadata" {
            let Value::Object(meta) = v else { continue };
            path.push("f:metadata".to_owned());
            names.push("metadata".to_owned());
            for (mk, mv) in meta {
                if !SERVER_METADATA.contains(&mk.as_str()) {
                    walk_field(kind, mk, mv, &mut names, &mut path, &mut out);
                }
            }
            names.pop();
            path.pop();
        } else {
            walk_field(kind, k, v, &mut names, &mut path, &mut out);
        }
    }
    out
}

fn walk_field(
    kind: Lists,
    key: &str,
    v: &Value,
    names: &mut Vec<String>,
    path: &mut Path,
    out: &mut FieldSet,
) {
    names.push(key.to_owned());
    path.push(format!("f:{key}"));
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, child) in m {
                walk_field(kind, k, child, names, path, out);
            }
        }
        Value::Array(items) => {
            let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
            let list = list_kind_of(kind, &name_refs);
            match list.keys() {
                Some(keys)
                    if items
                        .iter()
                        .all(|i| keys.iter().all(|k| i.get(k).is_some())) =>
                {
                    for item in items {
                        let id: serde_json::Map<String, Value> = keys
                            .iter()
                            .map(|k| ((*k).to_owned(), item[*k].clone()))
                            .collect();
                        path.push(format!("k:{}", Value::Object(id)));
                        let mut me = path.clone();
                        me.push(".".into());
                        out.insert(me);
                        if let Value::Object(fields) = item {
                            for (k, child) in fields {
                                if !keys.contains(&k.as_str()) {
                                    walk_field(kind, k, child, names, path, out);
                                }
                            }
                        }
                        path.pop();
                    }
                }
                _ => match list {
                    ListKind::Set => {
                        for item in items {
                            let mut me = path.clone();
                            me.push(format!("v:{item}"));
                            out.insert(me);
                        }
                    }
                    _ => {
                        out.insert(path.clone());
                    }
                },
            }
        }
        _ => {
            out.insert(path.clone());
        }
    }
    path.pop();
    names.pop();
}

/// The value at a field path, if present.
fn value_at<'a>(obj: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut cur = obj;
    for elem in path {
        cur = if let Some(f) = elem.strip_prefix("f:") {
            cur.get(f)?
        } else if let Some(k) = elem.strip_prefix("k:") {
            let key: Map<String, Value> = serde_json::from_str(k).ok()?;
            cur.as_array()?
                .iter()
                .find(|item| key.iter().all(|(kk, kv)| item.get(kk) == Some(kv)))?
        } else if let Some(v) = elem.strip_prefix("v:") {
            let want: Value = serde_json::from_str(v).ok()?;
            cur.as_array()?.iter().find(|item| **item == want)?
        } else if elem == "." {
            cur
        } else {
            return None;
        };
    }
    Some(cur)
}

/// Removes the field at `path` from `obj`.
fn remove_at(obj: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    if last == "." {
        // The keyed item itself: remove it from its list.
        if let Some((item, list_path)) = parents.split_last() {
            let key: Option<Map<String, Value>> = item
                .strip_prefix("k:")
                .and_then(|k| serde_json::from_str(k).ok());
            if let (Some(key), Some(Value::Array(list))) = (key, value_at_mut(obj, list_path)) {
                list.retain(|i| !key.iter().all(|(kk, kv)| i.get(kk) == Some(kv)));
            }
        }
        return;
    }
    let Some(parent) = value_at_mut(obj, parents) else {
        return;
    };
    if let Some(f) = last.strip_prefix("f:") {
        if let Some(m) = parent.as_object_mut() {
            m.remove(f);
        }
    } else if let Some(v) = last.strip_prefix("v:")
        && let (Ok(want), Some(list)) = (serde_json::from_str::<Value>(v), parent.as_array_mut())
    {
        list.retain(|i| *i != want);
    }
}

fn value_at_mut<'a>(obj: &'a mut Value, path: &[String]) -> Option<&'a mut Value> {
    let mut cur = obj;
    for elem in path {
        cur = if let Some(f) = elem.strip_prefix("f:") {
            cur.get_mut(f)?
        } else if let Some(k) = elem.strip_prefix("k:") {
            let key: Map<String, Value> = serde_json::from_str(k).ok()?;
            cur.as_array_mut()?
                .iter_mut()
                .find(|item| key.iter().all(|(kk, kv)| item.get(kk) == Some(kv)))?
        } else {
            return None;
        };
    }
    Some(cur)
}

/// Encodes a field set as FieldsV1 JSON.
pub fn to_fields_v1(set: &FieldSet) -> Value {
    let mut root = Map::new();
    for path in set {
        let mut cur = &mut root;
        for elem in path {
            cur = cur
                .entry(elem.clone())
                .or_insert_with(|| Value::Object(Map::new()))
                .as_object_mut()
                .expect("field set nodes are objects");
        }
    }
    Value::Object(root)
}

/// Decodes FieldsV1 JSON into a field set.
pub fn from_fields_v1(v: &Value) -> FieldSet {
    fn walk(v: &Value, path: &mut Path, out: &mut FieldSet) {
        match v.as_object() {
            Some(m) if !m.is_empty() => {
                for (k, child) in m {
                    path.push(k.clone());
                    walk(child, path, out);
                    path.pop();
                }
            }
            _ if !path.is_empty() => {
                out.insert(path.clone());
            }
            _ => {}
        }
    }
    let mut out = FieldSet::new();
    walk(v, &mut Vec::new(), &mut out);
    out
}

/// One `managedFields` entry.
#[derive(Clone, Debug, PartialEq)]
struct Entry {
    manager: String,
    operation: String,
    api_version: String,
    time: String,
    subresource: Option<String>,
    fields: FieldSet,
}

fn entries(obj: Option<&Value>) -> Vec<Entry> {
    let Some(list) = obj.and_then(|o| o["metadata"]["managedFields"].as_array()) else {
        return Vec::new();
    };
    list.iter()
        .map(|e| Entry {
            manager: e["manager"].as_str().unwrap_or_default().to_owned(),
            operation: e["operation"].as_str().unwrap_or("Update").to_owned(),
            api_version: e["apiVersion"].as_str().unwrap_or_default().to_owned(),
            time: e["time"].as_str().unwrap_or_default().to_owned(),
            subresource: e["subresource"].as_str().map(str::to_owned),
            fields: from_fields_v1(&e["fieldsV1"]),
        })
        .collect()
}

fn store_entries(obj: &mut Value, list: Vec<Entry>) {
    let rendered: Vec<Value> = list
        .into_iter()
        .filter(|e| !e.fields.is_empty())
        .map(|e| {
            let mut v = json!({
                "manager": e.manager,
                "operation": e.operation,
                "apiVersion": e.api_version,
                "time": e.time,
                "fieldsType": "FieldsV1",
                "fieldsV1": to_fields_v1(&e.fields),
            });
            if let Some(s) = e.subresource {
                v["subresource"] = json!(s);
            }
            v
        })
        .collect();
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        if rendered.is_empty() {
            meta.remove("managedFields");
        } else {
            meta.insert("managedFields".into(), Value::Array(rendered));
        }
    }
}

fn entry_mut<'a>(
    list: &'a mut Vec<Entry>,
    api_version: String,
    manager: &str,
    operation: &str,
    sub: Option<&str>,
    now: &str,
) -> &'a mut Entry {
    let pos = list.iter().position(|e| {
        e.manager == manager && e.operation == operation && e.subresource.as_deref() == sub
    });
    let pos = pos.unwrap_or_else(|| {
        list.push(Entry {
            manager: manager.to_owned(),
            operation: operation.to_owned(),
            api_version: api_version.clone(),
            time: String::new(),
            subresource: sub.map(str::to_owned),
            fields: FieldSet::new(),
        });
        list.len() - 1
    });
    let e = &mut list[pos];
    e.time = now.to_owned();
    e.api_version = api_version;
    e
}

/// Records an Update by `manager` that turned `old` into `new`.
pub fn record_update(
    rt: &ResourceType,
    manager: &str,
    sub: Option<&str>,
    old: Option<&Value>,
    new: &mut Value,
    now: &str,
) {
    let mut list = entries(old);
    let new_leaves = leaves(Lists::of(rt), new, sub);
    let old_leaves = old
        .map(|o| leaves(Lists::of(rt), o, sub))
        .unwrap_or_default();
    let changed: FieldSet = new_leaves
        .iter()
        .filter(|p| old.is_none_or(|o| value_at(o, p) != value_at(new, p)))
        .cloned()
        .collect();
    let removed: FieldSet = old_leaves.difference(&new_leaves).cloned().collect();
    if changed.is_empty() && removed.is_empty() {
        store_entries(new, list);
        return;
    }
    for e in &mut list {
        e.fields.retain(|p| !removed.contains(p));
        let same_scope = e.subresource.as_deref() == sub;
        if same_scope && !(e.manager == manager && e.operation == "Update") {
            e.fields.retain(|p| !changed.contains(p));
        }
    }
    // Updates compare stored objects: their paths are the stored version's.
    let me = entry_mut(
        &mut list,
        wasmkube_api::conversion::stored_api_version(rt),
        manager,
        "Update",
        sub,
        now,
    );
    me.fields.extend(changed);
    store_entries(new, list);
}

/// One field another manager owns with a different value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    pub manager: String,
    pub api_version: String,
    /// Rendered path, e.g. `.spec.replicas` or `.spec.containers[name="web"].image`.
    pub field: String,
}

/// Renders a field path the way apply conflicts show it.
pub fn render_path(path: &[String]) -> String {
    let mut out = String::new();
    for elem in path {
        if let Some(f) = elem.strip_prefix("f:") {
            out.push('.');
            out.push_str(f);
        } else if let Some(k) = elem.strip_prefix("k:") {
            let key: Map<String, Value> = serde_json::from_str(k).unwrap_or_default();
            let parts: Vec<String> = key.iter().map(|(kk, kv)| format!("{kk}={kv}")).collect();
            out.push_str(&format!("[{}]", parts.join(",")));
        } else if let Some(v) = elem.strip_prefix("v:") {
            out.push_str(&format!("[={v}]"));
        }
    }
    out
}

/// Server-side apply of `applied` by `manager` onto `live` (absent on create).
/// Returns the merged object with updated managedFields, or the conflicts.
pub fn apply(
    rt: &ResourceType,
    sub: Option<&str>,
    manager: &str,
    force: bool,
    live: Option<&Value>,
    applied: &Value,
    now: &str,
) -> Result<Value, Vec<Conflict>> {
    let mut list = entries(live);
    // An apply to the object owns its fields but status; one to `status`
    // owns status fields. Ownership is compared within the same part.
    let same_part = |e: &Entry| e.subresource.as_deref() == sub;
    let applying = |e: &Entry| e.manager == manager && e.operation == "Apply" && same_part(e);
    let applied_leaves = leaves(Lists::of(rt), applied, sub);
    let empty = json!({});
    let live_obj = live.unwrap_or(&empty);
    let mut conflicts = Vec::new();
    let mut conflicting = FieldSet::new();
    for e in &list {
        if applying(e) || !same_part(e) {
            continue;
        }
        for p in e.fields.intersection(&applied_leaves) {
            let differs = if p.last().is_some_and(|l| l == ".") {
                false
            } else {
                value_at(live_obj, p) != value_at(applied, p)
            };
            if differs {
                conflicts.push(Conflict {
                    manager: e.manager.clone(),
                    api_version: e.api_version.clone(),
                    field: render_path(p),
                });
                conflicting.insert(p.clone());
            }
        }
    }
    if !conflicts.is_empty() && !force {
        return Err(conflicts);
    }
    let mut merged =
        patch::strategic_merge_patch(Lists::of(rt), live_obj, applied).map_err(|e| {
            vec![Conflict {
                manager: manager.to_owned(),
                api_version: rt.api_version(),
                field: e.to_string(),
            }]
        })?;
    // Fields this manager applied before, no longer applies, and nobody else owns go away.
    let previously: FieldSet = list
        .iter()
        .find(|e| applying(e))
        .map(|e| e.fields.clone())
        .unwrap_or_default();
    let others: FieldSet = list
        .iter()
        .filter(|e| !applying(e) && same_part(e))
        .flat_map(|e| e.fields.iter().cloned())
        .collect();
    let mut stale: Vec<&Path> = previously
        .iter()
        .filter(|p| !applied_leaves.contains(*p) && !others.contains(*p))
        .collect();
    stale.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in stale {
        remove_at(&mut merged, p);
    }
    for e in &mut list {
        if !applying(e) && same_part(e) {
            e.fields.retain(|p| !conflicting.contains(p));
        }
    }
    let me = entry_mut(&mut list, rt.api_version(), manager, "Apply", sub, now);
    me.fields = applied_leaves;
    store_entries(&mut merged, list);
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmkube_api::registry::lookup;

    fn deploy() -> &'static ResourceType {
        lookup("apps", "v1", "deployments").unwrap()
    }

    #[test]
    fn fields_v1_round_trips_and_names_keyed_items() {
        let obj = json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "labels": {"app": "web"}, "finalizers": ["x"]},
            "spec": {"replicas": 2, "template": {"spec": {"containers": [{"name": "web", "image": "nginx"}]}}},
            "status": {"replicas": 1}});
        let set = leaves(Lists::Builtin("Deployment"), &obj, None);
        let v1 = to_fields_v1(&set);
        assert_eq!(
            v1,
            json!({"f:metadata": {"f:finalizers": {"v:\"x\"": {}}, "f:labels": {"f:app": {}}},
                "f:spec": {"f:replicas": {}, "f:template": {"f:spec": {"f:containers": {"k:{\"name\":\"web\"}": {".": {}, "f:image": {}}}}}}})
        );
        assert_eq!(from_fields_v1(&v1), set);
    }

    #[test]
    fn apply_conflicts_with_an_updater_and_force_takes_ownership() {
        let rt = deploy();
        let mut live = json!({"metadata": {"name": "web"}, "spec": {"replicas": 2}});
        record_update(rt, "kubectl-client-side-apply", None, None, &mut live, "t0");
        let applied = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"}, "spec": {"replicas": 3}});
        let conflicts = apply(rt, None, "kubectl", false, Some(&live), &applied, "t1").unwrap_err();
        assert_eq!(
            conflicts,
            vec![Conflict {
                manager: "kubectl-client-side-apply".into(),
                api_version: "apps/v1".into(),
                field: ".spec.replicas".into()
            }]
        );
        // The same value is shared ownership, not a conflict.
        let same = json!({"metadata": {"name": "web"}, "spec": {"replicas": 2}});
        assert!(apply(rt, None, "kubectl", false, Some(&live), &same, "t1").is_ok());
        let forced = apply(rt, None, "kubectl", true, Some(&live), &applied, "t1").unwrap();
        assert_eq!(forced["spec"]["replicas"], 3);
        let owners = entries(Some(&forced));
        assert_eq!(owners.len(), 1, "{owners:?}");
        assert_eq!(owners[0].manager, "kubectl");
    }

    #[test]
    fn apply_removes_fields_it_stopped_applying() {
        let rt = deploy();
        let first = json!({"metadata": {"name": "web", "labels": {"a": "1", "b": "2"}}, "spec": {"replicas": 1}});
        let live = apply(rt, None, "mgr", false, None, &first, "t0").unwrap();
        let second =
            json!({"metadata": {"name": "web", "labels": {"a": "1"}}, "spec": {"replicas": 1}});
        let out = apply(rt, None, "mgr", false, Some(&live), &second, "t1").unwrap();
        assert_eq!(out["metadata"]["labels"], json!({"a": "1"}));
    }

    /// An apply to `status` owns status fields in an entry of its own,
    /// conflicts only with status writers, and drops status fields it
    /// stopped applying; the object's own apply entry is untouched.
    #[test]
    fn status_applies_own_status_fields_apart() {
        let rt = deploy();
        let spec = json!({"metadata": {"name": "web"}, "spec": {"replicas": 1}});
        let live = apply(rt, None, "mgr", false, None, &spec, "t0").unwrap();
        let status =
            json!({"metadata": {"name": "web"}, "status": {"replicas": 1, "readyReplicas": 1}});
        let live = apply(rt, Some("status"), "mgr", false, Some(&live), &status, "t1").unwrap();
        let owners = entries(Some(&live));
        let status_entry = owners
            .iter()
            .find(|e| e.subresource.as_deref() == Some("status"))
            .expect("a status entry");
        assert_eq!(status_entry.operation, "Apply");
        assert!(
            status_entry
                .fields
                .contains(&vec!["f:status".to_owned(), "f:readyReplicas".to_owned()])
        );
        let main = owners.iter().find(|e| e.subresource.is_none()).unwrap();
        assert!(
            main.fields
                .contains(&vec!["f:spec".to_owned(), "f:replicas".to_owned()])
        );
        // Another status writer's different value is a conflict.
        let other = json!({"metadata": {"name": "web"}, "status": {"readyReplicas": 0}});
        let conflicts = apply(
            rt,
            Some("status"),
            "other",
            false,
            Some(&live),
            &other,
            "t2",
        )
        .unwrap_err();
        assert_eq!(conflicts[0].manager, "mgr");
        // What the manager no longer applies goes.
        let less = json!({"metadata": {"name": "web"}, "status": {"replicas": 1}});
        let out = apply(rt, Some("status"), "mgr", false, Some(&live), &less, "t3").unwrap();
        assert_eq!(out["status"], json!({"replicas": 1}));
        assert_eq!(out["spec"], json!({"replicas": 1}));
    }

    #[test]
    fn updates_move_ownership_of_changed_fields() {
        let rt = deploy();
        let mut v1 = json!({"metadata": {"name": "web"}, "spec": {"replicas": 1, "paused": false}});
        record_update(rt, "a", None, None, &mut v1, "t0");
        let mut v2 = v1.clone();
        v2["spec"]["replicas"] = json!(5);
        record_update(rt, "b", None, Some(&v1), &mut v2, "t1");
        let owners = entries(Some(&v2));
        let of = |m: &str| {
            owners
                .iter()
                .find(|e| e.manager == m)
                .unwrap()
                .fields
                .iter()
                .map(|p| render_path(p))
                .collect::<Vec<_>>()
        };
        assert_eq!(of("a"), vec![".spec.paused"]);
        assert_eq!(of("b"), vec![".spec.replicas"]);
    }
}
