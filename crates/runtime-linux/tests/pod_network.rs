//! Both ways a pod network is set up, in a network namespace this test makes
//! for the node (nothing of the machine's network changes): in-process over
//! netlink (the default: routed veths) and with the CNI plugins
//! (`--cni-bin`: a bridge), and a user's own CNI network configuration list
//! (`--cni-conf-dir`). Each gives pods distinct addresses that the node and
//! the other pods reach, and teardown leaves no namespace, veth or address
//! allocation behind.

use std::path::Path;
use std::process::Command;

use wasmkube_runtime_linux::net::{NetConfig, PodNetwork};

fn veths(node: &str) -> usize {
    let out = Command::new("ip")
        .args(["-n", node, "-o", "link", "show", "type", "veth"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).lines().count()
}

fn check(cni_bin: Option<&Path>, tag: &str) {
    check_with(cni_bin, None, tag, |_| {});
}

/// As [`check`], with a CNI configuration directory; `inside` looks into
/// the first pod's namespace (by name) once it is set up.
fn check_with(
    cni_bin: Option<&Path>,
    conf_dir: Option<&Path>,
    tag: &str,
    inside: impl Fn(&str) + Sync,
) {
    let node_ns = wasmkube_testkit::TestNetns::new(&format!("wkt-node{tag}"));
    let node = node_ns.name().to_owned();
    let state = tempfile::tempdir().unwrap();
    let config = NetConfig {
        pod_cidr: "10.251.7.0/24".into(),
        bridge: "wk0".into(),
        cni_bin: cni_bin.map(Path::to_owned),
        cni_conf_dir: conf_dir.map(Path::to_owned),
        state_dir: state.path().to_owned(),
        prefix: format!("wkt-{tag}-{}-", std::process::id()),
    };
    node_ns.run(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let network = PodNetwork::new(config).unwrap();
            network.prepare().await.unwrap();
            let a = network.setup("pod-a").await.unwrap();
            let b = network.setup("pod-b").await.unwrap();
            assert_ne!(a.ip, b.ip);
            inside(a.netns.file_name().unwrap().to_str().unwrap());
            for sb in [&a, &b] {
                assert!(sb.ip.to_string().starts_with("10.251.7."), "{sb:?}");
                assert!(sb.netns.exists());
                // The node reaches the pod.
                let out = Command::new("busybox")
                    .args(["ping", "-c", "1", "-W", "5", &sb.ip.to_string()])
                    .output()
                    .expect("busybox (scripts/test.sh installs busybox-static)");
                assert!(out.status.success(), "ping {}: {out:?}", sb.ip);
            }
            // Inside, the pod has eth0 with its address and a default route.
            let out = Command::new("ip")
                .args(["-n"])
                .arg(a.netns.file_name().unwrap())
                .args(["-o", "addr", "show", "dev", "eth0"])
                .output()
                .unwrap();
            let addr = String::from_utf8_lossy(&out.stdout).into_owned();
            // Routed in-process (a /32 each); on the CNI bridge, the /24.
            let prefix = if cni_bin.is_none() { 32 } else { 24 };
            assert!(addr.contains(&format!("inet {}/{prefix}", a.ip)), "{addr}");
            // Pods reach each other through the node.
            let out = Command::new("ip")
                .args(["netns", "exec"])
                .arg(a.netns.file_name().unwrap())
                .args(["busybox", "ping", "-c", "1", "-W", "5", &b.ip.to_string()])
                .output()
                .unwrap();
            assert!(out.status.success(), "pod a -> pod b: {out:?}");
            if cni_bin.is_none() {
                // An address of the pod CIDR no pod holds is refused on the
                // node, not sent anywhere.
                let out = Command::new("busybox")
                    .args(["ping", "-c", "1", "-W", "2", "10.251.7.200"])
                    .output()
                    .unwrap();
                let said = String::from_utf8_lossy(&out.stderr).into_owned()
                    + &String::from_utf8_lossy(&out.stdout);
                assert!(!out.status.success(), "{said}");
                assert!(said.contains("No route to host"), "{said}");
            }
            assert_eq!(veths(&node), 2);
            let mut ids = network.sandboxes();
            ids.sort();
            assert_eq!(ids, ["pod-a", "pod-b"]);
            network.teardown("pod-a").await;
            network.teardown("pod-b").await;
            assert!(!a.netns.exists() && !b.netns.exists());
            assert!(network.sandboxes().is_empty());
            // The addresses are free again (the in-process allocator takes
            // the lowest free one; CNI's host-local goes round the range).
            let again = network.setup("pod-c").await.unwrap();
            if cni_bin.is_none() {
                assert!(again.ip == a.ip || again.ip == b.ip, "{again:?}");
            }
            network.teardown("pod-c").await;
        });
    });
    // Namespaces go asynchronously once unmounted; their veths with them.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while veths(&node) > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(veths(&node), 0, "veths left behind");
}

#[test]
fn in_process_netlink() {
    check(None, "n");
}

#[test]
fn cni_plugins() {
    let bin = Path::new("/usr/lib/cni");
    assert!(
        bin.join("bridge").exists(),
        "the CNI plugins are missing (scripts/test.sh installs containernetworking-plugins)"
    );
    check(Some(bin), "c");
}

#[test]
fn a_cni_configuration_directory() {
    let bin = Path::new("/usr/lib/cni");
    assert!(
        bin.join("tuning").exists(),
        "the CNI plugins are missing (scripts/test.sh installs containernetworking-plugins)"
    );
    // The first configuration by name is used: 10-pods.conflist, a bridge
    // of its own then `tuning` (which needs the bridge's result passed on)
    // setting a sysctl in the pod; 99-other.conf is never read.
    let dir = tempfile::tempdir().unwrap();
    let ipam_dir = dir.path().join("ipam");
    std::fs::write(
        dir.path().join("10-pods.conflist"),
        serde_json::json!({
            "cniVersion": "1.0.0", "name": "pods",
            "plugins": [
                {"type": "bridge", "bridge": "wkconf0", "isGateway": true, "hairpinMode": true,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.251.7.0/24"}]],
                          "routes": [{"dst": "0.0.0.0/0"}], "dataDir": ipam_dir}},
                {"type": "tuning", "sysctl": {"net.core.somaxconn": "1234"}}
            ]
        })
        .to_string(),
    )
    .unwrap();
    std::fs::write(dir.path().join("99-other.conf"), "not read").unwrap();
    check_with(Some(bin), Some(dir.path()), "f", |netns| {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                netns,
                "cat",
                "/proc/sys/net/core/somaxconn",
            ])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "1234",
            "{out:?}"
        );
        let out = Command::new("ip")
            .args(["-o", "link", "show", "wkconf0"])
            .output()
            .unwrap();
        assert!(out.status.success(), "the conflist's bridge: {out:?}");
    });

    // A directory with no configuration is refused, saying where it looked.
    let empty = tempfile::tempdir().unwrap();
    let err = PodNetwork::new(NetConfig {
        pod_cidr: "10.251.7.0/24".into(),
        bridge: "wk0".into(),
        cni_bin: Some(bin.to_owned()),
        cni_conf_dir: Some(empty.path().to_owned()),
        state_dir: empty.path().join("state"),
        prefix: "wkt-e-".into(),
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("no CNI network configuration"), "{err}");
}
