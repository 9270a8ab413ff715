//! Records the host target triple for the crate-boundary test's `cargo metadata`.

fn main() {
    println!(
        "cargo:rustc-env=WASMKUBE_HOST_TARGET={}",
        std::env::var("TARGET").expect("cargo sets TARGET")
    );
}
