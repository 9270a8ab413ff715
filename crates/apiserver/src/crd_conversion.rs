//! CustomResourceDefinition conversion webhooks, as kube-apiserver calls
//! them: a kind whose CRD has `conversion.strategy: Webhook` is stored in
//! its storage version, and each object read or written in another version
//! goes to the webhook in a `ConversionReview`. A list's objects go in one
//! review. Requests are handled in the client's version throughout
//! (defaults, validation, admission); conversion happens where objects
//! enter and leave the store.
//!
//! The webhook may change an object's labels and annotations; the rest of
//! its metadata is restored from the object sent. A failure (unreachable,
//! a refusal, an answer that breaks the protocol) fails the request with a
//! 500 naming the kind and the reason, as Kubernetes does; nothing is
//! stored.

use std::time::Duration;

use serde_json::{Value, json};
use wasmkube_api::ResourceType;
use wasmkube_api::custom::ConversionWebhook;

use crate::ApiServer;
use crate::error::{ApiError, ApiResult};

/// Kubernetes' bound on one conversion call.
const TIMEOUT: Duration = Duration::from_secs(30);

/// The webhook converting `rt`'s objects, if its CRD has one.
pub(crate) fn webhook(rt: &ResourceType) -> Option<&'static ConversionWebhook> {
    rt.custom.and_then(|c| c.conversion.as_ref())
}

/// `objects` (of `rt`'s kind, in whatever version each is) in `rt`'s
/// version. Without a webhook only `apiVersion` changes (`None`).
pub(crate) async fn to_version(
    server: &ApiServer,
    rt: &'static ResourceType,
    objects: &mut [Value],
) -> ApiResult<()> {
    convert(server, rt, &rt.api_version(), objects).await
}

/// `object` (in `rt`'s version) in the version its kind is stored in, if
/// that is another and a webhook converts between them.
pub(crate) async fn to_storage(
    server: &ApiServer,
    rt: &'static ResourceType,
    object: &Value,
) -> ApiResult<Option<Value>> {
    let Some(custom) = rt.custom.filter(|c| c.conversion.is_some()) else {
        return Ok(None);
    };
    if custom.storage_version == rt.version {
        return Ok(None);
    }
    let mut one = [object.clone()];
    let desired = format!("{}/{}", rt.group, custom.storage_version);
    convert(server, rt, &desired, &mut one).await?;
    let [stored] = one;
    Ok(Some(stored))
}

async fn convert(
    server: &ApiServer,
    rt: &'static ResourceType,
    desired: &str,
    objects: &mut [Value],
) -> ApiResult<()> {
    let Some(hook) = webhook(rt) else {
        for o in objects.iter_mut() {
            wasmkube_api::conversion::to_served(rt, o);
        }
        return Ok(());
    };
    let pending: Vec<usize> = (0..objects.len())
        .filter(|&i| objects[i]["apiVersion"].as_str() != Some(desired))
        .collect();
    if pending.is_empty() {
        return Ok(());
    }
    let sent: Vec<Value> = pending.iter().map(|&i| objects[i].clone()).collect();
    let converted = review(server, hook, desired, rt.kind, &sent)
        .await
        .map_err(|why| {
            tracing::warn!(kind = rt.kind, group = rt.group, error = %why, "conversion webhook failed");
            ApiError::internal(format!(
                "conversion webhook for {desired}, Kind={} failed: {why}",
                rt.kind
            ))
        })?;
    for (i, o) in pending.into_iter().zip(converted) {
        objects[i] = o;
    }
    Ok(())
}

/// One `ConversionReview` of `objects` to `desired`: the converted objects
/// in order, their metadata but labels and annotations restored.
async fn review(
    server: &ApiServer,
    hook: &ConversionWebhook,
    desired: &str,
    kind: &str,
    objects: &[Value],
) -> Result<Vec<Value>, String> {
    let review_version = if hook.review_versions.iter().any(|v| v == "v1") {
        "apiextensions.k8s.io/v1"
    } else {
        "apiextensions.k8s.io/v1beta1"
    };
    let uid = uuid::Uuid::new_v4().to_string();
    let body = json!({
        "apiVersion": review_version,
        "kind": "ConversionReview",
        "request": {"uid": uid, "desiredAPIVersion": desired, "objects": objects},
    });
    let endpoint = crate::webhook::resolve(server, &hook.client).await?;
    let (status, answer) = endpoint
        .post_json(bytes::Bytes::from(body.to_string()), TIMEOUT)
        .await
        .map_err(|e| format!("Post \"{endpoint:?}\": {e}"))?;
    if !status.is_success() {
        return Err(format!(
            "the webhook answered {status}: {}",
            String::from_utf8_lossy(&answer).trim()
        ));
    }
    let answer: Value =
        serde_json::from_slice(&answer).map_err(|e| format!("invalid ConversionReview: {e}"))?;
    let response = &answer["response"];
    if answer["apiVersion"] != review_version || answer["kind"] != "ConversionReview" {
        return Err(format!(
            "expected webhook response of {review_version}, Kind=ConversionReview, got {}, Kind={}",
            answer["apiVersion"].as_str().unwrap_or_default(),
            answer["kind"].as_str().unwrap_or_default()
        ));
    }
    if response["uid"].as_str() != Some(&uid) {
        return Err(format!(
            "expected response.uid={uid:?}, got {:?}",
            response["uid"].as_str().unwrap_or_default()
        ));
    }
    if response["result"]["status"] != "Success" {
        let message = response["result"]["message"].as_str().unwrap_or_default();
        return Err(if message.is_empty() {
            "the webhook reported a failure".into()
        } else {
            message.to_owned()
        });
    }
    let converted = response["convertedObjects"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if converted.len() != objects.len() {
        return Err(format!(
            "returned {} objects, expected {}",
            converted.len(),
            objects.len()
        ));
    }
    converted
        .into_iter()
        .zip(objects)
        .enumerate()
        .map(|(i, (mut out, original))| {
            let fail = |why: String| format!("invalid converted object at index {i}: {why}");
            if out["apiVersion"] != desired {
                return Err(fail(format!(
                    "invalid group/version: {}",
                    out["apiVersion"].as_str().unwrap_or_default()
                )));
            }
            if out["kind"] != kind {
                return Err(fail(format!(
                    "invalid kind: {}",
                    out["kind"].as_str().unwrap_or_default()
                )));
            }
            restore_metadata(&mut out, original).map_err(fail)?;
            Ok(out)
        })
        .collect()
}

/// Keeps the webhook's labels and annotations and the sent object's other
/// metadata, as Kubernetes' `restoreObjectMeta` does.
fn restore_metadata(out: &mut Value, original: &Value) -> Result<(), String> {
    let Some(meta) = out.get("metadata").filter(|m| m.is_object()) else {
        return Err("missing metadata".into());
    };
    let mut restored = original["metadata"].clone();
    for key in ["labels", "annotations"] {
        match meta.get(key) {
            None | Some(Value::Null) => {
                if let Some(m) = restored.as_object_mut() {
                    m.remove(key);
                }
            }
            Some(Value::Object(map)) if map.values().all(Value::is_string) => {
                restored[key] = Value::Object(map.clone());
            }
            Some(_) => return Err(format!("metadata.{key} must be a map of strings")),
        }
    }
    out["metadata"] = restored;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_labels_and_annotations_come_from_the_webhook() {
        let original = json!({"metadata": {"name": "a", "uid": "u", "labels": {"x": "1"}, "annotations": {"k": "v"}}});
        let mut out = json!({"metadata": {"name": "b", "uid": "other", "labels": {"y": "2"}}});
        restore_metadata(&mut out, &original).unwrap();
        assert_eq!(
            out["metadata"],
            json!({"name": "a", "uid": "u", "labels": {"y": "2"}})
        );
        let mut bad = json!({"metadata": {"labels": {"n": 1}}});
        assert!(
            restore_metadata(&mut bad, &original)
                .unwrap_err()
                .contains("labels")
        );
        assert!(restore_metadata(&mut json!({}), &original).is_err());
    }
}
