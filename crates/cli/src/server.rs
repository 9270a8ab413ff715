//! `wasmkube server`: the whole cluster in one process: the API server on
//! the embedded store (or on etcd, shared with other servers), the
//! scheduler and the controller manager (each under its leader Lease), the
//! built-in OCI registry, and a local node agent running Wasm pods.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use fs4::fs_std::FileExt;
use wasmkube_controllers::apiserver_endpoints::{ApiServerEndpoints, EndpointsConfig};
use wasmkube_controllers::leader::{ElectionConfig, LeaderElector};

use crate::kubeconfig;

#[derive(clap::Args, Debug)]
pub struct ServerArgs {
    /// Where this server keeps its state: the embedded store (unless
    /// --etcd-servers), the built-in registry's content, the local node's
    /// files and the kubeconfig. Only one server may use a data directory at
    /// a time.
    #[arg(long, env = "WASMKUBE_DATA_DIR", default_value_os_t = default_data_dir())]
    data_dir: PathBuf,

    /// Keep the cluster's state in etcd instead of the embedded store: the
    /// members' client URLs (comma-separated or repeated). Any number of
    /// servers given the same etcd serve one cluster.
    #[arg(long, value_delimiter = ',', value_name = "URL")]
    etcd_servers: Vec<String>,

    /// Prepended to every key in etcd, so clusters can share one etcd. Keys
    /// are `/registry/GROUP/RESOURCE/[NAMESPACE/]NAME` with JSON values
    /// (not kube-apiserver's layout: do not share its etcd prefix).
    #[arg(
        long,
        default_value = "",
        requires = "etcd_servers",
        value_name = "PREFIX"
    )]
    etcd_prefix: String,

    /// The CA that signed the etcd members' serving certificates (for
    /// `https://` members).
    #[arg(long, requires = "etcd_servers", value_name = "FILE")]
    etcd_cafile: Option<PathBuf>,

    /// A client certificate to present to etcd (with --etcd-keyfile).
    #[arg(long, requires_all = ["etcd_cafile", "etcd_keyfile"], value_name = "FILE")]
    etcd_certfile: Option<PathBuf>,

    /// The key of --etcd-certfile.
    #[arg(long, requires_all = ["etcd_cafile", "etcd_certfile"], value_name = "FILE")]
    etcd_keyfile: Option<PathBuf>,

    /// Address the Kubernetes API listens on (port 0 picks a free port).
    #[arg(long, env = "WASMKUBE_LISTEN", default_value = "127.0.0.1:6443")]
    listen: SocketAddr,

    /// Where to write the kubeconfig for kubectl [default: DATA_DIR/kubeconfig].
    /// It holds the cluster CA and an administrator's client certificate
    /// (`system:admin`, group `system:masters`): keep it private.
    #[arg(long)]
    write_kubeconfig: Option<PathBuf>,

    /// Serve plain HTTP with no authentication or authorization: anyone
    /// who reaches the port may do anything. Only on a loopback address.
    /// Without it the API is served over TLS from the cluster's own CA
    /// (made on first start under DATA_DIR/tls) and every request is
    /// authenticated and authorized by RBAC.
    #[arg(long)]
    insecure_http: bool,

    /// Another name or IP address the serving certificate is valid for
    /// (repeatable), besides localhost, this host's name, the listen and
    /// node addresses and the `kubernetes` Service's names and cluster IP.
    #[arg(long = "tls-san", value_name = "NAME|IP")]
    tls_sans: Vec<String>,

    /// The cluster's secret. Servers on one store (--etcd-servers) given
    /// the same token share the cluster's CA, so each serves certificates
    /// of one CA and a kubeconfig from one works against all: the first
    /// keeps the CA in the store sealed with a key derived from the token,
    /// the others open it. Nodes then join with `K10<CA-HASH>::node:TOKEN`
    /// (every server's DATA_DIR/tls/join-token).
    #[arg(
        long,
        env = "WASMKUBE_TOKEN",
        hide_env_values = true,
        conflicts_with = "insecure_http"
    )]
    token: Option<String>,

    /// Encrypt Secrets at rest with a key made on first start and kept in
    /// DATA_DIR/encryption-config.yaml (as k3s --secrets-encryption). With
    /// several servers, give them all one --encryption-provider-config.
    #[arg(long, conflicts_with = "encryption_provider_config")]
    secrets_encryption: bool,

    /// Encrypt resources at rest as this Kubernetes EncryptionConfiguration
    /// says (aesgcm keys and identity; the first provider writes, all
    /// read). Rotate a key by putting the new one first and restarting:
    /// everything sealed otherwise is sealed again at start.
    #[arg(long, value_name = "FILE")]
    encryption_provider_config: Option<PathBuf>,

    /// Audit requests as this `audit.k8s.io/v1` Policy says (levels None,
    /// Metadata, Request, RequestResponse, the first matching rule's; the
    /// stages RequestReceived, ResponseStarted for long-running requests
    /// and ResponseComplete, less the policy's and rule's `omitStages`).
    #[arg(long, value_name = "FILE", conflicts_with = "insecure_http")]
    audit_policy_file: Option<PathBuf>,

    /// Where audit events go, one JSON line each [default:
    /// DATA_DIR/audit.log].
    #[arg(long, value_name = "FILE", requires = "audit_policy_file")]
    audit_log_path: Option<PathBuf>,

    /// Rotate the audit log past this size.
    #[arg(long, default_value = "100", value_name = "MiB")]
    audit_log_maxsize: u64,

    /// Rotated audit logs kept (AUDIT_LOG.1 the newest).
    #[arg(long, default_value = "10")]
    audit_log_maxbackup: usize,

    /// Also send audit events to a webhook: a kubeconfig whose first
    /// cluster's `server` (http or https with its `certificate-authority`)
    /// receives `audit.k8s.io/v1` EventLists by POST, authenticated with
    /// its first user's client certificate or token (as kube-apiserver's
    /// batch webhook backend).
    #[arg(long, value_name = "FILE", requires = "audit_policy_file")]
    audit_webhook_config_file: Option<PathBuf>,

    /// Most events in one webhook batch.
    #[arg(long, default_value = "400", value_name = "N")]
    audit_webhook_batch_max_size: usize,

    /// Longest an event waits for its webhook batch to fill.
    #[arg(long, default_value = "30s", value_parser = crate::agent::duration, value_name = "DURATION")]
    audit_webhook_batch_max_wait: Duration,

    /// Accept the bearer tokens of this file (Kubernetes'
    /// --token-auth-file: `token,user,uid,"group1,group2"` per line).
    #[arg(long, value_name = "FILE", conflicts_with = "insecure_http")]
    token_auth_file: Option<PathBuf>,

    /// How often store history older than the previous interval is compacted;
    /// watches from before it get 410 Gone and relist, as on Kubernetes.
    #[arg(long, default_value = "300", value_name = "SECONDS")]
    compaction_interval: u64,

    /// How long a node may miss heartbeats before it is marked Ready=Unknown
    /// and tainted unreachable.
    #[arg(long, default_value = "40", value_name = "SECONDS")]
    node_monitor_grace_period: u64,

    /// How long pods tolerate a not-ready or unreachable node before they are
    /// evicted, unless they set their own tolerationSeconds.
    #[arg(long, default_value = "300", value_name = "SECONDS")]
    default_toleration_seconds: i64,

    /// NodePort and LoadBalancer Services' node ports come from this range
    /// (FIRST-LAST).
    #[arg(long, default_value = "30000-32767", value_parser = crate::agent::port_range)]
    service_node_port_range: std::ops::RangeInclusive<u16>,

    /// How often HorizontalPodAutoscalers are evaluated.
    #[arg(long, default_value = "15s", value_parser = crate::agent::duration, value_name = "DURATION")]
    horizontal_pod_autoscaler_sync_period: Duration,

    /// The domain of Knative Services' URLs: `http://NAME.NAMESPACE.DOMAIN`,
    /// served on every node's gateway (--gateway-listen).
    #[arg(long, default_value = wasmkube_api::knative::DEFAULT_DOMAIN, value_name = "DOMAIN")]
    serving_domain: String,

    /// The size of each node's pod CIDR, carved from --cluster-cidr (a /24
    /// gives a node 253 pod addresses; a /19, 8,189).
    #[arg(long, default_value = "24", value_parser = clap::value_parser!(u8).range(8..=30))]
    node_cidr_mask_size: u8,

    /// Where the built-in OCI registry listens. `wasmkube push FILE
    /// NAME:TAG` publishes to it and pods run `ADDRESS/NAME:TAG`. It
    /// answers to the cluster's authentication and RBAC (clients log in with
    /// a cluster token as the password: `wasmkube registry-token`). On a
    /// loopback address it speaks plain HTTP; on another one, TLS with a
    /// certificate from the cluster CA; on every address (0.0.0.0), plain
    /// HTTP, where tokens cross the network in clear.
    #[arg(
        long,
        env = "WASMKUBE_REGISTRY_LISTEN",
        default_value = "127.0.0.1:5000"
    )]
    registry_listen: SocketAddr,

    /// Serve no built-in registry (pods then pull from registries elsewhere).
    #[arg(long)]
    no_registry: bool,

    /// The longest life of a certificate signed for a
    /// CertificateSigningRequest: nodes' client and serving certificates
    /// and users' (a request may ask for less with expirationSeconds).
    /// Agents renew theirs at 80 % of its life while they run.
    #[arg(long, default_value = "8760h", value_parser = crate::agent::duration, value_name = "DURATION")]
    cluster_signing_duration: Duration,

    /// How often the built-in registry frees blobs that no manifest
    /// references (left by deleted manifests and abandoned pushes; a blob
    /// is kept for an hour after its upload).
    #[arg(long, default_value = "1h", value_parser = crate::agent::duration, value_name = "DURATION")]
    registry_gc_interval: Duration,

    /// Run no local node: pods then need agents joined with `wasmkube
    /// agent` (or simulated nodes).
    #[arg(long)]
    no_local_node: bool,

    /// The local node's name [default: this machine's host name].
    #[arg(long)]
    node_name: Option<String>,

    /// The local node's InternalIP (where the API server reaches its agent
    /// and other nodes route to its pods).
    #[arg(long, default_value = "127.0.0.1")]
    node_address: std::net::IpAddr,

    /// Run no scheduler in this process: pods wait for a `wasmkube
    /// scheduler` joined to this API server.
    #[arg(long)]
    no_scheduler: bool,

    /// Run no controller manager in this process (the workload, node,
    /// service and Knative controllers): with several servers, those of
    /// the others take their turn under the `kube-controller-manager` Lease.
    #[arg(long)]
    no_controller_manager: bool,

    #[command(flatten)]
    node: crate::agent::NodeArgs,
}

/// Takes the data directory's lock (held until the file is dropped); fails
/// if another process holds it.
pub fn lock_data_dir(dir: &std::path::Path) -> anyhow::Result<std::fs::File> {
    let path = dir.join("wasmkube.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    if !lock.try_lock_exclusive().unwrap_or(false) {
        bail!("{} is locked", path.display());
    }
    Ok(lock)
}

pub fn default_data_dir() -> PathBuf {
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("wasmkube")
}

pub async fn run(args: ServerArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create data directory {}", args.data_dir.display()))?;
    let lock = lock_data_dir(&args.data_dir).with_context(|| {
        format!(
            "another wasmkube server is already using the data directory {}; stop it or pass a different --data-dir",
            args.data_dir.display()
        )
    })?;
    if args.node_cidr_mask_size <= args.node.cluster_cidr.prefix_len() {
        bail!(
            "--node-cidr-mask-size {} does not fit inside --cluster-cidr {}: each node's pod CIDR must be smaller than the cluster's (a larger mask size)",
            args.node_cidr_mask_size,
            args.node.cluster_cidr
        );
    }
    if args.insecure_http && !args.listen.ip().is_loopback() {
        bail!(
            "--insecure-http serves the API to anyone who reaches it with no authentication: it is only allowed on a loopback --listen address (got {})",
            args.listen
        );
    }
    let services = args.node.service_cluster_ip_range;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let store = open_store(&args).await?;
    if let Some(secret) = &args.token {
        crate::pki::share_ca(&store, &args.data_dir, secret).await?;
    }
    let pki = if args.insecure_http {
        None
    } else {
        let service_ip = services.hosts().next().map(std::net::IpAddr::V4);
        Some(crate::pki::ServerPki::load(
            &args.data_dir,
            addr,
            args.node_address,
            service_ip,
            &args.tls_sans,
        )?)
    };
    let join_token = match &pki {
        Some(pki) => Some(crate::join::server_token(
            &crate::pki::tls_dir(&args.data_dir),
            &pki.ca.hash(),
            args.token.as_deref(),
        )?),
        None => None,
    };
    let authentication = match (&args.token_auth_file, &join_token) {
        (_, None) => None,
        (file, Some((token, _))) => {
            let mut authentication = match file {
                Some(path) => wasmkube_apiserver::Authentication::read_token_file(path)?,
                None => Default::default(),
            };
            authentication.join_secret = Some(token.secret.clone());
            Some(authentication)
        }
    };
    let encryption_file = match (&args.encryption_provider_config, args.secrets_encryption) {
        (Some(path), _) => Some(path.clone()),
        (None, true) => {
            let path = args.data_dir.join("encryption-config.yaml");
            if !path.exists() {
                wasmkube_pki::write_private(
                    &path,
                    &wasmkube_apiserver::encryption::EncryptionConfig::generate_text(),
                )?;
            }
            Some(path)
        }
        (None, false) => None,
    };
    let encryption = match &encryption_file {
        Some(path) => Some(Arc::new(
            wasmkube_apiserver::encryption::EncryptionConfig::read(path)?,
        )),
        None => None,
    };
    let audit = match &args.audit_policy_file {
        Some(policy) => {
            let path = args
                .audit_log_path
                .clone()
                .unwrap_or_else(|| args.data_dir.join("audit.log"));
            let webhook = match &args.audit_webhook_config_file {
                Some(config) => Some(wasmkube_apiserver::audit::Webhook::start(
                    config,
                    args.audit_webhook_batch_max_size,
                    args.audit_webhook_batch_max_wait,
                )?),
                None => None,
            };
            Some(Arc::new(wasmkube_apiserver::audit::Audit {
                policy: wasmkube_apiserver::audit::Policy::read(policy)?,
                log: Some(wasmkube_apiserver::audit::Log::open(
                    &path,
                    args.audit_log_maxsize * 1024 * 1024,
                    args.audit_log_maxbackup,
                )?),
                webhook,
            }))
        }
        None => None,
    };
    // The registry's address is named in the tokens the API server issues
    // for it, so it is bound first; it serves once the API server runs.
    let registry = if args.no_registry {
        None
    } else {
        bind_registry(&args.data_dir, args.registry_listen).await?
    };
    let registry_addr = registry.as_ref().map(|r| r.addr.to_string());
    let api_config = wasmkube_apiserver::Config {
        registry: registry_addr.clone(),
        signing_duration: args.cluster_signing_duration,
        audit,
        encryption,
        default_toleration_seconds: args.default_toleration_seconds,
        service_cidr: (services.network(), services.prefix_len()),
        node_ports: args.service_node_port_range.clone(),
        cluster_dns: Some(args.node.cluster_dns()),
        authentication,
        ca: pki.as_ref().map(|p| p.ca.clone()),
        service_accounts: pki.as_ref().map(|p| p.service_accounts.clone()),
        ..Default::default()
    };
    let api = wasmkube_apiserver::ApiServer::start(store, api_config)
        .await
        .context("cannot start the API server")?;
    let url = match &pki {
        Some(_) => format!("https://{}", crate::pki::url_host(addr, args.node_address)),
        None => format!("http://{addr}"),
    };
    let registry = match registry {
        Some(r) => {
            // With authentication on, the registry asks the API server who
            // each client is and what RBAC lets them do; off loopback its
            // clients' tokens travel over TLS from the cluster CA.
            let gate = pki
                .as_ref()
                .map(|_| Arc::new(RegistryGate(api.clone())) as Arc<dyn wasmkube_registry::Gate>);
            let ip = r.addr.ip();
            let tls = match &pki {
                Some(pki) if !ip.is_loopback() && !ip.is_unspecified() => {
                    Some(pki.registry_tls(ip, &args.tls_sans)?)
                }
                _ => None,
            };
            Some(r.serve(gate, tls, args.registry_gc_interval))
        }
        None => None,
    };
    let kubeconfig_path = args
        .write_kubeconfig
        .unwrap_or_else(|| args.data_dir.join("kubeconfig"));
    let admin = match &pki {
        Some(pki) => Some(pki.credentials(&wasmkube_pki::Identity::new(
            "system:admin",
            &[wasmkube_apiserver::MASTERS],
        ))?),
        None => None,
    };
    kubeconfig::write(&kubeconfig_path, &url, "system:admin", admin.as_ref())
        .with_context(|| format!("cannot write kubeconfig {}", kubeconfig_path.display()))?;
    tracing::info!(
        %url,
        data_dir = %args.data_dir.display(),
        revision = api.current_revision(),
        startup_ms = started.elapsed().as_millis() as u64,
        "wasmkube server ready"
    );
    eprintln!(
        "wasmkube is ready at {url}\n  export KUBECONFIG={}",
        kubeconfig_path.display()
    );
    if let Some((_, path)) = &join_token {
        eprintln!(
            "  join a node: wasmkube agent --server {url} --token \"$(cat {})\"",
            path.display()
        );
    }

    tokio::spawn(compact_periodically(
        api.clone(),
        Duration::from_secs(args.compaction_interval.max(1)),
    ));
    // The control plane's own components are API clients like any other,
    // each with its own identity, running only while it holds its leader
    // Lease.
    let client_as = |who: wasmkube_pki::Identity| {
        let (url, pki) = (url.clone(), pki.as_ref());
        async move {
            let credentials = match pki {
                Some(pki) => Some(pki.credentials(&who)?),
                None => None,
            };
            kubeconfig::client_with(&url, &who.user, credentials.as_ref()).await
        }
    };
    use wasmkube_pki::Identity;
    // The server's own loopback client, as kube-apiserver's.
    let client = client_as(Identity::new(
        "system:apiserver",
        &[wasmkube_apiserver::MASTERS],
    ))
    .await?;
    let scheduler_client = client_as(Identity::new("system:kube-scheduler", &[])).await?;
    let controllers_client =
        client_as(Identity::new("system:kube-controller-manager", &[])).await?;
    let identity = identity();
    let elector = |name: &str, client: &kube::Client| {
        Arc::new(LeaderElector::new(
            client.clone(),
            "kube-system",
            name,
            &identity,
            ElectionConfig::default(),
        ))
    };
    let (scheduler_lease, controllers_lease) = (
        elector("kube-scheduler", &scheduler_client),
        elector("kube-controller-manager", &controllers_client),
    );
    if !args.no_scheduler {
        let (elector, client) = (scheduler_lease.clone(), scheduler_client.clone());
        tokio::spawn(async move {
            let result = elector
                .run(|| wasmkube_scheduler::run(client.clone(), Default::default()))
                .await;
            if let Err(e) = result {
                tracing::error!(error = %e, "the scheduler stopped");
            }
        });
    }
    if !args.no_controller_manager {
        let (elector, client) = (controllers_lease.clone(), controllers_client.clone());
        let config = wasmkube_controllers::Config {
            node_monitor_grace_period: Duration::from_secs(args.node_monitor_grace_period),
            cluster_cidr: Some(wasmkube_controllers::nodeipam::Cidr {
                base: args.node.cluster_cidr.network(),
                prefix: args.node.cluster_cidr.prefix_len(),
            }),
            node_cidr_mask_size: args.node_cidr_mask_size,
            hpa_sync_period: args.horizontal_pod_autoscaler_sync_period,
            ..Default::default()
        };
        let serving = wasmkube_serving::Config {
            domain: args.serving_domain.clone(),
            ..Default::default()
        };
        tokio::spawn(async move {
            let result = elector
                .run(|| async {
                    // The gateway's status writer and Knative Serving (its
                    // controllers and autoscaler) are controllers too.
                    let gateway_status = async {
                        if let Err(e) = wasmkube_gateway::status::run(client.clone()).await {
                            tracing::error!(error = %e, "the gateway status writer stopped");
                        }
                    };
                    let serving = async {
                        if let Err(e) = wasmkube_serving::run(client.clone(), serving.clone()).await
                        {
                            tracing::error!(error = %e, "Knative Serving stopped");
                        }
                    };
                    tokio::select! {
                        r = wasmkube_controllers::run_all(client.clone(), config.clone()) => r,
                        () = gateway_status => Ok(()),
                        () = serving => Ok(()),
                    }
                })
                .await;
            if let Err(e) = result {
                tracing::error!(error = %e, "the controllers stopped");
            }
        });
    }
    let tls = match &pki {
        Some(pki) => Some(pki.server_tls()?),
        None => None,
    };
    let mut server = tokio::spawn(async move {
        match tls {
            Some(tls) => api.serve_tls(listener, tls).await,
            None => api.serve(listener).await,
        }
    });
    // The `kubernetes` Service's endpoints: every live API server, each
    // renewing its own Lease.
    let advertised = if addr.ip().is_unspecified() {
        std::net::SocketAddr::new(args.node_address, addr.port())
    } else {
        addr
    };
    let api_endpoints = Arc::new(ApiServerEndpoints::new(
        client.clone(),
        &crate::agent::host_name(),
        advertised,
        EndpointsConfig::default(),
    ));
    let endpoints_task = {
        let endpoints = api_endpoints.clone();
        tokio::spawn(async move { endpoints.run().await })
    };
    let local_node = if args.no_local_node {
        None
    } else {
        let name = args
            .node_name
            .clone()
            .unwrap_or_else(crate::agent::host_name);
        let mut config = wasmkube_node::Config::new(&name, args.data_dir.join("node"));
        config.address = args.node_address;
        config.listen = std::net::SocketAddr::new(args.node_address, 0);
        config.cluster_registry = registry_addr.clone();
        args.node.apply(&mut config);
        let node_client = client_as(Identity::new(
            &format!("system:node:{name}"),
            &["system:nodes"],
        ))
        .await?;
        let services = args
            .node
            .start_services(&node_client, &name, args.node_address);
        services.configure(&mut config);
        let agent = wasmkube_node::Agent::start(node_client, config)
            .await
            .context("cannot start the local node")?;
        tracing::info!(node = %name, endpoint = %agent.endpoint(), "local node running");
        let agent = tokio::spawn(async move {
            if let Err(e) = agent.run().await {
                tracing::error!(error = %e, "the local node stopped");
            }
        });
        Some((agent, services))
    };
    tokio::select! {
        result = &mut server => result?.context("the API server stopped")?,
        signal = shutdown_signal() => tracing::info!(signal, "shutting down"),
    }
    // Hand the leases over and leave the `kubernetes` Service's endpoints at
    // once, while the API still answers.
    endpoints_task.abort();
    let release = async {
        let (_, _, endpoints) = tokio::join!(
            scheduler_lease.release(),
            controllers_lease.release(),
            api_endpoints.release()
        );
        if let Err(e) = endpoints {
            tracing::warn!(error = %e, "cannot take this server out of the kubernetes Service's endpoints");
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), release).await;
    if let Some((node, services)) = local_node {
        node.abort();
        services.stop().await;
    }
    server.abort();
    let _ = server.await;
    if let Some(registry) = registry {
        registry.abort();
    }
    // Every acknowledged write is already durable; dropping the store ends its writer.
    drop(lock);
    Ok(())
}

/// The built-in registry, bound and not yet serving.
struct BoundRegistry {
    registry: wasmkube_registry::Registry,
    listener: tokio::net::TcpListener,
    addr: SocketAddr,
}

/// Opens the built-in registry's storage in `DATA_DIR/registry` and binds
/// its address. An address in use (another registry on the port) is
/// reported and the cluster runs without it; pushes then go to whatever
/// serves that address.
async fn bind_registry(
    data_dir: &std::path::Path,
    listen: SocketAddr,
) -> anyhow::Result<Option<BoundRegistry>> {
    let dir = data_dir.join("registry");
    let registry = wasmkube_registry::Registry::open(&dir)
        .with_context(|| format!("cannot open the registry's storage in {}", dir.display()))?;
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(%listen, error = %e, "the built-in registry is off: cannot listen (pass --registry-listen ADDRESS, or --no-registry)");
            eprintln!(
                "warning: the built-in registry cannot listen on {listen} ({e}); running without it"
            );
            return Ok(None);
        }
    };
    let addr = listener.local_addr()?;
    Ok(Some(BoundRegistry {
        registry,
        listener,
        addr,
    }))
}

impl BoundRegistry {
    /// Serves the registry, deciding requests with `gate` when given.
    /// Serves the registry, deciding requests with `gate` and speaking TLS
    /// with `tls` when given.
    fn serve(
        self,
        gate: Option<Arc<dyn wasmkube_registry::Gate>>,
        tls: Option<Arc<rustls::ServerConfig>>,
        gc_interval: Duration,
    ) -> tokio::task::JoinHandle<()> {
        let addr = self.addr;
        let mut registry = self.registry;
        match gate {
            Some(gate) => registry = registry.with_gate(gate),
            None if !addr.ip().is_loopback() => {
                tracing::warn!(%addr, "the built-in registry has no authentication (the cluster has none): anyone who reaches it may push");
            }
            None => {}
        }
        let scheme = if tls.is_some() { "https" } else { "http" };
        tracing::info!(%addr, scheme, "built-in registry serving");
        eprintln!(
            "wasmkube registry at {addr} ({scheme}; wasmkube push FILE NAME:TAG; images {addr}/NAME:TAG)"
        );
        let listener = self.listener;
        let policy = wasmkube_registry::GcPolicy::default();
        tokio::spawn(async move {
            let served = match tls {
                Some(tls) => {
                    let gc =
                        tokio::spawn(registry.clone().collect_garbage_every(gc_interval, policy));
                    let served =
                        wasmkube_apiserver::serve_tls(listener, tls, registry.router()).await;
                    gc.abort();
                    served
                }
                None => registry.serve(listener, gc_interval, policy).await,
            };
            if let Err(e) = served {
                tracing::error!(error = %e, "the built-in registry stopped");
            }
        })
    }
}

/// The built-in registry's gate: the API server's authentication and RBAC
/// (see `wasmkube_api::images`).
struct RegistryGate(Arc<wasmkube_apiserver::ApiServer>);

impl wasmkube_registry::Gate for RegistryGate {
    fn check<'a>(
        &'a self,
        token: Option<&'a str>,
        access: Option<(&'a str, wasmkube_registry::Action)>,
    ) -> futures::future::BoxFuture<'a, Result<(), wasmkube_registry::Refusal>> {
        use wasmkube_registry::Refusal;
        Box::pin(async move {
            let token = token.ok_or(Refusal::Unauthenticated)?;
            let user = self
                .0
                .registry_user(token)
                .await
                .map_err(|_| Refusal::Unauthenticated)?;
            match access {
                None => Ok(()),
                Some((repository, action)) => self
                    .0
                    .registry_allows(&user, repository, action.verb())
                    .map_err(|why| {
                        tracing::debug!(user = %user.name, repository, "{why}");
                        Refusal::Denied(why)
                    }),
            }
        })
    }
}

/// This process's name in leader Leases: host name plus a random suffix, as
/// client-go's leader election uses.
pub fn identity() -> String {
    format!("{}_{}", crate::agent::host_name(), uuid::Uuid::new_v4())
}

/// The store: etcd with --etcd-servers, else the embedded one in the data
/// directory.
async fn open_store(args: &ServerArgs) -> anyhow::Result<wasmkube_store::SharedStore> {
    if args.etcd_servers.is_empty() {
        return wasmkube_store::open_sled(&args.data_dir.join("store"))
            .with_context(|| format!("cannot open the store in {}", args.data_dir.display()));
    }
    let config = wasmkube_store::EtcdConfig {
        endpoints: args.etcd_servers.clone(),
        prefix: args.etcd_prefix.clone(),
        tls: args
            .etcd_cafile
            .clone()
            .map(|ca_file| wasmkube_store::EtcdTls {
                ca_file,
                cert_file: args.etcd_certfile.clone(),
                key_file: args.etcd_keyfile.clone(),
            }),
    };
    wasmkube_store::connect_etcd(&config)
        .await
        .with_context(|| format!("cannot reach etcd at {}", args.etcd_servers.join(",")))
}

/// Compacts to the revision seen one interval ago, like kube-apiserver.
async fn compact_periodically(api: std::sync::Arc<wasmkube_apiserver::ApiServer>, every: Duration) {
    let mut previous = api.current_revision();
    loop {
        tokio::time::sleep(every).await;
        if previous > 0
            && let Err(e) = api.compact(previous).await
        {
            tracing::warn!(error = %e, revision = previous, "compaction failed");
        }
        previous = api.current_revision();
    }
}

pub async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}
