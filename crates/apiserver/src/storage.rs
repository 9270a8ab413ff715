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

/// A stored object as read through `rt`'s version: custom resources
/// convert with the `None` strategy; `autoscaling/v1` is converted from the
/// stored v2 (see [`wasmkube_api::conversion`]).
pub(crate) fn served_as(rt: &wasmkube_api::registry::ResourceType, obj: &mut Value) {
    wasmkube_api::conversion::to_served(rt, obj);
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
/// metadata lists and maps, as Kubernetes' encoding does. The object is
/// left as it was stored, so [`stored_at`] can turn it into what
/// [`decode_stored`] would read back, without decoding.
pub fn encode_for_store(obj: &mut Value) -> Bytes {
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("resourceVersion");
        meta.retain(|k, v| {
            !OMIT_EMPTY.contains(&k.as_str())
                || !(v.is_null()
                    || v.as_array().is_some_and(Vec::is_empty)
                    || v.as_object().is_some_and(|m| m.is_empty()))
        });
    }
    Bytes::from(serde_json::to_vec(obj).expect("JSON values always serialize"))
}

/// An object just encoded with [`encode_for_store`], as stored at `revision`.
pub fn stored_at(mut obj: Value, revision: u64) -> Value {
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert(
            "resourceVersion".into(),
            Value::String(revision.to_string()),
        );
    }
    obj
}

/// The `resourceVersion` of an object as a revision, if it has one.
pub fn resource_version(obj: &Value) -> Option<Result<u64, ()>> {
    match obj["metadata"]["resourceVersion"].as_str() {
        None | Some("") => None,
        Some(s) => Some(s.parse().map_err(|_| ())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_encoded_object_as_stored_is_what_decoding_reads_back() {
        let mut obj = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "resourceVersion": "7", "labels": {}, "finalizers": [],
                "annotations": {"a": "b"}, "ownerReferences": null},
            "spec": {"n": 1.5, "m": -3, "u": 18446744073709551615u64}});
        let bytes = encode_for_store(&mut obj);
        let kv = wasmkube_store::KeyValue {
            key: "/registry/core/pods/default/p".into(),
            value: bytes,
            create_revision: 9,
            mod_revision: 9,
        };
        let read = decode_stored(&kv).unwrap();
        assert_eq!(stored_at(obj, 9), read);
        assert_eq!(read["metadata"]["resourceVersion"], "9");
        assert!(read["metadata"].get("labels").is_none());
        assert_eq!(read["metadata"]["annotations"]["a"], "b");
    }
}
