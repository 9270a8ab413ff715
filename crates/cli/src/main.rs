//! The `wasmkube` command: parse the command line, set up logging, run.

mod agent;
mod api_client;
mod failover;
mod join;
mod kubeconfig;
mod node_cert;
mod pki;
mod push;
mod scheduler;
mod server;
mod sim;
mod snapshot;

use clap::{Parser, Subcommand};

/// mimalloc instead of glibc's allocator: the API server allocates and frees
/// many small JSON values on every request and watch event, and glibc's
/// arenas spent a fifth of the CPU (and fragmented memory) under load.
/// (The `system-allocator` feature builds without it, for heap profilers
/// that watch the C allocator: `scripts/bench-heap-at-zero.sh`.)
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// wasmkube: a Kubernetes-architecture orchestrator whose first-class
/// workload is WebAssembly. kubectl and Kubernetes client libraries work
/// against it unchanged.
#[derive(Parser, Debug)]
#[command(name = "wasmkube", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a whole cluster in this process: the API server on the embedded
    /// store (a kubeconfig written so kubectl works immediately), the
    /// scheduler, the controllers, a built-in OCI registry and a local node.
    Server(Box<server::ServerArgs>),
    /// Join simulated nodes (like kwok) to a cluster: they register, renew
    /// their leases and report the pods bound to them as running, through the
    /// API only. For trying the control plane and benchmarking it at scale.
    SimNodes(sim::SimArgs),
    /// Run a scheduler against a cluster's API server, as its own process
    /// (a `wasmkube server` runs one itself unless `--no-scheduler`); of
    /// several, one at a time schedules, elected through a Lease.
    Scheduler(scheduler::SchedulerArgs),
    /// Join this machine to a cluster as a node: the agent registers it,
    /// runs the pods bound to it (Wasm modules in-process on Wasmtime) and
    /// serves their logs to the API server.
    Agent(agent::AgentArgs),
    /// Publish a Wasm module or component to an OCI registry as a CNCF Wasm
    /// artifact and print its digest (`NAME:TAG` goes to the built-in
    /// registry of `wasmkube server`).
    Push(push::PushArgs),
    /// Print a token for the cluster's built-in registry naming the
    /// kubeconfig's user (what RBAC lets them pull and push is theirs): the
    /// password for other OCI clients, with any user name, e.g.
    /// `skopeo copy --dest-creds "me:$(wasmkube registry-token)" ...`.
    RegistryToken(push::TokenArgs),
    /// Save a snapshot of a running server's embedded store, or restore one
    /// into a new data directory.
    Snapshot(snapshot::SnapshotArgs),
    /// Move a cluster from the embedded store into etcd (its server
    /// stopped); then start servers with --etcd-servers.
    Migrate(snapshot::MigrateArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    if matches!(cli.command, Command::Server(_) | Command::Agent(_)) {
        raise_open_files_limit();
    }
    wasmkube_runtime::set_thread_idle_hook(collect_freed_memory);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_park(wasmkube_runtime::thread_idle)
        .build()?;
    match cli.command {
        Command::Server(args) => runtime.block_on(server::run(*args)),
        Command::SimNodes(args) => runtime.block_on(sim::run(args)),
        Command::Agent(args) => runtime.block_on(agent::run(args)),
        Command::Scheduler(args) => runtime.block_on(scheduler::run(args)),
        Command::Push(args) => runtime.block_on(push::run(args)),
        Command::RegistryToken(args) => runtime.block_on(push::token(args)),
        Command::Snapshot(args) => runtime.block_on(snapshot::run(args)),
        Command::Migrate(args) => runtime.block_on(snapshot::migrate(args)),
    }
}

/// A node holds a few files per running container (log pipes and files):
/// thousands of pods need more than the usual soft limit of 1,024. Raise it
/// to the hard limit, as container runtimes do, and higher when privileged.
fn raise_open_files_limit() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    const WANTED: u64 = 1 << 20;
    let current = getrlimit(Resource::Nofile);
    let hard = current.maximum;
    let raised = Rlimit {
        current: Some(WANTED),
        maximum: Some(WANTED),
    };
    if hard.is_some_and(|h| h < WANTED) && setrlimit(Resource::Nofile, raised).is_ok() {
        tracing::debug!(limit = WANTED, "raised the open files limit");
        return;
    }
    let soft = Rlimit {
        current: hard,
        maximum: hard,
    };
    if current.current != hard
        && let Err(e) = setrlimit(Resource::Nofile, soft)
    {
        tracing::warn!(error = %e, "cannot raise the open files limit; large nodes may run out of files");
    }
}

/// Hands back to the allocator what other threads freed in this thread's
/// pages, once a second at most, when the thread runs out of work. mimalloc
/// gives each thread its own pages, and a block freed by another thread is
/// only queued on its page until the owner looks: after a burst of pods
/// whose allocations were freed elsewhere, idle threads kept those pages,
/// about half of what the pods had used, for good. Collected, pages left
/// empty go back to the arena, which returns them to the system.
#[allow(unsafe_code)]
fn collect_freed_memory() {
    thread_local! {
        static LAST: std::cell::Cell<Option<std::time::Instant>> =
            const { std::cell::Cell::new(None) };
    }
    LAST.with(|last| {
        let now = std::time::Instant::now();
        if last
            .get()
            .is_none_or(|t| now.duration_since(t) >= std::time::Duration::from_secs(1))
        {
            last.set(Some(now));
            // SAFETY: mi_collect has no preconditions; it only walks the
            // calling thread's own heap (and, unforced, nothing else).
            unsafe { libmimalloc_sys::mi_collect(false) };
        }
    });
}
