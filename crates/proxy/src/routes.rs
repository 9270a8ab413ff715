//! The proxy's routes: `unreachable` for the service range and the
//! cluster's pod range, `local` for each programmed cluster IP. All carry
//! the proxy's own route protocol number, so a restarted proxy finds and
//! replaces whatever an earlier one left, and touches nothing else.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::process::Stdio;

use tokio::io::AsyncWriteExt;

use crate::{Error, NodeNetwork};

/// The `proto` of the proxy's routes (any number the kernel does not use
/// itself; iproute2 shows it as a number).
const PROTO: &str = "119";

pub(crate) struct Routes {
    network: NodeNetwork,
}

impl Routes {
    pub fn new(network: NodeNetwork) -> Self {
        Self { network }
    }

    /// Drops what an earlier proxy left and fences the ranges off.
    pub async fn start(&self) -> Result<(), Error> {
        let mut lines = vec![format!("route flush table local proto {PROTO}")];
        let ranges = [Some(self.network.service_cidr), self.network.cluster_cidr];
        for cidr in ranges.into_iter().flatten() {
            lines.push(format!("route replace unreachable {cidr} proto {PROTO}"));
        }
        batch(&lines, false).await
    }

    /// Routes the cluster IPs in `wanted` and no others of `routed`.
    pub async fn sync(
        &self,
        routed: &BTreeSet<Ipv4Addr>,
        wanted: &BTreeSet<Ipv4Addr>,
    ) -> Result<(), Error> {
        let added: Vec<String> = wanted
            .difference(routed)
            .map(|ip| {
                format!("route replace local {ip}/32 dev lo table local proto {PROTO} scope host src {ip}")
            })
            .collect();
        if !added.is_empty() {
            batch(&added, false).await?;
        }
        let removed: Vec<String> = routed
            .difference(wanted)
            .map(|ip| format!("route del local {ip}/32 dev lo table local proto {PROTO}"))
            .collect();
        // A route already gone is what was wanted.
        if !removed.is_empty()
            && let Err(e) = batch(&removed, true).await
        {
            tracing::debug!(error = %e, "removing cluster IP routes");
        }
        Ok(())
    }

    /// Removes every route of the proxy's (a clean stop).
    pub async fn stop(&self) {
        let lines = [
            format!("route flush table local proto {PROTO}"),
            format!("route flush table main proto {PROTO}"),
        ];
        if let Err(e) = batch(&lines, true).await {
            tracing::warn!(error = %e, "removing the service proxy's routes");
        }
    }
}

/// Runs `ip -batch -` (one process however many routes change).
async fn batch(lines: &[String], force: bool) -> Result<(), Error> {
    let mut command = tokio::process::Command::new("ip");
    if force {
        command.arg("-force");
    }
    let mut child = command
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| Error::Spawn {
            command: "ip",
            source,
        })?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let script = lines.join("\n") + "\n";
    let _ = stdin.write_all(script.as_bytes()).await;
    drop(stdin);
    let out = child
        .wait_with_output()
        .await
        .map_err(|source| Error::Spawn {
            command: "ip",
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::Routes(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ))
    }
}
