// A well-formed client in its own process (so the hostile traffic's sender does not skew its
// clock): asks the daemon for the token every PROBE_INTERVAL_MS over one connection and times
// each answer. When stdin closes it prints one JSON line with the latencies and exits.
// It never prints a token: it only checks that one came back.
import { createConnection } from 'node:net';

const socketPath = process.env.QWEN_TOKEND_SOCKET;
const intervalMs = Number(process.env.PROBE_INTERVAL_MS ?? 10);
const latencies = [];
let errors = 0;
let stopping = false;

const socket = createConnection(socketPath);
socket.setEncoding('utf8');
let buffer = '';
let pending = null;
socket.on('data', (chunk) => {
  buffer += chunk;
  let nl = buffer.indexOf('\n');
  while (nl !== -1) {
    const line = buffer.slice(0, nl);
    buffer = buffer.slice(nl + 1);
    nl = buffer.indexOf('\n');
    if (!pending) continue;
    const { id, started, done } = pending;
    let ok = false;
    try {
      const msg = JSON.parse(line);
      if (msg.id !== id) continue;
      ok = typeof msg.result?.access_token === 'string' && msg.result.access_token.length > 0;
    } catch {
      ok = false;
    }
    pending = null;
    const ms = Number(process.hrtime.bigint() - started) / 1e6;
    if (ok) latencies.push(ms);
    else errors++;
    done();
  }
});
socket.on('error', () => {
  errors++;
  stopping = true;
});

const ask = (id) =>
  new Promise((done) => {
    pending = { id, started: process.hrtime.bigint(), done };
    socket.write(`${JSON.stringify({ jsonrpc: '2.0', id, method: 'getAccessToken', params: { minValidityMs: 0 } })}\n`);
  });

process.stdin.resume();
process.stdin.on('end', () => {
  stopping = true;
});

await new Promise((r) => socket.once('connect', r));
process.stdout.write(`${JSON.stringify({ event: 'connected' })}\n`);
for (let id = 1; !stopping; id++) {
  await Promise.race([ask(id), new Promise((r) => setTimeout(r, 5_000))]);
  if (pending) {
    // No answer within 5 s: count it and move on.
    pending = null;
    errors++;
  }
  await new Promise((r) => setTimeout(r, intervalMs));
}
latencies.sort((a, b) => a - b);
const pct = (p) => (latencies.length ? latencies[Math.min(latencies.length - 1, Math.ceil((p / 100) * latencies.length) - 1)] : null);
process.stdout.write(`${JSON.stringify({ event: 'done', samples: latencies.length, errors, p50: pct(50), p99: pct(99), max: latencies.at(-1) ?? null })}\n`);
socket.destroy();
process.exit(0);
