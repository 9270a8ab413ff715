//! Container probes (startup, liveness, readiness): `httpGet` and
//! `tcpSocket` against the pod's address, and `exec` in containers that
//! have processes (Linux ones), with Kubernetes' timing fields. An `exec`
//! probe cannot run against a Wasm guest (there is no process to exec
//! into), nor can a `grpc` probe yet; they are reported and ignored.

use std::net::IpAddr;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, LifecycleHandler, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wasmkube_runtime::Exec;

/// Why a probe cannot run here, when it cannot.
pub(crate) fn unsupported(probe: &Probe, can_exec: bool) -> Option<&'static str> {
    if probe.exec.is_some() && !can_exec {
        Some("exec probes are not supported for Wasm containers")
    } else if probe.grpc.is_some() {
        Some("grpc probes are not supported")
    } else if probe.http_get.is_none() && probe.tcp_socket.is_none() && probe.exec.is_none() {
        Some("the probe has no handler")
    } else {
        None
    }
}

/// Timing of a probe, with Kubernetes' defaults.
pub(crate) struct Timing {
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

impl Timing {
    pub fn of(p: &Probe) -> Self {
        let secs =
            |v: Option<i32>, default: i32| Duration::from_secs(v.unwrap_or(default).max(0) as u64);
        Self {
            initial_delay: secs(p.initial_delay_seconds, 0),
            period: secs(p.period_seconds, 10).max(Duration::from_secs(1)),
            timeout: secs(p.timeout_seconds, 1).max(Duration::from_secs(1)),
            success_threshold: p.success_threshold.unwrap_or(1).max(1) as u32,
            failure_threshold: p.failure_threshold.unwrap_or(3).max(1) as u32,
        }
    }
}

fn port(c: &Container, port: &IntOrString) -> Result<u16, String> {
    match port {
        IntOrString::Int(p) => u16::try_from(*p).map_err(|_| format!("invalid port {p}")),
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .map(|p| p.container_port as u16)
            .ok_or_else(|| format!("no container port named {name:?}")),
    }
}

/// What a container's probes reach.
pub(crate) struct Target {
    /// The pod's IP.
    pub ip: IpAddr,
    /// Container ports served at other (node) ports, when the pod shares
    /// the node's IP.
    pub node_ports: std::collections::HashMap<u16, u16>,
    /// Runs `exec` probes, for containers with processes.
    pub exec: Option<std::sync::Arc<dyn Exec>>,
}

/// One attempt: `Ok` on success, the failure's description otherwise.
pub(crate) async fn check(probe: &Probe, c: &Container, target: &Target) -> Result<(), String> {
    let timeout = Timing::of(probe).timeout;
    let pod_ip = target.ip;
    let port = |c: &Container, p: &IntOrString| {
        port(c, p).map(|p| target.node_ports.get(&p).copied().unwrap_or(p))
    };
    let attempt = async {
        if let (Some(e), Some(exec)) = (&probe.exec, target.exec.as_deref()) {
            exec_probe(exec, e.command.as_deref().unwrap_or_default()).await
        } else if let Some(h) = &probe.http_get {
            let port = port(c, &h.port)?;
            let host: IpAddr = h
                .host
                .as_deref()
                .and_then(|h| h.parse().ok())
                .unwrap_or(pod_ip);
            let path = h.path.as_deref().unwrap_or("/");
            let mut stream = tokio::net::TcpStream::connect((host, port))
                .await
                .map_err(|e| format!("Get \"http://{host}:{port}{path}\": {e}"))?;
            let mut request = format!(
                "GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\nUser-Agent: kube-probe/1.33\r\nAccept: */*\r\n"
            );
            for header in h.http_headers.iter().flatten() {
                request.push_str(&format!("{}: {}\r\n", header.name, header.value));
            }
            request.push_str("\r\n");
            stream
                .write_all(request.as_bytes())
                .await
                .map_err(|e| e.to_string())?;
            let mut head = vec![0u8; 12];
            stream
                .read_exact(&mut head)
                .await
                .map_err(|e| format!("Get \"http://{host}:{port}{path}\": {e}"))?;
            let status: u16 = std::str::from_utf8(&head[9..12])
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or("malformed HTTP response")?;
            if (200..400).contains(&status) {
                Ok(())
            } else {
                Err(format!("HTTP probe failed with statuscode: {status}"))
            }
        } else if let Some(t) = &probe.tcp_socket {
            let port = port(c, &t.port)?;
            let host: IpAddr = t
                .host
                .as_deref()
                .and_then(|h| h.parse().ok())
                .unwrap_or(pod_ip);
            tokio::net::TcpStream::connect((host, port))
                .await
                .map(drop)
                .map_err(|e| format!("dial tcp {host}:{port}: {e}"))
        } else {
            Err("the probe has no handler".to_owned())
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(format!("probe timed out after {timeout:?}")),
    }
}

/// Runs a lifecycle hook (`preStop`, `postStart`) to its end: `exec` in
/// containers with processes, `httpGet` and (deprecated) `tcpSocket`
/// against the pod as a probe would, `sleep` on the node. The caller bounds
/// it by the grace period.
pub(crate) async fn hook(
    handler: &LifecycleHandler,
    c: &Container,
    target: &Target,
) -> Result<(), String> {
    if let Some(sleep) = &handler.sleep {
        tokio::time::sleep(Duration::from_secs(sleep.seconds.max(0) as u64)).await;
        return Ok(());
    }
    if handler.exec.is_some() && target.exec.is_none() {
        return Err("exec hooks are not supported for Wasm containers".into());
    }
    // A hook is a probe without a timeout of its own.
    let as_probe = Probe {
        exec: handler.exec.clone(),
        http_get: handler.http_get.clone(),
        tcp_socket: handler.tcp_socket.clone(),
        timeout_seconds: Some(i32::MAX),
        ..Default::default()
    };
    check(&as_probe, c, target).await
}

/// Runs the probe's command in the container: success is exit code 0;
/// a failure says what the command printed, as the kubelet's does. The
/// process is killed when the probe's timeout drops this future.
async fn exec_probe(exec: &dyn Exec, command: &[String]) -> Result<(), String> {
    use futures::AsyncReadExt as _;
    let process = exec.exec(command, None).await.map_err(|e| e.to_string())?;
    drop(process.stdin);
    let mut output = Vec::new();
    let mut errors = Vec::new();
    let mut stderr = process.stderr;
    let (read_out, read_err) = tokio::join!(
        async {
            let mut stdout = process.stdout;
            stdout.read_to_end(&mut output).await
        },
        async {
            match stderr.as_mut() {
                Some(e) => e.read_to_end(&mut errors).await,
                None => Ok(0),
            }
        }
    );
    let code = process.exit.await.map_err(|e| e.to_string())?;
    drop((read_out, read_err));
    if code == 0 {
        return Ok(());
    }
    output.extend_from_slice(&errors);
    let text = String::from_utf8_lossy(&output).trim().to_owned();
    Err(if text.is_empty() {
        format!("command {command:?} exited with {code}")
    } else {
        text
    })
}

/// Runs a probe every period after its initial delay, handing each
/// outcome, with the consecutive successes and failures so far, to
/// `decide`; returns what `decide` first returns.
pub(crate) async fn run<T>(
    probe: &Probe,
    c: &Container,
    target: &Target,
    mut decide: impl FnMut(Result<(), String>, u32, u32, &Timing) -> Option<T>,
) -> T {
    let t = Timing::of(probe);
    tokio::time::sleep(t.initial_delay).await;
    let (mut successes, mut failures) = (0, 0);
    loop {
        let result = check(probe, c, target).await;
        if result.is_ok() {
            (successes, failures) = (successes + 1, 0);
        } else {
            (successes, failures) = (0, failures + 1);
        }
        if let Some(done) = decide(result, successes, failures, &t) {
            return done;
        }
        tokio::time::sleep(t.period).await;
    }
}
