//! `kubectl exec` on the agent: a container's [`Exec`] spoken over the
//! Kubernetes WebSocket streaming protocol, `v5.channel.k8s.io` (and v4,
//! which lacks only the stdin half-close).
//!
//! Every binary message starts with its channel: 0 stdin, 1 stdout,
//! 2 stderr, 3 the final `Status`, 4 terminal resizes (`{"Width","Height"}`),
//! 255 a v5 control message closing the channel named by its last byte.
//! The API server proxies the upgraded connection here untouched.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures::{AsyncReadExt, AsyncWriteExt, SinkExt, StreamExt};
use serde_json::json;
use tokio::sync::mpsc;
use wasmkube_runtime::{Exec, ExecOutput};

use crate::Ctx;

pub(crate) const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
pub(crate) const ERROR: u8 = 3;
pub(crate) const RESIZE: u8 = 4;
pub(crate) const CLOSE: u8 = 255;

/// The protocols served, preferred first.
pub(crate) const PROTOCOLS: [&str; 2] = ["v5.channel.k8s.io", "v4.channel.k8s.io"];

/// How long output may still flow after the process exited (a background
/// child holding stdout open must not hold the session forever).
const DRAIN: Duration = Duration::from_secs(2);

/// What `pods/exec` asks for, from its query.
#[derive(Debug, Default, Clone)]
pub(crate) struct Options {
    pub command: Vec<String>,
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub tty: bool,
}

impl Options {
    pub fn parse(query: Option<&str>) -> Self {
        let pairs: Vec<(String, String)> = query
            .and_then(|q| serde_urlencoded::from_str(q).ok())
            .unwrap_or_default();
        let flag = |name: &str| {
            pairs
                .iter()
                .any(|(k, v)| k == name && matches!(v.as_str(), "true" | "1"))
        };
        Self {
            command: pairs
                .iter()
                .filter(|(k, _)| k == "command")
                .map(|(_, v)| v.clone())
                .collect(),
            stdin: flag("stdin"),
            stdout: flag("stdout"),
            stderr: flag("stderr"),
            tty: flag("tty"),
        }
    }
}

/// Finds the running container's [`Exec`], or why there is none.
fn exec_for(
    ctx: &Ctx,
    namespace: &str,
    pod: &str,
    container: &str,
) -> Result<Arc<dyn Exec>, (StatusCode, String)> {
    let state = ctx
        .pod_state(namespace, pod)
        .ok_or_else(|| crate::server::not_here(namespace, pod))?;
    let st = state.lock().expect("pod state");
    let refused = |message: String| (StatusCode::BAD_REQUEST, message);
    if !st.containers.iter().any(|c| c.name == container) {
        return Err(refused(format!(
            "container {container} is not valid for pod {pod}"
        )));
    }
    let run = st
        .runs
        .get(container)
        .filter(|r| r.running)
        .ok_or_else(|| {
            refused(format!(
                "container \"{container}\" in pod \"{pod}\" is not running"
            ))
        })?;
    run.exec.clone().ok_or_else(|| {
        refused(format!(
            "cannot exec in container \"{container}\" of pod \"{pod}\": it is a Wasm guest run in-process by Wasmtime, which has no processes to start commands in"
        ))
    })
}

/// `GET /exec/{namespace}/{pod}/{container}?command=...&stdin=...&tty=...`
pub(crate) async fn handle(
    State(ctx): State<Arc<Ctx>>,
    Path((namespace, pod, container)): Path<(String, String, String)>,
    RawQuery(query): RawQuery,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let options = Options::parse(query.as_deref());
    let exec = match exec_for(&ctx, &namespace, &pod, &container) {
        Ok(exec) => exec,
        Err(refusal) => return refusal.into_response(),
    };
    if options.command.is_empty() {
        return (
            StatusCode::BAD_REQUEST,
            "you must specify at least one command for the container",
        )
            .into_response();
    }
    let Ok(upgrade) = upgrade else {
        return (
            StatusCode::BAD_REQUEST,
            "exec is served over the WebSocket streaming protocol (v5.channel.k8s.io, kubectl 1.30 or newer); SPDY is not supported",
        )
            .into_response();
    };
    tracing::info!(%namespace, %pod, %container, command = ?options.command, tty = options.tty, "exec");
    upgrade
        .protocols(PROTOCOLS)
        .on_upgrade(move |socket| session(socket, exec, options))
}

pub(crate) fn frame(channel: u8, data: &[u8]) -> Message {
    let mut v = Vec::with_capacity(data.len() + 1);
    v.push(channel);
    v.extend_from_slice(data);
    Message::Binary(v.into())
}

/// The final `Status` on the error channel, as the kubelet writes it.
pub(crate) fn status(command: &[String], result: &Result<i32, String>) -> serde_json::Value {
    match result {
        Ok(0) => json!({"metadata": {}, "status": "Success"}),
        Ok(code) => json!({
            "metadata": {}, "status": "Failure",
            "message": format!("command terminated with non-zero exit code: error executing command {command:?}, exit code {code}"),
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
        }),
        Err(message) => json!({
            "metadata": {}, "status": "Failure", "message": message,
            "reason": "InternalError", "code": 500,
        }),
    }
}

/// Copies one output stream into channel-tagged messages, or drains it
/// when the client did not ask for it.
async fn pump(channel: u8, mut from: ExecOutput, to: Option<mpsc::Sender<Message>>) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if let Some(to) = &to
                    && to.send(frame(channel, &buf[..n])).await.is_err()
                {
                    return;
                }
            }
        }
    }
}

/// A resize message's size: (columns, rows).
pub(crate) fn size(payload: &[u8]) -> Option<(u16, u16)> {
    let v: serde_json::Value = serde_json::from_slice(payload).ok()?;
    Some((
        u16::try_from(v["Width"].as_u64()?).ok()?,
        u16::try_from(v["Height"].as_u64()?).ok()?,
    ))
}

/// Ends the session with a normal closure (1000): clients read any other
/// ending, even a close without a code, as an error.
pub(crate) async fn close(sink: &mut futures::stream::SplitSink<WebSocket, Message>) {
    let frame = axum::extract::ws::CloseFrame {
        code: axum::extract::ws::close_code::NORMAL,
        reason: "".into(),
    };
    let _ = sink.send(Message::Close(Some(frame))).await;
    let _ = sink.close().await;
}

async fn session(socket: WebSocket, exec: Arc<dyn Exec>, options: Options) {
    let (mut sink, mut stream) = socket.split();
    // With a terminal the client sends its size first: start on it, so the
    // process never sees a zero-sized terminal.
    let mut early = Vec::new();
    let mut initial = (0, 0);
    if options.tty {
        let first = tokio::time::timeout(Duration::from_secs(1), stream.next()).await;
        if let Ok(Some(Ok(Message::Binary(b)))) = first {
            match b.first() {
                Some(&RESIZE) => initial = size(&b[1..]).unwrap_or_default(),
                _ => early.push(b),
            }
        }
    }
    let process = match exec
        .exec(&options.command, options.tty.then_some(initial))
        .await
    {
        Ok(p) => p,
        Err(e) => {
            let body = status(&options.command, &Err(e.to_string())).to_string();
            let _ = sink.send(frame(ERROR, body.as_bytes())).await;
            close(&mut sink).await;
            return;
        }
    };
    let (tx, mut rx) = mpsc::channel::<Message>(16);
    let mut pumps = vec![tokio::spawn(pump(
        STDOUT,
        process.stdout,
        (options.stdout || options.tty).then(|| tx.clone()),
    ))];
    if let Some(stderr) = process.stderr {
        pumps.push(tokio::spawn(pump(
            STDERR,
            stderr,
            options.stderr.then(|| tx.clone()),
        )));
    }
    drop(tx);
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if sink.send(m).await.is_err() {
                break;
            }
        }
        sink
    });
    let resize = process.resize;
    let mut stdin = options.stdin.then_some(process.stdin);
    let input = tokio::spawn(async move {
        let mut pending = early.into_iter().map(Ok::<_, axum::Error>);
        loop {
            let next = match pending.next() {
                Some(b) => b,
                None => match stream.next().await {
                    Some(Ok(Message::Binary(b))) => Ok(b),
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                    Some(Ok(_)) => continue,
                },
            };
            let Ok(b) = next else { break };
            match b.first() {
                Some(&STDIN) => {
                    if let Some(w) = stdin.as_mut()
                        && (w.write_all(&b[1..]).await.is_err() || w.flush().await.is_err())
                    {
                        stdin = None;
                    }
                }
                Some(&RESIZE) => {
                    if let Some((cols, rows)) = size(&b[1..]) {
                        resize(cols, rows);
                    }
                }
                Some(&CLOSE) if b.last() == Some(&STDIN) => {
                    if let Some(mut w) = stdin.take() {
                        let _ = w.close().await;
                    }
                }
                _ => {}
            }
        }
    });
    let result = process.exit.await.map_err(|e| e.to_string());
    for p in pumps {
        let abort = p.abort_handle();
        if tokio::time::timeout(DRAIN, p).await.is_err() {
            abort.abort();
        }
    }
    let Ok(mut sink) = writer.await else {
        input.abort();
        return;
    };
    let body = status(&options.command, &result).to_string();
    let _ = sink.send(frame(ERROR, body.as_bytes())).await;
    close(&mut sink).await;
    // Read (and drop) what the client still sends until it closes too: a
    // connection closed with input unread is reset, and a client still
    // streaming stdin (`kubectl cp` into a failed command) would lose the
    // status.
    let abort = input.abort_handle();
    if tokio::time::timeout(DRAIN, input).await.is_err() {
        abort.abort();
    }
}
