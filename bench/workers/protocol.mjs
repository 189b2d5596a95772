/** What every bench worker shares: its argument, JSON-line output and stdin commands. */
import { readFileSync } from 'node:fs';
import { createInterface } from 'node:readline';

/** The JSON argument the bench passed. */
export const args = JSON.parse(process.argv[2] ?? '{}');

/** Writes one message to the bench (never a token: fingerprints and numbers only). */
export function say(msg) {
  process.stdout.write(`${JSON.stringify(msg)}\n`);
}

/** Reports an error and exits non-zero. */
export function fail(err) {
  say({ type: 'error', message: err?.stack ?? String(err) });
  process.exitCode = 1;
  setTimeout(() => process.exit(1), 50);
}

/** Calls `onCommand(msg)` for each JSON line on stdin, and `onEnd()` when stdin closes. */
export function commands(onCommand, onEnd = () => process.exit(0)) {
  const rl = createInterface({ input: process.stdin });
  rl.on('line', (line) => {
    let msg;
    try {
      msg = JSON.parse(line);
    } catch {
      return;
    }
    Promise.resolve(onCommand(msg)).catch(fail);
  });
  rl.on('close', () => Promise.resolve(onEnd()).catch(fail));
}

/** CPU time (ms) this process has used so far, from /proc/self/schedstat (Linux). */
export function cpuNowMs() {
  return Number(readFileSync('/proc/self/schedstat', 'utf8').split(' ')[0]) / 1e6;
}

/** Absolute wall-clock time in ms with sub-ms resolution, comparable across processes. */
export function wallNow() {
  return performance.timeOrigin + performance.now();
}

export { tokenRequestLine } from '../lib/wire.mjs';
