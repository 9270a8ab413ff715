//! The Pod Security Standards (`privileged`, `baseline`, `restricted`), as
//! Pod Security Admission checks them, with its wording: each violated
//! check gives one reason such as `privileged (container "c" must not set
//! securityContext.privileged=true)`.
//!
//! Wasm pods (RuntimeClass `wasmtime`) are checked on what applies to a
//! guest that makes no system calls of its own: host namespaces, host
//! paths, host ports, privileged, added capabilities and the volume types;
//! the Linux process settings (running as non-root, privilege escalation,
//! seccomp, dropping capabilities) do not apply to them.

use serde_json::Value;

/// A standard's level.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Privileged,
    Baseline,
    Restricted,
}

impl Level {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "privileged" => Some(Self::Privileged),
            "baseline" => Some(Self::Baseline),
            "restricted" => Some(Self::Restricted),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Privileged => "privileged",
            Self::Baseline => "baseline",
            Self::Restricted => "restricted",
        }
    }
}

/// The namespace labels Pod Security Admission reads.
pub const ENFORCE_LABEL: &str = "pod-security.kubernetes.io/enforce";
pub const WARN_LABEL: &str = "pod-security.kubernetes.io/warn";
pub const AUDIT_LABEL: &str = "pod-security.kubernetes.io/audit";

/// Capabilities the baseline standard lets a container add.
const BASELINE_CAPABILITIES: &[&str] = &[
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
];

/// Volume types the restricted standard allows.
const RESTRICTED_VOLUMES: &[&str] = &[
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
];

/// Sysctls the baseline standard allows.
const SAFE_SYSCTLS: &[&str] = &[
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
];

fn quoted(names: &[String]) -> String {
    names
        .iter()
        .map(|n| format!("{n:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The baseline's AppArmor check: no profile of type other than
/// `RuntimeDefault` or `Localhost` in the pod's or a container's field, and
/// no annotation naming one but `runtime/default` or `localhost/*`.
fn app_armor(metadata: &Value, spec: &Value, containers: &[&Value]) -> Option<String> {
    let forbidden = |t: &Value| !t.is_null() && t != "RuntimeDefault" && t != "Localhost";
    let mut setters = Vec::new();
    let mut values = std::collections::BTreeSet::new();
    let pod_type = &spec["securityContext"]["appArmorProfile"]["type"];
    if forbidden(pod_type) {
        setters.push("pod".to_owned());
        values.insert(pod_type.as_str().unwrap_or_default().to_owned());
    }
    let mut named = Vec::new();
    for c in containers {
        let t = &c["securityContext"]["appArmorProfile"]["type"];
        if forbidden(t) {
            named.push(c["name"].as_str().unwrap_or_default().to_owned());
            values.insert(t.as_str().unwrap_or_default().to_owned());
        }
    }
    if !named.is_empty() {
        setters.push(containers_phrase(&named));
    }
    let mut annotations: Vec<String> = metadata["annotations"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, _)| k.starts_with(crate::apparmor::ANNOTATION_PREFIX))
        .filter_map(|(k, v)| {
            let v = v.as_str().unwrap_or_default();
            let ok = v.is_empty() || v == "runtime/default" || v.starts_with("localhost/");
            (!ok).then(|| format!("{k}={v:?}"))
        })
        .collect();
    annotations.sort();
    if !annotations.is_empty() {
        setters.push(
            if annotations.len() == 1 {
                "annotation"
            } else {
                "annotations"
            }
            .to_owned(),
        );
    }
    if setters.is_empty() {
        return None;
    }
    let bad: Vec<String> = values.into_iter().chain(annotations).collect();
    let reason = if bad.len() == 1 {
        "forbidden AppArmor profile"
    } else {
        "forbidden AppArmor profiles"
    };
    Some(format!(
        "{reason} ({} must not set AppArmor profile type to {})",
        setters.join(" and "),
        quoted(&bad)
    ))
}

/// "container "a"" or "containers "a", "b""
fn containers_phrase(names: &[String]) -> String {
    if names.len() == 1 {
        format!("container {}", quoted(names))
    } else {
        format!("containers {}", quoted(names))
    }
}

/// Why a pod (its `metadata` and `spec`, or a template's) violates
/// `level`; empty when it does not.
pub fn violations(level: Level, metadata: &Value, spec: &Value) -> Vec<String> {
    if level == Level::Privileged {
        return Vec::new();
    }
    let wasm = spec["runtimeClassName"] == "wasmtime";
    let containers: Vec<&Value> = ["initContainers", "containers", "ephemeralContainers"]
        .iter()
        .flat_map(|k| spec[*k].as_array().into_iter().flatten())
        .collect();
    let name = |c: &Value| c["name"].as_str().unwrap_or_default().to_owned();
    let which = |pred: &dyn Fn(&Value) -> bool| -> Vec<String> {
        containers
            .iter()
            .filter(|c| pred(c))
            .map(|c| name(c))
            .collect()
    };
    let mut out = Vec::new();

    // Baseline.
    let host: Vec<&str> = ["hostNetwork", "hostPID", "hostIPC"]
        .into_iter()
        .filter(|k| spec[*k] == true)
        .collect();
    if !host.is_empty() {
        let set: Vec<String> = host.iter().map(|k| format!("{k}=true")).collect();
        out.push(format!("host namespaces ({})", set.join(", ")));
    }
    let privileged = which(&|c| c["securityContext"]["privileged"] == true);
    if !privileged.is_empty() {
        out.push(format!(
            "privileged ({} must not set securityContext.privileged=true)",
            containers_phrase(&privileged)
        ));
    }
    let mut added: Vec<String> = Vec::new();
    let adds = which(&|c| {
        c["securityContext"]["capabilities"]["add"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .any(|cap| !BASELINE_CAPABILITIES.contains(&cap))
    });
    for c in &containers {
        for cap in c["securityContext"]["capabilities"]["add"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            if !BASELINE_CAPABILITIES.contains(&cap) && !added.iter().any(|a| a == cap) {
                added.push(cap.to_owned());
            }
        }
    }
    if !adds.is_empty() {
        out.push(format!(
            "non-default capabilities ({} must not include {} in securityContext.capabilities.add)",
            containers_phrase(&adds),
            quoted(&added)
        ));
    }
    let volumes: Vec<&Value> = spec["volumes"].as_array().into_iter().flatten().collect();
    let host_paths: Vec<String> = volumes
        .iter()
        .filter(|v| v.get("hostPath").is_some())
        .map(|v| v["name"].as_str().unwrap_or_default().to_owned())
        .collect();
    if !host_paths.is_empty() {
        let noun = if host_paths.len() == 1 {
            "volume"
        } else {
            "volumes"
        };
        out.push(format!("hostPath volumes ({noun} {})", quoted(&host_paths)));
    }
    let mut ports: Vec<String> = Vec::new();
    let port_users = which(&|c| {
        c["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|p| p["hostPort"].as_i64().is_some_and(|h| h != 0))
    });
    for c in &containers {
        for p in c["ports"].as_array().into_iter().flatten() {
            if let Some(h) = p["hostPort"].as_i64().filter(|h| *h != 0) {
                ports.push(h.to_string());
            }
        }
    }
    if !port_users.is_empty() {
        out.push(format!(
            "hostPort ({} uses hostPort {})",
            containers_phrase(&port_users),
            ports.join(", ")
        ));
    }
    let unmasked = which(&|c| c["securityContext"]["procMount"] == "Unmasked");
    if !unmasked.is_empty() {
        out.push(format!(
            "procMount ({} must not set securityContext.procMount to \"Unmasked\")",
            containers_phrase(&unmasked)
        ));
    }
    let unsafe_sysctls: Vec<String> = spec["securityContext"]["sysctls"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["name"].as_str())
        .filter(|s| !SAFE_SYSCTLS.contains(s))
        .map(str::to_owned)
        .collect();
    if !unsafe_sysctls.is_empty() {
        out.push(format!("forbidden sysctls ({})", unsafe_sysctls.join(", ")));
    }
    let unconfined_pod = spec["securityContext"]["seccompProfile"]["type"] == "Unconfined";
    let unconfined = which(&|c| c["securityContext"]["seccompProfile"]["type"] == "Unconfined");
    if !wasm && (unconfined_pod || !unconfined.is_empty()) {
        let who = if unconfined_pod {
            "pod".to_owned()
        } else {
            containers_phrase(&unconfined)
        };
        out.push(format!(
            "seccompProfile ({who} must not set securityContext.seccompProfile.type to \"Unconfined\")"
        ));
    }
    if !wasm && let Some(v) = app_armor(metadata, spec, &containers) {
        out.push(v);
    }
    if level == Level::Baseline {
        return out;
    }

    // Restricted.
    let restricted_volumes: Vec<String> = volumes
        .iter()
        .filter_map(|v| {
            let kind = v.as_object()?.keys().find(|k| *k != "name")?.to_owned();
            (!RESTRICTED_VOLUMES.contains(&kind.as_str()) && kind != "hostPath")
                .then(|| format!("{:?}", v["name"].as_str().unwrap_or_default()))
        })
        .collect();
    if !restricted_volumes.is_empty() {
        out.push(format!(
            "restricted volume types (volumes {} use restricted volume types)",
            restricted_volumes.join(", ")
        ));
    }
    if wasm {
        return out;
    }
    let escalating = which(&|c| c["securityContext"]["allowPrivilegeEscalation"] != false);
    if !escalating.is_empty() {
        out.push(format!(
            "allowPrivilegeEscalation != false ({} must set securityContext.allowPrivilegeEscalation=false)",
            containers_phrase(&escalating)
        ));
    }
    let not_dropping = which(&|c| {
        !c["securityContext"]["capabilities"]["drop"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|d| d == "ALL")
    });
    let adding = which(&|c| {
        c["securityContext"]["capabilities"]["add"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|a| a != "NET_BIND_SERVICE")
    });
    if !not_dropping.is_empty() {
        out.push(format!(
            "unrestricted capabilities ({} must set securityContext.capabilities.drop=[\"ALL\"])",
            containers_phrase(&not_dropping)
        ));
    } else if !adding.is_empty() {
        out.push(format!(
            "unrestricted capabilities ({} must not include capabilities other than \"NET_BIND_SERVICE\" in securityContext.capabilities.add)",
            containers_phrase(&adding)
        ));
    }
    let pod_non_root = spec["securityContext"]["runAsNonRoot"] == true;
    let root_ok = which(&|c| match c["securityContext"]["runAsNonRoot"].as_bool() {
        Some(v) => !v,
        None => !pod_non_root,
    });
    if !root_ok.is_empty() {
        let who = if pod_non_root || root_ok.len() < containers.len() {
            containers_phrase(&root_ok)
        } else {
            format!("pod or {}", containers_phrase(&root_ok))
        };
        out.push(format!(
            "runAsNonRoot != true ({who} must set securityContext.runAsNonRoot=true)"
        ));
    }
    let pod_uid0 = spec["securityContext"]["runAsUser"] == 0;
    let uid0 = which(&|c| c["securityContext"]["runAsUser"] == 0);
    if pod_uid0 || !uid0.is_empty() {
        let who = if pod_uid0 {
            "pod".to_owned()
        } else {
            containers_phrase(&uid0)
        };
        out.push(format!("runAsUser=0 ({who} must not set runAsUser=0)"));
    }
    let pod_profile = spec["securityContext"]["seccompProfile"]["type"].as_str();
    let pod_profile_ok = matches!(pod_profile, Some("RuntimeDefault" | "Localhost"));
    let no_profile = which(
        &|c| match c["securityContext"]["seccompProfile"]["type"].as_str() {
            Some(t) => !matches!(t, "RuntimeDefault" | "Localhost"),
            None => !pod_profile_ok,
        },
    );
    if !no_profile.is_empty() && !unconfined_pod && unconfined.is_empty() {
        let who = if pod_profile_ok || no_profile.len() < containers.len() {
            containers_phrase(&no_profile)
        } else {
            format!("pod or {}", containers_phrase(&no_profile))
        };
        out.push(format!(
            "seccompProfile ({who} must set securityContext.seccompProfile.type to \"RuntimeDefault\" or \"Localhost\")"
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_plain_linux_pod_is_baseline_but_not_restricted() {
        let spec = json!({"containers": [{"name": "c", "image": "busybox"}]});
        assert!(violations(Level::Baseline, &Value::Null, &spec).is_empty());
        assert_eq!(
            violations(Level::Restricted, &Value::Null, &spec),
            [
                "allowPrivilegeEscalation != false (container \"c\" must set securityContext.allowPrivilegeEscalation=false)",
                "unrestricted capabilities (container \"c\" must set securityContext.capabilities.drop=[\"ALL\"])",
                "runAsNonRoot != true (pod or container \"c\" must set securityContext.runAsNonRoot=true)",
                "seccompProfile (pod or container \"c\" must set securityContext.seccompProfile.type to \"RuntimeDefault\" or \"Localhost\")",
            ]
        );
        let hardened = json!({
            "securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{"name": "c", "securityContext": {
                "allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}}}],
        });
        assert!(violations(Level::Restricted, &Value::Null, &hardened).is_empty());
    }

    #[test]
    fn baseline_refuses_host_access_and_privilege() {
        let spec = json!({
            "hostNetwork": true,
            "volumes": [{"name": "root", "hostPath": {"path": "/"}}],
            "containers": [{"name": "c", "securityContext": {"privileged": true,
                "capabilities": {"add": ["SYS_ADMIN", "CHOWN"]}},
                "ports": [{"containerPort": 80, "hostPort": 80}]}],
        });
        assert_eq!(
            violations(Level::Baseline, &Value::Null, &spec),
            [
                "host namespaces (hostNetwork=true)",
                "privileged (container \"c\" must not set securityContext.privileged=true)",
                "non-default capabilities (container \"c\" must not include \"SYS_ADMIN\" in securityContext.capabilities.add)",
                "hostPath volumes (volume \"root\")",
                "hostPort (container \"c\" uses hostPort 80)",
            ]
        );
        assert!(violations(Level::Privileged, &Value::Null, &spec).is_empty());
    }

    #[test]
    fn baseline_refuses_unconfined_app_armor_in_fields_and_annotations() {
        let spec = json!({
            "securityContext": {"appArmorProfile": {"type": "Unconfined"}},
            "containers": [
                {"name": "a", "securityContext": {"appArmorProfile": {"type": "Unconfined"}}},
                {"name": "b", "securityContext": {"appArmorProfile": {"type": "RuntimeDefault"}}},
            ],
        });
        let meta = json!({"annotations": {
            "container.apparmor.security.beta.kubernetes.io/b": "unconfined",
            "container.apparmor.security.beta.kubernetes.io/a": "localhost/k8s-a"}});
        assert_eq!(
            violations(Level::Baseline, &meta, &spec),
            [
                "forbidden AppArmor profiles (pod and container \"a\" and annotation must not set AppArmor profile type to \"Unconfined\", \"container.apparmor.security.beta.kubernetes.io/b=\\\"unconfined\\\"\")"
            ]
        );
        let allowed = json!({"containers": [{"name": "a", "securityContext":
            {"appArmorProfile": {"type": "Localhost", "localhostProfile": "k8s-a"}}}]});
        assert!(violations(Level::Restricted, &Value::Null, &json!({
            "securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{"name": "a", "securityContext": {
                "allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]},
                "appArmorProfile": allowed["containers"][0]["securityContext"]["appArmorProfile"]}}],
        })).is_empty());
    }

    #[test]
    fn wasm_pods_are_checked_on_what_applies() {
        let spec = json!({"runtimeClassName": "wasmtime", "containers": [{"name": "f", "image": "r/f:v1"}]});
        assert!(violations(Level::Restricted, &Value::Null, &spec).is_empty());
        let host = json!({"runtimeClassName": "wasmtime",
            "volumes": [{"name": "etc", "hostPath": {"path": "/etc"}}],
            "containers": [{"name": "f"}]});
        assert_eq!(
            violations(Level::Restricted, &Value::Null, &host),
            ["hostPath volumes (volume \"etc\")"]
        );
    }
}
