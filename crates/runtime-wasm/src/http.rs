//! HTTP functions: components that export `wasi:http/incoming-handler`
//! (the `wasi:http/proxy` world) serve HTTP/1.1 on their container's ports,
//! with a fresh instance per request, as `wasmtime serve` does, each metered
//! like any other guest, and a bound on requests in flight per container.
//! Outgoing requests (`wasi:http/outgoing-handler`) leave from the pod's
//! network (see `net.rs`).

use std::sync::Arc;

use hyper::server::conn::http1;
use wasmtime::component::{Component, ResourceTable};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::io::TokioIo;
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView};

use crate::net::{GuestNetwork, GuestSockets, GuestSocketsView};
use crate::{ContainerSpec, Error, Meter, WasmRuntime, metered_store, wasi_builder};

/// Outgoing requests go out over connections made in the guest's network.
struct Outbound(
    GuestNetwork,
    Option<Arc<dyn wasmkube_runtime::NameLookup>>,
    Arc<crate::net::GuestTls>,
);

impl WasiHttpHooks for Outbound {
    fn send_request(
        &mut self,
        request: http::Request<wasmtime_wasi_http::WasiBody>,
        options: Option<wasmtime_wasi_http::RequestOptions>,
        _fut: Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
    ) -> Box<
        dyn Future<
                Output = Result<
                    (
                        http::Response<wasmtime_wasi_http::WasiBody>,
                        Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
                    ),
                    wasmtime_wasi_http::Error,
                >,
            > + Send,
    > {
        Box::new(
            self.0
                .clone()
                .send_request(request, options, self.1.clone(), self.2.clone()),
        )
    }

    fn default_scheme(&mut self) -> Option<http::uri::Scheme> {
        Some(http::uri::Scheme::HTTP)
    }
}

/// Per-request store state.
pub(crate) struct HttpHost {
    ctx: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
    meter: Meter,
    hooks: Outbound,
}

impl WasiView for HttpHost {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.ctx,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for HttpHost {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

impl GuestSockets for HttpHost {
    fn guest_sockets(&mut self) -> GuestSocketsView<'_> {
        GuestSocketsView::new(
            &mut self.ctx,
            &mut self.table,
            &self.hooks.0,
            self.hooks.1.as_ref(),
        )
    }
}

/// An HTTP component linked against WASI and `wasi:http`.
#[derive(Clone)]
pub struct PreparedProxy {
    pre: ProxyPre<HttpHost>,
}

impl std::fmt::Debug for PreparedProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedProxy").finish_non_exhaustive()
    }
}

type Response = hyper::Response<HyperOutgoingBody>;

impl WasmRuntime {
    /// Links a component that exports `wasi:http/incoming-handler`.
    pub fn prepare_proxy(&self, component: &Component) -> Result<PreparedProxy, Error> {
        let pre = self
            .http_linker
            .instantiate_pre(component)
            .and_then(ProxyPre::new)
            .map_err(|e| Error::InvalidModule(format!("{e:#}")))?;
        Ok(PreparedProxy { pre })
    }

    /// Serves HTTP on `listener`: every request gets a fresh instance with
    /// `spec`'s env, volumes, output and limits; at most `max_concurrency`
    /// run at once, the rest wait.
    ///
    /// When `stop` resolves the server stops gracefully, as a pod being
    /// deleted should: it stops accepting, lets the requests in flight
    /// finish (a response being streamed included), closes idle keep-alive
    /// connections at once, and returns when the last connection is done;
    /// an idle function stops at once. Dropping the future ends everything
    /// now: the connections belong to it (a keep-alive connection must not
    /// outlive its pod, nor hold its network namespace).
    pub async fn serve_http(
        self: Arc<Self>,
        prepared: PreparedProxy,
        spec: Arc<ContainerSpec>,
        listener: tokio::net::TcpListener,
        max_concurrency: usize,
        stop: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        spec.live.mark_serving();
        let slots = Arc::new(tokio::sync::Semaphore::new(max_concurrency.max(1)));
        let mut connections = tokio::task::JoinSet::new();
        let (draining, drain) = tokio::sync::watch::channel(false);
        let mut stop = std::pin::pin!(stop);
        loop {
            let socket = tokio::select! {
                accepted = listener.accept() => {
                    let (socket, from) = accepted?;
                    // NetworkPolicy, decided here for a pod on the node's
                    // network: a refused connection is closed unread.
                    match socket.local_addr() {
                        Ok(local) if !spec.network.accepts(from, local) => continue,
                        _ => socket,
                    }
                }
                // Reaps finished connections so the set stays small.
                Some(_) = connections.join_next() => continue,
                () = &mut stop => break,
            };
            let _ = socket.set_nodelay(true);
            let (rt, prepared, spec, slots) =
                (self.clone(), prepared.clone(), spec.clone(), slots.clone());
            let mut drain = drain.clone();
            connections.spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let (rt, prepared, spec, slots) =
                        (rt.clone(), prepared.clone(), spec.clone(), slots.clone());
                    async move {
                        let _slot = slots.acquire_owned().await;
                        Ok::<_, std::convert::Infallible>(rt.handle(&prepared, &spec, req).await)
                    }
                });
                let connection = http1::Builder::new()
                    .keep_alive(true)
                    // A client that closes its sending side after the
                    // request (`nc`, say) still gets the response.
                    .half_close(true)
                    .serve_connection(TokioIo::new(socket), service);
                let mut connection = std::pin::pin!(connection);
                let ended = tokio::select! {
                    ended = connection.as_mut() => ended,
                    true = async { drain.wait_for(|d| *d).await.is_ok() } => {
                        // Finishes the request in flight, if any, then closes.
                        connection.as_mut().graceful_shutdown();
                        connection.await
                    }
                };
                if let Err(e) = ended {
                    tracing::debug!(error = %e, "HTTP connection ended with an error");
                }
            });
        }
        // No new connections from here on; the open ones finish their
        // requests and close.
        drop(listener);
        draining.send_replace(true);
        while connections.join_next().await.is_some() {}
        Ok(())
    }

    async fn handle(
        &self,
        prepared: &PreparedProxy,
        spec: &ContainerSpec,
        req: hyper::Request<hyper::body::Incoming>,
    ) -> Response {
        let in_flight = spec.live.request_started();
        match self.handle_inner(prepared, spec, req, in_flight).await {
            Ok(resp) => resp,
            Err(message) => {
                tracing::debug!(%message, "an HTTP function failed");
                error_response(500, &format!("the function failed: {message}\n"))
            }
        }
    }

    async fn handle_inner(
        &self,
        prepared: &PreparedProxy,
        spec: &ContainerSpec,
        req: hyper::Request<hyper::body::Incoming>,
        in_flight: wasmkube_runtime::InFlight,
    ) -> Result<Response, String> {
        let host = HttpHost {
            ctx: wasi_builder(spec).map_err(|e| e.to_string())?.build(),
            http: WasiHttpCtx::new(),
            table: ResourceTable::new(),
            meter: self.meter(spec),
            hooks: Outbound(
                spec.network.clone(),
                spec.names.clone(),
                self.guest_tls.clone(),
            ),
        };
        let mut store = metered_store(&self.engine, host, |h| &mut h.meter);
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let (req, out) = {
            let mut view = store.data_mut().http();
            let req = view
                .new_incoming_request(Scheme::Http, req)
                .map_err(|e| format!("{e:#}"))?;
            let out = view
                .new_response_outparam(sender)
                .map_err(|e| format!("{e:#}"))?;
            (req, out)
        };
        let pre = prepared.pre.clone();
        let live = spec.live.clone();
        // The handler runs on its own task: it may keep streaming the body
        // after the response head is sent.
        let task = tokio::spawn(async move {
            // In flight until the instance is done (its body streamed).
            let _in_flight = in_flight;
            live.instance_started();
            let result = async {
                let proxy = pre.instantiate_async(&mut store).await?;
                store.data_mut().meter.start_slice();
                proxy
                    .wasi_http_incoming_handler()
                    .call_handle(&mut store, req, out)
                    .await
            }
            .await;
            live.instance_ended();
            let (exit, _) = store.data_mut().meter.finish(result.map(|()| 0));
            exit
        });
        match receiver.await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(code)) => Err(format!("{code:?}")),
            Err(_) => match task.await {
                Ok(crate::Exit::Code(0)) => Err("the function never set a response".into()),
                Ok(crate::Exit::Code(c)) => Err(format!("the function exited with {c}")),
                Ok(crate::Exit::OomKilled { message } | crate::Exit::Trap { message }) => {
                    Err(message)
                }
                Err(e) => Err(e.to_string()),
            },
        }
    }
}

fn error_response(status: u16, message: &str) -> Response {
    use http_body_util::BodyExt;
    let body = http_body_util::Full::new(bytes::Bytes::from(message.to_owned()))
        .map_err(|never| match never {})
        .boxed_unsync();
    hyper::Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .body(body)
        .unwrap_or_else(|_| hyper::Response::new(HyperOutgoingBody::default()))
}
