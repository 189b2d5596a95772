// B4 context worker: `connections` raw sockets each send `callsPerConnection` NDJSON requests in
// one write at "go"; reports each request's latency (by id) until its answer line arrives.
import { createConnection } from 'node:net';
import { args, commands, fail, say } from './protocol.mjs';
import { tokenRequestLine } from '../lib/wire.mjs';

try {
  const { socketPath, connections, callsPerConnection } = args;
  const sockets = await Promise.all(
    Array.from({ length: connections }, () => new Promise((resolve, reject) => {
      const s = createConnection(socketPath);
      s.once('error', reject);
      s.once('connect', () => resolve(s));
    })),
  );
  say({ type: 'ready' });
  commands(async (msg) => {
    if (msg.cmd !== 'go') return;
    const latMs = [];
    const sentAt = new Map();
    await Promise.all(
      sockets.map((s, c) => new Promise((resolve) => {
        let buffer = '';
        let left = callsPerConnection;
        s.setEncoding('utf8');
        s.on('data', (chunk) => {
          buffer += chunk;
          let nl = buffer.indexOf('\n');
          while (nl !== -1) {
            const { id } = JSON.parse(buffer.slice(0, nl));
            buffer = buffer.slice(nl + 1);
            latMs.push(performance.now() - sentAt.get(id));
            if (--left === 0) resolve();
            nl = buffer.indexOf('\n');
          }
        });
        let lines = '';
        for (let i = 0; i < callsPerConnection; i++) {
          const id = c * callsPerConnection + i + 1;
          lines += tokenRequestLine(id);
          sentAt.set(id, performance.now());
        }
        s.write(lines);
      })),
    );
    say({ type: 'result', latMs });
  }, () => {
    for (const s of sockets) s.destroy();
    process.exit(0);
  });
} catch (err) {
  fail(err);
}
