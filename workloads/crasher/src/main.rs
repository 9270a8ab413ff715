//! `crasher`: fails on purpose. `crasher exit N` exits with code N (default
//! 3); `crasher trap` aborts, which traps in Wasm.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("trap") => {
            eprintln!("crasher: trapping");
            std::process::abort();
        }
        _ => {
            let code = args.get(1).and_then(|c| c.parse().ok()).unwrap_or(3);
            eprintln!("crasher: exiting with {code}");
            std::process::exit(code);
        }
    }
}
