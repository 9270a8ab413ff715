//! The Kubernetes-compatible API server: REST semantics over the store, watch
//! from a shared cache, patches and server-side apply, discovery and OpenAPI.
//!
//! **Architecture invariant:** this is the only crate that talks to the
//! store. Everything else (scheduler, controllers, node agents, kubectl) goes
//! through the HTTP API it serves.

mod admission;
mod admission_policies;
mod admission_webhooks;
pub mod audit;
mod auth;
mod crd_conversion;
mod crds;
pub mod dashboard;
mod discovery;
pub mod encryption;
mod error;
pub use node_proxy::{
    TOKEN_NAMESPACE as NODE_PROXY_TOKEN_NAMESPACE, TOKEN_SECRET as NODE_PROXY_TOKEN_SECRET,
};
mod fields;
mod follow;
pub mod identity;
mod listen;
mod merge_keys;
mod metrics;
mod node_proxy;
mod openapi;
mod params;
mod patch;
mod protobuf;
mod quota;
mod request;
mod rest;
mod services;
mod storage;
mod storage_metrics;
mod watch;
mod watch_cache;
mod watch_socket;
mod webhook;

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use wasmkube_api::registry;
use wasmkube_store::SharedStore;

pub use auth::{AUTHENTICATED, Authentication, MASTERS, Peer, TokenFileError, UserInfo};
pub use error::ApiError;
use watch_cache::WatchCache;

/// API server settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// Largest accepted request body (Kubernetes allows 3 MiB).
    pub max_body_bytes: usize,
    /// Events kept for watchers resuming from a recent resourceVersion.
    pub watch_cache_size: usize,
    /// How often idle watches that asked for bookmarks get one.
    pub bookmark_interval: Duration,
    /// The range Service cluster IPs are allocated from; its first address
    /// is the `kubernetes` Service's.
    pub service_cidr: (Ipv4Addr, u8),
    /// The range NodePort and LoadBalancer Services' node ports are
    /// allocated from (Kubernetes' `--service-node-port-range`).
    pub node_ports: std::ops::RangeInclusive<u16>,
    /// The cluster DNS address, reserved as the `kube-system/kube-dns`
    /// Service's cluster IP (every node serves DNS on it itself).
    pub cluster_dns: Option<Ipv4Addr>,
    /// `tolerationSeconds` of the not-ready/unreachable NoExecute
    /// tolerations every pod gets (Kubernetes' DefaultTolerationSeconds):
    /// how long its pods stay on a node that stopped reporting.
    pub default_toleration_seconds: i64,
    /// Authentication and RBAC on every request; `None` allows everything
    /// (kube-apiserver's `AlwaysAllow`), for servers only tests reach.
    pub authentication: Option<Authentication>,
    /// The cluster CA: served at `/cacerts` (where a joining node fetches
    /// it and checks it against its join token) and signing the node
    /// certificates of approved CertificateSigningRequests.
    pub ca: Option<Arc<wasmkube_pki::Ca>>,
    /// The longest life of a certificate the CA signs for a
    /// CertificateSigningRequest (kube-controller-manager's
    /// `--cluster-signing-duration`).
    pub signing_duration: Duration,
    /// Encryption at rest of the resources it names (Secrets); stale
    /// values are rewritten at start.
    pub encryption: Option<Arc<encryption::EncryptionConfig>>,
    /// Signs and verifies service-account tokens (the TokenRequest API).
    pub service_accounts: Option<Arc<wasmkube_pki::TokenSigner>>,
    /// The audit policy and log (with authentication on).
    pub audit: Option<Arc<audit::Audit>>,
    /// The built-in registry's address (`HOST:PORT`), named in the tokens
    /// `GET /registry/token` gives out; `None` serves no such tokens.
    pub registry: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_body_bytes: 3 * 1024 * 1024,
            watch_cache_size: 10_000,
            bookmark_interval: Duration::from_secs(60),
            service_cidr: (Ipv4Addr::new(10, 96, 0, 0), 12),
            node_ports: 30000..=32767,
            cluster_dns: Some(Ipv4Addr::new(10, 96, 0, 10)),
            default_toleration_seconds: 300,
            authentication: None,
            ca: None,
            signing_duration: auth::csr::SIGNING_DURATION,
            encryption: None,
            service_accounts: None,
            audit: None,
            registry: None,
        }
    }
}

/// A running API server's state; serve it with [`ApiServer::router`].
pub struct ApiServer {
    store: SharedStore,
    /// The store under encryption at rest (the same store without it):
    /// snapshots copy what is stored, sealed.
    stored: SharedStore,
    cache: Arc<WatchCache>,
    config: Config,
    /// The agents' stats, gathered at most once per short interval however
    /// many metrics reads arrive in it (see `node_proxy::node_stats`).
    node_stats: node_proxy::StatsCache,
    /// Keeps the custom types served in step with the stored CRDs.
    _crds: crds::Follower,
    /// The admission webhooks, kept in step with their configurations.
    webhooks: admission_webhooks::Webhooks,
    /// Counts the stored objects for `apiserver_storage_objects`, from
    /// when the system objects exist.
    objects: std::sync::OnceLock<storage_metrics::ObjectCounter>,
    /// Authentication and authorization, when on.
    auth: Option<auth::Auth>,
    /// The audit log, when on.
    audit: Option<Arc<audit::Audit>>,
    /// With a cluster CA: how this server reaches node agents (mutual TLS,
    /// see `node_proxy::dial`); without one, plain HTTP with the node-proxy
    /// token.
    agent_tls: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer")
            .field("store", &self.store)
            .field("config", &self.config)
            .finish()
    }
}

/// Where `wasmkube snapshot save` reads a consistent snapshot of the store
/// (a non-resource path: under RBAC, for cluster administrators only).
/// Values under encryption at rest stay sealed in it.
pub const SNAPSHOT_PATH: &str = "/wasmkube/v1/snapshot";

/// Streams every key as of the current revision (see
/// [`wasmkube_store::snapshot`]).
async fn snapshot(
    axum::extract::State(server): axum::extract::State<Arc<ApiServer>>,
) -> axum::response::Response {
    let stream = wasmkube_store::snapshot::save(server.stored.clone(), "/".into());
    axum::response::Response::builder()
        .header(axum::http::header::CONTENT_TYPE, "application/octet-stream")
        .body(axum::body::Body::from_stream(stream))
        .expect("a valid response")
}

/// The cluster CA (PEM), for nodes joining with a token that pins its hash.
async fn cacerts(State(server): State<Arc<ApiServer>>) -> Response {
    match &server.config.ca {
        Some(ca) => (
            [(axum::http::header::CONTENT_TYPE, "application/x-pem-file")],
            ca.cert_pem().to_owned(),
        )
            .into_response(),
        None => ApiError::NoRoute.into_response(),
    }
}

/// Namespaces every cluster has.
const SYSTEM_NAMESPACES: &[&str] = &["default", "kube-system", "kube-public", "kube-node-lease"];

/// Serves `router` over TLS on `listener` as the API server serves itself
/// (a task per handshake, HTTP/1.1 with upgrades or HTTP/2 by ALPN), until
/// the future is dropped: for the built-in registry off loopback.
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    router: Router,
) -> std::io::Result<()> {
    listen::serve(listener, Some(tls), router).await
}

impl ApiServer {
    /// Starts the watch cache and creates the system namespaces if missing.
    /// Must be called inside a Tokio runtime.
    pub async fn start(store: SharedStore, config: Config) -> Result<Arc<Self>, ApiError> {
        let store = storage_metrics::wrap(store);
        let stored = store.clone();
        let store = match &config.encryption {
            Some(encryption) => {
                let rewritten = encryption::rewrite_stale(&store, encryption)
                    .await
                    .map_err(ApiError::internal)?;
                if rewritten > 0 {
                    tracing::info!(
                        rewritten,
                        "values sealed again under the first encryption key"
                    );
                }
                encryption::wrap(store, encryption.clone())
            }
            None => store,
        };
        let cache = WatchCache::start(store.clone(), config.watch_cache_size);
        let crds = crds::Follower::start(store.clone()).await;
        let webhooks = admission_webhooks::Webhooks::start(store.clone()).await;
        let auth = match config.authentication.clone() {
            Some(authentication) => Some(auth::Auth::new(
                authentication,
                auth::rbac::Rbac::start(store.clone()).await,
                auth::node::NodeAuthorizer::start(store.clone()).await,
            )),
            None => None,
        };
        let audit = config.audit.clone();
        let agent_tls = match &config.ca {
            Some(ca) => Some(node_proxy::agent_tls(ca).map_err(ApiError::internal)?),
            None => None,
        };
        let server = Arc::new(Self {
            store,
            stored,
            cache,
            config,
            node_stats: Default::default(),
            agent_tls,
            _crds: crds,
            webhooks,
            objects: Default::default(),
            auth,
            audit,
        });
        server._crds.attach(&server);
        let ns = registry::lookup("", "v1", "namespaces").expect("namespaces are served");
        for name in SYSTEM_NAMESPACES {
            let body = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
            match rest::create_internal(&server, ns, None, body).await {
                Ok(_) | Err(ApiError::AlreadyExists(_)) => {}
                Err(e) => return Err(e),
            }
        }
        let pcs = registry::lookup("scheduling.k8s.io", "v1", "priorityclasses")
            .expect("priorityclasses are served");
        for (name, value, description) in admission::SYSTEM_PRIORITY_CLASSES {
            let body = json!({
                "apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
                "metadata": {"name": name}, "value": value, "description": description,
            });
            match rest::create_internal(&server, pcs, None, body).await {
                Ok(_) | Err(ApiError::AlreadyExists(_)) => {}
                Err(e) => return Err(e),
            }
        }
        auth::bootstrap::ensure(&server).await?;
        // Agents of a cluster with a CA are reached over mutual TLS: they
        // need no shared token (one every node could read and use against
        // every other node's agent).
        if server.agent_tls.is_none() {
            node_proxy::ensure_token(&server).await?;
        } else {
            // One an earlier version made is of no use to anyone now.
            let secrets = registry::lookup("", "v1", "secrets").expect("secrets are served");
            match rest::delete_internal(
                &server,
                secrets,
                Some(NODE_PROXY_TOKEN_NAMESPACE),
                NODE_PROXY_TOKEN_SECRET,
            )
            .await
            {
                Ok(_) | Err(ApiError::NotFound(..)) => {}
                Err(e) => return Err(e),
            }
        }
        services::ensure_system_services(&server).await?;
        ensure_builtin_classes(&server).await?;
        // It reads what is stored, sealed or not: only keys count.
        let _ = server
            .objects
            .set(storage_metrics::count_objects(Arc::downgrade(
                &server.stored,
            )));
        Ok(server)
    }

    /// Compacts store history up to `revision`; watches and continue tokens
    /// from before it get `410 Gone` afterwards.
    pub async fn compact(&self, revision: u64) -> Result<(), ApiError> {
        self.store
            .compact(revision)
            .await
            .map_err(ApiError::internal)?;
        self.cache.truncate(revision);
        Ok(())
    }

    /// The store revision of the last acknowledged write.
    pub fn current_revision(&self) -> u64 {
        self.store.current_revision()
    }

    /// Serves the API on `listener` (plain TCP; see `listen.rs`) until the
    /// future is dropped or fails.
    pub async fn serve(self: &Arc<Self>, listener: tokio::net::TcpListener) -> std::io::Result<()> {
        listen::serve(listener, None, self.router()).await
    }

    /// Serves the API over TLS on `listener` (see `listen.rs`): client
    /// certificates the configuration verifies authenticate their
    /// connections' requests.
    pub async fn serve_tls(
        self: &Arc<Self>,
        listener: tokio::net::TcpListener,
        tls: Arc<rustls::ServerConfig>,
    ) -> std::io::Result<()> {
        listen::serve(listener, Some(tls), self.router()).await
    }

    /// The HTTP routes.
    pub fn router(self: &Arc<Self>) -> Router {
        let ok = || async { "ok" };
        Router::new()
            .route(
                "/version",
                get(|| async { axum::Json(discovery::version()) }),
            )
            .route(
                "/version/",
                get(|| async { axum::Json(discovery::version()) }),
            )
            .route("/healthz", get(ok))
            .route("/livez", get(ok))
            .route("/readyz", get(ok))
            .route("/metrics", get(metrics::serve))
            .route(SNAPSHOT_PATH, get(snapshot))
            .route("/cacerts", get(cacerts))
            .route(
                wasmkube_api::images::TOKEN_PATH,
                get(auth::image_registry::issue),
            )
            .route(
                "/api",
                get(|| async { axum::Json(discovery::api_versions()) }),
            )
            .route(
                "/api/",
                get(|| async { axum::Json(discovery::api_versions()) }),
            )
            .route(
                "/apis",
                get(|| async { axum::Json(discovery::api_groups()) }),
            )
            .route(
                "/apis/",
                get(|| async { axum::Json(discovery::api_groups()) }),
            )
            .route(dashboard::PATH, get(dashboard::redirect))
            .route("/dashboard/", get(dashboard::file))
            .route(
                "/dashboard/api/namespaces/{namespace}/pods/{name}/usage",
                get(usage_history),
            )
            .route("/dashboard/{*file}", get(dashboard::file))
            .route("/openapi/v2", get(openapi::v2))
            .route("/openapi/v3", get(openapi::v3_index))
            .route("/openapi/v3/{*path}", get(openapi::v3_group_version))
            .fallback(resources)
            .layer(axum::middleware::from_fn_with_state(
                self.clone(),
                auth::middleware,
            ))
            .layer(axum::middleware::from_fn(metrics::track))
            .with_state(self.clone())
    }
}

/// The dashboard's one data path: a pod's recent usage, from its node.
async fn usage_history(
    State(server): State<Arc<ApiServer>>,
    axum::extract::Path((namespace, name)): axum::extract::Path<(String, String)>,
    req: Request<Body>,
) -> Response {
    let user = req.extensions().get::<UserInfo>().cloned();
    node_proxy::pod_usage_history(&server, user, &namespace, &name)
        .await
        .unwrap_or_else(|e| e.into_response())
}

async fn resources(State(server): State<Arc<ApiServer>>, req: Request<Body>) -> Response {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().trim_end_matches('/');
    if parts.method == Method::GET && path.starts_with("/apis/metrics.k8s.io/v1beta1/") {
        return node_proxy::metrics(&server, path, parts.uri.query())
            .await
            .unwrap_or_else(|e| e.into_response());
    }
    if parts.method == Method::GET && path.starts_with("/apis/custom.metrics.k8s.io/v1beta2/") {
        return node_proxy::custom_metrics(&server, path, parts.uri.query())
            .await
            .unwrap_or_else(|e| e.into_response());
    }
    if watch_socket::wanted(&parts) {
        let user = parts.extensions.get::<UserInfo>().cloned();
        return watch_socket::serve(server, parts, user).await;
    }
    if parts.method == Method::GET {
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let discovered = match segments.as_slice() {
            ["api", version] => discovery::resource_list("", version),
            ["apis", group] => discovery::api_group(group),
            ["apis", group, version] => discovery::resource_list(group, version),
            _ => None,
        };
        if let Some(body) = discovered {
            return (StatusCode::OK, axum::Json(body)).into_response();
        }
    }
    // The resource paths served apart from the REST verbs (the path is
    // parsed once here; `rest::handle` parses it for the rest).
    let target = request::parse(parts.uri.path()).ok().flatten().map(|t| {
        (
            t.rt,
            t.namespace.map(str::to_owned),
            t.name.map(str::to_owned),
            t.subresource,
        )
    });
    let user = parts.extensions.get::<UserInfo>().cloned();
    let Some((rt, namespace, name, subresource)) = target else {
        return rest::handle(server, parts.method, parts.uri, parts.headers, user, body).await;
    };
    use wasmkube_api::Subresource::{Attach, Exec, PortForward, Token};
    let post = parts.method == Method::POST;
    let answer = match (subresource, name.as_deref()) {
        _ if registry::is_review(rt) => {
            if post && name.is_none() {
                auth::review::create(
                    &server,
                    rt,
                    namespace.as_deref(),
                    user,
                    &parts.headers,
                    body,
                )
                .await
            } else {
                Err(ApiError::MethodNotAllowed)
            }
        }
        (Some(Token), Some(name)) if post => {
            let namespace = namespace.as_deref().unwrap_or_default();
            auth::token::request(
                &server,
                namespace,
                name,
                user.as_ref(),
                &parts.headers,
                body,
            )
            .await
        }
        (None, None) if post && rt.kind == "CertificateSigningRequest" => {
            auth::csr::create(&server, rt, user, &parts.headers, body).await
        }
        (Some(wasmkube_api::Subresource::Approval), Some(name)) if parts.method != Method::GET => {
            if parts.method == Method::PUT {
                auth::csr::approve(&server, rt, name, user, &parts.headers, body).await
            } else {
                Err(ApiError::MethodNotAllowed)
            }
        }
        (Some(sub @ (Exec | Attach | PortForward)), Some(name))
            if matches!(parts.method, Method::GET | Method::POST) =>
        {
            let name = name.to_owned();
            let request = Request::from_parts(parts, body);
            node_proxy::pod_upgrade(&server, sub, namespace.as_deref(), &name, request).await
        }
        // Everything else is the REST verbs'.
        _ => return rest::handle(server, parts.method, parts.uri, parts.headers, user, body).await,
    };
    answer.unwrap_or_else(|e| e.into_response())
}

/// The built-in classes: the RuntimeClasses of the node runtimes
/// (`wasmtime`, `runc`), the gateway's, both named `wasmkube`: the
/// IngressClass (the default class) and the GatewayClass, and the default
/// StorageClass `local-path`. A user may change or delete them; they are
/// made again only when missing at start.
async fn ensure_builtin_classes(server: &Arc<ApiServer>) -> Result<(), ApiError> {
    let ingress_class = json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "IngressClass",
        "metadata": {"name": "wasmkube",
                     "annotations": {admission::DEFAULT_INGRESS_CLASS: "true"}},
        "spec": {"controller": wasmkube_api::gateway_api::CONTROLLER},
    });
    let gateway_class = json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass",
        "metadata": {"name": "wasmkube"},
        "spec": {"controllerName": wasmkube_api::gateway_api::CONTROLLER,
                 "description": "The gateway built into every wasmkube node"},
    });
    let runtime_class = |handler: &str| {
        json!({"apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass",
               "metadata": {"name": handler}, "handler": handler})
    };
    for (plural, group, body) in [
        ("runtimeclasses", "node.k8s.io", runtime_class("wasmtime")),
        ("runtimeclasses", "node.k8s.io", runtime_class("runc")),
        ("ingressclasses", "networking.k8s.io", ingress_class),
        (
            "gatewayclasses",
            wasmkube_api::gateway_api::GROUP,
            gateway_class,
        ),
        (
            "storageclasses",
            "storage.k8s.io",
            wasmkube_api::storage::local_path_class(),
        ),
    ] {
        let rt = registry::lookup(group, "v1", plural).expect("built-in classes are served");
        match rest::create_internal(server, rt, None, body).await {
            Ok(_) | Err(ApiError::AlreadyExists(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
