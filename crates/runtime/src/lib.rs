//! The contract between the node agent and a container runtime: a small
//! [`Runtime`] trait (prepare an image, start a container) and a
//! [`Container`] handle (wait, terminate, kill, usage). The Wasm runtime
//! implements it in-process; the Linux shim implements the same trait.
//!
//! The agent owns everything around a run: pulling, volumes, env, log files,
//! restarts and status. A runtime only turns a prepared image plus a
//! [`ContainerConfig`] into a running container.

use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// What an image turned out to be, from its manifest's media types.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageKind {
    /// A Wasm module or component: the bytes are in `module`.
    Wasm { module: PathBuf, component: bool },
    /// A Linux container image: its layers (compressed tars, in order) and
    /// its config blob.
    Linux {
        layers: Vec<PathBuf>,
        config: PathBuf,
    },
}

/// An image present on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    /// The reference it was pulled by, as the pod spec names it.
    pub reference: String,
    /// `repository@sha256:...` of the manifest: the container's `imageID`.
    pub id: String,
    pub kind: ImageKind,
    /// Total bytes of its blobs.
    pub size: u64,
}

impl Image {
    pub fn is_wasm(&self) -> bool {
        matches!(self.kind, ImageKind::Wasm { .. })
    }
}

/// A directory the container sees.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    pub host_path: PathBuf,
    pub container_path: String,
    pub read_only: bool,
}

/// The parts of a container's `securityContext` a runtime enforces (merged
/// with the pod's by the agent).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Security {
    pub run_as_user: Option<i64>,
    pub run_as_group: Option<i64>,
    pub run_as_non_root: bool,
    pub read_only_root_filesystem: bool,
    pub privileged: bool,
    /// `None` leaves it to the runtime's default (allowed, as Kubernetes).
    pub allow_privilege_escalation: Option<bool>,
    pub capabilities_add: Vec<String>,
    pub capabilities_drop: Vec<String>,
    /// `seccompProfile: Unconfined` (pod or container): no system call
    /// filter. Otherwise a Linux container gets the runtime's default.
    pub seccomp_unconfined: bool,
    /// `seccompProfile: Localhost`: the profile the node keeps under that
    /// name (its JSON, in the OCI runtime spec's seccomp form), used
    /// instead of the runtime's default.
    pub seccomp_localhost: Option<String>,
    /// The AppArmor profile the pod names for the container; `None`
    /// leaves it to the runtime (its default profile where the node has
    /// AppArmor, except for a privileged container).
    pub app_armor: Option<AppArmor>,
}

/// An AppArmor profile for a container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AppArmor {
    /// The runtime's default profile.
    RuntimeDefault,
    /// No AppArmor confinement.
    Unconfined,
    /// A profile loaded on the node, by name.
    Localhost(String),
}

/// Where a container's stdout or stderr goes.
#[derive(Debug)]
pub enum Output {
    /// A file descriptor, the write end of a pipe the agent reads: what a
    /// process needs.
    File(File),
    /// Bytes handed to the agent in-process, with no descriptor at all:
    /// what an in-process guest can use, so ten thousand of them do not
    /// hold tens of thousands of pipe ends.
    Sink(Arc<dyn LogSink>),
}

/// Takes an in-process container's output.
pub trait LogSink: Send + Sync + std::fmt::Debug {
    /// Appends `bytes` to the stream (they need not end a line).
    fn write(&self, bytes: &[u8]);
}

/// A pod's network namespace, for a runtime that makes sockets for its
/// guests in its own process (a socket stays in the namespace it was made
/// in, whichever thread uses it later).
pub trait PodNetns: Send + Sync + std::fmt::Debug {
    /// Runs `f` on the calling thread inside the pod's network namespace,
    /// and brings the thread back to its own before returning. `f` should
    /// only make sockets: it must not block or await.
    fn enter(&self, f: &mut dyn FnMut()) -> std::io::Result<()>;
}

/// Name lookups answered as the pod's own resolver would answer them (its
/// `dnsPolicy`: the cluster DNS and the pod's search path), for guests that
/// run inside the agent and so have no `/etc/resolv.conf` of their own.
pub trait NameLookup: Send + Sync + std::fmt::Debug {
    /// The addresses of `host`.
    fn lookup(
        &self,
        host: &str,
    ) -> std::pin::Pin<
        Box<dyn Future<Output = std::io::Result<Vec<std::net::IpAddr>>> + Send + 'static>,
    >;

    /// The addresses of `host` when it is a cluster name (with the pod's
    /// search path), answered at once from what the node already knows;
    /// `None` for any other name, which the node's resolvers answer.
    fn lookup_cluster(&self, host: &str) -> Option<Vec<std::net::IpAddr>> {
        let _ = host;
        None
    }
}

/// The transport a guest's connection or datagram uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Udp,
}

/// Where a connection to a Service's address goes when the pod shares the
/// node's network and no service proxy routes it: the runtime's socket
/// layer asks before it connects, as the proxy's rules would rewrite it.
pub trait ServiceRoutes: Send + Sync + std::fmt::Debug {
    /// One of the ready endpoints behind `to`, at the address and port it
    /// really listens on, when `to` is a Service's address and port;
    /// `None` for any other address (connect as asked).
    fn route(&self, to: std::net::SocketAddr) -> Option<std::net::SocketAddr>;

    /// Whether `to` is where a route may send a connection (a pod's port
    /// on this node), so a routed connection is not refused as one to the
    /// node's own address.
    fn is_endpoint(&self, to: std::net::SocketAddr) -> bool;

    /// Whether the NetworkPolicies of the guest's pod and of whatever
    /// listens at `to` (where the connection, or datagram, really goes,
    /// after routing) let the guest send there over `transport`; with no
    /// node rules to enforce them, the decision is taken here, in-process.
    /// By default: yes.
    fn may_connect(&self, to: std::net::SocketAddr, transport: Transport) -> bool {
        let _ = (to, transport);
        true
    }

    /// Whether the NetworkPolicies of the guest's pod let a connection from
    /// `from` in at the pod's listener `local`. By default: yes.
    fn may_accept(&self, from: std::net::SocketAddr, local: std::net::SocketAddr) -> bool {
        let _ = (from, local);
        true
    }
}

/// The node's ids a pod's user namespace maps its ids 0.. onto.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdRange {
    pub host_id: u32,
    pub size: u32,
}

/// Everything a runtime needs to start one container.
#[derive(Debug)]
pub struct ContainerConfig {
    /// Unique among all runs on the node (pod UID, container name, restart).
    pub id: String,
    /// The container's name in its pod.
    pub name: String,
    /// The pod's host name (its name, or `spec.hostname`).
    pub hostname: String,
    pub image: Image,
    /// The container's `command` (replaces the image's entrypoint when not
    /// empty) and `args` (replace the image's cmd when not empty, or when
    /// `command` is given), with `$(VAR)` already expanded.
    pub command: Vec<String>,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub working_dir: Option<String>,
    pub mounts: Vec<Mount>,
    /// Where the container's stdout and stderr go (the agent writes the
    /// log files from them).
    pub stdout: Output,
    pub stderr: Output,
    /// The read end of a pipe the agent writes what `kubectl attach -i`
    /// sends to (a container with `stdin: true`), or the terminal's slave
    /// end (`tty`); `None`: the container's stdin is empty.
    pub stdin: Option<File>,
    /// `tty: true`: `stdin`, `stdout` and `stderr` are the slave end of a
    /// terminal the agent keeps (it logs the output and types the input):
    /// the container runs on it as on a terminal (runc's terminal mode; a
    /// Wasm guest's stdio reports one).
    pub tty: bool,
    /// `hostUsers: false`: the container runs in a user namespace of its
    /// own, its ids 0 and up being the node's from `host_id` (a range the
    /// agent gives each such pod); `None`: the node's own ids.
    pub user_namespace: Option<IdRange>,
    /// `limits.memory` in bytes.
    pub memory_limit: Option<u64>,
    /// `limits.cpu` in millicores.
    pub cpu_millis: Option<u64>,
    /// `requests.cpu` in millicores (the share under contention).
    pub cpu_request_millis: Option<u64>,
    pub security: Security,
    /// Counters the runtime keeps current while the container runs.
    pub usage: Arc<Usage>,
    /// The pod's IP and the container's ports: where a container that
    /// serves (an HTTP function) listens.
    pub pod_ip: std::net::IpAddr,
    pub ports: Vec<u16>,
    /// The pod's network namespace (`None`: the node's network).
    pub netns: Option<PathBuf>,
    /// The same namespace, opened, for sockets an in-process runtime makes
    /// for the guest's own connections (`None`: the node's network).
    pub pod_netns: Option<Arc<dyn PodNetns>>,
    /// Sockets the agent opened in the pod's network for `ports`, for a
    /// runtime that serves in its own process (empty: it binds
    /// `pod_ip:port` itself).
    pub listeners: Vec<std::net::TcpListener>,
    /// The pod's `/etc/resolv.conf` (`None`: the node's own).
    pub resolv_conf: Option<String>,
    /// Name lookups for an in-process guest (`None`: the node's resolver).
    pub names: Option<Arc<dyn NameLookup>>,
    /// Service addresses resolved to endpoints for an in-process guest's
    /// connections, when the pod shares the node's network (`None`:
    /// connections go where they are addressed).
    pub service_routes: Option<Arc<dyn ServiceRoutes>>,
}

/// Live resource usage of one container, updated by the runtime as it runs
/// and read by the agent for `kubectl top` and Prometheus.
#[derive(Debug, Default)]
pub struct Usage {
    cpu_nanos: AtomicU64,
    memory_bytes: AtomicU64,
    memory_high_water: AtomicU64,
    requests: AtomicU64,
    instances: AtomicU64,
    concurrency: std::sync::Mutex<Concurrency>,
    serves_requests: std::sync::atomic::AtomicBool,
    module: std::sync::OnceLock<ModuleFacts>,
}

/// What a Wasm container runs, as its node got it ready: for the
/// dashboard and the custom metrics API.
#[derive(Clone, Debug, PartialEq)]
pub struct ModuleFacts {
    /// `module`, `component` or `http` (a `wasi:http` component).
    pub kind: &'static str,
    /// The Wasm binary's size.
    pub bytes: u64,
    /// The native code's size (the precompiled artifact).
    pub native_bytes: u64,
    /// How long compiling took, when this node compiled it for the
    /// container's image; `None` when it came from the compile cache.
    pub compiled_in: Option<Duration>,
    /// How long loading the native code took.
    pub loaded_in: Duration,
}

/// Requests in flight, and their integral over time (request-seconds), so
/// a reader can take the exact average concurrency between two readings,
/// as CPU time gives the average CPU rate.
#[derive(Debug, Default)]
struct Concurrency {
    in_flight: u64,
    since: Option<std::time::Instant>,
    integral: f64,
}

impl Concurrency {
    fn advance(&mut self, now: std::time::Instant) {
        if let Some(since) = self.since {
            self.integral += self.in_flight as f64 * now.duration_since(since).as_secs_f64();
        }
        self.since = Some(now);
    }
}

/// One HTTP request in flight: counted from its arrival until this is
/// dropped (when its response is done).
#[derive(Debug)]
pub struct InFlight(Arc<Usage>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut c = self.0.concurrency.lock().expect("concurrency lock");
        c.advance(std::time::Instant::now());
        c.in_flight = c.in_flight.saturating_sub(1);
    }
}

/// One live Wasm instance, counted until this is dropped.
#[derive(Debug)]
pub struct LiveInstance(Arc<Usage>);

impl Drop for LiveInstance {
    fn drop(&mut self) {
        self.0.instance_ended();
    }
}

impl Usage {
    pub fn add_cpu(&self, d: Duration) {
        self.cpu_nanos
            .fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }
    pub fn set_memory(&self, bytes: u64) {
        self.memory_bytes.store(bytes, Ordering::Relaxed);
        self.memory_high_water.fetch_max(bytes, Ordering::Relaxed);
    }
    /// CPU time used so far.
    pub fn cpu(&self) -> Duration {
        Duration::from_nanos(self.cpu_nanos.load(Ordering::Relaxed))
    }
    /// Memory in use now (the working set), in bytes.
    pub fn memory(&self) -> u64 {
        self.memory_bytes.load(Ordering::Relaxed)
    }
    /// The most memory it has had, in bytes.
    pub fn memory_high_water(&self) -> u64 {
        self.memory_high_water.load(Ordering::Relaxed)
    }
    /// The container serves requests the runtime counts (an HTTP function):
    /// its request figures mean something, zero included.
    pub fn mark_serving(&self) {
        self.serves_requests.store(true, Ordering::Relaxed);
    }
    pub fn serves_requests(&self) -> bool {
        self.serves_requests.load(Ordering::Relaxed)
    }
    /// An HTTP request arrived: it counts as in flight until the returned
    /// guard is dropped.
    pub fn request_started(self: &Arc<Self>) -> InFlight {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let mut c = self.concurrency.lock().expect("concurrency lock");
        c.advance(std::time::Instant::now());
        c.in_flight += 1;
        InFlight(self.clone())
    }
    /// Requests in flight now, and request-seconds in flight so far (the
    /// average concurrency between two readings is the integral's change
    /// over the time between them).
    pub fn concurrency(&self) -> (u64, f64) {
        let mut c = self.concurrency.lock().expect("concurrency lock");
        c.advance(std::time::Instant::now());
        (c.in_flight, c.integral)
    }
    /// A command guest's instance is live until the returned guard is
    /// dropped.
    pub fn live_instance(self: &Arc<Self>) -> LiveInstance {
        self.instance_started();
        LiveInstance(self.clone())
    }
    pub fn instance_started(&self) {
        self.instances.fetch_add(1, Ordering::Relaxed);
    }
    pub fn instance_ended(&self) {
        self.instances.fetch_sub(1, Ordering::Relaxed);
    }
    /// HTTP requests served so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
    /// Instances live now (one per request in flight for HTTP functions).
    pub fn instances(&self) -> u64 {
        self.instances.load(Ordering::Relaxed)
    }
    /// Records what the container runs (once; later calls are ignored).
    pub fn set_module(&self, facts: ModuleFacts) {
        let _ = self.module.set(facts);
    }
    /// What the container runs, when it is a Wasm module or component.
    pub fn module(&self) -> Option<&ModuleFacts> {
        self.module.get()
    }
}

/// Why a container ended, in Kubernetes' vocabulary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exit {
    pub code: i32,
    /// `Completed`, `Error`, `OOMKilled`, ...
    pub reason: String,
    pub message: Option<String>,
}

impl Exit {
    /// A process-style exit: `Completed` for 0, `Error` otherwise.
    pub fn code(code: i32) -> Self {
        Self {
            code,
            reason: if code == 0 { "Completed" } else { "Error" }.into(),
            message: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The image is not something this runtime runs (a Linux image on the
    /// Wasm runtime, say).
    #[error("{0}")]
    Unsupported(String),
    /// The image is broken (a malformed module, say).
    #[error("{0}")]
    InvalidImage(String),
    /// The container's configuration cannot work with its image (a root
    /// user under runAsNonRoot, say): `CreateContainerConfigError`.
    #[error("{0}")]
    Config(String),
    /// The container could not be set up (a volume, a log file).
    #[error("{0}")]
    Setup(String),
}

/// A container runtime.
#[async_trait::async_trait]
pub trait Runtime: Send + Sync {
    /// The RuntimeClass handler this runtime serves (`wasmtime`, `runc`).
    fn handler(&self) -> &str;

    /// The runtime's own Prometheus metrics, as whole families in the text
    /// format, for the agent's `/metrics` page (none by default).
    fn metrics(&self) -> String {
        String::new()
    }

    /// Makes an image ready for fast starts (compiles a module, unpacks
    /// layers). Idempotent; the expensive part runs once per image per node.
    async fn prepare(&self, image: &Image) -> Result<(), Error>;

    /// Starts a container from a prepared image.
    async fn start(&self, config: ContainerConfig) -> Result<Box<dyn Container>, Error>;
}

/// A started container.
#[async_trait::async_trait]
pub trait Container: Send {
    /// Resolves once the container has ended; may be called again after.
    async fn wait(&mut self) -> Exit;

    /// Asks the container to stop (SIGTERM for a process). Returns false
    /// when the runtime has no such request (a Wasm guest has no signals)
    /// and only [`Container::kill`] ends it.
    fn terminate(&mut self) -> bool;

    /// Ends the container now.
    fn kill(&mut self);

    /// A way to run more processes in the container (`kubectl exec`, exec
    /// probes), when the runtime has processes; `None` for a Wasm guest.
    fn exec(&self) -> Option<Arc<dyn Exec>> {
        None
    }

    /// Tells the container its terminal was resized (the agent has set the
    /// new size, columns and rows, on it), when the runtime has a way to
    /// (`tty: true`; runc passes `SIGWINCH` on, a Wasm guest hears nothing).
    fn terminal(&self) -> Option<Resize> {
        None
    }
}

/// Sets a terminal's size (columns, rows).
#[derive(Clone)]
pub struct Resize(pub Arc<dyn Fn(u16, u16) + Send + Sync>);

impl Resize {
    pub fn set(&self, cols: u16, rows: u16) {
        (self.0)(cols, rows);
    }
}

impl std::fmt::Debug for Resize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Resize")
    }
}

/// Runs commands inside a running container.
#[async_trait::async_trait]
pub trait Exec: Send + Sync + std::fmt::Debug {
    /// Starts `command` in the container, on a terminal of `tty`'s size
    /// (columns, rows; zero when unknown) when given (then stdout and stderr
    /// are one stream and [`ExecProcess::stderr`] is `None`). The process
    /// has the container's user, env and working directory.
    async fn exec(&self, command: &[String], tty: Option<(u16, u16)>)
    -> Result<ExecProcess, Error>;
}

/// A reader of a process's output (futures' IO traits: this crate stays
/// free of any executor).
pub type ExecOutput = std::pin::Pin<Box<dyn futures_io::AsyncRead + Send>>;

/// A process started by [`Exec::exec`]: its streams, how to resize its
/// terminal, and its exit.
pub struct ExecProcess {
    pub stdin: std::pin::Pin<Box<dyn futures_io::AsyncWrite + Send>>,
    pub stdout: ExecOutput,
    pub stderr: Option<ExecOutput>,
    /// Sets the terminal's size (columns, rows); a no-op without a tty.
    pub resize: Box<dyn Fn(u16, u16) + Send + Sync>,
    /// The process's exit code (128 + signal when a signal ended it).
    pub exit: std::pin::Pin<Box<dyn std::future::Future<Output = Result<i32, Error>> + Send>>,
}

impl std::fmt::Debug for ExecProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecProcess")
            .field("tty", &self.stderr.is_none())
            .finish_non_exhaustive()
    }
}

/// What the process does when one of its executor threads runs out of
/// work: set once by the binary (which owns the allocator), called by every
/// executor a runtime builds, so memory a burst of pods freed is handed
/// back whichever threads freed it.
static THREAD_IDLE: OnceLock<fn()> = OnceLock::new();

/// Sets what [`thread_idle`] does, once for the process.
pub fn set_thread_idle_hook(hook: fn()) {
    let _ = THREAD_IDLE.set(hook);
}

/// For an executor's `on_thread_park`: runs the process's idle hook, if any.
pub fn thread_idle() {
    if let Some(hook) = THREAD_IDLE.get() {
        hook();
    }
}
