// B2/B3 worker: uncached round trips to the daemon (TokenClient.getAccessToken({ noCache: true }))
// and the same request size over a raw NDJSON connection to the bare echo server.
import { createConnection } from 'node:net';
import { TokenClient, fingerprint } from '../../dist/client/index.js';
import { args, commands, fail, say, tokenRequestLine } from './protocol.mjs';

/** A minimal NDJSON client: one line out, one line back, parsed. */
function openEcho(path) {
  return new Promise((resolve, reject) => {
    const socket = createConnection(path);
    const waiting = [];
    let buffer = '';
    let id = 0;
    socket.setEncoding('utf8');
    socket.on('data', (chunk) => {
      buffer += chunk;
      let nl = buffer.indexOf('\n');
      while (nl !== -1) {
        const line = buffer.slice(0, nl);
        buffer = buffer.slice(nl + 1);
        waiting.shift()?.(JSON.parse(line));
        nl = buffer.indexOf('\n');
      }
    });
    socket.once('error', reject);
    socket.once('connect', () =>
      resolve({
        call: () =>
          new Promise((done) => {
            waiting.push(done);
            socket.write(tokenRequestLine(++id));
          }),
        close: () => socket.destroy(),
      }),
    );
  });
}

/** `n` sequential calls of `fn`; per-call latency in µs. */
async function timed(fn, n, into) {
  for (let i = 0; i < n; i++) {
    const t0 = process.hrtime.bigint();
    await fn();
    into.push(Number(process.hrtime.bigint() - t0) / 1000);
  }
}

try {
  const { mode, target, echoPath } = args;
  const client = new TokenClient({ autostart: false });
  const echo = echoPath ? await openEcho(echoPath) : null;
  const first = target === 'echo' ? null : await client.getAccessToken({ noCache: true });
  let wrong = 0;
  const daemonCall = async () => {
    if ((await client.getAccessToken({ noCache: true })) !== first) wrong++;
  };
  const echoCall = async () => {
    if ((await echo.call()).result === undefined) wrong++;
  };

  if (mode === 'latency') {
    const { blocks, perBlock, warmup } = args;
    await timed(daemonCall, warmup, []);
    await timed(echoCall, warmup, []);
    const daemonUs = [];
    const echoUs = [];
    // Alternating blocks, so drifting load on a shared machine hits both sides alike.
    for (let b = 0; b < blocks; b++) {
      await timed(daemonCall, perBlock, daemonUs);
      await timed(echoCall, perBlock, echoUs);
    }
    say({ type: 'result', daemonUs, echoUs, wrong, fp: fingerprint(first) });
    await client.close();
    echo.close();
  } else {
    // Throughput: warm up, report ready, then run a closed loop for durationMs after "go".
    const call = target === 'echo' ? echoCall : daemonCall;
    for (let i = 0; i < 300; i++) await call();
    say({ type: 'ready' });
    commands(
      async (msg) => {
        if (msg.cmd !== 'go') return;
        const t0 = performance.now();
        const end = t0 + msg.durationMs;
        let count = 0;
        while (performance.now() < end) {
          await call();
          count++;
        }
        say({ type: 'result', count, elapsedMs: performance.now() - t0, wrong, fp: first === null ? null : fingerprint(first) });
      },
      async () => {
        await client.close();
        echo?.close();
        process.exit(0);
      },
    );
  }
} catch (err) {
  fail(err);
}
