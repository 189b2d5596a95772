// A separate client process for multi-process tests. Speaks to its parent on stdout in JSON
// lines carrying fingerprints only, never a token.
import { TokenClient, fingerprint } from '../../dist/client/index.js';

const client = new TokenClient({ autostart: process.env.QWEN_TOKEND_AUTOSTART !== '0' });
const say = (msg) => process.stdout.write(`${JSON.stringify(msg)}\n`);
client.on('token.refreshed', (t) => {
  const at = Date.now();
  // Answered from the pushed cache: no request reaches the daemon.
  client.getAccessToken().then((token) => say({ event: 'pushed', at, fp: fingerprint(t.access_token), cached: fingerprint(token) }));
});
try {
  const token = await client.getAccessToken();
  say({ event: 'token', fp: fingerprint(token) });
} catch (err) {
  say({ event: 'error', code: err.code, message: err.message });
  process.exit(1);
}
// Stay until the parent closes stdin.
process.stdin.resume();
process.stdin.on('end', () => client.close().then(() => process.exit(0)));
