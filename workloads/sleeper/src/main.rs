//! `sleeper`: sleeps for `sleeper SECONDS` (default: forever), printing a
//! line when it starts and when it is done.

use std::time::Duration;

fn main() {
    let seconds: Option<u64> = std::env::args().nth(1).and_then(|a| a.parse().ok());
    println!("sleeping");
    match seconds {
        Some(s) => std::thread::sleep(Duration::from_secs(s)),
        None => loop {
            std::thread::sleep(Duration::from_secs(3600));
        },
    }
    println!("done");
}
