//! `kubectl port-forward` on the agent: Kubernetes' port-forward protocol
//! (`portforward.k8s.io`) over SPDY/3.1, the SPDY frames carried in
//! WebSocket binary messages (`SPDY/3.1+portforward.k8s.io`, KEP-4006, what
//! kubectl 1.31 and later speak). The API server proxies the upgraded
//! connection here untouched.
//!
//! For each connection it forwards, the client opens two streams with the
//! same `requestid` and `port`: an error stream (which it half-closes at
//! once) and a data stream. The agent answers each with SYN_REPLY, dials
//! the pod's port (the pod's own IP, the node port a Wasm container's port
//! is served at, or the node's address when the pod shares the node's
//! network) and copies bytes both ways; a failure is written to the error
//! stream, as the kubelet writes it. Only what port-forward uses of SPDY is
//! spoken: SYN_STREAM, SYN_REPLY, DATA with FIN, RST_STREAM, PING (echoed)
//! and GOAWAY; SETTINGS, HEADERS and WINDOW_UPDATE are read and ignored (the
//! Go peer does no flow control).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::Ctx;

/// The WebSocket subprotocol: SPDY tunnelled, port-forward inside.
pub(crate) const PROTOCOL: &str = "SPDY/3.1+portforward.k8s.io";

const VERSION: u16 = 3;
const SYN_STREAM: u16 = 1;
const SYN_REPLY: u16 = 2;
const RST_STREAM: u16 = 3;
const PING: u16 = 6;
const GOAWAY: u16 = 7;
const FLAG_FIN: u8 = 1;
/// RST_STREAM's PROTOCOL_ERROR.
const PROTOCOL_ERROR: u32 = 1;
/// The largest frame accepted (SPDY allows 16 MiB; port-forward sends
/// 32 KiB at most).
const MAX_FRAME: usize = 1 << 20;
/// Bytes read from the pod per DATA frame.
const CHUNK: usize = 32 * 1024;

/// SPDY/3's zlib dictionary for header blocks: these names, each with a
/// four-byte length before it, then the tail as it is.
fn dictionary() -> Vec<u8> {
    const NAMES: &[&str] = &[
        "options",
        "head",
        "post",
        "put",
        "delete",
        "trace",
        "accept",
        "accept-charset",
        "accept-encoding",
        "accept-language",
        "accept-ranges",
        "age",
        "allow",
        "authorization",
        "cache-control",
        "connection",
        "content-base",
        "content-encoding",
        "content-language",
        "content-length",
        "content-location",
        "content-md5",
        "content-range",
        "content-type",
        "date",
        "etag",
        "expect",
        "expires",
        "from",
        "host",
        "if-match",
        "if-modified-since",
        "if-none-match",
        "if-range",
        "if-unmodified-since",
        "last-modified",
        "location",
        "max-forwards",
        "pragma",
        "proxy-authenticate",
        "proxy-authorization",
        "range",
        "referer",
        "retry-after",
        "server",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "user-agent",
        "vary",
        "via",
        "warning",
        "www-authenticate",
        "method",
        "get",
        "status",
        "200 OK",
        "version",
        "HTTP/1.1",
        "url",
        "public",
        "set-cookie",
        "keep-alive",
        "origin",
    ];
    const TAIL: &str = concat!(
        "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505",
        "203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request",
        "401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented",
        "503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 ",
        "Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,image/jpg,image/gif,",
        "application/xml,application/xhtml+xml,text/plain,text/javascript,publicprivatemax-age=",
        "gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0.",
    );
    let mut out = Vec::with_capacity(1423);
    for name in NAMES {
        out.extend_from_slice(&(name.len() as u32).to_be_bytes());
        out.extend_from_slice(name.as_bytes());
    }
    out.extend_from_slice(TAIL.as_bytes());
    out
}

/// One SPDY frame.
#[derive(Debug, PartialEq)]
enum Frame {
    Control { kind: u16, flags: u8, body: Bytes },
    Data { stream: u32, flags: u8, body: Bytes },
}

/// Splits the first whole frame off `buf`, if it holds one.
fn parse(buf: &mut BytesMut) -> Result<Option<Frame>, String> {
    if buf.len() < 8 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([0, buf[5], buf[6], buf[7]]) as usize;
    if len > MAX_FRAME {
        return Err(format!("a frame of {len} bytes"));
    }
    if buf.len() < 8 + len {
        return Ok(None);
    }
    let head = buf.split_to(8);
    let body = buf.split_to(len).freeze();
    let flags = head[4];
    if head[0] & 0x80 != 0 {
        let version = u16::from_be_bytes([head[0] & 0x7f, head[1]]);
        if version != VERSION {
            return Err(format!("SPDY version {version}"));
        }
        let kind = u16::from_be_bytes([head[2], head[3]]);
        Ok(Some(Frame::Control { kind, flags, body }))
    } else {
        let stream = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) & 0x7fff_ffff;
        Ok(Some(Frame::Data {
            stream,
            flags,
            body,
        }))
    }
}

fn frame_head(out: &mut Vec<u8>, flags: u8, len: usize) {
    out.push(flags);
    out.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
}

fn control(kind: u16, flags: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + body.len());
    out.extend_from_slice(&(0x8000 | VERSION).to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    frame_head(&mut out, flags, body.len());
    out.extend_from_slice(body);
    out
}

fn data(stream: u32, flags: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + body.len());
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    frame_head(&mut out, flags, body.len());
    out.extend_from_slice(body);
    out
}

fn u32_at(body: &[u8], at: usize) -> Result<u32, String> {
    body.get(at..at + 4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or_else(|| "a frame too short".to_owned())
}

/// Header blocks: each direction one zlib stream for the whole session,
/// primed with SPDY's dictionary.
struct Headers {
    inflate: Decompress,
    deflate: Compress,
    dictionary: Vec<u8>,
}

impl Headers {
    fn new() -> Self {
        let dictionary = dictionary();
        let mut deflate = Compress::new(Compression::default(), true);
        deflate
            .set_dictionary(&dictionary)
            .expect("a fresh compressor takes a dictionary");
        Self {
            inflate: Decompress::new(true),
            deflate,
            dictionary,
        }
    }

    /// A header block's name/value pairs (names are lower case in SPDY).
    fn decode(&mut self, mut input: &[u8]) -> Result<Vec<(String, String)>, String> {
        let mut raw = Vec::with_capacity(input.len() * 4 + 64);
        loop {
            raw.reserve(1024);
            let before = self.inflate.total_in();
            match self
                .inflate
                .decompress_vec(input, &mut raw, FlushDecompress::Sync)
            {
                Ok(_) => {}
                Err(e) if e.needs_dictionary().is_some() => {
                    self.inflate
                        .set_dictionary(&self.dictionary)
                        .map_err(|e| format!("header dictionary: {e}"))?;
                }
                Err(e) => return Err(format!("header block: {e}")),
            }
            let used = (self.inflate.total_in() - before) as usize;
            input = &input[used..];
            if input.is_empty() && raw.len() < raw.capacity() {
                break;
            }
        }
        let mut pairs = Vec::new();
        let count = u32_at(&raw, 0)? as usize;
        let mut at = 4;
        let text = |at: &mut usize| -> Result<String, String> {
            let len = u32_at(&raw, *at)? as usize;
            let bytes = raw
                .get(*at + 4..*at + 4 + len)
                .ok_or("a header block too short")?;
            *at += 4 + len;
            Ok(String::from_utf8_lossy(bytes).into_owned())
        };
        for _ in 0..count.min(256) {
            let name = text(&mut at)?;
            let value = text(&mut at)?;
            pairs.push((name, value));
        }
        Ok(pairs)
    }

    /// A compressed header block of `pairs`.
    fn encode(&mut self, pairs: &[(&str, &str)]) -> Vec<u8> {
        let mut raw = (pairs.len() as u32).to_be_bytes().to_vec();
        for (name, value) in pairs {
            for s in [name, value] {
                raw.extend_from_slice(&(s.len() as u32).to_be_bytes());
                raw.extend_from_slice(s.as_bytes());
            }
        }
        let mut out = Vec::with_capacity(raw.len() + 64);
        let mut input = &raw[..];
        loop {
            out.reserve(256);
            let before = self.deflate.total_in();
            if self
                .deflate
                .compress_vec(input, &mut out, FlushCompress::Sync)
                .is_err()
            {
                break;
            }
            input = &input[(self.deflate.total_in() - before) as usize..];
            if input.is_empty() && out.len() < out.capacity() {
                break;
            }
        }
        out
    }
}

/// `GET /portForward/{namespace}/{pod}`: the upgrade to the tunnelled
/// protocol, for a pod running here.
pub(crate) async fn handle(
    State(ctx): State<Arc<Ctx>>,
    Path((namespace, pod)): Path<(String, String)>,
    upgrade: WebSocketUpgrade,
) -> Response {
    if ctx.pod_state(&namespace, &pod).is_none() {
        return crate::server::not_here(&namespace, &pod).into_response();
    }
    let upgrade = upgrade.protocols([PROTOCOL]);
    if upgrade.selected_protocol().is_none() {
        return (
            StatusCode::BAD_REQUEST,
            format!("port-forward is served as the WebSocket subprotocol {PROTOCOL}"),
        )
            .into_response();
    }
    upgrade.on_upgrade(move |ws| async move {
        let target = Target {
            ctx,
            namespace,
            pod,
        };
        if let Err(e) = session(ws, target).await {
            tracing::debug!(error = %e, "port-forward session ended");
        }
    })
}

/// The pod a session forwards to.
struct Target {
    ctx: Arc<Ctx>,
    namespace: String,
    pod: String,
}

impl Target {
    /// Where the pod's `port` is reached from the node now.
    fn address(&self, port: u16) -> Result<SocketAddr, String> {
        let state = self
            .ctx
            .pod_state(&self.namespace, &self.pod)
            .ok_or_else(|| format!("pod {}/{} is gone", self.namespace, self.pod))?;
        let state = state.lock().expect("pod state");
        Ok(state.reach(self.ctx.config.address, port))
    }
}

/// A forwarded connection being set up: its two streams as they arrive.
#[derive(Default)]
struct Pair {
    error: Option<u32>,
    /// The data stream, and what the client sends on it meanwhile.
    data: Option<(u32, mpsc::Receiver<Option<Bytes>>)>,
    port: u16,
}

async fn session(ws: WebSocket, target: Target) -> Result<(), String> {
    let (mut sink, mut source) = ws.split();
    let (out, mut outgoing) = mpsc::channel::<Vec<u8>>(64);
    let writer = tokio::spawn(async move {
        while let Some(frame) = outgoing.recv().await {
            if sink.send(Message::Binary(frame.into())).await.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    });
    let mut headers = Headers::new();
    let mut buf = BytesMut::new();
    let mut pairs: HashMap<String, Pair> = HashMap::new();
    // Data streams being forwarded: bytes from the client to the pod, and
    // `None` when the client half-closes.
    let mut inbound: HashMap<u32, mpsc::Sender<Option<Bytes>>> = HashMap::new();
    let result = loop {
        let Some(message) = source.next().await else {
            break Ok(());
        };
        match message.map_err(|e| e.to_string())? {
            Message::Binary(b) => buf.extend_from_slice(&b),
            Message::Close(_) => break Ok(()),
            _ => continue,
        }
        let mut done = false;
        while let Some(frame) = parse(&mut buf)? {
            match frame {
                Frame::Control {
                    kind: SYN_STREAM,
                    flags,
                    body,
                } => {
                    let stream = u32_at(&body, 0)? & 0x7fff_ffff;
                    let fields = headers.decode(body.get(10..).unwrap_or_default())?;
                    let field = |name: &str| {
                        fields
                            .iter()
                            .find(|(n, _)| n.eq_ignore_ascii_case(name))
                            .map(|(_, v)| v.as_str())
                    };
                    let mut reply = stream.to_be_bytes().to_vec();
                    reply.extend(headers.encode(&[]));
                    if out.send(control(SYN_REPLY, 0, &reply)).await.is_err() {
                        break;
                    }
                    let (Some(kind), Some(id), Some(port)) = (
                        field("streamtype"),
                        field("requestid"),
                        field("port").and_then(|p| p.parse::<u16>().ok()),
                    ) else {
                        let mut rst = stream.to_be_bytes().to_vec();
                        rst.extend_from_slice(&PROTOCOL_ERROR.to_be_bytes());
                        let _ = out.send(control(RST_STREAM, 0, &rst)).await;
                        continue;
                    };
                    let pair = pairs.entry(id.to_owned()).or_default();
                    pair.port = port;
                    match kind {
                        "error" => pair.error = Some(stream),
                        "data" => {
                            // Its bytes queue until the pair is complete,
                            // whichever stream of the two came first.
                            let (tx, rx) = mpsc::channel(64);
                            if flags & FLAG_FIN != 0 {
                                let _ = tx.try_send(None);
                            }
                            inbound.insert(stream, tx);
                            pair.data = Some((stream, rx));
                        }
                        _ => {}
                    }
                    if pair.error.is_some() && pair.data.is_some() {
                        let pair = pairs.remove(id).unwrap_or_default();
                        let (Some(error), Some((data_stream, rx))) = (pair.error, pair.data) else {
                            continue;
                        };
                        let address = target.address(pair.port);
                        let what = format!(
                            "error forwarding port {} to pod {}/{}",
                            pair.port, target.namespace, target.pod
                        );
                        tokio::spawn(forward(address, what, error, data_stream, rx, out.clone()));
                    }
                }
                Frame::Data {
                    stream,
                    flags,
                    body,
                } => {
                    if let Some(tx) = inbound.get(&stream) {
                        if !body.is_empty() && tx.send(Some(body)).await.is_err() {
                            inbound.remove(&stream);
                            continue;
                        }
                        if flags & FLAG_FIN != 0 {
                            let _ = tx.send(None).await;
                            inbound.remove(&stream);
                        }
                    }
                }
                Frame::Control {
                    kind: RST_STREAM,
                    body,
                    ..
                } => {
                    // Dropping the sender ends the forwarded connection.
                    inbound.remove(&(u32_at(&body, 0)? & 0x7fff_ffff));
                }
                Frame::Control {
                    kind: PING, body, ..
                } => {
                    let _ = out.send(control(PING, 0, &body)).await;
                }
                Frame::Control { kind: GOAWAY, .. } => {
                    done = true;
                    break;
                }
                Frame::Control { .. } => {}
            }
        }
        if done {
            break Ok(());
        }
    };
    drop(inbound);
    drop(out);
    let _ = writer.await;
    result
}

/// One forwarded connection: dials the pod and copies bytes both ways
/// until both directions are closed (or the client resets the stream).
async fn forward(
    address: Result<SocketAddr, String>,
    what: String,
    error: u32,
    stream: u32,
    mut inbound: mpsc::Receiver<Option<Bytes>>,
    out: mpsc::Sender<Vec<u8>>,
) {
    let tcp = match address {
        Ok(a) => tokio::net::TcpStream::connect(a)
            .await
            .map_err(|e| format!("{what}: {e}")),
        Err(e) => Err(format!("{what}: {e}")),
    };
    let tcp = match tcp {
        Ok(t) => t,
        Err(message) => {
            let _ = out.send(data(error, FLAG_FIN, message.as_bytes())).await;
            let _ = out.send(data(stream, FLAG_FIN, &[])).await;
            return;
        }
    };
    let (mut rd, mut wr) = tcp.into_split();
    let to_pod = async {
        while let Some(chunk) = inbound.recv().await {
            match chunk {
                Some(b) => {
                    if wr.write_all(&b).await.is_err() {
                        return;
                    }
                }
                None => {
                    let _ = wr.shutdown().await;
                    // Half-closed: the pod may still answer.
                    std::future::pending::<()>().await;
                }
            }
        }
        // The client reset the stream or the session ended.
    };
    let from_pod = async {
        let mut buf = vec![0; CHUNK];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    let _ = out.send(data(stream, FLAG_FIN, &[])).await;
                    return;
                }
                Ok(n) => {
                    if out.send(data(stream, 0, &buf[..n])).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    tokio::select! {
        () = to_pod => {}
        () = from_pod => {}
    }
    let _ = out.send(data(error, FLAG_FIN, &[])).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dictionary_is_spdy3s() {
        let d = dictionary();
        assert_eq!(d.len(), 1423);
        let mut c = Compress::new(Compression::default(), true);
        // zlib returns the dictionary's Adler-32, which SPDY/3 fixes.
        assert_eq!(c.set_dictionary(&d).unwrap(), 0xe3c6_a7c2);
    }

    #[test]
    fn header_blocks_round_trip_over_one_zlib_stream_each_way() {
        let mut client = Headers::new();
        let mut server = Headers::new();
        for id in ["0", "1", "2"] {
            let block =
                client.encode(&[("streamtype", "data"), ("port", "8080"), ("requestid", id)]);
            let pairs = server.decode(&block).unwrap();
            assert_eq!(
                pairs,
                vec![
                    ("streamtype".to_owned(), "data".to_owned()),
                    ("port".to_owned(), "8080".to_owned()),
                    ("requestid".to_owned(), id.to_owned()),
                ]
            );
        }
        assert!(server.decode(&client.encode(&[])).unwrap().is_empty());
    }

    #[test]
    fn frames_are_split_off_a_byte_stream() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&control(PING, 0, &7u32.to_be_bytes()));
        buf.extend_from_slice(&data(3, FLAG_FIN, b"hello"));
        buf.extend_from_slice(&data(5, 0, b"par"));
        assert_eq!(
            parse(&mut buf).unwrap(),
            Some(Frame::Control {
                kind: PING,
                flags: 0,
                body: Bytes::from_static(&[0, 0, 0, 7])
            })
        );
        assert_eq!(
            parse(&mut buf).unwrap(),
            Some(Frame::Data {
                stream: 3,
                flags: FLAG_FIN,
                body: Bytes::from_static(b"hello")
            })
        );
        buf.truncate(buf.len() - 1);
        assert_eq!(parse(&mut buf).unwrap(), None, "a partial frame waits");
        let mut wrong = BytesMut::from(&control(PING, 0, &[])[..]);
        wrong[1] = 2;
        assert!(parse(&mut wrong).is_err(), "SPDY/2 is refused");
    }
}
