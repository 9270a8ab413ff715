//! ResourceQuota admission, as Kubernetes' plugin: a create in a namespace
//! with quotas is charged to every quota that covers it, each charge a
//! guarded write of the quota's `status.used`, so concurrent creates cannot
//! together pass a limit; a create that would pass one is refused with
//! Kubernetes' message. The quota controller recounts the usage (and
//! gives back what deleted and finished objects held).

use std::collections::BTreeSet;

use serde_json::Value;
use wasmkube_api::quota::{self, Usage};
use wasmkube_api::registry::{self, ResourceType};
use wasmkube_store::{ListOptions, StoreError};

use crate::ApiServer;
use crate::error::{ApiError, ApiResult, Subject};
use crate::storage::{decode_stored, encode_for_store};

/// How often a charge is tried again after losing a race for a quota.
const RETRIES: usize = 16;

fn quotas() -> &'static ResourceType {
    registry::lookup("", "v1", "resourcequotas").expect("resourcequotas served")
}

fn forbidden(rt: &ResourceType, obj: &Value, message: String) -> ApiError {
    let name = obj["metadata"]["name"].as_str().unwrap_or_default();
    ApiError::Forbidden {
        subject: Subject::of(rt, name),
        message: format!(
            "{} \"{name}\" is forbidden: {message}",
            rt.qualified_resource()
        ),
    }
}

/// Charges the creation of `obj` (of `rt`, in `namespace`) to the quotas
/// covering it, or refuses it. A dry run checks without charging.
pub(crate) async fn admit_create(
    server: &ApiServer,
    rt: &ResourceType,
    namespace: &str,
    obj: &Value,
    dry_run: bool,
) -> ApiResult<()> {
    if !rt.namespaced {
        return Ok(());
    }
    let usage = quota::usage(rt.group, rt.plural, obj);
    if usage.is_empty() {
        return Ok(());
    }
    let is_pod = rt.group.is_empty() && rt.plural == "pods";
    charge(server, rt, namespace, obj, &usage, is_pod, dry_run).await
}

/// Charges an update of `old` to `new` with what it adds (a Service made a
/// LoadBalancer, a claim grown), or refuses it; what it frees is given
/// back by the controller.
pub(crate) async fn admit_update(
    server: &ApiServer,
    rt: &ResourceType,
    namespace: &str,
    old: &Value,
    new: &Value,
    dry_run: bool,
) -> ApiResult<()> {
    if !rt.namespaced {
        return Ok(());
    }
    let before = quota::usage(rt.group, rt.plural, old);
    let added: Usage = quota::usage(rt.group, rt.plural, new)
        .into_iter()
        .filter_map(|(k, v)| {
            let grown = v.0 - before.get(&k).map_or(0, |b| b.0);
            (grown > 0).then_some((k, wasmkube_api::quantity::Quantity(grown)))
        })
        .collect();
    if added.is_empty() {
        return Ok(());
    }
    charge(server, rt, namespace, new, &added, false, dry_run).await
}

/// Charges `usage` of `obj` to every quota of the namespace covering it.
/// `required`: the pod is new, so it must state what the quotas limit.
async fn charge(
    server: &ApiServer,
    rt: &ResourceType,
    namespace: &str,
    obj: &Value,
    usage: &Usage,
    required: bool,
    dry_run: bool,
) -> ApiResult<()> {
    let mut charged = BTreeSet::new();
    'retry: for _ in 0..RETRIES {
        let listed = server
            .store
            .list(
                &quotas().list_prefix(Some(namespace)),
                ListOptions::default(),
            )
            .await
            .map_err(|e| ApiError::from_store(e, quotas(), ""))?;
        for kv in &listed.items {
            let mut q = decode_stored(kv).map_err(ApiError::internal)?;
            let name = q["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            if charged.contains(&name) || !quota::covers(&q, rt.group, rt.plural, obj) {
                continue;
            }
            if required && let Some(missing) = quota::missing_compute(&q, obj) {
                return Err(forbidden(
                    rt,
                    obj,
                    format!("failed quota: {name}: {missing}"),
                ));
            }
            let hard = quota::hard(&q);
            let delta: Usage = usage
                .iter()
                .filter(|(k, _)| hard.contains_key(*k))
                .map(|(k, v)| (k.clone(), *v))
                .collect();
            if delta.is_empty() {
                continue;
            }
            let used = match quota::recorded_used(&q) {
                Some(used) => used,
                None => recount(server, namespace, &q).await?,
            };
            let next = quota::charge(&q, &used, &delta).map_err(|m| forbidden(rt, obj, m))?;
            if dry_run {
                continue;
            }
            q["status"] = quota::status(&q, &next);
            match server
                .store
                .update(&kv.key, encode_for_store(&mut q), Some(kv.mod_revision))
                .await
            {
                Ok(_) => {
                    charged.insert(name);
                }
                Err(StoreError::Conflict { .. }) => continue 'retry,
                Err(e) => return Err(ApiError::from_store(e, quotas(), &name)),
            }
        }
        return Ok(());
    }
    Err(ApiError::Conflict(
        Subject::of(quotas(), ""),
        "the namespace's quotas are being charged too often; try again".into(),
    ))
}

/// What the objects of `namespace` use of `q`'s resources, counted from the
/// store (for a quota whose status has not caught up with its limits).
async fn recount(server: &ApiServer, namespace: &str, q: &Value) -> ApiResult<Usage> {
    let hard = quota::hard(q);
    let kinds: BTreeSet<(String, String)> = hard
        .keys()
        .filter_map(|k| quota::measured_kind(k))
        .collect();
    let mut used = Usage::new();
    for (group, plural) in kinds {
        let Some(rt) = registry::all()
            .into_iter()
            .find(|t| t.group == group && t.plural == plural)
        else {
            continue;
        };
        let listed = server
            .store
            .list(&rt.list_prefix(Some(namespace)), ListOptions::default())
            .await
            .map_err(|e| ApiError::from_store(e, rt, ""))?;
        // Only pods, services and claims are measured beyond their count
        // (and only pods fall in scopes); others (Secrets among them) are
        // counted without being read.
        let measured = group.is_empty()
            && matches!(
                plural.as_str(),
                "pods" | "services" | "persistentvolumeclaims"
            );
        for kv in &listed.items {
            let u = if measured {
                let obj = decode_stored(kv).map_err(ApiError::internal)?;
                if !quota::covers(q, &group, &plural, &obj) {
                    continue;
                }
                quota::usage(&group, &plural, &obj)
            } else if quota::covers(q, &group, &plural, &Value::Null) {
                quota::usage(&group, &plural, &Value::Null)
            } else {
                continue;
            };
            for (k, v) in u {
                if hard.contains_key(&k) {
                    used.entry(k)
                        .or_insert(wasmkube_api::quantity::Quantity(0))
                        .0 += v.0;
                }
            }
        }
    }
    Ok(used)
}
