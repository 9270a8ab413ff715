//! [`WasmContainers`]: the node agent's [`Runtime`] for Wasm, on one shared
//! [`WasmRuntime`]. Images are compiled (or loaded precompiled) and linked
//! once per image; containers are tasks on the agent's executor, ended by
//! dropping their future.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use wasmkube_runtime::{
    Container, ContainerConfig, Error as RuntimeError, Exit as ContainerExit, Image, ImageKind,
    ModuleFacts, Runtime,
};

use crate::{
    ContainerSpec, Exit, GuestNetwork, Mount, Output, Prepared, PreparedComponent, PreparedProxy,
    WasmRuntime,
};

/// HTTP requests one container serves at once; more wait for a slot.
const HTTP_CONCURRENCY: usize = 256;

/// An image linked and ready to start.
#[derive(Debug, Clone)]
enum Ready {
    Module(Prepared),
    Component(PreparedComponent),
    Proxy(PreparedProxy),
}

/// The RuntimeClass handler name of the Wasm runtime.
pub const HANDLER: &str = "wasmtime";

/// The executor guests run on: their own worker threads, apart from the
/// agent's (and, in `wasmkube server`, the control plane's). A guest that
/// computes without end yields at every epoch tick, but only to other
/// guests; the operating system shares the cores between these threads and
/// everyone else's, so no guest can queue ahead of a heartbeat or an API
/// request.
struct Guests(Option<tokio::runtime::Runtime>);

impl Guests {
    fn handle(&self) -> &tokio::runtime::Handle {
        self.0
            .as_ref()
            .expect("the guest executor lives as long as its owner")
            .handle()
    }
}

impl Drop for Guests {
    fn drop(&mut self) {
        // Dropped from async code (an agent stopping): do not block on it.
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// An image's module or component, linked once, with what it is.
type PreparedCell = tokio::sync::OnceCell<(Ready, ModuleFacts)>;

/// The Wasm runtime as a node agent drives it.
#[derive(Clone)]
pub struct WasmContainers {
    rt: Arc<WasmRuntime>,
    /// Image id -> the module or component linked against WASI, filled once
    /// (pods of an image that arrive together wait for one compile).
    prepared: Arc<Mutex<HashMap<String, Arc<PreparedCell>>>>,
    guests: Arc<Guests>,
}

impl std::fmt::Debug for WasmContainers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmContainers")
            .field("rt", &self.rt)
            .finish_non_exhaustive()
    }
}

impl WasmContainers {
    /// The runtime with its own guest executor of `threads` workers.
    pub fn new(rt: WasmRuntime, threads: usize) -> Result<Self, crate::Error> {
        let guests = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name("wasm-guest")
            .on_thread_park(wasmkube_runtime::thread_idle)
            .enable_all()
            .build()
            .map_err(|e| crate::Error::Engine(format!("guest executor: {e}")))?;
        Ok(Self {
            rt: Arc::new(rt),
            prepared: Arc::default(),
            guests: Arc::new(Guests(Some(guests))),
        })
    }

    async fn prepared(&self, image: &Image) -> Result<(Ready, ModuleFacts), RuntimeError> {
        let cell = self
            .prepared
            .lock()
            .expect("prepared lock")
            .entry(image.id.clone())
            .or_default()
            .clone();
        // One caller prepares; the others wait for it. A failure leaves the
        // cell empty, so the next caller tries again.
        cell.get_or_try_init(|| self.prepare_image(image))
            .await
            .cloned()
    }

    async fn prepare_image(&self, image: &Image) -> Result<(Ready, ModuleFacts), RuntimeError> {
        let (path, component) = match &image.kind {
            ImageKind::Wasm { module, component } => (module.clone(), *component),
            ImageKind::Linux { .. } => {
                return Err(RuntimeError::Unsupported(format!(
                    "image {} is a Linux container image; the {HANDLER} runtime runs only Wasm modules and components",
                    image.reference
                )));
            }
        };
        // Compiling is CPU-bound and can take 100 ms: never on the executor.
        let rt = self.rt.clone();
        let prepared = tokio::task::spawn_blocking(move || {
            let bytes = std::fs::read(&path).map_err(|e| {
                RuntimeError::InvalidImage(format!("reading module {}: {e}", path.display()))
            })?;
            let invalid = |e: crate::Error| RuntimeError::InvalidImage(e.to_string());
            let facts = |kind, how: crate::Provenance| ModuleFacts {
                kind,
                bytes: bytes.len() as u64,
                native_bytes: how.native_bytes,
                compiled_in: how.compiled_in,
                loaded_in: how.loaded_in,
            };
            if component {
                let (c, how) = rt.load_component_traced(&bytes).map_err(invalid)?;
                // A command (wasi:cli/run) or an HTTP function
                // (wasi:http/incoming-handler), by what it exports.
                match rt.prepare_component(&c) {
                    Ok(p) => Ok((Ready::Component(p), facts("component", how))),
                    Err(as_command) => match rt.prepare_proxy(&c) {
                        Ok(p) => Ok((Ready::Proxy(p), facts("http", how))),
                        Err(as_proxy) => Err(RuntimeError::InvalidImage(format!(
                            "the component is neither a command ({as_command}) nor an HTTP function ({as_proxy})"
                        ))),
                    },
                }
            } else {
                let (m, how) = rt.load_traced(&bytes).map_err(invalid)?;
                let ready = rt.prepare(&m).map(Ready::Module).map_err(invalid)?;
                Ok((ready, facts("module", how)))
            }
        })
        .await
        .map_err(|e| RuntimeError::Setup(format!("compiling the module: {e}")))??;
        Ok(prepared)
    }
}

#[async_trait::async_trait]
impl Runtime for WasmContainers {
    fn handler(&self) -> &str {
        HANDLER
    }

    fn metrics(&self) -> String {
        let (compiled, loaded, seconds) = self.rt.cache_stats();
        format!(
            "# HELP wasmkube_wasm_compiles_total Modules and components compiled to native code (not found in the compile cache).\n\
             # TYPE wasmkube_wasm_compiles_total counter\n\
             wasmkube_wasm_compiles_total {compiled}\n\
             # HELP wasmkube_wasm_compile_seconds_total Time spent compiling modules and components.\n\
             # TYPE wasmkube_wasm_compile_seconds_total counter\n\
             wasmkube_wasm_compile_seconds_total {seconds}\n\
             # HELP wasmkube_wasm_compile_cache_hits_total Modules and components loaded from the compile cache instead of compiled.\n\
             # TYPE wasmkube_wasm_compile_cache_hits_total counter\n\
             wasmkube_wasm_compile_cache_hits_total {loaded}\n"
        )
    }

    async fn prepare(&self, image: &Image) -> Result<(), RuntimeError> {
        self.prepared(image).await.map(drop)
    }

    async fn start(&self, config: ContainerConfig) -> Result<Box<dyn Container>, RuntimeError> {
        let (prepared, facts) = self.prepared(&config.image).await?;
        config.usage.set_module(facts);
        let mut env = config.env;
        if let Some(dir) = &config.working_dir {
            // WASI has no working directory; wasi-libc guests read PWD.
            env.push(("PWD".into(), dir.clone()));
        }
        // A module has no entrypoint to name: argv[0] is the command's first
        // word, or the container's name.
        let mut args = config.command;
        if args.is_empty() {
            args.push(config.name);
        }
        args.extend(config.args);
        let spec = ContainerSpec {
            args,
            env,
            mounts: config
                .mounts
                .into_iter()
                .map(|m| Mount {
                    host_path: m.host_path,
                    guest_path: m.container_path,
                    read_only: m.read_only,
                })
                .collect(),
            stdout: output(config.stdout),
            stderr: output(config.stderr),
            stdin: config.stdin.map(Arc::new),
            tty: config.tty,
            memory_limit: config.memory_limit,
            cpu_millis: config.cpu_millis,
            live: config.usage,
            // The guest's own connections leave from its pod's network, or
            // from the node's when the pod shares it.
            network: match config.pod_netns {
                Some(netns) => GuestNetwork::Pod(netns),
                None => GuestNetwork::Node(config.service_routes),
            },
            names: config.names,
        };
        let rt = self.rt.clone();
        // How a stop request reaches the guest, when it has a way to hear it.
        let mut stop = None;
        let task = match prepared {
            Ready::Module(m) => self
                .guests
                .handle()
                .spawn(async move { rt.run_prepared(&m, &spec).await }),
            Ready::Component(c) => self
                .guests
                .handle()
                .spawn(async move { rt.run_component(&c, &spec).await }),
            Ready::Proxy(p) => {
                if config.ports.is_empty() {
                    return Err(RuntimeError::Setup(
                        "an HTTP function needs a containerPort to serve on".into(),
                    ));
                }
                // Sockets the agent made in the pod's network, or bound here
                // on the pod's address.
                let mut listeners = config.listeners;
                for port in config.ports.iter().skip(listeners.len()) {
                    let addr = std::net::SocketAddr::new(config.pod_ip, *port);
                    // Bound here, so a taken port fails the start; served
                    // on the guest executor.
                    let l = std::net::TcpListener::bind(addr)
                        .and_then(|l| l.set_nonblocking(true).map(|()| l))
                        .map_err(|e| {
                            RuntimeError::Setup(format!("cannot listen on {addr}: {e}"))
                        })?;
                    listeners.push(l);
                }
                let spec = Arc::new(spec);
                let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
                stop = Some(stop_tx);
                self.guests.handle().spawn(async move {
                    let listeners = listeners
                        .into_iter()
                        .map(tokio::net::TcpListener::from_std)
                        .collect::<Result<Vec<_>, _>>();
                    let listeners = match listeners {
                        Ok(l) => l,
                        Err(e) => {
                            let message = format!("the HTTP listener failed: {e}");
                            return Ok((Exit::Trap { message }, crate::Usage::default()));
                        }
                    };
                    // A stop request drains every port's server.
                    let stopping = futures::FutureExt::shared(async move {
                        let _ = stop_rx.await;
                    });
                    let servers = listeners.into_iter().map(|l| {
                        rt.clone().serve_http(
                            p.clone(),
                            spec.clone(),
                            l,
                            HTTP_CONCURRENCY,
                            stopping.clone(),
                        )
                    });
                    // One port's listener failing fails the container; a
                    // stop ends when every port has drained.
                    let exit = match futures::future::try_join_all(servers).await {
                        Ok(_) => Exit::Code(0),
                        Err(e) => Exit::Trap {
                            message: format!("the HTTP listener failed: {e}"),
                        },
                    };
                    Ok((exit, crate::Usage::default()))
                })
            }
        };
        Ok(Box::new(WasmContainer {
            task: Some(task),
            exit: None,
            stop,
        }))
    }
}

type RunResult = Result<(Exit, crate::Usage), crate::Error>;

struct WasmContainer {
    task: Option<tokio::task::JoinHandle<RunResult>>,
    exit: Option<ContainerExit>,
    /// An HTTP function's graceful stop: it stops accepting, finishes the
    /// requests in flight and exits.
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

fn to_container_exit(exit: Exit) -> ContainerExit {
    match exit {
        Exit::Code(c) => ContainerExit::code(c),
        Exit::OomKilled { message } => ContainerExit {
            code: 137,
            reason: "OOMKilled".into(),
            message: Some(message),
        },
        Exit::Trap { message } => ContainerExit {
            code: 1,
            reason: "Error".into(),
            message: Some(message),
        },
    }
}

#[async_trait::async_trait]
impl Container for WasmContainer {
    async fn wait(&mut self) -> ContainerExit {
        if let Some(exit) = &self.exit {
            return exit.clone();
        }
        let exit = match self.task.as_mut() {
            None => ContainerExit {
                code: 137,
                reason: "Error".into(),
                message: Some("the guest was interrupted".into()),
            },
            Some(task) => match task.await {
                Ok(Ok((exit, _))) => to_container_exit(exit),
                Ok(Err(e)) => ContainerExit {
                    code: 128,
                    reason: "StartError".into(),
                    message: Some(e.to_string()),
                },
                Err(e) if e.is_cancelled() => ContainerExit {
                    code: 137,
                    reason: "Error".into(),
                    message: Some("the guest was interrupted".into()),
                },
                Err(e) => ContainerExit {
                    code: 1,
                    reason: "Error".into(),
                    message: Some(format!("the guest's task failed: {e}")),
                },
            },
        };
        self.task = None;
        self.exit = Some(exit.clone());
        exit
    }

    fn terminate(&mut self) -> bool {
        // An HTTP function drains and stops. A command guest has no signal
        // handlers: only the end of the grace period stops it.
        match self.stop.take() {
            Some(stop) => {
                let _ = stop.send(());
                true
            }
            None => false,
        }
    }

    fn kill(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

fn output(o: wasmkube_runtime::Output) -> Output {
    match o {
        wasmkube_runtime::Output::File(f) => Output::File(Arc::new(f)),
        wasmkube_runtime::Output::Sink(s) => Output::Sink(s),
    }
}
