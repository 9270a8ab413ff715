// The wasmkube dashboard: reads the cluster through the Kubernetes API of
// this origin with the reader's own credentials. Lists are kept live with
// watches (list, then watch from its resourceVersion, again after 410 Gone);
// CPU and memory come from metrics.k8s.io, sampled while the page is open,
// after the recent history a pod's node keeps (a pod's page starts with it);
// Wasm module facts from custom.metrics.k8s.io; logs stream from pods/log.
// Cluster text is only ever written as text (textContent), never as markup.

const SVG_NS = "http://www.w3.org/2000/svg";
const query = new URLSearchParams(location.search);
// How often usage is sampled for the charts (`?interval=MS`, at least 500).
const SAMPLE_MS = Math.max(500, Number(query.get("interval")) || 5000);
// Samples kept per pod and node: half an hour at the default interval.
const HISTORY = 360;
const LOG_LINES = 2000;

// What the page did, for people and for the browser tests: when each pod
// was first shown, and when the first data was drawn.
const record = { shown: {}, firstData: null, renders: 0 };
window.wasmkube = record;

// ---------------------------------------------------------------- DOM

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v == null || v === false) continue;
    if (k === "class") el.className = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c == null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

function s(tag, attrs = {}) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  return el;
}

function replace(el, ...children) {
  el.replaceChildren();
  append(el, children);
}

function table(headers, rows, empty = "Nothing here.") {
  if (!rows.length) return h("p", { class: "muted" }, empty);
  return h("table", {},
    h("thead", {}, h("tr", {}, headers.map((x) => h("th", {}, x)))),
    h("tbody", {}, rows));
}

function statusCell(text) {
  return h("td", { class: `status-${String(text).replace(/[^A-Za-z]/g, "")}` }, text);
}

// ---------------------------------------------------------------- API

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function failure(r) {
  let message = `${r.status} ${r.statusText}`;
  try {
    const body = await r.json();
    if (body.message) message = body.message;
  } catch { /* not a Status */ }
  return new ApiError(r.status, message);
}

async function get(path, signal) {
  const r = await fetch(path, { headers: { Accept: "application/json" }, signal });
  if (!r.ok) throw await failure(r);
  return r.json();
}

function apiPath([group, version, plural, clusterScoped], ns) {
  const base = group ? `/apis/${group}/${version}` : `/api/${version}`;
  return !clusterScoped && ns ? `${base}/namespaces/${encodeURIComponent(ns)}/${plural}` : `${base}/${plural}`;
}

const KINDS = {
  nodes: ["", "v1", "nodes", true],
  namespaces: ["", "v1", "namespaces", true],
  pods: ["", "v1", "pods"],
  events: ["", "v1", "events"],
  services: ["", "v1", "services"],
  endpointslices: ["discovery.k8s.io", "v1", "endpointslices"],
  deployments: ["apps", "v1", "deployments"],
  statefulsets: ["apps", "v1", "statefulsets"],
  daemonsets: ["apps", "v1", "daemonsets"],
  jobs: ["batch", "v1", "jobs"],
  cronjobs: ["batch", "v1", "cronjobs"],
  hpas: ["autoscaling", "v2", "horizontalpodautoscalers"],
  ingresses: ["networking.k8s.io", "v1", "ingresses"],
  httproutes: ["gateway.networking.k8s.io", "v1", "httproutes"],
  knativeServices: ["serving.knative.dev", "v1", "services"],
};

// ---------------------------------------------------------------- live lists

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const keyOf = (o) => (o.metadata.namespace ? `${o.metadata.namespace}/` : "") + o.metadata.name;

// One list kept live: listed, then watched from the list's revision; a
// watch that ends is resumed from the last revision seen, one that is too
// old (410 Gone) lists again. Failures retry with a growing pause.
class Live {
  constructor(path) {
    this.path = path;
    this.items = new Map();
    this.ready = false;
    this.error = null;
    this.watching = false;
    this.abort = new AbortController();
    this.run();
  }

  stop() {
    this.abort.abort();
    this.watching = false;
  }

  list() {
    return [...this.items.values()];
  }

  async run() {
    let pause = 500;
    while (!this.abort.signal.aborted) {
      try {
        const list = await get(this.path, this.abort.signal);
        this.items = new Map((list.items || []).map((o) => [keyOf(o), o]));
        this.ready = true;
        this.error = null;
        changed();
        let rv = list.metadata.resourceVersion;
        while (rv && !this.abort.signal.aborted) rv = await this.watch(rv);
        pause = 500;
      } catch (e) {
        if (this.abort.signal.aborted) return;
        this.error = e;
        this.watching = false;
        changed();
        await sleep(pause);
        pause = Math.min(pause * 2, 10000);
      }
    }
  }

  watchUrl(rv) {
    const sep = this.path.includes("?") ? "&" : "?";
    return `${this.path}${sep}watch=1&allowWatchBookmarks=true&resourceVersion=${encodeURIComponent(rv)}`;
  }

  // Applies one watch event; returns the revision reached, or null when
  // the watch is too old to resume (list again).
  apply(event, rv) {
    const o = event.object || {};
    if (event.type === "ERROR") {
      if (o.code === 410) return null;
      throw new ApiError(o.code || 500, o.message || "the watch failed");
    }
    rv = o.metadata?.resourceVersion || rv;
    if (event.type === "BOOKMARK") return rv;
    if (event.type === "DELETED") this.items.delete(keyOf(o));
    else this.items.set(keyOf(o), o);
    changed();
    return rv;
  }

  opened() {
    this.watching = true;
    this.error = null;
    changed();
  }

  // Watches from `rv`; returns the revision to resume from, or null to
  // list again. Over a WebSocket (one message per event), which a
  // browser does not count against its six connections per host; over a
  // streamed response where the socket cannot be had.
  async watch(rv) {
    if (!this.noSocket) {
      const reached = await this.watchSocket(rv);
      if (reached !== undefined) return reached;
      this.noSocket = true;
    }
    return this.watchStream(rv);
  }

  // Resolves to the revision to resume from, null to list again, or
  // undefined when no socket opened (the caller streams instead).
  watchSocket(rv) {
    return new Promise((resolve, reject) => {
      const url = new URL(this.watchUrl(rv), location.href);
      url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
      const socket = new WebSocket(url);
      let open = false;
      let settled = false;
      const finish = (f, v) => {
        if (settled) return;
        settled = true;
        this.watching = false;
        this.abort.signal.removeEventListener("abort", close);
        if (socket.readyState <= 1) socket.close();
        f(v);
      };
      const close = () => finish(resolve, rv);
      this.abort.signal.addEventListener("abort", close);
      socket.onopen = () => {
        open = true;
        this.opened();
      };
      socket.onmessage = (m) => {
        try {
          const reached = this.apply(JSON.parse(m.data), rv);
          if (reached === null) finish(resolve, null);
          else rv = reached;
        } catch (e) {
          finish(reject, e);
        }
      };
      socket.onclose = () => finish(resolve, open ? rv : undefined);
    });
  }

  async watchStream(rv) {
    const r = await fetch(this.watchUrl(rv), { headers: { Accept: "application/json" }, signal: this.abort.signal });
    if (r.status === 410) return null;
    if (!r.ok) throw await failure(r);
    this.opened();
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffered = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffered += decoder.decode(value, { stream: true });
      let nl;
      while ((nl = buffered.indexOf("\n")) >= 0) {
        const line = buffered.slice(0, nl).trim();
        buffered = buffered.slice(nl + 1);
        if (!line) continue;
        rv = this.apply(JSON.parse(line), rv);
        if (rv === null) return null;
      }
    }
    this.watching = false;
    return rv;
  }
}

const lives = new Map();

// The live list of a kind in the chosen namespace (or cluster-wide).
function live(kind) {
  const path = apiPath(KINDS[kind], state.namespace);
  let l = lives.get(path);
  if (!l) {
    l = new Live(path);
    lives.set(path, l);
  }
  return l;
}

// ---------------------------------------------------------------- usage

// Quantities as the metrics API writes them: CPU in cores, memory in bytes.
function quantity(q) {
  if (q == null) return NaN;
  const m = /^([0-9.]+)([a-zA-Z]*)$/.exec(String(q));
  if (!m) return NaN;
  const scale = {
    "": 1, n: 1e-9, u: 1e-6, m: 1e-3, k: 1e3, M: 1e6, G: 1e9, T: 1e12,
    Ki: 1024, Mi: 1024 ** 2, Gi: 1024 ** 3, Ti: 1024 ** 4,
  }[m[2]];
  return scale === undefined ? NaN : Number(m[1]) * scale;
}

const usage = { pods: new Map(), nodes: new Map(), error: null };

function remember(map, key, sample) {
  let samples = map.get(key);
  if (!samples) map.set(key, (samples = []));
  samples.push(sample);
  if (samples.length > HISTORY) samples.shift();
}

async function sampleUsage() {
  const t = Date.now();
  try {
    const pods = await get(`/apis/metrics.k8s.io/v1beta1${state.namespace ? `/namespaces/${encodeURIComponent(state.namespace)}` : ""}/pods`);
    for (const p of pods.items || []) {
      const cpu = (p.containers || []).reduce((a, c) => a + quantity(c.usage?.cpu), 0);
      const memory = (p.containers || []).reduce((a, c) => a + quantity(c.usage?.memory), 0);
      remember(usage.pods, `${p.metadata.namespace}/${p.metadata.name}`, { t, cpu, memory });
    }
    usage.error = null;
  } catch (e) {
    usage.error = e;
  }
  try {
    const nodes = await get("/apis/metrics.k8s.io/v1beta1/nodes");
    for (const n of nodes.items || []) {
      remember(usage.nodes, n.metadata.name, { t, cpu: quantity(n.usage?.cpu), memory: quantity(n.usage?.memory) });
    }
  } catch { /* a tenant may not read nodes */ }
  changed();
}

// A pod's recent usage, as its node sampled it before the page opened:
// the sum over its containers at each sample time, in front of what the
// page has sampled itself.
async function loadHistory(ns, name) {
  const key = `${ns}/${name}`;
  let history;
  try {
    history = await get(`/dashboard/api/namespaces/${encodeURIComponent(ns)}/pods/${encodeURIComponent(name)}/usage`);
  } catch {
    return; // Not running, or not ours to read: the page's own samples only.
  }
  const byTime = new Map();
  for (const c of history.containers || []) {
    for (const x of c.samples || []) {
      const at = byTime.get(x.time) || { t: x.time * 1000, cpu: 0, memory: 0 };
      at.cpu += (x.cpuNanoCores || 0) / 1e9;
      at.memory += x.memoryBytes || 0;
      byTime.set(x.time, at);
    }
  }
  const own = usage.pods.get(key) || [];
  const first = own.length ? own[0].t : Infinity;
  const before = [...byTime.values()].filter((x) => x.t < first).sort((a, b) => a.t - b.t);
  usage.pods.set(key, [...before, ...own].slice(-HISTORY));
  changed();
}

const latest = (samples) => (samples && samples.length ? samples[samples.length - 1] : null);

// ---------------------------------------------------------------- formatting

function age(ts) {
  if (!ts) return "";
  const s = Math.max(0, Math.floor((Date.now() - Date.parse(ts)) / 1000));
  if (s < 120) return `${s}s`;
  if (s < 7200) return `${Math.floor(s / 60)}m`;
  if (s < 172800) return `${Math.floor(s / 3600)}h`;
  return `${Math.floor(s / 86400)}d`;
}

function cores(c) {
  if (!Number.isFinite(c)) return "";
  return c >= 1 ? `${c.toFixed(2)}` : `${Math.round(c * 1000)}m`;
}

function bytes(b) {
  if (!Number.isFinite(b)) return "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (b >= 1024 && i < units.length - 1) {
    b /= 1024;
    i++;
  }
  return `${b < 10 && i ? b.toFixed(1) : Math.round(b)} ${units[i]}`;
}

function seconds(x) {
  if (!Number.isFinite(x)) return "";
  return x < 1 ? `${(x * 1000).toFixed(x < 0.01 ? 2 : 1)} ms` : `${x.toFixed(2)} s`;
}

// A pod's status as kubectl's STATUS column says it.
function podStatus(p) {
  if (p.metadata.deletionTimestamp) return "Terminating";
  let reason = p.status?.reason || p.status?.phase || "Pending";
  for (const c of p.status?.containerStatuses || []) {
    if (c.state?.waiting?.reason) reason = c.state.waiting.reason;
    else if (c.state?.terminated?.reason) reason = c.state.terminated.reason;
  }
  return reason;
}

function ready(p) {
  const cs = p.status?.containerStatuses || [];
  const total = (p.spec?.containers || []).length;
  return `${cs.filter((c) => c.ready).length}/${total}`;
}

const restarts = (p) => (p.status?.containerStatuses || []).reduce((a, c) => a + (c.restartCount || 0), 0);

function nodeReady(n) {
  const c = (n.status?.conditions || []).find((c) => c.type === "Ready");
  const status = c?.status === "True" ? "Ready" : c?.status === "False" ? "NotReady" : "Unknown";
  return n.spec?.unschedulable ? `${status},SchedulingDisabled` : status;
}

function problem(l, what) {
  if (!l.error) return null;
  const hint = l.error.status === 403 && !state.namespace ? " Choose one of your namespaces above." : "";
  return h("p", { class: "status-Error", "data-problem": l.error.status }, `${what}: ${l.error.message}.${hint}`);
}

const podLink = (ns, name) => `#/pods/${encodeURIComponent(ns)}/${encodeURIComponent(name)}`;

// ---------------------------------------------------------------- charts

// A line chart of `samples` (objects with `t`) by `value`, newest right.
function chart(title, samples, value, format, attrs = {}) {
  const points = (samples || []).filter((x) => Number.isFinite(value(x)));
  const width = 600;
  const height = 140;
  const graph = s("svg", { viewBox: `0 0 ${width} ${height}`, preserveAspectRatio: "none", role: "img", "aria-label": title });
  graph.append(s("line", { class: "axis", x1: 0, y1: height - 1, x2: width, y2: height - 1 }));
  const now = latest(points);
  if (points.length >= 2) {
    const max = Math.max(...points.map(value)) * 1.15 || 1;
    const t0 = points[0].t;
    const span = Math.max(1, now.t - t0);
    const xy = points.map((p) => [((p.t - t0) / span) * width, height - 2 - (value(p) / max) * (height - 8)]);
    const line = xy.map(([x, y]) => `${x.toFixed(1)},${y.toFixed(1)}`).join(" ");
    graph.append(s("polygon", { class: "area", points: `0,${height} ${line} ${width},${height}` }));
    graph.append(s("polyline", { class: "line", points: line }));
  }
  const spanMs = points.length >= 2 ? now.t - points[0].t : 0;
  return h("div", { class: "chart", "data-chart": attrs.name || title, "data-points": points.length, "data-span-ms": spanMs },
    h("div", { class: "title" }, h("strong", {}, title),
      h("span", { class: "muted" }, now ? format(value(now)) : "waiting for samples")),
    graph);
}

// ---------------------------------------------------------------- views

// The namespace shown: `?namespace=NS` in the address, or the last one
// chosen; empty for all (a reader who may not list every namespace types
// or picks one of theirs).
const state = {
  namespace: query.get("namespace") ?? localStorage.getItem("wasmkube.namespace") ?? "",
  view: null,
};

function cards(items) {
  return h("div", { class: "cards" }, items.map(([figure, label, detail]) =>
    h("div", { class: "card" }, h("div", { class: "figure" }, figure), h("div", { class: "label" }, label),
      detail ? h("div", { class: "muted" }, detail) : null)));
}

function byName(a, b) {
  return keyOf(a).localeCompare(keyOf(b));
}

function eventTime(e) {
  return e.lastTimestamp || e.eventTime || e.series?.lastObservedTime || e.firstTimestamp || e.metadata.creationTimestamp;
}

function eventsTable(events, limit) {
  const rows = events
    .sort((a, b) => Date.parse(eventTime(b)) - Date.parse(eventTime(a)))
    .slice(0, limit)
    .map((e) => h("tr", {},
      h("td", {}, age(eventTime(e))),
      statusCell(e.type || "Normal"),
      h("td", {}, e.reason || ""),
      h("td", {}, `${(e.involvedObject?.kind || "").toLowerCase()}/${e.involvedObject?.name || ""}`),
      h("td", {}, e.message || ""),
      h("td", { class: "num" }, e.count || e.series?.count || 1)));
  return table(["Last seen", "Type", "Reason", "Object", "Message", "Count"], rows, "No events.");
}

const views = {
  overview: {
    kinds: ["nodes", "pods", "deployments", "services", "events"],
    render(root) {
      const nodes = live("nodes");
      const pods = live("pods").list();
      const deployments = live("deployments").list();
      const phases = {};
      for (const p of pods) phases[p.status?.phase || "Pending"] = (phases[p.status?.phase || "Pending"] || 0) + 1;
      const readyNodes = nodes.list().filter((n) => nodeReady(n).startsWith("Ready")).length;
      const available = deployments.filter((d) => (d.status?.availableReplicas || 0) >= (d.spec?.replicas ?? 1)).length;
      const usageRows = nodes.list().sort(byName).map((n) => {
        const u = latest(usage.nodes.get(n.metadata.name));
        const cpuCap = quantity(n.status?.allocatable?.cpu);
        const memCap = quantity(n.status?.allocatable?.memory);
        // Set through the CSSOM: the page's policy refuses style attributes.
        const bar = (used, cap) => {
          const fill = h("span");
          fill.style.width = `${Math.min(100, (used / cap) * 100 || 0).toFixed(1)}%`;
          return h("div", { class: "bar" }, fill);
        };
        return h("tr", {},
          h("td", {}, n.metadata.name),
          statusCell(nodeReady(n)),
          h("td", {}, u ? `${cores(u.cpu)} of ${cores(cpuCap)}` : "", u ? bar(u.cpu, cpuCap) : null),
          h("td", {}, u ? `${bytes(u.memory)} of ${bytes(memCap)}` : "", u ? bar(u.memory, memCap) : null));
      });
      replace(root,
        h("h2", {}, "Cluster"),
        cards([
          [`${readyNodes}/${nodes.items.size}`, "nodes ready"],
          [`${phases.Running || 0}/${pods.length}`, "pods running",
            ["Pending", "Failed", "Succeeded"].filter((p) => phases[p]).map((p) => `${phases[p]} ${p.toLowerCase()}`).join(", ")],
          [`${available}/${deployments.length}`, "deployments available"],
          [`${live("services").items.size}`, "services"],
        ]),
        problem(nodes, "Nodes"),
        h("h2", {}, "Node usage"),
        table(["Node", "Status", "CPU", "Memory"], usageRows, "No nodes."),
        h("h2", {}, "Recent events"),
        eventsTable(live("events").list(), 12));
    },
  },

  nodes: {
    kinds: ["nodes", "pods"],
    render(root) {
      const nodes = live("nodes");
      const pods = live("pods").list();
      const rows = nodes.list().sort(byName).map((n) => {
        const u = latest(usage.nodes.get(n.metadata.name));
        const ip = (n.status?.addresses || []).find((a) => a.type === "InternalIP")?.address || "";
        return h("tr", { "data-key": n.metadata.name },
          h("td", {}, n.metadata.name),
          statusCell(nodeReady(n)),
          h("td", {}, n.status?.nodeInfo?.kubeletVersion || ""),
          h("td", {}, n.status?.nodeInfo?.containerRuntimeVersion || ""),
          h("td", {}, ip),
          h("td", { class: "num" }, pods.filter((p) => p.spec?.nodeName === n.metadata.name).length),
          h("td", { class: "num" }, u ? cores(u.cpu) : ""),
          h("td", { class: "num" }, u ? bytes(u.memory) : ""),
          h("td", {}, age(n.metadata.creationTimestamp)));
      });
      replace(root, h("h2", {}, "Nodes"), problem(nodes, "Nodes"),
        table(["Name", "Status", "Version", "Runtimes", "Internal IP", "Pods", "CPU", "Memory", "Age"], rows, "No nodes."));
    },
  },

  workloads: {
    kinds: ["deployments", "statefulsets", "daemonsets", "jobs", "cronjobs", "hpas", "knativeServices"],
    render(root) {
      const ns = (o) => (state.namespace ? [] : [h("td", {}, o.metadata.namespace)]);
      const nsHead = state.namespace ? [] : ["Namespace"];
      const section = (title, kind, headers, row) => {
        const l = live(kind);
        return [h("h2", {}, title), problem(l, title),
          table([...nsHead, ...headers], l.list().sort(byName).map((o) => h("tr", { "data-key": keyOf(o) }, ns(o), row(o))), `No ${title.toLowerCase()}.`)];
      };
      replace(root,
        section("Deployments", "deployments", ["Name", "Ready", "Up to date", "Available", "Age"], (d) => [
          h("td", {}, d.metadata.name),
          h("td", {}, `${d.status?.readyReplicas || 0}/${d.spec?.replicas ?? 1}`),
          h("td", { class: "num" }, d.status?.updatedReplicas || 0),
          h("td", { class: "num" }, d.status?.availableReplicas || 0),
          h("td", {}, age(d.metadata.creationTimestamp))]),
        section("Knative Services", "knativeServices", ["Name", "URL", "Latest ready", "Ready", "Age"], (k) => [
          h("td", {}, k.metadata.name),
          h("td", {}, k.status?.url || ""),
          h("td", {}, k.status?.latestReadyRevisionName || ""),
          statusCell((k.status?.conditions || []).find((c) => c.type === "Ready")?.status || "Unknown"),
          h("td", {}, age(k.metadata.creationTimestamp))]),
        section("StatefulSets", "statefulsets", ["Name", "Ready", "Age"], (x) => [
          h("td", {}, x.metadata.name),
          h("td", {}, `${x.status?.readyReplicas || 0}/${x.spec?.replicas ?? 1}`),
          h("td", {}, age(x.metadata.creationTimestamp))]),
        section("DaemonSets", "daemonsets", ["Name", "Desired", "Ready", "Age"], (x) => [
          h("td", {}, x.metadata.name),
          h("td", { class: "num" }, x.status?.desiredNumberScheduled || 0),
          h("td", { class: "num" }, x.status?.numberReady || 0),
          h("td", {}, age(x.metadata.creationTimestamp))]),
        section("Jobs", "jobs", ["Name", "Completions", "Age"], (j) => [
          h("td", {}, j.metadata.name),
          h("td", {}, `${j.status?.succeeded || 0}/${j.spec?.completions ?? 1}`),
          h("td", {}, age(j.metadata.creationTimestamp))]),
        section("CronJobs", "cronjobs", ["Name", "Schedule", "Active", "Last schedule"], (c) => [
          h("td", {}, c.metadata.name),
          h("td", {}, c.spec?.schedule || ""),
          h("td", { class: "num" }, (c.status?.active || []).length),
          h("td", {}, age(c.status?.lastScheduleTime))]),
        section("Horizontal pod autoscalers", "hpas", ["Name", "Target", "Replicas", "Min", "Max"], (a) => [
          h("td", {}, a.metadata.name),
          h("td", {}, `${a.spec?.scaleTargetRef?.kind || ""}/${a.spec?.scaleTargetRef?.name || ""}`),
          h("td", { class: "num" }, a.status?.currentReplicas ?? ""),
          h("td", { class: "num" }, a.spec?.minReplicas ?? 1),
          h("td", { class: "num" }, a.spec?.maxReplicas ?? "")]));
    },
  },

  pods: {
    kinds: ["pods"],
    render(root) {
      const pods = live("pods");
      const rows = pods.list().sort(byName).map((p) => {
        const u = latest(usage.pods.get(keyOf(p)));
        // Opened on the press, not the click: the table is drawn again as
        // pods change, and a row replaced between press and release would
        // lose the click.
        const open = (e) => {
          if (e.button === 0 && !e.ctrlKey && !e.metaKey && !e.shiftKey && !e.altKey) {
            location.hash = podLink(p.metadata.namespace, p.metadata.name);
          }
        };
        return h("tr", { class: "link", "data-key": keyOf(p), onpointerdown: open },
          state.namespace ? null : h("td", {}, p.metadata.namespace),
          h("td", {}, h("a", { href: podLink(p.metadata.namespace, p.metadata.name) }, p.metadata.name)),
          h("td", {}, ready(p)),
          statusCell(podStatus(p)),
          h("td", { class: "num" }, restarts(p)),
          h("td", { class: "num" }, u ? cores(u.cpu) : ""),
          h("td", { class: "num" }, u ? bytes(u.memory) : ""),
          h("td", {}, p.spec?.nodeName || ""),
          h("td", {}, p.status?.podIP || ""),
          h("td", {}, age(p.metadata.creationTimestamp)));
      });
      replace(root, h("h2", {}, "Pods"), problem(pods, "Pods"),
        table([...(state.namespace ? [] : ["Namespace"]), "Name", "Ready", "Status", "Restarts", "CPU", "Memory", "Node", "IP", "Age"], rows, "No pods."));
      const now = Date.now();
      for (const p of pods.list()) record.shown[keyOf(p)] ??= now;
      if (pods.ready && record.firstData == null) {
        record.firstData = performance.now();
        performance.mark("wasmkube:first-data");
      }
    },
  },

  services: {
    kinds: ["services", "endpointslices", "ingresses", "httproutes"],
    render(root) {
      const slices = live("endpointslices").list();
      const endpoints = (svc) => slices
        .filter((x) => x.metadata.namespace === svc.metadata.namespace && x.metadata.labels?.["kubernetes.io/service-name"] === svc.metadata.name)
        .flatMap((x) => x.endpoints || [])
        .filter((e) => e.conditions?.ready !== false).length;
      const ns = (o) => (state.namespace ? [] : [h("td", {}, o.metadata.namespace)]);
      const nsHead = state.namespace ? [] : ["Namespace"];
      const services = live("services");
      const ingresses = live("ingresses");
      const routes = live("httproutes");
      const backend = (b) => b?.service ? `${b.service.name}:${b.service.port?.number ?? b.service.port?.name ?? ""}` : "";
      replace(root,
        h("h2", {}, "Services"), problem(services, "Services"),
        table([...nsHead, "Name", "Type", "Cluster IP", "Ports", "Ready endpoints", "Age"],
          services.list().sort(byName).map((x) => h("tr", { "data-key": keyOf(x) }, ns(x),
            h("td", {}, x.metadata.name),
            h("td", {}, x.spec?.type || "ClusterIP"),
            h("td", {}, x.spec?.clusterIP || ""),
            h("td", {}, (x.spec?.ports || []).map((p) => h("span", { class: "tag" }, `${p.port}${p.nodePort ? `:${p.nodePort}` : ""}/${p.protocol || "TCP"}`))),
            h("td", { class: "num" }, endpoints(x)),
            h("td", {}, age(x.metadata.creationTimestamp)))), "No services."),
        h("h2", {}, "Ingresses"), problem(ingresses, "Ingresses"),
        table([...nsHead, "Name", "Class", "Rules"],
          ingresses.list().sort(byName).map((x) => h("tr", {}, ns(x),
            h("td", {}, x.metadata.name),
            h("td", {}, x.spec?.ingressClassName || ""),
            h("td", {}, (x.spec?.rules || []).flatMap((r) => (r.http?.paths || []).map((p) =>
              h("div", {}, `${r.host || "*"}${p.path || "/"} → ${backend(p.backend)}`)))))), "No ingresses."),
        h("h2", {}, "HTTP routes"), problem(routes, "HTTP routes"),
        table([...nsHead, "Name", "Hostnames", "Gateways", "Backends"],
          routes.list().sort(byName).map((x) => h("tr", {}, ns(x),
            h("td", {}, x.metadata.name),
            h("td", {}, (x.spec?.hostnames || ["*"]).join(", ")),
            h("td", {}, (x.spec?.parentRefs || []).map((p) => p.name).join(", ")),
            h("td", {}, (x.spec?.rules || []).flatMap((r) => r.backendRefs || []).map((b) => h("span", { class: "tag" }, `${b.name}:${b.port ?? ""}${b.weight != null ? ` (${b.weight})` : ""}`))))), "No HTTP routes."));
    },
  },

  events: {
    kinds: ["events"],
    render(root) {
      const events = live("events");
      replace(root, h("h2", {}, "Events"), problem(events, "Events"), eventsTable(events.list(), 300));
    },
  },
};

// The Wasm figures custom.metrics.k8s.io serves for pods.
const WASM_FACTS = [
  ["wasm_module_bytes", "Module size", bytes],
  ["wasm_native_code_bytes", "Native code size", bytes],
  ["wasm_compile_seconds", "Compile time on this node", seconds],
  ["wasm_load_seconds", "Load time", seconds],
  ["wasm_instances", "Live instances", (x) => String(x)],
];

// One pod: its state, usage charts, Wasm facts, containers, logs and events.
class PodView {
  constructor(ns, name) {
    this.ns = ns;
    this.name = name;
    this.key = `${ns}/${name}`;
    this.kinds = ["pods", "events"];
    this.facts = null;
    this.logs = null;
  }

  mount(root) {
    this.head = h("div");
    this.charts = h("div", { class: "grid2" });
    this.factsBox = h("div");
    this.containers = h("div");
    this.logBox = h("pre", { class: "logs", "data-logs": this.key }, "");
    this.logState = h("span", { class: "muted" });
    this.logPicker = h("select", { onchange: () => this.follow(this.logPicker.value) });
    this.eventsBox = h("div");
    replace(root, this.head,
      h("h2", {}, "Usage"), this.charts,
      h("h2", {}, "Wasm module"), this.factsBox,
      h("h2", {}, "Containers"), this.containers,
      h("h2", {}, "Logs"), h("div", { class: "toolbar" }, this.logPicker, this.logState), this.logBox,
      h("h2", {}, "Events"), this.eventsBox);
    this.loadFacts();
    loadHistory(this.ns, this.name);
    this.timer = setInterval(() => this.loadFacts(), SAMPLE_MS);
  }

  unmount() {
    clearInterval(this.timer);
    this.logs?.abort();
  }

  pod() {
    return live("pods").items.get(this.key);
  }

  render() {
    const p = this.pod();
    if (!p) {
      replace(this.head, h("h2", {}, this.name), h("p", { class: "muted" }, live("pods").ready ? "This pod is gone." : "Loading…"));
      return;
    }
    replace(this.head,
      h("h2", {}, `Pod ${this.name}`),
      h("dl", { class: "facts" },
        h("dt", {}, "Namespace"), h("dd", {}, this.ns),
        h("dt", {}, "Status"), h("dd", { class: `status-${podStatus(p)}` }, podStatus(p)),
        h("dt", {}, "Node"), h("dd", {}, p.spec?.nodeName || "not scheduled"),
        h("dt", {}, "Pod IP"), h("dd", {}, p.status?.podIP || ""),
        h("dt", {}, "Runtime class"), h("dd", {}, p.spec?.runtimeClassName || "(by image)"),
        h("dt", {}, "Age"), h("dd", {}, age(p.metadata.creationTimestamp)),
        h("dt", {}, "Labels"), h("dd", {}, Object.entries(p.metadata.labels || {}).map(([k, v]) => h("span", { class: "tag" }, `${k}=${v}`)))));
    const samples = usage.pods.get(this.key);
    replace(this.charts,
      chart("CPU", samples, (x) => x.cpu, cores, { name: "cpu" }),
      chart("Memory", samples, (x) => x.memory, bytes, { name: "memory" }));
    if (usage.error) append(this.charts, h("p", { class: "muted" }, `Usage: ${usage.error.message}`));
    this.renderFacts();
    const statuses = new Map((p.status?.containerStatuses || []).map((c) => [c.name, c]));
    replace(this.containers, table(["Name", "Image", "State", "Ready", "Restarts"],
      (p.spec?.containers || []).map((c) => {
        const st = statuses.get(c.name);
        const [stateName, detail] = st?.state?.running ? ["Running", ""]
          : st?.state?.waiting ? [st.state.waiting.reason || "Waiting", st.state.waiting.message || ""]
            : st?.state?.terminated ? [st.state.terminated.reason || "Terminated", `exit code ${st.state.terminated.exitCode}`]
              : ["Pending", ""];
        return h("tr", {}, h("td", {}, c.name), h("td", {}, c.image || ""),
          h("td", { class: `status-${stateName}` }, stateName, detail ? h("div", { class: "muted" }, detail) : null),
          h("td", {}, st?.ready ? "yes" : "no"), h("td", { class: "num" }, st?.restartCount || 0));
      })));
    const names = (p.spec?.containers || []).map((c) => c.name);
    if (this.logPicker.options.length !== names.length) {
      replace(this.logPicker, names.map((n) => h("option", { value: n }, n)));
      this.follow(names[0]);
    }
    const uid = p.metadata.uid;
    replace(this.eventsBox, eventsTable(live("events").list().filter((e) =>
      // By uid: an earlier pod of the same name had its own events.
      e.involvedObject?.uid ? e.involvedObject.uid === uid
        : e.involvedObject?.kind === "Pod" && e.involvedObject?.name === this.name && e.metadata.namespace === this.ns), 50));
  }

  async loadFacts() {
    const facts = {};
    let refused = null;
    await Promise.all(WASM_FACTS.map(async ([metric]) => {
      try {
        const v = await get(`/apis/custom.metrics.k8s.io/v1beta2/namespaces/${encodeURIComponent(this.ns)}/pods/${encodeURIComponent(this.name)}/${metric}`);
        const item = (v.items || [])[0];
        if (item) facts[metric] = quantity(item.value);
      } catch (e) {
        if (e.status === 403) refused = e;
      }
    }));
    this.facts = { values: facts, refused };
    this.renderFacts();
  }

  renderFacts() {
    if (!this.facts || !this.factsBox) return;
    const { values, refused } = this.facts;
    if (refused) {
      replace(this.factsBox, h("p", { class: "muted" }, `Not shown: ${refused.message}`));
    } else if (!Object.keys(values).length) {
      replace(this.factsBox, h("p", { class: "muted" }, "No Wasm module runs in this pod now (or it is not running)."));
    } else {
      replace(this.factsBox, h("dl", { class: "facts", "data-wasm": this.key },
        WASM_FACTS.map(([metric, label, format]) => [
          h("dt", {}, label),
          h("dd", { "data-metric": metric }, metric in values ? format(values[metric])
            : metric === "wasm_compile_seconds" ? "none: loaded from the compile cache" : "")])));
    }
  }

  // Streams the container's log (its last lines, then what it writes).
  async follow(container) {
    this.logs?.abort();
    const abort = (this.logs = new AbortController());
    replace(this.logBox);
    this.logState.textContent = "connecting";
    const url = `/api/v1/namespaces/${encodeURIComponent(this.ns)}/pods/${encodeURIComponent(this.name)}/log?container=${encodeURIComponent(container)}&follow=true&tailLines=500`;
    try {
      const r = await fetch(url, { signal: abort.signal });
      if (!r.ok) throw await failure(r);
      this.logState.textContent = "following";
      const reader = r.body.getReader();
      const decoder = new TextDecoder();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        const atBottom = this.logBox.scrollTop + this.logBox.clientHeight >= this.logBox.scrollHeight - 4;
        this.logBox.append(decoder.decode(value, { stream: true }));
        if (this.logBox.childNodes.length > LOG_LINES) this.logBox.normalize();
        const text = this.logBox.textContent;
        const lines = text.split("\n");
        if (lines.length > LOG_LINES) this.logBox.textContent = lines.slice(-LOG_LINES).join("\n");
        if (atBottom) this.logBox.scrollTop = this.logBox.scrollHeight;
      }
      // A stream that ends while the container still runs (or has not
      // started yet) is followed again; a stopped container's is done.
      const st = (this.pod()?.status?.containerStatuses || []).find((c) => c.name === container);
      if (st?.state?.terminated || !this.pod()) {
        this.logState.textContent = "the log ended (the container stopped)";
        return;
      }
      this.logState.textContent = "waiting for the container";
      setTimeout(() => { if (this.logs === abort) this.follow(container); }, 1000);
    } catch (e) {
      if (abort.signal.aborted) return;
      this.logState.textContent = `no log: ${e.message}`;
      // The container may not have started yet: try again.
      setTimeout(() => { if (this.logs === abort) this.follow(container); }, 2000);
    }
  }
}

// ---------------------------------------------------------------- routing

function route() {
  const parts = location.hash.replace(/^#\/?/, "").split("/").filter(Boolean).map(decodeURIComponent);
  if (parts[0] === "pods" && parts.length === 3) return new PodView(parts[1], parts[2]);
  const name = views[parts[0]] ? parts[0] : "overview";
  return { name, kinds: views[name].kinds, render: views[name].render };
}

const root = document.getElementById("view");

function show() {
  state.view?.unmount?.();
  state.view = route();
  for (const a of document.querySelectorAll("#nav a")) {
    a.classList.toggle("current", a.dataset.view === (state.view.name || "pods"));
  }
  replace(root);
  state.view.mount?.(root);
  render();
}

let pending = false;

// Something changed: draw again at the next frame (changes coalesce).
function changed() {
  if (pending) return;
  pending = true;
  requestAnimationFrame(() => {
    pending = false;
    render();
  });
}

function render() {
  if (!state.view) return;
  for (const kind of state.view.kinds) live(kind);
  state.view.render(root);
  record.renders++;
  renderNamespaces();
  renderLive();
}

function renderLive() {
  const used = state.view.kinds.map((k) => live(k));
  const badge = document.getElementById("live");
  const failed = used.filter((l) => l.error && l.error.status !== 403 && l.error.status !== 404);
  if (failed.length) {
    badge.textContent = "reconnecting";
    badge.className = "live bad";
  } else if (used.every((l) => l.watching || l.error)) {
    badge.textContent = "live";
    badge.className = "live ok";
  } else {
    badge.textContent = "connecting";
    badge.className = "live";
  }
}

const picker = document.getElementById("namespace");
const known = document.getElementById("namespaces");
picker.value = state.namespace;

// The namespaces the reader may list, offered as choices; typing one is
// always possible.
function renderNamespaces() {
  const names = [...live("namespaces").items.keys()].sort();
  const have = [...known.options].map((o) => o.value);
  if (have.join() === names.join()) return;
  replace(known, names.map((n) => h("option", { value: n })));
}

picker.addEventListener("change", () => {
  const chosen = picker.value.trim();
  if (chosen === state.namespace) return;
  state.namespace = chosen;
  localStorage.setItem("wasmkube.namespace", state.namespace);
  // Lists of the namespace left are no longer needed.
  for (const [path, l] of lives) {
    if (path.includes("/namespaces/")) {
      l.stop();
      lives.delete(path);
    }
  }
  usage.pods.clear();
  sampleUsage();
  show();
});

window.addEventListener("hashchange", show);
// Ages move on even when nothing changes.
setInterval(changed, 5000);
setInterval(sampleUsage, SAMPLE_MS);
sampleUsage();
show();
