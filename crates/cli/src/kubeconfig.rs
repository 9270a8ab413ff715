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
    crate::api_client::client(config, &[])
}

/// The servers of one cluster a kubeconfig names: the current context's
/// cluster first, then every other cluster entry with the same CA (the
/// same cluster reached at another API server), in file order.
fn cluster_servers(kc: &kube::config::Kubeconfig) -> Vec<String> {
    let current = kc
        .current_context
        .as_ref()
        .and_then(|name| kc.contexts.iter().find(|c| &c.name == name))
        .and_then(|c| c.context.as_ref())
        .and_then(|c| kc.clusters.iter().find(|n| n.name == c.cluster))
        .and_then(|n| n.cluster.as_ref());
    let Some(current) = current else {
        return Vec::new();
    };
    let ca = |c: &kube::config::Cluster| {
        (
            c.certificate_authority_data.clone(),
            c.certificate_authority.clone(),
        )
    };
    let mut servers: Vec<String> = current.server.iter().cloned().collect();
    for other in kc.clusters.iter().filter_map(|n| n.cluster.as_ref()) {
        if let Some(server) = &other.server
            && ca(other) == ca(current)
            && !servers.contains(server)
        {
            servers.push(server.clone());
        }
    }
    servers
}

/// A client from `path` (or `$KUBECONFIG`, then `~/.kube/config`), with
/// the server URL replaced by `servers` when given; with several (given,
/// or the kubeconfig's entries of its cluster), a client that fails over
/// between them.
pub async fn client(path: Option<&Path>, servers: &[String]) -> anyhow::Result<kube::Client> {
    use anyhow::Context;
    let from_file = match (path, servers.is_empty()) {
        (Some(path), true) => kube::config::Kubeconfig::read_from(path)
            .map(|kc| cluster_servers(&kc))
            .unwrap_or_default(),
        _ => Vec::new(),
    };
    let servers = if servers.is_empty() {
        &from_file[..]
    } else {
        servers
    };
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
    crate::api_client::client(config, &urls)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kubeconfig_names_every_server_of_its_cluster() {
        let kc = kube::config::Kubeconfig::from_yaml(
            "apiVersion: v1
kind: Config
clusters:
- name: other
  cluster: {server: 'https://10.0.0.9:6443', certificate-authority-data: T1RIRVI=}
- name: a
  cluster: {server: 'https://10.0.0.1:6443', certificate-authority-data: Q0E=}
- name: b
  cluster: {server: 'https://10.0.0.2:6443', certificate-authority-data: Q0E=}
contexts:
- name: c
  context: {cluster: b, user: u}
current-context: c
users:
- name: u
  user: {}
",
        )
        .unwrap();
        assert_eq!(
            cluster_servers(&kc),
            ["https://10.0.0.2:6443", "https://10.0.0.1:6443"]
        );
    }
}
