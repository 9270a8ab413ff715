//! Pulls and pushes against a real registry (Debian's docker-registry on
//! loopback): Wasm artifacts, a plain image whose one layer holds a `.wasm`,
//! a Linux image, pull policies, the registry's reasons and logins.

use oci_client::client::{Config, ImageLayer};
use oci_client::secrets::RegistryAuth;
use wasmkube_oci::{Credentials, Error, ImageStore, PullPolicy, PushOptions, push_wasm};
use wasmkube_runtime::ImageKind;
use wasmkube_testkit::{Registry, workload};

fn no_progress(_: wasmkube_oci::Progress) {}

async fn push_image(registry: &Registry, repo: &str, layer: Vec<u8>) {
    let client = oci_client::Client::new(oci_client::client::ClientConfig {
        protocol: oci_client::client::ClientProtocol::Http,
        ..Default::default()
    });
    let reference = format!("{}/{repo}", registry.host()).parse().unwrap();
    let config = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]},"config":{}}"#;
    client
        .push(
            &reference,
            &[ImageLayer::oci_v1_gzip(layer, None)],
            Config::oci_v1(config.to_vec(), None),
            &RegistryAuth::Anonymous,
            None,
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn pushes_and_pulls_wasm_artifacts_with_pull_policies() {
    let registry = Registry::start();
    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(dir.path(), vec![]).unwrap();
    let reference = format!("{}/hello:v1", registry.host());
    let digest = push_wasm(workload("hello"), &reference, &PushOptions::default())
        .await
        .unwrap();
    assert!(digest.starts_with("sha256:"), "{digest}");

    let (image, pulled) = store
        .ensure(&reference, PullPolicy::IfNotPresent, None, &no_progress)
        .await
        .unwrap();
    assert!(pulled);
    assert_eq!(image.id, format!("{}/hello@{digest}", registry.host()));
    let ImageKind::Wasm { module, component } = &image.kind else {
        panic!("{image:?}")
    };
    assert!(!component);
    assert_eq!(std::fs::read(module).unwrap(), workload("hello"));

    // Present: IfNotPresent and Never use it; Always only asks for the digest.
    for policy in [
        PullPolicy::IfNotPresent,
        PullPolicy::Never,
        PullPolicy::Always,
    ] {
        let (again, pulled) = store
            .ensure(&reference, policy, None, &no_progress)
            .await
            .unwrap();
        assert!(!pulled, "{policy:?}");
        assert_eq!(again, image);
    }
    // A new push under the same tag is pulled again by Always.
    let digest2 = push_wasm(workload("crasher"), &reference, &PushOptions::default())
        .await
        .unwrap();
    let (newer, pulled) = store
        .ensure(&reference, PullPolicy::Always, None, &no_progress)
        .await
        .unwrap();
    assert!(pulled);
    assert!(newer.id.ends_with(&digest2));

    // By digest too, and the index survives reopening.
    let by_digest = format!("{}/hello@{digest}", registry.host());
    let (img, _) = store
        .ensure(&by_digest, PullPolicy::IfNotPresent, None, &no_progress)
        .await
        .unwrap();
    assert!(img.is_wasm());
    let reopened = ImageStore::open(dir.path(), vec![]).unwrap();
    let names: Vec<String> = reopened
        .images()
        .into_iter()
        .flat_map(|i| i.names)
        .collect();
    assert!(names.contains(&reference), "{names:?}");
    assert!(
        reopened
            .ensure(&by_digest, PullPolicy::Never, None, &no_progress)
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn missing_images_carry_the_registry_reason() {
    let registry = Registry::start();
    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(dir.path(), vec![]).unwrap();
    let reference = format!("{}/nothing:v1", registry.host());
    let err = store
        .ensure(&reference, PullPolicy::IfNotPresent, None, &no_progress)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Pull { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("nothing:v1"), "{message}");
    assert!(message.to_lowercase().contains("unknown"), "{message}");

    let err = store
        .ensure(&reference, PullPolicy::Never, None, &no_progress)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NeverPull(_)), "{err:?}");
}

#[tokio::test]
async fn plain_images_are_wasm_only_when_their_one_layer_is_one_wasm_file() {
    let registry = Registry::start();
    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(dir.path(), vec![]).unwrap();
    let hello = workload("hello");
    push_image(
        &registry,
        "plain-wasm:v1",
        wasmkube_testkit::tar_gz(&[("app/hello.wasm", &hello)], 0o755),
    )
    .await;
    push_image(
        &registry,
        "linux:v1",
        wasmkube_testkit::tar_gz(
            &[("bin/sh", b"\x7fELF...".as_slice()), ("etc/hostname", b"x")],
            0o755,
        ),
    )
    .await;

    let (img, _) = store
        .ensure(
            &format!("{}/plain-wasm:v1", registry.host()),
            PullPolicy::IfNotPresent,
            None,
            &no_progress,
        )
        .await
        .unwrap();
    let ImageKind::Wasm { module, .. } = &img.kind else {
        panic!("{img:?}")
    };
    assert_eq!(std::fs::read(module).unwrap(), hello);

    let (img, _) = store
        .ensure(
            &format!("{}/linux:v1", registry.host()),
            PullPolicy::IfNotPresent,
            None,
            &no_progress,
        )
        .await
        .unwrap();
    let ImageKind::Linux { layers, config } = &img.kind else {
        panic!("{img:?}")
    };
    assert_eq!(layers.len(), 1);
    assert!(layers[0].exists() && config.exists());
}

#[tokio::test]
async fn private_registries_need_the_pull_secret() {
    let registry = Registry::with_login("alice", "s3cret");
    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(dir.path(), vec![]).unwrap();
    let reference = format!("{}/private:v1", registry.host());
    let alice = Credentials {
        username: "alice".into(),
        password: "s3cret".into(),
    };
    let options = PushOptions {
        credentials: Some(alice.clone()),
        ..Default::default()
    };
    push_wasm(workload("hello"), &reference, &options)
        .await
        .unwrap();

    let err = store
        .ensure(&reference, PullPolicy::Always, None, &no_progress)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("private:v1"), "{err}");
    let (img, _) = store
        .ensure(&reference, PullPolicy::Always, Some(alice), &no_progress)
        .await
        .unwrap();
    assert!(img.is_wasm());
}
