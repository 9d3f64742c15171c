#!/usr/bin/env node
// Drives the pinned Node SDK's remote feature flags (which speak HTTPS on
// port 443 only) against a server, normally mixpanel_fake with --tls.
//
// stdin: ONE JSON document
//   {"host": "localhost", "token": "TOK", "flag": "key", "context": {...}}
// The process must trust the fake's CA: NODE_EXTRA_CA_CERTS=<mp.ca_file>.
// stdout: ONE JSON line
//   {"variant": {...getVariant's answer...}, "all": {...getAllVariants...},
//    "enabled": bool}
// exit: 0, or 1 with the error on stderr.
"use strict";

const path = require("path");
const fs = require("fs");

for (const name of ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"]) {
  delete process.env[name];
}
const Mixpanel = require(path.join(__dirname, "node_modules", "mixpanel"));

async function main() {
  const doc = JSON.parse(fs.readFileSync(0, "utf8"));
  const quiet = { trace() {}, debug() {}, info() {}, warn() {}, error() {} };
  const mixpanel = Mixpanel.init(doc.token, {
    host: doc.host, port: 443, protocol: "https", logger: quiet,
    remote_flags_config: { api_host: doc.host, request_timeout_in_seconds: 5 },
  });
  const fallback = { variant_key: "fallback", variant_value: null };
  const variant = await mixpanel.remote_flags.getVariant(doc.flag, fallback, doc.context);
  const all = await mixpanel.remote_flags.getAllVariants(doc.context);
  const enabled = await mixpanel.remote_flags.isEnabled(doc.flag, doc.context);
  // Exposure events go out through track(); give them a moment to land.
  await new Promise((resolve) => setTimeout(resolve, 300));
  process.stdout.write(JSON.stringify({ variant, all, enabled }) + "\n");
}

main().catch((err) => {
  process.stderr.write("node_flags.js: " + (err && err.stack || err) + "\n");
  process.exit(1);
});
