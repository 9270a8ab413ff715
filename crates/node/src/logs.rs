//! Container logs in the CRI format the kubelet writes
//! (`<RFC 3339 nano time> <stream> <F|P> <text>` per line): one file per
//! container run under the pod's directory, fed from pipes the runtime
//! writes the guest's stdout and stderr to, rotated at a size limit, and
//! read back with `kubectl logs`' options.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt};
use tokio::sync::watch;
use wasmkube_runtime::{LogSink, Output};

/// Lines longer than this are split into partial (`P`) records.
const MAX_LINE: usize = 16 * 1024;

/// The file a container run logs to: `<pod>/logs/<container>/<restart>.log`.
pub(crate) fn path(pod_dir: &Path, container: &str, restart: i32) -> PathBuf {
    pod_dir
        .join("logs")
        .join(container)
        .join(format!("{restart}.log"))
}

fn rotated(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".1");
    PathBuf::from(p)
}

/// A log being written: readers following it wait on `written`.
#[derive(Debug)]
pub(crate) struct Live {
    /// Bytes written so far; set to `u64::MAX` once the run's output ended.
    pub written: watch::Receiver<u64>,
}

struct Writer {
    file: Mutex<File>,
    path: PathBuf,
    max_bytes: u64,
    size: Mutex<u64>,
    written: watch::Sender<u64>,
}

impl Writer {
    fn write_line(&self, stream: &str, partial: bool, text: &[u8]) {
        let ts = Utc::now().to_rfc3339_opts(SecondsFormat::Nanos, true);
        let mut record = Vec::with_capacity(text.len() + 48);
        record.extend_from_slice(ts.as_bytes());
        record.push(b' ');
        record.extend_from_slice(stream.as_bytes());
        record.extend_from_slice(if partial { b" P " } else { b" F " });
        record.extend_from_slice(text);
        record.push(b'\n');
        let mut file = self.file.lock().expect("log file lock");
        let mut size = self.size.lock().expect("log size lock");
        if *size + record.len() as u64 > self.max_bytes && *size > 0 {
            // Rotate: the current file becomes `.1`, replacing the older one.
            if std::fs::rename(&self.path, rotated(&self.path)).is_ok()
                && let Ok(f) = File::options().create(true).append(true).open(&self.path)
            {
                *file = f;
                *size = 0;
            }
        }
        if let Err(e) = file.write_all(&record) {
            tracing::warn!(path = %self.path.display(), error = %e, "could not write a log line");
            return;
        }
        *size += record.len() as u64;
        self.written
            .send_modify(|w| *w = w.saturating_add(record.len() as u64));
    }
}

impl Drop for Writer {
    /// The run's output ended (both streams closed): followers stop.
    fn drop(&mut self) {
        self.written.send_replace(u64::MAX);
    }
}

/// The log file of one container run and its writer.
fn writer(path: &Path, max_bytes: u64) -> std::io::Result<(Arc<Writer>, Live)> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let file = File::options().create(true).append(true).open(path)?;
    let size = file.metadata()?.len();
    let (tx, rx) = watch::channel(0);
    let writer = Arc::new(Writer {
        file: Mutex::new(file),
        path: path.to_owned(),
        max_bytes,
        size: Mutex::new(size),
        written: tx,
    });
    Ok((writer, Live { written: rx }))
}

/// Creates the log file of one container run and the pipes its stdout and
/// stderr go to (for a process); returns the write ends and a handle
/// readers can follow. The copying ends when both write ends are closed.
pub(crate) fn open(path: &Path, max_bytes: u64) -> std::io::Result<(Output, Output, Live)> {
    let (writer, live) = writer(path, max_bytes)?;
    let mut ends = Vec::new();
    for stream in ["stdout", "stderr"] {
        let (reader, write_end) = std::io::pipe()?;
        let receiver = tokio::net::unix::pipe::Receiver::from_owned_fd(OwnedFd::from(reader))?;
        ends.push(Output::File(File::from(OwnedFd::from(write_end))));
        tokio::spawn(copy(receiver, writer.clone(), stream));
    }
    let stderr = ends.pop().expect("two pipes");
    let stdout = ends.pop().expect("two pipes");
    Ok((stdout, stderr, live))
}

/// As [`open`], for an in-process (Wasm) guest: its output is written to
/// the log as it comes, with no pipe or descriptor of its own beyond the
/// log file. The run's log ends when the runtime drops both sinks.
pub(crate) fn open_sinks(path: &Path, max_bytes: u64) -> std::io::Result<(Output, Output, Live)> {
    let (writer, live) = writer(path, max_bytes)?;
    let sink = |stream| {
        Output::Sink(Arc::new(LineSink {
            writer: writer.clone(),
            stream,
            partial: Mutex::new(Vec::new()),
        }))
    };
    Ok((sink("stdout"), sink("stderr"), live))
}

/// Cuts a stream into CRI records: a line per `\n`, and a partial record
/// for a line longer than [`MAX_LINE`] or left unfinished at the end.
#[derive(Debug)]
struct LineSink {
    writer: Arc<Writer>,
    stream: &'static str,
    partial: Mutex<Vec<u8>>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer").field("path", &self.path).finish()
    }
}

impl LogSink for LineSink {
    fn write(&self, bytes: &[u8]) {
        let mut buf = self.partial.lock().expect("log line lock");
        buf.extend_from_slice(bytes);
        let mut start = 0;
        while let Some(end) = buf[start..].iter().position(|b| *b == b'\n') {
            self.writer
                .write_line(self.stream, false, &buf[start..start + end]);
            start += end + 1;
        }
        while buf.len() - start >= MAX_LINE {
            self.writer
                .write_line(self.stream, true, &buf[start..start + MAX_LINE]);
            start += MAX_LINE;
        }
        buf.drain(..start);
    }
}

impl Drop for LineSink {
    fn drop(&mut self) {
        let rest = self.partial.get_mut().expect("log line lock");
        if !rest.is_empty() {
            self.writer.write_line(self.stream, true, rest);
        }
    }
}

async fn copy(
    receiver: tokio::net::unix::pipe::Receiver,
    writer: Arc<Writer>,
    stream: &'static str,
) {
    let mut reader = tokio::io::BufReader::new(receiver);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = match (&mut reader)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut line)
            .await
        {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(error = %e, "log pipe read failed");
                0
            }
        };
        if n == 0 {
            return;
        }
        let complete = line.last() == Some(&b'\n');
        if complete {
            line.pop();
        }
        let writer = writer.clone();
        let text = std::mem::take(&mut line);
        // File writes are blocking; they are small and sequential per run.
        let _ =
            tokio::task::spawn_blocking(move || writer.write_line(stream, !complete, &text)).await;
    }
}

/// `kubectl logs` options, as the API server forwards them.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LogOptions {
    #[serde(default, deserialize_with = "flag")]
    pub follow: bool,
    #[serde(default, deserialize_with = "flag")]
    pub previous: bool,
    #[serde(default, deserialize_with = "flag")]
    pub timestamps: bool,
    #[serde(default, deserialize_with = "number")]
    pub tail_lines: Option<i64>,
    #[serde(default, deserialize_with = "number")]
    pub since_seconds: Option<i64>,
    pub since_time: Option<String>,
    #[serde(default, deserialize_with = "number")]
    pub limit_bytes: Option<i64>,
}

fn flag<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    let s = String::deserialize(d)?;
    Ok(matches!(s.as_str(), "true" | "1" | ""))
}

fn number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map(Some).map_err(serde::de::Error::custom)
}

/// One CRI record.
struct Record<'a> {
    time: &'a str,
    stream: &'a [u8],
    partial: bool,
    text: &'a [u8],
}

fn parse(line: &[u8]) -> Option<Record<'_>> {
    let mut parts = line.splitn(4, |b| *b == b' ');
    let time = std::str::from_utf8(parts.next()?).ok()?;
    let stream = parts.next()?;
    let tag = parts.next()?;
    let text = parts.next().unwrap_or_default();
    Some(Record {
        time,
        stream,
        partial: tag == b"P",
        text,
    })
}

/// What was appended to the log at `path` since `offset`, which moves on
/// (to the start again when the log was rotated under the reader).
fn read_from(path: &Path, offset: &mut u64) -> Vec<u8> {
    let mut chunk = Vec::new();
    if let Ok(mut f) = File::open(path) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        if len < *offset {
            *offset = 0;
        }
        if f.seek(SeekFrom::Start(*offset)).is_ok() {
            let _ = f.read_to_end(&mut chunk);
            *offset += chunk.len() as u64;
        }
    }
    chunk
}

/// Where a live log ends now: what a follower starting now skips.
pub(crate) fn end(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Follows a live log from `offset` (`kubectl attach`, from [`end`] when
/// it was accepted): each record's text goes to `tx` on its stream's
/// channel (1 stdout, 2 stderr), a full line with its newline, until the
/// run's output ends or the reader goes away.
pub(crate) async fn follow_streams(
    path: PathBuf,
    mut offset: u64,
    mut live: watch::Receiver<u64>,
    tx: tokio::sync::mpsc::Sender<(u8, Vec<u8>)>,
) {
    let mut pending = Vec::new();
    loop {
        let ended = *live.borrow_and_update() == u64::MAX;
        pending.extend(read_from(&path, &mut offset));
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let Some(r) = parse(&line[..line.len() - 1]) else {
                continue;
            };
            let channel = if r.stream == b"stderr" { 2 } else { 1 };
            let mut text = r.text.to_vec();
            if !r.partial {
                text.push(b'\n');
            }
            if tx.send((channel, text)).await.is_err() {
                return;
            }
        }
        if ended {
            return;
        }
        tokio::select! {
            changed = live.changed() => if changed.is_err() { return },
            () = tx.closed() => return,
        }
    }
}

struct Renderer {
    since: Option<DateTime<Utc>>,
    timestamps: bool,
    remaining: Option<u64>,
}

impl Renderer {
    fn new(options: &LogOptions) -> Self {
        let since = options
            .since_time
            .as_deref()
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&Utc))
            .or_else(|| {
                options
                    .since_seconds
                    .map(|s| Utc::now() - chrono::Duration::seconds(s))
            });
        Self {
            since,
            timestamps: options.timestamps,
            remaining: options.limit_bytes.map(|l| l.max(0) as u64),
        }
    }

    /// The output for one record; `None` when it is filtered out.
    fn render(&self, r: &Record<'_>) -> Option<Vec<u8>> {
        if let Some(since) = self.since {
            let t = DateTime::parse_from_rfc3339(r.time).ok()?;
            if t < since {
                return None;
            }
        }
        let mut out = Vec::with_capacity(r.text.len() + 40);
        if self.timestamps {
            out.extend_from_slice(r.time.as_bytes());
            out.push(b' ');
        }
        out.extend_from_slice(r.text);
        if !r.partial {
            out.push(b'\n');
        }
        Some(out)
    }

    /// Applies `limitBytes`; false once the limit is reached.
    fn limit(&mut self, chunk: &mut Vec<u8>) -> bool {
        match &mut self.remaining {
            None => true,
            Some(left) => {
                if chunk.len() as u64 >= *left {
                    chunk.truncate(*left as usize);
                    *left = 0;
                    false
                } else {
                    *left -= chunk.len() as u64;
                    true
                }
            }
        }
    }
}

/// Reads a container's log as `kubectl logs` asks, sending chunks to `tx`
/// until the end (or, when following a live log, until its run ends or the
/// reader goes away).
pub(crate) async fn stream(
    path: PathBuf,
    options: LogOptions,
    mut live: Option<watch::Receiver<u64>>,
    tx: tokio::sync::mpsc::Sender<Vec<u8>>,
) {
    let mut renderer = Renderer::new(&options);
    let mut content = Vec::new();
    for p in [rotated(&path), path.clone()] {
        if let Ok(mut f) = File::open(&p) {
            let _ = f.read_to_end(&mut content);
        }
    }
    let mut offset = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    let lines: Vec<&[u8]> = content
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    let skip = match options.tail_lines {
        Some(n) if n >= 0 => lines.len().saturating_sub(n as usize),
        _ => 0,
    };
    let mut out = Vec::new();
    for line in &lines[skip..] {
        if let Some(r) = parse(line).and_then(|r| renderer.render(&r)) {
            out.extend_from_slice(&r);
        }
    }
    let more = renderer.limit(&mut out);
    if !out.is_empty() && tx.send(out).await.is_err() {
        return;
    }
    if !more || !options.follow {
        return;
    }
    let Some(live) = live.as_mut() else { return };
    let mut pending = Vec::new();
    loop {
        let ended = *live.borrow_and_update() == u64::MAX;
        pending.extend(read_from(&path, &mut offset));
        let mut out = Vec::new();
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            if let Some(r) = parse(&line[..line.len() - 1]).and_then(|r| renderer.render(&r)) {
                out.extend_from_slice(&r);
            }
        }
        let more = renderer.limit(&mut out);
        if !out.is_empty() && tx.send(out).await.is_err() {
            return;
        }
        if ended || !more {
            return;
        }
        tokio::select! {
            changed = live.changed() => if changed.is_err() { return },
            () = tx.closed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn collect(path: PathBuf, options: LogOptions) -> String {
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        stream(path, options, None, tx).await;
        let mut all = Vec::new();
        while let Some(c) = rx.recv().await {
            all.extend(c);
        }
        String::from_utf8(all).unwrap()
    }

    fn put(o: &mut Output, bytes: &[u8]) {
        match o {
            Output::File(f) => f.write_all(bytes).unwrap(),
            Output::Sink(s) => s.write(bytes),
        }
    }

    /// Writes through pipes (a process) or sinks (an in-process guest);
    /// returns the log file's text once the run's output ended.
    async fn written(p: &Path, sinks: bool) -> String {
        let (mut stdout, mut stderr, mut live) = if sinks {
            open_sinks(p, 1 << 20).unwrap()
        } else {
            open(p, 1 << 20).unwrap()
        };
        put(&mut stdout, b"one\ntw");
        put(&mut stdout, b"o\n");
        put(&mut stderr, b"oops\n");
        put(&mut stdout, b"three");
        drop((stdout, stderr));
        while *live.written.borrow_and_update() != u64::MAX {
            live.written.changed().await.unwrap();
        }
        std::fs::read_to_string(p).unwrap()
    }

    #[tokio::test]
    async fn sinks_cut_long_lines_into_partial_records() {
        let dir = tempfile::tempdir().unwrap();
        let p = path(dir.path(), "app", 0);
        let (stdout, _stderr, _live) = open_sinks(&p, 1 << 20).unwrap();
        let Output::Sink(sink) = stdout else {
            unreachable!()
        };
        sink.write(&vec![b'x'; MAX_LINE + 10]);
        sink.write(b"\n");
        let raw = std::fs::read_to_string(&p).unwrap();
        let records: Vec<&str> = raw
            .lines()
            .map(|l| &l[l.find(' ').unwrap() + 1..])
            .collect();
        assert_eq!(records.len(), 2, "{raw}");
        assert_eq!(records[0].len(), "stdout P ".len() + MAX_LINE);
        assert!(records[0].starts_with("stdout P xxx"));
        assert_eq!(records[1], "stdout F xxxxxxxxxx");
    }

    #[tokio::test]
    async fn writes_cri_records_and_reads_them_back_with_options() {
        let dir = tempfile::tempdir().unwrap();
        let p = path(dir.path(), "app", 0);
        for sinks in [true, false] {
            let other = path(dir.path(), if sinks { "sinks" } else { "pipes" }, 0);
            let raw = written(&other, sinks).await;
            let records: Vec<&str> = raw
                .lines()
                .map(|l| &l[l.find(' ').unwrap() + 1..])
                .collect();
            for want in [
                "stdout F one",
                "stdout F two",
                "stderr F oops",
                "stdout P three",
            ] {
                assert!(records.contains(&want), "{want:?} missing ({sinks}): {raw}");
            }
        }
        written(&p, true).await;

        let all = collect(p.clone(), LogOptions::default()).await;
        for want in ["one\n", "two\n", "oops\n", "three"] {
            assert!(all.contains(want), "{all:?}");
        }
        let tail = collect(
            p.clone(),
            LogOptions {
                tail_lines: Some(1),
                ..Default::default()
            },
        )
        .await;
        assert_eq!(tail.lines().count(), 1, "{tail:?}");
        let stamped = collect(
            p.clone(),
            LogOptions {
                timestamps: true,
                limit_bytes: Some(10),
                ..Default::default()
            },
        )
        .await;
        assert_eq!(stamped.len(), 10);
        assert!(stamped.starts_with("20"), "{stamped}");
    }
}
