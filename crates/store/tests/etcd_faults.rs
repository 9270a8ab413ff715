//! The etcd store across member failures: a three-member cluster on
//! loopback loses each member in turn (SIGKILL, then restart) while a
//! writer keeps writing; every acknowledged write is present afterwards and
//! a watch opened before the faults sees every write exactly once, in
//! revision order (it resumes on another member when its own dies).

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use wasmkube_store::{EtcdConfig, SharedStore, StoreError};
use wasmkube_testkit::etcd::EtcdCluster;

/// Creates `key`, retrying while no member answers. A retry after a lost
/// reply can find the key made by the first attempt: that is success too.
async fn create(s: &SharedStore, key: &str) -> u64 {
    let mut retried = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match s.create(key, Bytes::from_static(b"v")).await {
            Ok(kv) => return kv.mod_revision,
            Err(StoreError::AlreadyExists { .. }) if retried => {
                return s.get(key).await.unwrap().unwrap().mod_revision;
            }
            Err(StoreError::Backend(e)) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "no member took {key} for a minute: {e}"
                );
                retried = true;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("create {key}: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_and_a_watch_survive_each_member_dying_in_turn() {
    let mut cluster = EtcdCluster::start(3);
    let s = wasmkube_store::connect_etcd(&EtcdConfig {
        endpoints: cluster.endpoints(),
        prefix: String::new(),
        tls: None,
    })
    .await
    .unwrap();
    let start = s.current_revision();
    let mut watch = s.watch("/faults/", start).unwrap();

    let mut acknowledged = Vec::new();
    for round in 0..3 {
        for i in 0..40 {
            let key = format!("/faults/{round}-{i:02}");
            acknowledged.push((key.clone(), create(&s, &key).await));
            if i == 20 {
                // Kill a member (the leader in the first round) mid-stream.
                let victim = if round == 0 {
                    cluster.leader().unwrap_or(0)
                } else {
                    (cluster.leader().unwrap_or(0) + round) % 3
                };
                cluster.kill(victim);
                acknowledged.push((format!("{key}-after-kill"), {
                    let k = format!("{key}-after-kill");
                    create(&s, &k).await
                }));
                cluster.restart(victim);
            }
        }
    }

    // Every acknowledged write is there, at the revision it was acknowledged at.
    for (key, rev) in &acknowledged {
        let kv = s
            .get(key)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{key} lost"));
        assert_eq!(kv.mod_revision, *rev, "{key}");
    }
    // The watch saw each exactly once, in revision order.
    let mut last = start;
    let mut seen = Vec::new();
    while seen.len() < acknowledged.len() {
        let e = tokio::time::timeout(Duration::from_secs(30), watch.next())
            .await
            .expect("a watch event within 30 s")
            .expect("the watch goes on")
            .expect("no watch error");
        assert!(
            e.revision() > last,
            "out of order or duplicate at {}",
            e.revision()
        );
        last = e.revision();
        seen.push((e.kv.key.clone(), e.revision()));
    }
    let mut want = acknowledged.clone();
    want.sort_by_key(|(_, rev)| *rev);
    assert_eq!(seen, want);
}
