// B5 context worker: `count` raw connections to a bare fan-out server; records when each one
// receives a line (wall clock), with no parsing beyond finding the newline.
import { createConnection } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { args, commands, cpuNowMs, fail, say, wallNow } from './protocol.mjs';

try {
  const { count, wave, socketPath } = args;
  let arrivals = [];
  // CPU used when the last line of a round arrived: what receiving the fan-out cost.
  let cpuAtLastMs = null;
  const sockets = [];
  for (let i = 0; i < count; i += wave) {
    const batch = [];
    for (let j = i; j < Math.min(count, i + wave); j++) {
      batch.push(
        new Promise((resolve, reject) => {
          const s = createConnection(socketPath);
          s.on('data', (chunk) => {
            if (chunk.includes(10) && arrivals.push(wallNow()) === count) cpuAtLastMs = cpuNowMs();
          });
          s.once('error', reject);
          s.once('connect', () => resolve(s));
        }),
      );
    }
    sockets.push(...(await Promise.all(batch)));
  }
  say({ type: 'ready', connected: sockets.length });
  commands(
    async (msg) => {
      if (msg.cmd !== 'report') return;
      const deadline = Date.now() + 5_000;
      while (arrivals.length < sockets.length && Date.now() < deadline) await sleep(5);
      say({ type: 'report', arrivals, cpuAtLastMs });
      arrivals = [];
      cpuAtLastMs = null;
    },
    () => {
      for (const s of sockets) s.destroy();
      process.exit(0);
    },
  );
} catch (err) {
  fail(err);
}
