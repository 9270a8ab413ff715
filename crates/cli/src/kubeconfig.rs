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
