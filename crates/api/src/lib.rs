//! The Kubernetes API model wasmkube serves, with no IO: which resource types
//! exist ([`registry`]), how bodies decode into `k8s-openapi` types
//! ([`typed`]), defaulting, validation, selectors, quantities and server-side
//! tables.
//!
//! **Architecture invariant:** this crate knows nothing about HTTP, storage or
//! async; the API server and the controllers both build on it.

pub mod defaults;
pub mod field;
pub mod gateway_api;
pub mod knative;
pub mod names;
pub mod nodes;
pub mod quantity;
pub mod registry;
pub mod scheduling;
pub mod selectors;
pub mod table;
pub mod typed;
pub mod validation;

pub use k8s_openapi;
pub use registry::{ResourceType, Subresource};

/// Displays an error with its whole `source()` chain, for logs and messages.
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
