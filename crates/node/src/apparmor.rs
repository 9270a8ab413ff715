//! The kubelet's AppArmor admission: a pod that asks for an AppArmor
//! profile (any but `Unconfined`, in a field or the deprecated annotation)
//! is refused, before anything of it runs, on a node whose kernel does not
//! enforce AppArmor, or when a `Localhost` profile it names is not loaded.
//! A pod that names no profile is always admitted.
//!
//! A Wasm guest runs in the agent's process, where no AppArmor profile can
//! confine it alone: for a pod of the `wasmtime` runtime class the runtime's
//! default is its sandbox (`RuntimeDefault` is admitted anywhere) and a
//! `Localhost` profile is refused.

use std::collections::HashSet;

use k8s_openapi::api::core::v1::Pod;
use wasmkube_api::apparmor::{Profile, of_container, required};

/// What the kubelet reports on a pod it refuses for AppArmor.
pub(crate) const REASON: &str = "AppArmor";

/// The node's AppArmor, as admission sees it.
pub(crate) struct Host {
    /// The loaded profiles, or why the node enforces none.
    pub profiles: Result<HashSet<String>, String>,
}

impl Host {
    /// This node, now (a profile loaded since the agent started counts).
    pub(crate) fn now() -> Self {
        let profiles = if wasmkube_runtime_linux::apparmor::enabled() {
            wasmkube_runtime_linux::apparmor::loaded_profiles()
                .map_err(|e| format!("could not read loaded profiles: {e}"))
        } else {
            Err("AppArmor is not enabled on the host".into())
        };
        Self { profiles }
    }
}

/// Whether `pod` may run here; `Err` with the kubelet's message when not.
pub(crate) fn admit(pod: &Pod, host: impl FnOnce() -> Host) -> Result<(), String> {
    let Some(spec) = pod.spec.as_ref() else {
        return Ok(());
    };
    let annotations = pod.metadata.annotations.as_ref();
    if !required(annotations, spec) {
        return Ok(());
    }
    let containers = spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers);
    let refuse = |why: String| Err(format!("Cannot enforce AppArmor: {why}"));
    if spec.runtime_class_name.as_deref() == Some(wasmkube_runtime_wasm::HANDLER) {
        for c in containers {
            if let Some(Profile::Localhost(name)) = of_container(annotations, spec, c) {
                return refuse(format!(
                    "profile {name:?} cannot confine the Wasm guest of container {:?}: it runs in the agent's process, sandboxed by the Wasm runtime; name no profile, or RuntimeDefault (the Wasm sandbox)",
                    c.name
                ));
            }
        }
        return Ok(());
    }
    let loaded = match host().profiles {
        Ok(loaded) => loaded,
        Err(why) => return refuse(why),
    };
    for c in containers {
        if let Some(Profile::Localhost(name)) = of_container(annotations, spec, c)
            && !loaded.contains(&name)
        {
            return refuse(format!("profile {name:?} is not loaded"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    fn host(profiles: Result<&[&str], &str>) -> impl FnOnce() -> Host {
        let profiles = profiles
            .map(|p| p.iter().map(|s| s.to_string()).collect())
            .map_err(str::to_owned);
        move || Host { profiles }
    }

    #[test]
    fn a_pod_asking_for_app_armor_needs_it_on_the_node() {
        let plain = pod(
            json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "i"}]}}),
        );
        let none = Err("AppArmor is not enabled on the host");
        assert_eq!(admit(&plain, host(none)), Ok(()));
        let runtime_default = pod(json!({"metadata": {"name": "p"}, "spec": {
            "securityContext": {"appArmorProfile": {"type": "RuntimeDefault"}},
            "containers": [{"name": "c", "image": "i"}]}}));
        assert_eq!(
            admit(&runtime_default, host(none)),
            Err("Cannot enforce AppArmor: AppArmor is not enabled on the host".into())
        );
        assert_eq!(admit(&runtime_default, host(Ok(&[]))), Ok(()));
        let localhost = pod(json!({"metadata": {"name": "p", "annotations": {
                "container.apparmor.security.beta.kubernetes.io/c": "localhost/k8s-deny-write"}},
            "spec": {"containers": [{"name": "c", "image": "i"}]}}));
        assert_eq!(
            admit(&localhost, host(Ok(&["other"]))),
            Err("Cannot enforce AppArmor: profile \"k8s-deny-write\" is not loaded".into())
        );
        assert_eq!(admit(&localhost, host(Ok(&["k8s-deny-write"]))), Ok(()));
        let unconfined = pod(json!({"metadata": {"name": "p"}, "spec": {
            "containers": [{"name": "c", "image": "i", "securityContext": {"appArmorProfile": {"type": "Unconfined"}}}]}}));
        assert_eq!(admit(&unconfined, host(none)), Ok(()));
    }

    #[test]
    fn a_wasm_pods_default_is_its_sandbox_and_a_named_profile_cannot_confine_it() {
        let wasm = |profile: serde_json::Value| {
            pod(
                json!({"metadata": {"name": "f"}, "spec": {"runtimeClassName": "wasmtime",
                "securityContext": {"appArmorProfile": profile},
                "containers": [{"name": "f", "image": "i"}]}}),
            )
        };
        let none = Err("AppArmor is not enabled on the host");
        assert_eq!(
            admit(&wasm(json!({"type": "RuntimeDefault"})), host(none)),
            Ok(())
        );
        let named = admit(
            &wasm(json!({"type": "Localhost", "localhostProfile": "x"})),
            host(Ok(&["x"])),
        )
        .unwrap_err();
        assert!(named.contains("cannot confine the Wasm guest"), "{named}");
    }
}
