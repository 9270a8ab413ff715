//! Linux containers from ordinary OCI images, run by `runc`: the second
//! implementation of the node's [`Runtime`] trait, beside the in-process
//! Wasm runtime.
//!
//! An image's layers are unpacked once per node into a shared read-only
//! root ([`rootfs`]); each container gets an overlay over it, a runtime spec
//! written from the image config and the pod ([`spec`]), and a cgroup with
//! its limits ([`cgroup`]). `runc run` stays the container's parent for its
//! life, so its exit status is the container's, with the container's stdio
//! passed straight through to the agent's log pipes.
//!
//! This is the only crate that touches runc, cgroups and namespaces.

pub mod apparmor;
pub mod cgroup;
mod exec;
pub mod net;
mod netlink;
pub mod rootfs;
pub mod spec;
mod userns;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use oci_spec::image::ImageConfiguration;
use sha2::{Digest, Sha256};
use wasmkube_runtime::{
    Container, ContainerConfig, Error as RuntimeError, Exit, Image, ImageKind, Output, Runtime,
    Usage,
};

use cgroup::Cgroup;

/// The RuntimeClass handler this runtime serves.
pub const HANDLER: &str = "runc";

/// How long a start may take before the container is reported started
/// anyway (its exit, if it fails, is reported as usual).
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How often runc's state is asked for while a container starts.
const START_POLL: Duration = Duration::from_millis(2);

/// How often a running container's cgroup is read into its usage counters.
const USAGE_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Image(String),
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Setup(String),
    #[error("the runc runtime is unavailable: {0}")]
    Unavailable(String),
}

impl Error {
    fn io(path: impl AsRef<Path>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.as_ref().to_path_buf();
        move |source| Self::Io { path, source }
    }
}

impl From<Error> for RuntimeError {
    fn from(e: Error) -> Self {
        match e {
            Error::Image(m) => Self::InvalidImage(m),
            Error::Config(m) => Self::Config(m),
            other => Self::Setup(other.to_string()),
        }
    }
}

/// Settings of the Linux runtime.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where unpacked images, container bundles and runc's state live.
    pub root: PathBuf,
    /// The runc binary.
    pub runc: PathBuf,
    /// Whether `securityContext.privileged` containers may run.
    pub allow_privileged: bool,
    /// Processes a container may have at once.
    pub pids_limit: i64,
}

impl Config {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            runc: PathBuf::from("runc"),
            allow_privileged: false,
            pids_limit: 4096,
        }
    }
}

/// Runs Linux images with runc.
pub struct LinuxRuntime {
    config: Config,
    version: String,
    app_armor: apparmor::Host,
    /// One unpacking at a time per image.
    unpacking: Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>,
}

impl std::fmt::Debug for LinuxRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinuxRuntime")
            .field("root", &self.config.root)
            .field("version", &self.version)
            .finish()
    }
}

impl LinuxRuntime {
    /// Checks that runc runs here (root is needed) and removes what an
    /// earlier agent left behind: its containers are not this agent's, so
    /// they are killed and deleted, their mounts and bundles removed (pods
    /// still bound to the node start again from their workers).
    pub fn new(config: Config) -> Result<Self, Error> {
        if !rustix::process::geteuid().is_root() {
            return Err(Error::Unavailable("the agent does not run as root".into()));
        }
        let out = std::process::Command::new(&config.runc)
            .arg("--version")
            .output()
            .map_err(|e| Error::Unavailable(format!("{}: {e}", config.runc.display())))?;
        let version = String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("runc version "))
            .unwrap_or("unknown")
            .to_owned();
        for d in ["images", "containers", "state"] {
            let dir = config.root.join(d);
            std::fs::create_dir_all(&dir).map_err(Error::io(&dir))?;
        }
        let app_armor = apparmor::Host::detect(&config.root.join("apparmor"));
        let rt = Self {
            config,
            version,
            app_armor,
            unpacking: Mutex::default(),
        };
        rt.remove_leftovers();
        Ok(rt)
    }

    /// runc's version, for the node's `containerRuntimeVersion`.
    pub fn version(&self) -> &str {
        &self.version
    }

    fn runc(&self) -> std::process::Command {
        let mut c = std::process::Command::new(&self.config.runc);
        c.arg("--root").arg(self.config.root.join("state"));
        c
    }

    fn remove_leftovers(&self) {
        let listed = self.runc().args(["list", "--quiet"]).output();
        for id in listed
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.is_empty())
        {
            tracing::info!(
                container = id,
                "removing a container left by an earlier agent"
            );
            let _ = self.runc().args(["delete", "--force", id]).output();
        }
        let containers = self.config.root.join("containers");
        for m in rootfs::mounts_under(&containers) {
            if let Err(e) = rootfs::unmount(&m) {
                tracing::warn!(error = %e, "cannot remove a leftover mount");
            }
        }
        if let Ok(dirs) = std::fs::read_dir(&containers) {
            for d in dirs.flatten() {
                if let Err(e) = remove_bundle(&d.path()) {
                    tracing::warn!(error = %e, "cannot remove a leftover container bundle");
                }
            }
        }
    }

    fn image_root(&self, image: &Image) -> PathBuf {
        let key = format!("{:x}", Sha256::digest(image.id.as_bytes()));
        self.config.root.join("images").join(key).join("rootfs")
    }

    async fn unpacked(&self, image: &Image) -> Result<PathBuf, Error> {
        let ImageKind::Linux { layers, .. } = &image.kind else {
            return Err(Error::Image(format!(
                "{} is a Wasm image; the runc runtime runs Linux images",
                image.reference
            )));
        };
        let root = self.image_root(image);
        let lock = self
            .unpacking
            .lock()
            .expect("unpacking")
            .entry(root.clone())
            .or_default()
            .clone();
        let _held = lock.lock().await;
        if root.exists() {
            return Ok(root);
        }
        let (layers, dest) = (layers.clone(), root.clone());
        tokio::task::spawn_blocking(move || {
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent).map_err(Error::io(parent))?;
            }
            rootfs::unpack(&layers, &dest)
        })
        .await
        .map_err(|e| Error::Setup(format!("unpacking: {e}")))??;
        tracing::info!(image = %image.reference, "unpacked image");
        Ok(root)
    }

    async fn create(&self, config: ContainerConfig) -> Result<LinuxContainer, Error> {
        let image_root = self.unpacked(&config.image).await?;
        let ImageKind::Linux {
            config: image_config,
            ..
        } = &config.image.kind
        else {
            unreachable!("unpacked() accepts Linux images only");
        };
        let image = ImageConfiguration::from_file(image_config)
            .map_err(|e| Error::Image(format!("the image config: {e}")))?;
        let bundle = self.config.root.join("containers").join(&config.id);
        if bundle.exists() {
            remove_bundle(&bundle)?;
        }
        std::fs::create_dir_all(&bundle).map_err(Error::io(&bundle))?;
        let rootfs_dir = bundle.join("rootfs");
        let config_id = config.id.clone();
        let result = self
            .configure(&config, &image, &image_root, &bundle, &rootfs_dir)
            .and_then(|()| self.spawn(config, &bundle));
        if result.is_err()
            && let Err(e) = remove_bundle(&bundle)
        {
            tracing::warn!(container = %config_id, error = %e, "cannot remove a failed container's bundle");
        }
        result
    }

    /// Writes the bundle: root filesystem, /etc files, config.json.
    fn configure(
        &self,
        config: &ContainerConfig,
        image: &ImageConfiguration,
        image_root: &Path,
        bundle: &Path,
        rootfs_dir: &Path,
    ) -> Result<(), Error> {
        let hosts = bundle.join("hosts");
        let hostname = bundle.join("hostname");
        let resolv = bundle.join("resolv.conf");
        let write = |p: &Path, s: String| std::fs::write(p, s).map_err(Error::io(p));
        write(
            &hosts,
            format!(
                "# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{}\t{}\n",
                config.pod_ip, config.hostname
            ),
        )?;
        write(&hostname, format!("{}\n", config.hostname))?;
        write(
            &resolv,
            match &config.resolv_conf {
                Some(conf) => conf.clone(),
                None => std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
            },
        )?;
        // In a user namespace of its own, the container sees the image and
        // its volumes through idmapped mounts, and owns what it writes.
        let (lower, volumes) = match config.user_namespace {
            Some(range) => {
                let userns = userns::namespace(range)?;
                let lower = bundle.join("lower");
                for dir in [&lower, &bundle.join("upper"), &bundle.join("work")] {
                    std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
                }
                let own = |p: &Path| {
                    std::os::unix::fs::chown(p, Some(range.host_id), Some(range.host_id))
                        .map_err(Error::io(p))
                };
                for p in [
                    &bundle.join("upper"),
                    &bundle.join("work"),
                    &hosts,
                    &hostname,
                    &resolv,
                ] {
                    own(p)?;
                }
                userns::idmapped("the image's root", image_root, &lower, &userns)?;
                let volumes = idmapped_volumes(config, bundle, &userns)?;
                (lower, volumes)
            }
            None => (
                image_root.to_path_buf(),
                config.mounts.iter().map(|m| m.host_path.clone()).collect(),
            ),
        };
        rootfs::mount_overlay(
            &lower,
            &bundle.join("upper"),
            &bundle.join("work"),
            rootfs_dir,
        )?;
        let cgroups_path = format!("/wasmkube/{}", config.id);
        let app_armor = self.app_armor.profile_for(&config.security)?;
        let spec = spec::build(&spec::Inputs {
            config,
            image,
            image_root,
            rootfs: rootfs_dir,
            etc: [
                ("/etc/hosts", hosts),
                ("/etc/hostname", hostname),
                ("/etc/resolv.conf", resolv),
            ],
            volumes: &volumes,
            app_armor: app_armor.as_deref(),
            cgroups_path: &cgroups_path,
            netns: config.netns.as_deref(),
            allow_privileged: self.config.allow_privileged,
            pids_limit: self.config.pids_limit,
        })?;
        let path = bundle.join("config.json");
        spec.save(&path)
            .map_err(|e| Error::Setup(format!("writing {}: {e}", path.display())))
    }

    fn spawn(&self, config: ContainerConfig, bundle: &Path) -> Result<LinuxContainer, Error> {
        let fd = |o: Output| match o {
            Output::File(f) => Ok(f),
            Output::Sink(_) => Err(Error::Setup(
                "a Linux container's output needs a file descriptor, not an in-process sink".into(),
            )),
        };
        let (stdout, stderr) = (fd(config.stdout)?, fd(config.stderr)?);
        let mut cmd = tokio::process::Command::from(self.runc());
        cmd.arg("run")
            .arg("--keep")
            .arg("--bundle")
            .arg(bundle)
            .arg(&config.id);
        // runc run in the foreground copies between its stdio and the
        // container's: pipes, or, for a container with a terminal (which
        // runc makes inside it), the slave end of the agent's terminal.
        cmd.stdin(config.stdin.map_or_else(Stdio::null, Stdio::from))
            .stdout(stdout)
            .stderr(stderr);
        let child = cmd
            .spawn()
            .map_err(|e| Error::Setup(format!("starting runc: {e}")))?;
        // Only runc holds the container's stdio now, so its output ends when
        // the container does.
        drop(cmd);
        let terminal = config.tty.then(|| resized(child.id()));
        let cgroup = Cgroup::new(format!("/wasmkube/{}", config.id));
        let usage = tokio::spawn(track_usage(cgroup.clone(), config.usage.clone()));
        Ok(LinuxContainer {
            id: config.id,
            runc: self.config.runc.clone(),
            state: self.config.root.join("state"),
            bundle: bundle.to_path_buf(),
            child,
            cgroup,
            usage,
            exit: None,
            terminal,
        })
    }
}

/// How runc learns its terminal was resized (the agent set the new size
/// on it): `SIGWINCH`, which it passes on to the container's own terminal.
fn resized(runc: Option<u32>) -> wasmkube_runtime::Resize {
    let pid = runc.and_then(|p| rustix::process::Pid::from_raw(p as i32));
    wasmkube_runtime::Resize(Arc::new(move |_, _| {
        if let Some(pid) = pid {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::WINCH);
        }
    }))
}

/// Mounts each of the container's volumes idmapped in its bundle
/// (`volumes/N`, for the container's N-th mount), and gives where, to be
/// bound into the container from there.
fn idmapped_volumes(
    config: &ContainerConfig,
    bundle: &Path,
    userns: &std::os::fd::OwnedFd,
) -> Result<Vec<PathBuf>, Error> {
    let dir = bundle.join("volumes");
    std::fs::create_dir_all(&dir).map_err(Error::io(&dir))?;
    let mut staged = Vec::with_capacity(config.mounts.len());
    for (n, m) in config.mounts.iter().enumerate() {
        let at = dir.join(n.to_string());
        let made = if m.host_path.is_dir() {
            std::fs::create_dir(&at)
        } else {
            std::fs::File::create(&at).map(drop)
        };
        made.map_err(Error::io(&at))?;
        let what = format!("the volume mounted at {}", m.container_path);
        userns::idmapped(&what, &m.host_path, &at, userns)?;
        staged.push(at);
    }
    Ok(staged)
}

/// Unmounts everything mounted in a container's bundle (its root
/// filesystem, the idmapped image root and volumes), deepest first.
fn unmount_bundle(bundle: &Path) -> Result<(), Error> {
    for m in rootfs::mounts_under(bundle) {
        rootfs::unmount(&m)?;
    }
    Ok(())
}

/// Removes a container's bundle, once nothing is mounted in it: a volume
/// still mounted there is the pod's data, never to be deleted with it.
fn remove_bundle(bundle: &Path) -> Result<(), Error> {
    unmount_bundle(bundle)?;
    if let Some(m) = rootfs::mounts_under(bundle).first() {
        return Err(Error::Setup(format!(
            "{} is still mounted; the bundle is kept",
            m.display()
        )));
    }
    match std::fs::remove_dir_all(bundle) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(bundle)(e)),
        _ => Ok(()),
    }
}

async fn track_usage(cgroup: Cgroup, usage: Arc<Usage>) {
    let mut last = Duration::ZERO;
    loop {
        if let Some(cpu) = cgroup.cpu() {
            usage.add_cpu(cpu.saturating_sub(last));
            last = last.max(cpu);
        }
        if let Some(m) = cgroup.working_set() {
            usage.set_memory(m);
        }
        tokio::time::sleep(USAGE_INTERVAL).await;
    }
}

#[async_trait::async_trait]
impl Runtime for LinuxRuntime {
    fn handler(&self) -> &str {
        HANDLER
    }

    async fn prepare(&self, image: &Image) -> Result<(), RuntimeError> {
        self.unpacked(image).await.map(drop).map_err(|e| match e {
            Error::Image(m) if image.is_wasm() => RuntimeError::Unsupported(m),
            e => e.into(),
        })
    }

    async fn start(&self, config: ContainerConfig) -> Result<Box<dyn Container>, RuntimeError> {
        let mut container = self.create(config).await?;
        container.until_started().await;
        Ok(Box::new(container))
    }
}

/// A container run by `runc run`, its parent for its whole life.
struct LinuxContainer {
    id: String,
    runc: PathBuf,
    state: PathBuf,
    bundle: PathBuf,
    child: tokio::process::Child,
    cgroup: Cgroup,
    usage: tokio::task::JoinHandle<()>,
    exit: Option<Exit>,
    /// Tells runc its terminal was resized (`tty: true`).
    terminal: Option<wasmkube_runtime::Resize>,
}

impl LinuxContainer {
    fn runc(&self) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(&self.runc);
        c.arg("--root").arg(&self.state);
        c.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        c
    }

    /// Resolves once runc says the container's process runs (or it has
    /// already ended): a container is reported Running only then, not when
    /// runc was merely spawned.
    async fn until_started(&mut self) {
        let deadline = std::time::Instant::now() + START_TIMEOUT;
        while std::time::Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            let state = self
                .runc()
                .args(["state", &self.id])
                .stdout(Stdio::piped())
                .output()
                .await;
            let status = state
                .ok()
                .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
                .and_then(|v| v["status"].as_str().map(str::to_owned));
            if matches!(status.as_deref(), Some("running" | "stopped")) {
                return;
            }
            tokio::time::sleep(START_POLL).await;
        }
    }

    /// Sends a signal to every process of the container, without waiting.
    fn signal(&self, signal: &str) {
        let mut cmd = self.runc();
        cmd.args(["kill", "--all", &self.id, signal]);
        tokio::spawn(async move {
            let _ = cmd.status().await;
        });
    }

    /// Removes the container's state, cgroup, mount and bundle.
    async fn clean_up(&self) {
        let deleted = self
            .runc()
            .args(["delete", "--force", &self.id])
            .status()
            .await;
        if !deleted.is_ok_and(|s| s.success()) {
            tracing::warn!(container = %self.id, "runc delete failed");
        }
        if let Err(e) = remove_bundle(&self.bundle) {
            tracing::warn!(container = %self.id, error = %e, "cannot remove the container's bundle");
        }
    }
}

impl Drop for LinuxContainer {
    /// A handle dropped before its container ended (its task failed, say)
    /// must not leave the container running without an owner: it is
    /// removed, synchronously and best effort.
    fn drop(&mut self) {
        self.usage.abort();
        if self.exit.is_some() {
            return;
        }
        let _ = std::process::Command::new(&self.runc)
            .arg("--root")
            .arg(&self.state)
            .args(["delete", "--force", &self.id])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if let Err(e) = remove_bundle(&self.bundle) {
            tracing::warn!(container = %self.id, error = %e, "cannot remove the container's bundle");
        }
        tracing::warn!(container = %self.id, "removed a container whose handle was dropped while it ran");
    }
}

#[async_trait::async_trait]
impl Container for LinuxContainer {
    async fn wait(&mut self) -> Exit {
        if let Some(exit) = &self.exit {
            return exit.clone();
        }
        let status = self.child.wait().await;
        self.usage.abort();
        // Read before the cgroup goes away with the delete.
        let oom = self.cgroup.oom_kills() > 0;
        self.clean_up().await;
        let exit = match status {
            Err(e) => Exit {
                code: 128,
                reason: "Error".into(),
                message: Some(format!("waiting for runc: {e}")),
            },
            Ok(_) if oom => Exit {
                code: 137,
                reason: "OOMKilled".into(),
                message: None,
            },
            Ok(s) => {
                use std::os::unix::process::ExitStatusExt;
                Exit::code(s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0)))
            }
        };
        self.exit = Some(exit.clone());
        exit
    }

    fn terminate(&mut self) -> bool {
        self.signal("TERM");
        true
    }

    fn kill(&mut self) {
        self.signal("KILL");
    }

    fn exec(&self) -> Option<std::sync::Arc<dyn wasmkube_runtime::Exec>> {
        Some(std::sync::Arc::new(exec::RuncExec {
            runc: self.runc.clone(),
            state: self.state.clone(),
            id: self.id.clone(),
        }))
    }

    fn terminal(&self) -> Option<wasmkube_runtime::Resize> {
        self.terminal.clone()
    }
}
