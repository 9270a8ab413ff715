//! The MVCC engine shared by the embedded backends: revisions, preconditions,
//! group commit, compaction and watch, over a small ordered key-value trait.
//!
//! Writes go through one committer thread. It drains every request that is
//! waiting, applies them in order to an overlay (so a batch sees its own
//! writes), writes the batch atomically, makes it durable with one `flush`
//! (group commit), and only then publishes the new revision, broadcasts the
//! events and acknowledges the writers. One writer means revisions need no
//! locks and preconditions cannot race.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{broadcast, oneshot};

use crate::keys::{self, Record};
use crate::{
    Event, EventKind, KeyValue, ListOptions, ListResult, Result, Revision, StoreError, WatchStream,
};

/// An ordered byte keyspace with atomic batches: all an embedded backend provides.
pub(crate) trait Backend: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>>;
    /// The last entry in `[start, end)`.
    fn last_in(&self, start: &[u8], end: &[u8]) -> Result<Option<(Vec<u8>, Vec<u8>)>>;
    /// Visits entries in `[start, end)` in order until `visit` returns false.
    fn scan(
        &self,
        start: &[u8],
        end: &[u8],
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<()>;
    /// Applies all writes (`None` removes) atomically.
    fn apply(&self, writes: Vec<(Vec<u8>, Option<Vec<u8>>)>) -> Result<()>;
    /// Returns once every applied batch is durable.
    fn flush(&self) -> Result<()>;
}

/// Tuning for the engine.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Most writes committed with one flush.
    pub max_batch: usize,
    /// Batches of events kept for watchers that fall behind before they must
    /// re-read the log.
    pub watch_buffer: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch: 1024,
            watch_buffer: 4096,
        }
    }
}

pub(crate) enum Op {
    Create {
        key: String,
        value: Bytes,
    },
    Update {
        key: String,
        value: Bytes,
        expected: Option<Revision>,
    },
    Delete {
        key: String,
        expected: Option<Revision>,
    },
    Compact {
        revision: Revision,
    },
}

type Reply = oneshot::Sender<Result<Option<KeyValue>>>;

struct Shared {
    backend: Box<dyn Backend>,
    revision: AtomicU64,
    compacted: AtomicU64,
    hub: broadcast::Sender<Arc<[Event]>>,
}

/// The engine behind [`crate::memory`] and [`crate::open_sled`].
pub(crate) struct MvccStore {
    shared: Arc<Shared>,
    /// `None` only while dropping.
    requests: Option<mpsc::Sender<(Op, Reply)>>,
    committer: Option<std::thread::JoinHandle<()>>,
}

impl Drop for MvccStore {
    /// Closing a store waits for its writer to finish, so the backend (and
    /// sled's directory lock) is released when the last handle is dropped,
    /// unless a watch stream still reads from it.
    fn drop(&mut self) {
        self.requests = None;
        if let Some(committer) = self.committer.take() {
            let _ = committer.join();
        }
    }
}

impl std::fmt::Debug for MvccStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MvccStore")
            .field("backend", &self.shared.backend.name())
            .field("revision", &self.shared.revision.load(Ordering::Acquire))
            .finish()
    }
}

impl MvccStore {
    pub(crate) fn start(backend: Box<dyn Backend>, config: EngineConfig) -> Result<Self> {
        let read_meta = |key| -> Result<u64> {
            Ok(backend
                .get(key)?
                .and_then(|raw| keys::be_u64(&raw))
                .unwrap_or(0))
        };
        let revision = read_meta(keys::META_REVISION)?;
        let compacted = read_meta(keys::META_COMPACTED)?;
        let (hub, _) = broadcast::channel(config.watch_buffer.max(1));
        let shared = Arc::new(Shared {
            backend,
            revision: AtomicU64::new(revision),
            compacted: AtomicU64::new(compacted),
            hub,
        });
        let (tx, rx) = mpsc::channel();
        let committer = Committer {
            shared: shared.clone(),
            requests: rx,
            max_batch: config.max_batch.max(1),
            deferred: None,
        };
        let committer = std::thread::Builder::new()
            .name("store-commit".into())
            .spawn(move || committer.run())
            .map_err(|e| StoreError::Backend(Box::new(e)))?;
        Ok(Self {
            shared,
            requests: Some(tx),
            committer: Some(committer),
        })
    }

    async fn submit(&self, op: Op) -> Result<Option<KeyValue>> {
        if let Op::Create { key, .. } | Op::Update { key, .. } | Op::Delete { key, .. } = &op {
            keys::check_key(key)?;
        }
        let (tx, rx) = oneshot::channel();
        self.requests
            .as_ref()
            .ok_or(StoreError::Closed)?
            .send((op, tx))
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn submit_kv(&self, op: Op) -> Result<KeyValue> {
        self.submit(op).await?.ok_or(StoreError::Closed)
    }

    /// Fails if `revision` cannot be read any more or is not written yet.
    fn check_readable(&self, revision: Revision) -> Result<()> {
        let compacted = self.shared.compacted.load(Ordering::Acquire);
        let current = self.shared.revision.load(Ordering::Acquire);
        if revision < compacted {
            return Err(StoreError::Gone {
                requested: revision,
                compacted,
            });
        }
        if revision > current {
            return Err(StoreError::FutureRevision {
                requested: revision,
                current,
            });
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl crate::Store for MvccStore {
    fn current_revision(&self) -> Revision {
        self.shared.revision.load(Ordering::Acquire)
    }

    fn compacted_revision(&self) -> Revision {
        self.shared.compacted.load(Ordering::Acquire)
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        keys::check_key(key)?;
        Ok(latest(&*self.shared.backend, key)?.and_then(|(rev, rec)| to_kv(key, rev, rec)))
    }

    async fn list(&self, prefix: &str, opts: ListOptions) -> Result<ListResult> {
        let revision = match opts.revision {
            Some(rev) => {
                self.check_readable(rev)?;
                rev
            }
            None => self.current_revision(),
        };
        let (mut start, end) = keys::versions_with_prefix(prefix);
        if let Some(after) = &opts.start_after {
            // Every version of `after` sorts below the first version of the next key.
            start = start.max(keys::versions_of(after).1);
        }
        let limit = if opts.limit == 0 {
            usize::MAX
        } else {
            opts.limit
        };
        let mut out = ListResult {
            items: Vec::new(),
            revision,
            more: false,
        };
        // Versions of one key are adjacent and ascending: remember the newest
        // one at or below `revision` and emit it when the key changes.
        let mut candidate: Option<KeyValue> = None;
        let mut current_key: Option<String> = None;
        let mut failure = None;
        let emit = |kv: Option<KeyValue>, out: &mut ListResult| -> bool {
            if let Some(kv) = kv {
                if out.items.len() == limit {
                    out.more = true;
                    return false;
                }
                out.items.push(kv);
            }
            true
        };
        self.shared
            .backend
            .scan(&start, &end, &mut |raw_key, raw_value| {
                let parsed = keys::parse_version_key(raw_key)
                    .and_then(|(key, rev)| Ok((key.to_owned(), rev, Record::decode(raw_value)?)));
                let (key, rev, record) = match parsed {
                    Ok(v) => v,
                    Err(e) => {
                        failure = Some(e);
                        return false;
                    }
                };
                if current_key.as_deref() != Some(key.as_str()) {
                    if !emit(candidate.take(), &mut out) {
                        return false;
                    }
                    current_key = Some(key.clone());
                }
                if rev <= revision {
                    candidate = to_kv(&key, rev, record);
                }
                true
            })?;
        if let Some(e) = failure {
            return Err(e);
        }
        if !out.more {
            emit(candidate.take(), &mut out);
        }
        Ok(out)
    }

    async fn create(&self, key: &str, value: Bytes) -> Result<KeyValue> {
        self.submit_kv(Op::Create {
            key: key.to_owned(),
            value,
        })
        .await
    }

    async fn update(
        &self,
        key: &str,
        value: Bytes,
        expected: Option<Revision>,
    ) -> Result<KeyValue> {
        self.submit_kv(Op::Update {
            key: key.to_owned(),
            value,
            expected,
        })
        .await
    }

    async fn delete(&self, key: &str, expected: Option<Revision>) -> Result<KeyValue> {
        self.submit_kv(Op::Delete {
            key: key.to_owned(),
            expected,
        })
        .await
    }

    fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream> {
        let compacted = self.compacted_revision();
        if from < compacted {
            return Err(StoreError::Gone {
                requested: from,
                compacted,
            });
        }
        let state = WatchState {
            shared: self.shared.clone(),
            // Subscribe before reading the revision: anything committed after
            // this point arrives on `live`, anything before it is in the log.
            live: self.shared.hub.subscribe(),
            prefix: prefix.to_owned(),
            last: from,
            catch_up_to: Some(self.current_revision()),
            pending: VecDeque::new(),
            failed: false,
        };
        Ok(futures::stream::unfold(state, WatchState::next).boxed())
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        self.submit(Op::Compact { revision }).await.map(|_| ())
    }
}

/// The newest version of `key` (a value or a tombstone).
fn latest(backend: &dyn Backend, key: &str) -> Result<Option<(Revision, Record)>> {
    let (start, end) = keys::versions_of(key);
    latest_in(backend, &start, &end)
}

fn latest_in(
    backend: &dyn Backend,
    start: &[u8],
    end: &[u8],
) -> Result<Option<(Revision, Record)>> {
    match backend.last_in(start, end)? {
        Some((raw_key, raw_value)) => {
            let (_, rev) = keys::parse_version_key(&raw_key)?;
            Ok(Some((rev, Record::decode(&raw_value)?)))
        }
        None => Ok(None),
    }
}

fn to_kv(key: &str, rev: Revision, record: Record) -> Option<KeyValue> {
    Some(KeyValue {
        key: key.to_owned(),
        value: record.value?,
        create_revision: record.create_revision,
        mod_revision: rev,
    })
}

/// Reads the event written at `rev` back from the log.
fn event_at(backend: &dyn Backend, rev: Revision, key: &str) -> Result<Event> {
    let (start, _) = keys::versions_of(key);
    let this = keys::version_key(key, rev);
    let record = backend.get(&this)?.ok_or_else(|| StoreError::Corrupt {
        what: format!("missing version {key}@{rev}"),
    })?;
    let record = Record::decode(&record)?;
    let prev = latest_in(backend, &start, &this)?.and_then(|(r, rec)| to_kv(key, r, rec));
    Ok(match record.value {
        Some(value) => Event {
            kind: EventKind::Put,
            kv: KeyValue {
                key: key.to_owned(),
                value,
                create_revision: record.create_revision,
                mod_revision: rev,
            },
            prev,
        },
        None => {
            let last = prev.clone().ok_or_else(|| StoreError::Corrupt {
                what: format!("delete of {key}@{rev} without a previous value"),
            })?;
            Event {
                kind: EventKind::Delete,
                kv: KeyValue {
                    mod_revision: rev,
                    ..last
                },
                prev,
            }
        }
    })
}

struct WatchState {
    shared: Arc<Shared>,
    live: broadcast::Receiver<Arc<[Event]>>,
    prefix: String,
    /// Every event up to this revision has been queued or skipped.
    last: Revision,
    /// Read the log up to this revision before taking live events again.
    catch_up_to: Option<Revision>,
    pending: VecDeque<Event>,
    failed: bool,
}

/// Log entries read per step while catching up, so a watch from far back
/// streams instead of loading all history at once.
const CATCH_UP_CHUNK: u64 = 1024;

impl WatchState {
    async fn next(mut self) -> Option<(Result<Event>, Self)> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some((Ok(event), self));
            }
            if self.failed {
                return None;
            }
            if let Some(target) = self.catch_up_to {
                if let Err(e) = self.catch_up(target) {
                    self.failed = true;
                    return Some((Err(e), self));
                }
                continue;
            }
            match self.live.recv().await {
                Ok(batch) => {
                    for event in batch.iter() {
                        if event.revision() > self.last && event.kv.key.starts_with(&self.prefix) {
                            self.pending.push_back(event.clone());
                        }
                    }
                    if let Some(last) = batch.last() {
                        self.last = self.last.max(last.revision());
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    self.catch_up_to = Some(self.shared.revision.load(Ordering::Acquire));
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }

    fn catch_up(&mut self, target: Revision) -> Result<()> {
        let upto = target.min(self.last.saturating_add(CATCH_UP_CHUNK));
        let backend = &*self.shared.backend;
        let mut entries = Vec::new();
        backend.scan(
            &keys::log_key(self.last + 1),
            &keys::log_key(upto + 1),
            &mut |k, v| {
                entries.push((k.to_vec(), v.to_vec()));
                true
            },
        )?;
        let compacted = self.shared.compacted.load(Ordering::Acquire);
        if compacted > self.last || entries.len() as u64 != upto - self.last {
            return Err(StoreError::Gone {
                requested: self.last,
                compacted,
            });
        }
        for (raw_rev, raw_key) in entries {
            let rev = keys::be_u64(&raw_rev[1..]).ok_or_else(|| StoreError::Corrupt {
                what: "log key".into(),
            })?;
            let key = String::from_utf8(raw_key).map_err(|_| StoreError::Corrupt {
                what: format!("log entry {rev}"),
            })?;
            if key.starts_with(&self.prefix) {
                self.pending.push_back(event_at(backend, rev, &key)?);
            }
        }
        self.last = upto;
        if upto >= target {
            self.catch_up_to = None;
        }
        Ok(())
    }
}

struct Committer {
    shared: Arc<Shared>,
    requests: mpsc::Receiver<(Op, Reply)>,
    max_batch: usize,
    /// A compaction that arrived mid-batch; it runs alone, next.
    deferred: Option<(Op, Reply)>,
}

/// A batch under construction: the writes so far and what they did.
struct Batch<'a> {
    backend: &'a dyn Backend,
    revision: Revision,
    /// Newest version of each key touched by this batch.
    overlay: HashMap<String, Option<(Revision, Record)>>,
    writes: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    events: Vec<Event>,
}

impl Committer {
    fn run(mut self) {
        loop {
            let first = match self.deferred.take() {
                Some(req) => req,
                None => match self.requests.recv() {
                    Ok(req) => req,
                    Err(_) => return,
                },
            };
            if let Op::Compact { revision } = first.0 {
                let result = self.compact(revision).map(|()| None);
                let _ = first.1.send(result);
                continue;
            }
            let mut batch = vec![first];
            while batch.len() < self.max_batch {
                match self.requests.try_recv() {
                    Ok(req @ (Op::Compact { .. }, _)) => {
                        self.deferred = Some(req);
                        break;
                    }
                    Ok(req) => batch.push(req),
                    Err(_) => break,
                }
            }
            self.commit(batch);
        }
    }

    fn commit(&self, requests: Vec<(Op, Reply)>) {
        let backend = &*self.shared.backend;
        let mut batch = Batch {
            backend,
            revision: self.shared.revision.load(Ordering::Acquire),
            overlay: HashMap::new(),
            writes: Vec::new(),
            events: Vec::new(),
        };
        let mut results = Vec::with_capacity(requests.len());
        for (op, reply) in requests {
            results.push((batch.apply(op), reply));
        }
        if batch.events.is_empty() {
            for (result, reply) in results {
                let _ = reply.send(result.map(Some));
            }
            return;
        }
        batch.writes.push((
            keys::META_REVISION.to_vec(),
            Some(batch.revision.to_be_bytes().to_vec()),
        ));
        let durable = backend
            .apply(std::mem::take(&mut batch.writes))
            .and_then(|()| backend.flush());
        match durable {
            Ok(()) => {
                self.shared
                    .revision
                    .store(batch.revision, Ordering::Release);
                let _ = self.shared.hub.send(batch.events.into());
                for (result, reply) in results {
                    let _ = reply.send(result.map(Some));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "store commit failed; writes in the batch are rejected");
                let shared = Arc::new(e);
                for (_, reply) in results {
                    let _ = reply.send(Err(StoreError::Backend(Box::new(SharedError(
                        shared.clone(),
                    )))));
                }
            }
        }
    }

    fn compact(&self, revision: Revision) -> Result<()> {
        let current = self.shared.revision.load(Ordering::Acquire);
        if revision > current {
            return Err(StoreError::FutureRevision {
                requested: revision,
                current,
            });
        }
        if revision <= self.shared.compacted.load(Ordering::Acquire) {
            return Ok(());
        }
        let backend = &*self.shared.backend;
        let mut writes = Vec::new();
        // Per key, keep the newest version at or below `revision` (unless it is
        // a tombstone) and everything newer; drop the rest.
        let mut group: Vec<(Vec<u8>, Revision, bool)> = Vec::new();
        let mut group_key = String::new();
        let mut failure = None;
        let flush_group = |group: &mut Vec<(Vec<u8>, Revision, bool)>, writes: &mut Vec<_>| {
            let keep_from = group.iter().rposition(|(_, rev, _)| *rev <= revision);
            if let Some(idx) = keep_from {
                for (raw, _, _) in &group[..idx] {
                    writes.push((raw.clone(), None));
                }
                if group[idx].2 {
                    writes.push((group[idx].0.clone(), None));
                }
            }
            group.clear();
        };
        let (start, end) = keys::versions_with_prefix("");
        backend.scan(&start, &end, &mut |raw_key, raw_value| {
            let (key, rev) = match keys::parse_version_key(raw_key) {
                Ok(v) => v,
                Err(e) => {
                    failure = Some(e);
                    return false;
                }
            };
            if key != group_key {
                flush_group(&mut group, &mut writes);
                group_key = key.to_owned();
            }
            let tombstone = raw_value.first() == Some(&1);
            group.push((raw_key.to_vec(), rev, tombstone));
            true
        })?;
        if let Some(e) = failure {
            return Err(e);
        }
        flush_group(&mut group, &mut writes);
        backend.scan(
            &keys::log_key(0),
            &keys::log_key(revision + 1),
            &mut |k, _| {
                writes.push((k.to_vec(), None));
                true
            },
        )?;
        writes.push((
            keys::META_COMPACTED.to_vec(),
            Some(revision.to_be_bytes().to_vec()),
        ));
        let dropped = writes.len();
        backend.apply(writes)?;
        backend.flush()?;
        self.shared.compacted.store(revision, Ordering::Release);
        tracing::debug!(revision, dropped, "compacted store history");
        Ok(())
    }
}

impl Batch<'_> {
    fn latest(&mut self, key: &str) -> Result<Option<(Revision, Record)>> {
        if let Some(v) = self.overlay.get(key) {
            return Ok(v.clone());
        }
        let v = latest(self.backend, key)?;
        self.overlay.insert(key.to_owned(), v.clone());
        Ok(v)
    }

    /// The live value of `key` checked against `expected`.
    fn existing(&mut self, key: &str, expected: Option<Revision>) -> Result<KeyValue> {
        let current = self
            .latest(key)?
            .and_then(|(rev, rec)| to_kv(key, rev, rec))
            .ok_or_else(|| StoreError::NotFound {
                key: key.to_owned(),
            })?;
        match expected {
            Some(expected) if expected != current.mod_revision => Err(StoreError::Conflict {
                key: key.to_owned(),
                expected,
                actual: current.mod_revision,
            }),
            _ => Ok(current),
        }
    }

    fn apply(&mut self, op: Op) -> Result<KeyValue> {
        match op {
            Op::Create { key, value } => {
                if self
                    .latest(&key)?
                    .is_some_and(|(_, rec)| rec.value.is_some())
                {
                    return Err(StoreError::AlreadyExists { key });
                }
                let rev = self.revision + 1;
                Ok(self.put(key, rev, Some(value), None))
            }
            Op::Update {
                key,
                value,
                expected,
            } => {
                let prev = self.existing(&key, expected)?;
                Ok(self.put(key, prev.create_revision, Some(value), Some(prev)))
            }
            Op::Delete { key, expected } => {
                let prev = self.existing(&key, expected)?;
                Ok(self.put(key, prev.create_revision, None, Some(prev)))
            }
            Op::Compact { .. } => unreachable!("compactions are committed on their own"),
        }
    }

    fn put(
        &mut self,
        key: String,
        create_revision: Revision,
        value: Option<Bytes>,
        prev: Option<KeyValue>,
    ) -> KeyValue {
        self.revision += 1;
        let rev = self.revision;
        let record = Record {
            create_revision,
            value: value.clone(),
        };
        self.writes
            .push((keys::version_key(&key, rev), Some(record.encode())));
        self.writes
            .push((keys::log_key(rev), Some(key.clone().into_bytes())));
        self.overlay.insert(key.clone(), Some((rev, record)));
        let event = match value {
            Some(value) => Event {
                kind: EventKind::Put,
                kv: KeyValue {
                    key,
                    value,
                    create_revision,
                    mod_revision: rev,
                },
                prev,
            },
            None => {
                let last = prev.clone().expect("deletes always have a previous value");
                Event {
                    kind: EventKind::Delete,
                    kv: KeyValue {
                        mod_revision: rev,
                        ..last
                    },
                    prev,
                }
            }
        };
        let kv = event.kv.clone();
        self.events.push(event);
        kv
    }
}

/// One backend failure reported to every writer of the failed batch.
#[derive(Debug)]
struct SharedError(Arc<StoreError>);

impl std::fmt::Display for SharedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for SharedError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}
