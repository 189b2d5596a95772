// B5/B6 worker: `count` TokenClients, each with its own subscribed connection. Records when each
// one is told about a refreshed token (wall clock, comparable across processes).
import { setTimeout as sleep } from 'node:timers/promises';
import { TokenClient, fingerprint } from '../../dist/client/index.js';
import { args, commands, cpuNowMs, fail, say, wallNow } from './protocol.mjs';

try {
  const { count, wave } = args;
  const clients = [];
  let arrivals = [];
  let tokens = [];
  // CPU used when the last client of a round was told: what receiving the fan-out cost.
  let cpuAtLastMs = null;
  // Connect in waves: a burst of connects beyond the listen backlog is refused (EAGAIN).
  for (let i = 0; i < count; i += wave) {
    const batch = [];
    for (let j = i; j < Math.min(count, i + wave); j++) {
      const c = new TokenClient({ autostart: false });
      c.on('token.refreshed', (t) => {
        if (arrivals.push(wallNow()) === count) cpuAtLastMs = cpuNowMs();
        tokens.push(t.access_token);
      });
      batch.push(c.subscribe().then(() => c));
    }
    clients.push(...(await Promise.all(batch)));
  }
  say({ type: 'ready', connected: clients.length });
  commands(
    async (msg) => {
      if (msg.cmd === 'report') {
        // Wait for every client's push (at most 5 s; missing ones show up as a short count).
        const deadline = Date.now() + 5_000;
        while (arrivals.length < clients.length && Date.now() < deadline) await sleep(5);
        // Every client must hold the pushed token in its cache now (no request is made for it).
        const held = await Promise.all(clients.map((c) => c.getAccessToken()));
        const fps = {};
        for (const t of held) {
          const fp = fingerprint(t);
          fps[fp] = (fps[fp] ?? 0) + 1;
        }
        const pushed = {};
        for (const t of tokens) {
          const fp = fingerprint(t);
          pushed[fp] = (pushed[fp] ?? 0) + 1;
        }
        say({ type: 'report', arrivals, held: fps, pushed, cpuAtLastMs });
        arrivals = [];
        tokens = [];
        cpuAtLastMs = null;
      }
    },
    async () => {
      for (const c of clients) await c.close();
      process.exit(0);
    },
  );
} catch (err) {
  fail(err);
}
