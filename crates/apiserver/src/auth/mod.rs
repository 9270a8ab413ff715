//! Who is asking, and may they: authentication (x509 client certificates;
//! bearer tokens: the join token's secret, service-account tokens, a static
//! token file; else anonymous), impersonation, and authorization by RBAC,
//! run on every request before it is served, and the audit record of it.
//!
//! Authentication and authorization are on when the server is configured
//! with an [`Authentication`] (`wasmkube server` is, unless
//! `--insecure-http`); a server
//! without one (the library's default, used by in-process tests) allows
//! everything, as kube-apiserver's `AlwaysAllow` mode does.
//!
//! A request that carries no credentials is `system:anonymous` (group
//! `system:unauthenticated`): it may do what RBAC grants that user or group
//! (by default: read `/healthz`, `/livez`, `/readyz`, `/version` and
//! `/cacerts`), and
//! gets 401 for anything else, so a client learns to authenticate rather
//! than that it is forbidden. An authenticated user who is refused gets 403
//! with Kubernetes' message.

pub(crate) mod bootstrap;
pub(crate) mod csr;
pub(crate) mod escalation;
pub(crate) mod image_registry;
pub(crate) mod node;
pub(crate) mod rbac;
pub(crate) mod review;
pub(crate) mod token;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use wasmkube_api::selectors::{FieldSelector, LabelSelector};

use crate::ApiServer;
use crate::error::{ApiError, Subject};

/// The group every authenticated user is in.
pub const AUTHENTICATED: &str = "system:authenticated";
/// The group of requests without credentials.
pub const UNAUTHENTICATED: &str = "system:unauthenticated";
/// The group whose members may do anything.
pub const MASTERS: &str = "system:masters";
pub const ANONYMOUS: &str = "system:anonymous";

/// An authenticated user, as Kubernetes' `UserInfo`.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct UserInfo {
    pub name: String,
    pub uid: String,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

impl UserInfo {
    fn anonymous() -> Self {
        Self {
            name: ANONYMOUS.into(),
            groups: vec![UNAUTHENTICATED.into()],
            ..Default::default()
        }
    }

    fn authenticated(name: &str, uid: &str, groups: &[String]) -> Self {
        let mut groups = groups.to_vec();
        if !groups.iter().any(|g| g == AUTHENTICATED) {
            groups.push(AUTHENTICATED.into());
        }
        Self {
            name: name.into(),
            uid: uid.into(),
            groups,
            extra: BTreeMap::new(),
        }
    }

    pub fn is_anonymous(&self) -> bool {
        self.name == ANONYMOUS
    }
}

/// How the server authenticates requests.
#[derive(Clone, Debug, Default)]
pub struct Authentication {
    /// Bearer tokens of a static token file, by token.
    pub tokens: HashMap<String, UserInfo>,
    /// The secret of the cluster's join token: a bearer token that proves
    /// a joining node (`system:bootstrap:node`, group
    /// `system:bootstrappers`), which may only ask for its certificate.
    pub join_secret: Option<String>,
}

/// A static token file that cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("{path}:{line}: {message}")]
pub struct TokenFileError {
    pub path: String,
    pub line: usize,
    pub message: String,
}

impl Authentication {
    /// Reads Kubernetes' `--token-auth-file` format: one CSV line per
    /// token, `token,user,uid[,"group1,group2"]`.
    pub fn read_token_file(path: &Path) -> Result<Self, TokenFileError> {
        let error = |line: usize, message: String| TokenFileError {
            path: path.display().to_string(),
            line,
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| error(0, e.to_string()))?;
        let mut tokens = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let fields = split_csv(line);
            if fields.len() < 3 || fields[..3].iter().any(String::is_empty) {
                return Err(error(
                    i + 1,
                    "want token,user,uid[,\"group1,group2\"]".into(),
                ));
            }
            let groups: Vec<String> = fields
                .get(3)
                .map(|g| {
                    g.split(',')
                        .map(str::trim)
                        .filter(|g| !g.is_empty())
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default();
            tokens.insert(
                fields[0].clone(),
                UserInfo::authenticated(&fields[1], &fields[2], &groups),
            );
        }
        Ok(Self {
            tokens,
            join_secret: None,
        })
    }
}

/// Compares secrets in time independent of where they differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Splits one CSV line (fields may be double-quoted).
fn split_csv(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => fields.push(String::new()),
            c => fields.last_mut().expect("never empty").push(c),
        }
    }
    fields.into_iter().map(|f| f.trim().to_owned()).collect()
}

/// The identity a TLS connection's client certificate proved, set on each
/// request of the connection by the TLS server.
#[derive(Clone, Debug, Default)]
pub struct Peer(pub Option<wasmkube_pki::Identity>);

/// What a request asks to do, as Kubernetes' authorizer attributes.
#[derive(Clone, Debug, Default)]
pub struct Attributes {
    pub user: UserInfo,
    pub verb: String,
    /// The request path (what non-resource rules match).
    pub path: String,
    /// `None` for a non-resource request.
    pub resource: Option<ResourceAttributes>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResourceAttributes {
    pub group: String,
    pub resource: String,
    pub subresource: Option<String>,
    pub namespace: Option<String>,
    pub name: Option<String>,
    /// The `fieldSelector` of a list or watch.
    pub field_selector: Option<String>,
    /// The `labelSelector` of a list or watch.
    pub label_selector: Option<String>,
}

impl ResourceAttributes {
    /// The value the field selector requires `field` to equal, if any.
    pub fn field(&self, field: &str) -> Option<String> {
        let selector = FieldSelector::parse_any(self.field_selector.as_deref()?).ok()?;
        selector.exact(field).map(str::to_owned)
    }

    /// The value the label selector requires of label `key`, if one.
    pub fn label(&self, key: &str) -> Option<String> {
        let selector = LabelSelector::parse(self.label_selector.as_deref()?).ok()?;
        selector.exact(key).map(str::to_owned)
    }

    /// Whether the label selector selects only objects with label `key`.
    pub fn has_label(&self, key: &str) -> bool {
        self.label_selector
            .as_deref()
            .and_then(|s| LabelSelector::parse(s).ok())
            .is_some_and(|s| s.requires(key))
    }
}

/// Subresources of a namespace itself (`/api/v1/namespaces/NS/status`).
const NAMESPACE_SUBRESOURCES: &[&str] = &["status", "finalize"];

impl Attributes {
    /// Reads a request's attributes from its method, path and query, the
    /// way Kubernetes' request-info resolver does (by the path's shape,
    /// whatever is served there).
    pub fn of(user: UserInfo, method: &Method, path: &str, query: Option<&str>) -> Self {
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (group, rest) = match parts.as_slice() {
            ["api", _version, rest @ ..] if !rest.is_empty() => ("", rest),
            ["apis", group, _version, rest @ ..] if !rest.is_empty() => (*group, rest),
            _ => {
                let verb = method.as_str().to_ascii_lowercase();
                return Self {
                    user,
                    verb: if verb == "head" { "get".into() } else { verb },
                    path: path.into(),
                    resource: None,
                };
            }
        };
        let mut rest = rest;
        let mut namespace = None;
        if rest.first() == Some(&"namespaces") && rest.len() >= 2 {
            namespace = Some(rest[1].to_owned());
            if rest.len() > 2 && !NAMESPACE_SUBRESOURCES.contains(&rest[2]) {
                rest = &rest[2..];
            }
        }
        let resource = rest[0].to_owned();
        let mut name = rest.get(1).map(|s| (*s).to_owned());
        let subresource = rest.get(2).map(|s| (*s).to_owned());
        let query: Vec<(String, String)> =
            serde_urlencoded::from_str(query.unwrap_or_default()).unwrap_or_default();
        let param = |key: &str| query.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
        let watch = param("watch").is_some_and(|w| matches!(w.as_str(), "true" | "1" | "True"));
        let field_selector = param("fieldSelector");
        let label_selector = param("labelSelector");
        let verb = match *method {
            Method::GET | Method::HEAD if watch => "watch",
            Method::GET | Method::HEAD if name.is_some() => "get",
            Method::GET | Method::HEAD => "list",
            Method::POST => "create",
            Method::PUT => "update",
            Method::PATCH => "patch",
            Method::DELETE if name.is_some() => "delete",
            Method::DELETE => "deletecollection",
            _ => "",
        };
        // A WebSocket exec or attach is a GET; Kubernetes asks for create.
        let verb = match subresource.as_deref() {
            Some("exec" | "attach" | "portforward") => "create",
            _ => verb,
        };
        let mut resource = ResourceAttributes {
            group: group.into(),
            resource,
            subresource,
            namespace,
            name: None,
            field_selector,
            label_selector,
        };
        // A list or watch narrowed to one name is about that object, as
        // Kubernetes reads it (so `resourceNames` and the node authorizer
        // apply).
        if name.is_none() && matches!(verb, "list" | "watch") {
            name = resource
                .field("metadata.name")
                .filter(|n| !n.is_empty() && !n.contains('/'));
        }
        resource.name = name;
        Self {
            user,
            verb: verb.into(),
            path: path.into(),
            resource: Some(resource),
        }
    }

    /// Kubernetes' message for a refusal of these attributes.
    pub fn forbidden_message(&self) -> String {
        let who = &self.user.name;
        let Some(r) = &self.resource else {
            return format!("User \"{who}\" cannot {} path \"{}\"", self.verb, self.path);
        };
        let resource = match &r.subresource {
            Some(sub) => format!("{}/{sub}", r.resource),
            None => r.resource.clone(),
        };
        match &r.namespace {
            Some(ns) => format!(
                "User \"{who}\" cannot {} resource \"{resource}\" in API group \"{}\" in the namespace \"{ns}\"",
                self.verb, r.group
            ),
            None => format!(
                "User \"{who}\" cannot {} resource \"{resource}\" in API group \"{}\" at the cluster scope",
                self.verb, r.group
            ),
        }
    }

    /// The 403 for these attributes, as kube-apiserver words it.
    fn forbidden(&self) -> ApiError {
        let reason = self.forbidden_message();
        let Some(r) = &self.resource else {
            return ApiError::Forbidden {
                subject: Subject::default(),
                message: format!("forbidden: {reason}"),
            };
        };
        let qualified = if r.group.is_empty() {
            r.resource.clone()
        } else {
            format!("{}.{}", r.resource, r.group)
        };
        let message = match &r.name {
            Some(name) => format!("{qualified} \"{name}\" is forbidden: {reason}"),
            None => format!("{qualified} is forbidden: {reason}"),
        };
        ApiError::Forbidden {
            subject: Subject {
                group: r.group.clone(),
                kind: r.resource.clone(),
                name: r.name.clone().unwrap_or_default(),
            },
            message,
        }
    }
}

/// Authentication and RBAC, as a server runs them.
pub(crate) struct Auth {
    authentication: Authentication,
    pub(crate) rbac: Arc<rbac::Rbac>,
    nodes: node::NodeAuthorizer,
}

impl Auth {
    pub(crate) fn new(
        authentication: Authentication,
        rbac: Arc<rbac::Rbac>,
        nodes: node::NodeAuthorizer,
    ) -> Self {
        Self {
            authentication,
            rbac,
            nodes,
        }
    }

    /// Who sent a request: its client certificate, else its bearer token
    /// (the join token's secret, a service-account token, or one of the
    /// static token file), else anonymous. A bearer token that names no
    /// one is a 401.
    async fn authenticate(
        &self,
        server: &ApiServer,
        peer: Option<&Peer>,
        headers: &HeaderMap,
    ) -> Result<UserInfo, ApiError> {
        if let Some(Peer(Some(id))) = peer {
            return Ok(UserInfo::authenticated(&id.user, "", &id.groups));
        }
        let bearer = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let Some(token) = bearer else {
            return Ok(UserInfo::anonymous());
        };
        if let Some(secret) = &self.authentication.join_secret
            && constant_time_eq(token.as_bytes(), secret.as_bytes())
        {
            return Ok(UserInfo::authenticated(
                "system:bootstrap:node",
                "",
                &[csr::BOOTSTRAPPERS.to_owned()],
            ));
        }
        if let Some(user) = self.authentication.tokens.get(token) {
            return Ok(user.clone());
        }
        if token.matches('.').count() == 2 {
            return token::authenticate(server, token).await;
        }
        Err(ApiError::Unauthorized)
    }

    /// [`Self::allows`], or the 403 kube-apiserver gives.
    pub(crate) fn check(&self, attrs: &Attributes) -> Result<(), ApiError> {
        if self.allows(attrs) {
            Ok(())
        } else {
            Err(attrs.forbidden())
        }
    }

    /// Whether `attrs` is allowed: members of `system:masters` may do
    /// anything (as kube-apiserver's privileged-group authorizer); nodes as
    /// the node authorizer says, where it has a say; everyone else by RBAC.
    pub(crate) fn allows(&self, attrs: &Attributes) -> bool {
        if attrs.user.groups.iter().any(|g| g == MASTERS) {
            return true;
        }
        match self.nodes.decide(attrs) {
            Some(node::Verdict::Allow) => true,
            Some(node::Verdict::Deny | node::Verdict::Unrelated) => false,
            Some(node::Verdict::NoOpinion) | None => self.rbac.allows(attrs),
        }
    }

    /// Asks again about a node's request the node authorizer refused for
    /// want of a relation its graph has not seen yet (a pod bound a moment
    /// ago): the store answers.
    async fn recheck(&self, attrs: &Attributes) -> bool {
        if self.nodes.decide(attrs) != Some(node::Verdict::Unrelated) {
            return false;
        }
        match self.nodes.recheck(attrs).await {
            node::Verdict::Allow => true,
            node::Verdict::NoOpinion => self.rbac.allows(attrs),
            node::Verdict::Deny | node::Verdict::Unrelated => false,
        }
    }

    /// As [`Auth::allows`], saying why (for reviews).
    pub(crate) fn authorize(&self, attrs: &Attributes) -> rbac::Decision {
        if attrs.user.groups.iter().any(|g| g == MASTERS) {
            return rbac::Decision {
                allowed: true,
                reason: format!("allowed as a member of {MASTERS}"),
            };
        }
        match self.nodes.decide(attrs) {
            Some(node::Verdict::Allow) => rbac::Decision {
                allowed: true,
                reason: "allowed by the node authorizer: a pod bound to the node uses it".into(),
            },
            Some(node::Verdict::Deny | node::Verdict::Unrelated) => rbac::Decision {
                allowed: false,
                reason: "the node authorizer refuses: no pod bound to the node uses it, or it is another node's".into(),
            },
            Some(node::Verdict::NoOpinion) | None => self.rbac.authorize(attrs),
        }
    }

    /// Acts as the user the `Impersonate-*` headers name, when `user` may
    /// impersonate them (verb `impersonate` on `users`, `groups`,
    /// `serviceaccounts` and `uids`).
    fn impersonate(&self, user: UserInfo, headers: &HeaderMap) -> Result<UserInfo, ApiError> {
        let Some(name) = headers
            .get("impersonate-user")
            .and_then(|v| v.to_str().ok())
        else {
            if headers.contains_key("impersonate-group") {
                return Err(ApiError::bad_request(
                    "requested Impersonate-Group without Impersonate-User",
                ));
            }
            return Ok(user);
        };
        let groups: Vec<String> = headers
            .get_all("impersonate-group")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(str::to_owned)
            .collect();
        let uid = headers
            .get("impersonate-uid")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let check = |group: &str, resource: &str, namespace: Option<&str>, target: &str| {
            let attrs = Attributes {
                user: user.clone(),
                verb: "impersonate".into(),
                path: String::new(),
                resource: Some(ResourceAttributes {
                    group: group.into(),
                    resource: resource.into(),
                    subresource: None,
                    namespace: namespace.map(Into::into),
                    name: Some(target.into()),
                    ..Default::default()
                }),
            };
            if self.allows(&attrs) {
                Ok(())
            } else {
                Err(attrs.forbidden())
            }
        };
        match name
            .strip_prefix("system:serviceaccount:")
            .and_then(|rest| rest.split_once(':'))
        {
            Some((ns, sa)) => check("", "serviceaccounts", Some(ns), sa)?,
            None => check("", "users", None, name)?,
        }
        for group in &groups {
            check("", "groups", None, group)?;
        }
        if !uid.is_empty() {
            check("authentication.k8s.io", "uids", None, uid)?;
        }
        let mut impersonated = if name == ANONYMOUS {
            UserInfo::anonymous()
        } else {
            UserInfo::authenticated(name, uid, &groups)
        };
        if name == ANONYMOUS {
            impersonated.groups.extend(groups);
        }
        Ok(impersonated)
    }
}

/// The middleware: authenticates, impersonates, authorizes, and hands the
/// request on with its [`UserInfo`] as an extension.
pub(crate) async fn middleware(
    State(server): State<Arc<ApiServer>>,
    mut req: Request<Body>,
    next: Next,
) -> Response {
    let Some(auth) = &server.auth else {
        return next.run(req).await;
    };
    let user = match auth
        .authenticate(&server, req.extensions().get::<Peer>(), req.headers())
        .await
        .and_then(|user| auth.impersonate(user, req.headers()))
    {
        Ok(user) => user,
        Err(e) => return e.into_response(),
    };
    let attrs = Attributes::of(user, req.method(), req.uri().path(), req.uri().query());
    // The audit record of this request, when the policy keeps one; its
    // first event now, before authorization.
    let record = server.audit.as_ref().and_then(|audit| {
        let record = audit.record(
            &attrs,
            req.uri().to_string(),
            req.headers()
                .get(axum::http::header::USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned(),
            req.extensions().get::<RemoteAddr>().map(|r| r.0.ip()),
        )?;
        audit.received(&record);
        Some(record)
    });
    if !auth.allows(&attrs) && !auth.recheck(&attrs).await {
        // A component of the cluster refused is a gap in its role.
        if attrs.user.name.starts_with("system:") && !attrs.user.is_anonymous() {
            tracing::warn!(user = %attrs.user.name, "{}", attrs.forbidden_message());
        } else {
            tracing::debug!(user = %attrs.user.name, "{}", attrs.forbidden_message());
        }
        let refusal = if attrs.user.is_anonymous() {
            ApiError::Unauthorized
        } else {
            attrs.forbidden()
        };
        if let (Some(audit), Some(record)) = (&server.audit, &record) {
            let outcome = crate::audit::Outcome {
                code: refusal.code().as_u16(),
                allowed: false,
                request: None,
                response: None,
                annotations: &[],
            };
            audit.complete(record, outcome);
        }
        return refusal.into_response();
    }
    let changes_policy = attrs.resource.as_ref().is_some_and(|r| {
        r.group == "rbac.authorization.k8s.io"
            && matches!(
                attrs.verb.as_str(),
                "create" | "update" | "patch" | "delete" | "deletecollection"
            )
    });
    req.extensions_mut().insert(attrs.user.clone());
    // Bodies are kept for the levels that log them; never those of
    // streams (watches, logs, exec).
    let streaming = attrs.verb == "watch"
        || attrs.resource.as_ref().is_some_and(|r| {
            matches!(
                r.subresource.as_deref(),
                Some("log" | "exec" | "attach" | "portforward")
            )
        });
    let mut request_body = None;
    if let Some(record) = &record
        && record.level >= crate::audit::Level::Request
        && !streaming
    {
        let (parts, body) = req.into_parts();
        let bytes = match axum::body::to_bytes(body, server.config.max_body_bytes).await {
            Ok(b) => b,
            Err(_) => {
                return ApiError::TooLarge {
                    limit: server.config.max_body_bytes,
                }
                .into_response();
            }
        };
        // JSON, YAML or protobuf, as the REST handlers read them.
        let content_type = parts
            .headers
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/json");
        request_body = crate::rest::parse_value(content_type, &bytes).ok();
        req = Request::from_parts(parts, Body::from(bytes));
    }
    let (mut response, annotations) = if record.is_some() {
        crate::audit::gathering(next.run(req)).await
    } else {
        (next.run(req).await, Vec::new())
    };
    if changes_policy && response.status().is_success() {
        // Acknowledge a change of the policy once it is in force here.
        auth.rbac.wait_for(server.store.current_revision()).await;
    }
    let (Some(audit), Some(record)) = (&server.audit, record) else {
        return response;
    };
    let code = response.status().as_u16();
    if streaming {
        // A long-running response: started now, complete when its stream
        // ends (or is dropped with the connection).
        audit.started(&record, code);
        let done = AuditOnEnd(Some((audit.clone(), record, code, annotations)));
        let (parts, body) = response.into_parts();
        let stream = futures::StreamExt::chain(
            body.into_data_stream(),
            futures::stream::poll_fn(move |_| {
                let _ = &done;
                std::task::Poll::Ready(None)
            }),
        );
        return Response::from_parts(parts, Body::from_stream(stream));
    }
    let mut response_body = None;
    if record.level >= crate::audit::Level::RequestResponse {
        let (parts, body) = response.into_parts();
        let bytes = axum::body::to_bytes(body, usize::MAX)
            .await
            .unwrap_or_default();
        response_body = Some(bytes.clone());
        response = Response::from_parts(parts, Body::from(bytes));
    }
    let outcome = crate::audit::Outcome {
        code,
        allowed: true,
        request: request_body,
        response: response_body.as_deref(),
        annotations: &annotations,
    };
    audit.complete(&record, outcome);
    response
}

/// Writes a long-running request's `ResponseComplete` when its response
/// stream is dropped: at its end, or when the client went away.
struct AuditOnEnd(Option<Ending>);

/// What a long-running request's last event needs: where it goes, the
/// record, the status sent and the annotations gathered.
type Ending = (
    Arc<crate::audit::Audit>,
    crate::audit::Record,
    u16,
    Vec<(String, String)>,
);

impl Drop for AuditOnEnd {
    fn drop(&mut self) {
        if let Some((audit, record, code, annotations)) = self.0.take() {
            let outcome = crate::audit::Outcome {
                code,
                allowed: true,
                request: None,
                response: None,
                annotations: &annotations,
            };
            audit.complete(&record, outcome);
        }
    }
}

/// The address a request came from, set by the TLS server.
#[derive(Clone, Copy, Debug)]
pub struct RemoteAddr(pub std::net::SocketAddr);

#[cfg(test)]
mod tests {
    use super::*;

    fn of(method: Method, path: &str, query: Option<&str>) -> Attributes {
        Attributes::of(
            UserInfo::authenticated("alice", "", &[]),
            &method,
            path,
            query,
        )
    }

    #[test]
    fn request_paths_become_attributes() {
        let r = |a: Attributes| {
            let r = a.resource.unwrap_or_default();
            (
                a.verb,
                r.group,
                r.resource,
                r.subresource,
                r.namespace,
                r.name,
            )
        };
        let s = |x: &str| Some(x.to_owned());
        let cases = [
            (
                Method::GET,
                "/api/v1/namespaces/a/pods",
                None,
                ("list", "", "pods", None, s("a"), None),
            ),
            (
                Method::GET,
                "/api/v1/namespaces/a/pods",
                Some("watch=1&rv=3"),
                ("watch", "", "pods", None, s("a"), None),
            ),
            (
                Method::GET,
                "/api/v1/pods",
                None,
                ("list", "", "pods", None, None, None),
            ),
            (
                Method::GET,
                "/api/v1/namespaces/a/pods/p/log",
                None,
                ("get", "", "pods", s("log"), s("a"), s("p")),
            ),
            (
                Method::GET,
                "/api/v1/namespaces/a/pods/p/exec",
                Some("command=sh"),
                ("create", "", "pods", s("exec"), s("a"), s("p")),
            ),
            (
                Method::POST,
                "/apis/apps/v1/namespaces/a/deployments",
                None,
                ("create", "apps", "deployments", None, s("a"), None),
            ),
            (
                Method::PUT,
                "/apis/apps/v1/namespaces/a/deployments/d/scale",
                None,
                ("update", "apps", "deployments", s("scale"), s("a"), s("d")),
            ),
            (
                Method::DELETE,
                "/api/v1/namespaces/a/secrets",
                None,
                ("deletecollection", "", "secrets", None, s("a"), None),
            ),
            (
                Method::GET,
                "/api/v1/namespaces/a",
                None,
                ("get", "", "namespaces", None, s("a"), s("a")),
            ),
            (
                Method::PUT,
                "/api/v1/namespaces/a/finalize",
                None,
                ("update", "", "namespaces", s("finalize"), s("a"), s("a")),
            ),
            (
                Method::GET,
                "/api/v1/nodes/n1",
                None,
                ("get", "", "nodes", None, None, s("n1")),
            ),
        ];
        for (method, path, query, want) in cases {
            let got = r(of(method, path, query));
            let want = (
                want.0.to_owned(),
                want.1.to_owned(),
                want.2.to_owned(),
                want.3,
                want.4,
                want.5,
            );
            assert_eq!(got, want, "{path}");
        }
        for path in ["/api", "/apis/apps/v1", "/healthz", "/openapi/v3"] {
            let a = of(Method::GET, path, None);
            assert!(a.resource.is_none(), "{path}");
            assert_eq!(a.verb, "get");
        }
    }

    #[test]
    fn selectors_narrow_lists_as_kubernetes_reads_them() {
        let watch = of(
            Method::GET,
            "/api/v1/namespaces/a/secrets",
            Some(
                "watch=true&fieldSelector=metadata.name%3Ds1&labelSelector=app%20in%20(x%2Cy)%2Ctier",
            ),
        );
        assert_eq!(watch.verb, "watch");
        let r = watch.resource.unwrap();
        assert_eq!(r.name.as_deref(), Some("s1"));
        assert_eq!(r.field("metadata.name").as_deref(), Some("s1"));
        assert!(r.has_label("app") && r.has_label("tier") && !r.has_label("x"));
        let pods = of(
            Method::GET,
            "/api/v1/pods",
            Some("fieldSelector=status.phase!%3DFailed,spec.nodeName%3D%3Dn1"),
        );
        let r = pods.resource.unwrap();
        assert_eq!(r.field("spec.nodeName").as_deref(), Some("n1"));
        assert_eq!(r.field("status.phase"), None);
        assert_eq!(r.name, None);
        let r = ResourceAttributes {
            label_selector: Some("!app,tier!=x,apps=y".into()),
            ..Default::default()
        };
        assert!(!r.has_label("app") && !r.has_label("tier"));
    }

    #[test]
    fn refusals_read_as_kubernetes_words_them() {
        let list = of(Method::GET, "/api/v1/namespaces/b/secrets", None);
        assert_eq!(
            list.forbidden().to_string(),
            "secrets is forbidden: User \"alice\" cannot list resource \"secrets\" in API group \"\" in the namespace \"b\""
        );
        let get = of(Method::GET, "/apis/apps/v1/deployments", None);
        assert_eq!(
            get.forbidden().to_string(),
            "deployments.apps is forbidden: User \"alice\" cannot list resource \"deployments\" in API group \"apps\" at the cluster scope"
        );
        let exec = of(Method::POST, "/api/v1/namespaces/b/pods/p/exec", None);
        assert_eq!(
            exec.forbidden().to_string(),
            "pods \"p\" is forbidden: User \"alice\" cannot create resource \"pods/exec\" in API group \"\" in the namespace \"b\""
        );
        let path = of(Method::GET, "/metrics", None);
        assert_eq!(
            path.forbidden().to_string(),
            "forbidden: User \"alice\" cannot get path \"/metrics\""
        );
    }

    #[test]
    fn token_files_read_as_kubernetes_writes_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.csv");
        std::fs::write(&path, "# comment\nt1,alice,u1,\"dev,ops\"\nt2,bob,u2\n").unwrap();
        let auth = Authentication::read_token_file(&path).unwrap();
        assert_eq!(auth.tokens["t1"].groups, ["dev", "ops", AUTHENTICATED]);
        assert_eq!(auth.tokens["t2"].name, "bob");
        std::fs::write(&path, "t3,carol\n").unwrap();
        let e = Authentication::read_token_file(&path).unwrap_err();
        assert_eq!(e.line, 1);
    }
}
