//! `hello`: prints a greeting, its arguments and `GREETING` from the
//! environment, then exits 0.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let greeting = std::env::var("GREETING").unwrap_or_else(|_| "hello".into());
    println!("{greeting} from wasmkube");
    if !args.is_empty() {
        println!("args: {}", args.join(" "));
    }
}
