//! Level-triggered controllers on kube-runtime, as kube-controller-manager
//! runs them: each reconciles desired against observed state, idempotently,
//! never branching on why it was woken, and requeues instead of looping.
//!
//! **Architecture invariant:** controllers are API clients only (kube-rs);
//! they read through reflector caches and write through the API server.

pub mod deployment;
pub mod endpoints;
pub mod gc;
mod pods;
pub mod replicaset;
pub mod serviceaccount;

/// Runs every controller until one stops.
pub async fn run_all(client: kube::Client) -> Result<(), Error> {
    tokio::select! {
        r = replicaset::run(client.clone()) => r,
        r = deployment::run(client.clone()) => r,
        r = gc::run(client.clone()) => r,
        r = serviceaccount::run(client.clone()) => r,
        r = endpoints::run(client) => r,
    }
}

/// Displays an error with its whole source chain, for logs.
pub struct ErrorChain<'a>(pub &'a dyn std::error::Error);

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}

/// A reconcile failure; the controller retries after a short delay.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("API request failed")]
    Kube(#[source] kube::Error),
    #[error("invalid selector: {0}")]
    Selector(String),
    #[error("object has no uid")]
    MissingUid,
    #[error("the {what} watch ended")]
    WatchEnded { what: &'static str },
    #[error("could not build the object: {0}")]
    Encode(String),
}
