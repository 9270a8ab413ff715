//! The OCI runtime spec (`config.json`) of one container: the image's
//! config merged with the pod's container as Kubernetes merges them
//! (`command` replaces the entrypoint, `args` the cmd), the user resolved
//! against the image's own passwd and group files, volumes as bind mounts,
//! the pod's `/etc/hosts`, `/etc/hostname` and `/etc/resolv.conf`, the
//! securityContext and the cgroup limits.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use oci_spec::image::ImageConfiguration;
use oci_spec::runtime::{
    Arch, Capability, LinuxCapabilities, LinuxCpuBuilder, LinuxDeviceCgroupBuilder,
    LinuxIdMappingBuilder, LinuxMemoryBuilder, LinuxNamespace, LinuxNamespaceType,
    LinuxPidsBuilder, LinuxResources, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompBuilder,
    LinuxSyscallBuilder, MountBuilder, Spec,
};
use wasmkube_runtime::ContainerConfig;

use crate::Error;

/// The CFS period the CPU quota is expressed in (the kernel default).
const CPU_PERIOD_US: u64 = 100_000;

/// Capabilities a container has unless it drops them (containerd's default
/// set, which the kubelet uses).
const DEFAULT_CAPABILITIES: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];

/// What the runtime decided around the container config.
pub struct Inputs<'a> {
    pub config: &'a ContainerConfig,
    pub image: &'a ImageConfiguration,
    /// The image's unpacked root, for passwd and group lookups.
    pub image_root: &'a Path,
    /// The container's root filesystem (the overlay mount).
    pub rootfs: &'a Path,
    /// Files bind-mounted at /etc/hosts, /etc/hostname, /etc/resolv.conf.
    pub etc: [(&'a str, PathBuf); 3],
    /// Where each of the config's mounts is bound from: its own host path,
    /// or the idmapped mount of it for a container in a user namespace.
    pub volumes: &'a [PathBuf],
    /// The AppArmor profile runc applies to the container's process.
    pub app_armor: Option<&'a str>,
    pub cgroups_path: &'a str,
    /// The pod's network namespace; `None` shares the node's.
    pub netns: Option<&'a Path>,
    pub allow_privileged: bool,
    pub pids_limit: i64,
}

/// The process's argv: Kubernetes' merge of command/args with the image's
/// Entrypoint/Cmd.
pub fn argv(config: &ContainerConfig, image: &ImageConfiguration) -> Result<Vec<String>, Error> {
    let ic = image.config().as_ref();
    let entrypoint = ic.and_then(|c| c.entrypoint().clone()).unwrap_or_default();
    let cmd = ic.and_then(|c| c.cmd().clone()).unwrap_or_default();
    let argv: Vec<String> = match (config.command.is_empty(), config.args.is_empty()) {
        (false, _) => config.command.iter().chain(&config.args).cloned().collect(),
        (true, false) => entrypoint.into_iter().chain(config.args.clone()).collect(),
        (true, true) => entrypoint.into_iter().chain(cmd).collect(),
    };
    if argv.is_empty() {
        return Err(Error::Config(
            "no command specified: the image has no entrypoint or cmd and the container no command"
                .into(),
        ));
    }
    Ok(argv)
}

/// The user the process runs as: `(uid, gid, additional gids)`.
pub fn user(
    config: &ContainerConfig,
    image: &ImageConfiguration,
    root: &Path,
) -> Result<(u32, u32, Vec<u32>), Error> {
    let image_user = image
        .config()
        .as_ref()
        .and_then(|c| c.user().clone())
        .unwrap_or_default();
    let (name, group) = match image_user.split_once(':') {
        Some((u, g)) => (u.to_owned(), Some(g.to_owned())),
        None => (image_user.clone(), None),
    };
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap_or_default();
    let groups = std::fs::read_to_string(root.join("etc/group")).unwrap_or_default();
    let entry = |field: &str| {
        passwd.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() > 3 && (f[0] == field || f[2] == field)).then(|| {
                (
                    f[0].to_owned(),
                    f[2].parse::<u32>().ok(),
                    f[3].parse::<u32>().ok(),
                )
            })
        })
    };
    let (uid, mut gid, user_name) = match config.security.run_as_user {
        Some(uid) => {
            let uid = u32::try_from(uid)
                .map_err(|_| Error::Config(format!("runAsUser {uid} is out of range")))?;
            let e = entry(&uid.to_string());
            (uid, e.as_ref().and_then(|e| e.2), e.map(|e| e.0))
        }
        None if name.is_empty() => (0, Some(0), Some("root".to_owned())),
        None => match name.parse::<u32>() {
            Ok(uid) => {
                let e = entry(&name);
                (uid, e.as_ref().and_then(|e| e.2), e.map(|e| e.0))
            }
            Err(_) => {
                if config.security.run_as_non_root {
                    return Err(Error::Config(format!(
                        "container has runAsNonRoot and image has non-numeric user ({name}), cannot verify user is non-root"
                    )));
                }
                let e = entry(&name).ok_or_else(|| {
                    Error::Config(format!(
                        "unable to find user {name}: no matching entries in passwd file"
                    ))
                })?;
                (e.1.unwrap_or(0), e.2, Some(e.0))
            }
        },
    };
    if config.security.run_as_non_root && uid == 0 {
        return Err(Error::Config(
            "container has runAsNonRoot and image will run as root".into(),
        ));
    }
    let group_id = |g: &str| -> Option<u32> {
        g.parse().ok().or_else(|| {
            groups.lines().find_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                (f.len() > 2 && f[0] == g).then(|| f[2].parse().ok())?
            })
        })
    };
    if let Some(g) = group.as_deref() {
        gid = Some(group_id(g).ok_or_else(|| Error::Config(format!("unable to find group {g}")))?);
    }
    if let Some(g) = config.security.run_as_group {
        gid = Some(
            u32::try_from(g)
                .map_err(|_| Error::Config(format!("runAsGroup {g} is out of range")))?,
        );
    }
    let gid = gid.unwrap_or(0);
    // Supplementary groups from /etc/group, as a login would have.
    let additional: Vec<u32> = user_name
        .map(|n| {
            groups
                .lines()
                .filter_map(|l| {
                    let f: Vec<&str> = l.split(':').collect();
                    (f.len() > 3 && f[3].split(',').any(|m| m == n)).then(|| f[2].parse().ok())?
                })
                .filter(|g| *g != gid)
                .collect()
        })
        .unwrap_or_default();
    Ok((uid, gid, additional))
}

/// The system calls the default seccomp profile refuses (with EPERM), each
/// group unless the container holds the capability that releases it, as
/// containerd's default profile decides (which allows the rest): kernel
/// keyrings, namespaces and mounts, modules, kexec, reboot, tracing other
/// processes, raw I/O ports, the clock, NUMA policy, swap and the like.
const BLOCKED_SYSCALLS: &[(Option<Capability>, &[&str])] = &[
    (
        Some(Capability::SysAdmin),
        &[
            "bpf",
            "fanotify_init",
            "fsconfig",
            "fsmount",
            "fsopen",
            "fspick",
            "lookup_dcookie",
            "mount",
            "mount_setattr",
            "move_mount",
            "name_to_handle_at",
            "open_tree",
            "perf_event_open",
            "pivot_root",
            "quotactl",
            "quotactl_fd",
            "setdomainname",
            "sethostname",
            "setns",
            "umount",
            "umount2",
            "unshare",
        ],
    ),
    (Some(Capability::SysBoot), &["reboot"]),
    (
        Some(Capability::SysModule),
        &[
            "create_module",
            "delete_module",
            "finit_module",
            "get_kernel_syms",
            "init_module",
            "query_module",
        ],
    ),
    (Some(Capability::SysPacct), &["acct"]),
    (
        Some(Capability::SysPtrace),
        &[
            "kcmp",
            "pidfd_getfd",
            "process_madvise",
            "process_vm_readv",
            "process_vm_writev",
            "ptrace",
        ],
    ),
    (Some(Capability::SysRawio), &["ioperm", "iopl"]),
    (
        Some(Capability::SysTime),
        &["clock_adjtime", "clock_settime", "settimeofday", "stime"],
    ),
    (
        Some(Capability::SysNice),
        &[
            "get_mempolicy",
            "mbind",
            "set_mempolicy",
            "set_mempolicy_home_node",
        ],
    ),
    (Some(Capability::Syslog), &["syslog"]),
    (
        None,
        &[
            "add_key",
            "keyctl",
            "request_key",
            "kexec_file_load",
            "kexec_load",
            "nfsservctl",
            "open_by_handle_at",
            "swapon",
            "swapoff",
            "sysfs",
            "_sysctl",
            "uselib",
            "userfaultfd",
            "ustat",
            "vm86",
            "vm86old",
        ],
    ),
];

/// A node's own profile (`seccompProfile: Localhost`), in the OCI runtime
/// spec's seccomp form (`defaultAction`, `architectures`, `syscalls` with
/// `names`, `action`, `errnoRet`, `args`), as containerd reads one.
fn localhost_seccomp(profile: &str) -> Result<LinuxSeccomp, Error> {
    serde_json::from_str(profile)
        .map_err(|e| Error::Config(format!("the seccomp profile is not valid: {e}")))
}

/// The default seccomp profile for a container holding `caps`: every
/// system call allowed except [`BLOCKED_SYSCALLS`] not released by one of
/// them, on the native and the 32-bit x86 ABIs. (Names this kernel or
/// libseccomp does not know are skipped by runc.)
fn default_seccomp(caps: &HashSet<Capability>) -> Result<LinuxSeccomp, Error> {
    let names: Vec<String> = BLOCKED_SYSCALLS
        .iter()
        .filter(|(cap, _)| cap.as_ref().is_none_or(|c| !caps.contains(c)))
        .flat_map(|(_, names)| names.iter().map(|n| (*n).to_owned()))
        .collect();
    let blocked = LinuxSyscallBuilder::default()
        .names(names)
        .action(LinuxSeccompAction::ScmpActErrno)
        .errno_ret(1u32) // EPERM
        .build()
        .map_err(|e| Error::Config(e.to_string()))?;
    LinuxSeccompBuilder::default()
        .default_action(LinuxSeccompAction::ScmpActAllow)
        .architectures(vec![
            Arch::ScmpArchX86_64,
            Arch::ScmpArchX86,
            Arch::ScmpArchX32,
        ])
        .syscalls(vec![blocked])
        .build()
        .map_err(|e| Error::Config(e.to_string()))
}

fn capability(name: &str) -> Result<Capability, Error> {
    let upper = name.to_ascii_uppercase();
    let full = if upper.starts_with("CAP_") {
        upper
    } else {
        format!("CAP_{upper}")
    };
    serde_json::from_value(serde_json::Value::String(full))
        .map_err(|_| Error::Config(format!("unknown capability {name:?}")))
}

fn all_capabilities() -> HashSet<Capability> {
    // Every name the spec crate knows, by trying the kernel's list.
    (0..64)
        .filter_map(|i| serde_json::from_value(serde_json::json!(CAPABILITY_NAMES.get(i)?)).ok())
        .collect()
}

const CAPABILITY_NAMES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// The capability set: the default, less `drop` (`ALL` drops every one),
/// plus `add` (`ALL` adds every one).
fn capabilities(config: &ContainerConfig) -> Result<HashSet<Capability>, Error> {
    let s = &config.security;
    if s.privileged {
        return Ok(all_capabilities());
    }
    let is_all = |c: &String| c.eq_ignore_ascii_case("ALL");
    let mut set: HashSet<Capability> = if s.capabilities_drop.iter().any(is_all) {
        HashSet::new()
    } else {
        DEFAULT_CAPABILITIES
            .iter()
            .map(|c| capability(c))
            .collect::<Result<_, _>>()?
    };
    for c in s.capabilities_drop.iter().filter(|c| !is_all(c)) {
        set.remove(&capability(c)?);
    }
    if s.capabilities_add.iter().any(is_all) {
        set = all_capabilities();
    }
    for c in s.capabilities_add.iter().filter(|c| !is_all(c)) {
        set.insert(capability(c)?);
    }
    Ok(set)
}

/// The whole runtime spec.
pub fn build(i: &Inputs<'_>) -> Result<Spec, Error> {
    let c = i.config;
    if c.security.privileged && !i.allow_privileged {
        return Err(Error::Config(
            "privileged containers are not allowed on this node (the agent runs without --allow-privileged)".into(),
        ));
    }
    let ic = i.image.config().as_ref();
    let argv = argv(c, i.image)?;
    let (uid, gid, additional) = user(c, i.image, i.image_root)?;
    // The image's env, overridden by the container's, key by key.
    let mut env: Vec<(String, String)> = ic
        .and_then(|c| c.env().clone())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
        })
        .collect();
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.insert(
            0,
            (
                "PATH".into(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
            ),
        );
    }
    env.push(("HOSTNAME".into(), c.hostname.clone()));
    for (k, v) in &c.env {
        env.retain(|(key, _)| key != k);
        env.push((k.clone(), v.clone()));
    }
    let cwd = c
        .working_dir
        .clone()
        .or_else(|| ic.and_then(|c| c.working_dir().clone()))
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| "/".into());

    let mut spec = Spec::default();
    spec.set_hostname(Some(c.hostname.clone()));
    if let Some(root) = spec.root_mut() {
        root.set_path(i.rootfs.to_path_buf());
        root.set_readonly(Some(c.security.read_only_root_filesystem));
    }
    let caps = capabilities(c)?;
    let caps_held = caps.clone();
    if let Some(p) = spec.process_mut() {
        p.set_apparmor_profile(i.app_armor.map(str::to_owned));
        p.set_args(Some(argv));
        p.set_env(Some(
            env.into_iter().map(|(k, v)| format!("{k}={v}")).collect(),
        ));
        p.set_cwd(PathBuf::from(cwd));
        // runc in the foreground makes the container's own terminal and
        // copies between it and runc's stdio (the agent's terminal).
        p.set_terminal(Some(c.tty));
        let user = p.user_mut();
        user.set_uid(uid);
        user.set_gid(gid);
        user.set_additional_gids((!additional.is_empty()).then_some(additional));
        // Kubernetes allows escalation unless the container says otherwise.
        p.set_no_new_privileges(Some(c.security.allow_privilege_escalation == Some(false)));
        let mut lc = LinuxCapabilities::default();
        lc.set_bounding(Some(caps.clone()));
        lc.set_effective(Some(caps.clone()));
        lc.set_permitted(Some(caps));
        lc.set_inheritable(None);
        lc.set_ambient(None);
        p.set_capabilities(Some(lc));
        p.set_rlimits(None);
    }
    let mut mounts = spec.mounts().clone().unwrap_or_default();
    if c.user_namespace.is_some() {
        // sysfs cannot be mounted from a user namespace that does not own
        // the pod's network namespace (the node made it): the node's /sys
        // is bound read-only instead, as runc's rootless containers do.
        for m in mounts
            .iter_mut()
            .filter(|m| m.typ().as_deref() == Some("sysfs"))
        {
            m.set_typ(Some("bind".into()));
            m.set_source(Some(PathBuf::from("/sys")));
            m.set_options(Some(
                ["rbind", "nosuid", "noexec", "nodev", "ro"]
                    .map(str::to_owned)
                    .to_vec(),
            ));
        }
    }
    for (m, source) in c.mounts.iter().zip(i.volumes) {
        let mut options = vec!["rbind".to_owned(), "rprivate".to_owned()];
        options.push(if m.read_only { "ro" } else { "rw" }.to_owned());
        mounts.push(
            MountBuilder::default()
                .destination(PathBuf::from(&m.container_path))
                .typ("bind")
                .source(source.clone())
                .options(options)
                .build()
                .map_err(|e| Error::Config(e.to_string()))?,
        );
    }
    for (dest, source) in &i.etc {
        mounts.push(
            MountBuilder::default()
                .destination(PathBuf::from(dest))
                .typ("bind")
                .source(source.clone())
                .options(vec![
                    "rbind".to_owned(),
                    "rprivate".to_owned(),
                    "rw".to_owned(),
                ])
                .build()
                .map_err(|e| Error::Config(e.to_string()))?,
        );
    }
    spec.set_mounts(Some(mounts));

    let linux = spec.linux_mut().get_or_insert_with(Default::default);
    let mut namespaces = Vec::new();
    for typ in [
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Mount,
    ] {
        let mut ns = LinuxNamespace::default();
        ns.set_typ(typ);
        namespaces.push(ns);
    }
    if let Some(path) = i.netns {
        let mut ns = LinuxNamespace::default();
        ns.set_typ(LinuxNamespaceType::Network);
        ns.set_path(Some(path.to_path_buf()));
        namespaces.push(ns);
    }
    if let Some(range) = c.user_namespace {
        let mut ns = LinuxNamespace::default();
        ns.set_typ(LinuxNamespaceType::User);
        namespaces.push(ns);
        let mapping = LinuxIdMappingBuilder::default()
            .container_id(0u32)
            .host_id(range.host_id)
            .size(range.size)
            .build()
            .map_err(|e| Error::Config(e.to_string()))?;
        linux.set_uid_mappings(Some(vec![mapping]));
        linux.set_gid_mappings(Some(vec![mapping]));
    }
    linux.set_namespaces(Some(namespaces));
    linux.set_cgroups_path(Some(PathBuf::from(i.cgroups_path)));
    if c.security.privileged {
        linux.set_masked_paths(None);
        linux.set_readonly_paths(None);
    } else if let Some(profile) = &c.security.seccomp_localhost {
        linux.set_seccomp(Some(localhost_seccomp(profile)?));
    } else if !c.security.seccomp_unconfined {
        linux.set_seccomp(Some(default_seccomp(&caps_held)?));
    }
    let mut resources = LinuxResources::default();
    if !c.security.privileged {
        // Only the devices runc always allows (null, zero, tty, ...).
        resources.set_devices(Some(vec![
            LinuxDeviceCgroupBuilder::default()
                .allow(false)
                .access("rwm")
                .build()
                .map_err(|e| Error::Config(e.to_string()))?,
        ]));
    }
    if let Some(limit) = c.memory_limit {
        resources.set_memory(Some(
            LinuxMemoryBuilder::default()
                .limit(limit as i64)
                .build()
                .map_err(|e| Error::Config(e.to_string()))?,
        ));
    }
    let mut cpu = LinuxCpuBuilder::default();
    // Shares from the request (the kubelet's milliCPUToShares), quota from
    // the limit.
    let shares = c
        .cpu_request_millis
        .or(c.cpu_millis)
        .map_or(2, |m| (m * 1024 / 1000).max(2));
    cpu = cpu.shares(shares);
    if let Some(limit) = c.cpu_millis {
        cpu = cpu
            .quota((limit * CPU_PERIOD_US / 1000).max(1000) as i64)
            .period(CPU_PERIOD_US);
    }
    resources.set_cpu(Some(cpu.build().map_err(|e| Error::Config(e.to_string()))?));
    resources.set_pids(Some(
        LinuxPidsBuilder::default()
            .limit(i.pids_limit)
            .build()
            .map_err(|e| Error::Config(e.to_string()))?,
    ));
    linux.set_resources(Some(resources));
    Ok(spec)
}
