//! In-memory backend for tests: a `BTreeMap` behind a lock; nothing is durable.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::RwLock;

use crate::Result;
use crate::engine::Backend;

#[derive(Default)]
pub(crate) struct MemoryBackend {
    map: RwLock<BTreeMap<Vec<u8>, Vec<u8>>>,
}

fn range(start: &[u8], end: &[u8]) -> (Bound<Vec<u8>>, Bound<Vec<u8>>) {
    (
        Bound::Included(start.to_vec()),
        Bound::Excluded(end.to_vec()),
    )
}

impl Backend for MemoryBackend {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self
            .map
            .read()
            .expect("memory store lock")
            .get(key)
            .cloned())
    }

    fn last_in(&self, start: &[u8], end: &[u8]) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        if start >= end {
            return Ok(None);
        }
        let map = self.map.read().expect("memory store lock");
        Ok(map
            .range(range(start, end))
            .next_back()
            .map(|(k, v)| (k.clone(), v.clone())))
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
        let map = self.map.read().expect("memory store lock");
        for (k, v) in map.range(range(start, end)) {
            if !visit(k, v) {
                break;
            }
        }
        Ok(())
    }

    fn apply(&self, writes: Vec<(Vec<u8>, Option<Vec<u8>>)>) -> Result<()> {
        let mut map = self.map.write().expect("memory store lock");
        for (k, v) in writes {
            match v {
                Some(v) => map.insert(k, v),
                None => map.remove(&k),
            };
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }
}
