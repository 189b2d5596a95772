/**
 * Runs the real daemon (the dist/bin/qwen-tokend.js bundle) for the bench: a temporary HOME and runtime dir,
 * a credential file minted by the local Qwen server, readiness by connecting to the socket,
 * and the daemon's resident memory read from /proc.
 */
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { createConnection } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { serializeCredentials } from '../../dist/shared/credentials.js';
import { DAEMON_NODE_FLAGS, daemonEnv } from '../../dist/client/autostart.js';
import { TokenClient } from '../../dist/client/index.js';
import { DAEMON_BIN } from './paths.mjs';

/** Credentials minted by the server, as a credential file holds them. */
export function credsFrom(server, expiresIn = 21600) {
  const t = server.issueTokens({ expiresIn });
  return {
    access_token: t.access_token,
    refresh_token: t.refresh_token,
    token_type: 'Bearer',
    resource_url: t.resource_url,
    expiry_date: t.expiry_date,
  };
}

/** Credentials whose access token expired `agoMs` ago (the refresh token is still good). */
export function expiredCredsFrom(server, agoMs = 60_000) {
  return { ...credsFrom(server), expiry_date: Date.now() - agoMs };
}

/** A clean environment for a daemon and its clients in `root`, pointed at `server`. */
export function benchEnv(root, server, extra = {}) {
  const env = { ...process.env };
  for (const key of Object.keys(env)) {
    if (key.startsWith('QWEN_') || key === 'XDG_RUNTIME_DIR' || key === 'NOTIFY_SOCKET' || key === 'NODE_OPTIONS') delete env[key];
  }
  Object.assign(env, {
    HOME: join(root, 'home'),
    QWEN_TOKEND_SOCKET: join(root, 'run', 'd.sock'),
    QWEN_OAUTH_BASE_URL: server.baseUrl,
    QWEN_TOKEND_AUTOSTART: '0',
    QWEN_TOKEND_HTTP_TIMEOUT_MS: '5000',
  });
  for (const [k, v] of Object.entries(extra)) {
    if (v === undefined) delete env[k];
    else env[k] = v;
  }
  return env;
}

/**
 * Extra node flags for every daemon the bench starts, from BENCH_DAEMON_ARGS (for profiling:
 * `BENCH_DAEMON_ARGS="--cpu-prof --cpu-prof-dir=/tmp/prof" npm run bench -- --only B4`).
 */
export function daemonArgs() {
  return (process.env.BENCH_DAEMON_ARGS ?? '').split(/\s+/).filter(Boolean);
}

/** Resolves true once something accepts connections on `socketPath`. */
export function canConnect(socketPath) {
  return new Promise((resolve) => {
    const probe = createConnection(socketPath);
    probe.once('connect', () => {
      probe.destroy();
      resolve(true);
    });
    probe.once('error', () => resolve(false));
  });
}

/** A temp dir with a private HOME and runtime dir; `creds` (if any) written as the daemon's file. */
export async function prepareHome(server, creds, extraEnv = {}) {
  const root = await mkdtemp(join(tmpdir(), 'qtd-bench-'));
  await mkdir(join(root, 'home'), { recursive: true, mode: 0o700 });
  await mkdir(join(root, 'run'), { recursive: true, mode: 0o700 });
  const env = benchEnv(root, server, extraEnv);
  const tokenPath = join(root, 'home', '.one_dragon_alpha', 'qwen_oauth_creds.json');
  if (creds) {
    await mkdir(dirname(tokenPath), { recursive: true, mode: 0o700 });
    await writeFile(tokenPath, serializeCredentials(creds), { mode: 0o600 });
  }
  return { root, env, socketPath: env.QWEN_TOKEND_SOCKET, tokenPath };
}

/**
 * Spawns the daemon as autostart does (its node flags and environment, then `args`) and resolves
 * once its socket accepts a connection, polling every `pollMs`. `readyMs` is the time from spawn
 * to the first accepted connection.
 */
export async function spawnDaemon(home, { pollMs = 2, timeoutMs = 15_000, args = daemonArgs() } = {}) {
  if (!existsSync(DAEMON_BIN)) throw new Error(`${DAEMON_BIN} is missing: run \`npm run build\` first`);
  const output = [];
  const t0 = performance.now();
  const proc = spawn(process.execPath, [...DAEMON_NODE_FLAGS, ...args, DAEMON_BIN], { env: daemonEnv(home.env), stdio: ['ignore', 'pipe', 'pipe'] });
  let buffered = '';
  const onChunk = (chunk) => {
    buffered += chunk.toString('utf8');
    let nl = buffered.indexOf('\n');
    while (nl !== -1) {
      if (output.length < 5000) output.push(buffered.slice(0, nl));
      buffered = buffered.slice(nl + 1);
      nl = buffered.indexOf('\n');
    }
  };
  proc.stdout.on('data', onChunk);
  proc.stderr.on('data', onChunk);
  const exited = new Promise((done) => proc.once('exit', (code, signal) => done(code ?? signal)));
  let gone = null;
  void exited.then((code) => {
    gone = code;
  });
  for (;;) {
    if (gone !== null) throw new Error(`daemon exited (${gone}) before it listened:\n${output.join('\n')}`);
    if (await canConnect(home.socketPath)) break;
    if (performance.now() - t0 > timeoutMs) {
      proc.kill('SIGKILL');
      throw new Error(`daemon did not listen within ${timeoutMs} ms:\n${output.join('\n')}`);
    }
    await sleep(pollMs);
  }
  const readyMs = performance.now() - t0;
  return {
    proc,
    pid: proc.pid,
    output,
    readyMs,
    exited,
    /** CPU time (ms) the daemon's main (JavaScript) thread has run so far, from /proc/<pid>/schedstat. */
    cpuMs: () => readCpuMs(proc.pid),
    /** VmRSS of the daemon in kB. */
    rssKb: () => readRssKb(proc.pid),
    /** SIGTERM, then wait for the exit (SIGKILL after 5 s). */
    async stop() {
      if (proc.exitCode !== null || proc.signalCode !== null) return;
      proc.kill('SIGTERM');
      const killer = setTimeout(() => proc.kill('SIGKILL'), 5_000);
      await exited;
      clearTimeout(killer);
    },
  };
}

/** On-CPU time (ms) of a process's main thread, from /proc/<pid>/schedstat (nanoseconds; Linux). */
export async function readCpuMs(pid) {
  const text = await readFile(`/proc/${pid}/schedstat`, 'utf8');
  return Number(text.split(' ')[0]) / 1e6;
}

/** VmRSS (kB) of a process, from /proc/<pid>/status (Linux). */
export async function readRssKb(pid) {
  const status = await readFile(`/proc/${pid}/status`, 'utf8');
  const m = /^VmRSS:\s+(\d+)\s+kB/m.exec(status);
  if (!m) throw new Error(`no VmRSS for pid ${pid}`);
  return Number(m[1]);
}

/** Throws when any token the server issued appears in `text` (the message carries no token). */
export function assertNoTokens(server, text) {
  const leaked = server.issuedTokens().filter((t) => t.length >= 8 && text.includes(t));
  if (leaked.length > 0) throw new Error(`${leaked.length} issued token(s) appear in the daemon's output`);
}

/** Starts a daemon on a fresh home holding `creds`; `close()` stops it and removes the temp dir. */
export async function startBenchDaemon(server, { creds, env = {}, spawnOptions } = {}) {
  const home = await prepareHome(server, creds ?? credsFrom(server), env);
  let daemon;
  try {
    daemon = await spawnDaemon(home, spawnOptions);
  } catch (err) {
    await rm(home.root, { recursive: true, force: true });
    throw err;
  }
  const clients = [];
  return {
    ...home,
    daemon,
    /** A TokenClient of this daemon in the bench process (closed by `close()`). */
    client(options = {}) {
      const c = new TokenClient({ env: home.env, autostart: false, ...options });
      clients.push(c);
      return c;
    },
    /** The daemon's `status` answer, via a short-lived client. */
    async status() {
      const c = new TokenClient({ env: home.env, autostart: false });
      try {
        return await c.status();
      } finally {
        await c.close();
      }
    },
    /** Stops clients and the daemon, removes the temp dir; throws if the daemon printed an issued token. */
    async close() {
      for (const c of clients.splice(0)) await c.close();
      await daemon.stop();
      await rm(home.root, { recursive: true, force: true });
      assertNoTokens(server, daemon.output.join('\n'));
    },
  };
}
