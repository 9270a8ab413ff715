//! `http-hello`: a `wasi:http/proxy` component (an HTTP function). Every
//! request gets a fresh instance; it answers `200` with the request's method
//! and path and its environment (sorted `KEY=value` lines). `/exit` and
//! `/trap` fail on purpose, to show a failing request fails only itself;
//! `/sleep?ms=N` sends its response head at once and its body N
//! milliseconds later (a slow request, seen in flight by its client);
//! `/burn?ms=N` computes for N milliseconds before it answers (CPU load).

use wasip2::exports::http::incoming_handler::Guest;
use wasip2::http::types::{
    Fields, IncomingRequest, Method, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

struct HttpHello;

impl Guest for HttpHello {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let path = request.path_with_query().unwrap_or_default();
        let method = match request.method() {
            Method::Get => "GET".to_owned(),
            Method::Post => "POST".to_owned(),
            Method::Put => "PUT".to_owned(),
            Method::Delete => "DELETE".to_owned(),
            other => format!("{other:?}"),
        };
        if path == "/trap" {
            std::process::abort();
        }
        if let Some(ms) = path.strip_prefix("/burn?ms=") {
            let ms: u64 = ms.parse().unwrap_or(0);
            let until = std::time::Instant::now() + std::time::Duration::from_millis(ms);
            let mut x = 1u64;
            while std::time::Instant::now() < until {
                for _ in 0..10_000 {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                }
            }
            respond(out, 200, &format!("burned {ms} ms ({x:x})\n"));
            return;
        }
        if let Some(ms) = path.strip_prefix("/sleep?ms=") {
            let ms: u64 = ms.parse().unwrap_or(0);
            respond_after(out, 200, &format!("slept {ms} ms\n"), || {
                std::thread::sleep(std::time::Duration::from_millis(ms));
            });
            return;
        }
        let mut env: Vec<(String, String)> = std::env::vars().collect();
        env.sort();
        let mut text = format!("hello from wasmkube: {method} {path}\n");
        for (k, v) in env {
            text.push_str(&format!("{k}={v}\n"));
        }
        respond(out, 200, &text);
    }
}

/// Sends a plain-text response.
pub fn respond(out: ResponseOutparam, status: u16, text: &str) {
    respond_after(out, status, text, || {});
}

/// Sends a plain-text response's head, runs `before_body`, then sends
/// the body.
fn respond_after(out: ResponseOutparam, status: u16, text: &str, before_body: impl FnOnce()) {
    let headers = Fields::new();
    let _ = headers.set("content-type", &[b"text/plain; charset=utf-8".to_vec()]);
    let response = OutgoingResponse::new(headers);
    let _ = response.set_status_code(status);
    let body = response.body().expect("the body of a new response");
    ResponseOutparam::set(out, Ok(response));
    before_body();
    {
        let stream = body.write().expect("the body's stream");
        for chunk in text.as_bytes().chunks(4096) {
            stream
                .blocking_write_and_flush(chunk)
                .expect("writing the body");
        }
    }
    OutgoingBody::finish(body, None).expect("finishing the body");
}

wasip2::http::proxy::export!(HttpHello with_types_in wasip2);
