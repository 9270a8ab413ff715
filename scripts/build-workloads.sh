#!/usr/bin/env bash
# Builds the example Wasm workloads (workloads/) for wasm32-wasip1, adding
# the Rust target first if it is missing. Output:
# workloads/target/wasm32-wasip1/release/<name>.wasm
set -euo pipefail
cd "$(dirname "$0")/.."

if ! rustup target list --installed | grep -qx wasm32-wasip1; then
  echo "==> rustup target add wasm32-wasip1"
  rustup target add wasm32-wasip1
fi
echo "==> building workloads/ for wasm32-wasip1"
cargo build --quiet --release --target wasm32-wasip1 --manifest-path workloads/Cargo.toml
