//! Crate boundaries, checked by machine: which crate may depend on what.
//! A forbidden edge fails here before it spreads.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use serde_json::Value;

type Deps = BTreeMap<String, BTreeSet<String>>;

/// Workspace crate -> the crates it depends on, transitively and directly.
fn dependency_closure() -> (Deps, Deps) {
    let out = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--filter-platform",
            env!("WASMKUBE_HOST_TARGET"),
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: BTreeMap<String, String> = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["id"].as_str().unwrap().to_owned(),
                p["name"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    // Normal (non-dev) dependency edges only: what ships in the binary.
    let edges: BTreeMap<String, Vec<String>> = meta["resolve"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            let deps = n["deps"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|d| {
                    d["dep_kinds"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|k| k["kind"].is_null())
                })
                .map(|d| d["pkg"].as_str().unwrap().to_owned())
                .collect();
            (n["id"].as_str().unwrap().to_owned(), deps)
        })
        .collect();
    let members: Vec<String> = meta["workspace_members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap().to_owned())
        .collect();
    let closure = members
        .iter()
        .map(|m| {
            let mut seen = BTreeSet::new();
            let mut stack = vec![m.clone()];
            while let Some(id) = stack.pop() {
                for d in edges.get(&id).into_iter().flatten() {
                    if seen.insert(names[d].clone()) {
                        stack.push(d.clone());
                    }
                }
            }
            (names[m].clone(), seen)
        })
        .collect();
    let direct = members
        .iter()
        .map(|m| {
            let deps = edges[m].iter().map(|d| names[d].clone()).collect();
            (names[m].clone(), deps)
        })
        .collect();
    (closure, direct)
}

#[test]
fn crate_boundaries_hold() {
    let (deps, direct) = dependency_closure();
    let direct_users_of = |dep: &str| -> BTreeSet<&str> {
        direct
            .iter()
            .filter(|(_, d)| d.contains(dep))
            .map(|(k, _)| k.as_str())
            .collect()
    };
    let users_of = |dep: &str| -> BTreeSet<&str> {
        deps.iter()
            .filter(|(_, d)| d.contains(dep))
            .map(|(k, _)| k.as_str())
            .collect()
    };
    // Only the API server talks to the store; the binary wires them together,
    // and the benchmarks measure the store alone as a peer (never shipped).
    let store_users = users_of("wasmkube-store");
    assert_eq!(
        store_users,
        BTreeSet::from(["wasmkube", "wasmkube-apiserver", "wasmkube-bench"]),
        "only the apiserver may use the store"
    );
    // The API model has no IO: no HTTP, no async runtime, no storage.
    for forbidden in ["tokio", "axum", "hyper", "sled", "wasmkube-store"] {
        assert!(
            !deps["wasmkube-api"].contains(forbidden),
            "wasmkube-api must not depend on {forbidden}"
        );
    }
    // Only the Wasm runtime crate uses Wasmtime; the rest reach it only
    // through the Runtime trait, and only the node agent (and the binary
    // that embeds it) drives a runtime.
    for dep in ["wasmtime", "wasmtime-wasi"] {
        assert_eq!(
            direct_users_of(dep),
            BTreeSet::from(["wasmkube-runtime-wasm"]),
            "only runtime-wasm may use {dep}"
        );
    }
    assert_eq!(
        users_of("wasmkube-runtime-wasm"),
        BTreeSet::from(["wasmkube", "wasmkube-node"]),
        "only the node agent drives the Wasm runtime"
    );
    // runc, runtime specs, cgroups and namespaces live in the Linux runtime,
    // which only the node agent drives; the two runtimes know nothing of
    // each other.
    assert_eq!(
        direct_users_of("oci-spec"),
        BTreeSet::from(["wasmkube-runtime-linux"]),
        "only runtime-linux may use oci-spec"
    );
    assert_eq!(
        users_of("wasmkube-runtime-linux"),
        BTreeSet::from(["wasmkube", "wasmkube-node"]),
        "only the node agent drives the Linux runtime"
    );
    assert!(!deps["wasmkube-runtime-linux"].contains("wasmtime"));
    assert!(!deps["wasmkube-runtime-wasm"].contains("wasmkube-runtime-linux"));
    // Registry access lives in the oci crate.
    for dep in ["oci-client", "oci-wasm"] {
        assert_eq!(
            direct_users_of(dep),
            BTreeSet::from(["wasmkube-oci"]),
            "only the oci crate may use {dep}"
        );
    }
    // The Runtime trait crate stays tiny: no other workspace crate, no IO.
    assert!(
        !deps["wasmkube-runtime"]
            .iter()
            .any(|d| d.starts_with("wasmkube") || d == "tokio"),
        "the runtime trait crate depends on nothing of ours and no executor: {:?}",
        deps["wasmkube-runtime"]
    );
    // The node agent is an API client: it never reaches into the server.
    for forbidden in ["wasmkube-apiserver", "wasmkube-store", "wasmkube-scheduler"] {
        assert!(
            !deps["wasmkube-node"].contains(forbidden),
            "the node agent must not depend on {forbidden}"
        );
    }
    // The controllers, Knative Serving, the gateway and the NetworkPolicy
    // enforcer are API clients too, and never run workloads.
    for client in [
        "wasmkube-controllers",
        "wasmkube-serving",
        "wasmkube-gateway",
        "wasmkube-netpol",
    ] {
        for forbidden in [
            "wasmkube-apiserver",
            "wasmkube-store",
            "wasmkube-node",
            "wasmkube-runtime",
        ] {
            assert!(
                !deps[client].contains(forbidden),
                "{client} must not depend on {forbidden}"
            );
        }
    }
    assert!(
        !deps["wasmkube-store"]
            .iter()
            .any(|d| d.starts_with("wasmkube")),
        "the store knows nothing of the API"
    );
    // The built-in registry knows nothing of the cluster, and only the
    // binary serves it; nodes reach it through the oci crate as any other.
    assert!(
        !deps["wasmkube-registry"]
            .iter()
            .any(|d| d.starts_with("wasmkube")),
        "the registry depends on no crate of ours: {:?}",
        deps["wasmkube-registry"]
    );
    assert_eq!(
        users_of("wasmkube-registry"),
        BTreeSet::from(["wasmkube"]),
        "only the binary serves the registry"
    );
    // Certificates are made in one place, which knows nothing of the
    // cluster.
    assert_eq!(
        direct_users_of("rcgen"),
        BTreeSet::from(["wasmkube-pki"]),
        "only the pki crate makes certificates"
    );
    assert!(
        !deps["wasmkube-pki"]
            .iter()
            .any(|d| d.starts_with("wasmkube")),
        "the pki crate depends on no crate of ours: {:?}",
        deps["wasmkube-pki"]
    );
}
