// The peer a team would pick instead of jobwire: a small node:http endpoint that takes
// the Secretary progress callback and calls BullMQ's job.updateProgress on Redis.
//
// Usage: node server.js --port P --jobs N --jobs-out FILE [--redis PORT]
// Without --redis it answers after the same checks without touching Redis (Node's
// ceiling). Writes [[jobId, token], ...] to FILE before it listens.
//
// What it checks, like the jobwire bridge: the path's job id, a per-job Bearer token
// (HMAC-SHA256 of the job id under a secret of this process, compared in constant
// time), a JSON object with a `phase` string (1-128) and a finite `progress` 0-100,
// optional `message` (<= 4096) and `process.id` (<= 256). 200 only after Redis answered
// the updateProgress script (with appendfsync always: after the AOF fsync).
'use strict';

const crypto = require('node:crypto');
const fs = require('node:fs');
const http = require('node:http');

const LIMIT = 1024 * 1024;
const PATH = /^\/api\/external\/jobs\/([A-Za-z0-9._:-]{1,128})$/;
const QUEUE = 'secretary';

function arg(name, fallback) {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? process.argv[i + 1] : fallback;
}

const port = Number(arg('port'));
const redisPort = arg('redis', '');
const jobCount = Number(arg('jobs', '1000'));
const jobsOut = arg('jobs-out');
const secret = crypto.randomBytes(32);

function tokenOf(id) {
  return crypto.createHmac('sha256', secret).update(id).digest('base64url');
}

function tokenMatches(id, header) {
  if (typeof header !== 'string' || !header.startsWith('Bearer ')) return false;
  const given = Buffer.from(header.slice(7).trim());
  const expected = Buffer.from(tokenOf(id));
  return given.length === expected.length && crypto.timingSafeEqual(given, expected);
}

function problem(body) {
  if (body === null || typeof body !== 'object' || Array.isArray(body)) {
    return 'body must be a JSON object';
  }
  const { phase, progress, message, process: proc } = body;
  if (typeof phase !== 'string' || phase.length < 1 || phase.length > 128) {
    return 'phase: a string of 1-128 characters is required';
  }
  if (typeof progress !== 'number' || !Number.isFinite(progress) || progress < 0 || progress > 100) {
    return 'progress: a number from 0 to 100 is required';
  }
  if (message != null && (typeof message !== 'string' || message.length > 4096)) {
    return 'message: a string of at most 4096 characters';
  }
  if (proc != null) {
    if (typeof proc !== 'object' || Array.isArray(proc)) return 'process: must be an object';
    if (proc.id != null && (typeof proc.id !== 'string' || proc.id.length > 256)) {
      return 'process.id: a string of at most 256 characters';
    }
  }
  return '';
}

function reply(res, status, payload) {
  const body = JSON.stringify(payload);
  res.writeHead(status, {
    'Content-Type': 'application/json; charset=utf-8',
    'Content-Length': Buffer.byteLength(body),
  });
  res.end(body);
}

async function main() {
  const jobs = new Map(); // job id -> BullMQ Job (or true without Redis)
  let queue = null;
  const ids = Array.from({ length: jobCount }, (_, i) => `peer-${String(i).padStart(5, '0')}`);
  if (redisPort) {
    const { Queue } = require('bullmq');
    queue = new Queue(QUEUE, { connection: { host: '127.0.0.1', port: Number(redisPort) } });
    await queue.waitUntilReady();
    for (let i = 0; i < ids.length; i += 500) {
      const added = await queue.addBulk(
        ids.slice(i, i + 500).map((id) => ({ name: 'extract', data: {}, opts: { jobId: id } })),
      );
      for (const job of added) jobs.set(job.id, job);
    }
  } else {
    for (const id of ids) jobs.set(id, true);
  }
  fs.writeFileSync(jobsOut, JSON.stringify(ids.map((id) => [id, tokenOf(id)])));

  const server = http.createServer((req, res) => {
    if (req.method === 'GET' && req.url === '/healthz') {
      res.end('ok');
      return;
    }
    const match = req.method === 'POST' ? PATH.exec(req.url) : null;
    if (match === null) {
      reply(res, 404, { status: 'error', error: 'not found' });
      req.resume();
      return;
    }
    const id = match[1];
    const chunks = [];
    let size = 0;
    req.on('data', (chunk) => {
      size += chunk.length;
      if (size <= LIMIT) chunks.push(chunk);
    });
    req.on('end', () => {
      if (size > LIMIT) return reply(res, 413, { status: 'error', error: 'body too large' });
      const job = jobs.get(id);
      if (job === undefined) return reply(res, 404, { status: 'error', error: `job ${id} not found` });
      if (!tokenMatches(id, req.headers.authorization)) {
        return reply(res, 401, { status: 'error', error: 'invalid callback token' });
      }
      let body;
      try {
        body = JSON.parse(Buffer.concat(chunks, size).toString('utf8'));
      } catch (err) {
        return reply(res, 400, { status: 'error', error: `malformed JSON: ${err.message}` });
      }
      const bad = problem(body);
      if (bad) return reply(res, 400, { status: 'error', error: bad });
      const ok = { status: 'ok', kind: 'progress', jobId: id };
      if (job === true) return reply(res, 200, ok);
      job
        .updateProgress({ phase: body.phase, progress: body.progress, message: body.message ?? null })
        .then(
          () => reply(res, 200, ok),
          () => reply(res, 503, { status: 'error', error: 'service unavailable, retry with backoff' }),
        );
    });
  });
  server.keepAliveTimeout = 60_000;
  server.listen(port, '127.0.0.1');
  const stop = async () => {
    server.close();
    if (queue !== null) await queue.close();
    process.exit(0);
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
