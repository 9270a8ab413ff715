//! Unit tests of the routing table: precedence, host and path matching,
//! weights, listener attachment and unresolved backends.

use super::*;
use serde_json::json;

fn svc(name: &str) -> ServiceView {
    let svc = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
    }))
    .unwrap();
    ServiceView::of(&svc).unwrap()
}

fn slice(service: &str, ip: &str) -> SliceView {
    let slice = serde_json::from_value(json!({
        "metadata": {"name": format!("{service}-x"), "namespace": "default",
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip], "conditions": {"ready": true}},
                      {"addresses": ["10.9.9.9"], "conditions": {"ready": false}}],
        "ports": [{"name": "http", "port": 8080}],
    }))
    .unwrap();
    SliceView::of(&slice).unwrap()
}

fn gateway(listeners: serde_json::Value) -> Gateway {
    serde_json::from_value(json!({
        "metadata": {"name": "gw", "namespace": "default"},
        "spec": {"gatewayClassName": "wasmkube", "listeners": listeners},
    }))
    .unwrap()
}

fn route(name: &str, spec: serde_json::Value) -> HTTPRoute {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "default"}, "spec": spec,
    }))
    .unwrap()
}

fn view<'a>(host: &'a str, path: &'a str, headers: &'a http::HeaderMap) -> RequestView<'a> {
    RequestView {
        host,
        path,
        method: "GET",
        headers,
        query: &[],
    }
}

/// The first endpoint of the entry's first backend, or the reason it has none.
fn target(e: &Entry) -> String {
    match &e.backends[0].target {
        Target::Endpoints(eps) => eps.first().map(|a| a.to_string()).unwrap_or_default(),
        Target::Invalid(why) | Target::Unavailable(why) => why.clone(),
    }
}

#[test]
fn hosts_and_paths_take_the_specifications_precedence() {
    let (a, b) = (svc("a"), svc("b"));
    let (sa, sb) = (slice("a", "10.0.0.1"), slice("b", "10.0.0.2"));
    let gw = gateway(json!([{"name": "web", "port": 8080, "protocol": "HTTP"}]));
    let r = route(
        "r",
        json!({"parentRefs": [{"name": "gw"}], "hostnames": ["*.example.com", "exact.example.com"],
               "rules": [
                   {"matches": [{"path": {"type": "PathPrefix", "value": "/api"}}],
                    "backendRefs": [{"name": "b", "port": 80}]},
                   {"matches": [{"path": {"type": "Exact", "value": "/api/v1"}}],
                    "backendRefs": [{"name": "a", "port": 80}]},
                   {"matches": [{"path": {"type": "PathPrefix", "value": "/"},
                                 "headers": [{"name": "X-Canary", "value": "yes"}]}],
                    "backendRefs": [{"name": "b", "port": 80}]},
                   {"backendRefs": [{"name": "a", "port": 80}]}]}),
    );
    let inputs = Inputs {
        gateway_classes: ["wasmkube".to_owned()].into(),
        gateways: vec![&gw],
        routes: vec![&r],
        services: vec![&a, &b],
        slices: vec![&sa, &sb],
        ..Default::default()
    };
    let table = build(&inputs);
    let port = &table[&8080];
    let none = http::HeaderMap::new();
    let go = |host, path| port.route(&view(host, path, &none)).map(target);
    // Exact beats prefix; the longest prefix wins; prefixes match whole
    // path elements only.
    assert_eq!(go("x.example.com", "/api/v1").unwrap(), "10.0.0.1:8080");
    assert_eq!(go("x.example.com", "/api/v2").unwrap(), "10.0.0.2:8080");
    assert_eq!(go("x.example.com", "/api").unwrap(), "10.0.0.2:8080");
    assert_eq!(go("x.example.com", "/apix").unwrap(), "10.0.0.1:8080");
    // A wildcard needs at least one label before its suffix.
    assert!(go("example.com", "/").is_none());
    assert!(go("other.org", "/").is_none());
    // Exact host entries come before wildcard ones.
    let first = &port.entries[0];
    assert_eq!(first.host, HostMatch::Exact("exact.example.com".into()));
    // A header match wins over the same path without one; not-ready
    // endpoints are left out.
    let mut canary = http::HeaderMap::new();
    canary.insert("x-canary", "yes".parse().unwrap());
    let e = port.route(&view("a.example.com", "/x", &canary)).unwrap();
    assert_eq!(target(e), "10.0.0.2:8080");
    match &e.backends[0].target {
        Target::Endpoints(eps) => assert_eq!(eps.len(), 1),
        other => panic!("{other:?}"),
    }
}

#[test]
fn weights_split_and_unresolved_backends_are_marked() {
    let a = svc("a");
    let gw = gateway(json!([{"name": "web", "port": 8080, "protocol": "HTTP",
                             "hostname": "*.example.com"}]));
    let r = route(
        "r",
        json!({"parentRefs": [{"name": "gw"}],
               "rules": [{"backendRefs": [{"name": "a", "port": 80, "weight": 90},
                                          {"name": "missing", "port": 80, "weight": 10},
                                          {"name": "a", "port": 81, "weight": 0}]}]}),
    );
    let other = route(
        "elsewhere",
        json!({"parentRefs": [{"name": "gw"}], "hostnames": ["other.org"],
               "rules": [{"backendRefs": [{"name": "a", "port": 80}]}]}),
    );
    let inputs = Inputs {
        gateway_classes: ["wasmkube".to_owned()].into(),
        gateways: vec![&gw],
        routes: vec![&r, &other],
        services: vec![&a],
        ..Default::default()
    };
    let table = build(&inputs);
    let port = &table[&8080];
    // The route without hostnames takes the listener's; the one whose
    // hostname the listener does not admit attaches nowhere.
    assert_eq!(port.entries.len(), 1);
    let e = &port.entries[0];
    assert_eq!(e.host, HostMatch::Wildcard(".example.com".into()));
    assert_eq!(e.total_weight(), 100);
    let picks: Vec<bool> = (0..100)
        .map(|d| matches!(e.pick(d).unwrap().target, Target::Endpoints(_)))
        .collect();
    assert_eq!(picks.iter().filter(|p| **p).count(), 90);
    assert!(matches!(&e.backends[1].target, Target::Invalid(w) if w.contains("not found")));
    assert!(matches!(&e.backends[2].target, Target::Invalid(w) if w.contains("no port 81")));
    let problem = backend_ref_problem(
        "default",
        &serde_json::from_value(json!({"name": "x", "kind": "Bucket", "group": "s3.io"})).unwrap(),
        &[&a],
    );
    assert_eq!(problem.unwrap().0, "InvalidKind");
}

#[test]
fn ingresses_of_our_class_route_by_host_and_path_and_terminate_tls() {
    let a = svc("a");
    let sa = slice("a", "10.0.0.1");
    let ing: Ingress = serde_json::from_value(json!({
        "metadata": {"name": "i", "namespace": "default"},
        "spec": {"ingressClassName": "wasmkube",
                 "tls": [{"hosts": ["secure.example"], "secretName": "tls"}],
                 "defaultBackend": {"service": {"name": "missing", "port": {"number": 80}}},
                 "rules": [{"host": "shop.example", "http": {"paths": [
                     {"path": "/cart", "pathType": "Exact",
                      "backend": {"service": {"name": "a", "port": {"name": "http"}}}}]}}]},
    }))
    .unwrap();
    let foreign: Ingress = serde_json::from_value(json!({
        "metadata": {"name": "j", "namespace": "default"},
        "spec": {"ingressClassName": "nginx",
                 "defaultBackend": {"service": {"name": "a", "port": {"number": 80}}}},
    }))
    .unwrap();
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "tls", "namespace": "default"},
        "type": "kubernetes.io/tls",
        "data": {"tls.crt": "Y2VydA==", "tls.key": "a2V5"},
    }))
    .unwrap();
    let inputs = Inputs {
        ingresses: vec![&ing, &foreign],
        ingress_classes: ["wasmkube".to_owned()].into(),
        services: vec![&a],
        slices: vec![&sa],
        secrets: vec![&secret],
        ingress_http_port: Some(80),
        ingress_https_port: Some(443),
        ..Default::default()
    };
    let table = build(&inputs);
    let none = http::HeaderMap::new();
    let http = &table[&80];
    assert!(!http.tls);
    let cart = http.route(&view("shop.example", "/cart", &none)).unwrap();
    assert_eq!(target(cart), "10.0.0.1:8080");
    // Exact means exact; everything else falls to the default backend,
    // which does not resolve (500). The other class's Ingress is ignored.
    let rest = http.route(&view("shop.example", "/cart/x", &none)).unwrap();
    assert!(target(rest).contains("missing"));
    assert_eq!(http.entries.len(), 2);
    let https = &table[&443];
    assert!(https.tls);
    assert_eq!(
        https.cert_for(Some("SECURE.example")).unwrap().cert_pem,
        b"cert"
    );
    assert!(https.cert_for(Some("other.example")).is_none());
}

#[test]
fn listeners_admit_routes_by_namespace_and_section() {
    let gw = gateway(json!([
        {"name": "same", "port": 80, "protocol": "HTTP"},
        {"name": "all", "port": 81, "protocol": "HTTP", "allowedRoutes": {"namespaces": {"from": "All"}}},
        {"name": "tcp", "port": 82, "protocol": "TCP"}]));
    let parent: ParentReference =
        serde_json::from_value(json!({"name": "gw", "namespace": "default"})).unwrap();
    let names = |ls: Vec<&Listener>| ls.iter().map(|l| l.name.clone()).collect::<Vec<_>>();
    assert_eq!(
        names(attached_listeners(&gw, &parent, "default", &[])),
        ["same", "all"]
    );
    assert_eq!(
        names(attached_listeners(&gw, &parent, "team", &[])),
        ["all"]
    );
    let section: ParentReference =
        serde_json::from_value(json!({"name": "gw", "sectionName": "same"})).unwrap();
    assert_eq!(
        names(attached_listeners(&gw, &section, "default", &[])),
        ["same"]
    );
    assert!(refers_to(&section, "default", &gw));
    assert!(!refers_to(&section, "team", &gw));
}

/// A Knative Route is served from its status on the Ingress port: its host
/// splits by percent between revisions' Services, a tag's host reaches its
/// revision alone, and every backend names its revision for the activator.
#[test]
fn knative_routes_split_by_percent_and_tag() {
    let (v1, v2) = (svc("hello-00001"), svc("hello-00002"));
    let s1 = slice("hello-00001", "10.0.0.1");
    let route: wasmkube_api::knative::Route = serde_json::from_value(json!({
        "metadata": {"name": "hello", "namespace": "default"},
        "spec": {},
        "status": {
            "url": "http://hello.default.example.com",
            "traffic": [
                {"revisionName": "hello-00001", "percent": 80},
                {"revisionName": "hello-00002", "percent": 20, "tag": "next",
                 "url": "http://next-hello.default.example.com"},
            ],
        },
    }))
    .unwrap();
    let route = KnativeRoute::of(&route).unwrap();
    let inputs = Inputs {
        knative_routes: vec![&route],
        services: vec![&v1, &v2],
        slices: vec![&s1],
        ingress_http_port: Some(80),
        ..Default::default()
    };
    let table = build(&inputs);
    let none = http::HeaderMap::new();
    let main = table[&80]
        .route(&view("hello.default.example.com", "/any", &none))
        .unwrap();
    let weights: Vec<(u32, &str)> = main
        .backends
        .iter()
        .map(|b| (b.weight, b.revision.as_ref().unwrap().name.as_str()))
        .collect();
    assert_eq!(weights, [(80, "hello-00001"), (20, "hello-00002")]);
    assert_eq!(target(main), "10.0.0.1:8080");
    // The second revision has no pod yet: no endpoint, so the activator
    // would hold its requests.
    assert!(matches!(&main.backends[1].target, Target::Endpoints(e) if e.is_empty()));
    let tagged = table[&80]
        .route(&view("next-hello.default.example.com", "/", &none))
        .unwrap();
    assert_eq!(tagged.backends.len(), 1);
    assert_eq!(
        tagged.backends[0].revision.as_ref().unwrap().name,
        "hello-00002"
    );
    assert!(
        table[&80]
            .route(&view("other.example.com", "/", &none))
            .is_none()
    );
}
