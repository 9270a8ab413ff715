//! Mutating admission that needs other objects: a pod's priority from its
//! PriorityClass (or the global default), and its RuntimeClass's overhead and
//! scheduling constraints, as Kubernetes' Priority and RuntimeClass admission
//! plugins do; an Ingress's class from the default IngressClass, as the
//! DefaultIngressClass plugin does.

use serde_json::{Value, json};
use wasmkube_api::registry::{self, ResourceType};

use crate::ApiServer;
use crate::error::{ApiError, ApiResult, Subject};
use crate::storage::decode_stored;

/// The classes every cluster has (created at start, known here even before).
pub(crate) const SYSTEM_PRIORITY_CLASSES: &[(&str, i64, &str)] = &[
    (
        "system-node-critical",
        2_000_001_000,
        "Used for system critical pods that must not be moved from their current node.",
    ),
    (
        "system-cluster-critical",
        2_000_000_000,
        "Used for system critical pods that must run in the cluster, but can be moved to another node if necessary.",
    ),
];

fn priority_classes() -> &'static ResourceType {
    registry::lookup("scheduling.k8s.io", "v1", "priorityclasses").expect("priorityclasses served")
}

fn runtime_classes() -> &'static ResourceType {
    registry::lookup("node.k8s.io", "v1", "runtimeclasses").expect("runtimeclasses served")
}

async fn get(server: &ApiServer, rt: &ResourceType, name: &str) -> ApiResult<Option<Value>> {
    let kv = server
        .store
        .get(&rt.key(None, name))
        .await
        .map_err(|e| ApiError::from_store(e, rt, name))?;
    kv.map(|kv| decode_stored(&kv).map_err(ApiError::internal))
        .transpose()
}

/// The annotation marking the default IngressClass.
pub(crate) const DEFAULT_INGRESS_CLASS: &str = "ingressclass.kubernetes.io/is-default-class";

/// Admits a new Ingress: one without `spec.ingressClassName` gets the
/// default IngressClass's name (the newest, if several are marked default).
pub(crate) async fn ingress(server: &ApiServer, ingress: &mut Value) -> ApiResult<()> {
    if !ingress["spec"]["ingressClassName"].is_null() {
        return Ok(());
    }
    let classes = registry::lookup("networking.k8s.io", "v1", "ingressclasses")
        .expect("ingressclasses served");
    if let Some(class) = default_class(server, classes, DEFAULT_INGRESS_CLASS).await?
        && let Some(spec) = ingress.get_mut("spec").and_then(Value::as_object_mut)
    {
        spec.insert("ingressClassName".into(), class);
    }
    Ok(())
}

/// Admits a new PersistentVolumeClaim: it is protected while in use, and
/// (Kubernetes' DefaultStorageClass) one without `spec.storageClassName`
/// gets the default StorageClass's name; an empty name asks for no class
/// and is kept.
pub(crate) async fn claim(server: &ApiServer, claim: &mut Value) -> ApiResult<()> {
    // Kubernetes' StorageObjectInUseProtection: the volume controller lets a
    // claim go once no pod uses it.
    protect(claim, wasmkube_api::storage::CLAIM_PROTECTION);
    if !claim["spec"]["storageClassName"].is_null() {
        return Ok(());
    }
    let classes =
        registry::lookup("storage.k8s.io", "v1", "storageclasses").expect("storageclasses served");
    let default = default_class(
        server,
        classes,
        wasmkube_api::storage::DEFAULT_STORAGE_CLASS,
    );
    if let Some(class) = default.await?
        && let Some(spec) = claim.get_mut("spec").and_then(Value::as_object_mut)
    {
        spec.insert("storageClassName".into(), class);
    }
    Ok(())
}

/// Kubernetes' PersistentVolumeClaimResize admission: a claim's request
/// grows only when its class allows volume expansion.
pub(crate) async fn claim_resize(server: &ApiServer, old: &Value, new: &Value) -> ApiResult<()> {
    let size = |c: &Value| {
        serde_json::from_value::<k8s_openapi::api::core::v1::PersistentVolumeClaimSpec>(
            c["spec"].clone(),
        )
        .ok()
        .and_then(|s| wasmkube_api::storage::spec_request_bytes(&s))
    };
    if size(new) <= size(old) {
        return Ok(());
    }
    let claims = registry::lookup("", "v1", "persistentvolumeclaims").expect("claims served");
    let name = new["metadata"]["name"].as_str().unwrap_or_default();
    let classes =
        registry::lookup("storage.k8s.io", "v1", "storageclasses").expect("storageclasses served");
    let class = new["spec"]["storageClassName"].as_str().unwrap_or_default();
    let allows = match server.store.get(&classes.key(None, class)).await {
        Ok(Some(kv)) => decode_stored(&kv).is_ok_and(|c| c["allowVolumeExpansion"] == true),
        Ok(None) => false,
        Err(e) => return Err(ApiError::from_store(e, classes, class)),
    };
    if allows {
        return Ok(());
    }
    Err(ApiError::Forbidden {
        subject: Subject::of(claims, name),
        message: format!(
            "persistentvolumeclaims \"{name}\" is forbidden: only dynamically provisioned pvc can be resized and the storageclass that provisions the pvc must support resize"
        ),
    })
}

/// Admits a new PersistentVolume: it is protected while bound (the volume
/// controller lets it go once its claim is gone).
pub(crate) fn volume(volume: &mut Value) {
    protect(volume, wasmkube_api::storage::VOLUME_PROTECTION);
}

/// Adds `finalizer` to an object that lacks it.
fn protect(obj: &mut Value, finalizer: &str) {
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        let finalizers = meta
            .entry("finalizers")
            .or_insert_with(|| Value::Array(Vec::new()));
        if let Some(list) = finalizers.as_array_mut()
            && !list.iter().any(|f| f == finalizer)
        {
            list.push(finalizer.into());
        }
    }
}

/// The name of the class marked default by `annotation` (the newest, if
/// several are).
async fn default_class(
    server: &ApiServer,
    classes: &'static ResourceType,
    annotation: &str,
) -> ApiResult<Option<Value>> {
    let listed = server
        .store
        .list(&classes.key_prefix(), Default::default())
        .await
        .map_err(|e| ApiError::from_store(e, classes, ""))?;
    Ok(listed
        .items
        .iter()
        .filter_map(|kv| decode_stored(kv).ok())
        .filter(|c| c["metadata"]["annotations"][annotation] == "true")
        .max_by(|a, b| {
            let created = |c: &Value| {
                c["metadata"]["creationTimestamp"]
                    .as_str()
                    .map(str::to_owned)
            };
            created(a).cmp(&created(b))
        })
        .map(|c| c["metadata"]["name"].clone()))
}

fn forbidden(pod: &Value, message: String) -> ApiError {
    let pods = registry::lookup("", "v1", "pods").expect("pods served");
    let name = pod["metadata"]["name"].as_str().unwrap_or_default();
    ApiError::Forbidden {
        subject: Subject::of(pods, name),
        message: format!("pods \"{name}\" is forbidden: {message}"),
    }
}

/// Admits a new pod: resolves its priority and runtime class, adds the
/// default not-ready/unreachable tolerations and, when the server issues
/// service-account tokens, the service-account volume.
pub(crate) async fn pod(server: &ApiServer, pod: &mut Value) -> ApiResult<()> {
    let ranges = limit_ranger_defaults(server, pod).await?;
    priority(server, pod).await?;
    runtime_class(server, pod).await?;
    let refused = wasmkube_api::quota::check_limits(&ranges, pod);
    match refused.len() {
        0 => {}
        1 => return Err(forbidden(pod, refused[0].clone())),
        _ => return Err(forbidden(pod, format!("[{}]", refused.join(", ")))),
    }
    default_tolerations(&mut pod["spec"], server.config.default_toleration_seconds);
    if server.config.service_accounts.is_some() {
        service_account_volume(&mut pod["spec"]);
    }
    Ok(())
}

/// LimitRanger's defaults: containers without requests or limits get the
/// namespace's LimitRange defaults (noted in the `kubernetes.io/limit-ranger`
/// annotation), and the pod is validated again with them. Returns the
/// ranges, which the pod is checked against once admission is done.
async fn limit_ranger_defaults(server: &ApiServer, pod: &mut Value) -> ApiResult<Vec<Value>> {
    let ranges_rt = registry::lookup("", "v1", "limitranges").expect("limitranges served");
    let pods = registry::lookup("", "v1", "pods").expect("pods served");
    let ns = pod["metadata"]["namespace"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let listed = server
        .store
        .list(&ranges_rt.list_prefix(Some(&ns)), Default::default())
        .await
        .map_err(|e| ApiError::from_store(e, ranges_rt, ""))?;
    let ranges = listed
        .items
        .iter()
        .map(|kv| decode_stored(kv).map_err(ApiError::internal))
        .collect::<ApiResult<Vec<_>>>()?;
    if let Some(note) = wasmkube_api::quota::apply_limit_defaults(&ranges, pod) {
        if !pod["metadata"]["annotations"].is_object() {
            pod["metadata"]["annotations"] = json!({});
        }
        pod["metadata"]["annotations"]["kubernetes.io/limit-ranger"] = json!(note);
        pod["status"]["qosClass"] = json!(wasmkube_api::quota::qos_class(pod));
        let errors = wasmkube_api::validation::validate(pods, pod, None);
        if !errors.is_empty() {
            let name = pod["metadata"]["name"].as_str().unwrap_or_default();
            return Err(ApiError::invalid(pods, name, errors));
        }
    }
    Ok(ranges)
}

/// Where a pod's service-account token, CA and namespace are mounted.
pub(crate) const SERVICE_ACCOUNT_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Kubernetes' ServiceAccount admission: unless the pod opts out
/// (`automountServiceAccountToken: false`) or mounts something there
/// itself, a projected `kube-api-access-XXXXX` volume (a bound token, the
/// cluster CA from `kube-root-ca.crt`, the namespace) mounted read-only at
/// [`SERVICE_ACCOUNT_PATH`] in every container.
fn service_account_volume(spec: &mut Value) {
    if spec["automountServiceAccountToken"] == false {
        return;
    }
    let kinds = ["initContainers", "containers"];
    let mounted = kinds.iter().any(|k| {
        spec[*k].as_array().into_iter().flatten().any(|c| {
            c["volumeMounts"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|m| m["mountPath"] == SERVICE_ACCOUNT_PATH)
        })
    });
    if mounted {
        return;
    }
    let name = format!("kube-api-access-{}", crate::rest::random_suffix());
    let volume = json!({
        "name": name,
        "projected": {"defaultMode": 420, "sources": [
            {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
            {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
            {"downwardAPI": {"items": [{"path": "namespace",
                "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}},
        ]},
    });
    if !spec["volumes"].is_array() {
        spec["volumes"] = json!([]);
    }
    if let Some(list) = spec["volumes"].as_array_mut() {
        list.push(volume);
    }
    for k in kinds {
        for c in spec[k].as_array_mut().into_iter().flatten() {
            if !c["volumeMounts"].is_array() {
                c["volumeMounts"] = json!([]);
            }
            if let Some(mounts) = c["volumeMounts"].as_array_mut() {
                mounts.push(
                    json!({"name": name, "mountPath": SERVICE_ACCOUNT_PATH, "readOnly": true}),
                );
            }
        }
    }
}

/// Kubernetes' DefaultTolerationSeconds: a pod without its own toleration for
/// a node going not-ready or unreachable tolerates it for `seconds`.
fn default_tolerations(spec: &mut Value, seconds: i64) {
    let list = &mut spec["tolerations"];
    if !list.is_array() {
        *list = json!([]);
    }
    let list = list.as_array_mut().expect("just made an array");
    for key in [
        "node.kubernetes.io/not-ready",
        "node.kubernetes.io/unreachable",
    ] {
        let present = list
            .iter()
            .any(|t| t["key"] == key && (t["effect"] == "NoExecute" || t["effect"].is_null()));
        if !present {
            list.push(json!({"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": seconds}));
        }
    }
}

async fn priority(server: &ApiServer, pod: &mut Value) -> ApiResult<()> {
    let class = match pod["spec"]["priorityClassName"].as_str() {
        Some(name) if !name.is_empty() => {
            let found = match get(server, priority_classes(), name).await? {
                Some(pc) => Some((
                    pc["value"].as_i64().unwrap_or(0),
                    pc["preemptionPolicy"].clone(),
                )),
                None => SYSTEM_PRIORITY_CLASSES
                    .iter()
                    .find(|(n, ..)| *n == name)
                    .map(|(_, v, _)| (*v, Value::Null)),
            };
            let Some(found) = found else {
                return Err(forbidden(
                    pod,
                    format!("no PriorityClass with name {name} was found"),
                ));
            };
            Some(found)
        }
        _ => global_default(server).await?.map(|pc| {
            pod["spec"]["priorityClassName"] = pc["metadata"]["name"].clone();
            (
                pc["value"].as_i64().unwrap_or(0),
                pc["preemptionPolicy"].clone(),
            )
        }),
    };
    if let Some((value, policy)) = class {
        pod["spec"]["priority"] = json!(value);
        pod["spec"]["preemptionPolicy"] = if policy.is_null() {
            json!("PreemptLowerPriority")
        } else {
            policy
        };
    }
    Ok(())
}

async fn global_default(server: &ApiServer) -> ApiResult<Option<Value>> {
    let rt = priority_classes();
    let list = server
        .store
        .list(&rt.key_prefix(), Default::default())
        .await
        .map_err(ApiError::internal)?;
    let mut best: Option<Value> = None;
    for kv in list.items {
        let pc = decode_stored(&kv).map_err(ApiError::internal)?;
        // With several defaults (a race Kubernetes allows), the lowest wins.
        if pc["globalDefault"] == true
            && best
                .as_ref()
                .is_none_or(|b| pc["value"].as_i64() < b["value"].as_i64())
        {
            best = Some(pc);
        }
    }
    Ok(best)
}

async fn runtime_class(server: &ApiServer, pod: &mut Value) -> ApiResult<()> {
    let Some(name) = pod["spec"]["runtimeClassName"]
        .as_str()
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
    else {
        return Ok(());
    };
    let Some(rc) = get(server, runtime_classes(), &name).await? else {
        return Err(forbidden(
            pod,
            format!("pod rejected: RuntimeClass \"{name}\" not found"),
        ));
    };
    if let Some(fixed) = rc["overhead"]["podFixed"].as_object() {
        if pod["spec"]["overhead"].is_object()
            && pod["spec"]["overhead"] != rc["overhead"]["podFixed"]
        {
            return Err(forbidden(
                pod,
                "pod rejected: Pod's Overhead doesn't match RuntimeClass's defined Overhead".into(),
            ));
        }
        pod["spec"]["overhead"] = Value::Object(fixed.clone());
    }
    let scheduling = &rc["scheduling"];
    if let Some(selector) = scheduling["nodeSelector"].as_object() {
        let target = &mut pod["spec"]["nodeSelector"];
        if !target.is_object() {
            *target = json!({});
        }
        for (k, v) in selector {
            match target.get(k) {
                Some(existing) if existing != v => {
                    return Err(forbidden(
                        pod,
                        format!(
                            "pod rejected: conflict between RuntimeClass \"{name}\" nodeSelector and pod nodeSelector for key {k}"
                        ),
                    ));
                }
                _ => target[k] = v.clone(),
            }
        }
    }
    if let Some(tolerations) = scheduling["tolerations"].as_array() {
        let target = &mut pod["spec"]["tolerations"];
        if !target.is_array() {
            *target = json!([]);
        }
        let list = target.as_array_mut().expect("just made an array");
        for t in tolerations {
            if !list.contains(t) {
                list.push(t.clone());
            }
        }
    }
    Ok(())
}

/// Knative traffic must name revisions that exist: a Service's or Route's
/// `traffic[].revisionName` that is neither an existing Revision in its
/// namespace nor the one its own template names is refused with the field
/// (Knative would accept it and report `RevisionMissing` later; a typo is
/// better caught at once).
pub(crate) async fn knative_traffic(
    server: &ApiServer,
    rt: &ResourceType,
    namespace: Option<&str>,
    obj: &Value,
) -> ApiResult<()> {
    if !matches!(rt.id(), "knative.Service" | "Route") {
        return Ok(());
    }
    let revisions =
        registry::lookup("serving.knative.dev", "v1", "revisions").expect("revisions served");
    let own = obj["spec"]["template"]["metadata"]["name"].as_str();
    let mut causes = Vec::new();
    for (i, t) in obj["spec"]["traffic"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let Some(name) = t["revisionName"].as_str() else {
            continue;
        };
        if Some(name) == own {
            continue;
        }
        let found = server
            .store
            .get(&revisions.key(namespace, name))
            .await
            .map_err(|e| ApiError::from_store(e, revisions, name))?;
        if found.is_none() {
            causes.push(wasmkube_api::field::FieldError::not_found(
                format!("spec.traffic[{i}].revisionName"),
                name,
            ));
        }
    }
    if causes.is_empty() {
        Ok(())
    } else {
        let name = obj["metadata"]["name"].as_str().unwrap_or_default();
        Err(ApiError::invalid(rt, name, causes))
    }
}
