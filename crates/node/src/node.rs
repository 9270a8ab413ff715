//! The Node object: registration, the `wasmtime` RuntimeClass, the Lease
//! heartbeat and the periodic node status (conditions, images).

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Secret};
use k8s_openapi::api::node::v1::RuntimeClass;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::WatchStreamExt;
use serde_json::{Value, json};

use crate::{Ctx, Error};

const LEASE_NAMESPACE: &str = "kube-node-lease";
/// The namespace and name of the token the API server authenticates with.
const TOKEN_NAMESPACE: &str = "kube-system";
const TOKEN_SECRET: &str = "wasmkube-node-proxy";
/// The version the node reports (kubectl prints it as VERSION).
pub const AGENT_VERSION: &str = "v1.33.0-wasmkube";

fn api_err(context: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
    let context = context.into();
    move |source| Error::Api { context, source }
}

/// Reads the node-proxy token the API server created, waiting briefly for
/// a server that is still starting.
pub(crate) async fn read_proxy_token(client: &kube::Client) -> Result<String, Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), TOKEN_NAMESPACE);
    let mut attempt = 0;
    loop {
        match api.get(TOKEN_SECRET).await {
            Ok(secret) => {
                let token = secret
                    .data
                    .and_then(|d| d.get("token").cloned())
                    .map(|b| String::from_utf8_lossy(&b.0).into_owned())
                    .unwrap_or_default();
                return Ok(token);
            }
            Err(e) if attempt < 20 => {
                tracing::debug!(error = %e, "waiting for the node-proxy token");
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => {
                return Err(api_err(format!("reading {TOKEN_NAMESPACE}/{TOKEN_SECRET}"))(e));
            }
        }
    }
}

/// Creates a RuntimeClass named after each of the node's handlers
/// (`wasmtime`, `runc`) unless it exists. The API server makes both at
/// start; a node may not create cluster-scoped objects under RBAC, so a
/// refusal is only reported.
pub(crate) async fn ensure_runtime_classes(ctx: &Ctx) -> Result<(), Error> {
    let api: Api<RuntimeClass> = Api::all(ctx.client.clone());
    for runtime in &ctx.runtimes {
        let handler = runtime.handler().to_owned();
        if let Ok(Some(_)) = api.get_opt(&handler).await {
            continue;
        }
        let rc: RuntimeClass = serde_json::from_value(json!({
            "apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass",
            "metadata": {"name": handler}, "handler": handler,
        }))
        .expect("a RuntimeClass deserializes");
        match api.create(&PostParams::default(), &rc).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(kube::Error::Api(e)) if e.code == 403 => {
                tracing::warn!(%handler, reason = %e.message, "no RuntimeClass for this handler and this node may not create one");
            }
            Err(e) => return Err(api_err(format!("creating the {handler} RuntimeClass"))(e)),
        }
    }
    Ok(())
}

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// `MemTotal` and `MemAvailable` from /proc/meminfo, in bytes.
pub(crate) fn meminfo() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map(|kib| kib * 1024)
            .unwrap_or(0)
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

/// Whole CPUs of this machine.
pub(crate) fn allocatable_cpu() -> u64 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u64)
}

/// Memory of this machine, in bytes.
pub(crate) fn allocatable_memory() -> u64 {
    meminfo().0
}

fn os_image() -> String {
    std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|v| v.trim_matches('"').to_owned())
        })
        .unwrap_or_else(|| "Linux".into())
}

fn arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

fn capacity(ctx: &Ctx) -> Value {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (mem_total, _) = meminfo();
    let disk = fs4::total_space(&ctx.config.data_dir).unwrap_or(0);
    json!({
        "cpu": ctx.config.cpu.clone().unwrap_or_else(|| cpus.to_string()),
        "memory": ctx.config.memory.clone().unwrap_or_else(|| format!("{}Ki", mem_total / 1024)),
        "ephemeral-storage": format!("{}Ki", disk / 1024),
        "pods": ctx.config.max_pods.to_string(),
    })
}

/// The node conditions, judged from the machine now.
fn conditions(ctx: &Ctx) -> Value {
    let now = Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let (total, available) = meminfo();
    let memory_pressure = total > 0 && available < total / 20;
    let disk_free = fs4::available_space(&ctx.config.data_dir).unwrap_or(u64::MAX);
    let disk_total = fs4::total_space(&ctx.config.data_dir).unwrap_or(0);
    let disk_pressure = disk_total > 0 && disk_free < disk_total / 20;
    let cond = |t: &str, on: bool, yes: (&str, &str), no: (&str, &str)| {
        let (reason, message) = if on { yes } else { no };
        json!({"type": t, "status": if on { "True" } else { "False" }, "reason": reason,
               "message": message, "lastHeartbeatTime": now, "lastTransitionTime": now})
    };
    json!([
        cond(
            "MemoryPressure",
            memory_pressure,
            (
                "KubeletHasInsufficientMemory",
                "agent has insufficient memory available"
            ),
            (
                "KubeletHasSufficientMemory",
                "agent has sufficient memory available"
            )
        ),
        cond(
            "DiskPressure",
            disk_pressure,
            ("KubeletHasDiskPressure", "agent has disk pressure"),
            ("KubeletHasNoDiskPressure", "agent has no disk pressure")
        ),
        cond(
            "PIDPressure",
            false,
            ("", ""),
            (
                "KubeletHasSufficientPID",
                "agent has sufficient PID available"
            )
        ),
        cond(
            "Ready",
            true,
            ("KubeletReady", "agent is posting ready status"),
            ("", "")
        ),
    ])
}

fn images(ctx: &Ctx) -> Value {
    ctx.images
        .images()
        .into_iter()
        .map(|i| json!({"names": i.names, "sizeBytes": i.size}))
        .collect()
}

fn status(ctx: &Ctx) -> Value {
    let capacity = capacity(ctx);
    let name = &ctx.config.name;
    json!({
        "capacity": capacity,
        "allocatable": capacity,
        "conditions": conditions(ctx),
        "addresses": [
            {"type": "InternalIP", "address": ctx.config.address.to_string()},
            {"type": "Hostname", "address": name},
        ],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": ctx.port}},
        "runtimeHandlers": ctx.runtimes.iter().map(|r| json!({"name": r.handler(), "features": {"recursiveReadOnlyMounts": false, "userNamespaces": false}})).collect::<Vec<_>>(),
        "images": images(ctx),
        "nodeInfo": {
            "kubeletVersion": AGENT_VERSION,
            "kubeProxyVersion": "",
            "containerRuntimeVersion": format!("{}://{}", wasmkube_runtime_wasm::HANDLER, wasmkube_runtime_wasm::WASMTIME_VERSION),
            "osImage": os_image(),
            "kernelVersion": read_trimmed("/proc/sys/kernel/osrelease").unwrap_or_default(),
            "operatingSystem": "linux",
            "architecture": arch(),
            "machineID": read_trimmed("/etc/machine-id").unwrap_or_else(|| name.clone()),
            "systemUUID": read_trimmed("/sys/class/dmi/id/product_uuid").unwrap_or_else(|| name.clone()),
            "bootID": read_trimmed("/proc/sys/kernel/random/boot_id").unwrap_or_default(),
        },
    })
}

/// Creates the Node, or takes over an existing one by updating its status;
/// then takes the Lease.
pub(crate) async fn register(ctx: &Ctx) -> Result<(), Error> {
    let api: Api<Node> = Api::all(ctx.client.clone());
    let name = &ctx.config.name;
    let mut labels = ctx.config.labels.clone();
    for (k, v) in [
        ("kubernetes.io/hostname", name.as_str()),
        ("kubernetes.io/os", "linux"),
        ("kubernetes.io/arch", arch()),
    ] {
        labels.insert(k.into(), v.into());
    }
    // Where this node keeps the local-path volumes provisioned on it.
    let annotations = json!({
        wasmkube_api::storage::LOCAL_PATH_ROOT: ctx.config.local_path_root().to_string_lossy(),
    });
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": labels, "annotations": annotations},
        "status": status(ctx),
    }))
    .expect("a node deserializes");
    match api.create(&PostParams::default(), &node).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {
            api.patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": labels, "annotations": annotations}})),
            )
            .await
            .map_err(api_err(format!("updating node {name}")))?;
            patch_status(ctx).await?;
        }
        Err(e) => return Err(api_err(format!("registering node {name}"))(e)),
    }
    renew_lease(ctx).await;
    Ok(())
}

async fn patch_status(ctx: &Ctx) -> Result<(), Error> {
    let api: Api<Node> = Api::all(ctx.client.clone());
    api.patch_status(
        &ctx.config.name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": status(ctx)})),
    )
    .await
    .map_err(api_err("updating the node status"))?;
    Ok(())
}

/// Renews the Lease (a small merge patch), taking it when it is missing.
async fn renew_lease(ctx: &Ctx) {
    let api: Api<Lease> = Api::namespaced(ctx.client.clone(), LEASE_NAMESPACE);
    let name = &ctx.config.name;
    let now = Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let patch = Patch::Merge(json!({"spec": {"renewTime": now, "holderIdentity": name}}));
    match api.patch(name, &PatchParams::default(), &patch).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => {
            let lease = json!({
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": name, "namespace": LEASE_NAMESPACE},
                "spec": {"holderIdentity": name, "leaseDurationSeconds": ctx.config.lease_duration_seconds, "renewTime": now},
            });
            let lease: Lease = serde_json::from_value(lease).expect("a lease deserializes");
            if let Err(e) = api.create(&PostParams::default(), &lease).await {
                tracing::warn!(error = %e, "could not take the node lease");
            }
        }
        Err(e) => tracing::warn!(error = %e, "lease renewal failed"),
    }
}

/// Renews the Lease every heartbeat interval. It runs on its own task, so
/// busy or runaway pods cannot delay it.
pub(crate) async fn heartbeat(ctx: Arc<Ctx>) {
    loop {
        tokio::time::sleep(ctx.config.heartbeat_interval).await;
        renew_lease(&ctx).await;
    }
}

/// Posts the node status when something changed (an image was pulled) and
/// at least once a minute.
pub(crate) async fn status_loop(ctx: Arc<Ctx>) {
    loop {
        let _ = tokio::time::timeout(Duration::from_secs(60), ctx.node_changed.notified()).await;
        // Coalesce bursts (many pods pulling at once).
        tokio::time::sleep(Duration::from_millis(500)).await;
        if let Err(e) = patch_status(&ctx).await {
            tracing::warn!(error = %e, "could not update the node status");
        }
    }
}

/// Waits (briefly) for the control plane to give the node its pod CIDR,
/// then sets up the pod network on it. Without root, the CNI plugins or a
/// CIDR, pods share the node's network, and the log says why.
pub(crate) async fn set_up_pod_network(ctx: &Ctx) {
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let name = ctx.config.name.clone();
    let wait = async {
        let mut stream = kube::runtime::watcher(
            nodes,
            kube::runtime::watcher::Config::default().fields(&format!("metadata.name={name}")),
        )
        .applied_objects()
        .boxed();
        while let Ok(Some(node)) = stream.try_next().await {
            if let Some(cidr) = node.spec.and_then(|s| s.pod_cidr) {
                return Some(cidr);
            }
        }
        None
    };
    let Ok(Some(cidr)) = tokio::time::timeout(POD_CIDR_WAIT, wait).await else {
        tracing::warn!(
            "the node got no pod CIDR from the control plane; pods share the node's network"
        );
        return;
    };
    let config = wasmkube_runtime_linux::net::NetConfig {
        pod_cidr: cidr.clone(),
        bridge: BRIDGE.into(),
        cni_bin: ctx.config.cni_bin.clone(),
        cni_conf_dir: ctx.config.cni_conf_dir.clone(),
        state_dir: ctx.config.data_dir.join("cni"),
        prefix: format!("wk-{name}-"),
    };
    let network = match wasmkube_runtime_linux::net::PodNetwork::new(config) {
        Ok(network) => network.prepare().await.map(|()| network),
        Err(e) => Err(e),
    };
    match network {
        Ok(network) => {
            tracing::info!(pod_cidr = %cidr, setup = network.method(), "pods get their own network namespaces and IPs");
            let _ = ctx.network.set(network);
        }
        Err(e) => {
            tracing::warn!(error = %e, "pods share the node's network");
        }
    }
}

/// How long the agent waits for its pod CIDR at start.
const POD_CIDR_WAIT: Duration = Duration::from_secs(30);
/// The node's pod bridge, when the CNI plugins set pods up.
const BRIDGE: &str = "wk0";

/// Keeps a route to every other node's pod CIDR through that node's
/// InternalIP, so pods reach pods on other nodes (flannel's host-gw mode).
pub(crate) async fn route_to_other_nodes(ctx: Arc<Ctx>) {
    let Some(network) = ctx.network.get() else {
        return;
    };
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let mut stream = kube::runtime::watcher(nodes, Default::default())
        .applied_objects()
        .default_backoff()
        .boxed();
    let mut routed: std::collections::HashMap<String, (String, std::net::IpAddr)> =
        Default::default();
    while let Some(node) = stream.next().await {
        let Ok(node) = node else { continue };
        let name = node.metadata.name.clone().unwrap_or_default();
        if name == ctx.config.name {
            continue;
        }
        let cidr = node.spec.as_ref().and_then(|s| s.pod_cidr.clone());
        let ip = node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .and_then(|a| a.iter().find(|a| a.type_ == "InternalIP"))
            .and_then(|a| a.address.parse().ok());
        let (Some(cidr), Some(ip)) = (cidr, ip) else {
            continue;
        };
        if routed.get(&name) == Some(&(cidr.clone(), ip)) || cidr == network.pod_cidr() {
            continue;
        }
        match network.route(&cidr, ip).await {
            Ok(()) => {
                tracing::info!(node = %name, %cidr, via = %ip, "routing to the node's pods");
                routed.insert(name, (cidr, ip));
            }
            Err(e) => tracing::debug!(node = %name, error = %e, "no route to the node's pods"),
        }
    }
}
