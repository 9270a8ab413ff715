//! `config-http`: an HTTP function that reads its configuration from a
//! mounted ConfigMap on every request: `GET /KEY` answers with the content
//! of `$CONFIG_DIR/KEY` (default `/config`), `404` when there is none.

use wasip2::exports::http::incoming_handler::Guest;
use wasip2::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

struct ConfigHttp;

impl Guest for ConfigHttp {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let dir = std::env::var("CONFIG_DIR").unwrap_or_else(|_| "/config".into());
        let path = request.path_with_query().unwrap_or_default();
        let key = path.trim_start_matches('/').split('?').next().unwrap_or_default();
        let valid = !key.is_empty() && !key.contains(['/', '\\']) && key != "..";
        match valid.then(|| std::fs::read_to_string(format!("{dir}/{key}"))) {
            Some(Ok(value)) => respond(out, 200, &value),
            _ => respond(out, 404, &format!("no config key {key:?}\n")),
        }
    }
}

fn respond(out: ResponseOutparam, status: u16, text: &str) {
    let headers = Fields::new();
    let _ = headers.set("content-type", &[b"text/plain; charset=utf-8".to_vec()]);
    let response = OutgoingResponse::new(headers);
    let _ = response.set_status_code(status);
    let body = response.body().expect("the body of a new response");
    ResponseOutparam::set(out, Ok(response));
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

wasip2::http::proxy::export!(ConfigHttp with_types_in wasip2);
