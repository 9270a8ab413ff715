//! The embedded durable backend on sled: batches are atomic, `flush` fsyncs.
//!
//! sled takes an exclusive lock on its directory; a second process opening the
//! same data directory gets [`StoreError::Locked`] rather than a raw IO error.

use std::path::Path;

use crate::engine::Backend;
use crate::{Result, StoreError};

pub(crate) struct SledBackend {
    db: sled::Db,
}

fn backend_err(e: sled::Error) -> StoreError {
    StoreError::Backend(Box::new(e))
}

impl SledBackend {
    pub(crate) fn open(dir: &Path) -> Result<Self> {
        let db = sled::Config::new()
            .path(dir)
            // Durability comes from our explicit flush per batch, not a timer.
            .flush_every_ms(None)
            // sled's page cache defaults to 1 GiB; the API server keeps its
            // own caches, so the store's stays small.
            .cache_capacity(64 * 1024 * 1024)
            .open()
            .map_err(|e| match e {
                sled::Error::Io(io)
                    if io.kind() == std::io::ErrorKind::WouldBlock
                        || io.to_string().contains("lock") =>
                {
                    StoreError::Locked {
                        path: dir.display().to_string(),
                    }
                }
                other => backend_err(other),
            })?;
        Ok(Self { db })
    }
}

impl Backend for SledBackend {
    fn name(&self) -> &'static str {
        "sled"
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.db.get(key).map_err(backend_err)?.map(|v| v.to_vec()))
    }

    fn last_in(&self, start: &[u8], end: &[u8]) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        if start >= end {
            return Ok(None);
        }
        match self.db.range(start..end).next_back() {
            Some(entry) => {
                let (k, v) = entry.map_err(backend_err)?;
                Ok(Some((k.to_vec(), v.to_vec())))
            }
            None => Ok(None),
        }
    }

    fn scan(
        &self,
        start: &[u8],
        end: &[u8],
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<()> {
        if start >= end {
            return Ok(());
        }
        for entry in self.db.range(start..end) {
            let (k, v) = entry.map_err(backend_err)?;
            if !visit(&k, &v) {
                break;
            }
        }
        Ok(())
    }

    fn apply(&self, writes: Vec<(Vec<u8>, Option<Vec<u8>>)>) -> Result<()> {
        let mut batch = sled::Batch::default();
        for (k, v) in writes {
            match v {
                Some(v) => batch.insert(k, v),
                None => batch.remove(k),
            }
        }
        self.db.apply_batch(batch).map_err(backend_err)
    }

    fn flush(&self) -> Result<()> {
        self.db.flush().map(|_| ()).map_err(backend_err)
    }
}
