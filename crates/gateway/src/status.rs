//! The status the built-in gateway's objects get, written by one writer per
//! cluster (under the controller manager's lease): GatewayClasses
//! `Accepted`; Gateways `Accepted` and `Programmed` with the nodes'
//! addresses and per-listener conditions and attached route counts;
//! HTTPRoutes a parent status per Gateway of the class (`Accepted`,
//! `ResolvedRefs` with the specification's reasons); Ingresses the nodes'
//! addresses in `status.loadBalancer`. Level-triggered: every change
//! recomputes everything and writes only what differs.

use std::collections::BTreeMap;

use chrono::Utc;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Secret, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, Time};
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};
use wasmkube_api::gateway_api::{
    GROUP, Gateway, GatewayAddress, GatewayClass, GatewayClassStatus, GatewayStatus, HTTPRoute,
    HTTPRouteStatus, ListenerStatus, RouteGroupKind, RouteParentStatus,
};
use wasmkube_api::nodes::ready_internal_ips;

use crate::routes::{self, CONTROLLER};
use crate::{Caches, Held};

/// A condition, keeping the previous one's transition time when its status
/// did not change.
fn condition(
    previous: &[Condition],
    type_: &str,
    ok: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    let last = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| Time(now()));
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: last,
    }
}

fn now() -> k8s_openapi::jiff::Timestamp {
    let t = Utc::now();
    k8s_openapi::jiff::Timestamp::from_second(t.timestamp()).unwrap_or_default()
}

fn key(meta: &ObjectMeta) -> (String, String) {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// Everything the status is computed from, at one moment: what the routing
/// table is built from, the GatewayClasses themselves and the addresses
/// the class's objects are served at.
pub struct Snapshot<'a> {
    pub inputs: routes::Inputs<'a>,
    pub gateway_classes: Vec<&'a GatewayClass>,
    pub addresses: Vec<String>,
}

/// The status each object of the class should have, by namespace and name.
#[derive(Debug, Default)]
pub struct Desired {
    pub gateway_classes: BTreeMap<String, GatewayClassStatus>,
    pub gateways: BTreeMap<(String, String), GatewayStatus>,
    pub routes: BTreeMap<(String, String), HTTPRouteStatus>,
}

fn has_tls_secret(secrets: &[&Secret], ns: &str, name: &str) -> bool {
    secrets.iter().any(|s| {
        s.metadata.namespace.as_deref() == Some(ns)
            && s.metadata.name.as_deref() == Some(name)
            && s.data
                .as_ref()
                .is_some_and(|d| d.contains_key("tls.crt") && d.contains_key("tls.key"))
    })
}

/// Computes the desired status of every object of the built-in classes.
pub fn desired(s: &Snapshot<'_>) -> Desired {
    let mut out = Desired::default();
    for c in s
        .gateway_classes
        .iter()
        .filter(|c| c.spec.controller_name == CONTROLLER)
    {
        let prev = c
            .status
            .as_ref()
            .map(|s| s.conditions.as_slice())
            .unwrap_or_default();
        out.gateway_classes.insert(
            c.metadata.name.clone().unwrap_or_default(),
            GatewayClassStatus {
                conditions: vec![condition(
                    prev,
                    "Accepted",
                    true,
                    "Accepted",
                    "Handled by the gateway built into every wasmkube node",
                    c.metadata.generation,
                )],
                supported_features: c.status.as_ref().and_then(|s| s.supported_features.clone()),
            },
        );
    }
    let gateways: Vec<&Gateway> = s
        .inputs
        .gateways
        .iter()
        .copied()
        .filter(|g| {
            s.inputs
                .gateway_classes
                .contains(&g.spec.gateway_class_name)
        })
        .collect();

    // Routes first: the listeners count what attaches to them.
    let mut attached: BTreeMap<(String, String, String), i32> = BTreeMap::new();
    for r in &s.inputs.routes {
        let route_ns = r.metadata.namespace.as_deref().unwrap_or_default();
        let mut parents: Vec<RouteParentStatus> = r
            .status
            .as_ref()
            .map(|st| st.parents.clone())
            .unwrap_or_default()
            .into_iter()
            .filter(|p| p.controller_name != CONTROLLER)
            .collect();
        let previous = r
            .status
            .as_ref()
            .map(|st| st.parents.as_slice())
            .unwrap_or_default();
        let resolved = r
            .spec
            .rules
            .iter()
            .flat_map(|rule| &rule.backend_refs)
            .find_map(|b| routes::backend_ref_problem(route_ns, b, &s.inputs.services));
        let mut any = false;
        for parent in &r.spec.parent_refs {
            let Some(g) = gateways
                .iter()
                .find(|g| routes::refers_to(parent, route_ns, g))
            else {
                continue;
            };
            any = true;
            let prev = previous
                .iter()
                .find(|p| p.controller_name == CONTROLLER && p.parent_ref == *parent)
                .map(|p| p.conditions.as_slice())
                .unwrap_or_default();
            let listeners = routes::attached_listeners(g, parent, route_ns, &s.inputs.namespaces);
            let host_ok = |l: &&&wasmkube_api::gateway_api::Listener| {
                let Some(lh) = &l.hostname else { return true };
                r.spec.hostnames.is_empty()
                    || r.spec.hostnames.iter().any(|h| {
                        routes::HostMatch::parse(h)
                            .intersect(&routes::HostMatch::parse(lh))
                            .is_some()
                    })
            };
            let fitting: Vec<_> = listeners.iter().filter(host_ok).collect();
            let section_exists = parent
                .section_name
                .as_ref()
                .is_none_or(|sn| g.spec.listeners.iter().any(|l| &l.name == sn));
            let accepted = match (section_exists, listeners.is_empty(), fitting.is_empty()) {
                (false, _, _) => condition(
                    prev,
                    "Accepted",
                    false,
                    "NoMatchingParent",
                    format!(
                        "the Gateway has no listener {:?}",
                        parent.section_name.as_deref().unwrap_or_default()
                    ),
                    r.metadata.generation,
                ),
                (true, true, _) => condition(
                    prev,
                    "Accepted",
                    false,
                    "NotAllowedByListeners",
                    "no listener of the Gateway admits routes of this kind from this namespace",
                    r.metadata.generation,
                ),
                (true, false, true) => condition(
                    prev,
                    "Accepted",
                    false,
                    "NoMatchingListenerHostname",
                    "no listener's hostname matches the route's hostnames",
                    r.metadata.generation,
                ),
                (true, false, false) => condition(
                    prev,
                    "Accepted",
                    true,
                    "Accepted",
                    "Route is accepted",
                    r.metadata.generation,
                ),
            };
            if accepted.status == "True" {
                let gw = key(&g.metadata);
                for l in fitting {
                    *attached
                        .entry((gw.0.clone(), gw.1.clone(), l.name.clone()))
                        .or_default() += 1;
                }
            }
            let refs = match &resolved {
                None => condition(
                    prev,
                    "ResolvedRefs",
                    true,
                    "ResolvedRefs",
                    "All references resolved",
                    r.metadata.generation,
                ),
                Some((reason, message)) => condition(
                    prev,
                    "ResolvedRefs",
                    false,
                    reason,
                    message.clone(),
                    r.metadata.generation,
                ),
            };
            parents.push(RouteParentStatus {
                parent_ref: parent.clone(),
                controller_name: CONTROLLER.into(),
                conditions: vec![accepted, refs],
            });
        }
        let had_ours = previous.iter().any(|p| p.controller_name == CONTROLLER);
        if any || had_ours {
            out.routes
                .insert(key(&r.metadata), HTTPRouteStatus { parents });
        }
    }

    for g in &gateways {
        let (ns, name) = key(&g.metadata);
        let gen_ = g.metadata.generation;
        let prev_status = g.status.clone().unwrap_or_default();
        let mut listeners = Vec::new();
        for l in &g.spec.listeners {
            let prev = prev_status
                .listeners
                .iter()
                .find(|p| p.name == l.name)
                .map(|p| p.conditions.as_slice())
                .unwrap_or_default();
            let http = matches!(l.protocol.as_str(), "HTTP" | "HTTPS");
            let passthrough = l.tls.as_ref().and_then(|t| t.mode.as_deref()) == Some("Passthrough");
            let bad_cert = l.tls.iter().flat_map(|t| &t.certificate_refs).find(|r| {
                let kind_ok = r.group.as_deref().unwrap_or_default().is_empty()
                    && r.kind.as_deref().unwrap_or("Secret") == "Secret";
                let secret_ns = r.namespace.as_deref().unwrap_or(&ns);
                !kind_ok
                    || secret_ns != ns
                    || !has_tls_secret(&s.inputs.secrets, secret_ns, &r.name)
            });
            let accepted = if !http {
                condition(
                    prev,
                    "Accepted",
                    false,
                    "UnsupportedProtocol",
                    format!(
                        "protocol {} is not supported; HTTP and HTTPS are",
                        l.protocol
                    ),
                    gen_,
                )
            } else if passthrough {
                condition(
                    prev,
                    "Accepted",
                    false,
                    "UnsupportedProtocol",
                    "TLS passthrough is not supported",
                    gen_,
                )
            } else {
                condition(
                    prev,
                    "Accepted",
                    true,
                    "Accepted",
                    "Listener is accepted",
                    gen_,
                )
            };
            let refs = match bad_cert {
                Some(r) => condition(
                    prev,
                    "ResolvedRefs",
                    false,
                    "InvalidCertificateRef",
                    format!(
                        "certificateRef {} is not a Secret of this namespace with tls.crt and tls.key",
                        r.name
                    ),
                    gen_,
                ),
                None => condition(
                    prev,
                    "ResolvedRefs",
                    true,
                    "ResolvedRefs",
                    "All references resolved",
                    gen_,
                ),
            };
            let programmed = accepted.status == "True" && refs.status == "True";
            listeners.push(ListenerStatus {
                name: l.name.clone(),
                supported_kinds: if http {
                    vec![RouteGroupKind {
                        group: Some(GROUP.into()),
                        kind: "HTTPRoute".into(),
                    }]
                } else {
                    Vec::new()
                },
                attached_routes: attached
                    .get(&(ns.clone(), name.clone(), l.name.clone()))
                    .copied()
                    .unwrap_or(0),
                conditions: vec![
                    accepted,
                    refs,
                    condition(
                        prev,
                        "Programmed",
                        programmed,
                        if programmed { "Programmed" } else { "Invalid" },
                        if programmed {
                            "Listener is programmed on every node"
                        } else {
                            "Listener is not programmed"
                        },
                        gen_,
                    ),
                    condition(
                        prev,
                        "Conflicted",
                        false,
                        "NoConflicts",
                        "No conflicts",
                        gen_,
                    ),
                ],
            });
        }
        let addressed = !s.addresses.is_empty();
        out.gateways.insert(
            (ns, name),
            GatewayStatus {
                addresses: s
                    .addresses
                    .iter()
                    .map(|a| GatewayAddress {
                        type_: Some("IPAddress".into()),
                        value: a.clone(),
                    })
                    .collect(),
                conditions: vec![
                    condition(
                        &prev_status.conditions,
                        "Accepted",
                        true,
                        "Accepted",
                        "Gateway is accepted",
                        gen_,
                    ),
                    condition(
                        &prev_status.conditions,
                        "Programmed",
                        addressed,
                        if addressed {
                            "Programmed"
                        } else {
                            "AddressNotAssigned"
                        },
                        if addressed {
                            "Served on every Ready node's address"
                        } else {
                            "No node is Ready"
                        },
                        gen_,
                    ),
                ],
                listeners,
            },
        );
    }
    out
}

/// Runs the status writer until the client's server goes away.
pub async fn run(client: kube::Client) -> Result<(), kube::Error> {
    let mut tasks = Vec::new();
    let caches = Caches::start(&client, &mut tasks);
    let (services, service_events) = wasmkube_proxy::views::views::<Service, _>(
        &client,
        Default::default(),
        wasmkube_proxy::ServiceView::of,
    );
    let (secrets, secret_events) = wasmkube_proxy::watch::cache::<Secret>(&client);
    let (nodes, node_events) = wasmkube_proxy::watch::cache::<Node>(&client);
    let (tx, mut more) = tokio::sync::watch::channel(0u64);
    let tx = std::sync::Arc::new(tx);
    for (stream, what) in [
        (service_events.map(|r| r.map(|_| ())).boxed(), "Service"),
        (secret_events.map(|r| r.map(|_| ())).boxed(), "Secret"),
        (node_events.map(|r| r.map(|_| ())).boxed(), "Node"),
    ] {
        tasks.push(tokio::spawn(crate::merge(stream, tx.clone(), what)));
    }
    let mut changes = caches.changes.clone();
    let _ = tokio::join!(
        caches.ready(),
        services.wait_until_ready(),
        secrets.wait_until_ready(),
        nodes.wait_until_ready()
    );
    let params = PatchParams::default();
    let result = loop {
        let held = Held::new(&caches, services.state(), Vec::new(), secrets.state());
        let classes = caches.gateway_classes.state();
        let snapshot = Snapshot {
            inputs: held.inputs((None, None)),
            gateway_classes: classes.iter().map(|c| c.as_ref()).collect(),
            addresses: ready_internal_ips(nodes.state().iter().map(|n| n.as_ref())),
        };
        let want = desired(&snapshot);
        if let Err(e) = write(&client, &params, &snapshot, &want).await {
            tracing::warn!(error = %e, "cannot write gateway status; retrying on the next change");
        }
        tokio::select! {
            r = changes.changed() => if r.is_err() { break Ok(()) },
            r = more.changed() => if r.is_err() { break Ok(()) },
        }
    };
    for t in tasks {
        t.abort();
    }
    result
}

/// Writes `wanted` as the object's status unless it already is.
async fn patch_if_changed<K, S>(
    api: Api<K>,
    name: &str,
    current: &Option<S>,
    wanted: &S,
    params: &PatchParams,
) -> Result<(), kube::Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    S: serde::Serialize + PartialEq,
{
    if current.as_ref() != Some(wanted) {
        api.patch_status(name, params, &Patch::Merge(json!({"status": wanted})))
            .await?;
    }
    Ok(())
}

async fn write(
    client: &kube::Client,
    params: &PatchParams,
    s: &Snapshot<'_>,
    want: &Desired,
) -> Result<(), kube::Error> {
    for c in &s.gateway_classes {
        let name = c.metadata.name.clone().unwrap_or_default();
        if let Some(w) = want.gateway_classes.get(&name) {
            patch_if_changed(
                Api::<GatewayClass>::all(client.clone()),
                &name,
                &c.status,
                w,
                params,
            )
            .await?;
        }
    }
    for g in &s.inputs.gateways {
        let (ns, name) = key(&g.metadata);
        if let Some(w) = want.gateways.get(&(ns.clone(), name.clone())) {
            patch_if_changed(
                Api::<Gateway>::namespaced(client.clone(), &ns),
                &name,
                &g.status,
                w,
                params,
            )
            .await?;
        }
    }
    for r in &s.inputs.routes {
        let (ns, name) = key(&r.metadata);
        if let Some(w) = want.routes.get(&(ns.clone(), name.clone())) {
            patch_if_changed(
                Api::<HTTPRoute>::namespaced(client.clone(), &ns),
                &name,
                &r.status,
                w,
                params,
            )
            .await?;
        }
    }
    // Ingresses of the built-in class: every Ready node's address.
    for ing in &s.inputs.ingresses {
        let class = ing
            .spec
            .as_ref()
            .and_then(|s| s.ingress_class_name.as_deref())
            .unwrap_or_default();
        if !s.inputs.ingress_classes.contains(class) {
            continue;
        }
        let current: Vec<&str> = ing
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|i| i.ip.as_deref())
            .collect();
        if current != s.addresses {
            let (ns, name) = key(&ing.metadata);
            let ingress: Vec<Value> = s.addresses.iter().map(|ip| json!({"ip": ip})).collect();
            Api::<k8s_openapi::api::networking::v1::Ingress>::namespaced(client.clone(), &ns)
                .patch_status(
                    &name,
                    params,
                    &Patch::Merge(json!({"status": {"loadBalancer": {"ingress": ingress}}})),
                )
                .await?;
        }
    }
    Ok(())
}
