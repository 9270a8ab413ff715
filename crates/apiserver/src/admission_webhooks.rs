//! Admission webhooks, as kube-apiserver calls them: the stored
//! `MutatingWebhookConfiguration`s and `ValidatingWebhookConfiguration`s,
//! followed into memory, and the `AdmissionReview`s a write sends them.
//!
//! A create, update (patch and apply included) or delete goes through the
//! server's own admission first. Then the mutating webhooks it matches are
//! called one at a time, in the order of their configurations' names and
//! their order within each; each may answer a JSON patch, and a webhook
//! with `reinvocationPolicy: IfNeeded` is called once more when a later
//! one changed the object. A changed object is decoded, defaulted and
//! validated again. Then the matching validating webhooks are called all
//! at once. A webhook matches by its rules (operation, group, version,
//! resource and subresource, scope), its namespace and object selectors and
//! its `matchConditions` (CEL). A refusal is the request's error in
//! Kubernetes' words (`admission webhook "NAME" denied the request: ...`,
//! with the webhook's code, at least 400); a webhook that cannot be called
//! or answers out of protocol fails the request (500) unless its
//! `failurePolicy` is `Ignore`. Webhooks are not called for the webhook
//! configurations themselves, so a broken webhook can always be removed.
//!
//! A write of a configuration is acknowledged once this server calls the
//! webhooks it names.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use wasmkube_api::ResourceType;
use wasmkube_api::admission_policy::{Binding, Policy};
use wasmkube_api::registry;
use wasmkube_api::selectors::LabelSelector;
use wasmkube_api::webhooks::{AdmissionWebhook, Request};
use wasmkube_store::SharedStore;

use crate::ApiServer;
use crate::auth::UserInfo;
use crate::error::{ApiError, ApiResult};
use crate::follow::Followed;

/// The API group of the configurations, which no webhook sees.
const GROUP: &str = "admissionregistration.k8s.io";

/// The webhooks of the stored configurations, in Kubernetes' order (keys
/// end in the configuration's name).
fn webhooks_of(configurations: &BTreeMap<String, Value>) -> Vec<AdmissionWebhook> {
    configurations
        .values()
        .flat_map(AdmissionWebhook::all_of)
        .collect()
}

/// The admission webhooks this server calls.
pub(crate) struct Webhooks {
    mutating: Arc<Followed<Vec<AdmissionWebhook>>>,
    validating: Arc<Followed<Vec<AdmissionWebhook>>>,
    /// ValidatingAdmissionPolicies and their bindings
    /// (`admission_policies.rs`).
    pub(crate) policies: Arc<Followed<Vec<Policy>>>,
    pub(crate) bindings: Arc<Followed<Vec<Binding>>>,
}

impl std::fmt::Debug for Webhooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhooks")
            .field("mutating", &self.mutating.current().len())
            .field("validating", &self.validating.current().len())
            .finish()
    }
}

/// What a write is, for the webhooks' rules and reviews.
pub(crate) struct Attributes<'a> {
    pub rt: &'static ResourceType,
    /// `CREATE`, `UPDATE` or `DELETE`.
    pub operation: &'static str,
    pub subresource: Option<&'a str>,
    pub name: &'a str,
    pub namespace: Option<&'a str>,
    pub user: Option<&'a UserInfo>,
    pub dry_run: bool,
    /// The field manager of a create or update.
    pub field_manager: Option<&'a str>,
}

impl Attributes<'_> {
    /// The write as rules match it.
    pub(crate) fn request(&self) -> Request<'_> {
        Request {
            operation: self.operation,
            group: self.rt.group,
            version: self.rt.version,
            resource: self.rt.plural,
            subresource: self.subresource.unwrap_or_default(),
            namespaced: self.rt.namespaced,
        }
    }
}

impl Webhooks {
    pub(crate) async fn start(store: SharedStore) -> Self {
        let kind = |plural| {
            registry::lookup(GROUP, "v1", plural)
                .expect("admission kinds served")
                .key_prefix()
        };
        let policies = |all: &BTreeMap<String, Value>| all.values().map(Policy::of).collect();
        let bindings = |all: &BTreeMap<String, Value>| all.values().map(Binding::of).collect();
        Self {
            mutating: Followed::start(
                store.clone(),
                kind("mutatingwebhookconfigurations"),
                "mutating webhooks",
                webhooks_of,
            )
            .await,
            validating: Followed::start(
                store.clone(),
                kind("validatingwebhookconfigurations"),
                "validating webhooks",
                webhooks_of,
            )
            .await,
            policies: Followed::start(
                store.clone(),
                kind("validatingadmissionpolicies"),
                "admission policies",
                policies,
            )
            .await,
            bindings: Followed::start(
                store,
                kind("validatingadmissionpolicybindings"),
                "admission policy bindings",
                bindings,
            )
            .await,
        }
    }

    /// Waits until the webhooks of `rt` (a configuration kind) reflect the
    /// store at `revision`, for a write of one this server just made.
    pub(crate) async fn wait_for(&self, rt: &ResourceType, revision: u64) {
        match rt.kind {
            "MutatingWebhookConfiguration" => self.mutating.wait_for(revision).await,
            "ValidatingWebhookConfiguration" => self.validating.wait_for(revision).await,
            "ValidatingAdmissionPolicy" => self.policies.wait_for(revision).await,
            "ValidatingAdmissionPolicyBinding" => self.bindings.wait_for(revision).await,
            _ => {}
        }
    }

    /// Whether any webhook or policy binding could see writes of `rt`.
    pub(crate) fn any(&self, rt: &ResourceType) -> bool {
        rt.group != GROUP
            && (!self.mutating.current().is_empty()
                || !self.validating.current().is_empty()
                || !self.bindings.current().is_empty())
    }

    /// Calls the mutating webhooks `attrs` matches, in order, on `object`;
    /// returns the object as they left it and whether it changed.
    pub(crate) async fn mutate(
        &self,
        server: &ApiServer,
        attrs: &Attributes<'_>,
        mut object: Value,
        old: Option<&Value>,
        warnings: &mut Vec<String>,
    ) -> ApiResult<(Value, bool)> {
        if attrs.rt.group == GROUP {
            return Ok((object, false));
        }
        let hooks = self.mutating.current();
        let mut namespace = NamespaceObject::default();
        let mut changed_by: Vec<usize> = Vec::new();
        let mut called: Vec<usize> = Vec::new();
        for (i, hook) in hooks.iter().enumerate() {
            if !matches(server, hook, attrs, Some(&object), old, &mut namespace).await? {
                continue;
            }
            called.push(i);
            if let Some(patched) =
                call(server, "admit", hook, attrs, Some(&object), old, warnings).await?
                && patched != object
            {
                object = patched;
                changed_by.push(i);
            }
        }
        // Once more for a webhook asking for it whose object a later one
        // changed (Kubernetes' reinvocation, at most once).
        let last_change = changed_by.last().copied();
        for &i in &called {
            let hook = &hooks[i];
            if !hook.reinvoke || last_change.is_none_or(|last| last <= i) {
                continue;
            }
            if let Some(patched) =
                call(server, "admit", hook, attrs, Some(&object), old, warnings).await?
                && patched != object
            {
                object = patched;
                changed_by.push(i);
            }
        }
        Ok((object, !changed_by.is_empty()))
    }

    /// Calls the validating webhooks `attrs` matches, all at once; the
    /// first refusal or failure (in their order) is the answer.
    pub(crate) async fn validate(
        &self,
        server: &ApiServer,
        attrs: &Attributes<'_>,
        object: Option<&Value>,
        old: Option<&Value>,
        warnings: &mut Vec<String>,
    ) -> ApiResult<()> {
        if attrs.rt.group == GROUP {
            return Ok(());
        }
        let hooks = self.validating.current();
        let mut namespace = NamespaceObject::default();
        let mut selected = Vec::new();
        for hook in hooks.iter() {
            if matches(server, hook, attrs, object, old, &mut namespace).await? {
                selected.push(hook);
            }
        }
        let answers = futures::future::join_all(selected.into_iter().map(|hook| async move {
            let mut warnings = Vec::new();
            let answer = call(
                server,
                "validating",
                hook,
                attrs,
                object,
                old,
                &mut warnings,
            )
            .await;
            (answer, warnings)
        }))
        .await;
        let mut outcome = Ok(());
        for (answer, mut more) in answers {
            warnings.append(&mut more);
            if let (Err(e), Ok(())) = (answer, &outcome) {
                outcome = Err(e);
            }
        }
        outcome
    }
}

/// The request's namespace, read once when a selector or a policy needs
/// it (`null` when there is none).
#[derive(Default)]
pub(crate) struct NamespaceObject(Option<Value>);

impl NamespaceObject {
    pub(crate) async fn get(&mut self, server: &ApiServer, namespace: &str) -> ApiResult<&Value> {
        if self.0.is_none() {
            let namespaces = registry::lookup("", "v1", "namespaces").expect("namespaces served");
            let found = server
                .store
                .get(&namespaces.key(None, namespace))
                .await
                .map_err(|e| ApiError::from_store(e, namespaces, namespace))?;
            self.0 = Some(match found {
                Some(kv) => crate::storage::decode_stored(&kv).map_err(ApiError::internal)?,
                None => Value::Null,
            });
        }
        Ok(self.0.as_ref().expect("just read"))
    }
}

/// Whether a webhook's or policy's selectors select a write: the namespace
/// selector matches `namespace` (the request's namespace, or the
/// Namespace written; `None` for other cluster-scoped objects, which it
/// never excludes) and the object selector the new or old object.
pub(crate) fn selects(
    namespace_selector: &Value,
    object_selector: &Value,
    namespace: Option<&Value>,
    object: Option<&Value>,
    old: Option<&Value>,
) -> Result<bool, String> {
    let ns = selector(namespace_selector).map_err(|e| format!("namespaceSelector: {e}"))?;
    if !ns.is_empty() && namespace.is_some_and(|n| !ns.matches_object(n)) {
        return Ok(false);
    }
    let objects = selector(object_selector).map_err(|e| format!("objectSelector: {e}"))?;
    Ok(objects.is_empty()
        || [object, old]
            .into_iter()
            .flatten()
            .any(|o| objects.matches_object(o)))
}

pub(crate) fn selector(v: &Value) -> Result<LabelSelector, String> {
    if v.is_null() {
        return Ok(LabelSelector::default());
    }
    let typed: k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector =
        serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
    LabelSelector::from_api(&typed)
}

/// Whether `hook` is to be called for this request: its rules, then its
/// namespace and object selectors, then its match conditions.
async fn matches(
    server: &ApiServer,
    hook: &AdmissionWebhook,
    attrs: &Attributes<'_>,
    object: Option<&Value>,
    old: Option<&Value>,
    namespace: &mut NamespaceObject,
) -> ApiResult<bool> {
    let rt = attrs.rt;
    if !hook.matches(&attrs.request()) {
        return Ok(false);
    }
    let wants_namespace = hook
        .namespace_selector
        .as_object()
        .is_some_and(|m| !m.is_empty());
    let labelled = if rt.id() == "Namespace" {
        object.or(old)
    } else if let Some(ns) = attrs.namespace.filter(|_| rt.namespaced && wants_namespace) {
        Some(namespace.get(server, ns).await?)
    } else {
        None
    };
    let selected = selects(
        &hook.namespace_selector,
        &hook.object_selector,
        labelled,
        object,
        old,
    )
    .map_err(|e| ApiError::internal(format!("webhook {:?}: invalid {e}", hook.name)))?;
    if !selected {
        return Ok(false);
    }
    if hook.match_conditions.is_empty() {
        return Ok(true);
    }
    let request = review_request(attrs, "", object, old);
    match hook.conditions_hold(
        object.unwrap_or(&Value::Null),
        old.unwrap_or(&Value::Null),
        &request,
    ) {
        Ok(held) => Ok(held.is_ok()),
        Err(e) => failed(hook, e, false),
    }
}

/// A webhook that could not be called (or whose match condition could not
/// be evaluated): `ignored` under `failurePolicy: Ignore`, else the
/// request's error.
fn failed<T>(hook: &AdmissionWebhook, e: String, ignored: T) -> ApiResult<T> {
    if hook.ignore_failure {
        tracing::warn!(webhook = hook.name, error = %e, "admission webhook failed; ignored (failurePolicy Ignore)");
        return Ok(ignored);
    }
    Err(ApiError::internal(format!(
        "failed calling webhook {:?}: {e}",
        hook.name
    )))
}

/// The `request` of an AdmissionReview (and of a policy's expressions).
pub(crate) fn review_request(
    attrs: &Attributes<'_>,
    uid: &str,
    object: Option<&Value>,
    old: Option<&Value>,
) -> Value {
    let rt = attrs.rt;
    let kind = json!({"group": rt.group, "version": rt.version, "kind": rt.kind});
    let resource = json!({"group": rt.group, "version": rt.version, "resource": rt.plural});
    let options_kind = match attrs.operation {
        "CREATE" => "CreateOptions",
        "UPDATE" => "UpdateOptions",
        _ => "DeleteOptions",
    };
    let mut options = json!({"apiVersion": "meta.k8s.io/v1", "kind": options_kind});
    if let Some(manager) = attrs.field_manager {
        options["fieldManager"] = json!(manager);
    }
    if attrs.dry_run {
        options["dryRun"] = json!(["All"]);
    }
    let mut request = json!({
        "uid": uid,
        "kind": kind, "resource": resource,
        "requestKind": kind, "requestResource": resource,
        "name": attrs.name,
        "operation": attrs.operation,
        "userInfo": match attrs.user {
            Some(u) => json!({"username": u.name, "uid": u.uid, "groups": u.groups, "extra": u.extra}),
            None => json!({"username": "system:apiserver", "groups": ["system:masters"]}),
        },
        "object": object,
        "oldObject": old,
        "dryRun": attrs.dry_run,
        "options": options,
    });
    if let Some(ns) = attrs.namespace.filter(|_| rt.namespaced) {
        request["namespace"] = json!(ns);
    }
    if let Some(sub) = attrs.subresource {
        request["subResource"] = json!(sub);
        request["requestSubResource"] = json!(sub);
    }
    request
}

/// Kubernetes' metrics of webhook calls: their latency by webhook,
/// operation, type (`admit` or `validating`) and whether they refused, and
/// the refusals and failures.
struct Metrics {
    durations: prometheus::HistogramVec,
    rejections: prometheus::IntCounterVec,
}

static METRICS: std::sync::LazyLock<Metrics> = std::sync::LazyLock::new(|| {
    let durations = prometheus::HistogramVec::new(
        prometheus::HistogramOpts::new(
            "apiserver_admission_webhook_admission_duration_seconds",
            "Admission webhook latency histogram in seconds, identified by name and broken out for each operation and API resource and type (validate or admit).",
        )
        .buckets(vec![0.005, 0.025, 0.1, 0.5, 1.0, 2.5, 10.0, 25.0]),
        &["name", "operation", "rejected", "type"],
    )
    .expect("a valid metric");
    let rejections = prometheus::IntCounterVec::new(
        prometheus::Opts::new(
            "apiserver_admission_webhook_rejection_count",
            "Admission webhook rejection count, identified by name and broken out for each admission type (validating or admit) and operation. Additional labels specify an error type (calling_webhook_error or apiserver_internal_error if an error occurred; no_internal_error otherwise) and optionally a non-zero rejection code if the webhook rejects the request with an HTTP status code (honored by the apiserver when the code is greater or equal to 400). Codes greater than 600 are truncated to 600, to keep the metrics cardinality bounded.",
        ),
        &["error_type", "name", "operation", "rejection_code", "type"],
    )
    .expect("a valid metric");
    let registry = prometheus::default_registry();
    // Another API server in the same process (tests) shares them.
    let _ = registry.register(Box::new(durations.clone()));
    let _ = registry.register(Box::new(rejections.clone()));
    Metrics {
        durations,
        rejections,
    }
});

/// Sends one review; the object as the webhook patched it (if it did),
/// or the refusal. A failed call is an error unless the webhook ignores
/// failures. `kind` is `admit` or `validating`.
async fn call(
    server: &ApiServer,
    kind: &str,
    hook: &AdmissionWebhook,
    attrs: &Attributes<'_>,
    object: Option<&Value>,
    old: Option<&Value>,
    warnings: &mut Vec<String>,
) -> ApiResult<Option<Value>> {
    let started = std::time::Instant::now();
    let outcome = match exchange(server, hook, attrs, object, old).await {
        Ok(answer) => answer.apply(hook, object, warnings),
        Err(e) => failed(hook, e, None),
    };
    let rejected = outcome.is_err();
    METRICS
        .durations
        .with_label_values(&[&hook.name, attrs.operation, &rejected.to_string(), kind])
        .observe(started.elapsed().as_secs_f64());
    if let Err(e) = &outcome {
        let (error_type, code) = match e {
            ApiError::Refused { code, .. } => ("no_internal_error", code.to_string()),
            _ => ("calling_webhook_error", "0".to_owned()),
        };
        METRICS
            .rejections
            .with_label_values(&[error_type, &hook.name, attrs.operation, &code, kind])
            .inc();
    }
    outcome
}

/// A webhook's answer to one review.
struct Answer {
    allowed: bool,
    status: Value,
    patch: Option<Vec<u8>>,
    warnings: Vec<String>,
}

impl Answer {
    fn apply(
        self,
        hook: &AdmissionWebhook,
        object: Option<&Value>,
        warnings: &mut Vec<String>,
    ) -> ApiResult<Option<Value>> {
        warnings.extend(self.warnings);
        if !self.allowed {
            return Err(denied(&hook.name, &self.status));
        }
        let (Some(patch), Some(object)) = (self.patch, object) else {
            return Ok(None);
        };
        let fail = |e: String| {
            ApiError::internal(format!(
                "failed calling webhook {:?}: its patch: {e}",
                hook.name
            ))
        };
        let patch: json_patch::Patch =
            serde_json::from_slice(&patch).map_err(|e| fail(e.to_string()))?;
        let mut patched = object.clone();
        json_patch::patch(&mut patched, &patch).map_err(|e| fail(e.to_string()))?;
        Ok(Some(patched))
    }
}

/// Kubernetes' refusal: `admission webhook "NAME" denied the request:
/// MESSAGE`, with the webhook's code (at least 400) and reason.
fn denied(name: &str, status: &Value) -> ApiError {
    let by = format!("admission webhook \"{name}\" denied the request");
    let message = match (status["message"].as_str(), status["reason"].as_str()) {
        (Some(m), _) if !m.is_empty() => format!("{by}: {m}"),
        (_, Some(r)) if !r.is_empty() => format!("{by}: {r}"),
        _ => format!("{by} without explanation"),
    };
    let code = status["code"]
        .as_u64()
        .and_then(|c| u16::try_from(c).ok())
        .filter(|c| (400..600).contains(c))
        .unwrap_or(400);
    ApiError::Refused {
        code,
        reason: status["reason"].as_str().unwrap_or_default().to_owned(),
        message,
    }
}

async fn exchange(
    server: &ApiServer,
    hook: &AdmissionWebhook,
    attrs: &Attributes<'_>,
    object: Option<&Value>,
    old: Option<&Value>,
) -> Result<Answer, String> {
    let review_version = if hook.review_versions.iter().any(|v| v == "v1") {
        "admission.k8s.io/v1"
    } else {
        "admission.k8s.io/v1beta1"
    };
    let uid = uuid::Uuid::new_v4().to_string();
    let body = json!({
        "apiVersion": review_version,
        "kind": "AdmissionReview",
        "request": review_request(attrs, &uid, object, old),
    });
    let endpoint = crate::webhook::resolve(server, &hook.client).await?;
    let timeout = Duration::from_secs(hook.timeout_seconds.clamp(1, 30));
    let (status, answer) = endpoint
        .post_json(bytes::Bytes::from(body.to_string()), timeout)
        .await
        .map_err(|e| format!("failed to call webhook: Post \"{endpoint:?}\": {e}"))?;
    if !status.is_success() {
        return Err(format!(
            "the webhook answered {status}: {}",
            String::from_utf8_lossy(&answer).trim()
        ));
    }
    let answer: Value =
        serde_json::from_slice(&answer).map_err(|e| format!("invalid AdmissionReview: {e}"))?;
    if answer["apiVersion"] != review_version || answer["kind"] != "AdmissionReview" {
        return Err(format!(
            "expected webhook response of {review_version}, Kind=AdmissionReview, got {}, Kind={}",
            answer["apiVersion"].as_str().unwrap_or_default(),
            answer["kind"].as_str().unwrap_or_default()
        ));
    }
    let response = &answer["response"];
    if response["uid"].as_str() != Some(&uid) {
        return Err(format!(
            "expected response.uid={uid:?}, got {:?}",
            response["uid"].as_str().unwrap_or_default()
        ));
    }
    let patch = match (response["patch"].as_str(), response["patchType"].as_str()) {
        (None, _) => None,
        (Some(p), Some("JSONPatch")) => {
            use base64::Engine;
            Some(
                base64::engine::general_purpose::STANDARD
                    .decode(p)
                    .map_err(|e| format!("response.patch: {e}"))?,
            )
        }
        (Some(_), other) => {
            return Err(format!(
                "response.patchType {:?}: only JSONPatch is supported",
                other.unwrap_or_default()
            ));
        }
    };
    for (key, value) in response["auditAnnotations"]
        .as_object()
        .into_iter()
        .flatten()
    {
        if let Some(value) = value.as_str() {
            crate::audit::annotate(&format!("{}/{key}", hook.name), value.to_owned());
        }
    }
    Ok(Answer {
        allowed: response["allowed"] == true,
        status: response["status"].clone(),
        patch,
        warnings: response["warnings"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|w| w.as_str().map(str::to_owned))
            .collect(),
    })
}
