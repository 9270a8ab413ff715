//! Content-addressed storage under one directory:
//!
//! ```text
//! blobs/ALG/XX/HEX                      every blob and manifest, once
//! uploads/UUID/{data,repository}        uploads in progress (resumable)
//! repositories/NAME/_layers/ALG/HEX     the blobs a repository holds (empty links)
//! repositories/NAME/_manifests/ALG/HEX  its manifests (the file holds the media type)
//! repositories/NAME/_tags/TAG           its tags (the file holds a digest)
//! repositories/NAME/_referrers/ALG/HEX/ALG-HEX
//!                                       descriptors of manifests whose subject is ALG:HEX
//! ```
//!
//! Repository path components never start with `_`, so the link folders
//! cannot collide with a nested repository. Every file is written under a
//! temporary name, synced and renamed into place, and its folder synced: a
//! write that was acknowledged survives a crash, and a reader never sees half
//! a file.

use std::collections::HashSet;
use std::fs;
use std::io::{self, ErrorKind};
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::{Duration, SystemTime};

use serde_json::Value;

use crate::digest::{Algorithm, Digest};
use crate::error::Error;
use crate::names::{valid_repository, valid_tag};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// The largest manifest accepted (the specification asks for at least 4 MiB).
pub const MANIFEST_LIMIT: usize = 4 << 20;

/// A manifest reference: a tag or a digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reference {
    Tag(String),
    Digest(Digest),
}

impl Reference {
    pub fn parse(s: &str) -> Result<Self, Error> {
        if s.contains(':') {
            s.parse()
                .map(Self::Digest)
                .map_err(|e| Error::DigestInvalid(e.to_string()))
        } else if valid_tag(s) {
            Ok(Self::Tag(s.to_owned()))
        } else {
            Err(Error::TagInvalid(s.to_owned()))
        }
    }
}

/// A stored manifest.
#[derive(Debug)]
pub struct Manifest {
    pub bytes: Vec<u8>,
    pub media_type: String,
    pub digest: Digest,
}

/// What storing a manifest did.
#[derive(Debug)]
pub struct Stored {
    pub digest: Digest,
    /// The manifest's `subject`, which now lists it among its referrers.
    pub subject: Option<Digest>,
}

/// How garbage collection treats young objects.
#[derive(Clone, Copy, Debug)]
pub struct GcPolicy {
    /// A blob no manifest references is kept this long after it was written
    /// (a push uploads its blobs before the manifest that references them).
    pub blob_grace: Duration,
    /// An upload not written to for this long is abandoned.
    pub upload_expiry: Duration,
}

impl Default for GcPolicy {
    fn default() -> Self {
        Self {
            blob_grace: Duration::from_secs(3600),
            upload_expiry: Duration::from_secs(24 * 3600),
        }
    }
}

/// What a garbage collection removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    pub blobs_removed: usize,
    pub bytes_freed: u64,
    pub uploads_removed: usize,
}

/// The registry's files.
#[derive(Debug)]
pub struct Storage {
    root: PathBuf,
    /// Writers that make a blob reachable (blob commits, mounts, manifest
    /// puts) share it; garbage collection takes it alone, so it never
    /// removes a blob a writer has just checked.
    collecting: RwLock<()>,
}

impl Storage {
    pub fn open(root: &Path) -> io::Result<Self> {
        for dir in ["blobs", "uploads", "repositories"] {
            fs::create_dir_all(root.join(dir))?;
        }
        Ok(Self {
            root: root.to_owned(),
            collecting: RwLock::new(()),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn shared(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.collecting.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.root
            .join("blobs")
            .join(d.algorithm().name())
            .join(&d.hex()[..2])
            .join(d.hex())
    }

    fn repo_dir(&self, name: &str) -> PathBuf {
        self.root.join("repositories").join(name)
    }

    fn link(&self, name: &str, kind: &str, d: &Digest) -> PathBuf {
        self.repo_dir(name)
            .join(kind)
            .join(d.algorithm().name())
            .join(d.hex())
    }

    fn tag_path(&self, name: &str, tag: &str) -> PathBuf {
        self.repo_dir(name).join("_tags").join(tag)
    }

    fn referrers_dir(&self, name: &str, subject: &Digest) -> PathBuf {
        self.link(name, "_referrers", subject)
    }

    /// Whether the repository holds anything.
    pub fn repository_exists(&self, name: &str) -> bool {
        let dir = self.repo_dir(name);
        dir.join("_layers").is_dir() || dir.join("_manifests").is_dir()
    }

    /// Fails with `NAME_INVALID` unless `name` is a repository name.
    pub fn check_name(name: &str) -> Result<(), Error> {
        if valid_repository(name) {
            Ok(())
        } else {
            Err(Error::NameInvalid(name.to_owned()))
        }
    }

    /// The file and size of a blob the repository holds (as a layer or as a
    /// manifest).
    pub fn blob(&self, name: &str, d: &Digest) -> Result<(PathBuf, u64), Error> {
        let linked =
            self.link(name, "_layers", d).exists() || self.link(name, "_manifests", d).exists();
        let path = self.blob_path(d);
        match (linked, fs::metadata(&path)) {
            (true, Ok(m)) => Ok((path, m.len())),
            _ if !self.repository_exists(name) => Err(Error::NameUnknown(name.to_owned())),
            _ => Err(Error::BlobUnknown(d.to_string())),
        }
    }

    /// Moves a verified upload into the content store as `d` and links it
    /// into the repository.
    pub fn commit_blob(&self, name: &str, upload: &Path, d: &Digest) -> io::Result<()> {
        let _shared = self.shared();
        let path = self.blob_path(d);
        if path.exists() {
            fs::remove_file(upload)?;
        } else {
            fs::File::open(upload)?.sync_all()?;
            let dir = path.parent().expect("blob paths have a folder");
            fs::create_dir_all(dir)?;
            fs::rename(upload, &path)?;
            sync_dir(dir)?;
        }
        write_atomic(&self.link(name, "_layers", d), b"")
    }

    /// Cross-repository mount: links `d` from `from` into `name` when `from`
    /// holds it. Returns whether it did.
    pub fn mount(&self, name: &str, from: &str, d: &Digest) -> io::Result<bool> {
        let _shared = self.shared();
        if !valid_repository(from) || self.blob(from, d).is_err() {
            return Ok(false);
        }
        write_atomic(&self.link(name, "_layers", d), b"")?;
        Ok(true)
    }

    /// Unlinks a blob from a repository; garbage collection frees it when no
    /// repository references it.
    pub fn delete_blob(&self, name: &str, d: &Digest) -> Result<(), Error> {
        match fs::remove_file(self.link(name, "_layers", d)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Err(if self.repository_exists(name) {
                Error::BlobUnknown(d.to_string())
            } else {
                Error::NameUnknown(name.to_owned())
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// Stores a manifest under `reference` (a tag, or the digest it must
    /// have), after checking that everything it references is in the
    /// repository.
    pub fn put_manifest(
        &self,
        name: &str,
        reference: &Reference,
        content_type: Option<&str>,
        bytes: &[u8],
    ) -> Result<Stored, Error> {
        if bytes.len() > MANIFEST_LIMIT {
            return Err(Error::ManifestTooLarge {
                limit: MANIFEST_LIMIT,
            });
        }
        let manifest: Value = serde_json::from_slice(bytes)
            .map_err(|e| Error::ManifestInvalid(format!("not JSON: {e}")))?;
        if !manifest.is_object() {
            return Err(Error::ManifestInvalid("not a JSON object".into()));
        }
        let media_type = media_type_of(&manifest, content_type)?;
        let digest = match reference {
            Reference::Digest(d) => {
                let actual = d.algorithm().digest(bytes);
                if &actual != d {
                    return Err(Error::DigestInvalid(format!(
                        "the manifest's digest is {actual}, not {d}"
                    )));
                }
                actual
            }
            Reference::Tag(_) => Algorithm::Sha256.digest(bytes),
        };
        let refs = references(&manifest, &media_type)?;
        let subject = match manifest.get("subject") {
            Some(s) => Some(descriptor(s, "subject")?.0),
            None => None,
        };
        let _shared = self.shared();
        for d in &refs.blobs {
            if self.blob(name, d).is_err() {
                return Err(Error::ManifestBlobUnknown(d.to_string()));
            }
        }
        for d in &refs.manifests {
            if !self.link(name, "_manifests", d).exists() {
                return Err(Error::ManifestBlobUnknown(d.to_string()));
            }
        }
        let path = self.blob_path(&digest);
        if !path.exists() {
            write_atomic(&path, bytes)?;
        }
        write_atomic(
            &self.link(name, "_manifests", &digest),
            media_type.as_bytes(),
        )?;
        if let Some(subject) = &subject {
            let entry = referrer_descriptor(&manifest, &media_type, &digest, bytes.len());
            write_atomic(
                &self.referrers_dir(name, subject).join(format!(
                    "{}-{}",
                    digest.algorithm().name(),
                    digest.hex()
                )),
                entry.to_string().as_bytes(),
            )?;
        }
        if let Reference::Tag(tag) = reference {
            write_atomic(&self.tag_path(name, tag), digest.to_string().as_bytes())?;
        }
        Ok(Stored { digest, subject })
    }

    fn resolve(&self, name: &str, reference: &Reference) -> Result<Digest, Error> {
        let unknown = || {
            if self.repository_exists(name) {
                Error::ManifestUnknown(match reference {
                    Reference::Tag(t) => t.clone(),
                    Reference::Digest(d) => d.to_string(),
                })
            } else {
                Error::NameUnknown(name.to_owned())
            }
        };
        match reference {
            Reference::Digest(d) => Ok(d.clone()),
            Reference::Tag(tag) => match fs::read_to_string(self.tag_path(name, tag)) {
                Ok(s) => s
                    .trim()
                    .parse()
                    .map_err(|e| Error::Io(io::Error::other(format!("tag file {tag}: {e}")))),
                Err(e) if e.kind() == ErrorKind::NotFound => Err(unknown()),
                Err(e) => Err(e.into()),
            },
        }
        .and_then(|d| {
            if self.link(name, "_manifests", &d).exists() {
                Ok(d)
            } else {
                Err(unknown())
            }
        })
    }

    pub fn get_manifest(&self, name: &str, reference: &Reference) -> Result<Manifest, Error> {
        let digest = self.resolve(name, reference)?;
        let media_type = fs::read_to_string(self.link(name, "_manifests", &digest))?;
        let bytes = fs::read(self.blob_path(&digest))?;
        Ok(Manifest {
            bytes,
            media_type,
            digest,
        })
    }

    /// Deletes a tag, or a manifest by digest with every tag that points at
    /// it and its entry among its subject's referrers.
    pub fn delete_manifest(&self, name: &str, reference: &Reference) -> Result<(), Error> {
        let digest = self.resolve(name, reference)?;
        if let Reference::Tag(tag) = reference {
            fs::remove_file(self.tag_path(name, tag))?;
            return Ok(());
        }
        if let Ok(bytes) = fs::read(self.blob_path(&digest))
            && let Ok(manifest) = serde_json::from_slice::<Value>(&bytes)
            && let Some(Ok((subject, _))) =
                manifest.get("subject").map(|s| descriptor(s, "subject"))
        {
            let entry = self.referrers_dir(name, &subject).join(format!(
                "{}-{}",
                digest.algorithm().name(),
                digest.hex()
            ));
            remove_if_present(&entry)?;
        }
        for tag in self.tags(name)? {
            let path = self.tag_path(name, &tag);
            if fs::read_to_string(&path).is_ok_and(|s| s.trim() == digest.to_string()) {
                remove_if_present(&path)?;
            }
        }
        fs::remove_file(self.link(name, "_manifests", &digest))?;
        Ok(())
    }

    /// The repository's tags, sorted.
    pub fn tags(&self, name: &str) -> Result<Vec<String>, Error> {
        if !self.repository_exists(name) {
            return Err(Error::NameUnknown(name.to_owned()));
        }
        let mut tags: Vec<String> = read_dir_names(&self.repo_dir(name).join("_tags"))?
            .into_iter()
            .filter(|t| valid_tag(t))
            .collect();
        tags.sort();
        Ok(tags)
    }

    /// Every repository, sorted.
    pub fn catalog(&self) -> io::Result<Vec<String>> {
        let mut found = Vec::new();
        let mut stack = vec![String::new()];
        while let Some(prefix) = stack.pop() {
            let dir = self.root.join("repositories").join(&prefix);
            for entry in read_dir_names(&dir)? {
                if entry.starts_with('_') || entry.starts_with('.') {
                    continue;
                }
                let name = if prefix.is_empty() {
                    entry
                } else {
                    format!("{prefix}/{entry}")
                };
                if self.repository_exists(&name) {
                    found.push(name.clone());
                }
                stack.push(name);
            }
        }
        found.sort();
        Ok(found)
    }

    /// Descriptors of the manifests whose subject is `subject`, optionally
    /// only those of one artifact type.
    pub fn referrers(
        &self,
        name: &str,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Vec<Value>, Error> {
        let dir = self.referrers_dir(name, subject);
        let mut out = Vec::new();
        let mut entries = read_dir_names(&dir)?;
        entries.sort();
        for entry in entries.into_iter().filter(|e| !e.starts_with('.')) {
            let bytes = fs::read(dir.join(&entry))?;
            let descriptor: Value = serde_json::from_slice(&bytes)
                .map_err(|e| io::Error::other(format!("referrer entry {entry}: {e}")))?;
            if artifact_type.is_none_or(|t| descriptor["artifactType"] == t) {
                out.push(descriptor);
            }
        }
        Ok(out)
    }

    /// Starts an upload into `name`; returns its id.
    pub fn new_upload(&self, name: &str) -> io::Result<String> {
        let id = uuid::Uuid::new_v4().to_string();
        let dir = self.root.join("uploads").join(&id);
        fs::create_dir_all(&dir)?;
        fs::write(dir.join("repository"), name)?;
        fs::File::create(dir.join("data"))?;
        Ok(id)
    }

    /// The data file of upload `id` into `name`, if there is one.
    pub fn upload(&self, name: &str, id: &str) -> Result<PathBuf, Error> {
        if uuid::Uuid::parse_str(id).is_err() {
            return Err(Error::BlobUploadUnknown);
        }
        let dir = self.root.join("uploads").join(id);
        match fs::read_to_string(dir.join("repository")) {
            Ok(repo) if repo == name => Ok(dir.join("data")),
            Ok(_) => Err(Error::BlobUploadUnknown),
            Err(e) if e.kind() == ErrorKind::NotFound => Err(Error::BlobUploadUnknown),
            Err(e) => Err(e.into()),
        }
    }

    pub fn remove_upload(&self, id: &str) -> io::Result<()> {
        match fs::remove_dir_all(self.root.join("uploads").join(id)) {
            Err(e) if e.kind() != ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Mark and sweep: frees blobs no manifest of any repository references
    /// (once older than the grace period), the links to them, and abandoned
    /// uploads.
    pub fn collect_garbage(&self, policy: GcPolicy) -> io::Result<GcReport> {
        let _alone = self.collecting.write().unwrap_or_else(|e| e.into_inner());
        let now = SystemTime::now();
        let older_than = |path: &Path, age: Duration| {
            fs::metadata(path)
                .and_then(|m| m.modified())
                .is_ok_and(|t| now.duration_since(t).unwrap_or_default() > age)
        };
        let repositories = self.catalog()?;
        let mut marked = HashSet::new();
        for name in &repositories {
            for digest in self.links(name, "_manifests")? {
                if let Ok(bytes) = fs::read(self.blob_path(&digest))
                    && let Ok(manifest) = serde_json::from_slice::<Value>(&bytes)
                {
                    let media_type = fs::read_to_string(self.link(name, "_manifests", &digest))?;
                    if let Ok(refs) = references(&manifest, &media_type) {
                        marked.extend(refs.blobs);
                        marked.extend(refs.manifests);
                    }
                }
                marked.insert(digest);
            }
        }
        let mut report = GcReport::default();
        for algorithm in [Algorithm::Sha256, Algorithm::Sha512] {
            let dir = self.root.join("blobs").join(algorithm.name());
            for shard in read_dir_names(&dir)? {
                for hex in read_dir_names(&dir.join(&shard))? {
                    let Ok(digest) = format!("{}:{hex}", algorithm.name()).parse::<Digest>() else {
                        continue;
                    };
                    let path = self.blob_path(&digest);
                    if marked.contains(&digest) || !older_than(&path, policy.blob_grace) {
                        continue;
                    }
                    report.bytes_freed += fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                    remove_if_present(&path)?;
                    report.blobs_removed += 1;
                }
            }
        }
        for name in &repositories {
            for digest in self.links(name, "_layers")? {
                if !self.blob_path(&digest).exists() {
                    remove_if_present(&self.link(name, "_layers", &digest))?;
                }
            }
        }
        for id in read_dir_names(&self.root.join("uploads"))? {
            let dir = self.root.join("uploads").join(&id);
            if older_than(&dir.join("data"), policy.upload_expiry) {
                fs::remove_dir_all(&dir)?;
                report.uploads_removed += 1;
            }
        }
        Ok(report)
    }

    /// The digests linked under one of a repository's link folders.
    fn links(&self, name: &str, kind: &str) -> io::Result<Vec<Digest>> {
        let dir = self.repo_dir(name).join(kind);
        let mut out = Vec::new();
        for algorithm in read_dir_names(&dir)? {
            for hex in read_dir_names(&dir.join(&algorithm))? {
                if let Ok(d) = format!("{algorithm}:{hex}").parse() {
                    out.push(d);
                }
            }
        }
        Ok(out)
    }
}

/// The blobs and child manifests a manifest references.
struct References {
    blobs: Vec<Digest>,
    manifests: Vec<Digest>,
}

fn references(manifest: &Value, media_type: &str) -> Result<References, Error> {
    let mut refs = References {
        blobs: Vec::new(),
        manifests: Vec::new(),
    };
    let list = |field: &str| -> Result<Vec<&Value>, Error> {
        match manifest.get(field) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => Ok(items.iter().collect()),
            Some(_) => Err(Error::ManifestInvalid(format!("{field} is not a list"))),
        }
    };
    match media_type {
        OCI_INDEX | DOCKER_LIST => {
            for (i, m) in list("manifests")?.into_iter().enumerate() {
                refs.manifests
                    .push(descriptor(m, &format!("manifests[{i}]"))?.0);
            }
        }
        OCI_MANIFEST | DOCKER_MANIFEST => {
            let config = manifest
                .get("config")
                .ok_or_else(|| Error::ManifestInvalid("config is required".into()))?;
            refs.blobs.push(descriptor(config, "config")?.0);
            for (i, l) in list("layers")?.into_iter().enumerate() {
                let (d, foreign) = descriptor(l, &format!("layers[{i}]"))?;
                // Layers with `urls` live elsewhere (non-distributable).
                if !foreign {
                    refs.blobs.push(d);
                }
            }
        }
        // Other manifest types (e.g. Docker schema 1, artifact manifests)
        // are stored as they are.
        _ => {}
    }
    Ok(refs)
}

/// A descriptor's digest, and whether it names foreign `urls`.
fn descriptor(v: &Value, field: &str) -> Result<(Digest, bool), Error> {
    let invalid = |why: &str| Error::ManifestInvalid(format!("{field}: {why}"));
    if !v["mediaType"].is_string() {
        return Err(invalid("mediaType is required"));
    }
    if !v["size"].is_u64() {
        return Err(invalid("size must be a non-negative integer"));
    }
    let digest = v["digest"]
        .as_str()
        .ok_or_else(|| invalid("digest is required"))?
        .parse()
        .map_err(|e: crate::digest::DigestError| invalid(&e.to_string()))?;
    let foreign = v["urls"].as_array().is_some_and(|u| !u.is_empty());
    Ok((digest, foreign))
}

/// The manifest's media type: its `mediaType` field, which must agree with
/// the request's Content-Type when both are given.
fn media_type_of(manifest: &Value, content_type: Option<&str>) -> Result<String, Error> {
    let content_type = content_type
        .map(|c| c.split(';').next().unwrap_or_default().trim())
        .filter(|c| !c.is_empty());
    match (manifest.get("mediaType"), content_type) {
        (Some(Value::String(field)), Some(header)) if field != header => {
            Err(Error::ManifestInvalid(format!(
                "mediaType {field:?} differs from Content-Type {header:?}"
            )))
        }
        (Some(Value::String(field)), _) => Ok(field.clone()),
        (Some(_), _) => Err(Error::ManifestInvalid("mediaType is not a string".into())),
        (None, Some(header)) => Ok(header.to_owned()),
        (None, None) if manifest.get("manifests").is_some() => Ok(OCI_INDEX.to_owned()),
        (None, None) => Ok(OCI_MANIFEST.to_owned()),
    }
}

/// The descriptor a referrer is listed with.
fn referrer_descriptor(manifest: &Value, media_type: &str, digest: &Digest, size: usize) -> Value {
    let artifact_type = manifest
        .get("artifactType")
        .or_else(|| {
            (media_type == OCI_MANIFEST)
                .then(|| manifest.get("config").and_then(|c| c.get("mediaType")))
                .flatten()
        })
        .cloned();
    let mut d = serde_json::json!({
        "mediaType": media_type,
        "digest": digest.to_string(),
        "size": size,
    });
    if let Some(t) = artifact_type {
        d["artifactType"] = t;
    }
    if let Some(a) = manifest.get("annotations") {
        d["annotations"] = a.clone();
    }
    d
}

fn read_dir_names(dir: &Path) -> io::Result<Vec<String>> {
    match fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect(),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

fn remove_if_present(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// Writes `bytes` to `path` durably and atomically: a temporary file in the
/// same folder, synced, renamed into place, then the folder synced.
fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let dir = path.parent().expect("storage paths have a folder");
    fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".tmp-{}", uuid::Uuid::new_v4()));
    let mut f = fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    sync_dir(dir)
}
