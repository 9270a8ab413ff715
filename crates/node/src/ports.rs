//! Node ports for pods without a network of their own.
//!
//! When the node gives pods no network namespaces (the agent is not root,
//! the CNI plugins are missing, `--no-pod-network`), every pod shares the
//! node's IP, so two pods serving on container port 8080 would collide. A
//! Wasm container's listeners are opened by the agent, so each of its
//! container ports is served at a node port of its own instead (its
//! `hostPort` when it asks for one, otherwise one from the node-port
//! range), kept for the pod's life across restarts and reported in the
//! pod's status.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::ops::RangeInclusive;

/// Which node ports the node's pods hold.
#[derive(Debug)]
pub(crate) struct NodePorts {
    range: RangeInclusive<u16>,
    used: BTreeSet<u16>,
    /// Where the next search starts, so a freed port is not reused at once.
    next: u16,
}

/// One container port served at a node port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Mapping {
    pub container: String,
    pub container_port: u16,
    pub node_port: u16,
}

fn listen(address: IpAddr, port: u16) -> std::io::Result<TcpListener> {
    let listener = TcpListener::bind(SocketAddr::new(address, port))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

impl NodePorts {
    pub fn new(range: RangeInclusive<u16>) -> Self {
        let next = *range.start();
        Self {
            range,
            used: BTreeSet::new(),
            next,
        }
    }

    /// Takes `wanted` (a container's `hostPort`) or the next free port of
    /// the range that can be bound on `address`, and listens on it.
    pub fn take(
        &mut self,
        address: IpAddr,
        wanted: Option<u16>,
    ) -> std::io::Result<(u16, TcpListener)> {
        if let Some(port) = wanted {
            if self.used.contains(&port) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    format!("host port {port} is taken by another pod"),
                ));
            }
            let listener = listen(address, port)?;
            self.used.insert(port);
            return Ok((port, listener));
        }
        let (start, end) = (*self.range.start(), *self.range.end());
        let count = usize::from(end - start) + 1;
        let candidates = (self.next..=end).chain(start..self.next).take(count);
        for port in candidates {
            if self.used.contains(&port) {
                continue;
            }
            // Something outside the agent may hold it: then the next one.
            if let Ok(listener) = listen(address, port) {
                self.used.insert(port);
                self.next = if port == end { start } else { port + 1 };
                return Ok((port, listener));
            }
        }
        Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!("no free node port in {start}-{end}"),
        ))
    }

    /// Listens again on a port the pod already holds (a restart).
    pub fn reopen(&self, address: IpAddr, port: u16) -> std::io::Result<TcpListener> {
        listen(address, port)
    }

    /// Whether a pod holds `port`.
    pub fn holds(&self, port: u16) -> bool {
        self.used.contains(&port)
    }

    pub fn release(&mut self, port: u16) {
        self.used.remove(&port);
    }
}

/// The pod status condition that says the pod shares the node's IP and
/// where its ports are.
pub(crate) const CONDITION: &str = "wasmkube.dev/NodePorts";

/// `hello:8080->40000, hello:9090->40001`: the condition's message tail,
/// also what tools parse.
pub(crate) fn describe(mappings: &[Mapping]) -> String {
    mappings
        .iter()
        .map(|m| format!("{}:{}->{}", m.container, m.container_port, m.node_port))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_come_from_the_range_in_turn_and_skip_held_ones() {
        // An address of its own, and a port something else holds (skipped)
        // followed by two free ones.
        let lo = IpAddr::from([127, 0, 0, 2]);
        let (outside, held) = (0..100)
            .find_map(|_| {
                let outside = TcpListener::bind((lo, 0)).unwrap();
                let held = outside.local_addr().unwrap().port();
                let free = |p: u16| TcpListener::bind((lo, p)).is_ok();
                (held < u16::MAX - 2 && free(held + 1) && free(held + 2)).then_some((outside, held))
            })
            .expect("two free ports after a held one");
        let mut ports = NodePorts::new(held..=held.saturating_add(2));
        let (a, _la) = ports.take(lo, None).unwrap();
        let (b, _lb) = ports.take(lo, None).unwrap();
        assert_ne!(a, held);
        assert_ne!(b, held);
        assert_ne!(a, b);
        // The range is used up (its first port is held outside).
        assert!(ports.take(lo, None).is_err());
        // A released port can be taken again; a host port is taken as asked
        // unless a pod holds it.
        drop(_la);
        ports.release(a);
        let (c, _lc) = ports.take(lo, None).unwrap();
        assert_eq!(c, a);
        let err = ports.take(lo, Some(b)).unwrap_err();
        assert!(err.to_string().contains("taken by another pod"), "{err}");
        drop(outside);
        assert_eq!(
            describe(&[Mapping {
                container: "hello".into(),
                container_port: 8080,
                node_port: 40000
            }]),
            "hello:8080->40000"
        );
    }
}
