//! The built-in registry with clients nobody here wrote: `skopeo` copying a
//! multi-layer Linux image and a two-platform index in and out, the `oras`
//! Python client pushing and pulling artifacts (monolithic and chunked, and
//! a referrer), and `oci-client` through the node's own pull path. Each runs
//! against Debian's `docker-registry` in the same test as the reference.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use wasmkube_registry::{Algorithm, GcPolicy, Registry};
use wasmkube_testkit::tar_gz;

/// A registry on loopback: the built-in one (served by this test) or the
/// reference.
struct Host {
    host: String,
    task: Option<tokio::task::JoinHandle<()>>,
    _dir: Option<tempfile::TempDir>,
    _reference: Option<wasmkube_testkit::Registry>,
}

impl Drop for Host {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

async fn registries() -> [(&'static str, Host); 2] {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::open(dir.path()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let host = listener.local_addr().unwrap().to_string();
    let task = tokio::spawn(async move {
        let _ = registry
            .serve(listener, Duration::from_secs(3600), GcPolicy::default())
            .await;
    });
    let reference = wasmkube_testkit::Registry::start();
    [
        (
            "built-in",
            Host {
                host,
                task: Some(task),
                _dir: Some(dir),
                _reference: None,
            },
        ),
        (
            "docker-registry",
            Host {
                host: reference.host(),
                task: None,
                _dir: None,
                _reference: Some(reference),
            },
        ),
    ]
}

fn digest(bytes: &[u8]) -> String {
    Algorithm::Sha256.digest(bytes).to_string()
}

/// Writes `bytes` as a blob of the OCI layout in `dir`; returns its
/// descriptor.
fn blob(dir: &Path, media_type: &str, bytes: &[u8]) -> Value {
    let d = digest(bytes);
    let path = dir.join("blobs/sha256").join(&d["sha256:".len()..]);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
    json!({"mediaType": media_type, "digest": d, "size": bytes.len()})
}

/// An OCI image layout holding an index (tag `v1`) over two platforms'
/// images: amd64 with the busybox layer and two more, arm64 with two.
/// Returns the index's digest.
fn image_layout(dir: &Path) -> String {
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let (busybox, _) = wasmkube_testkit::busybox_image(None);
    let extra = tar_gz(&[("etc/motd", b"layer two\n")], 0o644);
    let third = tar_gz(&[("srv/data.bin", &vec![7u8; 300_000])], 0o644);
    let mut manifests = Vec::new();
    for (arch, layers) in [
        ("amd64", vec![busybox.as_slice(), &extra, &third]),
        (
            "arm64",
            vec![extra.as_slice(), &tar_gz(&[("arm", b"64")], 0o644)],
        ),
    ] {
        let config = serde_json::to_vec(&json!({
            "architecture": arch, "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": []}, "config": {}
        }))
        .unwrap();
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": blob(dir, "application/vnd.oci.image.config.v1+json", &config),
            "layers": layers.iter().map(|l| blob(dir, "application/vnd.oci.image.layer.v1.tar+gzip", l)).collect::<Vec<_>>(),
        }))
        .unwrap();
        let mut d = blob(dir, "application/vnd.oci.image.manifest.v1+json", &manifest);
        d["platform"] = json!({"architecture": arch, "os": "linux"});
        manifests.push(d);
    }
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": manifests,
    }))
    .unwrap();
    let mut top = blob(dir, "application/vnd.oci.image.index.v1+json", &index);
    top["annotations"] = json!({"org.opencontainers.image.ref.name": "v1"});
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": [top]})).unwrap(),
    )
    .unwrap();
    digest(&index)
}

fn skopeo(args: &[&str]) -> String {
    let out = Command::new("skopeo")
        .arg("--insecure-policy")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run skopeo ({e}); scripts/test.sh installs it"));
    assert!(
        out.status.success(),
        "skopeo {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn blobs(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut all: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir.join("blobs/sha256"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    all.sort();
    all
}

#[tokio::test(flavor = "multi_thread")]
async fn skopeo_copies_a_multi_layer_image_and_an_index_in_and_out() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let index_digest = image_layout(&src);
    for (who, registry) in registries().await {
        let remote = format!("docker://{}/linux/busybox:v1", registry.host);
        let dst = work.path().join(format!("dst-{who}"));
        let (src_ref, dst_ref) = (
            format!("oci:{}:v1", src.display()),
            format!("oci:{}:v1", dst.display()),
        );
        let index_digest = index_digest.clone();
        tokio::task::spawn_blocking(move || {
            skopeo(&[
                "copy",
                "--all",
                "--dest-tls-verify=false",
                &src_ref,
                &remote,
            ]);
            // The index is stored as it was pushed, byte for byte.
            let raw = skopeo(&["inspect", "--raw", "--tls-verify=false", &remote]);
            assert_eq!(digest(raw.as_bytes()), index_digest, "{who}");
            // One platform's image, read back through the registry.
            let config = skopeo(&[
                "inspect",
                "--config",
                "--tls-verify=false",
                "--override-arch=arm64",
                &remote,
            ]);
            let config: Value = serde_json::from_str(&config).unwrap();
            assert_eq!(config["architecture"], "arm64", "{who}");
            skopeo(&["copy", "--all", "--src-tls-verify=false", &remote, &dst_ref]);
        })
        .await
        .unwrap();
        // Every blob came back identical (index, manifests, configs, layers).
        assert_eq!(blobs(&src), blobs(&dst), "{who}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn oras_pushes_and_pulls_artifacts() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/oras_roundtrip.py");
    for (who, registry) in registries().await {
        for chunked in [false, true] {
            let work = tempfile::tempdir().unwrap();
            let mut command = Command::new(wasmkube_testkit::python());
            command.arg(&script).arg(&registry.host).arg(work.path());
            if chunked {
                command.arg("--chunked");
            }
            // distribution 2.8 has no referrers API.
            if who == "built-in" {
                command.arg("--referrers");
            }
            let out = tokio::task::spawn_blocking(move || command.output().unwrap())
                .await
                .unwrap();
            assert!(
                out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ok",
                "{who} chunked={chunked}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn oci_client_pushes_wasm_and_the_node_pulls_it() {
    let module = wasmkube_testkit::workload("hello");
    for (who, registry) in registries().await {
        let reference = format!("{}/hello:v1", registry.host);
        let pushed = wasmkube_oci::push_wasm(
            module.clone(),
            &reference,
            &wasmkube_oci::PushOptions::default(),
        )
        .await
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = wasmkube_oci::ImageStore::open(dir.path(), vec![]).unwrap();
        let (image, pulled) = store
            .ensure(&reference, wasmkube_oci::PullPolicy::Always, None, &|_| {})
            .await
            .unwrap();
        assert!(pulled, "{who}");
        assert!(
            image.id.ends_with(&pushed),
            "{who}: {} vs {pushed}",
            image.id
        );
        let wasmkube_runtime::ImageKind::Wasm { module: path, .. } = &image.kind else {
            panic!("{who}: not Wasm: {:?}", image.kind);
        };
        assert_eq!(std::fs::read(path).unwrap(), module, "{who}");
    }
}
