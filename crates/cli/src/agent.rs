//! `wasmkube agent`: a node agent joining a cluster, and the settings it
//! shares with the local node `wasmkube server` embeds.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

/// Settings of a node agent (also the embedded local node's).
#[derive(clap::Args, Debug, Clone)]
pub struct NodeArgs {
    /// Pods this node accepts. Wasm pods are cheap, so thousands fit.
    #[arg(long, default_value = "2000")]
    pub max_pods: u32,
    /// Registries (HOST:PORT) to pull from over plain HTTP. Registries on a
    /// loopback address always are.
    #[arg(long = "insecure-registry", value_name = "HOST:PORT")]
    pub insecure_registries: Vec<String>,
    /// First restart back-off of a crashing container; it doubles up to
    /// --crash-loop-max-backoff (Kubernetes: 10s and 300s).
    #[arg(long, default_value = "10", value_name = "SECONDS")]
    pub crash_loop_backoff: f64,
    #[arg(long, default_value = "300", value_name = "SECONDS")]
    pub crash_loop_max_backoff: f64,
    /// Wasm instances live at once (the engine's pre-reserved slots; each
    /// reserves 4 GiB of address space, not memory) [default: --max-pods
    /// plus 1024 for HTTP functions' per-request instances].
    #[arg(long)]
    pub max_instances: Option<u32>,
    /// Run only Wasm pods, even where runc is installed and the agent is root.
    #[arg(long)]
    pub no_linux: bool,
    /// Let Linux containers run with securityContext.privileged.
    #[arg(long)]
    pub allow_privileged: bool,
    /// Pods share the node's network instead of each getting a network
    /// namespace and an IP from the node's pod CIDR (which needs root and
    /// the CNI plugins in --cni-bin). Wasm containers' ports are then
    /// served at node ports from --node-ports.
    #[arg(long)]
    pub no_pod_network: bool,
    /// Where the CNI bridge, host-local and loopback plugins are.
    #[arg(long, default_value = "/usr/lib/cni")]
    pub cni_bin: PathBuf,
    /// Node ports (FIRST-LAST) for Wasm containers' ports when pods share
    /// the node's network; each pod's are listed in its
    /// `wasmkube.dev/NodePorts` condition.
    #[arg(long, default_value = "40000-49999", value_parser = port_range)]
    pub node_ports: std::ops::RangeInclusive<u16>,
}

fn port_range(s: &str) -> Result<std::ops::RangeInclusive<u16>, String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?} is not a range like 40000-49999"))?;
    let parse = |v: &str| {
        v.trim()
            .parse::<u16>()
            .map_err(|e| format!("{v:?} is not a port: {e}"))
    };
    let (a, b) = (parse(a)?, parse(b)?);
    if a == 0 || a > b {
        return Err(format!(
            "{s:?} is not a range of ports (1-65535, first <= last)"
        ));
    }
    Ok(a..=b)
}

impl NodeArgs {
    pub fn apply(&self, config: &mut wasmkube_node::Config) {
        config.max_pods = self.max_pods;
        config.max_instances = self.max_instances;
        config.linux = !self.no_linux;
        config.allow_privileged = self.allow_privileged;
        config.pod_network = !self.no_pod_network;
        config.cni_bin = self.cni_bin.clone();
        config.node_ports = self.node_ports.clone();
        config.insecure_registries = self.insecure_registries.clone();
        config.backoff.initial = Duration::from_secs_f64(self.crash_loop_backoff.max(0.0));
        config.backoff.max = Duration::from_secs_f64(self.crash_loop_max_backoff.max(0.0));
    }
}

#[derive(clap::Args, Debug)]
pub struct AgentArgs {
    /// The API server's URL [default: the kubeconfig's].
    #[arg(long)]
    server: Option<String>,
    /// The kubeconfig to use [default: $KUBECONFIG, then ~/.kube/config].
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// The node's name [default: this machine's host name].
    #[arg(long)]
    name: Option<String>,
    /// Where the agent keeps images, compiled modules, volumes and logs.
    #[arg(long, env = "WASMKUBE_AGENT_DIR")]
    data_dir: Option<PathBuf>,
    /// The node's InternalIP: the API server reaches the agent there.
    #[arg(long, default_value = "127.0.0.1")]
    address: IpAddr,
    /// Port of the agent endpoint (logs, metrics) on --address; 0 picks one.
    #[arg(long, default_value = "10250")]
    port: u16,
    /// A label for the node, KEY=VALUE (repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    #[command(flatten)]
    node: NodeArgs,
}

pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_lowercase())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "wasmkube-node".into())
}

pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    let client =
        crate::kubeconfig::client(args.kubeconfig.as_deref(), args.server.as_deref()).await?;
    let name = args.name.unwrap_or_else(host_name);
    let data_dir = args
        .data_dir
        .unwrap_or_else(|| crate::server::default_data_dir().join("agents").join(&name));
    let mut config = wasmkube_node::Config::new(&name, data_dir);
    config.address = args.address;
    config.listen = SocketAddr::new(args.address, args.port);
    for l in &args.labels {
        let (k, v) = l.split_once('=').context("a label is KEY=VALUE")?;
        config.labels.insert(k.into(), v.into());
    }
    args.node.apply(&mut config);
    let agent = wasmkube_node::Agent::start(client, config)
        .await
        .context("cannot start the node agent")?;
    eprintln!("node {name} joined; agent endpoint on {}", agent.endpoint());
    tokio::select! {
        r = agent.run() => r.context("the node agent stopped"),
        signal = crate::server::shutdown_signal() => {
            tracing::info!(signal, "shutting down");
            Ok(())
        }
    }
}
