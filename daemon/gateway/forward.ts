/**
 * One forwarded request: headers filtered, credential injected, body and answer streamed
 * both ways with back-pressure, one forced refresh and retry for OAuth profiles whose
 * credential the upstream rejected, and upstream failures classified for the gateway.
 */
import { Agent as HttpAgent, request as httpRequest, type IncomingHttpHeaders, type IncomingMessage, type OutgoingHttpHeaders } from 'node:http';
import { Agent as HttpsAgent, request as httpsRequest } from 'node:https';

/** Hop-by-hop headers (RFC 9110 §7.6.1) and those node sets itself; never forwarded. */
const HOP_BY_HOP = new Set([
  'connection',
  'keep-alive',
  'proxy-connection',
  'proxy-authenticate',
  'proxy-authorization',
  'te',
  'trailer',
  'transfer-encoding',
  'upgrade',
  'host',
  'expect',
  'content-length',
  'http2-settings',
]);

/** Headers that carry the client's own credentials (or the gateway key); never sent upstream. */
const CLIENT_CREDENTIALS = new Set(['authorization', 'x-api-key', 'api-key', 'cookie']);

/** The request headers sent upstream: the client's, minus hop-by-hop and credentials, plus `credential`. */
export function upstreamRequestHeaders(
  incoming: IncomingHttpHeaders,
  credential: Record<string, string>,
  contentLength: number | null,
): OutgoingHttpHeaders {
  const named = connectionTokens(incoming.connection);
  const injected = new Set(Object.keys(credential).map((k) => k.toLowerCase()));
  const out: OutgoingHttpHeaders = {};
  for (const [name, value] of Object.entries(incoming)) {
    if (value === undefined || HOP_BY_HOP.has(name) || CLIENT_CREDENTIALS.has(name) || named.has(name) || injected.has(name)) continue;
    out[name] = value;
  }
  for (const [name, value] of Object.entries(credential)) out[name.toLowerCase()] = value;
  if (contentLength !== null) out['content-length'] = contentLength;
  return out;
}

/** The response headers sent to the client: the upstream's, minus hop-by-hop ones. */
export function clientResponseHeaders(incoming: IncomingHttpHeaders): OutgoingHttpHeaders {
  const named = connectionTokens(incoming.connection);
  const out: OutgoingHttpHeaders = {};
  for (const [name, value] of Object.entries(incoming)) {
    if (value === undefined || named.has(name)) continue;
    if (HOP_BY_HOP.has(name) && name !== 'content-length') continue;
    out[name] = value;
  }
  return out;
}

function connectionTokens(value: string | string[] | undefined): Set<string> {
  if (value === undefined) return new Set();
  const text = Array.isArray(value) ? value.join(',') : value;
  return new Set(text.split(',').map((t) => t.trim().toLowerCase()).filter(Boolean));
}

/** Why an upstream exchange failed, as the gateway reports it. */
export class UpstreamFailure extends Error {
  constructor(
    readonly kind: 'unreachable' | 'timeout' | 'aborted',
    message: string,
  ) {
    super(message);
  }
}

/**
 * Lets the gateway cut an exchange when its client goes away. A plain hook rather than an
 * AbortSignal: the signal's event machinery cost every request more than the rest of the
 * forwarding did (see bench/gateway.md).
 */
export class Cancellation {
  cancelled = false;
  private hook: (() => void) | null = null;

  cancel(): void {
    if (this.cancelled) return;
    this.cancelled = true;
    this.hook?.();
  }

  /** Runs `fn` on cancel, at once when already cancelled. One hook: the exchange in flight. */
  onCancel(fn: () => void): void {
    this.hook = fn;
    if (this.cancelled) fn();
  }
}

export interface UpstreamAgents {
  http: HttpAgent;
  https: HttpsAgent;
}

/** Keep-alive agents without a socket cap: concurrency is limited where requests come in. */
export function createUpstreamAgents(): UpstreamAgents {
  return {
    http: new HttpAgent({ keepAlive: true, maxSockets: Infinity, maxFreeSockets: 256 }),
    https: new HttpsAgent({ keepAlive: true, maxSockets: Infinity, maxFreeSockets: 256 }),
  };
}

export interface UpstreamCall {
  url: URL;
  method: string;
  headers: OutgoingHttpHeaders;
  /** A whole body, or a writer that streams it into the request (and ends it). */
  body: Buffer | ((upstream: NodeJS.WritableStream & { destroy(err?: Error): void }) => void);
  timeoutMs: number;
  cancel: Cancellation;
  agents: UpstreamAgents;
}

/** Sends one request; resolves with the response head, rejects with an `UpstreamFailure`. */
export function callUpstream(call: UpstreamCall): Promise<IncomingMessage> {
  return new Promise((resolve, reject) => {
    const isHttps = call.url.protocol === 'https:';
    const send = isHttps ? httpsRequest : httpRequest;
    let settled = false;
    const req = send(call.url, {
      method: call.method,
      headers: call.headers,
      agent: isHttps ? call.agents.https : call.agents.http,
    });
    call.cancel.onCancel(() => req.destroy());
    // Silence between bytes, before the answer or within it, longer than this is a timeout.
    req.setTimeout(call.timeoutMs, () => {
      req.destroy(new UpstreamFailure('timeout', `the upstream sent nothing for ${call.timeoutMs} ms`));
    });
    req.on('error', (err: Error) => {
      if (settled) return;
      settled = true;
      if (err instanceof UpstreamFailure) return reject(err);
      if (call.cancel.cancelled) return reject(new UpstreamFailure('aborted', 'the client went away'));
      const code = (err as NodeJS.ErrnoException).code;
      reject(new UpstreamFailure('unreachable', `the upstream ${call.url.host} could not be reached (${code ?? err.message})`));
    });
    req.on('response', (res) => {
      settled = true;
      resolve(res);
    });
    if (Buffer.isBuffer(call.body)) req.end(call.body);
    else call.body(req);
  });
}

/** Qwen's answer to an expired or revoked access token, whatever the status it comes with. */
export function looksLikeExpiredToken(body: string): boolean {
  return /invalid access token or token expired/i.test(body);
}
