/**
 * The gateway bench's upstream: an OpenAI-shaped server in its own process. A plain
 * completion answers a small JSON body; `"stream": true` sends `events` SSE events
 * `intervalMs` apart, each stamped with the time it was written (the system's monotonic clock in
 * ms, comparable across processes), then `[DONE]`. Sends `{port}` to its parent.
 */
import { createServer } from 'node:http';

// The system-wide monotonic clock (ms): the same in every process, so the client's reading of a
// stamp needs no correction (performance.timeOrigin differs between processes by milliseconds).
const now = () => Number(process.hrtime.bigint()) / 1e6;
const reply = JSON.stringify({
  id: 'chatcmpl-bench',
  object: 'chat.completion',
  created: 0,
  model: 'bench-model',
  choices: [{ index: 0, message: { role: 'assistant', content: 'ok' }, finish_reason: 'stop' }],
  usage: { prompt_tokens: 3, completion_tokens: 1, total_tokens: 4 },
});

const server = createServer({ keepAliveTimeout: 60_000 }, (req, res) => {
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('end', () => {
    let body = {};
    try {
      body = JSON.parse(Buffer.concat(chunks).toString('utf8') || '{}');
    } catch {
      res.writeHead(400).end();
      return;
    }
    if (!req.headers.authorization) {
      res.writeHead(401, { 'content-type': 'application/json' }).end('{"error":{"message":"no credential"}}');
      return;
    }
    if (body.stream !== true) {
      res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(reply) });
      res.end(reply);
      return;
    }
    const events = Number(body.events ?? 10);
    const intervalMs = Number(body.intervalMs ?? 100);
    res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' });
    let sent = 0;
    const timer = setInterval(() => {
      if (res.destroyed) return clearInterval(timer);
      if (sent === events) {
        clearInterval(timer);
        res.end('data: [DONE]\n\n');
        return;
      }
      sent += 1;
      res.write(`data: {"t":${now()},"choices":[{"index":0,"delta":{"content":"x"}}]}\n\n`);
    }, intervalMs);
    res.on('close', () => clearInterval(timer));
  });
});
server.listen(0, '127.0.0.1', () => process.send({ port: server.address().port }));
process.on('disconnect', () => process.exit(0));
// An orderly exit on SIGTERM too, so `--cpu-prof` (BENCH_FLOOR_ARGS) writes its profile.
process.on('SIGTERM', () => process.exit(0));
