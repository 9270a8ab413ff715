//! Requests the gateway forwards to Knative revisions, counted per
//! revision: how many, and the integral of those in flight over time
//! (request-seconds), from a request's arrival until its response body is
//! done. This is where requests to revisions whose pods count nothing
//! themselves (Linux images) are measured; the node agent publishes the
//! figures beside its pods' (`/stats/pods`), and the autoscaler reads them
//! through the custom metrics API.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::routes::Revision;

/// The load on the revisions this gateway routed to.
#[derive(Debug, Default)]
pub struct Load {
    revisions: Mutex<HashMap<Revision, Counter>>,
}

#[derive(Debug, Default)]
struct Counter {
    requests: u64,
    in_flight: u64,
    since: Option<Instant>,
    integral: f64,
}

impl Counter {
    fn advance(&mut self, now: Instant) {
        if let Some(since) = self.since {
            self.integral += self.in_flight as f64 * now.duration_since(since).as_secs_f64();
        }
        self.since = Some(now);
    }
}

/// One request in flight to a revision; dropped when its response is done.
#[derive(Debug)]
pub(crate) struct InFlight {
    load: Arc<Load>,
    revision: Revision,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut revisions = self.load.revisions.lock().expect("load lock");
        if let Some(c) = revisions.get_mut(&self.revision) {
            c.advance(Instant::now());
            c.in_flight = c.in_flight.saturating_sub(1);
        }
    }
}

/// One revision's figures so far.
#[derive(Clone, Debug, PartialEq)]
pub struct RevisionLoad {
    pub namespace: String,
    pub name: String,
    /// Requests forwarded so far.
    pub requests: u64,
    /// Requests in flight now.
    pub in_flight: u64,
    /// Request-seconds in flight so far.
    pub request_seconds: f64,
}

impl Load {
    pub(crate) fn start(self: &Arc<Self>, revision: &Revision) -> InFlight {
        self.start_at(revision, Instant::now())
    }

    fn start_at(self: &Arc<Self>, revision: &Revision, now: Instant) -> InFlight {
        let mut revisions = self.revisions.lock().expect("load lock");
        let c = revisions.entry(revision.clone()).or_default();
        c.advance(now);
        c.requests += 1;
        c.in_flight += 1;
        InFlight {
            load: self.clone(),
            revision: revision.clone(),
        }
    }

    /// Every revision's figures, up to now.
    pub fn snapshot(&self) -> Vec<RevisionLoad> {
        self.snapshot_at(Instant::now())
    }

    fn snapshot_at(&self, now: Instant) -> Vec<RevisionLoad> {
        let mut revisions = self.revisions.lock().expect("load lock");
        revisions
            .iter_mut()
            .map(|(r, c)| {
                c.advance(now);
                RevisionLoad {
                    namespace: r.namespace.clone(),
                    name: r.name.clone(),
                    requests: c.requests,
                    in_flight: c.in_flight,
                    request_seconds: c.integral,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_their_time_in_flight_are_counted() {
        let load = Arc::new(Load::default());
        let rev = Revision {
            namespace: "default".into(),
            name: "hello-00001".into(),
        };
        let t0 = Instant::now();
        let a = load.start_at(&rev, t0);
        let b = load.start_at(&rev, t0);
        // Two in flight for two seconds: four request-seconds.
        let snap = load.snapshot_at(t0 + std::time::Duration::from_secs(2));
        assert_eq!(snap.len(), 1);
        assert_eq!((snap[0].requests, snap[0].in_flight), (2, 2));
        assert!((snap[0].request_seconds - 4.0).abs() < 1e-9, "{snap:?}");
        drop(a);
        drop(b);
        let snap = load.snapshot();
        assert_eq!(snap[0].in_flight, 0);
        assert!(snap[0].request_seconds >= 4.0, "{snap:?}");
    }
}
