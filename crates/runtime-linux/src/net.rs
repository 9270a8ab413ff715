//! Pod networking: one network namespace per pod with an address from the
//! node's pod CIDR, set up by the agent itself over netlink as a routed veth
//! (`netlink.rs`; nothing to install, no bridge) or, when the node is given
//! a CNI plugin directory, attached to a bridge by the CNI `bridge` and
//! `host-local` plugins;
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
}

impl PodNetwork {
    /// Checks that the plugins and `ip` are there and the agent is root, and
    /// lets the node forward between its bridge and other nodes.
    pub fn new(config: NetConfig) -> Result<Self, Error> {
        if !rustix::process::geteuid().is_root() {
            return Err(Error::Unavailable("the agent does not run as root".into()));
        }
        if let Some(bin) = &config.cni_bin {
            for plugin in ["bridge", "host-local", "loopback"] {
                let p = bin.join(plugin);
                if !p.exists() {
                    return Err(Error::Unavailable(format!(
                        "CNI plugin {} not found (install containernetworking-plugins)",
                        p.display()
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
        Ok(Self { config, ipam })
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
        if self.ipam.is_some() {
            "routed veths, in-process (netlink)"
        } else {
            "CNI plugins (bridge)"
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

    /// The pod network's CNI configuration for one plugin.
    fn plugin_config(&self, plugin: &str) -> serde_json::Value {
        match plugin {
            "loopback" => serde_json::json!({
                "cniVersion": "1.0.0", "name": CNI_NETWORK, "type": "loopback",
            }),
            _ => serde_json::json!({
                "cniVersion": "1.0.0", "name": CNI_NETWORK, "type": "bridge",
                "bridge": self.config.bridge, "isGateway": true, "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": self.config.pod_cidr}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": self.config.state_dir,
                },
            }),
        }
    }

    async fn cni(&self, command: &str, plugin: &str, id: &str) -> Result<serde_json::Value, Error> {
        let bin = self
            .config
            .cni_bin
            .as_deref()
            .ok_or_else(|| Error::Setup("no CNI plugin directory".into()))?;
        let mut child = tokio::process::Command::new(bin.join(plugin))
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", self.name(id))
            .env("CNI_NETNS", self.netns_path(id))
            .env(
                "CNI_IFNAME",
                if plugin == "loopback" { "lo" } else { "eth0" },
            )
            .env("CNI_PATH", bin)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Error::Setup(format!("running the CNI {plugin} plugin: {e}")))?;
        let config = serde_json::to_vec(&self.plugin_config(plugin)).expect("JSON");
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
        ip(&["netns", "add", &self.name(id)]).await?;
        let result = async {
            self.cni("ADD", "loopback", id).await?;
            self.cni("ADD", "bridge", id).await
        }
        .await;
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
            .ok_or_else(|| Error::Setup(format!("CNI bridge gave no address: {result}")))?;
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
        if let Err(e) = self.cni("DEL", "bridge", id).await {
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
