// B4 context: what checking a burst of getAccessToken frames costs in a process that has not
// checked any before (as the daemon when a burst arrives soon after start), against the same
// work once V8 has optimized it. Per frame: JSON.parse + the daemon's zod frame schema.
import { GetAccessTokenParams, requestSchemaFor } from '../../dist/shared/protocol.js';
import { args, say } from './protocol.mjs';

const { frames = 1000, warmFrames = 20_000 } = args;
const schema = requestSchemaFor('getAccessToken', GetAccessTokenParams);
const lines = Array.from({ length: frames }, (_, i) => JSON.stringify({ jsonrpc: '2.0', id: i + 1, method: 'getAccessToken', params: { minValidityMs: 60000 } }));

function check(n) {
  let valid = 0;
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < n; i++) if (schema.safeParse(JSON.parse(lines[i % frames])).success) valid++;
  return { us: Number(process.hrtime.bigint() - t0) / 1000 / n, valid };
}

const cold = check(frames);
check(warmFrames);
const warm = check(frames);
say({ type: 'result', coldUsPerFrame: cold.us, warmUsPerFrame: warm.us, valid: cold.valid + warm.valid === 2 * frames });
process.exit(0);
