//! Recent usage of each running container, kept in memory as cAdvisor
//! keeps its recent stats: one sample of CPU rate and working set per
//! interval (15 s by default), the last [`SAMPLES`] of them, so a chart
//! opened now starts with the last quarter of an hour instead of empty.
//! Served at `/stats/history/{namespace}/{pod}` (the dashboard reads it
//! through the API server); gone with the run.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};

use crate::Ctx;

/// How many samples a run keeps: 15 minutes at the default interval.
pub(crate) const SAMPLES: usize = 60;

/// One run's recent usage.
#[derive(Debug, Default)]
pub(crate) struct History {
    /// When, as seconds since the epoch; CPU in nanocores; memory in bytes.
    samples: VecDeque<(u64, u64, u64)>,
    /// The run's CPU time at the last sample, and when it was taken.
    last: Option<(Instant, Duration)>,
}

impl History {
    /// Takes a sample of `usage` now.
    fn sample(&mut self, usage: &wasmkube_runtime::Usage, started: Instant) {
        let now = Instant::now();
        let cpu = usage.cpu();
        let (since, before) = self.last.unwrap_or((started, Duration::ZERO));
        let elapsed = now.duration_since(since).as_secs_f64().max(1e-3);
        let nanocores = (cpu.saturating_sub(before).as_secs_f64() / elapsed * 1e9) as u64;
        self.last = Some((now, cpu));
        let at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        if self.samples.len() == SAMPLES {
            self.samples.pop_front();
        }
        self.samples.push_back((at, nanocores, usage.memory()));
    }
}

/// Samples every running container of the node every `every`.
pub(crate) async fn keep(ctx: Arc<Ctx>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let pods: Vec<_> = ctx
            .pods
            .lock()
            .expect("pods lock")
            .values()
            .map(|h| h.state.clone())
            .collect();
        for state in pods {
            let st = state.lock().expect("pod state");
            for run in st.runs.values().filter(|r| r.running) {
                run.history
                    .lock()
                    .expect("history")
                    .sample(&run.usage, run.started);
            }
        }
    }
}

/// `GET /stats/history/{namespace}/{pod}`: each running container's
/// samples, oldest first.
pub(crate) async fn serve(
    State(ctx): State<Arc<Ctx>>,
    Path((namespace, pod)): Path<(String, String)>,
) -> Response {
    let Some(state) = ctx.pod_state(&namespace, &pod) else {
        return crate::server::not_here(&namespace, &pod).into_response();
    };
    let containers: Vec<serde_json::Value> = {
        let st = state.lock().expect("pod state");
        st.runs
            .iter()
            .filter(|(_, r)| r.running)
            .map(|(name, run)| {
                let samples: Vec<serde_json::Value> = run
                    .history
                    .lock()
                    .expect("history")
                    .samples
                    .iter()
                    .map(|(t, cpu, memory)| {
                        serde_json::json!({"time": t, "cpuNanoCores": cpu, "memoryBytes": memory})
                    })
                    .collect();
                serde_json::json!({"name": name, "samples": samples})
            })
            .collect()
    };
    axum::Json(serde_json::json!({
        "intervalSeconds": ctx.config.usage_history_interval.as_secs_f64(),
        "containers": containers,
    }))
    .into_response()
}

/// A run's history, shared by the sampler and the endpoint.
pub(crate) type Shared = Arc<Mutex<History>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_keeps_its_last_samples_with_rates_between_them() {
        let usage = wasmkube_runtime::Usage::default();
        let started = Instant::now() - Duration::from_secs(1);
        let mut h = History::default();
        usage.add_cpu(Duration::from_millis(500));
        usage.set_memory(1 << 20);
        h.sample(&usage, started);
        let (_, cpu, memory) = h.samples[0];
        // Half a second of CPU over about a second: about half a core.
        assert!((300_000_000..=500_000_000).contains(&cpu), "{cpu}");
        assert_eq!(memory, 1 << 20);
        for _ in 0..SAMPLES + 5 {
            h.sample(&usage, started);
        }
        assert_eq!(h.samples.len(), SAMPLES);
        // No CPU since the last sample: none used.
        assert_eq!(h.samples.back().unwrap().1, 0);
    }
}
