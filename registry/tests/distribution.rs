//! The distribution API, checked over HTTP against the built-in registry
//! and, where the reference implements the same part of the specification,
//! against Debian's `docker-registry` (distribution 2.8) in the same test:
//! both must answer alike.

use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{CONTENT_RANGE, CONTENT_TYPE, LINK, LOCATION, RANGE};
use serde_json::{Value, json};
use wasmkube_registry::{Algorithm, GcPolicy, Registry};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const ACCEPT_MANIFESTS: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";

/// A registry under test, reached over loopback HTTP.
struct Api {
    base: String,
    http: reqwest::Client,
    /// The built-in registry's task and storage.
    task: Option<tokio::task::JoinHandle<()>>,
    dir: Option<tempfile::TempDir>,
    _reference: Option<wasmkube_testkit::Registry>,
}

impl Drop for Api {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

impl Api {
    /// Stops the built-in registry and hands back its storage.
    async fn stop(mut self) -> tempfile::TempDir {
        let task = self.task.take().unwrap();
        task.abort();
        let _ = task.await;
        self.dir.take().unwrap()
    }
}

async fn builtin_in(dir: tempfile::TempDir) -> Api {
    let registry = Registry::open(dir.path()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let _ = registry
            .serve(listener, Duration::from_secs(3600), GcPolicy::default())
            .await;
    });
    Api {
        base,
        http: reqwest::Client::new(),
        task: Some(task),
        dir: Some(dir),
        _reference: None,
    }
}

async fn builtin() -> Api {
    builtin_in(tempfile::tempdir().unwrap()).await
}

fn reference() -> Api {
    let registry = wasmkube_testkit::Registry::start();
    Api {
        base: format!("http://{}", registry.host()),
        http: reqwest::Client::new(),
        task: None,
        dir: None,
        _reference: Some(registry),
    }
}

/// Both registries: the built-in one first.
async fn both() -> [(&'static str, Api); 2] {
    [
        ("built-in", builtin().await),
        ("docker-registry", reference()),
    ]
}

fn digest(bytes: &[u8]) -> String {
    Algorithm::Sha256.digest(bytes).to_string()
}

impl Api {
    fn url(&self, path: &str) -> String {
        if path.starts_with("http") {
            path.to_owned()
        } else {
            format!("{}{path}", self.base)
        }
    }

    /// A monolithic upload: one POST with the digest and the body, or, where
    /// the registry does not take that (distribution 2.8 answers 202), POST
    /// then PUT as the specification lets it.
    async fn push_blob(&self, repo: &str, bytes: &[u8]) -> String {
        let d = digest(bytes);
        let mut r = self
            .http
            .post(self.url(&format!("/v2/{repo}/blobs/uploads/?digest={d}")))
            .header(CONTENT_TYPE, "application/octet-stream")
            .body(bytes.to_vec())
            .send()
            .await
            .unwrap();
        if r.status() == StatusCode::ACCEPTED {
            let location = r.headers()[LOCATION].to_str().unwrap().to_owned();
            let sep = if location.contains('?') { '&' } else { '?' };
            r = self
                .http
                .put(self.url(&format!("{location}{sep}digest={d}")))
                .header(CONTENT_TYPE, "application/octet-stream")
                .body(bytes.to_vec())
                .send()
                .await
                .unwrap();
        }
        assert_eq!(
            r.status(),
            StatusCode::CREATED,
            "{}",
            r.text().await.unwrap()
        );
        d
    }

    /// Pushes a config and layers, then an image manifest naming them.
    async fn push_image(&self, repo: &str, reference: &str, layers: &[&[u8]]) -> (String, Value) {
        let config = br#"{"architecture":"amd64","os":"linux"}"#;
        let config_digest = self.push_blob(repo, config).await;
        let mut descriptors = Vec::new();
        for l in layers {
            let d = self.push_blob(repo, l).await;
            descriptors.push(json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": l.len()}));
        }
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
            "layers": descriptors,
        });
        let (status, d, _) = self.put_manifest(repo, reference, &manifest).await;
        assert_eq!(status, StatusCode::CREATED);
        (d, manifest)
    }

    async fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        m: &Value,
    ) -> (StatusCode, String, Value) {
        let body = serde_json::to_vec(m).unwrap();
        let media = m["mediaType"].as_str().unwrap_or(OCI_MANIFEST).to_owned();
        let r = self
            .http
            .put(self.url(&format!("/v2/{repo}/manifests/{reference}")))
            .header(CONTENT_TYPE, media)
            .body(body.clone())
            .send()
            .await
            .unwrap();
        let status = r.status();
        let headers = r.headers().clone();
        let text = r.text().await.unwrap();
        if status == StatusCode::CREATED {
            assert_eq!(headers["docker-content-digest"], digest(&body).as_str());
            (status, digest(&body), Value::Null)
        } else {
            (
                status,
                String::new(),
                serde_json::from_str(&text).unwrap_or(Value::Null),
            )
        }
    }

    /// A GET that accepts every manifest type, as pulling clients send
    /// (distribution answers 404 for an OCI manifest not asked for).
    async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(self.url(path))
            .header(reqwest::header::ACCEPT, ACCEPT_MANIFESTS)
            .send()
            .await
            .unwrap()
    }
}

/// The first error code of a distribution error body.
fn code(body: &Value) -> &str {
    body["errors"][0]["code"].as_str().unwrap_or("")
}

async fn error_code(r: reqwest::Response) -> String {
    let body: Value = r.json().await.unwrap();
    code(&body).to_owned()
}

#[tokio::test]
async fn monolithic_push_and_pull_by_tag_digest_and_range() {
    for (who, api) in both().await {
        let v2 = api.get("/v2/").await;
        assert_eq!(v2.status(), StatusCode::OK, "{who}");
        assert_eq!(
            v2.headers()["docker-distribution-api-version"],
            "registry/2.0",
            "{who}"
        );

        let layer = b"0123456789abcdef".repeat(1000);
        let (d, manifest) = api
            .push_image("team/app", "v1", &[&layer, b"second layer"])
            .await;

        let by_tag = api.get("/v2/team/app/manifests/v1").await;
        assert_eq!(by_tag.status(), StatusCode::OK, "{who}");
        assert_eq!(by_tag.headers()[CONTENT_TYPE], OCI_MANIFEST, "{who}");
        assert_eq!(
            by_tag.headers()["docker-content-digest"],
            d.as_str(),
            "{who}"
        );
        let body: Value = by_tag.json().await.unwrap();
        assert_eq!(body, manifest, "{who}");
        let by_digest = api.get(&format!("/v2/team/app/manifests/{d}")).await;
        assert_eq!(by_digest.status(), StatusCode::OK, "{who}");
        let head = api
            .http
            .head(api.url("/v2/team/app/manifests/v1"))
            .header(reqwest::header::ACCEPT, ACCEPT_MANIFESTS)
            .send()
            .await
            .unwrap();
        assert_eq!(head.status(), StatusCode::OK, "{who}");
        assert_eq!(head.headers()["docker-content-digest"], d.as_str(), "{who}");

        let layer_digest = digest(&layer);
        let blob = api.get(&format!("/v2/team/app/blobs/{layer_digest}")).await;
        assert_eq!(blob.status(), StatusCode::OK, "{who}");
        assert_eq!(
            blob.bytes().await.unwrap().as_ref(),
            layer.as_slice(),
            "{who}"
        );
        let head = api
            .http
            .head(api.url(&format!("/v2/team/app/blobs/{layer_digest}")))
            .send()
            .await
            .unwrap();
        assert_eq!(
            head.headers()["content-length"],
            layer.len().to_string().as_str(),
            "{who}"
        );
        let part = api
            .http
            .get(api.url(&format!("/v2/team/app/blobs/{layer_digest}")))
            .header(RANGE, "bytes=16-31")
            .send()
            .await
            .unwrap();
        assert_eq!(part.status(), StatusCode::PARTIAL_CONTENT, "{who}");
        assert_eq!(
            part.headers()[CONTENT_RANGE],
            format!("bytes 16-31/{}", layer.len()).as_str(),
            "{who}"
        );
        assert_eq!(
            part.bytes().await.unwrap().as_ref(),
            b"0123456789abcdef",
            "{who}"
        );

        // A blob the repository does not hold is unknown there, even
        // though another repository holds it.
        let other = api
            .get(&format!("/v2/team/other/blobs/{layer_digest}"))
            .await;
        assert_eq!(other.status(), StatusCode::NOT_FOUND, "{who}");
        let missing = api.get("/v2/team/app/manifests/nope").await;
        assert_eq!(missing.status(), StatusCode::NOT_FOUND, "{who}");
        assert_eq!(error_code(missing).await, "MANIFEST_UNKNOWN", "{who}");
    }
}

#[tokio::test]
async fn chunked_uploads_resume_and_refuse_gaps() {
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let d = digest(&data);
    for (who, api) in both().await {
        let start = api
            .http
            .post(api.url("/v2/chunks/blobs/uploads/"))
            .send()
            .await
            .unwrap();
        assert_eq!(start.status(), StatusCode::ACCEPTED, "{who}");
        let mut location = start.headers()[LOCATION].to_str().unwrap().to_owned();
        for (i, chunk) in data.chunks(100_000).enumerate() {
            let from = i * 100_000;
            let r = api
                .http
                .patch(api.url(&location))
                .header(CONTENT_TYPE, "application/octet-stream")
                .header(CONTENT_RANGE, format!("{from}-{}", from + chunk.len() - 1))
                .body(chunk.to_vec())
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::ACCEPTED, "{who} chunk {i}");
            assert_eq!(
                r.headers()[RANGE],
                format!("0-{}", from + chunk.len() - 1).as_str(),
                "{who}"
            );
            location = r.headers()[LOCATION].to_str().unwrap().to_owned();
            // The specification refuses a chunk that leaves a gap (416);
            // distribution 2.8 does not check, so only the built-in one is
            // asked.
            if i == 1 && who == "built-in" {
                // Where does it stand? (what a client asks to resume)
                let status = api.get(&location).await;
                assert_eq!(status.status(), StatusCode::NO_CONTENT, "{who}");
                assert_eq!(status.headers()[RANGE], "0-199999", "{who}");
                let gap = api
                    .http
                    .patch(api.url(&location))
                    .header(CONTENT_TYPE, "application/octet-stream")
                    .header(CONTENT_RANGE, "250000-250009")
                    .body(vec![0u8; 10])
                    .send()
                    .await
                    .unwrap();
                assert_eq!(gap.status(), StatusCode::RANGE_NOT_SATISFIABLE, "{who}");
            }
        }
        let sep = if location.contains('?') { '&' } else { '?' };
        let done = api
            .http
            .put(api.url(&format!("{location}{sep}digest={d}")))
            .header(CONTENT_TYPE, "application/octet-stream")
            .send()
            .await
            .unwrap();
        assert_eq!(
            done.status(),
            StatusCode::CREATED,
            "{who}: {}",
            done.text().await.unwrap()
        );
        let blob = api.get(&format!("/v2/chunks/blobs/{d}")).await;
        assert_eq!(
            blob.bytes().await.unwrap().as_ref(),
            data.as_slice(),
            "{who}"
        );
    }
}

#[tokio::test]
async fn wrong_digests_and_dangling_manifests_are_refused() {
    for (who, api) in both().await {
        let wrong = digest(b"something else");
        // POST then PUT with a digest the bytes do not have (and, on the
        // built-in registry, the same in one POST).
        let start = api
            .http
            .post(api.url("/v2/bad/blobs/uploads/"))
            .send()
            .await
            .unwrap();
        let location = start.headers()[LOCATION].to_str().unwrap().to_owned();
        let sep = if location.contains('?') { '&' } else { '?' };
        let r = api
            .http
            .put(api.url(&format!("{location}{sep}digest={wrong}")))
            .header(CONTENT_TYPE, "application/octet-stream")
            .body(b"these bytes".to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{who}");
        assert_eq!(error_code(r).await, "DIGEST_INVALID", "{who}");
        if who == "built-in" {
            let r = api
                .http
                .post(api.url(&format!("/v2/bad/blobs/uploads/?digest={wrong}")))
                .body(b"these bytes".to_vec())
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{who}");
            assert_eq!(error_code(r).await, "DIGEST_INVALID", "{who}");
        }
        let never = api.get(&format!("/v2/bad/blobs/{wrong}")).await;
        assert_eq!(never.status(), StatusCode::NOT_FOUND, "{who}");

        api.push_blob("bad", b"cfg").await;
        let dangling = json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest(b"cfg"), "size": 3},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest(b"never pushed"), "size": 12}],
        });
        let (status, _, body) = api.put_manifest("bad", "v1", &dangling).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{who}");
        assert_eq!(code(&body), "MANIFEST_BLOB_UNKNOWN", "{who}");

        let (status, _, body) = api
            .put_manifest(
                "bad",
                "v1",
                &json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST}),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{who}");
        // (distribution 2.8 calls the missing config's digest DIGEST_INVALID)
        if who == "built-in" {
            assert_eq!(code(&body), "MANIFEST_INVALID", "{who}");
        }

        // An index naming a manifest the repository does not hold.
        let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": digest(b"no such manifest"), "size": 16}]});
        let (status, _, body) = api.put_manifest("bad", "idx", &index).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{who}");
        assert_eq!(code(&body), "MANIFEST_BLOB_UNKNOWN", "{who}");
    }
}

#[tokio::test]
async fn mounts_tags_pages_the_catalog_and_deletion() {
    for (who, api) in both().await {
        let layer = b"shared layer".as_slice();
        let (d, _) = api.push_image("src/app", "v1", &[layer]).await;
        let layer_digest = digest(layer);
        let mount = api
            .http
            .post(api.url(&format!(
                "/v2/dst/app/blobs/uploads/?mount={layer_digest}&from=src/app"
            )))
            .send()
            .await
            .unwrap();
        assert_eq!(mount.status(), StatusCode::CREATED, "{who}");
        assert_eq!(
            mount.headers()["docker-content-digest"],
            layer_digest.as_str(),
            "{who}"
        );
        assert_eq!(
            api.get(&format!("/v2/dst/app/blobs/{layer_digest}"))
                .await
                .status(),
            StatusCode::OK,
            "{who}"
        );
        // Mounting what the source does not hold starts an upload instead.
        let fallback = api
            .http
            .post(api.url(&format!(
                "/v2/dst/app/blobs/uploads/?mount={}&from=src/app",
                digest(b"x")
            )))
            .send()
            .await
            .unwrap();
        assert_eq!(fallback.status(), StatusCode::ACCEPTED, "{who}");

        // An index over the image.
        let manifest_len = api
            .get(&format!("/v2/src/app/manifests/{d}"))
            .await
            .bytes()
            .await
            .unwrap()
            .len();
        let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": d, "size": manifest_len,
             "platform": {"architecture": "amd64", "os": "linux"}}]});
        let (status, index_digest, _) = api.put_manifest("src/app", "multi", &index).await;
        assert_eq!(status, StatusCode::CREATED, "{who}");
        let got = api.get("/v2/src/app/manifests/multi").await;
        assert_eq!(got.headers()[CONTENT_TYPE], OCI_INDEX, "{who}");

        for t in ["v2", "v3", "v4"] {
            let (status, _, _) = api
                .put_manifest(
                    "src/app",
                    t,
                    &api.get(&format!("/v2/src/app/manifests/{d}"))
                        .await
                        .json::<Value>()
                        .await
                        .unwrap(),
                )
                .await;
            assert_eq!(status, StatusCode::CREATED, "{who}");
        }
        // The whole list (distribution 2.8 does not sort it; pages are).
        let mut all: Value = api.get("/v2/src/app/tags/list").await.json().await.unwrap();
        all["tags"]
            .as_array_mut()
            .unwrap()
            .sort_by_key(|t| t.to_string());
        assert_eq!(
            all,
            json!({"name": "src/app", "tags": ["multi", "v1", "v2", "v3", "v4"]}),
            "{who}"
        );
        // Tag pages (distribution 2.8 ignores `n`; 3.0 added them).
        if who == "built-in" {
            let page = api.get("/v2/src/app/tags/list?n=2").await;
            let link = page.headers()[LINK].to_str().unwrap().to_owned();
            assert!(link.contains("rel=\"next\""), "{who}: {link}");
            let body: Value = page.json().await.unwrap();
            assert_eq!(body["tags"], json!(["multi", "v1"]), "{who}");
            let next = link
                .trim_start_matches('<')
                .split('>')
                .next()
                .unwrap()
                .to_owned();
            let body: Value = api.get(&next).await.json().await.unwrap();
            assert_eq!(body["tags"], json!(["v2", "v3"]), "{who}");
            let body: Value = api
                .get("/v2/src/app/tags/list?n=10&last=v3")
                .await
                .json()
                .await
                .unwrap();
            assert_eq!(body["tags"], json!(["v4"]), "{who}");
        }

        let catalog: Value = api.get("/v2/_catalog").await.json().await.unwrap();
        assert_eq!(
            catalog["repositories"],
            json!(["dst/app", "src/app"]),
            "{who}"
        );
        let first: Value = api.get("/v2/_catalog?n=1").await.json().await.unwrap();
        assert_eq!(first["repositories"], json!(["dst/app"]), "{who}");

        // Deleting the index by digest; the image stays.
        let del = api
            .http
            .delete(api.url(&format!("/v2/src/app/manifests/{index_digest}")))
            .send()
            .await
            .unwrap();
        assert_eq!(del.status(), StatusCode::ACCEPTED, "{who}");
        assert_eq!(
            api.get("/v2/src/app/manifests/multi").await.status(),
            StatusCode::NOT_FOUND,
            "{who}"
        );
        assert_eq!(
            api.get("/v2/src/app/manifests/v1").await.status(),
            StatusCode::OK,
            "{who}"
        );
        let del = api
            .http
            .delete(api.url(&format!("/v2/dst/app/blobs/{layer_digest}")))
            .send()
            .await
            .unwrap();
        assert_eq!(del.status(), StatusCode::ACCEPTED, "{who}");
        assert_eq!(
            api.get(&format!("/v2/dst/app/blobs/{layer_digest}"))
                .await
                .status(),
            StatusCode::NOT_FOUND,
            "{who}"
        );
        assert_eq!(
            api.get(&format!("/v2/src/app/blobs/{layer_digest}"))
                .await
                .status(),
            StatusCode::OK,
            "{who}"
        );
    }
}

/// The referrers API (OCI 1.1; distribution 2.8 predates it).
#[tokio::test]
async fn referrers_list_the_manifests_that_name_a_subject() {
    let api = builtin().await;
    let (subject, _) = api.push_image("signed", "v1", &[b"payload"]).await;
    let subject_len = api
        .get("/v2/signed/manifests/v1")
        .await
        .bytes()
        .await
        .unwrap()
        .len();
    let empty = api.push_blob("signed", b"{}").await;
    let signature = api.push_blob("signed", b"a signature").await;
    for (i, artifact_type) in [
        "application/vnd.example.signature",
        "application/vnd.example.sbom",
    ]
    .iter()
    .enumerate()
    {
        let m = json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": artifact_type,
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2},
            "layers": [{"mediaType": "application/octet-stream", "digest": signature, "size": 11}],
            "subject": {"mediaType": OCI_MANIFEST, "digest": subject, "size": subject_len},
            "annotations": {"n": i.to_string()},
        });
        let r = api
            .http
            .put(api.url(&format!(
                "/v2/signed/manifests/{}",
                digest(&serde_json::to_vec(&m).unwrap())
            )))
            .header(CONTENT_TYPE, OCI_MANIFEST)
            .body(serde_json::to_vec(&m).unwrap())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        assert_eq!(r.headers()["oci-subject"], subject.as_str());
    }
    let all = api.get(&format!("/v2/signed/referrers/{subject}")).await;
    assert_eq!(all.status(), StatusCode::OK);
    assert_eq!(all.headers()[CONTENT_TYPE], OCI_INDEX);
    let index: Value = all.json().await.unwrap();
    let types: Vec<&str> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["artifactType"].as_str().unwrap())
        .collect();
    assert_eq!(types.len(), 2);
    assert!(types.contains(&"application/vnd.example.sbom"));

    let filtered = api
        .get(&format!(
            "/v2/signed/referrers/{subject}?artifactType=application/vnd.example.sbom"
        ))
        .await;
    assert_eq!(filtered.headers()["oci-filters-applied"], "artifactType");
    let index: Value = filtered.json().await.unwrap();
    assert_eq!(index["manifests"].as_array().unwrap().len(), 1);
    assert_eq!(index["manifests"][0]["annotations"]["n"], "1");
    let sbom = index["manifests"][0]["digest"].as_str().unwrap().to_owned();

    // Deleting a referrer takes it off the list.
    api.http
        .delete(api.url(&format!("/v2/signed/manifests/{sbom}")))
        .send()
        .await
        .unwrap();
    let index: Value = api
        .get(&format!("/v2/signed/referrers/{subject}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(index["manifests"].as_array().unwrap().len(), 1);
    // A subject nobody refers to has an empty list; a bad digest is refused.
    let none: Value = api
        .get(&format!("/v2/signed/referrers/{}", digest(b"z")))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(none["manifests"], json!([]));
    let bad = api.get("/v2/signed/referrers/sha256:nothex").await;
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_code(bad).await, "DIGEST_INVALID");
}

/// What the built-in registry promises beyond the wire protocol: names and
/// tags checked, uploads resumable across a restart, and garbage collection.
#[tokio::test]
async fn uploads_survive_a_restart_and_garbage_is_collected() {
    let dir = tempfile::tempdir().unwrap();
    let keep = dir.path().to_owned();
    let api = builtin_in(dir).await;
    for (path, want) in [
        ("/v2/Upper/tags/list", "NAME_INVALID"),
        ("/v2/a/manifests/bad:tag", "DIGEST_INVALID"),
        ("/v2/a/manifests/.bad", "TAG_INVALID"),
    ] {
        let r = api.get(path).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{path}");
        assert_eq!(error_code(r).await, want, "{path}");
    }
    let (image, _) = api.push_image("app", "v1", &[b"kept layer"]).await;
    let (doomed, _) = api.push_image("app", "v0", &[b"doomed layer"]).await;
    let start = api
        .http
        .post(api.url("/v2/app/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    let location = start.headers()[LOCATION].to_str().unwrap().to_owned();
    api.http
        .patch(api.url(&location))
        .body(b"first half, ".to_vec())
        .send()
        .await
        .unwrap();
    // The same storage served again, as after a restart.
    let dir = api.stop().await;
    assert_eq!(dir.path(), keep);
    let api = builtin_in(dir).await;
    let status = api.get(&location).await;
    assert_eq!(status.headers()[RANGE], "0-11");
    let whole = b"first half, second half".as_slice();
    let r = api
        .http
        .put(api.url(&format!("{location}?digest={}", digest(whole))))
        .header(CONTENT_RANGE, "12-22")
        .body(b"second half".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::CREATED,
        "{}",
        r.text().await.unwrap()
    );
    assert_eq!(
        api.get("/v2/app/manifests/v1").await.status(),
        StatusCode::OK
    );

    // Nothing references `doomed` once it is deleted; `whole` was never
    // referenced. A collection with no grace frees both, and their links.
    api.http
        .delete(api.url(&format!("/v2/app/manifests/{doomed}")))
        .send()
        .await
        .unwrap();
    let storage = Registry::open(&keep).unwrap();
    let report = storage
        .storage()
        .collect_garbage(GcPolicy {
            blob_grace: Duration::ZERO,
            upload_expiry: Duration::from_secs(3600),
        })
        .unwrap();
    // The doomed manifest, its layer, and the never-referenced blob (the
    // shared config stays: `v1` references it).
    assert_eq!(report.blobs_removed, 3, "{report:?}");
    assert_eq!(
        api.get(&format!("/v2/app/blobs/{}", digest(b"doomed layer")))
            .await
            .status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        api.get(&format!("/v2/app/blobs/{}", digest(whole)))
            .await
            .status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        api.get(&format!("/v2/app/manifests/{image}"))
            .await
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        api.get(&format!("/v2/app/blobs/{}", digest(b"kept layer")))
            .await
            .status(),
        StatusCode::OK
    );
    // With the default grace, a fresh unreferenced blob is kept.
    api.push_blob("app", b"fresh").await;
    let report = storage
        .storage()
        .collect_garbage(GcPolicy::default())
        .unwrap();
    assert_eq!(report.blobs_removed, 0);
}

/// A gate for the test: `admin` does anything; `reader` pulls anything;
/// `writer` does anything under `team/` and nothing else; other tokens
/// name no one.
struct TestGate;

impl wasmkube_registry::Gate for TestGate {
    fn check<'a>(
        &'a self,
        token: Option<&'a str>,
        access: Option<(&'a str, wasmkube_registry::Action)>,
    ) -> futures::future::BoxFuture<'a, Result<(), wasmkube_registry::Refusal>> {
        use wasmkube_registry::{Action, Refusal};
        Box::pin(async move {
            let allowed = match (token, access) {
                (Some("admin"), _) => true,
                (Some("reader" | "writer"), None) => true,
                (Some("reader"), Some((_, Action::Pull))) => true,
                (Some("writer"), Some((repo, _))) => repo.starts_with("team/"),
                (Some("reader"), Some(_)) => false,
                _ => return Err(Refusal::Unauthenticated),
            };
            if allowed {
                Ok(())
            } else {
                Err(Refusal::Denied(format!("{token:?} may not {access:?}")))
            }
        })
    }
}

#[tokio::test]
async fn a_gate_decides_who_pulls_pushes_and_mounts() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::open(dir.path())
        .unwrap()
        .with_gate(std::sync::Arc::new(TestGate));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let _ = registry
            .serve(listener, Duration::from_secs(3600), GcPolicy::default())
            .await;
    });
    let http = reqwest::Client::new();

    // Anonymous: the version check asks for a login, in the spec's format.
    let r = http.get(format!("{base}/v2/")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        r.headers()["www-authenticate"],
        "Basic realm=\"wasmkube registry\""
    );
    assert_eq!(error_code(r).await, "UNAUTHORIZED");
    let r = http
        .get(format!("{base}/v2/team/app/tags/list"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // A token that names no one is the same.
    let r = http
        .get(format!("{base}/v2/"))
        .basic_auth("x", Some("nobody"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    // Basic (any user name) and bearer both carry the token.
    let r = http
        .get(format!("{base}/v2/"))
        .basic_auth("anyone", Some("writer"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let blob = b"a layer of the team";
    let d = digest(blob);
    let r = http
        .post(format!("{base}/v2/team/app/blobs/uploads/?digest={d}"))
        .bearer_auth("writer")
        .body(blob.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);

    // The reader may pull it but not push or delete.
    let r = http
        .get(format!("{base}/v2/team/app/blobs/{d}"))
        .basic_auth("r", Some("reader"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.bytes().await.unwrap().as_ref(), blob);
    for request in [
        http.post(format!("{base}/v2/team/app/blobs/uploads/")),
        http.delete(format!("{base}/v2/team/app/blobs/{d}")),
        http.get(format!("{base}/v2/_catalog")),
    ] {
        let r = request
            .basic_auth("r", Some("reader"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert_eq!(error_code(r).await, "DENIED");
    }

    // The writer pushes only under team/, and a mount from a repository it
    // may not pull becomes a plain upload (202), never a copy (201).
    let r = http
        .post(format!("{base}/v2/other/app/blobs/uploads/"))
        .bearer_auth("writer")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = http
        .post(format!(
            "{base}/v2/team/copy/blobs/uploads/?mount={d}&from=team/app"
        ))
        .bearer_auth("writer")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED, "a mount it may read");
    let secret = b"a layer the writer may not read";
    let s = digest(secret);
    let r = http
        .post(format!("{base}/v2/secret/app/blobs/uploads/?digest={s}"))
        .bearer_auth("admin")
        .body(secret.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = http
        .post(format!(
            "{base}/v2/team/stolen/blobs/uploads/?mount={s}&from=secret/app"
        ))
        .bearer_auth("writer")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED, "a mount it may not read");
    task.abort();
}
