/**
 * B4: the token is past expiry and 1,000 getAccessToken() calls arrive at once over several
 * connections (child processes, so the bench process hosting the Qwen server stays idle).
 * The daemon starts on an expired token, its own refresh at start-up is answered 503, and the
 * retry is 10 minutes away: the burst is what makes it refresh. Exactly one refresh must reach
 * the server; every call must get the new token. Baseline: direct HTTP refresh calls from this
 * process to the same server (one warm-up, then the median of `baselineCalls`).
 * The target's reference, from the same run: the same burst against a bare server (one refresh,
 * then an answer per line, nothing checked). Context: the same burst against a second daemon from raw
 * clients, what checking a request (daemon) and an answer (client) costs in a fresh process, and
 * the CPU time every process spends on each burst: over the core count, the least wall time the
 * burst can take here.
 */
import { cpus } from 'node:os';
import { join } from 'node:path';
import { startWorker } from '../lib/children.mjs';
import { tokenRequestLine } from '../lib/wire.mjs';
import { rm } from 'node:fs/promises';
import { expiredCredsFrom, prepareHome, readCpuMs, startBenchDaemon } from '../lib/daemon.mjs';
import { fmtMs, median, round, summarize } from '../lib/stats.mjs';
import { replyBytesOf, row, until, withWorkers } from './common.mjs';

/**
 * B4's target, measured in the same run: the daemon's p99 over the direct refresh may exceed the
 * bare server's p99 over it by at most this many ms.
 */
const B4_MARGIN_MS = 10;

/** Whether a burst's p99 meets B4's target against the bare server's p99 (both over `baseline`). */
function meetsB4(p99, bareP99, baseline) {
  return p99 - baseline <= bareP99 - baseline + B4_MARGIN_MS;
}

/**
 * CPU time (ms, from /proc/<pid>/schedstat) that the server side and the client processes spend
 * from `go` until every answer is in. Their sum over the core count is the least wall time the
 * burst can take on this machine, however its work is scheduled.
 */
async function burstCpu(serverPid, clientPids, run) {
  const before = await Promise.all([serverPid, ...clientPids].map(readCpuMs));
  const result = await run();
  const after = await Promise.all([serverPid, ...clientPids].map(readCpuMs));
  const used = after.map((v, i) => v - before[i]);
  const server = used[0];
  const clients = used.slice(1).reduce((a, b) => a + b, 0);
  return { result, cpu: { serverMs: round(server, 1), clientsMs: round(clients, 1), floorMs: round((server + clients) / cpus().length, 1) } };
}

/** One refresh grant straight to the server, timed end to end (response body read). */
async function directRefresh(server) {
  const { refresh_token } = server.issueTokens();
  const body = new URLSearchParams({ grant_type: 'refresh_token', refresh_token, client_id: server.settings.clientId });
  const t0 = performance.now();
  const res = await fetch(`${server.baseUrl}/api/v1/oauth2/token`, {
    method: 'POST',
    headers: { 'content-type': 'application/x-www-form-urlencoded', accept: 'application/json' },
    body,
  });
  const json = await res.json();
  const ms = performance.now() - t0;
  if (!res.ok || typeof json.access_token !== 'string') throw new Error(`direct refresh failed: HTTP ${res.status}`);
  return ms;
}

/** B4's baseline: one warm-up refresh, then the median of `calls` direct refreshes (and the samples). */
async function directBaseline(server, calls) {
  await directRefresh(server);
  const samples = [];
  for (let i = 0; i < calls; i++) samples.push(await directRefresh(server));
  return { baseline: median(samples), samples };
}

/**
 * B4's reference: the same burst, same shape, against a bare NDJSON server that makes one HTTP
 * refresh and then answers every line, with no validation at all.
 */
async function bareBurst(server, env, dir, replyBytes, { processes, connectionsPerProcess, callsPerConnection }) {
  return withWorkers(async (workers) => {
    const socketPath = join(dir, 'bare-burst.sock');
    const bare = startWorker('bare-burst-server.mjs', { socketPath, replyBytes, warmUrl: `${server.baseUrl}/warm-up` }, env);
    workers.push(bare);
    await bare.next('ready');
    const clients = [];
    for (let i = 0; i < processes; i++) {
      const w = startWorker('raw-burst.mjs', { socketPath, connections: connectionsPerProcess, callsPerConnection }, env);
      workers.push(w);
      clients.push(w);
    }
    await Promise.all(clients.map((w) => w.next('ready')));
    const { refresh_token } = server.issueTokens();
    bare.send({ cmd: 'arm', url: `${server.baseUrl}/api/v1/oauth2/token`, form: { grant_type: 'refresh_token', refresh_token, client_id: server.settings.clientId } });
    await bare.next('armed');
    const { result, cpu } = await burstCpu(bare.proc.pid, clients.map((w) => w.proc.pid), () => {
      for (const w of clients) w.send({ cmd: 'go' });
      return Promise.all(clients.map((w) => w.next('result')));
    });
    return { latency: summarize(result.flatMap((r) => r.latMs)), cpu };
  });
}

/**
 * Context for B4: µs per message to parse and validate `frames` messages in a fresh process,
 * then warm; `kind` "frame" is the daemon's check of a request, "answer" the client's of a reply.
 */
async function coldValidation(env, kind, frames) {
  return withWorkers(async (workers) => {
    const w = startWorker('cold-validation.mjs', { kind, frames }, env);
    workers.push(w);
    const r = await w.next('result');
    if (!r.valid) throw new Error(`the ${kind} schema rejected a valid message`);
    return r;
  });
}

/**
 * A daemon started on an expired token whose start-up refresh was answered 503, with the retry
 * 10 minutes away and requests free to refresh at once after a failure
 * (`QWEN_TOKEND_REQUEST_RETRY_MS=0`; 5 s by default): the next getAccessToken is what makes it
 * refresh.
 */
async function startExpiredDaemon(server) {
  server.clearFaults();
  server.injectFault({ kind: '5xx', endpoint: 'token', times: 1 });
  const refreshesAtStart = server.counts.refresh;
  const d = await startBenchDaemon(server, { creds: expiredCredsFrom(server), env: { QWEN_TOKEND_RETRY_MS: '600000', QWEN_TOKEND_REQUEST_RETRY_MS: '0' } });
  try {
    await until(async () => {
      const s = await d.status();
      return s.state === 'expired' && s.retry_count >= 1;
    }, 10_000, 'the daemon to hold an expired token after a failed refresh');
    if (server.counts.refresh !== refreshesAtStart + 1) throw new Error('expected exactly the one failed start-up refresh');
    return d;
  } catch (err) {
    await d.close();
    throw err;
  }
}

/**
 * Context for B4: the same burst against a second, equally fresh daemon, sent by raw clients
 * (one write of all its lines per connection, as the bare burst's clients do) instead of
 * through the client library: what the daemon alone costs.
 */
async function rawClientsBurst(server, { processes, connectionsPerProcess, callsPerConnection }) {
  const d = await startExpiredDaemon(server);
  try {
    return await withWorkers(async (workers) => {
      for (let i = 0; i < processes; i++) {
        workers.push(startWorker('raw-burst.mjs', { socketPath: d.socketPath, connections: connectionsPerProcess, callsPerConnection }, d.env));
      }
      await Promise.all(workers.map((w) => w.next('ready')));
      const before = server.counts.refresh;
      const { result, cpu } = await burstCpu(d.daemon.pid, workers.map((w) => w.proc.pid), () => {
        for (const w of workers) w.send({ cmd: 'go' });
        return Promise.all(workers.map((w) => w.next('result')));
      });
      if (server.counts.refresh - before !== 1) throw new Error('the raw-client burst did not cause exactly one refresh');
      return { latency: summarize(result.flatMap((r) => r.latMs)), cpu };
    });
  } finally {
    server.clearFaults();
    await d.close();
  }
}

/**
 * The burst B4 measures, against the daemon `d` (holding an expired token): `processes` child
 * processes, each with `connectionsPerProcess` TokenClients firing `callsPerConnection`
 * concurrent getAccessToken() calls at "go".
 */
async function libraryClientsBurst(d, server, { processes, connectionsPerProcess, callsPerConnection }) {
  return withWorkers(async (workers) => {
    for (let i = 0; i < processes; i++) {
      workers.push(startWorker('burst-client.mjs', { connections: connectionsPerProcess, callsPerConnection }, d.env));
    }
    await Promise.all(workers.map((w) => w.next('ready')));
    const refreshesBefore = server.counts.refresh;
    const goAt = Date.now();
    const { result: results, cpu } = await burstCpu(d.daemon.pid, workers.map((w) => w.proc.pid), () => {
      for (const w of workers) w.send({ cmd: 'go' });
      return Promise.all(workers.map((w) => w.next('result')));
    });
    const fps = {};
    const errors = {};
    for (const r of results) {
      for (const [fp, n] of Object.entries(r.fps)) fps[fp] = (fps[fp] ?? 0) + n;
      for (const [code, n] of Object.entries(r.errors)) errors[code] = (errors[code] ?? 0) + n;
    }
    return {
      latency: summarize(results.flatMap((r) => r.latMs)),
      cpu,
      refreshes: server.counts.refresh - refreshesBefore,
      // When the one refresh reached the server, from "go" (server clock = this process's clock).
      refreshArrivedMs: (server.lastRequest('token')?.at ?? Number.NaN) - goAt,
      fps,
      errors,
    };
  });
}

export async function runB4(ctx, { processes = 4, connectionsPerProcess = 2, callsPerConnection = 125, baselineCalls = 5, context = true } = {}) {
  const { server } = ctx;
  const shape = { processes, connectionsPerProcess, callsPerConnection };
  const total = processes * connectionsPerProcess * callsPerConnection;
  const d = await startExpiredDaemon(server);
  try {
    const oldFp = (await d.status()).token_fingerprint;
    const { baseline, samples: baselineSamples } = await directBaseline(server, baselineCalls);
    const burst = await libraryClientsBurst(d, server, shape);
    const { cpu, refreshes, fps, errors } = burst;
    const lat = burst.latency;
    const status = await d.status();
    const answered = fps[status.token_fingerprint] ?? 0;
    const correct = refreshes === 1 && answered === total && status.token_fingerprint !== oldFp && Object.keys(errors).length === 0;
    const replyBytes = await replyBytesOf(d.socketPath, tokenRequestLine(1));
    const bareRun = context ? await bareBurst(server, d.env, join(d.root, 'run'), replyBytes, shape) : null;
    const validation = context ? await coldValidation(d.env, 'frame', total) : null;
    const answerValidation = context ? await coldValidation(d.env, 'answer', total / processes) : null;
    const rawRun = context ? await rawClientsBurst(server, shape) : null;
    const bare = bareRun?.latency;
    const rawClients = rawRun?.latency;
    return [
      row('B4', `expired token, ${total.toLocaleString('en-US')} concurrent calls`, {
        measured: `${refreshes} refresh; p50 ${fmtMs(lat.p50)}, p99 ${fmtMs(lat.p99)}; CPU floor ${fmtMs(cpu.floorMs)}`,
        baseline: `1 HTTP refresh: ${fmtMs(baseline)}${bare ? `; bare server p99 ${fmtMs(bare.p99)} (context: daemon with raw clients p99 ${fmtMs(rawClients.p99)})` : ''}`,
        ratio: `p99 - refresh = ${fmtMs(lat.p99 - baseline)}${bare ? ` (bare: ${fmtMs(bare.p99 - baseline)})` : ''}`,
        target: `exactly 1 refresh; p99 - refresh ≤ bare p99 - refresh + ${B4_MARGIN_MS} ms`,
        // Without the bare run (context: false, the smoke test) there is no reference: correctness only.
        pass: correct && (bare ? meetsB4(lat.p99, bare.p99, baseline) : true),
        data: {
          calls: total,
          connections: processes * connectionsPerProcess,
          processes,
          refreshes,
          callsGivenNewToken: answered,
          errors,
          latencyMs: Object.fromEntries(Object.entries(lat).map(([k, v]) => [k, round(v)])),
          directRefreshMs: baselineSamples.map((v) => round(v)),
          baselineMs: round(baseline),
          ...(bare ? { bareBurstMs: Object.fromEntries(Object.entries(bare).map(([k, v]) => [k, round(v)])) } : {}),
          ...(rawClients ? { daemonWithRawClientsMs: Object.fromEntries(Object.entries(rawClients).map(([k, v]) => [k, round(v)])) } : {}),
          ...(validation
            ? {
                frameCheckUs: {
                  method: `daemon side, JSON.parse + zod frame schema per request: the first ${total} in a fresh process, then the same once optimized`,
                  cold: round(validation.coldUsPerFrame, 2),
                  warm: round(validation.warmUsPerFrame, 2),
                },
                answerCheckUs: {
                  method: `client side, JSON.parse + zod TokenResult schema per answer: the first ${total / processes} (one client process's share) in a fresh process, then the same once optimized`,
                  cold: round(answerValidation.coldUsPerFrame, 2),
                  warm: round(answerValidation.warmUsPerFrame, 2),
                },
              }
            : {}),
          refreshReachedServerAfterMs: burst.refreshArrivedMs,
          cpuMs: {
            method: `CPU time from "go" to the last answer: the server side (daemon or bare server) and the sum of the ${processes} client processes; floor = their sum / ${cpus().length} cores, the least wall time the burst can take here`,
            daemonWithLibraryClients: cpu,
            ...(rawRun ? { daemonWithRawClients: rawRun.cpu } : {}),
            ...(bareRun ? { bareBurst: bareRun.cpu } : {}),
          },
          correct,
        },
      }),
    ];
  } finally {
    server.clearFaults();
    await d.close();
  }
}

/**
 * `--b4-rounds N`: how often B4's target can be met on this machine, and by what. Each round
 * runs the same burst three ways, in an order that rotates from round to round, each right
 * after its own baseline (median of direct refreshes) and on a fresh server process:
 * - `bare`: the bare server (one refresh, then an answer of the daemon's size per line, no
 *   checks) with raw clients: the least any implementation can do;
 * - `raw`: the daemon with raw clients (one write of all lines per connection);
 * - `library`: the daemon with TokenClient, as B4 measures it.
 * Reports every burst and, per way, how many met B4's target against the same round's bare burst.
 */
export async function runB4Rounds(ctx, { rounds = 10, processes = 4, connectionsPerProcess = 2, callsPerConnection = 125, baselineCalls = 5, onBurst = () => undefined } = {}) {
  const { server } = ctx;
  const shape = { processes, connectionsPerProcess, callsPerConnection };
  const total = processes * connectionsPerProcess * callsPerConnection;
  // The bare server answers with lines as long as the daemon's answers.
  const valid = await startBenchDaemon(server);
  let replyBytes;
  try {
    replyBytes = await replyBytesOf(valid.socketPath, tokenRequestLine(1));
  } finally {
    await valid.close();
  }
  const home = await prepareHome(server, null);
  const ways = {
    bare: () => bareBurst(server, home.env, join(home.root, 'run'), replyBytes, shape),
    raw: () => rawClientsBurst(server, shape),
    library: async () => {
      const d = await startExpiredDaemon(server);
      try {
        const burst = await libraryClientsBurst(d, server, shape);
        const answered = burst.fps[(await d.status()).token_fingerprint] ?? 0;
        if (burst.refreshes !== 1 || answered !== total || Object.keys(burst.errors).length > 0) {
          throw new Error(`the library burst went wrong: ${burst.refreshes} refreshes, ${answered} of ${total} calls given the new token, errors ${JSON.stringify(burst.errors)}`);
        }
        return burst;
      } finally {
        server.clearFaults();
        await d.close();
      }
    },
  };
  const order = Object.keys(ways);
  const bursts = [];
  try {
    for (let r = 0; r < rounds; r++) {
      for (let i = 0; i < order.length; i++) {
        const way = order[(r + i) % order.length];
        const { baseline } = await directBaseline(server, baselineCalls);
        const { latency, cpu } = await ways[way]();
        const burst = {
          round: r + 1,
          way,
          baselineMs: round(baseline),
          p99Ms: round(latency.p99),
          overBaselineMs: round(latency.p99 - baseline),
          cpuMs: cpu,
        };
        bursts.push(burst);
      }
      // Each way against this round's bare burst.
      const thisRound = bursts.filter((b) => b.round === r + 1);
      const bare = thisRound.find((b) => b.way === 'bare');
      for (const b of thisRound) {
        b.met = b.overBaselineMs <= bare.overBaselineMs + B4_MARGIN_MS;
        onBurst(b);
      }
    }
  } finally {
    await rm(home.root, { recursive: true, force: true });
  }
  const summary = order.map((way) => {
    const mine = bursts.filter((b) => b.way === way);
    const over = summarize(mine.map((b) => b.overBaselineMs));
    return {
      way,
      bursts: mine.length,
      met: mine.filter((b) => b.met).length,
      overBaselineMs: { min: round(over.min), median: round(over.p50), max: round(over.max) },
      medianCpuMs: {
        server: round(median(mine.map((b) => b.cpuMs.serverMs)), 1),
        clients: round(median(mine.map((b) => b.cpuMs.clientsMs)), 1),
        floor: round(median(mine.map((b) => b.cpuMs.floorMs)), 1),
      },
    };
  });
  return { calls: total, shape, marginMs: B4_MARGIN_MS, summary, bursts };
}
