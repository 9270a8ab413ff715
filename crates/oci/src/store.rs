//! The content-addressed image store: blobs under `blobs/sha256/`, Wasm
//! modules unpacked from tar layers under `wasm/`, and an index from image
//! references to what they resolved to, written atomically.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use oci_client::Reference;
use oci_client::manifest::{OciDescriptor, OciImageManifest};
use oci_client::secrets::RegistryAuth;
use serde::{Deserialize, Serialize};
use wasmkube_runtime::{Image, ImageKind};

use crate::media::{is_gzip, is_tar_layer, is_wasm, is_wasm_layer};
use crate::{
    Credentials, Error, WASM_CONFIG_MEDIA_TYPE, client_for, io, is_component, parse_reference,
};

/// `imagePullPolicy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

impl PullPolicy {
    /// The policy Kubernetes defaults to: `Always` for `:latest` or no tag,
    /// `IfNotPresent` otherwise, unless the pod says.
    pub fn for_container(policy: Option<&str>, image: &str) -> Self {
        match policy {
            Some("Always") => Self::Always,
            Some("Never") => Self::Never,
            Some("IfNotPresent") => Self::IfNotPresent,
            _ => {
                let last = image.rsplit('/').next().unwrap_or(image);
                if image.contains('@') {
                    Self::IfNotPresent
                } else {
                    match last.split_once(':') {
                        Some((_, "latest")) | None => Self::Always,
                        Some(_) => Self::IfNotPresent,
                    }
                }
            }
        }
    }
}

/// What a pull reports as it goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Progress {
    /// A blob is being fetched.
    Blob {
        digest: String,
        size: u64,
        index: usize,
        count: usize,
    },
}

/// An image as recorded in the store's index.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct StoredImage {
    /// The manifest digest.
    pub digest: String,
    /// `repository@digest`.
    pub id: String,
    /// References this image was pulled by.
    pub names: Vec<String>,
    pub size: u64,
    /// The Wasm module's path (relative to the store), when it is Wasm.
    pub wasm: Option<String>,
    pub component: bool,
    /// Layer and config blob digests, for Linux images.
    pub layers: Vec<String>,
    pub config: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Index {
    /// Reference (normalised) -> image.
    images: HashMap<String, StoredImage>,
}

/// The node's image store; cheap to clone and share.
#[derive(Clone, Debug)]
pub struct ImageStore {
    root: PathBuf,
    insecure: Arc<Vec<String>>,
    /// CA certificates (PEM) trusted besides the system's.
    roots: Arc<Vec<String>>,
    index: Arc<Mutex<Index>>,
    /// One pull per reference at a time; others wait for its result.
    pulling: Arc<tokio::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
}

impl ImageStore {
    /// Opens (or creates) the store in `root`. `insecure` lists registries
    /// (host:port) spoken to over plain HTTP besides loopback ones.
    pub fn open(root: &Path, insecure: Vec<String>) -> Result<Self, Error> {
        for dir in ["blobs/sha256", "wasm", "tmp"] {
            std::fs::create_dir_all(root.join(dir))
                .map_err(io(format!("creating {}", root.join(dir).display())))?;
        }
        let index_path = root.join("index.json");
        let index = match std::fs::read(&index_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "the image index is unreadable; starting empty");
                Index::default()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Index::default(),
            Err(e) => return Err(io(format!("reading {}", index_path.display()))(e)),
        };
        Ok(Self {
            root: root.to_owned(),
            insecure: Arc::new(insecure),
            roots: Arc::default(),
            index: Arc::new(Mutex::new(index)),
            pulling: Arc::default(),
        })
    }

    /// Trusts `roots` (PEM CA certificates) besides the system's roots for
    /// registries spoken to over HTTPS.
    pub fn with_roots(mut self, roots: Vec<String>) -> Self {
        self.roots = Arc::new(roots);
        self
    }

    /// Every image on the node (for `node.status.images`), largest first.
    pub fn images(&self) -> Vec<StoredImage> {
        let index = self.index.lock().expect("index lock");
        let mut by_digest: HashMap<&str, StoredImage> = HashMap::new();
        for (name, img) in &index.images {
            let e = by_digest.entry(&img.digest).or_insert_with(|| StoredImage {
                names: vec![img.id.clone()],
                ..img.clone()
            });
            e.names.push(name.clone());
        }
        let mut all: Vec<StoredImage> = by_digest.into_values().collect();
        for img in &mut all {
            img.names.sort();
            img.names.dedup();
        }
        all.sort_by(|a, b| b.size.cmp(&a.size).then(a.id.cmp(&b.id)));
        all
    }

    /// The image a reference names, pulling it as the policy says.
    pub async fn ensure(
        &self,
        reference: &str,
        policy: PullPolicy,
        credentials: Option<Credentials>,
        progress: &(dyn Fn(Progress) + Send + Sync),
    ) -> Result<(Image, bool), Error> {
        self.ensure_with(reference, policy, async { credentials }, progress)
            .await
    }

    /// As [`ImageStore::ensure`], with the credentials found only when the
    /// registry is asked (an image already here needs none).
    pub async fn ensure_with(
        &self,
        reference: &str,
        policy: PullPolicy,
        credentials: impl std::future::Future<Output = Option<Credentials>>,
        progress: &(dyn Fn(Progress) + Send + Sync),
    ) -> Result<(Image, bool), Error> {
        let parsed = parse_reference(reference)?;
        let key = parsed.whole();
        let lock = self
            .pulling
            .lock()
            .await
            .entry(key.clone())
            .or_default()
            .clone();
        let _guard = lock.lock().await;
        let cached = self.lookup(&key);
        match (policy, cached) {
            (PullPolicy::Never, None) => return Err(Error::NeverPull(reference.to_owned())),
            (PullPolicy::Never | PullPolicy::IfNotPresent, Some(img)) => {
                return Ok((self.to_image(reference, &img), false));
            }
            _ => {}
        }
        let client = client_for(parsed.resolve_registry(), &self.insecure, &self.roots);
        let auth = match credentials.await {
            Some(c) => RegistryAuth::Basic(c.username, c.password),
            None => RegistryAuth::Anonymous,
        };
        let pull_err = |e: oci_client::errors::OciDistributionError| Error::Pull {
            reference: reference.to_owned(),
            reason: e.to_string(),
        };
        if policy == PullPolicy::Always
            && let Some(img) = self.lookup(&key)
        {
            // Only the manifest digest is asked for when the image is here.
            let digest = client
                .fetch_manifest_digest(&parsed, &auth)
                .await
                .map_err(pull_err)?;
            if digest == img.digest {
                return Ok((self.to_image(reference, &img), false));
            }
        }
        let started = Instant::now();
        let (manifest, digest, config) = client
            .pull_manifest_and_config(&parsed, &auth)
            .await
            .map_err(pull_err)?;
        let blobs: Vec<&OciDescriptor> = manifest.layers.iter().collect();
        for (i, layer) in blobs.iter().enumerate() {
            let path = self.blob_path(&layer.digest)?;
            if path.exists() {
                continue;
            }
            progress(Progress::Blob {
                digest: layer.digest.clone(),
                size: layer.size.max(0) as u64,
                index: i + 1,
                count: blobs.len(),
            });
            let tmp = self.tmp_path();
            let mut file = tokio::fs::File::create(&tmp)
                .await
                .map_err(io(format!("creating {}", tmp.display())))?;
            // oci-client checks the blob against its digest as it streams.
            client
                .pull_blob(&parsed, *layer, &mut file)
                .await
                .map_err(pull_err)?;
            file.sync_all().await.map_err(io("syncing a blob"))?;
            std::fs::rename(&tmp, &path).map_err(io(format!("storing {}", path.display())))?;
        }
        let config_path = self.blob_path(&manifest.config.digest)?;
        if !config_path.exists() {
            let tmp = self.tmp_path();
            std::fs::write(&tmp, config.as_bytes())
                .and_then(|()| std::fs::rename(&tmp, &config_path))
                .map_err(io("storing the image config"))?;
        }
        let stored = self.classify(reference, &parsed, &manifest, digest)?;
        tracing::info!(
            image = reference,
            digest = %stored.digest,
            size = stored.size,
            wasm = stored.wasm.is_some(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "pulled image"
        );
        self.record(&key, &stored)?;
        Ok((self.to_image(reference, &stored), true))
    }

    /// Whether `credentials` may read the image `reference` names, asked
    /// of its registry (its manifest fetched): for an image already on the
    /// node, which must not start for whoever may not pull it. A refusal
    /// (401 or 403) is [`Error::Denied`]; a registry that cannot be asked
    /// is [`Error::Pull`].
    pub async fn check_access(
        &self,
        reference: &str,
        credentials: Option<Credentials>,
    ) -> Result<(), Error> {
        use oci_client::errors::OciDistributionError as E;
        let parsed = parse_reference(reference)?;
        let client = client_for(parsed.resolve_registry(), &self.insecure, &self.roots);
        let auth = match credentials {
            Some(c) => RegistryAuth::Basic(c.username, c.password),
            None => RegistryAuth::Anonymous,
        };
        match client.pull_manifest(&parsed, &auth).await {
            Ok(_) => Ok(()),
            Err(e) => {
                let denied = match &e {
                    E::UnauthorizedError { .. } => true,
                    E::ServerError { code, .. } => matches!(code, 401 | 403),
                    E::RegistryError { envelope, .. } => envelope.errors.iter().any(|e| {
                        matches!(
                            e.code,
                            oci_client::errors::OciErrorCode::Denied
                                | oci_client::errors::OciErrorCode::Unauthorized
                        )
                    }),
                    _ => false,
                };
                let (reference, reason) = (reference.to_owned(), e.to_string());
                Err(if denied {
                    Error::Denied { reference, reason }
                } else {
                    Error::Pull { reference, reason }
                })
            }
        }
    }

    fn lookup(&self, key: &str) -> Option<StoredImage> {
        let index = self.index.lock().expect("index lock");
        let img = index.images.get(key)?.clone();
        drop(index);
        // An index entry whose files went missing is not an image.
        let present = match &img.wasm {
            Some(w) => self.root.join(w).exists(),
            None => img
                .layers
                .iter()
                .all(|d| self.blob_path(d).is_ok_and(|p| p.exists())),
        };
        present.then_some(img)
    }

    fn record(&self, key: &str, img: &StoredImage) -> Result<(), Error> {
        let mut index = self.index.lock().expect("index lock");
        index.images.insert(key.to_owned(), img.clone());
        let bytes = serde_json::to_vec_pretty(&*index).expect("the index serializes");
        let tmp = self.tmp_path();
        let path = self.root.join("index.json");
        std::fs::write(&tmp, bytes)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(io(format!("writing {}", path.display())))
    }

    fn to_image(&self, reference: &str, img: &StoredImage) -> Image {
        let kind = match &img.wasm {
            Some(w) => ImageKind::Wasm {
                module: self.root.join(w),
                component: img.component,
            },
            None => ImageKind::Linux {
                layers: img
                    .layers
                    .iter()
                    .filter_map(|d| self.blob_path(d).ok())
                    .collect(),
                config: self.blob_path(&img.config).unwrap_or_default(),
            },
        };
        Image {
            reference: reference.to_owned(),
            id: img.id.clone(),
            kind,
            size: img.size,
        }
    }

    fn blob_path(&self, digest: &str) -> Result<PathBuf, Error> {
        let hex = digest
            .strip_prefix("sha256:")
            .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| Error::InvalidImage {
                reference: digest.to_owned(),
                reason: "only sha256 digests are supported".into(),
            })?;
        Ok(self.root.join("blobs/sha256").join(hex))
    }

    fn tmp_path(&self) -> PathBuf {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.root
            .join("tmp")
            .join(format!("{}-{n}", std::process::id()))
    }

    /// Decides what the pulled image is: the CNCF Wasm artifact, a layer of
    /// a Wasm media type, a single tar layer holding one `.wasm` file, or
    /// else a Linux image.
    fn classify(
        &self,
        reference: &str,
        parsed: &Reference,
        manifest: &OciImageManifest,
        digest: String,
    ) -> Result<StoredImage, Error> {
        let invalid = |reason: String| Error::InvalidImage {
            reference: reference.to_owned(),
            reason,
        };
        let size = manifest
            .layers
            .iter()
            .map(|l| l.size.max(0) as u64)
            .sum::<u64>()
            + manifest.config.size.max(0) as u64;
        let mut stored = StoredImage {
            id: format!(
                "{}/{}@{digest}",
                parsed.resolve_registry(),
                parsed.repository()
            ),
            digest,
            names: Vec::new(),
            size,
            wasm: None,
            component: false,
            layers: manifest.layers.iter().map(|l| l.digest.clone()).collect(),
            config: manifest.config.digest.clone(),
        };
        let wasm_layers: Vec<&OciDescriptor> = manifest
            .layers
            .iter()
            .filter(|l| is_wasm_layer(&l.media_type))
            .collect();
        if manifest.config.media_type == WASM_CONFIG_MEDIA_TYPE || !wasm_layers.is_empty() {
            let [layer] = wasm_layers[..] else {
                return Err(invalid(format!(
                    "a Wasm artifact must have exactly one Wasm layer, this one has {}",
                    wasm_layers.len()
                )));
            };
            let path = self.blob_path(&layer.digest)?;
            let head = read_head(&path)?;
            if !is_wasm(&head) {
                return Err(invalid(format!(
                    "layer {} has a Wasm media type but is not Wasm",
                    layer.digest
                )));
            }
            stored.component = is_component(&head);
            stored.wasm = Some(format!(
                "blobs/sha256/{}",
                layer.digest.trim_start_matches("sha256:")
            ));
            return Ok(stored);
        }
        if let [layer] = &manifest.layers[..]
            && is_tar_layer(&layer.media_type)
            && let Some(module) = self.unpack_single_wasm(layer)?
        {
            let head = read_head(&self.root.join(&module))?;
            stored.component = is_component(&head);
            stored.wasm = Some(module);
        }
        Ok(stored)
    }

    /// The one `.wasm` file of a single-layer image, unpacked into `wasm/`;
    /// `None` when the layer holds anything else.
    fn unpack_single_wasm(&self, layer: &OciDescriptor) -> Result<Option<String>, Error> {
        let path = self.blob_path(&layer.digest)?;
        let file = std::fs::File::open(&path).map_err(io(format!("opening {}", path.display())))?;
        let reader: Box<dyn Read> = if is_gzip(&layer.media_type) {
            Box::new(flate2::read::GzDecoder::new(file))
        } else {
            Box::new(file)
        };
        let mut archive = tar::Archive::new(reader);
        let mut found: Option<Vec<u8>> = None;
        let entries = archive
            .entries()
            .map_err(io(format!("reading layer {}", layer.digest)))?;
        for entry in entries {
            let mut entry = entry.map_err(io(format!("reading layer {}", layer.digest)))?;
            let kind = entry.header().entry_type();
            if kind.is_dir() {
                continue;
            }
            let is_wasm_file = kind.is_file()
                && entry
                    .path()
                    .ok()
                    .is_some_and(|p| p.extension().is_some_and(|e| e == "wasm"));
            if !is_wasm_file || found.is_some() {
                return Ok(None);
            }
            let mut bytes = Vec::new();
            entry
                .read_to_end(&mut bytes)
                .map_err(io(format!("reading layer {}", layer.digest)))?;
            found = Some(bytes);
        }
        let Some(bytes) = found.filter(|b| is_wasm(b)) else {
            return Ok(None);
        };
        let name = format!("wasm/{}.wasm", layer.digest.trim_start_matches("sha256:"));
        let tmp = self.tmp_path();
        std::fs::write(&tmp, &bytes)
            .and_then(|()| std::fs::rename(&tmp, self.root.join(&name)))
            .map_err(io("storing the unpacked module"))?;
        Ok(Some(name))
    }
}

fn read_head(path: &Path) -> Result<Vec<u8>, Error> {
    let mut head = vec![0u8; 8];
    let n = std::fs::File::open(path)
        .and_then(|mut f| f.read(&mut head))
        .map_err(io(format!("reading {}", path.display())))?;
    head.truncate(n);
    Ok(head)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pull_policy_defaults_as_kubernetes() {
        let p = PullPolicy::for_container;
        assert_eq!(p(None, "127.0.0.1:5000/hello"), PullPolicy::Always);
        assert_eq!(p(None, "127.0.0.1:5000/hello:latest"), PullPolicy::Always);
        assert_eq!(p(None, "127.0.0.1:5000/hello:v1"), PullPolicy::IfNotPresent);
        assert_eq!(
            p(None, "r.example/hello@sha256:0000"),
            PullPolicy::IfNotPresent
        );
        assert_eq!(p(Some("Never"), "hello:v1"), PullPolicy::Never);
    }
}
