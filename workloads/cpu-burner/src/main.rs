//! `cpu-burner`: spins for `cpu-burner SECONDS` of wall time (default:
//! forever), printing how many rounds it managed each second.

use std::time::{Duration, Instant};

fn main() {
    let limit: Option<u64> = std::env::args().nth(1).and_then(|a| a.parse().ok());
    let start = Instant::now();
    let mut second = Instant::now();
    let (mut rounds, mut x) = (0u64, 1u64);
    loop {
        for _ in 0..10_000 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        }
        rounds += 1;
        if second.elapsed() >= Duration::from_secs(1) {
            println!("rounds/s {rounds} ({x:x})");
            rounds = 0;
            second = Instant::now();
        }
        if limit.is_some_and(|l| start.elapsed() >= Duration::from_secs(l)) {
            return;
        }
    }
}
