//! `wasmkube-bench`: measures the figures issues name, printing each next to a
//! peer measured in the same run (these machines are shared and noisy).

mod auth;
mod create;
mod custom;
mod dashboard;
mod density;
mod deploy;
mod dns;
mod failover;
mod http;
mod netpol;
mod pods;
mod proxy;
mod push;
mod registry;
mod rollout;
mod schedule;
mod serving;
mod startup;
mod support;
mod watch;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(about = "wasmkube benchmarks; see docs/benchmarks.md")]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand, Debug)]
enum Bench {
    /// Durable creates through the API with concurrent clients, against the
    /// store alone and an fsync-per-write peer.
    Create(create::Args),
    /// Watch fan-out: write-acknowledged to event-received latency over many watchers.
    Watch(watch::Args),
    /// `wasmkube server` from exec to `/readyz` OK, and idle RSS.
    Startup(startup::Args),
    /// Scheduler throughput: pods bound per second on thousands of simulated
    /// nodes, against the pod creation rate, and server RSS.
    Schedule(schedule::Args),
    /// Time from creating a large Deployment to all replicas Ready.
    Rollout(rollout::Args),
    /// Pod startup latency, create -> Running seen on a watch, of Wasm pods
    /// on the local node (module cached) against pods on a simulated node;
    /// first a Deployment of a module never seen, against the same cached.
    PodStartup(pods::Args),
    /// HTTP function throughput and latency at a pod's port, against
    /// `wasmtime serve` on the same component when it is installed.
    Http(http::Args),
    /// Thousands of idle Wasm pods on one `wasmkube agent`: its RSS per pod,
    /// threads, files and mappings, and pod startup on the full node.
    Density(density::Args),
    /// Service proxy programming with thousands of Services: endpoint
    /// change to rules in place, against rewriting the whole table.
    Proxy(proxy::Args),
    /// NetworkPolicy (root, nft): a thousand policies, policy change to
    /// rules in place, and new connections per second through the node
    /// with the policies against without.
    Netpol(netpol::Args),
    /// Cluster DNS queries per second and latency with `dnsperf`, against
    /// dnsmasq serving the same records.
    Dns(dns::Args),
    /// Knative Serving (root): the first request to a function at zero
    /// against a warm one, the autoscaler's reaction to a load step, and
    /// the cost of a function at zero.
    Serving(serving::Args),
    /// From `wasmkube push` of a module never seen to its pod Running,
    /// against a pod of a cached image.
    PushToRunning(push::Args),
    /// Custom resources (a CRD's kind) against ConfigMaps in the same run:
    /// create throughput and create-to-watch-event latency.
    CustomResources(custom::Args),
    /// The built-in registry's push and pull throughput with oci-client,
    /// against Debian's docker-registry.
    Registry(registry::Args),
    /// The dashboard in Chromium (Playwright): first paint and first data,
    /// and a new pod's time to show on the page against `kubectl get pods
    /// --watch` printing it.
    Dashboard(dashboard::Args),
    /// Two API servers on etcd: from SIGKILL of the serving, leading one to
    /// a client's next acknowledged write and to the next pod bound.
    Failover(failover::Args),
    /// TLS, authentication and RBAC against plain HTTP with authorization
    /// off, in alternating rounds: create throughput, watch latency, and
    /// handshakes on new connections.
    Auth(auth::Args),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.bench {
        Bench::Create(a) => rt.block_on(create::run(a)),
        Bench::Watch(a) => rt.block_on(watch::run(a)),
        Bench::Startup(a) => rt.block_on(startup::run(a)),
        Bench::Schedule(a) => rt.block_on(schedule::run(a)),
        Bench::Rollout(a) => rt.block_on(rollout::run(a)),
        Bench::PodStartup(a) => rt.block_on(pods::run(a)),
        Bench::Http(a) => rt.block_on(http::run(a)),
        Bench::Density(a) => rt.block_on(density::run(a)),
        Bench::Proxy(a) => rt.block_on(proxy::run(a)),
        Bench::Netpol(a) => rt.block_on(netpol::run(a)),
        Bench::Dns(a) => rt.block_on(dns::run(a)),
        Bench::Serving(a) => rt.block_on(serving::run(a)),
        Bench::Registry(a) => rt.block_on(registry::run(a)),
        Bench::Failover(a) => rt.block_on(failover::run(a)),
        Bench::Auth(a) => rt.block_on(auth::run(a)),
        Bench::CustomResources(a) => rt.block_on(custom::run(a)),
        Bench::PushToRunning(a) => rt.block_on(push::run(a)),
        Bench::Dashboard(a) => rt.block_on(dashboard::run(a)),
    }
}
