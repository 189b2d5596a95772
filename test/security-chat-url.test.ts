/**
 * Issue 18, items 1, 8 and 9 (the cap on token responses): where clients send the access token.
 * A `resource_url` planted in the Qwen CLI's file, sent by the token endpoint, or handed over by
 * a daemon is checked where it comes in and again where it is used; one loopback test serves
 * every check; an oversized token response is a server error.
 */
import { createServer, type IncomingMessage, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import { QwenChatModel } from '../client/chat-model.js';
import { qwenBaseURL } from '../client/qwen-fetch.js';
import { resolveConfig } from '../shared/config.js';
import { DEFAULT_CHAT_BASE_URL } from '../shared/credentials.js';
import { QwenConfigError, QwenOAuthError } from '../shared/errors.js';
import { QwenOAuthClient } from '../daemon/oauth.js';
import { createFixture, credsFrom, type DaemonFixture } from './support/daemon.js';
import { QWEN_CLIENT_ID } from './support/qwen-server.js';

/** A listener standing in for an attacker's: records what reaches it. */
interface Listener {
  url: string;
  requests: Array<{ url: string; authorization: string | undefined; body: string }>;
  close(): Promise<void>;
}

async function startListener(answer: (req: IncomingMessage, body: string) => { status: number; body: string; headers?: Record<string, string> }): Promise<Listener & { server: Server }> {
  const requests: Listener['requests'] = [];
  const server = createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      const body = Buffer.concat(chunks).toString('utf8');
      requests.push({ url: req.url ?? '', authorization: req.headers.authorization, body });
      const out = answer(req, body);
      res.writeHead(out.status, { 'content-type': 'application/json', ...out.headers });
      res.end(out.body);
    });
  });
  await new Promise<void>((done) => server.listen(0, '127.0.0.1', done));
  const { port } = server.address() as AddressInfo;
  return {
    server,
    url: `http://127.0.0.1:${port}`,
    requests,
    close: () => new Promise<void>((done) => server.close(() => done())),
  };
}

const completion = JSON.stringify({ id: 'c1', choices: [{ index: 0, message: { role: 'assistant', content: 'hello from the attacker' }, finish_reason: 'stop' }] });

const cleanups: Array<() => Promise<void>> = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

async function fixture(env: Record<string, string | undefined> = {}): Promise<DaemonFixture> {
  const fx = await createFixture({ env });
  cleanups.push(() => fx.cleanup());
  return fx;
}

describe('one loopback check (item 8)', () => {
  it('the configuration and the OAuth client agree: 127.0.0.2 is loopback, 127.attacker.example is not', () => {
    const base = { clientId: QWEN_CLIENT_ID, scope: 'openid', timeoutMs: 1000 };
    // Before: config accepted anything starting with "127." and the OAuth client only an exact list.
    expect(() => resolveConfig({ HOME: '/h', QWEN_OAUTH_BASE_URL: 'http://127.attacker.example' })).toThrow(QwenConfigError);
    expect(() => new QwenOAuthClient({ ...base, baseUrl: 'http://127.attacker.example' })).toThrow(QwenConfigError);
    expect(resolveConfig({ HOME: '/h', QWEN_OAUTH_BASE_URL: 'http://127.0.0.2:8080' }).oauthBaseUrl).toBe('http://127.0.0.2:8080');
    expect(() => new QwenOAuthClient({ ...base, baseUrl: 'http://127.0.0.2:8080' })).not.toThrow();
    expect(() => new QwenOAuthClient({ ...base, baseUrl: 'http://[::1]:8080' })).not.toThrow();
  });
});

describe('a planted resource_url does not get the token (item 1, end to end)', () => {
  it('plain http in the Qwen CLI file: QwenChatModel.call() sends nothing to it', async () => {
    const attacker = await startListener(() => ({ status: 200, body: completion }));
    cleanups.push(() => attacker.close());
    // The real OAuth base URL (https): no refresh is due, so nothing reaches the network.
    const fx = await fixture({ QWEN_OAUTH_BASE_URL: undefined });
    await fx.writeCli({ ...credsFrom(fx.server), resource_url: attacker.url });
    await fx.start();
    const client = fx.client();

    const sent: string[] = [];
    // The transport under the token handling: loopback requests go out for real (so before the
    // fix the attacker's listener got the token); anything else is answered here, offline.
    const transport = async (input: string | URL | Request, init?: RequestInit): Promise<Response> => {
      const url = input instanceof Request ? input.url : String(input);
      sent.push(url);
      if (new URL(url).hostname === '127.0.0.1') return fetch(input, init);
      return new Response(JSON.stringify({ id: 'ok', choices: [{ index: 0, message: { role: 'assistant', content: 'hi' }, finish_reason: 'stop' }] }), {
        status: 200,
        headers: { 'content-type': 'application/json' },
      });
    };
    const model = new QwenChatModel({ client, fetch: transport });
    const { text } = await model.call('what is my token?');

    expect(attacker.requests).toHaveLength(0);
    expect(sent).toEqual([`${DEFAULT_CHAT_BASE_URL}/chat/completions`]);
    expect(text).toBe('hi');
    expect((await client.getCredentials()).base_url).toBe(DEFAULT_CHAT_BASE_URL);
    const warning = await fx.waitForLog((l) => l.msg.startsWith('ignoring the resource_url'));
    expect(warning.msg).toContain('plain http');
    // Reported once, however often the file is read.
    await fx.stop();
    expect(fx.logs().filter((l) => l.msg.startsWith('ignoring the resource_url'))).toHaveLength(1);
  });

  it('user info in the Qwen CLI file is refused by our check, not only by fetch', async () => {
    const fx = await fixture();
    await fx.writeCli({ ...credsFrom(fx.server), resource_url: 'portal.qwen.ai@attacker.example' });
    await fx.start();
    const token = await fx.client().getCredentials();
    expect(token.base_url).toBe(DEFAULT_CHAT_BASE_URL);
    expect(token.resource_url).toBeUndefined();
    // The import wrote our own file without the refused value.
    expect((await fx.readOwn())?.resource_url).toBeUndefined();
  });

  it('a token response naming an untrusted host: the default is used, and said once after the save', async () => {
    const fx = await fixture();
    fx.server.settings.resourceUrl = 'https://attacker.example';
    await fx.writeOwn(credsFrom(fx.server, 5));
    await fx.start();
    const client = fx.client();
    const refreshed = await client.refresh();
    expect(refreshed.base_url).toBe(DEFAULT_CHAT_BASE_URL);
    expect((await fx.readOwn())?.resource_url).toBeUndefined();
    const line = await fx.waitForLog((l) => l.msg.startsWith('ignoring the resource_url of the token response'));
    expect(line.reason).toContain('attacker.example');
  });

  it('the client checks again: a daemon that hands out an untrusted base URL is not followed', async () => {
    const fx = await fixture();
    await fx.writeOwn({ ...credsFrom(fx.server), resource_url: 'https://attacker.example' });
    // Only the daemon trusts any host; the client keeps the built-in list.
    await fx.start({ QWEN_TOKEND_CHAT_HOSTS: '*' });
    const client = fx.client();
    expect((await client.getCredentials()).base_url).toBe('https://attacker.example/v1');
    const warnings: string[] = [];
    const onWarning = (w: Error) => warnings.push(w.message);
    process.on('warning', onWarning);
    cleanups.push(async () => void process.off('warning', onWarning));
    expect(await qwenBaseURL(client)).toBe(DEFAULT_CHAT_BASE_URL);
    await new Promise((r) => setImmediate(r));
    expect(warnings.some((w) => w.includes('attacker.example') && w.includes('not a trusted chat host'))).toBe(true);
  });
});

describe('token responses are capped (item 9)', () => {
  const MAX_RESPONSE_BYTES = 64 * 1024;
  const big = (extra: number) =>
    JSON.stringify({ access_token: 'a'.repeat(20), token_type: 'Bearer', expires_in: 3600, refresh_token: 'r'.repeat(20), pad: 'x'.repeat(extra) });

  for (const mode of ['with Content-Length', 'chunked'] as const) {
    it(`a token response over ${MAX_RESPONSE_BYTES / 1024} KiB (${mode}) is a retryable server error`, async () => {
      const body = big(MAX_RESPONSE_BYTES + 1);
      const server = await startListener(() => ({
        status: 200,
        body,
        headers: mode === 'chunked' ? { 'transfer-encoding': 'chunked' } : { 'content-length': String(Buffer.byteLength(body)) },
      }));
      cleanups.push(() => server.close());
      const oauth = new QwenOAuthClient({ baseUrl: server.url, clientId: QWEN_CLIENT_ID, scope: 'openid', timeoutMs: 5000 });
      const err = await oauth.refreshTokenGrant('r'.repeat(20)).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(QwenOAuthError);
      expect((err as QwenOAuthError).retryable).toBe(true);
      expect((err as QwenOAuthError).message).toContain('larger than 64 KiB');
    });
  }

  it('a token response under the cap is read as before', async () => {
    const server = await startListener(() => ({ status: 200, body: big(MAX_RESPONSE_BYTES - 1024) }));
    cleanups.push(() => server.close());
    const oauth = new QwenOAuthClient({ baseUrl: server.url, clientId: QWEN_CLIENT_ID, scope: 'openid', timeoutMs: 5000 });
    const grant = await oauth.refreshTokenGrant('r'.repeat(20));
    expect(grant.expires_in).toBe(3600);
  });
});
