//! The precompiled-module cache: one compiled artifact per module digest and
//! engine, on disk under the node's data dir, shared by every pod.
//!
//! The cold path is the one that matters: fifty pods of a module this node
//! has never run all ask for it at once. So:
//!
//! - compilation is **single-flight** per artifact: the first caller
//!   compiles, every other caller for the same key waits for it and then
//!   loads what it wrote;
//! - an artifact is written under a unique temporary name, synced, and
//!   renamed into place, so no reader (in this process or another agent's on
//!   the same directory) ever maps a file that is still being written, and a
//!   crash leaves no torn artifact under the real name;
//! - every artifact has a seal beside it (`.sha256`, the artifact's digest),
//!   written before the artifact is renamed into place and checked before it
//!   is mapped: a truncated, corrupt or unsealed file is compiled again,
//!   never trusted and never a pod's failure.
//!
//! Compilation is deterministic for a given engine, so two processes that
//! race to fill the same key write identical bytes and either rename wins.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

use crate::Error;

/// Temporary names are unique within a process by this counter.
static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

pub(crate) struct ModuleCache {
    dir: PathBuf,
    /// What makes compiled code compatible with the engine (part of every key).
    compatibility: u64,
    /// Keys being filled, each with the lock its fillers queue on.
    filling: Mutex<HashMap<PathBuf, Arc<Mutex<()>>>>,
    compiled: AtomicU64,
    /// Artifacts loaded from the cache instead of compiled.
    loaded: AtomicU64,
    /// Time spent compiling, in nanoseconds.
    compile_nanos: AtomicU64,
}

/// How a module was had from the cache: compiled now (and how long that
/// took) or found there, how long loading its native code took, and that
/// code's size.
#[derive(Clone, Copy, Debug)]
pub struct Provenance {
    pub compiled_in: Option<std::time::Duration>,
    pub loaded_in: std::time::Duration,
    pub native_bytes: u64,
}

impl std::fmt::Debug for ModuleCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModuleCache")
            .field("dir", &self.dir)
            .field("compiled", &self.compiled.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl ModuleCache {
    pub(crate) fn open(dir: PathBuf, engine: &wasmtime::Engine) -> Result<Self, Error> {
        std::fs::create_dir_all(&dir).map_err(|source| Error::Cache {
            path: dir.clone(),
            source,
        })?;
        let mut h = std::hash::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        Ok(Self {
            dir,
            compatibility: h.finish(),
            filling: Mutex::default(),
            compiled: AtomicU64::new(0),
            loaded: AtomicU64::new(0),
            compile_nanos: AtomicU64::new(0),
        })
    }

    /// How many modules this cache compiled (rather than loaded).
    pub(crate) fn compiled(&self) -> u64 {
        self.compiled.load(Ordering::Relaxed)
    }

    /// Compiles, loads from the cache, and the seconds spent compiling.
    pub(crate) fn stats(&self) -> (u64, u64, f64) {
        (
            self.compiled.load(Ordering::Relaxed),
            self.loaded.load(Ordering::Relaxed),
            self.compile_nanos.load(Ordering::Relaxed) as f64 / 1e9,
        )
    }

    fn artifact_path(&self, bytes: &[u8]) -> PathBuf {
        let hex = hex(&Sha256::digest(bytes));
        self.dir
            .join(format!("{hex}-{:016x}.cwasm", self.compatibility))
    }

    /// The module for `bytes`: loaded from its sealed artifact, or compiled
    /// by `precompile` (once, whoever else asks meanwhile), written and
    /// loaded; with how it was had. Blocking: call it off the async executor.
    pub(crate) fn load<T>(
        &self,
        bytes: &[u8],
        precompile: impl FnOnce(&[u8]) -> wasmtime::Result<Vec<u8>>,
        deserialize: impl Fn(&Path) -> wasmtime::Result<T>,
    ) -> Result<(T, Provenance), Error> {
        let path = self.artifact_path(bytes);
        // The fast path takes no lock: a sealed artifact is complete.
        if let Some(loaded) = self.try_load(&path, &deserialize) {
            return Ok(loaded);
        }
        let gate = self
            .filling
            .lock()
            .expect("cache lock")
            .entry(path.clone())
            .or_default()
            .clone();
        let result = {
            let _turn = gate.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            // Whoever held the gate before may have filled it.
            match self.try_load(&path, &deserialize) {
                Some(loaded) => Ok(loaded),
                None => self.fill(&path, bytes, precompile, &deserialize),
            }
        };
        let mut filling = self.filling.lock().expect("cache lock");
        // The map and this caller hold the last references: no one queues.
        if Arc::strong_count(&gate) == 2 {
            filling.remove(&path);
        }
        result
    }

    /// Loads the artifact at `path` if it is there and its seal matches.
    fn try_load<T>(
        &self,
        path: &Path,
        deserialize: &impl Fn(&Path) -> wasmtime::Result<T>,
    ) -> Option<(T, Provenance)> {
        let seal = std::fs::read_to_string(seal_path(path)).ok();
        let artifact = std::fs::read(path).ok();
        match (seal, artifact) {
            // Nothing there, or a seal whose artifact was never renamed
            // into place (a crash between the two renames).
            (_, None) => None,
            (Some(seal), Some(artifact)) if seal.trim() == hex(&Sha256::digest(&artifact)) => {
                let started = std::time::Instant::now();
                match deserialize(path) {
                    Ok(loaded) => {
                        self.loaded.fetch_add(1, Ordering::Relaxed);
                        let provenance = Provenance {
                            compiled_in: None,
                            loaded_in: started.elapsed(),
                            native_bytes: artifact.len() as u64,
                        };
                        Some((loaded, provenance))
                    }
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "recompiling a cached module the engine refused");
                        None
                    }
                }
            }
            _ => {
                tracing::warn!(path = %path.display(), "recompiling a cached module that is truncated, corrupt or unsealed");
                None
            }
        }
    }

    fn fill<T>(
        &self,
        path: &Path,
        bytes: &[u8],
        precompile: impl FnOnce(&[u8]) -> wasmtime::Result<Vec<u8>>,
        deserialize: &impl Fn(&Path) -> wasmtime::Result<T>,
    ) -> Result<(T, Provenance), Error> {
        let started = std::time::Instant::now();
        let compiled = precompile(bytes).map_err(|e| Error::InvalidModule(format!("{e:#}")))?;
        let compiled_in = started.elapsed();
        self.compiled.fetch_add(1, Ordering::Relaxed);
        self.compile_nanos.fetch_add(
            u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        tracing::debug!(path = %path.display(), took = ?started.elapsed(), bytes = compiled.len(), "compiled a module");
        // The seal goes first: an artifact under its real name always has
        // one (a crash between the renames leaves a seal without an artifact,
        // which reads as absent).
        let seal = hex(&Sha256::digest(&compiled));
        let cache_err = |source| Error::Cache {
            path: path.to_owned(),
            source,
        };
        write_renamed(&seal_path(path), seal.as_bytes()).map_err(cache_err)?;
        write_renamed(path, &compiled).map_err(cache_err)?;
        let started = std::time::Instant::now();
        let loaded = deserialize(path).map_err(|e| Error::InvalidModule(format!("{e:#}")))?;
        let provenance = Provenance {
            compiled_in: Some(compiled_in),
            loaded_in: started.elapsed(),
            native_bytes: compiled.len() as u64,
        };
        Ok((loaded, provenance))
    }
}

fn seal_path(artifact: &Path) -> PathBuf {
    artifact.with_extension("cwasm.sha256")
}

/// Writes `bytes` to a unique temporary name beside `path`, syncs it and
/// renames it to `path`: readers see the old file or the whole new one.
fn write_renamed(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!(
        "tmp-{}-{}",
        std::process::id(),
        TMP_SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let written = std::fs::File::create(&tmp).and_then(|mut f| {
        f.write_all(bytes)?;
        f.sync_all()
    });
    match written.and_then(|()| std::fs::rename(&tmp, path)) {
        Ok(()) => Ok(()),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}
