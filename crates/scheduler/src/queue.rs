//! The scheduling queue: pods ready to try (active), pods waiting out a
//! backoff after an error, and pods that fit nowhere (unschedulable) until the
//! cluster changes, as in kube-scheduler. Active pods pop highest priority
//! first, then in arrival order.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// A pod's `namespace/name`.
pub type Key = String;

/// Backoff and retry timing.
#[derive(Clone, Debug)]
pub struct QueueConfig {
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Unschedulable pods are retried after this even if nothing changed.
    pub unschedulable_timeout: Duration,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(10),
            unschedulable_timeout: Duration::from_secs(300),
        }
    }
}

#[derive(Default)]
struct Inner {
    /// Ordered by (highest priority, arrival); `queued` maps back.
    active: BTreeMap<(Reverse<i32>, u64), Key>,
    queued: HashMap<Key, (Reverse<i32>, u64)>,
    priority: HashMap<Key, i32>,
    backoff: BTreeMap<(Instant, u64), Key>,
    unschedulable: HashMap<Key, Instant>,
    attempts: HashMap<Key, u32>,
    seq: u64,
}

impl Inner {
    fn remove_waiting(&mut self, key: &str) {
        self.unschedulable.remove(key);
        self.backoff.retain(|_, k| k != key);
    }

    fn activate(&mut self, key: Key) {
        self.remove_waiting(&key);
        if !self.queued.contains_key(&key) {
            self.seq += 1;
            let slot = (
                Reverse(self.priority.get(&key).copied().unwrap_or(0)),
                self.seq,
            );
            self.queued.insert(key.clone(), slot);
            self.active.insert(slot, key);
        }
    }
}

/// See the module docs. Cheap to share behind an `Arc`.
#[derive(Default)]
pub struct Queue {
    inner: Mutex<Inner>,
    wake: Notify,
    config: QueueConfig,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let i = self.inner.lock().expect("queue lock");
        f.debug_struct("Queue")
            .field("active", &i.active.len())
            .field("backoff", &i.backoff.len())
            .field("unschedulable", &i.unschedulable.len())
            .finish()
    }
}

impl Queue {
    pub fn new(config: QueueConfig) -> Self {
        Self {
            config,
            ..Self::default()
        }
    }

    /// How many pods wait: active, in backoff, unschedulable.
    pub fn sizes(&self) -> (usize, usize, usize) {
        let i = self.inner.lock().expect("queue lock");
        (i.active.len(), i.backoff.len(), i.unschedulable.len())
    }

    /// A new or changed pod that needs scheduling, with its priority.
    pub fn add(&self, key: Key, priority: i32) {
        let mut i = self.inner.lock().expect("queue lock");
        i.priority.insert(key.clone(), priority);
        if i.unschedulable.contains_key(&key) || i.backoff.values().any(|k| *k == key) {
            // It waits for a cluster change or its backoff; a pod update alone
            // (for example our own status write) does not make it fit.
            return;
        }
        i.activate(key);
        drop(i);
        self.wake.notify_one();
    }

    /// The pod is bound or gone: stop tracking it.
    pub fn forget(&self, key: &str) {
        let mut i = self.inner.lock().expect("queue lock");
        i.remove_waiting(key);
        i.attempts.remove(key);
        i.priority.remove(key);
        if let Some(slot) = i.queued.remove(key) {
            i.active.remove(&slot);
        }
    }

    /// No node fits: wait for the cluster to change.
    pub fn unschedulable(&self, key: Key) {
        let mut i = self.inner.lock().expect("queue lock");
        *i.attempts.entry(key.clone()).or_default() += 1;
        i.unschedulable.insert(key, Instant::now());
    }

    /// Binding failed: retry after an exponential backoff.
    pub fn backoff(&self, key: Key) {
        let mut i = self.inner.lock().expect("queue lock");
        let n = i.attempts.entry(key.clone()).or_default();
        *n += 1;
        let delay = self
            .config
            .initial_backoff
            .saturating_mul(1 << (*n - 1).min(16))
            .min(self.config.max_backoff);
        i.seq += 1;
        let seq = i.seq;
        i.backoff.insert((Instant::now() + delay, seq), key);
        drop(i);
        self.wake.notify_one();
    }

    /// Nodes or pods changed: every unschedulable pod may fit now.
    pub fn cluster_changed(&self) {
        let mut i = self.inner.lock().expect("queue lock");
        let keys: Vec<Key> = i.unschedulable.keys().cloned().collect();
        if keys.is_empty() {
            return;
        }
        for k in keys {
            i.activate(k);
        }
        drop(i);
        self.wake.notify_one();
    }

    /// The next pod to schedule, waiting for one if none is ready.
    pub async fn pop(&self) -> Key {
        loop {
            let notified = self.wake.notified();
            let next_due = {
                let mut i = self.inner.lock().expect("queue lock");
                let now = Instant::now();
                while let Some(((due, seq), _)) =
                    i.backoff.first_key_value().map(|(k, v)| (*k, v.clone()))
                {
                    if due > now {
                        break;
                    }
                    if let Some(k) = i.backoff.remove(&(due, seq)) {
                        i.activate(k);
                    }
                }
                let stale: Vec<Key> = i
                    .unschedulable
                    .iter()
                    .filter(|(_, since)| {
                        now.duration_since(**since) >= self.config.unschedulable_timeout
                    })
                    .map(|(k, _)| k.clone())
                    .collect();
                for k in stale {
                    i.activate(k);
                }
                if let Some((_, k)) = i.active.pop_first() {
                    i.queued.remove(&k);
                    return k;
                }
                let oldest_unschedulable = i
                    .unschedulable
                    .values()
                    .min()
                    .map(|t| *t + self.config.unschedulable_timeout);
                [
                    i.backoff.keys().next().map(|(due, _)| *due),
                    oldest_unschedulable,
                ]
                .into_iter()
                .flatten()
                .min()
            };
            match next_due {
                Some(due) => {
                    tokio::select! {
                        () = notified => {}
                        () = tokio::time::sleep_until(due) => {}
                    }
                }
                None => notified.await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue() -> Queue {
        Queue::new(QueueConfig {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(400),
            unschedulable_timeout: Duration::from_secs(60),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn pops_in_order_and_deduplicates() {
        let q = queue();
        q.add("a".into(), 0);
        q.add("b".into(), 0);
        q.add("a".into(), 0);
        assert_eq!(q.pop().await, "a");
        assert_eq!(q.pop().await, "b");
        q.add("c".into(), 0);
        q.forget("c");
        q.add("d".into(), 0);
        assert_eq!(q.pop().await, "d");
        // Higher priority goes first; equal priorities keep arrival order.
        q.add("low".into(), 0);
        q.add("high".into(), 1000);
        q.add("low2".into(), 0);
        assert_eq!(q.pop().await, "high");
        assert_eq!(q.pop().await, "low");
        assert_eq!(q.pop().await, "low2");
    }

    #[tokio::test(start_paused = true)]
    async fn unschedulable_pods_wait_for_a_cluster_change() {
        let q = queue();
        q.unschedulable("p".into());
        q.add("p".into(), 0); // its own update does not requeue it
        q.add("other".into(), 0);
        assert_eq!(q.pop().await, "other");
        q.cluster_changed();
        assert_eq!(q.pop().await, "p");
        // With no change at all it is retried after the timeout.
        q.unschedulable("p".into());
        let start = Instant::now();
        assert_eq!(q.pop().await, "p");
        assert!(start.elapsed() >= Duration::from_secs(60));
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_doubles_up_to_the_maximum() {
        let q = queue();
        let mut waits = Vec::new();
        for _ in 0..4 {
            let start = Instant::now();
            q.backoff("p".into());
            assert_eq!(q.pop().await, "p");
            waits.push(start.elapsed().as_millis());
        }
        assert_eq!(waits, [100, 200, 400, 400]);
    }
}
