//! The store on etcd's v3 API: [`Store`] implemented directly on etcd's own
//! MVCC, so several API servers can share one cluster.
//!
//! - A revision is etcd's revision: every API server sees the same
//!   `resourceVersion` for an object, and one from any server can resume a
//!   watch on another.
//! - Keys are the store's keys (`/registry/GROUP/RESOURCE/[NS/]NAME`, not
//!   kube-apiserver's layout) under an optional `--etcd-prefix`; values are
//!   the stored objects as they are (JSON), so `etcdctl get` shows them.
//! - Guarded writes are transactions comparing `create_revision` (create,
//!   and update/delete of a key that must exist) or `mod_revision` (a
//!   precondition), so a failed guard consumes no revision.
//! - A watch starts at the revision it was asked for and skips that
//!   revision's own events, so a start older than etcd's compaction fails
//!   with [`StoreError::Gone`] exactly as the embedded engine's does. A watch
//!   whose connection breaks (a member died, the network blinked) resumes
//!   from the last revision it delivered, on whichever member answers: no
//!   gap and no duplicate.
//! - [`Store::current_revision`] is the newest revision this process has
//!   seen in any response or watch event. It may trail writes made through
//!   other API servers by the time their events arrive, which is safe for
//!   its uses (the start of a watch cache, the compactor).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, PutOptions,
    Txn, TxnOp, TxnOpResponse, WatchOptions,
};

use crate::keys::check_key;
use crate::{
    Event, EventKind, KeyValue, ListOptions, ListResult, Result, Revision, Store, StoreError,
    WatchStream,
};

/// How long one request to etcd may take before it fails (a member without
/// quorum can otherwise hold a request for ever).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// The longest pause between attempts to resume a broken watch.
const MAX_WATCH_BACKOFF: Duration = Duration::from_secs(2);

/// Where the etcd cluster is and how to reach it.
#[derive(Clone, Debug, Default)]
pub struct EtcdConfig {
    /// Client URLs of the members (`http://127.0.0.1:2379`, or `https://`
    /// with [`EtcdTls`]).
    pub endpoints: Vec<String>,
    /// Prepended to every key (Kubernetes' `--etcd-prefix` is applied the
    /// same way); empty keeps the keys as they are (`/registry/...`).
    pub prefix: String,
    pub tls: Option<EtcdTls>,
}

/// TLS to etcd: the CA that signed the members' certificates, and an
/// optional client certificate and key (PEM files).
#[derive(Clone, Debug)]
pub struct EtcdTls {
    pub ca_file: PathBuf,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

fn backend(e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::Backend(Box::new(e))
}

#[derive(Debug, thiserror::Error)]
enum EtcdSetupError {
    #[error("no etcd endpoints were given")]
    NoEndpoints,
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("a client certificate needs its key (and a key its certificate)")]
    HalfIdentity,
    #[error("no etcd member answered within {0:?}")]
    Timeout(Duration),
}

/// Connects to etcd and checks that it answers.
pub async fn connect_etcd(config: &EtcdConfig) -> Result<crate::SharedStore> {
    if config.endpoints.is_empty() {
        return Err(backend(EtcdSetupError::NoEndpoints));
    }
    let mut options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        // Dead connections are noticed, so watches move to a live member.
        .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
        .with_keep_alive_while_idle(true)
        // A member cut off from its leader fails requests and watches
        // rather than serving stale data.
        .with_require_leader(true);
    if let Some(tls) = &config.tls {
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|source| {
                backend(EtcdSetupError::Read {
                    path: path.display().to_string(),
                    source,
                })
            })
        };
        let mut t = etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(read(&tls.ca_file)?));
        match (&tls.cert_file, &tls.key_file) {
            (Some(cert), Some(key)) => {
                t = t.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
            }
            (None, None) => {}
            _ => return Err(backend(EtcdSetupError::HalfIdentity)),
        }
        options = options.with_tls(t);
    }
    let client = Client::connect(&config.endpoints, Some(options))
        .await
        .map_err(backend)?;
    let store = EtcdStore {
        client,
        prefix: config.prefix.clone(),
        seen: Arc::new(AtomicU64::new(0)),
        compacted: Arc::new(AtomicU64::new(0)),
    };
    // A read through the quorum: etcd is there, and the current revision is known.
    store.get("/").await?;
    tracing::info!(endpoints = ?config.endpoints, prefix = %config.prefix, revision = store.current_revision(), "connected to etcd");
    Ok(Arc::new(store))
}

/// The etcd backend. Cloning the client is cheap: it shares one channel
/// balanced over the members.
pub(crate) struct EtcdStore {
    client: Client,
    prefix: String,
    /// The newest revision seen in any response.
    seen: Arc<AtomicU64>,
    /// The newest compaction this process made or was told of.
    compacted: Arc<AtomicU64>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("prefix", &self.prefix)
            .field("revision", &self.seen.load(Ordering::Acquire))
            .finish()
    }
}

/// What etcd said, in the store's terms.
fn classify(e: etcd_client::Error) -> Classified {
    if let etcd_client::Error::GRpcStatus(status) = &e {
        let message = status.message();
        if message.contains("required revision has been compacted") {
            return Classified::Compacted;
        }
        if message.contains("required revision is a future revision") {
            return Classified::Future;
        }
    }
    Classified::Other(backend(e))
}

/// Which failed requests may be sent again.
#[derive(Clone, Copy)]
enum Retry {
    /// Any request etcd did not serve (reads, and compaction, which is
    /// idempotent).
    Read,
    /// Only a request that never left this process.
    Write,
}

/// etcd could not serve the request now: no member reachable, no leader,
/// a leader change.
fn unavailable(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => s.code() == tonic::Code::Unavailable,
        etcd_client::Error::TransportError(_) => true,
        _ => false,
    }
}

/// The request never reached a member: the connection to the one the
/// balancer chose could not be made.
fn never_sent(e: &etcd_client::Error) -> bool {
    use std::error::Error as _;
    let mut source: Option<&(dyn std::error::Error + 'static)> = match e {
        etcd_client::Error::GRpcStatus(s) if s.code() == tonic::Code::Unavailable => s.source(),
        etcd_client::Error::TransportError(t) => t.source(),
        _ => None,
    };
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::ConnectionRefused
        {
            return true;
        }
        source = err.source();
    }
    false
}

enum Classified {
    Compacted,
    Future,
    Other(StoreError),
}

/// The exclusive end of the keys starting with `prefix` (etcd's `range_end`).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte was 0xff (or the prefix was empty): to the end of the keyspace.
    vec![0]
}

fn revision(r: i64) -> Revision {
    r.max(0) as Revision
}

impl EtcdStore {
    fn full(&self, key: &str) -> Vec<u8> {
        let mut k = Vec::with_capacity(self.prefix.len() + key.len());
        k.extend_from_slice(self.prefix.as_bytes());
        k.extend_from_slice(key.as_bytes());
        k
    }

    fn saw(&self, header: Option<&etcd_client::ResponseHeader>) -> Revision {
        let r = header.map_or(0, |h| revision(h.revision()));
        self.seen.fetch_max(r, Ordering::AcqRel);
        r
    }

    fn kv(&self, kv: &etcd_client::KeyValue) -> Result<KeyValue> {
        kv_from(&self.prefix, kv)
    }

    /// Runs `call` under the request timeout. A request that never reached
    /// a member (its connection was refused: the balancer picked a dead
    /// member) is sent again, to another; a read is also sent again when a
    /// member answers that it cannot serve now (no leader, leader changed).
    /// A write that reached a member is never repeated: it may have
    /// applied, and its guard would then fail it.
    async fn timed<T, F>(&self, retry: Retry, mut call: impl FnMut() -> F) -> Result<T, Classified>
    where
        F: Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
        let mut pause = Duration::from_millis(5);
        loop {
            match tokio::time::timeout_at(deadline, call()).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) => {
                    let again = match retry {
                        Retry::Read => unavailable(&e),
                        Retry::Write => never_sent(&e),
                    };
                    if !again || tokio::time::Instant::now() + pause >= deadline {
                        return Err(classify(e));
                    }
                    tracing::debug!(error = %e, "etcd request not served; sending it again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(250));
                }
                Err(_) => {
                    return Err(Classified::Other(backend(EtcdSetupError::Timeout(
                        REQUEST_TIMEOUT,
                    ))));
                }
            }
        }
    }

    async fn txn(&self, txn: Txn) -> Result<etcd_client::TxnResponse> {
        self.timed(Retry::Write, || {
            let (mut kv, txn) = (self.client.kv_client(), txn.clone());
            async move { kv.txn(txn).await }
        })
        .await
        .map_err(|c| match c {
            Classified::Other(e) => e,
            Classified::Compacted | Classified::Future => backend(std::io::Error::other(
                "unexpected revision error in a write",
            )),
        })
    }

    /// Runs `op` on an existing `key`, guarded by its `mod_revision` when
    /// `expected` is given; fails with `Conflict` or `NotFound` as the
    /// guard's failure shows. Returns the response and its revision.
    async fn guarded(
        &self,
        key: &str,
        expected: Option<Revision>,
        op: TxnOp,
    ) -> Result<(etcd_client::TxnResponse, Revision)> {
        let full = self.full(key);
        let guard = match expected {
            Some(rev) => Compare::mod_revision(full.clone(), CompareOp::Equal, rev as i64),
            None => Compare::create_revision(full.clone(), CompareOp::Greater, 0),
        };
        let txn = Txn::new()
            .when([guard])
            .and_then([op])
            .or_else([TxnOp::get(full, None)]);
        let resp = self.txn(txn).await?;
        let rev = self.saw(resp.header());
        if !resp.succeeded() {
            return Err(match (self.current_of(&resp)?, expected) {
                (Some(current), Some(expected)) => StoreError::Conflict {
                    key: key.to_owned(),
                    expected,
                    actual: current.mod_revision,
                },
                _ => Self::not_found(key),
            });
        }
        Ok((resp, rev))
    }

    /// The key's current value from the failed branch of a transaction.
    fn current_of(&self, resp: &etcd_client::TxnResponse) -> Result<Option<KeyValue>> {
        for op in resp.op_responses() {
            if let TxnOpResponse::Get(get) = op {
                return get.kvs().first().map(|kv| self.kv(kv)).transpose();
            }
        }
        Ok(None)
    }

    fn not_found(key: &str) -> StoreError {
        StoreError::NotFound {
            key: key.to_owned(),
        }
    }
}

fn kv_from(prefix: &str, kv: &etcd_client::KeyValue) -> Result<KeyValue> {
    let key = kv
        .key()
        .strip_prefix(prefix.as_bytes())
        .and_then(|k| std::str::from_utf8(k).ok())
        .ok_or_else(|| StoreError::Corrupt {
            what: format!("etcd key {:?}", String::from_utf8_lossy(kv.key())),
        })?;
    Ok(KeyValue {
        key: key.to_owned(),
        value: Bytes::copy_from_slice(kv.value()),
        create_revision: revision(kv.create_revision()),
        mod_revision: revision(kv.mod_revision()),
    })
}

#[async_trait::async_trait]
impl Store for EtcdStore {
    fn current_revision(&self) -> Revision {
        self.seen.load(Ordering::Acquire)
    }

    fn compacted_revision(&self) -> Revision {
        self.compacted.load(Ordering::Acquire)
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let resp = self
            .timed(Retry::Read, || {
                let (mut kv, key) = (self.client.kv_client(), self.full(key));
                async move { kv.get(key, None).await }
            })
            .await
            .map_err(|c| match c {
                Classified::Other(e) => e,
                _ => backend(std::io::Error::other("unexpected revision error in a get")),
            })?;
        self.saw(resp.header());
        resp.kvs().first().map(|kv| self.kv(kv)).transpose()
    }

    async fn list(&self, prefix: &str, opts: ListOptions) -> Result<ListResult> {
        let full_prefix = self.full(prefix);
        let start = match &opts.start_after {
            // Strictly after the last key returned: that key with a NUL appended.
            Some(after) => {
                let mut k = self.full(after);
                k.push(0);
                k
            }
            None => full_prefix.clone(),
        };
        let mut get = GetOptions::new().with_range(prefix_end(&full_prefix));
        if opts.limit > 0 {
            get = get.with_limit(opts.limit as i64);
        }
        if let Some(rev) = opts.revision {
            get = get.with_revision(rev as i64);
        }
        let resp = match self
            .timed(Retry::Read, || {
                let (mut kv, start, get) = (self.client.kv_client(), start.clone(), get.clone());
                async move { kv.get(start, Some(get)).await }
            })
            .await
        {
            Ok(resp) => resp,
            Err(Classified::Compacted) => {
                let requested = opts.revision.unwrap_or(0);
                let compacted = self
                    .compacted
                    .fetch_max(requested + 1, Ordering::AcqRel)
                    .max(requested + 1);
                return Err(StoreError::Gone {
                    requested,
                    compacted,
                });
            }
            Err(Classified::Future) => {
                return Err(StoreError::FutureRevision {
                    requested: opts.revision.unwrap_or(0),
                    current: self.current_revision(),
                });
            }
            Err(Classified::Other(e)) => return Err(e),
        };
        let now = self.saw(resp.header());
        let items = resp
            .kvs()
            .iter()
            .map(|kv| self.kv(kv))
            .collect::<Result<Vec<_>>>()?;
        Ok(ListResult {
            items,
            revision: opts.revision.unwrap_or(now),
            more: resp.more(),
        })
    }

    async fn create(&self, key: &str, value: Bytes) -> Result<KeyValue> {
        check_key(key)?;
        let full = self.full(key);
        let txn = Txn::new()
            .when([Compare::create_revision(full.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(full, value.to_vec(), None)]);
        let resp = self.txn(txn).await?;
        let rev = self.saw(resp.header());
        if !resp.succeeded() {
            return Err(StoreError::AlreadyExists {
                key: key.to_owned(),
            });
        }
        Ok(KeyValue {
            key: key.to_owned(),
            value,
            create_revision: rev,
            mod_revision: rev,
        })
    }

    async fn update(
        &self,
        key: &str,
        value: Bytes,
        expected: Option<Revision>,
    ) -> Result<KeyValue> {
        check_key(key)?;
        let full = self.full(key);
        let put = TxnOp::put(
            full,
            value.to_vec(),
            Some(PutOptions::new().with_prev_key()),
        );
        let (resp, rev) = self.guarded(key, expected, put).await?;
        let create_revision = resp
            .op_responses()
            .into_iter()
            .find_map(|op| match op {
                TxnOpResponse::Put(put) => put.prev_key().map(|kv| revision(kv.create_revision())),
                _ => None,
            })
            .unwrap_or(rev);
        Ok(KeyValue {
            key: key.to_owned(),
            value,
            create_revision,
            mod_revision: rev,
        })
    }

    async fn delete(&self, key: &str, expected: Option<Revision>) -> Result<KeyValue> {
        check_key(key)?;
        let delete = TxnOp::delete(self.full(key), Some(DeleteOptions::new().with_prev_key()));
        let (resp, rev) = self.guarded(key, expected, delete).await?;
        let last = resp
            .op_responses()
            .into_iter()
            .find_map(|op| match op {
                TxnOpResponse::Delete(d) => d.prev_kvs().first().map(|kv| self.kv(kv)),
                _ => None,
            })
            .transpose()?
            .ok_or_else(|| Self::not_found(key))?;
        Ok(KeyValue {
            mod_revision: rev,
            ..last
        })
    }

    fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream> {
        let compacted = self.compacted_revision();
        if from < compacted {
            return Err(StoreError::Gone {
                requested: from,
                compacted,
            });
        }
        let state = EtcdWatch {
            client: self.client.clone(),
            store_prefix: self.prefix.clone(),
            key: self.full(prefix),
            last: from,
            seen: self.seen.clone(),
            compacted: self.compacted.clone(),
            stream: None,
            pending: VecDeque::new(),
            backoff: Duration::ZERO,
            done: false,
        };
        Ok(Box::pin(futures::stream::unfold(state, EtcdWatch::next)))
    }

    async fn compact(&self, rev: Revision) -> Result<()> {
        match self
            .timed(Retry::Read, || {
                let mut kv = self.client.kv_client();
                async move { kv.compact(rev as i64, None).await }
            })
            .await
        {
            Ok(resp) => {
                self.saw(resp.header());
            }
            // Another API server compacted at least this far already.
            Err(Classified::Compacted) => {}
            Err(Classified::Future) => {
                return Err(StoreError::FutureRevision {
                    requested: rev,
                    current: self.current_revision(),
                });
            }
            Err(Classified::Other(e)) => return Err(e),
        }
        self.compacted.fetch_max(rev, Ordering::AcqRel);
        Ok(())
    }
}

/// One watch: etcd's stream, resumed from the last delivered revision when
/// it breaks.
struct EtcdWatch {
    client: Client,
    store_prefix: String,
    key: Vec<u8>,
    /// Events up to and including this revision were delivered.
    last: Revision,
    seen: Arc<AtomicU64>,
    compacted: Arc<AtomicU64>,
    stream: Option<etcd_client::WatchStream>,
    pending: VecDeque<Event>,
    backoff: Duration,
    done: bool,
}

impl EtcdWatch {
    async fn next(mut self) -> Option<(Result<Event>, Self)> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Some((Ok(e), self));
            }
            if self.done {
                return None;
            }
            let Some(stream) = self.stream.as_mut() else {
                self.open().await;
                continue;
            };
            match stream.message().await {
                Ok(Some(resp)) => {
                    if let Some(h) = resp.header() {
                        self.seen
                            .fetch_max(revision(h.revision()), Ordering::AcqRel);
                    }
                    if resp.compact_revision() > 0 {
                        let compacted = revision(resp.compact_revision());
                        self.compacted.fetch_max(compacted, Ordering::AcqRel);
                        self.done = true;
                        let gone = StoreError::Gone {
                            requested: self.last,
                            compacted,
                        };
                        return Some((Err(gone), self));
                    }
                    if resp.canceled() {
                        tracing::warn!(
                            reason = resp.cancel_reason(),
                            last = self.last,
                            "etcd cancelled a watch; resuming"
                        );
                        self.stream = None;
                        continue;
                    }
                    self.backoff = Duration::ZERO;
                    if resp.events().is_empty() && !resp.created() {
                        // A progress notification: every event up to its
                        // revision was delivered.
                        if let Some(h) = resp.header() {
                            self.last = self.last.max(revision(h.revision()));
                        }
                        continue;
                    }
                    for e in resp.events() {
                        match self.event(e) {
                            Ok(Some(event)) => {
                                self.last = event.revision();
                                self.pending.push_back(event);
                            }
                            Ok(None) => {}
                            Err(err) => {
                                self.done = true;
                                self.pending.clear();
                                return Some((Err(err), self));
                            }
                        }
                    }
                }
                Ok(None) | Err(_) => {
                    tracing::debug!(last = self.last, "etcd watch stream broke; resuming");
                    self.stream = None;
                }
            }
        }
    }

    /// Opens etcd's watch at the last delivered revision (whose own events
    /// are skipped), waiting between attempts while no member answers.
    async fn open(&mut self) {
        if !self.backoff.is_zero() {
            tokio::time::sleep(self.backoff).await;
        }
        self.backoff = (self.backoff * 2).clamp(Duration::from_millis(50), MAX_WATCH_BACKOFF);
        let options = WatchOptions::new()
            .with_range(prefix_end(&self.key))
            .with_start_revision(self.last.max(1) as i64)
            .with_prev_key()
            // Quiet prefixes still learn how far they are: a resumed watch
            // then starts from there rather than replaying history.
            .with_progress_notify();
        match self
            .client
            .watch_client()
            .watch(self.key.clone(), Some(options))
            .await
        {
            Ok(stream) => self.stream = Some(stream),
            Err(e) => {
                tracing::warn!(error = %e, last = self.last, "cannot open an etcd watch; retrying");
            }
        }
    }

    /// The store's event for one of etcd's, or `None` for one already delivered.
    fn event(&self, e: &etcd_client::Event) -> Result<Option<Event>> {
        let Some(kv) = e.kv() else { return Ok(None) };
        let rev = revision(kv.mod_revision());
        if rev <= self.last {
            return Ok(None);
        }
        let prev = e
            .prev_kv()
            .map(|p| kv_from(&self.store_prefix, p))
            .transpose()?;
        let event = match e.event_type() {
            EventType::Put => Event {
                kind: EventKind::Put,
                kv: kv_from(&self.store_prefix, kv)?,
                prev,
            },
            EventType::Delete => {
                let tombstone = kv_from(&self.store_prefix, kv)?;
                let last = match &prev {
                    Some(p) => KeyValue {
                        mod_revision: rev,
                        ..p.clone()
                    },
                    None => tombstone,
                };
                Event {
                    kind: EventKind::Delete,
                    kv: last,
                    prev,
                }
            }
        };
        Ok(Some(event))
    }
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn the_end_of_a_prefix_is_its_successor() {
        assert_eq!(prefix_end(b"/registry/"), b"/registry0".to_vec());
        assert_eq!(prefix_end(b"a\xff\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b""), vec![0]);
    }
}
