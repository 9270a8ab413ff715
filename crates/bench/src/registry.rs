//! The built-in registry's throughput: an image of several layers of
//! incompressible bytes pushed and pulled through `crates/oci` (oci-client:
//! chunked uploads, as `wasmkube push` makes them; the pull is a node's,
//! digests checked and blobs written to its store), against
//! Debian's `docker-registry` on loopback in the same run. The built-in
//! registry is the one `wasmkube server` serves (a child process, so both
//! peers are processes of their own).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::support::{ChildServer, free_port, wasmkube_binary};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The image's size in MiB.
    #[arg(long, default_value = "50")]
    mib: usize,
    /// Layers it is split into.
    #[arg(long, default_value = "5")]
    layers: usize,
    /// Push-then-pull rounds per registry (alternating which goes first).
    #[arg(long, default_value = "3")]
    runs: usize,
    /// The wasmkube binary to measure (default: next to this one).
    #[arg(long)]
    binary: Option<PathBuf>,
}

/// Bytes no compressor shrinks (xorshift), different for every seed.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// One push and one pull of a fresh image; returns their durations. The
/// pull is the node's: `ImageStore::ensure` into a store of its own.
async fn round(host: &str, repo: &str, layers: &[Vec<u8>]) -> anyhow::Result<(Duration, Duration)> {
    let reference = format!("{host}/{repo}:v1");
    let config = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]},"config":{}}"#;
    let started = Instant::now();
    wasmkube_oci::push_image(
        layers.to_vec(),
        config.to_vec(),
        &reference,
        &Default::default(),
    )
    .await?;
    let push = started.elapsed();

    let dir = tempfile::tempdir()?;
    let store = wasmkube_oci::ImageStore::open(dir.path(), vec![])?;
    let started = Instant::now();
    let (image, _) = store
        .ensure(&reference, wasmkube_oci::PullPolicy::Always, None, &|_| {})
        .await?;
    let pull = started.elapsed();
    let total: u64 = layers.iter().map(|l| l.len() as u64).sum();
    anyhow::ensure!(
        image.size >= total,
        "pulled {} bytes of {total}",
        image.size
    );
    Ok((push, pull))
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let binary = wasmkube_binary(args.binary.clone())?;
    let port = free_port()?;
    let builtin_host = format!("127.0.0.1:{port}");
    let (_server, _) = ChildServer::start_with(
        &binary,
        &["--no-local-node", "--registry-listen", &builtin_host],
    )
    .await?;
    let reference = wasmkube_testkit::Registry::start();
    let peers = [
        ("built-in", builtin_host),
        ("docker-registry", reference.host()),
    ];
    let layer_len = args.mib * 1024 * 1024 / args.layers.max(1);
    let mib = (layer_len * args.layers.max(1)) as f64 / (1024.0 * 1024.0);
    println!(
        "registry: push then pull of a {mib:.0} MiB image ({} layers) with oci-client, {} rounds each",
        args.layers, args.runs
    );
    let mut results: Vec<(Vec<Duration>, Vec<Duration>)> = vec![Default::default(); 2];
    for run in 0..args.runs {
        let layers: Vec<Vec<u8>> = (0..args.layers.max(1))
            .map(|i| noise(layer_len, (run * 1000 + i) as u64 + 1))
            .collect();
        let order: Vec<usize> = if run % 2 == 0 { vec![0, 1] } else { vec![1, 0] };
        for i in order {
            let (who, host) = &peers[i];
            let (push, pull) = round(host, &format!("bench/run{run}"), &layers).await?;
            println!(
                "  {who:<16} run {run}: push {:>7.1} MiB/s  pull {:>7.1} MiB/s",
                mib / push.as_secs_f64(),
                mib / pull.as_secs_f64()
            );
            results[i].0.push(push);
            results[i].1.push(pull);
        }
    }
    let rate = |d: Duration| mib / d.as_secs_f64();
    let (b_push, b_pull) = (median(results[0].0.clone()), median(results[0].1.clone()));
    let (r_push, r_pull) = (median(results[1].0.clone()), median(results[1].1.clone()));
    println!(
        "median push: built-in {:.1} MiB/s, docker-registry {:.1} MiB/s: ratio {:.2}x",
        rate(b_push),
        rate(r_push),
        rate(b_push) / rate(r_push)
    );
    println!(
        "median pull: built-in {:.1} MiB/s, docker-registry {:.1} MiB/s: ratio {:.2}x",
        rate(b_pull),
        rate(r_pull),
        rate(b_pull) / rate(r_pull)
    );
    Ok(())
}
