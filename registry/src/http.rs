//! The distribution API over HTTP: `/v2/` routes parsed from the end of the
//! path (repository names contain slashes), uploads streamed to disk while
//! they are hashed.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use crate::auth::{Action, Gate, Refusal};
use crate::digest::{Algorithm, Digest, Hasher};
use crate::error::Error;
use crate::storage::{MANIFEST_LIMIT, OCI_INDEX, Reference, Storage};

/// The state behind the routes.
pub(crate) struct Shared {
    pub storage: Arc<Storage>,
    gate: Option<Arc<dyn Gate>>,
    /// Per upload: how much of its data is hashed, and the hash so far. The
    /// lock also keeps two requests from writing one upload at once.
    uploads: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Cursor>>>>,
}

struct Cursor {
    hashed: u64,
    hasher: Hasher,
}

impl Shared {
    pub fn new(storage: Arc<Storage>, gate: Option<Arc<dyn Gate>>) -> Self {
        Self {
            storage,
            gate,
            uploads: Mutex::new(HashMap::new()),
        }
    }

    fn cursor(&self, id: &str) -> Arc<tokio::sync::Mutex<Cursor>> {
        let mut uploads = self.uploads.lock().unwrap_or_else(|e| e.into_inner());
        uploads
            .entry(id.to_owned())
            .or_insert_with(|| {
                Arc::new(tokio::sync::Mutex::new(Cursor {
                    hashed: 0,
                    hasher: Algorithm::Sha256.hasher(),
                }))
            })
            .clone()
    }

    /// Whether the request's token may do `access` (`None`: who it is).
    async fn allowed(&self, token: Option<&str>, access: Option<(&str, Action)>) -> Result<()> {
        let Some(gate) = &self.gate else {
            return Ok(());
        };
        gate.check(token, access).await.map_err(|r| match r {
            Refusal::Unauthenticated => Error::Unauthorized,
            Refusal::Denied(why) => Error::Denied(why),
        })
    }

    fn forget(&self, id: &str) {
        self.uploads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }
}

type Result<T, E = Error> = std::result::Result<T, E>;

/// A parsed `/v2/...` path.
#[derive(Debug, PartialEq)]
enum Route<'a> {
    Catalog,
    Tags(&'a str),
    Manifest(&'a str, &'a str),
    Blob(&'a str, &'a str),
    Uploads(&'a str),
    Upload(&'a str, &'a str),
    Referrers(&'a str, &'a str),
}

fn route(path: &str) -> Option<Route<'_>> {
    let rest = path.strip_prefix("/v2/")?;
    if rest == "_catalog" {
        return Some(Route::Catalog);
    }
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return Some(Route::Tags(name));
    }
    if let Some(name) = rest
        .strip_suffix("/blobs/uploads/")
        .or_else(|| rest.strip_suffix("/blobs/uploads"))
    {
        return Some(Route::Uploads(name));
    }
    if let Some((name, id)) = rest.rsplit_once("/blobs/uploads/") {
        return Some(Route::Upload(name, id));
    }
    // The last segment is a tag or digest, never containing `/`.
    let (head, last) = rest.rsplit_once('/')?;
    let (name, kind) = head.rsplit_once('/')?;
    match kind {
        "manifests" => Some(Route::Manifest(name, last)),
        "blobs" => Some(Route::Blob(name, last)),
        "referrers" => Some(Route::Referrers(name, last)),
        _ => None,
    }
}

/// `GET /v2/`: the API version check, which with a gate also checks the
/// client's credential (`docker login` asks here).
pub(crate) async fn version(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let token = crate::auth::token(&headers);
    match shared.allowed(token.as_deref(), None).await {
        Ok(()) => Json(serde_json::json!({})).into_response(),
        Err(e) => e.into_response(),
    }
}

/// What a request does, and to which repository.
fn access<'a>(method: &Method, route: &Route<'a>) -> (&'a str, Action) {
    match (method, route) {
        (_, Route::Catalog) => ("", Action::List),
        (&Method::PUT, Route::Manifest(n, _)) => (n, Action::Push),
        (&Method::DELETE, Route::Manifest(n, _) | Route::Blob(n, _)) => (n, Action::Delete),
        (_, Route::Uploads(n) | Route::Upload(n, _)) => (n, Action::Push),
        (
            _,
            Route::Tags(n) | Route::Manifest(n, _) | Route::Blob(n, _) | Route::Referrers(n, _),
        ) => (n, Action::Pull),
    }
}

/// Every `/v2/...` request other than the version check.
pub(crate) async fn dispatch(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let token = crate::auth::token(&headers);
    let result = match route(uri.path()) {
        None => Err(Error::Unsupported(format!("{method} {}", uri.path()))),
        Some(r) => match shared
            .allowed(token.as_deref(), Some(access(&method, &r)))
            .await
        {
            Ok(()) => {
                handle(
                    &shared,
                    &method,
                    r,
                    &query,
                    &headers,
                    token.as_deref(),
                    body,
                )
                .await
            }
            Err(e) => Err(e),
        },
    };
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn handle(
    shared: &Arc<Shared>,
    method: &Method,
    route: Route<'_>,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    token: Option<&str>,
    body: Body,
) -> Result<Response> {
    let name = match &route {
        Route::Catalog => "",
        Route::Tags(n)
        | Route::Manifest(n, _)
        | Route::Blob(n, _)
        | Route::Uploads(n)
        | Route::Upload(n, _)
        | Route::Referrers(n, _) => n,
    };
    if !matches!(route, Route::Catalog) {
        Storage::check_name(name)?;
    }
    let storage = shared.storage.clone();
    let name_owned = name.to_owned();
    match (method.clone(), route) {
        (Method::GET, Route::Catalog) => {
            let all = blocking(move || Ok(storage.catalog()?)).await?;
            let (page, next) = paginate(all, query)?;
            let mut response = Json(serde_json::json!({ "repositories": page })).into_response();
            if let Some((last, n)) = next {
                link_next(&mut response, &format!("/v2/_catalog?n={n}&last={last}"));
            }
            Ok(response)
        }
        (Method::GET, Route::Tags(_)) => {
            let all = blocking(move || storage.tags(&name_owned)).await?;
            let (page, next) = paginate(all, query)?;
            let mut response =
                Json(serde_json::json!({ "name": name, "tags": page })).into_response();
            if let Some((last, n)) = next {
                link_next(
                    &mut response,
                    &format!("/v2/{name}/tags/list?n={n}&last={last}"),
                );
            }
            Ok(response)
        }
        (m @ (Method::GET | Method::HEAD), Route::Manifest(_, reference)) => {
            let reference = Reference::parse(reference)?;
            let manifest = blocking(move || storage.get_manifest(&name_owned, &reference)).await?;
            let response = Response::builder()
                .header(header::CONTENT_TYPE, &manifest.media_type)
                .header(header::CONTENT_LENGTH, manifest.bytes.len())
                .header("Docker-Content-Digest", manifest.digest.to_string())
                .header(header::ETAG, format!("\"{}\"", manifest.digest));
            if m == Method::HEAD {
                return Ok(response.body(Body::empty()).expect("valid response"));
            }
            Ok(response
                .body(Body::from(manifest.bytes))
                .expect("valid response"))
        }
        (Method::PUT, Route::Manifest(_, reference)) => {
            let reference = Reference::parse(reference)?;
            let content_type = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let bytes = axum::body::to_bytes(body, MANIFEST_LIMIT + 1)
                .await
                .map_err(|_| Error::ManifestTooLarge {
                    limit: MANIFEST_LIMIT,
                })?;
            let stored = blocking(move || {
                storage.put_manifest(&name_owned, &reference, content_type.as_deref(), &bytes)
            })
            .await?;
            let mut response = Response::builder()
                .status(StatusCode::CREATED)
                .header(
                    header::LOCATION,
                    format!("/v2/{name}/manifests/{}", stored.digest),
                )
                .header("Docker-Content-Digest", stored.digest.to_string());
            if let Some(subject) = &stored.subject {
                response = response.header("OCI-Subject", subject.to_string());
            }
            Ok(response.body(Body::empty()).expect("valid response"))
        }
        (Method::DELETE, Route::Manifest(_, reference)) => {
            let reference = Reference::parse(reference)?;
            blocking(move || storage.delete_manifest(&name_owned, &reference)).await?;
            Ok(StatusCode::ACCEPTED.into_response())
        }
        (m @ (Method::GET | Method::HEAD), Route::Blob(_, digest)) => {
            let digest = parse_digest(digest)?;
            let d = digest.clone();
            let (path, size) = blocking(move || storage.blob(&name_owned, &d)).await?;
            serve_blob(path, size, &digest, m == Method::HEAD, headers).await
        }
        (Method::DELETE, Route::Blob(_, digest)) => {
            let digest = parse_digest(digest)?;
            blocking(move || storage.delete_blob(&name_owned, &digest)).await?;
            Ok(StatusCode::ACCEPTED.into_response())
        }
        (Method::POST, Route::Uploads(_)) => start_upload(shared, name, query, token, body).await,
        (Method::GET, Route::Upload(_, id)) => {
            let path = storage.upload(name, id)?;
            let size = tokio::fs::metadata(&path).await?.len();
            Ok(upload_status(StatusCode::NO_CONTENT, name, id, size))
        }
        (Method::PATCH, Route::Upload(_, id)) => {
            let range = content_range(headers)?;
            let size = append(shared, name, id, body, range).await?;
            Ok(upload_status(StatusCode::ACCEPTED, name, id, size))
        }
        (Method::PUT, Route::Upload(_, id)) => {
            let digest =
                parse_digest(query.get("digest").ok_or_else(|| {
                    Error::DigestInvalid("the digest parameter is required".into())
                })?)?;
            let range = content_range(headers)?;
            append(shared, name, id, body, range).await?;
            finish(shared, name, id, &digest).await
        }
        (Method::DELETE, Route::Upload(_, id)) => {
            storage.upload(name, id)?;
            let cursor = shared.cursor(id);
            let _writing = cursor.lock().await;
            let id_owned = id.to_owned();
            blocking(move || Ok(storage.remove_upload(&id_owned)?)).await?;
            shared.forget(id);
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        (Method::GET, Route::Referrers(_, digest)) => {
            let digest = parse_digest(digest)?;
            let filter = query.get("artifactType").cloned();
            let f = filter.clone();
            let manifests =
                blocking(move || storage.referrers(&name_owned, &digest, f.as_deref())).await?;
            let mut response = Response::builder().header(header::CONTENT_TYPE, OCI_INDEX);
            if filter.is_some() {
                response = response.header("OCI-Filters-Applied", "artifactType");
            }
            let index = serde_json::json!({
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "manifests": manifests,
            });
            Ok(response
                .body(Body::from(index.to_string()))
                .expect("valid response"))
        }
        (m, _) => Err(Error::Unsupported(format!("{m} on this path"))),
    }
}

/// Runs blocking storage work off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Io(std::io::Error::other(e.to_string())))?
}

fn parse_digest(s: &str) -> Result<Digest> {
    s.parse()
        .map_err(|e: crate::digest::DigestError| Error::DigestInvalid(e.to_string()))
}

/// One page of a sorted list, and where the next starts (its `last` and
/// `n`) when more follow.
type Page = (Vec<String>, Option<(String, usize)>);

/// `n` and `last` pagination over a sorted list.
fn paginate(all: Vec<String>, query: &HashMap<String, String>) -> Result<Page> {
    let after: Vec<String> = match query.get("last") {
        Some(last) => all.into_iter().filter(|t| t > last).collect(),
        None => all,
    };
    let Some(n) = query.get("n") else {
        return Ok((after, None));
    };
    let n: usize = n
        .parse()
        .map_err(|_| Error::Unsupported(format!("n={n} is not a number")))?;
    if after.len() <= n {
        return Ok((after, None));
    }
    let page: Vec<String> = after.into_iter().take(n).collect();
    let next = page.last().cloned().map(|l| (l, n));
    Ok((page, next))
}

fn link_next(response: &mut Response, url: &str) {
    if let Ok(v) = HeaderValue::try_from(format!("<{url}>; rel=\"next\"")) {
        response.headers_mut().insert(header::LINK, v);
    }
}

fn upload_status(status: StatusCode, name: &str, id: &str, size: u64) -> Response {
    Response::builder()
        .status(status)
        .header(header::LOCATION, format!("/v2/{name}/blobs/uploads/{id}"))
        .header(header::RANGE, format!("0-{}", size.saturating_sub(1)))
        .header("Docker-Upload-UUID", id)
        .header(header::CONTENT_LENGTH, 0)
        .body(Body::empty())
        .expect("valid response")
}

/// `POST /v2/NAME/blobs/uploads/`: a cross-repository mount
/// (`?mount=&from=`), a monolithic upload (`?digest=`, the blob in the
/// body) or the start of an upload session.
async fn start_upload(
    shared: &Arc<Shared>,
    name: &str,
    query: &HashMap<String, String>,
    token: Option<&str>,
    body: Body,
) -> Result<Response> {
    let storage = shared.storage.clone();
    if let Some(mount) = query.get("mount") {
        let digest = parse_digest(mount)?;
        let from = query.get("from").cloned().unwrap_or_default();
        // Mounting reads the source: a client that may not pull it gets an
        // upload instead, as the specification allows, and learns nothing.
        let readable = shared
            .allowed(token, Some((&from, Action::Pull)))
            .await
            .is_ok();
        let (n, d) = (name.to_owned(), digest.clone());
        if readable && blocking(move || Ok(storage.mount(&n, &from, &d)?)).await? {
            return Ok(blob_created(name, &digest));
        }
    }
    let storage = shared.storage.clone();
    let n = name.to_owned();
    let id = blocking(move || Ok(storage.new_upload(&n)?)).await?;
    if let Some(digest) = query.get("digest") {
        let digest = parse_digest(digest)?;
        append(shared, name, &id, body, None).await?;
        return finish(shared, name, &id, &digest).await;
    }
    Ok(upload_status(StatusCode::ACCEPTED, name, &id, 0))
}

fn blob_created(name: &str, digest: &Digest) -> Response {
    Response::builder()
        .status(StatusCode::CREATED)
        .header(header::LOCATION, format!("/v2/{name}/blobs/{digest}"))
        .header("Docker-Content-Digest", digest.to_string())
        .header(header::CONTENT_LENGTH, 0)
        .body(Body::empty())
        .expect("valid response")
}

/// A chunk's `Content-Range: START-END`, if given.
fn content_range(headers: &HeaderMap) -> Result<Option<(u64, u64)>> {
    let Some(v) = headers.get(header::CONTENT_RANGE) else {
        return Ok(None);
    };
    let s = v.to_str().unwrap_or_default();
    let s = s.strip_prefix("bytes ").unwrap_or(s);
    let invalid = || Error::BlobUploadInvalid(format!("Content-Range {s:?} is not START-END"));
    let (a, b) = s.split_once('-').ok_or_else(invalid)?;
    let (a, b): (u64, u64) = (
        a.trim().parse().map_err(|_| invalid())?,
        b.split('/')
            .next()
            .unwrap_or_default()
            .trim()
            .parse()
            .map_err(|_| invalid())?,
    );
    if b < a {
        return Err(invalid());
    }
    Ok(Some((a, b)))
}

/// Appends a request body to upload `id`, hashing as it goes. A chunk must
/// start where the upload ends (416 otherwise, with the range to resume
/// from); a chunk shorter or longer than its Content-Range is undone.
async fn append(
    shared: &Arc<Shared>,
    name: &str,
    id: &str,
    body: Body,
    range: Option<(u64, u64)>,
) -> Result<u64> {
    let path = shared.storage.upload(name, id)?;
    let cursor = shared.cursor(id);
    let mut cursor = cursor.lock().await;
    let mut file = tokio::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::BlobUploadUnknown,
            _ => e.into(),
        })?;
    let size = file.metadata().await?.len();
    if let Some((start, _)) = range
        && start != size
    {
        return Err(Error::RangeInvalid { start, size });
    }
    catch_up(&mut cursor, &mut file, size).await?;
    file.seek(std::io::SeekFrom::Start(size)).await?;
    let mut writer = tokio::io::BufWriter::with_capacity(1 << 20, &mut file);
    let mut stream = body.into_data_stream();
    let mut written = 0u64;
    let mut failed = None;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(chunk) => {
                writer.write_all(&chunk).await?;
                cursor.hasher.update(&chunk);
                written += chunk.len() as u64;
            }
            Err(e) => {
                failed = Some(Error::BlobUploadInvalid(format!(
                    "the body was cut short: {e}"
                )));
                break;
            }
        }
    }
    writer.flush().await?;
    drop(writer);
    cursor.hashed = size + written;
    let mismatch = range.filter(|(a, b)| b - a + 1 != written).map(|(a, b)| {
        Error::BlobUploadInvalid(format!(
            "Content-Range {a}-{b} announces {} bytes but the body has {written}",
            b - a + 1
        ))
    });
    if let Some(e) = failed.or(mismatch) {
        // Undo the partial chunk: the client resumes from the old end.
        file.set_len(size).await?;
        cursor.hashed = 0;
        cursor.hasher = Algorithm::Sha256.hasher();
        return Err(e);
    }
    Ok(size + written)
}

/// Hashes whatever of the upload the cursor has not seen (after a restart,
/// or after an undone chunk).
async fn catch_up(cursor: &mut Cursor, file: &mut tokio::fs::File, size: u64) -> Result<()> {
    if cursor.hashed == size {
        return Ok(());
    }
    cursor.hashed = 0;
    cursor.hasher = Algorithm::Sha256.hasher();
    file.seek(std::io::SeekFrom::Start(0)).await?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        cursor.hasher.update(&buf[..n]);
        cursor.hashed += n as u64;
    }
    Ok(())
}

/// Verifies the finished upload against `digest` and commits it; a
/// mismatch discards the upload.
async fn finish(shared: &Arc<Shared>, name: &str, id: &str, digest: &Digest) -> Result<Response> {
    let path = shared.storage.upload(name, id)?;
    let cursor = shared.cursor(id);
    let cursor = cursor.lock().await;
    let actual = match digest.algorithm() {
        Algorithm::Sha256 => cursor.hasher.clone().finish(),
        other => hash_file(path.clone(), other).await?,
    };
    let storage = shared.storage.clone();
    let (n, i, d) = (name.to_owned(), id.to_owned(), digest.clone());
    let result = blocking(move || {
        if actual != d {
            storage.remove_upload(&i)?;
            return Err(Error::DigestInvalid(format!(
                "the upload's digest is {actual}, not {d}"
            )));
        }
        storage.commit_blob(&n, &path, &d)?;
        storage.remove_upload(&i)?;
        Ok(())
    })
    .await;
    drop(cursor);
    shared.forget(id);
    result.map(|()| blob_created(name, digest))
}

async fn hash_file(path: PathBuf, algorithm: Algorithm) -> Result<Digest> {
    blocking(move || {
        use std::io::Read;
        let mut f = std::fs::File::open(path)?;
        let mut h = algorithm.hasher();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        Ok(h.finish())
    })
    .await
}

/// A blob, whole or one `Range: bytes=...` of it.
async fn serve_blob(
    path: PathBuf,
    size: u64,
    digest: &Digest,
    head: bool,
    headers: &HeaderMap,
) -> Result<Response> {
    let range = match headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        Some(r) => Some(byte_range(r, size).ok_or(Error::RangeNotSatisfiable { size })?),
        None => None,
    };
    let (start, len) = range.map_or((0, size), |(a, b)| (a, b - a + 1));
    let mut response = Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, len)
        .header(header::ACCEPT_RANGES, "bytes")
        .header("Docker-Content-Digest", digest.to_string())
        .header(header::ETAG, format!("\"{digest}\""));
    if let Some((a, b)) = range {
        response = response
            .status(StatusCode::PARTIAL_CONTENT)
            .header(header::CONTENT_RANGE, format!("bytes {a}-{b}/{size}"));
    }
    if head {
        return Ok(response.body(Body::empty()).expect("valid response"));
    }
    let file = std::fs::File::open(&path)?;
    if len <= SMALL_BLOB {
        // Configs and small layers: one read, one write with the headers.
        let bytes = blocking(move || {
            use std::io::{Read, Seek};
            let mut file = file;
            file.seek(std::io::SeekFrom::Start(start))?;
            let mut buf = Vec::with_capacity(len as usize);
            file.take(len).read_to_end(&mut buf)?;
            Ok(buf)
        })
        .await?;
        return Ok(response.body(Body::from(bytes)).expect("valid response"));
    }
    Ok(response
        .body(Body::from_stream(read_ahead(file, start, len)))
        .expect("valid response"))
}

/// Blobs up to this size are read whole and sent in one piece.
const SMALL_BLOB: u64 = 256 << 10;

/// `len` bytes of `file` from `start`, read in 1 MiB pieces on a blocking
/// thread a few pieces ahead of the socket, so reading the disk and writing
/// the network overlap.
fn read_ahead(
    mut file: std::fs::File,
    start: u64,
    len: u64,
) -> impl futures::Stream<Item = std::io::Result<bytes::Bytes>> {
    use std::io::{Read, Seek};
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<bytes::Bytes>>(4);
    tokio::task::spawn_blocking(move || {
        if let Err(e) = file.seek(std::io::SeekFrom::Start(start)) {
            let _ = tx.blocking_send(Err(e));
            return;
        }
        let mut left = len;
        while left > 0 {
            let mut buf = vec![0u8; left.min(1 << 20) as usize];
            let piece = match file.read(&mut buf) {
                Ok(0) => Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the blob is shorter than its size",
                )),
                Ok(n) => {
                    buf.truncate(n);
                    left -= n as u64;
                    Ok(bytes::Bytes::from(buf))
                }
                Err(e) => Err(e),
            };
            let failed = piece.is_err();
            // A closed channel: the client went away.
            if tx.blocking_send(piece).is_err() || failed {
                return;
            }
        }
    });
    futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
}

/// `bytes=A-B`, `bytes=A-` or `bytes=-N` within a blob of `size` bytes, as
/// an inclusive range.
fn byte_range(header: &str, size: u64) -> Option<(u64, u64)> {
    let spec = header.strip_prefix("bytes=")?.trim();
    if spec.contains(',') || size == 0 {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", n) => {
            let n: u64 = n.parse().ok()?;
            (size.saturating_sub(n), size - 1)
        }
        (a, "") => (a.parse().ok()?, size - 1),
        (a, b) => (a.parse().ok()?, b.parse::<u64>().ok()?.min(size - 1)),
    };
    (start <= end && start < size).then_some((start, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_parse_from_the_end() {
        assert_eq!(route("/v2/_catalog"), Some(Route::Catalog));
        assert_eq!(route("/v2/a/b/tags/list"), Some(Route::Tags("a/b")));
        assert_eq!(
            route("/v2/a/manifests/blobs/manifests/v1"),
            Some(Route::Manifest("a/manifests/blobs", "v1"))
        );
        assert_eq!(
            route("/v2/x/blobs/sha256:ab"),
            Some(Route::Blob("x", "sha256:ab"))
        );
        assert_eq!(route("/v2/x/y/blobs/uploads/"), Some(Route::Uploads("x/y")));
        assert_eq!(route("/v2/x/blobs/uploads"), Some(Route::Uploads("x")));
        assert_eq!(
            route("/v2/x/blobs/uploads/id-1"),
            Some(Route::Upload("x", "id-1"))
        );
        assert_eq!(
            route("/v2/x/referrers/sha256:ab"),
            Some(Route::Referrers("x", "sha256:ab"))
        );
        assert_eq!(route("/v2/x"), None);
        assert_eq!(route("/v3/x/tags/list"), None);
    }

    #[test]
    fn byte_ranges() {
        assert_eq!(byte_range("bytes=0-9", 100), Some((0, 9)));
        assert_eq!(byte_range("bytes=90-", 100), Some((90, 99)));
        assert_eq!(byte_range("bytes=-10", 100), Some((90, 99)));
        assert_eq!(byte_range("bytes=95-200", 100), Some((95, 99)));
        assert_eq!(byte_range("bytes=100-", 100), None);
        assert_eq!(byte_range("bytes=5-4", 100), None);
        assert_eq!(byte_range("items=0-1", 100), None);
    }
}
