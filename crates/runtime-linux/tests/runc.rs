//! The Linux runtime against real runc (root and `runc` needed; the test
//! script installs runc and busybox-static): a busybox image unpacked from
//! its layer, output through pipes, exit codes, OOM kills, the grace period,
//! the securityContext, volumes, and nothing left behind.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use sha2::Digest;
use wasmkube_runtime::{
    Container, ContainerConfig, Error, Image, ImageKind, Mount, Output, Runtime, Security, Usage,
};
use wasmkube_runtime_linux::{Config, LinuxRuntime, cgroup::Cgroup, rootfs};

struct Fixture {
    dir: tempfile::TempDir,
    rt: LinuxRuntime,
    image: Image,
}

fn fixture(user: Option<&str>) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let (layer, config) = wasmkube_testkit::busybox_image(user);
    let blobs = dir.path().join("blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    let layer_path = blobs.join(format!("{:x}", sha2::Sha256::digest(&layer)));
    std::fs::write(&layer_path, &layer).unwrap();
    let config_path = blobs.join(format!("{:x}", sha2::Sha256::digest(&config)));
    std::fs::write(&config_path, &config).unwrap();
    let image = Image {
        reference: "registry.test/busybox:1".into(),
        id: format!(
            "registry.test/busybox@sha256:{:x}",
            sha2::Sha256::digest(format!("{user:?}"))
        ),
        kind: ImageKind::Linux {
            layers: vec![layer_path],
            config: config_path,
        },
        size: layer.len() as u64,
    };
    let rt = LinuxRuntime::new(Config::new(dir.path().join("linux")))
        .expect("runc runs here (root, runc installed)");
    Fixture { dir, rt, image }
}

/// A pipe whose read end is drained on a thread, each line also sent on
/// the channel as it arrives.
fn pipe() -> (
    File,
    std::thread::JoinHandle<String>,
    mpsc::Receiver<String>,
) {
    let (reader, writer) = std::io::pipe().unwrap();
    let (tx, rx) = mpsc::channel();
    let drain = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(reader).lines().map_while(Result::ok) {
            let _ = tx.send(line.clone());
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    (File::from(OwnedFd::from(writer)), drain, rx)
}

struct Run {
    container: Box<dyn Container>,
    stdout: std::thread::JoinHandle<String>,
    stderr: std::thread::JoinHandle<String>,
    lines: mpsc::Receiver<String>,
}

async fn start(
    f: &Fixture,
    id: &str,
    script: &str,
    tweak: impl FnOnce(&mut ContainerConfig),
) -> Result<Run, Error> {
    let (stdout, out, lines) = pipe();
    let (stderr, err, _) = pipe();
    let mut config = ContainerConfig {
        id: id.into(),
        name: "c".into(),
        hostname: "pod-a".into(),
        image: f.image.clone(),
        command: vec!["sh".into(), "-c".into(), script.into()],
        args: vec![],
        env: vec![("GREETING".into(), "hi".into())],
        working_dir: None,
        mounts: vec![],
        stdout: Output::File(stdout),
        stderr: Output::File(stderr),
        stdin: None,
        tty: false,
        user_namespace: None,
        memory_limit: None,
        cpu_millis: None,
        cpu_request_millis: None,
        security: Security::default(),
        usage: Arc::new(Usage::default()),
        pod_ip: [127, 0, 0, 1].into(),
        ports: vec![],
        netns: None,
        pod_netns: None,
        listeners: vec![],
        resolv_conf: None,
        names: None,
        service_routes: None,
    };
    tweak(&mut config);
    let container = f.rt.start(config).await?;
    Ok(Run {
        container,
        stdout: out,
        stderr: err,
        lines,
    })
}

impl Run {
    async fn finish(mut self) -> (wasmkube_runtime::Exit, String, String) {
        let exit = self.container.wait().await;
        drop(self.container);
        (
            exit,
            self.stdout.join().unwrap(),
            self.stderr.join().unwrap(),
        )
    }
}

fn leftovers(root: &Path, id: &str) -> Vec<String> {
    let mut found = Vec::new();
    if root.join("containers").join(id).exists() {
        found.push("bundle".into());
    }
    if !rootfs::mounts_under(&root.join("containers")).is_empty() {
        found.push("mount".into());
    }
    if Cgroup::new(format!("/wasmkube/{id}")).exists() {
        found.push("cgroup".into());
    }
    let listed = std::process::Command::new("runc")
        .arg("--root")
        .arg(root.join("state"))
        .args(["list", "--quiet"])
        .output()
        .unwrap();
    if String::from_utf8_lossy(&listed.stdout).contains(id) {
        found.push("runc state".into());
    }
    found
}

fn unique(name: &str) -> String {
    format!("{name}-{}", std::process::id())
}

#[tokio::test(flavor = "multi_thread")]
async fn runs_a_busybox_container_with_env_hostname_and_exit_code_and_leaves_nothing() {
    let f = fixture(None);
    f.rt.prepare(&f.image).await.unwrap();
    let id = unique("basic");
    let run = start(
        &f,
        &id,
        "echo $GREETING from $(hostname) as $(id -u); echo oops >&2; exit 3",
        |_| {},
    )
    .await
    .unwrap();
    let (exit, out, err) = run.finish().await;
    assert_eq!((exit.code, exit.reason.as_str()), (3, "Error"));
    assert_eq!(out, "hi from pod-a as 0\n");
    assert_eq!(err, "oops\n");
    assert_eq!(
        leftovers(&f.dir.path().join("linux"), &id),
        Vec::<String>::new()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_container_over_its_memory_limit_is_oom_killed() {
    let f = fixture(None);
    let id = unique("oom");
    let run = start(&f, &id, "head -c 300000000 /dev/zero | tail", |c| {
        c.memory_limit = Some(32 << 20);
    })
    .await
    .unwrap();
    let (exit, _, _) = run.finish().await;
    assert_eq!((exit.code, exit.reason.as_str()), (137, "OOMKilled"));
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_a_container_that_handles_it_and_one_that_ignores_it_is_killed() {
    let f = fixture(None);
    let polite = start(
        &f,
        &unique("polite"),
        "trap 'echo bye; exit 0' TERM; echo ready; while true; do sleep 0.05; done",
        |_| {},
    )
    .await
    .unwrap();
    let stubborn = start(
        &f,
        &unique("stubborn"),
        "trap '' TERM; echo ready; sleep 1000",
        |_| {},
    )
    .await
    .unwrap();
    for mut run in [polite, stubborn] {
        // TERM once the shell has set its trap: it says so.
        let line = run.lines.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(line, "ready");
        assert!(run.container.terminate());
        let waited = tokio::time::timeout(Duration::from_secs(2), run.container.wait()).await;
        match waited {
            Ok(exit) => {
                assert_eq!(exit.code, 0, "the polite container exits 0 on TERM");
                let (_, out, _) = run.finish().await;
                assert_eq!(out, "ready\nbye\n");
            }
            Err(_) => {
                run.container.kill();
                let (exit, out, _) = run.finish().await;
                assert_eq!((exit.code, exit.reason.as_str()), (137, "Error"));
                assert_eq!(out, "ready\n");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn security_context_user_read_only_root_and_volumes() {
    let f = fixture(Some("nobody"));
    // The image's user, resolved through its passwd file.
    let (exit, out, _) = start(&f, &unique("user"), "id -u; id -g", |_| {})
        .await
        .unwrap()
        .finish()
        .await;
    assert_eq!((exit.code, out.as_str()), (0, "65534\n65534\n"));
    // runAsUser and runAsGroup win over it.
    let (_, out, _) = start(&f, &unique("runas"), "id -u; id -g", |c| {
        c.security.run_as_user = Some(1234);
        c.security.run_as_group = Some(99);
    })
    .await
    .unwrap()
    .finish()
    .await;
    assert_eq!(out, "1234\n99\n");
    // A read-only root refuses writes; a read-only volume too; a writable one
    // takes them.
    let vol = f.dir.path().join("vol");
    let ro = f.dir.path().join("ro");
    std::fs::create_dir_all(&vol).unwrap();
    std::fs::create_dir_all(&ro).unwrap();
    std::fs::write(ro.join("config"), "from the host").unwrap();
    let mount = |host: &PathBuf, at: &str, read_only| Mount {
        host_path: host.clone(),
        container_path: at.into(),
        read_only,
    };
    let (exit, out, _) = start(
        &f,
        &unique("ro"),
        "touch /x 2>/dev/null && echo root-writable; cat /etc/config/config; echo; touch /etc/config/y 2>/dev/null && echo ro-writable; echo data > /data/file && echo wrote",
        |c| {
            c.security.run_as_user = Some(0);
            c.security.read_only_root_filesystem = true;
            c.mounts = vec![mount(&vol, "/data", false), mount(&ro, "/etc/config", true)];
        },
    )
    .await
    .unwrap()
    .finish()
    .await;
    assert_eq!((exit.code, out.as_str()), (0, "from the host\nwrote\n"));
    assert_eq!(std::fs::read_to_string(vol.join("file")).unwrap(), "data\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_default_seccomp_profile_and_masked_paths_hold_unless_unconfined() {
    let f = fixture(None);
    // Creating a user namespace needs no capability; the default profile
    // refuses `unshare` (as containerd's does), and /proc/kcore reads empty.
    let script = "unshare -U true 2>&1; echo unshare=$?; echo kcore=$(head -c 16 /proc/kcore 2>/dev/null | wc -c)";
    let (_, out, _) = start(&f, &unique("seccomp"), script, |_| {})
        .await
        .unwrap()
        .finish()
        .await;
    assert!(out.contains("Operation not permitted"), "{out}");
    assert!(
        out.contains("unshare=1") && out.contains("kcore=0"),
        "{out}"
    );
    // seccompProfile: Unconfined lifts the filter (the masking stays).
    let (_, out, _) = start(&f, &unique("unconfined"), script, |c| {
        c.security.seccomp_unconfined = true;
    })
    .await
    .unwrap()
    .finish()
    .await;
    assert!(
        out.contains("unshare=0") && out.contains("kcore=0"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_localhost_seccomp_profile_replaces_the_default() {
    let f = fixture(None);
    // The node's own profile refuses mkdir (EACCES) and nothing else, so
    // what the default profile refuses (`unshare`) works again.
    let profile = r#"{"defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13}]}"#;
    let script = "mkdir /tmp/made 2>&1; echo mkdir=$?; unshare -U true; echo unshare=$?";
    let (_, out, _) = start(&f, &unique("localhost"), script, |c| {
        c.security.seccomp_localhost = Some(profile.to_owned());
    })
    .await
    .unwrap()
    .finish()
    .await;
    assert!(
        out.contains("Permission denied") && out.contains("mkdir=1") && out.contains("unshare=0"),
        "{out}"
    );
    // A profile that is not one is the container's configuration error.
    let Err(e) = start(&f, &unique("bad-profile"), "true", |c| {
        c.security.seccomp_localhost = Some("{\"defaultAction\": 7}".to_owned());
    })
    .await
    else {
        panic!("a malformed profile must not start");
    };
    assert!(
        e.to_string().contains("the seccomp profile is not valid"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn run_as_non_root_refuses_a_root_image_and_privileged_is_refused() {
    let f = fixture(None);
    let Err(e) = start(&f, &unique("nonroot"), "true", |c| {
        c.security.run_as_non_root = true
    })
    .await
    else {
        panic!("a root image under runAsNonRoot must not start");
    };
    assert!(
        matches!(e, Error::Config(ref m) if m.contains("runAsNonRoot")),
        "{e}"
    );
    let Err(e) = start(&f, &unique("priv"), "true", |c| {
        c.security.privileged = true
    })
    .await
    else {
        panic!("privileged must be refused by default");
    };
    assert!(
        matches!(e, Error::Config(ref m) if m.contains("privileged")),
        "{e}"
    );
    assert!(rootfs::mounts_under(&f.dir.path().join("linux/containers")).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wasm_image_is_refused_with_a_clear_reason() {
    let f = fixture(None);
    let wasm = Image {
        reference: "registry.test/hello:1".into(),
        id: "registry.test/hello@sha256:00".into(),
        kind: ImageKind::Wasm {
            module: f.dir.path().join("m.wasm"),
            component: false,
        },
        size: 8,
    };
    let e = f.rt.prepare(&wasm).await.unwrap_err();
    assert!(
        matches!(e, Error::Unsupported(ref m) if m.contains("Wasm image")),
        "{e}"
    );
}

async fn read_all(mut r: wasmkube_runtime::ExecOutput) -> String {
    use futures::AsyncReadExt;
    let mut s = String::new();
    r.read_to_string(&mut s).await.unwrap();
    s
}

#[tokio::test(flavor = "multi_thread")]
async fn exec_runs_commands_in_the_container_with_pipes_and_with_a_terminal() {
    use futures::AsyncWriteExt;
    let f = fixture(Some("nobody"));
    let id = unique("exec");
    let mut run = start(&f, &id, "echo ready; sleep 1000", |_| {})
        .await
        .unwrap();
    assert_eq!(
        run.lines.recv_timeout(Duration::from_secs(10)).unwrap(),
        "ready"
    );
    let exec = run.container.exec().expect("Linux containers can exec");

    // Pipes: separate streams, the container's env and user, the exit code.
    let p = exec
        .exec(
            &[
                "sh".into(),
                "-c".into(),
                "echo $GREETING $(id -u) $(hostname); echo oops >&2; exit 3".into(),
            ],
            None,
        )
        .await
        .unwrap();
    let (out, err) = tokio::join!(read_all(p.stdout), read_all(p.stderr.unwrap()));
    assert_eq!(p.exit.await.unwrap(), 3);
    assert_eq!((out.as_str(), err.as_str()), ("hi 65534 pod-a\n", "oops\n"));

    // Stdin reaches the process and its end ends `cat`.
    let mut p = exec.exec(&["cat".into()], None).await.unwrap();
    p.stdin.write_all(b"through stdin\n").await.unwrap();
    p.stdin.close().await.unwrap();
    drop(p.stdin);
    assert_eq!(read_all(p.stdout).await, "through stdin\n");
    assert_eq!(p.exit.await.unwrap(), 0);

    // A terminal: the process sees one, with the size it was given, and a
    // resize reaches it (the shell waits for its SIGWINCH). runc sizes the
    // container's terminal from ours just after the process starts (as in
    // any runc exec), so the shell first waits for the size to be there
    // (until then `stty size` succeeds with nothing or `0 0`; the SIGWINCH
    // of that first sizing comes before the trap, which then only sees the
    // resize).
    let mut p = exec
        .exec(
            &[
                "sh".into(),
                "-c".into(),
                "tty; until s=$(stty size 2>/dev/null) && [ -n \"$s\" ] && [ \"$s\" != '0 0' ]; \
                 do sleep 0.01; done; echo $s; \
                 trap 'stty size; exit 0' WINCH; echo waiting; read x"
                    .into(),
            ],
            Some((100, 30)),
        )
        .await
        .unwrap();
    assert!(p.stderr.is_none());
    let mut seen = String::new();
    while !seen.contains("waiting") {
        use futures::AsyncReadExt;
        let mut buf = [0u8; 256];
        let n = p.stdout.read(&mut buf).await.unwrap();
        assert_ne!(n, 0, "the terminal closed early: {seen:?}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    (p.resize)(120, 40);
    let out = seen + &read_all(p.stdout).await;
    assert_eq!(p.exit.await.unwrap(), 0);
    let lines: Vec<&str> = out.lines().map(str::trim).collect();
    assert!(lines[0].starts_with("/dev/pts/"), "{out:?}");
    assert_eq!(lines[1..], ["30 100", "waiting", "40 120"], "{out:?}");

    // A command that does not exist fails like a shell's.
    let p = exec.exec(&["no-such-command".into()], None).await.unwrap();
    let err = read_all(p.stderr.unwrap()).await;
    assert_ne!(p.exit.await.unwrap(), 0);
    assert!(err.contains("no-such-command"), "{err}");

    run.container.kill();
    let (exit, _, _) = run.finish().await;
    assert_eq!(exit.code, 137);
    assert_eq!(
        leftovers(&f.dir.path().join("linux"), &id),
        Vec::<String>::new()
    );
}
