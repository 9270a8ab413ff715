//! `wasmkube sim-nodes`: simulated nodes joined to a cluster through a kubeconfig.

use std::path::PathBuf;

use anyhow::Context;

#[derive(clap::Args, Debug)]
pub struct SimArgs {
    /// How many nodes to simulate.
    #[arg(long, default_value = "3")]
    count: usize,
    /// Node names are PREFIX-0, PREFIX-1, ...
    #[arg(long, default_value = "sim")]
    prefix: String,
    /// CPU capacity of each node.
    #[arg(long, default_value = "4")]
    cpu: String,
    /// Memory capacity of each node.
    #[arg(long, default_value = "8Gi")]
    memory: String,
    /// Pod capacity of each node.
    #[arg(long, default_value = "110")]
    pods: u32,
    /// A label for every node, KEY=VALUE (repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// A taint for every node, KEY=VALUE:EFFECT (repeatable).
    #[arg(long = "taint", value_name = "KEY=VALUE:EFFECT")]
    taints: Vec<String>,
    /// How often each node renews its Lease (its heartbeat).
    #[arg(long, default_value = "10", value_name = "SECONDS")]
    heartbeat_interval: f64,
    /// Runtime handlers each node advertises (comma-separated).
    #[arg(long, default_value = "wasmtime,runc", value_delimiter = ',')]
    runtime_handlers: Vec<String>,
    /// The API server's URL [default: the kubeconfig's]. Repeat it for the
    /// several API servers of one cluster: the client uses one and moves
    /// to the next when it stops answering.
    #[arg(long = "server", value_name = "URL")]
    servers: Vec<String>,
    /// The kubeconfig to use [default: $KUBECONFIG, then ~/.kube/config].
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
}

fn parse_taint(s: &str) -> anyhow::Result<k8s_openapi::api::core::v1::Taint> {
    let (kv, effect) = s.rsplit_once(':').context("a taint is KEY=VALUE:EFFECT")?;
    let (key, value) = kv.split_once('=').unwrap_or((kv, ""));
    anyhow::ensure!(
        ["NoSchedule", "PreferNoSchedule", "NoExecute"].contains(&effect),
        "taint effect must be NoSchedule, PreferNoSchedule or NoExecute, not {effect:?}"
    );
    Ok(serde_json::from_value(
        serde_json::json!({"key": key, "value": value, "effect": effect}),
    )?)
}

pub async fn run(args: SimArgs) -> anyhow::Result<()> {
    let client = crate::kubeconfig::client(args.kubeconfig.as_deref(), &args.servers).await?;
    let labels = args
        .labels
        .iter()
        .map(|l| {
            l.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .context("a label is KEY=VALUE")
        })
        .collect::<anyhow::Result<_>>()?;
    let taints = args
        .taints
        .iter()
        .map(|t| parse_taint(t))
        .collect::<anyhow::Result<_>>()?;
    let sim = wasmkube_sim::SimConfig {
        count: args.count,
        prefix: args.prefix,
        cpu: args.cpu,
        memory: args.memory,
        pods: args.pods,
        labels,
        taints,
        runtime_handlers: args.runtime_handlers,
        renew_interval: std::time::Duration::from_secs_f64(args.heartbeat_interval.max(0.05)),
        ..Default::default()
    };
    eprintln!("simulating {} node(s); Ctrl-C to stop", sim.count);
    tokio::select! {
        r = wasmkube_sim::run(client, sim) => r.context("simulated nodes stopped"),
        _ = tokio::signal::ctrl_c() => Ok(()),
    }
}
