//! Knative Serving on `wasmkube server` (as root: pods get their own IPs,
//! which the gateway routes to): requests go through the gateway to Knative
//! Services of the `http-hello` component, with the module cached on the
//! node (the cold path of a function, not of a node).
//!
//! - **cold request from zero**: a revision scaled to zero gets one
//!   request; it is held by the activator, a pod starts, and it is answered.
//!   Many functions take turns so a run gets many cold starts without
//!   waiting a scale-to-zero window for each. The peer, in the same run, is
//!   the same request to a revision with a warm pod.
//! - **autoscaler reaction**: a revision with a target of one request in
//!   flight per pod goes from 1 to 10 clients of slow requests; the figure
//!   is the time until 10 pods are ready.
//! - **cost at zero**: the node agent's RSS (a `wasmkube agent` process of
//!   its own: its caches, the gateway's table; no pod) and the control
//!   plane's grow by this much per function scaled to zero; beside it, the
//!   agent's established connections to the API server.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;
use wasmkube_api::knative::{Revision, Service};

use crate::support::{ChildServer, free_port, ms, percentile, wasmkube_binary};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Cold starts to measure.
    #[arg(long, default_value = "200")]
    cold: usize,
    /// Functions taking turns at being cold (each round wakes all of them
    /// once, then waits for them to go back to zero).
    #[arg(long, default_value = "20")]
    functions: usize,
    /// Clients after the load step (from one).
    #[arg(long, default_value = "10")]
    step: usize,
    /// Functions scaled to zero for the cost figure, per group.
    #[arg(long, default_value = "50")]
    idle: usize,
    /// Groups of functions that ran a pod once, after the first such group
    /// (which pays for the node's first burst of pods): the per-function
    /// figure is their mean, so more groups read it finer.
    #[arg(long, default_value = "4")]
    later_groups: usize,
    /// The wasmkube binary to measure (default: next to this one).
    #[arg(long)]
    binary: Option<PathBuf>,
    /// After the last group, with every function at zero, print "waiting
    /// for the agent to exit" and wait until it does: a heap profiler's
    /// run kills the agent there and reads what it held at zero
    /// (`scripts/bench-heap-at-zero.sh`).
    #[arg(long)]
    await_agent_exit: bool,
}

const WINDOW: &str = "6s";

fn ksvc(name: &str, image: &str, annotations: serde_json::Value) -> anyhow::Result<Service> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"template": {
            "metadata": {"annotations": annotations},
            "spec": {"containers": [{"image": image}]}}},
    }))?)
}

/// A GET with a Host header to the gateway; the status.
async fn get(http: &reqwest::Client, gateway: &str, host: &str, path: &str) -> anyhow::Result<u16> {
    let r = http
        .get(format!("http://{gateway}{path}"))
        .header("host", host)
        .send()
        .await?;
    let status = r.status().as_u16();
    r.bytes().await?;
    Ok(status)
}

async fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut check: impl AsyncFnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        anyhow::ensure!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the Knative Services are Ready.
async fn wait_ready(api: &Api<Service>, names: &[String]) -> anyhow::Result<()> {
    wait_for(
        "Knative Services Ready",
        Duration::from_secs(300),
        async || {
            let list = api.list(&ListParams::default()).await?;
            let ready = list
                .items
                .iter()
                .filter(|s| names.iter().any(|n| s.metadata.name.as_ref() == Some(n)))
                .filter(|s| {
                    s.status.as_ref().is_some_and(|st| {
                        wasmkube_api::knative::condition(&st.conditions, "Ready")
                            .is_some_and(|c| c.status == "True")
                    })
                })
                .count();
            Ok((ready == names.len()).then_some(()))
        },
    )
    .await
}

/// Waits until the named services have no pod at all (not even one
/// terminating).
async fn wait_zero(pods: &Api<Pod>, names: &[String]) -> anyhow::Result<()> {
    let selector = format!("serving.knative.dev/service in ({})", names.join(","));
    wait_for("revisions at zero", Duration::from_secs(300), async || {
        let left = pods
            .list_metadata(&ListParams::default().labels(&selector))
            .await?;
        Ok(left.items.is_empty().then_some(()))
    })
    .await
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    if !rustix::process::geteuid().is_root() {
        println!(
            "Knative Serving: not measured (not root: pods need their own IPs for the gateway)"
        );
        return Ok(());
    }
    let binary = wasmkube_binary(args.binary)?;
    let registry = wasmkube_testkit::Registry::start();
    let image = format!("{}/http-hello:v1", registry.host());
    let component = wasmkube_testkit::workload_path("http_hello", "wasm32-wasip2");
    wasmkube_oci::push_wasm(std::fs::read(component)?, &image, &Default::default()).await?;
    let port = free_port()?.to_string();
    let _leftovers = crate::support::NodeNetworkLeftovers::before();
    // The control plane and the node apart, so the node's own cost of a
    // function at zero can be read from its process.
    let (server, _) = ChildServer::start_with(&binary, &["--no-local-node"]).await?;
    let agent_dir = tempfile::tempdir()?;
    let mut agent = crate::support::KillOnDrop(
        std::process::Command::new(&binary)
            .args([
                "agent",
                "--server",
                &server.url,
                "--name",
                "bench-serving",
                "--port",
                "0",
            ])
            .args([
                "--no-service-proxy",
                "--gateway-listen",
                &port,
                "--max-pods",
                "250",
                "--data-dir",
            ])
            .arg(agent_dir.path())
            .env("RUST_LOG", "warn")
            .stderr(std::process::Stdio::null())
            .spawn()?,
    );
    let client = server.client()?;
    wait_for("the node Ready", Duration::from_secs(60), async || {
        let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
        let ready = nodes.get_opt("bench-serving").await?.is_some_and(|n| {
            n.status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        });
        Ok(ready.then_some(()))
    })
    .await?;
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let gateway = format!("127.0.0.1:{port}");
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()?;

    // Functions that take turns at being cold, and one kept warm.
    let names: Vec<String> = (0..args.functions).map(|i| format!("fn-{i}")).collect();
    let window = json!({"autoscaling.knative.dev/window": WINDOW});
    for n in &names {
        services
            .create(&PostParams::default(), &ksvc(n, &image, window.clone())?)
            .await?;
    }
    services
        .create(
            &PostParams::default(),
            &ksvc(
                "warm",
                &image,
                json!({"autoscaling.knative.dev/min-scale": "1"}),
            )?,
        )
        .await?;
    let mut all = names.clone();
    all.push("warm".into());
    wait_ready(&services, &all).await?;
    let host = |n: &str| format!("{n}.default.example.com");
    anyhow::ensure!(
        get(&http, &gateway, &host("warm"), "/").await? == 200,
        "the warm function does not answer"
    );

    let mut cold = Vec::new();
    let mut warm = Vec::new();
    while cold.len() < args.cold {
        wait_zero(&pods, &names).await?;
        for n in &names {
            if cold.len() == args.cold {
                break;
            }
            let t = Instant::now();
            let status = get(&http, &gateway, &host(n), "/").await?;
            anyhow::ensure!(status == 200, "a cold request to {n} got {status}");
            cold.push(t.elapsed());
            let t = Instant::now();
            get(&http, &gateway, &host("warm"), "/").await?;
            warm.push(t.elapsed());
        }
        eprintln!("  {} cold starts", cold.len());
    }
    cold.sort();
    warm.sort();
    println!("first request to a function scaled to zero (module cached), through the gateway");
    println!(
        "  cold (activator, pod start)   p50 {}  p99 {}  max {}   ({} cold starts)",
        ms(percentile(&cold, 50.0)),
        ms(percentile(&cold, 99.0)),
        ms(percentile(&cold, 100.0)),
        cold.len()
    );
    println!(
        "  peer: warm pod                p50 {}  p99 {}  max {}",
        ms(percentile(&warm, 50.0)),
        ms(percentile(&warm, 99.0)),
        ms(percentile(&warm, 100.0))
    );

    // The autoscaler's reaction to a step from 1 to `step` clients.
    services
        .create(
            &PostParams::default(),
            &ksvc(
                "step",
                &image,
                json!({"autoscaling.knative.dev/target": "1", "autoscaling.knative.dev/min-scale": "1",
                       "autoscaling.knative.dev/window": WINDOW}),
            )?,
        )
        .await?;
    wait_ready(&services, &["step".to_owned()]).await?;
    let revisions: Api<Revision> = Api::namespaced(client.clone(), "default");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client_loop = |stop: std::sync::Arc<std::sync::atomic::AtomicBool>| {
        let (http, gateway) = (http.clone(), gateway.clone());
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = get(&http, &gateway, "step.default.example.com", "/sleep?ms=200").await;
            }
        })
    };
    let mut load = vec![client_loop(stop.clone())];
    tokio::time::sleep(Duration::from_secs(3)).await;
    let stepped = Instant::now();
    load.extend((1..args.step).map(|_| client_loop(stop.clone())));
    let want = args.step as i32;
    let reaction = wait_for(
        "pods after the step",
        Duration::from_secs(120),
        async || {
            let r = revisions.get("step-00001").await?;
            let ready = r.status.and_then(|s| s.actual_replicas).unwrap_or(0);
            Ok((ready >= want).then(|| stepped.elapsed()))
        },
    )
    .await?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    futures::future::join_all(load).await;
    println!(
        "autoscaler reaction to a step from 1 to {} clients (target 1 in flight per pod)",
        args.step
    );
    println!(
        "  step -> {} pods ready          {}",
        args.step,
        ms(reaction)
    );

    // The cost of functions at zero.
    services
        .delete_collection(&Default::default(), &Default::default())
        .await?;
    wait_zero(
        &pods,
        &all.iter()
            .cloned()
            .chain(["step".to_owned()])
            .collect::<Vec<_>>(),
    )
    .await?;
    // Groups: functions that never had a pod (initial scale 0: what the
    // node keeps of a function is its caches), then functions that each
    // ran a pod first (initial scale 1) and went back to zero, then as many
    // again, `--later-groups` times: the first started group pays once for
    // what a burst of that many pods at a time leaves (the allocator's
    // pages, the Wasm memory slots the pods used), the later ones show what
    // a function at zero costs a node that has run such a burst. Anonymous
    // memory is read beside RSS: the binary's own pages, which running a
    // pod first touches, are shared with the page cache.
    let mut all_idle = Vec::new();
    let mut steady = Vec::new();
    let mut anon_before = agent.settled_anon_mib().await;
    let groups = [
        ("never-started".to_owned(), "0", "n".to_owned()),
        ("started-once".to_owned(), "1", "a".to_owned()),
    ]
    .into_iter()
    .chain((1..=args.later_groups).map(|k| {
        (
            format!("started-once, later group {k} of {}", args.later_groups),
            "1",
            format!("l{k}"),
        )
    }));
    for (group, initial, tag) in groups {
        let before = server.rss_mib();
        let agent_before = agent.rss_mib();
        let idle: Vec<String> = (0..args.idle).map(|i| format!("idle-{tag}-{i}")).collect();
        let annotations = json!({"autoscaling.knative.dev/window": WINDOW,
            "autoscaling.knative.dev/initial-scale": initial});
        futures::stream::iter(idle.iter())
            .for_each_concurrent(8, |n| {
                let services = services.clone();
                let ksvc = ksvc(n, &image, annotations.clone());
                async move {
                    if let Ok(k) = ksvc {
                        let _ = services.create(&PostParams::default(), &k).await;
                    }
                }
            })
            .await;
        wait_ready(&services, &idle).await?;
        wait_zero(&pods, &idle).await?;
        let anon_after = agent.settled_anon_mib().await;
        let after = server.rss_mib();
        let agent_after = agent.rss_mib();
        let per = |before: f64, after: f64| (after - before) * 1024.0 / args.idle as f64;
        println!(
            "functions scaled to zero ({} of them, one module, {group})",
            args.idle
        );
        println!(
            "  agent RSS per function        {:.0} KiB  ({agent_before:.0} MiB before, {agent_after:.0} MiB after)",
            per(agent_before, agent_after)
        );
        println!(
            "  agent anonymous memory        {:.0} KiB per function  ({anon_before:.1} MiB before, {anon_after:.1} MiB after)",
            per(anon_before, anon_after)
        );
        if tag.starts_with('l') {
            steady.push(per(anon_before, anon_after));
        }
        println!(
            "  agent connections to the API server  {}",
            crate::support::connections_to(agent.0.id(), server.port())
                .map_or_else(|e| format!("unknown ({e})"), |n| n.to_string())
        );
        println!(
            "  server RSS per function       {:.0} KiB  ({before:.0} MiB before, {after:.0} MiB after; API server, controllers)",
            (after - before).max(0.0) * 1024.0 / args.idle as f64
        );
        all_idle.extend(idle);
        anon_before = anon_after;
    }
    if !steady.is_empty() {
        let n = steady.len() as f64;
        let mean = steady.iter().sum::<f64>() / n;
        let (lo, hi) = steady
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
        // The standard error of the mean: how finely these groups read it.
        let error = if steady.len() > 1 {
            (steady.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt() / n.sqrt()
        } else {
            f64::NAN
        };
        println!(
            "  a started function at zero, once the node has run pods: {mean:.0} ± {error:.0} KiB of anonymous memory (mean of {} later groups, standard error; from {lo:.0} to {hi:.0})",
            steady.len()
        );
    }
    let idle = all_idle;
    if args.await_agent_exit {
        println!("waiting for the agent to exit");
        while agent.0.try_wait()?.is_none() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    services
        .delete_collection(&Default::default(), &Default::default())
        .await?;
    wait_zero(&pods, &idle).await?;
    Ok(())
}
