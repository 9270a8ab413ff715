//! The gateway's data plane: a listener per port of the routing table
//! (plain HTTP, or TLS with the certificate chosen by SNI), HTTP/1.1 and
//! HTTP/2 from clients, each request matched against the table, filtered,
//! and proxied to a ready endpoint over pooled keep-alive connections.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use http::header::{HOST, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

use crate::routes::{self, Entry, RequestView, Table, Target};

type Body = BoxBody<Bytes, hyper::Error>;

/// A request's body on its way to a backend: the client's, or none (a
/// bodiless request sent again).
type Upstream = http_body_util::Either<Incoming, http_body_util::Empty<Bytes>>;

/// A backend that could not be connected to: nothing of the request was
/// sent.
struct Unreachable;

fn full(status: StatusCode, text: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(
        Full::new(text.into())
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// The table in force and what requests share.
pub(crate) struct Shared {
    table: RwLock<Arc<Table>>,
    /// Bumped with every new table, for requests held by the activator.
    version: tokio::sync::watch::Sender<u64>,
    activator: Option<Arc<crate::activator::Activator>>,
    /// Requests to Knative revisions, counted for the autoscaler.
    load: Arc<crate::load::Load>,
    client: Client<HttpConnector, Upstream>,
    /// Round-robin position per endpoint list.
    next: AtomicUsize,
    certs: Mutex<HashMap<Vec<u8>, Arc<CertifiedKey>>>,
}

impl Shared {
    pub fn new(
        activator: Option<Arc<crate::activator::Activator>>,
        load: Arc<crate::load::Load>,
    ) -> Arc<Self> {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(std::time::Duration::from_secs(5)));
        Arc::new(Self {
            table: RwLock::new(Arc::new(Table::new())),
            version: tokio::sync::watch::channel(0).0,
            activator,
            load,
            client: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(std::time::Duration::from_secs(90))
                .build(connector),
            next: AtomicUsize::new(0),
            certs: Mutex::new(HashMap::new()),
        })
    }

    pub fn set_table(&self, table: Table) {
        *self.table.write().expect("table lock") = Arc::new(table);
        self.version.send_modify(|v| *v += 1);
    }

    fn table(&self) -> Arc<Table> {
        self.table.read().expect("table lock").clone()
    }

    /// The parsed certificate for a port and SNI name.
    fn certified_key(&self, port: u16, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let table = self.table();
        let source = table.get(&port)?.cert_for(sni)?;
        let mut cache = self.certs.lock().expect("cert cache lock");
        let mut id = source.cert_pem.clone();
        id.extend_from_slice(&source.key_pem);
        if let Some(k) = cache.get(&id) {
            return Some(k.clone());
        }
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&source.cert_pem)
            .collect::<Result<_, _>>()
            .ok()?;
        let key = PrivateKeyDer::from_pem_slice(&source.key_pem).ok()?;
        let provider = rustls::crypto::CryptoProvider::get_default()
            .cloned()
            .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()));
        match CertifiedKey::from_der(chain, key, &provider) {
            Ok(k) => {
                let k = Arc::new(k);
                if cache.len() > 1024 {
                    cache.clear();
                }
                cache.insert(id, k.clone());
                Some(k)
            }
            Err(e) => {
                tracing::warn!(secret = %source.secret, error = %e, "a TLS Secret does not hold a usable certificate and key");
                None
            }
        }
    }
}

/// Chooses a port's certificate by SNI from the current table.
#[derive(Debug)]
struct SniResolver {
    port: u16,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

impl rustls::server::ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.shared.certified_key(self.port, hello.server_name())
    }
}

/// The listening sockets, one task each, kept in step with the table.
pub(crate) struct Listeners {
    address: IpAddr,
    bound: BTreeMap<u16, (bool, tokio::task::JoinHandle<()>)>,
    /// Ports that could not be bound, so each failure is logged once.
    failed: BTreeMap<u16, String>,
}

impl Listeners {
    pub fn new(address: IpAddr) -> Self {
        Self {
            address,
            bound: BTreeMap::new(),
            failed: BTreeMap::new(),
        }
    }

    /// Opens the table's ports not open yet and closes those it no longer
    /// has. A port that cannot be bound (in use, or below 1024 without
    /// root) is reported and tried again on the next change.
    pub fn reconcile(&mut self, table: &Table, shared: &Arc<Shared>) {
        let stale: Vec<u16> = self
            .bound
            .iter()
            .filter(|(port, (tls, _))| table.get(port).is_none_or(|t| t.tls != *tls))
            .map(|(p, _)| *p)
            .collect();
        for port in stale {
            if let Some((_, task)) = self.bound.remove(&port) {
                task.abort();
                tracing::info!(port, "gateway listener closed");
            }
        }
        for (port, t) in table {
            if self.bound.contains_key(port) {
                continue;
            }
            let addr = SocketAddr::new(self.address, *port);
            match bind(addr) {
                Ok(listener) => {
                    self.failed.remove(port);
                    let tls = t.tls.then(|| tls_acceptor(*port, shared.clone()));
                    let task = tokio::spawn(accept_loop(listener, tls, shared.clone(), *port));
                    self.bound.insert(*port, (t.tls, task));
                    tracing::info!(%addr, tls = t.tls, "gateway listening");
                }
                Err(e) => {
                    let message = e.to_string();
                    if self.failed.get(port) != Some(&message) {
                        tracing::warn!(%addr, error = %message, "the gateway cannot listen here; routes on this port are not served from this node");
                        self.failed.insert(*port, message);
                    }
                }
            }
        }
    }

    /// The ports bound now.
    pub fn ports(&self) -> Vec<u16> {
        self.bound.keys().copied().collect()
    }
}

impl Drop for Listeners {
    fn drop(&mut self) {
        for (_, (_, task)) in std::mem::take(&mut self.bound) {
            task.abort();
        }
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

fn tls_acceptor(port: u16, shared: Arc<Shared>) -> tokio_rustls::TlsAcceptor {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("the default protocol versions")
    .with_no_client_auth()
    .with_cert_resolver(Arc::new(SniResolver { port, shared }));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shared: Arc<Shared>,
    port: u16,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "accept failed");
                continue;
            }
        };
        let (shared, tls) = (shared.clone(), tls.clone());
        let scheme = tls_scheme(tls.is_some());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move {
                    Ok::<_, std::convert::Infallible>(
                        handle(&shared, port, peer, scheme, req).await,
                    )
                }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let result = match tls {
                Some(acceptor) => match acceptor.accept(stream).await {
                    Ok(stream) => {
                        builder
                            .serve_connection_with_upgrades(TokioIo::new(stream), service)
                            .await
                    }
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                },
                None => {
                    builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "gateway connection ended");
            }
        });
    }
}

fn tls_scheme(tls: bool) -> &'static str {
    if tls { "https" } else { "http" }
}

fn query_pairs(query: Option<&str>) -> Vec<(String, String)> {
    query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

/// The request's host without a port, lower-cased.
fn request_host<B>(req: &Request<B>) -> String {
    let raw = req
        .uri()
        .host()
        .map(str::to_owned)
        .or_else(|| {
            req.headers()
                .get(HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_default();
    let host = match raw.rsplit_once(':') {
        Some((h, port)) if !h.ends_with(']') && port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => raw.as_str(),
    };
    host.to_ascii_lowercase()
}

async fn handle(
    shared: &Shared,
    port: u16,
    peer: SocketAddr,
    scheme: &'static str,
    req: Request<Incoming>,
) -> Response<Body> {
    let req = req.map(http_body_util::Either::Left);
    let table = shared.table();
    let Some(port_table) = table.get(&port) else {
        return full(StatusCode::NOT_FOUND, "no route\n");
    };
    let host = request_host(&req);
    let query = query_pairs(req.uri().query());
    let path = req.uri().path().to_owned();
    let view = RequestView {
        host: &host,
        path: &path,
        method: req.method().as_str(),
        headers: req.headers(),
        query: &query,
    };
    let Some(entry) = port_table.route(&view) else {
        return full(
            StatusCode::NOT_FOUND,
            format!(
                "no Ingress rule or HTTPRoute on port {port} matches host {host:?} path {path:?}\n"
            ),
        );
    };
    if let Some(redirect) = &entry.filters.redirect {
        return redirect_response(redirect, entry, scheme, &host, port, req.uri());
    }
    let total = entry.total_weight();
    if total == 0 {
        // No backends (or all weighted 0): the specification's 500.
        return full(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!(
                "{} has no backend with a weight above 0 for this request\n",
                entry.source
            ),
        );
    }
    let draw = rand::random_range(0..total);
    let backend = entry
        .pick(draw)
        .expect("a draw below the total weight picks a backend");
    let endpoints = match &backend.target {
        Target::Invalid(why) => {
            tracing::debug!(route = %entry.source, reason = %why, "request to an unresolved backend");
            return full(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!(
                    "{}: a backend does not resolve; its status conditions say why\n",
                    entry.source
                ),
            );
        }
        Target::Unavailable(why) => {
            return full(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n"));
        }
        Target::Endpoints(e) if e.is_empty() => {
            if let (Some(rev), Some(activator)) = (&backend.revision, &shared.activator) {
                let rev = rev.clone();
                drop(table);
                let in_flight = shared.load.start(&rev);
                let response = hold(shared, activator, port, peer, scheme, rev, req).await;
                return counted(response, in_flight);
            }
            return full(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "{}: the backend Service has no ready endpoint\n",
                    entry.source
                ),
            );
        }
        Target::Endpoints(e) => e.clone(),
    };
    let endpoint = endpoints[shared.next.fetch_add(1, Ordering::Relaxed) % endpoints.len()];
    let in_flight = backend.revision.as_ref().map(|r| shared.load.start(r));
    // A revision's endpoint may be one its routing has not dropped yet (its
    // pod just went, the revision scaling to zero): a bodiless request
    // that cannot connect to it is held for the next pod instead.
    let again = match (&backend.revision, &shared.activator) {
        (Some(rev), Some(activator)) => resend(&req).map(|r| (rev.clone(), activator, r)),
        _ => None,
    };
    let response = match forward(shared, entry, backend, endpoint, peer, scheme, &host, req).await {
        Ok(response) => response,
        Err(Unreachable) => match again {
            Some((rev, activator, req)) => {
                hold(shared, activator, port, peer, scheme, rev, req).await
            }
            None => bad_gateway(),
        },
    };
    match in_flight {
        Some(in_flight) => counted(response, in_flight),
        None => response,
    }
}

/// A response whose request stays counted in flight until its body ends.
fn counted(response: Response<Body>, in_flight: crate::load::InFlight) -> Response<Body> {
    response.map(|inner| {
        Counted {
            inner,
            _in_flight: in_flight,
        }
        .boxed()
    })
}

struct Counted {
    inner: Body,
    _in_flight: crate::load::InFlight,
}

impl hyper::body::Body for Counted {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Holds a request for a Knative revision with no ready pod: wakes the
/// revision and forwards the request to the first of its pods that accepts
/// a connection (probed as soon as a pod has its own address) or that the
/// routing table lists as a ready endpoint; a revision that cannot run, or
/// a wait past the activator's limit, ends it with a clear error.
async fn hold(
    shared: &Shared,
    activator: &crate::activator::Activator,
    port: u16,
    peer: SocketAddr,
    scheme: &'static str,
    rev: crate::routes::Revision,
    mut req: Request<Upstream>,
) -> Response<Body> {
    /// How soon a pod that refused the probe (its guest not listening yet)
    /// is probed again.
    const PROBE_AGAIN: std::time::Duration = std::time::Duration::from_millis(2);
    /// The longest a probe's connect may take on the node's own links.
    const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(50);
    let deadline = tokio::time::Instant::now() + activator.timeout;
    let mut versions = shared.version.subscribe();
    let mut pod_changes = activator.pod_changes.clone();
    activator.wake(&rev).await;
    let host = request_host(&req);
    let query = query_pairs(req.uri().query());
    let path = req.uri().path().to_owned();
    // Endpoints of the routing table that could not be connected to (gone
    // since it listed them): not taken from it again until it changes. (A
    // pod's address is probed anyway: a new pod may have the old one's.)
    let mut unreachable = std::collections::HashSet::new();
    loop {
        versions.borrow_and_update();
        pod_changes.borrow_and_update();
        let table = shared.table();
        let found = {
            let view = RequestView {
                host: &host,
                path: &path,
                method: req.method().as_str(),
                headers: req.headers(),
                query: &query,
            };
            table
                .get(&port)
                .and_then(|p| p.route(&view))
                .and_then(|entry| {
                    let i = entry
                        .backends
                        .iter()
                        .position(|b| b.revision.as_ref() == Some(&rev))?;
                    let ready = match &entry.backends[i].target {
                        Target::Endpoints(e) => {
                            e.iter().find(|e| !unreachable.contains(*e)).copied()
                        }
                        _ => None,
                    };
                    Some((entry, i, ready))
                })
        };
        let Some((entry, i, ready)) = found else {
            return full(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "revision {}/{} is no longer routed here\n",
                    rev.namespace, rev.name
                ),
            );
        };
        let mut waiting_for_listen = false;
        let endpoint = match ready {
            Some(e) => Some(e),
            None => {
                let mut accepting = None;
                for addr in activator.pod_addresses(&rev) {
                    // Bounded: a lost SYN is not waited out (its retry is
                    // a second away); the next probe sends a new one.
                    let probe =
                        tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(addr));
                    match probe.await {
                        Ok(Ok(_)) => {
                            accepting = Some(addr);
                            break;
                        }
                        Ok(Err(_)) | Err(_) => waiting_for_listen = true,
                    }
                }
                accepting
            }
        };
        if let Some(endpoint) = endpoint {
            let backend = &entry.backends[i];
            let again = resend(&req);
            match forward(shared, entry, backend, endpoint, peer, scheme, &host, req).await {
                Ok(response) => return response,
                Err(Unreachable) => match again {
                    Some(next) => {
                        unreachable.insert(endpoint);
                        req = next;
                        continue;
                    }
                    None => return bad_gateway(),
                },
            }
        }
        drop(table);
        if let Some(why) = activator.failure(&rev) {
            return full(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "revision {}/{} cannot serve: {why}\n",
                    rev.namespace, rev.name
                ),
            );
        }
        let probe_again = async {
            if waiting_for_listen {
                tokio::time::sleep(PROBE_AGAIN).await
            } else {
                std::future::pending().await
            }
        };
        tokio::select! {
            changed = versions.changed() => {
                if changed.is_err() {
                    return full(StatusCode::SERVICE_UNAVAILABLE, "the gateway is stopping\n");
                }
                unreachable.clear();
            },
            _ = pod_changes.changed() => {}
            () = probe_again => {}
            () = tokio::time::sleep_until(deadline) => {
                return full(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "revision {}/{} had no ready pod within {:?}\n",
                        rev.namespace, rev.name, activator.timeout
                    ),
                );
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn forward(
    shared: &Shared,
    entry: &Entry,
    backend: &routes::Backend,
    endpoint: SocketAddr,
    peer: SocketAddr,
    scheme: &'static str,
    host: &str,
    req: Request<Upstream>,
) -> Result<Response<Body>, Unreachable> {
    let (mut parts, body) = req.into_parts();
    let original_path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into());
    let mut path_and_query = original_path.clone();
    let mut host_header = parts.headers.get(HOST).cloned().or_else(|| {
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    for filters in [&entry.filters, &backend.filters] {
        if let Some(rw) = &filters.rewrite {
            if let Some(h) = &rw.hostname
                && let Ok(v) = HeaderValue::from_str(h)
            {
                host_header = Some(v);
            }
            if let Some(p) = &rw.path {
                path_and_query = rewrite_path(p, &entry.matched.path, &original_path);
            }
        }
        if let Some(m) = &filters.request_headers {
            modify_headers(&mut parts.headers, m);
        }
    }
    // HTTP/2 clients send no Host; backends get HTTP/1.1 with one.
    parts.version = http::Version::HTTP_11;
    if let Some(h) = host_header {
        parts.headers.insert(HOST, h);
    }
    let forwarded_for = match parts
        .headers
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
    {
        Some(prev) => format!("{prev}, {}", peer.ip()),
        None => peer.ip().to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&forwarded_for) {
        parts.headers.insert("x-forwarded-for", v);
    }
    parts
        .headers
        .insert("x-forwarded-proto", HeaderValue::from_static(scheme));
    if let Ok(v) = HeaderValue::from_str(host) {
        parts.headers.insert("x-forwarded-host", v);
    }
    remove_hop_headers(&mut parts.headers);
    parts.uri = match Uri::builder()
        .scheme("http")
        .authority(endpoint.to_string())
        .path_and_query(path_and_query)
        .build()
    {
        Ok(u) => u,
        Err(e) => {
            return Ok(full(
                StatusCode::BAD_REQUEST,
                format!("bad request path: {e}\n"),
            ));
        }
    };
    match shared
        .client
        .request(Request::from_parts(parts, body))
        .await
    {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            remove_hop_headers(&mut parts.headers);
            for filters in [&entry.filters, &backend.filters] {
                if let Some(m) = &filters.response_headers {
                    modify_headers(&mut parts.headers, m);
                }
            }
            Ok(Response::from_parts(parts, body.boxed()))
        }
        Err(e) => {
            tracing::debug!(%endpoint, route = %entry.source, error = %e, "upstream request failed");
            if e.is_connect() {
                Err(Unreachable)
            } else {
                Ok(bad_gateway())
            }
        }
    }
}

/// The answer when a backend could not be reached.
fn bad_gateway() -> Response<Body> {
    full(StatusCode::BAD_GATEWAY, "upstream connect error\n")
}

/// The request again, if it has no body (so nothing is lost by sending it
/// anew after a failed connect).
fn resend(req: &Request<Upstream>) -> Option<Request<Upstream>> {
    use hyper::body::Body as _;
    if !req.body().is_end_stream() {
        return None;
    }
    let mut again = Request::new(http_body_util::Either::Right(http_body_util::Empty::new()));
    *again.method_mut() = req.method().clone();
    *again.uri_mut() = req.uri().clone();
    *again.version_mut() = req.version();
    *again.headers_mut() = req.headers().clone();
    Some(again)
}

/// Connection-level headers a proxy does not pass on (RFC 9110 7.6.1).
fn remove_hop_headers(headers: &mut http::HeaderMap) {
    for h in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
    ] {
        headers.remove(h);
    }
}

fn modify_headers(headers: &mut http::HeaderMap, m: &wasmkube_api::gateway_api::HTTPHeaderFilter) {
    let parse = |h: &wasmkube_api::gateway_api::HTTPHeader| {
        Some((
            HeaderName::from_bytes(h.name.as_bytes()).ok()?,
            HeaderValue::from_str(&h.value).ok()?,
        ))
    };
    for (name, value) in m.set.iter().filter_map(parse) {
        headers.insert(name, value);
    }
    for (name, value) in m.add.iter().filter_map(parse) {
        headers.append(name, value);
    }
    for name in &m.remove {
        headers.remove(name.as_str());
    }
}

/// The path after a `ReplaceFullPath` or `ReplacePrefixMatch` modifier,
/// with the query kept.
fn rewrite_path(
    m: &wasmkube_api::gateway_api::HTTPPathModifier,
    matched: &routes::PathMatch,
    original: &str,
) -> String {
    let (path, query) = match original.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (original, None),
    };
    let new = match (m.type_.as_str(), matched) {
        ("ReplaceFullPath", _) => m.replace_full_path.clone().unwrap_or_else(|| "/".into()),
        ("ReplacePrefixMatch", routes::PathMatch::Prefix(prefix)) => {
            let rest = &path[prefix.len().min(path.len())..];
            let replacement = m.replace_prefix_match.as_deref().unwrap_or("/");
            let joined = format!(
                "{}/{}",
                replacement.trim_end_matches('/'),
                rest.trim_start_matches('/')
            );
            if rest.is_empty() && !replacement.ends_with('/') && replacement != "/" {
                joined.trim_end_matches('/').to_owned()
            } else {
                joined
            }
        }
        _ => path.to_owned(),
    };
    match query {
        Some(q) => format!("{new}?{q}"),
        None => new,
    }
}

fn redirect_response(
    r: &wasmkube_api::gateway_api::HTTPRequestRedirectFilter,
    entry: &Entry,
    scheme: &str,
    host: &str,
    port: u16,
    uri: &Uri,
) -> Response<Body> {
    let scheme = r.scheme.as_deref().unwrap_or(scheme);
    let host = r.hostname.as_deref().unwrap_or(host);
    // The port: the filter's, else the listener's unless the scheme
    // changed (then the scheme's default).
    let port = match (r.port, r.scheme.is_some()) {
        (Some(p), _) => Some(p as u16),
        (None, true) => None,
        (None, false) => Some(port),
    };
    let port = port
        .filter(|p| !matches!((scheme, p), ("http", 80) | ("https", 443)))
        .map(|p| format!(":{p}"))
        .unwrap_or_default();
    let original = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let path = match &r.path {
        Some(m) => rewrite_path(m, &entry.matched.path, original),
        None => original.to_owned(),
    };
    let mut resp = full(
        StatusCode::from_u16(r.status_code.unwrap_or(302) as u16).unwrap_or(StatusCode::FOUND),
        "",
    );
    if let Ok(v) = HeaderValue::from_str(&format!("{scheme}://{host}{port}{path}")) {
        resp.headers_mut().insert(http::header::LOCATION, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A revision's endpoint that went away while the routing table still
    /// lists it (its pod gone, the revision scaling to zero): a bodiless
    /// request that cannot connect to it is held by the activator and goes
    /// to the revision's pod that accepts, instead of failing with 502.
    #[tokio::test]
    async fn a_request_for_a_gone_endpoint_goes_to_a_live_pod_of_the_revision() {
        // The revision's live pod: an HTTP server answering "live".
        let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let live_addr = live.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((socket, _)) = live.accept().await {
                let answer = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from_static(
                        b"live",
                    ))))
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(socket), answer),
                );
            }
        });
        // An endpoint nobody listens on any more.
        let gone = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let rev = routes::Revision {
            namespace: "default".into(),
            name: "fn-00001".into(),
        };
        // The activator: the API answers 404 (the wake finds no Deployment,
        // which does not matter here); its pod cache has the live pod.
        let api = tower::service_fn(|_req: http::Request<kube::client::Body>| async {
            let status = serde_json::json!({"kind": "Status", "apiVersion": "v1",
                "status": "Failure", "reason": "NotFound", "code": 404});
            Ok::<_, std::convert::Infallible>(
                http::Response::builder()
                    .status(404)
                    .header("content-type", "application/json")
                    .body(kube::client::Body::from(status.to_string().into_bytes()))
                    .unwrap(),
            )
        });
        let client = kube::Client::new(api, "default");
        let (pods, mut writer) =
            kube::runtime::reflector::store::<k8s_openapi::api::core::v1::Pod>();
        let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "fn-00001-pod", "namespace": "default",
                "labels": {wasmkube_api::knative::labels::REVISION: "fn-00001"}},
            "spec": {"containers": [{"name": "f", "ports": [{"containerPort": live_addr.port()}]}]},
            "status": {"phase": "Running", "podIP": "127.0.0.1", "hostIP": "192.0.2.1"},
        }))
        .unwrap();
        writer.apply_watcher_event(&kube::runtime::watcher::Event::Apply(pod));
        let activator = Arc::new(crate::activator::Activator::new(
            client,
            wasmkube_proxy::views::Views::empty(),
            (pods, tokio::sync::watch::channel(0).1),
            std::time::Duration::from_secs(10),
        ));
        let shared = Shared::new(Some(activator), Arc::default());
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut table = Table::new();
        table.insert(
            port,
            routes::PortTable {
                entries: vec![Entry::whole_host(
                    routes::HostMatch::Any,
                    vec![routes::Backend {
                        weight: 1,
                        target: Target::Endpoints(Arc::new(vec![gone])),
                        filters: Default::default(),
                        revision: Some(rev),
                    }],
                    "default/fn".into(),
                    Default::default(),
                )],
                ..Default::default()
            },
        );
        shared.set_table(table.clone());
        let mut listeners = Listeners::new(IpAddr::from([127, 0, 0, 1]));
        listeners.reconcile(&table, &shared);

        let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(connection);
        let request = Request::get("/")
            .header(HOST, "fn.default.example.com")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"live");
    }
}
