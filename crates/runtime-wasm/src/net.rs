//! A guest's own connections. `wasi:sockets` sockets and the connections of
//! outgoing `wasi:http` requests are made where [`GuestNetwork`] says: inside
//! the pod's network namespace (the guest runs on the agent's threads, but a
//! socket belongs to the namespace it was made in, so a Wasm pod's traffic
//! leaves from its own pod IP), or in the node's network with the node's
//! loopback out of reach, or nowhere. An `https` request is TLS over
//! such a connection, the server checked against the system's roots and
//! the cluster CA ([`GuestTls`]).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use wasmkube_runtime::{PodNetns, Transport};
use wasmtime::component::{HasData, Linker, Resource};
use wasmtime_wasi::p2::bindings::sockets::ip_name_lookup::ResolveAddressStream;
use wasmtime_wasi::p2::bindings::sockets::network::{self, ErrorCode, IpAddressFamily};
use wasmtime_wasi::p2::bindings::sockets::{
    ip_name_lookup, tcp, tcp_create_socket, udp_create_socket,
};
use wasmtime_wasi::p2::{SocketError, SocketResult, TcpSocket, UdpSocket};
use wasmtime_wasi::sockets::{SocketAddrUse, WasiSocketsCtxView};
use wasmtime_wasi::{WasiCtxBuilder, WasiView};
use wasmtime_wasi_http::io::TokioIo;
use wasmtime_wasi_http::{Error as HttpError, RequestOptions, WasiBody};

/// The TLS settings of guests' outgoing HTTPS: the system's root
/// certificates and any the node adds (its cluster CA), loaded on first use.
#[derive(Debug, Default)]
pub struct GuestTls {
    extra_pem: Option<String>,
    made: std::sync::OnceLock<Result<Arc<rustls::ClientConfig>, String>>,
}

impl GuestTls {
    pub fn new(extra_pem: Option<String>) -> Self {
        Self {
            extra_pem,
            made: Default::default(),
        }
    }

    fn config(&self) -> Result<Arc<rustls::ClientConfig>, HttpError> {
        self.made
            .get_or_init(|| {
                wasmkube_pki::client_tls_system_roots(self.extra_pem.as_deref())
                    .map_err(|e| format!("guests' TLS trust: {e}"))
            })
            .clone()
            .map_err(|e| HttpError::InternalError(Some(e)))
    }
}

/// A TLS failure as `wasi:http` names it: a certificate the guest's trust
/// refused, else a protocol error.
fn tls_error(e: std::io::Error) -> HttpError {
    let refused_certificate = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|r| matches!(r, rustls::Error::InvalidCertificate(_)));
    if refused_certificate {
        HttpError::TlsCertificateError
    } else {
        HttpError::Tls(e)
    }
}

/// An HTTP/1.1 client connection over `io`: its sender, and the task
/// driving it.
async fn handshake<T>(
    io: T,
    timeout: Duration,
) -> Result<
    (
        hyper::client::conn::http1::SendRequest<WasiBody>,
        tokio::task::JoinHandle<Result<(), hyper::Error>>,
    ),
    HttpError,
>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (sender, connection) = tokio::time::timeout(
        timeout,
        hyper::client::conn::http1::handshake(TokioIo::new(io)),
    )
    .await
    .map_err(|_| HttpError::ConnectionTimeout)??;
    Ok((sender, tokio::spawn(connection)))
}

/// What `wasi:http` waits for when the guest sets no timeouts.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// Where a guest's own sockets are made.
#[derive(Clone, Debug, Default)]
pub enum GuestNetwork {
    /// Nowhere: `wasi:sockets` refuses every address and outgoing HTTP is
    /// denied (the default for a bare run).
    #[default]
    Denied,
    /// In the pod's network namespace: any address, as for a Linux
    /// container in the same pod.
    Pod(Arc<dyn PodNetns>),
    /// In the node's network, which the pod shares: any address but
    /// loopback and unspecified ones, which would be the node's own
    /// services (the API server, the agent), not the pod's. With no
    /// service proxy there, a connection to a Service's address is sent to
    /// one of its endpoints by the routes given.
    Node(Option<Arc<dyn wasmkube_runtime::ServiceRoutes>>),
}

impl GuestNetwork {
    /// Whether the guest may connect or send to `ip`.
    pub fn may_reach(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        match self {
            Self::Denied => false,
            Self::Pod(_) => true,
            Self::Node(_) => !ip.is_loopback() && !ip.is_unspecified(),
        }
    }

    /// Where a connection the guest addresses to `to` is made: a Service's
    /// endpoint when the node's network has routes for it, else `to`.
    pub fn route(&self, to: SocketAddr) -> SocketAddr {
        match self {
            Self::Node(Some(routes)) => routes.route(to).unwrap_or(to),
            _ => to,
        }
    }

    /// Whether `to` is where a Service route sends connections (the
    /// guest's own address was checked before it was routed).
    fn is_route_endpoint(&self, to: SocketAddr) -> bool {
        matches!(self, Self::Node(Some(routes)) if routes.is_endpoint(to))
    }

    /// Whether NetworkPolicy lets the guest connect to `to` (where the
    /// connection really goes): decided in-process for a pod on the node's
    /// network; a pod network's packets meet the node's rules instead.
    pub fn policy_allows(&self, to: SocketAddr, transport: Transport) -> bool {
        match self {
            Self::Node(Some(routes)) => routes.may_connect(to, transport),
            _ => true,
        }
    }

    /// Whether NetworkPolicy lets a connection from `from` in at the
    /// guest's listener `local`.
    pub fn accepts(&self, from: SocketAddr, local: SocketAddr) -> bool {
        match self {
            Self::Node(Some(routes)) => routes.may_accept(from, local),
            _ => true,
        }
    }

    /// Runs `make` where the guest's sockets belong.
    fn make<R>(&self, make: impl FnOnce() -> std::io::Result<R>) -> std::io::Result<R> {
        match self {
            Self::Pod(netns) => {
                let mut make = Some(make);
                let mut made = None;
                netns.enter(&mut || made = make.take().map(|f| f()))?;
                made.unwrap_or_else(|| Err(std::io::Error::other("the namespace ran nothing")))
            }
            Self::Node(_) | Self::Denied => make(),
        }
    }

    /// `wasi:sockets` for this network.
    pub(crate) fn configure(&self, wasi: &mut WasiCtxBuilder) {
        let allowed = !matches!(self, Self::Denied);
        wasi.allow_tcp(allowed)
            .allow_udp(allowed)
            .allow_ip_name_lookup(allowed);
        let this = self.clone();
        wasi.socket_addr_check(move |addr, usage| {
            let ok = match usage {
                SocketAddrUse::TcpConnect => {
                    (this.may_reach(addr.ip()) || this.is_route_endpoint(addr))
                        && this.policy_allows(addr, Transport::Tcp)
                }
                SocketAddrUse::UdpSend => {
                    this.may_reach(addr.ip()) && this.policy_allows(addr, Transport::Udp)
                }
                // Binding, listening, accepting and receiving are the
                // guest's own business; what it reaches is not.
                _ => allowed,
            };
            Box::pin(async move { ok })
        });
    }

    /// Sends an outgoing `wasi:http` request over a connection made in
    /// this network: HTTP/1.1, over TLS for `https` (checked with `tls`),
    /// one connection per request.
    pub(crate) async fn send_request(
        self,
        mut request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        names: Option<Arc<dyn wasmkube_runtime::NameLookup>>,
        tls: Arc<GuestTls>,
    ) -> Result<(http::Response<WasiBody>, OutgoingIo), HttpError> {
        if matches!(self, Self::Denied) {
            return Err(HttpError::HttpRequestDenied);
        }
        let uri = request.uri();
        let secure = uri.scheme() == Some(&http::uri::Scheme::HTTPS);
        let authority = uri.authority().ok_or(HttpError::HttpRequestUriInvalid)?;
        let port = authority
            .port_u16()
            .unwrap_or(if secure { 443 } else { 80 });
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let connect_timeout = options
            .and_then(|o| o.connect_timeout)
            .unwrap_or(DEFAULT_TIMEOUT);
        let first_byte_timeout = options
            .and_then(|o| o.first_byte_timeout)
            .unwrap_or(DEFAULT_TIMEOUT);
        let dns_error = |_| HttpError::DnsError {
            rcode: None,
            info_code: None,
        };
        let addrs: Vec<SocketAddr> = match (host.parse::<IpAddr>(), names) {
            (Ok(ip), _) => vec![SocketAddr::new(ip, port)],
            // As the pod's resolver would: the cluster DNS, the pod's
            // search path.
            (Err(_), Some(names)) => tokio::time::timeout(connect_timeout, names.lookup(host))
                .await
                .map_err(|_| HttpError::DnsTimeout)?
                .map_err(dns_error)?
                .into_iter()
                .map(|ip| SocketAddr::new(ip, port))
                .collect(),
            (Err(_), None) => {
                tokio::time::timeout(connect_timeout, tokio::net::lookup_host((host, port)))
                    .await
                    .map_err(|_| HttpError::DnsTimeout)?
                    .map_err(dns_error)?
                    .collect()
            }
        };
        // Each address the name has that the guest may reach, in order,
        // until one answers (as curl does: `localhost` may be ::1 first).
        let candidates: Vec<SocketAddr> = addrs
            .into_iter()
            .filter(|a| self.may_reach(a.ip()))
            .map(|a| self.route(a))
            .filter(|a| self.policy_allows(*a, Transport::Tcp))
            .collect();
        if candidates.is_empty() {
            return Err(HttpError::DestinationIpProhibited);
        }
        let deadline = tokio::time::Instant::now() + connect_timeout;
        let mut failed = HttpError::ConnectionRefused;
        let mut connected = None;
        for addr in candidates {
            let socket = self
                .make(|| {
                    if addr.is_ipv4() {
                        tokio::net::TcpSocket::new_v4()
                    } else {
                        tokio::net::TcpSocket::new_v6()
                    }
                })
                .map_err(HttpError::Connect)?;
            match tokio::time::timeout_at(deadline, socket.connect(addr)).await {
                Err(_) => return Err(HttpError::ConnectionTimeout),
                Ok(Ok(stream)) => {
                    connected = Some(stream);
                    break;
                }
                Ok(Err(e)) => {
                    failed = match e.kind() {
                        std::io::ErrorKind::ConnectionRefused => HttpError::ConnectionRefused,
                        _ => HttpError::Connect(e),
                    }
                }
            }
        }
        let stream = connected.ok_or(failed)?;
        let _ = stream.set_nodelay(true);
        // The connection runs beside the guest until the response body is
        // read or dropped; its end is what the guest's request learns.
        let (mut sender, connection) = if secure {
            // The name the guest asked for (or the address it gave), not
            // where a Service's address was routed.
            let name = rustls::pki_types::ServerName::try_from(host.to_owned())
                .map_err(|_| HttpError::HttpRequestUriInvalid)?;
            let stream = tokio::time::timeout(
                connect_timeout,
                tokio_rustls::TlsConnector::from(tls.config()?).connect(name, stream),
            )
            .await
            .map_err(|_| HttpError::ConnectionTimeout)?
            .map_err(tls_error)?;
            handshake(stream, connect_timeout).await?
        } else {
            handshake(stream, connect_timeout).await?
        };
        // On the wire the request names its path only (no proxy).
        let path = request
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        *request.uri_mut() = http::Uri::builder()
            .path_and_query(path)
            .build()
            .map_err(|_| HttpError::HttpRequestUriInvalid)?;
        let response = tokio::time::timeout(first_byte_timeout, sender.send_request(request))
            .await
            .map_err(|_| HttpError::ConnectionReadTimeout)??;
        let response = response.map(|body| body.map_err(HttpError::from).boxed_unsync());
        let io: OutgoingIo = Box::new(async move {
            match connection.await {
                Ok(result) => result.map_err(HttpError::from),
                Err(e) => Err(HttpError::InternalError(Some(e.to_string()))),
            }
        });
        Ok((response, io))
    }
}

/// What the guest's request learns when the connection ends.
pub(crate) type OutgoingIo = Box<dyn Future<Output = Result<(), HttpError>> + Send>;

/// Store state that can make sockets for its guest.
pub(crate) trait GuestSockets: WasiView {
    fn guest_sockets(&mut self) -> GuestSocketsView<'_>;
}

/// `wasi:sockets`' socket constructors, moved into the guest's network,
/// and its name lookups, answered from the cluster's names first.
pub(crate) struct GuestSocketsView<'a> {
    sockets: WasiSocketsCtxView<'a>,
    network: &'a GuestNetwork,
    names: Option<&'a Arc<dyn wasmkube_runtime::NameLookup>>,
}

impl<'a> GuestSocketsView<'a> {
    pub(crate) fn new(
        ctx: &'a mut wasmtime_wasi::WasiCtx,
        table: &'a mut wasmtime::component::ResourceTable,
        network: &'a GuestNetwork,
        names: Option<&'a Arc<dyn wasmkube_runtime::NameLookup>>,
    ) -> Self {
        Self {
            sockets: WasiSocketsCtxView {
                ctx: ctx.sockets(),
                table,
            },
            network,
            names,
        }
    }
}

/// `wasi:sockets/ip-name-lookup`: a cluster name (`web`,
/// `web.shop.svc.cluster.local`, with the pod's search path) resolves to
/// its address from the node's cluster DNS records; any other name goes to
/// WASI's lookup, the node's resolvers. (WASI's stream type can only be made
/// by WASI, so a cluster name reaches it as its address: the first one, for
/// a headless Service with several.)
impl ip_name_lookup::Host for GuestSocketsView<'_> {
    fn resolve_addresses(
        &mut self,
        network: Resource<network::Network>,
        name: String,
    ) -> SocketResult<Resource<ResolveAddressStream>> {
        let cluster = self
            .names
            .and_then(|n| n.lookup_cluster(&name))
            .and_then(|ips| ips.into_iter().next());
        let name = cluster.map(|ip| ip.to_string()).unwrap_or(name);
        ip_name_lookup::Host::resolve_addresses(&mut self.sockets, network, name)
    }
}

impl ip_name_lookup::HostResolveAddressStream for GuestSocketsView<'_> {
    fn resolve_next_address(
        &mut self,
        this: Resource<ResolveAddressStream>,
    ) -> SocketResult<Option<network::IpAddress>> {
        ip_name_lookup::HostResolveAddressStream::resolve_next_address(&mut self.sockets, this)
    }

    fn subscribe(
        &mut self,
        this: Resource<ResolveAddressStream>,
    ) -> wasmtime::Result<Resource<wasmtime_wasi::p2::DynPollable>> {
        ip_name_lookup::HostResolveAddressStream::subscribe(&mut self.sockets, this)
    }

    fn drop(&mut self, this: Resource<ResolveAddressStream>) -> wasmtime::Result<()> {
        ip_name_lookup::HostResolveAddressStream::drop(&mut self.sockets, this)
    }
}

struct CreateInGuestNetwork;

impl HasData for CreateInGuestNetwork {
    type Data<'a> = GuestSocketsView<'a>;
}

impl tcp_create_socket::Host for GuestSocketsView<'_> {
    fn create_tcp_socket(&mut self, family: IpAddressFamily) -> SocketResult<Resource<TcpSocket>> {
        let Self {
            sockets, network, ..
        } = self;
        let mut created = None;
        network.make(|| {
            created = Some(tcp_create_socket::Host::create_tcp_socket(sockets, family));
            Ok(())
        })?;
        created.unwrap_or_else(|| Err(std::io::Error::other("no socket was made").into()))
    }
}

impl udp_create_socket::Host for GuestSocketsView<'_> {
    async fn create_udp_socket(
        &mut self,
        family: IpAddressFamily,
    ) -> SocketResult<Resource<UdpSocket>> {
        let Self {
            sockets, network, ..
        } = self;
        let mut create = std::pin::pin!(udp_create_socket::Host::create_udp_socket(
            &mut *sockets,
            family
        ));
        // WASI (48.0.8, pinned) makes the socket in the first poll, before
        // it awaits the socket's registration: only that poll runs in the
        // guest's network, never a suspension point.
        let mut first = true;
        std::future::poll_fn(|cx| {
            if !std::mem::take(&mut first) {
                return create.as_mut().poll(cx);
            }
            let mut polled = std::task::Poll::Pending;
            match network.make(|| {
                polled = create.as_mut().poll(cx);
                Ok(())
            }) {
                Ok(()) => polled,
                Err(e) => std::task::Poll::Ready(Err(e.into())),
            }
        })
        .await
    }
}

impl network::HostNetwork for GuestSocketsView<'_> {
    fn drop(&mut self, this: Resource<network::Network>) -> wasmtime::Result<()> {
        network::HostNetwork::drop(&mut self.sockets, this)
    }
}

impl network::Host for GuestSocketsView<'_> {
    fn convert_error_code(&mut self, error: SocketError) -> wasmtime::Result<ErrorCode> {
        network::Host::convert_error_code(&mut self.sockets, error)
    }

    fn network_error_code(
        &mut self,
        err: Resource<wasmtime::Error>,
    ) -> wasmtime::Result<Option<ErrorCode>> {
        network::Host::network_error_code(&mut self.sockets, err)
    }
}

/// Replaces WASI's socket constructors in `linker` (which already has
/// WASI) with ones that make the socket in the guest's network, its name
/// lookup with one that knows the cluster's names, and its TCP connect
/// with one that sends a connection to a Service's address where the
/// guest's network routes it.
pub(crate) fn add_guest_sockets<T: GuestSockets + 'static>(
    linker: &mut Linker<T>,
) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    tcp_create_socket::add_to_linker::<T, CreateInGuestNetwork>(linker, T::guest_sockets)?;
    udp_create_socket::add_to_linker::<T, CreateInGuestNetwork>(linker, T::guest_sockets)?;
    ip_name_lookup::add_to_linker::<T, CreateInGuestNetwork>(linker, T::guest_sockets)?;
    linker
        .instance(TCP_INTERFACE)?
        .func_wrap("[method]tcp-socket.start-connect", start_connect::<T>)?;
    linker.allow_shadowing(false);
    Ok(())
}

/// The `wasi:sockets` TCP interface WASI's bindings define (guests built
/// against any 0.2 release link to it).
const TCP_INTERFACE: &str = "wasi:sockets/tcp@0.2.12";

/// `tcp-socket.start-connect`, as WASI's, to where the guest's network
/// routes the address: a Service's address is checked as the guest gave
/// it, then connected at one of its endpoints.
fn start_connect<T: GuestSockets>(
    mut store: wasmtime::StoreContextMut<'_, T>,
    (this, net, remote): (
        Resource<TcpSocket>,
        Resource<network::Network>,
        network::IpSocketAddress,
    ),
) -> wasmtime::Result<(Result<(), ErrorCode>,)> {
    let mut view = store.data_mut().guest_sockets();
    let to = SocketAddr::from(remote);
    let result = if view.network.may_reach(to.ip()) {
        let routed = view.network.route(to);
        tcp::HostTcpSocket::start_connect(&mut view.sockets, this, net, routed.into())
    } else {
        Err(ErrorCode::AccessDenied.into())
    };
    Ok((match result {
        Ok(()) => Ok(()),
        Err(e) => Err(network::Host::convert_error_code(&mut view.sockets, e)?),
    },))
}
