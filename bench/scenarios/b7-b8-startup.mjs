/**
 * B7: `qwen-token token` end to end (spawn to exit, the token printed on stdout), median of 20,
 * against `node -e ""` spawned the same way, interleaved run by run.
 * B8: daemon spawn until its socket accepts a connection (polled every 2 ms), median of 10.
 */
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { rm } from 'node:fs/promises';
import { fingerprint } from '../../dist/client/index.js';
import { assertNoTokens, credsFrom, prepareHome, spawnDaemon, startBenchDaemon } from '../lib/daemon.mjs';
import { CLI_BIN } from '../lib/paths.mjs';
import { fmtMs, median, round } from '../lib/stats.mjs';
import { row } from './common.mjs';

/** Spawns a process; resolves with ms from spawn to exit, and its stdout. */
function timedRun(args, env) {
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    const proc = spawn(process.execPath, args, { env, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    let printedMs = null;
    proc.stdout.on('data', (d) => {
      stdout += d;
      if (printedMs === null && stdout.includes('\n')) printedMs = performance.now() - t0;
    });
    proc.stderr.on('data', (d) => {
      stderr += d;
    });
    proc.once('error', reject);
    proc.once('close', (code) => resolve({ ms: performance.now() - t0, printedMs, code, stdout, stderr }));
  });
}

export async function runB7(ctx, { runs = 20, warmup = 2, cliBin = CLI_BIN } = {}) {
  if (!existsSync(cliBin)) {
    return [row('B7', 'qwen-token token, end to end', { measured: 'CLI missing', target: '≤ 2.5x baseline', pass: false, data: { missing: cliBin } })];
  }
  const d = await startBenchDaemon(ctx.server);
  try {
    const expected = (await d.status()).token_fingerprint;
    const cli = [];
    const printed = [];
    const node = [];
    let wrong = 0;
    let failure = null;
    for (let i = 0; i < warmup + runs; i++) {
      const c = await timedRun([cliBin, 'token'], d.env);
      const n = await timedRun(['-e', ''], d.env);
      if (c.code !== 0 || fingerprint(c.stdout.trim()) !== expected || !c.stdout.endsWith('\n')) {
        wrong++;
        failure ??= `exit ${c.code}: ${c.stderr.trim().split('\n')[0] ?? ''}`;
      }
      if (i < warmup) continue;
      cli.push(c.ms);
      printed.push(c.printedMs ?? Number.NaN);
      node.push(n.ms);
    }
    const m = median(cli);
    const b = median(node);
    const ratio = m / b;
    return [
      row('B7', '`qwen-token token`, end to end', {
        measured: `median ${fmtMs(m)}`,
        baseline: `node -e "": ${fmtMs(b)}`,
        ratio: `${ratio.toFixed(2)}x`,
        target: '≤ 2.5x baseline',
        pass: wrong === 0 && ratio <= 2.5,
        data: {
          runs,
          cliMs: cli.map((v) => round(v, 1)),
          tokenPrintedMs: printed.map((v) => round(v, 1)),
          nodeMs: node.map((v) => round(v, 1)),
          medianCliMs: round(m, 1),
          medianTokenPrintedMs: round(median(printed), 1),
          medianNodeMs: round(b, 1),
          wrong,
          ...(failure ? { failure } : {}),
        },
      }),
    ];
  } finally {
    await d.close();
  }
}

export async function runB8(ctx, { runs = 10, warmup = 1 } = {}) {
  const home = await prepareHome(ctx.server, credsFrom(ctx.server));
  const times = [];
  const node = [];
  try {
    for (let i = 0; i < warmup + runs; i++) {
      const daemon = await spawnDaemon(home, { pollMs: 2 });
      if (i >= warmup) times.push(daemon.readyMs);
      await daemon.stop();
      assertNoTokens(ctx.server, daemon.output.join('\n'));
      // For context only (no target): how long a bare Node start takes on this machine now.
      const bare = await timedRun(['-e', ''], home.env);
      if (i >= warmup) node.push(bare.ms);
    }
  } finally {
    await rm(home.root, { recursive: true, force: true });
  }
  const m = median(times);
  const bare = median(node);
  return [
    row('B8', 'daemon start to ready (socket accepts)', {
      measured: `median ${fmtMs(m)}`,
      baseline: `(context: node -e "" ${fmtMs(bare)})`,
      target: '≤ 300 ms',
      pass: m <= 300,
      data: { runs, readyMs: times.map((v) => round(v, 1)), medianMs: round(m, 1), nodeBareMs: node.map((v) => round(v, 1)), medianNodeBareMs: round(bare, 1) },
    }),
  ];
}
