//! The request-driven autoscaler: Knative's KPA, per revision.
//!
//! Every tick it reads each revision's pods' request counters through the
//! custom metrics API (`http_request_seconds`, the integral of requests in
//! flight, and `http_requests`, both counted where requests enter the pod),
//! turns their change since the last tick into the revision's average
//! concurrency (or requests per second, with `metric: rps`), and decides:
//!
//! - **stable mode**: `ceil(average over the window / target)`; the window
//!   is `autoscaling.knative.dev/window` (60 s);
//! - **panic mode**: when the average over the panic window (10 % of the
//!   window) asks for at least `panic-threshold-percentage` (200 %) of the
//!   ready pods, it scales to the panic figure at once and does not scale
//!   down until a whole window passes without another panic;
//! - **scale to zero**: a revision with no request over a whole window (and
//!   `scale-to-zero-pod-retention-period` after its last one) goes to zero
//!   pods, unless `min-scale` says otherwise; a revision the activator has
//!   just woken ([`crate::ACTIVATED_AT`]) stays up for a window;
//! - bounds: `min-scale`, `max-scale`, and at most halving per decision.
//!
//! Requests are counted in the pods by the Wasm runtime (HTTP functions),
//! which sees every request whichever way it came. A revision whose pods
//! count none (a Linux image) is measured where its requests enter: every
//! node's gateway counts what it forwards to each revision (the custom
//! metrics API's `revisions.serving.knative.dev`), so traffic that bypasses
//! the gateways (straight to the revision's ClusterIP) is not seen for it.
//!
//! The decision is written as the revision's Deployment's replicas.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::{ObjectRef, Store};
use serde_json::{Value, json};
use wasmkube_api::knative::{Revision, Scaling, labels};

use crate::{Config, Error};

/// The KPA's memory of one revision.
#[derive(Debug)]
pub struct Kpa {
    samples: VecDeque<(Instant, f64)>,
    first: Instant,
    last_traffic: Option<Instant>,
    panic_since: Option<Instant>,
    panic_max: i32,
}

/// What the KPA sees at one tick.
#[derive(Clone, Copy, Debug)]
pub struct Observation {
    pub now: Instant,
    /// The revision's total: requests in flight on average since the last
    /// tick (or requests per second).
    pub value: f64,
    pub ready: i32,
    /// The replicas it has now.
    pub current: i32,
    /// When the activator last woke it, if it did.
    pub activated: Option<Instant>,
}

impl Kpa {
    pub fn new(now: Instant) -> Self {
        Self {
            samples: VecDeque::new(),
            first: now,
            last_traffic: None,
            panic_since: None,
            panic_max: 0,
        }
    }

    /// The replicas the revision should have.
    pub fn decide(&mut self, o: Observation, s: &Scaling) -> i32 {
        let window = s.window;
        let panic_window = window
            .mul_f64(s.panic_window_percentage / 100.0)
            .max(Duration::from_secs(1));
        self.samples.push_back((o.now, o.value));
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| o.now.duration_since(*t) > window)
        {
            self.samples.pop_front();
        }
        if o.value > 0.0 {
            self.last_traffic = Some(o.now);
        }
        let average = |within: Duration| {
            let (sum, n) = self
                .samples
                .iter()
                .filter(|(t, _)| o.now.duration_since(*t) <= within)
                .fold((0.0, 0usize), |(s, n), (_, v)| (s + v, n + 1));
            if n == 0 { 0.0 } else { sum / n as f64 }
        };
        let stable = (average(window) / s.target).ceil() as i32;
        let panic = (average(panic_window) / s.target).ceil() as i32;
        let ready = o.ready.max(1) as f64;
        if panic as f64 / ready >= s.panic_threshold_percentage / 100.0 && panic > o.ready {
            if self.panic_since.is_none() {
                tracing::info!(want = panic, ready = o.ready, "entering panic mode");
            }
            self.panic_since = Some(o.now);
        } else if self
            .panic_since
            .is_some_and(|since| o.now.duration_since(since) >= window)
        {
            self.panic_since = None;
            self.panic_max = 0;
        }
        let mut want = if self.panic_since.is_some() {
            // No scaling down in a panic.
            self.panic_max = self.panic_max.max(panic).max(o.current);
            self.panic_max
        } else {
            stable
        };
        // At most halve per decision (Knative's max-scale-down-rate 2).
        if want < o.current {
            want = want.max(o.current / 2);
        }
        // Until a whole window has been seen, nothing is scaled down.
        if o.now.duration_since(self.first) < window {
            want = want.max(o.current);
        }
        let recent = |t: Option<Instant>, within: Duration| {
            t.is_some_and(|t| o.now.saturating_duration_since(t) < within)
        };
        if want == 0 && (recent(self.last_traffic, s.retention) || recent(o.activated, window)) {
            want = 1;
        }
        want = want.max(s.min);
        if s.max > 0 {
            want = want.min(s.max);
        }
        want
    }
}

/// Request counters (of a pod, or a gateway's of a revision) at a tick.
#[derive(Clone, Copy, Debug)]
struct PodSample {
    at: Instant,
    seconds: f64,
    requests: f64,
}

impl PodSample {
    /// Average requests in flight and requests per second since `prev`. A
    /// counter that went down was restarted (a container, a gateway): it
    /// counts from zero.
    fn rates_since(&self, prev: &PodSample) -> (f64, f64) {
        let dt = self.at.duration_since(prev.at).as_secs_f64().max(1e-3);
        let d = |new: f64, old: f64| if new >= old { new - old } else { new };
        (
            d(self.seconds, prev.seconds) / dt,
            d(self.requests, prev.requests) / dt,
        )
    }
}

/// Parses a quantity as the custom metrics API writes it (`1234m`, `5`).
fn quantity(v: &Value) -> f64 {
    let s = v.as_str().unwrap_or_default();
    let (number, scale) = [('n', 1e-9), ('u', 1e-6), ('m', 1e-3)]
        .iter()
        .find_map(|(suffix, scale)| s.strip_suffix(*suffix).map(|n| (n, *scale)))
        .unwrap_or((s, 1.0));
    number.parse::<f64>().map(|n| n * scale).unwrap_or(0.0)
}

/// One metric of every revision pod in a namespace, by pod name.
async fn pod_metric(
    client: &kube::Client,
    ns: &str,
    metric: &str,
) -> Result<HashMap<String, f64>, Error> {
    custom_metric(
        client,
        &format!(
            "namespaces/{ns}/pods/*/{metric}?labelSelector={}",
            labels::REVISION
        ),
    )
    .await
}

/// One metric of every revision in a namespace as the gateways counted
/// the requests they forwarded to it, summed over the nodes.
async fn revision_metric(
    client: &kube::Client,
    ns: &str,
    metric: &str,
) -> Result<HashMap<String, f64>, Error> {
    custom_metric(
        client,
        &format!("namespaces/{ns}/revisions.serving.knative.dev/*/{metric}"),
    )
    .await
}

/// A custom metrics API list, by described object's name.
async fn custom_metric(client: &kube::Client, path: &str) -> Result<HashMap<String, f64>, Error> {
    let request = http::Request::get(format!("/apis/custom.metrics.k8s.io/v1beta2/{path}"))
        .body(Vec::new())
        .map_err(|e| Error::Kube(kube::Error::HttpError(e)))?;
    let list: Value = client.request(request).await?;
    Ok(list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| {
            Some((
                i["describedObject"]["name"].as_str()?.to_owned(),
                quantity(&i["value"]),
            ))
        })
        .collect())
}

struct State {
    kpas: HashMap<(String, String), Kpa>,
    pods: HashMap<(String, String), PodSample>,
    /// The gateways' counters per revision at the last tick.
    routed: HashMap<(String, String), PodSample>,
}

async fn tick(
    client: &kube::Client,
    revisions: &Store<Revision>,
    deployments: &Store<Deployment>,
    pods: &Store<Pod>,
    state: &mut State,
) -> Result<(), Error> {
    let now = Instant::now();
    let revs: Vec<Arc<Revision>> = revisions
        .state()
        .into_iter()
        .filter(|r| r.metadata.deletion_timestamp.is_none())
        .filter(|r| {
            r.annotations()
                .get("autoscaling.knative.dev/class")
                .is_none_or(|c| c == "kpa.autoscaling.knative.dev")
        })
        .collect();
    let mut namespaces: Vec<String> = revs.iter().filter_map(|r| r.namespace()).collect();
    namespaces.sort();
    namespaces.dedup();
    // Each revision's total since the last tick: concurrency and rps.
    let mut totals: HashMap<(String, String), (f64, f64)> = HashMap::new();
    // Revisions with a pod whose requests are counted (HTTP functions);
    // a revision with pods none of which is (a Linux image) is not metered.
    let mut metered = std::collections::HashSet::new();
    let mut seen = std::collections::HashSet::new();
    for ns in &namespaces {
        let seconds = pod_metric(client, ns, "http_request_seconds").await?;
        let requests = pod_metric(client, ns, "http_requests").await?;
        for (pod, secs) in seconds {
            let Some(p) = pods.get(&ObjectRef::new(&pod).within(ns)) else {
                continue;
            };
            let Some(rev) = p.labels().get(labels::REVISION) else {
                continue;
            };
            metered.insert((ns.clone(), rev.clone()));
            let key = (ns.clone(), pod.clone());
            seen.insert(key.clone());
            let reqs = requests.get(&pod).copied().unwrap_or(0.0);
            let sample = PodSample {
                at: now,
                seconds: secs,
                requests: reqs,
            };
            if let Some(prev) = state.pods.insert(key, sample) {
                let (concurrency, rps) = sample.rates_since(&prev);
                let entry = totals.entry((ns.clone(), rev.clone())).or_default();
                entry.0 += concurrency;
                entry.1 += rps;
            }
        }
    }
    state.pods.retain(|k, _| seen.contains(k));
    // The same from the gateways, for revisions whose pods count nothing.
    let mut routed_rates: HashMap<(String, String), (f64, f64)> = HashMap::new();
    let mut routed_seen = std::collections::HashSet::new();
    for ns in &namespaces {
        let seconds = revision_metric(client, ns, "http_request_seconds").await?;
        let requests = revision_metric(client, ns, "http_requests").await?;
        for (rev, secs) in seconds {
            let key = (ns.clone(), rev.clone());
            routed_seen.insert(key.clone());
            let reqs = requests.get(&rev).copied().unwrap_or(0.0);
            let sample = PodSample {
                at: now,
                seconds: secs,
                requests: reqs,
            };
            if let Some(prev) = state.routed.insert(key.clone(), sample) {
                routed_rates.insert(key, sample.rates_since(&prev));
            }
        }
    }
    state.routed.retain(|k, _| routed_seen.contains(k));

    let mut live = std::collections::HashSet::new();
    for rev in revs {
        let ns = rev.namespace().unwrap_or_default();
        let name = rev.name_any();
        let key = (ns.clone(), name.clone());
        live.insert(key.clone());
        let dep_name = crate::revision::deployment_name(&name);
        let Some(dep) = deployments.get(&ObjectRef::new(&dep_name).within(&ns)) else {
            continue;
        };
        let scaling = Scaling::from_annotations(
            rev.annotations(),
            rev.spec.container_concurrency.unwrap_or(0),
        );
        let current = dep.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0);
        let ready = dep
            .status
            .as_ref()
            .and_then(|s| s.ready_replicas)
            .unwrap_or(0);
        let activated = dep
            .annotations()
            .get(crate::ACTIVATED_AT)
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .map(|t| {
                let ago = (chrono::Utc::now() - t.with_timezone(&chrono::Utc))
                    .to_std()
                    .unwrap_or_default();
                now.checked_sub(ago).unwrap_or(now)
            });
        // Measured in its pods (HTTP functions), or else where its requests
        // entered: the gateways.
        let (concurrency, rps) = if metered.contains(&key) {
            totals.get(&key).copied().unwrap_or_default()
        } else {
            routed_rates.get(&key).copied().unwrap_or_default()
        };
        let kpa = state.kpas.entry(key).or_insert_with(|| Kpa::new(now));
        let want = kpa.decide(
            Observation {
                now,
                value: if scaling.rps { rps } else { concurrency },
                ready,
                current,
                activated,
            },
            &scaling,
        );
        if want != current {
            tracing::info!(namespace = %ns, revision = %name, from = current, to = want, observed = concurrency, "scaling a revision");
            scale(client, &ns, &dep_name, want).await?;
        }
    }
    state.kpas.retain(|k, _| live.contains(k));
    Ok(())
}

/// Writes a decision: the revision's Deployment's replicas.
async fn scale(
    client: &kube::Client,
    ns: &str,
    deployment: &str,
    replicas: i32,
) -> Result<(), Error> {
    let api: Api<Deployment> = Api::namespaced(client.clone(), ns);
    api.patch(
        deployment,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": replicas}})),
    )
    .await?;
    Ok(())
}

/// Runs the autoscaler until its watches end.
pub fn run(
    client: kube::Client,
    informers: &mut wasmkube_controllers::Informers,
    config: Arc<Config>,
) -> impl std::future::Future<Output = Result<(), Error>> + use<> {
    let revisions = informers.store::<Revision>();
    let deployments = informers.store::<Deployment>();
    let pods = informers.store::<Pod>();
    async move {
        let _ = tokio::join!(
            revisions.wait_until_ready(),
            deployments.wait_until_ready(),
            pods.wait_until_ready()
        );
        let mut state = State {
            kpas: HashMap::new(),
            pods: HashMap::new(),
            routed: HashMap::new(),
        };
        let mut ticker = tokio::time::interval(config.tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            if let Err(e) = tick(&client, &revisions, &deployments, &pods, &mut state).await {
                tracing::warn!(error = %wasmkube_api::ErrorChain(&e), "autoscaler tick failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_values_read_in_every_scale_the_server_writes() {
        for (text, value) in [("3", 3.0), ("1500m", 1.5), ("42u", 42e-6), ("7n", 7e-9)] {
            let got = quantity(&serde_json::json!(text));
            assert!((got - value).abs() < 1e-12, "{text}: {got}");
        }
    }

    fn scaling(target: f64, window: u64) -> Scaling {
        let mut s = Scaling::from_annotations(&Default::default(), 0);
        s.target = target;
        s.window = Duration::from_secs(window);
        s
    }

    /// Feeds one observation a second; returns the last decision.
    fn run(
        kpa: &mut Kpa,
        start: Instant,
        from: u64,
        to: u64,
        value: f64,
        pods: &mut i32,
        s: &Scaling,
    ) {
        for sec in from..to {
            let now = start + Duration::from_secs(sec);
            *pods = kpa.decide(
                Observation {
                    now,
                    value,
                    ready: *pods,
                    current: *pods,
                    activated: None,
                },
                s,
            );
        }
    }

    #[test]
    fn idle_revisions_go_to_zero_after_a_window_and_not_before() {
        let s = scaling(10.0, 6);
        let start = Instant::now();
        let mut kpa = Kpa::new(start);
        let mut pods = 1;
        run(&mut kpa, start, 0, 5, 0.0, &mut pods, &s);
        assert_eq!(pods, 1, "a window has not passed");
        run(&mut kpa, start, 5, 8, 0.0, &mut pods, &s);
        assert_eq!(pods, 0);
    }

    #[test]
    fn load_scales_up_in_a_panic_and_back_down_after_the_window() {
        let s = scaling(1.0, 6);
        let start = Instant::now();
        let mut kpa = Kpa::new(start);
        let mut pods = 1;
        // Ten requests in flight on average: ten pods at once (a panic).
        run(&mut kpa, start, 0, 2, 10.0, &mut pods, &s);
        assert_eq!(pods, 10);
        // Half the load: no scaling down during the panic.
        run(&mut kpa, start, 2, 5, 5.0, &mut pods, &s);
        assert_eq!(pods, 10);
        // Idle: down by at most half per decision, then to zero.
        run(&mut kpa, start, 5, 40, 0.0, &mut pods, &s);
        assert_eq!(pods, 0);
    }

    #[test]
    fn bounds_and_the_activator_hold() {
        let mut s = scaling(1.0, 6);
        s.min = 2;
        s.max = 3;
        let start = Instant::now();
        let mut kpa = Kpa::new(start);
        let mut pods = 2;
        run(&mut kpa, start, 0, 20, 0.0, &mut pods, &s);
        assert_eq!(pods, 2, "min-scale");
        run(&mut kpa, start, 20, 25, 50.0, &mut pods, &s);
        assert_eq!(pods, 3, "max-scale");

        let s = scaling(1.0, 6);
        let mut kpa = Kpa::new(start);
        let now = start + Duration::from_secs(30);
        let woken = kpa.decide(
            Observation {
                now,
                value: 0.0,
                ready: 0,
                current: 1,
                activated: Some(now - Duration::from_secs(2)),
            },
            &s,
        );
        assert_eq!(woken, 1, "a revision just activated stays up");
    }
}
