//! Creates and deletes a controller has made but its pod cache has not shown
//! yet ("expectations", as in kube-controller-manager), so a reconcile that
//! runs before the cache catches up neither creates twice nor deletes twice.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;

/// How long an unobserved create or delete is waited for before trusting the
/// cache again (Kubernetes' ExpectationsTimeout).
const TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Default)]
struct Expected {
    /// Pod names created.
    creates: HashMap<String, Instant>,
    /// Pod uids deleted.
    deletes: HashMap<String, Instant>,
}

/// Outstanding creates and deletes per owner uid.
#[derive(Default)]
pub(crate) struct Expectations(Mutex<HashMap<String, Expected>>);

impl Expectations {
    /// Drops expectations the cache now confirms (or that timed out) and
    /// returns the outstanding ones: how many creates, which pod uids deleted.
    pub fn observe(&self, owner: &str, owned: &[Arc<Pod>]) -> (usize, HashSet<String>) {
        let mut all = self.0.lock().expect("expectations lock");
        let e = all.entry(owner.to_owned()).or_default();
        let names: HashSet<&str> = owned
            .iter()
            .filter_map(|p| p.metadata.name.as_deref())
            .collect();
        e.creates
            .retain(|name, at| !names.contains(name.as_str()) && at.elapsed() < TIMEOUT);
        let live: HashMap<&str, bool> = owned
            .iter()
            .filter_map(|p| {
                Some((
                    p.metadata.uid.as_deref()?,
                    p.metadata.deletion_timestamp.is_none(),
                ))
            })
            .collect();
        e.deletes
            .retain(|uid, at| live.get(uid.as_str()) == Some(&true) && at.elapsed() < TIMEOUT);
        (e.creates.len(), e.deletes.keys().cloned().collect())
    }

    pub fn expect_create(&self, owner: &str, pod_name: String) {
        let mut all = self.0.lock().expect("expectations lock");
        all.entry(owner.to_owned())
            .or_default()
            .creates
            .insert(pod_name, Instant::now());
    }

    pub fn expect_delete(&self, owner: &str, pod_uid: String) {
        let mut all = self.0.lock().expect("expectations lock");
        all.entry(owner.to_owned())
            .or_default()
            .deletes
            .insert(pod_uid, Instant::now());
    }
}
