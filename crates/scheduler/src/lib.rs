//! The scheduler: watches pods that have no node, picks one with filter and
//! score plugins, and binds through `pods/binding`, as kube-scheduler does.
//!
//! **Architecture invariant:** the scheduler talks only to the API server
//! (through kube-rs); it never sees the store. Its view of the cluster is an
//! incremental cache fed by watches (nodes, pods, namespaces, runtime
//! classes, claims, volumes, storage classes), including the pods it has assumed bound but not yet seen bound,
//! so back-to-back decisions account for each other.

pub mod cache;
pub mod interpod;
mod metrics;
pub mod node_info;
pub mod plugins;
pub mod preemption;
pub mod queue;
mod scheduler;
pub mod volumes;

pub use queue::QueueConfig;
pub use scheduler::{Config, Error, run};
