//! Writing a kubeconfig that points kubectl at this server.

use std::path::Path;

/// What a kubeconfig proves the server and the user with: the cluster CA
/// and a client certificate with its key (PEM).
#[derive(Clone, Debug)]
pub struct Credentials {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// The text of a kubeconfig for `server_url`, as `user`.
pub fn text(server_url: &str, user: &str, credentials: Option<&Credentials>) -> String {
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let (ca, auth) = match credentials {
        Some(c) => (
            format!("\n    certificate-authority-data: {}", b64(&c.ca_pem)),
            format!(
                "\n    client-certificate-data: {}\n    client-key-data: {}",
                b64(&c.cert_pem),
                b64(&c.key_pem)
            ),
        ),
        None => (String::new(), " {}".to_owned()),
    };
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: wasmkube
  cluster:
    server: {server_url}{ca}
contexts:
- name: wasmkube
  context:
    cluster: wasmkube
    user: {user}
    namespace: default
current-context: wasmkube
users:
- name: {user}
  user:{auth}
"
    )
}

/// Writes a kubeconfig for `server_url` to `path` (parents created),
/// readable by its owner only: it holds a private key.
pub fn write(
    path: &Path,
    server_url: &str,
    user: &str,
    credentials: Option<&Credentials>,
) -> anyhow::Result<()> {
    wasmkube_pki::write_private(path, &text(server_url, user, credentials))?;
    Ok(())
}

/// A client for `server_url` proving `credentials`.
pub async fn client_with(
    server_url: &str,
    user: &str,
    credentials: Option<&Credentials>,
) -> anyhow::Result<kube::Client> {
    let kc = kube::config::Kubeconfig::from_yaml(&text(server_url, user, credentials))?;
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
    Ok(kube::Client::try_from(config)?)
}

/// A client from `path` (or `$KUBECONFIG`, then `~/.kube/config`), with
/// the server URL replaced by `servers` when given; with several, a client
/// that fails over between them.
pub async fn client(path: Option<&Path>, servers: &[String]) -> anyhow::Result<kube::Client> {
    use anyhow::Context;
    let urls = servers
        .iter()
        .map(|s| {
            s.parse::<http::Uri>()
                .with_context(|| format!("invalid --server URL {s:?}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut config = match path {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?
        }
        None => match urls.first() {
            Some(url) => kube::Config::new(url.clone()),
            None => kube::Config::infer()
                .await
                .context("no kubeconfig: pass --kubeconfig or set KUBECONFIG")?,
        },
    };
    if let Some(url) = urls.first() {
        config.cluster_url = url.clone();
    }
    if urls.len() > 1 {
        return crate::failover::client(config, &urls);
    }
    Ok(kube::Client::try_from(config)?)
}
