//! Pod networking: one network namespace per pod with an address from the
//! node's pod CIDR, set up by the agent itself over netlink as a routed veth
//! (`netlink.rs`; nothing to install, no bridge) or, when the node is given
//! a CNI plugin directory, by a CNI plugin chain: the user's own network
//! configuration list from a configuration directory (as the kubelet's
//! container runtimes read it), or else the `bridge` and `host-local`
//! plugins onto the node's bridge;
//! routes to other nodes' pod CIDRs through their node addresses; and
//! [`Netns`], a pod's namespace held open, in which the agent makes the
//! listening and outgoing sockets of guests that run in its own process (a
//! socket stays in the namespace it was created in).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::io::AsyncWriteExt;

use crate::{Error, netlink};

/// Where `ip netns` keeps named namespaces.
const NETNS_DIR: &str = "/run/netns";
const CNI_NETWORK: &str = "wasmkube";

/// Settings of a node's pod network.
#[derive(Clone, Debug)]
pub struct NetConfig {
    /// The node's pod CIDR (`node.spec.podCIDR`).
    pub pod_cidr: String,
    /// The node's bridge, on the CNI path (the in-process path routes each
    /// pod's veth instead).
    pub bridge: String,
    /// Where the CNI plugins are, to set pods up with them instead of
    /// in-process (`None`: in-process).
    pub cni_bin: Option<PathBuf>,
    /// A CNI configuration directory: its first network configuration
    /// (`*.conflist`, else `*.conf`, by name) is the plugin chain pods are
    /// set up with, instead of the built-in bridge (needs `cni_bin`).
    pub cni_conf_dir: Option<PathBuf>,
    /// The address allocations (per node, so agents sharing a machine in
    /// tests never share it).
    pub state_dir: PathBuf,
    /// Namespace names start with it: this node's, and nobody else's.
    pub prefix: String,
}

/// A pod's network: its address and namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sandbox {
    pub ip: IpAddr,
    pub netns: PathBuf,
}

/// The node's pod network.
#[derive(Debug)]
pub struct PodNetwork {
    config: NetConfig,
    /// The in-process path's address allocator (`None`: CNI).
    ipam: Option<netlink::Ipam>,
    /// The CNI plugin chain, on the CNI path.
    chain: Option<CniNetwork>,
}

/// A CNI network configuration list: its name, version and plugins, each
/// plugin's configuration as the specification passes it (with the list's
/// `name` and `cniVersion`, and the previous plugin's result).
#[derive(Clone, Debug)]
struct CniNetwork {
    name: String,
    version: String,
    plugins: Vec<serde_json::Value>,
    /// Where it was read from, for errors.
    source: String,
}

impl CniNetwork {
    /// The first network configuration in `dir`, by file name: a
    /// `.conflist`, else a single-plugin `.conf`.
    fn load(dir: &Path) -> Result<Self, Error> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| {
                Error::Unavailable(format!(
                    "CNI configuration directory {}: {e}",
                    dir.display()
                ))
            })?
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.extension()
                    .is_some_and(|x| x == "conflist" || x == "conf" || x == "json")
            })
            .collect();
        files.sort();
        let lists = files
            .iter()
            .filter(|p| p.extension().is_some_and(|x| x == "conflist"));
        let path = lists.chain(files.iter()).next().ok_or_else(|| {
            Error::Unavailable(format!(
                "no CNI network configuration (*.conflist, *.conf) in {}",
                dir.display()
            ))
        })?;
        let source = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(Error::io(path))?;
        let doc: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::Unavailable(format!("CNI configuration {source}: {e}")))?;
        let name = doc["name"].as_str().unwrap_or_default().to_owned();
        let version = doc["cniVersion"].as_str().unwrap_or("1.0.0").to_owned();
        let plugins = match doc["plugins"].as_array() {
            Some(list) => list.clone(),
            // A .conf is one plugin's configuration.
            None if doc["type"].is_string() => vec![doc.clone()],
            None => Vec::new(),
        };
        if name.is_empty() || plugins.is_empty() || plugins.iter().any(|p| !p["type"].is_string()) {
            return Err(Error::Unavailable(format!(
                "CNI configuration {source}: needs a name and plugins, each with a type"
            )));
        }
        Ok(Self {
            name,
            version,
            plugins,
            source,
        })
    }

    /// The built-in chain: the node's bridge, addresses from its pod CIDR.
    fn bridge(config: &NetConfig) -> Self {
        Self {
            name: CNI_NETWORK.into(),
            version: "1.0.0".into(),
            plugins: vec![serde_json::json!({
                "type": "bridge",
                "bridge": config.bridge, "isGateway": true, "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": config.pod_cidr}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": config.state_dir,
                },
            })],
            source: "the built-in bridge network".into(),
        }
    }

    /// What plugin `i` is given: its configuration with the list's name
    /// and version, and the result so far.
    fn plugin_config(&self, i: usize, prev: Option<&serde_json::Value>) -> serde_json::Value {
        let mut c = self.plugins[i].clone();
        c["name"] = serde_json::json!(self.name);
        c["cniVersion"] = serde_json::json!(self.version);
        if let Some(prev) = prev {
            c["prevResult"] = prev.clone();
        }
        c
    }

    /// The plugin binaries the chain runs (with `loopback`, always run
    /// first for the pod's `lo`), besides the IPAM plugins they call.
    fn binaries(&self) -> Vec<String> {
        let mut out = vec!["loopback".to_owned()];
        for p in &self.plugins {
            for t in [&p["type"], &p["ipam"]["type"]] {
                if let Some(t) = t.as_str()
                    && !out.iter().any(|o| o == t)
                {
                    out.push(t.to_owned());
                }
            }
        }
        out
    }
}

impl PodNetwork {
    /// Checks that the plugins and `ip` are there and the agent is root, and
    /// lets the node forward between its bridge and other nodes.
    pub fn new(config: NetConfig) -> Result<Self, Error> {
        if !rustix::process::geteuid().is_root() {
            return Err(Error::Unavailable("the agent does not run as root".into()));
        }
        let chain = match (&config.cni_bin, &config.cni_conf_dir) {
            (None, None) => None,
            (None, Some(_)) => {
                return Err(Error::Unavailable(
                    "a CNI configuration directory needs a CNI plugin directory (--cni-bin-dir)"
                        .into(),
                ));
            }
            (Some(_), Some(dir)) => Some(CniNetwork::load(dir)?),
            (Some(_), None) => Some(CniNetwork::bridge(&config)),
        };
        if let (Some(bin), Some(chain)) = (&config.cni_bin, &chain) {
            for plugin in chain.binaries() {
                let p = bin.join(&plugin);
                if !p.exists() {
                    return Err(Error::Unavailable(format!(
                        "CNI plugin {} (used by {}) not found (install containernetworking-plugins)",
                        p.display(),
                        chain.source
                    )));
                }
            }
        }
        std::fs::create_dir_all(&config.state_dir).map_err(Error::io(&config.state_dir))?;
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
            .map_err(|e| Error::Unavailable(format!("enabling IP forwarding: {e}")))?;
        let ipam = match config.cni_bin {
            Some(_) => None,
            None => Some(netlink::Ipam::new(
                config.state_dir.join("ipam"),
                &config.pod_cidr,
            )?),
        };
        Ok(Self {
            config,
            ipam,
            chain,
        })
    }

    /// The in-process path gives the node its address in the pod CIDR and
    /// refuses the CIDR's unused addresses on the node (the CNI bridge
    /// plugin makes its bridge on the first pod).
    pub async fn prepare(&self) -> Result<(), Error> {
        match &self.ipam {
            Some(ipam) => {
                netlink::ensure_node_address(ipam.node_address()).await?;
                netlink::ensure_unreachable(ipam.network(), ipam.prefix()).await
            }
            None => Ok(()),
        }
    }

    /// How pods are plugged in, for the log.
    pub fn method(&self) -> &'static str {
        match (&self.ipam, &self.config.cni_conf_dir) {
            (Some(_), _) => "routed veths, in-process (netlink)",
            (None, Some(_)) => "CNI plugins (the configuration directory's network)",
            (None, None) => "CNI plugins (bridge)",
        }
    }

    pub fn pod_cidr(&self) -> &str {
        &self.config.pod_cidr
    }

    fn name(&self, id: &str) -> String {
        format!("{}{id}", self.config.prefix)
    }

    fn netns_path(&self, id: &str) -> PathBuf {
        Path::new(NETNS_DIR).join(self.name(id))
    }

    /// Runs one CNI plugin for the pod `id` with `config` on `ifname`.
    async fn cni(
        &self,
        command: &str,
        config: &serde_json::Value,
        id: &str,
        ifname: &str,
    ) -> Result<serde_json::Value, Error> {
        let bin = self
            .config
            .cni_bin
            .as_deref()
            .ok_or_else(|| Error::Setup("no CNI plugin directory".into()))?;
        let plugin = config["type"].as_str().unwrap_or_default();
        let mut child = tokio::process::Command::new(bin.join(plugin))
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", self.name(id))
            .env("CNI_NETNS", self.netns_path(id))
            .env("CNI_IFNAME", ifname)
            .env("CNI_PATH", bin)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Error::Setup(format!("running the CNI {plugin} plugin: {e}")))?;
        let config = serde_json::to_vec(config).expect("JSON");
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(&config)
                .await
                .map_err(|e| Error::Setup(format!("CNI {plugin}: {e}")))?;
        }
        let out = child
            .wait_with_output()
            .await
            .map_err(|e| Error::Setup(format!("CNI {plugin}: {e}")))?;
        let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if !out.status.success() {
            let msg = result["msg"].as_str().map_or_else(
                || String::from_utf8_lossy(&out.stderr).trim().to_owned(),
                |m| format!("{m} {}", result["details"].as_str().unwrap_or_default()),
            );
            return Err(Error::Setup(format!(
                "CNI {plugin} {command}: {}",
                msg.trim()
            )));
        }
        Ok(result)
    }

    /// The pod's loopback, then the chain's plugins in order, each given
    /// the previous one's result; the last result.
    async fn cni_add(&self, chain: &CniNetwork, id: &str) -> Result<serde_json::Value, Error> {
        let lo = serde_json::json!({"cniVersion": chain.version, "name": chain.name, "type": "loopback"});
        self.cni("ADD", &lo, id, "lo").await?;
        let mut prev: Option<serde_json::Value> = None;
        for i in 0..chain.plugins.len() {
            let result = self
                .cni("ADD", &chain.plugin_config(i, prev.as_ref()), id, "eth0")
                .await?;
            // A plugin that passes the result on may print nothing.
            if !result.is_null() {
                prev = Some(result);
            }
        }
        Ok(prev.unwrap_or_default())
    }

    /// The chain's plugins in reverse order; every one is asked even when
    /// one fails (DEL must release what it can); the first error.
    async fn cni_del(&self, chain: &CniNetwork, id: &str) -> Result<(), Error> {
        let mut first = None;
        for i in (0..chain.plugins.len()).rev() {
            if let Err(e) = self
                .cni("DEL", &chain.plugin_config(i, None), id, "eth0")
                .await
            {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Creates the pod's namespace and plugs it into the bridge.
    pub async fn setup(&self, id: &str) -> Result<Sandbox, Error> {
        // A leftover of the same pod (an agent crash mid-setup) goes first.
        self.teardown(id).await;
        if let Some(ipam) = &self.ipam {
            let path = self.netns_path(id);
            let plugged = async {
                let ip = ipam.allocate(id)?;
                netlink::create_netns(&path).await?;
                netlink::plug(&path, &self.name(id), ip, ipam.node_address()).await?;
                Ok(ip)
            }
            .await;
            return match plugged {
                Ok(ip) => Ok(Sandbox {
                    ip: IpAddr::V4(ip),
                    netns: path,
                }),
                Err(e) => {
                    self.teardown(id).await;
                    Err(e)
                }
            };
        }
        let chain = self.chain.as_ref().expect("the CNI path has a chain");
        ip(&["netns", "add", &self.name(id)]).await?;
        let result = self.cni_add(chain, id).await;
        let result = match result {
            Ok(r) => r,
            Err(e) => {
                self.teardown(id).await;
                return Err(e);
            }
        };
        let address = result["ips"][0]["address"].as_str().unwrap_or_default();
        let ip = address
            .split('/')
            .next()
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| {
                Error::Setup(format!(
                    "CNI network {} gave no address: {result}",
                    chain.source
                ))
            })?;
        Ok(Sandbox {
            ip,
            netns: self.netns_path(id),
        })
    }

    /// Unplugs and removes the pod's namespace (and its veth with it).
    /// Whatever is already gone is fine.
    pub async fn teardown(&self, id: &str) {
        if let Some(ipam) = &self.ipam {
            // A veth lives no longer than its namespace: with no namespace
            // (a pod's first setup) there is nothing to ask netlink about.
            if self.netns_path(id).exists()
                && let Err(e) = netlink::delete_veth(&self.name(id)).await
            {
                tracing::warn!(pod = id, error = %e, "removing the pod's veth");
            }
            if let Err(e) = netlink::delete_netns(&self.netns_path(id)) {
                tracing::warn!(pod = id, error = %e, "removing the pod's network namespace");
            }
            ipam.release(id);
            return;
        }
        if !self.netns_path(id).exists() {
            return;
        }
        if let Some(chain) = &self.chain
            && let Err(e) = self.cni_del(chain, id).await
        {
            tracing::warn!(pod = id, error = %e, "releasing the pod's address");
        }
        if let Err(e) = ip(&["netns", "delete", &self.name(id)]).await {
            tracing::warn!(pod = id, error = %e, "removing the pod's network namespace");
        }
    }

    /// The ids of this node's pod namespaces that exist now.
    pub fn sandboxes(&self) -> Vec<String> {
        std::fs::read_dir(NETNS_DIR)
            .map(|d| {
                d.flatten()
                    .filter_map(|e| {
                        e.file_name()
                            .to_str()?
                            .strip_prefix(&self.config.prefix)
                            .map(str::to_owned)
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Routes another node's pod CIDR through its address.
    pub async fn route(&self, cidr: &str, via: IpAddr) -> Result<(), Error> {
        ip(&["route", "replace", cidr, "via", &via.to_string()]).await
    }
}

async fn ip(args: &[&str]) -> Result<(), Error> {
    let out = tokio::process::Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| Error::Setup(format!("running ip: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::Setup(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// A pod's network namespace, held open. Sockets made inside
/// [`PodNetns::enter`] belong to it: the agent makes an in-process guest's
/// listeners and outgoing connections there while the guest runs on the
/// agent's own threads.
#[derive(Debug)]
pub struct Netns {
    file: std::fs::File,
}

impl Netns {
    pub fn open(path: &Path) -> std::io::Result<Self> {
        Ok(Self {
            file: std::fs::File::open(path)?,
        })
    }
}

/// The network namespace the agent's threads live in, opened the first
/// time a thread is about to leave it.
fn home_netns() -> std::io::Result<&'static std::fs::File> {
    static HOME: std::sync::OnceLock<std::fs::File> = std::sync::OnceLock::new();
    if let Some(home) = HOME.get() {
        return Ok(home);
    }
    let file = std::fs::File::open("/proc/thread-self/ns/net")?;
    Ok(HOME.get_or_init(|| file))
}

fn move_to_netns(file: &std::fs::File) -> std::io::Result<()> {
    rustix::thread::move_into_link_name_space(
        std::os::fd::AsFd::as_fd(file),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )?;
    Ok(())
}

/// Brings the thread home when dropped, also when the work inside panicked.
struct GoHome(&'static std::fs::File);

impl Drop for GoHome {
    fn drop(&mut self) {
        if let Err(e) = move_to_netns(self.0) {
            // Every later socket of this thread would be made in the pod's
            // namespace: a thread that cannot come home must not go on.
            tracing::error!(error = %e, "cannot return a thread to the agent's network namespace");
            std::process::abort();
        }
    }
}

impl wasmkube_runtime::PodNetns for Netns {
    fn enter(&self, f: &mut dyn FnMut()) -> std::io::Result<()> {
        let home = home_netns()?;
        move_to_netns(&self.file)?;
        let _home = GoHome(home);
        f();
        Ok(())
    }
}

/// A listening TCP socket on `addr` inside `netns`, made by the calling
/// thread while it is in the namespace (the socket stays in it).
pub fn listen_in(netns: &Netns, addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use wasmkube_runtime::PodNetns;
    let mut listener = Err(std::io::Error::other("not made"));
    netns.enter(&mut || {
        listener = std::net::TcpListener::bind(addr).and_then(|l| {
            l.set_nonblocking(true)?;
            Ok(l)
        });
    })?;
    listener
}
