//! One semantics suite, run against every backend: revisions, preconditions,
//! paging, MVCC lists, watch ordering and compaction. Each test gets fresh
//! stores: memory, sled in a temporary directory, and etcd (a one-member
//! cluster of its own on loopback). Revisions are counted from each store's
//! first one (etcd's first revision is 1, the embedded engine's 0).

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use wasmkube_store::{EventKind, ListOptions, SharedStore, StoreError, WatchStream};

/// What keeps a backend alive while its store is used.
enum Keep {
    Nothing,
    Dir(#[allow(dead_code)] tempfile::TempDir),
    Etcd(#[allow(dead_code)] wasmkube_testkit::etcd::EtcdCluster),
}

/// A fresh store of each backend, with its starting revision.
async fn backends() -> Vec<(&'static str, SharedStore, u64, Keep)> {
    let dir = tempfile::tempdir().unwrap();
    let sled = wasmkube_store::open_sled(dir.path()).unwrap();
    let etcd = wasmkube_testkit::etcd::EtcdCluster::start(1);
    let on_etcd = wasmkube_store::connect_etcd(&wasmkube_store::EtcdConfig {
        endpoints: etcd.endpoints(),
        prefix: "/test".into(),
        tls: None,
    })
    .await
    .unwrap();
    [
        ("memory", wasmkube_store::memory(), Keep::Nothing),
        ("sled", sled, Keep::Dir(dir)),
        ("etcd", on_etcd, Keep::Etcd(etcd)),
    ]
    .into_iter()
    .map(|(name, s, keep)| {
        let r0 = s.current_revision();
        (name, s, r0, keep)
    })
    .collect()
}

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

/// The next event, or a failure after a generous deadline (never a sleep).
async fn next(w: &mut WatchStream) -> wasmkube_store::Event {
    tokio::time::timeout(Duration::from_secs(10), w.next())
        .await
        .expect("watch event within deadline")
        .expect("watch stream open")
        .expect("watch event ok")
}

#[tokio::test]
async fn crud_and_revisions() {
    for (name, s, r0, _keep) in backends().await {
        assert!(
            s.list("/", Default::default())
                .await
                .unwrap()
                .items
                .is_empty(),
            "{name}"
        );
        let a = s.create("/r/a", b("1")).await.unwrap();
        assert_eq!(
            (a.create_revision, a.mod_revision),
            (r0 + 1, r0 + 1),
            "{name}"
        );
        assert!(
            matches!(
                s.create("/r/a", b("x")).await,
                Err(StoreError::AlreadyExists { .. })
            ),
            "{name}"
        );
        let a2 = s.update("/r/a", b("2"), Some(r0 + 1)).await.unwrap();
        assert_eq!(
            (a2.create_revision, a2.mod_revision),
            (r0 + 1, r0 + 2),
            "{name}"
        );
        match s.update("/r/a", b("3"), Some(r0 + 1)).await {
            Err(StoreError::Conflict {
                expected, actual, ..
            }) if (expected, actual) == (r0 + 1, r0 + 2) => {}
            other => panic!("{name}: stale update gave {other:?}"),
        }
        assert!(
            matches!(
                s.delete("/r/a", Some(r0 + 1)).await,
                Err(StoreError::Conflict { .. })
            ),
            "{name}"
        );
        let gone = s.delete("/r/a", Some(r0 + 2)).await.unwrap();
        assert_eq!(
            (gone.value.clone(), gone.mod_revision),
            (b("2"), r0 + 3),
            "{name}"
        );
        assert_eq!(s.get("/r/a").await.unwrap(), None, "{name}");
        assert!(
            matches!(
                s.update("/r/a", b("4"), None).await,
                Err(StoreError::NotFound { .. })
            ),
            "{name}"
        );
        assert!(
            matches!(
                s.delete("/r/a", None).await,
                Err(StoreError::NotFound { .. })
            ),
            "{name}"
        );
        // Re-creating a deleted key starts a new life with a new create revision.
        let again = s.create("/r/a", b("5")).await.unwrap();
        assert_eq!(
            (again.create_revision, again.mod_revision),
            (r0 + 4, r0 + 4),
            "{name}"
        );
        assert_eq!(s.current_revision(), r0 + 4, "{name}");
        assert!(
            matches!(
                s.create("", b("x")).await,
                Err(StoreError::InvalidKey { .. })
            ),
            "{name}"
        );
        assert!(
            matches!(
                s.create("/a\0b", b("x")).await,
                Err(StoreError::InvalidKey { .. })
            ),
            "{name}"
        );
        // Failed writes consumed no revision.
        assert_eq!(s.current_revision(), r0 + 4, "{name}");
    }
}

#[tokio::test]
async fn list_pages_at_a_fixed_revision() {
    for (name, s, _, _keep) in backends().await {
        for i in 0..10 {
            s.create(&format!("/pods/ns/p{i}"), b(&i.to_string()))
                .await
                .unwrap();
        }
        s.create("/pods/other/x", b("x")).await.unwrap();
        s.create("/podsx/y", b("y")).await.unwrap();
        let first = s
            .list(
                "/pods/ns/",
                ListOptions {
                    limit: 4,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(first.items.len(), 4, "{name}");
        assert!(first.more, "{name}");
        // Changes after the first page do not show on later pages of the same list.
        s.update("/pods/ns/p7", b("changed"), None).await.unwrap();
        s.delete("/pods/ns/p8", None).await.unwrap();
        s.create("/pods/ns/p99", b("new")).await.unwrap();
        let mut all = first.items.clone();
        let mut after = first.items.last().map(|kv| kv.key.clone());
        loop {
            let page = s
                .list(
                    "/pods/ns/",
                    ListOptions {
                        revision: Some(first.revision),
                        start_after: after.clone(),
                        limit: 4,
                    },
                )
                .await
                .unwrap();
            assert_eq!(page.revision, first.revision, "{name}");
            all.extend(page.items.iter().cloned());
            after = page.items.last().map(|kv| kv.key.clone());
            if !page.more {
                break;
            }
        }
        let got: Vec<_> = all
            .iter()
            .map(|kv| (kv.key.as_str(), kv.value.clone()))
            .collect();
        let want: Vec<_> = (0..10)
            .map(|i| (format!("/pods/ns/p{i}"), b(&i.to_string())))
            .collect();
        let want: Vec<_> = want.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        assert_eq!(got, want, "{name}");
        // A list now sees the changes.
        let now = s.list("/pods/ns/", ListOptions::default()).await.unwrap();
        let keys: Vec<_> = now.items.iter().map(|kv| kv.key.as_str()).collect();
        assert_eq!(keys.len(), 10, "{name}: {keys:?}");
        assert!(
            keys.contains(&"/pods/ns/p99") && !keys.contains(&"/pods/ns/p8"),
            "{name}"
        );
        assert!(matches!(
            s.list(
                "/",
                ListOptions {
                    revision: Some(10_000),
                    ..Default::default()
                }
            )
            .await,
            Err(StoreError::FutureRevision { .. })
        ));
    }
}

#[tokio::test]
async fn watch_replays_history_then_follows_live() {
    for (name, s, r0, _keep) in backends().await {
        s.create("/w/a", b("1")).await.unwrap();
        let start = s.current_revision();
        s.update("/w/a", b("2"), None).await.unwrap();
        s.create("/x/ignored", b("x")).await.unwrap();
        s.delete("/w/a", None).await.unwrap();
        let mut w = s.watch("/w/", start).unwrap();
        let e = next(&mut w).await;
        assert_eq!(
            (e.kind, e.kv.value.clone(), e.revision()),
            (EventKind::Put, b("2"), r0 + 2),
            "{name}"
        );
        assert_eq!(e.prev.unwrap().value, b("1"), "{name}");
        let e = next(&mut w).await;
        assert_eq!(
            (e.kind, e.kv.value.clone(), e.revision()),
            (EventKind::Delete, b("2"), r0 + 4),
            "{name}"
        );
        s.create("/w/b", b("live")).await.unwrap();
        let e = next(&mut w).await;
        assert_eq!(
            (e.kind, e.kv.key.as_str(), e.revision()),
            (EventKind::Put, "/w/b", r0 + 5),
            "{name}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_sees_concurrent_writers_in_order_without_gaps() {
    for (name, s, r0, _keep) in backends().await {
        let mut w = s.watch("/c/", r0).unwrap();
        let writers: Vec<_> = (0..8)
            .map(|t| {
                let s = s.clone();
                tokio::spawn(async move {
                    for i in 0..100 {
                        let key = format!("/c/{t}");
                        if i == 0 {
                            s.create(&key, b("0")).await.unwrap();
                        } else {
                            s.update(&key, b(&i.to_string()), None).await.unwrap();
                        }
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.await.unwrap();
        }
        let mut last = r0;
        let mut per_key: BTreeMap<String, i32> = BTreeMap::new();
        for _ in 0..800 {
            let e = next(&mut w).await;
            assert_eq!(e.revision(), last + 1, "{name}: gap or duplicate");
            last = e.revision();
            let v: i32 = std::str::from_utf8(&e.kv.value).unwrap().parse().unwrap();
            let prev = per_key.insert(e.kv.key.clone(), v);
            assert_eq!(
                prev.map_or(0, |p| p + 1),
                v,
                "{name}: out of order for {}",
                e.kv.key
            );
        }
        assert_eq!(last, s.current_revision(), "{name}");
        // A second watch from the middle replays exactly the rest.
        let mut w2 = s.watch("/c/", r0 + 400).unwrap();
        assert_eq!(next(&mut w2).await.revision(), r0 + 401, "{name}");
    }
}

#[tokio::test]
async fn compaction_makes_old_revisions_gone() {
    for (name, s, r0, _keep) in backends().await {
        s.create("/k/a", b("1")).await.unwrap();
        s.update("/k/a", b("2"), None).await.unwrap();
        s.create("/k/b", b("b")).await.unwrap();
        s.delete("/k/b", None).await.unwrap();
        s.update("/k/a", b("3"), None).await.unwrap();
        s.compact(r0 + 4).await.unwrap();
        assert_eq!(s.compacted_revision(), r0 + 4, "{name}");
        assert!(
            matches!(
                s.watch("/k/", r0 + 3),
                Err(StoreError::Gone {
                    requested,
                    compacted,
                }) if (requested, compacted) == (r0 + 3, r0 + 4)
            ),
            "{name}"
        );
        assert!(matches!(
            s.list(
                "/k/",
                ListOptions {
                    revision: Some(r0 + 2),
                    ..Default::default()
                }
            )
            .await,
            Err(StoreError::Gone { .. })
        ));
        // The compacted revision itself is still readable.
        let at4 = s
            .list(
                "/k/",
                ListOptions {
                    revision: Some(r0 + 4),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        let got: Vec<_> = at4
            .items
            .iter()
            .map(|kv| (kv.key.as_str(), kv.value.clone()))
            .collect();
        assert_eq!(got, vec![("/k/a", b("2"))], "{name}");
        let mut w = s.watch("/k/", r0 + 4).unwrap();
        assert_eq!(next(&mut w).await.kv.value, b("3"), "{name}");
        assert_eq!(
            s.get("/k/a").await.unwrap().unwrap().value,
            b("3"),
            "{name}"
        );
        assert!(
            matches!(
                s.compact(r0 + 99).await,
                Err(StoreError::FutureRevision { .. })
            ),
            "{name}"
        );
    }
}

#[tokio::test]
async fn a_lagging_watcher_catches_up_from_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let config = wasmkube_store::EngineConfig {
        max_batch: 1,
        watch_buffer: 2,
    };
    let s = wasmkube_store::open_sled_with(dir.path(), config).unwrap();
    let mut w = s.watch("/", 0).unwrap();
    for i in 0..50 {
        s.create(&format!("/lag/{i:02}"), b("x")).await.unwrap();
    }
    for rev in 1..=50 {
        assert_eq!(next(&mut w).await.revision(), rev);
    }
    // Compaction while a watcher lags ends its stream with Gone.
    let mut slow = s.watch("/", 50).unwrap();
    for i in 0..10 {
        s.update(&format!("/lag/{i:02}"), b("y"), None)
            .await
            .unwrap();
    }
    s.compact(55).await.unwrap();
    let mut saw_gone = false;
    while let Ok(Some(item)) = tokio::time::timeout(Duration::from_secs(10), slow.next()).await {
        if let Err(StoreError::Gone { .. }) = item {
            saw_gone = true;
        }
    }
    assert!(saw_gone, "lagging watcher past compaction must see Gone");
}

#[tokio::test]
async fn sled_data_and_revisions_survive_reopen_and_lock_is_exclusive() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = wasmkube_store::open_sled(dir.path()).unwrap();
        s.create("/p/a", b("1")).await.unwrap();
        s.update("/p/a", b("2"), None).await.unwrap();
        s.compact(1).await.unwrap();
        assert!(matches!(
            wasmkube_store::open_sled(dir.path()),
            Err(StoreError::Locked { .. })
        ));
    }
    // Dropping the last handle released the directory at once.
    let s = wasmkube_store::open_sled(dir.path()).unwrap();
    assert_eq!(s.current_revision(), 2);
    assert_eq!(s.compacted_revision(), 1);
    let kv = s.get("/p/a").await.unwrap().unwrap();
    assert_eq!(
        (kv.value, kv.create_revision, kv.mod_revision),
        (b("2"), 1, 2)
    );
    assert_eq!(s.create("/p/b", b("x")).await.unwrap().mod_revision, 3);
}
