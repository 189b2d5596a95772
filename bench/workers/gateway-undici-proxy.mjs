/**
 * The gateway bench's floor for the gateway's own stack: node:http's server and undici's
 * `Agent.dispatch()` (what the gateway forwards with), and nothing else: the request body read
 * whole, hop-by-hop and credential headers dropped, a static Authorization added, the answer
 * written back as it comes. No routing, key, body inspection, counters or log. Given
 * `{upstreamPort}` over IPC, it listens on loopback and sends `{port}` back.
 */
import { createServer } from 'node:http';
import { Agent } from 'undici';

const DROPPED = new Set(['host', 'connection', 'keep-alive', 'authorization', 'content-length', 'transfer-encoding']);

process.once('message', ({ upstreamPort }) => {
  const agent = new Agent({ keepAliveTimeout: 30_000 });
  const origin = `http://127.0.0.1:${upstreamPort}`;
  const server = createServer({ noDelay: true, keepAliveTimeout: 5_000 }, (req, res) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      const headers = [];
      for (let i = 0; i < req.rawHeaders.length; i += 2) {
        const name = req.rawHeaders[i].toLowerCase();
        if (!DROPPED.has(name)) headers.push(name, req.rawHeaders[i + 1]);
      }
      headers.push('authorization', 'Bearer static-bench-credential');
      let resume = null;
      let abort = null;
      res.on('close', () => {
        if (!res.writableFinished) abort?.(new Error('the client went away'));
      });
      agent.dispatch(
        { origin, path: req.url, method: req.method, headers, body: Buffer.concat(chunks) },
        {
          onConnect(cancel) {
            abort = cancel;
          },
          onHeaders(status, raw, resumeFn) {
            resume = resumeFn;
            const fields = [];
            for (let i = 0; i < raw.length; i += 2) {
              const name = raw[i].toString('latin1').toLowerCase();
              if (name !== 'connection' && name !== 'keep-alive') fields.push(name, raw[i + 1].toString('latin1'));
            }
            res.writeHead(status, fields);
            return true;
          },
          onData(chunk) {
            if (res.write(chunk)) return true;
            res.once('drain', () => resume());
            return false;
          },
          onComplete: () => res.end(),
          onError: () => res.destroy(),
        },
      );
    });
  });
  server.listen(0, '127.0.0.1', () => process.send({ port: server.address().port }));
});
process.on('disconnect', () => process.exit(0));
// An orderly exit on SIGTERM too, so `--cpu-prof` (BENCH_FLOOR_ARGS) writes its profile.
process.on('SIGTERM', () => process.exit(0));
