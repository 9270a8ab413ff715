//! The REST verbs on resources: get, list, watch, create, update, patch
//! (including server-side apply), delete and deletecollection, plus the
//! `status`, `scale`, `binding` and `finalize` subresources.
//!
//! Every write follows one pipeline: decode and check the body, default,
//! carry over what the client may not change, validate, record field
//! ownership, then persist guarded by the revision that was read. Handlers
//! never retry on behalf of a client that sent a `resourceVersion`.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use chrono::{SecondsFormat, Utc};
use serde_json::{Value, json};
use wasmkube_api::defaults::apply_defaults;
use wasmkube_api::registry::{self, ResourceType};
use wasmkube_api::{Subresource, pod_security, table, typed, validation};
use wasmkube_store::{ListOptions, StoreError};

use crate::error::{ApiError, ApiResult, Subject};
use crate::fields;
use crate::params::{FieldValidation, Output, Params};
use crate::patch::{self, PatchError, PatchType};
use crate::request::{self, Target};
use crate::storage::{decode_stored, encode_for_store, resource_version, stored_at};
use crate::{ApiServer, watch};

/// Attempts for writes without a client precondition when they race another writer.
const UNCONDITIONAL_RETRIES: usize = 16;

pub(crate) fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// Serves every resource path.
pub async fn handle(
    server: Arc<ApiServer>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    user: Option<crate::auth::UserInfo>,
    body: Body,
) -> Response {
    match dispatch(&server, &method, &uri, &headers, user.as_ref(), body).await {
        Ok(resp) => resp,
        Err(e) => e.into_response(),
    }
}

async fn dispatch(
    server: &Arc<ApiServer>,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    user: Option<&crate::auth::UserInfo>,
    body: Body,
) -> ApiResult<Response> {
    let target = request::parse(uri.path())?.ok_or(ApiError::NoRoute)?;
    let params = Params::parse(uri.query())?;
    let output = Output::from_headers(headers);
    let ctx = Ctx {
        server,
        target,
        params,
        headers,
        output,
        user,
    };
    use Subresource::*;
    match (method.clone(), target.name, target.subresource) {
        (Method::GET, None, None) if ctx.params.watch => watch::serve(&ctx).await,
        (Method::GET, None, None) => ctx.list().await,
        (Method::GET, Some(name), None | Some(Status)) => ctx.get(name).await,
        (Method::GET, Some(name), Some(Scale)) => ctx.get_scale(name).await,
        (Method::GET, Some(name), Some(Log)) => {
            crate::node_proxy::pod_log(server, ctx.target.namespace, name, uri.query()).await
        }
        (Method::POST, None, None) => ctx.create(read_body(server, headers, body).await?).await,
        (Method::POST, Some(name), Some(Eviction)) => {
            ctx.evict(name, read_body(server, headers, body).await?)
                .await
        }
        (Method::POST, Some(name), Some(Binding)) => {
            ctx.bind(name, read_body(server, headers, body).await?)
                .await
        }
        (Method::PUT, Some(name), Some(Scale)) => {
            ctx.put_scale(name, read_body(server, headers, body).await?)
                .await
        }
        (Method::PUT, Some(name), sub) => {
            ctx.update(name, sub, read_body(server, headers, body).await?)
                .await
        }
        (Method::PATCH, Some(name), sub) => ctx.patch(name, sub, body).await,
        (Method::DELETE, Some(name), None) => {
            let opts = read_delete_options(server, headers, body).await?;
            ctx.delete(name, &opts).await
        }
        (Method::DELETE, None, None) => {
            let opts = read_delete_options(server, headers, body).await?;
            ctx.delete_collection(&opts).await
        }
        _ => Err(ApiError::MethodNotAllowed),
    }
}

/// Reads a request body up to the configured limit (413 beyond it).
pub(crate) async fn read_bytes(server: &ApiServer, body: Body) -> ApiResult<bytes::Bytes> {
    let limit = server.config.max_body_bytes;
    axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| ApiError::TooLarge { limit })
}

/// Parses a JSON or YAML body into a JSON value.
pub(crate) fn parse_value(content_type: &str, raw: &[u8]) -> ApiResult<Value> {
    let mime = content_type.split(';').next().unwrap_or_default().trim();
    if mime == "application/vnd.kubernetes.protobuf" {
        return crate::protobuf::decode(raw).map_err(|e| ApiError::bad_request(e.to_string()));
    }
    if mime.contains("protobuf") || mime.contains("cbor") {
        return Err(ApiError::UnsupportedMediaType {
            message: format!(
                "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml (got {mime})"
            ),
        });
    }
    let looks_yaml = mime.contains("yaml")
        || (!mime.contains("json") && !raw.trim_ascii_start().starts_with(b"{"));
    let value: Value = if looks_yaml {
        let text = std::str::from_utf8(raw)
            .map_err(|_| ApiError::bad_request("the body is not valid UTF-8"))?;
        serde_yaml::from_str(text)
            .map_err(|e| ApiError::bad_request(format!("error converting YAML to JSON: {e}")))?
    } else {
        serde_json::from_slice(raw)
            .map_err(|e| ApiError::bad_request(format!("json: cannot parse the body: {e}")))?
    };
    Ok(value)
}

/// Reads and parses a body that must be one object (JSON, YAML or
/// protobuf, as its Content-Type says).
pub(crate) async fn read_body(
    server: &ApiServer,
    headers: &HeaderMap,
    body: Body,
) -> ApiResult<Value> {
    let raw = read_bytes(server, body).await?;
    let value = parse_value(content_type(headers), &raw)?;
    if !value.is_object() {
        return Err(ApiError::bad_request("the body must be a single object"));
    }
    Ok(value)
}

fn content_type(headers: &HeaderMap) -> &str {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
}

/// `DeleteOptions` from the body and the query.
#[derive(Debug, Default)]
struct DeleteOptions {
    grace_period_seconds: Option<i64>,
    propagation_policy: Option<String>,
    precondition_uid: Option<String>,
    precondition_rv: Option<String>,
}

async fn read_delete_options(
    server: &ApiServer,
    headers: &HeaderMap,
    body: Body,
) -> ApiResult<DeleteOptions> {
    let raw = read_bytes(server, body).await?;
    if raw.iter().any(|b| !b.is_ascii_whitespace()) {
        Ok(delete_options(&parse_value(content_type(headers), &raw)?))
    } else {
        Ok(DeleteOptions::default())
    }
}

/// A `DeleteOptions` body (or an Eviction's `deleteOptions`).
fn delete_options(v: &Value) -> DeleteOptions {
    let mut opts = DeleteOptions {
        grace_period_seconds: v["gracePeriodSeconds"].as_i64(),
        propagation_policy: v["propagationPolicy"].as_str().map(str::to_owned),
        precondition_uid: v["preconditions"]["uid"].as_str().map(str::to_owned),
        precondition_rv: v["preconditions"]["resourceVersion"]
            .as_str()
            .map(str::to_owned),
    };
    if v["orphanDependents"] == true && opts.propagation_policy.is_none() {
        opts.propagation_policy = Some("Orphan".into());
    }
    opts
}

/// One resource request.
pub(crate) struct Ctx<'a> {
    pub server: &'a Arc<ApiServer>,
    pub target: Target<'a>,
    pub params: Params,
    pub headers: &'a HeaderMap,
    pub output: Output,
    /// Who asked (`None`: the server itself, or authorization is off).
    pub user: Option<&'a crate::auth::UserInfo>,
}

/// A JSON response with a status code and optional warnings.
pub(crate) fn json_response(code: StatusCode, body: &Value, warnings: &[String]) -> Response {
    let mut resp = (code, serde_json::to_vec(body).unwrap_or_default()).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    for w in warnings {
        let text = format!("299 - \"{}\"", w.replace('"', "\\\""));
        if let Ok(v) = HeaderValue::from_str(&text) {
            h.append("Warning", v);
        }
    }
    resp
}

/// Wraps objects in the representation the client asked for.
pub(crate) fn render_one(rt: &ResourceType, output: Output, mut obj: Value) -> Value {
    match output {
        Output::Object => {
            crate::storage::served_as(rt, &mut obj);
            obj
        }
        Output::PartialMetadata => partial_metadata(&obj),
        Output::Table => json!({
            "kind": "Table",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": {"resourceVersion": obj["metadata"]["resourceVersion"]},
            "columnDefinitions": table::column_definitions(rt),
            "rows": [table::row(rt, &obj, Utc::now())],
        }),
    }
}

pub(crate) fn partial_metadata(obj: &Value) -> Value {
    json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj["metadata"]})
}

fn status_success(rt: &ResourceType, name: &str, uid: &Value) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": {"name": name, "group": rt.group, "kind": rt.plural, "uid": uid},
    })
}

/// What a continue token encodes: the list revision and the last key returned.
fn encode_continue(rev: u64, last_key: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(json!({"rv": rev, "start": last_key}).to_string())
}

fn decode_continue(token: &str) -> ApiResult<(u64, String)> {
    use base64::Engine as _;
    let bad = || {
        ApiError::bad_request("continue key is not valid: the token was not issued by this server")
    };
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| bad())?;
    let v: Value = serde_json::from_slice(&raw).map_err(|_| bad())?;
    Ok((
        v["rv"].as_u64().ok_or_else(bad)?,
        v["start"].as_str().ok_or_else(bad)?.to_owned(),
    ))
}

/// Whether `a` and `b` differ outside metadata and status (a spec change).
fn spec_changed(a: &Value, b: &Value) -> bool {
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(m) = v.as_object_mut() {
            m.remove("metadata");
            m.remove("status");
        }
        v
    };
    strip(a) != strip(b)
}

fn has_spec_generation(rt: &ResourceType) -> bool {
    rt.custom.is_some() || (rt.has(Subresource::Status) && !matches!(rt.kind, "Namespace" | "Node"))
}

/// Whether a write changes nothing, as Kubernetes skips it: the same
/// object and the same field owners (when they last wrote does not count;
/// a manager that comes to share fields is a change).
fn same_ignoring_version(a: &Value, b: &Value) -> bool {
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
            m.remove("resourceVersion");
            if let Some(entries) = m.get_mut("managedFields").and_then(Value::as_array_mut) {
                for e in entries.iter_mut().filter_map(Value::as_object_mut) {
                    e.remove("time");
                }
            }
        }
        v
    };
    strip(a) == strip(b)
}

impl<'a> Ctx<'a> {
    /// A context for a write the server makes on its own behalf.
    fn internal(server: &'a Arc<ApiServer>, target: Target<'a>, headers: &'a HeaderMap) -> Self {
        Ctx {
            server,
            target,
            params: Params {
                field_manager: Some("wasmkube".into()),
                ..Params::default()
            },
            headers,
            output: Output::Object,
            user: None,
        }
    }

    fn rt(&self) -> &'static ResourceType {
        self.target.rt
    }

    fn key(&self, name: &str) -> String {
        self.rt().key(self.target.namespace, name)
    }

    /// A write without a precondition that lost every retry to other writers.
    fn too_contended(&self, name: &str) -> ApiError {
        ApiError::Conflict(
            Subject::of(self.rt(), name),
            "the object is being modified too often; try again".into(),
        )
    }

    fn store_err(&self, e: StoreError, name: &str) -> ApiError {
        ApiError::from_store(e, self.rt(), name)
    }

    /// The object as stored (in its storage version) and its revision.
    async fn read_stored(&self, name: &str) -> ApiResult<(Value, u64)> {
        let kv = self
            .server
            .store
            .get(&self.key(name))
            .await
            .map_err(|e| self.store_err(e, name))?
            .ok_or_else(|| ApiError::not_found(self.rt(), name))?;
        let obj = decode_stored(&kv).map_err(ApiError::internal)?;
        Ok((obj, kv.mod_revision))
    }

    /// The object as this request's writes handle it, and its revision: as
    /// stored, but converted to the request's version when a CRD's webhook
    /// converts the kind (writes to such kinds are handled in the
    /// client's version and converted when stored).
    async fn read_hub(&self, name: &str) -> ApiResult<(Value, u64)> {
        let (mut obj, rev) = self.read_stored(name).await?;
        if crate::crd_conversion::webhook(self.rt()).is_some() {
            self.served(std::slice::from_mut(&mut obj)).await?;
        }
        Ok((obj, rev))
    }

    /// The object as this request's version shows it, and its revision.
    async fn read(&self, name: &str) -> ApiResult<(Value, u64)> {
        let (mut obj, rev) = self.read_stored(name).await?;
        self.served(std::slice::from_mut(&mut obj)).await?;
        Ok((obj, rev))
    }

    /// Stored objects as this request's version shows them.
    async fn served(&self, objects: &mut [Value]) -> ApiResult<()> {
        crate::crd_conversion::to_version(self.server, self.rt(), objects).await
    }

    /// The admission webhooks' turn at a create or update: the mutating
    /// ones may change `object` (which is then decoded, defaulted and
    /// validated again), then the validating ones decide.
    async fn admit_by_webhooks(
        &self,
        operation: &'static str,
        sub: Option<Subresource>,
        name: &str,
        object: Value,
        old: Option<&Value>,
        warnings: &mut Vec<String>,
    ) -> ApiResult<Value> {
        let webhooks = &self.server.webhooks;
        if !webhooks.any(self.rt()) {
            return Ok(object);
        }
        let attrs = self.webhook_attributes(operation, sub, name);
        let (mut object, changed) = webhooks
            .mutate(self.server, &attrs, object, old, warnings)
            .await?;
        if changed {
            object = self.readmit(object, old)?;
        }
        crate::admission_policies::validate(self.server, &attrs, Some(&object), old, warnings)
            .await?;
        webhooks
            .validate(self.server, &attrs, Some(&object), old, warnings)
            .await?;
        Ok(object)
    }

    fn webhook_attributes<'b>(
        &'b self,
        operation: &'static str,
        sub: Option<Subresource>,
        name: &'b str,
    ) -> crate::admission_webhooks::Attributes<'b> {
        crate::admission_webhooks::Attributes {
            rt: self.rt(),
            operation,
            subresource: sub.map(Subresource::name),
            name,
            namespace: self.target.namespace,
            user: self.user,
            dry_run: self.params.dry_run,
            field_manager: self.params.field_manager.as_deref(),
        }
    }

    /// An object a mutating webhook changed, decoded, defaulted and
    /// validated again as the request's own would be.
    fn readmit(&self, object: Value, old: Option<&Value>) -> ApiResult<Value> {
        let rt = self.rt();
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let mut object = if wasmkube_api::conversion::converts(rt) {
            // Held in its storage version's shape, which the request's
            // version does not decode.
            object
        } else {
            wasmkube_api::typed::decode(rt, &object)
                .map_err(|e| self.undecodable(e))?
                .object
        };
        apply_defaults(rt, &mut object);
        let errors = validation::validate(rt, &object, old);
        if !errors.is_empty() {
            return Err(ApiError::invalid(rt, &name, errors));
        }
        Ok(object)
    }

    /// `obj` encoded for the store (see [`encode_for_store`]), in the
    /// version its kind is stored in when a CRD's webhook converts it.
    async fn encode(&self, obj: &mut Value) -> ApiResult<bytes::Bytes> {
        let encoded = encode_for_store(obj);
        match crate::crd_conversion::to_storage(self.server, self.rt(), obj).await? {
            Some(mut stored) => Ok(encode_for_store(&mut stored)),
            None => Ok(encoded),
        }
    }

    async fn get(&self, name: &str) -> ApiResult<Response> {
        let (obj, _) = self.read(name).await?;
        Ok(json_response(
            StatusCode::OK,
            &render_one(self.rt(), self.output, obj),
            &[],
        ))
    }

    /// Lists matching objects: at a revision (continue token or exact match)
    /// or the latest, with selectors applied before `limit`.
    pub(crate) async fn list_objects(&self) -> ApiResult<(Vec<Value>, u64, Option<String>)> {
        let rt = self.rt();
        let labels = self.params.labels()?;
        let fields = self.params.fields(rt)?;
        let prefix = rt.list_prefix(self.target.namespace);
        let (mut revision, mut start_after) = (None, None);
        if let Some(token) = &self.params.continue_token {
            let (rev, start) = decode_continue(token)?;
            revision = Some(rev);
            start_after = Some(format!("{prefix}{start}"));
        } else if let (Some(rv), Some("Exact")) = (
            &self.params.resource_version,
            self.params.resource_version_match.as_deref(),
        ) {
            revision =
                Some(rv.parse().map_err(|_| {
                    ApiError::bad_request(format!("invalid resourceVersion {rv:?}"))
                })?);
        }
        let limit = self.params.limit;
        let filtered = !labels.is_empty() || !fields.is_empty();
        let mut items = Vec::new();
        loop {
            let want = if limit == 0 {
                0
            } else if filtered {
                (limit - items.len()).max(64)
            } else {
                limit - items.len()
            };
            let page = self
                .server
                .store
                .list(&prefix, ListOptions { revision, start_after: start_after.clone(), limit: want })
                .await
                .map_err(|e| match e {
                    StoreError::Gone { .. } if self.params.continue_token.is_some() => ApiError::Gone {
                        message: "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list.".into(),
                        reason: "Expired",
                    },
                    other => self.store_err(other, ""),
                })?;
            revision = Some(page.revision);
            let mut last_key = None;
            let mut objects = page
                .items
                .iter()
                .map(decode_stored)
                .collect::<Result<Vec<_>, _>>()
                .map_err(ApiError::internal)?;
            self.served(&mut objects).await?;
            for (kv, obj) in page.items.iter().zip(objects) {
                last_key = Some(kv.key.clone());
                if labels.matches_object(&obj) && fields.matches(rt, &obj) {
                    items.push((kv.key.clone(), obj));
                    if limit != 0 && items.len() == limit {
                        break;
                    }
                }
            }
            let full = limit != 0 && items.len() == limit;
            let exhausted = !page.more && last_key.as_ref() == page.items.last().map(|kv| &kv.key);
            if full {
                // More remain if this page had unread items or the store has more.
                let last_returned = &items.last().expect("full page").0;
                let more =
                    page.more || page.items.last().is_some_and(|kv| &kv.key != last_returned);
                let token =
                    more.then(|| encode_continue(page.revision, &last_returned[prefix.len()..]));
                return Ok((
                    items.into_iter().map(|(_, o)| o).collect(),
                    page.revision,
                    token,
                ));
            }
            if exhausted || !page.more {
                return Ok((
                    items.into_iter().map(|(_, o)| o).collect(),
                    page.revision,
                    None,
                ));
            }
            start_after = last_key;
        }
    }

    async fn list(&self) -> ApiResult<Response> {
        let rt = self.rt();
        let (items, rev, token) = self.list_objects().await?;
        let mut meta = json!({"resourceVersion": rev.to_string()});
        if let Some(t) = token {
            meta["continue"] = json!(t);
        }
        let body = match self.output {
            Output::Table => {
                let now = Utc::now();
                json!({
                    "kind": "Table",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": meta,
                    "columnDefinitions": table::column_definitions(rt),
                    "rows": items.iter().map(|o| table::row(rt, o, now)).collect::<Vec<_>>(),
                })
            }
            Output::PartialMetadata => json!({
                "kind": "PartialObjectMetadataList",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": meta,
                "items": items.iter().map(partial_metadata).collect::<Vec<_>>(),
            }),
            Output::Object => json!({
                "kind": format!("{}List", rt.kind),
                "apiVersion": rt.api_version(),
                "metadata": meta,
                "items": items,
            }),
        };
        Ok(json_response(StatusCode::OK, &body, &[]))
    }

    /// Checks (or fills in) a body's `apiVersion` and `kind`.
    fn check_type_meta(&self, input: &mut Value) -> ApiResult<()> {
        let rt = self.rt();
        let api_version = rt.api_version();
        match input["apiVersion"].as_str() {
            None => input["apiVersion"] = json!(api_version),
            Some(v) if v == api_version => {}
            Some(v) => {
                return Err(ApiError::bad_request(format!(
                    "the API version in the data ({v}) does not match the expected API version ({api_version})"
                )));
            }
        }
        match input["kind"].as_str() {
            None => input["kind"] = json!(rt.kind),
            Some(k) if k == rt.kind => {}
            Some(k) => {
                return Err(ApiError::bad_request(format!(
                    "the kind in the data ({k}) does not match the expected kind ({})",
                    rt.kind
                )));
            }
        }
        Ok(())
    }

    fn undecodable(&self, e: wasmkube_api::typed::DecodeError) -> ApiError {
        let rt = self.rt();
        ApiError::bad_request(format!(
            "{} in version \"{}\" cannot be handled as a {}: {}",
            rt.kind, rt.version, rt.kind, e
        ))
    }

    /// Applies `fieldValidation` to the fields decoding dropped: an error
    /// (Strict) or warnings (Warn, the default).
    fn unknown_fields(&self, unknown: &[String]) -> ApiResult<Vec<String>> {
        if unknown.is_empty() {
            return Ok(Vec::new());
        }
        let listed = unknown.iter().map(|f| format!("unknown field \"{f}\""));
        match self
            .params
            .field_validation
            .unwrap_or(FieldValidation::Warn)
        {
            FieldValidation::Strict => Err(ApiError::bad_request(format!(
                "strict decoding error: {}",
                listed.collect::<Vec<_>>().join(", ")
            ))),
            FieldValidation::Warn => Ok(listed.collect()),
            FieldValidation::Ignore => Ok(Vec::new()),
        }
    }

    /// Decodes a body as this kind, applying `fieldValidation`; returns the
    /// canonical object in its storage version, and warnings.
    fn decode(&self, input: Value) -> ApiResult<(Value, Vec<String>)> {
        let (object, warnings) = self.decode_served(input)?;
        Ok((
            wasmkube_api::conversion::to_stored(self.rt(), object),
            warnings,
        ))
    }

    /// As [`Self::decode`], in the version of the request.
    fn decode_served(&self, mut input: Value) -> ApiResult<(Value, Vec<String>)> {
        self.check_type_meta(&mut input)?;
        let decoded = typed::decode(self.rt(), &input).map_err(|e| self.undecodable(e))?;
        let warnings = self.unknown_fields(&decoded.unknown_fields)?;
        Ok((decoded.object, warnings))
    }

    /// Decodes a body written to the status subresource: only its status
    /// is taken (the rest is the stored object's), so only its status is
    /// decoded, as the kubelet's status writes are a cluster's most common.
    fn decode_status_write(&self, mut input: Value) -> ApiResult<(Value, Vec<String>)> {
        self.check_type_meta(&mut input)?;
        if input["status"].is_null() {
            return self.decode(input);
        }
        match typed::decode_status(self.rt(), &input["status"]) {
            None => self.decode(input),
            Some(decoded) => {
                let decoded = decoded.map_err(|e| self.undecodable(e))?;
                let warnings = self.unknown_fields(&decoded.unknown_fields)?;
                input["status"] = decoded.object;
                Ok((input, warnings))
            }
        }
    }

    /// Refuses a create in a namespace being deleted; returns the Pod
    /// Security levels its labels set (enforce, warn).
    async fn ensure_namespace_open(&self, ns: &str) -> ApiResult<PodSecurityLevels> {
        let (terminating, levels) = self.namespace_levels(ns).await?;
        if terminating {
            return Err(ApiError::Forbidden {
                subject: Subject::of(self.rt(), ""),
                message: format!(
                    "{} is forbidden: unable to create new content in namespace {ns} because it is being terminated",
                    self.rt().plural
                ),
            });
        }
        Ok(levels)
    }

    /// Whether namespace `ns` is being deleted, and the Pod Security levels
    /// its labels set.
    async fn namespace_levels(&self, ns: &str) -> ApiResult<(bool, PodSecurityLevels)> {
        let ns_rt = registry::lookup("", "v1", "namespaces").expect("namespaces are served");
        let kv = self
            .server
            .store
            .get(&ns_rt.key(None, ns))
            .await
            .map_err(|e| ApiError::from_store(e, ns_rt, ns))?
            .ok_or_else(|| ApiError::not_found(ns_rt, ns))?;
        // Every create asks this: read the fields needed, not the whole namespace.
        #[derive(serde::Deserialize)]
        struct Namespace {
            metadata: Meta,
        }
        #[derive(serde::Deserialize)]
        struct Meta {
            #[serde(rename = "deletionTimestamp")]
            deletion_timestamp: Option<serde::de::IgnoredAny>,
            #[serde(default)]
            labels: std::collections::BTreeMap<String, String>,
        }
        let ns_obj: Namespace = serde_json::from_slice(&kv.value).map_err(ApiError::internal)?;
        let level = |label: &str| {
            ns_obj
                .metadata
                .labels
                .get(label)
                .and_then(|l| pod_security::Level::parse(l))
        };
        let levels = PodSecurityLevels {
            enforce: level(pod_security::ENFORCE_LABEL),
            warn: level(pod_security::WARN_LABEL),
            audit: level(pod_security::AUDIT_LABEL),
        };
        Ok((ns_obj.metadata.deletion_timestamp.is_some(), levels))
    }

    /// The admission of an update that reads other objects: Pod Security
    /// for pods, PersistentVolumeClaimResize for claims.
    async fn admit_update_reads(
        &self,
        sub: Option<Subresource>,
        old: &Value,
        new: &Value,
        warnings: &mut Vec<String>,
    ) -> ApiResult<()> {
        if sub.is_some() {
            return Ok(());
        }
        match self.rt().id() {
            "Pod" => self.admit_pod_update_security(old, new, warnings).await,
            "PersistentVolumeClaim" => crate::admission::claim_resize(self.server, old, new).await,
            _ => Ok(()),
        }
    }

    /// Pod Security on a pod update, as Pod Security admission judges
    /// which updates matter: one that changes a container's image or the
    /// number of containers is checked like a new pod (an image swapped
    /// for one that runs as root is refused under `restricted`, say);
    /// other updates (labels, annotations, tolerations, the deadline) and
    /// subresources are not, so a pod admitted before a namespace's level
    /// was raised can still be labelled and deleted.
    async fn admit_pod_update_security(
        &self,
        old: &Value,
        new: &Value,
        warnings: &mut Vec<String>,
    ) -> ApiResult<()> {
        let Some(ns) = self.target.namespace else {
            return Ok(());
        };
        let images = |pod: &Value, field: &str| -> Vec<Value> {
            pod["spec"][field]
                .as_array()
                .map(|cs| cs.iter().map(|c| c["image"].clone()).collect())
                .unwrap_or_default()
        };
        let significant = ["containers", "initContainers", "ephemeralContainers"]
            .iter()
            .any(|f| images(old, f) != images(new, f));
        if !significant {
            return Ok(());
        }
        let (_, levels) = self.namespace_levels(ns).await?;
        self.admit_pod_security(levels, new, warnings)
    }

    /// Pod Security admission of a new object: a pod violating its
    /// namespace's enforced level is refused; a pod or a workload's pod
    /// template violating the enforced or warned level gets warnings.
    fn admit_pod_security(
        &self,
        levels: PodSecurityLevels,
        obj: &Value,
        warnings: &mut Vec<String>,
    ) -> ApiResult<()> {
        let template = match self.rt().id() {
            "Pod" => obj,
            "Deployment" | "ReplicaSet" | "DaemonSet" | "StatefulSet" | "Job" => {
                &obj["spec"]["template"]
            }
            "CronJob" => &obj["spec"]["jobTemplate"]["spec"]["template"],
            _ => return Ok(()),
        };
        let (meta, spec) = (&template["metadata"], &template["spec"]);
        let is_pod = self.rt().id() == "Pod";
        if is_pod && let Some(level) = levels.enforce {
            let violations = pod_security::violations(level, meta, spec);
            if !violations.is_empty() {
                let name = obj["metadata"]["name"].as_str().unwrap_or_default();
                return Err(ApiError::Forbidden {
                    subject: Subject::of(self.rt(), name),
                    message: format!(
                        "pods \"{name}\" is forbidden: violates PodSecurity \"{}:latest\": {}",
                        level.name(),
                        violations.join(", ")
                    ),
                });
            }
        }
        // The strictest level that only warns here.
        let warn = if is_pod {
            levels
                .warn
                .filter(|w| levels.enforce.is_none_or(|e| w > &e))
        } else {
            levels.enforce.max(levels.warn)
        };
        if let Some(level) = warn {
            let violations = pod_security::violations(level, meta, spec);
            if !violations.is_empty() {
                warnings.push(format!(
                    "would violate PodSecurity \"{}:latest\": {}",
                    level.name(),
                    violations.join(", ")
                ));
            }
        }
        // Audit mode: the violation is recorded on the request's audit
        // event, for pods and workloads alike.
        if let Some(level) = levels.audit {
            let violations = pod_security::violations(level, meta, spec);
            if !violations.is_empty() {
                crate::audit::annotate(
                    "pod-security.kubernetes.io/audit-violations",
                    format!(
                        "would violate PodSecurity \"{}:latest\": {}",
                        level.name(),
                        violations.join(", ")
                    ),
                );
            }
        }
        Ok(())
    }

    /// Prepares a new object: identity, defaults, validation.
    async fn admit_create(&self, input: Value) -> ApiResult<(Value, Vec<String>)> {
        let rt = self.rt();
        let (mut obj, mut warnings) = self.decode(input)?;
        if !obj["metadata"].is_object() {
            obj["metadata"] = json!({});
        }
        if rt.custom.is_none() {
            warnings.extend(wasmkube_api::apparmor::deprecation_warnings(rt.id(), &obj));
        }
        if rt.namespaced {
            let ns = self.target.namespace.ok_or(ApiError::NoRoute)?;
            match obj["metadata"]["namespace"].as_str() {
                None | Some("") => obj["metadata"]["namespace"] = json!(ns),
                Some(n) if n == ns => {}
                Some(_) => {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ));
                }
            }
        } else if let Some(m) = obj["metadata"].as_object_mut() {
            m.remove("namespace");
        }
        if obj["metadata"]["name"].as_str().is_none_or(str::is_empty)
            && let Some(prefix) = obj["metadata"]["generateName"]
                .as_str()
                .filter(|p| !p.is_empty())
        {
            obj["metadata"]["name"] = json!(generate_name(prefix));
        }
        if resource_version(&obj).is_some() {
            return Err(ApiError::bad_request(
                "resourceVersion should not be set on objects to be created",
            ));
        }
        let meta = obj["metadata"]
            .as_object_mut()
            .expect("metadata is an object");
        meta.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
        meta.insert("creationTimestamp".into(), json!(now()));
        for k in [
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "selfLink",
            "managedFields",
        ] {
            meta.remove(k);
        }
        if has_spec_generation(rt) || obj.get("spec").is_some() {
            obj["metadata"]["generation"] = json!(1);
        }
        self.reset_status_on_create(&mut obj);
        apply_defaults(rt, &mut obj);
        self.admit_kind_create(&mut obj);
        let errors = validation::validate(rt, &obj, None);
        if !errors.is_empty() {
            return Err(ApiError::invalid(
                rt,
                obj["metadata"]["name"].as_str().unwrap_or_default(),
                errors,
            ));
        }
        Ok((obj, warnings))
    }

    fn reset_status_on_create(&self, obj: &mut Value) {
        match self.rt().id() {
            "Pod" => {
                obj["status"] =
                    json!({"phase": "Pending", "qosClass": wasmkube_api::quota::qos_class(obj)})
            }
            "Deployment" | "ReplicaSet" | "DaemonSet" | "StatefulSet" | "Job" | "CronJob" => {
                obj["status"] = json!({})
            }
            "Service" => obj["status"] = json!({"loadBalancer": {}}),
            "Namespace" => obj["status"] = json!({"phase": "Active"}),
            // No one approves their own request by creating it approved.
            "CertificateSigningRequest" => obj["status"] = json!({}),
            _ => {}
        }
    }

    /// Kind-specific create-time behaviour that needs the whole object.
    fn admit_kind_create(&self, obj: &mut Value) {
        if self.rt().kind == "Pod" && self.rt().group.is_empty() {
            wasmkube_api::apparmor::sync_on_create(obj);
        }
        if self.rt().kind == "CustomResourceDefinition" {
            obj["status"] = wasmkube_api::custom::crd_status(obj, &now());
            // Its objects go before it does (see `crds.rs`).
            let finalizers = &mut obj["metadata"]["finalizers"];
            if !finalizers.is_array() {
                *finalizers = json!([]);
            }
            let list = finalizers.as_array_mut().expect("just made an array");
            if !list.iter().any(|f| f == crate::crds::CLEANUP) {
                list.push(json!(crate::crds::CLEANUP));
            }
        }
        if self.rt().kind == "Job"
            && obj["spec"]["selector"].is_null()
            && obj["spec"]["manualSelector"] != true
        {
            // Jobs select their pods by their own uid, as the job controller expects.
            let uid = obj["metadata"]["uid"].clone();
            let name = obj["metadata"]["name"].clone();
            obj["spec"]["selector"] =
                json!({"matchLabels": {"batch.kubernetes.io/controller-uid": uid}});
            let labels = &mut obj["spec"]["template"]["metadata"]["labels"];
            if !labels.is_object() {
                *labels = json!({});
            }
            for (k, v) in [
                ("batch.kubernetes.io/controller-uid", &uid),
                ("batch.kubernetes.io/job-name", &name),
                ("controller-uid", &uid),
                ("job-name", &name),
            ] {
                labels[k] = v.clone();
            }
        }
    }

    async fn create(&self, input: Value) -> ApiResult<Response> {
        let (created, warnings) = self.create_object(input).await?;
        Ok(json_response(
            StatusCode::CREATED,
            &render_one(self.rt(), self.output, created),
            &warnings,
        ))
    }

    async fn create_object(&self, input: Value) -> ApiResult<(Value, Vec<String>)> {
        self.create_object_managed(input, None).await
    }

    /// Admits and stores a new object. `applied` is the `managedFields` of
    /// a server-side apply that creates it; otherwise the request's field
    /// manager is recorded for an update.
    async fn create_object_managed(
        &self,
        input: Value,
        applied: Option<Value>,
    ) -> ApiResult<(Value, Vec<String>)> {
        if let Some(custom) = self.rt().custom
            && crate::crds::terminating(&custom.crd)
        {
            return Err(ApiError::NotAllowedNow {
                message: "create not allowed while custom resource definition is terminating"
                    .into(),
            });
        }
        let (mut obj, mut warnings) = self.admit_create(input).await?;
        let name = obj["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        crate::auth::node::admit_create(self.user, self.rt(), self.target.namespace, &name)?;
        crate::auth::node::admit_node_object(self.user, self.rt(), None, &obj)?;
        if let Some(ns) = self.target.namespace {
            let levels = self.ensure_namespace_open(ns).await?;
            self.admit_pod_security(levels, &obj, &mut warnings)?;
        }
        match self.rt().id() {
            "Service" => crate::services::allocate(self.server, &mut obj).await?,
            "Pod" => crate::admission::pod(self.server, &mut obj).await?,
            "Ingress" => crate::admission::ingress(self.server, &mut obj).await?,
            "PersistentVolumeClaim" => crate::admission::claim(self.server, &mut obj).await?,
            "PersistentVolume" => crate::admission::volume(&mut obj),
            "Secret" => {
                crate::auth::token::legacy_secret(self.server, &mut obj, &mut warnings).await?
            }
            _ => {}
        }
        let service = (self.rt().id() == "Service").then(|| obj.clone());
        let created = async {
            crate::admission::knative_traffic(self.server, self.rt(), self.target.namespace, &obj)
                .await?;
            let mut obj = self
                .admit_by_webhooks("CREATE", None, &name, obj, None, &mut warnings)
                .await?;
            if let Some(ns) = self.target.namespace {
                crate::quota::admit_create(self.server, self.rt(), ns, &obj, self.params.dry_run)
                    .await?;
            }
            match applied {
                Some(managed) => obj["metadata"]["managedFields"] = managed,
                None => fields::record_update(
                    self.rt(),
                    &self.params.manager(self.headers)?,
                    None,
                    None,
                    &mut obj,
                    &now(),
                ),
            }
            self.persist_create(&name, obj).await
        }
        .await;
        if let Some(service) = service
            && (created.is_err() || self.params.dry_run)
        {
            // Nothing was stored: give the addresses back.
            crate::services::release(self.server, &service).await;
        }
        Ok((created?, warnings))
    }

    async fn persist_create(&self, name: &str, mut obj: Value) -> ApiResult<Value> {
        crate::auth::escalation::check(self.server, self.user, self.rt(), name, &obj)?;
        if self.params.dry_run {
            // A dry run converts too: it fails where the write would.
            self.encode(&mut obj.clone()).await?;
            return Ok(obj);
        }
        let value = self.encode(&mut obj).await?;
        let kv = self
            .server
            .store
            .create(&self.key(name), value)
            .await
            .map_err(|e| self.store_err(e, name))?;
        if self.rt().kind == "CustomResourceDefinition" {
            // Served as soon as the write is acknowledged (the follower
            // registers it again from the store).
            crate::crds::register(&obj);
        }
        // A webhook configuration is acknowledged once it is called.
        self.server
            .webhooks
            .wait_for(self.rt(), kv.mod_revision)
            .await;
        Ok(stored_at(obj, kv.mod_revision))
    }

    /// Turns `old` plus a client's `new` into what is stored, for a write to
    /// the main resource or a subresource.
    fn admit_update(
        &self,
        name: &str,
        sub: Option<Subresource>,
        old: &Value,
        new: Value,
    ) -> ApiResult<(Value, Vec<String>)> {
        let rt = self.rt();
        let (mut new, warnings) = match sub {
            Some(Subresource::Status) => self.decode_status_write(new)?,
            _ => self.decode(new)?,
        };
        match new["metadata"]["name"].as_str() {
            None | Some("") => new["metadata"]["name"] = json!(name),
            Some(n) if n == name => {}
            Some(n) => {
                return Err(ApiError::bad_request(format!(
                    "the name of the object ({n}) does not match the name on the URL ({name})"
                )));
            }
        }
        if rt.namespaced {
            match new["metadata"]["namespace"].as_str() {
                None | Some("") => {
                    new["metadata"]["namespace"] = old["metadata"]["namespace"].clone()
                }
                Some(n) if Some(n) == self.target.namespace => {}
                Some(_) => {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ));
                }
            }
        }
        let mut merged = match sub {
            Some(Subresource::Status) => {
                let mut o = old.clone();
                o["status"] = new["status"].clone();
                o
            }
            Some(Subresource::Finalize) => {
                let mut o = old.clone();
                o["spec"]["finalizers"] = new["spec"]["finalizers"].clone();
                o
            }
            _ => {
                if rt.has(Subresource::Status) {
                    new["status"] = old["status"].clone();
                }
                new
            }
        };
        if merged["status"].is_null()
            && let Some(m) = merged.as_object_mut()
        {
            m.remove("status");
        }
        // What the server owns carries over from the stored object.
        let meta = merged["metadata"]
            .as_object_mut()
            .ok_or_else(|| ApiError::bad_request("metadata must be an object"))?;
        for k in [
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
            "managedFields",
            "generateName",
        ] {
            match old["metadata"].get(k) {
                Some(v) => meta.insert(k.into(), v.clone()),
                None => meta.remove(k),
            };
        }
        apply_defaults(rt, &mut merged);
        if rt.kind == "CustomResourceDefinition"
            && sub.is_none()
            && merged["metadata"]["deletionTimestamp"].is_null()
        {
            // The server accepts the names and establishes the kind itself.
            let status = wasmkube_api::custom::crd_status(&merged, &now());
            merged["status"] = status;
        }
        if (has_spec_generation(rt) || merged.get("spec").is_some()) && spec_changed(old, &merged) {
            let g = old["metadata"]["generation"].as_i64().unwrap_or(0) + 1;
            merged["metadata"]["generation"] = json!(g);
        }
        let errors = validation::validate(rt, &merged, Some(old));
        if !errors.is_empty() {
            return Err(ApiError::invalid(rt, name, errors));
        }
        crate::auth::node::admit_node_object(self.user, rt, Some(old), &merged)?;
        Ok((merged, warnings))
    }

    /// Stores `new` over `old` (read at `rev`); a no-op write is skipped, and an
    /// object whose deletion is pending and has no finalizers left is deleted.
    async fn persist_update(
        &self,
        name: &str,
        old: &Value,
        rev: u64,
        mut new: Value,
    ) -> ApiResult<Value> {
        if same_ignoring_version(old, &new) {
            return Ok(old.clone());
        }
        if self.params.dry_run {
            self.encode(&mut new.clone()).await?;
            return Ok(new);
        }
        let store = &self.server.store;
        let key = self.key(name);
        let finished = !new["metadata"]["deletionTimestamp"].is_null()
            && new["metadata"]["finalizers"]
                .as_array()
                .is_none_or(Vec::is_empty)
            && (self.rt().kind != "Namespace"
                || new["spec"]["finalizers"]
                    .as_array()
                    .is_none_or(Vec::is_empty))
            && (self.rt().kind != "Pod"
                || new["metadata"]["deletionGracePeriodSeconds"]
                    .as_i64()
                    .unwrap_or(0)
                    == 0);
        if finished {
            let kv = store
                .delete(&key, Some(rev))
                .await
                .map_err(|e| self.store_err(e, name))?;
            let mut gone = decode_stored(&kv).map_err(ApiError::internal)?;
            if self.rt().id() == "Service" {
                crate::services::release(self.server, &gone).await;
            }
            self.served(std::slice::from_mut(&mut gone)).await?;
            return Ok(gone);
        }
        let value = self.encode(&mut new).await?;
        let kv = store
            .update(&key, value, Some(rev))
            .await
            .map_err(|e| self.store_err(e, name))?;
        if self.rt().kind == "CustomResourceDefinition" {
            crate::crds::register(&new);
        }
        self.server
            .webhooks
            .wait_for(self.rt(), kv.mod_revision)
            .await;
        Ok(stored_at(new, kv.mod_revision))
    }

    /// As `persist_update`; a Service's addresses are carried over or
    /// claimed first, and given back by whichever way the write went.
    async fn persist_update_claiming(
        &self,
        name: &str,
        sub: Option<Subresource>,
        old: &Value,
        rev: u64,
        mut new: Value,
    ) -> ApiResult<Value> {
        crate::auth::escalation::check(self.server, self.user, self.rt(), name, &new)?;
        if let Some(ns) = self.target.namespace
            && sub.is_none()
        {
            crate::quota::admit_update(self.server, self.rt(), ns, old, &new, self.params.dry_run)
                .await?;
        }
        if self.rt().id() != "Service" || sub.is_some() {
            return self.persist_update(name, old, rev, new).await;
        }
        let change = crate::services::reallocate(self.server, old, &mut new).await?;
        let result = self.persist_update(name, old, rev, new).await;
        match (&result, self.params.dry_run) {
            (Ok(_), false) => change.commit(self.server).await,
            _ => change.undo(self.server).await,
        }
        result
    }

    /// Read-modify-write with retries when the client set no precondition.
    async fn guaranteed_update<F>(
        &self,
        name: &str,
        sub: Option<Subresource>,
        mut change: F,
    ) -> ApiResult<(Value, Vec<String>, bool)>
    where
        F: FnMut(&Value) -> ApiResult<Option<Value>>,
    {
        let manager = self.params.manager(self.headers)?;
        let sub_name = sub.map(Subresource::name).filter(|s| *s == "status");
        for _ in 0..UNCONDITIONAL_RETRIES {
            // The change is made to the object as the client's version
            // shows it; the rest compares stored objects.
            let (old, rev) = self.read_hub(name).await?;
            let mut served = old.clone();
            crate::storage::served_as(self.rt(), &mut served);
            let Some(proposed) = change(&served)? else {
                return Ok((old, Vec::new(), false));
            };
            let precondition = match resource_version(&proposed) {
                Some(Ok(v)) => Some(v),
                Some(Err(())) => {
                    return Err(ApiError::bad_request(
                        "metadata.resourceVersion: Invalid value: must be an integer",
                    ));
                }
                None => None,
            };
            if let Some(p) = precondition
                && p != rev
            {
                return Err(self.store_err(
                    StoreError::Conflict {
                        key: String::new(),
                        expected: p,
                        actual: rev,
                    },
                    name,
                ));
            }
            let (new, mut warnings) = self.admit_update(name, sub, &old, proposed)?;
            self.admit_update_reads(sub, &old, &new, &mut warnings)
                .await?;
            if sub.is_none() {
                crate::admission::knative_traffic(
                    self.server,
                    self.rt(),
                    self.target.namespace,
                    &new,
                )
                .await?;
            }
            let mut new = self
                .admit_by_webhooks("UPDATE", sub, name, new, Some(&old), &mut warnings)
                .await?;
            fields::record_update(self.rt(), &manager, sub_name, Some(&old), &mut new, &now());
            match self
                .persist_update_claiming(name, sub, &old, rev, new)
                .await
            {
                Err(ApiError::Conflict(..)) if precondition.is_none() => continue,
                Err(e) => return Err(e),
                Ok(stored) => return Ok((stored, warnings, true)),
            }
        }
        Err(self.too_contended(name))
    }

    async fn update(
        &self,
        name: &str,
        sub: Option<Subresource>,
        input: Value,
    ) -> ApiResult<Response> {
        let rt = self.rt();
        let may_create =
            matches!(rt.kind, "Endpoints" | "Lease" | "Event" | "EndpointSlice") && sub.is_none();
        if may_create && let Err(ApiError::NotFound(..)) = self.read(name).await {
            let mut input = input;
            input["metadata"]["name"] = json!(name);
            if let Some(m) = input["metadata"].as_object_mut() {
                m.remove("resourceVersion");
            }
            return self.create(input).await;
        }
        let (stored, warnings, _) = self
            .guaranteed_update(name, sub, |_| Ok(Some(input.clone())))
            .await?;
        Ok(json_response(
            StatusCode::OK,
            &render_one(rt, self.output, stored),
            &warnings,
        ))
    }

    async fn patch(&self, name: &str, sub: Option<Subresource>, body: Body) -> ApiResult<Response> {
        let rt = self.rt();
        let ct = content_type(self.headers).to_owned();
        let patch_type = PatchType::from_content_type(&ct).ok_or_else(|| ApiError::UnsupportedMediaType {
            message: format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json (got {ct})"),
        })?;
        let raw = read_bytes(self.server, body).await?;
        let patch_doc = parse_value(
            if patch_type == PatchType::Apply {
                "application/yaml"
            } else {
                "application/json"
            },
            &raw,
        )?;
        if sub == Some(Subresource::Scale) {
            return self.patch_scale(name, patch_type, &patch_doc).await;
        }
        if patch_type == PatchType::Apply {
            return self.apply(name, sub, patch_doc).await;
        }
        let apply_patch = |old: &Value| -> ApiResult<Option<Value>> {
            let result = match patch_type {
                PatchType::Json => patch::json_patch(old, &patch_doc),
                PatchType::Merge => patch::merge_patch(old, &patch_doc),
                PatchType::Strategic => {
                    patch::strategic_merge_patch(crate::merge_keys::Lists::of(rt), old, &patch_doc)
                }
                PatchType::Apply => unreachable!("handled above"),
            };
            let mut patched = result.map_err(|e| match e {
                PatchError::Malformed(m) => ApiError::bad_request(m),
                PatchError::Failed(m) => ApiError::Invalid {
                    subject: Subject::of(rt, name),
                    kind: rt.qualified_kind(),
                    causes: vec![wasmkube_api::field::FieldError::invalid("", "", m)],
                },
            })?;
            // A patch that does not mention resourceVersion is unconditional.
            if patched["metadata"]["resourceVersion"] == old["metadata"]["resourceVersion"]
                && let Some(m) = patched["metadata"].as_object_mut()
            {
                m.remove("resourceVersion");
            }
            Ok(Some(patched))
        };
        let (stored, warnings, _) = self.guaranteed_update(name, sub, apply_patch).await?;
        Ok(json_response(
            StatusCode::OK,
            &render_one(rt, self.output, stored),
            &warnings,
        ))
    }

    /// Server-side apply (`application/apply-patch+yaml`), to the object or
    /// its status (`sub`: only the status of what is applied is written).
    async fn apply(
        &self,
        name: &str,
        sub: Option<Subresource>,
        applied: Value,
    ) -> ApiResult<Response> {
        let rt = self.rt();
        let manager = self.params.field_manager.clone().ok_or_else(|| {
            ApiError::bad_request(
                "PATCH, application/apply-patch+yaml requires the fieldManager query parameter",
            )
        })?;
        // Merged in the version of the request, then stored converted. What
        // decoding filled in (a required field's zero value) is not applied.
        let sent = applied.clone();
        let (mut applied, warnings) = self.decode_served(applied)?;
        keep_only_sent(&mut applied, &sent);
        if applied["metadata"]["name"]
            .as_str()
            .is_some_and(|n| n != name)
        {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({}) does not match the name on the URL ({name})",
                applied["metadata"]["name"].as_str().unwrap_or_default()
            )));
        }
        for _ in 0..UNCONDITIONAL_RETRIES {
            let live = match self.read_hub(name).await {
                Ok(found) => Some(found),
                // Applying to a subresource never creates the object.
                Err(ApiError::NotFound(..)) if sub.is_none() => None,
                Err(e) => return Err(e),
            };
            let served = live.as_ref().map(|(o, _)| {
                let mut o = o.clone();
                crate::storage::served_as(rt, &mut o);
                o
            });
            let merged = fields::apply(
                rt,
                sub.map(Subresource::name).filter(|s| *s == "status"),
                &manager,
                self.params.force,
                served.as_ref(),
                &applied,
                &now(),
            )
            .map_err(|conflicts| self.apply_conflict(name, conflicts))?;
            let Some((old, rev)) = live else {
                let mut input = merged;
                input["metadata"]["name"] = json!(name);
                let managed = input["metadata"]["managedFields"].clone();
                // The whole admission of a create, as a POST gets.
                match self.create_object_managed(input, Some(managed)).await {
                    Err(ApiError::AlreadyExists(_)) => continue,
                    Err(e) => return Err(e),
                    Ok((created, mut more)) => {
                        more.extend(warnings.iter().cloned());
                        return Ok(json_response(
                            StatusCode::CREATED,
                            &render_one(rt, self.output, created),
                            &more,
                        ));
                    }
                }
            };
            let managed = merged["metadata"]["managedFields"].clone();
            let mut proposed = merged;
            if let Some(m) = proposed["metadata"].as_object_mut() {
                m.remove("resourceVersion");
            }
            let (new, mut admitted) = self.admit_update(name, sub, &old, proposed)?;
            self.admit_update_reads(sub, &old, &new, &mut admitted)
                .await?;
            crate::admission::knative_traffic(self.server, self.rt(), self.target.namespace, &new)
                .await?;
            let mut new = self
                .admit_by_webhooks("UPDATE", sub, name, new, Some(&old), &mut admitted)
                .await?;
            new["metadata"]["managedFields"] = managed;
            match self
                .persist_update_claiming(name, sub, &old, rev, new)
                .await
            {
                Err(ApiError::Conflict(..)) => continue,
                Err(e) => return Err(e),
                Ok(stored) => {
                    return Ok(json_response(
                        StatusCode::OK,
                        &render_one(rt, self.output, stored),
                        &warnings,
                    ));
                }
            }
        }
        Err(self.too_contended(name))
    }

    fn apply_conflict(&self, name: &str, conflicts: Vec<fields::Conflict>) -> ApiError {
        ApiError::ApplyConflict {
            subject: Subject::of(self.rt(), name),
            causes: conflicts
                .into_iter()
                .map(|c| wasmkube_api::field::FieldError {
                    kind: wasmkube_api::field::FieldErrorType::Invalid,
                    detail: format!("conflict with \"{}\" using {}", c.manager, c.api_version),
                    field: c.field,
                    value: None,
                })
                .collect(),
        }
    }

    async fn delete(&self, name: &str, opts: &DeleteOptions) -> ApiResult<Response> {
        let (mut resp_obj, deleted) = self.delete_one(name, opts).await?;
        if deleted && self.rt().kind != "Pod" {
            return Ok(json_response(
                StatusCode::OK,
                &status_success(self.rt(), name, &resp_obj["metadata"]["uid"]),
                &[],
            ));
        }
        self.served(std::slice::from_mut(&mut resp_obj)).await?;
        Ok(json_response(
            StatusCode::OK,
            &render_one(self.rt(), self.output, resp_obj),
            &[],
        ))
    }

    /// Deletes or marks for deletion; returns the object and whether it is gone.
    async fn delete_one(&self, name: &str, opts: &DeleteOptions) -> ApiResult<(Value, bool)> {
        let rt = self.rt();
        let grace_param = self
            .params
            .grace_period_seconds
            .or(opts.grace_period_seconds);
        let policy = self
            .params
            .propagation_policy
            .clone()
            .or_else(|| opts.propagation_policy.clone());
        let finalizer = match policy.as_deref() {
            None | Some("Background") => None,
            Some("Orphan") => Some("orphan"),
            Some("Foreground") => Some("foregroundDeletion"),
            Some(other) => {
                return Err(ApiError::invalid(
                    rt,
                    name,
                    vec![wasmkube_api::field::FieldError::not_supported(
                        "propagationPolicy",
                        other,
                        &["Foreground", "Background", "Orphan"],
                    )],
                ));
            }
        };
        for _ in 0..UNCONDITIONAL_RETRIES {
            let (old, rev) = self.read_stored(name).await?;
            if let Some(uid) = &opts.precondition_uid
                && old["metadata"]["uid"].as_str() != Some(uid)
            {
                return Err(ApiError::Conflict(
                    Subject::of(rt, name),
                    format!(
                        "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                        old["metadata"]["uid"].as_str().unwrap_or_default()
                    ),
                ));
            }
            if let Some(want) = &opts.precondition_rv
                && *want != rev.to_string()
            {
                return Err(ApiError::Conflict(
                    Subject::of(rt, name),
                    format!(
                        "Precondition failed: ResourceVersion in precondition: {want}, ResourceVersion in object meta: {rev}"
                    ),
                ));
            }
            if self.server.webhooks.any(rt) {
                let mut served = old.clone();
                self.served(std::slice::from_mut(&mut served)).await?;
                let attrs = self.webhook_attributes("DELETE", None, name);
                crate::admission_policies::validate(
                    self.server,
                    &attrs,
                    None,
                    Some(&served),
                    &mut Vec::new(),
                )
                .await?;
                self.server
                    .webhooks
                    .validate(self.server, &attrs, None, Some(&served), &mut Vec::new())
                    .await?;
            }
            let mut new = old.clone();
            let meta = new["metadata"]
                .as_object_mut()
                .expect("stored objects have metadata");
            let mut finalizers: Vec<Value> = meta
                .get("finalizers")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            if let Some(f) = finalizer {
                finalizers.retain(|v| !matches!(v.as_str(), Some("orphan" | "foregroundDeletion")));
                finalizers.push(json!(f));
            }
            let pod_grace = (rt.kind == "Pod"
                && !old["spec"]["nodeName"].is_null()
                && old["status"]["phase"] != "Succeeded"
                && old["status"]["phase"] != "Failed")
                .then(|| {
                    grace_param.unwrap_or_else(|| {
                        old["spec"]["terminationGracePeriodSeconds"]
                            .as_i64()
                            .unwrap_or(30)
                    })
                })
                .filter(|g| *g > 0);
            let namespace_pending = rt.kind == "Namespace"
                && old["spec"]["finalizers"]
                    .as_array()
                    .is_some_and(|f| !f.is_empty());
            if finalizers.is_empty() && pod_grace.is_none() && !namespace_pending {
                if self.params.dry_run {
                    return Ok((old, true));
                }
                match self.server.store.delete(&self.key(name), Some(rev)).await {
                    Ok(kv) => {
                        let gone = decode_stored(&kv).map_err(ApiError::internal)?;
                        if rt.id() == "Service" {
                            crate::services::release(self.server, &gone).await;
                        }
                        // The delete's revision.
                        self.server.webhooks.wait_for(rt, kv.mod_revision).await;
                        return Ok((gone, true));
                    }
                    Err(StoreError::Conflict { .. }) if opts.precondition_rv.is_none() => continue,
                    Err(e) => return Err(self.store_err(e, name)),
                }
            }
            // Graceful: mark, and let finalizers, the node or the namespace controller finish.
            let grace = pod_grace.unwrap_or(0);
            let already = meta.get("deletionTimestamp").is_some_and(|v| !v.is_null());
            let current_grace = meta
                .get("deletionGracePeriodSeconds")
                .and_then(Value::as_i64);
            if !already || current_grace.is_some_and(|g| grace < g) {
                let when = Utc::now() + chrono::Duration::seconds(grace);
                meta.insert(
                    "deletionTimestamp".into(),
                    json!(when.to_rfc3339_opts(SecondsFormat::Secs, true)),
                );
                meta.insert("deletionGracePeriodSeconds".into(), json!(grace));
            }
            if !finalizers.is_empty() {
                meta.insert("finalizers".into(), Value::Array(finalizers));
            }
            if rt.kind == "Namespace" {
                new["status"]["phase"] = json!("Terminating");
            }
            if same_ignoring_version(&old, &new) || self.params.dry_run {
                return Ok((new, false));
            }
            let value = encode_for_store(&mut new);
            match self
                .server
                .store
                .update(&self.key(name), value, Some(rev))
                .await
            {
                Ok(kv) => return Ok((stored_at(new, kv.mod_revision), false)),
                Err(StoreError::Conflict { .. }) if opts.precondition_rv.is_none() => continue,
                Err(e) => return Err(self.store_err(e, name)),
            }
        }
        Err(self.too_contended(name))
    }

    async fn delete_collection(&self, opts: &DeleteOptions) -> ApiResult<Response> {
        let rt = self.rt();
        let (items, rev, _) = self.list_objects().await?;
        let mut out = Vec::new();
        for obj in items {
            let name = obj["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            // Each item is deleted in its own namespace (an all-namespace
            // collection spans many), with the same delete options.
            let ctx = Ctx {
                server: self.server,
                target: Target {
                    namespace: obj["metadata"]["namespace"].as_str(),
                    ..self.target
                },
                params: Params {
                    dry_run: self.params.dry_run,
                    grace_period_seconds: self.params.grace_period_seconds,
                    propagation_policy: self.params.propagation_policy.clone(),
                    ..Params::default()
                },
                headers: self.headers,
                output: Output::Object,
                user: None,
            };
            match ctx.delete_one(&name, opts).await {
                Ok((o, _)) => out.push(o),
                Err(ApiError::NotFound(..)) => {}
                Err(e) => return Err(e),
            }
        }
        self.served(&mut out).await?;
        let body = json!({"kind": format!("{}List", rt.kind), "apiVersion": rt.api_version(), "metadata": {"resourceVersion": rev.to_string()}, "items": out});
        Ok(json_response(StatusCode::OK, &body, &[]))
    }

    async fn bind(&self, name: &str, binding: Value) -> ApiResult<Response> {
        let rt = self.rt();
        let node = binding["target"]["name"]
            .as_str()
            .filter(|n| !n.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| {
                ApiError::invalid(
                    rt,
                    name,
                    vec![wasmkube_api::field::FieldError::required("target.name", "")],
                )
            })?;
        let uid = binding["metadata"]["uid"].as_str();
        let when = now();
        // As Kubernetes' binding storage does: set the node and the
        // condition on the stored pod under its revision, without the update
        // path's decoding, defaulting, validation and managed fields (the
        // scheduler owns no fields; the pod's generation stays).
        for _ in 0..UNCONDITIONAL_RETRIES {
            let (mut pod, rev) = self.read(name).await?;
            let conflict = |message: String| ApiError::Conflict(Subject::of(rt, name), message);
            if uid.is_some_and(|u| pod["metadata"]["uid"].as_str() != Some(u)) {
                return Err(conflict(
                    "the UID in the binding does not match the pod".into(),
                ));
            }
            if !pod["metadata"]["deletionTimestamp"].is_null() {
                return Err(conflict(format!(
                    "pod {name} is being deleted, cannot be assigned to a host"
                )));
            }
            if let Some(existing) = pod["spec"]["nodeName"].as_str() {
                return Err(conflict(format!(
                    "pod {name} is already assigned to node \"{existing}\""
                )));
            }
            pod["spec"]["nodeName"] = json!(node);
            set_condition(
                &mut pod,
                json!({"type": "PodScheduled", "status": "True", "lastProbeTime": null, "lastTransitionTime": when}),
            );
            let stored = self.params.dry_run
                || match self
                    .server
                    .store
                    .update(&self.key(name), encode_for_store(&mut pod), Some(rev))
                    .await
                {
                    Ok(_) => true,
                    Err(StoreError::Conflict { .. }) => false,
                    Err(e) => return Err(self.store_err(e, name)),
                };
            if stored {
                return Ok(json_response(
                    StatusCode::CREATED,
                    &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
                    &[],
                ));
            }
        }
        Err(self.too_contended(name))
    }

    /// `pods/eviction`: deletes the pod unless that would take its
    /// PodDisruptionBudget below what it must keep healthy (429, to be
    /// tried again); an allowed eviction is counted in the budget's status
    /// (`disruptionsAllowed` down, the pod in `disruptedPods`) before the
    /// pod is deleted, so two evictions cannot both take the last one.
    async fn evict(&self, name: &str, eviction: Value) -> ApiResult<Response> {
        let (pod, _) = self.read(name).await?;
        let opts = delete_options(&eviction["deleteOptions"]);
        // As Kubernetes: a pod that is done, not yet running or already
        // going needs no budget.
        let exempt = matches!(
            pod["status"]["phase"].as_str(),
            Some("Succeeded" | "Failed" | "Pending") | None
        ) || !pod["metadata"]["deletionTimestamp"].is_null();
        if !exempt {
            self.take_disruption(name, &pod).await?;
        }
        self.delete_one(name, &opts).await?;
        Ok(json_response(
            StatusCode::CREATED,
            &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
            &[],
        ))
    }

    /// Takes one allowed disruption from the budget covering `pod`.
    async fn take_disruption(&self, name: &str, pod: &Value) -> ApiResult<()> {
        let pdbs = registry::lookup("policy", "v1", "poddisruptionbudgets")
            .expect("PodDisruptionBudgets are served");
        let ns = self.target.namespace.unwrap_or_default();
        let too_many = |message: String, cause: Option<String>| ApiError::TooManyRequests {
            message,
            causes: cause
                .map(|c| ("DisruptionBudget".to_owned(), c))
                .into_iter()
                .collect(),
        };
        for _ in 0..UNCONDITIONAL_RETRIES {
            let listed = self
                .server
                .store
                .list(&pdbs.list_prefix(Some(ns)), ListOptions::default())
                .await
                .map_err(|e| self.store_err(e, name))?;
            let mut covering = Vec::new();
            for kv in &listed.items {
                let pdb = decode_stored(kv).map_err(ApiError::internal)?;
                let selector = serde_json::from_value(pdb["spec"]["selector"].clone())
                    .ok()
                    .and_then(|s| wasmkube_api::selectors::LabelSelector::from_api(&s).ok());
                if selector.is_some_and(|s| s.matches_object(pod)) {
                    covering.push((pdb, kv.key.clone(), kv.mod_revision));
                }
            }
            let Some((mut pdb, key, rev)) = covering.pop() else {
                return Ok(());
            };
            if !covering.is_empty() {
                return Err(ApiError::internal(
                    "This pod has more than one PodDisruptionBudget, which the eviction subresource does not support.",
                ));
            }
            let budget = pdb["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let status = &pdb["status"];
            if status["observedGeneration"].as_i64() < pdb["metadata"]["generation"].as_i64() {
                return Err(too_many(
                    "Cannot evict pod as it would violate the pod's disruption budget.".into(),
                    Some(format!(
                        "The disruption budget {budget} is still being processed by the server."
                    )),
                ));
            }
            let allowed = status["disruptionsAllowed"].as_i64().unwrap_or(0);
            if allowed <= 0 {
                return Err(too_many(
                    "Cannot evict pod as it would violate the pod's disruption budget.".into(),
                    Some(format!(
                        "The disruption budget {budget} needs {} healthy pods and has {} currently",
                        status["desiredHealthy"].as_i64().unwrap_or(0),
                        status["currentHealthy"].as_i64().unwrap_or(0)
                    )),
                ));
            }
            pdb["status"]["disruptionsAllowed"] = json!(allowed - 1);
            pdb["status"]["disruptedPods"][name] = json!(now());
            if self.params.dry_run {
                return Ok(());
            }
            match self
                .server
                .store
                .update(&key, encode_for_store(&mut pdb), Some(rev))
                .await
            {
                Ok(_) => return Ok(()),
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(self.store_err(e, &budget)),
            }
        }
        Err(self.too_contended(name))
    }

    fn scale_of(&self, obj: &Value) -> Value {
        let rendered = wasmkube_api::selectors::render(&obj["spec"]["selector"]);
        let (spec_replicas, status_replicas, selector) =
            match self.rt().custom.and_then(|c| c.scale.as_ref()) {
                // A custom resource's scale lives where its CRD says.
                Some(paths) => {
                    use wasmkube_api::custom::{replicas_at, select};
                    (
                        replicas_at(obj, &paths.spec_replicas).unwrap_or(0),
                        replicas_at(obj, &paths.status_replicas).unwrap_or(0),
                        paths
                            .label_selector
                            .as_deref()
                            .and_then(|p| select(obj, p))
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .to_owned(),
                    )
                }
                None => (
                    obj["spec"]["replicas"].as_i64().unwrap_or(0),
                    obj["status"]["replicas"].as_i64().unwrap_or(0),
                    rendered,
                ),
            };
        json!({
            "kind": "Scale",
            "apiVersion": "autoscaling/v1",
            "metadata": {
                "name": obj["metadata"]["name"],
                "namespace": obj["metadata"]["namespace"],
                "uid": obj["metadata"]["uid"],
                "resourceVersion": obj["metadata"]["resourceVersion"],
                "creationTimestamp": obj["metadata"]["creationTimestamp"],
            },
            "spec": {"replicas": spec_replicas},
            "status": {"replicas": status_replicas, "selector": selector},
        })
    }

    async fn get_scale(&self, name: &str) -> ApiResult<Response> {
        let (obj, _) = self.read(name).await?;
        Ok(json_response(StatusCode::OK, &self.scale_of(&obj), &[]))
    }

    async fn set_replicas(
        &self,
        name: &str,
        replicas: Value,
        precondition: Option<String>,
    ) -> ApiResult<Response> {
        let rt = self.rt();
        let replicas = replicas
            .as_i64()
            .filter(|r| (0..=i32::MAX as i64).contains(r))
            .ok_or_else(|| {
                ApiError::invalid(
                    rt,
                    name,
                    vec![wasmkube_api::field::FieldError::invalid(
                        "spec.replicas",
                        replicas.to_string(),
                        "must be greater than or equal to 0",
                    )],
                )
            })?;
        let (stored, _, _) = self
            .guaranteed_update(name, None, |old| {
                let mut new = old.clone();
                match rt.custom.and_then(|c| c.scale.as_ref()) {
                    Some(paths) => wasmkube_api::custom::set_at(
                        &mut new,
                        &paths.spec_replicas,
                        json!(replicas),
                    ),
                    None => new["spec"]["replicas"] = json!(replicas),
                }
                match &precondition {
                    Some(rv) => new["metadata"]["resourceVersion"] = json!(rv),
                    None => {
                        if let Some(m) = new["metadata"].as_object_mut() {
                            m.remove("resourceVersion");
                        }
                    }
                }
                Ok(Some(new))
            })
            .await?;
        Ok(json_response(StatusCode::OK, &self.scale_of(&stored), &[]))
    }

    async fn put_scale(&self, name: &str, scale: Value) -> ApiResult<Response> {
        let rv = scale["metadata"]["resourceVersion"]
            .as_str()
            .filter(|s| !s.is_empty())
            .map(str::to_owned);
        self.set_replicas(name, scale["spec"]["replicas"].clone(), rv)
            .await
    }

    async fn patch_scale(
        &self,
        name: &str,
        patch_type: PatchType,
        doc: &Value,
    ) -> ApiResult<Response> {
        let (obj, _) = self.read(name).await?;
        let current = self.scale_of(&obj);
        let patched = match patch_type {
            PatchType::Json => patch::json_patch(&current, doc),
            PatchType::Merge | PatchType::Strategic | PatchType::Apply => {
                patch::merge_patch(&current, doc)
            }
        }
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
        let rv = (patched["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"])
            .then(|| {
                patched["metadata"]["resourceVersion"]
                    .as_str()
                    .map(str::to_owned)
            })
            .flatten();
        self.set_replicas(name, patched["spec"]["replicas"].clone(), rv)
            .await
    }
}

/// Creates an object on the server's own behalf (bootstrap objects).
pub(crate) async fn create_internal(
    server: &Arc<ApiServer>,
    rt: &'static ResourceType,
    namespace: Option<&str>,
    body: Value,
) -> ApiResult<Value> {
    let headers = HeaderMap::new();
    let target = Target {
        rt,
        namespace,
        name: None,
        subresource: None,
    };
    Ctx::internal(server, target, &headers)
        .create_object(body)
        .await
        .map(|(obj, _)| obj)
}

/// Deletes an object on the server's own behalf, as a client's delete with
/// default options would (an object with finalizers is only marked);
/// returns whether it is gone.
pub(crate) async fn delete_internal(
    server: &Arc<ApiServer>,
    rt: &'static ResourceType,
    namespace: Option<&str>,
    name: &str,
) -> ApiResult<bool> {
    let headers = HeaderMap::new();
    let target = Target {
        rt,
        namespace,
        name: Some(name),
        subresource: None,
    };
    Ctx::internal(server, target, &headers)
        .delete_one(name, &DeleteOptions::default())
        .await
        .map(|(_, gone)| gone)
}

/// Changes a cluster-scoped object on the server's own behalf (bootstrap
/// objects): `change` sees the stored object and returns what it should be,
/// or `None` to leave it.
pub(crate) async fn reconcile_internal(
    server: &Arc<ApiServer>,
    rt: &'static ResourceType,
    name: &str,
    sub: Option<Subresource>,
    mut change: impl FnMut(&Value) -> Option<Value>,
) -> ApiResult<Value> {
    let headers = HeaderMap::new();
    let target = Target {
        rt,
        namespace: None,
        name: Some(name),
        subresource: sub,
    };
    let ctx = Ctx::internal(server, target, &headers);
    ctx.guaranteed_update(name, sub, |current| {
        Ok(change(current).map(|mut wanted| {
            if let Some(m) = wanted["metadata"].as_object_mut() {
                m.remove("resourceVersion");
            }
            wanted
        }))
    })
    .await
    .map(|(stored, _, _)| stored)
}

/// The Pod Security levels of a namespace.
#[derive(Clone, Copy, Debug, Default)]
struct PodSecurityLevels {
    enforce: Option<pod_security::Level>,
    warn: Option<pod_security::Level>,
    audit: Option<pod_security::Level>,
}

fn set_condition(obj: &mut Value, cond: Value) {
    let list = &mut obj["status"]["conditions"];
    if !list.is_array() {
        *list = json!([]);
    }
    let list = list.as_array_mut().expect("just made an array");
    match list.iter_mut().find(|c| c["type"] == cond["type"]) {
        Some(c) => *c = cond,
        None => list.push(cond),
    }
}

/// `generateName` plus five random characters from Kubernetes' alphabet.
/// Drops the members of a decoded apply configuration the client did not
/// send (decoding fills a required field with its zero value; an apply
/// configuration names only the fields its manager owns).
fn keep_only_sent(decoded: &mut Value, sent: &Value) {
    match (decoded, sent) {
        (Value::Object(d), Value::Object(s)) => {
            d.retain(|k, _| s.contains_key(k) || k == "apiVersion" || k == "kind");
            for (k, v) in d.iter_mut() {
                if let Some(sv) = s.get(k) {
                    keep_only_sent(v, sv);
                }
            }
        }
        (Value::Array(d), Value::Array(s)) if d.len() == s.len() => {
            for (dv, sv) in d.iter_mut().zip(s) {
                keep_only_sent(dv, sv);
            }
        }
        _ => {}
    }
}

fn generate_name(prefix: &str) -> String {
    let base: String = prefix.chars().take(58).collect();
    format!("{base}{}", random_suffix())
}

/// Five random characters from Kubernetes' alphabet for generated names.
pub(crate) fn random_suffix() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    (0..5)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}
