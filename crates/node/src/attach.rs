//! `kubectl attach` on the agent: a running container's output from now
//! on, over the same WebSocket streaming protocol as exec
//! (`v5.channel.k8s.io`): channel 1 stdout, 2 stderr, and a `Success`
//! status on channel 3 when the container's run ends. It reads the run's
//! log as it is written, so it works alike for a Wasm guest and a Linux
//! process. With `-i`, channel 0 goes to the container's stdin: a pipe the
//! agent keeps open for a container with `stdin: true` (a Linux process
//! reads it as its stdin, a Wasm guest as WASI stdin). With `stdinOnce`, as
//! on the kubelet, the first attach that streams stdin is the only one, and
//! the container reads end-of-file once it ends (`kubectl run -i --rm`).
//! With `-t`, a container with `tty: true` (a Linux process or a Wasm
//! guest) is attached to its terminal (the agent's, `terminal.rs`: its
//! output is the log's one stream; channel 4 resizes it), as `kubectl run
//! -it` wants.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures::{SinkExt, StreamExt};
use tokio::sync::{mpsc, watch};

use crate::Ctx;
use crate::exec::{CLOSE, ERROR, Options, PROTOCOLS, RESIZE, STDIN, close, frame, size, status};
use crate::logs;

/// `GET|POST /attach/{namespace}/{pod}/{container}?stdout=1&stderr=1`
pub(crate) async fn handle(
    State(ctx): State<Arc<Ctx>>,
    Path((namespace, pod, container)): Path<(String, String, String)>,
    RawQuery(query): RawQuery,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let options = Options::parse(query.as_deref());
    let refused = |message: String| (StatusCode::BAD_REQUEST, message).into_response();
    let Some(state) = ctx.pod_state(&namespace, &pod) else {
        return crate::server::not_here(&namespace, &pod).into_response();
    };
    let follow = {
        let st = state.lock().expect("pod state");
        if !st.containers.iter().any(|c| c.name == container) {
            return refused(format!("container {container} is not valid for pod {pod}"));
        }
        st.runs.get(&container).filter(|r| r.running).and_then(|r| {
            let live = r.live_log.clone()?;
            Some((
                logs::path(&st.dir, &container, r.restart_count),
                live,
                r.stdin.clone(),
                r.terminal.clone(),
            ))
        })
    };
    let Some((path, live, stdin, terminal)) = follow else {
        return refused(format!(
            "container \"{container}\" in pod \"{pod}\" is not running"
        ));
    };
    let terminal = match (options.tty, terminal) {
        (false, _) => None,
        (true, Some(t)) => Some(t),
        (true, None) => {
            return refused(format!(
                "cannot attach a terminal to container \"{container}\": it has none (a container gets one with tty: true; attach without -t)"
            ));
        }
    };
    let Ok(upgrade) = upgrade else {
        return refused(
            "attach is served over the WebSocket streaming protocol (v5.channel.k8s.io, kubectl 1.30 or newer); SPDY is not supported".into(),
        );
    };
    // Claimed only for a session that starts: a `stdinOnce` container
    // keeps its one attach.
    let stdin = match (options.stdin, stdin) {
        (false, _) => None,
        (true, None) => {
            return refused(format!(
                "cannot attach to the stdin of container \"{container}\": it does not set stdin: true"
            ));
        }
        (true, Some(stdin)) => match stdin.claim() {
            true => Some(stdin),
            false => {
                return refused(format!(
                    "cannot attach to the stdin of container \"{container}\": it was closed after its first attach (stdinOnce)"
                ));
            }
        },
    };
    tracing::info!(%namespace, %pod, %container, "attach");
    // The output from now on: fixed before any input can reach the
    // container, so what it answers to the session's first input (which
    // may arrive with the upgrade, typed ahead) is not skipped.
    let from = logs::end(&path);
    upgrade
        .protocols(PROTOCOLS)
        .on_upgrade(move |socket| session(socket, (path, from), live, options, stdin, terminal))
}

async fn session(
    socket: WebSocket,
    (path, from): (std::path::PathBuf, u64),
    live: watch::Receiver<u64>,
    options: Options,
    stdin: Option<Arc<Stdin>>,
    terminal: Option<wasmkube_runtime::Resize>,
) {
    // Ends the stdin of a `stdinOnce` container however the session ends.
    let _once = stdin.clone().map(CloseOnce);
    let (mut sink, mut incoming) = socket.split();
    let (tx, mut rx) = mpsc::channel(16);
    let follower = tokio::spawn(logs::follow_streams(path, from, live, tx));
    loop {
        tokio::select! {
            next = rx.recv() => match next {
                Some((channel, text)) => {
                    let wanted = if channel == 2 { options.stderr } else { options.stdout };
                    if wanted && sink.send(frame(channel, &text)).await.is_err() {
                        follower.abort();
                        return;
                    }
                }
                // The run's output ended: the container stopped.
                None => break,
            },
            message = incoming.next() => match message {
                Some(Ok(Message::Binary(b))) => match (b.first(), &stdin) {
                    (Some(&STDIN), Some(stdin)) => stdin.write(&b[1..]).await,
                    (Some(&CLOSE), Some(stdin)) if b.last() == Some(&STDIN) => stdin.end().await,
                    (Some(&RESIZE), _) => {
                        if let (Some(t), Some((cols, rows))) = (&terminal, size(&b[1..])) {
                            t.set(cols, rows);
                        }
                    }
                    _ => {}
                },
                Some(Ok(Message::Close(_)) | Err(_)) | None => {
                    // The client went away (or closed): stop following.
                    follower.abort();
                    return;
                }
                Some(Ok(_)) => {}
            }
        }
    }
    let body = status(&[], &Ok(0)).to_string();
    let _ = sink.send(frame(ERROR, body.as_bytes())).await;
    close(&mut sink).await;
}

/// The write end of a container run's stdin.
#[derive(Debug)]
pub(crate) struct Stdin {
    writer: tokio::sync::Mutex<Option<tokio::net::unix::pipe::Sender>>,
    /// `stdinOnce`: closed when the first attach with stdin ends.
    once: bool,
    /// An attach has streamed stdin.
    claimed: AtomicBool,
}

impl Stdin {
    /// A pipe for a run's stdin: the shared write end, and the read end to
    /// give the container.
    pub(crate) fn open(once: bool) -> std::io::Result<(Arc<Self>, std::fs::File)> {
        let (reader, writer) = std::io::pipe()?;
        let writer =
            tokio::net::unix::pipe::Sender::from_owned_fd(std::os::fd::OwnedFd::from(writer))?;
        let stdin = Arc::new(Self {
            writer: tokio::sync::Mutex::new(Some(writer)),
            once,
            claimed: AtomicBool::new(false),
        });
        Ok((
            stdin,
            std::fs::File::from(std::os::fd::OwnedFd::from(reader)),
        ))
    }

    /// Whether an attach may stream stdin: always, unless `stdinOnce` and
    /// an attach already has.
    fn claim(&self) -> bool {
        let first = !self.claimed.swap(true, Ordering::SeqCst);
        first || !self.once
    }

    /// Writes `bytes` to the container's stdin (waiting while the pipe is
    /// full; dropped once the container no longer reads it).
    async fn write(&self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        let mut writer = self.writer.lock().await;
        if let Some(w) = writer.as_mut()
            && w.write_all(bytes).await.is_err()
        {
            *writer = None;
        }
    }

    /// The client ended its stdin: a `stdinOnce` container reads
    /// end-of-file; another keeps its stdin open for the next attach.
    async fn end(&self) {
        if self.once {
            self.writer.lock().await.take();
        }
    }
}

/// Ends a `stdinOnce` container's stdin when dropped (the session ended).
struct CloseOnce(Arc<Stdin>);

impl Drop for CloseOnce {
    fn drop(&mut self) {
        if self.0.once {
            let stdin = self.0.clone();
            tokio::spawn(async move {
                stdin.writer.lock().await.take();
            });
        }
    }
}
