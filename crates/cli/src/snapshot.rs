//! `wasmkube snapshot save|restore` and `wasmkube migrate`: backing up the
//! embedded store while the server runs, restoring it into a new data
//! directory, and moving a cluster from the embedded store to etcd.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use wasmkube_store::snapshot::{DEFAULT_BUMP, Snapshot};

#[derive(clap::Args, Debug)]
pub struct SnapshotArgs {
    #[command(subcommand)]
    command: SnapshotCommand,
}

#[derive(clap::Subcommand, Debug)]
enum SnapshotCommand {
    /// Save a consistent snapshot of a running server's store (every object
    /// as of one revision) to FILE. For a cluster on etcd, use `etcdctl
    /// snapshot save` instead: it also keeps etcd's own history.
    Save {
        file: PathBuf,
        /// The API server's URL [default: the kubeconfig's].
        #[arg(long)]
        server: Option<String>,
        /// The kubeconfig to use [default: $KUBECONFIG, then ~/.kube/config].
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
    },
    /// Restore FILE into a new data directory, for `wasmkube server
    /// --data-dir DIR`. Objects keep their content; their resourceVersions
    /// move past every one the old store handed out, and clients relist.
    Restore {
        file: PathBuf,
        /// The data directory to create (must hold no store yet).
        #[arg(long)]
        data_dir: PathBuf,
        /// How far past the snapshot's revision the restored store starts,
        /// so resourceVersions that clients saw after the snapshot are not
        /// handed out again (as `etcdutl snapshot restore --bump-revision`).
        #[arg(long, default_value_t = DEFAULT_BUMP)]
        bump_revision: u64,
    },
}

#[derive(clap::Args, Debug)]
pub struct MigrateArgs {
    /// The data directory of the cluster to move (its server stopped).
    #[arg(long, env = "WASMKUBE_DATA_DIR", default_value_os_t = crate::server::default_data_dir())]
    data_dir: PathBuf,
    /// The etcd members' client URLs (comma-separated); etcd must hold no
    /// keys under --etcd-prefix yet.
    #[arg(long, value_delimiter = ',', value_name = "URL", required = true)]
    to_etcd: Vec<String>,
    /// As `wasmkube server --etcd-prefix`.
    #[arg(long, default_value = "")]
    etcd_prefix: String,
}

pub async fn run(args: SnapshotArgs) -> anyhow::Result<()> {
    match args.command {
        SnapshotCommand::Save {
            file,
            server,
            kubeconfig,
        } => save(&file, kubeconfig.as_deref(), server.as_slice()).await,
        SnapshotCommand::Restore {
            file,
            data_dir,
            bump_revision,
        } => restore(&file, &data_dir, bump_revision),
    }
}

async fn save(file: &Path, kubeconfig: Option<&Path>, server: &[String]) -> anyhow::Result<()> {
    use futures::AsyncReadExt;
    let client = crate::kubeconfig::client(kubeconfig, server).await?;
    let request = http::Request::get(wasmkube_apiserver::SNAPSHOT_PATH).body(Vec::new())?;
    let mut raw = Vec::new();
    client
        .request_stream(request)
        .await
        .context("cannot read the snapshot from the API server")?
        .read_to_end(&mut raw)
        .await
        .context("the snapshot stream broke off")?;
    let snapshot = Snapshot::parse(&raw).context(
        "the API server did not send a whole snapshot (a server older than `wasmkube snapshot`, or one that failed mid-way: see its log)",
    )?;
    let tmp = file.with_extension("partial");
    std::fs::write(&tmp, &raw).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, file).with_context(|| format!("cannot write {}", file.display()))?;
    println!(
        "Snapshot saved at {} ({} keys at revision {}, {})",
        file.display(),
        snapshot.entries.len(),
        snapshot.revision,
        human_size(raw.len())
    );
    Ok(())
}

fn read(file: &Path) -> anyhow::Result<Snapshot> {
    let raw = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    Snapshot::parse(&raw).with_context(|| format!("{} cannot be restored", file.display()))
}

fn restore(file: &Path, data_dir: &Path, bump: u64) -> anyhow::Result<()> {
    let snapshot = read(file)?;
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create {}", data_dir.display()))?;
    let restored =
        wasmkube_store::snapshot::restore_sled(&data_dir.join("store"), &snapshot, bump)?;
    let revision = restored.current_revision();
    println!(
        "Restored {} keys from revision {} into {} (now at revision {revision})\n  wasmkube server --data-dir {}",
        snapshot.entries.len(),
        snapshot.revision,
        data_dir.display(),
        data_dir.display()
    );
    Ok(())
}

pub async fn migrate(args: MigrateArgs) -> anyhow::Result<()> {
    use futures::TryStreamExt;
    let store_dir = args.data_dir.join("store");
    if !store_dir.exists() {
        bail!("{} holds no store to migrate", args.data_dir.display());
    }
    let lock = crate::server::lock_data_dir(&args.data_dir).with_context(|| {
        format!(
            "a wasmkube server is using {}; stop it before migrating",
            args.data_dir.display()
        )
    })?;
    let from = wasmkube_store::open_sled(&store_dir)
        .with_context(|| format!("cannot open the store in {}", args.data_dir.display()))?;
    let chunks: Vec<bytes::Bytes> = wasmkube_store::snapshot::save(from, "/".into())
        .try_collect()
        .await
        .context("cannot read the embedded store")?;
    let snapshot = Snapshot::parse(&chunks.concat())?;
    let config = wasmkube_store::EtcdConfig {
        endpoints: args.to_etcd.clone(),
        prefix: args.etcd_prefix.clone(),
        tls: None,
    };
    let to = wasmkube_store::connect_etcd(&config)
        .await
        .with_context(|| format!("cannot reach etcd at {}", args.to_etcd.join(",")))?;
    let existing = to
        .list(
            "/",
            wasmkube_store::ListOptions {
                limit: 1,
                ..Default::default()
            },
        )
        .await?;
    if let Some(kv) = existing.items.first() {
        bail!(
            "etcd already holds keys under {:?} (such as {}); migrate into an empty etcd or another --etcd-prefix",
            args.etcd_prefix,
            kv.key
        );
    }
    let copied = wasmkube_store::snapshot::copy_into(&snapshot, to.as_ref()).await?;
    println!(
        "Copied {copied} keys from {} into etcd (revision {} there). Start the servers with\n  wasmkube server --etcd-servers {}",
        args.data_dir.display(),
        to.current_revision(),
        args.to_etcd.join(",")
    );
    drop(lock);
    Ok(())
}

fn human_size(bytes: usize) -> String {
    match bytes {
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / f64::from(1 << 20)),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / f64::from(1 << 10)),
        b => format!("{b} B"),
    }
}
