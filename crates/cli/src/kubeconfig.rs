//! Writing a kubeconfig that points kubectl at this server.

use std::path::Path;

/// Writes a kubeconfig for `server_url` to `path` (parents created).
pub fn write(path: &Path, server_url: &str) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let text = format!(
        "apiVersion: v1
kind: Config
clusters:
- name: wasmkube
  cluster:
    server: {server_url}
contexts:
- name: wasmkube
  context:
    cluster: wasmkube
    user: wasmkube
    namespace: default
current-context: wasmkube
users:
- name: wasmkube
  user: {{}}
"
    );
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
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
