//! Server-side printing (`as=Table`): the same columns and cell text that
//! Kubernetes' printers give kubectl for each served kind.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use crate::registry::ResourceType;

/// One column: name, type and whether it shows only with `-o wide`.
#[derive(Clone, Copy, Debug)]
pub struct Column {
    pub name: &'static str,
    pub ty: &'static str,
    pub wide: bool,
    pub description: &'static str,
}

const fn col(name: &'static str, ty: &'static str, description: &'static str) -> Column {
    Column {
        name,
        ty,
        wide: false,
        description,
    }
}

const fn wide(name: &'static str, ty: &'static str, description: &'static str) -> Column {
    Column {
        name,
        ty,
        wide: true,
        description,
    }
}

const NAME: Column = Column {
    name: "Name",
    ty: "string",
    wide: false,
    description: "Name must be unique within a namespace.",
};
const AGE: Column = col("Age", "string", "Time since the object was created.");
const CONTAINERS: Column = wide(
    "Containers",
    "string",
    "Names of each container in the template.",
);
const IMAGES: Column = wide(
    "Images",
    "string",
    "Images referenced by each container in the template.",
);
const SELECTOR: Column = wide("Selector", "string", "Label selector for pods.");

/// The columns for a kind, in order.
pub fn columns(rt: &ResourceType) -> Vec<Column> {
    match rt.id() {
        "Pod" => vec![
            NAME,
            col(
                "Ready",
                "string",
                "The aggregate readiness state of this pod for accepting traffic.",
            ),
            col(
                "Status",
                "string",
                "The aggregate status of the containers in this pod.",
            ),
            col(
                "Restarts",
                "string",
                "The number of times the containers in this pod have been restarted and when the last container in this pod has restarted.",
            ),
            AGE,
            wide("IP", "string", "IP address allocated to the pod."),
            wide(
                "Node",
                "string",
                "Name of the node where the pod is running.",
            ),
            wide(
                "Nominated Node",
                "string",
                "Name of the node that the scheduler nominated for preemption.",
            ),
            wide("Readiness Gates", "string", "Pod readiness gates."),
        ],
        "Namespace" => vec![
            NAME,
            col("Status", "string", "The status of the namespace"),
            AGE,
        ],
        "Node" => vec![
            NAME,
            col("Status", "string", "The status of the node"),
            col("Roles", "string", "The roles of the node"),
            AGE,
            col("Version", "string", "Kubelet Version reported by the node."),
            wide(
                "Internal-IP",
                "string",
                "List of internal IPs for the node.",
            ),
            wide(
                "External-IP",
                "string",
                "List of external IPs for the node.",
            ),
            wide("OS-Image", "string", "OS image reported by the node."),
            wide(
                "Kernel-Version",
                "string",
                "Kernel version reported by the node.",
            ),
            wide(
                "Container-Runtime",
                "string",
                "Container runtime version reported by the node.",
            ),
        ],
        "Service" => vec![
            NAME,
            col("Type", "string", "The type of the service."),
            col("Cluster-IP", "string", "The cluster IP of the service."),
            col("External-IP", "string", "The external IP of the service."),
            col("Port(s)", "string", "The ports of the service."),
            AGE,
            SELECTOR,
        ],
        "Endpoints" => vec![
            NAME,
            col("Endpoints", "string", "Endpoints of the service."),
            AGE,
        ],
        "ConfigMap" => vec![NAME, col("Data", "string", "Number of data keys."), AGE],
        "Secret" => vec![
            NAME,
            col("Type", "string", "The type of the secret."),
            col("Data", "string", "Number of data keys."),
            AGE,
        ],
        "ServiceAccount" => vec![NAME, col("Secrets", "string", "Number of secrets."), AGE],
        "Event" => vec![
            col("Last Seen", "string", "Time since the event was last seen."),
            col("Type", "string", "Type of this event (Normal, Warning)."),
            col("Reason", "string", "Why the event was emitted."),
            col("Object", "string", "The object this event is about."),
            wide(
                "Subobject",
                "string",
                "The field of the object this event is about.",
            ),
            wide("Source", "string", "The component reporting this event."),
            col(
                "Message",
                "string",
                "A human-readable description of the event.",
            ),
            wide(
                "First Seen",
                "string",
                "Time since the event was first seen.",
            ),
            wide("Count", "string", "Number of times this event occurred."),
            wide("Name", "string", "Name of the event object."),
        ],
        "Deployment" => vec![
            NAME,
            col("Ready", "string", "Number of the pod with ready state."),
            col(
                "Up-to-date",
                "string",
                "Total number of non-terminated pods targeted by this deployment that have the desired template spec.",
            ),
            col(
                "Available",
                "string",
                "Total number of available pods (ready for at least minReadySeconds) targeted by this deployment.",
            ),
            AGE,
            CONTAINERS,
            IMAGES,
            SELECTOR,
        ],
        "ReplicaSet" => vec![
            NAME,
            col("Desired", "integer", "Number of desired pods."),
            col("Current", "integer", "Number of actually running pods."),
            col("Ready", "integer", "Number of ready pods."),
            AGE,
            CONTAINERS,
            IMAGES,
            SELECTOR,
        ],
        "StatefulSet" => vec![
            NAME,
            col("Ready", "string", "Number of the pod with ready state."),
            AGE,
            CONTAINERS,
            IMAGES,
        ],
        "ControllerRevision" => vec![
            NAME,
            col(
                "Controller",
                "string",
                "The controller this revision belongs to.",
            ),
            col("Revision", "integer", "The revision number."),
            AGE,
        ],
        "DaemonSet" => vec![
            NAME,
            col(
                "Desired",
                "integer",
                "The desired number of nodes that should be running the daemon pod.",
            ),
            col(
                "Current",
                "integer",
                "The number of nodes that are running at least one daemon pod.",
            ),
            col(
                "Ready",
                "integer",
                "The number of nodes that should be running the daemon pod and have one or more running and ready.",
            ),
            col(
                "Up-to-date",
                "integer",
                "The total number of nodes that are running updated daemon pod.",
            ),
            col(
                "Available",
                "integer",
                "The number of nodes that should be running the daemon pod and have one or more available.",
            ),
            col(
                "Node Selector",
                "string",
                "The node selector of the pod template.",
            ),
            AGE,
            CONTAINERS,
            IMAGES,
            SELECTOR,
        ],
        "Job" => vec![
            NAME,
            col("Status", "string", "Status of the job."),
            col("Completions", "string", "The completion status of the job."),
            col("Duration", "string", "Time required to complete the job."),
            AGE,
            CONTAINERS,
            IMAGES,
            SELECTOR,
        ],
        "CronJob" => vec![
            NAME,
            col("Schedule", "string", "The schedule in Cron format."),
            col("Timezone", "string", "The timezone for the schedule."),
            col("Suspend", "boolean", "Whether the cron job is suspended."),
            col("Active", "integer", "Number of active jobs."),
            col(
                "Last Schedule",
                "string",
                "When the last job was scheduled.",
            ),
            AGE,
            CONTAINERS,
            IMAGES,
            SELECTOR,
        ],
        "Lease" => vec![
            NAME,
            col("Holder", "string", "The holder of the lease."),
            AGE,
        ],
        "Ingress" => vec![
            NAME,
            col("Class", "string", "The name of the IngressClass resource."),
            col(
                "Hosts",
                "string",
                "Hosts that incoming requests are matched against.",
            ),
            col(
                "Address",
                "string",
                "Address is a list of IPs the ingress is reachable at.",
            ),
            col("Ports", "string", "Ports of TLS configurations that open."),
            AGE,
        ],
        "PersistentVolume" => vec![
            NAME,
            col("Capacity", "string", "The volume's size."),
            col("Access Modes", "string", "How the volume can be mounted."),
            col(
                "Reclaim Policy",
                "string",
                "What happens to the volume when its claim is released.",
            ),
            col("Status", "string", "The volume's phase."),
            col("Claim", "string", "The claim bound to the volume."),
            col("StorageClass", "string", "The volume's class."),
            col(
                "VolumeAttributesClass",
                "string",
                "The volume's attributes class.",
            ),
            col("Reason", "string", "Why the volume is in its phase."),
            AGE,
            wide("VolumeMode", "string", "Filesystem or Block."),
        ],
        "PersistentVolumeClaim" => vec![
            NAME,
            col("Status", "string", "The claim's phase."),
            col("Volume", "string", "The volume bound to the claim."),
            col("Capacity", "string", "The bound volume's size."),
            col("Access Modes", "string", "How the volume can be mounted."),
            col("StorageClass", "string", "The claim's class."),
            col(
                "VolumeAttributesClass",
                "string",
                "The claim's attributes class.",
            ),
            AGE,
            wide("VolumeMode", "string", "Filesystem or Block."),
        ],
        "StorageClass" => vec![
            NAME,
            col(
                "Provisioner",
                "string",
                "Who provisions the class's volumes.",
            ),
            col(
                "ReclaimPolicy",
                "string",
                "What happens to a provisioned volume when its claim is released.",
            ),
            col(
                "VolumeBindingMode",
                "string",
                "When claims are bound and provisioned.",
            ),
            col(
                "AllowVolumeExpansion",
                "string",
                "Whether claims of the class may grow.",
            ),
            AGE,
        ],
        "CertificateSigningRequest" => vec![
            NAME,
            AGE,
            col(
                "SignerName",
                "string",
                "Indicates the requested signer, and is a qualified name.",
            ),
            col(
                "Requestor",
                "string",
                "Contains the name of the user that created the CertificateSigningRequest.",
            ),
            col(
                "RequestedDuration",
                "string",
                "The requested duration of validity of the issued certificate.",
            ),
            col(
                "Condition",
                "string",
                "The current condition of the request: Pending, Approved, Denied or Failed, and Issued once signed.",
            ),
        ],
        "NetworkPolicy" => vec![
            NAME,
            col(
                "Pod-Selector",
                "string",
                "Selects the pods to which this NetworkPolicy object applies.",
            ),
            AGE,
        ],
        "IngressClass" => vec![
            NAME,
            col(
                "Controller",
                "string",
                "Controller that implements the class.",
            ),
            col(
                "Parameters",
                "string",
                "A reference to a resource with additional parameters.",
            ),
            AGE,
        ],
        "GatewayClass" => vec![
            NAME,
            col("Controller", "string", "The controller of the class."),
            col("Accepted", "string", "The Accepted condition's status."),
            AGE,
        ],
        "Gateway" => vec![
            NAME,
            col("Class", "string", "The GatewayClass of the Gateway."),
            col("Address", "string", "The first address the Gateway has."),
            col("Programmed", "string", "The Programmed condition's status."),
            AGE,
        ],
        "HTTPRoute" => vec![
            NAME,
            col("Hostnames", "string", "The hostnames the route matches."),
            AGE,
        ],
        "RoleBinding" | "ClusterRoleBinding" => vec![
            NAME,
            col("Role", "string", "The role the binding grants."),
            AGE,
        ],
        "ResourceQuota" => vec![
            NAME,
            AGE,
            col(
                "Request",
                "string",
                "The used and hard amounts of what the quota limits, apart from limits.*.",
            ),
            col(
                "Limit",
                "string",
                "The used and hard amounts of the limits.* the quota limits.",
            ),
        ],
        "LimitRange" => vec![
            NAME,
            col("Created At", "date", "When the object was created."),
        ],
        "PodDisruptionBudget" => vec![
            NAME,
            col(
                "Min Available",
                "string",
                "The pods that must stay available.",
            ),
            col(
                "Max Unavailable",
                "string",
                "The pods that may be unavailable.",
            ),
            col(
                "Allowed Disruptions",
                "integer",
                "How many pods may be evicted now.",
            ),
            AGE,
        ],
        "HorizontalPodAutoscaler" => vec![
            NAME,
            col("Reference", "string", "The resource being scaled."),
            col(
                "Targets",
                "string",
                "The current and target values of the metrics.",
            ),
            col("MinPods", "string", "The lower limit of replicas."),
            col("MaxPods", "integer", "The upper limit of replicas."),
            col("Replicas", "integer", "The current number of replicas."),
            AGE,
        ],
        // Knative's printer columns, as its CRDs declare them.
        "knative.Service" => vec![
            NAME,
            col("URL", "string", "The URL the service is served at."),
            col("LatestCreated", "string", "The latest revision created."),
            col("LatestReady", "string", "The latest revision ready."),
            col("Ready", "string", "The Ready condition's status."),
            col("Reason", "string", "The Ready condition's reason."),
        ],
        "Configuration" => vec![
            NAME,
            col("LatestCreated", "string", "The latest revision created."),
            col("LatestReady", "string", "The latest revision ready."),
            col("Ready", "string", "The Ready condition's status."),
            col("Reason", "string", "The Ready condition's reason."),
        ],
        "Revision" => vec![
            NAME,
            col("Config Name", "string", "The configuration that made it."),
            col(
                "Generation",
                "string",
                "The configuration's generation it was made from.",
            ),
            col("Ready", "string", "The Ready condition's status."),
            col("Reason", "string", "The Ready condition's reason."),
            col("Actual Replicas", "integer", "Pods ready."),
            col("Desired Replicas", "integer", "Pods the autoscaler wants."),
        ],
        "Route" => vec![
            NAME,
            col("URL", "string", "The URL the route is served at."),
            col("Ready", "string", "The Ready condition's status."),
            col("Reason", "string", "The Ready condition's reason."),
        ],
        "EndpointSlice" => vec![
            NAME,
            col(
                "AddressType",
                "string",
                "The address type of the endpoints.",
            ),
            col("Ports", "string", "Ports of the endpoint slice."),
            col("Endpoints", "string", "Addresses of the endpoints."),
            AGE,
        ],
        "RuntimeClass" => vec![NAME, col("Handler", "string", "The runtime handler."), AGE],
        "MutatingWebhookConfiguration" | "ValidatingWebhookConfiguration" => vec![
            NAME,
            col(
                "Webhooks",
                "integer",
                "The number of webhooks in the configuration.",
            ),
            AGE,
        ],
        "ValidatingAdmissionPolicy" => vec![
            NAME,
            col(
                "Validations",
                "integer",
                "The number of validations of the policy.",
            ),
            col(
                "ParamKind",
                "string",
                "The kind of the policy's parameters.",
            ),
            AGE,
        ],
        "ValidatingAdmissionPolicyBinding" => vec![
            NAME,
            col(
                "PolicyName",
                "string",
                "The policy the binding puts in force.",
            ),
            col("ParamRef", "string", "Where the binding's parameters are."),
            AGE,
        ],
        "CustomResourceDefinition" => vec![
            NAME,
            col("Created At", "date", "When the definition was created."),
        ],
        "PriorityClass" => vec![
            NAME,
            col("Value", "integer", "The priority of pods in this class."),
            col(
                "Global-Default",
                "boolean",
                "Whether this class is the default for pods without one.",
            ),
            AGE,
            col(
                "PreemptionPolicy",
                "string",
                "Whether pods of this class may preempt lower-priority pods.",
            ),
        ],
        _ => vec![NAME, AGE],
    }
}

/// Kubernetes' `duration.HumanDuration`: `45s`, `3m12s`, `5h`, `12d`.
pub fn human_duration(seconds: i64) -> String {
    if seconds < -1 {
        return "<invalid>".into();
    }
    if seconds < 0 {
        return "0s".into();
    }
    if seconds < 120 {
        return format!("{seconds}s");
    }
    let minutes = seconds / 60;
    if minutes < 10 {
        let s = seconds % 60;
        return if s == 0 {
            format!("{minutes}m")
        } else {
            format!("{minutes}m{s}s")
        };
    }
    if minutes < 180 {
        return format!("{minutes}m");
    }
    let hours = seconds / 3600;
    if hours < 8 {
        let m = minutes % 60;
        return if m == 0 {
            format!("{hours}h")
        } else {
            format!("{hours}h{m}m")
        };
    }
    if hours < 48 {
        return format!("{hours}h");
    }
    if hours < 24 * 8 {
        let h = hours % 24;
        return if h == 0 {
            format!("{}d", hours / 24)
        } else {
            format!("{}d{h}h", hours / 24)
        };
    }
    if hours < 24 * 365 * 2 {
        return format!("{}d", hours / 24);
    }
    if hours < 24 * 365 * 8 {
        let d = (hours / 24) % 365;
        return if d == 0 {
            format!("{}y", hours / 24 / 365)
        } else {
            format!("{}y{d}d", hours / 24 / 365)
        };
    }
    format!("{}y", hours / 24 / 365)
}

fn since(ts: &Value, now: DateTime<Utc>) -> String {
    match ts
        .as_str()
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
    {
        Some(t) => human_duration((now - t.with_timezone(&Utc)).num_seconds()),
        None => "<unknown>".into(),
    }
}

/// A count or percentage (`2`, `50%`), or `N/A` when unset, as kubectl
/// prints a PodDisruptionBudget's bounds.
fn int_or_string_or_na(v: &Value) -> String {
    match v {
        Value::Number(n) => n.to_string(),
        Value::String(p) => p.clone(),
        _ => "N/A".into(),
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn int(v: &Value) -> i64 {
    v.as_i64().unwrap_or(0)
}

/// The status of the condition `ty` in `status.conditions`, or `Unknown`.
fn condition_status(status: &Value, ty: &str) -> String {
    status["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == ty)
        .map(|c| s(&c["status"]))
        .unwrap_or_else(|| "Unknown".into())
}

/// kubectl's TARGETS: `cpu: 12%/50%`, `memory: 10Mi/64Mi`, `rps: 3/10`,
/// `<unknown>` where nothing was measured yet.
fn hpa_targets(spec: &Value, status: &Value) -> String {
    let metrics = spec["metrics"].as_array().cloned().unwrap_or_default();
    if metrics.is_empty() {
        return "<none>".into();
    }
    let current = status["currentMetrics"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let parts: Vec<String> = metrics
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let kind = s(&m["type"]);
            let field = match kind.as_str() {
                "Resource" => "resource",
                "Pods" => "pods",
                "Object" => "object",
                "External" => "external",
                _ => "containerResource",
            };
            let src = &m[field];
            let name = if field == "resource" || field == "containerResource" {
                s(&src["name"])
            } else {
                s(&src["metric"]["name"])
            };
            let target = &src["target"];
            let cur = &current
                .get(i)
                .map(|c| c[field]["current"].clone())
                .unwrap_or_default();
            let (now, want) = if let Some(u) = target["averageUtilization"].as_i64() {
                (
                    cur["averageUtilization"]
                        .as_i64()
                        .map(|c| format!("{c}%"))
                        .unwrap_or_else(|| "<unknown>".into()),
                    format!("{u}%"),
                )
            } else {
                let key = if target["averageValue"].is_null() {
                    "value"
                } else {
                    "averageValue"
                };
                let c = s(&cur[key]);
                (
                    if c.is_empty() { "<unknown>".into() } else { c },
                    s(&target[key]),
                )
            };
            format!("{name}: {now}/{want}")
        })
        .collect();
    parts.join(", ")
}

fn condition_reason(status: &Value, ty: &str) -> String {
    status["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == ty)
        .map(|c| s(&c["reason"]))
        .unwrap_or_default()
}

/// Access modes as kubectl abbreviates them (`RWO,ROX`).
fn access_modes(modes: &Value) -> String {
    modes
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(|m| match m {
            "ReadWriteOnce" => "RWO",
            "ReadOnlyMany" => "ROX",
            "ReadWriteMany" => "RWX",
            "ReadWriteOncePod" => "RWOP",
            other => other,
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn unset(v: String) -> String {
    if v.is_empty() { "<unset>".into() } else { v }
}

fn or_none(v: String) -> String {
    if v.is_empty() { "<none>".into() } else { v }
}

fn join_names(list: &Value, field: &str) -> String {
    list.as_array()
        .map(|a| a.iter().map(|c| s(&c[field])).collect::<Vec<_>>().join(","))
        .unwrap_or_default()
}

fn selector_string(sel: &Value) -> String {
    or_none(crate::selectors::render(sel))
}

fn map_selector(sel: &Value) -> String {
    or_none(
        sel.as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| format!("{k}={}", s(v)))
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default(),
    )
}

fn template_cells(template_spec: &Value, selector: String) -> [Value; 3] {
    [
        json!(join_names(&template_spec["containers"], "name")),
        json!(join_names(&template_spec["containers"], "image")),
        json!(selector),
    ]
}

/// Kubernetes' pod STATUS column logic (simplified from `printPod`).
fn pod_status(pod: &Value) -> (String, usize, usize, i64) {
    let status = &pod["status"];
    let mut reason = s(&status["phase"]);
    if let Some(r) = status["reason"].as_str() {
        reason = r.to_owned();
    }
    let containers = status["containerStatuses"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let total = pod["spec"]["containers"].as_array().map_or(0, Vec::len);
    let mut ready = 0;
    let mut restarts = 0;
    let mut initializing = false;
    for (i, c) in status["initContainerStatuses"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        restarts += int(&c["restartCount"]);
        let state = &c["state"];
        if state["terminated"]["exitCode"] == 0 && state["terminated"].is_object() {
            continue;
        }
        initializing = true;
        reason = if let Some(r) = state["terminated"]["reason"].as_str() {
            format!("Init:{r}")
        } else if state["terminated"].is_object() {
            format!("Init:ExitCode:{}", int(&state["terminated"]["exitCode"]))
        } else if let Some(r) = state["waiting"]["reason"]
            .as_str()
            .filter(|r| *r != "PodInitializing")
        {
            format!("Init:{r}")
        } else {
            format!(
                "Init:{i}/{}",
                pod["spec"]["initContainers"].as_array().map_or(0, Vec::len)
            )
        };
        break;
    }
    if !initializing {
        let mut has_running = false;
        for c in containers.iter().rev() {
            restarts += int(&c["restartCount"]);
            let state = &c["state"];
            if let Some(r) = state["waiting"]["reason"].as_str() {
                reason = r.to_owned();
            } else if let Some(r) = state["terminated"]["reason"].as_str() {
                reason = r.to_owned();
            } else if state["terminated"].is_object() {
                reason = match state["terminated"]["signal"].as_i64() {
                    Some(sig) if sig != 0 => format!("Signal:{sig}"),
                    _ => format!("ExitCode:{}", int(&state["terminated"]["exitCode"])),
                };
            } else if state["running"].is_object() && c["ready"] == true {
                has_running = true;
                ready += 1;
            } else if state["running"].is_object() {
                has_running = true;
            }
        }
        if reason == "Completed" && has_running {
            reason = if pod["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
            {
                "Running".into()
            } else {
                "NotReady".into()
            };
        }
    } else {
        for c in &containers {
            restarts += int(&c["restartCount"]);
        }
    }
    if !pod["metadata"]["deletionTimestamp"].is_null() {
        reason = if status["reason"] == "NodeLost" {
            "Unknown".into()
        } else {
            "Terminating".into()
        };
    }
    if reason.is_empty() {
        reason = "Pending".into();
    }
    (reason, ready, total, restarts)
}

fn service_ports(spec: &Value) -> String {
    let ports: Vec<String> = spec["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| match p["nodePort"].as_i64() {
            Some(np) => format!("{}:{np}/{}", int(&p["port"]), s(&p["protocol"])),
            None => format!("{}/{}", int(&p["port"]), s(&p["protocol"])),
        })
        .collect();
    or_none(ports.join(","))
}

fn endpoints_summary(addrs: impl Iterator<Item = String>) -> String {
    let all: Vec<String> = addrs.collect();
    if all.is_empty() {
        return "<none>".into();
    }
    let shown = all.iter().take(3).cloned().collect::<Vec<_>>().join(",");
    if all.len() > 3 {
        format!("{shown} + {} more...", all.len() - 3)
    } else {
        shown
    }
}

fn job_status(job: &Value) -> String {
    let conditions = job["status"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let has = |t: &str| {
        conditions
            .iter()
            .any(|c| c["type"] == t && c["status"] == "True")
    };
    if has("Complete") {
        "Complete".into()
    } else if has("Failed") {
        "Failed".into()
    } else if has("FailureTarget") {
        "FailureTarget".into()
    } else if has("SuccessCriteriaMet") {
        "SuccessCriteriaMet".into()
    } else if job["spec"]["suspend"] == true {
        "Suspended".into()
    } else {
        "Running".into()
    }
}

/// The cells of one row, one per column of [`columns`].
pub fn cells(rt: &ResourceType, obj: &Value, now: DateTime<Utc>) -> Vec<Value> {
    let name = json!(s(&obj["metadata"]["name"]));
    let age = json!(since(&obj["metadata"]["creationTimestamp"], now));
    let spec = &obj["spec"];
    let status = &obj["status"];
    match rt.id() {
        "Pod" => {
            let (reason, ready, total, restarts) = pod_status(obj);
            let gates = spec["readinessGates"].as_array().map_or(0, Vec::len);
            vec![
                name,
                json!(format!("{ready}/{total}")),
                json!(reason),
                json!(restarts.to_string()),
                age,
                json!(or_none(s(&status["podIP"]))),
                json!(or_none(s(&spec["nodeName"]))),
                json!(or_none(s(&status["nominatedNodeName"]))),
                json!(if gates == 0 {
                    "<none>".to_owned()
                } else {
                    format!("0/{gates}")
                }),
            ]
        }
        "Namespace" => vec![name, json!(s(&status["phase"])), age],
        "Node" => {
            let conditions = status["conditions"].as_array().cloned().unwrap_or_default();
            let mut st = match conditions.iter().find(|c| c["type"] == "Ready") {
                Some(c) if c["status"] == "True" => "Ready".to_owned(),
                Some(_) => "NotReady".to_owned(),
                None => "Unknown".to_owned(),
            };
            if spec["unschedulable"] == true {
                st.push_str(",SchedulingDisabled");
            }
            let roles: Vec<String> = obj["metadata"]["labels"]
                .as_object()
                .into_iter()
                .flatten()
                .filter_map(|(k, _)| {
                    k.strip_prefix("node-role.kubernetes.io/")
                        .map(str::to_owned)
                })
                .collect();
            let addr = |t: &str| {
                or_none(
                    status["addresses"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter(|a| a["type"] == t)
                        .map(|a| s(&a["address"]))
                        .collect::<Vec<_>>()
                        .join(","),
                )
            };
            let info = &status["nodeInfo"];
            vec![
                name,
                json!(st),
                json!(or_none(roles.join(","))),
                age,
                json!(s(&info["kubeletVersion"])),
                json!(addr("InternalIP")),
                json!(addr("ExternalIP")),
                json!(or_none(s(&info["osImage"]))),
                json!(or_none(s(&info["kernelVersion"]))),
                json!(or_none(s(&info["containerRuntimeVersion"]))),
            ]
        }
        "Service" => {
            let ty = s(&spec["type"]);
            let external = match ty.as_str() {
                "ExternalName" => s(&spec["externalName"]),
                "LoadBalancer" => {
                    let ips: Vec<String> = status["loadBalancer"]["ingress"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|i| s(&i["ip"]))
                        .collect();
                    if ips.is_empty() {
                        "<pending>".into()
                    } else {
                        ips.join(",")
                    }
                }
                _ => or_none(
                    spec["externalIPs"]
                        .as_array()
                        .map(|a| a.iter().map(s).collect::<Vec<_>>().join(","))
                        .unwrap_or_default(),
                ),
            };
            vec![
                name,
                json!(ty),
                json!(or_none(s(&spec["clusterIP"]))),
                json!(external),
                json!(service_ports(spec)),
                age,
                json!(map_selector(&spec["selector"])),
            ]
        }
        "Endpoints" => {
            let addrs = obj["subsets"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|subset| {
                    let ports: Vec<i64> = subset["ports"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|p| int(&p["port"]))
                        .collect();
                    subset["addresses"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .flat_map(move |a| {
                            let ip = s(&a["ip"]);
                            if ports.is_empty() {
                                vec![ip]
                            } else {
                                ports.iter().map(|p| format!("{ip}:{p}")).collect()
                            }
                        })
                        .collect::<Vec<_>>()
                });
            vec![name, json!(endpoints_summary(addrs)), age]
        }
        "ConfigMap" => {
            let n = obj["data"].as_object().map_or(0, |m| m.len())
                + obj["binaryData"].as_object().map_or(0, |m| m.len());
            vec![name, json!(n), age]
        }
        "Secret" => vec![
            name,
            json!(s(&obj["type"])),
            json!(obj["data"].as_object().map_or(0, |m| m.len())),
            age,
        ],
        "ServiceAccount" => vec![
            name,
            json!(obj["secrets"].as_array().map_or(0, Vec::len)),
            age,
        ],
        "Event" => {
            let last = if !obj["lastTimestamp"].is_null() {
                &obj["lastTimestamp"]
            } else if !obj["eventTime"].is_null() {
                &obj["eventTime"]
            } else {
                &obj["metadata"]["creationTimestamp"]
            };
            let first = if obj["firstTimestamp"].is_null() {
                last
            } else {
                &obj["firstTimestamp"]
            };
            let io = &obj["involvedObject"];
            let source = if obj["source"]["component"].is_null() {
                s(&obj["reportingComponent"])
            } else {
                s(&obj["source"]["component"])
            };
            vec![
                json!(since(last, now)),
                json!(s(&obj["type"])),
                json!(s(&obj["reason"])),
                json!(format!(
                    "{}/{}",
                    s(&io["kind"]).to_lowercase(),
                    s(&io["name"])
                )),
                json!(s(&io["fieldPath"])),
                json!(source),
                json!(s(&obj["message"]).trim().to_owned()),
                json!(since(first, now)),
                json!(int(&obj["count"]).max(1)),
                json!(s(&obj["metadata"]["name"])),
            ]
        }
        "Deployment" => {
            let mut row = vec![
                name,
                json!(format!(
                    "{}/{}",
                    int(&status["readyReplicas"]),
                    int(&spec["replicas"])
                )),
                json!(int(&status["updatedReplicas"])),
                json!(int(&status["availableReplicas"])),
                age,
            ];
            row.extend(template_cells(
                &spec["template"]["spec"],
                selector_string(&spec["selector"]),
            ));
            row
        }
        "ReplicaSet" => {
            let mut row = vec![
                name,
                json!(int(&spec["replicas"])),
                json!(int(&status["replicas"])),
                json!(int(&status["readyReplicas"])),
                age,
            ];
            row.extend(template_cells(
                &spec["template"]["spec"],
                selector_string(&spec["selector"]),
            ));
            row
        }
        "StatefulSet" => {
            let mut row = vec![
                name,
                json!(format!(
                    "{}/{}",
                    int(&status["readyReplicas"]),
                    int(&spec["replicas"])
                )),
                age,
            ];
            let [containers, images, _] = template_cells(&spec["template"]["spec"], String::new());
            row.extend([containers, images]);
            row
        }
        "ControllerRevision" => {
            let owner = obj["metadata"]["ownerReferences"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|o| o["controller"] == true);
            let controller = owner.map_or("<none>".to_owned(), |o| {
                let group = o["apiVersion"]
                    .as_str()
                    .and_then(|v| v.split_once('/'))
                    .map_or(String::new(), |(g, _)| format!(".{g}"));
                format!("{}{group}/{}", s(&o["kind"]).to_lowercase(), s(&o["name"]))
            });
            vec![name, json!(controller), json!(int(&obj["revision"])), age]
        }
        "DaemonSet" => {
            let mut row = vec![
                name,
                json!(int(&status["desiredNumberScheduled"])),
                json!(int(&status["currentNumberScheduled"])),
                json!(int(&status["numberReady"])),
                json!(int(&status["updatedNumberScheduled"])),
                json!(int(&status["numberAvailable"])),
                json!(map_selector(&spec["template"]["spec"]["nodeSelector"])),
                age,
            ];
            row.extend(template_cells(
                &spec["template"]["spec"],
                selector_string(&spec["selector"]),
            ));
            row
        }
        "Job" => {
            let completions = match spec["completions"].as_i64() {
                Some(c) => format!("{}/{c}", int(&status["succeeded"])),
                None => format!(
                    "{}/1 of {}",
                    int(&status["succeeded"]),
                    int(&spec["parallelism"])
                ),
            };
            let duration = match (
                status["startTime"].as_str(),
                status["completionTime"].as_str(),
            ) {
                (Some(start), end) => {
                    let start = DateTime::parse_from_rfc3339(start)
                        .map(|t| t.with_timezone(&Utc))
                        .unwrap_or(now);
                    let end = end
                        .and_then(|e| DateTime::parse_from_rfc3339(e).ok())
                        .map_or(now, |t| t.with_timezone(&Utc));
                    human_duration((end - start).num_seconds())
                }
                _ => String::new(),
            };
            let mut row = vec![
                name,
                json!(job_status(obj)),
                json!(completions),
                json!(duration),
                age,
            ];
            row.extend(template_cells(
                &spec["template"]["spec"],
                selector_string(&spec["selector"]),
            ));
            row
        }
        "CronJob" => {
            let last = if status["lastScheduleTime"].is_null() {
                "<none>".into()
            } else {
                since(&status["lastScheduleTime"], now)
            };
            let mut row = vec![
                name,
                json!(s(&spec["schedule"])),
                json!(or_none(s(&spec["timeZone"]))),
                json!(spec["suspend"] == true),
                json!(status["active"].as_array().map_or(0, Vec::len)),
                json!(last),
                age,
            ];
            let job_spec = &spec["jobTemplate"]["spec"];
            row.extend(template_cells(
                &job_spec["template"]["spec"],
                selector_string(&job_spec["selector"]),
            ));
            row
        }
        "Lease" => vec![name, json!(or_none(s(&spec["holderIdentity"]))), age],
        "Ingress" => {
            let hosts: Vec<String> = spec["rules"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| r["host"].as_str().map(str::to_owned))
                .collect();
            let addresses: Vec<String> = status["loadBalancer"]["ingress"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|i| s(&i["ip"]) + &s(&i["hostname"]))
                .collect();
            let tls = spec["tls"].as_array().is_some_and(|t| !t.is_empty());
            vec![
                name,
                json!(or_none(s(&spec["ingressClassName"]))),
                json!(if hosts.is_empty() {
                    "*".to_owned()
                } else {
                    hosts.join(",")
                }),
                json!(addresses.join(",")),
                json!(if tls { "80, 443" } else { "80" }),
                age,
            ]
        }
        "PersistentVolume" => {
            let claim = &spec["claimRef"];
            vec![
                name,
                json!(s(&spec["capacity"]["storage"])),
                json!(access_modes(&spec["accessModes"])),
                json!(s(&spec["persistentVolumeReclaimPolicy"])),
                json!(s(&status["phase"])),
                json!(if claim.is_object() {
                    format!("{}/{}", s(&claim["namespace"]), s(&claim["name"]))
                } else {
                    String::new()
                }),
                json!(s(&spec["storageClassName"])),
                json!(unset(s(&spec["volumeAttributesClassName"]))),
                json!(s(&status["reason"])),
                age,
                json!(s(&spec["volumeMode"])),
            ]
        }
        "PersistentVolumeClaim" => vec![
            name,
            json!(s(&status["phase"])),
            json!(s(&spec["volumeName"])),
            json!(s(&status["capacity"]["storage"])),
            json!(access_modes(&status["accessModes"])),
            json!(s(&spec["storageClassName"])),
            json!(unset(s(&spec["volumeAttributesClassName"]))),
            age,
            json!(s(&spec["volumeMode"])),
        ],
        "StorageClass" => {
            let mut shown = s(&obj["metadata"]["name"]);
            if obj["metadata"]["annotations"][crate::storage::DEFAULT_STORAGE_CLASS] == "true" {
                shown.push_str(" (default)");
            }
            vec![
                json!(shown),
                json!(s(&obj["provisioner"])),
                json!(s(&obj["reclaimPolicy"])),
                json!(s(&obj["volumeBindingMode"])),
                json!((obj["allowVolumeExpansion"] == true).to_string()),
                age,
            ]
        }
        "NetworkPolicy" => vec![name, json!(selector_string(&spec["podSelector"])), age],
        "CertificateSigningRequest" => {
            let mut condition: Vec<String> = status["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|c| c["status"] != "False")
                .filter_map(|c| c["type"].as_str().map(str::to_owned))
                .collect();
            if status["certificate"]
                .as_str()
                .is_some_and(|c| !c.is_empty())
            {
                condition.push("Issued".into());
            }
            if condition.is_empty() {
                condition.push("Pending".into());
            }
            let duration = spec["expirationSeconds"]
                .as_i64()
                .map_or_else(|| "<none>".to_owned(), human_duration);
            vec![
                name,
                age,
                json!(s(&spec["signerName"])),
                json!(s(&spec["username"])),
                json!(duration),
                json!(condition.join(",")),
            ]
        }
        "IngressClass" => {
            let params = &spec["parameters"];
            let params = if params.is_object() {
                format!("{}/{}", s(&params["kind"]), s(&params["name"]))
            } else {
                "<none>".into()
            };
            vec![name, json!(s(&spec["controller"])), json!(params), age]
        }
        "GatewayClass" => vec![
            name,
            json!(s(&spec["controllerName"])),
            json!(condition_status(status, "Accepted")),
            age,
        ],
        "Gateway" => vec![
            name,
            json!(s(&spec["gatewayClassName"])),
            json!(s(&status["addresses"][0]["value"])),
            json!(condition_status(status, "Programmed")),
            age,
        ],
        "RoleBinding" | "ClusterRoleBinding" => vec![
            name,
            json!(format!(
                "{}/{}",
                s(&obj["roleRef"]["kind"]),
                s(&obj["roleRef"]["name"])
            )),
            age,
        ],
        "ResourceQuota" => {
            let (mut request, mut limit) = (Vec::new(), Vec::new());
            let mut names: Vec<&String> = status["hard"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, _)| k)
                .collect();
            names.sort();
            for k in names {
                let used = status["used"][k.as_str()].as_str().unwrap_or("0");
                let shown = format!("{k}: {used}/{}", s(&status["hard"][k.as_str()]));
                if k.starts_with("limits.") {
                    limit.push(shown);
                } else {
                    request.push(shown);
                }
            }
            vec![
                name,
                age,
                json!(request.join(", ")),
                json!(limit.join(", ")),
            ]
        }
        "LimitRange" => vec![name, json!(s(&obj["metadata"]["creationTimestamp"]))],
        "PodDisruptionBudget" => vec![
            name,
            json!(int_or_string_or_na(&spec["minAvailable"])),
            json!(int_or_string_or_na(&spec["maxUnavailable"])),
            json!(status["disruptionsAllowed"].as_i64().unwrap_or(0)),
            age,
        ],
        "HorizontalPodAutoscaler" => vec![
            name,
            json!(format!(
                "{}/{}",
                s(&spec["scaleTargetRef"]["kind"]),
                s(&spec["scaleTargetRef"]["name"])
            )),
            json!(hpa_targets(spec, status)),
            json!(match spec["minReplicas"].as_i64() {
                Some(n) => n.to_string(),
                None => "<unset>".into(),
            }),
            spec["maxReplicas"].clone(),
            json!(status["currentReplicas"].as_i64().unwrap_or(0)),
            age,
        ],
        "knative.Service" => vec![
            name,
            json!(s(&status["url"])),
            json!(s(&status["latestCreatedRevisionName"])),
            json!(s(&status["latestReadyRevisionName"])),
            json!(condition_status(status, "Ready")),
            json!(condition_reason(status, "Ready")),
        ],
        "Configuration" => vec![
            name,
            json!(s(&status["latestCreatedRevisionName"])),
            json!(s(&status["latestReadyRevisionName"])),
            json!(condition_status(status, "Ready")),
            json!(condition_reason(status, "Ready")),
        ],
        "Revision" => {
            let labels = &obj["metadata"]["labels"];
            vec![
                name,
                json!(s(&labels[crate::knative::labels::CONFIGURATION])),
                json!(s(&labels[crate::knative::labels::CONFIGURATION_GENERATION])),
                json!(condition_status(status, "Ready")),
                json!(condition_reason(status, "Ready")),
                status["actualReplicas"].clone(),
                status["desiredReplicas"].clone(),
            ]
        }
        "Route" => vec![
            name,
            json!(s(&status["url"])),
            json!(condition_status(status, "Ready")),
            json!(condition_reason(status, "Ready")),
        ],
        "HTTPRoute" => {
            let hosts: Vec<String> = spec["hostnames"]
                .as_array()
                .into_iter()
                .flatten()
                .map(s)
                .collect();
            vec![name, json!(hosts.join(",")), age]
        }
        "EndpointSlice" => {
            let ports: Vec<String> = obj["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| int(&p["port"]).to_string())
                .collect();
            let addrs = obj["endpoints"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|e| e["addresses"].as_array().cloned().unwrap_or_default())
                .map(|a| s(&a));
            vec![
                name,
                json!(s(&obj["addressType"])),
                json!(if ports.is_empty() {
                    "<unset>".to_owned()
                } else {
                    ports.join(",")
                }),
                json!(endpoints_summary(addrs)),
                age,
            ]
        }
        "RuntimeClass" => vec![name, json!(s(&obj["handler"])), age],
        "MutatingWebhookConfiguration" | "ValidatingWebhookConfiguration" => vec![
            name,
            json!(obj["webhooks"].as_array().map_or(0, Vec::len)),
            age,
        ],
        "ValidatingAdmissionPolicy" => vec![
            name,
            json!(obj["spec"]["validations"].as_array().map_or(0, Vec::len)),
            json!(match obj["spec"]["paramKind"].as_object() {
                Some(k) => format!(
                    "{}/{}",
                    k.get("apiVersion")
                        .and_then(Value::as_str)
                        .unwrap_or_default(),
                    k.get("kind").and_then(Value::as_str).unwrap_or_default()
                ),
                None => "<unset>".into(),
            }),
            age,
        ],
        "ValidatingAdmissionPolicyBinding" => vec![
            name,
            json!(s(&obj["spec"]["policyName"])),
            json!(match obj["spec"]["paramRef"]["name"].as_str() {
                Some(n) => format!(
                    "{}/{n}",
                    obj["spec"]["paramRef"]["namespace"].as_str().unwrap_or("*")
                ),
                None if obj["spec"]["paramRef"].is_object() => "*/*".into(),
                None => "<unset>".into(),
            }),
            age,
        ],
        "CustomResourceDefinition" => vec![name, obj["metadata"]["creationTimestamp"].clone()],
        "PriorityClass" => vec![
            name,
            json!(int(&obj["value"])),
            json!(obj["globalDefault"] == true),
            age,
            json!(s(&obj["preemptionPolicy"])),
        ],
        _ => vec![name, age],
    }
}

/// The `columnDefinitions` member of a `meta.k8s.io/v1` Table.
pub fn column_definitions(rt: &ResourceType) -> Value {
    if let Some(custom) = rt.custom {
        return crate::custom::table_columns(custom);
    }
    Value::Array(
        columns(rt)
            .iter()
            .map(|c| {
                json!({
                    "name": c.name,
                    "type": c.ty,
                    "format": if c.name == "Name" { "name" } else { "" },
                    "description": c.description,
                    "priority": if c.wide { 1 } else { 0 },
                })
            })
            .collect(),
    )
}

/// One Table row for `obj`, carrying its metadata as kubectl expects.
pub fn row(rt: &ResourceType, obj: &Value, now: DateTime<Utc>) -> Value {
    let cells = match rt.custom {
        Some(custom) => crate::custom::table_cells(custom, obj, |ts| since(ts, now)),
        // Cells read the stored version's fields.
        None if crate::conversion::converts(rt) => {
            cells(rt, &crate::conversion::to_stored(rt, obj.clone()), now)
        }
        None => cells(rt, obj, now),
    };
    json!({
        "cells": cells,
        "object": {
            "kind": "PartialObjectMetadata",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": obj["metadata"],
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::lookup;

    #[test]
    fn human_durations_match_kubernetes() {
        let cases = [
            (5, "5s"),
            (119, "119s"),
            (125, "2m5s"),
            (600, "10m"),
            (3 * 3600, "3h"),
            (3 * 3600 + 120, "3h2m"),
            (30 * 3600, "30h"),
            (3 * 86400 + 3600, "3d1h"),
            (30 * 86400, "30d"),
            (800 * 86400, "2y70d"),
        ];
        for (secs, want) in cases {
            assert_eq!(human_duration(secs), want, "{secs}");
        }
    }

    #[test]
    fn every_row_has_one_cell_per_column() {
        let now = Utc::now();
        for rt in crate::registry::RESOURCES {
            let obj =
                json!({"metadata": {"name": "x", "creationTimestamp": "2020-01-01T00:00:00Z"}});
            assert_eq!(cells(rt, &obj, now).len(), columns(rt).len(), "{}", rt.kind);
        }
    }

    #[test]
    fn pod_status_column() {
        let rt = lookup("", "v1", "pods").unwrap();
        let now = Utc::now();
        let pod = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "a"}, {"name": "b"}]},
            "status": {"phase": "Running", "containerStatuses": [
                {"name": "a", "ready": true, "restartCount": 2, "state": {"running": {}}},
                {"name": "b", "ready": false, "restartCount": 1, "state": {"waiting": {"reason": "CrashLoopBackOff"}}}]}});
        let c = cells(rt, &pod, now);
        assert_eq!(
            (c[1].as_str(), c[2].as_str(), c[3].as_str()),
            (Some("1/2"), Some("CrashLoopBackOff"), Some("3"))
        );
        let pending = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "a"}]}, "status": {"phase": "Pending"}});
        assert_eq!(cells(rt, &pending, now)[2], "Pending");
    }
}
