#!/usr/bin/env node
/**
 * The gateway bench: one local upstream, reached directly, through the daemon's gateway on
 * loopback TCP, through nginx as the same reverse proxy with a static Authorization header
 * (installed with apt when missing), and through the least node:http reverse proxy (the floor
 * of any proxy written on node:http). Rounds rotate the targets in the same minute, so a
 * machine loaded by other work moves all of them. Then 1,000 concurrent SSE streams through
 * each, with each event's delay and the daemon's RSS.
 *
 * Usage: npm run build && node bench/gateway.mjs [--rounds N] [--seconds S] [--streams N]
 *        [--baseline path/to/other/dist/bin/qwen-tokend.js]
 * `--baseline` adds a second daemon from another build as the target "baseline", so an old
 * and a new build are compared in the same minute. Writes bench/results/gateway-latest.json.
 */
import { execFileSync, fork, spawn } from 'node:child_process';
import { existsSync, openSync } from 'node:fs';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { createServer as netServer } from 'node:net';
import { cpus, loadavg, tmpdir } from 'node:os';
import { basename, dirname, join, resolve } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { parseArgs } from 'node:util';
import { summarize } from './lib/stats.mjs';
import { DAEMON_BIN, REPO_ROOT, WORKERS } from './lib/paths.mjs';

const { values: opts } = parseArgs({
  options: {
    rounds: { type: 'string', default: '5' },
    seconds: { type: 'string', default: '2' },
    connections: { type: 'string', default: '32' },
    streams: { type: 'string', default: '1000' },
    events: { type: 'string', default: '20' },
    'interval-ms': { type: 'string', default: '100' },
    'sse-rounds': { type: 'string', default: '2' },
    baseline: { type: 'string' },
    // For an old-build/new-build comparison alone: `--only gateway,baseline` (direct always runs).
    only: { type: 'string' },
    'no-sse': { type: 'boolean', default: false },
    'no-rate': { type: 'boolean', default: false },
  },
});
const ROUNDS = Number(opts.rounds);
const DURATION_MS = Number(opts.seconds) * 1000;
const CONNECTIONS = Number(opts.connections);
const STREAMS = Number(opts.streams);
const EVENTS = Number(opts.events);
const INTERVAL_MS = Number(opts['interval-ms']);
const SSE_ROUNDS = opts['no-sse'] ? 0 : Number(opts['sse-rounds']);
const RATE_ROUNDS = opts['no-rate'] ? 0 : ROUNDS;

function freePort() {
  return new Promise((resolve) => {
    const probe = netServer().listen(0, '127.0.0.1', () => {
      const { port } = probe.address();
      probe.close(() => resolve(port));
    });
  });
}

/** Forks a worker and resolves with its first message. */
function forkWorker(file, task) {
  // BENCH_FLOOR_ARGS="--cpu-prof --cpu-prof-dir=/tmp/prof" profiles the floors (and the upstream and load).
  const execArgv = (process.env.BENCH_FLOOR_ARGS ?? '').split(/\s+/).filter(Boolean);
  const child = fork(join(WORKERS, file), [], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'], execArgv });
  const first = new Promise((resolve, reject) => {
    child.once('message', resolve);
    child.once('exit', (code) => reject(new Error(`${file} exited ${code} before answering`)));
  });
  if (task) child.send(task);
  return { child, first };
}

const CLK_TCK = (() => {
  try {
    return Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim()) || 100;
  } catch {
    return 100;
  }
})();

/** CPU time (user + system, ms) used so far by the processes `pids`. */
function cpuMs(pids) {
  let total = 0;
  for (const pid of pids) {
    try {
      const fields = execFileSync('cat', [`/proc/${pid}/stat`], { encoding: 'utf8' }).split(') ')[1].split(' ');
      total += ((Number(fields[11]) + Number(fields[12])) * 1000) / CLK_TCK;
    } catch {
      /* gone */
    }
  }
  return total;
}

/** The process and its direct children (nginx's master and worker). */
function withChildren(pid) {
  try {
    const children = execFileSync('cat', [`/proc/${pid}/task/${pid}/children`], { encoding: 'utf8' }).trim().split(/\s+/).filter(Boolean).map(Number);
    return [pid, ...children];
  } catch {
    return [pid];
  }
}

function readRssKb(pid, field = 'VmRSS') {
  try {
    const text = execFileSync('cat', [`/proc/${pid}/status`], { encoding: 'utf8' });
    return Number(new RegExp(`${field}:\\s+(\\d+)`).exec(text)?.[1] ?? NaN);
  } catch {
    return NaN;
  }
}

/** nginx, installed with apt when missing and possible. Returns its path or null with the reason. */
function findNginx() {
  const which = () => ['/usr/sbin/nginx', '/usr/local/sbin/nginx', '/usr/bin/nginx'].find((p) => existsSync(p)) ?? null;
  let found = which();
  if (found) return { path: found, note: null };
  if (process.getuid?.() !== 0) return { path: null, note: 'nginx is not installed and the bench is not root (cannot apt-get install it)' };
  try {
    execFileSync('apt-get', ['install', '-y', '-qq', 'nginx'], { stdio: 'ignore', env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive' } });
  } catch {
    try {
      execFileSync('apt-get', ['update', '-qq'], { stdio: 'ignore' });
      execFileSync('apt-get', ['install', '-y', '-qq', 'nginx'], { stdio: 'ignore', env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive' } });
    } catch (err) {
      return { path: null, note: `apt-get install nginx failed (${err.message.split('\n')[0]})` };
    }
  }
  found = which();
  return found ? { path: found, note: null } : { path: null, note: 'nginx not found after apt-get install' };
}

async function startNginx(nginxPath, root, upstreamPort, port) {
  const prefix = join(root, 'nginx');
  await mkdir(join(prefix, 'logs'), { recursive: true });
  const conf = join(prefix, 'nginx.conf');
  await writeFile(
    conf,
    `${process.getuid?.() === 0 ? 'user root;\n' : ''}worker_processes 1;
pid ${join(prefix, 'nginx.pid')};
error_log ${join(prefix, 'logs', 'error.log')} warn;
events { worker_connections 4096; }
http {
  access_log ${join(prefix, 'logs', 'access.log')};
  client_body_temp_path ${join(prefix, 'body')};
  proxy_temp_path ${join(prefix, 'proxy')};
  fastcgi_temp_path ${join(prefix, 'fastcgi')};
  uwsgi_temp_path ${join(prefix, 'uwsgi')};
  scgi_temp_path ${join(prefix, 'scgi')};
  upstream up { server 127.0.0.1:${upstreamPort}; keepalive 256; }
  server {
    listen 127.0.0.1:${port};
    location / {
      proxy_pass http://up;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer static-bench-credential";
      proxy_buffering off;
      proxy_request_buffering on;
      proxy_read_timeout 300s;
    }
  }
}
`,
  );
  const proc = spawn(nginxPath, ['-p', prefix, '-c', conf, '-g', 'daemon off;'], { stdio: ['ignore', 'ignore', 'inherit'] });
  return proc;
}

async function waitListening(port) {
  for (let i = 0; i < 500; i++) {
    const ok = await new Promise((resolve) => {
      const s = netServer();
      s.once('error', () => resolve(true));
      s.listen(port, '127.0.0.1', () => s.close(() => resolve(false)));
    });
    if (ok) return;
    await sleep(20);
  }
  throw new Error(`nothing listens on ${port}`);
}


/**
 * One daemon from the build whose entry is `bin`: a credential whose resource_url is the
 * upstream, the gateway's TCP listener on, access log lines (info) to a file as nginx's go.
 */
async function startDaemon(bin, root, upstream) {
  const home = join(root, 'home');
  const stateDir = join(home, '.one_dragon_alpha');
  await mkdir(stateDir, { recursive: true, mode: 0o700 });
  await mkdir(join(root, 'run'), { recursive: true, mode: 0o700 });
  await writeFile(
    join(stateDir, 'qwen_oauth_creds.json'),
    JSON.stringify({ access_token: 'bench-access-token', refresh_token: 'bench-refresh-token', token_type: 'Bearer', resource_url: upstream, expiry_date: Date.now() + 6 * 3600_000 }),
    { mode: 0o600 },
  );
  const port = await freePort();
  const configPath = join(root, 'config', 'config.json');
  await mkdir(dirname(configPath), { recursive: true, mode: 0o700 });
  await writeFile(configPath, JSON.stringify({ gateway: { tcp: { enabled: true, port } } }), { mode: 0o600 });
  const env = { ...process.env };
  for (const key of Object.keys(env)) if (key.startsWith('QWEN_') || key === 'XDG_RUNTIME_DIR' || key === 'XDG_CONFIG_HOME') delete env[key];
  Object.assign(env, {
    HOME: home,
    QWEN_TOKEND_SOCKET: join(root, 'run', 'd.sock'),
    QWEN_TOKEND_CONFIG: configPath,
    QWEN_OAUTH_BASE_URL: 'http://127.0.0.1:9',
    QWEN_TOKEND_QWEN_CLI_SYNC: '0',
    QWEN_TOKEND_AUTOSTART: '0',
    QWEN_TOKEND_LOG_FILE: join(root, 'daemon.log'),
  });
  // BENCH_DAEMON_ARGS="--cpu-prof --cpu-prof-dir=/tmp/prof" profiles the daemon(s).
  const daemonArgs = (process.env.BENCH_DAEMON_ARGS ?? '').split(/\s+/).filter(Boolean);
  // With the node flags an autostarted daemon runs with.
  const { DAEMON_NODE_FLAGS } = await import(join(REPO_ROOT, 'dist', 'client', 'autostart.js'));
  // BENCH_DAEMON_STDOUT=dir keeps each daemon's stdout there (for --trace-gc and the like).
  const out = process.env.BENCH_DAEMON_STDOUT ? openSync(join(process.env.BENCH_DAEMON_STDOUT, `${basename(root)}.out`), 'w') : 'ignore';
  const proc = spawn(process.execPath, [...DAEMON_NODE_FLAGS, ...daemonArgs, bin], { env, stdio: ['ignore', out, 'inherit'] });
  await waitListening(port);
  const key = (await readFile(join(stateDir, 'gateway.key'), 'utf8')).trim();
  return { proc, port, key };
}

/** Runs `task` in a load worker against `target`, counting the CPU time its proxy processes used. */
async function runLoad(target, task, onStart) {
  const cpu0 = cpuMs(target.pids());
  const worker = forkWorker('gateway-load.mjs', { ...task, url: target.url, headers: target.headers });
  onStart?.();
  const result = await worker.first;
  return { ...result, cpuMs: cpuMs(target.pids()) - cpu0 };
}

async function main() {
  if (!existsSync(DAEMON_BIN)) throw new Error('run `npm run build` first');
  const root = await mkdtemp(join(tmpdir(), 'qgw-bench-'));
  const up = forkWorker('gateway-upstream.mjs');
  const { port: upstreamPort } = await up.first;
  const upstream = `http://127.0.0.1:${upstreamPort}`;
  const path = '/v1/chat/completions';
  const targets = { direct: { url: `${upstream}${path}`, headers: { authorization: 'Bearer direct' }, pids: () => [] } };
  const stops = [];

  const gateways = { gateway: DAEMON_BIN };
  if (opts.baseline) gateways.baseline = resolve(opts.baseline);
  for (const [name, bin] of Object.entries(gateways)) {
    const d = await startDaemon(bin, join(root, name), upstream);
    targets[name] = { url: `http://127.0.0.1:${d.port}${path}`, headers: { authorization: `Bearer ${d.key}` }, pids: () => [d.proc.pid], daemon: d.proc };
    stops.push(() => d.proc.kill('SIGTERM'));
  }

  const nginx = findNginx();
  if (nginx.path) {
    const port = await freePort();
    const proc = await startNginx(nginx.path, root, upstreamPort, port);
    await waitListening(port);
    const pids = withChildren(proc.pid);
    targets.nginx = { url: `http://127.0.0.1:${port}${path}`, headers: {}, pids: () => pids };
    stops.push(() => proc.kill('SIGTERM'));
  }
  const floor = forkWorker('gateway-node-proxy.mjs', { upstreamPort });
  const { port: floorPort } = await floor.first;
  targets['node:http'] = { url: `http://127.0.0.1:${floorPort}${path}`, headers: {}, pids: () => [floor.child.pid] };
  stops.push(() => floor.child.kill('SIGTERM'));
  const stack = forkWorker('gateway-undici-proxy.mjs', { upstreamPort });
  const { port: stackPort } = await stack.first;
  targets['node:http+undici'] = { url: `http://127.0.0.1:${stackPort}${path}`, headers: {}, pids: () => [stack.child.pid] };
  stops.push(() => stack.child.kill('SIGTERM'));
  const pipe = forkWorker('gateway-net-pipe.mjs', { upstreamPort });
  const { port: pipePort } = await pipe.first;
  targets['node:net'] = { url: `http://127.0.0.1:${pipePort}${path}`, headers: { authorization: 'Bearer direct' }, pids: () => [pipe.child.pid] };
  stops.push(() => pipe.child.kill('SIGTERM'));
  // What the gateway is held against: nginx, or the node:http proxy when nginx cannot be had.
  const reference = nginx.path ? 'nginx' : 'node:http';

  const load = { start: loadavg()[0] };
  console.log(`gateway bench: ${RATE_ROUNDS} rounds × ${DURATION_MS / 1000} s per target, ${SSE_ROUNDS} SSE rounds; load average ${load.start.toFixed(2)} on ${cpus().length} cores${nginx.note ? `; ${nginx.note}` : ''}`);

  const only = opts.only?.split(',');
  const names = Object.keys(targets).filter((n) => !only || n === 'direct' || only.includes(n));
  const rotated = (round) => [...names.slice(round % names.length), ...names.slice(0, round % names.length)];
  const latency = Object.fromEntries(names.map((k) => [k, []]));
  const rate = Object.fromEntries(names.map((k) => [k, { n: 0, ms: 0, errors: 0, cpuMs: 0 }]));
  for (let round = 0; round < RATE_ROUNDS; round++) {
    // Rotate who goes first, so no target always runs on a warmer or colder machine.
    for (const name of rotated(round)) {
      const l = await runLoad(targets[name], { mode: 'latency', connections: 1, durationMs: DURATION_MS / 2 });
      latency[name].push(...l.samples);
      const t = await runLoad(targets[name], { mode: 'latency', connections: CONNECTIONS, durationMs: DURATION_MS });
      rate[name].cpuMs += t.cpuMs;
      rate[name].n += t.samples.length;
      rate[name].ms += t.elapsedMs;
      rate[name].errors += t.errors + l.errors;
    }
  }

  // 1,000 concurrent SSE streams through each target; direct is the baseline of client and upstream.
  const sse = Object.fromEntries(names.map((k) => [k, { delays: [], open: [], finished: 0, started: 0, cpuMs: 0, rssPeakKb: 0 }]));
  for (let round = 0; round < SSE_ROUNDS; round++) {
    for (const name of rotated(round)) {
      const target = targets[name];
      let sampler = null;
      const result = await runLoad(target, { mode: 'sse', streams: STREAMS, events: EVENTS, intervalMs: INTERVAL_MS }, () => {
        if (!target.daemon) return;
        const sample = () => (sse[name].rssPeakKb = Math.max(sse[name].rssPeakKb, readRssKb(target.daemon.pid)));
        sample();
        sampler = setInterval(sample, 100);
      });
      if (sampler) clearInterval(sampler);
      sse[name].delays.push(...result.delays);
      // The events written once every stream was open: what 1,000 concurrent streams cost, without
      // the storm of 1,000 connections and requests arriving at once in front of them.
      for (let i = 0; i < result.delays.length; i++) if (result.stamps[i] > result.allOpenAt) sse[name].open.push(result.delays[i]);
      sse[name].finished += result.finished;
      sse[name].started += STREAMS;
      sse[name].cpuMs += result.cpuMs;
    }
  }
  load.end = loadavg()[0];

  const rows = {};
  for (const name of names) {
    const s = summarize(latency[name]);
    const e = summarize(sse[name].delays);
    const o = summarize(sse[name].open);
    rows[name] = {
      p50_us: s.p50,
      p99_us: s.p99,
      n: s.n,
      rps: (rate[name].n / rate[name].ms) * 1000,
      cpu_us_per_request: (rate[name].cpuMs * 1000) / rate[name].n,
      errors: rate[name].errors,
      sse: { p50_ms: e.p50, p99_ms: e.p99, events: e.n, open_p50_ms: o.p50, open_p99_ms: o.p99, open_events: o.n, finished: sse[name].finished, started: sse[name].started, cpu_us_per_event: (sse[name].cpuMs * 1000) / Math.max(1, e.n), rss_peak_kb: sse[name].rssPeakKb || null },
    };
  }
  const added = (name) => ({
    p50_us: rows[name].p50_us - rows.direct.p50_us,
    p99_us: rows[name].p99_us - rows.direct.p99_us,
    sse_p99_ms: rows[name].sse.p99_ms - rows.direct.sse.p99_ms,
    sse_open_p99_ms: rows[name].sse.open_p99_ms - rows.direct.sse.open_p99_ms,
  });
  for (const name of names) rows[name].added = added(name);

  const ms = (us) => `${(us / 1000).toFixed(3)} ms`;
  const proxyCpu = (name, v) => (name === 'direct' ? '-' : `${Math.round(v)} µs`);
  const lines = [];
  if (RATE_ROUNDS > 0) {
    lines.push(
      `| target | p50 (1 connection) | p99 (1 connection) | requests/s (${CONNECTIONS} connections) | proxy CPU per request | errors |`,
      '| --- | --- | --- | --- | --- | --- |',
      ...names.map((n) => `| ${n} | ${ms(rows[n].p50_us)} | ${ms(rows[n].p99_us)} | ${Math.round(rows[n].rps)} | ${proxyCpu(n, rows[n].cpu_us_per_request)} | ${rows[n].errors} |`),
      '',
    );
  }
  if (SSE_ROUNDS > 0) {
    lines.push(
      `| ${STREAMS} SSE streams × ${EVENTS} events, ${SSE_ROUNDS} rounds | event delay p50 | p99 | once all open: p50 | p99 | streams finished | proxy CPU per event | RSS peak |`,
      '| --- | --- | --- | --- | --- | --- | --- | --- |',
      ...names.map((n) => {
        const e = rows[n].sse;
        return `| ${n} | ${e.p50_ms.toFixed(2)} ms | ${e.p99_ms.toFixed(2)} ms | ${e.open_p50_ms.toFixed(2)} ms | ${e.open_p99_ms.toFixed(2)} ms (${e.open_events} events) | ${e.finished}/${e.started} | ${proxyCpu(n, e.cpu_us_per_event)} | ${e.rss_peak_kb ? `${(e.rss_peak_kb / 1024).toFixed(1)} MB` : '-'} |`;
      }),
      '',
    );
  }
  const gatewayNames = Object.keys(gateways).filter((n) => names.includes(n));
  const ref = rows[reference]?.added ?? { p50_us: NaN, p99_us: NaN, sse_p99_ms: NaN, sse_open_p99_ms: NaN };
  // A ratio of two added latencies, or an added delay, means nothing when the reference's own
  // addition is not above zero or direct's own p99 is far above the target: the machine's noise
  // is then larger than what is measured, and the check says so instead of yes or no.
  const verdict = (ok, conclusive) => (!conclusive ? 'inconclusive' : ok ? 'yes' : 'no');
  const sseConclusive = rows.direct.sse.p99_ms <= 10 * 5;
  lines.push('| check | measured | target | met |', '| --- | --- | --- | --- |');
  for (const g of gatewayNames) {
    const a = rows[g].added;
    const e = rows[g].sse;
    if (RATE_ROUNDS > 0) {
      lines.push(
        `| ${g} added p50 vs ${reference} | ${ms(a.p50_us)} vs ${ms(ref.p50_us)} (${(a.p50_us / ref.p50_us).toFixed(2)}×) | ≤ 2× | ${verdict(a.p50_us <= 2 * ref.p50_us, ref.p50_us > 0)} |`,
        `| ${g} added p99 vs ${reference} | ${ms(a.p99_us)} vs ${ms(ref.p99_us)} (${(a.p99_us / ref.p99_us).toFixed(2)}×) | ≤ 3× | ${verdict(a.p99_us <= 3 * ref.p99_us, ref.p99_us > 0)} |`,
        `| ${g} requests/s vs ${reference} | ${Math.round(rows[g].rps)} vs ${Math.round(rows[reference]?.rps)} (${(rows[g].rps / rows[reference]?.rps).toFixed(2)}×) | ≥ 0.4× | ${rows[g].rps >= 0.4 * rows[reference]?.rps ? 'yes' : 'no'} |`,
      );
    }
    if (SSE_ROUNDS > 0) {
      const finished = e.finished === e.started;
      lines.push(
        `| ${g}: SSE event delay p99 − direct's, every event | ${e.p99_ms.toFixed(2)} − ${rows.direct.sse.p99_ms.toFixed(2)} = ${a.sse_p99_ms.toFixed(2)} ms (${e.finished}/${e.started} streams; ${reference}: ${ref.sse_p99_ms.toFixed(2)} ms) | ≤ 5 ms | ${finished ? verdict(a.sse_p99_ms <= 5, sseConclusive) : 'no'} |`,
        `| ${g}: SSE event delay p99 − direct's, once all streams are open | ${e.open_p99_ms.toFixed(2)} − ${rows.direct.sse.open_p99_ms.toFixed(2)} = ${a.sse_open_p99_ms.toFixed(2)} ms (${reference}: ${ref.sse_open_p99_ms.toFixed(2)} ms) | ≤ 5 ms | ${finished ? verdict(a.sse_open_p99_ms <= 5, sseConclusive) : 'no'} |`,
        `| ${g}: daemon RSS peak during the streams | ${(e.rss_peak_kb / 1024).toFixed(1)} MB | ≤ 200 MB | ${e.rss_peak_kb <= 200 * 1024 ? 'yes' : 'no'} |`,
      );
    }
  }
  lines.push('', `Load average (1 min) ${load.start.toFixed(2)} at the start, ${load.end.toFixed(2)} at the end, ${cpus().length} cores; node ${process.version}.`);
  console.log(lines.join('\n'));
  await mkdir(join(REPO_ROOT, 'bench', 'results'), { recursive: true });
  await writeFile(join(REPO_ROOT, 'bench', 'results', 'gateway-latest.json'), JSON.stringify({ reference, nginxNote: nginx.note, rows, load, node: process.version }, null, 2));

  for (const stop of stops) stop();
  up.child.kill('SIGTERM');
  await sleep(300);
  await rm(root, { recursive: true, force: true });
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
