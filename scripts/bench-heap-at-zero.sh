#!/usr/bin/env bash
# What a Knative function at zero costs a node agent's heap, read exactly
# with heaptrack (the serving benchmark's anonymous-memory figure is the
# same cost seen through the allocator and the kernel, to a few KiB).
#
# The agent is built with the C library's allocator (feature
# `system-allocator`; heaptrack does not see mimalloc's allocations) and
# run under heaptrack by `wasmkube-bench serving`, twice: with 1 and with 5
# groups of functions that ran a pod once and went back to zero. Each time
# the benchmark waits at the end with every function at zero and the agent
# is killed there, so what heaptrack reports as never freed is what the
# agent held at zero. The difference between the two runs, over the 4
# groups more, is the cost per function (what the moment of the kill adds,
# a few hundred KiB either way, is spread over that many functions).
#
# Usage (root, as the serving benchmark): scripts/bench-heap-at-zero.sh [GROUP_SIZE]
# Leaves target/release/wasmkube as the default (mimalloc) build, and
# heaptrack's recordings in target/heap-at-zero/ (read them with
# `heaptrack_print -f FILE --print-leaks 1`: what was live, by call site).
set -euo pipefail
cd "$(dirname "$0")/.."
idle=${1:-100}

if ! command -v heaptrack >/dev/null; then
  echo "==> apt-get install heaptrack"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq heaptrack >/dev/null
fi
scripts/build-workloads.sh
# Both builds name the same packages, so their dependencies keep the same
# features and only the wasmkube crate is built twice.
echo "==> building wasmkube with the system allocator"
cargo build --quiet --release -p wasmkube -p wasmkube-bench --features wasmkube/system-allocator
work=$PWD/target/heap-at-zero
rm -rf "$work"
mkdir -p "$work"
trap 'pkill -KILL -f "^$work/wasmkube" || true' EXIT
cp target/release/wasmkube "$work/wasmkube"
echo "==> building the default wasmkube again"
cargo build --quiet --release -p wasmkube -p wasmkube-bench

cat >"$work/wrap" <<EOF
#!/bin/sh
# The agent under heaptrack; the control plane as it is.
if [ "\$1" = agent ]; then
  exec heaptrack -o "$work/agent-\$GROUPS_RUN" "$work/wasmkube" "\$@"
fi
exec "$work/wasmkube" "\$@"
EOF
chmod +x "$work/wrap"

# Bytes heaptrack reports as never freed (allocated and live at the kill).
live_bytes() {
  heaptrack_print -f "$1" 2>/dev/null | awk '/^total memory leaked:/ {
    v = $4; u = substr(v, length(v)); n = v + 0
    if (u == "K") n *= 1e3; else if (u == "M") n *= 1e6; else if (u == "G") n *= 1e9
    printf "%.0f\n", n }'
}

run() {
  local groups=$1 log="$work/bench-$1.log"
  echo "==> serving benchmark, $idle functions per group, $groups later group(s)" >&2
  GROUPS_RUN=$groups target/release/wasmkube-bench serving --binary "$work/wrap" \
    --cold 4 --functions 2 --step 2 --idle "$idle" --later-groups "$groups" \
    --await-agent-exit >"$log" 2>&1 &
  local bench=$!
  # The benchmark says when every function is at zero.
  until grep -q "waiting for the agent to exit" "$log"; do
    if ! kill -0 "$bench" 2>/dev/null; then
      cat "$log" >&2
      exit 1
    fi
    sleep 1
  done
  pkill -KILL -f "^$work/wasmkube agent"
  wait "$bench" || { cat "$log" >&2; exit 1; }
  live_bytes "$(ls "$work/agent-$groups".*)"
}

one=$(run 1)
five=$(run 5)
echo
echo "agent heap live at zero: $((one / 1024)) KiB after 1 later group, $((five / 1024)) KiB after 5"
awk -v a="$one" -v b="$five" -v n="$idle" 'BEGIN {
  printf "per started function at zero: %.2f KiB of live heap (%d more functions)\n", (b - a) / (4 * n) / 1024, 4 * n }'
echo "heaptrack's recordings: target/heap-at-zero/agent-1.* and agent-5.*"
