/**
 * B1: the cached getAccessToken() in a client process. Measured as batches of sequential awaited
 * calls, each batch timed with process.hrtime.bigint(); p50/p99 are over the per-call averages
 * of the batches (a single call is too short to time on its own). Baseline: the same process
 * reading + JSON-parsing + zod-validating the credential file per call (fs/promises readFile +
 * parseCredentialsText), timed the same way.
 */
import { startWorker } from '../lib/children.mjs';
import { startBenchDaemon } from '../lib/daemon.mjs';
import { fmtUs, round, summarize } from '../lib/stats.mjs';
import { row } from './common.mjs';

export async function runB1(ctx, { batches = 1000, perBatch = 1000, baselineBatches = 200, baselinePerBatch = 50 } = {}) {
  const d = await startBenchDaemon(ctx.server);
  try {
    const before = await d.status();
    const w = startWorker('cached-client.mjs', { batches, perBatch, baselineBatches, baselinePerBatch, credentialFile: d.tokenPath }, d.env);
    const r = await w.next('result');
    await w.stop();
    const cached = summarize(r.cachedNs.map((ns) => ns / 1000));
    const base = summarize(r.baselineNs.map((ns) => ns / 1000));
    const speedup = base.p50 / cached.p50;
    // The worker's own requests: hello, subscribe, one getAccessToken, status (and our status).
    const viaSocket = r.requestsServedAfter - before.requests_served;
    const correct = r.wrong === 0 && r.fp === before.token_fingerprint && viaSocket <= 5;
    return [
      row('B1', 'cached getAccessToken()', {
        measured: `p50 ${fmtUs(cached.p50)}, p99 ${fmtUs(cached.p99)}`,
        baseline: `p50 ${fmtUs(base.p50)}, p99 ${fmtUs(base.p99)}`,
        ratio: `${Math.round(speedup).toLocaleString('en-US')}x faster`,
        target: 'p50 ≤ 2 µs; ≥ 100x faster',
        pass: correct && cached.p50 <= 2 && speedup >= 100,
        data: {
          method: `${batches} batches x ${perBatch} sequential awaited calls; per-call time = batch time / ${perBatch}`,
          calls: r.calls,
          cachedUs: roundAll(cached),
          baselineMethod: `${baselineBatches} batches x ${baselinePerBatch} calls of readFile + JSON.parse + zod (parseCredentialsText)`,
          baselineUs: roundAll(base),
          speedup: round(speedup, 1),
          requestsThroughSocket: viaSocket,
          correct,
        },
      }),
    ];
  } finally {
    await d.close();
  }
}

function roundAll(s) {
  return Object.fromEntries(Object.entries(s).map(([k, v]) => [k, round(v, 4)]));
}
