//! The per-container memory limiter: a hard cap on linear memory (and a
//! bound on tables), recording the high-water mark and any denied growth.

use std::sync::Arc;

use crate::LiveUsage;

/// A growth the limit refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "memory limit exceeded: growing linear memory from {current} to {desired} bytes, limit {limit} bytes"
)]
pub struct OutOfMemory {
    pub current: usize,
    pub desired: usize,
    pub limit: usize,
}

/// Most table elements an instance may have (function tables of large
/// guests stay far below).
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

#[derive(Debug)]
pub(crate) struct Limiter {
    limit: Option<usize>,
    high_water: usize,
    denied: Option<OutOfMemory>,
    live: Arc<LiveUsage>,
}

impl Limiter {
    pub fn new(limit: Option<usize>, live: Arc<LiveUsage>) -> Self {
        Self {
            limit,
            high_water: 0,
            denied: None,
            live,
        }
    }

    pub fn high_water(&self) -> usize {
        self.high_water
    }

    pub fn denied(&self) -> Option<&OutOfMemory> {
        self.denied.as_ref()
    }
}

impl wasmtime::ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if let Some(limit) = self.limit
            && desired > limit
        {
            // The guest sees `memory.grow` fail; most guests then trap.
            self.denied = Some(OutOfMemory {
                current,
                desired,
                limit,
            });
            return Ok(false);
        }
        self.high_water = self.high_water.max(desired);
        self.live.set_memory(desired as u64);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}
