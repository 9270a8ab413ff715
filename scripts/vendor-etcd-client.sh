#!/usr/bin/env bash
# Re-vendors etcd-client VERSION into third_party/etcd-client with its
# generated gRPC code checked in (see third_party/etcd-client/VENDORED.md).
# Needs protoc (Debian: protobuf-compiler) on this machine only.
set -euo pipefail
version=${1:-0.21.1}
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/src"
cat >"$work/Cargo.toml" <<TOML
[package]
name = "vendor-etcd-client"
version = "0.0.0"
edition = "2021"
[dependencies]
etcd-client = "=$version"
TOML
echo 'fn main() {}' >"$work/src/main.rs"
cargo build --quiet --manifest-path "$work/Cargo.toml" --target-dir "$work/target"
src=$(cargo metadata --format-version 1 --manifest-path "$work/Cargo.toml" |
    python3 -c 'import json,sys; m=json.load(sys.stdin); print(next(p["manifest_path"] for p in m["packages"] if p["name"]=="etcd-client").rsplit("/",1)[0])')
dest=$root/third_party/etcd-client
notes=$(cat "$dest/VENDORED.md")
rm -rf "$dest" && mkdir -p "$dest/src/rpc/generated"
cp -r "$src/src" "$src/proto" "$src"/LICENSE-* "$src/README.md" "$src/CHANGELOG.md" "$src/Cargo.toml" "$dest/"
for m in authpb etcdserverpb mvccpb v3electionpb v3lockpb; do
    cp "$work"/target/debug/build/etcd-client-*/out/$m.rs "$dest/src/rpc/generated/"
    sed -i "s|tonic::include_proto!(\"$m\");|include!(\"generated/$m.rs\");|" "$dest/src/rpc/pb.rs"
done
python3 - "$dest/Cargo.toml" <<'PY'
import re, sys
p = sys.argv[1]
s = open(p).read().replace('build = "build.rs"\n', '')
keep = [b for b in re.split(r'\n(?=\[)', s)
        if not (b.startswith(('[[example]]', '[[test]]', '[build-dependencies', '[dev-dependencies')))]
open(p, 'w').write('\n'.join(keep))
PY
printf '%s\n' "$notes" >"$dest/VENDORED.md"
echo "vendored etcd-client $version into third_party/etcd-client"
