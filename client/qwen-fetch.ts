/**
 * A drop-in `fetch` for an OpenAI-compatible chat API that always carries the daemon's current
 * credential for a profile: Qwen OAuth (the default), another OAuth provider's token, or an API
 * key. An OAuth token the API rejects is refreshed once and the request retried; a rejected API
 * key is an error at once (a new key is needed, retrying cannot help). The credential goes only
 * to its own profile's origin: a request for another origin is refused, and redirects are
 * followed here, within that origin only.
 *
 *   const openai = new OpenAI({ apiKey: 'unused', baseURL: await qwenBaseURL({ profile }), fetch: createQwenFetch({ profile }) });
 */
import { TokenClient } from './token-client.js';
import { QwenConfigError, QwenCredentialRejectedError, QwenDaemonUnavailableError, QwenError, QwenTokenExpiredError } from '../shared/errors.js';
import { fingerprint } from '../shared/fingerprint.js';
import { isAcceptableEndpoint } from '../shared/profiles.js';
import type { TokenResult } from '../shared/protocol.js';
import { packageVersion } from '../shared/package.js';
import { DEFAULT_CHAT_BASE_URL } from '../shared/credentials.js';
import { checkChatBaseUrl, printable } from '../shared/url-trust.js';

/** A function with `fetch`'s signature (what the `openai` SDK and most HTTP SDKs accept). */
export type QwenFetch = (input: string | URL | Request, init?: RequestInit) => Promise<Response>;

export interface QwenFetchOptions {
  /** Daemon client to take tokens from (default: the shared `TokenClient.getInstance()`). */
  client?: TokenClient;
  /** The credential profile (default: the client's, i.e. `QWEN_TOKEND_PROFILE`, else the daemon's default). */
  profile?: string;
  /**
   * Extra headers for every request; they override the request's own and the Qwen identity
   * headers (not the credential's header).
   */
  headers?: Record<string, string>;
  /** Sent as `User-Agent` (and, for Qwen OAuth, `X-DashScope-UserAgent`); default `qwen-tokend/<version> (node <ver>; <platform>; <arch>)`. */
  userAgent?: string;
  /** The transport underneath (default: the global `fetch`). */
  fetch?: QwenFetch;
}

/** Qwen's chat API answer to an expired, revoked or unknown access token. */
const TOKEN_REJECTED_TEXT = /invalid access token|token expired/i;
/** A 403 with this in its body is about quota or rate, not the credential: it goes to the caller as is. */
const QUOTA_TEXT = /insufficient_quota|quota|rate[ _-]?limit|throttl/i;
/**
 * A 403 with this in its body says the API key itself is refused. Any other 403 (a model the plan
 * lacks, a permission) is about that request only: the caller gets it, and the key stays usable.
 */
const KEY_INVALID_TEXT = /invalid[ _-]?api[ _-]?key|incorrect[ _-]?api[ _-]?key|api[ _-]?key\b[^.]{0,40}\b(?:is invalid|invalid|incorrect|revoked|disabled|expired|not valid)\b/i;
/** A run of a key's first characters this long is taken out of messages too (a server may cut the key); shorter runs are the public prefix (`sk-sp-`). */
const KEY_PREFIX_REDACT_MIN = 8;
/** Server messages in errors are cut to this many characters, after the key is taken out. */
const SERVER_MESSAGE_MAX = 200;
/** Error bodies are read only this far to look for the token-rejection message. */
const PEEK_LIMIT_BYTES = 64 * 1024;
/** Redirects followed within one origin for one request (fetch's own limit). */
const MAX_REDIRECTS = 20;
const REDIRECT_STATUSES = new Set([301, 302, 303, 307, 308]);
/** Headers that describe a body, dropped when a redirect turns the request into a GET. */
const BODY_HEADERS = ['content-type', 'content-length', 'content-encoding', 'content-language', 'content-location'];

/** The default `User-Agent` / `X-DashScope-UserAgent` value. */
export function defaultUserAgent(): string {
  return `qwen-tokend/${packageVersion()} (node ${process.versions.node}; ${process.platform}; ${process.arch})`;
}

export interface QwenBaseUrlOptions {
  client?: TokenClient;
  profile?: string;
}

/**
 * The OpenAI-compatible base URL of a profile (e.g. `https://portal.qwen.ai/v1` for Qwen OAuth,
 * the plan's URL for an API key). Takes a client, or `{ client, profile }`.
 */
export async function qwenBaseURL(target?: TokenClient | QwenBaseUrlOptions): Promise<string> {
  const options: QwenBaseUrlOptions = target instanceof TokenClient ? { client: target } : (target ?? {});
  const c = options.client ?? TokenClient.getInstance();
  const creds = await c.getCredentials(options.profile === undefined ? undefined : { profile: options.profile });
  return trustedBaseURL(creds, c);
}

/** True for Qwen OAuth's credentials, and for a version-1 daemon's (which has no other kind). */
export function isQwenOAuth(creds: TokenResult): boolean {
  return creds.kind === undefined || creds.kind === 'qwen-oauth';
}

/** Base URLs already reported as refused, so each is reported once per process. */
const refusedBaseURLs = new Set<string>();

/**
 * The daemon checks `base_url` where it comes in; the client checks it again where the credential
 * is about to follow it (a stand-in daemon, or one with an older configuration, may send any URL).
 * Qwen OAuth's comes from server answers: https to a trusted host, by this process's own
 * settings, and a refused one gives the default. Other profiles' come from the user's config:
 * https (plain http only to this machine), and a refused one is an error, never a fallback that
 * would send the key elsewhere.
 */
export function trustedBaseURL(creds: TokenResult, client: TokenClient): string {
  const base = creds.base_url;
  if (!isQwenOAuth(creds)) {
    if (isAcceptableEndpoint(base)) return base.replace(/\/+$/, '');
    throw new QwenConfigError(
      `qwen-tokend gave the base URL ${printable(base, 200)} for profile "${creds.profile ?? 'default'}", which is refused: ` +
        `it must be https (plain http only to this machine), without user, query or fragment; fix it with \`${qwenToken(`profile show ${creds.profile ?? ''}`.trim())}\``,
    );
  }
  const verdict = checkChatBaseUrl(base, { oauthBaseUrl: client.config.oauthBaseUrl, trustedHosts: client.config.trustedChatHosts });
  if (verdict.ok) return verdict.url;
  if (!refusedBaseURLs.has(base)) {
    refusedBaseURLs.add(base);
    process.emitWarning(`qwen-tokend gave the chat base URL ${printable(base, 200)}, which is refused (${verdict.reason}); using ${DEFAULT_CHAT_BASE_URL}`, {
      code: 'QWEN_CHAT_BASE_URL_REFUSED',
    });
  }
  return DEFAULT_CHAT_BASE_URL;
}

/**
 * Tokens the chat API rejected right after a forced refresh, per client and profile. Using one
 * again skips the refresh (and fails after one attempt), so a service that refuses every token
 * cannot turn each request into a refresh, and SDK retries stay cheap.
 */
const rejectedAfterRefresh = new WeakMap<TokenClient, Map<string, string>>();

/**
 * API keys the API refused, per client and profile, with when. Another request with the same key
 * soon after (an SDK's own retries, a loop) fails at once without reaching the API: a refused key
 * stays refused until it is replaced, so only one request per window goes out to find out.
 */
const rejectedKeys = new WeakMap<TokenClient, Map<string, { key: string; at: number; rejection: string }>>();
const REJECTED_KEY_WINDOW_MS = 60_000;

/**
 * Tokens whose 403 (not a token message) outlived a forced refresh, per client and profile: a
 * permission, not the token. Another 403 with the same token goes to the caller without a refresh,
 * so a lasting 403 costs one refresh per token, not one per request. A new token gets one again.
 */
const forbiddenAfterRefresh = new WeakMap<TokenClient, Map<string, string>>();

/** One renewal per client and rejected token: concurrent 401s share it. */
const renewals = new WeakMap<TokenClient, Map<string, Promise<TokenResult>>>();

function perClient<V>(map: WeakMap<TokenClient, Map<string, V>>, client: TokenClient): Map<string, V> {
  let inner = map.get(client);
  if (!inner) {
    inner = new Map();
    map.set(client, inner);
  }
  return inner;
}

/** Returns a `fetch` that authenticates every request with the daemon's credential; see the module doc. */
export function createQwenFetch(options: QwenFetchOptions = {}): QwenFetch {
  const transport: QwenFetch = options.fetch ?? ((input, init) => globalThis.fetch(input, init));
  const userAgent = options.userAgent ?? defaultUserAgent();
  const extraHeaders = options.headers ?? {};
  const which = options.profile === undefined ? undefined : { profile: options.profile };

  return async function qwenFetch(input, init) {
    // Resolved per request so a `TokenClient.shutdown()` between requests is harmless.
    const client = options.client ?? TokenClient.getInstance();
    const signal = init?.signal ?? (isRequest(input) ? input.signal : undefined) ?? undefined;
    signal?.throwIfAborted();
    const request = await bufferRequest(input, init, signal);

    // Sends with `creds`, following redirects here rather than in the transport: fetch keeps
    // `x-api-key` (any header but Authorization) on a redirect to another origin. A redirect within
    // the origin is followed with the credential; one to another origin is not followed at all:
    // the caller gets the 3xx as it came. Following it without the credential would only earn a
    // 401 from a host the profile never named, which would read as a refused key here.
    const send = async (creds: TokenResult): Promise<Response> => {
      const headers = new Headers(request.headers);
      headers.set('User-Agent', userAgent);
      if (isQwenOAuth(creds)) {
        headers.set('X-DashScope-UserAgent', userAgent);
        headers.set('X-DashScope-AuthType', 'qwen-oauth');
        headers.set('X-DashScope-CacheControl', 'enable');
      }
      for (const [name, value] of Object.entries(extraHeaders)) headers.set(name, value);
      // The caller's own credential header (an SDK's placeholder key) never goes out beside ours.
      headers.delete('Authorization');
      headers.delete('x-api-key');
      if (creds.auth_header === 'x-api-key') headers.set('x-api-key', creds.access_token);
      else headers.set('Authorization', `Bearer ${creds.access_token}`);
      let url = request.url;
      let method = request.method;
      let body = request.body;
      for (let hops = 0; ; hops++) {
        const response = await transport(url, {
          ...init,
          method,
          headers,
          // A fresh copy per send, so no send depends on what a transport did with the last one's
          // (Node 20's fetch detaches a body when it follows a redirect itself).
          body: body === undefined ? null : body.slice(),
          redirect: 'manual',
          ...(signal ? { signal } : {}),
        });
        const next = request.redirect === 'manual' ? null : redirectTarget(response, url);
        if (next === null) return response;
        if (request.redirect === 'error') {
          await discard(response);
          throw new TypeError('fetch failed', { cause: new Error('unexpected redirect') });
        }
        if (new URL(next).origin !== new URL(url).origin) return response;
        await discard(response);
        if (hops >= MAX_REDIRECTS) throw new TypeError('fetch failed', { cause: new Error('redirect count exceeded') });
        // As fetch does: 303 (and 301/302 after a POST) continue as a GET without the body.
        if ((response.status === 303 && method !== 'GET' && method !== 'HEAD') || ((response.status === 301 || response.status === 302) && method === 'POST')) {
          method = 'GET';
          body = undefined;
          for (const name of BODY_HEADERS) headers.delete(name);
        }
        url = next;
      }
    };
    const ownOrigin = (creds: TokenResult): TokenResult => {
      checkOrigin(request.url, creds, client, options.profile);
      return creds;
    };

    const creds = ownOrigin(await abortable(client.getCredentials(which), signal));
    if (creds.kind === 'api-key') {
      const slot = creds.profile ?? options.profile ?? '';
      const refused = rejectedKeys.get(client)?.get(slot);
      // Monotonic time: how long ago, not what time it is.
      if (refused && refused.key === creds.access_token && performance.now() - refused.at < REJECTED_KEY_WINDOW_MS) {
        throw keyRejected(creds, request.url, `${refused.rejection}, moments ago; not sent again`);
      }
      const response = await send(creds);
      const rejection = await keyRejection(response, creds.access_token);
      if (rejection === null) {
        if (refused) rejectedKeys.get(client)!.delete(slot);
        return response;
      }
      await discard(response);
      perClient(rejectedKeys, client).set(slot, { key: creds.access_token, at: performance.now(), rejection });
      // Thrown rather than handing back the 401: the error names the profile and the command that
      // replaces the key, with a stable code (the CLI's exit 7, QwenChatModel's callers), which an
      // SDK's own 401 error cannot carry; and a repeat within the window has no response to give.
      // SDKs wrap it (openai: APIConnectionError, with this as `cause`); the README says so.
      throw keyRejected(creds, request.url, rejection);
    }

    const response = await send(creds);
    const first = creds.access_token;
    const slot = creds.profile ?? options.profile ?? '';
    const rejection = await tokenRejection(response, forbiddenAfterRefresh.get(client)?.get(slot) !== first);
    const rejectedBefore = rejectedAfterRefresh.get(client);
    if (rejection === null) {
      if (rejectedBefore?.get(slot) === first) rejectedBefore.delete(slot);
      return response;
    }
    await discard(response);
    if (rejectedBefore?.get(slot) === first) throw expiredAfterRefresh(rejection, creds);

    let renewed: TokenResult;
    try {
      renewed = await abortable(renew(client, first, which), signal);
    } catch (err) {
      if (err instanceof QwenDaemonUnavailableError || !(err instanceof QwenError)) throw err;
      throw new QwenTokenExpiredError(`${apiName(creds)} rejected the access token (${rejection}) and refreshing it failed: ${err.message}`, {
        cause: err,
      });
    }
    const retried = await send(ownOrigin(renewed));
    // A 403 that a fresh token did not cure is about permissions, not the token: the caller gets it,
    // and later 403s with this token do not ask for another refresh.
    const again = await tokenRejection(retried, false);
    if (again === null) {
      if (retried.status === 403) perClient(forbiddenAfterRefresh, client).set(slot, renewed.access_token);
      return retried;
    }
    await discard(retried);
    perClient(rejectedAfterRefresh, client).set(slot, renewed.access_token);
    throw expiredAfterRefresh(again, renewed, renewed.access_token);
  };
}

/** A `qwen-token` command line, as library messages name it (the CLI names its own in the form that works where it runs). */
function qwenToken(sub: string): string {
  return `qwen-token ${sub}`;
}

function apiName(creds: TokenResult): string {
  return isQwenOAuth(creds) ? "Qwen's chat API" : `the API of profile "${creds.profile ?? 'default'}"`;
}

/** `qwen-token <sub>`, with `--profile NAME` unless the credentials are the built-in profile's. */
function cliFor(sub: string, creds: TokenResult): string {
  const named = creds.profile !== undefined && !isQwenOAuth(creds) ? ` --profile ${creds.profile}` : '';
  return qwenToken(`${sub}${named}`);
}

function expiredAfterRefresh(rejection: string, creds: TokenResult, token?: string): QwenTokenExpiredError {
  const which = token ? ` (token ${fingerprint(token)})` : '';
  const why = isQwenOAuth(creds) ? 'The login was probably revoked, or Qwen no longer accepts this OAuth account' : 'The login was probably revoked';
  return new QwenTokenExpiredError(
    `${apiName(creds)} rejected the access token${which} even after a forced refresh (${rejection}). ` +
      `${why}: run \`${cliFor('login', creds)}\` (and \`${cliFor('status', creds)}\` to see what the daemon knows).`,
  );
}

/** The error for an API key the API refused: names the profile, never the key, and says how to replace it. */
function keyRejected(creds: TokenResult, url: string, rejection: string): QwenCredentialRejectedError {
  const name = creds.profile ?? 'default';
  let origin = url;
  try {
    origin = new URL(url).origin;
  } catch {
    /* keep it as given */
  }
  return new QwenCredentialRejectedError(
    `${origin} rejected the API key of profile "${name}" (${redactKey(rejection, creds.access_token)}; key ${fingerprint(creds.access_token)}). ` +
      'A key works only with the base URL of its own plan and region. ' +
      `Replace the key with \`${qwenToken(`profile add ${name} --replace`)}\` (it reads the new key from standard input or a prompt), ` +
      `or check the base URL with \`${qwenToken(`profile show ${name}`)}\`.`,
  );
}

/**
 * `text` with `key` replaced by its fingerprint, and also any run of the key's first characters
 * (at least `KEY_PREFIX_REDACT_MIN` long) that a server cut short. Apply before cutting the text.
 */
export function redactKey(text: string, key: string, label: 'key' | 'token' = 'key'): string {
  if (key.length === 0) return text;
  const marker = `[${label} ${fingerprint(key)}]`;
  const min = Math.min(KEY_PREFIX_REDACT_MIN, key.length);
  const head = key.slice(0, min);
  let out = text;
  for (let at = out.indexOf(head); at !== -1; at = out.indexOf(head, at + marker.length)) {
    let end = at + min;
    while (end < out.length && end - at < key.length && out[end] === key[end - at]) end++;
    out = out.slice(0, at) + marker + out.slice(end);
  }
  return out;
}

/**
 * Why a response means "this API key is refused", or null: a 401, or a 403 that says the key
 * is invalid. Other 403s (a model or permission the plan lacks, quota, rate) go to the caller as
 * they are: they say nothing about the key's other requests.
 */
async function keyRejection(response: Response, key: string): Promise<string | null> {
  if (response.status !== 401 && response.status !== 403) return null;
  const text = await peekText(response);
  if (response.status === 403 && (QUOTA_TEXT.test(text.slice(0, 4_000)) || !saysKeyInvalid(text))) return null;
  const message = serverMessage(text, key);
  return `HTTP ${response.status}${message ? `: ${message}` : ''}`;
}

function saysKeyInvalid(text: string): boolean {
  return KEY_INVALID_TEXT.test(text.slice(0, 4_000)) || looksLikeTokenRejection(text);
}

/**
 * The server's own short message in an error body (OpenAI or Anthropic shape), printable, without
 * the key, bounded. `plainText`: a body that is not JSON is the message itself (unless it is HTML).
 */
export function serverMessage(text: string, key: string, { plainText = false } = {}): string | undefined {
  let message: unknown;
  try {
    const body = JSON.parse(text) as { error?: unknown; message?: unknown };
    const error = body?.error;
    message = error && typeof error === 'object' ? (error as { message?: unknown }).message : typeof error === 'string' ? error : body?.message;
  } catch {
    message = plainText && !text.trim().startsWith('<') ? text.trim() : undefined;
  }
  if (typeof message !== 'string' || !message.trim()) return undefined;
  // The key comes out before the cut: a cut through the key would leave most of it unmatched.
  return printable(redactKey(printable(message.trim(), Infinity), key), SERVER_MESSAGE_MAX);
}

/**
 * Refuses to send `creds` anywhere but its own profile's origin: a base URL read once for an SDK
 * and a credential looked up per request (the default profile's, which can change) may disagree.
 */
function checkOrigin(url: string, creds: TokenResult, client: TokenClient, pinned: string | undefined): void {
  const target = new URL(url).origin;
  const own = new URL(trustedBaseURL(creds, client)).origin;
  if (target === own) return;
  const name = creds.profile ?? pinned ?? 'default';
  throw new QwenConfigError(
    `createQwenFetch did not send the credential of profile "${name}" to ${printable(target, 200)}: it is for ${printable(own, 200)}. ` +
      (pinned === undefined
        ? `The default profile may have changed since the base URL was read; pin the profile in both places: qwenBaseURL({ profile: '${name}' }) and createQwenFetch({ profile: '${name}' }).`
        : `Use the profile's own base URL: qwenBaseURL({ profile: '${name}' }).`),
  );
}

/** The absolute URL a redirect response points to, or null for any other response. */
function redirectTarget(response: Response, from: string): string | null {
  if (!REDIRECT_STATUSES.has(response.status)) return null;
  const location = response.headers.get('location');
  if (location === null) return null;
  try {
    return new URL(location, from).href;
  } catch {
    return null;
  }
}

/** Forces a refresh for a rejected token, unless the token was replaced meanwhile. */
function renew(client: TokenClient, rejected: string, which: { profile: string } | undefined): Promise<TokenResult> {
  const pending = perClient(renewals, client);
  const known = pending.get(rejected);
  if (known) return known;
  const run = (async () => {
    // Another request (or a refresh the daemon pushed) may already have replaced it.
    const current = await client.getCredentials(which);
    if (current.access_token !== rejected) return current;
    return client.refresh(which);
  })();
  pending.set(rejected, run);
  const forget = (): void => {
    if (pending.get(rejected) === run) pending.delete(rejected);
  };
  run.then(forget, forget);
  return run;
}

/**
 * Describes why a response means "token rejected", or returns null when it does not:
 * any 401, a 403 not about quota or rate (only when `forbiddenCounts`), or Qwen's token message
 * in any error body.
 */
async function tokenRejection(response: Response, forbiddenCounts: boolean): Promise<string | null> {
  if (response.status < 400) return null;
  if (response.status === 401) return 'HTTP 401';
  const text = await peekText(response);
  if (looksLikeTokenRejection(text)) return `HTTP ${response.status}: invalid access token or token expired`;
  if (response.status === 403 && forbiddenCounts && !QUOTA_TEXT.test(text.slice(0, 4_000))) return 'HTTP 403';
  return null;
}

function looksLikeTokenRejection(text: string): boolean {
  if (!text) return false;
  try {
    const body = JSON.parse(text) as { error?: { code?: unknown; message?: unknown } | unknown };
    const error = body?.error;
    if (error && typeof error === 'object') {
      const { code, message } = error as { code?: unknown; message?: unknown };
      if (code === 'invalid_api_key') return true;
      if (typeof message === 'string' && TOKEN_REJECTED_TEXT.test(message)) return true;
    }
  } catch {
    /* not JSON: fall through to the text test */
  }
  return TOKEN_REJECTED_TEXT.test(text.slice(0, 2_000));
}

/** Reads the start of a response body from a clone, leaving the original unread for the caller. */
async function peekText(response: Response): Promise<string> {
  const body = response.clone().body;
  if (!body) return '';
  const reader = body.getReader();
  const chunks: Uint8Array[] = [];
  let size = 0;
  try {
    while (size < PEEK_LIMIT_BYTES) {
      const { done, value } = await reader.read();
      if (done) break;
      chunks.push(value);
      size += value.byteLength;
    }
  } catch {
    return '';
  } finally {
    reader.cancel().catch(() => undefined);
  }
  return new TextDecoder().decode(Buffer.concat(chunks));
}

/** Drops a response we will not hand out, so its connection is released. */
async function discard(response: Response): Promise<void> {
  try {
    await response.body?.cancel();
  } catch {
    /* already consumed or errored: nothing to release */
  }
}

function isRequest(input: unknown): input is Request {
  return typeof input === 'object' && input !== null && !(input instanceof URL) && 'url' in input && 'method' in input && 'headers' in input;
}

interface BufferedRequest {
  url: string;
  method: string;
  headers: Headers;
  body: Uint8Array | undefined;
  redirect: RequestRedirect;
}

type RequestRedirect = 'error' | 'follow' | 'manual';

/**
 * Normalises `fetch`'s arguments and reads the body into memory once, so the retry can send
 * it again. Stream bodies are buffered too (the whole body is held in memory for the request's
 * lifetime): chat requests are small JSON, and a stream cannot be replayed otherwise.
 */
async function bufferRequest(input: string | URL | Request, init: RequestInit | undefined, signal: AbortSignal | undefined): Promise<BufferedRequest> {
  let effectiveInit = init;
  const rawBody: unknown = init?.body;
  if (isStreamBody(rawBody)) {
    const bytes = await abortable(collect(rawBody), signal);
    effectiveInit = { ...init, body: bytes };
  }
  // The Request constructor does the spec's work: merging a Request input with init, and
  // serialising strings, URLSearchParams, Blob and FormData with the right Content-Type.
  const request = new Request(input, effectiveInit);
  const body = request.body === null ? undefined : new Uint8Array(await abortable(request.arrayBuffer(), signal));
  return { url: request.url, method: request.method, headers: new Headers(request.headers), body, redirect: request.redirect };
}

function isStreamBody(body: unknown): body is ReadableStream<Uint8Array> | AsyncIterable<Uint8Array | string> {
  if (typeof body !== 'object' || body === null) return false;
  if (typeof (body as { getReader?: unknown }).getReader === 'function') return true;
  return Symbol.asyncIterator in body && !(body instanceof Blob);
}

async function collect(body: ReadableStream<Uint8Array> | AsyncIterable<Uint8Array | string>): Promise<Uint8Array> {
  const chunks: Buffer[] = [];
  // Node's web ReadableStream is async-iterable; other implementations expose getReader only.
  if (typeof (body as { getReader?: unknown }).getReader === 'function' && !(Symbol.asyncIterator in body)) {
    const reader = (body as ReadableStream<Uint8Array>).getReader();
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      chunks.push(Buffer.from(value));
    }
  } else {
    for await (const chunk of body as AsyncIterable<Uint8Array | string>) {
      chunks.push(typeof chunk === 'string' ? Buffer.from(chunk, 'utf8') : Buffer.from(chunk));
    }
  }
  return new Uint8Array(Buffer.concat(chunks));
}

/** Waits for `promise`, but rejects with the signal's reason as soon as it aborts. */
export function abortable<T>(promise: Promise<T>, signal: AbortSignal | undefined): Promise<T> {
  if (!signal) return promise;
  if (signal.aborted) {
    promise.catch(() => undefined);
    return Promise.reject(signal.reason);
  }
  return new Promise<T>((resolve, reject) => {
    const onAbort = (): void => reject(signal.reason);
    signal.addEventListener('abort', onAbort, { once: true });
    promise.then(
      (value) => {
        signal.removeEventListener('abort', onAbort);
        resolve(value);
      },
      (err: unknown) => {
        signal.removeEventListener('abort', onAbort);
        reject(err);
      },
    );
  });
}
