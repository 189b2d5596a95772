/**
 * The generic RFC 8628 client (daemon/oauth-device.ts) against a real OpenID Provider
 * (oidc-provider, see test/support/oidc-provider.ts), plus small local servers for the broken
 * answers a real provider never gives. The user's part of every login goes through the
 * provider's own pages. Polling runs on a fake clock: the intervals are read from its timers.
 */
import { createHash } from 'node:crypto';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import { DeviceFlowClient, type DeviceFlowClientOptions } from '../daemon/oauth-device.js';
import type { DeviceAuthorization, DevicePollResult, TokenGrant } from '../daemon/oauth.js';
import { QwenConfigError, QwenError, QwenOAuthError, QwenRefreshTokenInvalidError } from '../shared/errors.js';
import { OAuthDeviceSettingsSchema, type OAuthDeviceSettings } from '../shared/profiles.js';
import { FakeClock } from './chaos/fake-clock.js';
import { startOidcProvider, type OidcProviderOptions, type OidcTestProvider } from './support/oidc-provider.js';
import { until } from './support/wait.js';

const PROFILE = 'corp';
const SCOPE = 'openid offline_access';

const cleanups: (() => Promise<void>)[] = [];
afterEach(async () => {
  while (cleanups.length) await cleanups.pop()!();
});

async function provider(options: OidcProviderOptions = {}): Promise<OidcTestProvider> {
  const p = await startOidcProvider(options);
  cleanups.push(() => p.close());
  return p;
}

function settingsFor(p: { issuer: string; clientId?: string }, extra: Partial<OAuthDeviceSettings> = {}): OAuthDeviceSettings {
  return { kind: 'oauth-device', issuer: p.issuer, client_id: p.clientId ?? 'qwen-tokend-test', scope: SCOPE, base_url: 'http://127.0.0.1:9/v1', ...extra };
}

function deviceClient(settings: OAuthDeviceSettings, options: Partial<DeviceFlowClientOptions> = {}): DeviceFlowClient {
  return new DeviceFlowClient({ profile: PROFILE, settings, timeoutMs: 5_000, ...options });
}

/** A plain local HTTP server; records the paths asked for. */
async function fakeServer(handler: (req: IncomingMessage, res: ServerResponse, base: string) => void): Promise<{ base: string; paths: string[] }> {
  const paths: string[] = [];
  let base = '';
  const server: Server = createServer((req, res) => {
    paths.push(req.url ?? '');
    handler(req, res, base);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  cleanups.push(async () => {
    server.closeAllConnections();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  });
  return { base, paths };
}

function sendJson(res: ServerResponse, status: number, body: unknown): void {
  res.writeHead(status, { 'content-type': 'application/json' }).end(JSON.stringify(body));
}

/** Waits for the poll loop's next timer, checks its delay, and lets it fire. */
async function nextPoll(clock: FakeClock, expectedDelayMs: number): Promise<void> {
  await until(() => clock.pending === 1, 'the next poll timer');
  expect(clock.nextDueIn()).toBe(expectedDelayMs);
  clock.advance(expectedDelayMs);
}

/** A full login: device authorization, one pending poll, approval through the pages, success. */
async function login(p: OidcTestProvider, client: DeviceFlowClient): Promise<{ auth: DeviceAuthorization; grant: TokenGrant; polls: string[] }> {
  const auth = await client.deviceAuthorizationRequest();
  const clock = new FakeClock(Date.now());
  const polls: string[] = [];
  const waiting = client.waitForDeviceToken(auth, { clock, onPoll: (r: DevicePollResult) => polls.push(r.status) });
  await nextPoll(clock, 5_000);
  await until(() => polls.length === 1, 'the first poll');
  await p.approveDevice(auth.user_code);
  await nextPoll(clock, 5_000);
  const grant = await waiting;
  return { auth, grant, polls };
}

/** Every secret a test saw, for the check that no message holds one. */
function secretsOf(p: OidcTestProvider, extra: string[] = []): string[] {
  return [...p.accessTokensIssued, ...p.refreshTokensIssued, ...extra];
}

function expectNoSecret(error: unknown, secrets: string[]): void {
  const text = `${String(error)} ${(error as Error).stack ?? ''} ${JSON.stringify(error)}`;
  for (const secret of secrets) expect(text).not.toContain(secret);
}

describe('login through the provider pages', () => {
  it('discovers the endpoints, sends PKCE S256 and scope, polls at RFC 8628 5 s and gets the provider\'s token', async () => {
    const p = await provider();
    const client = deviceClient(settingsFor(p));
    expect(await client.discover()).toEqual({
      issuer: p.issuer,
      device_authorization_endpoint: `${p.issuer}/device/auth`,
      token_endpoint: `${p.issuer}/token`,
    });
    const { auth, grant, polls } = await login(p, client);
    // oidc-provider sends no interval: RFC 8628's 5 s applies (the polls above waited 5000 ms).
    expect(auth.interval).toBe(5);
    expect(polls).toEqual(['pending', 'success']);
    expect(grant.access_token).toBe(p.accessTokensIssued[0]);
    expect(grant.refresh_token).toBe(p.refreshTokensIssued[0]);
    expect(grant.token_type).toBe('Bearer');
    expect(grant.expires_in).toBe(20);

    const [request] = p.deviceAuthorizationRequests;
    expect(request).toMatchObject({ client_id: p.clientId, scope: SCOPE, code_challenge_method: 'S256' });
    const challenge = createHash('sha256').update(auth.code_verifier).digest('base64url');
    expect(request!.code_challenge).toBe(challenge);
    const devicePolls = p.tokenRequests.filter((r) => r.grantType === 'device_code');
    expect(devicePolls).toHaveLength(2);
    for (const poll of devicePolls) expect(poll.body.code_verifier).toBe(auth.code_verifier);
  });

  it("polls at the server's interval when it sends one", async () => {
    const p = await provider({ interval: 2 });
    const client = deviceClient(settingsFor(p));
    const auth = await client.deviceAuthorizationRequest();
    expect(auth.interval).toBe(2);
    await p.approveDevice(auth.user_code);
    const clock = new FakeClock(Date.now());
    const waiting = client.waitForDeviceToken(auth, { clock });
    await nextPoll(clock, 2_000);
    expect((await waiting).access_token).toBe(p.accessTokensIssued[0]);
  });

  it('with pkce off sends neither challenge nor verifier', async () => {
    const p = await provider();
    const { auth } = await login(p, deviceClient(settingsFor(p, { pkce: false })));
    expect(auth.code_verifier).toBe('');
    expect(p.deviceAuthorizationRequests[0]).not.toHaveProperty('code_challenge');
    expect(p.deviceAuthorizationRequests[0]).not.toHaveProperty('code_challenge_method');
    for (const poll of p.tokenRequests) expect(poll.body).not.toHaveProperty('code_verifier');
  });

  it('sends audience and resource on the device authorization request', async () => {
    const p = await provider();
    const bodies: string[] = [];
    const recording: typeof fetch = async (input, init) => {
      if (typeof init?.body === 'string' || init?.body instanceof URLSearchParams) bodies.push(String(init.body));
      return fetch(input, init);
    };
    const client = deviceClient(settingsFor(p, { audience: 'https://api.example.test', resource: 'https://api.example.test/v1' }), { fetch: recording });
    // oidc-provider knows no such resource server and says so; what matters is what was sent.
    const error = await client.deviceAuthorizationRequest().catch((e: unknown) => e);
    const sent = new URLSearchParams(bodies.at(-1));
    expect(sent.get('audience')).toBe('https://api.example.test');
    expect(sent.get('resource')).toBe('https://api.example.test/v1');
    expect(sent.get('code_challenge_method')).toBe('S256');
    expect(error).toBeInstanceOf(QwenOAuthError);
    expect((error as Error).message).toMatch(/^device authorization endpoint of profile "corp" \(127\.0\.0\.1:\d+\) refused the request \(invalid_target: /);
  });

  it.each([400, 429] as const)('adds 5 s per slow_down sent with HTTP %i, and never shrinks the interval', async (status) => {
    const p = await provider({ slowDown: { polls: 2, status } });
    const client = deviceClient(settingsFor(p));
    const auth = await client.deviceAuthorizationRequest();
    const clock = new FakeClock(Date.now());
    const polls: string[] = [];
    const waiting = client.waitForDeviceToken(auth, { clock, onPoll: (r) => polls.push(r.status) });
    await nextPoll(clock, 5_000);
    await until(() => polls.length === 1, 'poll 1');
    await nextPoll(clock, 10_000);
    await until(() => polls.length === 2, 'poll 2');
    await nextPoll(clock, 15_000);
    await until(() => polls.length === 3, 'poll 3');
    await p.approveDevice(auth.user_code);
    await nextPoll(clock, 15_000);
    await waiting;
    expect(polls).toEqual(['slow_down', 'slow_down', 'pending', 'success']);
    expect(p.tokenRequests.slice(0, 2).map((r) => [r.status, r.error])).toEqual([
      [status, 'slow_down'],
      [status, 'slow_down'],
    ]);
  });

  it('backs off on a busy token endpoint (503, then 429 with Retry-After) and returns to 5 s once it answers (RFC 8628 §3.5)', async () => {
    let polls = 0;
    const { base } = await fakeServer((req, res) => {
      if (req.url === '/device') {
        sendJson(res, 200, { device_code: 'dc', user_code: 'UC', verification_uri: 'http://127.0.0.1/verify', expires_in: 600 });
        return;
      }
      polls += 1;
      if (polls === 1) res.writeHead(503, { 'content-type': 'text/plain' }).end('busy');
      else if (polls === 2) res.writeHead(429, { 'content-type': 'application/json', 'retry-after': '30' }).end('{"error":"rate_limited"}');
      else if (polls === 3) sendJson(res, 400, { error: 'authorization_pending' });
      else sendJson(res, 200, { access_token: 'at', token_type: 'Bearer', expires_in: 60, refresh_token: 'rt' });
    });
    const client = deviceClient({ kind: 'oauth-device', device_authorization_endpoint: `${base}/device`, token_endpoint: `${base}/token`, client_id: 'c', base_url: 'http://127.0.0.1:9/v1' });
    const auth = await client.deviceAuthorizationRequest();
    const clock = new FakeClock(Date.now());
    const waiting = client.waitForDeviceToken(auth, { clock });
    await nextPoll(clock, 5_000);
    await until(() => polls === 1, 'poll 1');
    await nextPoll(clock, 10_000);
    await until(() => polls === 2, 'poll 2');
    await nextPoll(clock, 30_000);
    await until(() => polls === 3, 'poll 3');
    await nextPoll(clock, 5_000);
    expect((await waiting).access_token).toBe('at');
  });

  it('a denied sign-in ends the wait with access_denied naming the profile', async () => {
    const p = await provider();
    const client = deviceClient(settingsFor(p));
    const auth = await client.deviceAuthorizationRequest();
    await p.denyDevice(auth.user_code);
    const error = await client.deviceTokenPoll(auth).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(QwenOAuthError);
    expect((error as QwenOAuthError).oauthError).toBe('access_denied');
    expect((error as Error).message).toMatch(/sign-in for profile "corp" was denied at 127\.0\.0\.1:\d+; run the login again/);
  });

  it('a device code not approved before expires_in ends the wait with a clear error', async () => {
    const p = await provider();
    const client = deviceClient(settingsFor(p));
    const auth = await client.deviceAuthorizationRequest();
    const clock = new FakeClock(Date.now());
    const waiting = client.waitForDeviceToken({ ...auth, expires_in: 12 }, { clock }).catch((e: unknown) => e);
    await nextPoll(clock, 5_000);
    await nextPoll(clock, 5_000);
    await nextPoll(clock, 2_000);
    const error = await waiting;
    expect(error).toBeInstanceOf(QwenOAuthError);
    expect((error as QwenOAuthError).oauthError).toBe('expired_token');
    expect((error as Error).message).toBe('the device code of profile "corp" expired before it was approved; run the login again');
  });

  it('a device code polled again after success is refused (and oidc-provider revokes the grant)', async () => {
    const p = await provider();
    const client = deviceClient(settingsFor(p));
    const { auth, grant } = await login(p, client);
    const again = await client.deviceTokenPoll(auth).catch((e: unknown) => e);
    expect(again).toBeInstanceOf(QwenOAuthError);
    expect((again as QwenOAuthError).retryable).toBe(false);
    expect((again as Error).message).toMatch(/token endpoint of profile "corp" \(127\.0\.0\.1:\d+\) refused the device code \(invalid_grant/);
    const refresh = await client.refreshTokenGrant(grant.refresh_token!).catch((e: unknown) => e);
    expect(refresh).toBeInstanceOf(QwenRefreshTokenInvalidError);
    expectNoSecret(again, secretsOf(p, [auth.device_code, auth.code_verifier]));
  });
});

describe('refresh', () => {
  it('rotates: each refresh presents the newest refresh token, and a retired one is never presented again', async () => {
    const p = await provider();
    const client = deviceClient(settingsFor(p));
    const { grant } = await login(p, client);
    const second = await client.refreshTokenGrant(grant.refresh_token!);
    const third = await client.refreshTokenGrant(second.refresh_token!);
    expect(second.access_token).toBe(p.accessTokensIssued[1]);
    expect(third.access_token).toBe(p.accessTokensIssued[2]);
    expect(new Set([grant.refresh_token, second.refresh_token, third.refresh_token]).size).toBe(3);
    expect(p.refreshTokensPresented).toEqual([grant.refresh_token, second.refresh_token]);
    expect(p.tokenRequestCounts).toEqual({ device_code: 2, refresh_token: 2 });
  });

  it('a reused retired refresh token gets invalid_grant → QwenRefreshTokenInvalidError, and the whole grant is gone', async () => {
    const p = await provider();
    const client = deviceClient(settingsFor(p));
    const { grant } = await login(p, client);
    const second = await client.refreshTokenGrant(grant.refresh_token!);
    const reuse = await client.refreshTokenGrant(grant.refresh_token!).catch((e: unknown) => e);
    expect(reuse).toBeInstanceOf(QwenRefreshTokenInvalidError);
    expect((reuse as Error).message).toMatch(/^the token endpoint of profile "corp" \(127\.0\.0\.1:\d+\) rejected the refresh token \(HTTP 400, invalid_grant/);
    const current = await client.refreshTokenGrant(second.refresh_token!).catch((e: unknown) => e);
    expect(current).toBeInstanceOf(QwenRefreshTokenInvalidError);
    for (const error of [reuse, current]) expectNoSecret(error, secretsOf(p));
  });

  it('a revoked grant → QwenRefreshTokenInvalidError', async () => {
    const p = await provider();
    const client = deviceClient(settingsFor(p));
    const { grant } = await login(p, client);
    await p.revokeGrant(grant.refresh_token);
    const error = await client.refreshTokenGrant(grant.refresh_token!).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(QwenRefreshTokenInvalidError);
    expectNoSecret(error, secretsOf(p));
  });

  it('a provider that issues no refresh token: the grant comes back without one', async () => {
    const p = await provider({ issueRefreshToken: false });
    const { grant } = await login(p, deviceClient(settingsFor(p)));
    expect(grant.access_token).toBe(p.accessTokensIssued[0]);
    expect(grant.refresh_token).toBeUndefined();
    expect(p.refreshTokensIssued).toEqual([]);
  });

  it('network failures, 5xx and 429 are retryable and name the profile and host; no refresh token means log in again', async () => {
    const closed = await fakeServer((_req, res) => res.end());
    const port = new URL(closed.base).port;
    const explicit = (base: string): OAuthDeviceSettings => ({
      kind: 'oauth-device',
      device_authorization_endpoint: `${base}/device`,
      token_endpoint: `${base}/token`,
      client_id: 'c',
      base_url: 'http://127.0.0.1:9/v1',
    });
    // Nothing listens on the port once the server is closed.
    await cleanups.pop()!();
    const refused = await deviceClient(explicit(closed.base)).refreshTokenGrant('rt-presented-on-a-dead-port').catch((e: unknown) => e);
    expect(refused).toBeInstanceOf(QwenOAuthError);
    expect((refused as QwenOAuthError).retryable).toBe(true);
    expect((refused as Error).message).toContain(`could not reach the token endpoint of profile "corp" (127.0.0.1:${port}): connection refused (ECONNREFUSED); check the network connection and the profile's issuer or endpoints`);
    expectNoSecret(refused, ['rt-presented-on-a-dead-port']);

    let status = 503;
    const busy = await fakeServer((_req, res) => sendJson(res, status, status === 503 ? { error: 'temporarily_unavailable' } : { error: 'slow_down' }));
    const client = deviceClient(explicit(busy.base));
    for (const s of [503, 429]) {
      status = s;
      const error = await client.refreshTokenGrant('rt-secret-value-1234567890').catch((e: unknown) => e);
      expect(error).toBeInstanceOf(QwenOAuthError);
      expect((error as QwenOAuthError).retryable).toBe(true);
      expect((error as Error).message).toMatch(new RegExp(`^token endpoint of profile "corp" \\(127\\.0\\.0\\.1:\\d+\\) answered HTTP ${s}`));
    }
    const none = await client.refreshTokenGrant('').catch((e: unknown) => e);
    expect(none).toBeInstanceOf(QwenRefreshTokenInvalidError);
  });
});

describe('client secret', () => {
  it('is sent with client_secret_post, and a wrong one gives a clear error that does not contain it', async () => {
    const secret = 'the-client-secret-0123456789abcdef';
    const p = await provider({ clientSecret: { secret, method: 'client_secret_post' } });
    const good = deviceClient(settingsFor(p), { clientSecret: secret });
    const { grant } = await login(p, good);
    expect(p.deviceAuthorizationRequests[0]).toMatchObject({ client_secret: secret });
    await good.refreshTokenGrant(grant.refresh_token!);

    const wrongSecret = 'a-wrong-client-secret-9876543210';
    const wrong = deviceClient(settingsFor(p), { clientSecret: wrongSecret });
    const errors = [
      await wrong.deviceAuthorizationRequest().catch((e: unknown) => e),
      await wrong.refreshTokenGrant(p.refreshTokensIssued.at(-1)!).catch((e: unknown) => e),
    ];
    for (const error of errors) {
      expect(error).toBeInstanceOf(QwenOAuthError);
      expect((error as QwenOAuthError).retryable).toBe(false);
      expect((error as Error).message).toMatch(
        /of profile "corp" \(127\.0\.0\.1:\d+\) refused the client \(invalid_client.*\); check the client_id and the client secret, and how the client is registered to send it \(it went in the request body; set token_endpoint_auth_method to client_secret_basic for the other way\)$/,
      );
      expectNoSecret(error, secretsOf(p, [secret, wrongSecret]));
    }
    const missing = await deviceClient(settingsFor(p)).deviceAuthorizationRequest().catch((e: unknown) => e);
    expect((missing as Error).message).toMatch(/refused the client \(invalid_client.*\); check the client_id, and whether the provider needs a client secret for it$/);
  });
});

describe('token_endpoint_auth_method', () => {
  /**
   * A provider that holds the client to one way of sending its secret, as some do (oidc-provider
   * takes either): `registered` is how the client was registered; discovery lists `listed`.
   */
  async function strictProvider(registered: 'client_secret_basic' | 'client_secret_post', listed: string[], secret: string) {
    const seen: Array<{ path: string; authorization: string | undefined; body: URLSearchParams }> = [];
    const server = await fakeServer((req, res, base) => {
      if (req.url === '/.well-known/oauth-authorization-server') {
        return sendJson(res, 200, { issuer: base, device_authorization_endpoint: `${base}/device`, token_endpoint: `${base}/token`, token_endpoint_auth_methods_supported: listed });
      }
      let text = '';
      req.on('data', (c: Buffer) => (text += c.toString('utf8')));
      req.on('end', () => {
        const body = new URLSearchParams(text);
        seen.push({ path: req.url ?? '', authorization: req.headers.authorization, body });
        const ok = registered === 'client_secret_basic' ? basicCredentials(req.headers.authorization) === `${CLIENT}:${secret}` && !body.has('client_secret') : body.get('client_secret') === secret && req.headers.authorization === undefined;
        if (!ok) return sendJson(res, 401, { error: 'invalid_client', error_description: 'client authentication failed' });
        sendJson(res, 200, { device_code: 'dc-0123456789', user_code: 'ABCD-EFGH', verification_uri: `${base}/activate`, expires_in: 600, interval: 5 });
      });
    });
    return { ...server, seen };
  }
  const CLIENT = 'corp-cli';
  /** `id:secret` from an HTTP Basic header, each part form-decoded as RFC 6749 §2.3.1 has them encoded. */
  const basicCredentials = (header: string | undefined): string | undefined => {
    if (!header?.startsWith('Basic ')) return undefined;
    const [id, secret] = Buffer.from(header.slice(6), 'base64').toString('utf8').split(':');
    const decode = (part = '') => decodeURIComponent(part.replace(/\+/g, ' '));
    return `${decode(id)}:${decode(secret)}`;
  };

  it('client_secret_basic: the secret goes as HTTP Basic where the default (the body) is refused', async () => {
    const secret = 'the-basic-client-secret-0123456789';
    const p = await strictProvider('client_secret_basic', ['client_secret_post', 'client_secret_basic'], secret);
    const settings = settingsFor({ issuer: p.base, clientId: CLIENT });

    const byDefault = await deviceClient(settings, { clientSecret: secret }).deviceAuthorizationRequest().catch((e: unknown) => e);
    expect(byDefault).toBeInstanceOf(QwenOAuthError);
    expect((byDefault as Error).message).toMatch(/refused the client \(invalid_client.*\); check the client_id and the client secret, and how the client is registered to send it \(it went in the request body; set token_endpoint_auth_method to client_secret_basic for the other way\)$/);
    expect(p.seen.at(-1)!.body.get('client_secret')).toBe(secret);
    expectNoSecret(byDefault, [secret]);

    const auth = await deviceClient({ ...settings, token_endpoint_auth_method: 'client_secret_basic' }, { clientSecret: secret }).deviceAuthorizationRequest();
    expect(auth.user_code).toBe('ABCD-EFGH');
    expect(p.seen.at(-1)!.authorization).toMatch(/^Basic /);
    expect(p.seen.at(-1)!.body.has('client_secret')).toBe(false);
  });

  it('client_secret_post: the secret goes in the body even where the provider lists only Basic', async () => {
    const secret = 'the-post-client-secret-0123456789';
    const p = await strictProvider('client_secret_post', ['client_secret_basic'], secret);
    const settings = settingsFor({ issuer: p.base, clientId: CLIENT });
    const byDefault = await deviceClient(settings, { clientSecret: secret }).deviceAuthorizationRequest().catch((e: unknown) => e);
    expect((byDefault as Error).message).toMatch(/refused the client \(invalid_client.*\); .*\(it went as HTTP Basic; set token_endpoint_auth_method to client_secret_post for the other way\)$/);
    expect(p.seen.at(-1)!.authorization).toMatch(/^Basic /);

    await deviceClient({ ...settings, token_endpoint_auth_method: 'client_secret_post' }, { clientSecret: secret }).deviceAuthorizationRequest();
    expect(p.seen.at(-1)!.body.get('client_secret')).toBe(secret);
    expect(p.seen.at(-1)!.authorization).toBeUndefined();
  });

  it('client_secret_basic against oidc-provider: login through its pages and a refresh, the secret never in a body', async () => {
    const secret = 'the-oidc-basic-client-secret-012345';
    const p = await provider({ clientSecret: { secret, method: 'client_secret_basic' } });
    const client = deviceClient(settingsFor(p, { token_endpoint_auth_method: 'client_secret_basic' }), { clientSecret: secret });
    const { grant } = await login(p, client);
    const refreshed = await client.refreshTokenGrant(grant.refresh_token!);
    expect(refreshed.access_token).toBe(p.accessTokensIssued.at(-1));
    expect(p.deviceAuthorizationRequests.at(-1)).not.toHaveProperty('client_secret');
    expect(p.tokenRequests.length).toBeGreaterThanOrEqual(2);
    for (const r of p.tokenRequests) expect(r.body).not.toHaveProperty('client_secret');
  });

  it('set without a stored secret: the refusal says the secret is missing', async () => {
    const p = await strictProvider('client_secret_basic', ['client_secret_basic'], 'the-missing-client-secret-012345');
    const settings = settingsFor({ issuer: p.base, clientId: CLIENT }, { token_endpoint_auth_method: 'client_secret_basic' });
    const error = await deviceClient(settings).deviceAuthorizationRequest().catch((e: unknown) => e);
    expect((error as Error).message).toMatch(/token_endpoint_auth_method is client_secret_basic but the profile has no client secret; store one with `[^`]*profile add corp --replace --client-secret`$/);
  });
});

describe('a token response without expires_in', () => {
  const jwt = (claims: Record<string, unknown>) =>
    ['{"alg":"RS256","typ":"at+jwt"}', JSON.stringify(claims), 'signature'].map((part, i) => (i < 2 ? Buffer.from(part).toString('base64url') : part)).join('.');

  /** A token endpoint that answers every refresh with `answer` (no expires_in unless given). */
  async function tokenEndpoint(answer: Record<string, unknown>) {
    const server = await fakeServer((req, res) => {
      req.resume();
      req.on('end', () => sendJson(res, 200, { token_type: 'Bearer', refresh_token: 'rt-next-0123456789', ...answer }));
    });
    const settings: OAuthDeviceSettings = { kind: 'oauth-device', device_authorization_endpoint: `${server.base}/device`, token_endpoint: `${server.base}/token`, client_id: 'c', base_url: 'http://127.0.0.1:9/v1' };
    return settings;
  }

  it("a JWT access token: the time to its exp; the token's own expires_in wins over it", async () => {
    const exp = Math.floor(Date.now() / 1000) + 1_234;
    const token = jwt({ sub: 'u', exp });
    const grant = await deviceClient(await tokenEndpoint({ access_token: token })).refreshTokenGrant('rt-0123456789');
    expect(grant.access_token).toBe(token);
    expect(grant.expires_in).toBeGreaterThanOrEqual(1_230);
    expect(grant.expires_in).toBeLessThanOrEqual(1_234);
    expect(grant.refresh_token).toBe('rt-next-0123456789');
    const stated = await deviceClient(await tokenEndpoint({ access_token: token, expires_in: 100 })).refreshTokenGrant('rt-0123456789');
    expect(stated.expires_in).toBe(100);
    // The same at the end of a login.
    const auth = { device_code: 'dc-0123456789', user_code: 'ABCD-EFGH', verification_uri: 'http://127.0.0.1:9/activate', expires_in: 600, interval: 5, code_verifier: 'v'.repeat(43) };
    const polled = await deviceClient(await tokenEndpoint({ access_token: 'opaque-access-token-0123456789' })).deviceTokenPoll(auth);
    expect(polled).toMatchObject({ status: 'success', grant: { access_token: 'opaque-access-token-0123456789', expires_in: 3_600 } });
  });

  it('an opaque token: the profile\'s token_lifetime_seconds, else an hour; a JWT already past its exp counts as opaque', async () => {
    const settings = await tokenEndpoint({ access_token: 'opaque-access-token-0123456789' });
    expect((await deviceClient(settings).refreshTokenGrant('rt-0123456789')).expires_in).toBe(3_600);
    expect((await deviceClient({ ...settings, token_lifetime_seconds: 7_200 }).refreshTokenGrant('rt-0123456789')).expires_in).toBe(7_200);
    const stale = await tokenEndpoint({ access_token: jwt({ exp: Math.floor(Date.now() / 1000) - 10 }) });
    expect((await deviceClient({ ...stale, token_lifetime_seconds: 900 }).refreshTokenGrant('rt-0123456789')).expires_in).toBe(900);
    const notJson = await tokenEndpoint({ access_token: 'aaa.!!!.bbb' });
    expect((await deviceClient(notJson).refreshTokenGrant('rt-0123456789')).expires_in).toBe(3_600);
  });

  it('exp − iat when both are there (no local clock); a lifetime under a minute, 0 or absurd is not believed; a numeric string is', async () => {
    const now = Math.floor(Date.now() / 1000);
    const lifetimeOf = async (answer: Record<string, unknown>) => (await deviceClient(await tokenEndpoint(answer)).refreshTokenGrant('rt-0123456789')).expires_in;
    // iat an hour "ago" by a skewed clock: the token still lasts its 600 s.
    expect(await lifetimeOf({ access_token: jwt({ iat: now - 3_600, exp: now - 3_000 }) })).toBe(600);
    expect(await lifetimeOf({ access_token: jwt({ iat: now, exp: now + 30 }) })).toBe(3_600);
    expect(await lifetimeOf({ access_token: jwt({ iat: now, exp: now * 1000 }) })).toBe(31_536_000);
    expect(await lifetimeOf({ access_token: 'opaque-access-token-0123456789', expires_in: 0 })).toBe(3_600);
    expect(await lifetimeOf({ access_token: 'opaque-access-token-0123456789', expires_in: '600' })).toBe(600);
  });

  it('token_lifetime_seconds is checked in the config (60 s to a year)', () => {
    const base = { kind: 'oauth-device', issuer: 'https://id.example.com', client_id: 'c', base_url: 'https://llm.example.com/v1' };
    expect(OAuthDeviceSettingsSchema.safeParse({ ...base, token_lifetime_seconds: 86_400 }).success).toBe(true);
    for (const bad of [59, 31_536_001, 1.5, '3600']) expect(OAuthDeviceSettingsSchema.safeParse({ ...base, token_lifetime_seconds: bad }).success).toBe(false);
  });
});

describe('endpoints', () => {
  it('explicit endpoints work without an issuer, with no discovery', async () => {
    const p = await provider();
    const settings: OAuthDeviceSettings = {
      kind: 'oauth-device',
      device_authorization_endpoint: `${p.issuer}/device/auth`,
      token_endpoint: `${p.issuer}/token`,
      client_id: p.clientId,
      scope: SCOPE,
      base_url: 'http://127.0.0.1:9/v1',
    };
    const client = deviceClient(settings);
    expect(await client.discover()).toEqual({ device_authorization_endpoint: `${p.issuer}/device/auth`, token_endpoint: `${p.issuer}/token` });
    const { grant } = await login(p, client);
    const refreshed = await client.refreshTokenGrant(grant.refresh_token!);
    expect(refreshed.access_token).toBe(p.accessTokensIssued[1]);
  });

  it('falls back from RFC 8414 metadata to OpenID discovery, and caches what it found', async () => {
    const p = await provider();
    const metadata = (await (await fetch(`${p.issuer}/.well-known/openid-configuration`)).json()) as Record<string, unknown>;
    const oidcOnly = await fakeServer((req, res, base) => {
      if (req.url === '/.well-known/openid-configuration') sendJson(res, 200, { ...metadata, issuer: base });
      else sendJson(res, 404, { error: 'not_found' });
    });
    const client = deviceClient(settingsFor({ issuer: oidcOnly.base, clientId: p.clientId }));
    const found = await client.discover();
    expect(found).toEqual({ issuer: oidcOnly.base, device_authorization_endpoint: `${p.issuer}/device/auth`, token_endpoint: `${p.issuer}/token` });
    await client.discover();
    expect(oidcOnly.paths).toEqual(['/.well-known/oauth-authorization-server', '/.well-known/openid-configuration']);
    const { grant } = await login(p, client);
    expect(grant.access_token).toBe(p.accessTokensIssued[0]);
  });

  it('an endpoint given in the profile overrides the discovered one', async () => {
    const p = await provider();
    const client = deviceClient(settingsFor(p, { token_endpoint: 'https://token.example.test/token' }));
    expect(await client.discover()).toEqual({ issuer: p.issuer, device_authorization_endpoint: `${p.issuer}/device/auth`, token_endpoint: 'https://token.example.test/token' });
    const other = deviceClient(settingsFor(p, { device_authorization_endpoint: 'https://device.example.test/code' }));
    expect(await other.discover()).toMatchObject({ device_authorization_endpoint: 'https://device.example.test/code', token_endpoint: `${p.issuer}/token` });
  });

  it('refuses plain http to a host that is not loopback, in the profile or in the metadata', async () => {
    for (const settings of [
      { issuer: 'http://example.com' },
      { issuer: undefined, device_authorization_endpoint: 'http://example.com/device', token_endpoint: 'https://example.com/token' },
      { issuer: undefined, device_authorization_endpoint: 'https://example.com/device', token_endpoint: 'http://example.com/token' },
    ]) {
      expect(() => deviceClient({ kind: 'oauth-device', client_id: 'c', base_url: 'https://example.com/v1', ...settings } as OAuthDeviceSettings)).toThrow(
        /^profile "corp": (issuer|device_authorization_endpoint|token_endpoint) must use https \(plain http is allowed only for loopback hosts\), got "http:\/\/example\.com/,
      );
    }
    const lying = await fakeServer((_req, res, base) =>
      sendJson(res, 200, { issuer: base, device_authorization_endpoint: 'http://example.com/device', token_endpoint: `${base}/token` }),
    );
    const error = await deviceClient(settingsFor({ issuer: lying.base })).deviceAuthorizationRequest().catch((e: unknown) => e);
    expect(error).toBeInstanceOf(QwenConfigError);
    expect((error as Error).message).toContain('names a device_authorization_endpoint that is not https ("http://example.com/device")');
  });
});

describe('broken discovery', () => {
  const ADVICE = 'check the issuer (the URL the provider documents as its issuer), or give device_authorization_endpoint and token_endpoint in the profile';

  async function discoveryError(handler: (req: IncomingMessage, res: ServerResponse, base: string) => void, path = ''): Promise<{ error: QwenError; base: string; paths: string[] }> {
    const server = await fakeServer(handler);
    const error = await deviceClient(settingsFor({ issuer: `${server.base}${path}` })).deviceAuthorizationRequest().catch((e: unknown) => e);
    expect(error).toBeInstanceOf(QwenError);
    return { error: error as QwenError, ...server };
  }

  it('404 on both documents (an issuer with a path): a config error naming both URLs', async () => {
    const { error, base, paths } = await discoveryError((_req, res) => res.writeHead(404, { 'content-type': 'text/html' }).end('<h1>Not Found</h1>'), '/realms/dev');
    expect(error).toBeInstanceOf(QwenConfigError);
    expect(error.message).toBe(
      `discovery for profile "corp" failed: ${base}/.well-known/oauth-authorization-server/realms/dev answered HTTP 404 with an HTML page; ` +
        `${base}/realms/dev/.well-known/openid-configuration answered HTTP 404 with an HTML page; ${ADVICE}`,
    );
    expect(paths).toEqual(['/.well-known/oauth-authorization-server/realms/dev', '/realms/dev/.well-known/openid-configuration']);
  });

  it('garbage instead of JSON', async () => {
    const { error } = await discoveryError((_req, res) => res.writeHead(200, { 'content-type': 'text/html' }).end('<html>captive portal</html>'));
    expect(error).toBeInstanceOf(QwenConfigError);
    expect(error.message).toMatch(/oauth-authorization-server did not answer with a JSON object; .*openid-configuration did not answer with a JSON object; check the issuer/);
  });

  it('an issuer that does not match', async () => {
    const { error, base } = await discoveryError((_req, res) => sendJson(res, 200, { issuer: 'https://elsewhere.example.test', token_endpoint: 'https://elsewhere.example.test/token' }));
    expect(error).toBeInstanceOf(QwenConfigError);
    expect(error.message).toContain(`names the issuer "https://elsewhere.example.test", not "${base}/"`);
  });

  it('metadata with no device_authorization_endpoint', async () => {
    const { error } = await discoveryError((_req, res, base) => sendJson(res, 200, { issuer: base, token_endpoint: `${base}/token` }));
    expect(error).toBeInstanceOf(QwenConfigError);
    expect(error.message).toContain('names no device_authorization_endpoint (the provider may not offer the device flow)');
    expect(error.message).toContain(ADVICE);
  });

  it('a server error is retryable, and nothing is cached: the next call discovers again', async () => {
    let status = 503;
    const server = await fakeServer((req, res, base) => {
      if (status !== 200) sendJson(res, status, { error: 'temporarily_unavailable' });
      else sendJson(res, 200, { issuer: base, device_authorization_endpoint: `${base}/device`, token_endpoint: `${base}/token` });
    });
    const client = deviceClient(settingsFor({ issuer: server.base }));
    const error = await client.discover().catch((e: unknown) => e);
    expect(error).toBeInstanceOf(QwenOAuthError);
    expect((error as QwenOAuthError).retryable).toBe(true);
    expect((error as Error).message).toContain('answered HTTP 503');
    status = 200;
    expect((await client.discover()).token_endpoint).toBe(`${server.base}/token`);
  });

  it('an answer larger than the bound is cut off as a server error', async () => {
    const { error } = await discoveryError((_req, res, base) => sendJson(res, 200, { issuer: base, padding: 'x'.repeat(100 * 1024) }));
    expect(error).toBeInstanceOf(QwenOAuthError);
    expect((error as QwenOAuthError).retryable).toBe(true);
    expect(error.message).toMatch(/^discovery of profile "corp" \(127\.0\.0\.1:\d+\) sent an answer larger than 64 KiB/);
  });
});
