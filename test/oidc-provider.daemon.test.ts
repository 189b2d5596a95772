/**
 * `oauth-device` profiles in the real daemon against a real OpenID Provider (oidc-provider, see
 * test/support/oidc-provider.ts), over the socket in protocol 2: add a profile, log in through
 * the provider's pages, get its tokens, refresh ahead of expiry with rotation, and the ways a
 * login ends (revoked grant, broken discovery, no refresh token).
 */
import { createServer } from 'node:http';
import { createConnection, type Socket } from 'node:net';
import type { AddressInfo } from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import { PROTOCOL_VERSION } from '../shared/protocol.js';
import type { OAuthDeviceSettings } from '../shared/profiles.js';
import { assertNoSecrets, createFixture, type DaemonFixture } from './support/daemon.js';
import { startOidcProvider, type OidcProviderOptions, type OidcTestProvider } from './support/oidc-provider.js';
import { until } from './support/wait.js';

const PROFILE = 'corp';

interface RpcFailure {
  code: number;
  message: string;
  data?: { code?: string; oauth_error?: string };
}

/** A protocol-2 connection speaking raw JSON-RPC (what any client in any language would send). */
class Rpc {
  readonly notifications: { method: string; params: Record<string, unknown> }[] = [];
  private readonly pending = new Map<number, { resolve: (v: unknown) => void; reject: (e: RpcFailure) => void }>();
  private nextId = 1;
  private buffer = '';

  private constructor(private readonly socket: Socket) {
    socket.on('data', (chunk) => {
      this.buffer += chunk.toString('utf8');
      for (let nl = this.buffer.indexOf('\n'); nl !== -1; nl = this.buffer.indexOf('\n')) {
        const frame = JSON.parse(this.buffer.slice(0, nl)) as { id?: number; result?: unknown; error?: RpcFailure; method?: string; params?: Record<string, unknown> };
        this.buffer = this.buffer.slice(nl + 1);
        if (frame.method) this.notifications.push({ method: frame.method, params: frame.params ?? {} });
        else if (typeof frame.id === 'number') {
          const waiter = this.pending.get(frame.id);
          this.pending.delete(frame.id);
          if (frame.error) waiter?.reject(frame.error);
          else waiter?.resolve(frame.result);
        }
      }
    });
  }

  static async open(socketPath: string): Promise<Rpc> {
    const socket = await new Promise<Socket>((resolve, reject) => {
      const s = createConnection(socketPath, () => resolve(s));
      s.once('error', reject);
    });
    const rpc = new Rpc(socket);
    await rpc.call('hello', { client: 'oidc-provider.daemon.test', protocol: PROTOCOL_VERSION });
    return rpc;
  }

  call<T = Record<string, unknown>>(method: string, params: Record<string, unknown> = {}): Promise<T> {
    const id = this.nextId++;
    return new Promise<T>((resolve, reject) => {
      this.pending.set(id, { resolve: resolve as (v: unknown) => void, reject });
      this.socket.write(`${JSON.stringify({ jsonrpc: '2.0', id, method, params })}\n`);
    });
  }

  /** The error a call ends with (fails the test when it succeeds). */
  async failure(method: string, params: Record<string, unknown> = {}): Promise<RpcFailure> {
    const outcome = await this.call(method, params).then(
      (result) => ({ ok: true as const, result }),
      (error: RpcFailure) => ({ ok: false as const, error }),
    );
    // Names only the result's fields: a result may hold a token.
    if (outcome.ok) throw new Error(`${method} succeeded (result fields: ${Object.keys(outcome.result).join(', ')})`);
    return outcome.error;
  }

  close(): void {
    this.socket.destroy();
  }
}

let fx: DaemonFixture | undefined;
let provider: OidcTestProvider | undefined;
const cleanups: (() => Promise<void> | void)[] = [];
afterEach(async () => {
  while (cleanups.length) await cleanups.pop()!();
  const daemon = fx;
  fx = undefined;
  await daemon?.cleanup();
  // Every token the provider issued stays out of the daemon's output.
  if (daemon && provider) assertNoSecrets(daemon.output.join('\n'), [...provider.accessTokensIssued, ...provider.refreshTokensIssued], 'daemon output');
  provider = undefined;
});

async function setup(options: OidcProviderOptions = {}): Promise<{ fx: DaemonFixture; p: OidcTestProvider; rpc: Rpc }> {
  const p = await startOidcProvider({ interval: 1, ...options });
  provider = p;
  cleanups.push(() => p.close());
  fx = await createFixture();
  await fx.start();
  const rpc = await Rpc.open(fx.socketPath);
  cleanups.push(() => rpc.close());
  return { fx, p, rpc };
}

function settingsFor(issuer: string, extra: Partial<OAuthDeviceSettings> = {}): OAuthDeviceSettings {
  return { kind: 'oauth-device', issuer, client_id: 'qwen-tokend-test', scope: 'openid offline_access', base_url: 'http://127.0.0.1:9/v1', ...extra };
}

/** `login.start` for the profile, approval through the provider's pages, then the token the daemon serves. */
async function login(rpc: Rpc, p: OidcTestProvider): Promise<string> {
  const started = await rpc.call<{ user_code: string; verification_uri: string }>('login.start', { profile: PROFILE });
  expect(started.verification_uri).toBe(`${p.issuer}/device`);
  await p.approveDevice(started.user_code);
  await until(() => p.accessTokensIssued.length >= 1, 'the device grant');
  let token = '';
  await until(async () => {
    token = await rpc.call<{ access_token: string }>('getAccessToken', { profile: PROFILE }).then(
      (r) => r.access_token,
      () => '',
    );
    return token !== '';
  }, 'the daemon to serve the new token');
  return token;
}

async function stateOf(rpc: Rpc): Promise<{ state: string }> {
  return rpc.call('status', { profile: PROFILE });
}

describe('oauth-device profiles in the daemon, against oidc-provider', () => {
  it('login through the pages, then refreshes ahead of expiry; a retired refresh token is never presented again', async () => {
    const { p, rpc } = await setup({ accessTokenTtlS: 20 });
    await rpc.call('profiles.add', { name: PROFILE, settings: settingsFor(p.issuer, { refresh_lead_seconds: 19 }) });
    const first = await login(rpc, p);
    expect(first).toBe(p.accessTokensIssued[0]);
    const token = await rpc.call<{ access_token: string; profile?: string; kind?: string; base_url: string }>('getAccessToken', { profile: PROFILE });
    expect(token).toMatchObject({ access_token: first, profile: PROFILE, kind: 'oauth-device', base_url: 'http://127.0.0.1:9/v1' });

    // 20 s tokens refreshed 19 s ahead: a refresh about every second, each well before expiry.
    await until(() => (p.tokenRequestCounts.refresh_token ?? 0) >= 2, 'two refreshes', 15_000);
    await until(async () => (await rpc.call<{ access_token: string }>('getAccessToken', { profile: PROFILE })).access_token === p.accessTokensIssued.at(-1), 'the newest token served');
    const presented = p.refreshTokensPresented;
    expect(new Set(presented).size).toBe(presented.length);
    // Each refresh presented the token issued just before it.
    presented.forEach((rt, i) => expect(rt).toBe(p.refreshTokensIssued[i]));
    expect(p.tokenRequests.filter((r) => r.grantType === 'refresh_token').every((r) => r.status === 200)).toBe(true);
  });

  it('a revoked grant: the refresh fails naming the profile, the state is needs_login, and getAccessToken fails once the token expires', async () => {
    // 6 s tokens, refreshed 1 s ahead: the revocation and the refresh below come well before that.
    const { p, rpc } = await setup({ accessTokenTtlS: 6 });
    await rpc.call('profiles.add', { name: PROFILE, settings: settingsFor(p.issuer, { refresh_lead_seconds: 1 }) });
    await login(rpc, p);
    await p.revokeGrant();
    const refresh = await rpc.failure('refresh', { profile: PROFILE });
    expect(refresh.data?.code).toBe('QWEN_REFRESH_TOKEN_INVALID');
    expect(refresh.message).toContain('profile "corp"');
    expect((await stateOf(rpc)).state).toBe('needs_login');
    const presented = p.refreshTokensPresented.length;
    // A token that is still valid is served until it expires (see decideTokenRequest); then only a login helps.
    await until(async () => (await rpc.call('getAccessToken', { profile: PROFILE }).then(() => false, () => true)), 'getAccessToken to fail', 10_000);
    const get = await rpc.failure('getAccessToken', { profile: PROFILE });
    expect(get.data?.code).toBe('QWEN_REFRESH_TOKEN_INVALID');
    expect(get.message).toContain('login --profile corp');
    // The rejected refresh token was not presented again.
    expect(p.refreshTokensPresented).toHaveLength(presented);
  });

  it('broken discovery: login.start fails with a clear error', async () => {
    const broken = createServer((_req, res) => res.writeHead(404, { 'content-type': 'text/html' }).end('<h1>Not Found</h1>'));
    await new Promise<void>((resolve) => broken.listen(0, '127.0.0.1', resolve));
    cleanups.push(() => new Promise<void>((resolve) => broken.close(() => resolve())));
    const issuer = `http://127.0.0.1:${(broken.address() as AddressInfo).port}`;
    const { rpc } = await setup();
    await rpc.call('profiles.add', { name: PROFILE, settings: settingsFor(issuer) });
    const error = await rpc.failure('login.start', { profile: PROFILE });
    expect(error.message).toContain(`discovery for profile "corp" failed: ${issuer}/.well-known/oauth-authorization-server answered HTTP 404`);
    expect(error.message).toContain('give device_authorization_endpoint and token_endpoint in the profile');
  });

  it('a provider that issues no refresh token: needs_login at expiry, and the message says why', async () => {
    const { p, rpc } = await setup({ issueRefreshToken: false, accessTokenTtlS: 3 });
    await rpc.call('profiles.add', { name: PROFILE, settings: settingsFor(p.issuer, { refresh_lead_seconds: 1 }) });
    const token = await login(rpc, p);
    expect(token).toBe(p.accessTokensIssued[0]);
    expect(p.refreshTokensIssued).toEqual([]);
    await until(async () => (await stateOf(rpc)).state === 'needs_login', 'needs_login at expiry', 10_000);
    const get = await rpc.failure('getAccessToken', { profile: PROFILE });
    expect(get.data?.code).toBe('QWEN_REFRESH_TOKEN_INVALID');
    expect(get.message).toContain('no refresh token');
    expect(get.message).toContain('login --profile corp');
    expect(p.tokenRequestCounts.refresh_token ?? 0).toBe(0);
  });
});
