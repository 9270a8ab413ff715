//! Containers in a user namespace of their own (`hostUsers: false`): root
//! in the container is an unprivileged id range of the node.
//!
//! runc makes the namespace from the spec's id mappings. The container's
//! files must then be owned by ids of that range, which the image's are
//! not, so the image's root is given to the overlay through an idmapped
//! mount (`mount_setattr` with `MOUNT_ATTR_IDMAP`, Linux 5.12+; overlayfs
//! takes idmapped layers since 5.19): the image's owner 0 reads as the
//! range's first id, without copying or changing a file. The overlay's
//! upper and work directories belong to the range's first id, so what the
//! container writes is its own. The mapping for the mount comes from a
//! user namespace made for the purpose, by a short-lived child process
//! (only a single-threaded process may make one).
//!
//! The pod's volumes are seen the same way, as the kubelet has its runtime
//! idmap them: each is mounted idmapped in the container's bundle and bound
//! into the container from there, so a file the node's root owns is root's
//! in the container, and what the container's root writes into a volume is
//! the node's root's, as it would be without a user namespace. The files
//! the bundle holds for the container alone (/etc/hosts and the others) are
//! given to the range's first id.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::process::{Command, Stdio};

use crate::Error;

/// `MOUNT_ATTR_IDMAP` (linux/mount.h).
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;

/// `struct mount_attr` (linux/mount.h).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

fn setup(what: &'static str) -> impl Fn(std::io::Error) -> Error {
    move |e| failed(what.to_owned(), e)
}

/// A user namespace mapping ids `0..size` to the node's `host_id..`.
pub(crate) fn namespace(range: wasmkube_runtime::IdRange) -> Result<OwnedFd, Error> {
    let mut cmd = Command::new("sleep");
    cmd.arg("60")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: between fork and exec the child only makes a new user
    // namespace, a single system call that allocates nothing and takes no
    // lock the parent's other threads may hold.
    #[allow(unsafe_code)]
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWUSER)
                .map_err(std::io::Error::from)
        });
    }
    let mut child = cmd.spawn().map_err(setup("starting its holder"))?;
    let made = (|| {
        let map = format!("0 {} {}\n", range.host_id, range.size);
        let proc = Path::new("/proc").join(child.id().to_string());
        std::fs::write(proc.join("uid_map"), &map)?;
        std::fs::write(proc.join("gid_map"), &map)?;
        std::fs::File::open(proc.join("ns/user")).map(OwnedFd::from)
    })()
    .map_err(setup("mapping its ids"));
    let _ = child.kill();
    let _ = child.wait();
    made
}

/// Mounts `source` (a directory or a file; `target` is one of the same)
/// at `target` with its owners seen through `userns`. `what` names it in
/// errors.
pub(crate) fn idmapped(
    what: &str,
    source: &Path,
    target: &Path,
    userns: &OwnedFd,
) -> Result<(), Error> {
    use rustix::mount::{MoveMountFlags, OpenTreeFlags, move_mount, open_tree};
    let tree = open_tree(
        rustix::fs::CWD,
        source,
        OpenTreeFlags::OPEN_TREE_CLONE
            | OpenTreeFlags::OPEN_TREE_CLOEXEC
            | OpenTreeFlags::AT_RECURSIVE,
    )
    .map_err(|e| failed(format!("cloning {what}"), e.into()))?;
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_IDMAP,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.as_raw_fd() as u64,
    };
    // SAFETY: `mount_setattr(2)` reads `attr`, of the size given, which
    // lives through the call; the path is a NUL-terminated empty string and
    // `tree` an open mount.
    #[allow(unsafe_code)]
    let set = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_fd().as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if set != 0 {
        return Err(failed(
            format!(
                "idmapping {what} (hostUsers: false needs Linux 5.12 or newer, and the node's data directory and the pod's volumes on filesystems with idmapped mounts, such as ext4, xfs, btrfs or tmpfs)"
            ),
            std::io::Error::last_os_error(),
        ));
    }
    move_mount(
        tree.as_fd(),
        "",
        rustix::fs::CWD,
        target,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )
    .map_err(|e| failed(format!("mounting {what} idmapped"), e.into()))
}

fn failed(what: String, e: std::io::Error) -> Error {
    Error::Setup(format!("the user namespace: {what}: {e}"))
}
