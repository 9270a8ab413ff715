//! Pod events as the kubelet records them (`Pulling`, `Started`, `BackOff`,
//! ...), sent off the pod's path: a slow API never holds a container back.

use chrono::Utc;
use k8s_openapi::api::core::v1::{Event, Pod};
use kube::api::{Api, PostParams};
use serde_json::json;

/// `Normal` or `Warning`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Normal,
    Warning,
}

/// Records an event about `pod` (and `container`, when given) in the
/// background.
pub(crate) fn record(
    client: &kube::Client,
    node: &str,
    pod: &Pod,
    container: Option<&str>,
    kind: Kind,
    reason: &str,
    message: String,
) {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let pod_name = pod.metadata.name.clone().unwrap_or_default();
    let now = Utc::now();
    let time = now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let field_path = container.map(|c| {
        let init = pod
            .spec
            .as_ref()
            .and_then(|s| s.init_containers.as_ref())
            .is_some_and(|ics| ics.iter().any(|ic| ic.name == c));
        if init {
            format!("spec.initContainers{{{c}}}")
        } else {
            format!("spec.containers{{{c}}}")
        }
    });
    let event = json!({
        "metadata": {
            "name": format!("{pod_name}.{:x}", now.timestamp_nanos_opt().unwrap_or_default()),
            "namespace": ns,
        },
        "involvedObject": {
            "apiVersion": "v1", "kind": "Pod", "name": pod_name, "namespace": ns,
            "uid": pod.metadata.uid, "fieldPath": field_path,
        },
        "reason": reason,
        "message": message,
        "type": match kind { Kind::Normal => "Normal", Kind::Warning => "Warning" },
        "source": {"component": "kubelet", "host": node},
        "reportingComponent": "kubelet",
        "reportingInstance": node,
        "firstTimestamp": time,
        "lastTimestamp": time,
        "count": 1,
    });
    let event: Event = serde_json::from_value(event).expect("an event deserializes");
    let api: Api<Event> = Api::namespaced(client.clone(), &ns);
    let reason = reason.to_owned();
    tokio::spawn(async move {
        if let Err(e) = api.create(&PostParams::default(), &event).await {
            tracing::debug!(error = %e, reason, "could not record event");
        }
    });
}
