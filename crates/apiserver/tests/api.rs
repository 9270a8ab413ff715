//! The API server over real HTTP on a loopback port: CRUD semantics, errors,
//! selectors, paging, watch and bad input. Each test starts its own server.

use std::time::Duration;

use futures::StreamExt;
use reqwest::{Client, Method, StatusCode};
use serde_json::{Value, json};
use wasmkube_apiserver::{ApiServer, Config};

struct Cluster {
    base: String,
    http: Client,
    api: std::sync::Arc<ApiServer>,
    server: Option<tokio::task::JoinHandle<()>>,
}

async fn start() -> Cluster {
    start_with(wasmkube_store::memory(), Config::default()).await
}

async fn start_with(store: wasmkube_store::SharedStore, config: Config) -> Cluster {
    let api = ApiServer::start(store, config).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = {
        let api = api.clone();
        tokio::spawn(async move { api.serve(listener).await.unwrap() })
    };
    Cluster {
        base: format!("http://{addr}"),
        http: Client::new(),
        api,
        server: Some(server),
    }
}

impl Cluster {
    /// Stops serving and drops the API server, releasing its store.
    async fn stop(mut self) {
        if let Some(s) = self.server.take() {
            s.abort();
            let _ = s.await;
        }
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        content_type: &str,
    ) -> (StatusCode, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(b) = body {
            req = req.header("content-type", content_type).body(b.to_string());
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.call(Method::GET, path, None, "").await
    }

    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::POST, path, Some(body), "application/json")
            .await
    }

    /// POSTs `body`; the status, the answer and its `Warning` header.
    async fn post_warned(&self, path: &str, body: Value) -> (StatusCode, Value, String) {
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let warning = resp
            .headers()
            .get("warning")
            .map(|w| w.to_str().unwrap().to_owned())
            .unwrap_or_default();
        (status, resp.json().await.unwrap_or(Value::Null), warning)
    }

    async fn put(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::PUT, path, Some(body), "application/json")
            .await
    }

    async fn patch(&self, path: &str, ct: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::PATCH, path, Some(body), ct).await
    }

    async fn delete(&self, path: &str) -> (StatusCode, Value) {
        self.call(Method::DELETE, path, None, "").await
    }

    async fn raw(
        &self,
        method: Method,
        path: &str,
        ct: &str,
        body: Vec<u8>,
    ) -> (StatusCode, Value) {
        let resp = self
            .http
            .request(method, format!("{}{path}", self.base))
            .header("content-type", ct)
            .body(body)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// A count of stored objects, to show a failed request changed nothing.
    async fn count(&self, path: &str) -> usize {
        self.get(path).await.1["items"]
            .as_array()
            .map_or(0, Vec::len)
    }
}

fn cm(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "labels": {"app": name}}, "data": {"k": "v"}})
}

fn deployment(name: &str, replicas: i64) -> Value {
    json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": [{"name": "c", "image": "img:1"}]}}}})
}

const CMS: &str = "/api/v1/namespaces/default/configmaps";
const DEPLOYS: &str = "/apis/apps/v1/namespaces/default/deployments";

#[tokio::test]
async fn create_get_update_delete_with_optimistic_concurrency() {
    let c = start().await;
    let (code, created) = c.post(CMS, cm("a")).await;
    assert_eq!(code, StatusCode::CREATED, "{created}");
    let rv = created["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        created["metadata"]["uid"]
            .as_str()
            .is_some_and(|u| u.len() == 36)
    );
    assert!(created["metadata"]["creationTimestamp"].is_string());

    let (code, dup) = c.post(CMS, cm("a")).await;
    assert_eq!(
        (code, dup["reason"].as_str()),
        (StatusCode::CONFLICT, Some("AlreadyExists"))
    );
    assert_eq!(dup["message"], "configmaps \"a\" already exists");

    let mut changed = created.clone();
    changed["data"]["k"] = json!("v2");
    let (code, updated) = c.put(&format!("{CMS}/a"), changed.clone()).await;
    assert_eq!(code, StatusCode::OK, "{updated}");
    assert_ne!(
        updated["metadata"]["resourceVersion"].as_str(),
        Some(rv.as_str())
    );
    // The same write with the stale version is a 409 Conflict.
    let (code, stale) = c.put(&format!("{CMS}/a"), changed).await;
    assert_eq!(
        (code, stale["reason"].as_str()),
        (StatusCode::CONFLICT, Some("Conflict")),
        "{stale}"
    );

    let (code, got) = c.get(&format!("{CMS}/a")).await;
    assert_eq!(
        (code, got["data"]["k"].as_str()),
        (StatusCode::OK, Some("v2"))
    );
    let (code, _) = c.delete(&format!("{CMS}/a")).await;
    assert_eq!(code, StatusCode::OK);
    let (code, missing) = c.get(&format!("{CMS}/a")).await;
    assert_eq!(
        (code, missing["reason"].as_str()),
        (StatusCode::NOT_FOUND, Some("NotFound"))
    );
    assert_eq!(missing["details"]["kind"], "configmaps");
}

#[tokio::test]
async fn generation_moves_on_spec_changes_only() {
    let c = start().await;
    let (_, d) = c.post(DEPLOYS, deployment("web", 1)).await;
    assert_eq!(d["metadata"]["generation"], 1);
    let (_, d) = c
        .patch(
            &format!("{DEPLOYS}/web"),
            "application/merge-patch+json",
            json!({"metadata": {"labels": {"x": "y"}}}),
        )
        .await;
    assert_eq!(
        d["metadata"]["generation"], 1,
        "metadata changes keep the generation"
    );
    let (_, d) = c
        .patch(
            &format!("{DEPLOYS}/web"),
            "application/merge-patch+json",
            json!({"spec": {"replicas": 3}}),
        )
        .await;
    assert_eq!(d["metadata"]["generation"], 2);
    // Status writes go through the status subresource and never bump generation.
    let (code, d) = c
        .patch(
            &format!("{DEPLOYS}/web/status"),
            "application/merge-patch+json",
            json!({"status": {"replicas": 3}, "spec": {"replicas": 9}}),
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{d}");
    assert_eq!(
        (
            d["metadata"]["generation"].as_i64(),
            d["status"]["replicas"].as_i64(),
            d["spec"]["replicas"].as_i64()
        ),
        (Some(2), Some(3), Some(3))
    );
    // Status sent to the main resource is ignored.
    let (_, d) = c
        .patch(
            &format!("{DEPLOYS}/web"),
            "application/merge-patch+json",
            json!({"status": {"replicas": 0}}),
        )
        .await;
    assert_eq!(d["status"]["replicas"], 3);
    // A write that changes nothing does not create a new revision.
    let before = c.api.current_revision();
    let (_, same) = c
        .patch(
            &format!("{DEPLOYS}/web"),
            "application/merge-patch+json",
            json!({"spec": {"replicas": 3}}),
        )
        .await;
    assert_eq!(c.api.current_revision(), before);
    assert_eq!(
        same["metadata"]["resourceVersion"],
        d["metadata"]["resourceVersion"]
    );
}

#[tokio::test]
async fn scale_and_binding_subresources() {
    let c = start().await;
    c.post(DEPLOYS, deployment("web", 1)).await;
    let (code, scale) = c.get(&format!("{DEPLOYS}/web/scale")).await;
    assert_eq!(
        (
            code,
            scale["spec"]["replicas"].as_i64(),
            scale["status"]["selector"].as_str()
        ),
        (StatusCode::OK, Some(1), Some("app=web"))
    );
    let (code, scale) = c
        .patch(
            &format!("{DEPLOYS}/web/scale"),
            "application/merge-patch+json",
            json!({"spec": {"replicas": 4}}),
        )
        .await;
    assert_eq!(
        (code, scale["spec"]["replicas"].as_i64()),
        (StatusCode::OK, Some(4)),
        "{scale}"
    );

    let pods = "/api/v1/namespaces/default/pods";
    let pod =
        json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "i"}]}});
    let (code, created) = c.post(pods, pod).await;
    assert_eq!(code, StatusCode::CREATED, "{created}");
    assert_eq!(created["status"]["phase"], "Pending");
    let binding = json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": "p"}, "target": {"kind": "Node", "name": "n1"}});
    let (code, _) = c.post(&format!("{pods}/p/binding"), binding.clone()).await;
    assert_eq!(code, StatusCode::CREATED);
    let (_, bound) = c.get(&format!("{pods}/p")).await;
    assert_eq!(bound["spec"]["nodeName"], "n1");
    assert_eq!(bound["status"]["conditions"][0]["type"], "PodScheduled");
    // As on Kubernetes, binding is not an update of the pod: its generation
    // and managed fields stay as they were.
    assert_eq!(
        bound["metadata"]["generation"],
        created["metadata"]["generation"]
    );
    assert_eq!(
        bound["metadata"]["managedFields"],
        created["metadata"]["managedFields"]
    );
    let (code, again) = c.post(&format!("{pods}/p/binding"), binding).await;
    assert_eq!(code, StatusCode::CONFLICT, "{again}");
    // Pod specs are immutable apart from images and a few fields.
    let (code, err) = c
        .patch(
            &format!("{pods}/p"),
            "application/strategic-merge-patch+json",
            json!({"spec": {"containers": [{"name": "c", "env": [{"name": "X", "value": "1"}]}]}}),
        )
        .await;
    assert_eq!(
        (code, err["details"]["causes"][0]["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("spec")),
        "{err}"
    );
    // A bound pod is deleted gracefully: marked, and gone once deleted with grace 0.
    let (code, marked) = c.delete(&format!("{pods}/p")).await;
    assert_eq!(code, StatusCode::OK);
    assert!(
        marked["metadata"]["deletionTimestamp"].is_string(),
        "{marked}"
    );
    assert_eq!(marked["metadata"]["deletionGracePeriodSeconds"], 30);
    let (code, _) = c.delete(&format!("{pods}/p?gracePeriodSeconds=0")).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(c.get(&format!("{pods}/p")).await.0, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn finalizers_hold_deletion_until_removed() {
    let c = start().await;
    let mut obj = cm("held");
    obj["metadata"]["finalizers"] = json!(["example.com/keep"]);
    c.post(CMS, obj).await;
    let (code, marked) = c.delete(&format!("{CMS}/held")).await;
    assert_eq!(code, StatusCode::OK);
    assert!(marked["metadata"]["deletionTimestamp"].is_string());
    assert_eq!(c.get(&format!("{CMS}/held")).await.0, StatusCode::OK);
    let (code, _) = c
        .patch(
            &format!("{CMS}/held"),
            "application/merge-patch+json",
            json!({"metadata": {"finalizers": null}}),
        )
        .await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(c.get(&format!("{CMS}/held")).await.0, StatusCode::NOT_FOUND);
    // Foreground and orphan propagation are recorded as finalizers for the collector.
    c.post(DEPLOYS, deployment("fg", 1)).await;
    let (_, fg) = c
        .call(
            Method::DELETE,
            &format!("{DEPLOYS}/fg"),
            Some(json!({"propagationPolicy": "Foreground"})),
            "application/json",
        )
        .await;
    assert_eq!(fg["metadata"]["finalizers"], json!(["foregroundDeletion"]));
    c.post(DEPLOYS, deployment("or", 1)).await;
    let (_, or) = c
        .delete(&format!("{DEPLOYS}/or?propagationPolicy=Orphan"))
        .await;
    assert_eq!(or["metadata"]["finalizers"], json!(["orphan"]));
}

#[tokio::test]
async fn namespaces_gate_creation() {
    let c = start().await;
    let (code, err) = c.post("/api/v1/namespaces/nope/configmaps", cm("x")).await;
    assert_eq!(
        (code, err["message"].as_str()),
        (StatusCode::NOT_FOUND, Some("namespaces \"nope\" not found"))
    );
    c.post("/api/v1/namespaces", json!({"metadata": {"name": "t"}}))
        .await;
    let (_, ns) = c.delete("/api/v1/namespaces/t").await;
    assert_eq!(ns["status"]["phase"], "Terminating");
    let (code, err) = c.post("/api/v1/namespaces/t/configmaps", cm("x")).await;
    assert_eq!(
        (code, err["reason"].as_str()),
        (StatusCode::FORBIDDEN, Some("Forbidden")),
        "{err}"
    );
}

#[tokio::test]
async fn selectors_and_paging() {
    let c = start().await;
    for i in 0..25 {
        let mut obj = cm(&format!("cm-{i:02}"));
        obj["metadata"]["labels"] =
            json!({"parity": if i % 2 == 0 { "even" } else { "odd" }, "n": i.to_string()});
        c.post(CMS, obj).await;
    }
    let (_, even) = c.get(&format!("{CMS}?labelSelector=parity%3Deven")).await;
    assert_eq!(even["items"].as_array().unwrap().len(), 13);
    let (_, set) = c
        .get(&format!(
            "{CMS}?labelSelector=n%20in%20(1,2,3),parity!%3Dodd"
        ))
        .await;
    assert_eq!(set["items"].as_array().unwrap().len(), 1);
    let (_, by_name) = c
        .get(&format!("{CMS}?fieldSelector=metadata.name%3Dcm-07"))
        .await;
    assert_eq!(by_name["items"][0]["metadata"]["name"], "cm-07");
    let (code, bad) = c.get(&format!("{CMS}?fieldSelector=data.k%3Dv")).await;
    assert_eq!(
        (code, bad["message"].as_str()),
        (
            StatusCode::BAD_REQUEST,
            Some("field label not supported: data.k")
        )
    );

    // Paging with a selector returns full pages at one revision.
    let mut names = Vec::new();
    let mut token: Option<String> = None;
    let mut first_rv = None;
    loop {
        let mut path = format!("{CMS}?limit=4&labelSelector=parity%3Dodd");
        if let Some(t) = &token {
            path.push_str(&format!("&continue={t}"));
        }
        let (code, page) = c.get(&path).await;
        assert_eq!(code, StatusCode::OK, "{page}");
        first_rv.get_or_insert_with(|| page["metadata"]["resourceVersion"].clone());
        assert_eq!(
            Some(&page["metadata"]["resourceVersion"]),
            first_rv.as_ref()
        );
        names.extend(
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i["metadata"]["name"].as_str().unwrap().to_owned()),
        );
        if token.is_none() {
            // Writes after the first page do not leak into later pages.
            let mut late = cm("cm-99");
            late["metadata"]["labels"] = json!({"parity": "odd"});
            c.post(CMS, late).await;
        }
        token = page["metadata"]["continue"].as_str().map(str::to_owned);
        if token.is_none() {
            break;
        }
    }
    let want: Vec<String> = (0..25)
        .filter(|i| i % 2 == 1)
        .map(|i| format!("cm-{i:02}"))
        .collect();
    assert_eq!(names, want);
    // Expired continue tokens are 410 Gone.
    let (_, page) = c.get(&format!("{CMS}?limit=2")).await;
    let t = page["metadata"]["continue"].as_str().unwrap().to_owned();
    c.post(CMS, cm("after-token")).await;
    c.api.compact(c.api.current_revision()).await.unwrap();
    let (code, gone) = c.get(&format!("{CMS}?limit=2&continue={t}")).await;
    assert_eq!(
        (code, gone["reason"].as_str()),
        (StatusCode::GONE, Some("Expired"))
    );
}

/// Reads watch events until `n` arrive.
async fn watch_events(c: &Cluster, path: &str, n: usize) -> Vec<Value> {
    let resp = c
        .http
        .get(format!("{}{path}", c.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut stream = resp.bytes_stream();
    let mut buf = Vec::new();
    let mut out = Vec::new();
    while out.len() < n {
        let chunk = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("watch event in time")
            .unwrap()
            .unwrap();
        buf.extend_from_slice(&chunk);
        while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            out.push(serde_json::from_slice(&line).unwrap());
        }
    }
    out
}

#[tokio::test]
async fn watch_from_a_version_with_selector_transitions() {
    let c = start().await;
    let (_, a) = c.post(CMS, cm("a")).await;
    let rv = a["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = format!("{CMS}?watch=1&resourceVersion={rv}&labelSelector=app%3Da");
    let watcher = {
        let c2 = Cluster {
            base: c.base.clone(),
            http: c.http.clone(),
            api: c.api.clone(),
            server: None,
        };
        tokio::spawn(async move { watch_events(&c2, &path, 3).await })
    };
    c.patch(
        &format!("{CMS}/a"),
        "application/merge-patch+json",
        json!({"data": {"k": "2"}}),
    )
    .await;
    c.post(CMS, cm("b")).await; // filtered out
    c.patch(
        &format!("{CMS}/a"),
        "application/merge-patch+json",
        json!({"metadata": {"labels": {"app": "moved"}}}),
    )
    .await;
    c.patch(
        &format!("{CMS}/a"),
        "application/merge-patch+json",
        json!({"metadata": {"labels": {"app": "a"}}}),
    )
    .await;
    let events = watcher.await.unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["MODIFIED", "DELETED", "ADDED"]);
    assert!(
        events
            .iter()
            .all(|e| e["object"]["metadata"]["name"] == "a")
    );

    // Without a version, a watch starts with the current state as ADDED.
    let events = watch_events(&c, &format!("{CMS}?watch=1"), 2).await;
    let names: Vec<&str> = events
        .iter()
        .map(|e| e["object"]["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a", "b"]);

    // Table watches carry rows, as `kubectl get -w` expects.
    let resp = c
        .http
        .get(format!("{}{CMS}?watch=1", c.base))
        .header("accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
        .send()
        .await
        .unwrap();
    let first = resp.bytes_stream().next().await.unwrap().unwrap();
    let e: Value = serde_json::from_slice(first.split(|b| *b == b'\n').next().unwrap()).unwrap();
    assert_eq!(e["object"]["kind"], "Table");
    assert_eq!(e["object"]["rows"][0]["cells"][0], "a");
}

#[tokio::test]
async fn watch_from_a_compacted_version_is_gone() {
    let c = start().await;
    c.post(CMS, cm("a")).await;
    c.post(CMS, cm("b")).await;
    let rev = c.api.current_revision();
    c.api.compact(rev).await.unwrap();
    // The watch opens and its only event is an ERROR carrying the 410 Status.
    let events = watch_events(&c, &format!("{CMS}?watch=1&resourceVersion={}", rev - 1), 1).await;
    assert_eq!(events[0]["type"], "ERROR");
    let status = &events[0]["object"];
    assert_eq!(
        (status["reason"].as_str(), status["code"].as_i64()),
        (Some("Expired"), Some(410))
    );
}

#[tokio::test]
async fn watch_bookmarks_and_initial_events_end() {
    let config = Config {
        bookmark_interval: Duration::from_millis(50),
        ..Config::default()
    };
    let c = start_with(wasmkube_store::memory(), config).await;
    c.post(CMS, cm("a")).await;
    let events = watch_events(&c, &format!("{CMS}?watch=1&sendInitialEvents=true&allowWatchBookmarks=true&resourceVersionMatch=NotOlderThan"), 3).await;
    assert_eq!(events[0]["type"], "ADDED");
    assert_eq!(events[1]["type"], "BOOKMARK");
    assert_eq!(
        events[1]["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"],
        "true"
    );
    assert_eq!(events[2]["type"], "BOOKMARK", "periodic bookmark");
}

#[tokio::test]
async fn bad_input_is_a_4xx_status_and_changes_nothing() {
    let c = start().await;
    c.post(CMS, cm("keep")).await;
    let before = c.api.current_revision();
    let deep = format!("{}1{}", "{\"a\":".repeat(500), "}".repeat(500));
    let cases: Vec<(&str, &str, Vec<u8>)> = vec![
        ("malformed json", "application/json", b"{\"metadata\": ".to_vec()),
        ("malformed yaml", "application/yaml", b"metadata: [unclosed".to_vec()),
        ("not an object", "application/json", b"[1,2,3]".to_vec()),
        ("deeply nested", "application/json", deep.into_bytes()),
        ("wrong kind", "application/json", json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "x"}}).to_string().into_bytes()),
        ("absurd number", "application/json", json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"}, "spec": {"replicas": 1e300}}).to_string().into_bytes()),
        ("invalid name", "application/json", cm("Not_Valid").to_string().into_bytes()),
        ("unknown field strict", "application/json", json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "u"}, "bogus": 1}).to_string().into_bytes()),
        ("protobuf", "application/vnd.kubernetes.protobuf", vec![0x6b, 0x38, 0x73, 0]),
        ("oversized", "application/json", vec![b' '; 4 * 1024 * 1024]),
    ];
    for (what, ct, body) in cases {
        let path = if what == "absurd number" {
            format!("{DEPLOYS}?fieldValidation=Strict")
        } else {
            format!("{CMS}?fieldValidation=Strict")
        };
        let (code, status) = c.raw(Method::POST, &path, ct, body).await;
        assert!(code.is_client_error(), "{what}: {code} {status}");
        if code != StatusCode::PAYLOAD_TOO_LARGE {
            assert_eq!(status["kind"], "Status", "{what}");
            assert_eq!(
                status["code"].as_u64(),
                Some(code.as_u16() as u64),
                "{what}"
            );
        }
    }
    let (code, status) = c
        .raw(
            Method::POST,
            "/api/v1/namespaces/default/widgets",
            "application/json",
            b"{}".to_vec(),
        )
        .await;
    assert_eq!(code, StatusCode::NOT_FOUND, "{status}");
    let (code, _) = c
        .raw(
            Method::PATCH,
            &format!("{CMS}/keep"),
            "application/json-patch+json",
            b"{\"op\": 1}".to_vec(),
        )
        .await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    let (code, _) = c
        .raw(
            Method::PATCH,
            &format!("{CMS}/keep"),
            "text/plain",
            b"x".to_vec(),
        )
        .await;
    assert_eq!(code, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(
        c.api.current_revision(),
        before,
        "failed requests wrote nothing"
    );
    assert_eq!(c.count(CMS).await, 1);
    // Invalid objects name each field in the causes.
    let (code, status) = c.post(DEPLOYS, json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
        "spec": {"selector": {"matchLabels": {"a": "b"}}, "template": {"metadata": {"labels": {"a": "c"}}, "spec": {"containers": [{"name": "c"}]}}}})).await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY);
    let fields: Vec<&str> = status["details"]["causes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["field"].as_str().unwrap())
        .collect();
    assert_eq!(
        fields,
        [
            "spec.template.metadata.labels",
            "spec.template.spec.containers[0].image"
        ]
    );
    assert_eq!(status["details"]["kind"], "Deployment");
}

#[tokio::test]
async fn field_validation_warn_reports_unknown_fields_in_a_header() {
    let c = start().await;
    let body =
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "w"}, "bogus": 1});
    let resp = c
        .http
        .post(format!("{}{CMS}?fieldValidation=Warn", c.base))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let warning = resp
        .headers()
        .get("warning")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(warning, "299 - \"unknown field \\\"bogus\\\"\"");
    let (code, _) = c
        .post(
            &format!("{CMS}?fieldValidation=Ignore"),
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "i"}, "bogus": 1}),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED);
}

#[tokio::test]
async fn server_side_apply_creates_updates_and_conflicts() {
    let c = start().await;
    let apply = |body: Value, manager: &str, force: bool| {
        let path = format!(
            "{DEPLOYS}/web?fieldManager={manager}{}",
            if force { "&force=true" } else { "" }
        );
        let c = &c;
        async move { c.patch(&path, "application/apply-patch+yaml", body).await }
    };
    let (code, created) = apply(deployment("web", 2), "alice", false).await;
    assert_eq!(code, StatusCode::CREATED, "{created}");
    let (code, _) = c
        .patch(
            &format!("{DEPLOYS}/web?fieldManager=bob"),
            "application/merge-patch+json",
            json!({"spec": {"replicas": 5}}),
        )
        .await;
    assert_eq!(code, StatusCode::OK);
    let (code, conflict) = apply(deployment("web", 2), "alice", false).await;
    assert_eq!(code, StatusCode::CONFLICT, "{conflict}");
    assert_eq!(conflict["details"]["causes"][0]["field"], ".spec.replicas");
    assert_eq!(
        conflict["details"]["causes"][0]["reason"],
        "FieldManagerConflict"
    );
    assert!(
        conflict["message"]
            .as_str()
            .unwrap()
            .contains("conflict with \"bob\"")
    );
    let (code, forced) = apply(deployment("web", 2), "alice", true).await;
    assert_eq!(
        (code, forced["spec"]["replicas"].as_i64()),
        (StatusCode::OK, Some(2))
    );
    let managers: Vec<&str> = forced["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["manager"].as_str().unwrap())
        .collect();
    assert_eq!(managers, ["alice"], "bob lost his only field");

    // Applied to the status subresource: the status is written, the rest
    // of what was applied is not, and nothing is created.
    let (code, status) = c
        .patch(
            &format!("{DEPLOYS}/web/status?fieldManager=controller&force=true"),
            "application/apply-patch+yaml",
            json!({"apiVersion": "apps/v1", "kind": "Deployment",
                   "spec": {"replicas": 9}, "status": {"observedGeneration": 7}}),
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{status}");
    assert_eq!(status["status"]["observedGeneration"], 7);
    assert_eq!(status["spec"]["replicas"], 2);
    let (code, _) = c
        .patch(
            &format!("{DEPLOYS}/absent/status?fieldManager=controller"),
            "application/apply-patch+yaml",
            json!({"apiVersion": "apps/v1", "kind": "Deployment", "status": {"observedGeneration": 1}}),
        )
        .await;
    assert_eq!(code, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn discovery_version_and_tables() {
    let c = start().await;
    let (_, v) = c.get("/version/").await;
    assert!(v["gitVersion"].as_str().unwrap().starts_with("v1.33."));
    let (_, core) = c.get("/api/v1").await;
    let pods = core["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "pods")
        .unwrap()
        .clone();
    assert_eq!(pods["shortNames"], json!(["po"]));
    let (_, groups) = c.get("/apis").await;
    assert!(
        groups["groups"]
            .as_array()
            .unwrap()
            .iter()
            .any(|g| g["name"] == "apps")
    );
    let (_, apps) = c.get("/apis/apps/v1").await;
    assert!(
        apps["resources"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["name"] == "deployments/scale")
    );
    for health in ["/healthz", "/livez", "/readyz"] {
        assert_eq!(c.get(health).await.0, StatusCode::OK);
    }
    c.post(DEPLOYS, deployment("web", 3)).await;
    let resp = c
        .http
        .get(format!("{}{DEPLOYS}", c.base))
        .header("accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
        .send()
        .await
        .unwrap();
    let t: Value = resp.json().await.unwrap();
    let cols: Vec<&str> = t["columnDefinitions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["priority"] == 0)
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(cols, ["Name", "Ready", "Up-to-date", "Available", "Age"]);
    assert_eq!(t["rows"][0]["cells"][1], "0/3");
    let (_, index) = c.get("/openapi/v3").await;
    let url = index["paths"]["apis/apps/v1"]["serverRelativeURL"]
        .as_str()
        .unwrap()
        .to_owned();
    let (code, doc) = c.get(&url).await;
    assert_eq!(code, StatusCode::OK);
    assert!(doc["components"]["schemas"]["io.k8s.api.apps.v1.Deployment"].is_object());
}

#[tokio::test]
async fn services_get_unique_cluster_ips_returned_on_delete() {
    let c = start().await;
    let svcs = "/api/v1/namespaces/default/services";
    let svc = |name: &str, ip: Option<&str>| {
        let mut s = json!({"metadata": {"name": name}, "spec": {"selector": {"app": "x"}, "ports": [{"port": 80}]}});
        if let Some(ip) = ip {
            s["spec"]["clusterIP"] = json!(ip);
        }
        s
    };
    let (code, a) = c.post(svcs, svc("a", Some("10.96.0.50"))).await;
    assert_eq!(
        (code, a["spec"]["clusterIPs"].clone()),
        (StatusCode::CREATED, json!(["10.96.0.50"])),
        "{a}"
    );
    assert_eq!(a["spec"]["ports"][0]["targetPort"], 80);
    let (code, dup) = c.post(svcs, svc("b", Some("10.96.0.50"))).await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{dup}");
    c.delete(&format!("{svcs}/a")).await;
    let (code, _) = c.post(svcs, svc("b", Some("10.96.0.50"))).await;
    assert_eq!(code, StatusCode::CREATED, "the address was released");
    let (_, auto) = c.post(svcs, svc("c", None)).await;
    assert!(
        auto["spec"]["clusterIP"]
            .as_str()
            .unwrap()
            .starts_with("10.")
    );
}

#[tokio::test]
async fn service_updates_keep_their_addresses_and_allocate_node_ports() {
    let c = start().await;
    let svcs = "/api/v1/namespaces/default/services";
    let merge = "application/merge-patch+json";
    let (code, svc) = c
        .post(
            svcs,
            json!({"metadata": {"name": "web"}, "spec": {"ports": [{"name": "http", "port": 80}]}}),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED, "{svc}");
    let ip = svc["spec"]["clusterIP"].clone();
    // A whole-object update that leaves the address out keeps it (as
    // `kubectl replace` of a manifest without one).
    let (code, put) = c
        .put(
            &format!("{svcs}/web"),
            json!({"metadata": {"name": "web"}, "spec": {"ports": [{"name": "http", "port": 80}]}}),
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{put}");
    assert_eq!(put["spec"]["clusterIP"], ip);
    // Becoming a NodePort allocates a node port; an update leaving it out
    // keeps it.
    let (code, np) = c
        .patch(
            &format!("{svcs}/web"),
            merge,
            json!({"spec": {"type": "NodePort"}}),
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{np}");
    let node_port = np["spec"]["ports"][0]["nodePort"].as_u64().unwrap();
    assert!((30000..=32767).contains(&node_port), "{np}");
    let (_, again) = c
        .put(
            &format!("{svcs}/web"),
            json!({"metadata": {"name": "web"}, "spec": {"type": "NodePort", "ports": [{"name": "http", "port": 80}]}}),
        )
        .await;
    assert_eq!(again["spec"]["ports"][0]["nodePort"], node_port, "{again}");
    // Another Service cannot take it; once the first goes back to
    // ClusterIP, the port is free again.
    let taken = json!({"metadata": {"name": "other"}, "spec": {"type": "NodePort",
        "ports": [{"port": 81, "nodePort": node_port}]}});
    let (code, refused) = c.post(svcs, taken.clone()).await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{refused}");
    assert_eq!(
        refused["details"]["causes"][0]["field"],
        "spec.ports[0].nodePort"
    );
    let (code, back) = c
        .patch(
            &format!("{svcs}/web"),
            merge,
            json!({"spec": {"type": "ClusterIP"}}),
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{back}");
    assert!(back["spec"]["ports"][0].get("nodePort").is_none(), "{back}");
    let (code, other) = c.post(svcs, taken).await;
    assert_eq!(code, StatusCode::CREATED, "{other}");
    // Out of range on update: a 422 naming the field.
    let (code, bad) = c
        .patch(
            &format!("{svcs}/web"),
            merge,
            json!({"spec": {"type": "NodePort", "ports": [{"name": "http", "port": 80, "nodePort": 80}]}}),
        )
        .await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{bad}");
    assert_eq!(
        bad["details"]["causes"][0]["field"],
        "spec.ports[0].nodePort"
    );
}

#[tokio::test]
async fn the_kubernetes_and_kube_dns_services_exist_from_the_start() {
    let c = start().await;
    let (code, k) = c
        .get("/api/v1/namespaces/default/services/kubernetes")
        .await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(k["spec"]["clusterIP"], "10.96.0.1");
    assert_eq!(k["spec"]["ports"][0]["port"], 443);
    let (code, dns) = c
        .get("/api/v1/namespaces/kube-system/services/kube-dns")
        .await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(dns["spec"]["clusterIP"], "10.96.0.10");
}

#[tokio::test]
async fn sled_backed_server_keeps_objects_across_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = wasmkube_store::open_sled(dir.path()).unwrap();
        let c = start_with(store, Config::default()).await;
        c.post(CMS, cm("durable")).await;
        c.stop().await;
    }
    let store = loop {
        match wasmkube_store::open_sled(dir.path()) {
            Ok(s) => break s,
            Err(wasmkube_store::StoreError::Locked { .. }) => {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            Err(e) => panic!("{e}"),
        }
    };
    let c = start_with(store, Config::default()).await;
    assert_eq!(c.get(&format!("{CMS}/durable")).await.0, StatusCode::OK);
}

#[tokio::test]
async fn deletecollection_honours_selectors() {
    let c = start().await;
    for (name, tier) in [("a", "web"), ("b", "web"), ("c", "db")] {
        let mut obj = cm(name);
        obj["metadata"]["labels"] = json!({"tier": tier});
        c.post(CMS, obj).await;
    }
    let (code, deleted) = c.delete(&format!("{CMS}?labelSelector=tier%3Dweb")).await;
    assert_eq!(code, StatusCode::OK, "{deleted}");
    assert_eq!(deleted["items"].as_array().unwrap().len(), 2);
    let (_, left) = c.get(CMS).await;
    let names: Vec<&str> = left["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["c"]);
}

#[tokio::test]
async fn events_select_by_involved_object() {
    let c = start().await;
    let events = "/api/v1/namespaces/default/events";
    for (name, pod) in [("e1", "web-1"), ("e2", "web-2")] {
        let ev = json!({"metadata": {"name": name}, "involvedObject": {"kind": "Pod", "name": pod, "namespace": "default"},
            "reason": "Scheduled", "message": "ok", "type": "Normal", "source": {"component": "scheduler"}});
        let (code, body) = c.post(events, ev).await;
        assert_eq!(code, StatusCode::CREATED, "{body}");
    }
    let (_, found) = c
        .get(&format!("{events}?fieldSelector=involvedObject.name%3Dweb-2,involvedObject.kind%3DPod,source%3Dscheduler"))
        .await;
    let names: Vec<&str> = found["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["e2"]);
    let resp = c
        .http
        .get(format!("{}{events}", c.base))
        .header("accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
        .send()
        .await
        .unwrap();
    let table: Value = resp.json().await.unwrap();
    assert_eq!(table["rows"][0]["cells"][3], "pod/web-1");
}

#[tokio::test]
async fn routing_kinds_are_served_defaulted_and_validated() {
    let c = start().await;
    let (code, class) = c
        .get("/apis/networking.k8s.io/v1/ingressclasses/wasmkube")
        .await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(class["spec"]["controller"], "wasmkube.dev/gateway");
    let (code, gc) = c
        .get("/apis/gateway.networking.k8s.io/v1/gatewayclasses/wasmkube")
        .await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(gc["spec"]["controllerName"], "wasmkube.dev/gateway");

    // An Ingress without a class gets the default one; one without any
    // backend is refused with the field.
    let ingresses = "/apis/networking.k8s.io/v1/namespaces/default/ingresses";
    let (code, ing) = c
        .post(
            ingresses,
            json!({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
                   "metadata": {"name": "web"},
                   "spec": {"rules": [{"host": "web.example.com", "http": {"paths": [
                       {"path": "/", "pathType": "Prefix",
                        "backend": {"service": {"name": "web", "port": {"number": 80}}}}]}}]}}),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED, "{ing}");
    assert_eq!(ing["spec"]["ingressClassName"], "wasmkube");
    let (code, err) = c
        .post(
            ingresses,
            json!({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
                   "metadata": {"name": "empty"}, "spec": {}}),
        )
        .await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(err["details"]["causes"][0]["field"], "spec", "{err}");
    let (code, err) = c
        .post(
            ingresses,
            json!({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
                   "metadata": {"name": "nopath"},
                   "spec": {"rules": [{"http": {"paths": [
                       {"path": "/", "pathType": "Sideways",
                        "backend": {"service": {"name": "web", "port": {"number": 80}}}}]}}]}}),
        )
        .await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        err["details"]["causes"][0]["field"],
        "spec.rules[0].http.paths[0].pathType"
    );

    // An HTTPRoute gets the schema's defaults; a bad regex or a Service
    // backend without a port is a 422 naming the field.
    let routes = "/apis/gateway.networking.k8s.io/v1/namespaces/default/httproutes";
    let (code, route) = c
        .post(
            routes,
            json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                   "metadata": {"name": "r"},
                   "spec": {"parentRefs": [{"name": "gw"}],
                            "rules": [{"backendRefs": [{"name": "web", "port": 80}]}]}}),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED, "{route}");
    let rule = &route["spec"]["rules"][0];
    assert_eq!(
        rule["matches"][0]["path"],
        json!({"type": "PathPrefix", "value": "/"})
    );
    assert_eq!(rule["backendRefs"][0]["weight"], 1);
    assert_eq!(rule["backendRefs"][0]["kind"], "Service");
    assert_eq!(route["spec"]["parentRefs"][0]["kind"], "Gateway");
    let (code, err) = c
        .post(
            routes,
            json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                   "metadata": {"name": "bad"},
                   "spec": {"rules": [
                       {"matches": [{"path": {"type": "RegularExpression", "value": "/(a"}}],
                        "backendRefs": [{"name": "web"}]}]}}),
        )
        .await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY);
    let fields: Vec<&str> = err["details"]["causes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["field"].as_str().unwrap())
        .collect();
    assert_eq!(
        fields,
        [
            "spec.rules[0].matches[0].path.value",
            "spec.rules[0].backendRefs[0].port"
        ],
        "{err}"
    );
    let (code, _) = c.get(&format!("{routes}/bad")).await;
    assert_eq!(code, StatusCode::NOT_FOUND);

    // kubectl's table for Gateways and the discovery of the group.
    let (code, gw) = c
        .post(
            "/apis/gateway.networking.k8s.io/v1/namespaces/default/gateways",
            json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
                   "metadata": {"name": "gw"},
                   "spec": {"gatewayClassName": "wasmkube",
                            "listeners": [{"name": "http", "port": 8080, "protocol": "HTTP"}]}}),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED, "{gw}");
    assert_eq!(
        gw["spec"]["listeners"][0]["allowedRoutes"]["namespaces"]["from"],
        "Same"
    );
    let (code, err) = c
        .post(
            "/apis/gateway.networking.k8s.io/v1/namespaces/default/gateways",
            json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
                   "metadata": {"name": "tls"},
                   "spec": {"gatewayClassName": "wasmkube",
                            "listeners": [{"name": "https", "port": 8443, "protocol": "HTTPS"}]}}),
        )
        .await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        err["details"]["causes"][0]["field"],
        "spec.listeners[0].tls"
    );
    let (code, disc) = c.get("/apis/gateway.networking.k8s.io/v1").await;
    assert_eq!(code, StatusCode::OK);
    let kinds: Vec<&str> = disc["resources"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["kind"].as_str())
        .collect();
    for kind in ["GatewayClass", "Gateway", "HTTPRoute"] {
        assert!(kinds.contains(&kind), "{disc}");
    }
}

/// Knative Serving's kinds are served beside the core ones: a Knative
/// Service is never taken for a core Service (no ClusterIP), gets Knative's
/// defaults, and bad templates and traffic are 422s naming the field.
#[tokio::test]
async fn knative_serving_kinds_are_served_defaulted_and_validated() {
    let c = start().await;
    let ksvcs = "/apis/serving.knative.dev/v1/namespaces/default/services";
    let (code, ksvc) = c
        .post(
            ksvcs,
            json!({"apiVersion": "serving.knative.dev/v1", "kind": "Service",
                   "metadata": {"name": "hello"},
                   "spec": {"template": {"spec": {"containers": [{"image": "reg/hello:v1"}]}}}}),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED, "{ksvc}");
    assert_eq!(ksvc["kind"], "Service");
    assert_eq!(ksvc["apiVersion"], "serving.knative.dev/v1");
    assert!(ksvc["spec"].get("clusterIP").is_none(), "{ksvc}");
    let template = &ksvc["spec"]["template"]["spec"];
    assert_eq!(template["containers"][0]["name"], "user-container");
    assert_eq!(template["timeoutSeconds"], 300);
    assert_eq!(template["containerConcurrency"], 0);
    assert_eq!(
        ksvc["spec"]["traffic"],
        json!([{"latestRevision": true, "percent": 100}])
    );
    // The core Service of the same name is another object.
    let (code, _) = c.get("/api/v1/namespaces/default/services/hello").await;
    assert_eq!(code, StatusCode::NOT_FOUND);

    for (name, spec, field) in [
        (
            "noimage",
            json!({"template": {"spec": {"containers": [{"name": "c"}]}}}),
            "spec.template.spec.containers[0].image",
        ),
        (
            "split",
            json!({"template": {"spec": {"containers": [{"image": "i"}]}},
                   "traffic": [{"latestRevision": true, "percent": 80},
                               {"revisionName": "split-00001", "percent": 10}]}),
            "spec.traffic",
        ),
        (
            "scale",
            json!({"template": {
                "metadata": {"annotations": {"autoscaling.knative.dev/min-scale": "3",
                                             "autoscaling.knative.dev/max-scale": "2"}},
                "spec": {"containers": [{"image": "i"}]}}}),
            "spec.template.metadata.annotations[autoscaling.knative.dev/max-scale]",
        ),
        (
            "byo",
            json!({"template": {"metadata": {"name": "other-v1"},
                                "spec": {"containers": [{"image": "i"}]}}}),
            "spec.template.metadata.name",
        ),
    ] {
        let (code, err) = c
            .post(
                ksvcs,
                json!({"apiVersion": "serving.knative.dev/v1", "kind": "Service",
                       "metadata": {"name": name}, "spec": spec}),
            )
            .await;
        assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{name}: {err}");
        assert_eq!(err["details"]["causes"][0]["field"], field, "{name}: {err}");
    }

    // Traffic to a revision that does not exist is refused with the field.
    let (code, err) = c
        .post(
            ksvcs,
            json!({"apiVersion": "serving.knative.dev/v1", "kind": "Service",
                   "metadata": {"name": "typo"},
                   "spec": {"template": {"spec": {"containers": [{"image": "i"}]}},
                            "traffic": [{"revisionName": "typo-00009", "percent": 100}]}}),
        )
        .await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{err}");
    assert_eq!(
        err["details"]["causes"][0]["field"], "spec.traffic[0].revisionName",
        "{err}"
    );
    assert_eq!(err["details"]["causes"][0]["reason"], "FieldValueNotFound");

    // A Revision's spec cannot change.
    let revisions = "/apis/serving.knative.dev/v1/namespaces/default/revisions";
    let (code, rev) = c
        .post(
            revisions,
            json!({"apiVersion": "serving.knative.dev/v1", "kind": "Revision",
                   "metadata": {"name": "r1"},
                   "spec": {"containers": [{"image": "i:v1"}]}}),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED, "{rev}");
    let mut changed = rev.clone();
    changed["spec"]["containers"][0]["image"] = json!("i:v2");
    let (code, err) = c.put(&format!("{revisions}/r1"), changed).await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{err}");
    assert_eq!(err["details"]["causes"][0]["field"], "spec");

    // kubectl's short name and the server-side table's Knative columns.
    let (code, discovery) = c.get("/apis/serving.knative.dev/v1").await;
    assert_eq!(code, StatusCode::OK);
    let services = discovery["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "services")
        .unwrap();
    assert_eq!(services["shortNames"], json!(["kservice", "ksvc"]));
    let resp = c
        .http
        .get(format!("{}{ksvcs}", c.base))
        .header("accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
        .send()
        .await
        .unwrap();
    let table: Value = resp.json().await.unwrap();
    let columns: Vec<&str> = table["columnDefinitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        columns,
        [
            "Name",
            "URL",
            "LatestCreated",
            "LatestReady",
            "Ready",
            "Reason"
        ]
    );
}

#[tokio::test]
async fn horizontal_pod_autoscalers_are_served_as_v1_and_v2_over_one_stored_object() {
    let c = start().await;
    const V1: &str = "/apis/autoscaling/v1/namespaces/default/horizontalpodautoscalers";
    const V2: &str = "/apis/autoscaling/v2/namespaces/default/horizontalpodautoscalers";
    let (_, group) = c.get("/apis/autoscaling").await;
    assert_eq!(group["preferredVersion"]["version"], "v2", "{group}");
    assert_eq!(group["versions"].as_array().unwrap().len(), 2, "{group}");

    // Written as v1: read as v2 with the CPU target as a metric (and v2's
    // defaults), and as v1 as written.
    let (code, created) = c
        .post(V1, json!({"apiVersion": "autoscaling/v1", "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": "web"},
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
                "maxReplicas": 5, "targetCPUUtilizationPercentage": 50}}))
        .await;
    assert_eq!(code, StatusCode::CREATED, "{created}");
    assert_eq!(created["apiVersion"], "autoscaling/v1");
    assert_eq!(created["spec"]["targetCPUUtilizationPercentage"], 50);
    assert_eq!(created["spec"]["minReplicas"], 1, "defaulted");
    let (_, v2) = c.get(&format!("{V2}/web")).await;
    assert_eq!(v2["apiVersion"], "autoscaling/v2");
    assert_eq!(
        v2["spec"]["metrics"],
        json!([{"type": "Resource", "resource": {"name": "cpu",
            "target": {"type": "Utilization", "averageUtilization": 50}}}])
    );
    assert!(v2["metadata"]["annotations"].is_null(), "{v2}");

    // A v2-only field (behavior) survives a v1 client's read-modify-write,
    // carried in Kubernetes' round-trip annotation.
    let (code, _) = c
        .patch(
            &format!("{V2}/web"),
            "application/merge-patch+json",
            json!({"spec": {"behavior": {"scaleDown": {"stabilizationWindowSeconds": 30}}}}),
        )
        .await;
    assert_eq!(code, StatusCode::OK);
    let (_, mut v1) = c.get(&format!("{V1}/web")).await;
    assert!(
        v1["metadata"]["annotations"]["autoscaling.alpha.kubernetes.io/behavior"]
            .as_str()
            .is_some_and(|b| b.contains("\"stabilizationWindowSeconds\":30")),
        "{v1}"
    );
    v1["spec"]["maxReplicas"] = json!(8);
    let (code, updated) = c.put(&format!("{V1}/web"), v1).await;
    assert_eq!(code, StatusCode::OK, "{updated}");
    let (_, v2) = c.get(&format!("{V2}/web")).await;
    assert_eq!(v2["spec"]["maxReplicas"], 8);
    assert_eq!(
        v2["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"],
        30
    );
    assert!(v2["metadata"]["annotations"].is_null(), "{v2}");

    // A merge patch in v1 terms, and server-side apply as v1.
    let (code, patched) = c
        .patch(
            &format!("{V1}/web"),
            "application/merge-patch+json",
            json!({"spec": {"targetCPUUtilizationPercentage": 70}}),
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{patched}");
    assert_eq!(patched["spec"]["targetCPUUtilizationPercentage"], 70);
    let apply = json!({"apiVersion": "autoscaling/v1", "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "web"}, "spec": {"minReplicas": 2}});
    let (code, conflict) = c
        .patch(
            &format!("{V1}/web?fieldManager=tester"),
            "application/apply-patch+yaml",
            apply.clone(),
        )
        .await;
    // Only the field applied conflicts (with its creator), not the
    // required fields the apply configuration left out.
    assert_eq!(code, StatusCode::CONFLICT, "{conflict}");
    let causes = conflict["details"]["causes"].as_array().unwrap();
    assert_eq!(causes.len(), 1, "{conflict}");
    assert_eq!(causes[0]["field"], ".spec.minReplicas");
    let (code, applied) = c
        .patch(
            &format!("{V1}/web?fieldManager=tester&force=true"),
            "application/apply-patch+yaml",
            apply,
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{applied}");
    assert_eq!(applied["spec"]["maxReplicas"], 8, "{applied}");
    let (_, v2) = c.get(&format!("{V2}/web")).await;
    assert_eq!(v2["spec"]["minReplicas"], 2);
    assert_eq!(
        v2["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"],
        70
    );

    // The status written as v2 reads as v1's current percentage.
    let (code, _) = c
        .patch(
            &format!("{V2}/web/status"),
            "application/merge-patch+json",
            json!({"status": {"currentReplicas": 2, "desiredReplicas": 3, "currentMetrics": [
                {"type": "Resource", "resource": {"name": "cpu", "current": {"averageUtilization": 91}}}]}}),
        )
        .await;
    assert_eq!(code, StatusCode::OK);
    let (_, list) = c.get(V1).await;
    assert_eq!(list["kind"], "HorizontalPodAutoscalerList");
    let item = &list["items"][0];
    assert_eq!(item["apiVersion"], "autoscaling/v1");
    assert_eq!(item["status"]["currentCPUUtilizationPercentage"], 91);
    assert_eq!(item["status"]["desiredReplicas"], 3);
    let events = watch_events(&c, &format!("{V1}?watch=true&resourceVersion=0"), 1).await;
    assert_eq!(
        events[0]["object"]["apiVersion"], "autoscaling/v1",
        "{events:?}"
    );
    assert_eq!(
        events[0]["object"]["spec"]["targetCPUUtilizationPercentage"],
        70
    );

    // Bad input in v1 terms: the field named as v2 validates it.
    let (code, status) = c
        .post(
            V1,
            json!({"apiVersion": "autoscaling/v1", "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": "bad"},
            "spec": {"scaleTargetRef": {"kind": "Deployment", "name": "web"}, "maxReplicas": 0}}),
        )
        .await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{status}");
    let (code, _) = c.delete(&format!("{V1}/web")).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(c.count(V2).await, 0);
    c.stop().await;
}

#[tokio::test]
async fn storage_kinds_are_served_defaulted_and_validated() {
    let c = start().await;
    // The built-in class is the default.
    let (code, class) = c
        .get("/apis/storage.k8s.io/v1/storageclasses/local-path")
        .await;
    assert_eq!(code, StatusCode::OK, "{class}");
    assert_eq!(class["provisioner"], "wasmkube.io/local-path");
    assert_eq!(class["volumeBindingMode"], "WaitForFirstConsumer");
    assert_eq!(
        class["metadata"]["annotations"]["storageclass.kubernetes.io/is-default-class"],
        "true"
    );

    // A claim without a class gets the default one; an empty class is kept.
    let claims = "/api/v1/namespaces/default/persistentvolumeclaims";
    let claim = |name: &str, class: Option<&str>, size: &str| {
        let mut spec = json!({"accessModes": ["ReadWriteOnce"],
                              "resources": {"requests": {"storage": size}}});
        if let Some(class) = class {
            spec["storageClassName"] = json!(class);
        }
        json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
               "metadata": {"name": name}, "spec": spec})
    };
    let (code, pvc) = c.post(claims, claim("data", None, "1Gi")).await;
    assert_eq!(code, StatusCode::CREATED, "{pvc}");
    assert_eq!(pvc["spec"]["storageClassName"], "local-path");
    assert_eq!(pvc["spec"]["volumeMode"], "Filesystem");
    assert_eq!(pvc["status"]["phase"], "Pending");
    let (code, pvc) = c.post(claims, claim("static", Some(""), "1Gi")).await;
    assert_eq!(code, StatusCode::CREATED, "{pvc}");
    assert_eq!(pvc["spec"]["storageClassName"], "");

    // Bad claims name the field.
    let (code, err) = c.post(claims, claim("zero", None, "0")).await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{err}");
    assert_eq!(
        err["details"]["causes"][0]["field"],
        "spec.resources.requests[storage]"
    );
    let mut no_modes = claim("nomodes", None, "1Gi");
    no_modes["spec"]["accessModes"] = json!([]);
    let (code, err) = c.post(claims, no_modes).await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{err}");
    assert_eq!(err["details"]["causes"][0]["field"], "spec.accessModes");

    // A claim's spec is frozen but for its size, which may only grow.
    let path = format!("{claims}/data");
    let (code, err) = c
        .patch(
            &path,
            "application/merge-patch+json",
            json!({"spec": {"accessModes": ["ReadWriteMany"]}}),
        )
        .await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{err}");
    assert_eq!(err["details"]["causes"][0]["field"], "spec");
    let resize = |size: &str| json!({"spec": {"resources": {"requests": {"storage": size}}}});
    // Only a bound claim changes size.
    let (code, err) = c
        .patch(&path, "application/merge-patch+json", resize("2Gi"))
        .await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{err}");
    for name in ["data", "static"] {
        let (code, bound) = c
            .patch(
                &format!("{claims}/{name}/status"),
                "application/merge-patch+json",
                json!({"status": {"phase": "Bound"}}),
            )
            .await;
        assert_eq!(code, StatusCode::OK, "{bound}");
    }
    let (code, err) = c
        .patch(&path, "application/merge-patch+json", resize("500Mi"))
        .await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{err}");
    let (code, grown) = c
        .patch(&path, "application/merge-patch+json", resize("2Gi"))
        .await;
    assert_eq!(code, StatusCode::OK, "{grown}");
    // Growth needs a class that allows expansion (the default one does).
    let (code, err) = c
        .patch(
            &format!("{claims}/static"),
            "application/merge-patch+json",
            resize("2Gi"),
        )
        .await;
    assert_eq!(code, StatusCode::FORBIDDEN, "{err}");
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("only dynamically provisioned pvc can be resized"),
        "{err}"
    );

    // Volumes: one source, a local one with node affinity.
    let volumes = "/api/v1/persistentvolumes";
    let volume = |name: &str, source: Value| {
        json!({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": name},
               "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                        "hostPath": source}})
    };
    let (code, pv) = c
        .post(volumes, volume("pv1", json!({"path": "/srv/pv1"})))
        .await;
    assert_eq!(code, StatusCode::CREATED, "{pv}");
    assert_eq!(pv["spec"]["persistentVolumeReclaimPolicy"], "Retain");
    assert_eq!(pv["status"]["phase"], "Pending");
    let (code, err) = c.post(volumes, volume("rel", json!({"path": "srv"}))).await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{err}");
    assert_eq!(err["details"]["causes"][0]["field"], "spec.hostPath.path");
    let mut local = volume("loc", json!(null));
    local["spec"].as_object_mut().unwrap().remove("hostPath");
    local["spec"]["local"] = json!({"path": "/srv/loc"});
    let (code, err) = c.post(volumes, local).await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{err}");
    assert_eq!(err["details"]["causes"][0]["field"], "spec.nodeAffinity");
    let mut none = volume("none", json!(null));
    none["spec"].as_object_mut().unwrap().remove("hostPath");
    let (code, err) = c.post(volumes, none).await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{err}");

    // A class's provisioner and parameters are frozen.
    let (code, err) = c
        .patch(
            "/apis/storage.k8s.io/v1/storageclasses/local-path",
            "application/merge-patch+json",
            json!({"reclaimPolicy": "Retain"}),
        )
        .await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{err}");
    assert_eq!(err["details"]["causes"][0]["field"], "reclaimPolicy");

    // kubectl's columns.
    let table: Value = c
        .http
        .get(format!("{}{claims}", c.base))
        .header("accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<&str> = table["columnDefinitions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["priority"] == 0)
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "Name",
            "Status",
            "Volume",
            "Capacity",
            "Access Modes",
            "StorageClass",
            "VolumeAttributesClass",
            "Age"
        ]
    );
    c.stop().await;
}

/// A watch over WebSocket, as kube-apiserver serves one: each event is one
/// JSON text message (base64 of it under `base64.binary.k8s.io`); a
/// watch the server refuses is answered as a plain response, not upgraded.
#[tokio::test]
async fn a_watch_upgraded_to_websocket_sends_one_message_per_event() {
    use base64::Engine as _;
    use tokio_tungstenite::tungstenite::{self, Message, client::IntoClientRequest};

    let c = start().await;
    let (_, list) = c.get("/api/v1/namespaces/default/configmaps").await;
    let rv = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_owned();
    let url = format!(
        "{}/api/v1/namespaces/default/configmaps?watch=1&resourceVersion={rv}",
        c.base.replace("http://", "ws://")
    );
    let (mut plain, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let mut request = url.as_str().into_client_request().unwrap();
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "base64.binary.k8s.io".parse().unwrap(),
    );
    let (mut encoded, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(
        response.headers()["sec-websocket-protocol"],
        "base64.binary.k8s.io"
    );
    for name in ["one", "two"] {
        let (status, _) = c
            .post(
                "/api/v1/namespaces/default/configmaps",
                json!({"metadata": {"name": name}, "data": {"k": name}}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED);
    }
    let next = |m: Option<Result<Message, tungstenite::Error>>| match m {
        Some(Ok(Message::Text(t))) => t.to_string(),
        other => panic!("expected a text message, got {other:?}"),
    };
    for name in ["one", "two"] {
        let event: Value = serde_json::from_str(&next(plain.next().await)).unwrap();
        assert_eq!(event["type"], "ADDED");
        assert_eq!(event["object"]["metadata"]["name"], name);
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(next(encoded.next().await))
            .unwrap();
        let event: Value = serde_json::from_slice(&decoded).unwrap();
        assert_eq!(event["object"]["data"]["k"], name);
    }
    plain.close(None).await.unwrap();

    // A refused watch (a bad selector) is not upgraded: the handshake
    // fails with the server's answer.
    let bad = format!(
        "{}/api/v1/namespaces/default/configmaps?watch=1&labelSelector=%3D%3D%3D",
        c.base.replace("http://", "ws://")
    );
    match tokio_tungstenite::connect_async(&bad).await {
        Err(tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), StatusCode::BAD_REQUEST)
        }
        other => panic!("a refused watch was upgraded: {other:?}"),
    }
    c.stop().await;
}

/// Server-side apply merges a custom resource's lists as its schema marks
/// them: `map` lists by their keys together (two managers' items side by
/// side), `set` lists by value, and unmarked lists atomically (a second
/// manager's different list conflicts).
#[tokio::test]
async fn server_side_apply_merges_custom_lists_as_their_schema_marks_them() {
    let c = start().await;
    let crd = json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "routes.demo.io"},
        "spec": {"group": "demo.io", "scope": "Namespaced",
            "names": {"plural": "routes", "singular": "route", "kind": "Route", "listKind": "RouteList"},
            "versions": [{"name": "v1", "served": true, "storage": true, "schema": {"openAPIV3Schema": {
                "type": "object", "properties": {"spec": {"type": "object", "properties": {
                    "ports": {"type": "array", "x-kubernetes-list-type": "map",
                        "x-kubernetes-list-map-keys": ["port", "protocol"],
                        "items": {"type": "object", "required": ["port", "protocol"], "properties": {
                            "port": {"type": "integer"}, "protocol": {"type": "string"},
                            "name": {"type": "string"}}}},
                    "hosts": {"type": "array", "x-kubernetes-list-type": "set", "items": {"type": "string"}},
                    "rules": {"type": "array", "items": {"type": "string"}},
                }}}}}}],
        },
    });
    let (code, body) = c
        .post(
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
            crd,
        )
        .await;
    assert_eq!(code, StatusCode::CREATED, "{body}");
    let path = "/apis/demo.io/v1/namespaces/default/routes/r";
    let apply = |manager: &'static str, spec: Value| {
        let c = &c;
        async move {
            c.patch(
                &format!("{path}?fieldManager={manager}"),
                "application/apply-patch+yaml",
                json!({"apiVersion": "demo.io/v1", "kind": "Route",
                       "metadata": {"name": "r"}, "spec": spec}),
            )
            .await
        }
    };
    let (code, body) = apply(
        "a",
        json!({"ports": [{"port": 80, "protocol": "TCP", "name": "http"}],
               "hosts": ["a.example"], "rules": ["x"]}),
    )
    .await;
    assert_eq!(code, StatusCode::CREATED, "{body}");
    let (code, body) = apply(
        "b",
        json!({"ports": [{"port": 80, "protocol": "UDP", "name": "dns"}], "hosts": ["b.example"]}),
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(
        body["spec"]["ports"],
        json!([{"port": 80, "protocol": "TCP", "name": "http"},
               {"port": 80, "protocol": "UDP", "name": "dns"}]),
        "{body}"
    );
    assert_eq!(body["spec"]["hosts"], json!(["a.example", "b.example"]));
    let b_fields = body["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["manager"] == "b")
        .unwrap()["fieldsV1"]
        .to_string();
    assert!(
        b_fields.contains(r#"k:{\"port\":80,\"protocol\":\"UDP\"}"#),
        "{b_fields}"
    );
    // An atomic list is one field: another manager's value conflicts.
    let (code, body) = apply("b", json!({"rules": ["y"]})).await;
    assert_eq!(code, StatusCode::CONFLICT, "{body}");
    // Manager a stops applying its port: it goes, b's stays.
    let (code, body) = apply("a", json!({"hosts": ["a.example"], "rules": ["x"]})).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(
        body["spec"]["ports"],
        json!([{"port": 80, "protocol": "UDP", "name": "dns"}]),
        "{body}"
    );
    c.stop().await;
}

/// An HTTPS webhook of the test's own on loopback (a certificate for
/// 127.0.0.1 and `conv.default.svc` from a CA of its own): `answer` turns
/// each request's path and body into the response body; the bodies it got
/// are kept.
struct TestWebhook {
    port: u16,
    ca_pem: String,
    received: std::sync::Arc<std::sync::Mutex<Vec<Value>>>,
    task: tokio::task::JoinHandle<()>,
}

impl TestWebhook {
    async fn start(answer: fn(&str, &Value) -> Value) -> Self {
        use std::sync::{Arc, Mutex};
        let ca = wasmkube_pki::Ca::create("test-webhook-ca").unwrap();
        let names = wasmkube_pki::ServingNames {
            dns: vec!["conv.default.svc".into()],
            ips: vec!["127.0.0.1".parse().unwrap()],
        };
        let serving = ca.issue_serving("webhook", &names).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(ca.server_tls(&serving).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let received: Arc<Mutex<Vec<Value>>> = Arc::default();
        let seen = received.clone();
        let app = axum::Router::new().fallback(
            move |uri: axum::http::Uri, axum::Json(body): axum::Json<Value>| {
                let seen = seen.clone();
                async move {
                    seen.lock().unwrap().push(body.clone());
                    axum::Json(answer(uri.path(), &body))
                }
            },
        );
        let task = tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let (acceptor, app) = (acceptor.clone(), app.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper_util::service::TowerToHyperService::new(app);
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
                });
            }
        });
        Self {
            port,
            ca_pem: ca.cert_pem().to_owned(),
            received,
            task,
        }
    }

    /// The request bodies received since the last call.
    fn take(&self) -> Vec<Value> {
        std::mem::take(&mut *self.received.lock().unwrap())
    }

    fn ca_bundle(&self) -> String {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(&self.ca_pem)
    }

    fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.port)
    }
}

/// The test's conversion webhook: `Widget` v1 has `spec.count`, v2
/// `spec.replicas`. It labels what it converts, tries to change the uid
/// (which the server must restore) and refuses objects named `refused-*`.
fn convert_widgets(_: &str, review: &Value) -> Value {
    let request = &review["request"];
    let desired = request["desiredAPIVersion"].as_str().unwrap().to_owned();
    let mut converted = Vec::new();
    for mut o in request["objects"].as_array().unwrap().clone() {
        let name = o["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if name.starts_with("refused-") {
            return json!({
                "apiVersion": "apiextensions.k8s.io/v1", "kind": "ConversionReview",
                "response": {"uid": request["uid"], "convertedObjects": [],
                    "result": {"status": "Failure", "message": format!("cannot convert {name}")}},
            });
        }
        let spec = o["spec"].as_object_mut().unwrap();
        if desired == "demo.io/v2" {
            let count = spec.remove("count").unwrap_or(json!(0));
            spec.insert("replicas".into(), count);
        } else {
            let replicas = spec.remove("replicas").unwrap_or(json!(0));
            spec.insert("count".into(), replicas);
        }
        o["apiVersion"] = json!(desired);
        o["metadata"]["labels"]["converted-to"] = json!(desired.trim_start_matches("demo.io/"));
        o["metadata"]["uid"] = json!("changed-by-the-webhook");
        converted.push(o);
    }
    json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "ConversionReview",
        "response": {"uid": request["uid"], "convertedObjects": converted,
            "result": {"status": "Success"}},
    })
}

/// The reviews a conversion webhook got: desired version and object count.
fn conversion_reviews(hook: &TestWebhook) -> Vec<(String, usize)> {
    hook.take()
        .iter()
        .map(|r| {
            (
                r["request"]["desiredAPIVersion"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
                r["request"]["objects"].as_array().unwrap().len(),
            )
        })
        .collect()
}

fn widget_crd(conversion: Value) -> Value {
    let version = |name: &str, field: &str, storage: bool| {
        json!({"name": name, "served": true, "storage": storage, "schema": {"openAPIV3Schema": {
            "type": "object", "properties": {"spec": {"type": "object", "properties": {
                field: {"type": "integer", "minimum": 0}}}}}}})
    };
    json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.demo.io"},
        "spec": {"group": "demo.io", "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "listKind": "WidgetList"},
            "versions": [version("v1", "count", true), version("v2", "replicas", false)],
            "conversion": conversion},
    })
}

/// A CRD with a conversion webhook: objects are stored in the storage
/// version and converted by the webhook for every other version, on
/// writes, reads, lists (one review for the page) and watches; only labels
/// and annotations may change in metadata. The webhook is reached by URL
/// and by Service (a ready endpoint, its certificate checked for
/// `NAME.NAMESPACE.svc`). A refusal or an unreachable webhook fails the
/// request with a 500 naming the kind and stores nothing; bad conversion
/// settings are refused with their field.
#[tokio::test]
async fn a_conversion_webhook_converts_between_stored_and_served_versions() {
    let hook = TestWebhook::start(convert_widgets).await;
    let c = start().await;
    let crds = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions";
    let ca_bundle = hook.ca_bundle();

    // Bad settings, each with its field.
    for (conversion, field, reason) in [
        (
            json!({"strategy": "Webhook"}),
            "spec.conversion.webhook",
            "required when strategy is set to Webhook",
        ),
        (
            json!({"strategy": "Webhook", "webhook": {"conversionReviewVersions": ["v1"],
            "clientConfig": {"url": format!("http://127.0.0.1:{}/convert", hook.port)}}}),
            "spec.conversion.webhook.clientConfig.url",
            "'https' is the only allowed URL scheme",
        ),
        (
            json!({"strategy": "Webhook", "webhook": {"conversionReviewVersions": ["v2"],
            "clientConfig": {"url": "https://127.0.0.1/convert"}}}),
            "spec.conversion.webhook.conversionReviewVersions",
            "must include at least one of v1, v1beta1",
        ),
        (
            json!({"strategy": "None", "webhook": {"conversionReviewVersions": ["v1"],
            "clientConfig": {"url": "https://127.0.0.1/convert"}}}),
            "spec.conversion.webhook",
            "should not be set when strategy is not set to Webhook",
        ),
        (
            json!({"strategy": "Sometimes"}),
            "spec.conversion.strategy",
            "Unsupported value",
        ),
    ] {
        let (code, body) = c.post(crds, widget_crd(conversion)).await;
        assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        let causes = body["details"]["causes"].as_array().unwrap();
        assert!(
            causes
                .iter()
                .any(|c| c["field"] == field && (c["message"].as_str().unwrap().contains(reason))),
            "{field}: {body}"
        );
    }

    let by_url = json!({"strategy": "Webhook", "webhook": {"conversionReviewVersions": ["v1"],
        "clientConfig": {"url": format!("https://127.0.0.1:{}/convert", hook.port), "caBundle": ca_bundle}}});
    let (code, body) = c.post(crds, widget_crd(by_url)).await;
    assert_eq!(code, StatusCode::CREATED, "{body}");
    let v1 = "/apis/demo.io/v1/namespaces/default/widgets";
    let v2 = "/apis/demo.io/v2/namespaces/default/widgets";

    // Written in v2: converted to v1 to be stored, answered in v2.
    let (code, body) = c
        .post(
            v2,
            json!({"apiVersion": "demo.io/v2", "kind": "Widget",
                         "metadata": {"name": "a"}, "spec": {"replicas": 3}}),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED, "{body}");
    assert_eq!(body["apiVersion"], "demo.io/v2");
    assert_eq!(body["spec"], json!({"replicas": 3}));
    assert_eq!(conversion_reviews(&hook), [("demo.io/v1".to_owned(), 1)]);
    let uid = body["metadata"]["uid"].clone();
    // Read in the storage version: no review; it holds the webhook's label
    // and the server's uid.
    let (_, stored) = c.get(&format!("{v1}/a")).await;
    assert_eq!(stored["spec"], json!({"count": 3}));
    assert_eq!(stored["metadata"]["labels"]["converted-to"], "v1");
    assert_eq!(stored["metadata"]["uid"], uid);
    assert_eq!(conversion_reviews(&hook), []);
    let (_, read) = c.get(&format!("{v2}/a")).await;
    assert_eq!(
        (read["apiVersion"].as_str(), &read["spec"]),
        (Some("demo.io/v2"), &json!({"replicas": 3}))
    );
    assert_eq!(read["metadata"]["uid"], uid);
    assert_eq!(conversion_reviews(&hook), [("demo.io/v2".to_owned(), 1)]);

    // A v2 patch is made to the v2 object and stored as v1.
    let (code, body) = c
        .patch(
            &format!("{v2}/a"),
            "application/merge-patch+json",
            json!({"spec": {"replicas": 5}}),
        )
        .await;
    assert_eq!(
        (code, &body["spec"]),
        (StatusCode::OK, &json!({"replicas": 5})),
        "{body}"
    );
    assert_eq!(
        c.get(&format!("{v1}/a")).await.1["spec"],
        json!({"count": 5})
    );
    // The v2 schema validates v2 writes.
    let (code, body) = c
        .patch(
            &format!("{v2}/a"),
            "application/merge-patch+json",
            json!({"spec": {"replicas": -1}}),
        )
        .await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["details"]["causes"][0]["field"], "spec.replicas");
    conversion_reviews(&hook);

    // A list in v2: one review for the objects.
    for name in ["b", "c"] {
        let (code, body) = c
            .post(
                v1,
                json!({"apiVersion": "demo.io/v1", "kind": "Widget",
                             "metadata": {"name": name}, "spec": {"count": 1}}),
            )
            .await;
        assert_eq!(code, StatusCode::CREATED, "{body}");
    }
    assert_eq!(conversion_reviews(&hook), []);
    let (code, list) = c.get(v2).await;
    assert_eq!(code, StatusCode::OK, "{list}");
    let replicas: Vec<&Value> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| &o["spec"]["replicas"])
        .collect();
    assert_eq!(replicas, [&json!(5), &json!(1), &json!(1)]);
    assert_eq!(conversion_reviews(&hook), [("demo.io/v2".to_owned(), 3)]);

    // A v2 watch sees a v1 write converted.
    let (code, list) = c.get(v2).await;
    assert_eq!(code, StatusCode::OK);
    let rv = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_owned();
    let watch = {
        let http = c.http.clone();
        let url = format!("{}{v2}?watch=true&resourceVersion={rv}", c.base);
        tokio::spawn(async move {
            let resp = http.get(url).send().await.unwrap();
            let mut body = resp.bytes_stream();
            let mut buf = Vec::new();
            while let Some(chunk) = body.next().await {
                buf.extend_from_slice(&chunk.unwrap());
                if let Some(end) = buf.iter().position(|b| *b == b'\n') {
                    return serde_json::from_slice::<Value>(&buf[..end]).unwrap();
                }
            }
            panic!("the watch ended without an event");
        })
    };
    let (code, _) = c
        .patch(
            &format!("{v1}/b"),
            "application/merge-patch+json",
            json!({"spec": {"count": 7}}),
        )
        .await;
    assert_eq!(code, StatusCode::OK);
    let event = tokio::time::timeout(Duration::from_secs(10), watch)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(event["type"], "MODIFIED");
    assert_eq!(event["object"]["apiVersion"], "demo.io/v2");
    assert_eq!(event["object"]["spec"], json!({"replicas": 7}));

    // A refusal fails the request with the webhook's message; nothing is stored.
    let (code, body) = c
        .post(
            v2,
            json!({"apiVersion": "demo.io/v2", "kind": "Widget",
                         "metadata": {"name": "refused-1"}, "spec": {"replicas": 1}}),
        )
        .await;
    assert_eq!(code, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert_eq!(
        body["message"],
        "Internal error occurred: conversion webhook for demo.io/v1, Kind=Widget failed: cannot convert refused-1"
    );
    assert_eq!(
        c.get(&format!("{v1}/refused-1")).await.0,
        StatusCode::NOT_FOUND
    );
    // A dry run fails where the write would.
    let (code, body) = c
        .post(
            &format!("{v2}?dryRun=All"),
            json!({"apiVersion": "demo.io/v2", "kind": "Widget",
                         "metadata": {"name": "refused-2"}, "spec": {"replicas": 1}}),
        )
        .await;
    assert_eq!(code, StatusCode::INTERNAL_SERVER_ERROR, "{body}");

    // By Service: the server dials a ready endpoint of `conv` and checks
    // the certificate for conv.default.svc.
    let (_, mut crd) = c.get(&format!("{crds}/widgets.demo.io")).await;
    crd["spec"]["conversion"]["webhook"]["clientConfig"] = json!({
        "service": {"namespace": "default", "name": "conv", "path": "/convert"}, "caBundle": ca_bundle});
    let (code, body) = c.put(&format!("{crds}/widgets.demo.io"), crd).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(
        body["spec"]["conversion"]["webhook"]["clientConfig"]["service"]["port"],
        443
    );
    let (code, body) = c.get(&format!("{v2}/a")).await;
    assert_eq!(code, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("service \"default/conv\" not found"),
        "{body}"
    );
    let (code, body) = c
        .post(
            "/api/v1/namespaces/default/services",
            json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "conv"},
            "spec": {"ports": [{"name": "https", "port": 443, "targetPort": 9443}]}}),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED, "{body}");
    let (code, body) = c
        .post(
            "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices",
            json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "conv-1", "labels": {"kubernetes.io/service-name": "conv"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": true}}],
            "ports": [{"name": "https", "port": hook.port, "protocol": "TCP"}]}),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED, "{body}");
    let (code, body) = c.get(&format!("{v2}/a")).await;
    assert_eq!(
        (code, &body["spec"]),
        (StatusCode::OK, &json!({"replicas": 5})),
        "{body}"
    );

    // Unreachable: a 500 naming the kind; the storage version still reads.
    hook.task.abort();
    let _ = hook.task.await;
    let (code, body) = c.get(&format!("{v2}/a")).await;
    assert_eq!(code, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert!(
        body["message"].as_str().unwrap().starts_with(
            "Internal error occurred: conversion webhook for demo.io/v2, Kind=Widget failed: "
        ),
        "{body}"
    );
    assert_eq!(c.get(&format!("{v1}/a")).await.0, StatusCode::OK);
    c.stop().await;
}

/// The test's admission webhook for ConfigMaps: `/mutate` labels them
/// `mutated: "yes"` (a JSON patch) with a warning, and gives one named
/// `invalid-after` a label no object may carry; `/validate` refuses one
/// with a `forbidden` key (403, Forbidden) and the deletion of `keep`.
fn admit_config_maps(path: &str, review: &Value) -> Value {
    use base64::Engine;
    let request = &review["request"];
    let object = &request["object"];
    let mut response = json!({"uid": request["uid"], "allowed": true});
    match path {
        "/mutate" => {
            let mut ops = Vec::new();
            if object["metadata"]["labels"].is_null() {
                ops.push(json!({"op": "add", "path": "/metadata/labels", "value": {}}));
            }
            ops.push(json!({"op": "add", "path": "/metadata/labels/mutated", "value": "yes"}));
            if request["name"] == "invalid-after" {
                ops.push(json!({"op": "add", "path": "/metadata/labels/bad label!", "value": "x"}));
            }
            response["patchType"] = json!("JSONPatch");
            response["patch"] = json!(
                base64::engine::general_purpose::STANDARD.encode(Value::Array(ops).to_string())
            );
            response["warnings"] = json!(["mutated by the test's webhook"]);
            response["auditAnnotations"] = json!({"mutated": "yes"});
        }
        "/validate" => {
            let refuse = if request["operation"] == "DELETE" {
                (request["name"] == "keep").then_some("keep stays")
            } else {
                (!object["data"]["forbidden"].is_null()).then_some("forbidden key")
            };
            if let Some(message) = refuse {
                response["allowed"] = json!(false);
                response["status"] =
                    json!({"code": 403, "reason": "Forbidden", "message": message});
            }
        }
        other => panic!("unexpected path {other}"),
    }
    json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response})
}

/// Admission webhooks as kube-apiserver calls them: a mutating webhook's
/// JSON patch is applied (and the result validated again) before the
/// validating webhooks decide; rules, namespace and object selectors and
/// match conditions choose which requests each sees; a refusal carries the
/// webhook's code and Kubernetes' message; creates, updates, server-side
/// apply (which creates through the same admission) and deletes are
/// reviewed, dry runs say so; a webhook that cannot be called fails the
/// request unless its failure policy ignores it; configurations are never
/// sent to webhooks, so a broken one can be removed.
#[tokio::test]
async fn admission_webhooks_mutate_and_validate_writes() {
    let hook = TestWebhook::start(admit_config_maps).await;
    let c = start().await;
    let (code, body) = c
        .post(
            "/api/v1/namespaces",
            json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": "hooked", "labels": {"webhooks": "on"}}}),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED, "{body}");
    let webhook = |name: &str, path: &str, ops: Value| {
        json!({"name": name, "sideEffects": "None", "admissionReviewVersions": ["v1"],
               "clientConfig": {"url": hook.url(path), "caBundle": hook.ca_bundle()},
               "rules": [{"operations": ops, "apiGroups": [""], "apiVersions": ["v1"], "resources": ["configmaps"]}]})
    };
    let mut mutate = webhook("cm.mutate.demo.io", "/mutate", json!(["CREATE", "UPDATE"]));
    mutate["namespaceSelector"] = json!({"matchLabels": {"webhooks": "on"}});
    let (code, body) = c
        .post(
            "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations",
            json!({
            "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": "mutate-cms"}, "webhooks": [mutate]}),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED, "{body}");
    assert_eq!(body["webhooks"][0]["failurePolicy"], "Fail");
    let mut validate = webhook("cm.validate.demo.io", "/validate", json!(["*"]));
    validate["objectSelector"] =
        json!({"matchExpressions": [{"key": "skip-validation", "operator": "DoesNotExist"}]});
    validate["matchConditions"] =
        json!([{"name": "not-unchecked", "expression": "request.name != 'unchecked'"}]);
    let validating = "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations";
    let (code, body) = c
        .post(validating, json!({
            "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
            "metadata": {"name": "validate-cms"}, "webhooks": [validate]}))
        .await;
    assert_eq!(code, StatusCode::CREATED, "{body}");
    let cms = |ns: &str| format!("/api/v1/namespaces/{ns}/configmaps");
    let cm = |name: &str, data: Value| json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data});

    // Mutated, then validated with the mutation; the warning reaches the client.
    let (code, body, warning) = c
        .post_warned(&cms("hooked"), cm("a", json!({"k": "v"})))
        .await;
    assert_eq!(code, StatusCode::CREATED, "{body}");
    assert!(
        warning.contains("mutated by the test's webhook"),
        "{warning}"
    );
    assert_eq!(body["metadata"]["labels"]["mutated"], "yes");
    let reviews = hook.take();
    assert_eq!(reviews.len(), 2, "{reviews:?}");
    let (first, second) = (&reviews[0]["request"], &reviews[1]["request"]);
    assert_eq!(
        (
            &first["operation"],
            &first["namespace"],
            &first["kind"]["kind"],
            &first["resource"]["resource"]
        ),
        (
            &json!("CREATE"),
            &json!("hooked"),
            &json!("ConfigMap"),
            &json!("configmaps")
        )
    );
    assert!(first["object"]["metadata"]["labels"].is_null());
    assert_eq!(second["object"]["metadata"]["labels"]["mutated"], "yes");
    assert_eq!(second["dryRun"], false);

    // Outside the namespace selector: validated only.
    let (code, body) = c.post(&cms("default"), cm("b", json!({}))).await;
    assert_eq!(code, StatusCode::CREATED, "{body}");
    assert!(body["metadata"]["labels"]["mutated"].is_null());
    assert_eq!(hook.take().len(), 1);

    // Refused, with the webhook's code and reason; nothing stored.
    let (code, body) = c
        .post(&cms("default"), cm("bad", json!({"forbidden": "1"})))
        .await;
    assert_eq!(code, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["reason"], "Forbidden");
    assert_eq!(
        body["message"],
        "admission webhook \"cm.validate.demo.io\" denied the request: forbidden key"
    );
    assert_eq!(
        c.get(&format!("{}/bad", cms("default"))).await.0,
        StatusCode::NOT_FOUND
    );
    // The object selector and the match condition leave some unchecked.
    let mut skipped = cm("skipped", json!({"forbidden": "1"}));
    skipped["metadata"]["labels"] = json!({"skip-validation": "yes"});
    assert_eq!(
        c.post(&cms("default"), skipped).await.0,
        StatusCode::CREATED
    );
    assert_eq!(
        c.post(&cms("default"), cm("unchecked", json!({"forbidden": "1"})))
            .await
            .0,
        StatusCode::CREATED
    );
    // Updates, patches and server-side apply are reviewed too.
    let (code, body) = c
        .patch(
            &format!("{}/a", cms("hooked")),
            "application/merge-patch+json",
            json!({"data": {"forbidden": "1"}}),
        )
        .await;
    assert_eq!(code, StatusCode::FORBIDDEN, "{body}");
    let (code, body) = c
        .patch(
            &format!("{}/applied?fieldManager=test", cms("default")),
            "application/apply-patch+yaml",
            cm("applied", json!({"forbidden": "1"})),
        )
        .await;
    assert_eq!(code, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(
        c.get(&format!("{}/applied", cms("default"))).await.0,
        StatusCode::NOT_FOUND
    );
    // A mutation that breaks the object is refused as the object's own error.
    let (code, body) = c.post(&cms("hooked"), cm("invalid-after", json!({}))).await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("metadata.labels"),
        "{body}"
    );
    // A dry run is marked as one.
    hook.take();
    let (code, _) = c
        .post(
            &format!("{}?dryRun=All", cms("default")),
            cm("dry", json!({})),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED);
    assert_eq!(hook.take()[0]["request"]["dryRun"], true);
    // Deletes: oldObject is the stored object.
    assert_eq!(
        c.post(&cms("default"), cm("keep", json!({}))).await.0,
        StatusCode::CREATED
    );
    let (code, body) = c.delete(&format!("{}/keep", cms("default"))).await;
    assert_eq!(code, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(
        c.delete(&format!("{}/b", cms("default"))).await.0,
        StatusCode::OK
    );
    let reviews = hook.take();
    let delete = &reviews.last().unwrap()["request"];
    assert_eq!(
        (
            &delete["operation"],
            &delete["oldObject"]["metadata"]["name"]
        ),
        (&json!("DELETE"), &json!("b"))
    );
    assert!(delete["object"].is_null());

    // A webhook that cannot be called fails what it covers, unless ignored.
    let mut broken = webhook("broken.validate.demo.io", "/validate", json!(["CREATE"]));
    broken["clientConfig"]["url"] = json!("https://127.0.0.1:1/validate");
    broken["rules"][0]["resources"] = json!(["secrets"]);
    let (code, body) = c
        .post(validating, json!({
            "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
            "metadata": {"name": "broken"}, "webhooks": [broken]}))
        .await;
    assert_eq!(code, StatusCode::CREATED, "{body}");
    let secret =
        |name: &str| json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}});
    let (code, body) = c
        .post("/api/v1/namespaces/default/secrets", secret("s1"))
        .await;
    assert_eq!(code, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert!(
        body["message"].as_str().unwrap().starts_with(
            "Internal error occurred: failed calling webhook \"broken.validate.demo.io\": failed to call webhook: Post"
        ),
        "{body}"
    );
    let (code, body) = c
        .patch(
            &format!("{validating}/broken"),
            "application/json-patch+json",
            json!([{"op": "replace", "path": "/webhooks/0/failurePolicy", "value": "Ignore"}]),
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(
        c.post("/api/v1/namespaces/default/secrets", secret("s2"))
            .await
            .0,
        StatusCode::CREATED
    );
    // The configurations themselves are never reviewed: a broken one goes.
    let (code, body) = c.delete(&format!("{validating}/broken")).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    // Kubernetes' webhook metrics count the calls and the refusals.
    let metrics = c
        .http
        .get(format!("{}/metrics", c.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for series in [
        "apiserver_admission_webhook_rejection_count{error_type=\"no_internal_error\",name=\"cm.validate.demo.io\",operation=\"CREATE\",rejection_code=\"403\",type=\"validating\"}",
        "apiserver_admission_webhook_rejection_count{error_type=\"calling_webhook_error\",name=\"broken.validate.demo.io\",operation=\"CREATE\",rejection_code=\"0\",type=\"validating\"}",
        "apiserver_admission_webhook_admission_duration_seconds_count{name=\"cm.mutate.demo.io\",operation=\"CREATE\",rejected=\"false\",type=\"admit\"}",
    ] {
        assert!(metrics.contains(series), "{series}: {metrics}");
    }
    c.stop().await;
    hook.task.abort();
}

/// A server-side apply that creates an object goes through the whole
/// admission of a create: Pod Security refuses a privileged pod in a
/// restricted namespace as it refuses a POST of it.
#[tokio::test]
async fn server_side_apply_creates_are_admitted_as_creates() {
    let c = start().await;
    let (code, body) = c
        .post("/api/v1/namespaces", json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": "strict", "labels": {"pod-security.kubernetes.io/enforce": "restricted"}}}))
        .await;
    assert_eq!(code, StatusCode::CREATED, "{body}");
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "c", "image": "busybox", "securityContext": {"privileged": true}}]}});
    let (code, body) = c
        .patch(
            "/api/v1/namespaces/strict/pods/p?fieldManager=test",
            "application/apply-patch+yaml",
            pod,
        )
        .await;
    assert_eq!(code, StatusCode::FORBIDDEN, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("violates PodSecurity \"restricted:latest\""),
        "{body}"
    );
    c.stop().await;
}

/// ValidatingAdmissionPolicies as Kubernetes evaluates them: a binding puts
/// a policy in force with parameters read from a ConfigMap; a failed
/// validation denies (its message expression and reason's code), warns or
/// audits as the binding says; the binding's namespace selector narrows
/// where; missing parameters deny; a policy that does not compile is
/// refused with its field.
#[tokio::test]
async fn validating_admission_policies_deny_and_warn_as_their_bindings_say() {
    let c = start().await;
    let vap = "/apis/admissionregistration.k8s.io/v1/validatingadmissionpolicies";
    let vapb = "/apis/admissionregistration.k8s.io/v1/validatingadmissionpolicybindings";
    let deployments = |ns: &str| format!("/apis/apps/v1/namespaces/{ns}/deployments");
    let (code, body) = c
        .post(
            "/api/v1/namespaces/default/configmaps",
            json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "limits"}, "data": {"most": "3"}}),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED, "{body}");
    let (code, body) = c
        .post(
            "/api/v1/namespaces",
            json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": "free", "labels": {"policy": "off"}}}),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED, "{body}");
    let policy = |name: &str, spec: Value| {
        json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
               "metadata": {"name": name}, "spec": spec})
    };
    let binding = |name: &str, spec: Value| {
        json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
               "metadata": {"name": name}, "spec": spec})
    };
    let rules = json!({"resourceRules": [{"apiGroups": ["apps"], "apiVersions": ["v1"],
        "operations": ["CREATE", "UPDATE"], "resources": ["deployments"]}]});

    // A policy that does not compile is refused with its field.
    let (code, body) = c
        .post(
            vap,
            policy(
                "broken.example.com",
                json!({"matchConstraints": rules,
            "validations": [{"expression": "object.spec.("}]}),
            ),
        )
        .await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(
        body["details"]["causes"][0]["field"],
        "spec.validations[0].expression"
    );

    let (code, body) = c
        .post(
            vap,
            policy(
                "replicas.example.com",
                json!({
            "paramKind": {"apiVersion": "v1", "kind": "ConfigMap"},
            "matchConstraints": rules,
            "variables": [{"name": "most", "expression": "int(params.data.most)"}],
            "validations": [{"expression": "object.spec.replicas <= variables.most",
                "messageExpression": "'replicas must be at most ' + string(variables.most)",
                "reason": "Forbidden"}]}),
            ),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED, "{body}");
    assert_eq!(body["spec"]["failurePolicy"], "Fail");
    let (code, body) = c
        .post(vapb, binding("replicas-binding", json!({"policyName": "replicas.example.com",
            "validationActions": ["Deny"],
            "paramRef": {"name": "limits", "namespace": "default", "parameterNotFoundAction": "Deny"},
            "matchResources": {"namespaceSelector": {"matchExpressions": [
                {"key": "policy", "operator": "NotIn", "values": ["off"]}]}}})))
        .await;
    assert_eq!(code, StatusCode::CREATED, "{body}");

    let deployment = |name: &str, replicas: i64| {
        let mut d = self::deployment(name, replicas);
        d["metadata"]["labels"] = json!({"team": "a"});
        d
    };
    let (code, body) = c.post(&deployments("default"), deployment("big", 5)).await;
    assert_eq!(code, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["reason"], "Forbidden");
    assert_eq!(
        body["message"],
        "ValidatingAdmissionPolicy 'replicas.example.com' with binding 'replicas-binding' denied request: replicas must be at most 3"
    );
    let (code, body) = c
        .post(&deployments("default"), deployment("small", 2))
        .await;
    assert_eq!(code, StatusCode::CREATED, "{body}");
    let (code, body) = c
        .patch(
            &format!("{}/small", deployments("default")),
            "application/merge-patch+json",
            json!({"spec": {"replicas": 9}}),
        )
        .await;
    assert_eq!(code, StatusCode::FORBIDDEN, "{body}");
    // Outside the binding's namespaces the policy does not apply.
    let (code, body) = c.post(&deployments("free"), deployment("big", 5)).await;
    assert_eq!(code, StatusCode::CREATED, "{body}");

    // Warn: the write goes through with Kubernetes' warning.
    let (code, body) = c
        .post(vap, policy("team.example.com", json!({"matchConstraints": rules,
            "validations": [{"expression": "has(object.metadata.labels) && 'team' in object.metadata.labels"}]})))
        .await;
    assert_eq!(code, StatusCode::CREATED, "{body}");
    let (code, body) = c
        .post(
            vapb,
            binding(
                "team-binding",
                json!({"policyName": "team.example.com",
            "validationActions": ["Warn", "Audit"]}),
            ),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED, "{body}");
    let (code, body, warning) = c
        .post_warned(&deployments("default"), self::deployment("unlabelled", 1))
        .await;
    assert_eq!(code, StatusCode::CREATED, "{body}");
    assert!(
        warning.contains("Validation failed for ValidatingAdmissionPolicy 'team.example.com' with binding 'team-binding': failed expression: has(object.metadata.labels)"),
        "{warning}"
    );

    // Parameters gone: the Deny binding denies.
    assert_eq!(
        c.delete("/api/v1/namespaces/default/configmaps/limits")
            .await
            .0,
        StatusCode::OK
    );
    let (code, body) = c.post(&deployments("default"), deployment("any", 1)).await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .ends_with("no params found for policy binding with `Deny` parameterNotFoundAction"),
        "{body}"
    );
    c.stop().await;
}

/// A Service refused after its cluster IP was taken (here by its
/// namespace's quota) gives the address back: a /29 range (six addresses)
/// still holds six Services after ten refusals.
#[tokio::test]
async fn a_refused_service_gives_its_address_back() {
    let c = start_with(
        wasmkube_store::memory(),
        Config {
            service_cidr: (std::net::Ipv4Addr::new(10, 96, 0, 0), 29),
            ..Config::default()
        },
    )
    .await;
    // Whatever the server made itself (the `kubernetes` Service).
    let taken = c.get("/api/v1/services").await.1["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| {
            s["spec"]["clusterIP"]
                .as_str()
                .is_some_and(|ip| ip != "None")
        })
        .count();
    for ns in ["capped", "open"] {
        let (code, body) = c
            .post(
                "/api/v1/namespaces",
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
            )
            .await;
        assert_eq!(code, StatusCode::CREATED, "{body}");
    }
    let (code, body) = c
        .post(
            "/api/v1/namespaces/capped/resourcequotas",
            json!({"apiVersion": "v1", "kind": "ResourceQuota",
            "metadata": {"name": "none"}, "spec": {"hard": {"services": "0"}}}),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED, "{body}");
    let service = |name: &str| {
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
               "spec": {"ports": [{"port": 80}]}})
    };
    for i in 0..10 {
        let (code, body) = c
            .post(
                "/api/v1/namespaces/capped/services",
                service(&format!("s{i}")),
            )
            .await;
        assert_eq!(code, StatusCode::FORBIDDEN, "{body}");
    }
    for i in 0..6 - taken {
        let (code, body) = c
            .post(
                "/api/v1/namespaces/open/services",
                service(&format!("s{i}")),
            )
            .await;
        assert_eq!(code, StatusCode::CREATED, "service {i}: {body}");
    }
    c.stop().await;
}
