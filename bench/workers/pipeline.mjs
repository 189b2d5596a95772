// B6 worker: `total` getAccessToken requests pipelined over `connections` raw sockets, each
// keeping `window` requests in flight. Counts replies; checks the first reply's shape.
import { createConnection } from 'node:net';
import { args, fail, say, tokenRequestLine } from './protocol.mjs';

const { socketPath, connections, total, window } = args;
const line = tokenRequestLine(1);

function run(quota) {
  return new Promise((resolve, reject) => {
    const socket = createConnection(socketPath);
    let sent = 0;
    let received = 0;
    let errors = 0;
    let firstReply = null;
    let partial = '';
    const send = (n) => {
      const k = Math.min(n, quota - sent);
      if (k <= 0) return;
      sent += k;
      socket.write(k === 1 ? line : line.repeat(k));
    };
    socket.setEncoding('utf8');
    socket.on('data', (chunk) => {
      let n = 0;
      for (let i = chunk.indexOf('\n'); i !== -1; i = chunk.indexOf('\n', i + 1)) n++;
      if (firstReply === null) {
        partial += chunk;
        const nl = partial.indexOf('\n');
        if (nl !== -1) firstReply = partial.slice(0, nl);
      }
      if (chunk.includes('"error"')) errors++;
      received += n;
      if (received >= quota) {
        socket.end();
        let ok = false;
        try {
          const msg = JSON.parse(firstReply);
          ok = typeof msg.result?.access_token === 'string' && msg.result.access_token.length > 0;
        } catch {
          ok = false;
        }
        resolve({ received, errors, firstOk: ok });
        return;
      }
      send(n);
    });
    socket.once('error', reject);
    socket.once('connect', () => send(window));
  });
}

try {
  const t0 = performance.now();
  const per = Math.ceil(total / connections);
  const results = await Promise.all(Array.from({ length: connections }, (_, i) => run(Math.min(per, total - i * per))));
  say({
    type: 'result',
    received: results.reduce((n, r) => n + r.received, 0),
    errorChunks: results.reduce((n, r) => n + r.errors, 0),
    firstOk: results.every((r) => r.firstOk),
    elapsedMs: performance.now() - t0,
  });
  process.exit(0);
} catch (err) {
  fail(err);
}
