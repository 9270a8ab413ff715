//! The pod status the agent reports, computed from its containers' states
//! the way the kubelet computes it (phase, conditions, containerStatuses).

use chrono::{DateTime, SecondsFormat, Utc};
use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};

/// A container's current state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum State {
    Waiting {
        reason: String,
        message: Option<String>,
    },
    Running {
        started_at: DateTime<Utc>,
    },
    Terminated(Terminated),
}

/// How a container run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Terminated {
    pub exit_code: i32,
    pub reason: String,
    pub message: Option<String>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: DateTime<Utc>,
    pub container_id: Option<String>,
}

/// What the agent knows about one container.
#[derive(Clone, Debug)]
pub(crate) struct ContainerStatus {
    pub name: String,
    pub init: bool,
    pub image: String,
    pub image_id: String,
    pub container_id: Option<String>,
    pub restart_count: i32,
    pub state: State,
    pub last: Option<Terminated>,
    pub ready: bool,
}

impl ContainerStatus {
    pub fn new(name: &str, image: &str, init: bool) -> Self {
        Self {
            name: name.into(),
            init,
            image: image.into(),
            image_id: String::new(),
            container_id: None,
            restart_count: 0,
            state: State::Waiting {
                reason: if init {
                    "PodInitializing"
                } else {
                    "ContainerCreating"
                }
                .into(),
                message: None,
            },
            last: None,
            ready: false,
        }
    }

    fn succeeded(&self) -> bool {
        matches!(&self.state, State::Terminated(t) if t.exit_code == 0)
    }
}

/// A phase the agent imposes on the pod (activeDeadlineSeconds).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Forced {
    pub phase: &'static str,
    pub reason: String,
    pub message: String,
}

/// A Kubernetes timestamp as a chrono time.
pub(crate) fn from_k8s(t: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time) -> DateTime<Utc> {
    DateTime::from_timestamp(t.0.as_second(), t.0.subsec_nanosecond().max(0) as u32)
        .unwrap_or_default()
}

fn time(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn terminated_json(t: &Terminated) -> Value {
    json!({
        "exitCode": t.exit_code,
        "reason": t.reason,
        "message": t.message,
        "startedAt": t.started_at.as_ref().map(time),
        "finishedAt": time(&t.finished_at),
        "containerID": t.container_id,
    })
}

fn state_json(s: &State) -> Value {
    match s {
        State::Waiting { reason, message } => {
            json!({"waiting": {"reason": reason, "message": message}})
        }
        State::Running { started_at } => json!({"running": {"startedAt": time(started_at)}}),
        State::Terminated(t) => json!({"terminated": terminated_json(t)}),
    }
}

fn container_json(c: &ContainerStatus) -> Value {
    let running = matches!(c.state, State::Running { .. });
    json!({
        "name": c.name,
        "image": c.image,
        "imageID": c.image_id,
        "containerID": c.container_id,
        "ready": c.ready,
        "started": running,
        "restartCount": c.restart_count,
        "state": state_json(&c.state),
        "lastState": c.last.as_ref().map(|t| json!({"terminated": terminated_json(t)})).unwrap_or(json!({})),
    })
}

/// The pod phase from its containers, as the kubelet's `getPhase`.
pub(crate) fn phase(restart_policy: &str, containers: &[ContainerStatus]) -> &'static str {
    let inits: Vec<&ContainerStatus> = containers.iter().filter(|c| c.init).collect();
    let mains: Vec<&ContainerStatus> = containers.iter().filter(|c| !c.init).collect();
    if !inits.iter().all(|c| c.succeeded()) {
        let failed = inits.iter().any(|c| {
            matches!(&c.state, State::Terminated(t) if t.exit_code != 0)
                || (matches!(c.state, State::Waiting { .. })
                    && c.last.as_ref().is_some_and(|t| t.exit_code != 0))
        });
        return if failed && restart_policy == "Never" {
            "Failed"
        } else {
            "Pending"
        };
    }
    let (mut waiting, mut running, mut stopped, mut succeeded) = (0, 0, 0, 0);
    for c in &mains {
        match &c.state {
            State::Running { .. } => running += 1,
            State::Terminated(t) => {
                stopped += 1;
                if t.exit_code == 0 {
                    succeeded += 1;
                }
            }
            State::Waiting { .. } => match &c.last {
                Some(t) => {
                    stopped += 1;
                    if t.exit_code == 0 {
                        succeeded += 1;
                    }
                }
                None => waiting += 1,
            },
        }
    }
    if waiting > 0 {
        "Pending"
    } else if running > 0 {
        "Running"
    } else if stopped == mains.len() && !mains.is_empty() {
        match restart_policy {
            "Always" => "Running",
            _ if succeeded == mains.len() => "Succeeded",
            "OnFailure" => "Running",
            _ => "Failed",
        }
    } else {
        "Pending"
    }
}

/// Where a pod is reachable, for its status.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Network<'a> {
    /// The node's IP.
    pub host_ip: &'a str,
    /// The pod's own IP, when it has one (else it reports the node's).
    pub pod_ip: Option<std::net::IpAddr>,
    /// Node ports standing in for its container ports, when it shares the
    /// node's IP.
    pub node_ports: &'a [crate::ports::Mapping],
    /// Whether its sandbox (network) is set up.
    pub sandbox_ready: bool,
    /// Whether it gets a network of its own: then it has no IP to report
    /// until that network is up (never the node's in the meantime, which
    /// would publish a wrong endpoint).
    pub own_network: bool,
}

/// The whole `status` of a pod.
pub(crate) fn build(
    pod: &Pod,
    containers: &[ContainerStatus],
    forced: Option<&Forced>,
    start_time: &DateTime<Utc>,
    net: &Network<'_>,
) -> Value {
    let Network {
        host_ip,
        pod_ip,
        node_ports,
        sandbox_ready,
        own_network,
    } = *net;
    let pod_ip = match pod_ip {
        Some(ip) => Some(ip.to_string()),
        None if own_network => None,
        None => Some(host_ip.to_owned()),
    };
    let restart_policy = pod
        .spec
        .as_ref()
        .and_then(|s| s.restart_policy.as_deref())
        .unwrap_or("Always");
    let phase = forced.map_or_else(|| phase(restart_policy, containers), |f| f.phase);
    let now = Utc::now();
    let previous = pod.status.as_ref().and_then(|s| s.conditions.as_ref());
    let condition = |t: &str, ok: bool, reason: Option<String>, message: Option<String>| {
        let status = if ok { "True" } else { "False" };
        // The transition time only moves when the status does.
        let since = previous
            .and_then(|cs| cs.iter().find(|c| c.type_ == t && c.status == status))
            .and_then(|c| c.last_transition_time.as_ref())
            .map(|t| time(&from_k8s(t)))
            .unwrap_or_else(|| time(&now));
        json!({"type": t, "status": status, "reason": reason, "message": message,
               "lastProbeTime": null, "lastTransitionTime": since})
    };
    let names = |cs: Vec<&ContainerStatus>| {
        cs.iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    };
    let pending_init: Vec<&ContainerStatus> = containers
        .iter()
        .filter(|c| c.init && !c.succeeded())
        .collect();
    let unready: Vec<&ContainerStatus> =
        containers.iter().filter(|c| !c.init && !c.ready).collect();
    let terminal = matches!(phase, "Succeeded" | "Failed");
    let initialized = pending_init.is_empty() || terminal && phase == "Succeeded";
    let (ready_reason, ready_message) = if unready.is_empty() {
        (None, None)
    } else if terminal {
        (Some("PodCompleted".to_owned()), None)
    } else {
        (
            Some("ContainersNotReady".to_owned()),
            Some(format!(
                "containers with unready status: [{}]",
                names(unready.clone())
            )),
        )
    };
    let ready = unready.is_empty() && !terminal;
    let init_message = (!initialized).then(|| {
        format!(
            "containers with incomplete status: [{}]",
            names(pending_init.clone())
        )
    });
    let conditions = json!([
        condition(
            "PodReadyToStartContainers",
            sandbox_ready && !terminal,
            None,
            None
        ),
        condition(
            "Initialized",
            initialized,
            (!initialized).then(|| "ContainersNotInitialized".to_owned()),
            init_message
        ),
        condition("Ready", ready, ready_reason.clone(), ready_message.clone()),
        condition("ContainersReady", ready, ready_reason, ready_message),
        condition("PodScheduled", true, None, None),
    ]);
    let mut conditions = conditions;
    if !node_ports.is_empty() {
        conditions.as_array_mut().expect("an array").push(condition(
            crate::ports::CONDITION,
            true,
            Some("NoPodNetwork".to_owned()),
            Some(format!(
                "the node gives pods no network of their own: the pod shares the node's IP {host_ip}, and serves container ports at node ports {}",
                crate::ports::describe(node_ports)
            )),
        ));
    }
    let json_of = |init: bool| -> Vec<Value> {
        containers
            .iter()
            .filter(|c| c.init == init)
            .map(container_json)
            .collect()
    };
    let mut status = json!({
        "phase": phase,
        "conditions": conditions,
        "hostIP": host_ip,
        "hostIPs": [{"ip": host_ip}],
        "startTime": time(start_time),
        "containerStatuses": json_of(false),
        "qosClass": pod.status.as_ref().and_then(|s| s.qos_class.clone()),
    });
    if let Some(ip) = pod_ip {
        status["podIP"] = json!(ip);
        status["podIPs"] = json!([{"ip": ip}]);
    }
    let inits = json_of(true);
    if !inits.is_empty() {
        status["initContainerStatuses"] = json!(inits);
    }
    if let Some(f) = forced {
        status["reason"] = json!(f.reason);
        status["message"] = json!(f.message);
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(init: bool, state: State, last: Option<i32>) -> ContainerStatus {
        let mut s = ContainerStatus::new("c", "img", init);
        s.state = state;
        s.last = last.map(|code| Terminated {
            exit_code: code,
            reason: "Error".into(),
            message: None,
            started_at: None,
            finished_at: Utc::now(),
            container_id: None,
        });
        s
    }

    fn done(code: i32) -> State {
        State::Terminated(Terminated {
            exit_code: code,
            reason: if code == 0 { "Completed" } else { "Error" }.into(),
            message: None,
            started_at: None,
            finished_at: Utc::now(),
            container_id: None,
        })
    }

    fn waiting() -> State {
        State::Waiting {
            reason: "ContainerCreating".into(),
            message: None,
        }
    }

    #[test]
    fn phases_follow_the_kubelet() {
        let running = State::Running {
            started_at: Utc::now(),
        };
        assert_eq!(phase("Always", &[c(false, waiting(), None)]), "Pending");
        assert_eq!(
            phase("Always", &[c(false, running.clone(), None)]),
            "Running"
        );
        // Crash-looping under Always is Running.
        assert_eq!(phase("Always", &[c(false, waiting(), Some(1))]), "Running");
        assert_eq!(phase("Never", &[c(false, done(0), None)]), "Succeeded");
        assert_eq!(phase("Never", &[c(false, done(2), None)]), "Failed");
        assert_eq!(phase("OnFailure", &[c(false, done(2), None)]), "Running");
        assert_eq!(
            phase("Never", &[c(false, done(0), None), c(false, running, None)]),
            "Running"
        );
        // Init containers gate everything.
        assert_eq!(
            phase(
                "Always",
                &[c(true, waiting(), None), c(false, waiting(), None)]
            ),
            "Pending"
        );
        assert_eq!(
            phase(
                "Never",
                &[c(true, done(1), None), c(false, waiting(), None)]
            ),
            "Failed"
        );
    }
}
