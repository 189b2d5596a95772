/**
 * Issue 18, item 7: `qwen-token login` prints what the device authorization server sent, so the
 * text is stripped of control characters first (an escape sequence could clear the screen,
 * retitle the window, or paint a different code over the real one), and only web addresses are
 * ever opened in a browser (that rule: test/security-url-trust.test.ts). A stand-in authorization server sends the hostile text.
 */
import { spawn } from 'node:child_process';
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import { CLI_BIN, createFixture } from './support/daemon.js';
import { until } from './support/wait.js';

const cleanups: Array<() => Promise<void>> = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c().catch(() => undefined);
});

const ESC = '\u001b';
const HOSTILE_CODE = `AB${ESC}[2J${ESC}]0;owned\u0007CD\u009b31m`;
const HOSTILE_URI = `https://chat.qwen.ai/authorize${ESC}[8m?x=1\u202e`;

/** A device authorization server whose answers carry terminal escape sequences. */
async function hostileServer(): Promise<string> {
  const server = createServer((req, res) => {
    req.resume();
    req.on('end', () => {
      res.setHeader('content-type', 'application/json');
      if (req.url?.endsWith('/device/code')) {
        res.end(
          JSON.stringify({
            device_code: 'device-code-0123456789',
            user_code: HOSTILE_CODE,
            verification_uri: HOSTILE_URI,
            verification_uri_complete: `${HOSTILE_URI}&user_code=x`,
            expires_in: 600,
            interval: 5,
          }),
        );
        return;
      }
      res.statusCode = 400;
      res.end(JSON.stringify({ error: 'authorization_pending' }));
    });
  });
  await new Promise<void>((done) => server.listen(0, '127.0.0.1', done));
  cleanups.push(() => new Promise<void>((done) => server.close(() => done())));
  return `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
}

describe('login shows server text safely (item 7)', () => {
  for (const json of [false, true]) {
    it(`strips control characters from the code and the URL (${json ? 'JSON' : 'human'} mode)`, async () => {
      const base = await hostileServer();
      const fx = await createFixture({ env: { QWEN_OAUTH_BASE_URL: base, QWEN_TOKEND_QWEN_CLI_SYNC: '0' } });
      cleanups.push(() => fx.cleanup());
      await fx.start();
      const child = spawn(process.execPath, [CLI_BIN, 'login', '--no-browser', ...(json ? ['--json'] : [])], { env: fx.env, stdio: ['ignore', 'pipe', 'pipe'] });
      cleanups.push(async () => void child.kill('SIGKILL'));
      let out = '';
      child.stdout.on('data', (c: Buffer) => (out += c.toString('utf8')));
      await until(() => (json ? out.includes('login.code') : out.includes('Code:')), 'the code on screen', 10_000);
      const exited = new Promise((r) => child.once('exit', r));
      child.kill('SIGKILL');
      await exited;

      // Nothing that a terminal interprets: C0 controls (other than newlines), DEL, C1, bidi overrides.
      // eslint-disable-next-line no-control-regex
      expect(out.replace(/\n/g, '')).not.toMatch(/[\u0000-\u001f\u007f-\u009f\u202a-\u202e]/);
      expect(out).toContain('AB[2J]0;ownedCD31m');
      expect(out).toContain('https://chat.qwen.ai/authorize[8m?x=1');
    });
  }
});
