// B1 worker: the cached getAccessToken() fast path in a client process, against the daemon,
// and the same process reading + parsing + validating the credential file per call.
import { readFile } from 'node:fs/promises';
import { TokenClient, fingerprint } from '../../dist/client/index.js';
import { parseCredentialsText } from '../../dist/shared/credentials.js';
import { args, fail, say } from './protocol.mjs';

/** Runs `batches` batches of `perBatch` sequential awaited calls; returns ns per call of each batch. */
async function perCallBatches(fn, batches, perBatch) {
  const out = new Array(batches);
  for (let b = 0; b < batches; b++) {
    const t0 = process.hrtime.bigint();
    for (let i = 0; i < perBatch; i++) await fn();
    out[b] = Number(process.hrtime.bigint() - t0) / perBatch;
  }
  return out;
}

try {
  const { batches, perBatch, baselineBatches, baselinePerBatch, credentialFile } = args;
  const client = new TokenClient({ autostart: false });
  const first = await client.getAccessToken();
  let wrong = 0;
  let last = first;
  const cached = async () => {
    last = await client.getAccessToken();
  };
  // Warm-up: let the JIT settle on the fast path before measuring.
  await perCallBatches(cached, Math.max(10, batches / 10), perBatch);
  const cachedNs = await perCallBatches(cached, batches, perBatch);
  if (last !== first) wrong++;

  const status = await client.status();
  const requestsAfter = status.requests_served;

  let parsed = null;
  const fromFile = async () => {
    parsed = parseCredentialsText(await readFile(credentialFile, 'utf8'), credentialFile);
  };
  await perCallBatches(fromFile, Math.max(5, baselineBatches / 10), baselinePerBatch);
  const baselineNs = await perCallBatches(fromFile, baselineBatches, baselinePerBatch);
  if (parsed?.access_token !== first) wrong++;

  say({
    type: 'result',
    cachedNs,
    baselineNs,
    calls: batches * perBatch,
    baselineCalls: baselineBatches * baselinePerBatch,
    fp: fingerprint(first),
    wrong,
    requestsServedAfter: requestsAfter,
  });
  await client.close();
} catch (err) {
  fail(err);
}
