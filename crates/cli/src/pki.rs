//! The server's certificates: the cluster CA kept in `DATA_DIR/tls`, a
//! serving certificate made at each start for the addresses and names the
//! server answers to, and client certificates for the administrator's
//! kubeconfig and the server's own components.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use wasmkube_pki::{Ca, Identity, Issued, ServingNames, TokenSigner};

/// The key that signs service-account tokens, in `DATA_DIR/tls`.
const SERVICE_ACCOUNT_KEY: &str = "service-account.key";

use crate::kubeconfig::Credentials;

/// How long the client certificates the server gives itself and its
/// administrator are valid (kubeadm: one year). Each start makes new ones.
const CLIENT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

/// The CA and this server's serving certificate.
pub struct ServerPki {
    pub ca: Arc<Ca>,
    /// Signs service-account tokens.
    pub service_accounts: Arc<TokenSigner>,
    serving: Issued,
}

/// Adds `--tls-san` values: addresses as IP SANs, anything else as a name.
fn add_sans(names: &mut ServingNames, sans: &[String]) {
    for san in sans {
        match san.parse::<IpAddr>() {
            Ok(ip) => names.ips.push(ip),
            Err(_) => names.dns.push(san.clone()),
        }
    }
}

/// The host:port clients are told to use: the listen address, or the node
/// address when listening on every address.
pub fn url_host(addr: SocketAddr, node_address: IpAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        SocketAddr::new(node_address, addr.port())
    } else {
        addr
    }
}

/// Where the CA and certificates live under a data directory.
pub fn tls_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("tls")
}

/// Makes this server's CA the cluster's: the one the store keeps for
/// `secret` (written into `DATA_DIR/tls`), or, when it keeps none yet, this
/// server's own, which it then keeps for the others.
pub async fn share_ca(
    store: &wasmkube_store::SharedStore,
    data_dir: &Path,
    secret: &str,
) -> anyhow::Result<()> {
    let dir = tls_dir(data_dir);
    let local = Ca::load_or_create(&dir, "wasmkube-ca")?;
    let signer = TokenSigner::load_or_create(&dir.join(SERVICE_ACCOUNT_KEY))?;
    let payload = serde_json::to_vec(&serde_json::json!({
        "caCert": local.cert_pem(), "caKey": local.key_pem(),
        "serviceAccountKey": signer.key_pem(),
    }))?;
    let shared = wasmkube_apiserver::identity::shared_identity(store, secret, &payload).await?;
    if shared == payload {
        return Ok(());
    }
    let shared: serde_json::Value = serde_json::from_slice(&shared)
        .context("the cluster identity in the store is not readable")?;
    let (cert, key) = (
        shared["caCert"].as_str().unwrap_or_default(),
        shared["caKey"].as_str().unwrap_or_default(),
    );
    // Checked before anything is replaced.
    let ca = Ca::from_pem(cert, key).context("the cluster CA in the store is not usable")?;
    if ca.hash() != local.hash() {
        tracing::info!(ca = %ca.hash(), "serving with the cluster's CA from the store");
        wasmkube_pki::write_private(&dir.join("ca.key"), key)?;
        wasmkube_pki::write_private(&dir.join("ca.crt"), cert)?;
    }
    if let Some(sa_key) = shared["serviceAccountKey"].as_str()
        && sa_key != signer.key_pem()
    {
        TokenSigner::from_pem(sa_key)
            .context("the service-account key in the store is not usable")?;
        wasmkube_pki::write_private(&dir.join(SERVICE_ACCOUNT_KEY), sa_key)?;
    }
    Ok(())
}

impl ServerPki {
    /// Loads (or makes) the CA and issues a serving certificate for
    /// localhost, this host's name, `listen` (or every address, when it is
    /// unspecified: then the node address), the `kubernetes` Service's
    /// names and `service_ip`, and `sans`.
    pub fn load(
        data_dir: &Path,
        listen: SocketAddr,
        node_address: IpAddr,
        service_ip: Option<IpAddr>,
        sans: &[String],
    ) -> anyhow::Result<Self> {
        let dir = tls_dir(data_dir);
        let ca = Ca::load_or_create(&dir, "wasmkube-ca").with_context(|| {
            format!("cannot load or create the cluster CA in {}", dir.display())
        })?;
        let mut names = ServingNames {
            dns: vec![
                "localhost".into(),
                "kubernetes".into(),
                "kubernetes.default".into(),
                "kubernetes.default.svc".into(),
                "kubernetes.default.svc.cluster.local".into(),
            ],
            ips: vec![
                IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
                IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
                node_address,
            ],
        };
        names.dns.push(crate::agent::host_name());
        if !listen.ip().is_unspecified() {
            names.ips.push(listen.ip());
        }
        names.ips.extend(service_ip);
        add_sans(&mut names, sans);
        names.ips.sort();
        names.ips.dedup();
        names.dns.sort();
        names.dns.dedup();
        let serving = ca.issue_serving("kube-apiserver", &names)?;
        wasmkube_pki::write_private(&dir.join("serving.crt"), &serving.cert_pem)?;
        wasmkube_pki::write_private(&dir.join("serving.key"), &serving.key_pem)?;
        let service_accounts = TokenSigner::load_or_create(&dir.join(SERVICE_ACCOUNT_KEY))?;
        Ok(Self {
            ca: Arc::new(ca),
            service_accounts: Arc::new(service_accounts),
            serving,
        })
    }

    /// A client certificate for `who`, with the CA, for a kubeconfig.
    pub fn credentials(&self, who: &Identity) -> anyhow::Result<Credentials> {
        let issued = self.ca.issue_client(who, CLIENT_VALIDITY)?;
        Ok(Credentials {
            ca_pem: self.ca.cert_pem().to_owned(),
            cert_pem: issued.cert_pem,
            key_pem: issued.key_pem,
        })
    }

    /// The TLS configuration of the built-in registry listening at `ip` off
    /// loopback: a certificate from the CA for that address, this host's
    /// name and `sans` (clients trust the cluster CA: nodes have it, and
    /// `wasmkube push` takes it from the kubeconfig).
    pub fn registry_tls(
        &self,
        ip: IpAddr,
        sans: &[String],
    ) -> anyhow::Result<Arc<rustls::ServerConfig>> {
        let mut names = ServingNames {
            dns: vec![crate::agent::host_name()],
            ips: vec![ip],
        };
        add_sans(&mut names, sans);
        let serving = self.ca.issue_serving("wasmkube-registry", &names)?;
        Ok(self.ca.server_tls(&serving)?)
    }

    /// The TLS configuration the API server serves with.
    pub fn server_tls(&self) -> anyhow::Result<Arc<rustls::ServerConfig>> {
        Ok(self.ca.server_tls(&self.serving)?)
    }
}
