//! Persistent volumes on the node. A pod's claim resolves to the directory
//! of the volume bound to it (a `local` or `hostPath` volume); a local-path
//! volume's directory is made on first use under the node's local-path
//! root. The node watches the local-path volumes provisioned on it and,
//! when one is being deleted and no longer protected (not bound), removes
//! its directory and then the finalizer that held the volume.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::TryStreamExt;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use wasmkube_api::storage as st;

use crate::Ctx;
use crate::spec::ConfigError;

/// The directory of a volume: its `local` or `hostPath` path.
fn volume_path(pv: &PersistentVolume) -> Option<PathBuf> {
    let spec = pv.spec.as_ref()?;
    spec.local
        .as_ref()
        .map(|l| PathBuf::from(&l.path))
        .or_else(|| spec.host_path.as_ref().map(|h| PathBuf::from(&h.path)))
}

fn provisioned_here(pv: &PersistentVolume) -> bool {
    pv.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(st::PROVISIONED_BY))
        .is_some_and(|p| p == st::LOCAL_PATH_PROVISIONER)
}

/// A local-path volume's directory, when it lies directly under `root`
/// (anything else is not this node's to make or remove).
fn local_path_dir(pv: &PersistentVolume, root: &Path) -> Option<PathBuf> {
    let path = volume_path(pv)?;
    (provisioned_here(pv) && path.parent() == Some(root)).then_some(path)
}

/// Where the volume bound to claim `name` is mounted from.
pub(crate) async fn claimed_path(ctx: &Ctx, ns: &str, name: &str) -> Result<PathBuf, ConfigError> {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), ns);
    let claim = claims
        .get_opt(name)
        .await
        .map_err(|e| ConfigError(format!("reading persistentvolumeclaim {name:?}: {e}")))?
        .ok_or_else(|| ConfigError(format!("persistentvolumeclaim {name:?} not found")))?;
    let volume = claim
        .spec
        .as_ref()
        .and_then(|s| s.volume_name.clone())
        .filter(|v| !v.is_empty())
        .ok_or_else(|| ConfigError(format!("persistentvolumeclaim {name:?} is not bound yet")))?;
    let volumes: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let pv = volumes
        .get(&volume)
        .await
        .map_err(|e| ConfigError(format!("reading persistentvolume {volume:?}: {e}")))?;
    if let Some(node) = st::pinned_node(&pv)
        && node != ctx.config.name
    {
        return Err(ConfigError(format!(
            "persistentvolume {volume:?} is on node {node:?}, not this one"
        )));
    }
    if provisioned_here(&pv) {
        let root = ctx.config.local_path_root();
        let dir = local_path_dir(&pv, &root).ok_or_else(|| {
            ConfigError(format!(
                "persistentvolume {volume:?} is not under this node's local-path root {}",
                root.display()
            ))
        })?;
        make_dir(&dir).map_err(|e| ConfigError(format!("persistentvolume {volume:?}: {e}")))?;
        return Ok(dir);
    }
    volume_path(&pv).ok_or_else(|| {
        ConfigError(format!(
            "persistentvolume {volume:?}: only local and hostPath volumes can be mounted on this node"
        ))
    })
}

/// Makes a local-path directory, writable by any user a container runs as
/// (as k3s' provisioner does).
fn make_dir(dir: &Path) -> std::io::Result<()> {
    if !dir.is_dir() {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777))?;
    }
    Ok(())
}

/// Removes the directories of local-path volumes on this node that are
/// being deleted, then their finalizers, for as long as the agent runs.
pub(crate) async fn keep_local_volumes(ctx: Arc<Ctx>) {
    let api: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let selector = format!("{}={}", st::LOCAL_PATH_NODE_LABEL, ctx.config.name);
    let root = ctx.config.local_path_root();
    let stream = watcher(api.clone(), watcher::Config::default().labels(&selector))
        .default_backoff()
        .touched_objects();
    let mut stream = std::pin::pin!(stream);
    loop {
        match stream.try_next().await {
            Ok(Some(pv)) => release(&api, &pv, &root).await,
            Ok(None) => return,
            Err(e) => tracing::debug!(error = %e, "local volume watch error; retrying"),
        }
    }
}

async fn release(api: &Api<PersistentVolume>, pv: &PersistentVolume, root: &Path) {
    let finalizers = pv.metadata.finalizers.clone().unwrap_or_default();
    // Only once the volume is let go (no longer bound: its protection is
    // gone), never under a claim a pod may still use.
    if pv.metadata.deletion_timestamp.is_none()
        || !finalizers.iter().any(|f| f == st::LOCAL_PATH_FINALIZER)
        || finalizers.iter().any(|f| f == st::VOLUME_PROTECTION)
    {
        return;
    }
    let name = pv.metadata.name.clone().unwrap_or_default();
    if let Some(dir) = local_path_dir(pv, root) {
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {
                tracing::info!(volume = %name, dir = %dir.display(), "removed the volume's directory")
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(volume = %name, dir = %dir.display(), error = %e, "cannot remove the volume's directory; keeping its finalizer");
                return;
            }
        }
    }
    let patch = st::without_finalizer(&pv.metadata, st::LOCAL_PATH_FINALIZER);
    if let Err(e) = api
        .patch(&name, &PatchParams::default(), &Patch::Merge(patch))
        .await
    {
        tracing::debug!(volume = %name, error = %e, "cannot release the volume; the watch retries");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pv(path: &str, provisioned: bool) -> PersistentVolume {
        let mut annotations = serde_json::Map::new();
        if provisioned {
            annotations.insert(st::PROVISIONED_BY.into(), json!(st::LOCAL_PATH_PROVISIONER));
        }
        serde_json::from_value(
            json!({"metadata": {"name": "v", "annotations": annotations},
            "spec": {"local": {"path": path}}}),
        )
        .unwrap()
    }

    #[test]
    fn only_a_provisioned_directory_directly_under_the_root_is_the_nodes() {
        let root = Path::new("/data/storage");
        assert_eq!(
            local_path_dir(&pv("/data/storage/pvc-1_ns_c", true), root),
            Some(PathBuf::from("/data/storage/pvc-1_ns_c"))
        );
        assert_eq!(
            local_path_dir(&pv("/data/storage/pvc-1_ns_c", false), root),
            None
        );
        assert_eq!(local_path_dir(&pv("/etc", true), root), None);
        assert_eq!(local_path_dir(&pv("/data/storage/a/b", true), root), None);
        assert_eq!(local_path_dir(&pv("/data/storage", true), root), None);
    }
}
