/** Helpers the scenarios share. */
import { createConnection } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';

/** One scenario's row in the results table. */
export function row(id, name, { measured, baseline = '-', ratio = '-', target, pass, data = {} }) {
  return { id, name, measured, baseline, ratio, target, pass: Boolean(pass), data };
}

/** Polls `probe` every `everyMs` until it returns true, or throws after `timeoutMs`. */
export async function until(probe, timeoutMs, what, everyMs = 10) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (await probe()) return;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(everyMs);
  }
}

/** Sends one raw getAccessToken line and returns the reply line's size in bytes (newline included). */
export function replyBytesOf(socketPath, requestLine) {
  return new Promise((resolve, reject) => {
    const socket = createConnection(socketPath);
    const chunks = [];
    socket.on('data', (d) => {
      chunks.push(d);
      const all = Buffer.concat(chunks);
      const nl = all.indexOf(10);
      if (nl !== -1) {
        socket.destroy();
        resolve(nl + 1);
      }
    });
    socket.once('error', reject);
    socket.once('connect', () => socket.write(requestLine));
  });
}

/** Runs `fn` with the workers it starts, killing any left when it throws. */
export async function withWorkers(fn) {
  const workers = [];
  try {
    return await fn(workers);
  } finally {
    await Promise.all(workers.map((w) => w.stop(3_000)));
  }
}
