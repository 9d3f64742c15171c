#!/usr/bin/env node
// Drives the real, pinned Mixpanel browser SDK (mixpanel-browser, see
// conformance/package.json) in real headless Chromium via playwright-core, so
// tests can check what the fake accepts from a browser (CORS, sendBeacon, ...).
// playwright-core never downloads a browser; this uses /usr/bin/chromium
// (override with the CHROMIUM env var).
//
// stdin: ONE JSON document, one of
//   {"mode": "sdk", "fake": "http://127.0.0.1:PORT", "token": "TOK",
//    "config": {...},        // mixpanel.init config; api_host defaults to
//                            // `fake`, ignore_dnt to true
//    "steps": "<JS>",        // body of async function(mixpanel, done, log),
//                            // run in the page right after mixpanel.init;
//                            // calls done(value) with a JSON-able value.
//                            // log(...) is console.log (lands in "console").
//    "timeout_ms": 20000,    // optional, wait for done() (default 20000)
//    "screenshot": "/x.png", // optional, taken at the end (also on timeout)
//    "hide_page": false}     // optional: after done(), dispatch pagehide
//                            // (persisted false) + visibilitychange with
//                            // visibilityState "hidden" so the SDK flushes its
//                            // batch queue with sendBeacon; then wait 500 ms.
//   The page is served by a throwaway Node http server on 127.0.0.1:<random>
//   (a different origin from the fake): "/" is the page, "/mixpanel.js" is
//   node_modules/mixpanel-browser/dist/mixpanel.umd.js (self-contained, sets
//   window.mixpanel, recorder bundled).
//
//   {"mode": "page", "url": "http://...", "steps": "<JS>",
//    "screenshot": "/x.png", "timeout_ms": 20000}
//   Navigates to url, then runs steps as the body of an
//   async function(page) IN NODE (page = the playwright Page); its return
//   value (JSON-able) is the result.
//
// stdout: ONE JSON line
//   {"result": <done value / return value, or null>,
//    "console": [{"type": "log", "text": "...", "url": "<source, e.g. the
//                 resource that 404ed, or \"\">"}, ...],
//    "page_errors": ["..."],            // uncaught page errors
//    "failed_requests": [{"url": "...", "error": "..."}],
//    "timed_out": false,
//    "steps_error": null}               // string when steps threw/rejected
//
// exit: 0 normally (also on timeout, with timed_out true, and when the steps
// threw, with steps_error set); 1 on a driver error (message on stderr).
// The browser and the page server are always closed.
"use strict";

const fs = require("fs");
const http = require("http");
const path = require("path");

const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const SDK_FILE = path.join(__dirname, "node_modules", "mixpanel-browser", "dist", "mixpanel.umd.js");
const CHROMIUM_ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];
const AsyncFunction = Object.getPrototypeOf(async function () {}).constructor;

// playwright error messages carry ANSI colour codes in their call logs.
function plain(text) {
  return String(text).replace(/\u001b\[[0-9;]*m/g, "");
}

function errText(err) {
  return plain(err && err.stack ? err.stack : err);
}

let browser = null;
let server = null;

function fail(message) {
  process.stderr.write("browser.js: " + plain(message) + "\n");
  return cleanup().then(() => process.exit(1));
}

async function cleanup() {
  const b = browser;
  browser = null;
  if (b) {
    try {
      await b.close();
    } catch (e) {
      // already gone
    }
  }
  const s = server;
  server = null;
  if (s) {
    s.closeAllConnections && s.closeAllConnections();
    await new Promise((resolve) => s.close(() => resolve()));
  }
}

function readStdin() {
  return new Promise((resolve, reject) => {
    const chunks = [];
    process.stdin.on("data", (c) => chunks.push(c));
    process.stdin.on("end", () => resolve(Buffer.concat(chunks).toString("utf8")));
    process.stdin.on("error", reject);
  });
}

// JSON that is safe inside an inline <script>.
function scriptJson(value) {
  return JSON.stringify(value)
    .replace(/</g, "\\u003c")
    .replace(/\u2028/g, "\\u2028")
    .replace(/\u2029/g, "\\u2029");
}

function pageHtml(input) {
  const config = Object.assign({}, input.config || {});
  if (!("api_host" in config)) config.api_host = input.fake;
  if (!("ignore_dnt" in config)) config.ignore_dnt = true;
  const boot = { token: input.token, config: config, steps: input.steps };
  return `<!doctype html>
<html><head><meta charset="utf-8"><title>mixpanel-browser conformance</title>
<link rel="icon" href="data:,">
<script src="/mixpanel.js"></script>
</head><body><h1>mixpanel-browser conformance</h1>
<script>
(function () {
  var boot = ${scriptJson(boot)};
  var finished = false;
  function done(value) {
    if (finished) return;
    finished = true;
    window.__mpDone(value === undefined ? null : value);
  }
  function log() { console.log.apply(console, arguments); }
  (async function () {
    try {
      mixpanel.init(boot.token, boot.config);
      var AsyncFunction = Object.getPrototypeOf(async function () {}).constructor;
      var fn = new AsyncFunction("mixpanel", "done", "log", boot.steps);
      await fn(mixpanel, done, log);
    } catch (e) {
      if (!finished) {
        finished = true;
        window.__mpStepsError(String(e && e.stack ? e.stack : e));
      }
    }
  })();
})();
</script>
</body></html>
`;
}

function startServer(html) {
  const sdk = fs.readFileSync(SDK_FILE);
  return new Promise((resolve, reject) => {
    const s = http.createServer((req, res) => {
      const url = req.url.split("?")[0];
      if (url === "/") {
        res.writeHead(200, { "Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-store" });
        res.end(html);
      } else if (url === "/mixpanel.js") {
        res.writeHead(200, { "Content-Type": "application/javascript; charset=utf-8", "Cache-Control": "no-store" });
        res.end(sdk);
      } else {
        res.writeHead(404, { "Content-Type": "text/plain" });
        res.end("not found");
      }
    });
    s.on("error", reject);
    s.listen(0, "127.0.0.1", () => resolve(s));
  });
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

async function main() {
  let input;
  try {
    input = JSON.parse(await readStdin());
  } catch (e) {
    return fail("stdin is not one JSON document: " + e.message);
  }
  if (input === null || typeof input !== "object" || Array.isArray(input)) {
    return fail("stdin must be a JSON object");
  }
  const mode = input.mode;
  if (mode !== "sdk" && mode !== "page") return fail('"mode" must be "sdk" or "page"');
  if (typeof input.steps !== "string") return fail('"steps" must be a string of JavaScript');
  if (mode === "sdk") {
    if (typeof input.fake !== "string" || !input.fake) return fail('"fake" must be the fake\'s base URL');
    if (typeof input.token !== "string") return fail('"token" must be a string');
    if (input.config !== undefined && (input.config === null || typeof input.config !== "object" || Array.isArray(input.config))) {
      return fail('"config" must be an object');
    }
  } else if (typeof input.url !== "string" || !input.url) {
    return fail('"url" must be a string');
  }
  const timeoutMs = input.timeout_ms === undefined ? 20000 : Number(input.timeout_ms);
  if (!(timeoutMs > 0)) return fail('"timeout_ms" must be a positive number');
  let nodeSteps = null;
  if (mode === "page") {
    try {
      nodeSteps = new AsyncFunction("page", input.steps);
    } catch (e) {
      return fail("steps do not compile: " + e.message);
    }
  }

  // Last resort: never hang (launch/navigation stuck) past the budget.
  const hardTimer = setTimeout(() => {
    fail("driver exceeded timeout_ms + 60 s; giving up");
  }, timeoutMs + 60000);
  hardTimer.unref();

  let chromium;
  try {
    chromium = require(path.join(__dirname, "node_modules", "playwright-core")).chromium;
  } catch (e) {
    return fail("playwright-core not installed (npm ci --prefix conformance): " + e.message);
  }

  const out = { result: null, console: [], page_errors: [], failed_requests: [], timed_out: false, steps_error: null };

  let pageUrl = input.url;
  if (mode === "sdk") {
    server = await startServer(pageHtml(input));
    pageUrl = "http://127.0.0.1:" + server.address().port + "/";
  }

  // launch() uses a fresh temporary profile (user data dir) and removes it on close.
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: CHROMIUM_ARGS,
    timeout: 30000,
    // Our own handlers below close the browser and exit 1.
    handleSIGINT: false,
    handleSIGTERM: false,
    handleSIGHUP: false,
  });
  const context = await browser.newContext();
  const page = await context.newPage();
  page.on("console", (msg) => {
    const loc = msg.location();
    out.console.push({ type: msg.type(), text: msg.text(), url: (loc && loc.url) || "" });
  });
  page.on("pageerror", (err) => out.page_errors.push(errText(err)));
  page.on("requestfailed", (req) => {
    const f = req.failure();
    out.failed_requests.push({ url: req.url(), error: f ? f.errorText : "unknown" });
  });

  let settle;
  const finished = new Promise((resolve) => (settle = resolve));
  let timer = null;
  const timedOut = new Promise((resolve) => {
    timer = setTimeout(() => resolve("timeout"), timeoutMs);
  });

  if (mode === "sdk") {
    await page.exposeFunction("__mpDone", (value) => settle({ value: value }));
    await page.exposeFunction("__mpStepsError", (text) => settle({ error: text }));
    await page.goto(pageUrl, { waitUntil: "load", timeout: timeoutMs });
  } else {
    await page.goto(pageUrl, { waitUntil: "load", timeout: timeoutMs });
    nodeSteps(page).then(
      (value) => settle({ value: value === undefined ? null : value }),
      (err) => settle({ error: errText(err) })
    );
  }

  const outcome = await Promise.race([finished, timedOut]);
  clearTimeout(timer);
  if (outcome === "timeout") {
    out.timed_out = true;
  } else if ("error" in outcome) {
    out.steps_error = outcome.error;
  } else {
    out.result = outcome.value;
  }

  if (mode === "sdk" && input.hide_page && outcome !== "timeout") {
    await page.evaluate(() => {
      Object.defineProperty(document, "visibilityState", { configurable: true, get: () => "hidden" });
      Object.defineProperty(document, "hidden", { configurable: true, get: () => true });
      window.dispatchEvent(new PageTransitionEvent("pagehide", { persisted: false }));
      document.dispatchEvent(new Event("visibilitychange", { bubbles: true }));
    });
    await sleep(500);
  }

  if (input.screenshot) {
    await page.screenshot({ path: input.screenshot, fullPage: true, timeout: 10000 });
  }

  // JSON round trip so a non-JSON-able result fails here, not half-printed.
  const line = JSON.stringify(out);
  await cleanup();
  process.stdout.write(line + "\n");
  process.exit(0);
}

for (const sig of ["SIGINT", "SIGTERM", "SIGHUP"]) {
  process.on(sig, () => fail("killed by " + sig));
}

main().catch((e) => fail(errText(e)));
