/**
 * The OAuth client of an `oauth-device` profile: any RFC 8628 provider. Endpoints come from the
 * profile or from the issuer's metadata (RFC 8414, then OpenID Connect Discovery); the device
 * authorization request carries an RFC 7636 S256 challenge unless the profile turns PKCE off;
 * polling follows RFC 8628 §3.5 (5 s unless the server says otherwise, +5 s per `slow_down`).
 * oauth4webapi does the wire work and daemon/oauth.ts's `OAuthTransport` the bounded HTTP; every
 * failure becomes a shared error class whose message names the profile and the endpoint's host
 * and never holds a token or the client secret.
 */
import * as oauth from 'oauth4webapi';
import { TOKEN_LIFETIME_S, type OAuthDeviceSettings, type TokenEndpointAuthMethod } from '../shared/profiles.js';
import { QwenConfigError, QwenOAuthError, QwenRefreshTokenInvalidError } from '../shared/errors.js';
import { cliCommand } from '../shared/cli-command.js';
import { isLoopbackUrl, printable } from '../shared/url-trust.js';
import {
  clip,
  describeOAuthError,
  deviceAuthorizationFailure,
  deviceAuthorizationOf,
  devicePollFailure,
  devicePollVerdict,
  httpFailure,
  OAuthTransport,
  pollForDeviceToken,
  RETRYABLE_OAUTH_ERRORS,
  toGrant,
  type DeviceAuthorization,
  type DevicePollResult,
  type ErrorAnswer,
  type PollingRules,
  type TokenGrant,
  type WaitForDeviceTokenOptions,
} from './oauth.js';

/** How long an access token is taken to last when nothing says (RFC 6749 §5.1 only recommends `expires_in`). */
const ASSUMED_TOKEN_LIFETIME_S = 3_600;

/**
 * A token response with an `expires_in`: its own; else, for an access token that is a JWT, the
 * lifetime its claims give (read, not verified: it only times the refresh); else the profile's
 * `token_lifetime_seconds`, else an hour. Lifetimes are capped at a year.
 */
function withLifetime(json: oauth.TokenEndpointResponse, settings: OAuthDeviceSettings, nowMs: number): oauth.TokenEndpointResponse {
  // oauth4webapi lets a numeric string and 0 through; a lifetime must be a positive number of seconds.
  const stated = Number(json.expires_in);
  if (json.expires_in !== undefined && Number.isFinite(stated) && stated > 0) return { ...json, expires_in: Math.min(stated, MAX_TOKEN_LIFETIME_S) };
  const fromJwt = jwtLifetime(json.access_token, nowMs);
  return { ...json, expires_in: fromJwt ?? settings.token_lifetime_seconds ?? ASSUMED_TOKEN_LIFETIME_S };
}

/** The longest lifetime believed, the setting's bound (an `exp` in milliseconds by mistake would otherwise mean never). */
const MAX_TOKEN_LIFETIME_S = TOKEN_LIFETIME_S.max;
/** A JWT said to last less than the setting's lower bound is more likely a clock or claim error than a real lifetime. */
const MIN_JWT_LIFETIME_S = TOKEN_LIFETIME_S.min;

/**
 * How long a JWT access token lasts by its claims: `exp - iat` when it has both (a fresh token,
 * and no local clock involved), else `exp` less now. Undefined for anything that is not a JWT
 * with a numeric `exp`, and for a lifetime under a minute.
 */
function jwtLifetime(token: unknown, nowMs: number): number | undefined {
  if (typeof token !== 'string') return undefined;
  const parts = token.split('.');
  if (parts.length !== 3 || parts[1]!.length > 16_384) return undefined;
  let claims: unknown;
  try {
    claims = JSON.parse(Buffer.from(parts[1]!, 'base64url').toString('utf8'));
  } catch {
    return undefined;
  }
  if (claims === null || typeof claims !== 'object') return undefined;
  const { exp, iat } = claims as { exp?: unknown; iat?: unknown };
  if (typeof exp !== 'number' || !Number.isFinite(exp)) return undefined;
  const lifetime = Math.floor(typeof iat === 'number' && Number.isFinite(iat) && iat < exp ? exp - iat : exp - nowMs / 1000);
  if (lifetime < MIN_JWT_LIFETIME_S) return undefined;
  return Math.min(lifetime, MAX_TOKEN_LIFETIME_S);
}

/** RFC 8628 §3.2: the poll interval when the device authorization response names none. */
export const RFC8628_DEFAULT_INTERVAL_S = 5;
/** RFC 8628 §3.5: each `slow_down` adds this to the interval, for every later poll. */
export const RFC8628_SLOW_DOWN_STEP_S = 5;

export interface DeviceFlowClientOptions {
  /** The profile's name, for messages. */
  profile: string;
  settings: OAuthDeviceSettings;
  /** Makes the client confidential: sent as `settings.token_endpoint_auth_method` says (by default `client_secret_post`, or `client_secret_basic` when that is all the server takes). */
  clientSecret?: string;
  /** Upper bound of every HTTP exchange, body included. */
  timeoutMs: number;
  fetch?: typeof fetch;
}

/** Where the device flow's requests go. */
export interface DeviceFlowEndpoints {
  issuer?: string;
  device_authorization_endpoint: string;
  token_endpoint: string;
}

interface Server extends DeviceFlowEndpoints {
  /** From the metadata, when discovered: decides how a client secret is sent. */
  token_endpoint_auth_methods_supported?: readonly string[];
}

/** One well-known document that could not be used, and whether asking later may help. */
interface DiscoveryProblem {
  url: string;
  what: string;
  retryable: boolean;
}

/** Errors that mean the provider does not accept this client: a configuration matter, not the token's. */
const CLIENT_ERRORS = new Set(['invalid_client', 'unauthorized_client']);

const ENDPOINT_SETTINGS = ['issuer', 'device_authorization_endpoint', 'token_endpoint'] as const;

/** True for https, or plain http to this machine (tests, local proxies). */
function isTrustedEndpoint(url: URL): boolean {
  return url.protocol === 'https:' || (url.protocol === 'http:' && isLoopbackUrl(url));
}

function hostOf(url: string): string {
  try {
    return new URL(url).host;
  } catch {
    return printable(url, 100);
  }
}

/**
 * Drops `id_token` from a token response. The daemon is not a relying party: it keeps access
 * and refresh tokens only, and checking the claims of a token it throws away could only fail
 * logins (no issuer to compare with when the endpoints are given by hand, a skewed clock).
 */
async function withoutIdToken(response: Response): Promise<Response> {
  if (response.status !== 200 || !/json/i.test(response.headers.get('content-type') ?? '')) return response;
  const text = await response.text();
  let body = text;
  try {
    const json: unknown = JSON.parse(text);
    if (json && typeof json === 'object' && !Array.isArray(json) && 'id_token' in json) {
      delete (json as { id_token?: unknown }).id_token;
      body = JSON.stringify(json);
    }
  } catch {
    // not JSON after all: oauth4webapi reports it
  }
  const headers = new Headers(response.headers);
  headers.delete('content-length');
  return new Response(body, { status: response.status, statusText: response.statusText, headers });
}

/** Talks to one `oauth-device` profile's provider. Holds its configuration and, once found, its endpoints. */
export class DeviceFlowClient {
  private readonly profile: string;
  private readonly settings: OAuthDeviceSettings;
  private readonly clientSecret: string | undefined;
  private readonly client: oauth.Client;
  private readonly transport: OAuthTransport;
  private readonly polling: PollingRules;
  private discovered: Server | undefined;

  /** Checks the profile's URLs (https, or http to a loopback host); throws `QwenConfigError` naming the setting. */
  constructor(options: DeviceFlowClientOptions) {
    const { profile, settings } = options;
    this.profile = profile;
    this.settings = settings;
    for (const key of ENDPOINT_SETTINGS) {
      const value = settings[key];
      if (value === undefined) continue;
      let url: URL;
      try {
        url = new URL(value);
      } catch {
        throw new QwenConfigError(`profile "${profile}": ${key} must be an absolute https URL, got "${printable(value, 200)}"`);
      }
      if (!isTrustedEndpoint(url)) {
        throw new QwenConfigError(
          `profile "${profile}": ${key} must use https (plain http is allowed only for loopback hosts), got "${printable(value, 200)}"`,
        );
      }
    }
    if (settings.issuer === undefined && (settings.device_authorization_endpoint === undefined || settings.token_endpoint === undefined)) {
      throw new QwenConfigError(`profile "${profile}": give an issuer, or both device_authorization_endpoint and token_endpoint`);
    }
    if (!settings.client_id) throw new QwenConfigError(`profile "${profile}": client_id is empty`);
    this.clientSecret = options.clientSecret || undefined;
    this.client = { client_id: settings.client_id };
    this.transport = new OAuthTransport({
      timeoutMs: options.timeoutMs,
      fetch: options.fetch,
      networkAdvice: `check the network connection and the profile's issuer or endpoints, and behind a proxy HTTPS_PROXY with NODE_USE_ENV_PROXY=1 (Node 22 and later)`,
    });
    this.polling = {
      defaultIntervalS: RFC8628_DEFAULT_INTERVAL_S,
      slowedDown: (interval) => interval + RFC8628_SLOW_DOWN_STEP_S,
      expired: () =>
        new QwenOAuthError(`the device code of profile "${profile}" expired before it was approved; run the login again`, {
          oauthError: 'expired_token',
        }),
    };
  }

  /**
   * The endpoints: the profile's own when it gives both, else the issuer's metadata (RFC 8414
   * §3, then OpenID Connect Discovery 1.0 §4), with any endpoint the profile gives taking
   * precedence. Cached after the first success.
   */
  async discover(signal?: AbortSignal): Promise<DeviceFlowEndpoints> {
    const server = await this.server(signal);
    const endpoints: DeviceFlowEndpoints = {
      device_authorization_endpoint: server.device_authorization_endpoint,
      token_endpoint: server.token_endpoint,
    };
    if (server.issuer !== undefined) endpoints.issuer = server.issuer;
    return endpoints;
  }

  /** RFC 8628 §3.1 device authorization request: scope, audience, resource, and an RFC 7636 §4.2 S256 challenge unless PKCE is off. */
  async deviceAuthorizationRequest(signal?: AbortSignal): Promise<DeviceAuthorization> {
    const server = await this.server(signal);
    const label = this.label('device authorization endpoint', server.device_authorization_endpoint);
    const parameters = new URLSearchParams();
    if (this.settings.scope) parameters.set('scope', this.settings.scope);
    if (this.settings.audience) parameters.set('audience', this.settings.audience);
    if (this.settings.resource) parameters.set('resource', this.settings.resource);
    let codeVerifier = '';
    if (this.settings.pkce !== false) {
      codeVerifier = oauth.generateRandomCodeVerifier();
      parameters.set('code_challenge', await oauth.calculatePKCECodeChallenge(codeVerifier));
      parameters.set('code_challenge_method', 'S256');
    }
    const as = this.authorizationServer(server);
    const result = await this.transport.exchange(
      label,
      signal,
      (s) => oauth.deviceAuthorizationRequest(as, this.client, this.clientAuth(server), parameters, this.requestOptions(label, server.device_authorization_endpoint, s)),
      (response) => oauth.processDeviceAuthorizationResponse(as, this.client, response),
    );
    if (!result.ok) throw this.clientRefusal(label, result.answer, server) ?? deviceAuthorizationFailure(label, result.answer);
    return deviceAuthorizationOf(result.value, codeVerifier, RFC8628_DEFAULT_INTERVAL_S);
  }

  /**
   * One RFC 8628 §3.4 device access token request (with the `code_verifier` when PKCE is on) and
   * its §3.5 answer: `pending` and `slow_down` (sent with 400 or 429) are results; expiry,
   * denial, a refused client and other refusals throw.
   */
  async deviceTokenPoll(auth: DeviceAuthorization, signal?: AbortSignal): Promise<DevicePollResult> {
    const server = await this.server(signal);
    const label = this.label('token endpoint', server.token_endpoint);
    const as = this.authorizationServer(server);
    const options: oauth.TokenEndpointRequestOptions = this.requestOptions(label, server.token_endpoint, signal);
    if (auth.code_verifier) options.additionalParameters = { code_verifier: auth.code_verifier };
    const result = await this.transport.exchange(
      label,
      signal,
      (s) => oauth.deviceCodeGrantRequest(as, this.client, this.clientAuth(server), auth.device_code, { ...options, signal: s }),
      (response) => oauth.processDeviceCodeResponse(as, this.client, response),
    );
    if (result.ok) {
      try {
        return { status: 'success', grant: toGrant(label, withLifetime(result.value, this.settings, Date.now()), null) };
      } catch (e) {
        // The device code is spent: polling again cannot help.
        if (e instanceof QwenOAuthError) throw new QwenOAuthError(`${e.message}; the login cannot be completed`, { status: e.status });
        throw e;
      }
    }
    const { answer } = result;
    const verdict = devicePollVerdict(answer, this.polling.expired);
    if (verdict) return verdict;
    if (answer.error === 'access_denied') {
      throw new QwenOAuthError(`the sign-in for profile "${this.profile}" was denied at ${hostOf(server.token_endpoint)}; run the login again to retry`, {
        oauthError: 'access_denied',
        status: answer.status,
      });
    }
    throw this.clientRefusal(label, answer, server) ?? devicePollFailure(label, answer);
  }

  /** Polls until the user approves (see `pollForDeviceToken`): RFC 8628's 5 s default and +5 s per `slow_down`. */
  async waitForDeviceToken(auth: DeviceAuthorization, opts: WaitForDeviceTokenOptions): Promise<TokenGrant> {
    return pollForDeviceToken(auth, opts, this.polling, (signal) => this.deviceTokenPoll(auth, signal));
  }

  /**
   * RFC 6749 §6 refresh. `invalid_grant` (the token is expired, revoked, or a retired one of a
   * rotation) throws `QwenRefreshTokenInvalidError`; a refused client or request throws a
   * `QwenOAuthError` that is not retryable; network, timeout, 5xx, 429 and unreadable answers
   * throw a retryable one. A response without `refresh_token` is returned as it is.
   */
  async refreshTokenGrant(refreshToken: string, signal?: AbortSignal): Promise<TokenGrant> {
    if (!refreshToken) throw new QwenRefreshTokenInvalidError(`profile "${this.profile}" has no refresh token; run the login again`);
    const server = await this.server(signal);
    const label = this.label('token endpoint', server.token_endpoint);
    const as = this.authorizationServer(server);
    const result = await this.transport.exchange(
      label,
      signal,
      (s) => oauth.refreshTokenGrantRequest(as, this.client, this.clientAuth(server), refreshToken, this.requestOptions(label, server.token_endpoint, s)),
      (response) => oauth.processRefreshTokenResponse(as, this.client, response),
    );
    if (result.ok) return toGrant(label, withLifetime(result.value, this.settings, Date.now()), null);
    const { answer } = result;
    const rejected = answer.status >= 400 && answer.status < 500;
    if (rejected && answer.error === 'invalid_grant') {
      throw new QwenRefreshTokenInvalidError(
        `the ${label} rejected the refresh token (HTTP ${answer.status}, ${describeOAuthError(answer)}); run the login again`,
      );
    }
    const refusal = this.clientRefusal(label, answer, server);
    if (refusal) throw refusal;
    if (rejected && answer.error && answer.status !== 429 && answer.status !== 408 && !RETRYABLE_OAUTH_ERRORS.has(answer.error)) {
      throw new QwenOAuthError(`the ${label} refused the refresh (HTTP ${answer.status}, ${describeOAuthError(answer)})`, {
        oauthError: clip(answer.error),
        status: answer.status,
      });
    }
    throw httpFailure(label, answer);
  }

  /** How messages name an endpoint: what it is, whose it is, and its host. */
  private label(what: string, url: string): string {
    return `${what} of profile "${this.profile}" (${hostOf(url)})`;
  }

  /** The error for an answer that refuses this client (wrong client_id, missing or wrong secret); undefined for others. */
  private clientRefusal(label: string, answer: ErrorAnswer, server: Server): QwenOAuthError | undefined {
    const refused = (answer.error !== undefined && CLIENT_ERRORS.has(answer.error)) || (answer.status === 401 && answer.error === undefined);
    if (!refused) return undefined;
    const chosen = this.settings.token_endpoint_auth_method;
    let secretHint: string;
    if (!this.clientSecret) {
      secretHint = chosen
        ? `token_endpoint_auth_method is ${chosen} but the profile has no client secret; store one with \`${cliCommand(`profile add ${this.profile} --replace --client-secret`)}\``
        : 'check the client_id, and whether the provider needs a client secret for it';
    } else {
      secretHint = 'check the client_id and the client secret';
      // A method picked by default may not be the one the client was registered with; the other one is named.
      if (!chosen && answer.error !== 'unauthorized_client') {
        const basic = this.secretMethod(server) === 'client_secret_basic';
        secretHint += `, and how the client is registered to send it (it went ${basic ? 'as HTTP Basic' : 'in the request body'}; set token_endpoint_auth_method to ${basic ? 'client_secret_post' : 'client_secret_basic'} for the other way)`;
      }
    }
    const what = answer.error ? describeOAuthError(answer) : `HTTP ${answer.status}`;
    return new QwenOAuthError(`the ${label} refused the client (${what}); ${secretHint}`, {
      oauthError: clip(answer.error),
      status: answer.status,
    });
  }

  private clientAuth(server: Server): oauth.ClientAuth {
    const secret = this.clientSecret;
    if (secret === undefined) return oauth.None();
    return this.secretMethod(server) === 'client_secret_basic' ? oauth.ClientSecretBasic(secret) : oauth.ClientSecretPost(secret);
  }

  /** How the client secret is sent: as the profile says, else in the body unless the provider lists only Basic. */
  private secretMethod(server: Server): TokenEndpointAuthMethod {
    const chosen = this.settings.token_endpoint_auth_method;
    if (chosen) return chosen;
    const methods = server.token_endpoint_auth_methods_supported;
    return methods && !methods.includes('client_secret_post') && methods.includes('client_secret_basic') ? 'client_secret_basic' : 'client_secret_post';
  }

  /** oauth4webapi wants an issuer; with hand-given endpoints and no issuer, the token endpoint's origin stands in (ID tokens are dropped, see `withoutIdToken`). */
  private authorizationServer(server: Server): oauth.AuthorizationServer {
    return {
      issuer: server.issuer ?? new URL(server.token_endpoint).origin,
      device_authorization_endpoint: server.device_authorization_endpoint,
      token_endpoint: server.token_endpoint,
    };
  }

  private requestOptions(label: string, target: string, signal: AbortSignal | undefined): oauth.TokenEndpointRequestOptions {
    const options: oauth.TokenEndpointRequestOptions = {};
    if (signal) options.signal = signal;
    // Only loopback URLs get here as http (checked in the constructor and in discovery).
    if (new URL(target).protocol === 'http:') options[oauth.allowInsecureRequests] = true;
    options[oauth.customFetch] = async (url, init) => withoutIdToken(await this.transport.boundedFetch(label, url, init));
    return options;
  }

  /** The endpoints to use, discovering them once when the profile does not give both. */
  private async server(signal: AbortSignal | undefined): Promise<Server> {
    const { issuer, device_authorization_endpoint: device, token_endpoint: token } = this.settings;
    if (device !== undefined && token !== undefined) {
      const server: Server = { device_authorization_endpoint: device, token_endpoint: token };
      if (issuer !== undefined) server.issuer = issuer;
      return server;
    }
    if (this.discovered) return this.discovered;
    // The constructor made sure an issuer is set when an endpoint is missing.
    const found = await this.discoverFrom(new URL(issuer!), signal);
    this.discovered = found;
    return found;
  }

  /** Tries RFC 8414 metadata, then OpenID Connect Discovery; the first usable document wins. */
  private async discoverFrom(issuer: URL, signal: AbortSignal | undefined): Promise<Server> {
    const label = this.label('discovery', issuer.href);
    const problems: DiscoveryProblem[] = [];
    for (const algorithm of ['oauth2', 'oidc'] as const) {
      let url = '';
      const options: oauth.DiscoveryRequestOptions = { algorithm };
      if (issuer.protocol === 'http:') options[oauth.allowInsecureRequests] = true;
      options[oauth.customFetch] = (target, init) => {
        url = target;
        return this.transport.boundedFetch(label, target, init);
      };
      const result = await this.transport.exchange(
        label,
        signal,
        (s) => oauth.discoveryRequest(issuer, { ...options, signal: s }),
        async (response) => response,
      );
      if (!result.ok) {
        problems.push({ url, what: `answered HTTP ${result.answer.status}`, retryable: result.answer.status >= 500 });
        continue;
      }
      const judged = await this.judgeMetadata(issuer, result.value);
      if ('server' in judged) return judged.server;
      problems.push({ url, ...judged });
    }
    const what = problems.map((p) => `${p.url} ${p.what}`).join('; ');
    const advice = 'check the issuer (the URL the provider documents as its issuer), or give device_authorization_endpoint and token_endpoint in the profile';
    const message = `discovery for profile "${this.profile}" failed: ${what}; ${advice}`;
    if (problems.some((p) => p.retryable)) throw new QwenOAuthError(message, { retryable: true });
    throw new QwenConfigError(message);
  }

  /** A metadata answer, either usable (with the profile's own endpoints taking precedence) or what is wrong with it. */
  private async judgeMetadata(issuer: URL, response: Response): Promise<{ server: Server } | { what: string; retryable: boolean }> {
    const { status } = response;
    if (status !== 200) {
      await response.body?.cancel().catch(() => undefined);
      const html = /html/i.test(response.headers.get('content-type') ?? '') ? ' with an HTML page' : '';
      return { what: `answered HTTP ${status}${html}`, retryable: status >= 500 || status === 429 || status === 408 };
    }
    let metadata: oauth.AuthorizationServer;
    try {
      metadata = await oauth.processDiscoveryResponse(issuer, response);
    } catch (e) {
      if (e instanceof oauth.OperationProcessingError && e.code === oauth.JSON_ATTRIBUTE_COMPARISON) {
        const named = (e.cause as { body?: { issuer?: unknown } } | undefined)?.body?.issuer;
        return { what: `names the issuer "${printable(String(named), 200)}", not "${issuer.href}"`, retryable: false };
      }
      if (e instanceof oauth.OperationProcessingError && e.code === oauth.INVALID_RESPONSE) {
        return { what: 'sent metadata without an issuer', retryable: false };
      }
      return { what: 'did not answer with a JSON object', retryable: false };
    }
    const server: Server = {
      issuer: metadata.issuer,
      device_authorization_endpoint: this.settings.device_authorization_endpoint ?? metadata.device_authorization_endpoint ?? '',
      token_endpoint: this.settings.token_endpoint ?? metadata.token_endpoint ?? '',
    };
    if (Array.isArray(metadata.token_endpoint_auth_methods_supported)) {
      server.token_endpoint_auth_methods_supported = metadata.token_endpoint_auth_methods_supported;
    }
    for (const key of ['device_authorization_endpoint', 'token_endpoint'] as const) {
      const value = server[key];
      if (!value) {
        const why = key === 'device_authorization_endpoint' ? ' (the provider may not offer the device flow)' : '';
        return { what: `names no ${key}${why}`, retryable: false };
      }
      let url: URL | undefined;
      try {
        url = new URL(value);
      } catch {
        url = undefined;
      }
      if (!url || !isTrustedEndpoint(url)) {
        return { what: `names a ${key} that is not https ("${printable(value, 200)}")`, retryable: false };
      }
    }
    return { server };
  }
}
