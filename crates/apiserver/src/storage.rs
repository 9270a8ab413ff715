//! Objects in the store: keys, encoding, and `resourceVersion` mapping.
//!
//! Objects are stored as JSON without `metadata.resourceVersion`; the store's
//! `mod_revision` is injected on every read, so the version can never
//! disagree with the revision that guards updates.

use bytes::Bytes;
use serde_json::Value;
use wasmkube_store::KeyValue;

/// Decodes a stored object and sets its `resourceVersion`.
pub fn decode_stored(kv: &KeyValue) -> Result<Value, serde_json::Error> {
    let mut obj: Value = serde_json::from_slice(&kv.value)?;
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert(
            "resourceVersion".into(),
            Value::String(kv.mod_revision.to_string()),
        );
    }
    Ok(obj)
}

/// Metadata members Kubernetes omits when empty (`omitempty`).
const OMIT_EMPTY: &[&str] = &[
    "labels",
    "annotations",
    "finalizers",
    "ownerReferences",
    "managedFields",
];

/// Encodes an object for the store, dropping `resourceVersion` and empty
/// metadata lists and maps, as Kubernetes' encoding does.
pub fn encode_for_store(obj: &Value) -> Bytes {
    let mut obj = obj.clone();
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("resourceVersion");
        meta.retain(|k, v| {
            !OMIT_EMPTY.contains(&k.as_str())
                || !(v.is_null()
                    || v.as_array().is_some_and(Vec::is_empty)
                    || v.as_object().is_some_and(|m| m.is_empty()))
        });
    }
    Bytes::from(serde_json::to_vec(&obj).expect("JSON values always serialize"))
}

/// The `resourceVersion` of an object as a revision, if it has one.
pub fn resource_version(obj: &Value) -> Option<Result<u64, ()>> {
    match obj["metadata"]["resourceVersion"].as_str() {
        None | Some("") => None,
        Some(s) => Some(s.parse().map_err(|_| ())),
    }
}
