//! `http-fetch`: an HTTP function that calls another service, the way a
//! serverless gateway does: each request's path and query are sent to
//! `UPSTREAM` (env, `http://host:port`) with `wasi:http/outgoing-handler`,
//! and the answer is `upstream <status>` followed by the upstream's body.
//! A failed call answers `502` with the error.

use wasip2::exports::http::incoming_handler::Guest;
use wasip2::http::outgoing_handler;
use wasip2::http::types::{
    ErrorCode, Fields, IncomingRequest, Method, OutgoingBody, OutgoingRequest, OutgoingResponse,
    ResponseOutparam, Scheme,
};
use wasip2::io::streams::StreamError;

struct HttpFetch;

impl Guest for HttpFetch {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let path = request.path_with_query().unwrap_or_else(|| "/".into());
        let Ok(upstream) = std::env::var("UPSTREAM") else {
            return respond(out, 500, "UPSTREAM is not set\n");
        };
        match fetch(&upstream, &path) {
            Ok((status, body)) => {
                let mut text = format!("upstream {status}\n").into_bytes();
                text.extend_from_slice(&body);
                respond_bytes(out, 200, &text);
            }
            Err(e) => respond(out, 502, &format!("calling {upstream}{path}: {e}\n")),
        }
    }
}

/// GET `upstream` + `path`: the status and the whole body.
fn fetch(upstream: &str, path: &str) -> Result<(u16, Vec<u8>), String> {
    let (scheme, authority) = match upstream.split_once("://") {
        Some(("http", rest)) => (Scheme::Http, rest),
        Some(("https", rest)) => (Scheme::Https, rest),
        _ => return Err(format!("UPSTREAM {upstream:?} is not http://host:port")),
    };
    let authority = authority.trim_end_matches('/');
    let request = OutgoingRequest::new(Fields::new());
    request.set_method(&Method::Get).map_err(|()| "method")?;
    request.set_scheme(Some(&scheme)).map_err(|()| "scheme")?;
    request
        .set_authority(Some(authority))
        .map_err(|()| format!("authority {authority:?}"))?;
    request
        .set_path_with_query(Some(path))
        .map_err(|()| format!("path {path:?}"))?;
    let body = request.body().map_err(|()| "request body")?;
    let pending = outgoing_handler::handle(request, None).map_err(describe)?;
    OutgoingBody::finish(body, None).map_err(describe)?;
    pending.subscribe().block();
    let response = pending
        .get()
        .ok_or("no response after the wait")?
        .map_err(|()| "the response was taken twice")?
        .map_err(describe)?;
    let status = response.status();
    let incoming = response.consume().map_err(|()| "response body")?;
    let stream = incoming.stream().map_err(|()| "response stream")?;
    let mut bytes = Vec::new();
    loop {
        match stream.blocking_read(64 * 1024) {
            Ok(chunk) => bytes.extend_from_slice(&chunk),
            Err(StreamError::Closed) => break,
            Err(StreamError::LastOperationFailed(e)) => return Err(e.to_debug_string()),
        }
    }
    Ok((status, bytes))
}

fn describe(code: ErrorCode) -> String {
    format!("{code:?}")
}

fn respond(out: ResponseOutparam, status: u16, text: &str) {
    respond_bytes(out, status, text.as_bytes());
}

fn respond_bytes(out: ResponseOutparam, status: u16, bytes: &[u8]) {
    let headers = Fields::new();
    let _ = headers.set("content-type", &[b"text/plain; charset=utf-8".to_vec()]);
    let response = OutgoingResponse::new(headers);
    let _ = response.set_status_code(status);
    let body = response.body().expect("the body of a new response");
    ResponseOutparam::set(out, Ok(response));
    {
        let stream = body.write().expect("the body's stream");
        for chunk in bytes.chunks(4096) {
            stream
                .blocking_write_and_flush(chunk)
                .expect("writing the body");
        }
    }
    OutgoingBody::finish(body, None).expect("finishing the body");
}

wasip2::http::proxy::export!(HttpFetch with_types_in wasip2);
