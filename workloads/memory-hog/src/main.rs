//! `memory-hog`: allocates and touches memory one MiB at a time, forever
//! (or up to `memory-hog MIB`), printing how much it holds.

fn main() {
    let cap: Option<usize> = std::env::args().nth(1).and_then(|a| a.parse().ok());
    let mut held: Vec<Vec<u8>> = Vec::new();
    loop {
        if cap.is_some_and(|c| held.len() >= c) {
            println!("holding {} MiB; done", held.len());
            return;
        }
        held.push(vec![1u8; 1 << 20]);
        if held.len() % 8 == 0 {
            println!("holding {} MiB", held.len());
        }
    }
}
