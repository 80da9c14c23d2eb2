// The Node (@grpc/grpc-js) client of bench/stream_admission.py (`--client node`): opens
// STREAMS server streams over connections of PER_CONN streams, in one burst after a
// "GO" line, and prints what became of them in the shape of the Python client.
//
// Usage: node bench/stream_admission_client.js TARGET STREAMS PER_CONN LIMIT_S
// (NODE_PATH must reach @grpc/grpc-js, e.g. examples/node/node_modules).
'use strict';

const grpc = require('@grpc/grpc-js');
const { connectClients, lineReader } = require('./node_common');

const [target, streams, perConn, limitS] = process.argv.slice(2);
const n = Number(streams);
const per = Number(perConn);
const limit = Number(limitS) * 1000;
const METHOD = '/bench.Admission/Watch';
const raw = (x) => x;

const nextLine = lineReader();

async function main() {
  const clients = await connectClients(target, Math.ceil(n / per));
  console.log('CONNECTED');
  await nextLine(); // GO
  const t0 = Date.now();
  const first = [];
  const ended = {};
  const endedAt = {};
  const calls = [];
  let settle;
  const settled = new Promise((resolve) => (settle = resolve));
  const check = () => {
    const done = Object.values(ended).reduce((a, b) => a + b, 0);
    if (first.length + done >= n) settle();
  };
  for (let i = 0; i < n; i++) {
    const call = clients[Math.floor(i / per)].makeServerStreamRequest(
      METHOD,
      raw,
      raw,
      Buffer.alloc(0),
    );
    call.on('data', (msg) => {
      if (msg.toString() === 'snapshot') {
        first.push((Date.now() - t0) / 1000);
        check();
      }
    });
    call.on('error', (err) => {
      if (err.code === grpc.status.CANCELLED && err.details === 'Cancelled on client') return;
      const key = `${grpc.status[err.code]}: ${err.details}`;
      ended[key] = (ended[key] || 0) + 1;
      (endedAt[key] = endedAt[key] || []).push((Date.now() - t0) / 1000);
      check();
    });
    calls.push(call);
  }
  await Promise.race([settled, new Promise((resolve) => setTimeout(resolve, limit))]);
  const elapsed = (Date.now() - t0) / 1000;
  const round1 = (x) => Math.round(x * 10) / 10;
  const atS = {};
  for (const [k, v] of Object.entries(endedAt)) atS[k] = [round1(Math.min(...v)), round1(Math.max(...v))];
  console.log(
    JSON.stringify({
      streams: n,
      first_message: first.length,
      last_first_message_s: first.length ? Math.round(Math.max(...first) * 100) / 100 : null,
      ended,
      ended_at_s: atS,
      elapsed_s: Math.round(elapsed * 100) / 100,
    }),
  );
  await nextLine(); // STOP
  for (const call of calls) call.cancel();
  console.log(JSON.stringify({ events: [] }));
  for (const c of clients) c.close();
  process.exit(0);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
