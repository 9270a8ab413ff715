//! Root filesystems: an image's layers unpacked in order into one directory
//! per image (whiteouts and opaque directories honoured, each layer's digest
//! checked as it is read), shared read-only by every container of that image
//! through an overlay mount with the container's own upper directory.

use std::collections::HashSet;
use std::fs;
use std::io::{self, BufReader, Read};
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::Error;

const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

/// A reader that hashes what passes through it.
struct Hashing<R> {
    inner: R,
    hash: Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

/// Unpacks `layers` (blobs named by their sha256 digest, gzip-compressed or
/// plain tars) in order into `dest`, which must not exist yet. Built in a
/// temporary sibling and renamed, so `dest` is whole or absent.
pub fn unpack(layers: &[PathBuf], dest: &Path) -> Result<(), Error> {
    let tmp = dest.with_extension("unpacking");
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).map_err(Error::io(&tmp))?;
    for layer in layers {
        unpack_layer(layer, &tmp)?;
    }
    fs::rename(&tmp, dest).map_err(Error::io(dest))
}

fn unpack_layer(layer: &Path, root: &Path) -> Result<(), Error> {
    let bad = |why: String| Error::Image(format!("layer {}: {why}", layer.display()));
    let file = fs::File::open(layer).map_err(Error::io(layer))?;
    let mut hashing = Hashing {
        inner: BufReader::new(file),
        hash: Sha256::new(),
    };
    let mut magic = [0u8; 4];
    let n = read_full(&mut hashing, &mut magic).map_err(|e| bad(e.to_string()))?;
    let head = io::Cursor::new(magic[..n].to_vec());
    let stream: Box<dyn Read + '_> = match magic {
        [0x1f, 0x8b, ..] => Box::new(flate2::read::GzDecoder::new(head.chain(&mut hashing))),
        [0x28, 0xb5, 0x2f, 0xfd] => {
            return Err(bad("zstd-compressed layers are not supported".into()));
        }
        _ => Box::new(head.chain(&mut hashing)),
    };
    let mut archive = tar::Archive::new(stream);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(true);
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(true);
    // Paths this layer wrote: an opaque marker hides only lower layers.
    let mut written: HashSet<PathBuf> = HashSet::new();
    for entry in archive.entries().map_err(|e| bad(e.to_string()))? {
        let mut entry = entry.map_err(|e| bad(e.to_string()))?;
        let path = clean(&entry.path().map_err(|e| bad(e.to_string()))?)
            .ok_or_else(|| bad("an entry's path leaves the root".into()))?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let parent = path.parent().unwrap_or(Path::new("")).to_path_buf();
        if name == OPAQUE {
            let dir = root.join(&parent);
            if let Ok(children) = fs::read_dir(&dir) {
                for child in children.flatten() {
                    if !written.contains(&parent.join(child.file_name())) {
                        remove(&child.path()).map_err(Error::io(child.path()))?;
                    }
                }
            }
            continue;
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT) {
            let target = root.join(&parent).join(hidden);
            remove(&target).map_err(Error::io(&target))?;
            continue;
        }
        // A directory replaces a file and a file a directory.
        let target = root.join(&path);
        if let Ok(meta) = fs::symlink_metadata(&target) {
            let is_dir = entry.header().entry_type().is_dir();
            if meta.is_dir() != is_dir || (!is_dir && meta.file_type().is_symlink()) {
                remove(&target).map_err(Error::io(&target))?;
            }
        }
        let unpacked = entry.unpack_in(root).map_err(|e| {
            let cause = std::error::Error::source(&e)
                .map(|s| format!(": {s}"))
                .unwrap_or_default();
            bad(format!("{}: {e}{cause}", path.display()))
        })?;
        if !unpacked {
            return Err(bad(format!("{} leaves the root", path.display())));
        }
        written.insert(path);
    }
    // Drain what the tar reader left (padding) so the digest covers the blob.
    let mut rest = archive.into_inner();
    io::copy(&mut rest, &mut io::sink()).map_err(|e| bad(e.to_string()))?;
    drop(rest);
    let got = format!("{:x}", hashing.hash.finalize());
    let want = layer
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if got != want {
        return Err(bad(format!(
            "digest is sha256:{got}, expected sha256:{want}"
        )));
    }
    Ok(())
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// The entry's path relative to the root, or `None` when it climbs out.
fn clean(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

fn remove(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
    }
}

/// Mounts `lower` read-only under `upper`'s changes at `target`.
pub fn mount_overlay(lower: &Path, upper: &Path, work: &Path, target: &Path) -> Result<(), Error> {
    for d in [upper, work, target] {
        fs::create_dir_all(d).map_err(Error::io(d))?;
    }
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    let options = std::ffi::CString::new(options)
        .map_err(|_| Error::Setup("a layer path holds a NUL byte".into()))?;
    rustix::mount::mount(
        "overlay",
        target,
        "overlay",
        rustix::mount::MountFlags::empty(),
        Some(options.as_c_str()),
    )
    .map_err(|e| Error::Setup(format!("mounting the root filesystem: {e}")))
}

/// Unmounts `target` (lazily: a process still holding it does not stop the
/// cleanup). Not mounted is fine.
pub fn unmount(target: &Path) -> Result<(), Error> {
    match rustix::mount::unmount(target, rustix::mount::UnmountFlags::DETACH) {
        Ok(()) => Ok(()),
        Err(e) if e == rustix::io::Errno::INVAL || e == rustix::io::Errno::NOENT => Ok(()),
        Err(e) => Err(Error::Setup(format!(
            "unmounting {}: {e}",
            target.display()
        ))),
    }
}

/// Mount points at or below `dir`, deepest first (from /proc/self/mountinfo,
/// which names them by absolute paths with symbolic links resolved, so
/// `dir` is resolved the same way first).
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let dir = fs::canonicalize(dir)
        .or_else(|_| std::path::absolute(dir))
        .unwrap_or_else(|_| dir.to_path_buf());
    let dir = dir.as_path();
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(dir: &Path, entries: &[(&str, Option<&str>)]) -> PathBuf {
        let mut b = tar::Builder::new(Vec::new());
        for (path, content) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            match content {
                Some(c) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(c.len() as u64);
                    h.set_mode(0o644);
                    b.append_data(&mut h, path, c.as_bytes()).unwrap();
                }
                None => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_size(0);
                    h.set_mode(0o755);
                    b.append_data(&mut h, path, io::empty()).unwrap();
                }
            }
        }
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        io::Write::write_all(&mut gz, &b.into_inner().unwrap()).unwrap();
        let bytes = gz.finish().unwrap();
        let path = dir.join(format!("{:x}", Sha256::digest(&bytes)));
        fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn layers_stack_with_whiteouts_and_opaque_directories() {
        let dir = tempfile::tempdir().unwrap();
        let lower = layer(
            dir.path(),
            &[
                ("etc/", None),
                ("etc/keep", Some("1")),
                ("etc/gone", Some("2")),
                ("data/", None),
                ("data/old", Some("3")),
            ],
        );
        let upper = layer(
            dir.path(),
            &[
                ("etc/.wh.gone", Some("")),
                ("data/", None),
                ("data/.wh..wh..opq", Some("")),
                ("data/new", Some("4")),
                ("etc/keep", Some("5")),
            ],
        );
        let root = dir.path().join("rootfs");
        unpack(&[lower, upper], &root).unwrap();
        assert_eq!(fs::read_to_string(root.join("etc/keep")).unwrap(), "5");
        assert!(!root.join("etc/gone").exists());
        assert!(!root.join("data/old").exists());
        assert_eq!(fs::read_to_string(root.join("data/new")).unwrap(), "4");
        assert!(!dir.path().join("rootfs.unpacking").exists());
    }

    #[test]
    fn a_layer_whose_bytes_do_not_match_its_digest_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let good = layer(dir.path(), &[("a", Some("x"))]);
        let forged = dir.path().join(format!("{:x}", Sha256::digest(b"other")));
        fs::rename(&good, &forged).unwrap();
        let err = unpack(&[forged], &dir.path().join("rootfs")).unwrap_err();
        assert!(err.to_string().contains("digest is sha256:"), "{err}");
        assert!(!dir.path().join("rootfs").exists());
    }

    #[test]
    fn entries_climbing_out_of_the_root_are_refused() {
        assert_eq!(clean(Path::new("../x")), None);
        assert_eq!(clean(Path::new("a/../../x")), None);
        assert_eq!(clean(Path::new("/a/./b")), Some(PathBuf::from("a/b")));
    }
}
