// What the bench's Node gRPC clients share: connections opened one per client, and
// the driver's commands read line by line from stdin.
'use strict';

const grpc = require('@grpc/grpc-js');
const readline = require('readline');

// `count` clients, each with its own connection (no subchannel sharing), all ready.
async function connectClients(target, count) {
  const clients = [];
  for (let i = 0; i < count; i++) {
    clients.push(
      new grpc.Client(target, grpc.credentials.createInsecure(), {
        'grpc.use_local_subchannel_pool': 1,
      }),
    );
  }
  await Promise.all(
    clients.map(
      (c) =>
        new Promise((resolve, reject) =>
          c.waitForReady(Date.now() + 30000, (err) => (err ? reject(err) : resolve())),
        ),
    ),
  );
  return clients;
}

// nextLine(): the next stdin line (undefined at EOF); lines that arrive before they
// are asked for are kept.
function lineReader() {
  const lines = readline.createInterface({ input: process.stdin });
  const queued = [];
  let waiting = null;
  let ended = false;
  lines.on('line', (line) => (waiting ? (waiting(line), (waiting = null)) : queued.push(line)));
  lines.on('close', () => {
    ended = true;
    if (waiting) waiting(undefined);
  });
  return () =>
    queued.length || ended
      ? Promise.resolve(queued.shift())
      : new Promise((resolve) => (waiting = resolve));
}

module.exports = { connectClients, lineReader };
