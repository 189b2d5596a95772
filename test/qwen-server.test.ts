import { createHash, randomBytes } from 'node:crypto';
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import {
  CHAT_PATH,
  DEVICE_CODE_PATH,
  DEVICE_GRANT_TYPE,
  INVALID_ACCESS_TOKEN_BODY,
  INVALID_REFRESH_TOKEN_BODY,
  QWEN_CLIENT_ID,
  TOKEN_PATH,
  startQwenServer,
  type QwenServerOptions,
  type QwenTestServer,
} from './support/qwen-server.js';

let server: QwenTestServer;
let clock: number;

async function start(options: QwenServerOptions = {}): Promise<QwenTestServer> {
  server = await startQwenServer({ now: () => clock, ...options });
  return server;
}

beforeEach(() => {
  clock = 1_800_000_000_000;
});

afterEach(async () => {
  await server?.close();
});

function postForm(path: string, form: Record<string, string>, headers: Record<string, string> = {}): Promise<Response> {
  return fetch(`${server.baseUrl}${path}`, {
    method: 'POST',
    headers: { 'content-type': 'application/x-www-form-urlencoded', accept: 'application/json', ...headers },
    body: new URLSearchParams(form).toString(),
  });
}

function chat(token: string | null, body: unknown, headers: Record<string, string> = {}, signal?: AbortSignal): Promise<Response> {
  return fetch(`${server.baseUrl}${CHAT_PATH}`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', ...(token ? { authorization: `Bearer ${token}` } : {}), ...headers },
    body: typeof body === 'string' ? body : JSON.stringify(body),
    ...(signal ? { signal } : {}),
  });
}

function pkce(): { verifier: string; challenge: string } {
  const verifier = randomBytes(32).toString('base64url');
  return { verifier, challenge: createHash('sha256').update(verifier).digest('base64url') };
}

async function deviceCode(challenge: string): Promise<{ device_code: string; user_code: string; interval?: number }> {
  const res = await postForm(DEVICE_CODE_PATH, {
    client_id: QWEN_CLIENT_ID,
    scope: 'openid profile email model.completion',
    code_challenge: challenge,
    code_challenge_method: 'S256',
  });
  expect(res.status).toBe(200);
  return (await res.json()) as { device_code: string; user_code: string; interval?: number };
}

function poll(device_code: string, code_verifier: string): Promise<Response> {
  return postForm(TOKEN_PATH, { grant_type: DEVICE_GRANT_TYPE, client_id: QWEN_CLIENT_ID, device_code, code_verifier });
}

function refresh(refresh_token: string, client_id = QWEN_CLIENT_ID): Promise<Response> {
  return postForm(TOKEN_PATH, { grant_type: 'refresh_token', refresh_token, client_id });
}

describe('device authorization endpoint', () => {
  it('answers the RFC 8628 fields and omits interval by default', async () => {
    await start();
    const { challenge } = pkce();
    const res = await postForm(DEVICE_CODE_PATH, {
      client_id: QWEN_CLIENT_ID,
      scope: 'openid',
      code_challenge: challenge,
      code_challenge_method: 'S256',
    });
    expect(res.headers.get('content-type')).toBe('application/json');
    const body = (await res.json()) as Record<string, unknown>;
    expect(Object.keys(body).sort()).toEqual(
      ['device_code', 'expires_in', 'user_code', 'verification_uri', 'verification_uri_complete'].sort(),
    );
    expect(body.verification_uri_complete).toContain(`user_code=${body.user_code as string}`);
    expect(server.counts.deviceCode).toBe(1);
    expect(server.deviceCode()?.scope).toBe('openid');
  });

  it('sends interval when configured', async () => {
    await start({ deviceInterval: 5 });
    expect((await deviceCode(pkce().challenge)).interval).toBe(5);
  });

  it('rejects a wrong content type, client id or a missing S256 challenge', async () => {
    await start();
    const json = await fetch(`${server.baseUrl}${DEVICE_CODE_PATH}`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ client_id: QWEN_CLIENT_ID }),
    });
    expect(json.status).toBe(400);
    expect(await json.json()).toMatchObject({ error: 'invalid_request' });

    const wrongClient = await postForm(DEVICE_CODE_PATH, { client_id: 'nope', code_challenge: 'x', code_challenge_method: 'S256' });
    expect(wrongClient.status).toBe(400);
    expect(await wrongClient.json()).toMatchObject({ error: 'invalid_client' });

    const plain = await postForm(DEVICE_CODE_PATH, { client_id: QWEN_CLIENT_ID, code_challenge: 'x', code_challenge_method: 'plain' });
    expect(plain.status).toBe(400);
    expect(await plain.json()).toMatchObject({ error: 'invalid_request' });
  });
});

describe('device code grant', () => {
  it('checks PKCE, stays pending until approved, then issues tokens once', async () => {
    await start();
    const { verifier, challenge } = pkce();
    const dc = await deviceCode(challenge);

    const bad = await poll(dc.device_code, pkce().verifier);
    expect(bad.status).toBe(400);
    expect(await bad.json()).toMatchObject({ error: 'invalid_grant' });

    clock += 5000;
    const pending = await poll(dc.device_code, verifier);
    expect(pending.status).toBe(400);
    expect(await pending.json()).toMatchObject({ error: 'authorization_pending' });

    server.approve(dc.user_code);
    clock += 5000;
    const ok = await poll(dc.device_code, verifier);
    expect(ok.status).toBe(200);
    const tokens = (await ok.json()) as Record<string, unknown>;
    expect(tokens).toMatchObject({ token_type: 'Bearer', expires_in: 21600, resource_url: 'portal.qwen.ai' });
    expect(tokens.access_token).toMatch(/^qat_/);
    expect(tokens.refresh_token).toMatch(/^qrt_/);
    expect(server.issuedTokens()).toEqual(expect.arrayContaining([tokens.access_token, tokens.refresh_token]));

    clock += 5000;
    const again = await poll(dc.device_code, verifier);
    expect(await again.json()).toMatchObject({ error: 'invalid_grant' });
    expect(server.counts.deviceToken).toBe(4);
  });

  it('approves by itself after approveAfterPolls pending answers', async () => {
    await start({ approveAfterPolls: 2 });
    const { verifier, challenge } = pkce();
    const dc = await deviceCode(challenge);
    const statuses: number[] = [];
    for (let i = 0; i < 3; i++) {
      clock += 2000;
      statuses.push((await poll(dc.device_code, verifier)).status);
    }
    expect(statuses).toEqual([400, 400, 200]);
  });

  it('answers slow_down with 429 (or 400 when configured), and not at all when off', async () => {
    await start({ deviceInterval: 5 });
    const { verifier, challenge } = pkce();
    let dc = await deviceCode(challenge);
    await poll(dc.device_code, verifier);
    clock += 1000;
    const fast = await poll(dc.device_code, verifier);
    expect(fast.status).toBe(429);
    expect(await fast.json()).toMatchObject({ error: 'slow_down' });
    clock += 5000;
    expect(await (await poll(dc.device_code, verifier)).json()).toMatchObject({ error: 'authorization_pending' });

    server.settings.slowDownStatus = 400;
    clock += 10;
    const fast400 = await poll(dc.device_code, verifier);
    expect(fast400.status).toBe(400);
    expect(await fast400.json()).toMatchObject({ error: 'slow_down' });

    server.settings.slowDown = false;
    dc = await deviceCode(challenge);
    await poll(dc.device_code, verifier);
    expect(await (await poll(dc.device_code, verifier)).json()).toMatchObject({ error: 'authorization_pending' });
  });

  it('honours minPollIntervalMs over the advertised interval', async () => {
    await start({ deviceInterval: 1, minPollIntervalMs: 3000 });
    const { verifier, challenge } = pkce();
    const dc = await deviceCode(challenge);
    await poll(dc.device_code, verifier);
    clock += 2000;
    expect(await (await poll(dc.device_code, verifier)).json()).toMatchObject({ error: 'slow_down' });
    clock += 3000;
    expect(await (await poll(dc.device_code, verifier)).json()).toMatchObject({ error: 'authorization_pending' });
  });

  it('answers expired_token past expires_in or when expired by hand, and access_denied when denied', async () => {
    await start({ deviceExpiresIn: 10 });
    const { verifier, challenge } = pkce();
    const late = await deviceCode(challenge);
    clock += 10_000;
    expect(await (await poll(late.device_code, verifier)).json()).toMatchObject({ error: 'expired_token' });

    const manual = await deviceCode(challenge);
    server.expireDeviceCode();
    expect(await (await poll(manual.device_code, verifier)).json()).toMatchObject({ error: 'expired_token' });

    const denied = await deviceCode(challenge);
    server.deny(denied.user_code);
    const res = await poll(denied.device_code, verifier);
    expect(res.status).toBe(400);
    expect(await res.json()).toMatchObject({ error: 'access_denied' });
    expect(server.deviceCode(denied.user_code)?.state).toBe('denied');
  });

  it('rejects unknown grant types and form-less requests', async () => {
    await start();
    expect(await (await postForm(TOKEN_PATH, { grant_type: 'password' })).json()).toMatchObject({ error: 'unsupported_grant_type' });
    const json = await fetch(`${server.baseUrl}${TOKEN_PATH}`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: '{}' });
    expect(json.status).toBe(400);
  });
});

describe('refresh grant', () => {
  it('rotates refresh tokens, retires the old one and counts its reuse', async () => {
    await start();
    const seed = server.issueTokens();
    expect(seed.expiry_date).toBe(clock + 21600 * 1000);
    const res = await refresh(seed.refresh_token);
    expect(res.status).toBe(200);
    const body = (await res.json()) as Record<string, string>;
    expect(body.refresh_token).toMatch(/^qrt_/);
    expect(body.refresh_token).not.toBe(seed.refresh_token);
    expect(body.access_token).not.toBe(seed.access_token);

    const reuse = await refresh(seed.refresh_token);
    expect(reuse.status).toBe(400);
    expect(await reuse.json()).toEqual(INVALID_REFRESH_TOKEN_BODY);
    await refresh(seed.refresh_token);
    expect(server.reuseCount).toBe(2);

    expect((await refresh(body.refresh_token!)).status).toBe(200);
    expect(server.counts.refresh).toBe(4);
  });

  it('keeps the refresh token without rotation, and can omit it or resource_url', async () => {
    await start({ rotateRefreshTokens: false });
    const seed = server.issueTokens();
    const same = (await (await refresh(seed.refresh_token)).json()) as Record<string, unknown>;
    expect(same.refresh_token).toBe(seed.refresh_token);

    server.settings.omitRefreshTokenOnRefresh = true;
    server.settings.resourceUrl = null;
    const bare = (await (await refresh(seed.refresh_token)).json()) as Record<string, unknown>;
    expect(bare).not.toHaveProperty('refresh_token');
    expect(bare).not.toHaveProperty('resource_url');
    expect(bare).toMatchObject({ token_type: 'Bearer', expires_in: 21600 });
    expect(server.reuseCount).toBe(0);
  });

  it('rejects unknown, revoked and wrong-client refresh tokens with Qwen’s body', async () => {
    await start();
    const a = server.issueTokens();
    const b = server.issueTokens();
    expect(await (await refresh('qrt_unknown')).json()).toEqual(INVALID_REFRESH_TOKEN_BODY);
    expect((await refresh(a.refresh_token, 'other-client')).status).toBe(400);
    server.revokeRefreshToken(a.refresh_token);
    expect((await refresh(a.refresh_token)).status).toBe(400);
    server.revokeAll();
    expect((await refresh(b.refresh_token)).status).toBe(400);
    expect((await chat(b.access_token, { model: 'coder-model', messages: [] })).status).toBe(401);
    expect(server.reuseCount).toBe(0);
  });

  it('uses the configured expires_in', async () => {
    await start({ expiresIn: 60 });
    const seed = server.issueTokens();
    expect(seed.expires_in).toBe(60);
    expect(await (await refresh(seed.refresh_token)).json()).toMatchObject({ expires_in: 60 });
    expect(server.issueTokens({ expiresIn: 5 }).expiry_date).toBe(clock + 5000);
  });
});

describe('chat completions', () => {
  it('answers 401 with Qwen’s body for missing, unknown, revoked and expired tokens', async () => {
    await start();
    const ok = server.issueTokens();
    const revoked = server.issueTokens();
    const short = server.issueTokens({ expiresIn: 10 });
    server.revokeAccessToken(revoked.access_token);
    const body = { model: 'coder-model', messages: [{ role: 'user', content: 'hi' }] };
    for (const token of [null, 'qat_unknown', revoked.access_token]) {
      const res = await chat(token, body);
      expect(res.status).toBe(401);
      expect(await res.json()).toEqual(INVALID_ACCESS_TOKEN_BODY);
    }
    expect((await chat(short.access_token, body)).status).toBe(200);
    clock += 10_000;
    expect((await chat(short.access_token, body)).status).toBe(401);
    expect((await chat(ok.access_token, body)).status).toBe(200);
  });

  it('validates the model and messages', async () => {
    await start();
    const { access_token } = server.issueTokens();
    expect((await chat(access_token, { model: 'qwen-portal/coder-model', messages: [] })).status).toBe(400);
    expect((await chat(access_token, { model: 'coder-model' })).status).toBe(400);
    expect((await chat(access_token, '{not json')).status).toBe(400);
    expect((await chat(access_token, { model: 'vision-model', messages: [] })).status).toBe(200);
  });

  it('echoes the last user text with usage, and records the request headers', async () => {
    await start();
    const { access_token } = server.issueTokens();
    const res = await chat(
      access_token,
      {
        model: 'coder-model',
        messages: [
          { role: 'system', content: 'be brief' },
          { role: 'user', content: 'first' },
          { role: 'assistant', content: 'ok' },
          { role: 'user', content: [{ type: 'text', text: 'hello there' }] },
        ],
      },
      { 'X-DashScope-AuthType': 'qwen-oauth', 'X-DashScope-CacheControl': 'enable' },
    );
    expect(res.status).toBe(200);
    const body = (await res.json()) as {
      object: string;
      model: string;
      choices: { message: { role: string; content: string }; finish_reason: string }[];
      usage: { prompt_tokens: number; completion_tokens: number; total_tokens: number };
    };
    expect(body.object).toBe('chat.completion');
    expect(body.model).toBe('coder-model');
    expect(body.choices[0]?.message).toEqual({ role: 'assistant', content: 'echo: hello there' });
    expect(body.choices[0]?.finish_reason).toBe('stop');
    expect(body.usage.total_tokens).toBe(body.usage.prompt_tokens + body.usage.completion_tokens);
    expect(server.lastChatHeaders?.['x-dashscope-authtype']).toBe('qwen-oauth');
    expect(server.lastChatHeaders?.['x-dashscope-cachecontrol']).toBe('enable');
    expect(server.counts.chat).toBe(1);
  });

  it('streams chat.completion.chunk deltas over SSE and ends with [DONE]', async () => {
    await start();
    const { access_token } = server.issueTokens();
    const res = await chat(access_token, { model: 'coder-model', stream: true, messages: [{ role: 'user', content: 'one two three' }] });
    expect(res.headers.get('content-type')).toBe('text/event-stream');
    const text = await res.text();
    const lines = text.split('\n\n').filter(Boolean);
    expect(lines.every((l) => l.startsWith('data: '))).toBe(true);
    expect(lines.at(-1)).toBe('data: [DONE]');
    const chunks = lines.slice(0, -1).map((l) => JSON.parse(l.slice(6)) as { object: string; choices: { delta: { content?: string } }[] });
    expect(chunks.every((c) => c.object === 'chat.completion.chunk')).toBe(true);
    const contentChunks = chunks.filter((c) => c.choices[0]?.delta.content);
    expect(contentChunks.length).toBeGreaterThanOrEqual(4);
    expect(chunks.map((c) => c.choices[0]?.delta.content ?? '').join('')).toBe('echo: one two three');
    expect(server.abortedStreams).toBe(0);
    await vi.waitFor(() => expect(server.openStreams).toBe(0));
  });

  it('tracks open streams and notices a client that hangs up mid-stream', async () => {
    await start({ streamDelayMs: 50 });
    const { access_token } = server.issueTokens();
    const controller = new AbortController();
    const res = await chat(
      access_token,
      { model: 'coder-model', stream: true, messages: [{ role: 'user', content: 'a b c d e f g h' }] },
      {},
      controller.signal,
    );
    const reader = res.body!.getReader();
    await reader.read();
    expect(server.openStreams).toBe(1);
    controller.abort();
    await vi.waitFor(() => expect(server.abortedStreams).toBe(1));
    expect(server.openStreams).toBe(0);
  });
});

describe('faults', () => {
  it('5xx: JSON by default, plain text on request, for the given number of requests', async () => {
    await start();
    server.injectFault({ kind: '5xx', times: 1 });
    const first = await refresh('qrt_x');
    expect(first.status).toBe(503);
    expect(first.headers.get('content-type')).toBe('application/json');
    expect((await refresh('qrt_x')).status).toBe(400);

    server.injectFault({ kind: '5xx', status: 500, plain: true });
    for (let i = 0; i < 2; i++) {
      const res = await refresh('qrt_x');
      expect(res.status).toBe(500);
      expect(res.headers.get('content-type')).toBe('text/plain');
    }
    server.clearFaults();
    expect((await refresh('qrt_x')).status).toBe(400);
    expect(server.counts.refresh).toBe(5);
  });

  it('429 with a JSON error and Retry-After', async () => {
    await start();
    server.injectFault({ kind: '429', times: 1 });
    const res = await refresh('qrt_x');
    expect(res.status).toBe(429);
    expect(res.headers.get('retry-after')).toBe('1');
    expect(await res.json()).toEqual({ error: 'rate_limited', error_description: 'too many requests' });
  });

  it('malformedJson and html', async () => {
    await start();
    server.injectFault({ kind: 'malformedJson', times: 1 });
    const bad = await refresh('qrt_x');
    expect(bad.status).toBe(200);
    expect(await bad.text()).toBe('{"access_token":');
    server.injectFault({ kind: 'html', times: 1 });
    const html = await refresh('qrt_x');
    expect(html.status).toBe(502);
    expect(html.headers.get('content-type')).toMatch(/^text\/html/);
    expect(await html.text()).toContain('<html>');
  });

  it('reset destroys the socket without an answer', async () => {
    await start();
    server.injectFault({ kind: 'reset', times: 1 });
    await expect(refresh('qrt_x')).rejects.toThrow(TypeError);
    expect((await refresh('qrt_x')).status).toBe(400);
  });

  it('delay answers late and still does the work', async () => {
    await start();
    const seed = server.issueTokens();
    server.injectFault({ kind: 'delay', delayMs: 300, times: 1 });
    await expect(
      fetch(`${server.baseUrl}${TOKEN_PATH}`, {
        method: 'POST',
        headers: { 'content-type': 'application/x-www-form-urlencoded' },
        body: new URLSearchParams({ grant_type: 'refresh_token', refresh_token: seed.refresh_token, client_id: QWEN_CLIENT_ID }),
        signal: AbortSignal.timeout(50),
      }),
    ).rejects.toThrow();
    // The server rotated the token although the client never saw the answer.
    await vi.waitFor(() => expect(server.issuedTokens('refresh')).toHaveLength(2), { timeout: 2000 });
    expect((await refresh(seed.refresh_token)).status).toBe(400);
    expect(server.reuseCount).toBe(1);
  });

  it('respond sends an exact answer; faults target one endpoint', async () => {
    await start();
    server.injectFault({ kind: 'respond', endpoint: 'chat', status: 418, headers: { 'x-test': '1' }, body: 'teapot' });
    const { access_token } = server.issueTokens();
    const res = await chat(access_token, { model: 'coder-model', messages: [] });
    expect(res.status).toBe(418);
    expect(await res.text()).toBe('teapot');
    expect((await refresh('qrt_x')).status).toBe(400);
  });

  it('refuseConnections makes connections fail until acceptConnections, on the same port', async () => {
    await start();
    const seed = server.issueTokens();
    expect((await refresh(seed.refresh_token)).status).toBe(200);
    const port = server.port;
    await server.refuseConnections();
    const err = await refresh('qrt_x').catch((e: unknown) => e);
    expect(err).toBeInstanceOf(TypeError);
    expect(((err as TypeError).cause as { code?: string }).code).toBe('ECONNREFUSED');
    await server.acceptConnections();
    expect(server.port).toBe(port);
    expect((await refresh('qrt_x')).status).toBe(400);
  });
});

describe('bookkeeping', () => {
  it('records every request with headers and parsed form', async () => {
    await start();
    await refresh('qrt_abc');
    const last = server.lastRequest('token');
    expect(last?.form).toEqual({ grant_type: 'refresh_token', refresh_token: 'qrt_abc', client_id: QWEN_CLIENT_ID });
    expect(last?.headers['content-type']).toBe('application/x-www-form-urlencoded');
    expect(last?.headers.accept).toBe('application/json');
    expect(server.lastRequest()).toBe(last);
    expect(server.lastRequest('chat')).toBeUndefined();
    expect(server.requests).toHaveLength(1);
  });

  it('lists issued tokens by kind and device codes', async () => {
    await start();
    const a = server.issueTokens();
    await deviceCode(pkce().challenge);
    expect(server.issuedTokens('access')).toEqual([a.access_token]);
    expect(server.issuedTokens('refresh')).toEqual([a.refresh_token]);
    expect(server.issuedTokens()).toHaveLength(2);
    expect(server.issuedDeviceCodes()).toHaveLength(1);
  });
});
