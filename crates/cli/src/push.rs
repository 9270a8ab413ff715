//! `wasmkube push`: publish a Wasm module or component to an OCI registry.

use std::path::PathBuf;

use anyhow::Context;

#[derive(clap::Args, Debug)]
pub struct PushArgs {
    /// The .wasm file (a core module or a component).
    file: PathBuf,
    /// Where to push it: REGISTRY/REPOSITORY:TAG, or REPOSITORY:TAG for the
    /// default registry (--registry).
    reference: String,
    /// The registry of references that name none (a first path component
    /// without `.` or `:` and other than `localhost` is a repository, as
    /// Docker reads references): `wasmkube server`'s built-in registry.
    #[arg(long, env = "WASMKUBE_REGISTRY", default_value = "127.0.0.1:5000")]
    registry: String,
    /// Speak plain HTTP to this registry even though it is not on loopback
    /// (loopback registries always are).
    #[arg(long)]
    insecure: bool,
    /// Registry user name (with --password, or WASMKUBE_REGISTRY_PASSWORD).
    /// Without one, pushing to the cluster's built-in registry logs in with
    /// a token the API server gives for the kubeconfig's user (KUBECONFIG,
    /// else ~/.kube/config).
    #[arg(long, env = "WASMKUBE_REGISTRY_USER")]
    username: Option<String>,
    /// Registry password (for a cluster's built-in registry: a cluster
    /// token, e.g. from `wasmkube registry-token` or `kubectl create token`).
    #[arg(long, env = "WASMKUBE_REGISTRY_PASSWORD", hide_env_values = true)]
    password: Option<String>,
}

pub async fn run(args: PushArgs) -> anyhow::Result<()> {
    let bytes = std::fs::read(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let reference = qualify(&args.reference, &args.registry);
    let registry = reference.split('/').next().unwrap_or_default().to_owned();
    let mut options = wasmkube_oci::PushOptions {
        insecure: if args.insecure {
            vec![registry.clone()]
        } else {
            Vec::new()
        },
        credentials: None,
        roots: Vec::new(),
    };
    // The cluster's own registry: its token (unless a login is given) and
    // its CA, which signs the registry's certificate off loopback.
    let cluster = cluster_registry(&registry).await;
    options.credentials = match args.username {
        Some(username) => Some(wasmkube_oci::Credentials {
            username,
            password: args.password.unwrap_or_default(),
        }),
        None => cluster.as_ref().map(|c| wasmkube_oci::Credentials {
            username: "wasmkube".into(),
            password: c.token.clone(),
        }),
    };
    options.roots = cluster.map(|c| c.roots).unwrap_or_default();
    let kind = if wasmkube_oci::is_component(&bytes) {
        "component"
    } else {
        "module"
    };
    eprintln!(
        "pushing {} ({kind}, {} bytes) to {reference}",
        args.file.display(),
        bytes.len(),
    );
    let logged_in = options.credentials.is_some();
    let digest = match wasmkube_oci::push_wasm(bytes, &reference, &options).await {
        Ok(digest) => digest,
        Err(e) if !logged_in && asks_for_login(&e.to_string()) => {
            return Err(anyhow::Error::new(e).context(format!(
                "the registry {registry} asks for a login: for a cluster's built-in registry set KUBECONFIG to the cluster's kubeconfig (wasmkube push then logs in with a token from the API server); for another, pass --username and --password"
            )));
        }
        Err(e) => return Err(e.into()),
    };
    eprintln!("pushed {reference}; run it with e.g. kubectl create job NAME --image={reference}");
    println!("{digest}");
    Ok(())
}

/// Whether a registry's refusal asks the client to log in.
fn asks_for_login(error: &str) -> bool {
    error.contains("Not authorized")
        || error.contains("code: 401")
        || error.contains("UNAUTHORIZED")
}

/// `reference` with `registry` in front when it names no registry host.
/// What the kubeconfig's cluster says of its built-in registry.
struct ClusterRegistry {
    /// A token naming the kubeconfig's user.
    token: String,
    /// `HOST:PORT`.
    address: String,
    /// The cluster CA (PEM), from the kubeconfig.
    roots: Vec<String>,
}

/// The kubeconfig's cluster's registry, when it is `registry` (its token
/// goes to no other).
async fn cluster_registry(registry: &str) -> Option<ClusterRegistry> {
    match cluster_token().await {
        Ok(c) if c.address == registry => Some(c),
        Ok(_) => None,
        Err(e) => {
            tracing::debug!(error = %e, "no registry token from the cluster");
            None
        }
    }
}

/// A token for the built-in registry of the kubeconfig's cluster, naming
/// the kubeconfig's user, with the registry's address and the cluster CA.
async fn cluster_token() -> anyhow::Result<ClusterRegistry> {
    let config = kube::Config::infer()
        .await
        .context("no kubeconfig (set KUBECONFIG)")?;
    let roots = config
        .root_cert
        .iter()
        .flatten()
        .map(|der| pem_certificate(der))
        .collect();
    let client = kube::Client::try_from(config)?;
    let request = http::Request::get(wasmkube_api::images::TOKEN_PATH).body(Vec::new())?;
    let answer: serde_json::Value = client.request(request).await.map_err(|e| match e {
        kube::Error::Api(e) if e.code == 404 => anyhow::anyhow!(
            "the cluster gives no registry tokens (its registry is off, or it has no authentication)"
        ),
        e => anyhow::anyhow!("asking the API server for a registry token: {e}"),
    })?;
    let token = answer["token"].as_str().context("no token in the answer")?;
    Ok(ClusterRegistry {
        token: token.to_owned(),
        address: answer["registry"].as_str().unwrap_or_default().to_owned(),
        roots,
    })
}

/// A DER certificate as PEM.
fn pem_certificate(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).expect("base64 is ASCII"))
        .collect();
    format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        lines.join("\n")
    )
}

#[derive(clap::Args, Debug)]
pub struct TokenArgs {}

/// `wasmkube registry-token`: prints the token, and says on stderr where
/// it is for.
pub async fn token(_args: TokenArgs) -> anyhow::Result<()> {
    let cluster = cluster_token().await?;
    eprintln!(
        "a token for the registry at {} (valid for an hour; any user name)",
        cluster.address
    );
    println!("{}", cluster.token);
    Ok(())
}

fn qualify(reference: &str, registry: &str) -> String {
    let names_host = reference.split_once('/').is_some_and(|(first, _)| {
        first.contains('.') || first.contains(':') || first == "localhost"
    });
    if names_host {
        reference.to_owned()
    } else {
        format!("{}/{reference}", registry.trim_end_matches('/'))
    }
}

#[cfg(test)]
mod tests {
    use super::qualify;

    #[test]
    fn references_without_a_registry_go_to_the_default_one() {
        let r = "127.0.0.1:5000";
        assert_eq!(qualify("hello:v1", r), "127.0.0.1:5000/hello:v1");
        assert_eq!(qualify("team/hello:v1", r), "127.0.0.1:5000/team/hello:v1");
        for named in [
            "127.0.0.1:5000/hello:v1",
            "localhost/hello",
            "ghcr.io/team/hello:v1",
            "localhost:5000/a/b:v1",
        ] {
            assert_eq!(qualify(named, r), named);
        }
    }
}
