//! Watches over WebSocket, as kube-apiserver serves them: a watch request
//! (`?watch=1`) that asks to upgrade gets each watch event as one message
//! instead of one line of a chunked response. JSON text messages by
//! default; with the `base64.binary.k8s.io` subprotocol, each event
//! base64-encoded, as client-go's WebSocket watch reads it.
//!
//! Browsers need this: they keep at most six HTTP/1.1 connections per
//! host, so a page with more open watches than that (the dashboard through
//! `kubectl proxy`) would wait forever on the seventh; WebSockets are not
//! counted against that pool.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::FromRequestParts;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderMap, Method, Uri, header, request::Parts};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use futures::StreamExt;

use crate::ApiServer;
use crate::auth::UserInfo;

const BASE64: &str = "base64.binary.k8s.io";

/// Whether `parts` is a watch that asks to upgrade to WebSocket.
pub(crate) fn wanted(parts: &Parts) -> bool {
    let upgrade = parts
        .headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let watch = crate::params::Params::parse(parts.uri.query()).is_ok_and(|p| p.watch);
    parts.method == Method::GET && upgrade && watch
}

/// Runs the watch as an ordinary request; when it is accepted (200), the
/// connection is upgraded and its events sent as messages. A refused watch
/// (403, 410, a bad selector) is answered as it is, without upgrading.
pub(crate) async fn serve(
    server: Arc<ApiServer>,
    mut parts: Parts,
    user: Option<UserInfo>,
) -> Response {
    let upgrade = match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
        Ok(u) => u,
        Err(rejection) => return rejection.into_response(),
    };
    let mut headers = HeaderMap::new();
    for name in [header::ACCEPT, header::AUTHORIZATION] {
        if let Some(v) = parts.headers.get(&name) {
            headers.insert(name, v.clone());
        }
    }
    let uri: Uri = parts.uri.clone();
    let answer = crate::rest::handle(server, Method::GET, uri, headers, user, Body::empty()).await;
    if !answer.status().is_success() {
        return answer;
    }
    let base64 = parts
        .headers
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|p| p.trim() == BASE64));
    let upgrade = if base64 {
        upgrade.protocols([BASE64])
    } else {
        upgrade
    };
    upgrade.on_upgrade(move |socket| pump(answer.into_body(), socket, base64))
}

/// Sends each line of the watch's body as one message until the watch
/// ends or the client goes away.
async fn pump(body: Body, mut socket: WebSocket, base64: bool) {
    let mut events = body.into_data_stream();
    let mut pending: Vec<u8> = Vec::new();
    loop {
        tokio::select! {
            chunk = events.next() => {
                let Some(Ok(chunk)) = chunk else { break };
                pending.extend_from_slice(&chunk);
                while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=end).collect();
                    let line = &line[..line.len() - 1];
                    if line.is_empty() {
                        continue;
                    }
                    let message = if base64 {
                        Message::text(base64::engine::general_purpose::STANDARD.encode(line))
                    } else {
                        match std::str::from_utf8(line) {
                            Ok(text) => Message::text(text),
                            Err(_) => Message::binary(line.to_vec()),
                        }
                    };
                    if socket.send(message).await.is_err() {
                        return;
                    }
                }
            }
            incoming = socket.recv() => match incoming {
                // The client closed, or went away.
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            },
        }
    }
    let _ = socket.send(Message::Close(None)).await;
}
