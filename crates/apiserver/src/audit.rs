//! Auditing, as kube-apiserver's: an `audit.k8s.io/v1` Policy decides per
//! request a level (`None`, `Metadata`, `Request`, `RequestResponse`, the
//! first matching rule's) and the stages left out (`omitStages`, the
//! policy's and the rule's). Every audited request becomes an
//! `audit.k8s.io/v1` Event per stage, all with one `auditID`:
//! `RequestReceived` as soon as it is authenticated, `ResponseStarted` when
//! a long-running request (a watch, logs, exec, attach, port-forward) has
//! sent its response head, and `ResponseComplete` when the response is done
//! (for a long-running one, when its stream ends). Refused requests are
//! audited too, with the authorization decision.
//!
//! Events go to the log file, one JSON line each, rotated by size, and to
//! a webhook when one is configured (`--audit-webhook-config-file`, a
//! kubeconfig naming the receiver, as kube-apiserver's): batched as
//! `EventList`s, sent in the background, retried, dropped (and counted in
//! a warning) when the receiver falls too far behind.
//!
//! Request bodies are kept for `Request` and above; response bodies for
//! `RequestResponse` (not for long-running requests).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Deserialize;
use serde_json::{Value, json};

use crate::auth::Attributes;

/// How much of a request an event keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
pub enum Level {
    None,
    Metadata,
    Request,
    RequestResponse,
}

impl Level {
    fn name(self) -> &'static str {
        match self {
            Level::None => "None",
            Level::Metadata => "Metadata",
            Level::Request => "Request",
            Level::RequestResponse => "RequestResponse",
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GroupResources {
    #[serde(default)]
    group: String,
    #[serde(default)]
    resources: Vec<String>,
    #[serde(default)]
    resource_names: Vec<String>,
}

/// The stages of a request's audit events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum Stage {
    RequestReceived,
    ResponseStarted,
    ResponseComplete,
    Panic,
}

impl Stage {
    fn name(self) -> &'static str {
        match self {
            Stage::RequestReceived => "RequestReceived",
            Stage::ResponseStarted => "ResponseStarted",
            Stage::ResponseComplete => "ResponseComplete",
            Stage::Panic => "Panic",
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Rule {
    level: Level,
    #[serde(default)]
    omit_stages: Vec<Stage>,
    #[serde(default)]
    users: Vec<String>,
    #[serde(default)]
    user_groups: Vec<String>,
    #[serde(default)]
    verbs: Vec<String>,
    #[serde(default)]
    resources: Vec<GroupResources>,
    #[serde(default)]
    namespaces: Vec<String>,
    #[serde(default, rename = "nonResourceURLs")]
    non_resource_urls: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PolicyFile {
    kind: String,
    #[serde(default)]
    rules: Vec<Rule>,
    #[serde(default)]
    omit_stages: Vec<Stage>,
}

/// A policy or log that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("audit: {0}")]
pub struct AuditError(String);

/// An audit policy.
pub struct Policy {
    rules: Vec<Rule>,
    omit_stages: Vec<Stage>,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Policy({} rules)", self.rules.len())
    }
}

impl Policy {
    pub fn read(path: &Path) -> Result<Self, AuditError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| AuditError(format!("cannot read {}: {e}", path.display())))?;
        Self::parse(&text).map_err(|e| AuditError(format!("{}: {}", path.display(), e.0)))
    }

    pub fn parse(text: &str) -> Result<Self, AuditError> {
        let file: PolicyFile = serde_yaml::from_str(text).map_err(|e| AuditError(e.to_string()))?;
        if file.kind != "Policy" {
            return Err(AuditError(format!(
                "kind: want Policy, got {:?}",
                file.kind
            )));
        }
        Ok(Self {
            rules: file.rules,
            omit_stages: file.omit_stages,
        })
    }

    /// The level of the first rule `attrs` matches (`None` when none does).
    pub fn level(&self, attrs: &Attributes) -> Level {
        self.decide(attrs).0
    }

    /// The level of the first rule `attrs` matches and the stages left
    /// out (the policy's and that rule's).
    pub fn decide(&self, attrs: &Attributes) -> (Level, Vec<Stage>) {
        match self.rule(attrs) {
            Some(rule) => {
                let mut omit = self.omit_stages.clone();
                omit.extend(rule.omit_stages.iter().copied());
                (rule.level, omit)
            }
            None => (Level::None, Vec::new()),
        }
    }

    fn rule(&self, attrs: &Attributes) -> Option<&Rule> {
        let any = |list: &[String], want: &str| {
            list.is_empty() || list.iter().any(|x| x == "*" || x == want)
        };
        for rule in &self.rules {
            if !any(&rule.users, &attrs.user.name) {
                continue;
            }
            if !rule.user_groups.is_empty()
                && !attrs
                    .user
                    .groups
                    .iter()
                    .any(|g| rule.user_groups.contains(g))
            {
                continue;
            }
            if !any(&rule.verbs, &attrs.verb) {
                continue;
            }
            match &attrs.resource {
                Some(r) => {
                    if !rule.non_resource_urls.is_empty() {
                        continue;
                    }
                    if !rule.namespaces.is_empty()
                        && !rule
                            .namespaces
                            .contains(&r.namespace.clone().unwrap_or_default())
                    {
                        continue;
                    }
                    let resource = match &r.subresource {
                        Some(sub) => format!("{}/{sub}", r.resource),
                        None => r.resource.clone(),
                    };
                    let matches = rule.resources.is_empty()
                        || rule.resources.iter().any(|g| {
                            g.group == r.group
                                && (g.resources.is_empty()
                                    || g.resources.iter().any(|x| {
                                        x == "*"
                                            || *x == resource
                                            || *x == r.resource && r.subresource.is_none()
                                    }))
                                && (g.resource_names.is_empty()
                                    || r.name
                                        .as_ref()
                                        .is_some_and(|n| g.resource_names.contains(n)))
                        });
                    if !matches {
                        continue;
                    }
                }
                None => {
                    if !rule.resources.is_empty() || !rule.namespaces.is_empty() {
                        continue;
                    }
                    if !rule.non_resource_urls.is_empty()
                        && !rule.non_resource_urls.iter().any(|u| {
                            *u == attrs.path
                                || u.strip_suffix('*')
                                    .is_some_and(|p| attrs.path.starts_with(p))
                        })
                    {
                        continue;
                    }
                }
            }
            return Some(rule);
        }
        None
    }
}

/// The log file, rotated by size.
pub struct Log {
    path: PathBuf,
    max_bytes: u64,
    backups: usize,
    file: Mutex<std::fs::File>,
}

impl std::fmt::Debug for Log {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Log({})", self.path.display())
    }
}

impl Log {
    /// Appends to `path`; past `max_bytes` it moves to `path.1` (older ones
    /// to `.2`, ... up to `backups`) and starts again.
    pub fn open(path: &Path, max_bytes: u64, backups: usize) -> Result<Self, AuditError> {
        let file = Self::append(path)?;
        Ok(Self {
            path: path.to_owned(),
            max_bytes,
            backups,
            file: Mutex::new(file),
        })
    }

    fn append(path: &Path) -> Result<std::fs::File, AuditError> {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| AuditError(format!("cannot open {}: {e}", path.display())))
    }

    fn write(&self, event: &Value) {
        let mut line = serde_json::to_vec(event).unwrap_or_default();
        line.push(b'\n');
        let mut file = self.file.lock().expect("not poisoned");
        let full = file
            .metadata()
            .map(|m| m.len() + line.len() as u64 > self.max_bytes);
        if self.max_bytes > 0 && full.unwrap_or(false) {
            for i in (1..self.backups.max(1)).rev() {
                let _ = std::fs::rename(
                    format!("{}.{i}", self.path.display()),
                    format!("{}.{}", self.path.display(), i + 1),
                );
            }
            let _ = std::fs::rename(&self.path, format!("{}.1", self.path.display()));
            match Self::append(&self.path) {
                Ok(f) => *file = f,
                Err(e) => tracing::error!(error = %e, "cannot rotate the audit log"),
            }
        }
        if let Err(e) = file.write_all(&line) {
            tracing::error!(error = %e, "cannot write the audit log");
        }
    }
}

tokio::task_local! {
    /// The annotations admission adds to the audit event of the request
    /// being served (Pod Security's audit mode).
    static ANNOTATIONS: Annotations;
}

/// Annotations gathered while a request is served.
pub(crate) type Annotations = std::sync::Arc<Mutex<Vec<(String, String)>>>;

/// Serves `f` with a place for audit annotations, returned with its output.
pub(crate) async fn gathering<T>(
    f: impl std::future::Future<Output = T>,
) -> (T, Vec<(String, String)>) {
    let annotations = Annotations::default();
    let out = ANNOTATIONS.scope(annotations.clone(), f).await;
    let gathered = std::mem::take(&mut *annotations.lock().expect("not poisoned"));
    (out, gathered)
}

/// Adds an annotation to the audit event of the request being served (if
/// it is audited).
pub(crate) fn annotate(key: &str, value: String) {
    let _ = ANNOTATIONS.try_with(|a| {
        a.lock()
            .expect("not poisoned")
            .push((key.to_owned(), value))
    });
}

/// Auditing as a server runs it: the policy and where events go.
#[derive(Debug)]
pub struct Audit {
    pub policy: Policy,
    pub log: Option<Log>,
    pub webhook: Option<Webhook>,
}

/// One request's record, filled as it is served.
pub(crate) struct Record {
    pub attrs: Attributes,
    pub level: Level,
    pub omit: Vec<Stage>,
    pub id: String,
    pub uri: String,
    pub user_agent: String,
    pub source: Option<std::net::IpAddr>,
    pub received: chrono::DateTime<chrono::Utc>,
}

/// What a stage's event says of the response.
pub(crate) struct Outcome<'a> {
    pub code: u16,
    pub allowed: bool,
    pub request: Option<Value>,
    pub response: Option<&'a [u8]>,
    pub annotations: &'a [(String, String)],
}

impl Audit {
    /// The record of a request, when the policy audits it.
    pub(crate) fn record(
        &self,
        attrs: &Attributes,
        uri: String,
        user_agent: String,
        source: Option<std::net::IpAddr>,
    ) -> Option<Record> {
        let (level, omit) = self.policy.decide(attrs);
        (level != Level::None).then(|| Record {
            attrs: attrs.clone(),
            level,
            omit,
            id: uuid::Uuid::new_v4().to_string(),
            uri,
            user_agent,
            source,
            received: chrono::Utc::now(),
        })
    }

    /// The request was authenticated: `RequestReceived`.
    pub(crate) fn received(&self, record: &Record) {
        self.emit(record, Stage::RequestReceived, None);
    }

    /// A long-running request sent its response head: `ResponseStarted`.
    pub(crate) fn started(&self, record: &Record, code: u16) {
        let outcome = Outcome {
            code,
            allowed: true,
            request: None,
            response: None,
            annotations: &[],
        };
        self.emit(record, Stage::ResponseStarted, Some(outcome));
    }

    /// The response is done: `ResponseComplete`.
    pub(crate) fn complete(&self, record: &Record, outcome: Outcome<'_>) {
        self.emit(record, Stage::ResponseComplete, Some(outcome));
    }

    fn emit(&self, record: &Record, stage: Stage, outcome: Option<Outcome<'_>>) {
        if record.omit.contains(&stage) {
            return;
        }
        let a = &record.attrs;
        let mut event = json!({
            "kind": "Event", "apiVersion": "audit.k8s.io/v1",
            "level": record.level.name(),
            "auditID": record.id,
            "stage": stage.name(),
            "requestURI": record.uri,
            "verb": a.verb,
            "user": {"username": a.user.name, "groups": a.user.groups},
            "sourceIPs": record.source.map(|ip| vec![ip.to_string()]).unwrap_or_default(),
            "userAgent": record.user_agent,
            "requestReceivedTimestamp": record.received.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            "stageTimestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        });
        if !a.user.uid.is_empty() {
            event["user"]["uid"] = json!(a.user.uid);
        }
        if let Some(r) = &a.resource {
            let mut object = json!({"resource": r.resource, "apiGroup": r.group});
            for (k, v) in [
                ("namespace", &r.namespace),
                ("name", &r.name),
                ("subresource", &r.subresource),
            ] {
                if let Some(v) = v {
                    object[k] = json!(v);
                }
            }
            event["objectRef"] = object;
        }
        if let Some(o) = outcome {
            event["responseStatus"] = json!({"metadata": {}, "code": o.code});
            event["annotations"] = json!({
                "authorization.k8s.io/decision": if o.allowed { "allow" } else { "forbid" },
            });
            for (k, v) in o.annotations {
                event["annotations"][k] = json!(v);
            }
            let parse = |bytes: &[u8]| serde_json::from_slice::<Value>(bytes).ok();
            if record.level >= Level::Request
                && let Some(body) = o.request
            {
                event["requestObject"] = body;
            }
            if record.level >= Level::RequestResponse
                && let Some(body) = o.response.and_then(parse)
            {
                event["responseObject"] = body;
            }
        }
        if let Some(log) = &self.log {
            log.write(&event);
        }
        if let Some(webhook) = &self.webhook {
            webhook.send(event);
        }
    }
}

/// The audit webhook: events batched to a receiver named by a kubeconfig.
pub struct Webhook {
    events: tokio::sync::mpsc::Sender<Value>,
    dropped: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Webhook")
    }
}

/// Events waiting for the webhook beyond which new ones are dropped
/// (kube-apiserver's `--audit-webhook-batch-buffer-size`).
const WEBHOOK_BUFFER: usize = 10_000;
/// Sends of a batch before it is given up.
const WEBHOOK_ATTEMPTS: u32 = 3;

/// Where the webhook sends, from its kubeconfig.
struct Receiver {
    endpoint: crate::webhook::Endpoint,
}

/// How long a batch may take to send.
const WEBHOOK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

impl Webhook {
    /// Starts sending to the receiver the kubeconfig at `config` names
    /// (its first cluster's `server`, `certificate-authority-data` or
    /// `certificate-authority`, and its first user's client certificate or
    /// `token`), in batches of at most `max_batch` events, each sent at
    /// most `max_wait` after its first event. Must be called inside a
    /// Tokio runtime.
    pub fn start(
        config: &Path,
        max_batch: usize,
        max_wait: std::time::Duration,
    ) -> Result<Self, AuditError> {
        let receiver = Receiver::read(config)?;
        let (events, mut rx) = tokio::sync::mpsc::channel::<Value>(WEBHOOK_BUFFER);
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                let deadline = tokio::time::Instant::now() + max_wait;
                while batch.len() < max_batch.max(1) {
                    tokio::select! {
                        next = rx.recv() => match next {
                            Some(e) => batch.push(e),
                            None => break,
                        },
                        _ = tokio::time::sleep_until(deadline) => break,
                    }
                }
                receiver.deliver(batch).await;
            }
        });
        Ok(Self {
            events,
            dropped: Default::default(),
        })
    }

    fn send(&self, event: Value) {
        if self.events.try_send(event).is_err() {
            let dropped = self
                .dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if dropped.is_power_of_two() {
                tracing::warn!(
                    dropped = dropped + 1,
                    "the audit webhook is behind: events dropped"
                );
            }
        }
    }
}

impl Receiver {
    fn read(path: &Path) -> Result<Self, AuditError> {
        use base64::Engine;
        let fail = |why: String| AuditError(format!("{}: {why}", path.display()));
        let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
        let config: serde_yaml::Value =
            serde_yaml::from_str(&text).map_err(|e| fail(e.to_string()))?;
        let cluster = &config["clusters"][0]["cluster"];
        let user = &config["users"][0]["user"];
        let server = cluster["server"]
            .as_str()
            .ok_or_else(|| fail("clusters[0].cluster.server: Required value".into()))?;
        let uri: axum::http::Uri = server
            .parse()
            .map_err(|e| fail(format!("server {server:?}: {e}")))?;
        let decode = |field: &serde_yaml::Value,
                      file: &serde_yaml::Value|
         -> Result<Option<String>, AuditError> {
            if let Some(data) = field.as_str() {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(data.trim())
                    .map_err(|e| fail(e.to_string()))?;
                return Ok(Some(String::from_utf8_lossy(&bytes).into_owned()));
            }
            match file.as_str() {
                Some(f) => std::fs::read_to_string(f)
                    .map(Some)
                    .map_err(|e| fail(format!("{f}: {e}"))),
                None => Ok(None),
            }
        };
        let tls = match uri.scheme_str() {
            Some("https") => {
                let ca = decode(
                    &cluster["certificate-authority-data"],
                    &cluster["certificate-authority"],
                )?
                .ok_or_else(|| fail("an https receiver needs its certificate-authority".into()))?;
                let client = match (
                    decode(
                        &user["client-certificate-data"],
                        &user["client-certificate"],
                    )?,
                    decode(&user["client-key-data"], &user["client-key"])?,
                ) {
                    (Some(cert_pem), Some(key_pem)) => {
                        Some(wasmkube_pki::Issued { cert_pem, key_pem })
                    }
                    _ => None,
                };
                Some(
                    wasmkube_pki::client_tls(&ca, client.as_ref())
                        .map_err(|e| fail(e.to_string()))?,
                )
            }
            Some("http") => None,
            other => return Err(fail(format!("server scheme {other:?}: want http or https"))),
        };
        let mut endpoint = crate::webhook::Endpoint::from_uri(&uri, tls)
            .map_err(|e| fail(format!("server {server:?}: {e}")))?;
        endpoint.token = user["token"].as_str().map(str::to_owned);
        Ok(Self { endpoint })
    }

    /// Sends `batch` as one EventList, trying again after a pause when the
    /// receiver fails or cannot be reached.
    async fn deliver(&self, batch: Vec<Value>) {
        let body = json!({
            "kind": "EventList", "apiVersion": "audit.k8s.io/v1",
            "metadata": {}, "items": batch,
        })
        .to_string();
        for attempt in 1..=WEBHOOK_ATTEMPTS {
            match self.post(body.clone()).await {
                Ok(()) => return,
                Err(e) if attempt == WEBHOOK_ATTEMPTS => {
                    tracing::error!(error = %e, events = batch.len(), "audit events lost: the webhook failed");
                }
                Err(e) => {
                    tracing::warn!(error = %e, attempt, "the audit webhook failed; trying again");
                    tokio::time::sleep(std::time::Duration::from_millis(500 << attempt)).await;
                }
            }
        }
    }

    async fn post(&self, body: String) -> Result<(), String> {
        let (status, _) = self
            .endpoint
            .post_json(bytes::Bytes::from(body), WEBHOOK_TIMEOUT)
            .await?;
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("the receiver answered {status}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{ResourceAttributes, UserInfo};

    #[test]
    fn the_first_matching_rule_decides() {
        let policy = Policy::parse(
            "apiVersion: audit.k8s.io/v1\nkind: Policy\nrules:\n- level: None\n  resources: [{group: coordination.k8s.io, resources: [leases]}]\n- level: Metadata\n  resources: [{group: \"\", resources: [secrets]}]\n- level: RequestResponse\n  namespaces: [a]\n- level: Metadata\n",
        )
        .unwrap();
        let at = |group: &str, resource: &str, ns: &str| Attributes {
            user: UserInfo::default(),
            verb: "create".into(),
            path: String::new(),
            resource: Some(ResourceAttributes {
                group: group.into(),
                resource: resource.into(),
                subresource: None,
                namespace: Some(ns.into()),
                name: None,
                ..Default::default()
            }),
        };
        assert_eq!(
            policy.level(&at("coordination.k8s.io", "leases", "a")),
            Level::None
        );
        assert_eq!(policy.level(&at("", "secrets", "a")), Level::Metadata);
        assert_eq!(
            policy.level(&at("", "configmaps", "a")),
            Level::RequestResponse
        );
        assert_eq!(policy.level(&at("", "configmaps", "b")), Level::Metadata);
        assert!(Policy::parse("kind: Other\n").is_err());
    }
}
