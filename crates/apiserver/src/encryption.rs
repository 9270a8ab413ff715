//! Encryption at rest, as kube-apiserver's `--encryption-provider-config`:
//! Kubernetes' `EncryptionConfiguration` (`apiserver.config.k8s.io/v1`)
//! names resources and an ordered list of providers (`aesgcm` and
//! `secretbox` with named keys, `identity`); the first writes, all of them
//! read. Values are kept as Kubernetes keeps them: `k8s:enc:aesgcm:v1:KEYNAME:`
//! (or `k8s:enc:secretbox:v1:KEYNAME:`) then the nonce and the sealed value.
//!
//! It sits between the API server and its store ([`wrap`]): every write of
//! a covered key is sealed, every value read (get, list, watch) is opened,
//! so nothing above it changes. At start, [`rewrite_stale`] rewrites what
//! is not under the first provider's first key (plaintext written before
//! encryption was on, or a key being rotated out), so rotation is: put the
//! new key first, keep the old one after it, restart.

use std::path::Path;
use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use futures::StreamExt;
use serde::Deserialize;
use wasmkube_store::{
    Event, KeyValue, ListOptions, ListResult, Revision, SharedStore, Store, StoreError, WatchStream,
};

/// A sealing provider: its name in the configuration and the prefix of
/// what it writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cipher {
    AesGcm,
    SecretBox,
}

impl Cipher {
    const ALL: [Cipher; 2] = [Cipher::AesGcm, Cipher::SecretBox];

    fn name(self) -> &'static str {
        match self {
            Cipher::AesGcm => "aesgcm",
            Cipher::SecretBox => "secretbox",
        }
    }

    fn prefix(self) -> &'static [u8] {
        match self {
            Cipher::AesGcm => b"k8s:enc:aesgcm:v1:",
            Cipher::SecretBox => b"k8s:enc:secretbox:v1:",
        }
    }

    fn key_lengths(self) -> &'static [usize] {
        match self {
            Cipher::AesGcm => &[16, 32],
            Cipher::SecretBox => &[32],
        }
    }

    fn seal(self, key: &[u8], plain: &[u8]) -> Result<Vec<u8>, wasmkube_pki::PkiError> {
        match self {
            Cipher::AesGcm => wasmkube_pki::aes_gcm_encrypt(key, plain),
            Cipher::SecretBox => wasmkube_pki::secretbox_encrypt(key, plain),
        }
    }

    fn open(self, key: &[u8], sealed: &[u8]) -> Result<Vec<u8>, wasmkube_pki::PkiError> {
        match self {
            Cipher::AesGcm => wasmkube_pki::aes_gcm_decrypt(key, sealed),
            Cipher::SecretBox => wasmkube_pki::secretbox_decrypt(key, sealed),
        }
    }
}

/// An `EncryptionConfiguration` that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum EncryptionError {
    #[error("cannot read {path}: {message}")]
    Read { path: String, message: String },
    #[error("{0}")]
    Invalid(String),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct FileConfig {
    kind: String,
    resources: Vec<FileRule>,
}

#[derive(Deserialize)]
struct FileRule {
    resources: Vec<String>,
    providers: Vec<serde_json::Value>,
}

#[derive(Clone)]
enum Provider {
    /// A cipher and its named keys, the first one writing.
    Sealed(Cipher, Vec<(String, Vec<u8>)>),
    Identity,
}

#[derive(Clone)]
struct Rule {
    /// Store key prefixes of the resources (`/registry/core/secrets/`).
    prefixes: Vec<String>,
    providers: Vec<Provider>,
}

/// A parsed encryption configuration.
#[derive(Clone)]
pub struct EncryptionConfig {
    rules: Vec<Rule>,
}

impl std::fmt::Debug for EncryptionConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the keys.
        f.debug_struct("EncryptionConfig")
            .field(
                "resources",
                &self.rules.iter().map(|r| &r.prefixes).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// `secrets` → `/registry/core/secrets/`, `widgets.example.com` →
/// `/registry/example.com/widgets/`.
fn prefix_of(resource: &str) -> String {
    match resource.split_once('.') {
        Some((plural, group)) => format!("/registry/{group}/{plural}/"),
        None => format!("/registry/core/{resource}/"),
    }
}

impl EncryptionConfig {
    /// Reads an `EncryptionConfiguration` file (YAML or JSON).
    pub fn read(path: &Path) -> Result<Self, EncryptionError> {
        let read = |message: String| EncryptionError::Read {
            path: path.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| read(e.to_string()))?;
        Self::parse(&text).map_err(|e| read(e.to_string()))
    }

    pub fn parse(text: &str) -> Result<Self, EncryptionError> {
        let invalid = |m: String| EncryptionError::Invalid(m);
        let file: FileConfig = serde_yaml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        if file.kind != "EncryptionConfiguration" {
            return Err(invalid(format!(
                "kind: want EncryptionConfiguration, got {:?}",
                file.kind
            )));
        }
        let mut rules = Vec::new();
        for (i, rule) in file.resources.iter().enumerate() {
            let mut providers = Vec::new();
            for (j, p) in rule.providers.iter().enumerate() {
                let at = format!("resources[{i}].providers[{j}]");
                if let Some(cipher) = Cipher::ALL.into_iter().find(|c| p.get(c.name()).is_some()) {
                    let kind = cipher.name();
                    let mut keys = Vec::new();
                    for k in p[kind]["keys"].as_array().into_iter().flatten() {
                        let name = k["name"].as_str().unwrap_or_default();
                        let secret = base64::engine::general_purpose::STANDARD
                            .decode(k["secret"].as_str().unwrap_or_default())
                            .map_err(|e| {
                                invalid(format!("{at}.{kind}.keys[{name}].secret: {e}"))
                            })?;
                        if name.is_empty() || name.contains(':') {
                            return Err(invalid(format!(
                                "{at}.{kind}.keys: a key needs a name without ':'"
                            )));
                        }
                        if !cipher.key_lengths().contains(&secret.len()) {
                            let lengths = cipher
                                .key_lengths()
                                .iter()
                                .map(ToString::to_string)
                                .collect::<Vec<_>>()
                                .join(" or ");
                            return Err(invalid(format!(
                                "{at}.{kind}.keys[{name}].secret: {lengths} bytes, base64 (got {})",
                                secret.len()
                            )));
                        }
                        keys.push((name.to_owned(), secret));
                    }
                    if keys.is_empty() {
                        return Err(invalid(format!("{at}.{kind}.keys: at least one key")));
                    }
                    providers.push(Provider::Sealed(cipher, keys));
                } else if p.get("identity").is_some() {
                    providers.push(Provider::Identity);
                } else {
                    return Err(invalid(format!(
                        "{at}: only the aesgcm, secretbox and identity providers are supported"
                    )));
                }
            }
            if providers.is_empty() {
                return Err(invalid(format!("resources[{i}].providers: at least one")));
            }
            rules.push(Rule {
                prefixes: rule.resources.iter().map(|r| prefix_of(r)).collect(),
                providers,
            });
        }
        Ok(Self { rules })
    }

    /// A configuration that seals Secrets with one new random AES-256 key,
    /// as text (what `--secrets-encryption` writes once and keeps).
    pub fn generate_text() -> String {
        let key = base64::engine::general_purpose::STANDARD.encode(wasmkube_pki::random_bytes(32));
        format!(
            "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n- resources: [secrets]\n  providers:\n  - aesgcm:\n      keys:\n      - name: key1\n        secret: {key}\n  - identity: {{}}\n"
        )
    }

    fn rule_for(&self, key: &str) -> Option<&Rule> {
        self.rules
            .iter()
            .find(|r| r.prefixes.iter().any(|p| key.starts_with(p)))
    }

    fn seal(&self, key: &str, value: Bytes) -> Result<Bytes, StoreError> {
        let Some(rule) = self.rule_for(key) else {
            return Ok(value);
        };
        match &rule.providers[0] {
            Provider::Identity => Ok(value),
            Provider::Sealed(cipher, keys) => {
                let (name, secret) = &keys[0];
                let sealed = cipher
                    .seal(secret, &value)
                    .map_err(|e| StoreError::Backend(Box::new(e)))?;
                let mut out = cipher.prefix().to_vec();
                out.extend_from_slice(name.as_bytes());
                out.push(b':');
                out.extend_from_slice(&sealed);
                Ok(Bytes::from(out))
            }
        }
    }

    /// The plaintext of a stored value, and whether it is stale (not under
    /// the first provider's first key).
    fn open(&self, key: &str, value: &Bytes) -> Result<(Bytes, bool), StoreError> {
        let Some(rule) = self.rule_for(key) else {
            return Ok((value.clone(), false));
        };
        let found = Cipher::ALL
            .into_iter()
            .find_map(|c| Some((c, value.strip_prefix(c.prefix())?)));
        let Some((cipher, rest)) = found else {
            if value.starts_with(b"k8s:enc:") {
                return Err(StoreError::Corrupt {
                    what: format!("{key}: sealed by a provider this server does not have"),
                });
            }
            let stale = !matches!(rule.providers[0], Provider::Identity);
            return Ok((value.clone(), stale));
        };
        let colon = rest
            .iter()
            .position(|b| *b == b':')
            .ok_or_else(|| StoreError::Corrupt {
                what: format!("{key}: a sealed value without its key name"),
            })?;
        let (name, sealed) = (String::from_utf8_lossy(&rest[..colon]), &rest[colon + 1..]);
        for (i, provider) in rule.providers.iter().enumerate() {
            if let Provider::Sealed(c, keys) = provider
                && *c == cipher
                && let Some((j, (_, secret))) =
                    keys.iter().enumerate().find(|(_, (n, _))| *n == name)
            {
                let plain = cipher
                    .open(secret, sealed)
                    .map_err(|_| StoreError::Corrupt {
                        what: format!("{key}: cannot open it with key {name:?}"),
                    })?;
                return Ok((Bytes::from(plain), i != 0 || j != 0));
            }
        }
        Err(StoreError::Corrupt {
            what: format!(
                "{key}: sealed with key {name:?}, which the encryption configuration no longer has"
            ),
        })
    }

    fn open_kv(&self, mut kv: KeyValue) -> Result<KeyValue, StoreError> {
        kv.value = self.open(&kv.key, &kv.value)?.0;
        Ok(kv)
    }

    /// For lists and watches: a value that cannot be opened is passed on
    /// sealed (it then reads as an undecodable object, which is skipped
    /// and logged) rather than failing every other object with it.
    fn open_or_keep(&self, mut kv: KeyValue) -> KeyValue {
        match self.open(&kv.key, &kv.value) {
            Ok((plain, _)) => kv.value = plain,
            Err(e) => tracing::error!(error = %e, "cannot open an encrypted value"),
        }
        kv
    }
}

/// The store `inner` with `config` applied.
pub fn wrap(inner: SharedStore, config: Arc<EncryptionConfig>) -> SharedStore {
    Arc::new(Encrypting { inner, config })
}

#[derive(Debug)]
struct Encrypting {
    inner: SharedStore,
    config: Arc<EncryptionConfig>,
}

#[async_trait::async_trait]
impl Store for Encrypting {
    fn current_revision(&self) -> Revision {
        self.inner.current_revision()
    }

    fn compacted_revision(&self) -> Revision {
        self.inner.compacted_revision()
    }

    async fn get(&self, key: &str) -> wasmkube_store::Result<Option<KeyValue>> {
        self.inner
            .get(key)
            .await?
            .map(|kv| self.config.open_kv(kv))
            .transpose()
    }

    async fn list(&self, prefix: &str, opts: ListOptions) -> wasmkube_store::Result<ListResult> {
        let mut list = self.inner.list(prefix, opts).await?;
        list.items = list
            .items
            .into_iter()
            .map(|kv| self.config.open_or_keep(kv))
            .collect();
        Ok(list)
    }

    async fn create(&self, key: &str, value: Bytes) -> wasmkube_store::Result<KeyValue> {
        let sealed = self.config.seal(key, value.clone())?;
        let mut kv = self.inner.create(key, sealed).await?;
        kv.value = value;
        Ok(kv)
    }

    async fn update(
        &self,
        key: &str,
        value: Bytes,
        expected: Option<Revision>,
    ) -> wasmkube_store::Result<KeyValue> {
        let sealed = self.config.seal(key, value.clone())?;
        let mut kv = self.inner.update(key, sealed, expected).await?;
        kv.value = value;
        Ok(kv)
    }

    async fn delete(
        &self,
        key: &str,
        expected: Option<Revision>,
    ) -> wasmkube_store::Result<KeyValue> {
        let kv = self.inner.delete(key, expected).await?;
        self.config.open_kv(kv)
    }

    fn watch(&self, prefix: &str, from: Revision) -> wasmkube_store::Result<WatchStream> {
        let config = self.config.clone();
        let events = self.inner.watch(prefix, from)?;
        Ok(events
            .map(move |event| {
                let event = event?;
                Ok(Event {
                    kind: event.kind,
                    kv: config.open_or_keep(event.kv),
                    prev: event.prev.map(|kv| config.open_or_keep(kv)),
                })
            })
            .boxed())
    }

    async fn compact(&self, revision: Revision) -> wasmkube_store::Result<()> {
        self.inner.compact(revision).await
    }
}

/// Rewrites every covered value that is stale (plaintext, or under a key
/// that is no longer the first): returns how many were rewritten.
pub async fn rewrite_stale(
    inner: &SharedStore,
    config: &EncryptionConfig,
) -> Result<usize, StoreError> {
    let mut rewritten = 0;
    for prefix in config.rules.iter().flat_map(|r| r.prefixes.iter()) {
        let mut opts = ListOptions {
            limit: 500,
            ..Default::default()
        };
        loop {
            let page = inner.list(prefix, opts.clone()).await?;
            for kv in &page.items {
                let (plain, stale) = match config.open(&kv.key, &kv.value) {
                    Ok(opened) => opened,
                    // Left as it is: reads of it say why.
                    Err(e) => {
                        tracing::error!(error = %e, "cannot open an encrypted value to seal it again");
                        continue;
                    }
                };
                if !stale {
                    continue;
                }
                let sealed = config.seal(&kv.key, plain)?;
                match inner.update(&kv.key, sealed, Some(kv.mod_revision)).await {
                    // Changed meanwhile: that write sealed it already.
                    Ok(_) | Err(StoreError::Conflict { .. } | StoreError::NotFound { .. }) => {
                        rewritten += 1
                    }
                    Err(e) => return Err(e),
                }
            }
            match (page.more, page.items.last()) {
                (true, Some(last)) => {
                    opts.start_after = Some(last.key.clone());
                    opts.revision = Some(page.revision);
                }
                _ => break,
            }
        }
    }
    Ok(rewritten)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(keys: &[(&str, &[u8])]) -> EncryptionConfig {
        let keys: Vec<String> = keys
            .iter()
            .map(|(n, k)| {
                format!(
                    "      - name: {n}\n        secret: {}\n",
                    base64::engine::general_purpose::STANDARD.encode(k)
                )
            })
            .collect();
        EncryptionConfig::parse(&format!(
            "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n- resources: [secrets]\n  providers:\n  - aesgcm:\n      keys:\n{}  - identity: {{}}\n",
            keys.concat()
        ))
        .unwrap()
    }

    #[tokio::test]
    async fn secrets_are_sealed_opened_and_rotated() {
        let (k1, k2) = ([1u8; 32], [2u8; 32]);
        let inner = wasmkube_store::memory();
        let old = wrap(inner.clone(), Arc::new(config(&[("key1", &k1)])));
        let key = "/registry/core/secrets/ns/s";
        old.create(key, Bytes::from_static(b"{\"data\":\"hunter2\"}"))
            .await
            .unwrap();
        old.create(
            "/registry/core/configmaps/ns/c",
            Bytes::from_static(b"plain"),
        )
        .await
        .unwrap();
        let raw = inner.get(key).await.unwrap().unwrap().value;
        assert!(raw.starts_with(b"k8s:enc:aesgcm:v1:key1:"));
        assert!(!raw.windows(7).any(|w| w == b"hunter2"));
        assert_eq!(
            old.get(key).await.unwrap().unwrap().value,
            &b"{\"data\":\"hunter2\"}"[..]
        );
        assert_eq!(
            inner
                .get("/registry/core/configmaps/ns/c")
                .await
                .unwrap()
                .unwrap()
                .value,
            &b"plain"[..]
        );

        // Rotation: the new key first, the old one still readable.
        let rotated = Arc::new(config(&[("key2", &k2), ("key1", &k1)]));
        assert_eq!(rewrite_stale(&inner, &rotated).await.unwrap(), 1);
        let raw = inner.get(key).await.unwrap().unwrap().value;
        assert!(raw.starts_with(b"k8s:enc:aesgcm:v1:key2:"));
        assert_eq!(rewrite_stale(&inner, &rotated).await.unwrap(), 0);
        // Without the key it was sealed with, it cannot be read.
        let lost = wrap(inner.clone(), Arc::new(config(&[("key1", &k1)])));
        assert!(lost.get(key).await.is_err());

        // From aesgcm to secretbox: the secretbox key first, the aesgcm one
        // after it to read what it sealed.
        let secretbox = Arc::new(
            EncryptionConfig::parse(&format!(
                "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n- resources: [secrets]\n  providers:\n  - secretbox:\n      keys:\n      - name: box1\n        secret: {}\n  - aesgcm:\n      keys:\n      - name: key2\n        secret: {}\n",
                base64::engine::general_purpose::STANDARD.encode([3u8; 32]),
                base64::engine::general_purpose::STANDARD.encode(k2),
            ))
            .unwrap(),
        );
        assert_eq!(rewrite_stale(&inner, &secretbox).await.unwrap(), 1);
        let raw = inner.get(key).await.unwrap().unwrap().value;
        assert!(raw.starts_with(b"k8s:enc:secretbox:v1:box1:"));
        assert!(!raw.windows(7).any(|w| w == b"hunter2"));
        assert_eq!(
            wrap(inner.clone(), secretbox)
                .get(key)
                .await
                .unwrap()
                .unwrap()
                .value,
            &b"{\"data\":\"hunter2\"}"[..]
        );
    }

    #[test]
    fn bad_configurations_say_what_is_wrong() {
        for (text, want) in [
            ("kind: Other\nresources: []\n", "kind"),
            (
                "kind: EncryptionConfiguration\nresources:\n- resources: [secrets]\n  providers:\n  - aesgcm:\n      keys:\n      - name: k\n        secret: AAAA\n",
                "16 or 32 bytes",
            ),
            (
                "kind: EncryptionConfiguration\nresources:\n- resources: [secrets]\n  providers:\n  - kms: {}\n",
                "only the aesgcm, secretbox",
            ),
            (
                "kind: EncryptionConfiguration\nresources:\n- resources: [secrets]\n  providers:\n  - secretbox:\n      keys:\n      - name: k\n        secret: AAAAAAAAAAAAAAAAAAAAAA==\n",
                "secretbox.keys[k].secret: 32 bytes",
            ),
        ] {
            let e = EncryptionConfig::parse(text).err().unwrap().to_string();
            assert!(e.contains(want), "{e}");
        }
    }
}
