//! `echo-lines`: reads stdin line by line, printing `got: LINE` for each
//! (with ` (on a terminal)` when stdin is one), and at end of input how
//! many it read; exits 0. For `kubectl attach -i`, `kubectl run -i` and
//! `kubectl run -it`.

use std::io::{BufRead, IsTerminal};

fn main() {
    println!("ready for input");
    let terminal = if std::io::stdin().is_terminal() {
        " (on a terminal)"
    } else {
        ""
    };
    let mut count = 0;
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        println!("got: {line}{terminal}");
        count += 1;
    }
    println!("{count} lines");
}
