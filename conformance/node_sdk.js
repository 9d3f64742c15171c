#!/usr/bin/env node
// Drives the real, pinned Mixpanel Node SDK (conformance/package.json) against
// a server (normally mixpanel_fake) so tests can check what the fake accepts.
//
// stdin: ONE JSON document
//   {"url": "http://127.0.0.1:PORT", "token": "TOK",
//    "config": {...merged into Mixpanel.init config, e.g. {"key": "k"}},
//    "calls": [["track", "ev", {"distinct_id": "u1"}], ["people.set", "u1", {"a": 1}], ...]}
//   optional: "timeout_ms" (whole run, default 20000),
//             "call_timeout_ms" (one call, default 10000).
//   Any value shaped exactly {"$date": <epoch ms>} becomes new Date(ms).
//
// stdout: ONE JSON line
//   {"results": [{"call": "track", "error": null}, ...]}
//   error is null, the SDK's error message, "throw: <message>" when the SDK
//   threw synchronously, "dropped: ..." when the SDK silently sent nothing and
//   never called back (it does that for some invalid input), or "timeout: ...".
//
// exit: 0 normally; 2 when the whole run timed out (what was gathered is
// still printed); 1 on a driver/usage error (bad input, unknown method).
"use strict";

const path = require("path");
const fs = require("fs");

// mixpanel 0.24.0 does `new HttpsProxyAgent(...)` at init when HTTPS_PROXY or
// HTTP_PROXY is set, which throws; the fake is local anyway.
for (const name of ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"]) {
  delete process.env[name];
}

const Mixpanel = require(path.join(__dirname, "node_modules", "mixpanel"));

function die(message) {
  process.stderr.write("node_sdk.js: " + message + "\n");
  process.exit(1);
}

function reviveDates(value) {
  if (Array.isArray(value)) {
    return value.map(reviveDates);
  }
  if (value !== null && typeof value === "object") {
    const keys = Object.keys(value);
    if (keys.length === 1 && keys[0] === "$date" && typeof value.$date === "number") {
      return new Date(value.$date);
    }
    const out = {};
    for (const key of keys) {
      out[key] = reviveDates(value[key]);
    }
    return out;
  }
  return value;
}

function errorText(err) {
  if (err === null || err === undefined) {
    return null;
  }
  if (Array.isArray(err)) {
    // track_batch / import_batch: an array of errors, or null
    const parts = err.filter((e) => e !== null && e !== undefined).map(errorText);
    return parts.length ? parts.join("; ") : null;
  }
  if (err instanceof Error) {
    return err.message;
  }
  return String(err);
}

// Keep stdout for the one result line: the SDK's default logger is `console`,
// whose debug/info go to stdout. A config "logger" from the caller still wins
// (it can't be given through JSON anyway).
const stderrLogger = {};
for (const level of ["trace", "debug", "info", "warn", "error"]) {
  stderrLogger[level] = (...args) => console.error("[mixpanel " + level + "]", ...args);
}

let raw;
try {
  raw = fs.readFileSync(0, "utf8");
} catch (e) {
  die("cannot read stdin: " + e.message);
}
let doc;
try {
  doc = JSON.parse(raw);
} catch (e) {
  die("stdin is not one JSON document: " + e.message);
}
if (!doc || typeof doc !== "object" || Array.isArray(doc)) {
  die("stdin JSON must be an object");
}
if (typeof doc.url !== "string") {
  die('"url" must be a string like "http://127.0.0.1:PORT"');
}
if (!Array.isArray(doc.calls)) {
  die('"calls" must be an array of [method, ...args]');
}

let target;
try {
  target = new URL(doc.url);
} catch (e) {
  die("bad url: " + e.message);
}
const baseConfig = {
  host: target.host, // "host:port"; the SDK splits it into host and port
  protocol: target.protocol.replace(/:$/, ""),
  logger: stderrLogger,
};
const basePath = target.pathname.replace(/\/+$/, "");
if (basePath) {
  baseConfig.path = basePath;
}
const config = Object.assign(baseConfig, reviveDates(doc.config || {}));

const results = [];
let finished = false;
let current = null; // the call in flight, reported if the whole run times out

function finish(code) {
  if (finished) {
    return;
  }
  finished = true;
  process.stdout.write(JSON.stringify({ results }) + "\n", () => process.exit(code));
}

const overallMs = typeof doc.timeout_ms === "number" ? doc.timeout_ms : 20000;
const callMs = typeof doc.call_timeout_ms === "number" ? doc.call_timeout_ms : 10000;
setTimeout(() => {
  process.stderr.write("node_sdk.js: overall timeout after " + overallMs + " ms\n");
  if (current) {
    results.push({ call: current, error: "timeout: run stopped after " + overallMs + " ms" });
  }
  finish(2);
}, overallMs).unref();

let client;
try {
  client = Mixpanel.init(doc.token, config);
} catch (e) {
  die("Mixpanel.init threw: " + e.message);
}

// Count requests so a call the SDK silently drops (no request, no callback)
// is reported at once instead of waiting for a timeout.
let requestsSent = 0;
const realSendRequest = client.send_request;
client.send_request = function () {
  requestsSent += 1;
  return realSendRequest.apply(this, arguments);
};

// Resolve every method before running anything: a typo is a caller bug.
const plan = doc.calls.map((call, i) => {
  if (!Array.isArray(call) || typeof call[0] !== "string") {
    die("calls[" + i + "] must be [method, ...args]");
  }
  const parts = call[0].split(".");
  let owner = client;
  for (const part of parts.slice(0, -1)) {
    owner = owner && Object.prototype.hasOwnProperty.call(owner, part) ? owner[part] : undefined;
  }
  const fn = owner ? owner[parts[parts.length - 1]] : undefined;
  if (typeof fn !== "function" || parts.some((p) => p === "" || p.startsWith("_"))) {
    die("calls[" + i + "]: unknown SDK method " + JSON.stringify(call[0]));
  }
  return { name: call[0], owner, fn, args: reviveDates(call.slice(1)) };
});

function runOne(step) {
  return new Promise((resolve) => {
    let settled = false;
    let timer = null;
    const settle = (error) => {
      if (settled) {
        return;
      }
      settled = true;
      if (timer) {
        clearTimeout(timer);
      }
      resolve({ call: step.name, error });
    };
    const callback = (err) => settle(errorText(err));
    const before = requestsSent;
    try {
      step.fn.apply(step.owner, step.args.concat([callback]));
    } catch (e) {
      settle("throw: " + (e && e.message !== undefined ? e.message : String(e)));
      return;
    }
    if (!settled && requestsSent === before) {
      settle("dropped: the SDK sent no request and did not call back");
      return;
    }
    timer = setTimeout(
      () => settle("timeout: no callback within " + callMs + " ms"),
      callMs,
    );
  });
}

(async () => {
  for (const step of plan) {
    current = step.name;
    const result = await runOne(step);
    current = null;
    if (finished) {
      return;
    }
    results.push(result);
  }
  finish(0);
})().catch((e) => {
  process.stderr.write("node_sdk.js: driver bug: " + (e && e.stack ? e.stack : e) + "\n");
  finished = true;
  process.exit(1);
});
