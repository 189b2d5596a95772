// B4 context: what checking a burst's messages costs in a process that has not checked any
// before (as the daemon, or a client, when a burst arrives soon after start), against the same
// work once V8 has optimized it. Each first does what its process did before the burst (the
// daemon answered a few status requests; a client connected twice: hello and subscribe), so
// zod's shared code is as warm as it is there. One fresh process per kind:
// - "frame": a getAccessToken request as the daemon checks it (JSON.parse + the zod frame schema);
// - "answer": a token answer as the client library checks it (JSON.parse + the TokenResult schema).
import { EmptyParams, GetAccessTokenParams, HelloResult, SubscribeResult, TokenResult, requestSchemaFor } from '../../dist/shared/protocol.js';
import { args, say } from './protocol.mjs';

const { kind = 'frame', frames = 1000, warmFrames = 20_000 } = args;
const record = { access_token: 'a'.repeat(160), token_type: 'Bearer', expiry_date: Date.now() + 3_600_000, base_url: 'https://portal.qwen.ai/v1', resource_url: 'portal.qwen.ai' };
const lines = Array.from({ length: frames }, (_, i) =>
  kind === 'frame'
    ? JSON.stringify({ jsonrpc: '2.0', id: i + 1, method: 'getAccessToken', params: { minValidityMs: 60000 } })
    : JSON.stringify({ jsonrpc: '2.0', id: i + 1, result: record }),
);
const frameSchema = requestSchemaFor('getAccessToken', GetAccessTokenParams);

let before = 0;
if (kind === 'frame') {
  const status = requestSchemaFor('status', EmptyParams);
  for (let i = 0; i < 10; i++) before += status.safeParse(JSON.parse(`{"jsonrpc":"2.0","id":${i},"method":"status","params":{}}`)).success ? 1 : 0;
} else {
  for (let i = 0; i < 2; i++) {
    before += HelloResult.safeParse({ protocol: 1, daemon: 'qwen-tokend', version: '1.0.0', pid: 1 }).success ? 1 : 0;
    before += SubscribeResult.safeParse({ subscribed: true }).success ? 1 : 0;
  }
}
const checkOne = kind === 'frame' ? (line) => frameSchema.safeParse(JSON.parse(line)).success : (line) => TokenResult.safeParse(JSON.parse(line).result).success;

function check(n) {
  let valid = 0;
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < n; i++) if (checkOne(lines[i % frames])) valid++;
  return { us: Number(process.hrtime.bigint() - t0) / 1000 / n, valid };
}

const cold = check(frames);
check(warmFrames);
const warm = check(frames);
say({ type: 'result', coldUsPerFrame: cold.us, warmUsPerFrame: warm.us, valid: cold.valid + warm.valid === 2 * frames && before === (kind === 'frame' ? 10 : 4) });
process.exit(0);
