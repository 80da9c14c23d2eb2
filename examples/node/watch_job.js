'use strict';
// jobwire from Node.js, with nothing but @grpc/grpc-js and @grpc/proto-loader
// loading the service's own proto/ files.
//
// It creates a job, watches it (WatchJob), drops the stream on purpose after a few
// events, lets the job move on while nobody watches, then resumes the watch with
// `from_sequence` = the last sequence it saw: the service replays exactly the missed
// events, so every event is seen once, in order, until the terminal one ends the
// stream. The same resume path reconnects, with backoff and jitter, after an
// unplanned disconnect (service restart, network). The example also plays the worker
// (ReportEvent), so it needs nothing but a running service:
//
//   make examples-node && JOBWIRE_SERVICE_TARGET=127.0.0.1:50051 node examples/node/watch_job.js
//
// Settings (the CLI's names): JOBWIRE_SERVICE_TARGET (host:port), JOBWIRE_GRPC_TOKEN
// (sent as `authorization: Bearer`), JOBWIRE_SERVICE_TLS_CA (a CA file, or "system":
// TLS with the system roots; unset: plaintext). The last line printed is
// `RESULT {json}` for scripts and tests.

const fs = require('node:fs');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_DIR = process.env.JOBWIRE_PROTO_DIR || path.resolve(__dirname, '..', '..', 'proto');
const TARGET = process.env.JOBWIRE_SERVICE_TARGET || '127.0.0.1:50051';
const TOKEN = process.env.JOBWIRE_GRPC_TOKEN || '';
const TLS_CA = process.env.JOBWIRE_SERVICE_TLS_CA || '';
const DEADLINE_MS = 10_000; // every unary call
const TERMINAL = new Set(['EVENT_TYPE_COMPLETED', 'EVENT_TYPE_FAILED', 'EVENT_TYPE_CANCELLED']);
const TERMINAL_STATES = new Set(['JOB_STATE_SUCCEEDED', 'JOB_STATE_FAILED', 'JOB_STATE_CANCELLED']);
const GIVE_UP_MS = 60_000; // the whole example; a watcher of a long job would not have this
// Worth reconnecting after: the service restarting, a watcher that fell behind
// (ABORTED), too many watchers right now (RESOURCE_EXHAUSTED).
const RETRYABLE = new Set([
  grpc.status.UNAVAILABLE,
  grpc.status.ABORTED,
  grpc.status.RESOURCE_EXHAUSTED,
]);

function loadJobService() {
  const definition = protoLoader.loadSync('jobwire/v1/job_service.proto', {
    includeDirs: [PROTO_DIR],
    keepCase: true, // field names as in the .proto: job_id, from_sequence
    longs: Number, // sequences stay far below 2^53
    enums: String, // 'JOB_STATE_RUNNING', not 2
    defaults: true,
    oneofs: true, // response.item says which oneof member is set
  });
  return grpc.loadPackageDefinition(definition).jobwire.v1.JobService;
}

function credentials() {
  if (!TLS_CA) {
    if (TOKEN) {
      // grpc-js refuses call credentials on a plaintext channel; add the header instead.
      return { channel: grpc.credentials.createInsecure(), metadata: bearer() };
    }
    return { channel: grpc.credentials.createInsecure(), metadata: new grpc.Metadata() };
  }
  const ca = TLS_CA === 'system' ? null : fs.readFileSync(TLS_CA);
  let channel = grpc.credentials.createSsl(ca);
  if (TOKEN) {
    const call = grpc.credentials.createFromMetadataGenerator((_params, done) => done(null, bearer()));
    channel = grpc.credentials.combineChannelCredentials(channel, call);
  }
  return { channel, metadata: new grpc.Metadata() };
}

function bearer() {
  const metadata = new grpc.Metadata();
  metadata.set('authorization', `Bearer ${TOKEN}`);
  return metadata;
}

// A promise-returning unary call with a deadline; errors keep their gRPC code.
function unary(stub, metadata, method, request) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + DEADLINE_MS);
    stub[method](request, metadata.clone(), { deadline }, (err, response) => {
      if (err) reject(err);
      else resolve(response);
    });
  });
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// Watches one job across any number of streams. Tracks the last sequence seen and
// resumes from it; refuses (throws) a duplicate or a silent jump in sequences.
class ResumableWatch {
  constructor(stub, metadata, jobId, onLine) {
    this.stub = stub;
    this.metadata = metadata;
    this.jobId = jobId;
    this.log = onLine;
    this.lastSequence = 0;
    this.sequences = []; // every sequence accounted for, in arrival order
    this.streams = 0;
    this.resumedFrom = [];
    this.call = null;
    this.pausing = false;
    this.waiters = [];
    this.done = false;
    this.finished = new Promise((resolve, reject) => {
      this.resolveFinished = resolve;
      this.rejectFinished = reject;
    });
    this.finished.catch(() => {}); // awaited later; not an unhandled rejection meanwhile
  }

  open() {
    this.streams += 1;
    const n = this.streams;
    if (this.lastSequence > 0) {
      this.resumedFrom.push(this.lastSequence);
      this.log(`stream ${n}: resuming with from_sequence=${this.lastSequence}`);
    }
    const call = this.stub.WatchJob(
      { id: this.jobId, from_sequence: this.lastSequence },
      this.metadata.clone(),
    );
    this.call = call;
    let terminal = false;
    call.on('data', (msg) => {
      if (call !== this.call) return; // a stream already replaced
      try {
        terminal = this.onMessage(n, msg) || terminal;
      } catch (err) {
        call.cancel();
        this.fail(err);
      }
    });
    // 'status' comes exactly once per stream, with its final code ('error' comes as
    // well for a non-OK one, and 'end' too: acting on 'status' alone, after the
    // messages still being delivered, handles each stream end once).
    call.on('error', () => {});
    call.on('status', (status) => setImmediate(() => this.closed(call, n, status, terminal)));
  }

  closed(call, n, status, terminal) {
    if (call !== this.call || this.done) return;
    if (terminal || this.ended()) {
      this.done = true;
      this.resolveFinished();
    } else if (this.pausing) {
      // The stream this example dropped on purpose (CANCELLED, or whatever ended it first).
      const how = status.code === grpc.status.CANCELLED ? '' : ` (${grpc.status[status.code]})`;
      this.log(`disconnect: cancelled stream ${n} after sequence ${this.lastSequence}${how}`);
      this.onClosed();
    } else if (status.code === grpc.status.OK) {
      this.reconnect(n, 'the stream ended before the terminal event');
    } else if (RETRYABLE.has(status.code)) {
      this.reconnect(n, `${grpc.status[status.code]}: ${status.details}`);
    } else {
      const err = new Error(status.details);
      err.code = status.code;
      this.fail(err);
    }
  }

  // The job is over and every event up to its end has been seen (e.g. a resume after
  // the terminal event: the service sends the snapshot only).
  ended() {
    const s = this.snapshot;
    return s !== undefined && TERMINAL_STATES.has(s.state) && this.lastSequence >= s.sequence;
  }

  fail(err) {
    this.done = true;
    this.rejectFinished(err);
  }

  onMessage(n, msg) {
    if (msg.item === 'snapshot') {
      const job = msg.snapshot;
      this.log(`stream ${n}: snapshot sequence=${job.sequence} state=${job.state}`);
      // Kept: a terminal job with nothing left to replay ends the watch (ended()).
      this.snapshotSequence = job.sequence;
      this.snapshot = job;
      this.notify();
      return false;
    }
    if (msg.item === 'gap') {
      // Older events are no longer retained: what follows starts later. Said, not hidden.
      const gap = msg.gap;
      this.log(`stream ${n}: gap, events after ${gap.requested_sequence} start at ${gap.oldest_available_sequence}`);
      this.lastSequence = gap.oldest_available_sequence - 1;
      return false;
    }
    const event = msg.event;
    const first = event.coalesced_from_sequence || event.sequence;
    if (event.sequence <= this.lastSequence) {
      throw new Error(`duplicate event: sequence ${event.sequence} after ${this.lastSequence}`);
    }
    if (first !== this.lastSequence + 1) {
      throw new Error(`missed events: sequence ${first} after ${this.lastSequence}`);
    }
    for (let s = first; s <= event.sequence; s += 1) this.sequences.push(s);
    this.lastSequence = event.sequence;
    const percent = event.type === 'EVENT_TYPE_PROGRESS' ? ` ${event.progress.percent}%` : '';
    const range = event.coalesced_from_sequence ? ` (stands for ${first}-${event.sequence})` : '';
    this.log(`stream ${n}: event sequence=${event.sequence} ${event.type}${percent}${range}`);
    this.notify();
    return TERMINAL.has(event.type);
  }

  reconnect(n, why) {
    // Exponential backoff with full jitter, capped at 2 s; at most 8 tries in a row.
    this.failures = (this.failures || 0) + 1;
    if (this.failures > 8) {
      this.fail(new Error(`giving up after ${this.failures - 1} reconnects: ${why}`));
      return;
    }
    const delay = Math.random() * Math.min(2000, 100 * 2 ** this.failures);
    this.log(`stream ${n}: ${why}; reconnecting in ${Math.round(delay)} ms`);
    setTimeout(() => {
      if (!this.done) this.open();
    }, delay);
  }

  // Drops the current stream on purpose, as a network failure would.
  async disconnect() {
    this.pausing = true;
    const closed = new Promise((resolve) => {
      this.onClosed = resolve;
    });
    this.call.cancel();
    await Promise.race([closed, this.finished]);
  }

  resume() {
    this.pausing = false;
    this.snapshotSequence = undefined;
    this.open();
    return this.until(() => this.snapshotSequence !== undefined);
  }

  // Resolves once predicate() holds: now, or after a later message.
  until(predicate) {
    const met = predicate()
      ? Promise.resolve()
      : new Promise((resolve) => this.waiters.push({ predicate, resolve }));
    return Promise.race([met, this.finished]); // a watch that failed fails the wait too
  }

  notify() {
    this.failures = 0;
    this.waiters = this.waiters.filter((w) => {
      if (!w.predicate()) return true;
      w.resolve();
      return false;
    });
  }
}

async function main() {
  const watchdog = setTimeout(() => {
    console.error(`watch_job: not done after ${GIVE_UP_MS / 1000} s`);
    process.exit(1);
  }, GIVE_UP_MS);
  const JobService = loadJobService();
  const creds = credentials();
  const stub = new JobService(TARGET, creds.channel);
  const md = creds.metadata;
  const log = (line) => console.log(line);

  const created = await unary(stub, md, 'CreateJob', {
    job: { kind: 'JOB_KIND_GENERIC', labels: { source: 'examples/node' } },
  });
  const job = created.job;
  log(`created job ${job.id} (${job.state})`);

  let key = 0;
  const report = async (payload) => {
    key += 1;
    const reply = await unary(stub, md, 'ReportEvent', {
      job_id: job.id,
      idempotency_key: `node-example-${key}`,
      callback_token: created.callback_token,
      ...payload,
    });
    return reply.sequence;
  };
  const progress = (percent) =>
    report({ progress: { percent, phase: 'work', message: `step at ${percent}%` } });

  const watch = new ResumableWatch(stub, md, job.id, log);
  const opened = watch.until(() => watch.snapshotSequence !== undefined);
  watch.open();
  await opened;

  // Stream 1 sees three progress events, then the example drops it.
  let sequence = 0;
  for (const percent of [10, 20, 30]) sequence = await progress(percent);
  await watch.until(() => watch.lastSequence >= sequence);
  await watch.disconnect();

  // The job moves on while nobody watches.
  const missed = [];
  for (const percent of [40, 50]) missed.push(await progress(percent));
  log(`reported while disconnected: sequences ${missed.join(', ')}`);

  // Stream 2 resumes after the last sequence seen: the two missed events are
  // replayed, then the live ones follow until the terminal event ends the stream.
  await watch.resume();
  await progress(90);
  await report({ completed: { output_key: 'examples/node/output.txt' } });
  await watch.finished;

  const final = await unary(stub, md, 'GetJob', { id: job.id });
  log(`job ${final.id} ended ${final.state} at sequence ${final.sequence}`);
  log(
    'RESULT ' +
      JSON.stringify({
        job_id: final.id,
        state: final.state,
        sequence: final.sequence,
        sequences: watch.sequences,
        streams: watch.streams,
        resumed_from: watch.resumedFrom,
        missed_while_disconnected: missed,
      }),
  );
  stub.close();
  clearTimeout(watchdog);
}

main().catch((err) => {
  const code = err.code !== undefined ? ` (${grpc.status[err.code]})` : '';
  console.error(`watch_job: ${err.details || err.message}${code}`);
  process.exit(1);
});
