//! `env-and-volumes`: prints its environment (sorted, `KEY=value`), then for
//! each directory named in its arguments every file in it (`path: content`)
//! and whether the directory is writable, so a test can see what a container
//! was given and nothing else.

use std::path::Path;

fn main() {
    let mut env: Vec<(String, String)> = std::env::vars().collect();
    env.sort();
    for (k, v) in env {
        println!("{k}={v}");
    }
    for dir in std::env::args().skip(1) {
        let dir = Path::new(&dir);
        match std::fs::read_dir(dir) {
            Ok(entries) => {
                let mut files: Vec<_> = entries.flatten().map(|e| e.path()).collect();
                files.sort();
                for f in files.iter().filter(|f| f.is_file()) {
                    let content = std::fs::read_to_string(f).unwrap_or_default();
                    println!("{}: {}", f.display(), content.trim_end());
                }
                let probe = dir.join(".write-probe");
                match std::fs::write(&probe, b"x") {
                    Ok(()) => {
                        let _ = std::fs::remove_file(&probe);
                        println!("{}: writable", dir.display());
                    }
                    Err(e) => println!("{}: read-only ({})", dir.display(), e.kind()),
                }
            }
            Err(e) => println!("{}: cannot open ({})", dir.display(), e.kind()),
        }
    }
}
