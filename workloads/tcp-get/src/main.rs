//! `tcp-get ADDR [PATH]`: a client over `wasi:sockets` (Rust's std
//! `TcpStream` on wasm32-wasip2): connects to `ADDR` (`ip:port`), sends
//! `GET PATH HTTP/1.0` and prints the response. Exits 0 on a `200`, 1 on
//! another status, 2 when it cannot connect.

use std::io::{Read, Write};
use std::net::TcpStream;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(addr) = args.get(1) else {
        eprintln!("usage: tcp-get ADDR [PATH]");
        std::process::exit(2);
    };
    let path = args.get(2).map(String::as_str).unwrap_or("/");
    let mut stream = match TcpStream::connect(addr.as_str()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("tcp-get: cannot connect to {addr}: {e}");
            std::process::exit(2);
        }
    };
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    let mut response = Vec::new();
    if let Err(e) = stream
        .write_all(request.as_bytes())
        .and_then(|()| stream.read_to_end(&mut response))
    {
        eprintln!("tcp-get: {addr}: {e}");
        std::process::exit(2);
    }
    let text = String::from_utf8_lossy(&response);
    print!("{text}");
    let ok = text
        .lines()
        .next()
        .is_some_and(|status| status.split_whitespace().nth(1) == Some("200"));
    std::process::exit(if ok { 0 } else { 1 });
}
