//! Endpoints and EndpointSlices for Services with a selector: the addresses of
//! the selected pods, split into ready and not ready, with each Service port's
//! target resolved per pod (named container ports included).
//!
//! Both are written with server-side apply, so an unchanged result is no
//! write at all. Both carry an owner reference to their Service, so the
//! garbage collector removes them with it (Kubernetes' Endpoints controller
//! deletes Endpoints itself instead).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::queue::Controller;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};

use crate::{Error, pods};

const MANAGER: &str = "endpoint-controller";

/// A Service port resolved on one pod: (name, port, protocol).
type ResolvedPorts = Vec<(String, i32, String)>;
/// Ready and not-ready addresses sharing one set of resolved ports.
type Subsets = BTreeMap<ResolvedPorts, (Vec<Value>, Vec<Value>)>;

struct Ctx {
    client: kube::Client,
    pods: Store<Pod>,
}

fn selects(svc: &Service, pod: &Pod) -> bool {
    let Some(selector) = svc
        .spec
        .as_ref()
        .and_then(|s| s.selector.as_ref())
        .filter(|s| !s.is_empty())
    else {
        return false;
    };
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    pod.metadata.namespace == svc.metadata.namespace
        && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The container port a Service port targets on this pod, if it has it.
fn resolve_port(pod: &Pod, target: Option<&IntOrString>, port: i32) -> Option<i32> {
    match target {
        None => Some(port),
        Some(IntOrString::Int(n)) => Some(*n),
        Some(IntOrString::String(name)) => pod
            .spec
            .iter()
            .flat_map(|s| s.containers.iter())
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .map(|p| p.container_port),
    }
}

async fn apply(
    ctx: &Ctx,
    ns: &str,
    ar: &kube::api::ApiResource,
    name: &str,
    body: Value,
) -> Result<(), Error> {
    let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), ns, ar);
    let params = PatchParams::apply(MANAGER).force();
    api.patch(name, &params, &Patch::Apply(body))
        .await
        .map_err(Error::Kube)?;
    Ok(())
}

async fn reconcile(svc: Arc<Service>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    if svc.metadata.deletion_timestamp.is_some()
        || svc
            .spec
            .as_ref()
            .and_then(|s| s.selector.as_ref())
            .is_none_or(|s| s.is_empty())
    {
        // Services without a selector have endpoints their users manage.
        return Ok(Action::await_change());
    }
    let ns = svc.namespace().unwrap_or_default();
    let name = svc.name_any();
    let owner = svc.controller_owner_ref(&()).ok_or(Error::MissingUid)?;
    let ports = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.clone())
        .unwrap_or_default();
    let mut selected: Vec<Arc<Pod>> = ctx
        .pods
        .state()
        .into_iter()
        .filter(|p| selects(&svc, p) && !pods::is_terminal(p))
        .filter(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.pod_ip.as_deref())
                .is_some_and(|ip| !ip.is_empty())
        })
        .collect();
    selected.sort_by_key(|p| p.name_any());

    // Endpoints: one subset per distinct set of resolved ports.
    let mut subsets: Subsets = BTreeMap::new();
    let mut slice_endpoints = Vec::new();
    let mut slice_ports: Option<Vec<Value>> = None;
    for pod in &selected {
        let resolved: Option<ResolvedPorts> = ports
            .iter()
            .map(|p| {
                resolve_port(pod, p.target_port.as_ref(), p.port).map(|port| {
                    (
                        p.name.clone().unwrap_or_default(),
                        port,
                        p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                    )
                })
            })
            .collect();
        let Some(resolved) = resolved else { continue };
        let ip = pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.clone())
            .unwrap_or_default();
        let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
        let target = json!({"kind": "Pod", "namespace": ns, "name": pod.name_any(), "uid": pod.metadata.uid});
        // A pod naming this Service as its subdomain is known by its
        // hostname (`web-0.web.NS.svc`), as a StatefulSet's pods are.
        let hostname = pod
            .spec
            .as_ref()
            .filter(|s| s.subdomain.as_deref() == Some(svc.name_any().as_str()))
            .and_then(|s| s.hostname.clone());
        let ready = pods::is_ready(pod);
        let terminating = pod.metadata.deletion_timestamp.is_some();
        if !terminating {
            let entry = subsets.entry(resolved.clone()).or_default();
            let mut address = json!({"ip": ip, "nodeName": node, "targetRef": target});
            if let Some(h) = &hostname {
                address["hostname"] = json!(h);
            }
            if ready {
                entry.0.push(address)
            } else {
                entry.1.push(address)
            }
        }
        let mut endpoint = json!({
            "addresses": [ip],
            "conditions": {"ready": ready && !terminating, "serving": ready, "terminating": terminating},
            "nodeName": node,
            "targetRef": target,
        });
        if let Some(h) = hostname {
            endpoint["hostname"] = json!(h);
        }
        slice_endpoints.push(endpoint);
        slice_ports.get_or_insert_with(|| {
            resolved
                .iter()
                .map(|(n, p, proto)| json!({"name": n, "port": p, "protocol": proto}))
                .collect()
        });
    }
    let subsets: Vec<Value> = subsets
        .into_iter()
        .map(|(ports, (ready, not_ready))| {
            let mut s = json!({"ports": ports.iter().map(|(n, p, proto)| json!({"name": n, "port": p, "protocol": proto})).collect::<Vec<_>>()});
            if !ready.is_empty() {
                s["addresses"] = json!(ready);
            }
            if !not_ready.is_empty() {
                s["notReadyAddresses"] = json!(not_ready);
            }
            s
        })
        .collect();
    let endpoints = json!({
        "apiVersion": "v1", "kind": "Endpoints",
        "metadata": {"name": name, "namespace": ns, "labels": svc.labels(), "ownerReferences": [owner]},
        "subsets": subsets,
    });
    let ep_ar = kube::api::ApiResource::erase::<k8s_openapi::api::core::v1::Endpoints>(&());
    apply(&ctx, &ns, &ep_ar, &name, endpoints).await?;
    let slice_name = format!(
        "{name}-{}",
        &crate::deployment::template_hash(&json!(svc.uid()))[..5]
    );
    let slice = json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {
            "name": slice_name, "namespace": ns,
            "labels": {"kubernetes.io/service-name": name, "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
            "ownerReferences": [owner],
        },
        "addressType": "IPv4",
        "endpoints": slice_endpoints,
        "ports": slice_ports.unwrap_or_default(),
    });
    let slice_ar =
        kube::api::ApiResource::erase::<k8s_openapi::api::discovery::v1::EndpointSlice>(&());
    apply(&ctx, &ns, &slice_ar, &slice_name, slice).await?;
    Ok(Action::requeue(Duration::from_secs(60)))
}

/// Runs the Endpoints/EndpointSlice controller until its watches end.
pub(crate) fn run(
    client: kube::Client,
    informers: &mut crate::Informers,
) -> impl std::future::Future<Output = Result<(), Error>> + use<> {
    let crate::Cache {
        store: pods,
        changes,
    } = informers.cache::<Pod>();
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        pods: pods.clone(),
    });
    async move {
        let _ = pods.wait_until_ready().await;
        let controller = Controller::new(Api::<Service>::all(client), watcher::Config::default());
        let services = controller.store();
        // A pod change wakes the Services that select it.
        let selecting = move |pod: Arc<Pod>| {
            services
                .state()
                .into_iter()
                .filter(|s| selects(s, &pod))
                .map(|s| ObjectRef::from_obj(&*s))
                .collect::<Vec<_>>()
        };
        controller
            .watches_shared_stream(changes, selecting)
            .run("endpoints", reconcile, crate::retry_soon, ctx)
            .await;
        Ok(())
    }
}
