//! AppArmor for Linux containers, where the node has it. As containerd
//! does, the runtime loads a default profile of its own
//! ([`DEFAULT_PROFILE`], with `apparmor_parser`) when it starts, and each
//! container's OCI spec names the profile runc applies when it starts the
//! container's process: the pod's choice (`RuntimeDefault`, `Localhost`,
//! `Unconfined`), else the default profile, except for a privileged
//! container, which runs unconfined unless its pod names a profile.
//!
//! On a node without AppArmor the agent refuses a pod that asks for a
//! profile before anything of it runs (as the kubelet does), so here such a
//! request is only an error.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use wasmkube_runtime::{AppArmor, Security};

use crate::Error;

/// The name of the runtime's default profile.
pub const DEFAULT_PROFILE: &str = "wasmkube-default";

/// The default profile: everything a container may do in its own
/// namespaces, less what would reach the node through /proc and /sys, and
/// no mounts or ptrace of processes outside the profile.
const DEFAULT_PROFILE_TEXT: &str = r#"# The runtime's default AppArmor profile for Linux containers (written by
# the wasmkube agent; loaded with apparmor_parser when the agent starts).
@{PROC}=/proc/

profile wasmkube-default flags=(attach_disconnected,mediate_deleted) {
  network,
  capability,
  file,
  umount,
  # Signals within the profile, and from unconfined processes (the agent
  # and runc stop containers).
  signal (receive) peer=unconfined,
  signal (send,receive) peer=wasmkube-default,
  ptrace (trace,read,tracedby,readby) peer=wasmkube-default,

  deny mount,
  # /proc: the node's kernel settings and memory.
  deny @{PROC}* w,
  deny @{PROC}sys/[^k]** w,
  deny @{PROC}sys/kernel/{?,??,[^s][^h][^m]**} w,
  deny @{PROC}sysrq-trigger rwklx,
  deny @{PROC}kcore rwklx,
  # /sys: writable only under /sys/fs/cgroup; firmware and the security
  # modules' files not at all.
  deny /sys/[^f]*/** wklx,
  deny /sys/f[^s]*/** wklx,
  deny /sys/fs/[^c]*/** wklx,
  deny /sys/fs/c[^g]*/** wklx,
  deny /sys/fs/cg[^r]*/** wklx,
  deny /sys/firmware/** rwklx,
  deny /sys/kernel/security/** rwklx,
}
"#;

/// Whether the kernel enforces AppArmor here (the module is enabled and
/// its filesystem is mounted), as runc checks it.
pub fn enabled() -> bool {
    std::fs::read_to_string("/sys/module/apparmor/parameters/enabled")
        .is_ok_and(|v| v.starts_with('Y'))
        && fs().is_some()
}

/// AppArmor's directory in the mounted securityfs.
fn fs() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (at, typ) = (f.nth(1)?, f.next()?);
        let dir = Path::new(at).join("apparmor");
        (typ == "securityfs" && dir.is_dir()).then_some(dir)
    })
}

/// The names of the profiles loaded in the kernel (`NAME (mode)` lines of
/// its `profiles` file).
pub fn loaded_profiles() -> std::io::Result<HashSet<String>> {
    let dir = fs().ok_or_else(|| std::io::Error::other("AppArmor's filesystem is not mounted"))?;
    let list = std::fs::read_to_string(dir.join("profiles"))?;
    Ok(list
        .lines()
        .filter_map(|l| l.rfind(" (").map(|i| l[..i].trim().to_owned()))
        .collect())
}

/// AppArmor on this node, as the runtime found it when it started.
#[derive(Debug)]
pub(crate) enum Host {
    Disabled,
    /// Enabled; the default profile loaded, or why it is not.
    Enabled {
        default: Result<(), String>,
    },
}

impl Host {
    /// Finds whether the node has AppArmor and, if it has, loads the
    /// default profile (its text kept under `dir`).
    pub(crate) fn detect(dir: &Path) -> Self {
        if !enabled() {
            return Self::Disabled;
        }
        let default = load_default(dir);
        if let Err(e) = &default {
            tracing::warn!(error = %e, "the default AppArmor profile is not loaded; containers that do not name a profile run without one");
        }
        Self::Enabled { default }
    }

    /// The profile a container runs with (`None`: unconfined).
    pub(crate) fn profile_for(&self, security: &Security) -> Result<Option<String>, Error> {
        match (self, &security.app_armor) {
            (_, Some(AppArmor::Unconfined)) => Ok(None),
            (Self::Disabled, Some(_)) => Err(Error::Config(
                "Cannot enforce AppArmor: AppArmor is not enabled on the host".into(),
            )),
            (Self::Disabled, None) => Ok(None),
            (Self::Enabled { .. }, Some(AppArmor::Localhost(name))) => Ok(Some(name.clone())),
            (Self::Enabled { default }, Some(AppArmor::RuntimeDefault)) => match default {
                Ok(()) => Ok(Some(DEFAULT_PROFILE.to_owned())),
                Err(e) => Err(Error::Config(format!(
                    "the runtime's default AppArmor profile is not loaded: {e}"
                ))),
            },
            (Self::Enabled { .. }, None) if security.privileged => Ok(None),
            (Self::Enabled { default }, None) => {
                Ok(default.is_ok().then(|| DEFAULT_PROFILE.to_owned()))
            }
        }
    }
}

/// AppArmor's profile compiler: where Debian puts it, else on the PATH.
fn parser() -> PathBuf {
    ["/usr/sbin/apparmor_parser", "/sbin/apparmor_parser"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("apparmor_parser"))
}

/// Loads the default profile unless the kernel has it already.
fn load_default(dir: &Path) -> Result<(), String> {
    if loaded_profiles().is_ok_and(|p| p.contains(DEFAULT_PROFILE)) {
        return Ok(());
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let path = dir.join(DEFAULT_PROFILE);
    std::fs::write(&path, DEFAULT_PROFILE_TEXT).map_err(|e| format!("{}: {e}", path.display()))?;
    // -K: no cache; -r: replace a profile of the same name.
    let out = std::process::Command::new(parser())
        .arg("-Kr")
        .arg(&path)
        .output()
        .map_err(|e| format!("apparmor_parser: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "apparmor_parser: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(app_armor: Option<AppArmor>, privileged: bool) -> Security {
        Security {
            app_armor,
            privileged,
            ..Default::default()
        }
    }

    /// The default profile compiles (`apparmor_parser` without loading it
    /// into the kernel: the test machines have the parser, installed by
    /// the test script, but no AppArmor in their kernel).
    #[test]
    fn the_default_profile_compiles() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DEFAULT_PROFILE);
        std::fs::write(&path, DEFAULT_PROFILE_TEXT).unwrap();
        let out = std::process::Command::new(parser())
            // -Q: compile only; -K: no cache; -S: the binary to stdout.
            .args(["-Q", "-K", "-S"])
            .arg(&path)
            .output()
            .expect("apparmor_parser (Debian's apparmor package) runs");
        assert!(
            out.status.success() && !out.stdout.is_empty(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn a_container_gets_the_pods_profile_else_the_default_unless_privileged() {
        let host = Host::Enabled { default: Ok(()) };
        let profile = |a, p| host.profile_for(&with(a, p)).unwrap();
        assert_eq!(profile(None, false).as_deref(), Some(DEFAULT_PROFILE));
        assert_eq!(profile(None, true), None);
        assert_eq!(profile(Some(AppArmor::Unconfined), false), None);
        assert_eq!(
            profile(Some(AppArmor::RuntimeDefault), true).as_deref(),
            Some(DEFAULT_PROFILE)
        );
        assert_eq!(
            profile(Some(AppArmor::Localhost("k8s-x".into())), false).as_deref(),
            Some("k8s-x")
        );
        // No default profile: an explicit RuntimeDefault cannot be had.
        let bare = Host::Enabled {
            default: Err("apparmor_parser: not found".into()),
        };
        assert_eq!(bare.profile_for(&with(None, false)).unwrap(), None);
        assert!(
            bare.profile_for(&with(Some(AppArmor::RuntimeDefault), false))
                .is_err()
        );
        // No AppArmor: only a request for a profile is an error.
        let none = Host::Disabled;
        assert_eq!(none.profile_for(&with(None, false)).unwrap(), None);
        assert!(
            none.profile_for(&with(Some(AppArmor::Localhost("x".into())), false))
                .is_err()
        );
    }
}
