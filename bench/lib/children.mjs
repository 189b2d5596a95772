/**
 * Child processes for the bench: each worker speaks JSON lines on stdout (results, never a
 * token) and takes commands as JSON lines on stdin.
 */
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { WORKERS } from './paths.mjs';

/** Extra node flags for every worker, from BENCH_WORKER_ARGS (e.g. `--cpu-prof --cpu-prof-dir=/tmp/prof`). */
export function workerArgs() {
  return (process.env.BENCH_WORKER_ARGS ?? '').split(/\s+/).filter(Boolean);
}

/** Spawns `bench/workers/<name>` with one JSON argument; returns a handle with `next(type)`/`send(msg)`. */
export function startWorker(name, args, env, { execArgv = workerArgs() } = {}) {
  const proc = spawn(process.execPath, [...execArgv, join(WORKERS, name), JSON.stringify(args)], {
    env,
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  const messages = [];
  const waiters = [];
  let stderr = '';
  let exitInfo = null;
  const exited = new Promise((done) =>
    proc.once('exit', (code, signal) => {
      exitInfo = { code, signal };
      for (const w of waiters.splice(0)) w.reject(new Error(`worker ${name} exited (${code ?? signal}) while waiting for "${w.type}"${stderr ? `:\n${stderr}` : ''}`));
      done(exitInfo);
    }),
  );
  proc.stderr.on('data', (d) => {
    if (stderr.length < 20_000) stderr += d.toString();
  });
  createInterface({ input: proc.stdout }).on('line', (line) => {
    let msg;
    try {
      msg = JSON.parse(line);
    } catch {
      return;
    }
    if (msg.type === 'error') {
      for (const w of waiters.splice(0)) w.reject(new Error(`worker ${name}: ${msg.message}`));
      messages.push(msg);
      return;
    }
    const i = waiters.findIndex((w) => w.type === msg.type);
    if (i !== -1) waiters.splice(i, 1)[0].resolve(msg);
    else messages.push(msg);
  });
  proc.stdin.on('error', () => undefined);
  return {
    proc,
    exited,
    get stderr() {
      return stderr;
    },
    /** The next message of `type` (queued ones first); rejects when the worker reports an error or exits. */
    next(type) {
      const errIndex = messages.findIndex((m) => m.type === 'error');
      if (errIndex !== -1) return Promise.reject(new Error(`worker ${name}: ${messages[errIndex].message}`));
      const i = messages.findIndex((m) => m.type === type);
      if (i !== -1) return Promise.resolve(messages.splice(i, 1)[0]);
      if (exitInfo) return Promise.reject(new Error(`worker ${name} already exited (${exitInfo.code ?? exitInfo.signal})${stderr ? `:\n${stderr}` : ''}`));
      return new Promise((resolve, reject) => waiters.push({ type, resolve, reject }));
    },
    send(msg) {
      proc.stdin.write(`${JSON.stringify(msg)}\n`);
    },
    /** Closes stdin (workers exit on it) and waits; SIGKILL after `graceMs`. */
    async stop(graceMs = 5_000) {
      if (exitInfo) return exitInfo;
      proc.stdin.end();
      const killer = setTimeout(() => proc.kill('SIGKILL'), graceMs);
      const info = await exited;
      clearTimeout(killer);
      return info;
    },
    kill() {
      if (!exitInfo) proc.kill('SIGKILL');
    },
  };
}
