/**
 * A real OpenID Provider for tests: the npm package `oidc-provider` (a certified implementation,
 * not something of ours) on 127.0.0.1, with the device flow (RFC 8628), refresh-token rotation,
 * short access-token lifetimes and a public test client.
 *
 * The user's part of a device login is done as a browser would: `approveDevice` loads the
 * provider's device page, posts the user code with the form's xsrf token, confirms, then signs in
 * and consents on the provider's own interaction pages, keeping cookies between requests.
 *
 * What oidc-provider does that tests rely on: a reused rotated refresh token gets `invalid_grant`
 * and revokes the whole grant, as does polling a device code that was already used; PKCE
 * parameters on the device grant are accepted but not checked; device authorization responses
 * carry no `interval` (`interval` adds one). It never sends `slow_down` by itself: `slowDown`
 * turns pending answers into `slow_down` so a test can see the client back off.
 */
import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import './quiet-oidc-provider.js';
import Provider from 'oidc-provider';

export const DEVICE_GRANT_TYPE = 'urn:ietf:params:oauth:grant-type:device_code';
export const TEST_CLIENT_ID = 'qwen-tokend-test';
export const TEST_ACCOUNT = 'tester';

export interface OidcProviderOptions {
  /** Lifetime of access tokens, seconds (default 20). */
  accessTokenTtlS?: number;
  /** Lifetime of device codes, seconds (default 600). */
  deviceCodeTtlS?: number;
  /** Issue refresh tokens to the client whatever the scope (default true); false: none at all. */
  issueRefreshToken?: boolean;
  /** A confidential client: the secret and how it authenticates (default: a public client). */
  clientSecret?: { secret: string; method: 'client_secret_post' | 'client_secret_basic' };
  /**
   * `interval` (seconds) to add to device authorization responses, which oidc-provider sends
   * without one; lets a test of the daemon (polling on the real clock) finish sooner than RFC 8628's 5 s.
   */
  interval?: number;
  /** Answer the first `polls` device polls that would be `authorization_pending` with `slow_down` and `status`. */
  slowDown?: { polls: number; status: 400 | 429 };
}

/** One request to the token endpoint, as the provider parsed it. */
export interface TokenRequest {
  grantType: string;
  status: number;
  error?: string;
  body: Record<string, unknown>;
}

export interface OidcTestProvider {
  issuer: string;
  clientId: string;
  /** Token endpoint requests by grant type (`device_code`, `refresh_token`, ...). */
  readonly tokenRequestCounts: Record<string, number>;
  readonly tokenRequests: TokenRequest[];
  /** Bodies of device authorization requests, as the provider parsed them. */
  readonly deviceAuthorizationRequests: Record<string, unknown>[];
  /** Every refresh token presented to the token endpoint, in order. */
  readonly refreshTokensPresented: string[];
  /** Every refresh token issued, in order. */
  readonly refreshTokensIssued: string[];
  /** Every access token issued, in order. */
  readonly accessTokensIssued: string[];
  /** Completes the user's part of a device login through the provider's pages. */
  approveDevice(userCode: string, options?: { account?: string }): Promise<void>;
  /** Enters the user code and presses "Abort" on the confirmation page. */
  denyDevice(userCode: string): Promise<void>;
  /** Revokes the grant behind a refresh token (default: the last one issued) at the revocation endpoint. */
  revokeGrant(refreshToken?: string): Promise<void>;
  close(): Promise<void>;
}

const ACCOUNTS: Record<string, { email: string }> = { [TEST_ACCOUNT]: { email: 'tester@example.test' } };

/** Starts oidc-provider on 127.0.0.1 with a random port. */
export async function startOidcProvider(options: OidcProviderOptions = {}): Promise<OidcTestProvider> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const issuer = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  const issueRefresh = options.issueRefreshToken ?? true;
  const secret = options.clientSecret;
  const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });

  const provider = new Provider(issuer, {
    clients: [
      {
        client_id: TEST_CLIENT_ID,
        ...(secret ? { client_secret: secret.secret, token_endpoint_auth_method: secret.method } : { token_endpoint_auth_method: 'none' }),
        grant_types: [DEVICE_GRANT_TYPE, 'refresh_token'],
        response_types: [],
        redirect_uris: [],
      },
    ],
    jwks: { keys: [{ ...privateKey.export({ format: 'jwk' }), kid: 'test', use: 'sig', alg: 'RS256' }] },
    cookies: { keys: [randomBytes(16).toString('hex')] },
    scopes: ['openid', 'offline_access', 'api'],
    features: {
      deviceFlow: { enabled: true },
      devInteractions: { enabled: true },
      revocation: { enabled: true, allowedPolicy: async () => true },
    },
    async findAccount(_ctx: unknown, id: string) {
      const account = ACCOUNTS[id];
      if (!account) return undefined;
      return { accountId: id, claims: async () => ({ sub: id, email: account.email }) };
    },
    issueRefreshToken: async (_ctx: unknown, client: { grantTypeAllowed(type: string): boolean }) =>
      issueRefresh && client.grantTypeAllowed('refresh_token'),
    rotateRefreshToken: () => true,
    expiresWithSession: async () => false,
    ttl: {
      AccessToken: options.accessTokenTtlS ?? 20,
      DeviceCode: options.deviceCodeTtlS ?? 600,
      Grant: 86_400,
      IdToken: 3_600,
      Interaction: 600,
      RefreshToken: 86_400,
      Session: 3_600,
    },
  });
  provider.proxy = false;

  const tokenRequestCounts: Record<string, number> = {};
  const tokenRequests: TokenRequest[] = [];
  const deviceAuthorizationRequests: Record<string, unknown>[] = [];
  const refreshTokensPresented: string[] = [];
  const refreshTokensIssued: string[] = [];
  const accessTokensIssued: string[] = [];
  let slowDownsLeft = options.slowDown?.polls ?? 0;

  // Runs around the provider's own routes: sees what it parsed and what it answered.
  provider.use(async (ctx, next) => {
    await next();
    const route: string | undefined = ctx.oidc?.route;
    const body = { ...(ctx.oidc?.body ?? {}) } as Record<string, unknown>;
    if (route === 'device_authorization') {
      deviceAuthorizationRequests.push(body);
      if (options.interval !== undefined && ctx.status === 200) ctx.body = { ...(ctx.body as object), interval: options.interval };
    }
    if (route !== 'token') return;
    const grantType = String(body.grant_type ?? '');
    const short = grantType === DEVICE_GRANT_TYPE ? 'device_code' : grantType;
    tokenRequestCounts[short] = (tokenRequestCounts[short] ?? 0) + 1;
    if (short === 'refresh_token' && typeof body.refresh_token === 'string') refreshTokensPresented.push(body.refresh_token);
    const answer = (ctx.body ?? {}) as Record<string, unknown>;
    if (short === 'device_code' && answer.error === 'authorization_pending' && slowDownsLeft > 0) {
      slowDownsLeft--;
      ctx.status = options.slowDown!.status;
      ctx.body = { error: 'slow_down', error_description: 'poll less often' };
    }
    const request: TokenRequest = { grantType: short, status: ctx.status, body };
    const error = (ctx.body as Record<string, unknown> | undefined)?.error;
    if (typeof error === 'string') request.error = error;
    tokenRequests.push(request);
    if (ctx.status === 200) {
      if (typeof answer.access_token === 'string') accessTokensIssued.push(answer.access_token);
      if (typeof answer.refresh_token === 'string') refreshTokensIssued.push(answer.refresh_token);
    }
  });
  server.on('request', provider.callback());

  const clientFields = (): Record<string, string> => {
    const fields: Record<string, string> = { client_id: TEST_CLIENT_ID };
    if (secret) fields.client_secret = secret.secret;
    return fields;
  };

  return {
    issuer,
    clientId: TEST_CLIENT_ID,
    tokenRequestCounts,
    tokenRequests,
    deviceAuthorizationRequests,
    refreshTokensPresented,
    refreshTokensIssued,
    accessTokensIssued,
    async approveDevice(userCode, approveOptions = {}) {
      await new Browser().deviceLogin(`${issuer}/device`, userCode, approveOptions.account ?? TEST_ACCOUNT, false);
    },
    async denyDevice(userCode) {
      await new Browser().deviceLogin(`${issuer}/device`, userCode, TEST_ACCOUNT, true);
    },
    async revokeGrant(refreshToken = refreshTokensIssued.at(-1)) {
      if (!refreshToken) throw new Error('revokeGrant: no refresh token has been issued');
      const response = await fetch(`${issuer}/token/revocation`, {
        method: 'POST',
        headers: { 'content-type': 'application/x-www-form-urlencoded' },
        body: new URLSearchParams({ token: refreshToken, token_type_hint: 'refresh_token', ...clientFields() }),
      });
      if (response.status !== 200) throw new Error(`revokeGrant: HTTP ${response.status}: ${await response.text()}`);
    },
    async close() {
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

// ---- a small browser: cookies, redirects, forms ----

interface Cookie {
  name: string;
  value: string;
  path: string;
}

interface Form {
  action: string;
  fields: Record<string, string>;
}

function decodeEntities(text: string): string {
  return text
    .replace(/&quot;/g, '"')
    .replace(/&#39;|&#x27;/g, "'")
    .replace(/&lt;/g, '<')
    .replace(/&gt;/g, '>')
    .replace(/&amp;/g, '&');
}

function attribute(tag: string, name: string): string | undefined {
  const match = new RegExp(`\\s${name}\\s*=\\s*"([^"]*)"`, 'i').exec(tag);
  return match ? decodeEntities(match[1]!) : undefined;
}

/** The first POST form of a page, with its inputs' names and values. */
function firstForm(html: string, pageUrl: string): Form | undefined {
  const match = /<form\b([^>]*)>([\s\S]*?)<\/form>/i.exec(html);
  if (!match) return undefined;
  const action = new URL(attribute(match[1]!, 'action') ?? pageUrl, pageUrl).href;
  const fields: Record<string, string> = {};
  for (const input of match[2]!.matchAll(/<input\b([^>]*)>/gi)) {
    const name = attribute(input[1]!, 'name');
    if (name) fields[name] = attribute(input[1]!, 'value') ?? '';
  }
  return { action, fields };
}

class Browser {
  private readonly cookies = new Map<string, Cookie>();

  /** Enters the code, confirms (or aborts), signs in as `account` and consents; throws on any unexpected page. */
  async deviceLogin(deviceUrl: string, userCode: string, account: string, abort: boolean): Promise<void> {
    let page = await this.follow(await this.request(deviceUrl));
    for (let step = 0; step < 12; step++) {
      if (/Sign-in Success/.test(page.html)) {
        if (abort) throw new Error('device login: the provider reported success after an abort');
        return;
      }
      if (abort && /The Sign-in request was interrupted/.test(page.html)) return;
      const form = firstForm(page.html, page.url);
      if (!form) throw new Error(`device login: no form on ${page.url} (HTTP ${page.status}): ${page.html.replace(/<[^>]+>/g, ' ').replace(/\s+/g, ' ').slice(0, 300)}`);
      const fields = { ...form.fields };
      if ('user_code' in fields && !fields.user_code) fields.user_code = userCode;
      if ('login' in fields) fields.login = account;
      if ('password' in fields) fields.password = 'any password';
      if (abort && fields.confirm === 'yes') {
        delete fields.confirm;
        fields.abort = 'yes';
      }
      page = await this.follow(await this.request(form.action, fields));
    }
    throw new Error('device login: too many pages');
  }

  /** Follows redirects; returns the final page. */
  private async follow(first: { url: string; response: Response }): Promise<{ url: string; status: number; html: string }> {
    let { url, response } = first;
    for (let hops = 0; hops < 10 && response.status >= 300 && response.status < 400; hops++) {
      const location = response.headers.get('location');
      if (!location) break;
      await response.body?.cancel();
      ({ url, response } = await this.request(new URL(location, url).href));
    }
    return { url, status: response.status, html: await response.text() };
  }

  private async request(url: string, form?: Record<string, string>): Promise<{ url: string; response: Response }> {
    const target = new URL(url);
    const cookie = [...this.cookies.values()]
      .filter((c) => target.pathname.startsWith(c.path))
      .map((c) => `${c.name}=${c.value}`)
      .join('; ');
    const headers: Record<string, string> = {};
    if (cookie) headers.cookie = cookie;
    const init: RequestInit = { method: form ? 'POST' : 'GET', headers, redirect: 'manual' };
    if (form) {
      headers['content-type'] = 'application/x-www-form-urlencoded';
      init.body = new URLSearchParams(form).toString();
    }
    const response = await fetch(url, init);
    for (const line of response.headers.getSetCookie()) this.store(line, target);
    return { url, response };
  }

  private store(line: string, from: URL): void {
    const [pair, ...attributes] = line.split(';');
    const eq = pair!.indexOf('=');
    const name = pair!.slice(0, eq).trim();
    const value = pair!.slice(eq + 1).trim();
    let path = from.pathname.replace(/\/[^/]*$/, '') || '/';
    let expired = false;
    for (const attr of attributes) {
      const [key, ...rest] = attr.trim().split('=');
      const v = rest.join('=');
      if (/^path$/i.test(key!)) path = v || '/';
      if (/^expires$/i.test(key!) && Date.parse(v) <= Date.now()) expired = true;
      if (/^max-age$/i.test(key!) && Number(v) <= 0) expired = true;
    }
    const id = `${name}\u0000${path}`;
    if (expired) this.cookies.delete(id);
    else this.cookies.set(id, { name, value, path });
  }
}
