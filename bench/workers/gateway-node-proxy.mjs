/**
 * The gateway bench's floor: the least a node:http reverse proxy can do, in its own process.
 * It reads nothing it does not need to: the request is piped to the upstream on a keep-alive
 * agent with a static Authorization header, the answer piped back. Given `{upstreamPort}`
 * over IPC, it listens on loopback and sends `{port}` back.
 */
import { Agent, createServer, request } from 'node:http';

process.once('message', ({ upstreamPort }) => {
  const agent = new Agent({ keepAlive: true, maxSockets: Infinity, maxFreeSockets: 256 });
  const server = createServer({ noDelay: true, keepAliveTimeout: 5_000 }, (req, res) => {
    const headers = { ...req.headers, authorization: 'Bearer static-bench-credential', host: `127.0.0.1:${upstreamPort}` };
    delete headers.connection;
    const up = request({ host: '127.0.0.1', port: upstreamPort, method: req.method, path: req.url, headers, agent }, (answer) => {
      res.writeHead(answer.statusCode, answer.headers);
      answer.pipe(res);
    });
    up.on('error', () => res.destroy());
    res.on('close', () => {
      if (!res.writableFinished) up.destroy();
    });
    req.pipe(up);
  });
  server.listen(0, '127.0.0.1', () => process.send({ port: server.address().port }));
});
process.on('disconnect', () => process.exit(0));
// An orderly exit on SIGTERM too, so `--cpu-prof` (BENCH_FLOOR_ARGS) writes its profile.
process.on('SIGTERM', () => process.exit(0));
