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
    /// How long the node's Lease lasts; the agent renews it every quarter
    /// of that (as the kubelet's nodeLeaseDurationSeconds). A node whose
    /// Lease goes unrenewed for the server's --node-monitor-grace-period is
    /// marked Ready=Unknown, so keep a quarter of this well under it.
    #[arg(long, default_value = "40", value_name = "SECONDS", value_parser = clap::value_parser!(i32).range(1..))]
    pub node_lease_duration_seconds: i32,
    /// How often each running container's CPU and memory are sampled for
    /// its recent history (the last 60 samples, which the dashboard's
    /// charts start from).
    #[arg(long, default_value = "15s", value_parser = duration, value_name = "DURATION")]
    pub usage_history_interval: Duration,
    /// How often the files of running pods' configMap, secret, downwardAPI
    /// and projected volumes are brought up to date with their sources, as
    /// the kubelet's --sync-frequency: an edited ConfigMap shows in its
    /// pods' files within this period.
    #[arg(long, default_value = "1m", value_parser = duration, value_name = "DURATION")]
    pub sync_frequency: Duration,
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
    /// namespace and an IP from the node's pod CIDR (which needs root).
    /// Wasm containers' ports are then served at node ports from
    /// --node-ports.
    #[arg(long)]
    pub no_pod_network: bool,
    /// Set pods' networks up with the CNI bridge, host-local and loopback
    /// plugins in this directory (e.g. /usr/lib/cni) instead of in-process
    /// over netlink, which needs nothing installed.
    #[arg(long, alias = "cni-bin-dir", value_name = "DIR")]
    pub cni_bin: Option<PathBuf>,
    /// With --cni-bin-dir: set pods up with the first network configuration
    /// (*.conflist, else *.conf, by name) in this directory, as container
    /// runtimes read /etc/cni/net.d, instead of the built-in bridge network.
    #[arg(long, value_name = "DIR", requires = "cni_bin")]
    pub cni_conf_dir: Option<PathBuf>,
    /// Node ports (FIRST-LAST) for Wasm containers' ports when pods share
    /// the node's network; each pod's are listed in its
    /// `wasmkube.dev/NodePorts` condition.
    #[arg(long, default_value = "40000-49999", value_parser = port_range)]
    pub node_ports: std::ops::RangeInclusive<u16>,

    /// Pod addresses of the whole cluster: nodes get their pod CIDRs (one
    /// /24 each) from it; pods' traffic leaving it is masqueraded; what is
    /// not routed to a pod inside it is refused on the node.
    #[arg(long, default_value = "10.244.0.0/16", value_name = "CIDR")]
    pub cluster_cidr: ipnet::Ipv4Net,

    /// Service cluster IPs come from this range (its first address is the
    /// `kubernetes` Service's); a cluster IP no Service has is refused on
    /// the node.
    #[arg(long, default_value = "10.96.0.0/12", value_name = "CIDR")]
    pub service_cluster_ip_range: ipnet::Ipv4Net,

    /// Run no service proxy on this node: Services then route nowhere from
    /// it. (The proxy needs root and `nft`, from Debian's nftables; without
    /// them it says so and stays off.)
    #[arg(long)]
    pub no_service_proxy: bool,

    /// Enforce no NetworkPolicy on this node. (Pods with a network of
    /// their own are isolated by the node's nftables rules, which need
    /// root and `nft`; Wasm guests of pods that share the node's network
    /// are held to their policies in-process.)
    #[arg(long)]
    pub no_network_policy: bool,

    /// Where pods' DNS queries go (`dnsPolicy: ClusterFirst`); every node
    /// serves the cluster DNS on it [default: the tenth address of
    /// --service-cluster-ip-range, 10.96.0.10].
    #[arg(long, value_name = "IP")]
    pub cluster_dns: Option<std::net::Ipv4Addr>,

    /// The cluster's DNS domain: Services are `NAME.NAMESPACE.svc.DOMAIN`.
    #[arg(long, default_value = "cluster.local")]
    pub cluster_domain: String,

    /// The port of the node's address on which the built-in gateway serves
    /// Ingresses (`:PORT` or `PORT`; ports below 1024 need root). Gateways'
    /// listeners open their own ports.
    #[arg(long, default_value = ":80", value_parser = listen_port, value_name = ":PORT")]
    pub gateway_listen: u16,

    /// The port for Ingresses with `tls`.
    #[arg(long, default_value = ":443", value_parser = listen_port, value_name = ":PORT")]
    pub gateway_https_listen: u16,

    /// Run no gateway on this node: Ingresses and Gateways are not served
    /// from it.
    #[arg(long)]
    pub no_gateway: bool,

    /// How long the gateway holds a request for a Knative revision that has
    /// no ready pod (scaled to zero) while it scales up; then 504.
    #[arg(long, default_value = "30s", value_parser = duration, value_name = "DURATION")]
    pub activator_timeout: std::time::Duration,
}

/// `30s`, `2m`, `500ms`.
pub fn duration(s: &str) -> Result<std::time::Duration, String> {
    wasmkube_api::knative::parse_duration(s)
        .ok_or_else(|| format!("{s:?} is not a duration such as 30s, 2m or 500ms"))
}

/// `:8080` or `8080`.
pub fn listen_port(s: &str) -> Result<u16, String> {
    s.trim_start_matches(':')
        .parse::<u16>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("{s:?} is not a port like :8080"))
}

pub fn port_range(s: &str) -> Result<std::ops::RangeInclusive<u16>, String> {
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

/// The node's Service machinery: one watch of Services and EndpointSlices,
/// the service proxy and the cluster DNS reading it.
pub struct NodeServices {
    /// The cluster DNS pods are given (and the records that answer Wasm
    /// guests' lookups in-process).
    pub cluster_dns: wasmkube_node::ClusterDns,
    /// The gateway's counts of requests to Knative revisions, for the
    /// agent's stats (`None` without a gateway).
    pub routed_load: Option<wasmkube_node::RoutedLoad>,
    /// The watched Services and EndpointSlices.
    watch: wasmkube_proxy::ServiceWatch,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    proxy: Option<(
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    )>,
    netpol: Option<(
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    )>,
    /// The NetworkPolicy enforcer: new pods wait for its rules when it
    /// programs the node, guests on the node's network ask it.
    enforcer: Option<wasmkube_netpol::Enforcer>,
    programs_policy: bool,
    gateway: Option<(
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    )>,
}

impl NodeServices {
    /// Gives the node agent what it reads of them: the cluster DNS, the
    /// gateway's load, and Service endpoints for guests of pods that share
    /// the node's network.
    pub fn configure(&self, config: &mut wasmkube_node::Config) {
        config.cluster_dns = Some(self.cluster_dns.clone());
        config.routed_load = self.routed_load.clone();
        config.service_backends = Some(std::sync::Arc::new(WatchedBackends(self.watch.clone())));
        config.pod_network_gate = self
            .enforcer
            .clone()
            .filter(|_| self.programs_policy)
            .map(|e| std::sync::Arc::new(PolicyGate(e)) as _);
        config.network_policies = self
            .enforcer
            .clone()
            .map(|e| std::sync::Arc::new(PolicyGate(e)) as _);
    }

    /// Stops them; the proxy removes its rules and routes, the network
    /// policy enforcer its table.
    pub async fn stop(self) {
        for (stop, task) in self
            .proxy
            .into_iter()
            .chain(self.netpol)
            .chain(self.gateway)
        {
            let _ = stop.send(());
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
        for t in self.tasks {
            t.abort();
        }
    }
}

impl NodeArgs {
    /// The cluster DNS address: `--cluster-dns`, or the tenth address of
    /// the service range.
    pub fn cluster_dns(&self) -> std::net::Ipv4Addr {
        self.cluster_dns.unwrap_or_else(|| {
            wasmkube_dns::default_address(self.service_cluster_ip_range.network())
        })
    }

    /// Starts the node's service proxy, NetworkPolicy enforcer and cluster
    /// DNS. The proxy needs root and `nft`; without them (or with
    /// --no-service-proxy) Services are not routed from this node and DNS
    /// is answered in-process to Wasm guests only. The enforcer writes node
    /// rules where pods have networks of their own (root and `nft`), and
    /// otherwise decides in-process for Wasm guests on the node's network.
    pub fn start_services(
        &self,
        client: &kube::Client,
        node: &str,
        address: IpAddr,
    ) -> NodeServices {
        let (watch, drive) = wasmkube_proxy::ServiceWatch::new(client);
        let mut tasks = vec![tokio::spawn(drive)];
        let dns = self.cluster_dns();
        let routed = !self.no_service_proxy
            && match wasmkube_proxy::check() {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(error = %e, "Services are not routed on this node and the cluster DNS serves Wasm guests only");
                    false
                }
            };
        let dns_config = wasmkube_dns::Config {
            domain: self.cluster_domain.clone(),
            listen: routed.then(|| SocketAddr::from((dns, 53))),
            upstreams: wasmkube_dns::Config::upstreams_from_resolv_conf(&[dns.into()]),
        };
        let resolver = wasmkube_dns::Resolver::new(&dns_config);
        {
            let (watch, resolver) = (watch.clone(), resolver.clone());
            tasks.push(tokio::spawn(async move {
                if let Err(e) = wasmkube_dns::run(watch, dns_config, resolver).await {
                    tracing::error!(error = %e, "the cluster DNS stopped");
                }
            }));
        }
        let proxy = routed.then(|| {
            let network = wasmkube_proxy::NodeNetwork {
                cluster_cidr: Some(self.cluster_cidr),
                service_cidr: self.service_cluster_ip_range,
                node_local: vec![dns],
            };
            let config = wasmkube_proxy::Config::new(node, network);
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let watch = watch.clone();
            let task = tokio::spawn(async move {
                let shutdown = async {
                    let _ = stopped.await;
                };
                if let Err(e) = wasmkube_proxy::run(watch, config, shutdown).await {
                    tracing::error!(error = %e, "the service proxy stopped");
                }
            });
            (stop, task)
        });
        // NetworkPolicy: the node's rules need what the proxy needs (root
        // and nft); without them its pods share the node's network and
        // their Wasm guests are held to their policies in-process.
        let enforcer = (!self.no_network_policy).then(wasmkube_netpol::Enforcer::new);
        let program = !self.no_pod_network && wasmkube_netpol::check().is_ok();
        let netpol = enforcer.clone().map(|enforcer| {
            let mut config = wasmkube_netpol::Config::new(node);
            config.program = program;
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let client = client.clone();
            let task = tokio::spawn(async move {
                let shutdown = async {
                    let _ = stopped.await;
                };
                if let Err(e) = enforcer.run(client, config, shutdown).await {
                    tracing::error!(error = %e, "the network policy enforcer stopped");
                }
            });
            (stop, task)
        });
        let load = std::sync::Arc::new(wasmkube_gateway::Load::default());
        let routed_load = (!self.no_gateway).then(|| {
            let load = load.clone();
            wasmkube_node::RoutedLoad(std::sync::Arc::new(move || {
                load.snapshot()
                    .into_iter()
                    .map(|r| {
                        serde_json::json!({
                            "namespace": r.namespace, "name": r.name, "requests": r.requests,
                            "requestsInFlight": r.in_flight, "requestSeconds": r.request_seconds,
                        })
                    })
                    .collect()
            }))
        });
        let gateway = (!self.no_gateway).then(|| {
            let config = wasmkube_gateway::Config {
                address,
                ingress_http_port: Some(self.gateway_listen),
                ingress_https_port: Some(self.gateway_https_listen),
                activation_timeout: self.activator_timeout,
                load,
            };
            let (client, watch) = (client.clone(), watch.clone());
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let task = tokio::spawn(wasmkube_gateway::run(client, watch, config, async {
                let _ = stopped.await;
            }));
            (stop, task)
        });
        NodeServices {
            cluster_dns: wasmkube_node::ClusterDns {
                address: dns,
                domain: self.cluster_domain.clone(),
                resolver,
            },
            routed_load,
            watch,
            tasks,
            proxy,
            netpol,
            programs_policy: program && enforcer.is_some(),
            enforcer,
            gateway,
        }
    }

    pub fn apply(&self, config: &mut wasmkube_node::Config) {
        config.max_pods = self.max_pods;
        config.max_instances = self.max_instances;
        config.linux = !self.no_linux;
        config.allow_privileged = self.allow_privileged;
        config.pod_network = !self.no_pod_network;
        config.cni_bin = self.cni_bin.clone();
        config.cni_conf_dir = self.cni_conf_dir.clone();
        config.node_ports = self.node_ports.clone();
        config.insecure_registries = self.insecure_registries.clone();
        config.backoff.initial = Duration::from_secs_f64(self.crash_loop_backoff.max(0.0));
        config.backoff.max = Duration::from_secs_f64(self.crash_loop_max_backoff.max(0.0));
        config.lease_duration_seconds = self.node_lease_duration_seconds;
        config.heartbeat_interval =
            Duration::from_secs_f64(f64::from(self.node_lease_duration_seconds) / 4.0);
        config.usage_history_interval = self.usage_history_interval;
        config.sync_frequency = self.sync_frequency;
    }
}

#[derive(clap::Args, Debug)]
pub struct AgentArgs {
    /// The API server's URL [default: the kubeconfig's]. Repeat it for the
    /// several API servers of one cluster: the client uses one and moves
    /// to the next when it stops answering.
    #[arg(long = "server", value_name = "URL")]
    servers: Vec<String>,
    /// The kubeconfig to use [default: $KUBECONFIG, then ~/.kube/config].
    /// Without --server, every cluster entry in it with the current
    /// context's CA is a server of the cluster, to fail over between.
    #[arg(long, conflicts_with = "token")]
    kubeconfig: Option<PathBuf>,
    /// Join with the cluster's join token (the server's
    /// DATA_DIR/tls/join-token): the agent checks the server's CA against
    /// it, gets its own node certificate, and keeps it as a kubeconfig in
    /// --data-dir for later starts.
    #[arg(
        long,
        env = "WASMKUBE_TOKEN",
        requires = "servers",
        hide_env_values = true
    )]
    token: Option<String>,
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
    let name = args.name.clone().unwrap_or_else(host_name);
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| crate::server::default_data_dir().join("agents").join(&name));
    // A node that joined with a token renews its own certificate while it
    // runs; other credentials are the kubeconfig's to keep.
    let (client, renewal) = match &args.token {
        Some(token) => {
            let token = crate::join::JoinToken::parse(token)?;
            let server = args.servers.first().context("--token needs --server")?;
            let kubeconfig = crate::join::join(server, &token, &name, &data_dir).await?;
            let node = crate::node_cert::client(&kubeconfig, &args.servers)?;
            let renewal = tokio::spawn(node.renewal.run(node.client.clone(), name.clone()));
            (node.client, Some(renewal))
        }
        None => (
            crate::kubeconfig::client(args.kubeconfig.as_deref(), &args.servers).await?,
            None,
        ),
    };
    let mut config = wasmkube_node::Config::new(&name, data_dir);
    config.address = args.address;
    config.listen = SocketAddr::new(args.address, args.port);
    for l in &args.labels {
        let (k, v) = l.split_once('=').context("a label is KEY=VALUE")?;
        config.labels.insert(k.into(), v.into());
    }
    args.node.apply(&mut config);
    let services = args.node.start_services(&client, &name, args.address);
    services.configure(&mut config);
    let agent = wasmkube_node::Agent::start(client.clone(), config)
        .await
        .context("cannot start the node agent")?;
    eprintln!("node {name} joined; agent endpoint on {}", agent.endpoint());
    let result = tokio::select! {
        r = agent.run() => r.context("the node agent stopped"),
        signal = crate::server::shutdown_signal() => {
            tracing::info!(signal, "shutting down");
            Ok(())
        }
    };
    services.stop().await;
    if let Some(renewal) = renewal {
        renewal.abort();
    }
    result
}

/// The node's NetworkPolicy enforcer as the agent uses it: new pods wait
/// for it to program them; Wasm guests on the node's network are held to
/// their policies by its in-process decisions.
#[derive(Debug)]
struct PolicyGate(wasmkube_netpol::Enforcer);

impl wasmkube_node::NetworkPolicies for PolicyGate {
    fn may_connect(
        &self,
        from: &k8s_openapi::api::core::v1::Pod,
        to: SocketAddr,
        to_pod: Option<(&k8s_openapi::api::core::v1::Pod, u16)>,
        transport: wasmkube_node::Transport,
    ) -> bool {
        let protocol = match transport {
            wasmkube_node::Transport::Tcp => wasmkube_netpol::model::Protocol::Tcp,
            wasmkube_node::Transport::Udp => wasmkube_netpol::model::Protocol::Udp,
        };
        self.0.may_connect(from, to, to_pod, protocol)
    }

    fn may_accept(
        &self,
        to: &k8s_openapi::api::core::v1::Pod,
        from: SocketAddr,
        port: u16,
    ) -> bool {
        self.0.may_accept(to, from, port)
    }
}

impl wasmkube_node::PodNetworkGate for PolicyGate {
    fn admit<'a>(
        &'a self,
        pod: &'a k8s_openapi::api::core::v1::Pod,
        ip: IpAddr,
    ) -> futures::future::BoxFuture<'a, ()> {
        Box::pin(self.0.admit(pod, ip))
    }
}

/// Service endpoints from the node's watch, chosen as the service proxy
/// chooses them.
#[derive(Debug)]
struct WatchedBackends(wasmkube_proxy::ServiceWatch);

impl wasmkube_node::ServiceBackends for WatchedBackends {
    fn backends(&self, to: std::net::SocketAddrV4) -> Option<Vec<wasmkube_node::ServiceBackend>> {
        // Per connection: only the Service with that address and its own
        // slices are taken from the caches, not a copy of every object.
        let service = self
            .0
            .services
            .state_filter(|s| s.cluster_ip == wasmkube_proxy::view::ClusterIp::Ip(*to.ip()));
        let service = service.first()?;
        let slices = self
            .0
            .slices
            .state_filter(|s| s.namespace == service.namespace && s.service == service.name);
        let found = wasmkube_proxy::model::backends(
            [service.as_ref()],
            slices.iter().map(AsRef::as_ref),
            to,
        )?;
        Some(
            found
                .into_iter()
                .map(|b| wasmkube_node::ServiceBackend {
                    addr: std::net::SocketAddr::from((b.endpoint.ip, b.endpoint.port)),
                    pod: b.pod,
                })
                .collect(),
        )
    }
}
