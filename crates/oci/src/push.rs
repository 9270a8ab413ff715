//! `wasmkube push`: a module or component as a CNCF Wasm artifact; and
//! Linux images from their layers and config.

use oci_client::secrets::RegistryAuth;

use crate::{Credentials, Error, client_for, is_component, parse_reference};

/// How to push.
#[derive(Clone, Debug, Default)]
pub struct PushOptions {
    /// Registries (host:port) to speak plain HTTP to besides loopback ones.
    pub insecure: Vec<String>,
    pub credentials: Option<Credentials>,
    /// CA certificates (PEM) trusted besides the system's.
    pub roots: Vec<String>,
}

impl PushOptions {
    fn auth(&self) -> RegistryAuth {
        match &self.credentials {
            Some(c) => RegistryAuth::Basic(c.username.clone(), c.password.clone()),
            None => RegistryAuth::Anonymous,
        }
    }
}

fn push_error(reference: &str) -> impl Fn(String) -> Error + '_ {
    move |reason| Error::Push {
        reference: reference.to_owned(),
        reason,
    }
}

/// Pushes Wasm bytes to `reference` as the CNCF Wasm OCI artifact (config
/// `application/vnd.wasm.config.v0+json`, one `application/wasm` layer) and
/// returns the manifest digest.
pub async fn push_wasm(
    bytes: Vec<u8>,
    reference: &str,
    options: &PushOptions,
) -> Result<String, Error> {
    let parsed = parse_reference(reference)?;
    let err = push_error(reference);
    if !crate::media::is_wasm(&bytes) {
        return Err(err("the file is not a Wasm module or component".into()));
    }
    let (config, layer) = if is_component(&bytes) {
        oci_wasm::WasmConfig::from_raw_component(bytes, None)
    } else {
        oci_wasm::WasmConfig::from_raw_module(bytes, None)
    }
    .map_err(|e| err(format!("{e:#}")))?;
    let client = oci_wasm::WasmClient::new(client_for(
        parsed.resolve_registry(),
        &options.insecure,
        &options.roots,
    ));
    let auth = options.auth();
    client
        .push(&parsed, &auth, layer, config, None)
        .await
        .map_err(|e| err(format!("{e:#}")))?;
    client
        .fetch_manifest_digest(&parsed, &auth)
        .await
        .map_err(|e| err(e.to_string()))
}

/// Pushes a Linux image: gzip-compressed tar layers in order and its config
/// (`application/vnd.oci.image.config.v1+json`). Returns the manifest digest.
pub async fn push_image(
    layers: Vec<Vec<u8>>,
    config: Vec<u8>,
    reference: &str,
    options: &PushOptions,
) -> Result<String, Error> {
    let parsed = parse_reference(reference)?;
    let err = push_error(reference);
    let client = client_for(parsed.resolve_registry(), &options.insecure, &options.roots);
    let auth = options.auth();
    let layers: Vec<oci_client::client::ImageLayer> = layers
        .into_iter()
        .map(|l| {
            oci_client::client::ImageLayer::new(
                l,
                oci_client::manifest::IMAGE_LAYER_GZIP_MEDIA_TYPE.to_owned(),
                None,
            )
        })
        .collect();
    let config = oci_client::client::Config::new(
        config,
        oci_client::manifest::IMAGE_CONFIG_MEDIA_TYPE.to_owned(),
        None,
    );
    client
        .push(&parsed, &layers, config, &auth, None)
        .await
        .map_err(|e| err(format!("{e:#}")))?;
    client
        .fetch_manifest_digest(&parsed, &auth)
        .await
        .map_err(|e| err(e.to_string()))
}
