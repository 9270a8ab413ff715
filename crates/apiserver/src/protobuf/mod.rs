//! Kubernetes protobuf request bodies (`application/vnd.kubernetes.protobuf`),
//! decoded into the same JSON the rest of the server handles. kubectl's
//! `create <kind>` generators send these.
//!
//! The envelope is the magic `k8s\0` followed by a `runtime.Unknown` whose
//! `raw` holds the object's message. Field numbers and JSON names come from
//! the generated [`schema`] table; a handful of messages whose JSON form is
//! not an object (Time, Quantity, IntOrString...) are mapped by hand, and
//! messages Kubernetes embeds inline (a Volume's VolumeSource) are flattened.

mod schema;

use std::collections::HashMap;
use std::sync::OnceLock;

use base64::Engine as _;
use chrono::{DateTime, SecondsFormat};
use serde_json::{Map, Value, json};

/// The magic prefix of Kubernetes protobuf bodies.
const MAGIC: &[u8] = b"k8s\0";
/// Nesting deeper than this is refused (hostile input).
const MAX_DEPTH: usize = 64;

/// Fields that are pointers in the Go types, where an explicit zero or
/// `false` means something different from "unset" (it overrides a default or
/// is a real setting). Go's protobuf encoding writes non-pointer fields even
/// when they are zero, while its JSON omits them; so zero scalars are dropped
/// except for these fields.
const ZERO_IS_MEANINGFUL: &[&str] = &[
    "replicas",
    "revisionHistoryLimit",
    "progressDeadlineSeconds",
    "terminationGracePeriodSeconds",
    "gracePeriodSeconds",
    "orphanDependents",
    "activeDeadlineSeconds",
    "parallelism",
    "completions",
    "backoffLimit",
    "backoffLimitPerIndex",
    "maxFailedIndexes",
    "ttlSecondsAfterFinished",
    "startingDeadlineSeconds",
    "successfulJobsHistoryLimit",
    "failedJobsHistoryLimit",
    "suspend",
    "manualSelector",
    "defaultMode",
    "mode",
    "enableServiceLinks",
    "automountServiceAccountToken",
    "runAsUser",
    "runAsGroup",
    "runAsNonRoot",
    "fsGroup",
    "privileged",
    "allowPrivilegeEscalation",
    "readOnlyRootFilesystem",
    "optional",
    "immutable",
    "priority",
    "minDomains",
    "leaseDurationSeconds",
    "leaseTransitions",
    "expirationSeconds",
    "ready",
    "serving",
    "terminating",
    "allocateLoadBalancerNodePorts",
    "publishNotReadyAddresses",
    "setHostnameAsFQDN",
    "shareProcessNamespace",
    "hostUsers",
];

fn is_zero(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        _ => false,
    }
}

/// Protobuf field types as the generated table names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    String,
    Bytes,
    Int32,
    Int64,
    Bool,
    Message,
    /// `map<string, string>`.
    MapString,
    /// `map<string, bytes>` (base64 strings in JSON).
    MapBytes,
    /// `map<string, message>`.
    MapMessage,
}

/// One field of a message.
#[derive(Debug)]
pub(crate) struct Field {
    tag: u32,
    json: &'static str,
    kind: Kind,
    /// The message type for `Message` and `MapMessage`.
    message: &'static str,
    repeated: bool,
    /// Embedded inline in the parent's JSON (Go's `json:",inline"`).
    inline: bool,
}

fn messages() -> &'static HashMap<&'static str, HashMap<u32, &'static Field>> {
    static INDEX: OnceLock<HashMap<&'static str, HashMap<u32, &'static Field>>> = OnceLock::new();
    INDEX.get_or_init(|| {
        schema::MESSAGES
            .iter()
            .map(|(name, fields)| (*name, fields.iter().map(|f| (f.tag, f)).collect()))
            .collect()
    })
}

/// The options kinds every group version carries (Go's
/// `metav1.AddToGroupVersion`): a client deleting a Secret sends a `v1`
/// DeleteOptions, one deleting a Deployment an `apps/v1` one.
const META_OPTIONS: &[&str] = &[
    "DeleteOptions",
    "CreateOptions",
    "UpdateOptions",
    "PatchOptions",
    "GetOptions",
    "ListOptions",
];

/// The proto message name of an API kind.
fn message_for(api_version: &str, kind: &str) -> Option<String> {
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    if group == "meta.k8s.io" || META_OPTIONS.contains(&kind) {
        return Some(format!(
            "k8s.io.apimachinery.pkg.apis.meta.{version}.{kind}"
        ));
    }
    let package = match group {
        "" => "core",
        g => g.split('.').next().unwrap_or(g),
    };
    Some(format!("k8s.io.api.{package}.{version}.{kind}"))
}

#[derive(Debug, thiserror::Error)]
#[error("invalid protobuf body: {0}")]
pub struct ProtobufError(String);

fn err(msg: impl Into<String>) -> ProtobufError {
    ProtobufError(msg.into())
}

/// Decodes a Kubernetes protobuf body into its JSON form.
pub fn decode(body: &[u8]) -> Result<Value, ProtobufError> {
    let rest = body
        .strip_prefix(MAGIC)
        .ok_or_else(|| err("missing the k8s protobuf prefix"))?;
    let (mut api_version, mut kind, mut raw) = (String::new(), String::new(), &[][..]);
    for field in Reader(rest) {
        match field? {
            (1, Wire::Len(type_meta)) => {
                for f in Reader(type_meta) {
                    match f? {
                        (1, Wire::Len(v)) => api_version = utf8(v)?,
                        (2, Wire::Len(v)) => kind = utf8(v)?,
                        _ => {}
                    }
                }
            }
            (2, Wire::Len(v)) => raw = v,
            _ => {}
        }
    }
    let name = message_for(&api_version, &kind)
        .filter(|n| messages().contains_key(n.as_str()))
        .ok_or_else(|| {
            err(format!(
                "{api_version}/{kind} is not accepted as protobuf; send JSON"
            ))
        })?;
    let mut obj = message(&name, raw, 0)?;
    obj["apiVersion"] = json!(api_version);
    obj["kind"] = json!(kind);
    Ok(obj)
}

fn utf8(v: &[u8]) -> Result<String, ProtobufError> {
    String::from_utf8(v.to_vec()).map_err(|_| err("a string field is not UTF-8"))
}

/// One wire value.
enum Wire<'a> {
    Varint(u64),
    /// Skipped: no served field is a fixed-width number.
    Fixed64,
    Len(&'a [u8]),
    /// Skipped, as `Fixed64`.
    Fixed32,
}

/// Iterates the fields of one message.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64, ProtobufError> {
        let mut out = 0u64;
        for i in 0..10 {
            let (&b, rest) = self
                .0
                .split_first()
                .ok_or_else(|| err("truncated varint"))?;
            self.0 = rest;
            out |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(out);
            }
        }
        Err(err("varint too long"))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtobufError> {
        if n > self.0.len() {
            return Err(err("truncated field"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
}

impl<'a> Iterator for Reader<'a> {
    type Item = Result<(u32, Wire<'a>), ProtobufError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.0.is_empty() {
            return None;
        }
        let read = |r: &mut Self| -> Result<(u32, Wire<'a>), ProtobufError> {
            let key = r.varint()?;
            let tag = u32::try_from(key >> 3).map_err(|_| err("field number out of range"))?;
            let wire = match key & 7 {
                0 => Wire::Varint(r.varint()?),
                1 => {
                    r.take(8)?;
                    Wire::Fixed64
                }
                2 => {
                    let n = usize::try_from(r.varint()?).map_err(|_| err("length out of range"))?;
                    Wire::Len(r.take(n)?)
                }
                5 => {
                    r.take(4)?;
                    Wire::Fixed32
                }
                other => return Err(err(format!("unsupported wire type {other}"))),
            };
            Ok((tag, wire))
        };
        let item = read(self);
        if item.is_err() {
            self.0 = &[];
        }
        Some(item)
    }
}

/// Decodes message `name` from `raw` into its JSON form.
fn message(name: &str, raw: &[u8], depth: usize) -> Result<Value, ProtobufError> {
    if depth > MAX_DEPTH {
        return Err(err("message nesting too deep"));
    }
    if let Some(v) = special(name, raw)? {
        return Ok(v);
    }
    let fields = messages()
        .get(name)
        .ok_or_else(|| err(format!("no schema for {name}")))?;
    let mut out = Map::new();
    for item in Reader(raw) {
        let (tag, wire) = item?;
        // Unknown fields are skipped, as protobuf readers do.
        let Some(f) = fields.get(&tag) else { continue };
        let value = match (f.kind, wire) {
            (Kind::MapString | Kind::MapBytes | Kind::MapMessage, Wire::Len(entry)) => {
                let (k, v) = map_entry(f, entry, depth)?;
                let map = out.entry(f.json).or_insert_with(|| json!({}));
                if let Some(m) = map.as_object_mut() {
                    m.insert(k, v);
                }
                continue;
            }
            (Kind::Message, Wire::Len(v)) => message(f.message, v, depth + 1)?,
            (kind, Wire::Len(packed))
                if f.repeated && kind != Kind::String && kind != Kind::Bytes =>
            {
                // Packed repeated scalars.
                let list = out.entry(f.json).or_insert_with(|| json!([]));
                let mut r = Reader(packed);
                while !r.0.is_empty() {
                    let v = scalar(kind, Wire::Varint(r.varint()?))?;
                    if let Some(a) = list.as_array_mut() {
                        a.push(v);
                    }
                }
                continue;
            }
            (kind, wire) => scalar(kind, wire)?,
        };
        if value.is_null()
            || (!f.repeated && is_zero(&value) && !ZERO_IS_MEANINGFUL.contains(&f.json))
        {
            continue;
        }
        if f.inline {
            if let Value::Object(inner) = value {
                out.extend(inner);
            }
        } else if f.repeated {
            let list = out.entry(f.json).or_insert_with(|| json!([]));
            if let Some(a) = list.as_array_mut() {
                a.push(value);
            }
        } else {
            out.insert(f.json.to_owned(), value);
        }
    }
    Ok(Value::Object(out))
}

fn map_entry(f: &Field, entry: &[u8], depth: usize) -> Result<(String, Value), ProtobufError> {
    let (mut key, mut value) = (String::new(), Value::Null);
    for item in Reader(entry) {
        match item? {
            (1, Wire::Len(k)) => key = utf8(k)?,
            (2, Wire::Len(v)) => {
                value = match f.kind {
                    Kind::MapString => Value::String(utf8(v)?),
                    Kind::MapBytes => {
                        Value::String(base64::engine::general_purpose::STANDARD.encode(v))
                    }
                    _ => message(f.message, v, depth + 1)?,
                }
            }
            _ => {}
        }
    }
    if value.is_null() {
        value = match f.kind {
            Kind::MapMessage => message(f.message, &[], depth + 1)?,
            _ => Value::String(String::new()),
        };
    }
    Ok((key, value))
}

fn scalar(kind: Kind, wire: Wire<'_>) -> Result<Value, ProtobufError> {
    Ok(match (kind, wire) {
        (Kind::String, Wire::Len(v)) => Value::String(utf8(v)?),
        (Kind::Bytes, Wire::Len(v)) => {
            Value::String(base64::engine::general_purpose::STANDARD.encode(v))
        }
        (Kind::Bool, Wire::Varint(v)) => Value::Bool(v != 0),
        (Kind::Int32, Wire::Varint(v)) => json!(v as i64 as i32),
        (Kind::Int64, Wire::Varint(v)) => json!(v as i64),
        (kind, _) => return Err(err(format!("wire type does not match a {kind:?} field"))),
    })
}

/// Messages whose JSON form is a string, number or raw JSON.
fn special(name: &str, raw: &[u8]) -> Result<Option<Value>, ProtobufError> {
    let short = name.rsplit('.').next().unwrap_or(name);
    let pkg = name.strip_suffix(short).unwrap_or_default();
    let value = match (pkg, short) {
        ("k8s.io.apimachinery.pkg.apis.meta.v1.", "Time" | "MicroTime") => {
            let (mut secs, mut nanos) = (0i64, 0i64);
            for item in Reader(raw) {
                match item? {
                    (1, Wire::Varint(v)) => secs = v as i64,
                    (2, Wire::Varint(v)) => nanos = v as i64 as i32 as i64,
                    _ => {}
                }
            }
            if secs == 0 && nanos == 0 {
                // Go's zero time, which its JSON writes as null.
                return Ok(Some(Value::Null));
            }
            let t = DateTime::from_timestamp(secs, nanos as u32)
                .ok_or_else(|| err("time out of range"))?;
            let format = if short == "Time" {
                SecondsFormat::Secs
            } else {
                SecondsFormat::Micros
            };
            Value::String(t.to_rfc3339_opts(format, true))
        }
        ("k8s.io.apimachinery.pkg.api.resource.", "Quantity") => {
            let mut s = String::new();
            for item in Reader(raw) {
                if let (1, Wire::Len(v)) = item? {
                    s = utf8(v)?;
                }
            }
            Value::String(s)
        }
        ("k8s.io.apimachinery.pkg.util.intstr.", "IntOrString") => {
            let (mut ty, mut int, mut string) = (0u64, 0i64, String::new());
            for item in Reader(raw) {
                match item? {
                    (1, Wire::Varint(v)) => ty = v,
                    (2, Wire::Varint(v)) => int = v as i64 as i32 as i64,
                    (3, Wire::Len(v)) => string = utf8(v)?,
                    _ => {}
                }
            }
            if ty == 1 {
                Value::String(string)
            } else {
                json!(int)
            }
        }
        ("k8s.io.apimachinery.pkg.runtime.", "RawExtension")
        | ("k8s.io.apimachinery.pkg.apis.meta.v1.", "FieldsV1") => {
            let mut v = Value::Null;
            for item in Reader(raw) {
                if let (1, Wire::Len(bytes)) = item? {
                    v = serde_json::from_slice(bytes)
                        .map_err(|e| err(format!("embedded JSON: {e}")))?;
                }
            }
            v
        }
        ("k8s.io.apimachinery.pkg.apis.meta.v1.", "Duration") => {
            let mut nanos = 0i64;
            for item in Reader(raw) {
                if let (1, Wire::Varint(v)) = item? {
                    nanos = v as i64;
                }
            }
            Value::String(format!("{}s", nanos as f64 / 1e9))
        }
        _ => return Ok(None),
    };
    Ok(Some(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny protobuf writer for building test messages.
    #[derive(Default)]
    struct W(Vec<u8>);

    impl W {
        fn varint(&mut self, mut v: u64) -> &mut Self {
            loop {
                let b = (v & 0x7f) as u8;
                v >>= 7;
                if v == 0 {
                    self.0.push(b);
                    return self;
                }
                self.0.push(b | 0x80);
            }
        }
        fn int(&mut self, tag: u32, v: u64) -> &mut Self {
            self.varint(u64::from(tag) << 3).varint(v)
        }
        fn bytes(&mut self, tag: u32, v: &[u8]) -> &mut Self {
            self.varint((u64::from(tag) << 3) | 2)
                .varint(v.len() as u64);
            self.0.extend_from_slice(v);
            self
        }
        fn done(&mut self) -> Vec<u8> {
            std::mem::take(&mut self.0)
        }
    }

    fn envelope(api_version: &str, kind: &str, raw: &[u8]) -> Vec<u8> {
        let type_meta = W::default()
            .bytes(1, api_version.as_bytes())
            .bytes(2, kind.as_bytes())
            .done();
        let mut out = MAGIC.to_vec();
        out.extend(W::default().bytes(1, &type_meta).bytes(2, raw).done());
        out
    }

    #[test]
    fn decodes_a_deployment_with_maps_lists_inline_and_int_or_string() {
        let meta = W::default()
            .bytes(1, b"web")
            .bytes(11, &W::default().bytes(1, b"app").bytes(2, b"web").done())
            .done();
        let selector = W::default()
            .bytes(1, &W::default().bytes(1, b"app").bytes(2, b"web").done())
            .done();
        let port = W::default().int(3, 8080).done();
        let probe_handler = W::default()
            .bytes(
                2,
                &W::default()
                    .bytes(1, b"/healthz")
                    .bytes(2, &W::default().int(1, 1).bytes(3, b"http").done())
                    .done(),
            )
            .done();
        let probe = W::default().bytes(1, &probe_handler).int(2, 5).done();
        let container = W::default()
            .bytes(1, b"web")
            .bytes(2, b"nginx:1")
            .bytes(6, &port)
            .bytes(11, &probe)
            .done();
        let volume = W::default()
            .bytes(1, b"data")
            .bytes(2, &W::default().bytes(2, &[]).done())
            .done();
        let pod_spec = W::default().bytes(1, &volume).bytes(2, &container).done();
        let template = W::default()
            .bytes(
                1,
                &W::default()
                    .bytes(11, &W::default().bytes(1, b"app").bytes(2, b"web").done())
                    .done(),
            )
            .bytes(2, &pod_spec)
            .done();
        let spec = W::default()
            .int(1, 3)
            .bytes(2, &selector)
            .bytes(3, &template)
            .done();
        let raw = W::default().bytes(1, &meta).bytes(2, &spec).done();
        let obj = decode(&envelope("apps/v1", "Deployment", &raw)).unwrap();
        assert_eq!(obj["apiVersion"], "apps/v1");
        assert_eq!(
            obj["metadata"],
            json!({"name": "web", "labels": {"app": "web"}})
        );
        assert_eq!(obj["spec"]["replicas"], 3);
        assert_eq!(obj["spec"]["selector"]["matchLabels"]["app"], "web");
        let c = &obj["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["image"], "nginx:1");
        assert_eq!(c["ports"][0]["containerPort"], 8080);
        // ProbeHandler is inline in Probe; IntOrString type 1 is a string.
        assert_eq!(c["livenessProbe"], json!(null));
        assert_eq!(
            c["readinessProbe"]["httpGet"],
            json!({"path": "/healthz", "port": "http"})
        );
        assert_eq!(c["readinessProbe"]["initialDelaySeconds"], 5);
        // VolumeSource is inline in Volume.
        assert_eq!(
            obj["spec"]["template"]["spec"]["volumes"][0],
            json!({"name": "data", "emptyDir": {}})
        );
        // The result decodes as the typed Kubernetes object.
        let typed: k8s_openapi::api::apps::v1::Deployment = serde_json::from_value(obj).unwrap();
        assert_eq!(typed.spec.unwrap().replicas, Some(3));
    }

    #[test]
    fn zero_values_follow_go_json() {
        // Go writes non-pointer fields even when empty; replicas is a pointer.
        let zero_time = W::default().done();
        let meta = W::default().bytes(1, b"d").bytes(8, &zero_time).done();
        let strategy = W::default().bytes(1, b"").done();
        let spec = W::default().int(1, 0).bytes(4, &strategy).int(5, 0).done();
        let raw = W::default().bytes(1, &meta).bytes(2, &spec).done();
        let obj = decode(&envelope("apps/v1", "Deployment", &raw)).unwrap();
        assert_eq!(obj["metadata"], json!({"name": "d"}));
        assert_eq!(obj["spec"], json!({"replicas": 0, "strategy": {}}));
    }

    #[test]
    fn secrets_quantities_and_times() {
        let entry = W::default()
            .bytes(1, b"password")
            .bytes(2, b"hunter2")
            .done();
        let ts = W::default().int(1, 1_700_000_000).done();
        let meta = W::default().bytes(1, b"s").bytes(8, &ts).done();
        let raw = W::default()
            .bytes(1, &meta)
            .bytes(2, &entry)
            .bytes(3, b"Opaque")
            .done();
        let obj = decode(&envelope("v1", "Secret", &raw)).unwrap();
        assert_eq!(obj["data"]["password"], "aHVudGVyMg==");
        assert_eq!(obj["type"], "Opaque");
        assert_eq!(obj["metadata"]["creationTimestamp"], "2023-11-14T22:13:20Z");
    }

    #[test]
    fn delete_options_decode_in_any_group_version() {
        let preconditions = W::default().bytes(1, b"uid-1").done();
        let raw = W::default()
            .int(1, 0)
            .bytes(2, &preconditions)
            .bytes(4, b"Foreground")
            .done();
        for api_version in ["v1", "apps/v1", "meta.k8s.io/v1"] {
            let obj = decode(&envelope(api_version, "DeleteOptions", &raw)).unwrap();
            assert_eq!(obj["gracePeriodSeconds"], 0, "{api_version}");
            assert_eq!(obj["preconditions"]["uid"], "uid-1", "{api_version}");
            assert_eq!(obj["propagationPolicy"], "Foreground", "{api_version}");
        }
    }

    #[test]
    fn certificate_requests_and_v1_autoscalers_decode() {
        // kubectl certificate approve sends the request as protobuf: its
        // bytes come out base64, as JSON carries them.
        let meta = W::default().bytes(1, b"dave").done();
        let spec = W::default()
            .bytes(1, b"-----BEGIN CERTIFICATE REQUEST-----")
            .bytes(7, b"kubernetes.io/kube-apiserver-client")
            .int(8, 86400)
            .bytes(5, b"client auth")
            .done();
        let raw = W::default().bytes(1, &meta).bytes(2, &spec).done();
        let obj = decode(&envelope(
            "certificates.k8s.io/v1",
            "CertificateSigningRequest",
            &raw,
        ))
        .unwrap();
        let csr: k8s_openapi::api::certificates::v1::CertificateSigningRequest =
            serde_json::from_value(obj).unwrap();
        assert_eq!(csr.spec.request.0, b"-----BEGIN CERTIFICATE REQUEST-----");
        assert_eq!(csr.spec.signer_name, "kubernetes.io/kube-apiserver-client");
        assert_eq!(csr.spec.expiration_seconds, Some(86400));
        assert_eq!(csr.spec.usages, Some(vec!["client auth".to_owned()]));

        let target = W::default()
            .bytes(1, b"Deployment")
            .bytes(2, b"web")
            .bytes(3, b"apps/v1")
            .done();
        let spec = W::default()
            .bytes(1, &target)
            .int(2, 1)
            .int(3, 10)
            .int(4, 50)
            .done();
        let raw = W::default().bytes(1, &meta).bytes(2, &spec).done();
        let obj = decode(&envelope("autoscaling/v1", "HorizontalPodAutoscaler", &raw)).unwrap();
        let hpa: k8s_openapi::api::autoscaling::v1::HorizontalPodAutoscaler =
            serde_json::from_value(obj).unwrap();
        let spec = hpa.spec.unwrap();
        assert_eq!(
            (
                spec.min_replicas,
                spec.max_replicas,
                spec.target_cpu_utilization_percentage
            ),
            (Some(1), 10, Some(50))
        );
        assert_eq!(spec.scale_target_ref.name, "web");
    }

    #[test]
    fn ingresses_decode() {
        let meta = W::default().bytes(1, b"web").done();
        let backend = W::default()
            .bytes(
                4,
                &W::default()
                    .bytes(1, b"web")
                    .bytes(2, &W::default().int(2, 80).done())
                    .done(),
            )
            .done();
        let path = W::default()
            .bytes(1, b"/")
            .bytes(2, &backend)
            .bytes(3, b"Prefix")
            .done();
        let rule = W::default()
            .bytes(1, b"a.example")
            .bytes(
                2,
                &W::default()
                    .bytes(1, &W::default().bytes(1, &path).done())
                    .done(),
            )
            .done();
        let spec = W::default().bytes(3, &rule).bytes(4, b"wasmkube").done();
        let raw = W::default().bytes(1, &meta).bytes(2, &spec).done();
        let obj = decode(&envelope("networking.k8s.io/v1", "Ingress", &raw)).unwrap();
        let typed: k8s_openapi::api::networking::v1::Ingress = serde_json::from_value(obj).unwrap();
        let spec = typed.spec.unwrap();
        assert_eq!(spec.ingress_class_name.as_deref(), Some("wasmkube"));
        let rule = &spec.rules.unwrap()[0];
        assert_eq!(rule.host.as_deref(), Some("a.example"));
        let path = &rule.http.as_ref().unwrap().paths[0];
        assert_eq!(path.path_type, "Prefix");
        let service = path.backend.service.as_ref().unwrap();
        assert_eq!(service.port.as_ref().unwrap().number, Some(80));
    }

    #[test]
    fn webhook_configurations_decode() {
        let meta = W::default().bytes(1, b"policy").done();
        let client = W::default()
            .bytes(3, b"https://hook.example/validate")
            .done();
        let webhook = W::default()
            .bytes(1, b"pods.policy.example.com")
            .bytes(2, &client)
            .bytes(6, b"None")
            .int(7, 5)
            .bytes(8, b"v1")
            .done();
        let raw = W::default().bytes(1, &meta).bytes(2, &webhook).done();
        let obj = decode(&envelope(
            "admissionregistration.k8s.io/v1",
            "ValidatingWebhookConfiguration",
            &raw,
        ))
        .unwrap();
        let typed: k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration =
            serde_json::from_value(obj).unwrap();
        let webhook = &typed.webhooks.unwrap()[0];
        assert_eq!(webhook.name, "pods.policy.example.com");
        assert_eq!(
            webhook.client_config.url.as_deref(),
            Some("https://hook.example/validate")
        );
        assert_eq!(
            (webhook.side_effects.as_str(), webhook.timeout_seconds),
            ("None", Some(5))
        );
        assert_eq!(webhook.admission_review_versions, ["v1"]);
    }

    #[test]
    fn hostile_bodies_are_errors_not_panics() {
        let cases: Vec<Vec<u8>> = vec![
            b"not protobuf".to_vec(),
            MAGIC.to_vec(),
            envelope("v1", "Widget", &[]),
            envelope("v1", "Pod", &[0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f]),
            envelope("v1", "Pod", &[0xff; 11]),
            envelope("v1", "Pod", &[0x0b]),
        ];
        for body in cases {
            assert!(decode(&body).is_err(), "{body:?}");
        }
        // Deep nesting is refused, not a stack overflow.
        let mut nested = W::default().bytes(1, b"x").done();
        for _ in 0..200 {
            nested = W::default().bytes(2, &nested).done();
        }
        let _ = decode(&envelope("v1", "Pod", &nested));
    }
}
