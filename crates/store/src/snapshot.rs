//! Snapshots: every key of a store as of one revision, in a file that can
//! be checked and restored into a new embedded store (or copied into etcd).
//!
//! The format is ours and small: the magic line `wasmkube-snapshot-v1\n`,
//! the revision (u64, big-endian), then each key and value as a u32
//! big-endian length and its bytes, an end mark (a key length of
//! `u32::MAX`), and the SHA-256 of everything before it. A snapshot is
//! taken online, from a list at one revision paged through the store, so
//! it is consistent while writes go on.
//!
//! A restore writes every key at the snapshot's revision plus a bump and
//! marks history up to there compacted, as `etcdutl snapshot restore
//! --bump-revision --mark-compacted` does: a resourceVersion a client saw
//! before the restore is older than anything the restored store serves, so
//! its watches end with `410 Gone` and it relists, rather than waiting for
//! revisions the restored store would reuse.

use std::path::Path;

use bytes::{BufMut, Bytes, BytesMut};
use futures::Stream;
use sha2::{Digest, Sha256};

use crate::engine::Backend;
use crate::{KeyValue, ListOptions, Revision, SharedStore, Store, StoreError, keys};

const MAGIC: &[u8] = b"wasmkube-snapshot-v1\n";
const END: u32 = u32::MAX;
/// Keys per page while saving.
const PAGE: usize = 500;
/// How far a restore moves the revision past the snapshot's.
pub const DEFAULT_BUMP: Revision = 1_000_000;

/// Why a snapshot could not be read or restored.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("not a wasmkube snapshot (no {:?} header)", String::from_utf8_lossy(MAGIC).trim())]
    NotASnapshot,
    #[error("the snapshot is truncated")]
    Truncated,
    #[error("the snapshot is corrupt: its checksum does not match")]
    Checksum,
    #[error("the snapshot holds a key that is not UTF-8")]
    BadKey,
    #[error("{0} already holds a store; restore into a new data directory")]
    NotEmpty(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A snapshot read back: its revision and every key's value.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub revision: Revision,
    pub entries: Vec<(String, Bytes)>,
}

impl Snapshot {
    /// Parses and checks `raw` (the whole file).
    pub fn parse(raw: &[u8]) -> Result<Self, SnapshotError> {
        let body = raw.strip_prefix(MAGIC).ok_or(SnapshotError::NotASnapshot)?;
        let mut at = 0;
        let mut take = |n: usize| -> Result<&[u8], SnapshotError> {
            let out = body.get(at..at + n).ok_or(SnapshotError::Truncated)?;
            at += n;
            Ok(out)
        };
        let u32_of = |b: &[u8]| u32::from_be_bytes(b.try_into().expect("4 bytes"));
        let revision = u64::from_be_bytes(take(8)?.try_into().expect("8 bytes"));
        let mut entries = Vec::new();
        loop {
            let len = u32_of(take(4)?);
            if len == END {
                break;
            }
            let key = std::str::from_utf8(take(len as usize)?)
                .map_err(|_| SnapshotError::BadKey)?
                .to_owned();
            let len = u32_of(take(4)?) as usize;
            entries.push((key, Bytes::copy_from_slice(take(len)?)));
        }
        let digest = take(32)?.to_vec();
        let covered = MAGIC.len() + at - 32;
        if Sha256::digest(&raw[..covered]).as_slice() != digest.as_slice() {
            return Err(SnapshotError::Checksum);
        }
        if at != body.len() {
            return Err(SnapshotError::Checksum);
        }
        Ok(Self { revision, entries })
    }
}

/// Writes a snapshot as it is read.
struct Writer {
    hash: Sha256,
}

impl Writer {
    fn chunk(&mut self, buf: BytesMut) -> Bytes {
        self.hash.update(&buf);
        buf.freeze()
    }

    fn entries(&mut self, kvs: &[KeyValue]) -> Bytes {
        let size = kvs.iter().map(|kv| 8 + kv.key.len() + kv.value.len()).sum();
        let mut buf = BytesMut::with_capacity(size);
        for kv in kvs {
            buf.put_u32(kv.key.len() as u32);
            buf.put_slice(kv.key.as_bytes());
            buf.put_u32(kv.value.len() as u32);
            buf.put_slice(&kv.value);
        }
        self.chunk(buf)
    }
}

/// The snapshot of every key under `prefix` as of the store's current
/// revision, as a stream of chunks (the last carries the checksum). A
/// failure (the revision compacted away mid-way) ends the stream with an
/// error, and the partial file fails its checksum.
pub fn save(
    store: SharedStore,
    prefix: String,
) -> impl Stream<Item = Result<Bytes, StoreError>> + Send {
    enum State {
        Start,
        Page(Revision, Option<String>),
        Done,
    }
    let writer = Writer {
        hash: Sha256::new(),
    };
    futures::stream::try_unfold(
        (State::Start, writer, store, prefix),
        |(state, mut w, store, prefix)| async move {
            match state {
                State::Done => Ok(None),
                State::Start => {
                    let first = store
                        .list(
                            &prefix,
                            ListOptions {
                                limit: PAGE,
                                ..Default::default()
                            },
                        )
                        .await?;
                    let mut buf = BytesMut::new();
                    buf.put_slice(MAGIC);
                    buf.put_u64(first.revision);
                    let mut head = w.chunk(buf).to_vec();
                    head.extend_from_slice(&w.entries(&first.items));
                    let next = match (first.more, first.items.last()) {
                        (true, Some(last)) => State::Page(first.revision, Some(last.key.clone())),
                        _ => State::Page(first.revision, None),
                    };
                    Ok(Some((Bytes::from(head), (next, w, store, prefix))))
                }
                State::Page(revision, Some(after)) => {
                    let page = store
                        .list(
                            &prefix,
                            ListOptions {
                                revision: Some(revision),
                                start_after: Some(after),
                                limit: PAGE,
                            },
                        )
                        .await?;
                    let chunk = w.entries(&page.items);
                    let next = match (page.more, page.items.last()) {
                        (true, Some(last)) => State::Page(revision, Some(last.key.clone())),
                        _ => State::Page(revision, None),
                    };
                    Ok(Some((chunk, (next, w, store, prefix))))
                }
                State::Page(_, None) => {
                    let mut end = BytesMut::new();
                    end.put_u32(END);
                    w.hash.update(&end);
                    let digest = std::mem::take(&mut w.hash).finalize();
                    end.put_slice(&digest);
                    Ok(Some((end.freeze(), (State::Done, w, store, prefix))))
                }
            }
        },
    )
}

/// Restores `snapshot` into a new embedded store in `dir` (which must not
/// hold one): every key at the snapshot's revision plus `bump`, with
/// history up to there compacted. Returns the restored store, open (sled
/// releases its directory lock only some time after a close, so reopening
/// at once in the same process could find it still locked).
pub fn restore_sled(
    dir: &Path,
    snapshot: &Snapshot,
    bump: Revision,
) -> Result<SharedStore, SnapshotError> {
    if dir.exists()
        && std::fs::read_dir(dir)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        return Err(SnapshotError::NotEmpty(dir.display().to_string()));
    }
    let backend = crate::sled_backend::SledBackend::open(dir)?;
    let revision = snapshot.revision + bump.max(1);
    let mut writes = Vec::with_capacity(snapshot.entries.len() + 2);
    for (key, value) in &snapshot.entries {
        keys::check_key(key)?;
        let record = keys::Record {
            create_revision: revision,
            value: Some(value.clone()),
        };
        writes.push((keys::version_key(key, revision), Some(record.encode())));
    }
    writes.push((
        keys::META_REVISION.to_vec(),
        Some(revision.to_be_bytes().to_vec()),
    ));
    writes.push((
        keys::META_COMPACTED.to_vec(),
        Some(revision.to_be_bytes().to_vec()),
    ));
    backend.apply(writes)?;
    backend.flush()?;
    let store = crate::engine::MvccStore::start(Box::new(backend), Default::default())?;
    Ok(std::sync::Arc::new(store))
}

/// Creates every key of `snapshot` in `store` (an empty etcd, say); the
/// store gives them revisions of its own. Fails on the first key that
/// exists already.
pub async fn copy_into(snapshot: &Snapshot, store: &dyn Store) -> Result<usize, SnapshotError> {
    for (key, value) in &snapshot.entries {
        store.create(key, value.clone()).await?;
    }
    Ok(snapshot.entries.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::TryStreamExt;

    async fn saved(store: &SharedStore) -> Vec<u8> {
        let chunks: Vec<Bytes> = save(store.clone(), "/".into()).try_collect().await.unwrap();
        chunks.concat()
    }

    #[tokio::test]
    async fn a_snapshot_round_trips_and_a_restore_bumps_and_compacts() {
        let store = crate::memory();
        for i in 0..1200 {
            store
                .create(&format!("/registry/k/{i:04}"), Bytes::from(format!("v{i}")))
                .await
                .unwrap();
        }
        store.delete("/registry/k/0007", None).await.unwrap();
        let raw = saved(&store).await;
        let snap = Snapshot::parse(&raw).unwrap();
        assert_eq!(snap.revision, 1201);
        assert_eq!(snap.entries.len(), 1199);
        assert_eq!(snap.entries[0].0, "/registry/k/0000");
        assert!(!snap.entries.iter().any(|(k, _)| k == "/registry/k/0007"));

        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("store");
        let restored = restore_sled(&target, &snap, DEFAULT_BUMP).unwrap();
        let revision = restored.current_revision();
        assert_eq!(revision, 1201 + DEFAULT_BUMP);
        // A second restore into the same place is refused.
        assert!(matches!(
            restore_sled(&target, &snap, DEFAULT_BUMP),
            Err(SnapshotError::NotEmpty(_))
        ));
        let kv = restored.get("/registry/k/1199").await.unwrap().unwrap();
        assert_eq!((&kv.value[..], kv.mod_revision), (&b"v1199"[..], revision));
        // Watches from before the restore are told to relist.
        assert!(matches!(
            restored.watch("/registry/", 1201),
            Err(StoreError::Gone { .. })
        ));
        // Writes go on from there.
        let next = restored
            .create("/registry/k/new", Bytes::new())
            .await
            .unwrap();
        assert_eq!(next.mod_revision, revision + 1);
    }

    #[tokio::test]
    async fn damage_is_reported() {
        let store = crate::memory();
        store.create("/a", Bytes::from("1")).await.unwrap();
        let raw = saved(&store).await;
        assert!(matches!(
            Snapshot::parse(b"hello"),
            Err(SnapshotError::NotASnapshot)
        ));
        assert!(matches!(
            Snapshot::parse(&raw[..raw.len() - 1]),
            Err(SnapshotError::Truncated)
        ));
        let mut flipped = raw.clone();
        let at = flipped.len() - 40;
        flipped[at] ^= 1;
        assert!(Snapshot::parse(&flipped).is_err());
        let mut longer = raw.clone();
        longer.push(0);
        assert!(matches!(
            Snapshot::parse(&longer),
            Err(SnapshotError::Checksum)
        ));
    }
}
