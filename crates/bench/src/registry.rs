//! The built-in registry's throughput: an image of several layers of
//! incompressible bytes pushed and pulled with `oci-client` (chunked
//! uploads, as `wasmkube push` makes them; digests checked on pull), against
//! Debian's `docker-registry` on loopback in the same run. The built-in
//! registry is the one `wasmkube server` serves (a child process, so both
//! peers are processes of their own).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::secrets::RegistryAuth;

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

/// One push and one pull of a fresh image; returns their durations.
async fn round(host: &str, repo: &str, layers: &[Vec<u8>]) -> anyhow::Result<(Duration, Duration)> {
    let client = oci_client::Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        ..Default::default()
    });
    let reference: oci_client::Reference = format!("{host}/{repo}:v1").parse()?;
    let image_layers: Vec<ImageLayer> = layers
        .iter()
        .map(|l| ImageLayer::oci_v1(l.clone(), None))
        .collect();
    let config = Config::oci_v1(
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]},"config":{}}"#.to_vec(),
        None,
    );
    let started = Instant::now();
    client
        .push(
            &reference,
            &image_layers,
            config,
            &RegistryAuth::Anonymous,
            None,
        )
        .await?;
    let push = started.elapsed();

    // A new client: nothing cached from the push.
    let client = oci_client::Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        ..Default::default()
    });
    let started = Instant::now();
    let (manifest, _) = client
        .pull_image_manifest(&reference, &RegistryAuth::Anonymous)
        .await?;
    let mut pulled = 0u64;
    for layer in &manifest.layers {
        let mut sink = Vec::with_capacity(layer.size as usize);
        client.pull_blob(&reference, layer, &mut sink).await?;
        pulled += sink.len() as u64;
    }
    let pull = started.elapsed();
    anyhow::ensure!(
        pulled == layers.iter().map(|l| l.len() as u64).sum::<u64>(),
        "pulled {pulled} bytes"
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
