//! The audit log, as kube-apiserver's: an `audit.k8s.io/v1` Policy decides
//! per request a level (`None`, `Metadata`, `Request`, `RequestResponse`,
//! the first matching rule's), and every audited request becomes one JSON
//! line (`audit.k8s.io/v1` Event, stage `ResponseComplete`) in the log file,
//! which is rotated by size. Refused requests are audited too, with the
//! authorization decision.
//!
//! Request bodies are kept for `Request` and above; response bodies for
//! `RequestResponse` (not for watches, whose responses do not complete).

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

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Rule {
    level: Level,
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
struct PolicyFile {
    kind: String,
    #[serde(default)]
    rules: Vec<Rule>,
}

/// A policy or log that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("audit: {0}")]
pub struct AuditError(String);

/// An audit policy.
pub struct Policy {
    rules: Vec<Rule>,
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
        Ok(Self { rules: file.rules })
    }

    /// The level of the first rule `attrs` matches (`None` when none does).
    pub fn level(&self, attrs: &Attributes) -> Level {
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
            return rule.level;
        }
        Level::None
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

/// Auditing as a server runs it.
#[derive(Debug)]
pub struct Audit {
    pub policy: Policy,
    pub log: Log,
}

/// One request's record, filled as it is served.
pub(crate) struct Record<'a> {
    pub attrs: &'a Attributes,
    pub level: Level,
    pub uri: String,
    pub user_agent: String,
    pub source: Option<std::net::IpAddr>,
    pub received: chrono::DateTime<chrono::Utc>,
}

impl Audit {
    /// Writes the event of a completed request.
    pub(crate) fn complete(
        &self,
        record: &Record<'_>,
        code: u16,
        allowed: bool,
        request: Option<Value>,
        response: Option<&[u8]>,
        annotations: &[(String, String)],
    ) {
        let a = record.attrs;
        let mut event = json!({
            "kind": "Event", "apiVersion": "audit.k8s.io/v1",
            "level": record.level.name(),
            "auditID": uuid::Uuid::new_v4().to_string(),
            "stage": "ResponseComplete",
            "requestURI": record.uri,
            "verb": a.verb,
            "user": {"username": a.user.name, "groups": a.user.groups},
            "sourceIPs": record.source.map(|ip| vec![ip.to_string()]).unwrap_or_default(),
            "userAgent": record.user_agent,
            "responseStatus": {"metadata": {}, "code": code},
            "requestReceivedTimestamp": record.received.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            "stageTimestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            "annotations": {"authorization.k8s.io/decision": if allowed { "allow" } else { "forbid" }},
        });
        for (k, v) in annotations {
            event["annotations"][k] = json!(v);
        }
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
        let parse = |bytes: &[u8]| serde_json::from_slice::<Value>(bytes).ok();
        if record.level >= Level::Request
            && let Some(body) = request
        {
            event["requestObject"] = body;
        }
        if record.level >= Level::RequestResponse
            && let Some(body) = response.and_then(parse)
        {
            event["responseObject"] = body;
        }
        self.log.write(&event);
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
