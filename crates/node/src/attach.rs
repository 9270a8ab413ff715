//! `kubectl attach` on the agent: a running container's output from now
//! on, over the same WebSocket streaming protocol as exec
//! (`v5.channel.k8s.io`): channel 1 stdout, 2 stderr, and a `Success`
//! status on channel 3 when the container's run ends. It reads the run's
//! log as it is written, so it works alike for a Wasm guest and a Linux
//! process. A container's stdin is not kept open by this node, so an
//! attach asking for stdin (or a terminal) is refused before the upgrade.

use std::sync::Arc;

use axum::extract::ws::{WebSocket, WebSocketUpgrade};
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures::{SinkExt, StreamExt};
use tokio::sync::{mpsc, watch};

use crate::Ctx;
use crate::exec::{ERROR, Options, PROTOCOLS, close, frame, status};
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
    if options.stdin || options.tty {
        return refused(format!(
            "cannot attach to the stdin of container \"{container}\": this node does not keep containers' stdin open (attach without -i and -t streams its output)"
        ));
    }
    let Some(state) = ctx.pod_state(&namespace, &pod) else {
        return (
            StatusCode::NOT_FOUND,
            format!("pod {namespace}/{pod} is not running on this node"),
        )
            .into_response();
    };
    let follow = {
        let st = state.lock().expect("pod state");
        if !st.containers.iter().any(|c| c.name == container) {
            return refused(format!("container {container} is not valid for pod {pod}"));
        }
        st.runs.get(&container).filter(|r| r.running).and_then(|r| {
            let live = r.live_log.clone()?;
            Some((logs::path(&st.dir, &container, r.restart_count), live))
        })
    };
    let Some((path, live)) = follow else {
        return refused(format!(
            "container \"{container}\" in pod \"{pod}\" is not running"
        ));
    };
    let Ok(upgrade) = upgrade else {
        return refused(
            "attach is served over the WebSocket streaming protocol (v5.channel.k8s.io, kubectl 1.30 or newer); SPDY is not supported".into(),
        );
    };
    tracing::info!(%namespace, %pod, %container, "attach");
    upgrade
        .protocols(PROTOCOLS)
        .on_upgrade(move |socket| session(socket, path, live, options))
}

async fn session(
    socket: WebSocket,
    path: std::path::PathBuf,
    live: watch::Receiver<u64>,
    options: Options,
) {
    let (mut sink, mut incoming) = socket.split();
    let (tx, mut rx) = mpsc::channel(16);
    let follower = tokio::spawn(logs::follow_streams(path, live, tx));
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
            message = incoming.next() => {
                // The client went away (or closed): stop following.
                if !matches!(message, Some(Ok(_))) {
                    follower.abort();
                    return;
                }
            }
        }
    }
    let body = status(&[], &Ok(0)).to_string();
    let _ = sink.send(frame(ERROR, body.as_bytes())).await;
    close(&mut sink).await;
}
