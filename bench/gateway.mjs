#!/usr/bin/env node
/**
 * The gateway bench: one local upstream, reached (a) directly, (b) through the daemon's gateway
 * on loopback TCP and (c) through nginx as the same reverse proxy with a static Authorization
 * header (installed with apt when missing; when it cannot be, a bare node:http proxy stands
 * in and the table says so). Rounds alternate the three in the same minute, so a machine
 * loaded by other work moves all of them. Then 1,000 concurrent SSE streams through the
 * gateway (and directly, for the baseline), with each event's delay and the daemon's RSS.
 *
 * Usage: npm run build && node bench/gateway.mjs [--rounds N] [--seconds S] [--streams N]
 * Writes bench/results/gateway-latest.json.
 */
import { execFileSync, fork, spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { createServer, request as httpRequest, Agent } from 'node:http';
import { createServer as netServer } from 'node:net';
import { cpus, loadavg, tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
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
  },
});
const ROUNDS = Number(opts.rounds);
const DURATION_MS = Number(opts.seconds) * 1000;
const CONNECTIONS = Number(opts.connections);
const STREAMS = Number(opts.streams);
const EVENTS = Number(opts.events);
const INTERVAL_MS = Number(opts['interval-ms']);

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
  const child = fork(join(WORKERS, file), [], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
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

/** The fallback when nginx cannot be had: a bare node:http reverse proxy with the same static header. */
function startBareProxy(upstreamPort, port) {
  const agent = new Agent({ keepAlive: true, maxSockets: Infinity });
  const server = createServer((req, res) => {
    const headers = { ...req.headers, authorization: 'Bearer static-bench-credential', host: `127.0.0.1:${upstreamPort}` };
    delete headers.connection;
    const up = httpRequest({ host: '127.0.0.1', port: upstreamPort, method: req.method, path: req.url, headers, agent }, (r) => {
      res.writeHead(r.statusCode, r.headers);
      r.pipe(res);
    });
    up.on('error', () => res.destroy());
    req.pipe(up);
  });
  return new Promise((resolve) => server.listen(port, '127.0.0.1', () => resolve({ kill: () => server.close() })));
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

async function main() {
  if (!existsSync(DAEMON_BIN)) throw new Error('run `npm run build` first');
  const root = await mkdtemp(join(tmpdir(), 'qgw-bench-'));
  const up = forkWorker('gateway-upstream.mjs');
  const { port: upstreamPort } = await up.first;
  const upstream = `http://127.0.0.1:${upstreamPort}`;

  // The daemon: a credential whose resource_url is the upstream, the gateway's TCP listener on.
  const home = join(root, 'home');
  const stateDir = join(home, '.one_dragon_alpha');
  await mkdir(stateDir, { recursive: true, mode: 0o700 });
  await mkdir(join(root, 'run'), { recursive: true, mode: 0o700 });
  await writeFile(
    join(stateDir, 'qwen_oauth_creds.json'),
    JSON.stringify({ access_token: 'bench-access-token', refresh_token: 'bench-refresh-token', token_type: 'Bearer', resource_url: upstream, expiry_date: Date.now() + 6 * 3600_000 }),
    { mode: 0o600 },
  );
  const gatewayPort = await freePort();
  const configPath = join(root, 'config', 'config.json');
  await mkdir(dirname(configPath), { recursive: true, mode: 0o700 });
  await writeFile(configPath, JSON.stringify({ gateway: { tcp: { enabled: true, port: gatewayPort } } }), { mode: 0o600 });
  const env = { ...process.env };
  for (const key of Object.keys(env)) if (key.startsWith('QWEN_') || key === 'XDG_RUNTIME_DIR' || key === 'XDG_CONFIG_HOME') delete env[key];
  Object.assign(env, {
    HOME: home,
    QWEN_TOKEND_SOCKET: join(root, 'run', 'd.sock'),
    QWEN_TOKEND_CONFIG: configPath,
    QWEN_OAUTH_BASE_URL: 'http://127.0.0.1:9',
    QWEN_TOKEND_QWEN_CLI_SYNC: '0',
    QWEN_TOKEND_AUTOSTART: '0',
    // Access log lines (info) go to a file, as nginx's do.
    QWEN_TOKEND_LOG_FILE: join(root, 'daemon.log'),
  });
  // BENCH_DAEMON_ARGS="--cpu-prof --cpu-prof-dir=/tmp/prof" profiles the daemon, as in the main bench.
  const daemonArgs = (process.env.BENCH_DAEMON_ARGS ?? '').split(/\s+/).filter(Boolean);
  const daemon = spawn(process.execPath, [...daemonArgs, DAEMON_BIN], { env, stdio: ['ignore', 'ignore', 'inherit'] });
  await waitListening(gatewayPort);
  const key = (await readFile(join(stateDir, 'gateway.key'), 'utf8')).trim();

  const nginx = findNginx();
  const proxyPort = await freePort();
  const proxy = nginx.path ? await startNginx(nginx.path, root, upstreamPort, proxyPort) : await startBareProxy(upstreamPort, proxyPort);
  await waitListening(proxyPort);
  const proxyName = nginx.path ? 'nginx' : 'node:http proxy';
  // The processes whose CPU time each target costs (the upstream's is the same for all three).
  const proxyPids = nginx.path ? withChildren(proxy.pid) : [process.pid];
  const pidsOf = { direct: [], gateway: [daemon.pid], [proxyName]: proxyPids };

  const targets = {
    direct: { url: `${upstream}/v1/chat/completions`, headers: { authorization: 'Bearer direct' } },
    gateway: { url: `http://127.0.0.1:${gatewayPort}/v1/chat/completions`, headers: { authorization: `Bearer ${key}` } },
    [proxyName]: { url: `http://127.0.0.1:${proxyPort}/v1/chat/completions`, headers: {} },
  };
  const load = { start: loadavg()[0] };
  console.log(`gateway bench: ${ROUNDS} rounds × ${DURATION_MS / 1000} s per target; load average ${load.start.toFixed(2)} on ${cpus().length} cores${nginx.note ? `; ${nginx.note}` : ''}`);

  const latency = Object.fromEntries(Object.keys(targets).map((k) => [k, []]));
  const throughput = Object.fromEntries(Object.keys(targets).map((k) => [k, { n: 0, ms: 0, errors: 0, cpuMs: 0 }]));
  const order = Object.keys(targets);
  for (let round = 0; round < ROUNDS; round++) {
    // Rotate who goes first, so no target always runs on a warmer or colder machine.
    const names = [...order.slice(round % order.length), ...order.slice(0, round % order.length)];
    for (const name of names) {
      const one = forkWorker('gateway-load.mjs', { mode: 'latency', ...targets[name], connections: 1, durationMs: DURATION_MS / 2 });
      const l = await one.first;
      latency[name].push(...l.samples);
      const cpu0 = cpuMs(pidsOf[name]);
      const many = forkWorker('gateway-load.mjs', { mode: 'latency', ...targets[name], connections: CONNECTIONS, durationMs: DURATION_MS });
      const t = await many.first;
      throughput[name].cpuMs += cpuMs(pidsOf[name]) - cpu0;
      throughput[name].n += t.samples.length;
      throughput[name].ms += t.elapsedMs;
      throughput[name].errors += t.errors + l.errors;
    }
  }

  const rows = {};
  for (const name of Object.keys(targets)) {
    const s = summarize(latency[name]);
    rows[name] = {
      p50_us: s.p50,
      p99_us: s.p99,
      n: s.n,
      rps: (throughput[name].n / throughput[name].ms) * 1000,
      cpu_us_per_request: (throughput[name].cpuMs * 1000) / throughput[name].n,
      errors: throughput[name].errors,
    };
  }
  const direct = rows.direct;
  const added = (name) => ({ p50_us: rows[name].p50_us - direct.p50_us, p99_us: rows[name].p99_us - direct.p99_us });
  const gwAdded = added('gateway');
  const pxAdded = added(proxyName);

  // 1,000 concurrent SSE streams: directly (the baseline of the client and upstream), then through the gateway.
  const sseTask = { mode: 'sse', streams: STREAMS, events: EVENTS, intervalMs: INTERVAL_MS };
  const sseDirect = await forkWorker('gateway-load.mjs', { ...sseTask, ...targets.direct }).first;
  let rssPeakKb = readRssKb(daemon.pid);
  const sampler = setInterval(() => {
    rssPeakKb = Math.max(rssPeakKb, readRssKb(daemon.pid));
  }, 100);
  const sseCpu0 = cpuMs([daemon.pid]);
  const sseGateway = await forkWorker('gateway-load.mjs', { ...sseTask, ...targets.gateway }).first;
  const sseCpuUsPerEvent = ((cpuMs([daemon.pid]) - sseCpu0) * 1000) / Math.max(1, sseGateway.delays.length);
  clearInterval(sampler);
  const proxyCpu0 = cpuMs(proxyPids);
  const sseProxy = await forkWorker('gateway-load.mjs', { ...sseTask, ...targets[proxyName] }).first;
  const sseProxyCpuUsPerEvent = ((cpuMs(proxyPids) - proxyCpu0) * 1000) / Math.max(1, sseProxy.delays.length);
  const sd = summarize(sseDirect.delays);
  const sg = summarize(sseGateway.delays);
  const sp = summarize(sseProxy.delays);
  load.end = loadavg()[0];

  const ms = (us) => `${(us / 1000).toFixed(3)} ms`;
  const lines = [
    `| target | p50 (1 connection) | p99 (1 connection) | requests/s (${CONNECTIONS} connections) | proxy CPU per request | errors |`,
    '| --- | --- | --- | --- | --- | --- |',
    ...Object.keys(targets).map(
      (n) => `| ${n} | ${ms(rows[n].p50_us)} | ${ms(rows[n].p99_us)} | ${Math.round(rows[n].rps)} | ${n === 'direct' ? '-' : `${Math.round(rows[n].cpu_us_per_request)} µs`} | ${rows[n].errors} |`,
    ),
    '',
    `| ${STREAMS} SSE streams × ${EVENTS} events | event delay p50 | p99 | streams finished | proxy CPU per event |`,
    '| --- | --- | --- | --- | --- |',
    `| direct | ${sd.p50.toFixed(2)} ms | ${sd.p99.toFixed(2)} ms | ${sseDirect.finished} | - |`,
    `| gateway | ${sg.p50.toFixed(2)} ms | ${sg.p99.toFixed(2)} ms | ${sseGateway.finished} | ${Math.round(sseCpuUsPerEvent)} µs |`,
    `| ${proxyName} | ${sp.p50.toFixed(2)} ms | ${sp.p99.toFixed(2)} ms | ${sseProxy.finished} | ${Math.round(sseProxyCpuUsPerEvent)} µs |`,
    '',
    '| check | measured | target | met |',
    '| --- | --- | --- | --- |',
    `| gateway added p50 vs ${proxyName} | ${ms(gwAdded.p50_us)} vs ${ms(pxAdded.p50_us)} (${(gwAdded.p50_us / pxAdded.p50_us).toFixed(2)}×) | ≤ 2× | ${gwAdded.p50_us <= 2 * pxAdded.p50_us ? 'yes' : 'no'} |`,
    `| gateway added p99 vs ${proxyName} | ${ms(gwAdded.p99_us)} vs ${ms(pxAdded.p99_us)} (${(gwAdded.p99_us / pxAdded.p99_us).toFixed(2)}×) | ≤ 3× | ${gwAdded.p99_us <= 3 * pxAdded.p99_us ? 'yes' : 'no'} |`,
    `| gateway requests/s vs ${proxyName} | ${Math.round(rows.gateway.rps)} vs ${Math.round(rows[proxyName].rps)} (${(rows.gateway.rps / rows[proxyName].rps).toFixed(2)}×) | ≥ 0.4× | ${rows.gateway.rps >= 0.4 * rows[proxyName].rps ? 'yes' : 'no'} |`,
    `| ${STREAMS} SSE streams: event delay p99, gateway − direct | ${sg.p99.toFixed(2)} − ${sd.p99.toFixed(2)} = ${(sg.p99 - sd.p99).toFixed(2)} ms (${sseGateway.finished}/${STREAMS} streams, ${sg.n} events) | ≤ 5 ms | ${sg.p99 - sd.p99 <= 5 && sseGateway.finished === STREAMS ? 'yes' : 'no'} |`,
    `| daemon RSS peak during the streams | ${(rssPeakKb / 1024).toFixed(1)} MB | ≤ 200 MB | ${rssPeakKb <= 200 * 1024 ? 'yes' : 'no'} |`,
    '',
    `Load average (1 min) ${load.start.toFixed(2)} at the start, ${load.end.toFixed(2)} at the end, ${cpus().length} cores; node ${process.version}.`,
  ];
  console.log(lines.join('\n'));
  await mkdir(join(REPO_ROOT, 'bench', 'results'), { recursive: true });
  await writeFile(
    join(REPO_ROOT, 'bench', 'results', 'gateway-latest.json'),
    JSON.stringify(
      {
        proxy: proxyName,
        proxyNote: nginx.note,
        rows,
        gatewayAdded: gwAdded,
        proxyAdded: pxAdded,
        sse: { direct: sd, gateway: sg, proxy: sp, finished: sseGateway.finished, streams: STREAMS, gatewayCpuUsPerEvent: sseCpuUsPerEvent, proxyCpuUsPerEvent: sseProxyCpuUsPerEvent },
        rssPeakKb,
        load,
        node: process.version,
      },
      null,
      2,
    ),
  );

  proxy.kill('SIGTERM');
  daemon.kill('SIGTERM');
  up.child.kill('SIGTERM');
  await sleep(300);
  await rm(root, { recursive: true, force: true });
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
