//! Joining a node with a token, as k3s does: the server keeps a join token
//! `K10<CA-HASH>::node:<SECRET>`; an agent given it fetches the server's CA
//! from `/cacerts` (over TLS it cannot verify yet), accepts it only if its
//! SHA-256 is the token's hash, then asks for its client certificate
//! (`CN=system:node:NAME`, `O=system:nodes`) with a CertificateSigningRequest
//! authenticated by the secret, which the server signs at once. The agent
//! keeps the result as a kubeconfig in its data directory and uses it on
//! later starts; a running agent renews it at 80 % of its lifetime
//! ([`crate::node_cert`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use base64::Engine;

use crate::kubeconfig::{self, Credentials};

/// A parsed join token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JoinToken {
    /// SHA-256 (hex) of the cluster CA certificate.
    pub ca_hash: String,
    pub secret: String,
}

impl JoinToken {
    pub fn parse(token: &str) -> anyhow::Result<Self> {
        let token = token.trim();
        let rest = token.strip_prefix("K10").context(
            "a join token starts with K10 (read it from the server's DATA_DIR/tls/join-token)",
        )?;
        let (hash, credentials) = rest
            .split_once("::")
            .context("a join token is K10<CA-HASH>::node:<SECRET>")?;
        let secret = credentials
            .strip_prefix("node:")
            .context("a join token is K10<CA-HASH>::node:<SECRET>")?;
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) || secret.is_empty() {
            bail!("a join token is K10<CA-HASH>::node:<SECRET> with a SHA-256 hash in hex");
        }
        Ok(Self {
            ca_hash: hash.to_ascii_lowercase(),
            secret: secret.to_owned(),
        })
    }

    pub fn render(&self) -> String {
        format!("K10{}::node:{}", self.ca_hash, self.secret)
    }
}

/// The server's join token, kept in `dir/join-token` (0600) and made on
/// first start for the CA `ca_hash`: its secret is the cluster secret
/// (`--token`) when there is one, else a random one.
pub fn server_token(
    dir: &Path,
    ca_hash: &str,
    cluster_secret: Option<&str>,
) -> anyhow::Result<(JoinToken, PathBuf)> {
    let path = dir.join("join-token");
    if let Ok(text) = std::fs::read_to_string(&path)
        && let Ok(token) = JoinToken::parse(&text)
        && token.ca_hash == ca_hash
        && cluster_secret.is_none_or(|s| s == token.secret)
    {
        return Ok((token, path));
    }
    use rand::Rng;
    let secret: String = match cluster_secret {
        Some(s) => s.to_owned(),
        None => (0..32)
            .map(|_| format!("{:x}", rand::rng().random_range(0..16u8)))
            .collect(),
    };
    let token = JoinToken {
        ca_hash: ca_hash.to_owned(),
        secret,
    };
    wasmkube_pki::write_private(&path, &format!("{}\n", token.render()))?;
    Ok((token, path))
}

/// Accepts any server certificate: only for fetching `/cacerts`, whose
/// answer is then checked against the token's hash.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Fetches `/cacerts` from `server` and returns it if its hash is `hash`.
async fn fetch_ca(server: &http::Uri, hash: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let host = server.host().context("the --server URL names no host")?;
    let port = server.port_u16().unwrap_or(443);
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_no_client_auth();
    let host_name = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let tcp = tokio::net::TcpStream::connect((host_name.as_str(), port))
        .await
        .with_context(|| format!("cannot reach {server}"))?;
    let name = rustls::pki_types::ServerName::try_from(host_name.clone())?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .with_context(|| format!("TLS with {server}"))?;
    tls.write_all(
        format!("GET /cacerts HTTP/1.1\r\nHost: {host_name}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    let mut response = Vec::new();
    // The server closes after the response (Connection: close); a peer that
    // ends TLS without close_notify still gave us the body.
    let _ = tls.read_to_end(&mut response).await;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("the server's /cacerts answer is not HTTP")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!(
            "the server's /cacerts answered {}",
            head.lines().next().unwrap_or_default()
        );
    }
    let got = wasmkube_pki::hash_pem(body).context("the server's /cacerts is not a certificate")?;
    if got != hash {
        bail!(
            "the server's CA (SHA-256 {got}) is not the one the join token names ({hash}): refusing to join"
        );
    }
    Ok(body.to_owned())
}

/// Credentials in a kubeconfig written by [`join`], if not yet due for
/// renewal (80 % of their lifetime, when a running agent renews them).
fn still_good(path: &Path, server: &str) -> Option<()> {
    let kc = kube::config::Kubeconfig::read_from(path).ok()?;
    let cluster = kc.clusters.first()?.cluster.as_ref()?;
    if cluster.server.as_deref() != Some(server) {
        return None;
    }
    let user = kc.auth_infos.first()?.auth_info.as_ref()?;
    let cert = base64::engine::general_purpose::STANDARD
        .decode(user.client_certificate_data.as_ref()?)
        .ok()?;
    let cert = String::from_utf8(cert).ok()?;
    let (from, until) = wasmkube_pki::valid_between(&cert).ok()?;
    let at = |secs: i64| {
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(u64::try_from(secs).unwrap_or(0))
    };
    (std::time::SystemTime::now() < wasmkube_pki::renew_at(at(from), at(until))).then_some(())
}

/// The kubeconfig of node `name` in `data_dir`, joining with `token` at
/// `server` first when there is none (or it is close to expiring).
pub async fn join(
    server: &str,
    token: &JoinToken,
    name: &str,
    data_dir: &Path,
) -> anyhow::Result<PathBuf> {
    let path = data_dir.join("kubeconfig");
    if still_good(&path, server).is_some() {
        return Ok(path);
    }
    let uri: http::Uri = server
        .parse()
        .with_context(|| format!("invalid --server URL {server:?}"))?;
    if uri.scheme() != Some(&http::uri::Scheme::HTTPS) {
        bail!("joining with a token needs an https:// --server (got {server})");
    }
    let ca_pem = fetch_ca(&uri, &token.ca_hash).await?;
    // A client that trusts the CA and proves the join token's secret.
    let kc = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {server}\n    certificate-authority-data: {}\ncontexts:\n- name: c\n  context: {{cluster: c, user: u}}\ncurrent-context: c\nusers:\n- name: u\n  user:\n    token: {}\n",
        base64::engine::general_purpose::STANDARD.encode(&ca_pem),
        token.secret
    );
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::from_yaml(&kc)?,
        &Default::default(),
    )
    .await?;
    let client = crate::api_client::client(config, &[])?;
    let (who, issued) = crate::node_cert::ask(&client, name)
        .await
        .context("the server refused the join (is the token this cluster's?)")?;
    let credentials = Credentials {
        ca_pem,
        cert_pem: issued.cert_pem,
        key_pem: issued.key_pem,
    };
    kubeconfig::write(&path, server, &who, Some(&credentials))?;
    tracing::info!(
        node = name,
        server,
        "joined with the token: node certificate signed"
    );
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse_and_render() {
        let hash = "ab".repeat(32);
        let token = JoinToken::parse(&format!("K10{hash}::node:s3cret\n")).unwrap();
        assert_eq!(token.secret, "s3cret");
        assert_eq!(token.render(), format!("K10{hash}::node:s3cret"));
        for bad in [
            "",
            "K10abc::node:x",
            &format!("K10{hash}::admin:x"),
            &format!("K10{hash}::node:"),
        ] {
            assert!(JoinToken::parse(bad).is_err(), "{bad}");
        }
    }
}
