/**
 * The gateway in this process against the local Qwen server: routing, forwarding, the one
 * retry after a refresh, streaming and aborts, hostile HTTP, loopback TCP with its key, the
 * config file, the access log and secrets.
 */
import { mkdir, readFile, stat, writeFile } from 'node:fs/promises';
import { request } from 'node:http';
import { createServer as createNetServer } from 'node:net';
import { dirname } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { gatewayKeyPath } from '../daemon/gateway/key.js';
import { fingerprint } from '../shared/fingerprint.js';
import { ProfileNeedsLoginError, type GatewayProfile } from '../daemon/gateway/profiles.js';
import { httpCall, profileSet, rawCall, startGateway, type GatewayHarness } from './support/gateway-harness.js';
import { startQwenServer, type QwenTestServer } from './support/qwen-server.js';

let server: QwenTestServer;

beforeAll(async () => {
  server = await startQwenServer();
});
afterAll(async () => {
  await server?.close();
});

/**
 * An OAuth-kind profile whose token the test controls; counts renewals (forced refreshes).
 * `declined`: renewals answer null, as a keeper does when a refresh ended moments ago.
 */
function oauthProfile(name: string, base: () => string = () => `${server.baseUrl}/v1`) {
  const state = { token: server.issueTokens().access_token, refreshes: 0, next: null as string | null, needsLogin: false, declined: false };
  const profile: GatewayProfile = {
    name,
    kind: 'qwen-oauth',
    retryOnAuthFailure: true,
    async baseUrl() {
      return base();
    },
    async credentialHeaders() {
      if (state.needsLogin) throw new ProfileNeedsLoginError(name, 'qwen-token login', 'no credentials');
      return { authorization: `Bearer ${state.token}`, 'x-dashscope-authtype': 'qwen-oauth' };
    },
    async renewedCredentialHeaders() {
      if (state.needsLogin) throw new ProfileNeedsLoginError(name, 'qwen-token login', 'no credentials');
      if (state.declined) return null;
      state.refreshes += 1;
      state.token = state.next ?? server.issueTokens().access_token;
      return { authorization: `Bearer ${state.token}`, 'x-dashscope-authtype': 'qwen-oauth' };
    },
    async models() {
      return ['coder-model', 'vision-model'];
    },
  };
  return { profile, state };
}

/** An API-key profile (never retried); `header` picks Bearer or x-api-key. */
function keyProfile(name: string, header: 'bearer' | 'x-api-key' = 'bearer') {
  const state = { key: server.issueTokens().access_token };
  const profile: GatewayProfile = {
    name,
    kind: 'api-key',
    retryOnAuthFailure: false,
    async baseUrl() {
      return `${server.baseUrl}/v1`;
    },
    async credentialHeaders() {
      return header === 'bearer' ? { authorization: `Bearer ${state.key}` } : { 'x-api-key': state.key };
    },
  };
  return { profile, state };
}

const chatBody = (model: string, extra: Record<string, unknown> = {}) =>
  JSON.stringify({ model, messages: [{ role: 'user', content: 'hello gateway' }], ...extra });
const json = { 'content-type': 'application/json' };

function openAiError(body: string): { message: string; type: string; code: string } {
  const parsed = JSON.parse(body) as { error: { message: string; type: string; code: string } };
  expect(Object.keys(parsed.error).sort()).toEqual(['code', 'message', 'type']);
  return parsed.error;
}

describe('gateway routing and forwarding', () => {
  let gw: GatewayHarness;
  let qwen!: ReturnType<typeof oauthProfile>;
  let keyed!: ReturnType<typeof keyProfile>;
  let anthropic!: ReturnType<typeof keyProfile>;

  beforeAll(async () => {
    qwen = oauthProfile('qwen');
    keyed = keyProfile('keyed');
    anthropic = keyProfile('anthro', 'x-api-key');
    keyed = keyProfile('keyed');
    qwen = oauthProfile('qwen');
    gw = await startGateway(profileSet([qwen.profile, keyed.profile, anthropic.profile]));
  });
  afterAll(async () => {
    const secrets = [qwen.state.token, keyed.state.key, anthropic.state.key];
    const logText = JSON.stringify(gw.logs);
    await gw.close();
    for (const s of secrets) expect(logText).not.toContain(s);
  });

  it('forwards /v1 to the default profile: credential injected, client credentials and hop-by-hop headers dropped, qwen-portal/ prefix rewritten', async () => {
    const before = server.counts.chat;
    const answer = await httpCall({ socketPath: gw.socketPath }, 'POST', '/v1/chat/completions?trace=1', {
      headers: {
        ...json,
        authorization: 'Bearer client-own-secret-value',
        'x-api-key': 'client-other-secret',
        connection: 'x-hop-header',
        'x-hop-header': 'drop me',
        'x-custom': 'keep me',
      },
      body: chatBody('qwen-portal/coder-model'),
    });
    expect(answer.status).toBe(200);
    expect(JSON.parse(answer.body).choices[0].message.content).toBe('echo: hello gateway');
    expect(server.counts.chat).toBe(before + 1);
    const seen = server.lastRequest('chat')!;
    expect(seen.path).toBe('/v1/chat/completions?trace=1');
    expect((seen.json as { model: string }).model).toBe('coder-model');
    expect(seen.headers.authorization).toBe(`Bearer ${qwen.state.token}`);
    expect(seen.headers['x-dashscope-authtype']).toBe('qwen-oauth');
    expect(seen.headers['x-api-key']).toBeUndefined();
    expect(seen.headers['x-hop-header']).toBeUndefined();
    expect(seen.headers['x-custom']).toBe('keep me');
    expect(JSON.stringify(seen.headers)).not.toContain('client-own-secret-value');
  });

  it('selects a profile by the model prefix and by /p/<profile>/', async () => {
    const byModel = await httpCall({ socketPath: gw.socketPath }, 'POST', '/v1/chat/completions', { headers: json, body: chatBody('keyed/coder-model') });
    expect(byModel.status).toBe(200);
    expect(server.lastRequest('chat')!.headers.authorization).toBe(`Bearer ${keyed.state.key}`);
    expect((server.lastRequest('chat')!.json as { model: string }).model).toBe('coder-model');

    const byPath = await httpCall({ socketPath: gw.socketPath }, 'POST', '/p/keyed/v1/chat/completions', { headers: json, body: chatBody('org/model-with-slash') });
    // The local server knows no such model: its 400 comes back, the request went to `keyed`.
    expect(byPath.status).toBe(400);
    expect(server.lastRequest('chat')!.headers.authorization).toBe(`Bearer ${keyed.state.key}`);
    // A prefix that names no profile is part of the model's own name.
    expect((server.lastRequest('chat')!.json as { model: string }).model).toBe('org/model-with-slash');
  });

  it('answers unknown profiles 404 and conflicting path/model 400 in the OpenAI error shape, forwarding nothing', async () => {
    const before = server.requests.length;
    const unknown = await httpCall({ socketPath: gw.socketPath }, 'POST', '/p/nope/v1/chat/completions', { headers: json, body: chatBody('x') });
    expect(unknown.status).toBe(404);
    expect(openAiError(unknown.body).code).toBe('unknown_profile');
    const conflict = await httpCall({ socketPath: gw.socketPath }, 'POST', '/p/keyed/v1/chat/completions', { headers: json, body: chatBody('qwen/coder-model') });
    expect(conflict.status).toBe(400);
    expect(openAiError(conflict.body).code).toBe('profile_conflict');
    const outside = await httpCall({ socketPath: gw.socketPath }, 'GET', '/admin');
    expect(outside.status).toBe(404);
    const climbing = await httpCall({ socketPath: gw.socketPath }, 'GET', '/v1/../admin');
    expect(climbing.status).toBe(400);
    expect(server.requests.length).toBe(before);
  });

  it('lists every profile\'s models under its prefix, and one profile\'s bare', async () => {
    const all = JSON.parse((await httpCall({ socketPath: gw.socketPath }, 'GET', '/v1/models')).body) as { data: Array<{ id: string }> };
    expect(all.data.map((m) => m.id)).toEqual(expect.arrayContaining(['qwen/coder-model', 'qwen/vision-model']));
    const one = JSON.parse((await httpCall({ socketPath: gw.socketPath }, 'GET', '/p/qwen/v1/models')).body) as { data: Array<{ id: string }> };
    expect(one.data.map((m) => m.id)).toEqual(['coder-model', 'vision-model']);
  });

  it('passes upstream errors through unchanged', async () => {
    server.injectFault({ kind: 'respond', endpoint: 'chat', times: 1, status: 429, headers: { 'content-type': 'application/json', 'retry-after': '7' }, body: '{"error":{"message":"slow down","code":"insufficient_quota"}}' });
    const answer = await httpCall({ socketPath: gw.socketPath }, 'POST', '/v1/chat/completions', { headers: json, body: chatBody('coder-model') });
    expect(answer.status).toBe(429);
    expect(answer.headers['retry-after']).toBe('7');
    expect(answer.body).toBe('{"error":{"message":"slow down","code":"insufficient_quota"}}');
  });

  it('passes /v1/messages through to an x-api-key profile with its key, not the client\'s', async () => {
    const answer = await httpCall({ socketPath: gw.socketPath }, 'POST', '/p/anthro/v1/messages', {
      headers: { ...json, 'x-api-key': 'client-anthropic-key', 'anthropic-version': '2023-06-01' },
      body: JSON.stringify({ model: 'qwen3-coder-plus', max_tokens: 10, messages: [{ role: 'user', content: 'hi' }] }),
    });
    const seen = server.requests[server.requests.length - 1]!;
    expect(seen.path).toBe('/v1/messages');
    expect(seen.headers['x-api-key']).toBe(anthropic.state.key);
    expect(seen.headers['anthropic-version']).toBe('2023-06-01');
    expect(seen.headers.authorization).toBeUndefined();
    expect((seen.json as { model: string }).model).toBe('qwen3-coder-plus');
    // The local server has no such endpoint: its own 404 comes back as it was.
    expect(answer.status).toBe(404);
    expect(JSON.parse(answer.body)).toEqual({ error: 'not_found' });
  });

  it('writes one access log line per request without headers, query or body', async () => {
    await httpCall({ socketPath: gw.socketPath }, 'POST', '/v1/chat/completions?secret=querytext', { headers: json, body: chatBody('coder-model') });
    const line = gw.logs.filter((l) => l.msg === 'gateway request').at(-1)!;
    expect(line).toMatchObject({ method: 'POST', path: '/v1/chat/completions', profile: 'qwen', status: 200, listener: 'unix' });
    expect(line.bytes_in).toBeGreaterThan(0);
    expect(line.bytes_out).toBeGreaterThan(0);
    expect(typeof line.duration_ms).toBe('number');
    expect(JSON.stringify(line)).not.toContain('querytext');
    expect(JSON.stringify(line)).not.toContain('hello gateway');
  });
});

describe('gateway credential failures and retries', () => {
  let gw: GatewayHarness;
  let qwen!: ReturnType<typeof oauthProfile>;
  let keyed!: ReturnType<typeof keyProfile>;
  let dead!: ReturnType<typeof oauthProfile>;

  beforeAll(async () => {
    qwen = oauthProfile('qwen');
    keyed = keyProfile('keyed');
    dead = oauthProfile('dead', () => 'http://127.0.0.1:9/v1');
    gw = await startGateway(profileSet([qwen.profile, keyed.profile, dead.profile]), { replayBytes: 2048, upstreamTimeoutMs: 2_000 });
  });
  afterAll(async () => {
    await gw.close();
  });
  afterEach(() => {
    server.clearFaults();
  });

  it('OAuth: a 401 leads to one forced refresh and one retry that succeeds', async () => {
    server.revokeAccessToken(qwen.state.token);
    const before = server.counts.chat;
    const answer = await httpCall({ socketPath: gw.socketPath }, 'POST', '/v1/chat/completions', { headers: json, body: chatBody('coder-model') });
    expect(answer.status).toBe(200);
    expect(qwen.state.refreshes).toBe(1);
    expect(server.counts.chat).toBe(before + 2);
  });

  it('OAuth: retries once only; a second 401 passes through', async () => {
    const refreshes = qwen.state.refreshes;
    const before = server.counts.chat;
    const stale = server.issueTokens().access_token;
    server.revokeAccessToken(stale);
    server.revokeAccessToken(qwen.state.token);
    qwen.state.next = stale;
    const answer = await httpCall({ socketPath: gw.socketPath }, 'POST', '/v1/chat/completions', { headers: json, body: chatBody('coder-model') });
    qwen.state.next = null;
    expect(answer.status).toBe(401);
    expect(JSON.parse(answer.body).error.message).toBe('invalid access token or token expired');
    expect(qwen.state.refreshes).toBe(refreshes + 1);
    expect(server.counts.chat).toBe(before + 2);
    // The next request refreshes again and works.
    expect((await httpCall({ socketPath: gw.socketPath }, 'POST', '/v1/chat/completions', { headers: json, body: chatBody('coder-model') })).status).toBe(200);
  });

  it('API key: a 401 passes through with no refresh and no retry', async () => {
    server.revokeAccessToken(keyed.state.key);
    const before = server.counts.chat;
    const answer = await httpCall({ socketPath: gw.socketPath }, 'POST', '/p/keyed/v1/chat/completions', { headers: json, body: chatBody('coder-model') });
    expect(answer.status).toBe(401);
    expect(server.counts.chat).toBe(before + 1);
  });

  it('OAuth: a refusal a refresh cannot help with (one ended moments ago) passes through once, unretried', async () => {
    server.revokeAccessToken(qwen.state.token);
    const before = server.counts.chat;
    const refreshes = qwen.state.refreshes;
    qwen.state.declined = true;
    const answer = await httpCall({ socketPath: gw.socketPath }, 'POST', '/v1/chat/completions', { headers: json, body: chatBody('coder-model') });
    qwen.state.declined = false;
    expect(answer.status).toBe(401);
    expect(JSON.parse(answer.body).error.message).toBe('invalid access token or token expired');
    expect(server.counts.chat).toBe(before + 1);
    expect(qwen.state.refreshes).toBe(refreshes);
  });

  it('OAuth: a body larger than the replay size streams once and is not retried', async () => {
    server.revokeAccessToken(qwen.state.token);
    const before = server.counts.chat;
    const refreshes = qwen.state.refreshes;
    const big = chatBody('coder-model', { padding: 'x'.repeat(8000) });
    const answer = await httpCall({ socketPath: gw.socketPath }, 'POST', '/v1/chat/completions', { headers: json, body: big });
    expect(answer.status).toBe(401);
    expect(server.counts.chat).toBe(before + 1);
    expect(qwen.state.refreshes).toBe(refreshes);
    expect(server.lastRequest('chat')!.body).toBe(big);
  });

  it('needs login: 401 naming the login command, nothing forwarded', async () => {
    qwen.state.needsLogin = true;
    const before = server.requests.length;
    const answer = await httpCall({ socketPath: gw.socketPath }, 'POST', '/v1/chat/completions', { headers: json, body: chatBody('coder-model') });
    qwen.state.needsLogin = false;
    expect(answer.status).toBe(401);
    const err = openAiError(answer.body);
    expect(err.code).toBe('profile_needs_login');
    expect(err.message).toContain('qwen-token login');
    expect(server.requests.length).toBe(before);
  });

  it('upstream unreachable: 502; upstream silent: 504', async () => {
    const unreachable = await httpCall({ socketPath: gw.socketPath }, 'POST', '/p/dead/v1/chat/completions', { headers: json, body: chatBody('m') });
    expect(unreachable.status).toBe(502);
    expect(openAiError(unreachable.body).code).toBe('upstream_unreachable');
    server.injectFault({ kind: 'delay', endpoint: 'chat', times: 1, delayMs: 8_000 });
    const slow = await httpCall({ socketPath: gw.socketPath }, 'POST', '/p/keyed/v1/chat/completions', { headers: json, body: chatBody('m') });
    expect(slow.status).toBe(504);
    expect(openAiError(slow.body).code).toBe('upstream_timeout');
    const status = gw.gateway.status();
    expect(status.errors.upstream_unreachable).toBe(1);
    expect(status.errors.upstream_timeout).toBe(1);
  });
});

describe('gateway error answers that quote the credential', () => {
  // An upstream that rejects every request quoting the credential it was sent, as real APIs do
  // ("Incorrect API key provided: sk-…"), framed and encoded as the path asks.
  let gw: GatewayHarness;
  let upstream: import('node:http').Server;
  let bearer!: ReturnType<typeof keyProfile>;
  let xkey!: ReturnType<typeof keyProfile>;
  let oauth!: ReturnType<typeof oauthProfile>;
  let base = '';

  beforeAll(async () => {
    bearer = keyProfile('bearer');
    xkey = keyProfile('xkey', 'x-api-key');
    oauth = oauthProfile('oauth', () => base);
    const { createServer } = await import('node:http');
    const { gzipSync } = await import('node:zlib');
    upstream = createServer((req, res) => {
      req.resume();
      req.on('end', () => {
        const sent = (req.headers['x-api-key'] as string | undefined) ?? req.headers.authorization!.replace(/^Bearer /, '');
        const path = req.url!;
        const status = path.includes('/forbidden') ? 403 : 401;
        if (path.includes('/text')) {
          res.writeHead(status, { 'content-type': 'text/plain', 'x-request-id': 'r-1' });
          // Chunked, the key cut across two writes.
          res.write(`Incorrect API key provided: ${sent.slice(0, 5)}`);
          setTimeout(() => res.end(`${sent.slice(5)}. Also: ${sent}\n`), 10);
          return;
        }
        const body = JSON.stringify({ error: { message: `Incorrect API key provided: ${sent}. You can find your API key at https://example.test.`, type: 'invalid_request_error', code: 'invalid_api_key' } });
        if (path.includes('/gzip')) {
          const packed = gzipSync(body);
          res.writeHead(status, { 'content-type': 'application/json', 'content-encoding': 'gzip', 'content-length': packed.length });
          res.end(packed);
          return;
        }
        res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body), 'x-request-id': 'r-2' });
        res.end(body);
      });
    });
    await new Promise<void>((r) => upstream.listen(0, '127.0.0.1', r));
    const port = (upstream.address() as import('node:net').AddressInfo).port;
    base = `http://127.0.0.1:${port}/v1`;
    for (const p of [bearer, xkey]) p.profile.baseUrl = async () => base;
    gw = await startGateway(profileSet([bearer.profile, xkey.profile, oauth.profile]));
  });
  afterAll(async () => {
    await gw.close();
    upstream.close();
  });

  const expected = (key: string) => `[redacted key ${fingerprint(key)}]`;

  it('a JSON 401 with Content-Length: the key is replaced by its fingerprint, status, headers and length fixed', async () => {
    const answer = await httpCall({ socketPath: gw.socketPath }, 'POST', '/p/bearer/v1/chat/completions', { headers: json, body: chatBody('m') });
    expect(answer.status).toBe(401);
    expect(answer.body).not.toContain(bearer.state.key);
    const error = JSON.parse(answer.body) as { error: { message: string; code: string } };
    expect(error.error.message).toBe(`Incorrect API key provided: ${expected(bearer.state.key)}. You can find your API key at https://example.test.`);
    expect(error.error.code).toBe('invalid_api_key');
    expect(answer.headers['x-request-id']).toBe('r-2');
    expect(answer.headers['content-length']).toBe(String(Buffer.byteLength(answer.body)));
  });

  it('a chunked text/plain 401 with the key split across reads, sent as x-api-key: every occurrence replaced', async () => {
    const answer = await httpCall({ socketPath: gw.socketPath }, 'POST', '/p/xkey/v1/text', { headers: json, body: chatBody('m') });
    expect(answer.status).toBe(401);
    expect(answer.body).toBe(`Incorrect API key provided: ${expected(xkey.state.key)}. Also: ${expected(xkey.state.key)}\n`);
    expect(answer.headers['content-type']).toBe('text/plain');
    expect(answer.headers['content-length']).toBe(String(Buffer.byteLength(answer.body)));
    expect(answer.headers['transfer-encoding']).toBeUndefined();
  });

  it('a gzip-encoded 401 is decoded and redacted, and sent without its Content-Encoding', async () => {
    const answer = await httpCall({ socketPath: gw.socketPath }, 'POST', '/p/bearer/v1/gzip', { headers: { ...json, 'accept-encoding': 'gzip' }, body: chatBody('m') });
    expect(answer.status).toBe(401);
    expect(answer.headers['content-encoding']).toBeUndefined();
    expect(answer.body).toContain(`provided: ${expected(bearer.state.key)}.`);
    expect(answer.body).not.toContain(bearer.state.key);
  });

  it('OAuth: the final 403 after the retry quotes the refreshed token, which is replaced too', async () => {
    const answer = await httpCall({ socketPath: gw.socketPath }, 'POST', '/p/oauth/v1/forbidden', { headers: json, body: chatBody('m') });
    expect(answer.status).toBe(403);
    expect(oauth.state.refreshes).toBe(1);
    expect(answer.body).toContain(expected(oauth.state.token));
    expect(answer.body).not.toContain(oauth.state.token);
  });
});

describe('gateway streaming', () => {
  let gw: GatewayHarness;
  let qwen!: ReturnType<typeof oauthProfile>;

  beforeAll(async () => {
    qwen = oauthProfile('qwen');
    gw = await startGateway(profileSet([qwen.profile]));
  });
  afterAll(async () => {
    server.settings.streamDelayMs = 0;
    await gw.close();
  });

  /** Opens a streamed completion; resolves with the response once its first bytes arrived. */
  function openStream(): Promise<{ first: string; res: import('node:http').IncomingMessage; req: import('node:http').ClientRequest }> {
    return new Promise((resolve, reject) => {
      const req = request({ socketPath: gw.socketPath, method: 'POST', path: '/v1/chat/completions', headers: json, agent: false }, (res) => {
        res.once('data', (chunk: Buffer) => resolve({ first: chunk.toString('utf8'), res, req }));
      });
      req.on('error', reject);
      req.end(chatBody('coder-model', { stream: true, messages: [{ role: 'user', content: 'one two three four five six seven eight' }] }));
    });
  }

  it('forwards SSE event by event: the first event arrives while the upstream is still streaming', async () => {
    server.settings.streamDelayMs = 150;
    const { first, res } = await openStream();
    expect(first.startsWith('data: ')).toBe(true);
    expect(server.openStreams).toBe(1);
    expect(gw.gateway.status().active_streams).toBe(1);
    let rest = first;
    for await (const chunk of res) rest += (chunk as Buffer).toString('utf8');
    expect(rest).toContain('data: [DONE]');
    expect(res.headers['content-type']).toBe('text/event-stream');
  });

  it('a client that disconnects mid-stream aborts the upstream stream; nothing is left open', async () => {
    server.settings.streamDelayMs = 200;
    const aborted = server.abortedStreams;
    const { res, req } = await openStream();
    res.destroy();
    req.destroy();
    const deadline = Date.now() + 5_000;
    while ((server.abortedStreams === aborted || server.openStreams !== 0 || gw.gateway.status().active_requests !== 0) && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 20));
    }
    expect(server.abortedStreams).toBe(aborted + 1);
    expect(server.openStreams).toBe(0);
    expect(gw.gateway.status()).toMatchObject({ active_requests: 0, active_streams: 0 });
    expect(gw.gateway.status().errors.client_aborted).toBe(1);
  });
});

describe('gateway relaying answers byte for byte', () => {
  // An upstream that writes its answers by hand, cut into reads where a parser could trip:
  // inside a chunk-size line, between a size and its data, in the last chunk and its trailers.
  let gw: GatewayHarness;
  let upstream: import('node:net').Server;
  let connections = 0;
  const events = ['data: {"n":1}\n\n', 'data: {"n":2}\n\n', `data: ${'x'.repeat(300)}\n\n`, 'data: [DONE]\n\n'];
  const pause = () => new Promise((r) => setTimeout(r, 15));
  const BIG_MB = 64;
  let bigWritten = 0;

  async function answer(socket: import('node:net').Socket, path: string): Promise<void> {
    if (path === '/v1/split') {
      socket.write('HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n');
      for (const event of events) {
        const size = Buffer.byteLength(event).toString(16);
        socket.write(size.slice(0, 1));
        await pause();
        socket.write(`${size.slice(1)};ext=1\r\n`);
        await pause();
        socket.write(`${event}\r\n`);
        await pause();
      }
      socket.write('0\r');
      await pause();
      socket.write('\nx-trailer: t\r\n');
      await pause();
      socket.write('\r\n');
    } else if (path === '/v1/length') {
      const body = '{"id":"one","object":"chat.completion"}';
      socket.write(`HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: ${body.length}\r\n\r\n${body.slice(0, 10)}`);
      await pause();
      socket.write(body.slice(10));
    } else if (path === '/v1/big') {
      // As fast as the gateway takes it: how much it took is the test's measure of back-pressure.
      socket.write('HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n');
      const piece = Buffer.alloc(1 << 20, 'z');
      for (let i = 0; i < BIG_MB; i++) {
        if (socket.destroyed) return;
        socket.write('100000\r\n');
        socket.write(piece);
        const more = socket.write('\r\n');
        bigWritten += piece.length;
        if (!more) await new Promise((r) => socket.once('drain', r));
      }
      socket.write('0\r\n\r\n');
    } else if (path === '/v1/head') {
      // An answer to HEAD: a length, and no body after it.
      socket.write('HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 123\r\n\r\n');
    } else if (path === '/v1/broken') {
      socket.write('HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\nf\r\ndata: {"n":1}\n\n\r\n20\r\ndata: cut');
      await pause();
      socket.destroy();
    }
  }

  beforeAll(async () => {
    const { createServer } = await import('node:net');
    upstream = createServer((socket) => {
      connections += 1;
      let buffered = '';
      socket.on('data', (d: Buffer) => {
        buffered += d.toString('latin1');
        const end = buffered.indexOf('\r\n\r\n');
        if (end === -1) return;
        const length = Number(/content-length: (\d+)/i.exec(buffered.slice(0, end))?.[1] ?? 0);
        if (buffered.length < end + 4 + length) return;
        const path = buffered.split(' ')[1]!;
        buffered = buffered.slice(end + 4 + length);
        void answer(socket, path);
      });
      socket.on('error', () => undefined);
    });
    await new Promise<void>((r) => upstream.listen(0, '127.0.0.1', r));
    const port = (upstream.address() as import('node:net').AddressInfo).port;
    gw = await startGateway(profileSet([oauthProfile('raw', () => `http://127.0.0.1:${port}/v1`).profile]));
  });
  afterAll(async () => {
    await gw.close();
    upstream.close();
  });

  it('a chunked answer cut anywhere reaches an HTTP/1.1 client whole and in order, trailers dropped', async () => {
    const answer = await httpCall({ socketPath: gw.socketPath }, 'POST', '/v1/split', { headers: json, body: chatBody('m') });
    expect(answer.status).toBe(200);
    expect(answer.body).toBe(events.join(''));
    expect(answer.headers['transfer-encoding']).toBe('chunked');
    expect(answer.headers['x-trailer']).toBeUndefined();
  });

  it('an HTTP/1.0 client gets the same body unframed, ended by the close', async () => {
    const raw = await rawCall(gw.socketPath, ['GET /v1/split HTTP/1.0\r\nHost: x\r\n\r\n']);
    expect(raw.startsWith('HTTP/1.1 200')).toBe(true);
    expect(raw.toLowerCase()).not.toContain('transfer-encoding');
    expect(raw.slice(raw.indexOf('\r\n\r\n') + 4)).toBe(events.join(''));
  });

  it('a Content-Length answer split across reads arrives whole, and the upstream connection is used again', async () => {
    const before = connections;
    for (let i = 0; i < 3; i++) {
      const answer = await httpCall({ socketPath: gw.socketPath }, 'POST', '/v1/length', { headers: json, body: chatBody('m') });
      expect(answer.body).toBe('{"id":"one","object":"chat.completion"}');
      expect(answer.headers['content-length']).toBe('39');
    }
    expect(connections - before).toBeLessThanOrEqual(1);
  });

  it('a client that does not read holds the upstream back instead of filling memory; the body then arrives whole', async () => {
    const { res } = await new Promise<{ res: import('node:http').IncomingMessage }>((resolve, reject) => {
      const req = request({ socketPath: gw.socketPath, method: 'POST', path: '/v1/big', headers: json, agent: false }, (r) => {
        r.pause();
        resolve({ res: r });
      });
      req.on('error', reject);
      req.end(chatBody('m'));
    });
    await new Promise((r) => setTimeout(r, 500));
    // Socket buffers on both sides hold a few MB; without back-pressure the gateway reads it all.
    expect(bigWritten).toBeLessThan((BIG_MB / 2) * (1 << 20));
    let received = 0;
    let intact = true;
    for await (const chunk of res) {
      received += (chunk as Buffer).length;
      if (intact && (chunk as Buffer).some((b) => b !== 0x7a)) intact = false;
    }
    expect({ received, intact }).toEqual({ received: BIG_MB * (1 << 20), intact: true });
  });

  it('an answer to HEAD keeps its Content-Length and has no body; the connection serves the next request', async () => {
    const before = connections;
    const head = await httpCall({ socketPath: gw.socketPath }, 'HEAD', '/v1/head');
    expect(head).toMatchObject({ status: 200, body: '' });
    expect(head.headers['content-length']).toBe('123');
    const next = await httpCall({ socketPath: gw.socketPath }, 'POST', '/v1/length', { headers: json, body: chatBody('m') });
    expect(next.body).toBe('{"id":"one","object":"chat.completion"}');
    expect(connections - before).toBeLessThanOrEqual(1);
  });

  it('an answer the upstream breaks off is broken off for the client too, and counted', async () => {
    const result = await httpCall({ socketPath: gw.socketPath }, 'POST', '/v1/broken', { headers: json, body: chatBody('m') }).then(
      () => 'completed',
      (err: Error) => err.message,
    );
    expect(result).not.toBe('completed');
    const deadline = Date.now() + 5_000;
    const logged = () => gw.logs.find((l) => l.msg === 'gateway request' && l.path === '/v1/broken');
    while (!logged() && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
    expect(gw.gateway.status().errors.upstream_broken).toBe(1);
    const line = logged();
    // Bytes out: the data relayed before the cut, the first event and the start of the second.
    expect(line).toMatchObject({ path: '/v1/broken', error: 'upstream_broken', bytes_out: 24 });
  });
});

describe('gateway against hostile HTTP', () => {
  let gw: GatewayHarness;
  let qwen!: ReturnType<typeof oauthProfile>;

  beforeAll(async () => {
    qwen = oauthProfile('qwen');
    gw = await startGateway(profileSet([qwen.profile]), { maxHeaderBytes: 4096, maxBodyBytes: 64 * 1024, headersTimeoutMs: 300, requestTimeoutMs: 600 });
  });
  afterAll(async () => {
    await gw.close();
  });

  const head = (lines: string[]) => `${lines.join('\r\n')}\r\n\r\n`;
  const statusOf = (raw: string) => Number(/^HTTP\/1\.1 (\d{3})/.exec(raw)?.[1] ?? 0);
  const bodyOf = (raw: string) => raw.slice(raw.indexOf('\r\n\r\n') + 4);

  it.each([
    ['Content-Length with Transfer-Encoding', head(['POST /v1/chat/completions HTTP/1.1', 'Host: x', 'Content-Type: application/json', 'Content-Length: 4', 'Transfer-Encoding: chunked']) + '0\r\n\r\n', 400, 'bad_request'],
    ['two Content-Lengths', head(['POST /v1/chat/completions HTTP/1.1', 'Host: x', 'Content-Length: 2', 'Content-Length: 2']) + '{}', 400, 'bad_request'],
    ['oversized headers', head(['GET /v1/models HTTP/1.1', 'Host: x', `X-Filler: ${'a'.repeat(8192)}`]), 431, 'headers_too_large'],
    ['a body over the limit', head(['POST /v1/chat/completions HTTP/1.1', 'Host: x', 'Content-Type: application/json', `Content-Length: ${128 * 1024}`]), 413, 'body_too_large'],
    ['invalid JSON with a model prefix', head(['POST /v1/chat/completions HTTP/1.1', 'Host: x', 'Content-Type: application/json', 'Content-Length: 30', 'Connection: close']) + '{"model":"qwen/coder-model",,}', 400, 'invalid_json'],
  ])('%s: its 4xx, nothing forwarded, the gateway stays up', async (_name, raw, status, code) => {
    const before = server.requests.length;
    const answer = await rawCall(gw.socketPath, [raw]);
    expect(statusOf(answer)).toBe(status);
    expect(openAiError(bodyOf(answer)).code).toBe(code);
    expect(server.requests.length).toBe(before);
    expect((await httpCall({ socketPath: gw.socketPath }, 'GET', '/v1/models')).status).toBe(200);
  });

  it('a slow sender gets 408 and nothing is forwarded', async () => {
    const before = server.requests.length;
    const slowHead = await rawCall(gw.socketPath, ['POST /v1/chat/completions HTTP/1.1\r\n', 'Host: x\r\n', 'Content-Type: application/json\r\n'], { gapMs: 200 });
    expect(statusOf(slowHead)).toBe(408);
    const slowBody = await rawCall(
      gw.socketPath,
      [head(['POST /v1/chat/completions HTTP/1.1', 'Host: x', 'Content-Type: application/json', 'Content-Length: 100']), '{"model":', '"coder-model"'],
      { gapMs: 400 },
    );
    expect(statusOf(slowBody)).toBe(408);
    expect(server.requests.length).toBe(before);
    expect((await httpCall({ socketPath: gw.socketPath }, 'GET', '/v1/models')).status).toBe(200);
  });

  it('a chunked body over the limit is cut off with 413', async () => {
    const chunk = Buffer.alloc(16 * 1024, 'a');
    const answer = await httpCall({ socketPath: gw.socketPath }, 'POST', '/v1/chat/completions', {
      headers: { 'content-type': 'application/octet-stream', 'transfer-encoding': 'chunked' },
      body: Buffer.concat([chunk, chunk, chunk, chunk, chunk, chunk]),
    }).catch((err: Error) => ({ status: -1, body: err.message, headers: {} }));
    // Either the 413 arrives or the connection is cut; the request never completes upstream.
    if (answer.status !== -1) expect(answer.status).toBe(413);
    expect(server.requests.filter((r) => r.body.length >= 64 * 1024)).toHaveLength(0);
  });
});

describe('gateway on loopback TCP', () => {
  let gw: GatewayHarness;
  let qwen!: ReturnType<typeof oauthProfile>;

  beforeAll(async () => {
    qwen = oauthProfile('qwen');
    gw = await startGateway(profileSet([qwen.profile]));
  });
  afterAll(async () => {
    await gw.close();
  });

  it('enable: listens on 127.0.0.1 only, requires the gateway key, keeps the rest of the config file', async () => {
    await mkdir(dirname(gw.configPath), { recursive: true, mode: 0o700 });
    await writeFile(gw.configPath, JSON.stringify({ profiles: { work: { kind: 'api-key' } }, other: [1, 2] }), { mode: 0o600 });
    const status = await gw.gateway.enableTcp(0);
    expect(status.tcp.address).toMatch(/^127\.0\.0\.1:\d+$/);
    const port = Number(status.tcp.address!.split(':')[1]);

    const saved = JSON.parse(await readFile(gw.configPath, 'utf8')) as Record<string, unknown>;
    expect(saved).toEqual({ profiles: { work: { kind: 'api-key' } }, other: [1, 2], gateway: { tcp: { enabled: true, port: 0 } } });
    expect((await stat(gw.configPath)).mode & 0o777).toBe(0o600);
    expect((await stat(dirname(gw.configPath))).mode & 0o777).toBe(0o700);
    const keyPath = gatewayKeyPath(gw.stateDir);
    expect((await stat(keyPath)).mode & 0o777).toBe(0o600);
    const { api_key: key, base_url } = await gw.gateway.envInfo();
    expect(base_url).toBe(`http://${status.tcp.address}/v1`);
    expect(key).toMatch(/^qtgw_[A-Za-z0-9_-]{43}$/);

    const before = server.requests.length;
    const none = await httpCall({ port }, 'POST', '/v1/chat/completions', { headers: json, body: chatBody('coder-model') });
    expect(none.status).toBe(401);
    expect(openAiError(none.body).code).toBe('unauthorized');
    const wrong = await httpCall({ port }, 'POST', '/v1/chat/completions', { headers: { ...json, authorization: `Bearer ${key.slice(0, -1)}x` }, body: chatBody('coder-model') });
    expect(wrong.status).toBe(401);
    expect(server.requests.length).toBe(before);
    expect(none.body + wrong.body).not.toContain(key);

    const ok = await httpCall({ port }, 'POST', '/v1/chat/completions', { headers: { ...json, authorization: `Bearer ${key}` }, body: chatBody('coder-model') });
    expect(ok.status).toBe(200);
    expect(server.lastRequest('chat')!.headers.authorization).toBe(`Bearer ${qwen.state.token}`);
    const viaApiKey = await httpCall({ port }, 'GET', '/v1/models', { headers: { 'x-api-key': key } });
    expect(viaApiKey.status).toBe(200);

    expect(JSON.stringify(gw.gateway.status())).not.toContain(key);
    expect(JSON.stringify(gw.logs)).not.toContain(key);
    // The same key after a restart of the listener.
    await gw.gateway.disableTcp();
    await expect(httpCall({ port }, 'GET', '/v1/models', { headers: { authorization: `Bearer ${key}` } })).rejects.toThrow(/ECONNREFUSED/);
    const again = JSON.parse(await readFile(gw.configPath, 'utf8')) as Record<string, unknown>;
    expect(again).toEqual({ profiles: { work: { kind: 'api-key' } }, other: [1, 2], gateway: { tcp: { enabled: false, port: 0 } } });
    await gw.gateway.enableTcp(0);
    expect((await gw.gateway.envInfo()).api_key).toBe(key);
  });

  it('enable on a port in use fails naming the port and changes nothing', async () => {
    const blocker = createNetServer();
    await new Promise<void>((r) => blocker.listen(0, '127.0.0.1', () => r()));
    const taken = (blocker.address() as { port: number }).port;
    const before = await readFile(gw.configPath, 'utf8');
    try {
      await expect(gw.gateway.enableTcp(taken)).rejects.toThrow(`port ${taken} on 127.0.0.1 is in use`);
      expect(await readFile(gw.configPath, 'utf8')).toBe(before);
      // Still listening where the config says (port 0: any free port).
      expect(gw.gateway.status().tcp).toMatchObject({ enabled: true, configured_port: 0 });
      expect(gw.gateway.status().tcp.address).toMatch(/^127\.0\.0\.1:\d+$/);
    } finally {
      blocker.close();
    }
  });

  it('refuses to touch a config file that is not valid JSON', async () => {
    await gw.gateway.disableTcp();
    await writeFile(gw.configPath, '{"profiles": {', { mode: 0o600 });
    await expect(gw.gateway.enableTcp(0)).rejects.toThrow(/not valid JSON/);
    expect(await readFile(gw.configPath, 'utf8')).toBe('{"profiles": {');
    expect(gw.gateway.status().tcp.address).toBeNull();
  });
});
