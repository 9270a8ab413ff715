//! The watch verb: a chunked stream of `{"type": ..., "object": ...}` lines
//! served from the watch cache, with selector transitions (an object that
//! stops matching is `DELETED` for this watcher), bookmarks, initial events
//! and `410 Gone` when the starting revision is no longer available.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use chrono::Utc;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::broadcast;
use tokio::time::Instant;
use wasmkube_api::registry::ResourceType;
use wasmkube_api::selectors::{FieldSelector, LabelSelector};
use wasmkube_api::table;

use crate::error::{ApiError, ApiResult};
use crate::params::Output;
use crate::rest::{Ctx, partial_metadata};
use crate::watch_cache::{CachedEvent, Subscription, WatchCache, WatchEventType, watch_line};

/// Longest watch when the client sets no `timeoutSeconds`.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30 * 60);

fn gone(requested: u64, oldest: u64) -> ApiError {
    ApiError::Gone {
        message: format!("too old resource version: {requested} ({oldest})"),
        reason: "Expired",
    }
}

struct Filter {
    rt: &'static ResourceType,
    prefix: String,
    labels: LabelSelector,
    fields: FieldSelector,
}

impl Filter {
    fn matches(&self, obj: &Value) -> bool {
        self.labels.matches_object(obj) && self.fields.matches(self.rt, obj)
    }

    /// The event type this watcher sees, if any.
    fn view(&self, e: &CachedEvent) -> Option<WatchEventType> {
        if !e.key.starts_with(&self.prefix) {
            return None;
        }
        let now = self.matches(&e.object);
        let before = e.prev.as_deref().is_some_and(|p| self.matches(p));
        match e.kind {
            WatchEventType::Added => now.then_some(WatchEventType::Added),
            WatchEventType::Deleted => (before || now).then_some(WatchEventType::Deleted),
            WatchEventType::Modified => match (before, now) {
                (true, true) => Some(WatchEventType::Modified),
                (false, true) => Some(WatchEventType::Added),
                (true, false) => Some(WatchEventType::Deleted),
                (false, false) => None,
            },
        }
    }
}

struct WatchState {
    cache: Arc<WatchCache>,
    filter: Filter,
    output: Output,
    initial: VecDeque<Value>,
    /// Send the initial-events-end bookmark after the initial events.
    initial_end_bookmark: bool,
    backlog: VecDeque<Arc<CachedEvent>>,
    live: broadcast::Receiver<Arc<CachedEvent>>,
    /// Every event up to this revision was delivered or filtered out.
    last: u64,
    deadline: Instant,
    bookmarks: Option<Duration>,
    next_bookmark: Instant,
    /// One timer for the watch's life, moved when its deadline changes
    /// (a fresh timer per event would cost a timer-wheel insert per watcher).
    timer: std::pin::Pin<Box<tokio::time::Sleep>>,
    columns_sent: bool,
    done: bool,
    /// The server, for a kind a CRD's webhook converts (its events are
    /// converted one by one).
    converter: Option<Arc<crate::ApiServer>>,
}

impl WatchState {
    fn line(&mut self, ty: &str, obj: &Value) -> Bytes {
        let object = match self.output {
            Output::Object => {
                let mut obj = obj.clone();
                crate::storage::served_as(self.filter.rt, &mut obj);
                obj
            }
            Output::PartialMetadata => partial_metadata(obj),
            Output::Table => {
                let columns = if self.columns_sent {
                    json!([])
                } else {
                    table::column_definitions(self.filter.rt)
                };
                self.columns_sent = true;
                json!({
                    "kind": "Table",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": {"resourceVersion": obj["metadata"]["resourceVersion"]},
                    "columnDefinitions": columns,
                    "rows": [table::row(self.filter.rt, obj, Utc::now())],
                })
            }
        };
        watch_line(ty, &object)
    }

    async fn event_line(&mut self, ty: WatchEventType, e: &CachedEvent) -> Bytes {
        let rt = self.filter.rt;
        let stored_as_served = e.object["apiVersion"].as_str() == Some(&rt.api_version());
        let line = match (self.output, &self.converter) {
            (Output::Object, _) if stored_as_served => e.line(ty),
            (Output::Object | Output::Table, Some(server)) if !stored_as_served => {
                let mut one = [Value::clone(&e.object)];
                match crate::crd_conversion::to_version(server, rt, &mut one).await {
                    Ok(()) => self.line(ty.as_str(), &one[0]),
                    Err(err) => {
                        // As Kubernetes ends a watch it cannot convert for.
                        self.done = true;
                        Self::error_line(&err)
                    }
                }
            }
            // Stored in another version (a CRD's, autoscaling/v2): converted.
            _ => self.line(ty.as_str(), &e.object),
        };
        crate::metrics::watch_event(rt.group, rt.version, rt.kind, line.len());
        line
    }

    fn bookmark(&self, initial_end: bool) -> Bytes {
        let rt = self.filter.rt;
        let mut meta = json!({"resourceVersion": self.last.to_string()});
        if initial_end {
            meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        watch_line(
            "BOOKMARK",
            &json!({"kind": rt.kind, "apiVersion": rt.api_version(), "metadata": meta}),
        )
    }

    fn error_line(err: &ApiError) -> Bytes {
        watch_line("ERROR", &err.status())
    }

    async fn consider(&mut self, e: &CachedEvent) -> Option<Bytes> {
        if e.revision <= self.last {
            return None;
        }
        self.last = e.revision;
        let ty = self.filter.view(e)?;
        Some(self.event_line(ty, e).await)
    }

    async fn next(mut self) -> Option<(Result<Bytes, std::io::Error>, Self)> {
        loop {
            if self.done {
                return None;
            }
            if let Some(obj) = self.initial.pop_front() {
                let line = self.line("ADDED", &obj);
                return Some((Ok(line), self));
            }
            if self.initial_end_bookmark {
                self.initial_end_bookmark = false;
                let line = self.bookmark(true);
                return Some((Ok(line), self));
            }
            if let Some(e) = self.backlog.pop_front() {
                if let Some(line) = self.consider(&e).await {
                    return Some((Ok(line), self));
                }
                continue;
            }
            let wake = match self.bookmarks {
                Some(_) => self.deadline.min(self.next_bookmark),
                None => self.deadline,
            };
            if self.timer.deadline() != wake {
                self.timer.as_mut().reset(wake);
            }
            tokio::select! {
                received = self.live.recv() => match received {
                    Ok(e) => {
                        if let Some(line) = self.consider(&e).await {
                            return Some((Ok(line), self));
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => match self.cache.subscribe(self.last) {
                        Ok(Subscription { backlog, live }) => {
                            self.backlog = backlog.into();
                            self.live = live;
                        }
                        Err(too_old) => {
                            self.done = true;
                            let line = Self::error_line(&gone(too_old.requested, too_old.oldest));
                            return Some((Ok(line), self));
                        }
                    },
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
                () = &mut self.timer => {
                    if Instant::now() >= self.deadline {
                        return None;
                    }
                    if let Some(every) = self.bookmarks {
                        self.next_bookmark = Instant::now() + every;
                        let line = self.bookmark(false);
                        return Some((Ok(line), self));
                    }
                }
            }
        }
    }
}

/// Starts a watch for a list request with `watch=true`.
pub(crate) async fn serve(ctx: &Ctx<'_>) -> ApiResult<Response> {
    let rt = ctx.target.rt;
    let filter = Filter {
        rt,
        prefix: rt.list_prefix(ctx.target.namespace),
        labels: ctx.params.labels()?,
        fields: ctx.params.fields(rt)?,
    };
    let requested = match ctx.params.resource_version.as_deref() {
        None => None,
        Some(s) => Some(s.parse::<u64>().map_err(|_| {
            ApiError::bad_request(format!("invalid resourceVersion {s:?}: must be an integer"))
        })?),
    };
    // No version (or "0") means "start now, beginning with the current state",
    // unless the client opted out of initial events.
    let wants_initial = match (requested, ctx.params.send_initial_events) {
        (_, Some(send)) => send,
        (None | Some(0), None) => true,
        (Some(_), None) => false,
    };
    let (initial, start) = if wants_initial || requested.is_none_or(|r| r == 0) {
        let (items, rev, _) = ListAll(ctx).run().await?;
        if wants_initial {
            (items, rev)
        } else {
            (Vec::new(), rev)
        }
    } else {
        (Vec::new(), requested.unwrap_or(0))
    };
    let cache = ctx.server.cache.clone();
    let Subscription { backlog, live } = match cache.subscribe(start) {
        Ok(sub) => sub,
        // As Kubernetes does: the watch opens and its only event is the 410,
        // which is what makes clients relist.
        Err(t) => {
            let line = WatchState::error_line(&gone(t.requested, t.oldest));
            return Ok(stream_response(Body::from(line)));
        }
    };
    let timeout = ctx
        .params
        .timeout_seconds
        .map_or(DEFAULT_TIMEOUT, Duration::from_secs);
    let bookmarks = ctx
        .params
        .allow_watch_bookmarks
        .then_some(ctx.server.config.bookmark_interval);
    let state = WatchState {
        cache,
        filter,
        output: ctx.output,
        initial: initial.into(),
        initial_end_bookmark: ctx.params.send_initial_events == Some(true)
            && ctx.params.allow_watch_bookmarks,
        backlog: backlog.into(),
        live,
        last: start,
        deadline: Instant::now() + timeout,
        bookmarks,
        next_bookmark: Instant::now() + bookmarks.unwrap_or_default(),
        timer: Box::pin(tokio::time::sleep_until(Instant::now() + timeout)),
        columns_sent: false,
        done: false,
        converter: crate::crd_conversion::webhook(rt).map(|_| ctx.server.clone()),
    };
    // Events already waiting go out in one write: a burst costs one syscall
    // per watcher, not one per event.
    let stream = futures::stream::unfold(state, WatchState::next)
        .ready_chunks(WATCH_WRITE_BATCH)
        .map(join_lines);
    Ok(stream_response(Body::from_stream(stream)))
}

/// Most events joined into one write.
const WATCH_WRITE_BATCH: usize = 256;

fn join_lines(lines: Vec<Result<Bytes, std::io::Error>>) -> Result<Bytes, std::io::Error> {
    if lines.len() == 1 {
        return lines.into_iter().next().expect("one line");
    }
    let mut out = bytes::BytesMut::new();
    for line in lines {
        out.extend_from_slice(&line?);
    }
    Ok(out.freeze())
}

fn stream_response(body: Body) -> Response {
    let mut resp = (StatusCode::OK, body).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// The full current list (selectors applied), ignoring `limit`.
struct ListAll<'a, 'b>(&'a Ctx<'b>);

impl ListAll<'_, '_> {
    async fn run(self) -> ApiResult<(Vec<Value>, u64, Option<String>)> {
        let ctx = Ctx {
            server: self.0.server,
            target: self.0.target,
            params: crate::params::Params {
                label_selector: self.0.params.label_selector.clone(),
                field_selector: self.0.params.field_selector.clone(),
                ..Default::default()
            },
            headers: self.0.headers,
            output: Output::Object,
            user: None,
        };
        ctx.list_objects().await
    }
}
