//! Volumes whose files the agent writes from API objects (configMap,
//! secret, downwardAPI and projected volumes), as the kubelet keeps them:
//! written atomically and kept up to date while their pod runs.
//!
//! A volume's files are written the way the kubelet's `AtomicWriter`
//! writes them: into a new hidden directory (`..2026_12_06_08_00_00.N`),
//! then `..data` (a symbolic link to it) is replaced in one rename, and
//! each top-level name is a link through `..data`. A reader, in a Linux
//! container or a Wasm guest, sees the whole old set of files or the whole
//! new one, never a mixture; a key that is gone disappears.
//!
//! While the pod runs, its volumes are computed again every sync period
//! (`Config::sync_frequency`, the kubelet's `--sync-frequency`) and when a
//! projected service-account token is due for renewal, and written again
//! when anything changed: a ConfigMap or Secret edited, a key added or
//! removed, a label or annotation a downwardAPI file shows, a new token.
//! A source that cannot be read keeps the files it had, and a warning is
//! logged; the next period tries again. The ConfigMaps and Secrets read
//! for these updates are shared by the node's pods for one period (the
//! kubelet's cache-based strategy), so a thousand pods mounting
//! `kube-root-ca.crt` cost one read a period, not a thousand; a starting
//! pod always reads its sources afresh.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Volume as VolumeSpec};

use crate::Ctx;
use crate::spec::ConfigError;

/// The files of one volume: path in the volume, bytes and permission bits.
pub(crate) type Payload = BTreeMap<String, (Vec<u8>, u32)>;

/// The link naming the volume's current files.
const DATA: &str = "..data";

/// Whether the volume is one the agent writes from API objects.
pub(crate) fn is_projected(v: &VolumeSpec) -> bool {
    v.config_map.is_some()
        || v.secret.is_some()
        || v.downward_api.is_some()
        || v.projected.is_some()
}

/// Checks a payload path as Kubernetes does: relative, no `..` element,
/// not starting with `..` (the writer's own names).
fn check_path(path: &str) -> Result<(), ConfigError> {
    if path.is_empty()
        || path.starts_with('/')
        || path.starts_with("..")
        || path.split('/').any(|p| p == "..")
    {
        return Err(ConfigError(format!(
            "file path {path:?} must be relative, without '..' and not start with '..'"
        )));
    }
    Ok(())
}

fn io(what: &Path) -> impl Fn(std::io::Error) -> ConfigError + '_ {
    move |e| ConfigError(format!("{}: {e}", what.display()))
}

/// Writes `payload` as `dir`'s files in one step (see the module's
/// documentation), removing what it no longer holds.
pub(crate) fn write_atomic(dir: &Path, payload: &Payload) -> Result<(), ConfigError> {
    for path in payload.keys() {
        check_path(path)?;
    }
    let now = chrono::Utc::now();
    let name = format!(
        "..{}.{}",
        now.format("%Y_%m_%d_%H_%M_%S"),
        now.timestamp_subsec_nanos()
    );
    let staged = dir.join(&name);
    std::fs::create_dir(&staged).map_err(io(&staged))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o755))
            .map_err(io(&staged))?;
    }
    for (path, (data, mode)) in payload {
        let file = staged.join(path);
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        crate::spec::write_with_mode(&file, data, *mode).map_err(io(&file))?;
    }
    let link = dir.join(DATA);
    let old = std::fs::read_link(&link).ok();
    let swap = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&swap);
    std::os::unix::fs::symlink(&name, &swap).map_err(io(&swap))?;
    std::fs::rename(&swap, &link).map_err(io(&link))?;
    // Top-level names lead through `..data`; those no longer there go.
    let top: std::collections::BTreeSet<&str> =
        payload.keys().filter_map(|p| p.split('/').next()).collect();
    for entry in std::fs::read_dir(dir).map_err(io(dir))?.flatten() {
        let entry_name = entry.file_name().to_string_lossy().into_owned();
        if entry_name.starts_with("..") || top.contains(entry_name.as_str()) {
            continue;
        }
        let path = entry.path();
        let removed = match entry.file_type() {
            Ok(t) if t.is_dir() => std::fs::remove_dir_all(&path),
            _ => std::fs::remove_file(&path),
        };
        removed.map_err(io(&path))?;
    }
    for name in top {
        let path = dir.join(name);
        let target = PathBuf::from(DATA).join(name);
        match std::fs::read_link(&path) {
            Ok(t) if t == target => continue,
            // Written before this layout: a plain file or directory.
            Ok(_) | Err(_) if path.symlink_metadata().is_ok() => {
                let removed = if path.is_dir() && !path.is_symlink() {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                };
                removed.map_err(io(&path))?;
            }
            _ => {}
        }
        std::os::unix::fs::symlink(&target, &path).map_err(io(&path))?;
    }
    if let Some(old) = old.filter(|o| o.as_os_str() != name.as_str()) {
        let old = dir.join(old);
        if old.starts_with(dir)
            && old
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(".."))
        {
            let _ = std::fs::remove_dir_all(&old);
        }
    }
    Ok(())
}

/// Objects as read lately (`None`: not found), by namespace and name,
/// with when they were read.
type Reads<T> = Mutex<HashMap<(String, String), (Instant, Option<T>)>>;

/// ConfigMaps and Secrets as read lately.
#[derive(Default)]
pub(crate) struct SourceCache {
    config_maps: Reads<ConfigMap>,
    secrets: Reads<Secret>,
}

/// A read of `ns/name` younger than `fresh_for` from `cache`, else `read`'s
/// (then kept); entries older than twice that are dropped.
async fn cached<T: Clone, F>(
    cache: &Reads<T>,
    ns: &str,
    name: &str,
    fresh_for: Option<Duration>,
    read: F,
) -> Result<Option<T>, ConfigError>
where
    F: std::future::Future<Output = Result<Option<T>, ConfigError>>,
{
    let key = (ns.to_owned(), name.to_owned());
    if let Some(fresh_for) = fresh_for
        && let Some((at, value)) = cache.lock().expect("not poisoned").get(&key)
        && at.elapsed() < fresh_for
    {
        return Ok(value.clone());
    }
    let value = read.await?;
    let mut map = cache.lock().expect("not poisoned");
    if let Some(keep) = fresh_for {
        map.retain(|_, (at, _)| at.elapsed() < keep * 2);
    }
    map.insert(key, (Instant::now(), value.clone()));
    Ok(value)
}

impl SourceCache {
    async fn config_map(
        &self,
        ctx: &Ctx,
        ns: &str,
        name: &str,
        fresh_for: Option<Duration>,
    ) -> Result<Option<ConfigMap>, ConfigError> {
        let read = crate::spec::config_map(ctx, ns, name);
        cached(&self.config_maps, ns, name, fresh_for, read).await
    }

    async fn secret(
        &self,
        ctx: &Ctx,
        ns: &str,
        name: &str,
        fresh_for: Option<Duration>,
    ) -> Result<Option<Secret>, ConfigError> {
        let read = crate::spec::secret(ctx, ns, name);
        cached(&self.secrets, ns, name, fresh_for, read).await
    }
}

/// How soon a source that could not be read is tried again.
const RETRY: Duration = Duration::from_secs(10);

/// One such volume of a running pod: where it is, what it is made of and
/// what was last written.
pub(crate) struct Projected {
    dir: PathBuf,
    volume: VolumeSpec,
    /// When each of a projected volume's service-account tokens (by path)
    /// is replaced; until then it is read back from the volume.
    tokens: BTreeMap<String, SystemTime>,
    /// A digest of the files last written (a pod keeps no copy of them:
    /// thousands of pods each hold one).
    written: Option<u64>,
}

impl Projected {
    pub(crate) fn new(dir: PathBuf, volume: VolumeSpec) -> Self {
        Self {
            dir,
            volume,
            tokens: BTreeMap::new(),
            written: None,
        }
    }

    /// Computes the volume's files from the cluster as it is now (`fresh`:
    /// every source read now, else reads of this period shared with the
    /// node's other pods) and writes them if they changed; whether they did.
    pub(crate) async fn refresh(
        &mut self,
        ctx: &Ctx,
        pod: &Pod,
        fresh: bool,
    ) -> Result<bool, ConfigError> {
        let fresh_for = (!fresh).then_some(ctx.config.sync_frequency);
        let payload = self.payload(ctx, pod, fresh_for).await?;
        let digest = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            payload.hash(&mut h);
            h.finish()
        };
        if self.written == Some(digest) {
            return Ok(false);
        }
        write_atomic(&self.dir, &payload)?;
        self.written = Some(digest);
        Ok(true)
    }

    /// When the next of its tokens is due.
    fn next_token(&self) -> Option<SystemTime> {
        self.tokens.values().min().copied()
    }

    /// Whether a file shows the pod's labels or annotations (its metadata
    /// that can change).
    fn shows_pod_metadata(&self) -> bool {
        let items = self
            .volume
            .downward_api
            .iter()
            .flat_map(|d| d.items.iter().flatten())
            .chain(
                self.volume
                    .projected
                    .iter()
                    .flat_map(|p| p.sources.iter().flatten())
                    .flat_map(|s| s.downward_api.iter())
                    .flat_map(|d| d.items.iter().flatten()),
            );
        items.into_iter().any(|i| {
            i.field_ref.as_ref().is_some_and(|f| {
                f.field_path.starts_with("metadata.labels")
                    || f.field_path.starts_with("metadata.annotations")
            })
        })
    }

    async fn payload(
        &mut self,
        ctx: &Ctx,
        pod: &Pod,
        fresh_for: Option<Duration>,
    ) -> Result<Payload, ConfigError> {
        use crate::spec::{file_mode, keyed_files};
        let ns = crate::spec::pod_ns(pod);
        let mut out = Payload::new();
        let mut add = |files: Vec<crate::spec::VolumeFile>| {
            for (path, data, mode) in files {
                out.insert(path, (data, mode));
            }
        };
        let v = &self.volume;
        if let Some(src) = &v.config_map {
            match ctx
                .sources
                .config_map(ctx, ns, &src.name, fresh_for)
                .await?
            {
                Some(cm) => add(keyed_files(
                    &crate::spec::config_map_data(&cm),
                    src.items.as_ref(),
                    src.default_mode,
                    &format!("configmap {:?}", src.name),
                )?),
                None if src.optional == Some(true) => {}
                None => return Err(ConfigError(format!("configmap {:?} not found", src.name))),
            }
        } else if let Some(src) = &v.secret {
            let name = src.secret_name.clone().unwrap_or_default();
            match ctx.sources.secret(ctx, ns, &name, fresh_for).await? {
                Some(s) => add(keyed_files(
                    &crate::spec::secret_data(&s),
                    src.items.as_ref(),
                    src.default_mode,
                    &format!("secret {name:?}"),
                )?),
                None if src.optional == Some(true) => {}
                None => return Err(ConfigError(format!("secret {name:?} not found"))),
            }
        } else if let Some(src) = &v.downward_api {
            add(crate::spec::downward_files(
                ctx,
                pod,
                src.items.as_deref().unwrap_or_default(),
                src.default_mode,
            )?);
        } else if let Some(src) = &v.projected {
            for s in src.sources.iter().flatten() {
                if let Some(cm) = &s.config_map {
                    match ctx.sources.config_map(ctx, ns, &cm.name, fresh_for).await? {
                        Some(obj) => add(keyed_files(
                            &crate::spec::config_map_data(&obj),
                            cm.items.as_ref(),
                            src.default_mode,
                            &format!("configmap {:?}", cm.name),
                        )?),
                        None if cm.optional == Some(true) => {}
                        None => {
                            return Err(ConfigError(format!("configmap {:?} not found", cm.name)));
                        }
                    }
                }
                if let Some(sec) = &s.secret {
                    match ctx.sources.secret(ctx, ns, &sec.name, fresh_for).await? {
                        Some(obj) => add(keyed_files(
                            &crate::spec::secret_data(&obj),
                            sec.items.as_ref(),
                            src.default_mode,
                            &format!("secret {:?}", sec.name),
                        )?),
                        None if sec.optional == Some(true) => {}
                        None => {
                            return Err(ConfigError(format!("secret {:?} not found", sec.name)));
                        }
                    }
                }
                if let Some(d) = &s.downward_api {
                    add(crate::spec::downward_files(
                        ctx,
                        pod,
                        d.items.as_deref().unwrap_or_default(),
                        src.default_mode,
                    )?);
                }
                if let Some(t) = &s.service_account_token {
                    let due = self
                        .tokens
                        .get(&t.path)
                        .is_none_or(|at| *at <= SystemTime::now());
                    let written = self.dir.join(DATA).join(&t.path);
                    let kept = if due {
                        None
                    } else {
                        std::fs::read(&written).ok()
                    };
                    let token = match kept {
                        Some(token) => token,
                        None => {
                            let issued = crate::spec::service_account_token(ctx, pod, t).await?;
                            let at = issued.refresh_at(ctx.config.token_refresh);
                            self.tokens.insert(t.path.clone(), at);
                            issued.token.into_bytes()
                        }
                    };
                    add(vec![(
                        t.path.clone(),
                        token,
                        file_mode(None, src.default_mode),
                    )]);
                }
            }
        }
        Ok(out)
    }
}

/// Keeps a running pod's such volumes up to date (see the module's
/// documentation); runs until aborted with the pod.
pub(crate) async fn keep_fresh(ctx: Arc<Ctx>, mut pod: Arc<Pod>, mut volumes: Vec<Projected>) {
    if volumes.is_empty() {
        return;
    }
    let every = ctx.config.sync_frequency;
    let metadata = volumes.iter().any(Projected::shows_pod_metadata);
    let mut next = SystemTime::now() + every;
    loop {
        let wake = volumes
            .iter()
            .filter_map(Projected::next_token)
            .fold(next, SystemTime::min);
        tokio::time::sleep(wake.duration_since(SystemTime::now()).unwrap_or_default()).await;
        next = SystemTime::now() + every;
        if metadata {
            let api: kube::Api<Pod> =
                kube::Api::namespaced(ctx.client.clone(), crate::spec::pod_ns(&pod));
            match api
                .get_opt(pod.metadata.name.as_deref().unwrap_or_default())
                .await
            {
                Ok(Some(now)) if now.metadata.uid == pod.metadata.uid => pod = Arc::new(now),
                Ok(_) => return,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot read the pod for its downward API files")
                }
            }
        }
        for v in &mut volumes {
            match v.refresh(&ctx, &pod, false).await {
                Ok(true) => {
                    tracing::debug!(pod = ?pod.metadata.name, volume = v.volume.name, "volume files updated")
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(pod = ?pod.metadata.name, volume = v.volume.name, error = %e.0, "cannot update the volume's files");
                    next = next.min(SystemTime::now() + RETRY);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(files: &[(&str, &str, u32)]) -> Payload {
        files
            .iter()
            .map(|(p, d, m)| ((*p).to_owned(), (d.as_bytes().to_vec(), *m)))
            .collect()
    }

    #[tokio::test]
    async fn reads_are_shared_for_a_period_and_a_starting_pod_reads_afresh() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let cache = Mutex::default();
        let reads = AtomicUsize::new(0);
        let read = || async { Ok::<_, ConfigError>(Some(reads.fetch_add(1, Ordering::SeqCst))) };
        let minute = Some(Duration::from_secs(60));
        assert_eq!(
            cached(&cache, "ns", "a", minute, read()).await.unwrap(),
            Some(0)
        );
        assert_eq!(
            cached(&cache, "ns", "a", minute, read()).await.unwrap(),
            Some(0)
        );
        assert_eq!(
            cached(&cache, "ns", "b", minute, read()).await.unwrap(),
            Some(1)
        );
        // Fresh: read now, and kept for the others.
        assert_eq!(
            cached(&cache, "ns", "a", None, read()).await.unwrap(),
            Some(2)
        );
        assert_eq!(
            cached(&cache, "ns", "a", minute, read()).await.unwrap(),
            Some(2)
        );
        // Older than the period: read again.
        let zero = Some(Duration::ZERO);
        assert_eq!(
            cached(&cache, "ns", "a", zero, read()).await.unwrap(),
            Some(3)
        );
    }

    #[test]
    fn files_are_swapped_whole_and_removed_keys_go() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // What an earlier agent wrote in place is replaced.
        std::fs::write(d.join("old"), "plain").unwrap();
        write_atomic(d, &payload(&[("a", "1", 0o644), ("sub/b", "2", 0o400)])).unwrap();
        assert_eq!(std::fs::read_to_string(d.join("a")).unwrap(), "1");
        assert_eq!(std::fs::read_to_string(d.join("sub/b")).unwrap(), "2");
        assert_eq!(
            std::fs::read_link(d.join("a")).unwrap(),
            Path::new("..data/a")
        );
        let mode = std::fs::metadata(d.join("sub/b"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o400);
        assert!(!d.join("old").exists());
        let first = std::fs::read_link(d.join(DATA)).unwrap();
        write_atomic(d, &payload(&[("a", "changed", 0o644), ("c", "3", 0o644)])).unwrap();
        assert_eq!(std::fs::read_to_string(d.join("a")).unwrap(), "changed");
        assert_eq!(std::fs::read_to_string(d.join("c")).unwrap(), "3");
        assert!(
            d.join("sub").symlink_metadata().is_err(),
            "a removed key goes"
        );
        assert!(!d.join(first).exists(), "the old files go");
        let mut names: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with("..2"))
            .collect();
        names.sort();
        assert_eq!(names, ["..data", "a", "c"]);
        assert!(write_atomic(d, &payload(&[("../x", "", 0o644)])).is_err());
        assert!(write_atomic(d, &payload(&[("..data", "", 0o644)])).is_err());
    }
}
