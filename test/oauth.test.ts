import { createHash } from 'node:crypto';
import { afterEach, describe, expect, it } from 'vitest';
import type { Clock, TimerHandle } from '../shared/clock.js';
import type { Credentials } from '../shared/credentials.js';
import { QwenConfigError, QwenOAuthError, QwenRefreshTokenInvalidError, errorFromWire } from '../shared/errors.js';
import {
  QwenOAuthClient,
  credentialsFromGrant,
  isRefreshTokenRejection,
  type DeviceAuthorization,
  type DevicePollResult,
  type QwenOAuthClientOptions,
} from '../daemon/oauth.js';
import {
  CHAT_PATH,
  DEVICE_GRANT_TYPE,
  QWEN_CLIENT_ID,
  startQwenServer,
  type Fault,
  type QwenServerOptions,
  type QwenTestServer,
} from './support/qwen-server.js';

const SCOPE = 'openid profile email model.completion';

/**
 * A clock whose timers fire on the next turn of the event loop and move virtual time forward by
 * their delay. The server shares it, so its slow_down and expiry checks see the same time.
 */
function virtualClock(start = 1_800_000_000_000): Clock & { delays: number[] } {
  let now = start;
  const delays: number[] = [];
  return {
    delays,
    now: () => now,
    setTimeout(fn: () => void, ms: number): TimerHandle {
      delays.push(ms);
      return setImmediate(() => {
        now += ms;
        fn();
      });
    },
    clearTimeout(handle: TimerHandle) {
      clearImmediate(handle as NodeJS.Immediate);
    },
  };
}

let server: QwenTestServer | undefined;
let clock: ReturnType<typeof virtualClock>;

async function setup(
  serverOptions: QwenServerOptions = {},
  clientOptions: Partial<QwenOAuthClientOptions> = {},
): Promise<{ server: QwenTestServer; client: QwenOAuthClient }> {
  clock = virtualClock();
  server = await startQwenServer({ now: clock.now, ...serverOptions });
  const client = new QwenOAuthClient({
    baseUrl: server.baseUrl,
    clientId: QWEN_CLIENT_ID,
    scope: SCOPE,
    timeoutMs: 2000,
    ...clientOptions,
  });
  return { server, client };
}

afterEach(async () => {
  await server?.close();
  server = undefined;
});

async function caught(p: Promise<unknown>): Promise<unknown> {
  try {
    await p;
  } catch (e) {
    return e;
  }
  throw new Error('expected a rejection');
}

function expectNoSecrets(error: unknown, s: QwenTestServer): void {
  const text = `${String((error as Error).message)} ${JSON.stringify(error)}`;
  for (const secret of [...s.issuedTokens(), ...s.issuedDeviceCodes()]) expect(text).not.toContain(secret);
}

describe('device authorization (RFC 8628 + PKCE)', () => {
  it('runs the whole flow: S256 challenge, polls with code_verifier, tokens that work on the chat API', async () => {
    const { server, client } = await setup({ deviceInterval: 5, approveAfterPolls: 2 });
    const auth = await client.deviceAuthorizationRequest();

    const authReq = server.lastRequest('deviceCode')!;
    expect(authReq.headers['content-type']).toMatch(/^application\/x-www-form-urlencoded(;|$)/);
    expect(authReq.headers.accept).toBe('application/json');
    expect(authReq.form).toEqual({
      scope: SCOPE,
      code_challenge: createHash('sha256').update(auth.code_verifier).digest('base64url'),
      code_challenge_method: 'S256',
      client_id: QWEN_CLIENT_ID,
    });
    expect(auth.code_verifier).toMatch(/^[A-Za-z0-9_-]{43}$/);
    expect(auth).toMatchObject({ interval: 5, expires_in: 600 });
    expect(auth.user_code).toBe(server.deviceCode()?.userCode);
    expect(auth.verification_uri_complete).toContain(auth.user_code);

    const polls: DevicePollResult['status'][] = [];
    const grant = await client.waitForDeviceToken(auth, { clock, onPoll: (r) => polls.push(r.status) });
    expect(polls).toEqual(['pending', 'pending', 'success']);
    expect(clock.delays).toEqual([5000, 5000, 5000]);
    expect(server.counts.deviceToken).toBe(3);

    const pollReq = server.lastRequest('token')!;
    expect(pollReq.headers['content-type']).toMatch(/^application\/x-www-form-urlencoded(;|$)/);
    expect(pollReq.headers.accept).toBe('application/json');
    expect(pollReq.form).toEqual({
      grant_type: DEVICE_GRANT_TYPE,
      client_id: QWEN_CLIENT_ID,
      device_code: auth.device_code,
      code_verifier: auth.code_verifier,
    });

    expect(grant).toMatchObject({ token_type: 'Bearer', expires_in: 21600, resource_url: 'portal.qwen.ai' });
    expect(server.issuedTokens('access')).toEqual([grant.access_token]);
    expect(server.issuedTokens('refresh')).toEqual([grant.refresh_token]);
    const res = await fetch(`${server.baseUrl}${CHAT_PATH}`, {
      method: 'POST',
      headers: { authorization: `${grant.token_type} ${grant.access_token}`, 'content-type': 'application/json' },
      body: JSON.stringify({ model: 'coder-model', messages: [{ role: 'user', content: 'hi' }] }),
    });
    expect(res.status).toBe(200);
  });

  it('polls every 2 s when the server sends no interval', async () => {
    const { client } = await setup({ deviceInterval: null, approveAfterPolls: 1 });
    const auth = await client.deviceAuthorizationRequest();
    expect(auth.interval).toBe(2);
    await client.waitForDeviceToken(auth, { clock });
    expect(clock.delays).toEqual([2000, 2000]);
  });

  it.each([429, 400] as const)('grows the interval x1.5 on slow_down sent with HTTP %i', async (slowDownStatus) => {
    const { server, client } = await setup({ deviceInterval: 1, minPollIntervalMs: 2000, slowDownStatus, approveAfterPolls: 2 });
    const auth = await client.deviceAuthorizationRequest();
    const polls: string[] = [];
    await client.waitForDeviceToken(auth, { clock, onPoll: (r) => polls.push(r.status) });
    expect(polls).toEqual(['pending', 'slow_down', 'slow_down', 'pending', 'success']);
    expect(clock.delays).toEqual([1000, 1000, 1500, 2250, 2250]);
    expect(server.deviceCode()?.polls).toBe(5);
  });

  it('caps the grown interval at 10 s and stops at the expires_in deadline', async () => {
    const { server, client } = await setup({ deviceInterval: 8, minPollIntervalMs: 60_000, deviceExpiresIn: 40 });
    const auth = await client.deviceAuthorizationRequest();
    const polls: string[] = [];
    const error = await caught(client.waitForDeviceToken(auth, { clock, onPoll: (r) => polls.push(r.status) }));
    expect(error).toBeInstanceOf(QwenOAuthError);
    expect(error).toMatchObject({ oauthError: 'expired_token', retryable: false });
    expect((error as Error).message).toMatch(/expired before it was approved/);
    expect(polls).toEqual(['pending', 'slow_down', 'slow_down', 'slow_down']);
    expect(clock.delays).toEqual([8000, 8000, 10000, 10000, 4000]);
    expect(server.counts.deviceToken).toBe(4);
  });

  it('reports expired_token from the server', async () => {
    const { server, client } = await setup({ deviceInterval: 1 });
    const auth = await client.deviceAuthorizationRequest();
    const error = await caught(client.waitForDeviceToken(auth, { clock, onPoll: () => server.expireDeviceCode() }));
    expect(error).toMatchObject({ name: 'QwenOAuthError', oauthError: 'expired_token' });
    expect(server.counts.deviceToken).toBe(2);
  });

  it('reports access_denied, also when the server just answers 401', async () => {
    const { server, client } = await setup({ deviceInterval: 1 });
    const auth = await client.deviceAuthorizationRequest();
    const denied = await caught(client.waitForDeviceToken(auth, { clock, onPoll: () => server.deny() }));
    expect(denied).toMatchObject({ name: 'QwenOAuthError', oauthError: 'access_denied', retryable: false });

    const auth2 = await client.deviceAuthorizationRequest();
    server.injectFault({ kind: 'respond', status: 401, headers: { 'content-type': 'text/plain' }, body: 'Unauthorized', times: 1 });
    const bare401 = await caught(client.deviceTokenPoll(auth2));
    expect(bare401).toMatchObject({ oauthError: 'access_denied', status: 401 });
    expectNoSecrets(denied, server);
  });

  it('retries network errors, timeouts and 5xx while polling, backing off until the server answers again', async () => {
    const { server, client } = await setup({ deviceInterval: 1, approveAfterPolls: 1 }, { timeoutMs: 150 });
    const auth = await client.deviceAuthorizationRequest();
    server.injectFault({ kind: '5xx', times: 1 });
    const transient: string[] = [];
    const polls: string[] = [];
    const onPoll = (r: DevicePollResult): void => {
      polls.push(r.status);
      if (polls.length === 1) {
        server.injectFault({ kind: 'reset', times: 1 });
        server.injectFault({ kind: 'delay', delayMs: 60_000, times: 1 });
      }
    };
    // 5xx, pending (then approved), reset, delay (timeout) consumed in order of injection.
    const grant = await client.waitForDeviceToken(auth, {
      clock,
      onPoll,
      onTransientError: (e) => transient.push(e.message),
    });
    expect(grant.access_token).toMatch(/^qat_/);
    expect(transient).toEqual([
      'token endpoint answered HTTP 503',
      expect.stringMatching(/^the token endpoint closed the connection without answering/),
      'token endpoint timed out after 150 ms',
    ]);
    expect(polls).toEqual(['pending', 'success']);
    // 5xx: doubled; the pending answer: back to the interval; reset, then timeout: doubled twice.
    expect(clock.delays).toEqual([1000, 2000, 1000, 2000, 4000]);
  });

  it('backs off exponentially on timeouts (RFC 8628 §3.5), up to 60 s and never past the code expiry', async () => {
    const { server, client } = await setup({ deviceInterval: 1, deviceExpiresIn: 120 }, { timeoutMs: 50 });
    const auth = await client.deviceAuthorizationRequest();
    server.injectFault({ kind: 'delay', delayMs: 60_000, times: 8 });
    const transient: string[] = [];
    const error = await caught(client.waitForDeviceToken(auth, { clock, onTransientError: (e) => transient.push(e.message) }));
    expect(error).toMatchObject({ oauthError: 'expired_token' });
    // 1+2+4+8+16+32 s, then 60 s (capped) cut to the 57 s left before the code expires.
    expect(transient).toEqual(Array(6).fill('token endpoint timed out after 50 ms'));
    expect(clock.delays).toEqual([1000, 2000, 4000, 8000, 16000, 32000, 57000]);
  });

  it('waits at least what a Retry-After asks after a 429 or a 503 (seconds or a date), bounded at 60 s', async () => {
    const { server, client } = await setup({ deviceInterval: 1, approveAfterPolls: 1 });
    const auth = await client.deviceAuthorizationRequest();
    const at = (ms: number) => new Date(clock.now() + ms).toUTCString();
    server.injectFault({ kind: '429', times: 1 }); // Retry-After: 1, under the doubled wait
    server.injectFault({ kind: 'respond', status: 503, headers: { 'retry-after': '7', 'content-type': 'text/plain' }, body: 'busy', times: 1 });
    const polls: string[] = [];
    await client.waitForDeviceToken(auth, {
      clock,
      onPoll: (r) => polls.push(r.status),
      onTransientError: () => {
        if (clock.delays.length === 2) {
          // A date 30 s after the 7 s wait that comes first.
          server.injectFault({ kind: 'respond', status: 503, headers: { 'retry-after': at(37_000) }, body: '', times: 1 });
          server.injectFault({ kind: 'respond', status: 429, headers: { 'retry-after': '3600' }, body: '', times: 1 });
        }
      },
    });
    expect(polls).toEqual(['pending', 'success']);
    expect(clock.delays).toEqual([1000, 2000, 7000, 30000, 60000, 1000]);
  });

  it('stops with "cancelled" when the signal aborts, during a wait or a request', async () => {
    const { server, client } = await setup({ deviceInterval: 1 });
    const auth = await client.deviceAuthorizationRequest();
    const controller = new AbortController();
    const waiting = await caught(
      client.waitForDeviceToken(auth, { clock, signal: controller.signal, onPoll: () => controller.abort() }),
    );
    expect(waiting).toMatchObject({ oauthError: 'cancelled', retryable: false });

    server.injectFault({ kind: 'delay', delayMs: 60_000 });
    const c2 = new AbortController();
    const inflight = client.waitForDeviceToken(auth, { clock, signal: c2.signal });
    setTimeout(() => c2.abort(), 50);
    expect(await caught(inflight)).toMatchObject({ oauthError: 'cancelled', message: 'the login was cancelled' });
  });

  it('fails without retry when the PKCE verifier does not match', async () => {
    const { server, client } = await setup();
    const auth = await client.deviceAuthorizationRequest();
    const tampered: DeviceAuthorization = { ...auth, code_verifier: 'x'.repeat(43) };
    const error = await caught(client.deviceTokenPoll(tampered));
    expect(error).toMatchObject({ name: 'QwenOAuthError', oauthError: 'invalid_grant', status: 400, retryable: false });
    expect(server.lastRequest('token')?.form?.code_verifier).toBe('x'.repeat(43));
  });

  it('maps device authorization failures: refused client, 5xx, HTML', async () => {
    const { server, client } = await setup({ clientId: 'someone-else' });
    expect(await caught(client.deviceAuthorizationRequest())).toMatchObject({ oauthError: 'invalid_client', retryable: false });
    server.settings.clientId = QWEN_CLIENT_ID;
    server.injectFault({ kind: '5xx', endpoint: 'deviceCode', status: 502, plain: true, times: 1 });
    expect(await caught(client.deviceAuthorizationRequest())).toMatchObject({
      message: 'device authorization endpoint answered HTTP 502',
      retryable: true,
    });
    server.injectFault({ kind: 'html', endpoint: 'deviceCode', times: 1 });
    expect(await caught(client.deviceAuthorizationRequest())).toMatchObject({
      message: 'device authorization endpoint answered HTTP 502 with an HTML page',
      retryable: true,
    });
  });
});

describe('refresh (RFC 6749 §6)', () => {
  it('refreshes with a rotated refresh token, and the retired one is then rejected', async () => {
    const { server, client } = await setup();
    const seed = server.issueTokens();
    const grant = await client.refreshTokenGrant(seed.refresh_token);

    const req = server.lastRequest('token')!;
    expect(req.headers['content-type']).toMatch(/^application\/x-www-form-urlencoded(;|$)/);
    expect(req.headers.accept).toBe('application/json');
    expect(req.form).toEqual({ grant_type: 'refresh_token', refresh_token: seed.refresh_token, client_id: QWEN_CLIENT_ID });

    expect(grant.access_token).not.toBe(seed.access_token);
    expect(grant.refresh_token).toMatch(/^qrt_/);
    expect(grant.refresh_token).not.toBe(seed.refresh_token);
    expect(grant).toMatchObject({ token_type: 'Bearer', expires_in: 21600, resource_url: 'portal.qwen.ai' });

    const creds = credentialsFromGrant(grant, seed, 1000);
    expect(creds).toEqual({
      access_token: grant.access_token,
      refresh_token: grant.refresh_token,
      token_type: 'Bearer',
      resource_url: 'portal.qwen.ai',
      expiry_date: 1000 + 21600 * 1000,
    });

    const reuse = await caught(client.refreshTokenGrant(seed.refresh_token));
    expect(reuse).toBeInstanceOf(QwenRefreshTokenInvalidError);
    expect(isRefreshTokenRejection(reuse)).toBe(true);
    expect(server.reuseCount).toBe(1);
  });

  it('keeps the previous refresh_token and resource_url when the response omits them', async () => {
    const { server, client } = await setup({ rotateRefreshTokens: false, omitRefreshTokenOnRefresh: true, expiresIn: 3600 });
    const seed = server.issueTokens();
    server.settings.resourceUrl = null;
    const grant = await client.refreshTokenGrant(seed.refresh_token);
    expect(grant.refresh_token).toBeUndefined();
    expect(grant.resource_url).toBeUndefined();
    const previous: Credentials = { ...seed, resource_url: 'https://example.test/custom' };
    expect(credentialsFromGrant(grant, previous, 5000)).toEqual({
      access_token: grant.access_token,
      refresh_token: seed.refresh_token,
      token_type: 'Bearer',
      resource_url: 'https://example.test/custom',
      expiry_date: 5000 + 3600 * 1000,
    });
    expect(() => credentialsFromGrant(grant, null, 0)).toThrow(QwenOAuthError);
  });

  it('treats Qwen’s invalid_request and RFC invalid_grant (400/401/403) as a rejected refresh token', async () => {
    const { server, client } = await setup();
    const unknown = await caught(client.refreshTokenGrant('qrt_not-issued-by-this-server'));
    expect(unknown).toBeInstanceOf(QwenRefreshTokenInvalidError);
    expect((unknown as Error).message).toContain('Invalid refresh token or client_id');
    expect((unknown as Error).message).not.toContain('qrt_not-issued');

    const json = { 'content-type': 'application/json' };
    const rfc: Fault[] = [
      { kind: 'respond', status: 400, headers: json, body: '{"error":"invalid_grant"}', times: 1 },
      { kind: 'respond', status: 403, headers: json, body: '{"error":"invalid_client"}', times: 1 },
      {
        kind: 'respond',
        status: 401,
        headers: { ...json, 'www-authenticate': 'Basic realm="qwen"' },
        body: '{"error":"invalid_client","error_description":"bad client"}',
        times: 1,
      },
    ];
    const seed = server.issueTokens();
    for (const fault of rfc) {
      server.injectFault(fault);
      const error = await caught(client.refreshTokenGrant(seed.refresh_token));
      expect(error, fault.body).toBeInstanceOf(QwenRefreshTokenInvalidError);
    }
    // Rebuilt from the wire by a client, the error is still recognised.
    expect(isRefreshTokenRejection(errorFromWire('QWEN_REFRESH_TOKEN_INVALID', 'x'))).toBe(true);
    expect(isRefreshTokenRejection(new QwenOAuthError('x', { retryable: true }))).toBe(false);
  });

  it('treats retryable OAuth errors and 4xx without an OAuth error as temporary', async () => {
    const { server, client } = await setup();
    const seed = server.issueTokens();
    const json = { 'content-type': 'application/json' };
    const temporary: Fault[] = [
      { kind: 'respond', status: 400, headers: json, body: '{"error":"temporarily_unavailable"}', times: 1 },
      { kind: 'respond', status: 400, headers: json, body: '{"error":"slow_down"}', times: 1 },
      { kind: 'respond', status: 403, headers: { 'content-type': 'text/html' }, body: '<html>WAF</html>', times: 1 },
      { kind: 'respond', status: 401, headers: json, body: '{"error":{"code":"x"}}', times: 1 },
    ];
    for (const fault of temporary) {
      server.injectFault(fault);
      const error = await caught(client.refreshTokenGrant(seed.refresh_token));
      expect(error, fault.body).toBeInstanceOf(QwenOAuthError);
      expect(error, fault.body).toMatchObject({ retryable: true });
    }
    expect(server.counts.refresh).toBe(4);
  });

  it('refuses an empty refresh token without a request', async () => {
    const { server, client } = await setup();
    expect(await caught(client.refreshTokenGrant(''))).toBeInstanceOf(QwenRefreshTokenInvalidError);
    expect(server.counts.refresh).toBe(0);
  });

  const faults: [string, Fault | 'refuse', RegExp][] = [
    ['HTTP 503 JSON', { kind: '5xx' }, /^token endpoint answered HTTP 503$/],
    ['HTTP 500 plain', { kind: '5xx', status: 500, plain: true }, /^token endpoint answered HTTP 500$/],
    ['HTTP 429', { kind: '429' }, /^token endpoint answered HTTP 429 \(rate_limited/],
    ['timeout', { kind: 'delay', delayMs: 5000 }, /^token endpoint timed out after 150 ms$/],
    ['connection reset', { kind: 'reset' }, /^the token endpoint closed the connection without answering \((ECONNRESET|UND_ERR_SOCKET)\)$/],
    ['malformed JSON', { kind: 'malformedJson' }, /^token endpoint sent a body that is not JSON$/],
    ['HTML page', { kind: 'html' }, /^token endpoint answered HTTP 502 with an HTML page$/],
    [
      'HTML with 200',
      { kind: 'respond', status: 200, headers: { 'content-type': 'text/html' }, body: '<html></html>' },
      /^token endpoint sent an HTML page instead of JSON$/,
    ],
    [
      'missing expires_in',
      { kind: 'respond', status: 200, headers: { 'content-type': 'application/json' }, body: '{"access_token":"qat_zzz","token_type":"Bearer"}' },
      /^token endpoint sent a malformed token response \(missing or invalid: expires_in\)$/,
    ],
    [
      'missing access_token',
      { kind: 'respond', status: 200, headers: { 'content-type': 'application/json' }, body: '{"token_type":"Bearer","expires_in":60}' },
      /^token endpoint sent a malformed response \(.*access_token.*\)$/,
    ],
    ['connection refused', 'refuse', /^could not reach the token endpoint: connection refused \(ECONNREFUSED\); check the network connection, QWEN_OAUTH_BASE_URL/],
  ];

  it.each(faults)('turns %s into a retryable QwenOAuthError', async (_name, fault, message) => {
    const { server, client } = await setup({}, { timeoutMs: 150 });
    const seed = server.issueTokens();
    if (fault === 'refuse') await server.refuseConnections();
    else server.injectFault(fault);
    const error = await caught(client.refreshTokenGrant(seed.refresh_token));
    expect(error).toBeInstanceOf(QwenOAuthError);
    expect(error).not.toBeInstanceOf(QwenRefreshTokenInvalidError);
    expect(error).toMatchObject({ retryable: true });
    expect((error as Error).message).toMatch(message);
    expect(isRefreshTokenRejection(error)).toBe(false);
    expectNoSecrets(error, server);
    expect((error as Error).message).not.toContain('qat_zzz');
  });

  it('reports a caller abort as cancelled, not as a timeout', async () => {
    const { server, client } = await setup();
    server.injectFault({ kind: 'delay', delayMs: 5000 });
    const error = await caught(client.refreshTokenGrant(server.issueTokens().refresh_token, AbortSignal.abort()));
    expect(error).toMatchObject({ oauthError: 'cancelled', retryable: false });
  });
});

describe('client configuration', () => {
  it('uses the injected fetch for every request', async () => {
    const calls: string[] = [];
    const { server, client } = await setup({}, {
      fetch: (input, init) => {
        calls.push(String(input));
        return fetch(input, init);
      },
    });
    await client.refreshTokenGrant(server.issueTokens().refresh_token);
    await client.deviceAuthorizationRequest();
    expect(calls).toEqual([`${server.baseUrl}/api/v1/oauth2/token`, `${server.baseUrl}/api/v1/oauth2/device/code`]);
  });

  it('refuses plain http except on loopback', () => {
    const base = { clientId: QWEN_CLIENT_ID, scope: SCOPE, timeoutMs: 1000 };
    expect(() => new QwenOAuthClient({ ...base, baseUrl: 'http://chat.qwen.ai' })).toThrow(QwenConfigError);
    expect(() => new QwenOAuthClient({ ...base, baseUrl: 'not a url' })).toThrow(QwenConfigError);
    expect(() => new QwenOAuthClient({ ...base, baseUrl: 'https://chat.qwen.ai/' })).not.toThrow();
    expect(() => new QwenOAuthClient({ ...base, baseUrl: 'http://localhost:1234' })).not.toThrow();
  });
});
