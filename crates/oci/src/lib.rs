//! OCI images for the node agent: pulls by tag or digest from any OCI
//! registry (on oci-client), pushes Wasm artifacts (on oci-wasm), decides
//! from media types whether an image is Wasm or a Linux image, and keeps
//! what it pulled in a content-addressed store on disk shared by all pods.
//!
//! Registries on a loopback address are spoken to over plain HTTP with no
//! configuration (as Docker treats 127.0.0.0/8); any other registry only
//! when it is listed as insecure.

mod auth;
mod media;
mod push;
mod store;

pub use auth::{Credentials, credentials_for};
pub use media::{
    WASM_CONFIG_MEDIA_TYPE, WASM_LAYER_MEDIA_TYPE, WASM_LEGACY_LAYER_MEDIA_TYPE, is_component,
};
pub use push::{PushOptions, push_image, push_wasm};
pub use store::{ImageStore, Progress, PullPolicy, StoredImage};

use oci_client::client::{ClientConfig, ClientProtocol};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference { reference: String, reason: String },
    /// The registry refused or failed: the message is the registry's reason.
    #[error("failed to pull image {reference:?}: {reason}")]
    Pull { reference: String, reason: String },
    #[error("failed to push {reference:?}: {reason}")]
    Push { reference: String, reason: String },
    /// The registry refused these credentials the image (401 or 403).
    #[error("failed to pull image {reference:?}: {reason}")]
    Denied { reference: String, reason: String },
    /// `imagePullPolicy: Never` and the image is not on the node.
    #[error("container image {0:?} is not present with pull policy of Never")]
    NeverPull(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid image {reference:?}: {reason}")]
    InvalidImage { reference: String, reason: String },
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

/// Whether a registry host is on a loopback address (`127.0.0.0/8`, `::1`,
/// `localhost`), which is spoken to over plain HTTP.
pub fn is_loopback_registry(registry: &str) -> bool {
    let host = if let Some(rest) = registry.strip_prefix('[') {
        rest.split(']').next().unwrap_or_default()
    } else {
        registry.split(':').next().unwrap_or_default()
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A client for one registry: plain HTTP when it is on loopback or listed
/// in `insecure`, HTTPS otherwise, trusting the system's roots and `roots`
/// (PEM certificates: the cluster CA, which signs the built-in registry's
/// certificate when it listens off loopback).
fn client_for(registry: &str, insecure: &[String], roots: &[String]) -> oci_client::Client {
    let protocol = if is_loopback_registry(registry) || insecure.iter().any(|r| r == registry) {
        ClientProtocol::HttpsExcept(vec![registry.to_owned()])
    } else {
        ClientProtocol::Https
    };
    oci_client::Client::new(ClientConfig {
        protocol,
        extra_root_certificates: roots
            .iter()
            .map(|pem| oci_client::client::Certificate {
                encoding: oci_client::client::CertificateEncoding::Pem,
                data: pem.clone().into_bytes(),
            })
            .collect(),
        ..Default::default()
    })
}

fn parse_reference(reference: &str) -> Result<oci_client::Reference, Error> {
    reference
        .parse::<oci_client::Reference>()
        .map_err(|e| Error::InvalidReference {
            reference: reference.to_owned(),
            reason: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_registries_are_recognised() {
        for r in [
            "127.0.0.1:5000",
            "localhost:5000",
            "localhost",
            "[::1]:5000",
            "127.9.9.9",
        ] {
            assert!(is_loopback_registry(r), "{r}");
        }
        for r in [
            "docker.io",
            "10.0.0.1:5000",
            "registry.example:443",
            "[fe80::1]:5000",
        ] {
            assert!(!is_loopback_registry(r), "{r}");
        }
    }
}
