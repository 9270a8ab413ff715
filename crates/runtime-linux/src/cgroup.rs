//! A container's cgroup, as runc creates it from the spec's `cgroupsPath`
//! with its cgroupfs driver: under every v1 controller on legacy and hybrid
//! hosts (where memory and cpu are v1), or in the unified v2 hierarchy.

use std::path::{Path, PathBuf};
use std::time::Duration;

const ROOT: &str = "/sys/fs/cgroup";

/// The cgroup of one container, by its path below the hierarchy root.
#[derive(Clone, Debug)]
pub struct Cgroup {
    path: String,
    unified: bool,
}

impl Cgroup {
    /// `path` as written into the spec's `cgroupsPath` (`/wasmkube/<id>`).
    pub fn new(path: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            unified: Path::new(ROOT).join("cgroup.controllers").exists(),
        }
    }

    fn file(&self, controller: &str, name: &str) -> PathBuf {
        let rel = self.path.trim_start_matches('/');
        if self.unified {
            Path::new(ROOT).join(rel).join(name)
        } else {
            Path::new(ROOT).join(controller).join(rel).join(name)
        }
    }

    fn read(&self, controller: &str, name: &str) -> Option<String> {
        std::fs::read_to_string(self.file(controller, name)).ok()
    }

    fn stat(&self, controller: &str, name: &str, key: &str) -> Option<u64> {
        self.read(controller, name)?.lines().find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == key).then(|| v.trim().parse().ok())?
        })
    }

    /// CPU time used by everything in the cgroup.
    pub fn cpu(&self) -> Option<Duration> {
        if self.unified {
            self.stat("cpu", "cpu.stat", "usage_usec")
                .map(Duration::from_micros)
        } else {
            let ns = self.read("cpuacct", "cpuacct.usage")?.trim().parse().ok()?;
            Some(Duration::from_nanos(ns))
        }
    }

    /// The working set as the kubelet computes it: usage less inactive
    /// file pages.
    pub fn working_set(&self) -> Option<u64> {
        let (usage, inactive) = if self.unified {
            (
                self.read("memory", "memory.current")?
                    .trim()
                    .parse::<u64>()
                    .ok()?,
                self.stat("memory", "memory.stat", "inactive_file"),
            )
        } else {
            (
                self.read("memory", "memory.usage_in_bytes")?
                    .trim()
                    .parse::<u64>()
                    .ok()?,
                self.stat("memory", "memory.stat", "total_inactive_file"),
            )
        };
        Some(usage.saturating_sub(inactive.unwrap_or(0)))
    }

    /// How many times the kernel's OOM killer killed a process here.
    pub fn oom_kills(&self) -> u64 {
        if self.unified {
            self.stat("memory", "memory.events", "oom_kill")
        } else {
            self.stat("memory", "memory.oom_control", "oom_kill")
        }
        .unwrap_or(0)
    }

    /// Whether the cgroup still exists anywhere (after a delete, it must not).
    pub fn exists(&self) -> bool {
        self.file("memory", "").exists() || self.file("pids", "").exists()
    }
}
