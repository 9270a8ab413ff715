//! Pod networks set up in-process over netlink, with no CNI plugin and no
//! `ip` process, as routed veths (Calico's layout, no bridge, so no limit of
//! 1,024 ports per node): a named network namespace (a thread unshares one
//! and bind-mounts it at `/run/netns/NAME`, as `ip netns add` does), a veth
//! pair whose pod end is made inside it as `eth0` with the pod's address as
//! a /32, a `/32` route to the pod through the node end, and in the pod a
//! default route through a link-local next hop (169.254.1.1) whose MAC is
//! the node end's, fixed, so no ARP proxy is needed. The node holds the
//! CIDR's first address on its loopback and reaches its pods from it. Addresses come from the
//! node's pod CIDR ([`Ipam`], a file per address under the state directory,
//! so allocations survive an agent restart and are reconciled with the
//! namespaces that exist); an `unreachable` route for the whole pod CIDR
//! refuses addresses no pod holds on the node itself.

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use futures::TryStreamExt;
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVeth};
use rtnetlink::packet_route::neighbour::NeighbourState;
use rtnetlink::packet_route::route::{RouteScope, RouteType};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};

use crate::Error;

fn setup_err(what: &str) -> impl FnOnce(rtnetlink::Error) -> Error + '_ {
    move |e| Error::Setup(format!("{what}: {e}"))
}

/// A netlink connection made in the namespace the calling thread is in (a
/// socket belongs to the namespace it was made in), driven by a task.
fn connect() -> Result<Handle, Error> {
    let (connection, handle, _) = rtnetlink::new_connection()
        .map_err(|e| Error::Setup(format!("opening a netlink socket: {e}")))?;
    tokio::spawn(connection);
    Ok(handle)
}

/// A netlink connection inside the namespace at `netns`.
fn connect_in(netns: &Path) -> Result<Handle, Error> {
    use wasmkube_runtime::PodNetns;
    let ns = crate::net::Netns::open(netns).map_err(Error::io(netns))?;
    let mut made = None;
    ns.enter(&mut || made = Some(connect()))
        .map_err(|e| Error::Setup(format!("entering {}: {e}", netns.display())))?;
    made.unwrap_or_else(|| Err(Error::Setup("the namespace ran nothing".into())))
}

async fn index_of(handle: &Handle, name: &str) -> Result<Option<u32>, Error> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(Some(link)) => Ok(Some(link.header.index)),
        Ok(None) => Ok(None),
        // No such device.
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -19 => Ok(None),
        Err(e) => Err(Error::Setup(format!("looking up {name}: {e}"))),
    }
}

/// The next hop pods route through: link-local, answered by the node end
/// of every pod's veth, which carries [`NODE_END_MAC`].
const NEXT_HOP: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// The MAC of the node end of every pod's veth (locally administered,
/// unicast; the same on each, as each veth is its own link).
const NODE_END_MAC: [u8; 6] = [0xee; 6];

/// Gives the node its address in its pod CIDR (the first host), as a /32
/// on its loopback (no link type to load, and nothing to route); the
/// node's own traffic to its pods leaves from it.
pub(crate) async fn ensure_node_address(address: Ipv4Addr) -> Result<(), Error> {
    let handle = connect()?;
    let lo = index_of(&handle, "lo")
        .await?
        .ok_or_else(|| Error::Setup("the node has no loopback".into()))?;
    handle
        .address()
        .add(lo, IpAddr::V4(address), 32)
        .replace()
        .execute()
        .await
        .map_err(setup_err("giving the node its address in the pod CIDR"))
}

/// Refuses, on the node, every address of its pod CIDR that no pod holds
/// (the pods' /32 routes are more specific), so such a packet never follows
/// the default route off the machine.
pub(crate) async fn ensure_unreachable(network: Ipv4Addr, prefix: u8) -> Result<(), Error> {
    let handle = connect()?;
    handle
        .route()
        .add(
            RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(network, prefix)
                .kind(RouteType::Unreachable)
                .build(),
        )
        .replace()
        .execute()
        .await
        .map_err(setup_err("refusing the pod CIDR's unused addresses"))
}

/// Creates the named network namespace at `path` (`ip netns add`): a
/// thread of its own unshares a new one and bind-mounts it there, while the
/// caller's task waits without holding a runtime thread.
pub(crate) async fn create_netns(path: &Path) -> Result<(), Error> {
    let dir = path.parent().unwrap_or(Path::new("/run/netns"));
    std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(Error::io(path))?;
    let target = path.to_owned();
    let (done, made) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let result = (|| -> std::io::Result<()> {
            // SAFETY: only the network namespace is unshared, on a thread
            // that does nothing else and ends right after: no file
            // descriptor table or other state shared with other threads
            // changes.
            #[allow(unsafe_code)]
            unsafe {
                rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNET)?;
            }
            rustix::mount::mount_bind("/proc/thread-self/ns/net", &target)?;
            Ok(())
        })();
        let _ = done.send(result);
    });
    let made = made
        .await
        .unwrap_or_else(|_| Err(std::io::Error::other("the namespace thread panicked")));
    if let Err(e) = made {
        let _ = std::fs::remove_file(path);
        return Err(Error::Setup(format!(
            "creating the network namespace {}: {e}",
            path.display()
        )));
    }
    Ok(())
}

/// Removes a named namespace (`ip netns delete`); it goes once nothing holds
/// it open, and its veth with it.
pub(crate) fn delete_netns(path: &Path) -> Result<(), Error> {
    match rustix::mount::unmount(path, rustix::mount::UnmountFlags::DETACH) {
        Ok(()) => {}
        Err(e) if e == rustix::io::Errno::INVAL || e == rustix::io::Errno::NOENT => {}
        Err(e) => {
            return Err(Error::Setup(format!("unmounting {}: {e}", path.display())));
        }
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(path)(e)),
    }
}

/// Deletes the node end of a pod's veth (and with it the pod's end) if it
/// is there. A namespace's own links go only when the kernel frees the
/// namespace, which is asynchronous and waits for every socket made in it.
pub(crate) async fn delete_veth(netns_name: &str) -> Result<(), Error> {
    let node = connect()?;
    let name = host_veth(netns_name);
    let Some(index) = index_of(&node, &name).await? else {
        return Ok(());
    };
    match node.link().del(index).execute().await {
        Ok(()) => Ok(()),
        // Gone meanwhile.
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -19 => Ok(()),
        Err(e) => Err(Error::Setup(format!("deleting {name}: {e}"))),
    }
}

/// The node end of a pod's veth: `wk` and 11 hex digits of the pod's
/// namespace name (interface names have 15 characters at most).
pub(crate) fn host_veth(netns_name: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(netns_name.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("wk{}", &hex[..11])
}

/// The MAC of a pod's `eth0`, from its address (`0a:58:` and the four
/// octets, as the CNI bridge plugin makes them; locally administered).
fn pod_end_mac(ip: Ipv4Addr) -> [u8; 6] {
    let [a, b, c, d] = ip.octets();
    [0x0a, 0x58, a, b, c, d]
}

/// Plugs the namespace at `netns` in: a veth whose pod end is `eth0` with
/// `ip`/32 and a default route through [`NEXT_HOP`], and whose node end
/// carries a /32 route to `ip` (from `node_address`).
pub(crate) async fn plug(
    netns: &Path,
    netns_name: &str,
    ip: Ipv4Addr,
    node_address: Ipv4Addr,
) -> Result<(), Error> {
    let node = connect()?;
    let host = host_veth(netns_name);
    // The pod end is made inside the pod's namespace, already named eth0,
    // and the node end up with its fixed MAC, in one request: moving a link
    // between namespaces afterwards waits for an RCU grace period (~20 ms).
    let ns_file = std::fs::File::open(netns).map_err(Error::io(netns))?;
    let pod_mac = pod_end_mac(ip);
    let peer = LinkMessageBuilder::<LinkUnspec>::new()
        .name("eth0".into())
        .address(pod_mac.to_vec())
        .setns_by_fd(ns_file.as_raw_fd())
        .build();
    node.link()
        .add(
            LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
                .name(host.clone())
                .address(NODE_END_MAC.to_vec())
                .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
                .up()
                .build(),
        )
        .execute()
        .await
        .map_err(setup_err("creating the pod's veth"))?;
    drop(ns_file);
    // Strict reverse-path filtering on the node end (as Calico sets it on
    // workload interfaces): the node drops what a pod sends from an address
    // that is not routed back through its own veth, so no pod can pass as
    // another (and past NetworkPolicy that trusts source addresses) by
    // forging its source.
    let rp_filter = format!("/proc/sys/net/ipv4/conf/{host}/rp_filter");
    std::fs::write(&rp_filter, "1").map_err(Error::io(Path::new(&rp_filter)))?;
    let host_index = index_of(&node, &host)
        .await?
        .ok_or_else(|| Error::Setup(format!("the veth end {host} vanished")))?;
    node.route()
        .add(
            RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(ip, 32)
                .output_interface(host_index)
                .pref_source(node_address)
                .scope(RouteScope::Link)
                .build(),
        )
        .replace()
        .execute()
        .await
        .map_err(setup_err("routing the pod's address to its veth"))?;
    // The pod's MAC pinned on the node end too: the node's first packet to a
    // new pod (the activator's, say) never waits on ARP, whose retry after
    // a lost request is a whole second.
    node.neighbours()
        .add(host_index, IpAddr::V4(ip))
        .link_layer_address(&pod_mac)
        .state(NeighbourState::Permanent)
        .replace()
        .execute()
        .await
        .map_err(setup_err("pinning the pod's MAC on the node"))?;

    let pod = connect_in(netns)?;
    let lo = index_of(&pod, "lo")
        .await?
        .ok_or_else(|| Error::Setup("the pod's namespace has no loopback".into()))?;
    pod.link()
        .set(LinkUnspec::new_with_index(lo).up().build())
        .execute()
        .await
        .map_err(setup_err("bringing the pod's loopback up"))?;
    let eth = index_of(&pod, "eth0")
        .await?
        .ok_or_else(|| Error::Setup("eth0 did not arrive in the pod".into()))?;
    pod.address()
        .add(eth, IpAddr::V4(ip), 32)
        .execute()
        .await
        .map_err(setup_err("addressing the pod's eth0"))?;
    pod.link()
        .set(LinkUnspec::new_with_index(eth).up().build())
        .execute()
        .await
        .map_err(setup_err("bringing the pod's eth0 up"))?;
    pod.neighbours()
        .add(eth, IpAddr::V4(NEXT_HOP))
        .link_layer_address(&NODE_END_MAC)
        .state(NeighbourState::Permanent)
        .replace()
        .execute()
        .await
        .map_err(setup_err("pinning the next hop's MAC"))?;
    pod.route()
        .add(
            RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(NEXT_HOP, 32)
                .output_interface(eth)
                .scope(RouteScope::Link)
                .build(),
        )
        .execute()
        .await
        .map_err(setup_err("routing the pod's next hop"))?;
    pod.route()
        .add(
            RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
                .gateway(NEXT_HOP)
                .output_interface(eth)
                .build(),
        )
        .execute()
        .await
        .map_err(setup_err("routing the pod through the node"))?;
    Ok(())
}

/// Addresses of the node's pod CIDR, one file per address in use (named
/// by the address, holding the pod's id), created exclusively so two pods
/// can never get the same one.
#[derive(Debug)]
pub(crate) struct Ipam {
    dir: PathBuf,
    network: Ipv4Addr,
    prefix: u8,
    /// The directory's allocations, read once when the node starts and kept
    /// in step with it: a pod's start looks its address up here instead of
    /// reading every allocation file (which made each start cost a file
    /// read per pod on the node).
    held: std::sync::Mutex<Held>,
}

/// Allocations by owner, and the addresses taken (as offsets in the CIDR).
#[derive(Debug, Default)]
struct Held {
    by_owner: std::collections::HashMap<String, Ipv4Addr>,
    taken: std::collections::BTreeSet<u32>,
}

impl Ipam {
    pub fn new(dir: PathBuf, cidr: &str) -> Result<Self, Error> {
        let (net, prefix) = cidr
            .split_once('/')
            .and_then(|(n, p)| Some((n.parse::<Ipv4Addr>().ok()?, p.parse::<u8>().ok()?)))
            .filter(|(_, p)| (8..=30).contains(p))
            .ok_or_else(|| Error::Setup(format!("{cidr:?} is not an IPv4 pod CIDR")))?;
        std::fs::create_dir_all(&dir).map_err(Error::io(&dir))?;
        let mask = u32::MAX << (32 - prefix);
        let network = Ipv4Addr::from(u32::from(net) & mask);
        let mut held = Held::default();
        for entry in std::fs::read_dir(&dir).map_err(Error::io(&dir))?.flatten() {
            let Some(ip) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<Ipv4Addr>().ok())
            else {
                continue;
            };
            let Ok(owner) = std::fs::read_to_string(entry.path()) else {
                continue;
            };
            held.taken
                .insert(u32::from(ip).wrapping_sub(u32::from(network)));
            held.by_owner.insert(owner, ip);
        }
        Ok(Self {
            dir,
            network,
            prefix,
            held: std::sync::Mutex::new(held),
        })
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// The pod CIDR's network address.
    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    /// The node's own address in the CIDR: the first host, never a pod's.
    pub fn node_address(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    /// The address `id` holds, or the lowest free one taken for it (its
    /// file written before it is handed out, so it survives a crash).
    pub fn allocate(&self, id: &str) -> Result<Ipv4Addr, Error> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(ip) = held.by_owner.get(id) {
            return Ok(*ip);
        }
        let size = 1u32 << (32 - self.prefix);
        // From the second host (the first is the node's) to the last before
        // broadcast.
        for offset in 2..size - 1 {
            if held.taken.contains(&offset) {
                continue;
            }
            let ip = Ipv4Addr::from(u32::from(self.network) + offset);
            let path = self.dir.join(ip.to_string());
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    use std::io::Write;
                    f.write_all(id.as_bytes()).map_err(Error::io(&path))?;
                    held.taken.insert(offset);
                    held.by_owner.insert(id.to_owned(), ip);
                    return Ok(ip);
                }
                // Taken behind our back (a file put there by hand): skip it.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    held.taken.insert(offset);
                }
                Err(e) => return Err(Error::io(&path)(e)),
            }
        }
        Err(Error::Setup(format!(
            "no free address left in {}/{}",
            self.network, self.prefix
        )))
    }

    /// Gives back what `id` holds.
    pub fn release(&self, id: &str) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(ip) = held.by_owner.remove(id) {
            let _ = std::fs::remove_file(self.dir.join(ip.to_string()));
            held.taken
                .remove(&u32::from(ip).wrapping_sub(u32::from(self.network)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_unique_kept_per_pod_and_given_back() {
        let dir = tempfile::tempdir().unwrap();
        let ipam = Ipam::new(dir.path().join("ipam"), "10.244.3.0/24").unwrap();
        assert_eq!(ipam.node_address(), Ipv4Addr::new(10, 244, 3, 1));
        let a = ipam.allocate("pod-a").unwrap();
        let b = ipam.allocate("pod-b").unwrap();
        assert_eq!(a, Ipv4Addr::new(10, 244, 3, 2));
        assert_eq!(b, Ipv4Addr::new(10, 244, 3, 3));
        assert_eq!(ipam.allocate("pod-a").unwrap(), a, "asked again: the same");
        ipam.release("pod-a");
        assert_eq!(ipam.allocate("pod-c").unwrap(), a, "given back: reused");
        // A new allocator over the same directory (an agent restart) knows
        // what is held.
        let again = Ipam::new(dir.path().join("ipam"), "10.244.3.0/24").unwrap();
        assert_eq!(again.allocate("pod-b").unwrap(), b);
        let small = Ipam::new(dir.path().join("small"), "10.244.4.0/30").unwrap();
        assert_eq!(small.allocate("x").unwrap(), Ipv4Addr::new(10, 244, 4, 2));
        assert!(small.allocate("y").is_err(), "a /30 has one pod address");
        assert!(Ipam::new(dir.path().join("bad"), "10.244.0.0").is_err());
    }

    #[test]
    fn host_veth_names_fit_and_differ() {
        let a = host_veth("wk-node-1234");
        assert_eq!(a.len(), 13);
        assert!(a.starts_with("wk"));
        assert_ne!(a, host_veth("wk-node-1235"));
    }
}
