/**
 * A drop-in `fetch` for Qwen's OpenAI-compatible chat API that always carries the daemon's
 * current token, and survives one token rejection by forcing a refresh and retrying.
 *
 *   const openai = new OpenAI({ apiKey: 'qwen-oauth', baseURL: await qwenBaseURL(), fetch: createQwenFetch() });
 */
import { TokenClient } from './token-client.js';
import { QwenDaemonUnavailableError, QwenError, QwenTokenExpiredError } from '../shared/errors.js';
import { fingerprint } from '../shared/fingerprint.js';
import type { TokenResult } from '../shared/protocol.js';
import { packageVersion } from '../shared/package.js';
import { DEFAULT_CHAT_BASE_URL } from '../shared/credentials.js';
import { checkChatBaseUrl, printable } from '../shared/url-trust.js';

/** A function with `fetch`'s signature (what the `openai` SDK and most HTTP SDKs accept). */
export type QwenFetch = (input: string | URL | Request, init?: RequestInit) => Promise<Response>;

export interface QwenFetchOptions {
  /** Daemon client to take tokens from (default: the shared `TokenClient.getInstance()`). */
  client?: TokenClient;
  /** Extra headers for every request; they override the request's own and the Qwen identity headers (not `Authorization`). */
  headers?: Record<string, string>;
  /** Sent as both `User-Agent` and `X-DashScope-UserAgent` (default `qwen-tokend/<version> (node <ver>; <platform>; <arch>)`). */
  userAgent?: string;
  /** The transport underneath (default: the global `fetch`). */
  fetch?: QwenFetch;
}

/** Qwen's chat API answer to an expired, revoked or unknown access token. */
const TOKEN_REJECTED_TEXT = /invalid access token|token expired/i;
/** Error bodies are read only this far to look for the token-rejection message. */
const PEEK_LIMIT_BYTES = 64 * 1024;

/** The default `User-Agent` / `X-DashScope-UserAgent` value. */
export function defaultUserAgent(): string {
  return `qwen-tokend/${packageVersion()} (node ${process.versions.node}; ${process.platform}; ${process.arch})`;
}

/** The chat API's OpenAI-compatible base URL for the current login (e.g. `https://portal.qwen.ai/v1`). */
export async function qwenBaseURL(client?: TokenClient): Promise<string> {
  const c = client ?? TokenClient.getInstance();
  return trustedBaseURL((await c.getCredentials()).base_url, c);
}

/** Base URLs already reported as refused, so each is reported once per process. */
const refusedBaseURLs = new Set<string>();

/**
 * The daemon checks `base_url` where it comes in; the client checks it again where the token is
 * about to follow it (a stand-in daemon, or one with an older configuration, may send any URL):
 * https to a trusted host, by this process's own settings. A refused one gives the default.
 */
function trustedBaseURL(base: string, client: TokenClient): string {
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
 * Tokens the chat API rejected right after a forced refresh. Using one again skips the
 * refresh (and fails after one attempt), so a service that refuses every token cannot turn
 * each request into a refresh, and SDK retries stay cheap.
 */
const rejectedAfterRefresh = new WeakMap<TokenClient, string>();

/** One renewal per client and rejected token: concurrent 401s share it. */
const renewals = new WeakMap<TokenClient, { rejected: string; run: Promise<TokenResult> }>();

/** Returns a `fetch` that authenticates every request with the daemon's token; see the module doc. */
export function createQwenFetch(options: QwenFetchOptions = {}): QwenFetch {
  const transport: QwenFetch = options.fetch ?? ((input, init) => globalThis.fetch(input, init));
  const userAgent = options.userAgent ?? defaultUserAgent();
  const extraHeaders = options.headers ?? {};

  return async function qwenFetch(input, init) {
    // Resolved per request so a `TokenClient.shutdown()` between requests is harmless.
    const client = options.client ?? TokenClient.getInstance();
    const signal = init?.signal ?? (isRequest(input) ? input.signal : undefined) ?? undefined;
    signal?.throwIfAborted();
    const request = await bufferRequest(input, init, signal);

    const send = (token: string): Promise<Response> => {
      const headers = new Headers(request.headers);
      headers.set('User-Agent', userAgent);
      headers.set('X-DashScope-UserAgent', userAgent);
      headers.set('X-DashScope-AuthType', 'qwen-oauth');
      headers.set('X-DashScope-CacheControl', 'enable');
      for (const [name, value] of Object.entries(extraHeaders)) headers.set(name, value);
      headers.set('Authorization', `Bearer ${token}`);
      return transport(request.url, {
        ...init,
        method: request.method,
        headers,
        body: request.body ?? null,
        redirect: request.redirect,
        ...(signal ? { signal } : {}),
      });
    };

    const first = (await abortable(client.getCredentials(), signal)).access_token;
    const response = await send(first);
    const rejection = await tokenRejection(response, true);
    if (rejection === null) {
      if (rejectedAfterRefresh.get(client) === first) rejectedAfterRefresh.delete(client);
      return response;
    }
    await discard(response);
    if (rejectedAfterRefresh.get(client) === first) throw expiredAfterRefresh(rejection);

    let renewed: TokenResult;
    try {
      renewed = await abortable(renew(client, first), signal);
    } catch (err) {
      if (err instanceof QwenDaemonUnavailableError || !(err instanceof QwenError)) throw err;
      throw new QwenTokenExpiredError(
        `Qwen's chat API rejected the access token (${rejection}) and refreshing it failed: ${err.message}`,
        { cause: err },
      );
    }
    const retried = await send(renewed.access_token);
    // A 403 that a fresh token did not cure is about permissions, not the token: the caller gets it.
    const again = await tokenRejection(retried, false);
    if (again === null) return retried;
    await discard(retried);
    rejectedAfterRefresh.set(client, renewed.access_token);
    throw expiredAfterRefresh(again, renewed.access_token);
  };
}

function expiredAfterRefresh(rejection: string, token?: string): QwenTokenExpiredError {
  const which = token ? ` (token ${fingerprint(token)})` : '';
  return new QwenTokenExpiredError(
    `Qwen's chat API rejected the access token${which} even after a forced refresh (${rejection}). ` +
      'The login was probably revoked, or Qwen no longer accepts this OAuth account: run `qwen-token login` ' +
      '(and `qwen-token status` to see what the daemon knows).',
  );
}

/** Forces a refresh for a rejected token, unless the token was replaced meanwhile. */
function renew(client: TokenClient, rejected: string): Promise<TokenResult> {
  const pending = renewals.get(client);
  if (pending && pending.rejected === rejected) return pending.run;
  const run = (async () => {
    // Another request (or a refresh the daemon pushed) may already have replaced it.
    const current = await client.getCredentials();
    if (current.access_token !== rejected) return current;
    return client.refresh();
  })();
  const entry = { rejected, run };
  renewals.set(client, entry);
  const forget = (): void => {
    if (renewals.get(client) === entry) renewals.delete(client);
  };
  run.then(forget, forget);
  return run;
}

/**
 * Describes why a response means "token rejected", or returns null when it does not:
 * any 401, a 403 (only when `forbiddenCounts`), or Qwen's token message in any error body.
 */
async function tokenRejection(response: Response, forbiddenCounts: boolean): Promise<string | null> {
  if (response.status < 400) return null;
  if (response.status === 401) return 'HTTP 401';
  const text = await peekText(response);
  if (looksLikeTokenRejection(text)) return `HTTP ${response.status}: invalid access token or token expired`;
  if (response.status === 403 && forbiddenCounts) return 'HTTP 403';
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
