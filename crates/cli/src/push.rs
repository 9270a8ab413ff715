//! `wasmkube push`: publish a Wasm module or component to an OCI registry.

use std::path::PathBuf;

use anyhow::Context;

#[derive(clap::Args, Debug)]
pub struct PushArgs {
    /// The .wasm file (a core module or a component).
    file: PathBuf,
    /// Where to push it: REGISTRY/REPOSITORY:TAG.
    reference: String,
    /// Speak plain HTTP to this registry even though it is not on loopback
    /// (loopback registries always are).
    #[arg(long)]
    insecure: bool,
    /// Registry user name (with --password, or WASMKUBE_REGISTRY_PASSWORD).
    #[arg(long, env = "WASMKUBE_REGISTRY_USER")]
    username: Option<String>,
    #[arg(long, env = "WASMKUBE_REGISTRY_PASSWORD", hide_env_values = true)]
    password: Option<String>,
}

pub async fn run(args: PushArgs) -> anyhow::Result<()> {
    let bytes = std::fs::read(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let registry = args
        .reference
        .split('/')
        .next()
        .unwrap_or_default()
        .to_owned();
    let options = wasmkube_oci::PushOptions {
        insecure: if args.insecure {
            vec![registry]
        } else {
            Vec::new()
        },
        credentials: args.username.map(|username| wasmkube_oci::Credentials {
            username,
            password: args.password.unwrap_or_default(),
        }),
    };
    let kind = if wasmkube_oci::is_component(&bytes) {
        "component"
    } else {
        "module"
    };
    eprintln!(
        "pushing {} ({kind}, {} bytes) to {}",
        args.file.display(),
        bytes.len(),
        args.reference
    );
    let digest = wasmkube_oci::push_wasm(bytes, &args.reference, &options).await?;
    println!("{digest}");
    Ok(())
}
