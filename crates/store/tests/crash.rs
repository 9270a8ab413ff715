//! Crash safety: a child process writes in a loop and reports every
//! acknowledged write; it is SIGKILLed at random moments over 100 cycles, and
//! after each kill every acknowledged write must be present with its revision.
//!
//! The child is this same test binary re-run with `CRASH_CHILD_DIR` set, so no
//! extra binary is needed.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use bytes::Bytes;
use rand::Rng;

const CHILD_ENV: &str = "CRASH_CHILD_DIR";
const START_ENV: &str = "CRASH_CHILD_START";

/// Runs only as the child: writes forever until killed.
#[test]
fn crash_child_writer() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let start: u64 = std::env::var(START_ENV).unwrap().parse().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let store = wasmkube_store::open_sled(std::path::Path::new(&dir)).unwrap();
        let counter = store.get("/counter").await.unwrap();
        let mut counter_rev = counter.as_ref().map(|kv| kv.mod_revision);
        let out = std::sync::Arc::new(std::sync::Mutex::new(std::io::stdout()));
        // Several concurrent creators exercise group commit; one CAS chain on
        // "/counter" exercises guarded updates.
        let mut tasks = Vec::new();
        for lane in 0..4u64 {
            let store = store.clone();
            let out = out.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0.. {
                    let n = start + i * 4 + lane;
                    let kv = store
                        .create(&format!("/obj/{n:012}"), Bytes::from(n.to_string()))
                        .await
                        .unwrap();
                    let mut out = out.lock().unwrap();
                    writeln!(out, "ACK {n} {}", kv.mod_revision).unwrap();
                    out.flush().unwrap();
                }
            }));
        }
        for n in start.. {
            let value = Bytes::from(n.to_string());
            let kv = match counter_rev {
                Some(rev) => store.update("/counter", value, Some(rev)).await.unwrap(),
                None => store.create("/counter", value).await.unwrap(),
            };
            counter_rev = Some(kv.mod_revision);
            let mut out = out.lock().unwrap();
            writeln!(out, "CTR {n} {}", kv.mod_revision).unwrap();
            out.flush().unwrap();
        }
    });
}

#[test]
fn acknowledged_writes_survive_sigkill() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut rng = rand::rng();
    let mut acked: BTreeMap<u64, u64> = BTreeMap::new();
    let mut counter: Option<(u64, u64)> = None;
    let mut next_start = 0u64;
    let cycles = 100;
    for cycle in 0..cycles {
        let mut child = Command::new(&exe)
            .args([
                "crash_child_writer",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, dir.path())
            .env(START_ENV, next_start.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        // Let the child get some writes in, then kill it at a random moment.
        let want = rng.random_range(20..400);
        let mut lines = Vec::new();
        while lines.len() < want {
            match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(line) => lines.push(line),
                Err(e) => panic!("cycle {cycle}: child stopped reporting: {e}"),
            }
        }
        child.kill().unwrap();
        child.wait().unwrap();
        reader.join().unwrap();
        lines.extend(rx.try_iter());
        for line in lines {
            let mut parts = line.split_whitespace();
            let (tag, n, rev) = (parts.next(), parts.next(), parts.next());
            let (Some(tag), Some(n), Some(rev)) = (tag, n, rev) else {
                continue;
            };
            let (n, rev): (u64, u64) = match (n.parse(), rev.parse()) {
                (Ok(n), Ok(rev)) => (n, rev),
                _ => continue, // a line torn by the kill was never a complete ack
            };
            match tag {
                "ACK" => {
                    acked.insert(n, rev);
                }
                "CTR" => counter = Some((n, rev)),
                _ => {}
            }
        }
        let max_n = acked.keys().next_back().copied().unwrap_or(0);
        next_start = (max_n / 4 + 1000) * 4 + 4 * cycle as u64;

        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let store = wasmkube_store::open_sled(dir.path()).unwrap();
            let max_acked_rev = acked.values().copied().max().unwrap_or(0);
            assert!(
                store.current_revision() >= max_acked_rev,
                "cycle {cycle}: revision went backwards"
            );
            // One list at the current revision holds every acknowledged
            // write, at the revision it was acknowledged with.
            let stored: BTreeMap<u64, (u64, Bytes)> = store
                .list("/obj/", Default::default())
                .await
                .unwrap()
                .items
                .into_iter()
                .map(|kv| {
                    let n = kv.key["/obj/".len()..].parse().expect("an object key");
                    (n, (kv.mod_revision, kv.value))
                })
                .collect();
            for (n, rev) in &acked {
                let (stored_rev, value) = stored
                    .get(n)
                    .unwrap_or_else(|| panic!("cycle {cycle}: acknowledged write {n} lost"));
                assert_eq!(value, &Bytes::from(n.to_string()), "cycle {cycle}");
                assert_eq!(stored_rev, rev, "cycle {cycle}: revision of {n} changed");
            }
            if let Some((n, rev)) = counter {
                let kv = store.get("/counter").await.unwrap().expect("counter lost");
                let stored: u64 = std::str::from_utf8(&kv.value).unwrap().parse().unwrap();
                assert!(
                    kv.mod_revision >= rev && stored >= n,
                    "cycle {cycle}: counter went back"
                );
            }
            // Revisions are unique and the watch log replays every one of them.
            let list = store.list("/obj/", Default::default()).await.unwrap();
            let mut revs: Vec<_> = list.items.iter().map(|kv| kv.mod_revision).collect();
            revs.sort_unstable();
            revs.dedup();
            assert_eq!(
                revs.len(),
                list.items.len(),
                "cycle {cycle}: duplicate revisions"
            );
        });
    }
    assert!(
        acked.len() > cycles,
        "the child acknowledged too few writes to mean anything"
    );
}
