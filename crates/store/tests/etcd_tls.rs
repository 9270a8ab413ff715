//! The etcd store over TLS, as `wasmkube server --etcd-servers https://...
//! --etcd-cafile --etcd-certfile --etcd-keyfile` reaches it: a real member
//! serving clients over HTTPS and demanding a client certificate
//! (certificates made by the project's own CA code), written to and read
//! back through the store; without a client certificate, or trusting
//! another CA, the connection is refused.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use wasmkube_pki::{Ca, Identity, ServingNames};
use wasmkube_store::{EtcdConfig, EtcdTls, connect_etcd};
use wasmkube_testkit::etcd::{EtcdCluster, ServerTls};

fn write(dir: &Path, name: &str, pem: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, pem).unwrap();
    path
}

#[tokio::test]
async fn the_etcd_store_speaks_tls_with_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = Ca::create("etcd-ca").unwrap();
    let names = ServingNames {
        dns: vec!["localhost".into()],
        ips: vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
    };
    let serving = ca.issue_serving("etcd", &names).unwrap();
    let client = ca
        .issue_client(
            &Identity::new("wasmkube-apiserver", &[]),
            Duration::from_secs(3600),
        )
        .unwrap();
    let ca_file = write(d, "ca.pem", ca.cert_pem());
    let etcd = EtcdCluster::start_tls(
        1,
        ServerTls {
            cert_file: write(d, "server.pem", &serving.cert_pem),
            key_file: write(d, "server-key.pem", &serving.key_pem),
            client_ca_file: ca_file.clone(),
        },
    );
    let endpoints = etcd.endpoints();
    assert!(endpoints[0].starts_with("https://"), "{endpoints:?}");
    let config = |tls: EtcdTls| EtcdConfig {
        endpoints: endpoints.clone(),
        prefix: "/tls".into(),
        tls: Some(tls),
    };

    let store = connect_etcd(&config(EtcdTls {
        ca_file: ca_file.clone(),
        cert_file: Some(write(d, "client.pem", &client.cert_pem)),
        key_file: Some(write(d, "client-key.pem", &client.key_pem)),
    }))
    .await
    .expect("connects with the CA and a client certificate");
    let created = store
        .create(
            "/registry/core/configmaps/default/a",
            Bytes::from("over tls"),
        )
        .await
        .unwrap();
    let read = store
        .get("/registry/core/configmaps/default/a")
        .await
        .unwrap()
        .expect("the value is there");
    assert_eq!(read.value, Bytes::from("over tls"));
    assert_eq!(read.mod_revision, created.mod_revision);

    // Refused: no client certificate, or a server certificate from another CA.
    let other = Ca::create("another-ca").unwrap();
    let anonymous = config(EtcdTls {
        ca_file: ca_file.clone(),
        cert_file: None,
        key_file: None,
    });
    let mistrusting = config(EtcdTls {
        ca_file: write(d, "other-ca.pem", other.cert_pem()),
        cert_file: Some(d.join("client.pem")),
        key_file: Some(d.join("client-key.pem")),
    });
    let (anonymous, mistrusting) =
        tokio::join!(connect_etcd(&anonymous), connect_etcd(&mistrusting));
    assert!(anonymous.is_err(), "a client without a certificate got in");
    assert!(
        mistrusting.is_err(),
        "a server certificate of another CA was trusted"
    );
}
