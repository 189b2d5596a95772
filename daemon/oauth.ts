/**
 * The OAuth client for Qwen: RFC 8628 device authorization with PKCE (RFC 7636) and the
 * refresh grant (RFC 6749 §6). oauth4webapi does the wire work (request encoding, response
 * validation, OAuth error bodies); this module adds Qwen's quirks (`code_verifier` on the
 * device poll, `slow_down` sent with HTTP 429, `invalid_request` for a dead refresh token,
 * `resource_url`) and turns every failure into one of the shared error classes with a one-line
 * message that never contains a token.
 */
import * as oauth from 'oauth4webapi';
import { z } from 'zod';
import type { Clock, TimerHandle } from '../shared/clock.js';
import type { Credentials } from '../shared/credentials.js';
import {
  ErrorCodes,
  QwenConfigError,
  QwenError,
  QwenOAuthError,
  QwenRefreshTokenInvalidError,
  type QwenOAuthErrorOptions,
} from '../shared/errors.js';
import { checkChatBaseUrl, isLoopbackHost, type ChatUrlPolicy } from '../shared/url-trust.js';
import { chatBaseUrl } from '../shared/credentials.js';

export const DEVICE_AUTHORIZATION_PATH = '/api/v1/oauth2/device/code';
export const TOKEN_PATH = '/api/v1/oauth2/token';
/** Poll interval (seconds) when the device authorization response has none (the Qwen CLI's choice). */
export const DEFAULT_POLL_INTERVAL_S = 2;
/** `slow_down` multiplies the interval by this, up to `MAX_POLL_INTERVAL_S` (the Qwen CLI's rule). */
export const SLOW_DOWN_FACTOR = 1.5;
export const MAX_POLL_INTERVAL_S = 10;
/**
 * Longest wait between polls that backing off after failed polls (or a server's Retry-After)
 * reaches: the user who approved is waiting for the next poll to notice.
 */
const MAX_POLL_BACKOFF_S = 60;
/**
 * Largest OAuth answer read. Real ones are well under 4 KiB; a server sending more is broken or
 * hostile, and reading without a bound would let it fill the daemon's memory.
 */
export const MAX_RESPONSE_BYTES = 64 * 1024;

/** RFC 8628 §3.2 device authorization response, plus the PKCE verifier that goes with it. */
export interface DeviceAuthorization {
  device_code: string;
  user_code: string;
  verification_uri: string;
  verification_uri_complete?: string;
  expires_in: number;
  /** Seconds between polls; the client's default when the server omits it. */
  interval: number;
  /** RFC 7636 §4.1 code verifier; sent with every poll. */
  code_verifier: string;
}

/** RFC 6749 §5.1 access token response, with Qwen's `resource_url`. */
export interface TokenGrant {
  access_token: string;
  refresh_token?: string;
  /** `Bearer` (oauth4webapi lowercases it; we restore the canonical spelling the Qwen CLI writes). */
  token_type: string;
  expires_in: number;
  resource_url?: string;
  /** Why the response's `resource_url` was dropped (see `checkChatBaseUrl`); for the caller to log. */
  rejected_resource_url?: string;
  scope?: string;
}

/** Outcome of one RFC 8628 §3.4 poll that did not fail. */
export type DevicePollResult = { status: 'pending' } | { status: 'slow_down' } | { status: 'success'; grant: TokenGrant };

export interface QwenOAuthClientOptions {
  /** e.g. `https://chat.qwen.ai`; plain http is accepted only for loopback hosts (tests). */
  baseUrl: string;
  clientId: string;
  scope: string;
  /** Upper bound of every HTTP exchange, body included. */
  timeoutMs: number;
  fetch?: typeof fetch;
  /** Hosts a `resource_url` may name (default: see url-trust.ts). */
  trustedChatHosts?: readonly string[] | undefined;
}

export interface WaitForDeviceTokenOptions {
  clock: Clock;
  signal?: AbortSignal;
  /** Called after every poll that got an OAuth answer. */
  onPoll?: (result: DevicePollResult) => void;
  /** Called when a poll failed in a way that is retried (network, timeout, 5xx, ...). */
  onTransientError?: (error: QwenOAuthError) => void;
}

const DEVICE_ENDPOINT = 'device authorization endpoint';
const TOKEN_ENDPOINT = 'token endpoint';

/** OAuth `error` values that say "try again later", not "this credential is bad". */
export const RETRYABLE_OAUTH_ERRORS: ReadonlySet<string> = new Set(['slow_down', 'temporarily_unavailable', 'server_error']);

/** Statuses on which an OAuth error body means the refresh token itself was refused. */
const REFRESH_REJECTION_STATUSES = new Set([400, 401, 403]);

/** Validated on top of oauth4webapi's checks: we also need `expires_in` and Qwen's extras. */
export const TokenResponseSchema = z.object({
  access_token: z.string().min(1),
  token_type: z.string().min(1),
  expires_in: z.number().finite().positive(),
  refresh_token: z.string().min(1).optional(),
  resource_url: z.string().nullish(),
  scope: z.string().nullish(),
});

/** A non-200 answer, before the step that made the request decides what it means. */
export interface ErrorAnswer {
  status: number;
  /** OAuth `error` field, when the body (or a WWW-Authenticate challenge) carried one. */
  error?: string | undefined;
  description?: string | undefined;
  html: boolean;
  /** The answer's `Retry-After` header, as sent (see `retryAfterMs`). */
  retryAfter?: string | undefined;
}

export type Exchange<T> = { ok: true; value: T } | { ok: false; answer: ErrorAnswer };

/**
 * Server-sent text made safe for a one-line message: no control characters, bounded length,
 * and no token-like runs (a server may echo the refresh token it rejects; our messages reach
 * logs, clients and terminals, so anything that could be a credential is cut out).
 */
export function clip(text: string | undefined): string | undefined {
  if (!text) return undefined;
  const clean = text
    .replace(/[\u0000-\u001f\u007f]+/g, ' ')
    .replace(/[A-Za-z0-9._~+/=-]{16,}/g, '[redacted]')
    .trim();
  return clean.length > 160 ? `${clean.slice(0, 157)}...` : clean;
}

export function describeOAuthError(answer: ErrorAnswer): string {
  const description = clip(answer.description);
  const error = clip(answer.error) ?? 'error';
  return description ? `${error}: ${description}` : error;
}

function isJson(contentType: string | null): boolean {
  return /^\s*application\/json\s*(;|$)/i.test(contentType ?? '');
}

function isHtml(contentType: string | null): boolean {
  return /^\s*(text\/html|application\/xhtml\+xml)/i.test(contentType ?? '');
}

/** The `code` of a network error, looked for along the cause chain (undici nests it). */
function networkErrorCode(e: unknown): string | undefined {
  const seen = new Set<unknown>();
  let current: unknown = e;
  while (current && typeof current === 'object' && !seen.has(current)) {
    seen.add(current);
    const code = (current as { code?: unknown }).code;
    if (typeof code === 'string') return code;
    const errors = (current as { errors?: unknown }).errors;
    if (Array.isArray(errors) && errors.length > 0) {
      const nested = networkErrorCode(errors[0]);
      if (nested) return nested;
    }
    current = (current as { cause?: unknown }).cause;
  }
  return undefined;
}

/** What to check when the OAuth server cannot be reached (see networkErrorMessage). */
export const NETWORK_ADVICE =
  'check the network connection, QWEN_OAUTH_BASE_URL, and behind a proxy HTTPS_PROXY with NODE_USE_ENV_PROXY=1 (Node 22 and later)';

/** A transport failure in one line: what failed, why (with the errno-style code), and what to check. */
function networkErrorMessage(endpoint: string, e: unknown, advice: string): string {
  const code = networkErrorCode(e);
  const what = ((): string => {
    switch (code) {
      case 'ECONNREFUSED':
        return `could not reach the ${endpoint}: connection refused (${code})`;
      case 'ECONNRESET':
      case 'EPIPE':
      case 'UND_ERR_SOCKET':
      case 'UND_ERR_CLOSED':
        // The server was reached: address and network are not what to check.
        return `the ${endpoint} closed the connection without answering (${code})`;
      case 'ENOTFOUND':
      case 'EAI_AGAIN':
        return `could not reach the ${endpoint}: host name did not resolve (${code})`;
      case 'ETIMEDOUT':
      case 'UND_ERR_CONNECT_TIMEOUT':
        return `could not reach the ${endpoint}: connection timed out (${code})`;
      case undefined:
        return `could not reach the ${endpoint}: ${e instanceof Error ? e.name : 'network error'}`;
      default:
        return `could not reach the ${endpoint}: network error (${code})`;
    }
  })();
  return what.startsWith('could not reach') ? `${what}; ${advice}` : what;
}

/** A retryable failure whose answer said when to ask again: its `Retry-After` (RFC 9110 §10.2.3). */
class QwenOAuthRetryLaterError extends QwenOAuthError {
  /** The header as sent; read it with `retryAfterMs`. */
  readonly retryAfter: string;
  constructor(message: string, options: QwenOAuthErrorOptions & { retryAfter: string }) {
    super(message, options);
    this.retryAfter = options.retryAfter;
  }
}

/**
 * How long a `Retry-After` value asks to wait, in ms (RFC 9110 §10.2.3: delay-seconds or an
 * HTTP-date, compared with `now`); undefined when it is neither.
 */
function retryAfterMs(value: string, now: number): number | undefined {
  const text = value.trim();
  if (/^\d+$/.test(text)) return Number(text) * 1000;
  const date = Date.parse(text);
  return Number.isNaN(date) ? undefined : Math.max(0, date - now);
}

/** A retryable error for an HTTP answer that carries no usable OAuth verdict. */
export function httpFailure(endpoint: string, answer: ErrorAnswer): QwenOAuthError {
  let message = `${endpoint} answered HTTP ${answer.status}`;
  if (answer.html) message += ' with an HTML page';
  else if (answer.error) message += ` (${describeOAuthError(answer)})`;
  const options: QwenOAuthErrorOptions = { status: answer.status, oauthError: clip(answer.error), retryable: true };
  if (answer.retryAfter !== undefined) return new QwenOAuthRetryLaterError(message, { ...options, retryAfter: answer.retryAfter });
  return new QwenOAuthError(message, options);
}

export function malformed(endpoint: string, what: string): QwenOAuthError {
  return new QwenOAuthError(`${endpoint} sent ${what}`, { status: 200, retryable: true });
}

export function cancelled(message: string): QwenOAuthError {
  return new QwenOAuthError(message, { oauthError: 'cancelled' });
}

export function expiredDeviceCode(): QwenOAuthError {
  return new QwenOAuthError('the device code expired before it was approved; run the login again', {
    oauthError: 'expired_token',
  });
}

function canonicalTokenType(tokenType: string): string {
  switch (tokenType.toLowerCase()) {
    case 'bearer':
      return 'Bearer';
    case 'dpop':
      return 'DPoP';
    default:
      return tokenType;
  }
}

/**
 * Checks a processed token response and keeps the fields we use; an untrusted `resource_url` is
 * dropped, and without a policy (servers that are not Qwen's) `resource_url` is ignored.
 */
export function toGrant(endpoint: string, json: oauth.TokenEndpointResponse, policy: ChatUrlPolicy | null): TokenGrant {
  const parsed = TokenResponseSchema.safeParse(json);
  if (!parsed.success) {
    // Paths only: issue messages could quote values, and values may be tokens.
    const fields = [...new Set(parsed.error.issues.map((i) => i.path.join('.') || '(root)'))].join(', ');
    throw malformed(endpoint, `a malformed token response (missing or invalid: ${fields})`);
  }
  const v = parsed.data;
  const grant: TokenGrant = {
    access_token: v.access_token,
    token_type: canonicalTokenType(v.token_type),
    expires_in: v.expires_in,
  };
  if (v.refresh_token !== undefined) grant.refresh_token = v.refresh_token;
  if (v.resource_url && policy) {
    const verdict = checkChatBaseUrl(chatBaseUrl(v.resource_url), policy);
    if (verdict.ok) grant.resource_url = v.resource_url;
    else grant.rejected_resource_url = verdict.reason;
  }
  if (v.scope) grant.scope = v.scope;
  return grant;
}

/** Waits `ms` on the injected clock; rejects with a `cancelled` error when `signal` aborts. */
export function sleep(clock: Clock, ms: number, signal: AbortSignal | undefined): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) {
      reject(cancelled('the login was cancelled'));
      return;
    }
    let handle: TimerHandle | undefined;
    const onAbort = (): void => {
      if (handle !== undefined) clock.clearTimeout(handle);
      reject(cancelled('the login was cancelled'));
    };
    handle = clock.setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}

/** Qwen CLI's polling: 2 s by default, ×1.5 per slow_down up to 10 s. */
const QWEN_POLLING: PollingRules = {
  defaultIntervalS: DEFAULT_POLL_INTERVAL_S,
  slowedDown: (interval) => Math.min(interval * SLOW_DOWN_FACTOR, MAX_POLL_INTERVAL_S),
  expired: expiredDeviceCode,
};

/** Talks to Qwen's OAuth endpoints. Stateless apart from its configuration. */
export class QwenOAuthClient {
  private readonly as: oauth.AuthorizationServer;
  private readonly client: oauth.Client;
  private readonly clientAuth: oauth.ClientAuth = oauth.None();
  private readonly scope: string;
  private readonly insecure: boolean;
  private readonly transport: OAuthTransport;
  private readonly chatUrlPolicy: ChatUrlPolicy;

  /** Builds the RFC 8414 metadata by hand: Qwen publishes no discovery document. */
  constructor(options: QwenOAuthClientOptions) {
    const base = options.baseUrl.replace(/\/+$/, '');
    let url: URL;
    try {
      url = new URL(base);
    } catch {
      throw new QwenConfigError(`OAuth base URL must be an absolute http(s) URL, got "${options.baseUrl}"`);
    }
    if (url.protocol === 'http:' && !isLoopbackHost(url.hostname)) {
      throw new QwenConfigError(
        `OAuth base URL must use https (plain http is allowed only for loopback hosts), got "${options.baseUrl}"`,
      );
    }
    if (url.protocol !== 'http:' && url.protocol !== 'https:') {
      throw new QwenConfigError(`OAuth base URL must be an http(s) URL, got "${options.baseUrl}"`);
    }
    this.as = {
      issuer: base,
      device_authorization_endpoint: `${base}${DEVICE_AUTHORIZATION_PATH}`,
      token_endpoint: `${base}${TOKEN_PATH}`,
    };
    this.client = { client_id: options.clientId, token_endpoint_auth_method: 'none' };
    this.scope = options.scope;
    this.insecure = url.protocol === 'http:';
    this.transport = new OAuthTransport({ timeoutMs: options.timeoutMs, fetch: options.fetch });
    this.chatUrlPolicy = { oauthBaseUrl: base, trustedHosts: options.trustedChatHosts };
  }

  /** RFC 8628 §3.1 device authorization request, with an RFC 7636 §4.1–4.2 S256 code challenge. */
  async deviceAuthorizationRequest(signal?: AbortSignal): Promise<DeviceAuthorization> {
    const codeVerifier = oauth.generateRandomCodeVerifier();
    const codeChallenge = await oauth.calculatePKCECodeChallenge(codeVerifier);
    const parameters = { scope: this.scope, code_challenge: codeChallenge, code_challenge_method: 'S256' };
    const result = await this.transport.exchange(
      DEVICE_ENDPOINT,
      signal,
      (s) => oauth.deviceAuthorizationRequest(this.as, this.client, this.clientAuth, parameters, this.requestOptions(s)),
      (response) => oauth.processDeviceAuthorizationResponse(this.as, this.client, response),
    );
    if (!result.ok) throw deviceAuthorizationFailure(DEVICE_ENDPOINT, result.answer);
    return deviceAuthorizationOf(result.value, codeVerifier, DEFAULT_POLL_INTERVAL_S);
  }

  /**
   * One RFC 8628 §3.4 device access token request (with the RFC 7636 §4.5 `code_verifier`) and
   * its §3.5 answer: `pending` and `slow_down` are results; expiry, denial and other refusals throw.
   */
  async deviceTokenPoll(auth: DeviceAuthorization, signal?: AbortSignal): Promise<DevicePollResult> {
    const result = await this.transport.exchange(
      TOKEN_ENDPOINT,
      signal,
      (s) =>
        oauth.deviceCodeGrantRequest(this.as, this.client, this.clientAuth, auth.device_code, {
          ...this.requestOptions(s),
          additionalParameters: { code_verifier: auth.code_verifier },
        }),
      (response) => oauth.processDeviceCodeResponse(this.as, this.client, response),
    );
    if (result.ok) return { status: 'success', grant: toGrant(TOKEN_ENDPOINT, result.value, this.chatUrlPolicy) };
    const { answer } = result;
    const verdict = devicePollVerdict(answer, expiredDeviceCode);
    if (verdict) return verdict;
    if (answer.error === 'access_denied' || answer.status === 401) {
      throw new QwenOAuthError('the authorization request was denied; run the login again to retry', {
        oauthError: 'access_denied',
        status: answer.status,
      });
    }
    throw devicePollFailure(TOKEN_ENDPOINT, answer);
  }

  /** Polls until the user approves (see `pollForDeviceToken`), with the Qwen CLI's intervals. */
  async waitForDeviceToken(auth: DeviceAuthorization, opts: WaitForDeviceTokenOptions): Promise<TokenGrant> {
    return pollForDeviceToken(auth, opts, QWEN_POLLING, (signal) => this.deviceTokenPoll(auth, signal));
  }

  /**
   * RFC 6749 §6 refresh. A refusal of the refresh token (400/401/403 with an OAuth error, which
   * Qwen spells `invalid_request`) throws `QwenRefreshTokenInvalidError`; everything else that
   * goes wrong throws a retryable `QwenOAuthError`.
   */
  async refreshTokenGrant(refreshToken: string, signal?: AbortSignal): Promise<TokenGrant> {
    if (!refreshToken) throw new QwenRefreshTokenInvalidError('there is no refresh token; run the login again');
    const result = await this.transport.exchange(
      TOKEN_ENDPOINT,
      signal,
      (s) => oauth.refreshTokenGrantRequest(this.as, this.client, this.clientAuth, refreshToken, this.requestOptions(s)),
      (response) => oauth.processRefreshTokenResponse(this.as, this.client, response),
    );
    if (result.ok) return toGrant(TOKEN_ENDPOINT, result.value, this.chatUrlPolicy);
    const { answer } = result;
    if (answer.error && REFRESH_REJECTION_STATUSES.has(answer.status) && !RETRYABLE_OAUTH_ERRORS.has(answer.error)) {
      throw new QwenRefreshTokenInvalidError(
        `the ${TOKEN_ENDPOINT} rejected the refresh token (HTTP ${answer.status}, ${describeOAuthError(answer)}); run the login again`,
      );
    }
    throw httpFailure(TOKEN_ENDPOINT, answer);
  }

  private requestOptions(signal: AbortSignal): oauth.TokenEndpointRequestOptions {
    const options: oauth.TokenEndpointRequestOptions = { signal };
    // http:// is only ever a loopback test server (checked in the constructor).
    if (this.insecure) options[oauth.allowInsecureRequests] = true;
    options[oauth.customFetch] = (url, init) =>
      this.transport.boundedFetch(url.endsWith(DEVICE_AUTHORIZATION_PATH) ? DEVICE_ENDPOINT : TOKEN_ENDPOINT, url, init);
    return options;
  }
}

export interface OAuthTransportOptions {
  /** Upper bound of every HTTP exchange, body included. */
  timeoutMs: number;
  fetch?: typeof fetch | undefined;
  /** What to check when the server cannot be reached (default `NETWORK_ADVICE`). */
  networkAdvice?: string | undefined;
}

/**
 * The HTTP side every OAuth client here shares: one deadline per exchange (body included),
 * answers read up to `MAX_RESPONSE_BYTES`, and whatever oauth4webapi or fetch threw turned into
 * an error answer for the calling step, or a `QwenOAuthError` whose message holds no token.
 * `endpoint` is how messages name the endpoint (e.g. `token endpoint`).
 */
export class OAuthTransport {
  readonly timeoutMs: number;
  private readonly fetchImpl: typeof fetch;
  private readonly networkAdvice: string;

  constructor(options: OAuthTransportOptions) {
    this.timeoutMs = options.timeoutMs;
    const custom = options.fetch;
    this.fetchImpl = custom ?? ((input, init) => globalThis.fetch(input, init));
    this.networkAdvice = options.networkAdvice ?? NETWORK_ADVICE;
  }

  /**
   * fetch, with the answer read here up to `MAX_RESPONSE_BYTES` and handed on in memory: a
   * larger one fails as a retryable server error (the deadline covers this read too).
   */
  async boundedFetch(endpoint: string, url: string, init: RequestInit): Promise<Response> {
    const response = await this.fetchImpl(url, init);
    const tooLarge = () => {
      void response.body?.cancel().catch(() => undefined);
      return new QwenOAuthError(`${endpoint} sent an answer larger than ${MAX_RESPONSE_BYTES / 1024} KiB (HTTP ${response.status}); treating it as a server error`, {
        status: response.status,
        retryable: true,
      });
    };
    const declared = Number(response.headers.get('content-length') ?? NaN);
    if (declared > MAX_RESPONSE_BYTES) throw tooLarge();
    const chunks: Uint8Array[] = [];
    let size = 0;
    if (response.body) {
      const reader = response.body.getReader();
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        size += value.byteLength;
        if (size > MAX_RESPONSE_BYTES) {
          await reader.cancel().catch(() => undefined);
          throw tooLarge();
        }
        chunks.push(value);
      }
    }
    // A null-body status (204, 304) cannot be rebuilt with a body.
    const body = response.status === 204 || response.status === 304 ? null : Buffer.concat(chunks);
    return new Response(body, { status: response.status, statusText: response.statusText, headers: response.headers });
  }

  /**
   * Sends one request and processes its answer under one deadline (`timeoutMs`, body included).
   * Returns the processed body, or the error answer for the caller to interpret; throws a
   * `QwenOAuthError` for transport failures and unusable 200 answers.
   */
  async exchange<T>(
    endpoint: string,
    callerSignal: AbortSignal | undefined,
    send: (signal: AbortSignal) => Promise<Response>,
    process: (response: Response) => Promise<T>,
  ): Promise<Exchange<T>> {
    const timeout = AbortSignal.timeout(this.timeoutMs);
    const signal = callerSignal ? AbortSignal.any([callerSignal, timeout]) : timeout;
    try {
      const response = await send(signal);
      return { ok: true, value: await process(response) };
    } catch (e) {
      if (callerSignal?.aborted) throw cancelled(`the ${endpoint} request was cancelled`);
      if (timeout.aborted) {
        throw new QwenOAuthError(`${endpoint} timed out after ${this.timeoutMs} ms`, { retryable: true });
      }
      return { ok: false, answer: await this.interpret(endpoint, e) };
    }
  }

  /**
   * Maps what oauth4webapi (or fetch) threw to an error answer, or throws the final error.
   * oauth4webapi errors are never attached as `cause`: some carry the response body, which
   * may hold tokens, and error serializers print causes.
   */
  private async interpret(endpoint: string, e: unknown): Promise<ErrorAnswer> {
    if (e instanceof oauth.ResponseBodyError) {
      // 4xx with a JSON body whose `error` is a string (RFC 6749 §5.2).
      return { status: e.status, error: e.error, description: e.error_description, html: false, retryAfter: retryAfterOf(e.response) };
    }
    if (e instanceof oauth.WWWAuthenticateChallengeError) {
      // oauth4webapi stops at the challenge header without reading the body; the body's
      // `error` (RFC 6749 §5.2 allows 401 + WWW-Authenticate) is what we judge by.
      const response = e.response;
      let error: string | undefined;
      let description: string | undefined;
      try {
        if (isJson(response.headers.get('content-type'))) {
          const body: unknown = await response.json();
          if (body && typeof body === 'object') {
            const b = body as { error?: unknown; error_description?: unknown };
            if (typeof b.error === 'string' && b.error) error = b.error;
            if (typeof b.error_description === 'string') description = b.error_description;
          }
        }
      } catch {
        // unreadable body: fall back to the challenge
      } finally {
        if (!response.bodyUsed) await response.body?.cancel().catch(() => undefined);
      }
      error ??= e.cause.map((c) => c.parameters.error).find((v): v is string => typeof v === 'string' && v !== '');
      return { status: e.status, error, description, html: false, retryAfter: retryAfterOf(response) };
    }
    if (e instanceof oauth.OperationProcessingError) {
      const cause: unknown = e.cause;
      if (cause instanceof Response) {
        const html = isHtml(cause.headers.get('content-type'));
        if (!cause.bodyUsed) await cause.body?.cancel().catch(() => undefined);
        if (cause.status === 200) {
          throw malformed(endpoint, html ? 'an HTML page instead of JSON' : 'a body that is not JSON');
        }
        return { status: cause.status, html, retryAfter: retryAfterOf(cause) };
      }
      switch (e.code) {
        case oauth.PARSE_ERROR:
          throw malformed(endpoint, 'a body that is not JSON');
        case oauth.INVALID_RESPONSE:
          // oauth4webapi's messages name the property, never its value.
          throw malformed(endpoint, `a malformed response (${e.message})`);
        default:
          throw new QwenOAuthError(`${endpoint} request could not be made (${e.code ?? e.message})`);
      }
    }
    if (e instanceof oauth.UnsupportedOperationError) {
      throw malformed(endpoint, 'a token of an unsupported token_type');
    }
    if (e instanceof QwenError) throw e;
    const code = (e as { code?: unknown } | null)?.code;
    if (typeof code === 'string' && code.startsWith('ERR_INVALID_ARG')) {
      // oauth4webapi refused our own input: a bug or bad configuration, not worth retrying.
      throw new QwenOAuthError(`${endpoint} request could not be made (${code})`);
    }
    throw new QwenOAuthError(networkErrorMessage(endpoint, e, this.networkAdvice), { retryable: true, cause: e });
  }
}

/** A response's `Retry-After` header, when it has one. */
function retryAfterOf(response: Response): string | undefined {
  return response.headers.get('retry-after') ?? undefined;
}

/** The error for a device authorization request (RFC 8628 §3.2) the server did not grant. */
export function deviceAuthorizationFailure(endpoint: string, answer: ErrorAnswer): QwenOAuthError {
  if (answer.error && answer.status >= 400 && answer.status < 500 && answer.status !== 429 && !RETRYABLE_OAUTH_ERRORS.has(answer.error)) {
    return new QwenOAuthError(`${endpoint} refused the request (${describeOAuthError(answer)})`, {
      oauthError: clip(answer.error),
      status: answer.status,
    });
  }
  return httpFailure(endpoint, answer);
}

/**
 * What a device access token request's error answer means (RFC 8628 §3.5): `pending` and
 * `slow_down` are results, judged by the error field (Qwen sends slow_down with 429, RFC 8628
 * with 400); expiry throws `expired`; undefined for any other answer.
 */
export function devicePollVerdict(answer: ErrorAnswer, expired: () => QwenOAuthError): DevicePollResult | undefined {
  if (answer.error === 'authorization_pending') return { status: 'pending' };
  if (answer.error === 'slow_down') return { status: 'slow_down' };
  if (answer.error === 'expired_token') throw expired();
  return undefined;
}

/** The error for a device poll answer that is not a verdict: retryable when the server is busy, else terminal. */
export function devicePollFailure(endpoint: string, answer: ErrorAnswer): QwenOAuthError {
  if (answer.status === 429 || answer.status === 408 || (answer.error && RETRYABLE_OAUTH_ERRORS.has(answer.error))) {
    return httpFailure(endpoint, answer);
  }
  if (answer.error && answer.status >= 400 && answer.status < 500) {
    return new QwenOAuthError(`${endpoint} refused the device code (${describeOAuthError(answer)}); run the login again`, {
      oauthError: clip(answer.error),
      status: answer.status,
    });
  }
  return httpFailure(endpoint, answer);
}

/** How often a device flow polls. */
export interface PollingRules {
  /** Seconds between polls when the device authorization response names none. */
  defaultIntervalS: number;
  /** The interval after a `slow_down`, given the current one. */
  slowedDown(intervalS: number): number;
  /** The error when the device code expires unapproved. */
  expired(): QwenOAuthError;
}

/**
 * Polls (RFC 8628 §3.4–3.5) until the user approves: waits the interval on the injected clock
 * before each poll, lets `rules` grow it on `slow_down` (never shrinking), backs off on
 * transient failures, and gives up at the `expires_in` deadline.
 *
 * Backing off: §3.5 asks a client that meets a timeout to poll less often. Each failure worth
 * retrying (timeout, network error, 5xx, 429 ...) doubles the wait before the next poll, waits
 * at least what a `Retry-After` asks, and stops growing at `MAX_POLL_BACKOFF_S` (no wait goes
 * past the deadline). The next OAuth answer ends the backoff: the server is answering again.
 * Only `slow_down`, the server's own request, slows polling for the rest of the login (§3.5).
 */
export async function pollForDeviceToken(
  auth: DeviceAuthorization,
  opts: WaitForDeviceTokenOptions,
  rules: PollingRules,
  poll: (signal: AbortSignal | undefined) => Promise<DevicePollResult>,
): Promise<TokenGrant> {
  const { clock, signal, onPoll, onTransientError } = opts;
  let interval = auth.interval > 0 ? auth.interval : rules.defaultIntervalS;
  /** Seconds to wait while polls keep failing (0: not backing off). */
  let backoff = 0;
  // Measured from when waiting starts: the caller calls this right after the authorization.
  const deadline = clock.now() + auth.expires_in * 1000;
  for (;;) {
    const remaining = deadline - clock.now();
    if (remaining <= 0) throw rules.expired();
    const wait = Math.max(interval, backoff);
    await sleep(clock, Math.min(wait * 1000, remaining), signal);
    if (clock.now() >= deadline) throw rules.expired();
    let result: DevicePollResult;
    try {
      result = await poll(signal);
    } catch (e) {
      if (e instanceof QwenOAuthError && e.oauthError === 'cancelled') throw cancelled('the login was cancelled');
      if (e instanceof QwenOAuthError && e.retryable) {
        onTransientError?.(e);
        const askedMs = e instanceof QwenOAuthRetryLaterError ? (retryAfterMs(e.retryAfter, clock.now()) ?? 0) : 0;
        backoff = Math.min(MAX_POLL_BACKOFF_S, Math.max(wait * 2, askedMs / 1000));
        continue;
      }
      throw e;
    }
    backoff = 0;
    onPoll?.(result);
    if (result.status === 'success') return result.grant;
    if (result.status === 'slow_down') interval = Math.max(interval, rules.slowedDown(interval));
  }
}

/**
 * Builds the credential record from a grant (RFC 6749 §6: a new refresh token replaces the
 * old one); keeps the previous refresh_token/resource_url when the grant omits them. A grant
 * with no refresh token at all is refused unless `allowNoRefreshToken`.
 */
export function credentialsFromGrant(
  grant: TokenGrant,
  previous: Credentials | null,
  now: number,
  options: { allowNoRefreshToken?: boolean } = {},
): Credentials {
  const refreshToken = grant.refresh_token ?? previous?.refresh_token ?? '';
  // Allowed for providers that issue none: the login then lasts as long as its access token
  // (an empty refresh_token in the record; see lifecycle.ts).
  if (!refreshToken && !options.allowNoRefreshToken) {
    throw new QwenOAuthError('the token endpoint issued no refresh token, so the login cannot be kept; run the login again', {
      retryable: false,
    });
  }
  const credentials: Credentials = {
    access_token: grant.access_token,
    refresh_token: refreshToken,
    token_type: grant.token_type || previous?.token_type || 'Bearer',
    expiry_date: Math.round(now + grant.expires_in * 1000),
  };
  const resourceUrl = grant.resource_url ?? previous?.resource_url;
  if (resourceUrl) credentials.resource_url = resourceUrl;
  return credentials;
}

/** True when an error means the refresh token itself was rejected (terminal). */
export function isRefreshTokenRejection(e: unknown): boolean {
  return e instanceof QwenRefreshTokenInvalidError || (e instanceof QwenError && e.code === ErrorCodes.refreshTokenInvalid);
}

/** The device authorization a §3.2 response describes, with the verifier to send with each poll. */
export function deviceAuthorizationOf(
  v: oauth.DeviceAuthorizationResponse,
  codeVerifier: string,
  defaultIntervalS: number,
): DeviceAuthorization {
  const auth: DeviceAuthorization = {
    device_code: v.device_code,
    user_code: v.user_code,
    verification_uri: v.verification_uri,
    expires_in: v.expires_in,
    interval: v.interval ?? defaultIntervalS,
    code_verifier: codeVerifier,
  };
  if (v.verification_uri_complete !== undefined) auth.verification_uri_complete = v.verification_uri_complete;
  return auth;
}
