// A light WatchJob watcher process for bench/watchers10k.py (`--clients node`).
//
// The Python client costs about 78 µs of CPU per message received (grpc.aio); on a
// 2-core machine its processes then take more CPU than the service, and the fan-out
// measured is theirs. This one (@grpc/grpc-js, messages kept as raw bytes) costs
// about 12 µs, so the figure is mostly the service's. It speaks the Python client's
// line protocol: CONNECTED; GO -> {"ready", "ready_s", "refused"}; WAITFOR key limit
// -> {"key", "have", "last"}; STOP -> writes {"arrivals", "errors", ...} to OUT.
//
// Usage: node bench/watchers10k_client.js TARGET JOB STREAMS PER_CONN LIMIT_S OUT [MARK]
// (NODE_PATH must reach @grpc/grpc-js, e.g. examples/node/node_modules). An event's
// key is MARK (default "fan-") and the digits after it, found in the raw message: the
// bench puts it in the progress message, and MARK must appear nowhere else in it.
'use strict';

const fs = require('fs');
const grpc = require('@grpc/grpc-js');
const { connectClients, lineReader } = require('./node_common');
const { performance } = require('perf_hooks');

const [target, job, streams, perConn, limitS, out, mark = 'fan-'] = process.argv.slice(2);
const n = Number(streams);
const per = Number(perConn);
const limit = Number(limitS) * 1000;
const METHOD = '/jobwire.v1.JobService/WatchJob';
const SNAPSHOT = 0x0a; // WatchJobResponse field 1 (snapshot), length-delimited
const EVENT = 0x12; // field 2 (event)
const raw = (x) => x;
const now = () => (performance.timeOrigin + performance.now()) / 1000; // s, like time.time()

// WatchJobRequest{id = job}: field 1, length-delimited (job ids are short ASCII).
const jobBytes = Buffer.from(job, 'utf8');
const request = Buffer.concat([Buffer.from([0x0a, jobBytes.length]), jobBytes]);

const nextLine = lineReader();

const arrivals = {};
const errors = {};
let ready = 0;
let lastReady = 0;
let refused = 0;
let changed = () => {};

function keyOf(msg) {
  const at = msg.indexOf(mark);
  if (at < 0) return null;
  let end = at + mark.length;
  while (end < msg.length && msg[end] >= 0x30 && msg[end] <= 0x39) end++;
  return msg.toString('latin1', at, end);
}

function retryAfter(err) {
  const hint = err.metadata && err.metadata.get('retry-after-ms');
  return hint && hint.length ? Number(hint[0]) : 1000;
}

function watch(client) {
  const call = client.makeServerStreamRequest(METHOD, raw, raw, request);
  call.on('data', (msg) => {
    if (msg[0] === SNAPSHOT) {
      ready++;
      lastReady = now();
    } else if (msg[0] === EVENT) {
      const key = keyOf(msg);
      if (key) (arrivals[key] = arrivals[key] || []).push(now());
    }
    changed();
  });
  call.on('error', (err) => {
    if (err.code === grpc.status.CANCELLED && err.details === 'Cancelled on client') return;
    if (err.code === grpc.status.RESOURCE_EXHAUSTED) {
      refused++;
      setTimeout(() => watch(client), retryAfter(err));
      return;
    }
    const key = grpc.status[err.code];
    errors[key] = (errors[key] || 0) + 1;
    changed();
  });
  return call;
}

// Resolves once done() holds or after limitMs.
function until(done, limitMs) {
  return new Promise((resolve) => {
    const timer = setTimeout(finish, limitMs);
    function finish() {
      clearTimeout(timer);
      changed = () => {};
      resolve();
    }
    changed = () => done() && finish();
    if (done()) finish();
  });
}

async function main() {
  const clients = await connectClients(target, Math.ceil(n / per));
  console.log('CONNECTED');
  await nextLine(); // GO
  const t0 = now();
  const calls = [];
  for (let i = 0; i < n; i++) calls.push(watch(clients[Math.floor(i / per)]));
  await until(() => ready >= n, limit);
  const readyS = ready ? Math.round((lastReady - t0) * 100) / 100 : null;
  console.log(JSON.stringify({ ready, ready_s: readyS, refused }));
  for (;;) {
    const cmd = ((await nextLine()) || 'STOP').split(' ');
    if (cmd[0] === 'STOP') break;
    if (cmd[0] === 'WAITFOR') {
      const key = cmd[1];
      await until(() => (arrivals[key] || []).length >= n, Number(cmd[2]) * 1000);
      const got = arrivals[key] || [];
      console.log(JSON.stringify({ key, have: got.length, last: Math.max(0, ...got) }));
    }
  }
  for (const call of calls) call.cancel();
  fs.writeFileSync(out, JSON.stringify({ arrivals, errors, refused, gaps: 0, duplicates: 0 }));
  for (const c of clients) c.close();
  process.exit(0);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
