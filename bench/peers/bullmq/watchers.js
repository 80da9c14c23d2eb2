// BullMQ's fan-out, timed like jobwire's (bench/watchers.py): N QueueEvents listeners in
// this one process, each on its own Redis connection (XREAD BLOCK on the queue's event
// stream), record when each progress event arrives.
//
// Usage: node watchers.js REDIS_PORT N OUT.json [READY_LIMIT_S]
// Prints "READY k" once k listeners are connected (all, or after READY_LIMIT_S); on a
// line on stdin (or EOF) writes {arrivals: {message: [wall-clock s, ...]}, errors} to
// OUT.json and exits.
'use strict';

const fs = require('node:fs');
const readline = require('node:readline');
const { performance } = require('node:perf_hooks');
const { QueueEvents } = require('bullmq');

const QUEUE = 'secretary';

function now() {
  return (performance.timeOrigin + performance.now()) / 1000;
}

async function main() {
  const [redisPort, n, out, limit = '290'] = process.argv.slice(2);
  const arrivals = {};
  const errors = [];
  const listeners = [];
  for (let i = 0; i < Number(n); i++) {
    const events = new QueueEvents(QUEUE, {
      connection: { host: '127.0.0.1', port: Number(redisPort) },
    });
    events.on('progress', ({ data }) => {
      const t = now();
      const message = data && typeof data === 'object' ? data.message : String(data);
      (arrivals[message] ??= []).push(t);
    });
    events.on('error', (err) => errors.push(String(err && err.code ? err.code : err)));
    listeners.push(events);
  }
  let ready = 0;
  const all = Promise.all(listeners.map((e) => e.waitUntilReady().then(() => ready++)));
  await Promise.race([all, new Promise((r) => setTimeout(r, Number(limit) * 1000))]);
  process.stdout.write(`READY ${ready}\n`);
  const rl = readline.createInterface({ input: process.stdin });
  await new Promise((resolve) => {
    rl.once('line', resolve);
    rl.once('close', resolve);
  });
  fs.writeFileSync(out, JSON.stringify({ arrivals, errors }));
  await Promise.allSettled(listeners.map((e) => e.close()));
  process.exit(0);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
