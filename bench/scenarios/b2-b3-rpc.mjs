/**
 * B2: uncached round trips (getAccessToken({ noCache: true })) on one connection, per-call
 * latency from process.hrtime.bigint(), against a bare node:net NDJSON server in another
 * process answering lines of the daemon's reply size. Both run from one client process in
 * alternating blocks, so load drifting on a shared machine hits both alike.
 * B3: 16 client processes in closed loops for a fixed time, against the daemon and then the
 * same load against the bare server.
 */
import { join } from 'node:path';
import { startWorker } from '../lib/children.mjs';
import { readCpuMs, startBenchDaemon } from '../lib/daemon.mjs';
import { fmtRate, fmtUs, round, summarize } from '../lib/stats.mjs';
import { tokenRequestLine } from '../lib/wire.mjs';
import { replyBytesOf, row, withWorkers } from './common.mjs';

async function startEcho(d, workers) {
  const replyBytes = await replyBytesOf(d.socketPath, tokenRequestLine(1));
  const echoPath = join(d.root, 'run', 'echo.sock');
  const echo = startWorker('echo-server.mjs', { socketPath: echoPath, replyBytes }, d.env);
  workers.push(echo);
  const ready = await echo.next('ready');
  return { echoPath, replyBytes: ready.replyBytes, echoPid: echo.proc.pid };
}

/** B2; `blocks` x `perBlock` round trips each side after `warmup` of each. */
export async function runB2(ctx, { blocks = 10, perBlock = 2000, warmup = 2000 } = {}) {
  const d = await startBenchDaemon(ctx.server);
  try {
    return await withWorkers(async (workers) => {
      const { echoPath, replyBytes, echoPid } = await startEcho(d, workers);
      const cpu0 = await d.daemon.cpuMs();
      const echoCpu0 = await readCpuMs(echoPid);
      const w = startWorker('rpc-client.mjs', { mode: 'latency', target: 'both', echoPath, blocks, perBlock, warmup }, d.env);
      workers.push(w);
      const r = await w.next('result');
      const daemonCpuUsPerRequest = ((await d.daemon.cpuMs()) - cpu0) * 1000 / (blocks * perBlock + warmup + 1);
      const echoCpuUsPerRequest = ((await readCpuMs(echoPid)) - echoCpu0) * 1000 / (blocks * perBlock + warmup);
      const status = await d.status();
      const daemon = summarize(r.daemonUs);
      const echo = summarize(r.echoUs);
      const ratio = daemon.p50 / echo.p50;
      const correct = r.wrong === 0 && r.fp === status.token_fingerprint && r.daemonUs.length === blocks * perBlock;
      return [
        row('B2', 'uncached RPC round trip, 1 connection', {
          measured: `p50 ${fmtUs(daemon.p50)}, p99 ${fmtUs(daemon.p99)}`,
          baseline: `p50 ${fmtUs(echo.p50)}, p99 ${fmtUs(echo.p99)}`,
          ratio: `${ratio.toFixed(2)}x`,
          target: 'p50 ≤ 1.3x baseline',
          pass: correct && ratio <= 1.3,
          data: {
            roundTrips: r.daemonUs.length,
            requestBytes: Buffer.byteLength(tokenRequestLine(1)),
            replyBytes,
            daemonUs: roundAll(daemon),
            echoUs: roundAll(echo),
            ratioP50: round(ratio),
            ratioP99: round(daemon.p99 / echo.p99),
            daemonCpuUsPerRequest: round(daemonCpuUsPerRequest, 2),
            echoCpuUsPerRequest: round(echoCpuUsPerRequest, 2),
            correct,
          },
        }),
      ];
    });
  } finally {
    await d.close();
  }
}

async function throughput(env, processes, durationMs, target, echoPath) {
  return withWorkers(async (workers) => {
    for (let i = 0; i < processes; i++) workers.push(startWorker('rpc-client.mjs', { mode: 'throughput', target, echoPath }, env));
    await Promise.all(workers.map((w) => w.next('ready')));
    for (const w of workers) w.send({ cmd: 'go', durationMs });
    const results = await Promise.all(workers.map((w) => w.next('result')));
    return {
      rate: results.reduce((sum, r) => sum + r.count / (r.elapsedMs / 1000), 0),
      requests: results.reduce((sum, r) => sum + r.count, 0),
      wrong: results.reduce((sum, r) => sum + r.wrong, 0),
      fps: [...new Set(results.map((r) => r.fp))],
    };
  });
}

/** B3; `processes` closed-loop clients for `durationMs` against each side. */
export async function runB3(ctx, { processes = 16, durationMs = 10_000 } = {}) {
  const d = await startBenchDaemon(ctx.server);
  try {
    return await withWorkers(async (workers) => {
      const { echoPath } = await startEcho(d, workers);
      const cpu0 = await d.daemon.cpuMs();
      const daemon = await throughput(d.env, processes, durationMs, 'daemon', echoPath);
      const daemonCpuMs = (await d.daemon.cpuMs()) - cpu0;
      const echo = await throughput(d.env, processes, durationMs, 'echo', echoPath);
      const status = await d.status();
      const ratio = daemon.rate / echo.rate;
      const correct = daemon.wrong === 0 && echo.wrong === 0 && daemon.fps.length === 1 && daemon.fps[0] === status.token_fingerprint;
      return [
        row('B3', `throughput, ${processes} client processes, ${durationMs / 1000} s`, {
          measured: fmtRate(daemon.rate),
          baseline: fmtRate(echo.rate),
          ratio: `${ratio.toFixed(2)}x`,
          target: '≥ 0.5x baseline',
          pass: correct && ratio >= 0.5,
          data: {
            daemonRequests: daemon.requests,
            daemonPerSecond: round(daemon.rate, 0),
            echoRequests: echo.requests,
            echoPerSecond: round(echo.rate, 0),
            ratio: round(ratio),
            daemonCpuUsPerRequest: round((daemonCpuMs * 1000) / daemon.requests, 2),
            correct,
          },
        }),
      ];
    });
  } finally {
    await d.close();
  }
}

function roundAll(s) {
  return Object.fromEntries(Object.entries(s).map(([k, v]) => [k, round(v, 2)]));
}
