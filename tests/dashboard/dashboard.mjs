// Drives the wasmkube dashboard in Chromium (Debian's, through Playwright)
// against a running cluster, reached as a user reaches it: through
// `kubectl proxy` with the kubeconfig's credentials.
//
//   node dashboard.mjs check --kubeconfig K --manifest POD.yaml --pod NAME
//     The end-to-end check: the page loads with no error, shows the pod
//     created through kubectl after the page opened, streams its log,
//     draws its CPU chart and shows its Wasm module's facts. Prints one
//     JSON line of what it saw.
//   node dashboard.mjs tenant --kubeconfig K --namespace NS --pod NAME
//     A reader with rights in one namespace: that namespace's pod shows and
//     no other's; all namespaces, refused, show the refusal and no pod.
//   node dashboard.mjs bench --kubeconfig K --image REF [--pods N] [--loads N]
//     The benchmark: the page's first paint and first data (cold, then
//     reloaded), and how long after a create a new pod shows on the page,
//     next to how long `kubectl get pods --watch` takes to print it, in
//     the same run. Prints the figures and one JSON line.
//
// Every wait is for the thing itself, bounded so that a failure ends the
// run with the reason rather than hanging it.

import { spawn } from "node:child_process";
import { readFileSync, existsSync } from "node:fs";
import { chromium } from "playwright-core";

const [mode, ...rest] = process.argv.slice(2);
const opts = {};
for (let i = 0; i < rest.length; i += 2) opts[rest[i].replace(/^--/, "")] = rest[i + 1];
if (!["check", "bench", "tenant"].includes(mode) || !opts.kubeconfig) {
  console.error("usage: dashboard.mjs check|bench|tenant --kubeconfig FILE ...");
  process.exit(2);
}
const env = { ...process.env, KUBECONFIG: opts.kubeconfig };
const browserPath = process.env.CHROMIUM || ["/usr/bin/chromium", "/usr/bin/chromium-browser"].find(existsSync);
const WAIT = 60_000;

function fail(message) {
  console.error(`dashboard ${mode}: ${message}`);
  process.exitCode = 1;
  throw new Error(message);
}

// `kubectl proxy` on a free loopback port; resolves to its base URL.
function proxy() {
  return new Promise((resolve, reject) => {
    const child = spawn("kubectl", ["proxy", "--port=0", "--address=127.0.0.1"], { env });
    let out = "";
    child.stdout.on("data", (d) => {
      out += d;
      const m = /Starting to serve on 127\.0\.0\.1:(\d+)/.exec(out);
      if (m) resolve({ child, base: `http://127.0.0.1:${m[1]}` });
    });
    child.stderr.on("data", (d) => { out += d; });
    child.on("exit", (code) => reject(new Error(`kubectl proxy exited (${code}): ${out}`)));
  });
}

function kubectl(args, input) {
  return new Promise((resolve, reject) => {
    const child = spawn("kubectl", args, { env });
    let out = "";
    child.stdout.on("data", (d) => { out += d; });
    child.stderr.on("data", (d) => { out += d; });
    child.on("exit", (code) => (code === 0 ? resolve(out) : reject(new Error(`kubectl ${args.join(" ")}: ${out}`))));
    child.stdin.end(input || "");
  });
}

async function openBrowser() {
  if (!browserPath) fail("no Chromium (scripts/test.sh installs Debian's chromium)");
  return chromium.launch({ executablePath: browserPath, args: ["--no-sandbox", "--disable-gpu"] });
}

// A page that fails the run on any script error or refused resource.
async function watchedPage(browser) {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  const problems = [];
  page.on("pageerror", (e) => problems.push(`script error: ${e.message}`));
  // Chromium logs every answer of 4xx as an error; those the page expects
  // (a log asked for before its container starts, the Wasm figures of a
  // pod that has none yet) are states it shows, not faults. A refused
  // script or style (the Content-Security-Policy) or any other error is.
  page.on("console", (m) => {
    if (m.type() === "error" && !m.text().startsWith("Failed to load resource: the server responded with a status of 4")) {
      problems.push(`console: ${m.text()}`);
    }
  });
  return { page, problems };
}

// Waits for `what`; a wait that fails says which one, with what the page
// showed then, so a failure can be read from the test's output alone.
async function step(page, what, wait) {
  try {
    return await wait;
  } catch (e) {
    const shown = await page.evaluate(() => ({
      url: location.href,
      live: document.getElementById("live")?.textContent,
      view: document.getElementById("view")?.innerText.slice(0, 2000),
    })).catch(() => ({}));
    fail(`${what}: ${e.message.split("\n")[0]}\nthe page then: ${JSON.stringify(shown, null, 1)}`);
  }
}

async function paintTimes(page) {
  return page.evaluate(() => ({
    firstContentfulPaint: performance.getEntriesByName("first-contentful-paint")[0]?.startTime ?? null,
    firstData: window.wasmkube?.firstData ?? null,
  }));
}

async function check() {
  const { child, base } = await proxy();
  const browser = await openBrowser();
  try {
    const { page, problems } = await watchedPage(browser);
    const key = `default/${opts.pod}`;
    await page.goto(`${base}/dashboard/?interval=1000#/pods`);
    await step(page, "the watches connected", page.waitForSelector("#live.ok", { timeout: WAIT }));
    await step(page, "the pods list drawn", page.waitForFunction(() => window.wasmkube.firstData != null, null, { timeout: WAIT }));
    const paint = await paintTimes(page);

    // A pod created through kubectl while the page is open shows up.
    const created = Date.now();
    await kubectl(["apply", "-f", "-"], readFileSync(opts.manifest, "utf8"));
    await step(page, "the new pod shown", page.waitForSelector(`tr[data-key="${key}"]`, { timeout: WAIT }));
    const shownAfterMs = (await page.evaluate((k) => window.wasmkube.shown[k], key)) - created;

    // Its page: the log streams (lines keep coming), the CPU chart draws,
    // the Wasm facts show.
    await page.click(`tr[data-key="${key}"] a`);
    await step(page, "the pod's page opened", page.waitForFunction((k) => decodeURIComponent(location.hash) === `#/pods/${k}`, key, { timeout: WAIT }));
    const logs = `pre[data-logs="${key}"]`;
    await step(page, "the log's first lines", page.waitForFunction((sel) => (document.querySelector(sel)?.textContent || "").trim().length > 0, logs, { timeout: WAIT }));
    const lines = await page.$eval(logs, (el) => el.textContent.split("\n").filter(Boolean).length);
    await step(page, "more log lines streamed", page.waitForFunction(([sel, n]) => document.querySelector(sel).textContent.split("\n").filter(Boolean).length > n,
      [logs, lines], { timeout: WAIT }));
    await step(page, "the CPU chart drawn", page.waitForFunction(() => {
      const c = document.querySelector('[data-chart="cpu"]');
      return c && Number(c.dataset.points) >= 2 && c.querySelector("polyline")?.getAttribute("points");
    }, null, { timeout: WAIT }));
    const chartPoints = await page.$eval('[data-chart="cpu"] polyline', (el) => el.getAttribute("points").split(" ").length);
    await step(page, "the Wasm module's facts shown", page.waitForFunction(() => (document.querySelector('[data-metric="wasm_module_bytes"]')?.textContent || "").length > 0,
      null, { timeout: WAIT }));
    const moduleSize = await page.$eval('[data-metric="wasm_module_bytes"]', (el) => el.textContent);
    // Opened afresh, the pod's page starts with the usage its node kept
    // from before: the CPU chart spans more time than the page has been
    // open.
    const fresh = await browser.newPage();
    const opened = Date.now();
    await fresh.goto(`${base}/dashboard/#/pods/${key}`);
    await step(fresh, "the CPU chart drawn from the node's history", fresh.waitForFunction((since) => {
      const c = document.querySelector('[data-chart="cpu"]');
      return c && Number(c.dataset.spanMs) > Date.now() - since + 1000;
    }, opened, { timeout: WAIT }));
    const historySpanMs = await fresh.$eval('[data-chart="cpu"]', (el) => Number(el.dataset.spanMs));
    await fresh.close();
    const logText = await page.$eval(logs, (el) => el.textContent);
    if (opts.screenshot) await page.screenshot({ path: opts.screenshot, fullPage: true });
    // Every other view draws without an error.
    for (const view of ["", "nodes", "workloads", "services", "events"]) {
      await page.goto(`${base}/dashboard/#/${view}`);
      await page.waitForSelector("#live.ok", { timeout: WAIT });
    }
    const nodesText = await (async () => {
      await page.goto(`${base}/dashboard/#/nodes`);
      await page.waitForSelector("#view table", { timeout: WAIT });
      return page.$eval("#view", (el) => el.textContent);
    })();
    if (problems.length) fail(problems.join("\n"));
    console.log(JSON.stringify({ ...paint, shownAfterMs, chartPoints, historySpanMs, moduleSize, logText: logText.slice(-400), nodesText: nodesText.slice(0, 400) }));
  } finally {
    await browser.close();
    child.kill();
  }
}

// A tenant's view: with a namespace of theirs chosen, their pod shows and
// no other namespace's; with none chosen, the page says the cluster-wide
// list is refused and shows no pod.
async function tenant() {
  const { child, base } = await proxy();
  const browser = await openBrowser();
  try {
    const { page, problems } = await watchedPage(browser);
    await page.goto(`${base}/dashboard/?namespace=${encodeURIComponent(opts.namespace)}#/pods`);
    await page.waitForSelector(`tr[data-key="${opts.namespace}/${opts.pod}"]`, { timeout: WAIT });
    const rows = await page.$$eval("tr[data-key]", (trs) => trs.map((tr) => tr.dataset.key));
    if (rows.some((k) => !k.startsWith(`${opts.namespace}/`))) fail(`another namespace's pods shown: ${rows}`);
    await page.fill("#namespace", "");
    await page.dispatchEvent("#namespace", "change");
    await page.waitForSelector('p[data-problem="403"]', { timeout: WAIT });
    const refusal = await page.$eval('p[data-problem="403"]', (el) => el.textContent);
    const after = await page.$$eval("tr[data-key]", (trs) => trs.length);
    if (after) fail(`pods shown for all namespaces to a tenant: ${after}`);
    if (problems.length) fail(problems.join("\n"));
    console.log(JSON.stringify({ rows, refusal }));
  } finally {
    await browser.close();
    child.kill();
  }
}

function percentile(xs, p) {
  const sorted = [...xs].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}

async function bench() {
  const pods = Number(opts.pods || 20);
  const loads = Number(opts.loads || 5);
  const { child, base } = await proxy();
  const browser = await openBrowser();
  // The peer: kubectl's own watch, printing each pod's name as it comes.
  const watcher = spawn("kubectl", ["get", "pods", "--watch", "-o", "name", "--namespace", "default"], { env });
  const printed = {};
  let watchOut = "";
  watcher.stdout.on("data", (d) => {
    const now = Date.now();
    watchOut += d;
    const lines = watchOut.split("\n");
    watchOut = lines.pop();
    for (const l of lines) printed[l.trim().replace(/^pod\//, "")] ??= now;
  });
  try {
    // First paint and first data: the first load (nothing cached), then
    // reloads.
    const paints = [];
    for (let i = 0; i < loads; i++) {
      const { page, problems } = await watchedPage(browser);
      await page.goto(`${base}/dashboard/#/pods`);
      await page.waitForFunction(() => window.wasmkube.firstData != null, null, { timeout: WAIT });
      paints.push(await paintTimes(page));
      if (problems.length) fail(problems.join("\n"));
      await page.close();
    }
    const { page } = await watchedPage(browser);
    await page.goto(`${base}/dashboard/#/pods`);
    await page.waitForSelector("#live.ok", { timeout: WAIT });
    const dashboard = [];
    const peer = [];
    for (let i = 0; i < pods; i++) {
      const name = `dash-bench-${Date.now().toString(36)}-${i}`;
      const body = {
        apiVersion: "v1", kind: "Pod", metadata: { name, labels: { app: "dash-bench" } },
        spec: { containers: [{ name: "c", image: opts.image }], nodeName: opts.node || undefined },
      };
      const created = Date.now();
      const r = await fetch(`${base}/api/v1/namespaces/default/pods`, {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
      });
      if (!r.ok) fail(`creating ${name}: ${r.status} ${await r.text()}`);
      await page.waitForSelector(`tr[data-key="default/${name}"]`, { timeout: WAIT });
      const shown = await page.evaluate((k) => window.wasmkube.shown[k], `default/${name}`);
      const deadline = Date.now() + WAIT;
      while (printed[name] == null && Date.now() < deadline) await new Promise((res) => setTimeout(res, 5));
      if (printed[name] == null) fail(`kubectl get pods --watch never printed ${name}`);
      dashboard.push(shown - created);
      peer.push(printed[name] - created);
    }
    await kubectl(["delete", "pods", "-l", "app=dash-bench", "--wait=false"]);
    const cold = paints[0];
    const warm = paints.slice(1);
    const result = {
      firstPaintColdMs: cold.firstContentfulPaint,
      firstDataColdMs: cold.firstData,
      firstPaintWarmMsMedian: warm.length ? percentile(warm.map((p) => p.firstContentfulPaint), 50) : null,
      firstDataWarmMsMedian: warm.length ? percentile(warm.map((p) => p.firstData), 50) : null,
      liveUpdateMsP50: percentile(dashboard, 50),
      liveUpdateMsP99: percentile(dashboard, 99),
      kubectlWatchMsP50: percentile(peer, 50),
      kubectlWatchMsP99: percentile(peer, 99),
      pods,
    };
    result.liveUpdateVsKubectlWatchP50 = result.liveUpdateMsP50 / Math.max(1, result.kubectlWatchMsP50);
    const f = (x) => (x == null ? "n/a" : `${x.toFixed(1)} ms`);
    console.log(`dashboard first paint   cold ${f(result.firstPaintColdMs)}, reloaded median ${f(result.firstPaintWarmMsMedian)}`);
    console.log(`dashboard first data    cold ${f(result.firstDataColdMs)}, reloaded median ${f(result.firstDataWarmMsMedian)}`);
    console.log(`new pod shown           p50 ${f(result.liveUpdateMsP50)}, p99 ${f(result.liveUpdateMsP99)} (${pods} pods)`);
    console.log(`kubectl get -w prints   p50 ${f(result.kubectlWatchMsP50)}, p99 ${f(result.kubectlWatchMsP99)} (same pods)`);
    console.log(`dashboard / kubectl watch (p50): ${result.liveUpdateVsKubectlWatchP50.toFixed(2)}x`);
    console.log(JSON.stringify(result));
  } finally {
    watcher.kill();
    await browser.close();
    child.kill();
  }
}

try {
  await ({ check, bench, tenant })[mode]();
} catch (e) {
  if (!process.exitCode) console.error(`dashboard ${mode}: ${e.stack || e}`);
  process.exitCode = 1;
}
