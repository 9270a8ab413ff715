//! ServiceLB, the built-in load balancer (as k3s ships one): a Service of
//! type LoadBalancer with no `loadBalancerClass` is given the InternalIPs
//! of the cluster's Ready nodes as its `status.loadBalancer.ingress`, and
//! every node's service proxy answers on those addresses at the Service's
//! ports. A Service that stops being one of ours loses the addresses again.

use std::sync::Arc;

use crate::queue::Controller;
use k8s_openapi::api::core::v1::{Node, Service};
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use serde_json::json;

use crate::Error;

struct Ctx {
    client: kube::Client,
    nodes: Store<Node>,
}

/// Whether ServiceLB serves this Service.
fn ours(svc: &Service) -> bool {
    svc.spec.as_ref().is_some_and(|s| {
        s.type_.as_deref() == Some("LoadBalancer") && s.load_balancer_class.is_none()
    })
}

fn current(svc: &Service) -> Vec<String> {
    svc.status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.clone())
        .collect()
}

async fn reconcile(svc: Arc<Service>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let want = if ours(&svc) && svc.metadata.deletion_timestamp.is_none() {
        wasmkube_api::nodes::ready_internal_ips(ctx.nodes.state().iter().map(|n| n.as_ref()))
    } else if svc
        .spec
        .as_ref()
        .is_some_and(|s| s.type_.as_deref() == Some("LoadBalancer"))
    {
        // Another load balancer's Service: its status is not ours to write.
        return Ok(Action::await_change());
    } else {
        Vec::new()
    };
    if current(&svc) == want {
        return Ok(Action::await_change());
    }
    let api: Api<Service> =
        Api::namespaced(ctx.client.clone(), &svc.namespace().unwrap_or_default());
    let ingress: Vec<_> = want
        .iter()
        .map(|ip| json!({"ip": ip, "ipMode": "VIP"}))
        .collect();
    let patch = json!({"status": {"loadBalancer": {"ingress": ingress}}});
    match api
        .patch_status(
            &svc.name_any(),
            &PatchParams::default(),
            &Patch::Merge(patch),
        )
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => return Err(Error::Kube(e)),
    }
    Ok(Action::await_change())
}

/// Runs ServiceLB until its watches end.
pub(crate) fn run(
    client: kube::Client,
    informers: &mut crate::Informers,
) -> impl std::future::Future<Output = Result<(), Error>> + use<> {
    let crate::Cache {
        store: nodes,
        changes,
    } = informers.cache::<Node>();
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        nodes: nodes.clone(),
    });
    async move {
        let _ = nodes.wait_until_ready().await;
        let controller = Controller::new(Api::<Service>::all(client), watcher::Config::default());
        let services = controller.store();
        // A node change may change every load balancer's addresses.
        let balanced = move |_: Arc<Node>| {
            services
                .state()
                .into_iter()
                .filter(|s| ours(s))
                .map(|s| ObjectRef::from_obj(&*s))
                .collect::<Vec<_>>()
        };
        controller
            .watches_shared_stream(changes, balanced)
            .run("servicelb", reconcile, crate::retry_soon, ctx)
            .await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_load_balancers_without_a_class_are_ours() {
        let svc = |spec: serde_json::Value| -> Service {
            serde_json::from_value(json!({"metadata": {"name": "s"}, "spec": spec})).unwrap()
        };
        assert!(ours(&svc(json!({"type": "LoadBalancer"}))));
        assert!(!ours(&svc(
            json!({"type": "LoadBalancer", "loadBalancerClass": "other.io/lb"})
        )));
        assert!(!ours(&svc(json!({"type": "NodePort"}))));
    }
}
