//! The Wasm container runtime: runs WASI preview 1 command modules in-process
//! on one Wasmtime engine (pooling allocator, async execution, epoch
//! interruption), with limits that are enforced, not advisory:
//!
//! - `limits.memory` is a hard cap on each container's linear memory; a
//!   growth beyond it fails, and a guest that traps on that failure is
//!   reported [`Exit::OomKilled`];
//! - `limits.cpu` is a quota per 100 ms period: every epoch tick (10 ms) the
//!   guest yields to the executor, and once it has used its share of the
//!   period it sleeps until the next one;
//! - a guest only ever sees its args, env and preopened directories.
//!
//! Modules are compiled once per content digest and engine and cached on
//! disk as precompiled artifacts, loaded afterwards without compiling.
//!
//! **Architecture invariant:** this is the only crate that depends on
//! wasmtime (checked by `crates/cli/tests/boundaries.rs`).

mod cache;
mod component;
mod container;
mod http;
mod limits;
mod net;
mod sink;
mod tty;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

pub use wasmkube_runtime::Usage as LiveUsage;
use wasmtime::component::Component;
use wasmtime::{
    Config as EngineConfig, Engine, InstanceAllocationStrategy, InstancePre, Linker, Module,
    PoolingAllocationConfig, Store, UpdateDeadline,
};
use wasmtime_wasi::cli::StdoutStream;
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtxBuilder};

pub use cache::Provenance;
pub use component::PreparedComponent;
pub use container::{HANDLER, WasmContainers};
pub use http::PreparedProxy;
use limits::Limiter;
pub use limits::OutOfMemory;
pub use net::GuestNetwork;

/// The Wasmtime release this runtime is built on (reported as the node's
/// container runtime version).
pub const WASMTIME_VERSION: &str = "48.0.8";

/// How often the engine's epoch advances: the CPU accounting granularity.
const EPOCH_TICK: Duration = Duration::from_millis(10);
/// The CPU quota period (as the CFS default).
const CPU_PERIOD: Duration = Duration::from_millis(100);

/// Engine-wide settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where precompiled modules are kept.
    pub cache_dir: PathBuf,
    /// Instances that can be live at once (the pooling allocator's slots).
    pub max_instances: u32,
    /// The largest linear memory any instance may have; container limits
    /// are capped here.
    pub max_memory_bytes: usize,
    /// PEM certificates guests' outgoing HTTPS trusts besides the system's
    /// roots (the node passes its cluster's CA).
    pub guest_ca_pem: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            cache_dir: std::env::temp_dir().join("wasmkube-module-cache"),
            max_instances: 1000,
            max_memory_bytes: 1 << 30,
            guest_ca_pem: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("could not set up the Wasm engine: {0}")]
    Engine(String),
    #[error("invalid Wasm module: {0}")]
    InvalidModule(String),
    #[error("module cache {path}: {source}")]
    Cache {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not prepare the container: {0}")]
    Setup(String),
}

/// A volume as the guest sees it.
#[derive(Clone, Debug)]
pub struct Mount {
    pub host_path: PathBuf,
    pub guest_path: String,
    pub read_only: bool,
}

/// Where a guest's stdout or stderr goes.
#[derive(Clone, Debug)]
pub enum Output {
    /// Appended to this file.
    Append(PathBuf),
    /// Written to this open file (the write end of a pipe, say).
    File(Arc<std::fs::File>),
    /// Handed to the agent in-process: no file descriptor per guest.
    Sink(Arc<dyn wasmkube_runtime::LogSink>),
}

impl Default for Output {
    fn default() -> Self {
        Self::Append(PathBuf::from("/dev/null"))
    }
}

impl Output {
    fn open(&self) -> Result<std::fs::File, Error> {
        match self {
            Self::Append(p) => std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| Error::Setup(format!("log file {}: {e}", p.display()))),
            Self::File(f) => f
                .try_clone()
                .map_err(|e| Error::Setup(format!("output: {e}"))),
            Self::Sink(_) => unreachable!("sinks are not opened"),
        }
    }

    /// Sets this as the WASI context's stdout (`stderr` false) or stderr,
    /// reporting a terminal when `tty`.
    fn attach(&self, wasi: &mut WasiCtxBuilder, stderr: bool, tty: bool) -> Result<(), Error> {
        fn set(wasi: &mut WasiCtxBuilder, stderr: bool, out: impl StdoutStream + 'static) {
            if stderr {
                wasi.stderr(out);
            } else {
                wasi.stdout(out);
            }
        }
        match self {
            Self::Sink(sink) => set(wasi, stderr, sink::SinkStream(sink.clone())),
            _ => {
                let out = wasmtime_wasi::cli::OutputFile::new(self.open()?);
                if tty {
                    set(wasi, stderr, tty::OnTerminal(out));
                } else {
                    set(wasi, stderr, out);
                }
            }
        }
        Ok(())
    }
}

impl Output {
    /// The file appended to, for [`Output::Append`].
    pub fn path(&self) -> Option<&Path> {
        match self {
            Self::Append(p) => Some(p),
            Self::File(_) | Self::Sink(_) => None,
        }
    }
}

impl From<PathBuf> for Output {
    fn from(p: PathBuf) -> Self {
        Self::Append(p)
    }
}

/// Everything one container run needs.
#[derive(Clone, Debug, Default)]
pub struct ContainerSpec {
    /// `argv`, program name first.
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub mounts: Vec<Mount>,
    pub stdout: Output,
    pub stderr: Output,
    /// The read end of a pipe the guest's stdin reads, or the terminal's
    /// slave end (`tty`); `None`: empty.
    pub stdin: Option<Arc<std::fs::File>>,
    /// The guest's stdin, stdout and stderr are a terminal's slave end
    /// (`stdout` and `stderr` then are files).
    pub tty: bool,
    /// `limits.memory` in bytes.
    pub memory_limit: Option<u64>,
    /// `limits.cpu` in millicores.
    pub cpu_millis: Option<u64>,
    /// Counters kept current while the guest runs.
    pub live: Arc<LiveUsage>,
    /// Where the guest's own sockets (`wasi:sockets`, outgoing
    /// `wasi:http`) are made.
    pub network: GuestNetwork,
    /// How the guest's outgoing `wasi:http` requests resolve names (`None`:
    /// the node's resolver).
    pub names: Option<Arc<dyn wasmkube_runtime::NameLookup>>,
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Exit {
    /// The guest exited (or returned from `_start`, code 0).
    Code(i32),
    /// The guest needed more memory than its limit.
    OomKilled { message: String },
    /// The guest trapped (unreachable, stack overflow, bad access, ...).
    Trap { message: String },
}

impl Exit {
    /// The exit code Kubernetes reports: 0, the guest's code, 137 for an
    /// OOM kill, 1 for a trap.
    pub fn code(&self) -> i32 {
        match self {
            Self::Code(c) => *c,
            Self::OomKilled { .. } => 137,
            Self::Trap { .. } => 1,
        }
    }
}

/// What a run used.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Time the guest ran (in slices between epoch ticks).
    pub cpu: Duration,
    /// The largest linear memory it had, in bytes.
    pub memory_high_water: u64,
}

/// Per-store state of a command module: WASI preview 1 and the meter.
pub(crate) struct Host {
    wasi: WasiP1Ctx,
    meter: Meter,
}

/// What every store carries for metering: the memory limiter and the CPU
/// account.
pub(crate) struct Meter {
    limiter: Limiter,
    cpu: CpuAccount,
}

impl Meter {
    /// Closes the accounts of a finished run: its exit and usage.
    pub(crate) fn finish(&mut self, result: wasmtime::Result<i32>) -> (Exit, Usage) {
        let now = Instant::now();
        self.cpu.total += now.saturating_duration_since(self.cpu.slice_start);
        let usage = Usage {
            cpu: self.cpu.total,
            memory_high_water: self.limiter.high_water() as u64,
        };
        let exit = match result {
            Ok(code) => Exit::Code(code),
            Err(e) => classify(e, &self.limiter),
        };
        (exit, usage)
    }

    pub(crate) fn start_slice(&mut self) {
        self.cpu.slice_start = Instant::now();
    }
}

/// A store whose memory growth goes through the meter's limiter and whose
/// every epoch tick goes through its CPU account.
pub(crate) fn metered_store<T: Send + 'static>(
    engine: &Engine,
    host: T,
    meter: fn(&mut T) -> &mut Meter,
) -> Store<T> {
    let mut store = Store::new(engine, host);
    store.limiter(move |h| &mut meter(h).limiter);
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(move |mut ctx| Ok(meter(ctx.data_mut()).cpu.tick()));
    store
}

/// WASI for one run: only the spec's args, env, stdio and preopened
/// directories.
pub(crate) fn wasi_builder(spec: &ContainerSpec) -> Result<WasiCtxBuilder, Error> {
    let mut wasi = WasiCtxBuilder::new();
    wasi.args(&spec.args);
    spec.network.configure(&mut wasi);
    spec.stdout.attach(&mut wasi, false, spec.tty)?;
    spec.stderr.attach(&mut wasi, true, spec.tty)?;
    if let Some(stdin) = spec.stdin.as_ref().filter(|_| spec.tty) {
        // Read on a thread of its own, as a terminal is not a pipe; the
        // agent closes the terminal when the run ends, which ends the read.
        let input = stdin
            .try_clone()
            .map_err(|e| Error::Setup(format!("stdin: {e}")))?;
        wasi.stdin(tty::OnTerminal(wasmtime_wasi::cli::InputFile::new(input)));
    } else if let Some(stdin) = &spec.stdin {
        let pipe = stdin
            .try_clone()
            .and_then(tokio::net::unix::pipe::Receiver::from_file)
            .map_err(|e| Error::Setup(format!("stdin: {e}")))?;
        wasi.stdin(wasmtime_wasi::cli::AsyncStdinStream::new(pipe));
    }
    for (k, v) in &spec.env {
        wasi.env(k, v);
    }
    for m in &spec.mounts {
        let perms = if m.read_only {
            FsPerms::ReadOnly
        } else {
            FsPerms::ReadWrite
        };
        wasi.preopened_dir(&m.host_path, &m.guest_path, perms)
            .map_err(|e| Error::Setup(format!("volume {}: {e:#}", m.guest_path)))?;
    }
    Ok(wasi)
}

struct CpuAccount {
    quota: Option<Duration>,
    period_start: Instant,
    used_in_period: Duration,
    slice_start: Instant,
    total: Duration,
    live: Arc<LiveUsage>,
}

impl CpuAccount {
    fn new(cpu_millis: Option<u64>, live: Arc<LiveUsage>) -> Self {
        let now = Instant::now();
        Self {
            quota: cpu_millis.map(|m| CPU_PERIOD.mul_f64(m as f64 / 1000.0)),
            period_start: now,
            used_in_period: Duration::ZERO,
            slice_start: now,
            total: Duration::ZERO,
            live,
        }
    }

    /// Called at every epoch tick while the guest runs: yield, and sleep
    /// out the rest of the period once the quota is spent.
    fn tick(&mut self) -> UpdateDeadline {
        let now = Instant::now();
        let slice = now.saturating_duration_since(self.slice_start);
        self.total += slice;
        self.live.add_cpu(slice);
        if now.duration_since(self.period_start) >= CPU_PERIOD {
            self.period_start = now;
            self.used_in_period = Duration::ZERO;
        }
        self.used_in_period += slice;
        match self.quota {
            Some(quota) if self.used_in_period >= quota => {
                let resume = self.period_start + CPU_PERIOD;
                self.period_start = resume;
                self.used_in_period = Duration::ZERO;
                self.slice_start = resume;
                let sleep = tokio::time::sleep_until(resume.into());
                UpdateDeadline::YieldCustom(1, Box::pin(sleep))
            }
            _ => {
                self.slice_start = now;
                UpdateDeadline::Yield(1)
            }
        }
    }
}

/// The engine, the linker and the module cache; cheap to share.
pub struct WasmRuntime {
    engine: Engine,
    linker: Linker<Host>,
    component_linker: wasmtime::component::Linker<component::ComponentHost>,
    http_linker: wasmtime::component::Linker<http::HttpHost>,
    config: Config,
    cache: cache::ModuleCache,
    stop_ticker: Arc<AtomicBool>,
    /// Guests' outgoing HTTPS trust.
    guest_tls: Arc<net::GuestTls>,
}

impl std::fmt::Debug for WasmRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmRuntime")
            .field("config", &self.config)
            .finish()
    }
}

impl Drop for WasmRuntime {
    fn drop(&mut self) {
        self.stop_ticker.store(true, Ordering::Relaxed);
    }
}

impl WasmRuntime {
    pub fn new(config: Config) -> Result<Self, Error> {
        let mut pool = PoolingAllocationConfig::default();
        // A component holds a few core instances (the guest, WASI adapter
        // shims); most instances have one memory, components adapted from
        // preview 1 two. Each memory slot reserves 4 GiB of address space
        // (bounds checks are elided), and 128 TiB hold about 30,000: the
        // memory count is the ceiling to size deliberately.
        let memories = config
            .max_instances
            .saturating_add(config.max_instances / 4);
        pool.total_component_instances(config.max_instances)
            .total_core_instances(config.max_instances.saturating_mul(4))
            .total_memories(memories)
            .total_tables(config.max_instances)
            .total_stacks(config.max_instances)
            .max_memory_size(config.max_memory_bytes)
            // A slot's memory and table are zeroed in place when an
            // instance ends (up to these sizes, which cover an HTTP
            // function's request), not handed back to the kernel: handing
            // them back made the next instance's first writes fault, and
            // every such fault flushed the TLBs of every core running the
            // agent's threads (an IPI each).
            .linear_memory_keep_resident(2 << 20)
            .table_keep_resident(64 << 10);
        let mut ec = EngineConfig::new();
        ec.epoch_interruption(true)
            // Data segments copied into the slot's resident memory, not
            // mapped copy-on-write from the module image: a copy-on-write
            // fault per page written also flushed every core's TLB.
            .memory_init_cow(false)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
            // Deep recursion traps instead of touching the host's stack.
            .max_wasm_stack(1 << 20);
        let engine = Engine::new(&ec).map_err(|e| Error::Engine(format!("{e:#}")))?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut linker, |h: &mut Host| &mut h.wasi)
            .map_err(|e| Error::Engine(format!("{e:#}")))?;
        let mut component_linker = wasmtime::component::Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut component_linker)
            .and_then(|()| net::add_guest_sockets(&mut component_linker))
            .map_err(|e| Error::Engine(format!("{e:#}")))?;
        // HTTP functions get wasi:cli too: Rust guests import it even when
        // they target wasi:http/proxy (as `wasmtime serve -Scli`).
        let mut http_linker = wasmtime::component::Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut http_linker)
            .and_then(|()| wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut http_linker))
            .and_then(|()| net::add_guest_sockets(&mut http_linker))
            .map_err(|e| Error::Engine(format!("{e:#}")))?;
        let cache = cache::ModuleCache::open(config.cache_dir.clone(), &engine)?;
        let stop_ticker = Arc::new(AtomicBool::new(false));
        {
            let (engine, stop) = (engine.clone(), stop_ticker.clone());
            std::thread::Builder::new()
                .name("wasm-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(EPOCH_TICK);
                        engine.increment_epoch();
                    }
                })
                .map_err(|e| Error::Engine(e.to_string()))?;
        }
        Ok(Self {
            engine,
            linker,
            component_linker,
            http_linker,
            guest_tls: Arc::new(net::GuestTls::new(config.guest_ca_pem.clone())),
            config,
            cache,
            stop_ticker,
        })
    }

    /// Loads a module: from the precompiled cache when this engine compiled
    /// it before, otherwise compiled now (once, however many callers ask at
    /// the same time; off any request path: call this from a blocking task)
    /// and cached.
    pub fn load(&self, bytes: &[u8]) -> Result<Module, Error> {
        self.load_traced(bytes).map(|(m, _)| m)
    }

    /// Loads a module as [`WasmRuntime::load`] does, saying how it was had.
    pub fn load_traced(&self, bytes: &[u8]) -> Result<(Module, Provenance), Error> {
        self.cache.load(
            bytes,
            |b| self.engine.precompile_module(b),
            |p| deserialize_module(&self.engine, p),
        )
    }

    /// Loads a component as [`WasmRuntime::load`] loads a module.
    pub fn load_component(&self, bytes: &[u8]) -> Result<Component, Error> {
        self.load_component_traced(bytes).map(|(c, _)| c)
    }

    /// Loads a component as [`WasmRuntime::load_traced`] loads a module.
    pub fn load_component_traced(&self, bytes: &[u8]) -> Result<(Component, Provenance), Error> {
        self.cache.load(
            bytes,
            |b| self.engine.precompile_component(b),
            |p| deserialize_component(&self.engine, p),
        )
    }

    /// How many modules and components this runtime has compiled (the rest
    /// were loaded from the cache).
    pub fn compiled(&self) -> u64 {
        self.cache.compiled()
    }

    /// The compile cache's figures: compiles, loads from the cache, and
    /// the seconds spent compiling.
    pub fn cache_stats(&self) -> (u64, u64, f64) {
        self.cache.stats()
    }

    /// Links a module against WASI once, so every later instance of it
    /// skips import resolution (`InstancePre`).
    pub fn prepare(&self, module: &Module) -> Result<Prepared, Error> {
        let pre = self
            .linker
            .instantiate_pre(module)
            .map_err(|e| Error::InvalidModule(format!("{e:#}")))?;
        Ok(Prepared { pre })
    }

    /// Runs a command module to completion. Dropping the future interrupts
    /// the guest (the grace period of a deletion ends this way).
    pub async fn run(&self, module: &Module, spec: &ContainerSpec) -> Result<(Exit, Usage), Error> {
        self.run_prepared(&self.prepare(module)?, spec).await
    }

    /// Runs a prepared command module to completion, as [`WasmRuntime::run`].
    pub async fn run_prepared(
        &self,
        prepared: &Prepared,
        spec: &ContainerSpec,
    ) -> Result<(Exit, Usage), Error> {
        let host = Host {
            wasi: wasi_builder(spec)?.build_p1(),
            meter: self.meter(spec),
        };
        let mut store = metered_store(&self.engine, host, |h| &mut h.meter);
        let result = async {
            let instance = prepared.pre.instantiate_async(&mut store).await?;
            let start = instance.get_typed_func::<(), ()>(&mut store, "_start")?;
            let _live = spec.live.live_instance();
            store.data_mut().meter.start_slice();
            start.call_async(&mut store, ()).await
        }
        .await;
        Ok(store.data_mut().meter.finish(result.map(|()| 0)))
    }

    pub(crate) fn meter(&self, spec: &ContainerSpec) -> Meter {
        let limit = spec.memory_limit.map(|l| {
            usize::try_from(l)
                .unwrap_or(usize::MAX)
                .min(self.config.max_memory_bytes)
        });
        Meter {
            limiter: Limiter::new(limit, spec.live.clone()),
            cpu: CpuAccount::new(spec.cpu_millis, spec.live.clone()),
        }
    }
}

/// A module linked against WASI, ready to instantiate many times.
#[derive(Clone)]
pub struct Prepared {
    pre: InstancePre<Host>,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared").finish_non_exhaustive()
    }
}

#[allow(unsafe_code)]
fn deserialize_component(engine: &Engine, path: &Path) -> wasmtime::Result<Component> {
    // SAFETY: as for `deserialize_module`: the file is an artifact this
    // engine's `precompile_component` wrote, checked against its seal.
    unsafe { Component::deserialize_file(engine, path) }
}

#[allow(unsafe_code)]
fn deserialize_module(engine: &Engine, path: &Path) -> wasmtime::Result<Module> {
    // SAFETY: `Module::deserialize_file` maps the file and trusts it to be
    // code this engine produced, unchanged while mapped. Files in the cache
    // directory are written only by `cache::ModuleCache`, from
    // `Engine::precompile_module`, renamed into place whole (never rewritten
    // in place, so a mapped artifact does not change under a running module)
    // and checked against the SHA-256 seal written with them just before
    // this call; the name carries the engine's compatibility hash, and
    // wasmtime checks the artifact's header against the engine again.
    unsafe { Module::deserialize_file(engine, path) }
}

fn classify(e: wasmtime::Error, limiter: &Limiter) -> Exit {
    if let Some(exit) = e.downcast_ref::<I32Exit>() {
        return Exit::Code(exit.0);
    }
    if let Some(denied) = limiter.denied() {
        // The growth failed and the guest trapped on it (Rust's allocator
        // aborts with `unreachable`).
        return Exit::OomKilled {
            message: format!("{denied}; then: {}", root_message(&e)),
        };
    }
    Exit::Trap {
        message: root_message(&e),
    }
}

fn root_message(e: &wasmtime::Error) -> String {
    match e.downcast_ref::<wasmtime::Trap>() {
        Some(trap) => trap.to_string(),
        None => format!("{e:#}"),
    }
}
