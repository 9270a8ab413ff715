//! `echo-lines`: reads stdin line by line, printing `got: LINE` for each,
//! and at end of input how many it read; exits 0. For `kubectl attach -i`
//! and `kubectl run -i`.

use std::io::BufRead;

fn main() {
    println!("ready for input");
    let mut count = 0;
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        println!("got: {line}");
        count += 1;
    }
    println!("{count} lines");
}
