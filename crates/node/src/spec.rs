//! From a pod spec to what a runtime is given: volumes materialised under
//! the pod's directory, env (plain, `valueFrom`, `envFrom`, `$(VAR)`
//! expansion), `argv` and limits.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{
    ConfigMap, Container, DownwardAPIVolumeFile, ObjectFieldSelector, Pod, ResourceFieldSelector,
    Secret,
};
use kube::api::Api;
use wasmkube_runtime::{AppArmor, Mount, Security};

use crate::Ctx;

/// A container's configuration could not be resolved (a missing ConfigMap
/// key, say): the container waits with `CreateContainerConfigError`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ConfigError(pub String);

/// A volume as materialised on the node.
#[derive(Debug, Clone)]
pub(crate) struct Volume {
    pub path: PathBuf,
    /// Volumes that are read-only whatever the mount says (configMap,
    /// secret, downwardAPI).
    pub read_only: bool,
}

/// What a container run gets.
#[derive(Debug)]
pub(crate) struct Resolved {
    pub command: Vec<String>,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub mounts: Vec<Mount>,
    pub working_dir: Option<String>,
    pub memory_limit: Option<u64>,
    pub cpu_millis: Option<u64>,
    pub cpu_request_millis: Option<u64>,
    pub security: Security,
}

pub(crate) fn pod_ns(pod: &Pod) -> &str {
    pod.metadata.namespace.as_deref().unwrap_or("default")
}

/// The pod's service account (`default` when it names none).
pub(crate) fn service_account(pod: &Pod) -> String {
    pod.spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".into())
}

pub(crate) async fn config_map(
    ctx: &Ctx,
    ns: &str,
    name: &str,
) -> Result<Option<ConfigMap>, ConfigError> {
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), ns);
    api.get_opt(name)
        .await
        .map_err(|e| ConfigError(format!("reading configmap {name:?}: {e}")))
}

pub(crate) async fn secret(ctx: &Ctx, ns: &str, name: &str) -> Result<Option<Secret>, ConfigError> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    api.get_opt(name)
        .await
        .map_err(|e| ConfigError(format!("reading secret {name:?}: {e}")))
}

pub(crate) fn config_map_data(cm: &ConfigMap) -> BTreeMap<String, Vec<u8>> {
    let mut out: BTreeMap<String, Vec<u8>> = cm
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
        .collect();
    for (k, v) in cm.binary_data.iter().flatten() {
        out.insert(k.clone(), v.0.clone());
    }
    out
}

pub(crate) fn secret_data(s: &Secret) -> BTreeMap<String, Vec<u8>> {
    let mut out: BTreeMap<String, Vec<u8>> = s
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect();
    for (k, v) in s.string_data.iter().flatten() {
        out.insert(k.clone(), v.clone().into_bytes());
    }
    out
}

/// The value of a downward-API field path.
fn field_value(
    ctx: &Ctx,
    pod: &Pod,
    selector: &ObjectFieldSelector,
) -> Result<String, ConfigError> {
    let path = selector.field_path.as_str();
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let ip = ctx.config.address.to_string();
    let keyed = |prefix: &str, map: Option<&BTreeMap<String, String>>| {
        path.strip_prefix(prefix)
            .and_then(|rest| rest.strip_suffix("']"))
            .map(|key| map.and_then(|m| m.get(key)).cloned().unwrap_or_default())
    };
    if let Some(v) = keyed("metadata.labels['", meta.labels.as_ref()) {
        return Ok(v);
    }
    if let Some(v) = keyed("metadata.annotations['", meta.annotations.as_ref()) {
        return Ok(v);
    }
    let render = |map: Option<&BTreeMap<String, String>>| {
        map.into_iter()
            .flatten()
            .map(|(k, v)| format!("{k}={v:?}\n"))
            .collect::<String>()
    };
    Ok(match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => pod_ns(pod).to_owned(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "metadata.labels" => render(meta.labels.as_ref()),
        "metadata.annotations" => render(meta.annotations.as_ref()),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        "status.hostIP" | "status.hostIPs" => ip,
        "status.podIP" | "status.podIPs" => pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.clone())
            .unwrap_or(ip),
        other => {
            return Err(ConfigError(format!(
                "unsupported fieldRef fieldPath {other:?}"
            )));
        }
    })
}

/// The value of a `resourceFieldRef`: the container's limit (the node's
/// allocatable when unset) or request, divided by the divisor, rounded up.
fn resource_value(
    pod: &Pod,
    default_container: &str,
    selector: &ResourceFieldSelector,
) -> Result<String, ConfigError> {
    let name = selector
        .container_name
        .as_deref()
        .filter(|n| !n.is_empty())
        .unwrap_or(default_container);
    let container = all_containers(pod)
        .find(|c| c.name == name)
        .ok_or_else(|| ConfigError(format!("resourceFieldRef: no container {name:?}")))?;
    let (kind, resource) = selector
        .resource
        .split_once('.')
        .ok_or_else(|| ConfigError(format!("unsupported resource {:?}", selector.resource)))?;
    let resources = container.resources.as_ref();
    let set = match kind {
        "limits" => resources.and_then(|r| r.limits.as_ref()),
        "requests" => resources.and_then(|r| r.requests.as_ref()),
        _ => None,
    };
    let value = match set.and_then(|m| m.get(resource)) {
        Some(q) => wasmkube_api::quantity::parse(&q.0)
            .map_err(ConfigError)?
            .millis(),
        None if kind == "limits" => match resource {
            "cpu" => crate::node::allocatable_cpu() as i128 * 1000,
            "memory" => crate::node::allocatable_memory() as i128 * 1000,
            _ => 0,
        },
        None => 0,
    };
    let divisor = selector
        .divisor
        .as_ref()
        .map(|d| wasmkube_api::quantity::parse(&d.0).map_err(ConfigError))
        .transpose()?
        .map(|q| q.millis())
        .filter(|d| *d > 0)
        .unwrap_or(1000);
    Ok(((value + divisor - 1) / divisor).to_string())
}

pub(crate) fn all_containers(pod: &Pod) -> impl Iterator<Item = &Container> {
    pod.spec.iter().flat_map(|s| {
        s.init_containers
            .iter()
            .flatten()
            .chain(s.containers.iter())
    })
}

/// Kubernetes' `$(VAR)` expansion: defined names are replaced, `$$` escapes,
/// anything else is left as written.
pub(crate) fn expand(input: &str, vars: &HashMap<String, String>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(body) = after.strip_prefix('(')
            && let Some(end) = body.find(')')
        {
            let name = &body[..end];
            match vars.get(name) {
                Some(v) => out.push_str(v),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

async fn env(ctx: &Ctx, pod: &Pod, c: &Container) -> Result<Vec<(String, String)>, ConfigError> {
    let ns = pod_ns(pod);
    let mut out: Vec<(String, String)> = Vec::new();
    let set = |out: &mut Vec<(String, String)>, k: String, v: String| match out
        .iter_mut()
        .find(|(name, _)| *name == k)
    {
        Some(slot) => slot.1 = v,
        None => out.push((k, v)),
    };
    for from in c.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        if let Some(r) = &from.config_map_ref {
            match config_map(ctx, ns, &r.name).await? {
                Some(cm) => {
                    for (k, v) in config_map_data(&cm) {
                        set(
                            &mut out,
                            format!("{prefix}{k}"),
                            String::from_utf8_lossy(&v).into(),
                        );
                    }
                }
                None if r.optional == Some(true) => {}
                None => return Err(ConfigError(format!("configmap {:?} not found", r.name))),
            }
        }
        if let Some(r) = &from.secret_ref {
            match secret(ctx, ns, &r.name).await? {
                Some(s) => {
                    for (k, v) in secret_data(&s) {
                        set(
                            &mut out,
                            format!("{prefix}{k}"),
                            String::from_utf8_lossy(&v).into(),
                        );
                    }
                }
                None if r.optional == Some(true) => {}
                None => return Err(ConfigError(format!("secret {:?} not found", r.name))),
            }
        }
    }
    for e in c.env.iter().flatten() {
        let value = if let Some(source) = &e.value_from {
            let keyed = if let Some(r) = &source.config_map_key_ref {
                let data = config_map(ctx, ns, &r.name)
                    .await?
                    .as_ref()
                    .map(config_map_data);
                Some((
                    data,
                    &r.name,
                    &r.key,
                    r.optional,
                    ("configmap", "ConfigMap"),
                ))
            } else if let Some(r) = &source.secret_key_ref {
                let data = secret(ctx, ns, &r.name).await?.as_ref().map(secret_data);
                Some((data, &r.name, &r.key, r.optional, ("secret", "Secret")))
            } else {
                None
            };
            if let Some((data, name, key, optional, (kind, title))) = keyed {
                match data.as_ref().and_then(|d| d.get(key)) {
                    Some(v) => String::from_utf8_lossy(v).into_owned(),
                    None if optional == Some(true) => continue,
                    None if data.is_none() => {
                        return Err(ConfigError(format!("{kind} {name:?} not found")));
                    }
                    None => {
                        return Err(ConfigError(format!(
                            "couldn't find key {key} in {title} {ns}/{name}"
                        )));
                    }
                }
            } else if let Some(f) = &source.field_ref {
                field_value(ctx, pod, f)?
            } else if let Some(r) = &source.resource_field_ref {
                resource_value(pod, &c.name, r)?
            } else {
                String::new()
            }
        } else {
            let vars: HashMap<String, String> = out.iter().cloned().collect();
            expand(e.value.as_deref().unwrap_or_default(), &vars)
        };
        set(&mut out, e.name.clone(), value);
    }
    Ok(out)
}

fn quantity(c: &Container, resource: &str) -> Option<i128> {
    let q = c.resources.as_ref()?.limits.as_ref()?.get(resource)?;
    wasmkube_api::quantity::parse(&q.0).ok().map(|q| q.millis())
}

fn request(c: &Container, resource: &str) -> Option<i128> {
    let q = c.resources.as_ref()?.requests.as_ref()?.get(resource)?;
    wasmkube_api::quantity::parse(&q.0).ok().map(|q| q.millis())
}

/// The container's securityContext over the pod's, as the kubelet merges
/// them (the container's fields win).
fn security(pod: &Pod, c: &Container) -> Security {
    let p = pod.spec.as_ref().and_then(|s| s.security_context.as_ref());
    let s = c.security_context.as_ref();
    let caps = s.and_then(|s| s.capabilities.as_ref());
    Security {
        run_as_user: s
            .and_then(|s| s.run_as_user)
            .or_else(|| p.and_then(|p| p.run_as_user)),
        run_as_group: s
            .and_then(|s| s.run_as_group)
            .or_else(|| p.and_then(|p| p.run_as_group)),
        run_as_non_root: s
            .and_then(|s| s.run_as_non_root)
            .or_else(|| p.and_then(|p| p.run_as_non_root))
            .unwrap_or(false),
        read_only_root_filesystem: s.and_then(|s| s.read_only_root_filesystem) == Some(true),
        privileged: s.and_then(|s| s.privileged) == Some(true),
        allow_privilege_escalation: s.and_then(|s| s.allow_privilege_escalation),
        capabilities_add: caps.and_then(|c| c.add.clone()).unwrap_or_default(),
        capabilities_drop: caps.and_then(|c| c.drop.clone()).unwrap_or_default(),
        seccomp_unconfined: seccomp_profile(pod, c).is_some_and(|p| p.type_ == "Unconfined"),
        seccomp_localhost: None,
        app_armor: pod.spec.as_ref().and_then(|spec| {
            use wasmkube_api::apparmor::Profile;
            Some(
                match wasmkube_api::apparmor::of_container(
                    pod.metadata.annotations.as_ref(),
                    spec,
                    c,
                )? {
                    Profile::RuntimeDefault => AppArmor::RuntimeDefault,
                    Profile::Unconfined => AppArmor::Unconfined,
                    Profile::Localhost(name) => AppArmor::Localhost(name),
                },
            )
        }),
    }
}

/// The container's seccomp profile, else its pod's.
fn seccomp_profile<'a>(
    pod: &'a Pod,
    c: &'a Container,
) -> Option<&'a k8s_openapi::api::core::v1::SeccompProfile> {
    c.security_context
        .as_ref()
        .and_then(|s| s.seccomp_profile.as_ref())
        .or_else(|| {
            pod.spec
                .as_ref()
                .and_then(|s| s.security_context.as_ref())
                .and_then(|s| s.seccomp_profile.as_ref())
        })
}

/// The profile a `seccompProfile: Localhost` names (container over pod),
/// read from the node's seccomp directory (`DATA_DIR/seccomp`, as the
/// kubelet's `/var/lib/kubelet/seccomp`); `None` for any other type.
fn localhost_seccomp(ctx: &Ctx, pod: &Pod, c: &Container) -> Result<Option<String>, ConfigError> {
    let Some(profile) = seccomp_profile(pod, c).filter(|p| p.type_ == "Localhost") else {
        return Ok(None);
    };
    let name = profile.localhost_profile.as_deref().unwrap_or_default();
    if name.is_empty() || name.starts_with('/') || name.split('/').any(|p| p == "..") {
        return Err(ConfigError(format!(
            "seccomp profile {name:?}: localhostProfile must be a relative path without '..'"
        )));
    }
    let path = ctx.config.data_dir.join("seccomp").join(name);
    std::fs::read_to_string(&path).map(Some).map_err(|e| {
        ConfigError(format!(
            "cannot load seccomp profile {:?}: {e}",
            path.display()
        ))
    })
}

/// Where `sub` (a mount's `subPath`) leads in the volume at `root`, its
/// missing directories made: each element that exists is resolved (a
/// ConfigMap key is a link into the volume's `..data`) and must stay in
/// the volume, so a link a container left in its emptyDir cannot make a
/// later mount reach the node's own files (Kubernetes' subPath rule);
/// nothing is made outside it.
fn resolve_sub_path(root: &Path, sub: &str) -> Result<PathBuf, ConfigError> {
    let fail = |why: String| ConfigError(format!("subPath {sub:?}: {why}"));
    if sub.starts_with('/') || sub.split('/').any(|p| p == "..") {
        return Err(fail("must be a relative path without '..'".into()));
    }
    let root = root.canonicalize().map_err(|e| fail(e.to_string()))?;
    let mut at = root.clone();
    for element in sub.split('/').filter(|e| !e.is_empty() && *e != ".") {
        let next = at.join(element);
        if next.symlink_metadata().is_ok() {
            let resolved = next.canonicalize().map_err(|e| fail(e.to_string()))?;
            if !resolved.starts_with(&root) {
                return Err(fail("leads outside its volume".into()));
            }
            at = resolved;
        } else {
            std::fs::create_dir(&next).map_err(|e| fail(e.to_string()))?;
            at = next;
        }
    }
    Ok(at)
}

/// Resolves one container against its pod's volumes.
pub(crate) async fn container(
    ctx: &Ctx,
    pod: &Pod,
    c: &Container,
    volumes: &HashMap<String, Volume>,
) -> Result<Resolved, ConfigError> {
    let env = env(ctx, pod, c).await?;
    let vars: HashMap<String, String> = env.iter().cloned().collect();
    let expand_all = |words: &Option<Vec<String>>| -> Vec<String> {
        words.iter().flatten().map(|a| expand(a, &vars)).collect()
    };
    let (command, args) = (expand_all(&c.command), expand_all(&c.args));
    let mut mounts = Vec::new();
    for m in c.volume_mounts.iter().flatten() {
        let v = volumes.get(&m.name).ok_or_else(|| {
            ConfigError(format!("volume mount {:?}: no volume of that name", m.name))
        })?;
        let mut host_path = v.path.clone();
        if let Some(sub) = m.sub_path.as_deref().filter(|s| !s.is_empty()) {
            host_path = resolve_sub_path(&v.path, sub)?;
        }
        mounts.push(Mount {
            host_path,
            container_path: m.mount_path.clone(),
            read_only: v.read_only || m.read_only == Some(true),
        });
    }
    Ok(Resolved {
        command,
        args,
        env,
        mounts,
        working_dir: c.working_dir.clone(),
        memory_limit: quantity(c, "memory").map(|m| (m / 1000).max(0) as u64),
        cpu_millis: quantity(c, "cpu").map(|m| m.max(1) as u64),
        cpu_request_millis: request(c, "cpu").map(|m| m.max(1) as u64),
        security: Security {
            seccomp_localhost: localhost_seccomp(ctx, pod, c)?,
            ..security(pod, c)
        },
    })
}

/// A file of a configMap, secret, downwardAPI or projected volume: its
/// path in the volume, its bytes and its permission bits.
pub(crate) type VolumeFile = (String, Vec<u8>, u32);

/// The permission bits of a volume's files when neither the volume nor the
/// item says (Kubernetes' `defaultMode`).
const DEFAULT_MODE: u32 = 0o644;

/// An item's mode, else the volume's `defaultMode`, else 0644; only the
/// permission bits count.
pub(crate) fn file_mode(item: Option<i32>, default: Option<i32>) -> u32 {
    item.or(default)
        .map_or(DEFAULT_MODE, |m| (m as u32) & 0o7777)
}

/// Writes `data` to `path` with the permission bits `mode` from its
/// creation on (a Secret's 0400 file is never readable by others, not even
/// while it is written), and exactly them (whatever the umask).
pub(crate) fn write_with_mode(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)?;
    file.set_permissions(std::fs::Permissions::from_mode(mode))?;
    file.write_all(data)
}

pub(crate) fn keyed_files(
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<&Vec<k8s_openapi::api::core::v1::KeyToPath>>,
    default_mode: Option<i32>,
    what: &str,
) -> Result<Vec<VolumeFile>, ConfigError> {
    let mode = file_mode(None, default_mode);
    match items {
        None => Ok(data
            .iter()
            .map(|(k, v)| (k.clone(), v.clone(), mode))
            .collect()),
        Some(items) => items
            .iter()
            .map(|i| {
                data.get(&i.key)
                    .map(|v| (i.path.clone(), v.clone(), file_mode(i.mode, default_mode)))
                    .ok_or_else(|| {
                        ConfigError(format!("{what} references non-existent key: {}", i.key))
                    })
            })
            .collect(),
    }
}

pub(crate) fn downward_files(
    ctx: &Ctx,
    pod: &Pod,
    items: &[DownwardAPIVolumeFile],
    default_mode: Option<i32>,
) -> Result<Vec<VolumeFile>, ConfigError> {
    items
        .iter()
        .map(|i| {
            let value = if let Some(f) = &i.field_ref {
                field_value(ctx, pod, f)?
            } else if let Some(r) = &i.resource_field_ref {
                let first = pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.containers.first())
                    .map(|c| c.name.clone());
                resource_value(pod, &first.unwrap_or_default(), r)?
            } else {
                String::new()
            };
            Ok((
                i.path.clone(),
                value.into_bytes(),
                file_mode(i.mode, default_mode),
            ))
        })
        .collect()
}

/// When a token issued at `issued` and expiring at `expires` is replaced:
/// the kubelet's rule, at 80 % of its lifetime and at most a day after
/// issue (tokens extended to a year are replaced daily).
fn refresh_at(
    issued: std::time::SystemTime,
    expires: std::time::SystemTime,
) -> std::time::SystemTime {
    const DAY: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
    let life = expires.duration_since(issued).unwrap_or_default();
    issued + life.mul_f64(0.8).min(DAY)
}

/// A token issued by the TokenRequest API, with its lifetime.
pub(crate) struct IssuedToken {
    pub token: String,
    issued: std::time::SystemTime,
    expires: std::time::SystemTime,
}

impl IssuedToken {
    pub fn refresh_at(&self, every: Option<std::time::Duration>) -> std::time::SystemTime {
        match every {
            Some(d) => self.issued + d,
            None => refresh_at(self.issued, self.expires),
        }
    }
}

/// A token for the pod's service account, bound to the pod (the
/// TokenRequest API), for a projected `serviceAccountToken` source.
pub(crate) async fn service_account_token(
    ctx: &Ctx,
    pod: &Pod,
    source: &k8s_openapi::api::core::v1::ServiceAccountTokenProjection,
) -> Result<IssuedToken, ConfigError> {
    request_token(
        ctx,
        pod,
        source.audience.iter().cloned().collect(),
        source.expiration_seconds.unwrap_or(3607),
    )
    .await
}

/// A token of the pod's service account for the built-in registry (its
/// audience only, bound to the pod, ten minutes: Kubernetes' shortest),
/// with which the node pulls the pod's images from there.
pub(crate) async fn registry_token(ctx: &Ctx, pod: &Pod) -> Result<String, ConfigError> {
    let audiences = vec![wasmkube_api::images::AUDIENCE.to_owned()];
    Ok(request_token(ctx, pod, audiences, 600).await?.token)
}

/// A token of the pod's service account, bound to the pod (the
/// TokenRequest API).
async fn request_token(
    ctx: &Ctx,
    pod: &Pod,
    audiences: Vec<String>,
    seconds: i64,
) -> Result<IssuedToken, ConfigError> {
    let asked = std::time::SystemTime::now();
    use k8s_openapi::api::authentication::v1::{
        BoundObjectReference, TokenRequest, TokenRequestSpec,
    };
    use k8s_openapi::api::core::v1::ServiceAccount;
    let ns = pod_ns(pod);
    let account = service_account(pod);
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences,
            expiration_seconds: Some(seconds),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
        },
        ..Default::default()
    };
    let api: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), ns);
    let issued = api
        .create_token_request(&account, &Default::default(), &request)
        .await
        .map_err(|e| {
            ConfigError(format!(
                "requesting a token for service account {account:?}: {e}"
            ))
        })?;
    let status = issued
        .status
        .ok_or_else(|| ConfigError(format!("no token issued for service account {account:?}")))?;
    let expires = u64::try_from(status.expiration_timestamp.0.as_second())
        .map(|s| std::time::UNIX_EPOCH + std::time::Duration::from_secs(s))
        .unwrap_or(asked);
    Ok(IssuedToken {
        token: status.token,
        issued: asked,
        expires,
    })
}

/// Materialises the pod's volumes under `pod_dir/volumes/`, with the
/// projected token files to keep fresh.
pub(crate) async fn volumes(
    ctx: &Ctx,
    pod: &Pod,
    pod_dir: &Path,
) -> Result<(HashMap<String, Volume>, Vec<crate::projected::Projected>), ConfigError> {
    let ns = pod_ns(pod);
    let mut out = HashMap::new();
    let mut projected = Vec::new();
    for v in pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
        let dir = pod_dir.join("volumes").join(&v.name);
        let make = |d: &Path| {
            std::fs::create_dir_all(d).map_err(|e| ConfigError(format!("volume {:?}: {e}", v.name)))
        };
        let volume = if v.empty_dir.is_some() {
            make(&dir)?;
            // Writable by whatever user the containers run as (their own
            // uid, or root of a user namespace), as the kubelet makes it.
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))
                    .map_err(|e| ConfigError(format!("volume {:?}: {e}", v.name)))?;
            }
            Volume {
                path: dir,
                read_only: false,
            }
        } else if let Some(h) = &v.host_path {
            let path = PathBuf::from(&h.path);
            match h.type_.as_deref().unwrap_or("") {
                "DirectoryOrCreate" => make(&path)?,
                "Directory" if !path.is_dir() => {
                    return Err(ConfigError(format!(
                        "hostPath type check failed: {} is not a directory",
                        h.path
                    )));
                }
                _ => {}
            }
            Volume {
                path,
                read_only: false,
            }
        } else if crate::projected::is_projected(v) {
            // Written from API objects, and kept up to date while the pod
            // runs (`projected.rs`).
            make(&dir)?;
            let mut files = crate::projected::Projected::new(dir.clone(), v.clone());
            files.refresh(ctx, pod, true).await?;
            projected.push(files);
            Volume {
                path: dir,
                read_only: true,
            }
        } else if let Some(src) = &v.persistent_volume_claim {
            let path = crate::volumes::claimed_path(ctx, ns, &src.claim_name).await?;
            Volume {
                path,
                read_only: src.read_only == Some(true),
            }
        } else {
            return Err(ConfigError(format!(
                "volume {:?}: only emptyDir, hostPath, configMap, secret, downwardAPI, projected and persistentVolumeClaim volumes are supported",
                v.name
            )));
        };
        out.insert(v.name.clone(), volume);
    }
    Ok((out, projected))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_replaced_at_80_percent_of_their_life_and_daily() {
        let t0 = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        let hour = std::time::Duration::from_secs(3600);
        assert_eq!(refresh_at(t0, t0 + hour), t0 + hour.mul_f64(0.8));
        // A token extended to a year is still replaced every day.
        assert_eq!(refresh_at(t0, t0 + hour * 24 * 365), t0 + hour * 24);
    }

    #[test]
    fn sub_paths_stay_in_their_volume() {
        let dir = tempfile::tempdir().unwrap();
        let volume = dir.path().join("volume");
        std::fs::create_dir_all(volume.join("..data")).unwrap();
        std::fs::write(volume.join("..data/nginx.conf"), "conf").unwrap();
        std::os::unix::fs::symlink("..data/nginx.conf", volume.join("nginx.conf")).unwrap();
        // A key of a ConfigMap volume, through its link.
        let key = resolve_sub_path(&volume, "nginx.conf").unwrap();
        assert_eq!(std::fs::read_to_string(&key).unwrap(), "conf");
        // Missing directories are made.
        let made = resolve_sub_path(&volume, "a/b").unwrap();
        assert!(made.is_dir() && made.starts_with(volume.canonicalize().unwrap()));
        // A link a container left pointing out of the volume is refused,
        // and nothing is made through it.
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, volume.join("evil")).unwrap();
        std::os::unix::fs::symlink("/", volume.join("root")).unwrap();
        for sub in ["evil", "evil/new", "root", "a/../../x", "/etc"] {
            assert!(resolve_sub_path(&volume, sub).is_err(), "{sub}");
        }
        assert!(!outside.join("new").exists());
    }

    #[test]
    fn expands_like_kubernetes() {
        let vars: HashMap<String, String> = [
            ("A".to_owned(), "1".to_owned()),
            ("B".to_owned(), "two".to_owned()),
        ]
        .into();
        assert_eq!(expand("$(A)-$(B)", &vars), "1-two");
        assert_eq!(expand("$(C) stays", &vars), "$(C) stays");
        assert_eq!(expand("$$(A) escaped", &vars), "$(A) escaped");
        assert_eq!(expand("cost $5", &vars), "cost $5");
        assert_eq!(expand("open $(A", &vars), "open $(A");
    }
}
