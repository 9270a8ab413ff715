//! The cluster's source of truth: a revisioned key-value store with ordered watch.
//!
//! Every write gets the next value of one global, monotonically increasing
//! [`Revision`]; the API server exposes it as `resourceVersion`. Writers that
//! need optimistic concurrency pass the revision they last read and fail with
//! [`StoreError::Conflict`] if the key moved on. A watch from revision `r`
//! yields every event after `r`, in revision order, with no gaps and no
//! duplicates, until history before `r` is compacted, after which it fails with
//! [`StoreError::Gone`].
//!
//! Backends: [`open_sled`] (embedded, durable: a write is acknowledged
//! only after `fsync`, with group commit) and [`memory`] (tests) run the
//! same MVCC `engine` over a small ordered key-value trait;
//! [`connect_etcd`] implements the [`Store`] trait directly on etcd's own
//! MVCC, for control planes of several API servers.

mod engine;
mod etcd;
mod keys;
mod memory;
mod sled_backend;
pub mod snapshot;

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::BoxStream;

pub use engine::EngineConfig;
pub use etcd::{EtcdConfig, EtcdTls, connect_etcd};

/// A global store revision. Revision 0 is "before anything was written".
pub type Revision = u64;

/// One stored object as of a revision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Bytes,
    /// Revision of the write that created this key (kept across updates).
    pub create_revision: Revision,
    /// Revision of the write that produced this value.
    pub mod_revision: Revision,
}

/// What happened at one revision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// The key was created or updated; `kv` is the new value.
    Put,
    /// The key was deleted; `kv` holds the last value, `kv.mod_revision` is the
    /// revision of the delete.
    Delete,
}

/// A change to one key, as delivered by a watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    pub kv: KeyValue,
    /// The value before this event, if the key existed.
    pub prev: Option<KeyValue>,
}

impl Event {
    pub fn revision(&self) -> Revision {
        self.kv.mod_revision
    }
}

/// A page of a list.
#[derive(Clone, Debug, Default)]
pub struct ListResult {
    pub items: Vec<KeyValue>,
    /// The revision the list was taken at: pass it back to continue paging.
    pub revision: Revision,
    /// More keys follow the last returned one.
    pub more: bool,
}

/// How to list.
#[derive(Clone, Debug, Default)]
pub struct ListOptions {
    /// List as of this revision (must not be compacted); `None` is "now".
    pub revision: Option<Revision>,
    /// Start strictly after this key (paging).
    pub start_after: Option<String>,
    /// At most this many items; 0 is unlimited.
    pub limit: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("key {key} already exists")]
    AlreadyExists { key: String },
    #[error("key {key} not found")]
    NotFound { key: String },
    #[error("key {key} was modified: expected revision {expected}, found {actual}")]
    Conflict {
        key: String,
        expected: Revision,
        actual: Revision,
    },
    #[error("revision {requested} has been compacted (oldest available is {compacted})")]
    Gone {
        requested: Revision,
        compacted: Revision,
    },
    #[error("revision {requested} is in the future (current is {current})")]
    FutureRevision {
        requested: Revision,
        current: Revision,
    },
    #[error("invalid key {key:?}: {reason}")]
    InvalidKey { key: String, reason: &'static str },
    #[error("data directory {path} is in use by another process")]
    Locked { path: String },
    #[error("store backend failed")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("corrupt record at {what}")]
    Corrupt { what: String },
    #[error("store is shut down")]
    Closed,
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A stream of watch events; ends with an error item if the watch cannot go on
/// (for example its starting point was compacted while it lagged).
pub type WatchStream = BoxStream<'static, Result<Event>>;

/// The store API every backend implements: the embedded MVCC engine (sled
/// or memory) and etcd. Object safe: callers hold a [`SharedStore`].
#[async_trait::async_trait]
pub trait Store: Send + Sync + std::fmt::Debug {
    /// The revision of the last acknowledged write.
    fn current_revision(&self) -> Revision;

    /// The newest revision whose history was dropped by [`Store::compact`].
    fn compacted_revision(&self) -> Revision;

    async fn get(&self, key: &str) -> Result<Option<KeyValue>>;

    /// Lists keys starting with `prefix`, in key order.
    async fn list(&self, prefix: &str, opts: ListOptions) -> Result<ListResult>;

    /// Creates `key`; fails with [`StoreError::AlreadyExists`] if it exists.
    async fn create(&self, key: &str, value: Bytes) -> Result<KeyValue>;

    /// Replaces `key`'s value. With `expected`, fails with
    /// [`StoreError::Conflict`] unless the key's `mod_revision` equals it.
    async fn update(&self, key: &str, value: Bytes, expected: Option<Revision>)
    -> Result<KeyValue>;

    /// Deletes `key`, returning its last value with `mod_revision` set to the
    /// revision of the delete.
    async fn delete(&self, key: &str, expected: Option<Revision>) -> Result<KeyValue>;

    /// Every event on keys under `prefix` after revision `from`.
    fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream>;

    /// Drops history up to and including `revision`: lists at older revisions
    /// and watches from older revisions fail with [`StoreError::Gone`].
    async fn compact(&self, revision: Revision) -> Result<()>;
}

/// How the rest of the system holds a store.
pub type SharedStore = Arc<dyn Store>;

/// An in-memory store (nothing survives the process).
pub fn memory() -> SharedStore {
    Arc::new(
        engine::MvccStore::start(
            Box::new(memory::MemoryBackend::default()),
            EngineConfig::default(),
        )
        .expect("opening an empty in-memory store cannot fail"),
    )
}

/// The embedded durable store in `dir` (created if missing). Fails with
/// [`StoreError::Locked`] if another process has it open.
pub fn open_sled(dir: &Path) -> Result<SharedStore> {
    open_sled_with(dir, EngineConfig::default())
}

pub fn open_sled_with(dir: &Path, config: EngineConfig) -> Result<SharedStore> {
    let backend = sled_backend::SledBackend::open(dir)?;
    Ok(Arc::new(engine::MvccStore::start(
        Box::new(backend),
        config,
    )?))
}
