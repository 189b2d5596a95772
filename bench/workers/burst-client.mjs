// B4 worker: `connections` TokenClients (one socket each) fire `callsPerConnection` concurrent
// getAccessToken() calls at "go"; reports each call's latency and which tokens came back.
import { TokenClient, fingerprint } from '../../dist/client/index.js';
import { args, commands, fail, say } from './protocol.mjs';

try {
  const { connections, callsPerConnection } = args;
  const clients = [];
  for (let i = 0; i < connections; i++) {
    const c = new TokenClient({ autostart: false });
    await c.subscribe();
    clients.push(c);
  }
  // The report fingerprints the tokens; the first fingerprint loads node:crypto's hashing
  // (0.5-1 ms). Done now, so the bench's own bookkeeping is not counted in the burst's CPU.
  fingerprint('warm-up');
  say({ type: 'ready' });
  commands(
    async (msg) => {
      if (msg.cmd !== 'go') return;
      const latMs = [];
      const tokens = new Map();
      const errors = {};
      const calls = [];
      for (const c of clients) {
        for (let i = 0; i < callsPerConnection; i++) {
          const t0 = performance.now();
          calls.push(
            c.getAccessToken().then(
              (token) => {
                latMs.push(performance.now() - t0);
                tokens.set(token, (tokens.get(token) ?? 0) + 1);
              },
              (err) => {
                latMs.push(performance.now() - t0);
                errors[err.code ?? 'unknown'] = (errors[err.code ?? 'unknown'] ?? 0) + 1;
              },
            ),
          );
        }
      }
      await Promise.all(calls);
      const fps = {};
      for (const [token, n] of tokens) fps[fingerprint(token)] = n;
      say({ type: 'result', latMs, fps, errors });
    },
    async () => {
      for (const c of clients) await c.close();
      process.exit(0);
    },
  );
} catch (err) {
  fail(err);
}
