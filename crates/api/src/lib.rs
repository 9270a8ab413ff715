//! The Kubernetes API model wasmkube serves, with no IO: which resource types
//! exist ([`registry`]), how bodies decode into `k8s-openapi` types
//! ([`typed`]), defaulting, validation, selectors, quantities and server-side
//! tables.
//!
//! **Architecture invariant:** this crate knows nothing about HTTP, storage or
//! async; the API server and the controllers both build on it.

/// Defines a kind the API serves that k8s-openapi has no type for (the
/// Gateway API's, Knative's): the object struct with `metadata`, `spec` and
/// `status`, serialized with its `apiVersion` and `kind`, and the
/// k8s-openapi traits kube-rs clients need (`Api<HTTPRoute>` works as for
/// built-in kinds). `spec(...)` carries the spec field's extra attributes.
macro_rules! api_kind {
    ($api_version:literal, spec($(#[$spec_attr:meta])*), $(#[$doc:meta])* $ty:ident, $spec:ty, $status:ty, $plural:literal, $scope:ty, $schema:literal) => {
        $(#[$doc])*
        #[derive(Clone, Debug, Default, PartialEq, serde::Deserialize, schemars::JsonSchema)]
        #[schemars(rename = $schema)]
        pub struct $ty {
            #[serde(default)]
            pub metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
            $(#[$spec_attr])*
            pub spec: $spec,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub status: Option<$status>,
        }

        impl serde::Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                use serde::ser::SerializeStruct;
                let mut m = s.serialize_struct(stringify!($ty), 5)?;
                m.serialize_field("apiVersion", $api_version)?;
                m.serialize_field("kind", stringify!($ty))?;
                m.serialize_field("metadata", &self.metadata)?;
                m.serialize_field("spec", &self.spec)?;
                if let Some(status) = &self.status {
                    m.serialize_field("status", status)?;
                }
                m.end()
            }
        }

        impl k8s_openapi::Resource for $ty {
            const API_VERSION: &'static str = $api_version;
            const GROUP: &'static str = GROUP;
            const KIND: &'static str = stringify!($ty);
            const VERSION: &'static str = "v1";
            const URL_PATH_SEGMENT: &'static str = $plural;
            type Scope = $scope;
        }

        impl k8s_openapi::ListableResource for $ty {
            const LIST_KIND: &'static str = concat!(stringify!($ty), "List");
        }

        impl k8s_openapi::Metadata for $ty {
            type Ty = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
            fn metadata(&self) -> &Self::Ty {
                &self.metadata
            }
            fn metadata_mut(&mut self) -> &mut Self::Ty {
                &mut self.metadata
            }
        }
    };
}
pub(crate) use api_kind;

pub mod admission_policy;
pub mod apparmor;
pub mod cel_cost;
pub mod conversion;
pub mod custom;
pub mod defaults;
pub mod field;
pub mod gateway_api;
pub mod images;
pub mod knative;
pub mod names;
pub mod nodes;
pub mod pod_security;
pub mod quantity;
pub mod quota;
pub mod registry;
pub mod scheduling;
pub mod selectors;
pub mod storage;
pub mod table;
pub mod typed;
pub mod validation;
pub mod webhooks;

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
