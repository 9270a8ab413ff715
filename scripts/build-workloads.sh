#!/usr/bin/env bash
# Builds the example Wasm workloads (workloads/) for wasm32-wasip1 (core
# modules) and wasm32-wasip2 (components), adding the Rust targets first if
# they are missing. Output:
# workloads/target/<target>/release/<name>.wasm
set -euo pipefail
cd "$(dirname "$0")/.."

for target in wasm32-wasip1 wasm32-wasip2; do
  if ! rustup target list --installed | grep -qx "$target"; then
    echo "==> rustup target add $target"
    rustup target add "$target"
  fi
  echo "==> building workloads/ for $target"
  cargo build --quiet --release --target "$target" --manifest-path workloads/Cargo.toml
done
