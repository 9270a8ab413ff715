//! The routing table: Ingresses and HTTPRoutes (attached to Gateways of the
//! built-in class) compiled into one list of entries per listening port, in
//! the Gateway API's precedence order, and the request matching over it.
//! Pure: built from objects, tested without a server.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::api::networking::v1::{Ingress, IngressBackend};
use regex::Regex;
use wasmkube_api::gateway_api::{
    Gateway, HTTPBackendRef, HTTPHeaderFilter, HTTPRoute, HTTPRouteFilter, HTTPRouteMatch,
    Listener, ParentReference,
};

use wasmkube_proxy::{ServiceView, SliceView};

pub use wasmkube_api::gateway_api::CONTROLLER;

/// Everything the table is built from.
#[derive(Default)]
pub struct Inputs<'a> {
    pub ingresses: Vec<&'a Ingress>,
    /// IngressClasses handled here (`spec.controller` is ours).
    pub ingress_classes: BTreeSet<String>,
    /// GatewayClasses handled here.
    pub gateway_classes: BTreeSet<String>,
    pub gateways: Vec<&'a Gateway>,
    pub routes: Vec<&'a HTTPRoute>,
    pub services: Vec<&'a ServiceView>,
    pub slices: Vec<&'a SliceView>,
    pub namespaces: Vec<&'a Namespace>,
    pub secrets: Vec<&'a Secret>,
    /// Knative Routes: served from their status on the Ingress HTTP port.
    pub knative_routes: Vec<&'a KnativeRoute>,
    /// The ports Ingresses are served on: plain HTTP and (for Ingresses
    /// with `tls`) HTTPS.
    pub ingress_http_port: Option<u16>,
    pub ingress_https_port: Option<u16>,
}

/// How a host name is matched, ordered from most to least specific.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostMatch {
    Exact(String),
    /// `*.example.com`: any name with one or more labels before the suffix
    /// (stored with its leading dot, `.example.com`).
    Wildcard(String),
    Any,
}

impl HostMatch {
    pub(crate) fn parse(h: &str) -> Self {
        match h.strip_prefix('*') {
            Some(suffix) => HostMatch::Wildcard(suffix.to_ascii_lowercase()),
            None => HostMatch::Exact(h.to_ascii_lowercase()),
        }
    }

    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostMatch::Exact(h) => h == host,
            HostMatch::Wildcard(suffix) => host.len() > suffix.len() && host.ends_with(suffix),
            HostMatch::Any => true,
        }
    }

    /// Precedence: exact names first, then longer wildcards.
    fn rank(&self) -> (u8, usize) {
        match self {
            HostMatch::Exact(h) => (0, usize::MAX - h.len()),
            HostMatch::Wildcard(s) => (1, usize::MAX - s.len()),
            HostMatch::Any => (2, 0),
        }
    }

    /// The most specific of two host constraints that both must hold, or
    /// `None` when no name satisfies both (a route's hostname against a
    /// listener's).
    pub(crate) fn intersect(&self, other: &HostMatch) -> Option<HostMatch> {
        use HostMatch::*;
        match (self, other) {
            (Any, x) | (x, Any) => Some(x.clone()),
            (Exact(a), b) | (b, Exact(a)) if b.matches(a) => Some(Exact(a.clone())),
            (Wildcard(a), Wildcard(b)) if a.ends_with(b.as_str()) => Some(Wildcard(a.clone())),
            (Wildcard(a), Wildcard(b)) if b.ends_with(a.as_str()) => Some(Wildcard(b.clone())),
            _ => None,
        }
    }
}

#[derive(Clone, Debug)]
pub enum PathMatch {
    Exact(String),
    /// Element-wise prefix, stored without a trailing slash (`/` is empty).
    Prefix(String),
    Regex(Regex),
}

impl PathMatch {
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Exact(p) => p == path,
            PathMatch::Prefix(p) => {
                path.starts_with(p.as_str())
                    && (path.len() == p.len() || path.as_bytes()[p.len()] == b'/')
            }
            PathMatch::Regex(re) => re.find(path).is_some_and(|m| m.as_str() == path),
        }
    }

    /// Precedence: exact before prefix, longer prefixes first, then
    /// regular expressions.
    fn rank(&self) -> (u8, usize) {
        match self {
            PathMatch::Exact(p) => (0, usize::MAX - p.len()),
            PathMatch::Prefix(p) => (1, usize::MAX - p.len()),
            PathMatch::Regex(r) => (2, usize::MAX - r.as_str().len()),
        }
    }
}

#[derive(Clone, Debug)]
pub enum ValueMatch {
    Exact(String),
    Regex(Regex),
}

impl ValueMatch {
    fn matches(&self, v: &str) -> bool {
        match self {
            ValueMatch::Exact(e) => e == v,
            ValueMatch::Regex(r) => r.is_match(v),
        }
    }
}

/// One match of a rule: all its conditions must hold.
#[derive(Clone, Debug)]
pub struct Match {
    pub path: PathMatch,
    pub method: Option<String>,
    /// Header names lower-cased.
    pub headers: Vec<(String, ValueMatch)>,
    pub query: Vec<(String, ValueMatch)>,
}

/// What a request looks like to the matcher.
#[derive(Debug)]
pub struct RequestView<'a> {
    pub host: &'a str,
    pub path: &'a str,
    pub method: &'a str,
    pub headers: &'a http::HeaderMap,
    pub query: &'a [(String, String)],
}

impl Match {
    fn matches(&self, req: &RequestView<'_>) -> bool {
        self.path.matches(req.path)
            && self.method.as_deref().is_none_or(|m| m == req.method)
            && self.headers.iter().all(|(name, want)| {
                req.headers
                    .get(name.as_str())
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| want.matches(v))
            })
            && self.query.iter().all(|(name, want)| {
                req.query
                    .iter()
                    .find(|(k, _)| k == name)
                    .is_some_and(|(_, v)| want.matches(v))
            })
    }
}

/// Where a backend's traffic goes.
#[derive(Clone, Debug)]
pub enum Target {
    /// Ready endpoints (possibly none: 503).
    Endpoints(Arc<Vec<SocketAddr>>),
    /// A reference that does not resolve: requests routed to it get 500,
    /// as the specification asks.
    Invalid(String),
    /// Nothing can serve yet, for this reason (a Knative Route whose
    /// traffic does not resolve): 503 with the reason.
    Unavailable(String),
}

#[derive(Clone, Debug)]
pub struct Backend {
    pub weight: u32,
    pub target: Target,
    pub filters: Filters,
    /// A Knative revision, which the activator wakes when it has no pod.
    pub revision: Option<Revision>,
}

/// A Knative revision behind a backend: `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Revision {
    pub namespace: String,
    pub name: String,
}

/// The filters of a rule or a backend, compiled; most have none, which
/// takes no memory beyond a pointer (every route entry and backend holds
/// one, a function at zero included).
#[derive(Clone, Debug, Default)]
pub struct Filters(Option<Box<FilterSet>>);

/// The filters themselves.
#[derive(Clone, Debug, Default)]
pub struct FilterSet {
    pub request_headers: Option<HTTPHeaderFilter>,
    pub response_headers: Option<HTTPHeaderFilter>,
    pub redirect: Option<wasmkube_api::gateway_api::HTTPRequestRedirectFilter>,
    pub rewrite: Option<wasmkube_api::gateway_api::HTTPURLRewriteFilter>,
}

/// No filter at all.
static NO_FILTERS: FilterSet = FilterSet {
    request_headers: None,
    response_headers: None,
    redirect: None,
    rewrite: None,
};

impl std::ops::Deref for Filters {
    type Target = FilterSet;

    fn deref(&self) -> &FilterSet {
        self.0.as_deref().unwrap_or(&NO_FILTERS)
    }
}

impl Filters {
    fn compile(filters: &[HTTPRouteFilter]) -> Self {
        if filters.is_empty() {
            return Self(None);
        }
        let mut out = FilterSet::default();
        for f in filters {
            match f.type_.as_str() {
                "RequestHeaderModifier" => out.request_headers = f.request_header_modifier.clone(),
                "ResponseHeaderModifier" => {
                    out.response_headers = f.response_header_modifier.clone()
                }
                "RequestRedirect" => out.redirect = f.request_redirect.clone(),
                "URLRewrite" => out.rewrite = f.url_rewrite.clone(),
                // Mirrors and extension filters are not acted on.
                _ => {}
            }
        }
        Self(Some(Box::new(out)))
    }
}

/// One routable (host, match) pair with what to do.
#[derive(Clone, Debug)]
pub struct Entry {
    pub host: HostMatch,
    pub matched: Match,
    pub filters: Filters,
    pub backends: Vec<Backend>,
    /// `namespace/name` of the Ingress or HTTPRoute, for logs.
    pub source: String,
    /// Creation time and name of the source, the last tie-breakers.
    order: (String, String),
}

impl Entry {
    /// The total weight of the backends.
    pub fn total_weight(&self) -> u32 {
        self.backends.iter().map(|b| b.weight).sum()
    }

    /// The backend for a draw in `0..total_weight()`.
    pub fn pick(&self, mut draw: u32) -> Option<&Backend> {
        for b in &self.backends {
            if draw < b.weight {
                return Some(b);
            }
            draw -= b.weight;
        }
        None
    }
}

impl Entry {
    /// An entry for every path of `host`, to `backends` (an Ingress's
    /// default backend, a Knative route).
    pub(crate) fn whole_host(
        host: HostMatch,
        backends: Vec<Backend>,
        source: String,
        order: (String, String),
    ) -> Self {
        Self {
            host,
            matched: Match {
                path: PathMatch::Prefix(String::new()),
                method: None,
                headers: Vec::new(),
                query: Vec::new(),
            },
            filters: Filters::default(),
            backends,
            source,
            order,
        }
    }
}

/// A certificate for TLS termination: the PEM chain and key of a Secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertSource {
    /// `namespace/name` of the Secret.
    pub secret: String,
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

/// One port the gateway listens on.
#[derive(Clone, Debug, Default)]
pub struct PortTable {
    /// Terminate TLS here (certificates chosen by SNI).
    pub tls: bool,
    /// Host constraint -> certificate, most specific first.
    pub certs: Vec<(HostMatch, CertSource)>,
    pub entries: Vec<Entry>,
}

impl PortTable {
    /// The entry a request takes: the first that matches, entries being in
    /// precedence order.
    pub fn route(&self, req: &RequestView<'_>) -> Option<&Entry> {
        self.entries
            .iter()
            .find(|e| e.host.matches(req.host) && e.matched.matches(req))
    }

    /// The certificate for an SNI name (or the first one without SNI).
    pub fn cert_for(&self, sni: Option<&str>) -> Option<&CertSource> {
        match sni {
            Some(name) => {
                let name = name.to_ascii_lowercase();
                self.certs
                    .iter()
                    .find(|(h, _)| h.matches(&name))
                    .map(|(_, c)| c)
            }
            None => self.certs.first().map(|(_, c)| c),
        }
    }
}

/// The whole table: port -> what is served there.
pub type Table = BTreeMap<u16, PortTable>;

/// Resolves Service backends to ready endpoint addresses.
struct Resolver<'a> {
    services: HashMap<(&'a str, &'a str), &'a ServiceView>,
    slices: HashMap<(&'a str, &'a str), Vec<&'a SliceView>>,
}

impl<'a> Resolver<'a> {
    fn new(inputs: &Inputs<'a>) -> Self {
        let services = inputs
            .services
            .iter()
            .map(|s| ((s.namespace.as_str(), s.name.as_str()), *s))
            .collect();
        let mut slices: HashMap<_, Vec<_>> = HashMap::new();
        for s in &inputs.slices {
            slices
                .entry((s.namespace.as_str(), s.service.as_str()))
                .or_default()
                .push(*s);
        }
        Self { services, slices }
    }

    /// The ready endpoints behind `ns/name`'s port (by number or name).
    fn resolve(&self, ns: &str, name: &str, port: PortRef<'_>) -> Target {
        let Some(svc) = self.services.get(&(ns, name)) else {
            return Target::Invalid(format!("service {ns}/{name} not found"));
        };
        let found = svc.ports.iter().find(|p| match port {
            PortRef::Number(n) => i32::from(p.port) == n,
            PortRef::Name(n) => p.name == n,
        });
        let Some(sp) = found else {
            return Target::Invalid(format!("service {ns}/{name} has no port {port}"));
        };
        let mut addrs = Vec::new();
        for slice in self.slices.get(&(ns, name)).into_iter().flatten() {
            let Some(target) = slice.ports.iter().find(|p| p.name == sp.name) else {
                continue;
            };
            for ep in slice.endpoints.iter().filter(|e| e.ready) {
                addrs.extend(
                    ep.addresses
                        .iter()
                        .map(|ip| SocketAddr::from((*ip, target.port))),
                );
            }
        }
        addrs.sort();
        addrs.dedup();
        Target::Endpoints(Arc::new(addrs))
    }
}

#[derive(Clone, Copy, Debug)]
enum PortRef<'a> {
    Number(i32),
    Name(&'a str),
}

impl std::fmt::Display for PortRef<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PortRef::Number(n) => write!(f, "{n}"),
            PortRef::Name(n) => write!(f, "{n:?}"),
        }
    }
}

/// Why a backendRef does not resolve, as the `ResolvedRefs` condition's
/// reason (`None`: it resolves).
pub fn backend_ref_problem(
    route_ns: &str,
    b: &HTTPBackendRef,
    services: &[&ServiceView],
) -> Option<(&'static str, String)> {
    let group = b.group.as_deref().unwrap_or_default();
    let kind = b.kind.as_deref().unwrap_or("Service");
    if !group.is_empty() || kind != "Service" {
        return Some((
            "InvalidKind",
            format!(
                "backendRef {}: kind {kind} in group {group:?} is not supported",
                b.name
            ),
        ));
    }
    let ns = b.namespace.as_deref().unwrap_or(route_ns);
    if ns != route_ns {
        return Some((
            "RefNotPermitted",
            format!(
                "backendRef {ns}/{}: a reference to another namespace needs a ReferenceGrant, which this gateway does not serve",
                b.name
            ),
        ));
    }
    let exists = services
        .iter()
        .any(|s| s.namespace == ns && s.name == b.name);
    if !exists {
        return Some((
            "BackendNotFound",
            format!("backendRef {ns}/{}: service not found", b.name),
        ));
    }
    None
}

fn compile_match(m: &HTTPRouteMatch) -> Option<Match> {
    let path = m.path.clone().unwrap_or_default();
    let value = path.value.unwrap_or_else(|| "/".into());
    let path = match path.type_.as_deref().unwrap_or("PathPrefix") {
        "Exact" => PathMatch::Exact(value),
        "RegularExpression" => PathMatch::Regex(Regex::new(&value).ok()?),
        _ => PathMatch::Prefix(value.trim_end_matches('/').to_owned()),
    };
    let value = |ty: Option<&str>, v: &str| match ty.unwrap_or("Exact") {
        "RegularExpression" => Regex::new(v).ok().map(ValueMatch::Regex),
        _ => Some(ValueMatch::Exact(v.to_owned())),
    };
    Some(Match {
        path,
        method: m.method.clone(),
        headers: m
            .headers
            .iter()
            .map(|h| {
                Some((
                    h.name.to_ascii_lowercase(),
                    value(h.type_.as_deref(), &h.value)?,
                ))
            })
            .collect::<Option<_>>()?,
        query: m
            .query_params
            .iter()
            .map(|q| Some((q.name.clone(), value(q.type_.as_deref(), &q.value)?)))
            .collect::<Option<_>>()?,
    })
}

/// Whether a listener admits routes from `route_ns`.
pub fn listener_allows(
    gateway_ns: &str,
    l: &Listener,
    route_ns: &str,
    namespaces: &[&Namespace],
) -> bool {
    let allowed = l.allowed_routes.as_ref();
    if let Some(kinds) = allowed.map(|a| &a.kinds).filter(|k| !k.is_empty())
        && !kinds.iter().any(|k| k.kind == "HTTPRoute")
    {
        return false;
    }
    let ns = allowed.and_then(|a| a.namespaces.as_ref());
    match ns.and_then(|n| n.from.as_deref()).unwrap_or("Same") {
        "All" => true,
        "Selector" => {
            let Some(selector) = ns.and_then(|n| n.selector.as_ref()) else {
                return false;
            };
            namespaces
                .iter()
                .find(|n| n.metadata.name.as_deref() == Some(route_ns))
                .is_some_and(|n| {
                    let empty = BTreeMap::new();
                    let labels = n.metadata.labels.as_ref().unwrap_or(&empty);
                    wasmkube_api::selectors::LabelSelector::from_api(selector)
                        .is_ok_and(|s| s.matches(labels))
                })
        }
        _ => gateway_ns == route_ns,
    }
}

/// The listeners of `gateway` a parentRef of a route in `route_ns` attaches
/// to (by sectionName and port when given, and the listeners' allowed
/// routes).
pub fn attached_listeners<'g>(
    gateway: &'g Gateway,
    parent: &ParentReference,
    route_ns: &str,
    namespaces: &[&Namespace],
) -> Vec<&'g Listener> {
    let gw_ns = gateway.metadata.namespace.as_deref().unwrap_or_default();
    gateway
        .spec
        .listeners
        .iter()
        .filter(|l| matches!(l.protocol.as_str(), "HTTP" | "HTTPS"))
        .filter(|l| parent.section_name.as_deref().is_none_or(|s| s == l.name))
        .filter(|l| parent.port.is_none_or(|p| p == l.port))
        .filter(|l| listener_allows(gw_ns, l, route_ns, namespaces))
        .collect()
}

/// Whether a parentRef names `gateway`.
pub fn refers_to(parent: &ParentReference, route_ns: &str, gateway: &Gateway) -> bool {
    parent
        .group
        .as_deref()
        .unwrap_or(wasmkube_api::gateway_api::GROUP)
        == wasmkube_api::gateway_api::GROUP
        && parent.kind.as_deref().unwrap_or("Gateway") == "Gateway"
        && parent.name == gateway.metadata.name.as_deref().unwrap_or_default()
        && parent.namespace.as_deref().unwrap_or(route_ns)
            == gateway.metadata.namespace.as_deref().unwrap_or_default()
}

fn secret_cert(inputs: &Inputs<'_>, ns: &str, name: &str) -> Option<CertSource> {
    let secret = inputs.secrets.iter().find(|s| {
        s.metadata.namespace.as_deref() == Some(ns) && s.metadata.name.as_deref() == Some(name)
    })?;
    let data = secret.data.as_ref()?;
    Some(CertSource {
        secret: format!("{ns}/{name}"),
        cert_pem: data.get("tls.crt")?.0.clone(),
        key_pem: data.get("tls.key")?.0.clone(),
    })
}

fn creation(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> (String, String) {
    (
        meta.creation_timestamp
            .as_ref()
            .map(|t| t.0.to_string())
            .unwrap_or_default(),
        format!(
            "{}/{}",
            meta.namespace.as_deref().unwrap_or_default(),
            meta.name.as_deref().unwrap_or_default()
        ),
    )
}

/// Builds the table.
pub fn build(inputs: &Inputs<'_>) -> Table {
    let resolver = Resolver::new(inputs);
    let mut table = Table::new();
    add_ingresses(inputs, &resolver, &mut table);
    add_routes(inputs, &resolver, &mut table);
    add_knative_routes(inputs, &resolver, &mut table);
    for port in table.values_mut() {
        port.entries.sort_by(|a, b| {
            a.host
                .rank()
                .cmp(&b.host.rank())
                .then(a.matched.path.rank().cmp(&b.matched.path.rank()))
                .then(b.matched.method.is_some().cmp(&a.matched.method.is_some()))
                .then(b.matched.headers.len().cmp(&a.matched.headers.len()))
                .then(b.matched.query.len().cmp(&a.matched.query.len()))
                .then(a.order.cmp(&b.order))
        });
        port.certs.sort_by_key(|(h, _)| h.rank());
    }
    table
}

/// A Knative Route as the routing table reads it: its status, where the
/// Route controller resolved the traffic. Routes without a URL yet are not
/// kept ([`KnativeRoute::of`] declines them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KnativeRoute {
    pub namespace: String,
    pub name: String,
    pub created: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    /// `NAME.NAMESPACE.DOMAIN`, lowercased.
    pub host: String,
    /// Revisions with a share of the traffic, and their percent.
    pub split: Vec<(String, u32)>,
    /// Each tag's host and its revision.
    pub tags: Vec<(String, String)>,
    /// Why no traffic is assigned, when none is.
    pub unassigned: Option<String>,
}

impl KnativeRoute {
    /// The route's view, if its status has a URL.
    pub fn of(route: &wasmkube_api::knative::Route) -> Option<Self> {
        fn host_of(url: &str) -> String {
            url.split_once("://")
                .map_or(url, |(_, rest)| rest)
                .split(['/', ':'])
                .next()
                .unwrap_or_default()
                .to_ascii_lowercase()
        }
        let status = route.status.as_ref()?;
        let host = host_of(status.url.as_deref()?);
        let unassigned = status.traffic.is_empty().then(|| {
            wasmkube_api::knative::condition(&status.conditions, "AllTrafficAssigned")
                .and_then(|c| c.message.clone())
                .unwrap_or_else(|| "its traffic is not assigned yet".into())
        });
        Some(Self {
            namespace: route.metadata.namespace.clone().unwrap_or_default(),
            name: route.metadata.name.clone().unwrap_or_default(),
            created: route.metadata.creation_timestamp.clone(),
            host,
            split: status
                .traffic
                .iter()
                .filter_map(|t| {
                    let percent = u32::try_from(t.percent?).ok().filter(|p| *p > 0)?;
                    Some((t.revision_name.clone()?, percent))
                })
                .collect(),
            tags: status
                .traffic
                .iter()
                .filter_map(|t| Some((host_of(t.url.as_deref()?), t.revision_name.clone()?)))
                .collect(),
            unassigned,
        })
    }
}

/// Knative Routes, as their status says: `NAME.NAMESPACE.DOMAIN` splits
/// between revisions by percent, each tag's host goes to its revision, on
/// the Ingress HTTP port. Each revision is reached through its ClusterIP
/// Service (port 80).
fn add_knative_routes(inputs: &Inputs<'_>, resolver: &Resolver<'_>, table: &mut Table) {
    let Some(http_port) = inputs.ingress_http_port else {
        return;
    };
    for route in &inputs.knative_routes {
        let ns = route.namespace.as_str();
        let order = (
            route
                .created
                .as_ref()
                .map(|t| t.0.to_string())
                .unwrap_or_default(),
            format!("{ns}/{}", route.name),
        );
        let source = format!("knative route {}", order.1);
        let backend = |revision: &str, weight: u32| Backend {
            weight,
            target: resolver.resolve(ns, revision, PortRef::Number(80)),
            filters: Filters::default(),
            revision: Some(Revision {
                namespace: ns.to_owned(),
                name: revision.to_owned(),
            }),
        };
        let entry = |host: &str, backends: Vec<Backend>| {
            Entry::whole_host(
                HostMatch::Exact(host.to_owned()),
                backends,
                source.clone(),
                order.clone(),
            )
        };
        let mut entries = Vec::new();
        if let Some(why) = &route.unassigned {
            // Nothing resolved yet (no ready revision, a missing one): the
            // host answers with the Route's own reason instead of a 404.
            entries.push(entry(
                &route.host,
                vec![Backend {
                    weight: 1,
                    target: Target::Unavailable(format!(
                        "Knative route {ns}/{} cannot serve: {why}",
                        route.name
                    )),
                    filters: Filters::default(),
                    revision: None,
                }],
            ));
        }
        if !route.split.is_empty() {
            let split = route.split.iter().map(|(r, p)| backend(r, *p)).collect();
            entries.push(entry(&route.host, split));
        }
        for (host, revision) in &route.tags {
            entries.push(entry(host, vec![backend(revision, 1)]));
        }
        table.entry(http_port).or_default().entries.extend(entries);
    }
}

fn add_ingresses(inputs: &Inputs<'_>, resolver: &Resolver<'_>, table: &mut Table) {
    let Some(http_port) = inputs.ingress_http_port else {
        return;
    };
    for ing in &inputs.ingresses {
        let Some(spec) = &ing.spec else { continue };
        let class = spec.ingress_class_name.as_deref().unwrap_or_default();
        if !inputs.ingress_classes.contains(class) {
            continue;
        }
        let ns = ing.metadata.namespace.as_deref().unwrap_or_default();
        let order = creation(&ing.metadata);
        let source = format!("ingress {}", order.1);
        let backend = |b: &IngressBackend| -> Backend {
            let target = match &b.service {
                Some(svc) => {
                    let port = svc.port.as_ref();
                    let port = match (
                        port.and_then(|p| p.number),
                        port.and_then(|p| p.name.as_deref()),
                    ) {
                        (Some(n), _) => PortRef::Number(n),
                        (None, Some(name)) => PortRef::Name(name),
                        (None, None) => PortRef::Number(0),
                    };
                    resolver.resolve(ns, &svc.name, port)
                }
                None => Target::Invalid("resource backends are not supported".into()),
            };
            Backend {
                weight: 1,
                target,
                filters: Filters::default(),
                revision: None,
            }
        };
        let mut entries = Vec::new();
        for rule in spec.rules.iter().flatten() {
            let host = rule
                .host
                .as_deref()
                .map_or(HostMatch::Any, HostMatch::parse);
            for p in rule.http.iter().flat_map(|h| &h.paths) {
                let path = p.path.clone().unwrap_or_else(|| "/".into());
                let path = match p.path_type.as_str() {
                    "Exact" => PathMatch::Exact(path),
                    _ => PathMatch::Prefix(path.trim_end_matches('/').to_owned()),
                };
                entries.push(Entry {
                    host: host.clone(),
                    matched: Match {
                        path,
                        method: None,
                        headers: Vec::new(),
                        query: Vec::new(),
                    },
                    filters: Filters::default(),
                    backends: vec![backend(&p.backend)],
                    source: source.clone(),
                    order: order.clone(),
                });
            }
        }
        if let Some(b) = &spec.default_backend {
            entries.push(Entry::whole_host(
                HostMatch::Any,
                vec![backend(b)],
                source.clone(),
                order.clone(),
            ));
        }
        table
            .entry(http_port)
            .or_default()
            .entries
            .extend(entries.iter().cloned());
        let tls = spec.tls.as_deref().unwrap_or_default();
        if let (Some(https), false) = (inputs.ingress_https_port, tls.is_empty()) {
            let port = table.entry(https).or_default();
            port.tls = true;
            port.entries.extend(entries);
            for t in tls {
                let Some(cert) = t
                    .secret_name
                    .as_deref()
                    .and_then(|name| secret_cert(inputs, ns, name))
                else {
                    continue;
                };
                let hosts = t.hosts.as_deref().unwrap_or_default();
                if hosts.is_empty() {
                    port.certs.push((HostMatch::Any, cert.clone()));
                }
                for h in hosts {
                    port.certs.push((HostMatch::parse(h), cert.clone()));
                }
            }
        }
    }
}

fn add_routes(inputs: &Inputs<'_>, resolver: &Resolver<'_>, table: &mut Table) {
    let gateways: Vec<&Gateway> = inputs
        .gateways
        .iter()
        .copied()
        .filter(|g| inputs.gateway_classes.contains(&g.spec.gateway_class_name))
        .collect();
    // Listeners open even with no route attached (a 404 for everything).
    for g in &gateways {
        let ns = g.metadata.namespace.as_deref().unwrap_or_default();
        for l in &g.spec.listeners {
            let Ok(port) = u16::try_from(l.port) else {
                continue;
            };
            match l.protocol.as_str() {
                "HTTP" => {
                    table.entry(port).or_default();
                }
                "HTTPS" => {
                    let t = table.entry(port).or_default();
                    t.tls = true;
                    let host = l
                        .hostname
                        .as_deref()
                        .map_or(HostMatch::Any, HostMatch::parse);
                    for r in l.tls.iter().flat_map(|t| &t.certificate_refs) {
                        let kind_ok = r.group.as_deref().unwrap_or_default().is_empty()
                            && r.kind.as_deref().unwrap_or("Secret") == "Secret";
                        let secret_ns = r.namespace.as_deref().unwrap_or(ns);
                        if kind_ok
                            && secret_ns == ns
                            && let Some(cert) = secret_cert(inputs, secret_ns, &r.name)
                        {
                            t.certs.push((host.clone(), cert));
                        }
                    }
                }
                _ => {}
            }
        }
    }
    for route in &inputs.routes {
        let route_ns = route.metadata.namespace.as_deref().unwrap_or_default();
        let order = creation(&route.metadata);
        let source = format!("httproute {}", order.1);
        let route_hosts: Vec<HostMatch> = if route.spec.hostnames.is_empty() {
            vec![HostMatch::Any]
        } else {
            route
                .spec
                .hostnames
                .iter()
                .map(|h| HostMatch::parse(h))
                .collect()
        };
        let mut rules = Vec::new();
        for rule in &route.spec.rules {
            let filters = Filters::compile(&rule.filters);
            let backends: Vec<Backend> = rule
                .backend_refs
                .iter()
                .map(|b| {
                    let target = match backend_ref_problem(route_ns, b, &inputs.services) {
                        Some((_, why)) => Target::Invalid(why),
                        None => resolver.resolve(
                            route_ns,
                            &b.name,
                            PortRef::Number(b.port.unwrap_or_default()),
                        ),
                    };
                    Backend {
                        weight: b.weight.unwrap_or(1).max(0) as u32,
                        target,
                        filters: Filters::compile(&b.filters),
                        revision: None,
                    }
                })
                .collect();
            let matches: Vec<Match> = if rule.matches.is_empty() {
                vec![compile_match(&HTTPRouteMatch::default()).expect("the default match")]
            } else {
                rule.matches.iter().filter_map(compile_match).collect()
            };
            rules.push((matches, filters, backends));
        }
        // Every listener the route attaches to, on its port.
        let mut seen = BTreeSet::new();
        for parent in &route.spec.parent_refs {
            for g in gateways.iter().filter(|g| refers_to(parent, route_ns, g)) {
                for l in attached_listeners(g, parent, route_ns, &inputs.namespaces) {
                    let Ok(port) = u16::try_from(l.port) else {
                        continue;
                    };
                    let listener_host = l
                        .hostname
                        .as_deref()
                        .map_or(HostMatch::Any, HostMatch::parse);
                    for rh in &route_hosts {
                        let Some(host) = rh.intersect(&listener_host) else {
                            continue;
                        };
                        if !seen.insert((port, format!("{host:?}"))) {
                            continue;
                        }
                        let t = table.entry(port).or_default();
                        for (matches, filters, backends) in &rules {
                            for m in matches {
                                t.entries.push(Entry {
                                    host: host.clone(),
                                    matched: m.clone(),
                                    filters: filters.clone(),
                                    backends: backends.clone(),
                                    source: source.clone(),
                                    order: order.clone(),
                                });
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
