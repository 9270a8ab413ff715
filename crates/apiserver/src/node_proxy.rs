//! Requests the API server forwards to node agents: `pods/log`,
//! `pods/exec`, `pods/attach` and `pods/portforward` (upgraded
//! connections, proxied as bytes) and the
//! `metrics.k8s.io` figures.
//!
//! The agent listens on the node's InternalIP at
//! `status.daemonEndpoints.kubeletEndpoint.Port` and accepts only requests
//! carrying the cluster's node-proxy token, a random secret the API server
//! creates at first start in `kube-system/wasmkube-node-proxy` (see
//! [`ensure_token`]) and agents read through the API.

use axum::body::Body;
use axum::http::Response as HttpResponse;
use axum::http::{Request, header};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use wasmkube_api::registry::{self, ResourceType};

use crate::ApiServer;
use crate::error::{ApiError, ApiResult};
use crate::rest;
use crate::storage::decode_stored;

/// Where the node-proxy token lives.
pub const TOKEN_NAMESPACE: &str = "kube-system";
pub const TOKEN_SECRET: &str = "wasmkube-node-proxy";

fn secrets() -> &'static ResourceType {
    registry::lookup("", "v1", "secrets").expect("secrets are served")
}

/// Creates the node-proxy token secret unless it exists.
pub(crate) async fn ensure_token(server: &std::sync::Arc<ApiServer>) -> ApiResult<()> {
    use base64::Engine;
    let token: String = (0..32)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect();
    let body = json!({
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": TOKEN_SECRET, "namespace": TOKEN_NAMESPACE},
        "data": {"token": base64::engine::general_purpose::STANDARD.encode(token)},
    });
    match rest::create_internal(server, secrets(), Some(TOKEN_NAMESPACE), body).await {
        Ok(_) | Err(ApiError::AlreadyExists(_)) => Ok(()),
        Err(e) => Err(e),
    }
}

async fn get(
    server: &ApiServer,
    rt: &ResourceType,
    ns: Option<&str>,
    name: &str,
) -> ApiResult<Value> {
    let kv = server
        .store
        .get(&rt.key(ns, name))
        .await
        .map_err(|e| ApiError::from_store(e, rt, name))?
        .ok_or_else(|| ApiError::not_found(rt, name))?;
    decode_stored(&kv).map_err(ApiError::internal)
}

async fn token(server: &ApiServer) -> ApiResult<String> {
    use base64::Engine;
    let secret = get(server, secrets(), Some(TOKEN_NAMESPACE), TOKEN_SECRET).await?;
    let raw = secret["data"]["token"].as_str().unwrap_or_default();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(raw)
        .map_err(ApiError::internal)?;
    String::from_utf8(bytes).map_err(ApiError::internal)
}

/// How long the API server's agent client certificate is valid; a new one
/// is issued at every start.
const AGENT_CLIENT_LIFETIME: std::time::Duration = std::time::Duration::from_secs(365 * 24 * 3600);

/// The TLS client configuration with which this server reaches agents: it
/// trusts only the cluster CA for their serving certificates and presents
/// a client certificate naming [`wasmkube_pki::AGENT_CLIENT`], the one
/// identity agents serve.
pub(crate) fn agent_tls(
    ca: &wasmkube_pki::Ca,
) -> Result<std::sync::Arc<rustls::ClientConfig>, wasmkube_pki::PkiError> {
    let client = ca.issue_client(
        &wasmkube_pki::Identity::new(wasmkube_pki::AGENT_CLIENT, &[]),
        AGENT_CLIENT_LIFETIME,
    )?;
    wasmkube_pki::agent_client_tls(ca.cert_pem(), &client)
}

/// An HTTP/1.1 connection to a node's agent endpoint.
struct AgentConnection {
    sender: hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    host: String,
    /// The node-proxy token's header, on a connection without TLS.
    authorization: Option<String>,
}

impl AgentConnection {
    /// A request for `path` on this agent, with the headers it needs.
    fn request(&self, method: &axum::http::Method, path: &str) -> axum::http::request::Builder {
        let builder = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, &self.host);
        match &self.authorization {
            Some(a) => builder.header(header::AUTHORIZATION, a),
            None => builder,
        }
    }
}

/// A connection to a node's agent endpoint at `host`. With a cluster CA
/// it is mutual TLS:
/// the agent's serving certificate must be the cluster CA's for the
/// address dialed (an agent's certificate names its node's addresses), and
/// this server presents its agent client certificate, so no header is
/// needed. Without one (servers only tests reach, plain HTTP clusters),
/// plain HTTP with the node-proxy token.
async fn dial(server: &ApiServer, node: &str, host: &str) -> ApiResult<AgentConnection> {
    let dial_error = |e: &dyn std::fmt::Display| ApiError::Internal {
        message: format!("error dialing the node agent of {node}: {e}"),
    };
    let stream = tokio::net::TcpStream::connect(host)
        .await
        .map_err(|e| dial_error(&e))?;
    let _ = stream.set_nodelay(true);
    async fn handshake<S>(
        io: S,
    ) -> hyper::Result<hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        let (sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io)).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.with_upgrades().await {
                tracing::debug!(error = %e, "a connection to an agent ended");
            }
        });
        Ok(sender)
    }
    match &server.agent_tls {
        Some(tls) => {
            let ip = host
                .rsplit_once(':')
                .map(|(ip, _)| ip.trim_start_matches('[').trim_end_matches(']'))
                .unwrap_or(host);
            let name = rustls::pki_types::ServerName::try_from(ip.to_owned())
                .map_err(|e| dial_error(&e))?;
            let stream = tokio_rustls::TlsConnector::from(tls.clone())
                .connect(name, stream)
                .await
                .map_err(|e| dial_error(&format!("TLS: {e}")))?;
            Ok(AgentConnection {
                sender: handshake(stream).await.map_err(|e| dial_error(&e))?,
                host: host.to_owned(),
                authorization: None,
            })
        }
        None => {
            let token = token(server).await?;
            Ok(AgentConnection {
                sender: handshake(stream).await.map_err(|e| dial_error(&e))?,
                host: host.to_owned(),
                authorization: Some(format!("Bearer {token}")),
            })
        }
    }
}

/// Where a pod's container runs: its name (from the `container` parameter,
/// or the pod's only container), its agent's `host:port`, and the rest of
/// the request's query for the agent.
struct Located {
    container: String,
    node: String,
    host: String,
    query: String,
}

/// Finds the pod, the container the request's `query` means and its node's
/// agent.
async fn locate(
    server: &ApiServer,
    namespace: Option<&str>,
    name: &str,
    query: Option<&str>,
) -> ApiResult<Located> {
    let mut params: Vec<(String, String)> = query
        .map(|q| serde_urlencoded::from_str(q).unwrap_or_default())
        .unwrap_or_default();
    let pods = registry::lookup("", "v1", "pods").expect("pods are served");
    let pod = get(server, pods, namespace, name).await?;
    let names: Vec<&str> = ["initContainers", "containers"]
        .iter()
        .flat_map(|k| pod["spec"][k].as_array().into_iter().flatten())
        .filter_map(|c| c["name"].as_str())
        .collect();
    let container = match params.iter().find(|(k, _)| k == "container") {
        Some((_, c)) => {
            if !names.contains(&c.as_str()) {
                return Err(ApiError::bad_request(format!(
                    "container {c} is not valid for pod {name}"
                )));
            }
            c.clone()
        }
        None => {
            let main: Vec<&str> = pod["spec"]["containers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| c["name"].as_str())
                .collect();
            match main[..] {
                [only] => only.to_owned(),
                _ => {
                    return Err(ApiError::bad_request(format!(
                        "a container name must be specified for pod {name}, choose one of: [{}]",
                        main.join(" ")
                    )));
                }
            }
        }
    };
    params.retain(|(k, _)| k != "container");
    let Some(node_name) = pod["spec"]["nodeName"].as_str().filter(|n| !n.is_empty()) else {
        return Err(ApiError::bad_request(format!(
            "container \"{container}\" in pod \"{name}\" is waiting to start: the pod is not scheduled yet"
        )));
    };
    Ok(Located {
        container,
        node: node_name.to_owned(),
        host: agent_host(server, node_name).await?,
        query: serde_urlencoded::to_string(&params).unwrap_or_default(),
    })
}

/// The `host:port` of a node's agent endpoint.
async fn agent_host(server: &ApiServer, node_name: &str) -> ApiResult<String> {
    let nodes = registry::lookup("", "v1", "nodes").expect("nodes are served");
    let node = get(server, nodes, None, node_name).await?;
    let address = node["status"]["addresses"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|a| a["type"] == "InternalIP")
        .and_then(|a| a["address"].as_str());
    let port = node["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"].as_u64();
    let (Some(address), Some(port)) = (address, port.filter(|p| *p > 0)) else {
        return Err(ApiError::bad_request(format!(
            "node {node_name} has no agent endpoint to reach its containers"
        )));
    };
    Ok(if address.contains(':') {
        format!("[{address}]:{port}")
    } else {
        format!("{address}:{port}")
    })
}

/// An agent's refusal, relayed as kube-apiserver relays the kubelet's: its
/// client errors as 400 with the agent's text.
async fn agent_error(response: HttpResponse<hyper::body::Incoming>) -> ApiError {
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let message = String::from_utf8_lossy(&body).trim().to_owned();
    if status.is_client_error() {
        ApiError::bad_request(message)
    } else {
        ApiError::Internal { message }
    }
}

/// `GET path` on the agent of `node` at `host`: its answer when it is a
/// success, else its refusal relayed.
async fn agent_get(
    server: &ApiServer,
    node: &str,
    host: &str,
    path: &str,
) -> ApiResult<HttpResponse<hyper::body::Incoming>> {
    let mut agent = dial(server, node, host).await?;
    let request = agent
        .request(&axum::http::Method::GET, path)
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(ApiError::internal)?;
    let response = agent
        .sender
        .send_request(request)
        .await
        .map_err(|e| ApiError::Internal {
            message: format!("error dialing the node agent of {node}: {e}"),
        })?;
    if !response.status().is_success() {
        return Err(agent_error(response).await);
    }
    Ok(response)
}

/// `GET pods/{name}/log`: finds the pod's node and container and streams
/// the agent's answer back.
pub(crate) async fn pod_log(
    server: &std::sync::Arc<ApiServer>,
    namespace: Option<&str>,
    name: &str,
    query: Option<&str>,
) -> ApiResult<Response> {
    let ns = namespace.unwrap_or("default");
    let Located {
        container,
        node,
        host,
        query,
    } = locate(server, namespace, name, query).await?;
    let path = format!("/containerLogs/{ns}/{name}/{container}?{query}");
    let response = agent_get(server, &node, &host, &path).await?;
    let mut out = Response::new(Body::new(response.into_body()));
    out.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain"),
    );
    Ok(out.into_response())
}

/// Headers of an upgrade that pass between the client and the agent.
const UPGRADE_HEADERS: [header::HeaderName; 6] = [
    header::CONNECTION,
    header::UPGRADE,
    header::SEC_WEBSOCKET_KEY,
    header::SEC_WEBSOCKET_VERSION,
    header::SEC_WEBSOCKET_PROTOCOL,
    header::SEC_WEBSOCKET_ACCEPT,
];

/// `GET|POST pods/{name}/exec`, `attach` and `portforward`:
/// kube-apiserver's upgrade-aware proxy. The client's upgrade request
/// (WebSocket: `v5.channel.k8s.io` for exec and attach,
/// `SPDY/3.1+portforward.k8s.io` for port-forward) goes to the agent's
/// endpoint for the pod (and, but for port-forward, its container) with the
/// node-proxy token; once the agent switches protocols, so does the client,
/// and bytes are copied both ways until either side closes. A refusal from
/// the agent (a Wasm container asked to exec, one not running) reaches the
/// client as a `Status`.
pub(crate) async fn pod_upgrade(
    server: &std::sync::Arc<ApiServer>,
    subresource: wasmkube_api::Subresource,
    namespace: Option<&str>,
    name: &str,
    request: Request<Body>,
) -> ApiResult<Response> {
    if subresource == wasmkube_api::Subresource::PortForward {
        return pod_port_forward(server, namespace, name, request).await;
    }
    let ns = namespace.unwrap_or("default");
    let Located {
        container,
        node,
        host,
        query,
    } = locate(server, namespace, name, request.uri().query()).await?;
    let path = format!("/{}/{ns}/{name}/{container}?{query}", subresource.name());
    upgrade_to_agent(server, &node, &host, &path, request).await
}

/// Port-forward: the pod must be running; the ports travel inside the
/// stream.
async fn pod_port_forward(
    server: &std::sync::Arc<ApiServer>,
    namespace: Option<&str>,
    name: &str,
    request: Request<Body>,
) -> ApiResult<Response> {
    let ns = namespace.unwrap_or("default");
    let pods = registry::lookup("", "v1", "pods").expect("pods are served");
    let pod = get(server, pods, namespace, name).await?;
    let Some(node) = pod["spec"]["nodeName"].as_str().filter(|n| !n.is_empty()) else {
        return Err(ApiError::bad_request(format!(
            "pod {name} is not scheduled yet: unable to forward ports"
        )));
    };
    if pod["status"]["phase"] != "Running" {
        return Err(ApiError::bad_request(format!(
            "unable to forward port because pod is not running. Current status={}",
            pod["status"]["phase"].as_str().unwrap_or("Pending")
        )));
    }
    let host = agent_host(server, node).await?;
    let path = format!("/portForward/{ns}/{name}");
    upgrade_to_agent(server, node, &host, &path, request).await
}

/// Sends the client's upgrade request to an agent's `path` with the
/// node-proxy token; once the agent switches protocols, so does the
/// client, and bytes are copied both ways until either side closes.
async fn upgrade_to_agent(
    server: &std::sync::Arc<ApiServer>,
    node: &str,
    host: &str,
    path: &str,
    mut request: Request<Body>,
) -> ApiResult<Response> {
    let mut agent = dial(server, node, host).await?;
    let mut upstream = agent.request(request.method(), path);
    for h in &UPGRADE_HEADERS {
        if let Some(v) = request.headers().get(h) {
            upstream = upstream.header(h, v);
        }
    }
    let upstream = upstream
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(ApiError::internal)?;
    let dial_error = |e: &dyn std::fmt::Display| ApiError::Internal {
        message: format!("error dialing the node agent of {node}: {e}"),
    };
    let mut response = agent
        .sender
        .send_request(upstream)
        .await
        .map_err(|e| dial_error(&e))?;
    if response.status() != axum::http::StatusCode::SWITCHING_PROTOCOLS {
        return Err(agent_error(response).await);
    }
    let mut out = Response::builder().status(axum::http::StatusCode::SWITCHING_PROTOCOLS);
    for h in &UPGRADE_HEADERS {
        if let Some(v) = response.headers().get(h) {
            out = out.header(h, v);
        }
    }
    let agent = hyper::upgrade::on(&mut response);
    let client = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        let (Ok(agent), Ok(client)) = (agent.await, client.await) else {
            tracing::debug!("an upgrade to the agent did not complete");
            return;
        };
        let mut agent = hyper_util::rt::TokioIo::new(agent);
        let mut client = hyper_util::rt::TokioIo::new(client);
        let _ = tokio::io::copy_bidirectional(&mut client, &mut agent).await;
    });
    out.body(Body::empty()).map_err(ApiError::internal)
}

/// How long gathered agent stats answer further metrics reads: the
/// autoscalers read several metrics each tick, and each would otherwise ask
/// every node again.
const STATS_FRESH_FOR: std::time::Duration = std::time::Duration::from_millis(250);

/// The last gathering of the agents' stats, and when it was made; readers
/// queue on it, so one gathering serves every read that arrives meanwhile.
pub(crate) type StatsCache =
    tokio::sync::Mutex<Option<(std::time::Instant, std::sync::Arc<Vec<(String, Value)>>)>>;

/// The agents' `/stats/pods` answers, by node name, gathered at most once
/// per [`STATS_FRESH_FOR`].
async fn node_stats(server: &ApiServer) -> ApiResult<std::sync::Arc<Vec<(String, Value)>>> {
    let mut cached = server.node_stats.lock().await;
    if let Some((at, stats)) = cached.as_ref()
        && at.elapsed() < STATS_FRESH_FOR
    {
        return Ok(stats.clone());
    }
    let stats = std::sync::Arc::new(gather_node_stats(server).await?);
    *cached = Some((std::time::Instant::now(), stats.clone()));
    Ok(stats)
}

/// The agents' `/stats/pods` answers, by node name; nodes without an agent
/// endpoint (simulated ones) or that do not answer in time are left out.
async fn gather_node_stats(server: &ApiServer) -> ApiResult<Vec<(String, Value)>> {
    let nodes = registry::lookup("", "v1", "nodes").expect("nodes are served");
    let listed = server
        .store
        .list(&nodes.key_prefix(), Default::default())
        .await
        .map_err(ApiError::internal)?;
    let fetches = listed.items.iter().filter_map(|kv| {
        let node = decode_stored(kv).ok()?;
        let name = node["metadata"]["name"].as_str()?.to_owned();
        let address = node["status"]["addresses"]
            .as_array()?
            .iter()
            .find(|a| a["type"] == "InternalIP")?["address"]
            .as_str()?
            .to_owned();
        let port = node["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"]
            .as_u64()
            .filter(|p| *p > 0)?;
        let host = if address.contains(':') {
            format!("[{address}]:{port}")
        } else {
            format!("{address}:{port}")
        };
        Some(async move {
            let fetch = async {
                let mut agent = dial(server, &name, &host).await.ok()?;
                let request = agent
                    .request(&axum::http::Method::GET, "/stats/pods")
                    .body(http_body_util::Empty::<bytes::Bytes>::new())
                    .ok()?;
                let response = agent.sender.send_request(request).await.ok()?;
                if !response.status().is_success() {
                    return None;
                }
                let body = response.into_body().collect().await.ok()?.to_bytes();
                serde_json::from_slice::<Value>(&body).ok()
            };
            let stats = tokio::time::timeout(std::time::Duration::from_secs(5), fetch)
                .await
                .ok()??;
            Some((name, stats))
        })
    });
    Ok(futures::future::join_all(fetches)
        .await
        .into_iter()
        .flatten()
        .collect())
}

/// A metric value as a quantity: whole numbers plain, others in
/// thousandths (`1500m`) as metrics adapters write them, or in millionths
/// (`42u`) when thousandths would lose it (a module loaded in 42 µs).
fn quantity(value: f64) -> String {
    let micro = (value * 1e6).round() as u64;
    if micro.is_multiple_of(1_000_000) {
        (micro / 1_000_000).to_string()
    } else if micro.is_multiple_of(1000) || value >= 1.0 {
        format!("{}m", (value * 1000.0).round() as u64)
    } else {
        format!("{micro}u")
    }
}

fn cpu_quantity(nano_cores: &Value) -> String {
    format!("{}n", nano_cores.as_u64().unwrap_or(0))
}

fn memory_quantity(bytes: &Value) -> String {
    format!("{}Ki", bytes.as_u64().unwrap_or(0) / 1024)
}

/// The `labelSelector` of a metrics request, parsed.
fn label_selector(
    query: Option<&str>,
) -> ApiResult<Option<wasmkube_api::selectors::LabelSelector>> {
    let params: Vec<(String, String)> = query
        .map(|q| serde_urlencoded::from_str(q).unwrap_or_default())
        .unwrap_or_default();
    params
        .iter()
        .find(|(k, _)| k == "labelSelector")
        .map(|(_, v)| wasmkube_api::selectors::LabelSelector::parse(v))
        .transpose()
        .map_err(ApiError::bad_request)
}

/// `metrics.k8s.io/v1beta1`: NodeMetrics and PodMetrics from the agents'
/// live usage (what metrics-server serves), so `kubectl top` works.
pub(crate) async fn metrics(
    server: &std::sync::Arc<ApiServer>,
    path: &str,
    query: Option<&str>,
) -> ApiResult<Response> {
    let rest: Vec<&str> = path
        .trim_start_matches("/apis/metrics.k8s.io/v1beta1")
        .trim_matches('/')
        .split('/')
        .collect();
    let selector = label_selector(query)?;
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let stats = node_stats(server).await?;
    let not_found =
        |kind: &str, name: &str| ApiError::bad_request(format!("{kind} \"{name}\" not found"));
    let node_metrics = |name: &str, s: &Value| {
        json!({
            "metadata": {"name": name, "creationTimestamp": now},
            "timestamp": now, "window": "10s",
            "usage": {"cpu": cpu_quantity(&s["node"]["cpuNanoCores"]), "memory": memory_quantity(&s["node"]["memoryBytes"])},
        })
    };
    let pod_metrics = |p: &Value| {
        let containers: Vec<Value> = p["containers"].as_array().into_iter().flatten().map(|c| json!({
            "name": c["name"],
            "usage": {"cpu": cpu_quantity(&c["cpuNanoCores"]), "memory": memory_quantity(&c["memoryBytes"])},
        })).collect();
        json!({
            "metadata": {"name": p["name"], "namespace": p["namespace"], "labels": p["labels"], "creationTimestamp": now},
            "timestamp": now, "window": "10s", "containers": containers,
        })
    };
    let list = |kind: &str, items: Vec<Value>| json!({"kind": format!("{kind}List"), "apiVersion": "metrics.k8s.io/v1beta1", "metadata": {}, "items": items});
    let single = |kind: &str, mut v: Value| {
        v["kind"] = json!(kind);
        v["apiVersion"] = json!("metrics.k8s.io/v1beta1");
        v
    };
    let pods_in = |ns: Option<&str>| -> Vec<Value> {
        stats
            .iter()
            .flat_map(|(_, s)| s["pods"].as_array().cloned().unwrap_or_default())
            .filter(|p| ns.is_none_or(|ns| p["namespace"] == ns))
            .filter(|p| {
                selector.as_ref().is_none_or(|sel| {
                    let labels = serde_json::from_value(p["labels"].clone()).unwrap_or_default();
                    sel.matches(&labels)
                })
            })
            .map(|p| pod_metrics(&p))
            .collect()
    };
    let body = match rest.as_slice() {
        ["nodes"] => list(
            "NodeMetrics",
            stats.iter().map(|(n, s)| node_metrics(n, s)).collect(),
        ),
        ["nodes", name] => stats
            .iter()
            .find(|(n, _)| n == name)
            .map(|(n, s)| single("NodeMetrics", node_metrics(n, s)))
            .ok_or_else(|| not_found("nodemetrics", name))?,
        ["pods"] => list("PodMetrics", pods_in(None)),
        ["namespaces", ns, "pods"] => list("PodMetrics", pods_in(Some(ns))),
        ["namespaces", ns, "pods", name] => pods_in(Some(ns))
            .into_iter()
            .find(|p| p["metadata"]["name"] == *name)
            .map(|p| single("PodMetrics", p))
            .ok_or_else(|| not_found("podmetrics", name))?,
        _ => return Err(ApiError::NoRoute),
    };
    Ok(axum::Json(body).into_response())
}

/// The pod metrics `custom.metrics.k8s.io/v1beta2` serves, from the agents'
/// counters for HTTP functions: requests in flight now, requests served so
/// far, and request-seconds in flight so far (the average concurrency
/// between two readings is its change over the time between them).
pub(crate) const CUSTOM_METRICS: &[&str] = &[
    "http_requests_in_flight",
    "http_requests",
    "http_request_seconds",
    "wasm_module_bytes",
    "wasm_native_code_bytes",
    "wasm_compile_seconds",
    "wasm_load_seconds",
    "wasm_instances",
];

/// The metrics of pods only (Knative revisions have the request ones).
pub(crate) const POD_ONLY_METRICS: &[&str] = &[
    "wasm_module_bytes",
    "wasm_native_code_bytes",
    "wasm_compile_seconds",
    "wasm_load_seconds",
    "wasm_instances",
];

/// Knative revisions, as the custom metrics API names the resource.
pub(crate) const REVISIONS: &str = "revisions.serving.knative.dev";

/// The stats field behind a custom metric.
fn metric_field(metric: &str, of: &str) -> ApiResult<&'static str> {
    match metric {
        "http_requests_in_flight" => Ok("requestsInFlight"),
        "http_requests" => Ok("requests"),
        "http_request_seconds" => Ok("requestSeconds"),
        // What a Wasm container runs: its module's size, its native code's,
        // the time its node spent compiling it (only where the node
        // compiled it rather than finding it in its compile cache) and
        // loading it, and its live instances.
        "wasm_module_bytes" if of == "pods" => Ok("wasmModuleBytes"),
        "wasm_native_code_bytes" if of == "pods" => Ok("wasmNativeBytes"),
        "wasm_compile_seconds" if of == "pods" => Ok("wasmCompileSeconds"),
        "wasm_load_seconds" if of == "pods" => Ok("wasmLoadSeconds"),
        "wasm_instances" if of == "pods" => Ok("wasmInstances"),
        other => {
            let served: Vec<&str> = CUSTOM_METRICS
                .iter()
                .copied()
                .filter(|m| of == "pods" || !POD_ONLY_METRICS.contains(m))
                .collect();
            Err(ApiError::bad_request(format!(
                "the server could not find the metric {other} for {of}; served: {}",
                served.join(", ")
            )))
        }
    }
}

/// `namespaces/NS/revisions.serving.knative.dev/NAME|*/METRIC`: the
/// requests every node's gateway forwarded to each Knative revision, summed
/// over the nodes (a revision whose pods count nothing themselves, a Linux
/// image, is measured here).
async fn revision_metrics(
    server: &std::sync::Arc<ApiServer>,
    ns: &str,
    name: &str,
    metric: &str,
) -> ApiResult<Response> {
    let field = metric_field(metric, REVISIONS)?;
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let stats = node_stats(server).await?;
    let mut totals: std::collections::BTreeMap<String, f64> = Default::default();
    for r in stats
        .iter()
        .flat_map(|(_, s)| s["revisions"].as_array().cloned().unwrap_or_default())
        .filter(|r| r["namespace"] == ns && (name == "*" || r["name"] == name))
    {
        *totals
            .entry(r["name"].as_str().unwrap_or_default().to_owned())
            .or_default() += r[field].as_f64().unwrap_or(0.0);
    }
    let items: Vec<Value> = totals
        .into_iter()
        .map(|(rev, total)| {
            json!({
                "describedObject": {"kind": "Revision", "namespace": ns, "name": rev, "apiVersion": "serving.knative.dev/v1"},
                "metric": {"name": metric},
                "timestamp": now,
                "value": quantity(total),
            })
        })
        .collect();
    let body = json!({
        "kind": "MetricValueList",
        "apiVersion": "custom.metrics.k8s.io/v1beta2",
        "metadata": {},
        "items": items,
    });
    Ok(axum::Json(body).into_response())
}

/// `custom.metrics.k8s.io/v1beta2`: `namespaces/NS/pods/NAME|*/METRIC`,
/// a MetricValueList with one value per pod (its containers summed).
pub(crate) async fn custom_metrics(
    server: &std::sync::Arc<ApiServer>,
    path: &str,
    query: Option<&str>,
) -> ApiResult<Response> {
    let rest: Vec<&str> = path
        .trim_start_matches("/apis/custom.metrics.k8s.io/v1beta2")
        .trim_matches('/')
        .split('/')
        .collect();
    let (ns, resource, name, metric) = match rest.as_slice() {
        [
            "namespaces",
            ns,
            resource @ ("pods" | REVISIONS),
            name,
            metric,
        ] => (*ns, *resource, *name, *metric),
        _ => return Err(ApiError::NoRoute),
    };
    if resource == REVISIONS {
        return revision_metrics(server, ns, name, metric).await;
    }
    let field = metric_field(metric, "pods")?;
    let selector = label_selector(query)?;
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let stats = node_stats(server).await?;
    let items: Vec<Value> = stats
        .iter()
        .flat_map(|(_, s)| s["pods"].as_array().cloned().unwrap_or_default())
        .filter(|p| p["namespace"] == ns && (name == "*" || p["name"] == name))
        .filter(|p| {
            selector.as_ref().is_none_or(|sel| {
                let labels = serde_json::from_value(p["labels"].clone()).unwrap_or_default();
                sel.matches(&labels)
            })
        })
        // Only pods whose containers count requests have the metric.
        .filter(|p| {
            p["containers"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c.get(field).is_some())
        })
        .map(|p| {
            let total: f64 = p["containers"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| c[field].as_f64().unwrap_or(0.0))
                .sum();
            json!({
                "describedObject": {"kind": "Pod", "namespace": ns, "name": p["name"], "apiVersion": "/v1"},
                "metric": {"name": metric},
                "timestamp": now,
                "value": quantity(total),
            })
        })
        .collect();
    if name != "*" && items.is_empty() {
        return Err(ApiError::bad_request(format!(
            "the server could not find the metric {metric} for pods {name}"
        )));
    }
    let body = json!({
        "kind": "MetricValueList",
        "apiVersion": "custom.metrics.k8s.io/v1beta2",
        "metadata": {},
        "items": items,
    });
    Ok(axum::Json(body).into_response())
}

/// `GET /dashboard/api/namespaces/{ns}/pods/{name}/usage`: the pod's
/// recent usage (each running container's CPU and memory samples, which
/// its node keeps for the last quarter of an hour), so the dashboard's
/// charts start with history. Answered to whoever may get the pod's
/// PodMetrics (`get` on `pods` in `metrics.k8s.io`), as RBAC says.
pub(crate) async fn pod_usage_history(
    server: &std::sync::Arc<ApiServer>,
    user: Option<crate::UserInfo>,
    namespace: &str,
    name: &str,
) -> ApiResult<Response> {
    if let (Some(auth), Some(user)) = (&server.auth, user) {
        let attrs = crate::auth::Attributes {
            user,
            verb: "get".into(),
            path: String::new(),
            resource: Some(crate::auth::ResourceAttributes {
                group: "metrics.k8s.io".into(),
                resource: "pods".into(),
                namespace: Some(namespace.to_owned()),
                name: Some(name.to_owned()),
                ..Default::default()
            }),
        };
        auth.check(&attrs)?;
    }
    let pods = registry::lookup("", "v1", "pods").expect("pods are served");
    let pod = get(server, pods, Some(namespace), name).await?;
    let Some(node) = pod["spec"]["nodeName"].as_str().filter(|n| !n.is_empty()) else {
        return Err(ApiError::bad_request(format!(
            "pod \"{name}\" is not scheduled yet"
        )));
    };
    let host = agent_host(server, node).await?;
    let path = format!("/stats/history/{namespace}/{name}");
    let response = agent_get(server, node, &host, &path).await?;
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(ApiError::internal)?
        .to_bytes();
    let history: Value = serde_json::from_slice(&body).map_err(ApiError::internal)?;
    Ok(axum::Json(history).into_response())
}

#[cfg(test)]
mod tests {
    use super::quantity;

    #[test]
    fn metric_values_keep_their_precision_in_the_plainest_scale() {
        assert_eq!(quantity(0.0), "0");
        assert_eq!(quantity(57976.0), "57976");
        assert_eq!(quantity(1.5), "1500m");
        assert_eq!(quantity(0.056), "56m");
        assert_eq!(quantity(0.000042), "42u");
        assert_eq!(quantity(2.0000004), "2");
        assert_eq!(quantity(1.2345), "1235m");
    }
}
