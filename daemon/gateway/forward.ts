/**
 * What a forwarded request carries each way: the client's header fields minus hop-by-hop ones
 * and its own credentials, plus the profile's credential; the upstream's answer fields minus
 * hop-by-hop ones. Fields are flat `[name, value, ...]` lists, as they are read and written.
 */

/** Hop-by-hop headers (RFC 9110 §7.6.1) and those the framing sets itself; never forwarded. */
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

/** A Connection header naming no other header (the common case), which needs no parsing. */
const PLAIN_CONNECTION = /^\s*(?:keep-alive|close)\s*$/i;

/** Headers that carry the client's own credentials (or the gateway key); never sent upstream. */
const CLIENT_CREDENTIALS = new Set(['authorization', 'x-api-key', 'api-key', 'cookie']);

/**
 * The request fields sent upstream, names lower-case: the client's (`rawHeaders`, as node
 * reads them), minus hop-by-hop fields, fields its Connection names and credentials, plus
 * `credential`. Framing (Host, Content-Length, Transfer-Encoding) is added by the sender.
 */
export function upstreamRequestFields(rawHeaders: string[], credential: Record<string, string>): string[] {
  const keys = Object.keys(credential);
  const injected = keys.map((k) => k.toLowerCase());
  let named: Set<string> | null = null;
  let out: string[] = [];
  for (let i = 0; i < rawHeaders.length; i += 2) {
    const name = rawHeaders[i]!.toLowerCase();
    if (name === 'connection' && !PLAIN_CONNECTION.test(rawHeaders[i + 1]!)) named = connectionTokens(named, rawHeaders[i + 1]!);
    if (HOP_BY_HOP.has(name) || CLIENT_CREDENTIALS.has(name) || injected.includes(name)) continue;
    out.push(name, rawHeaders[i + 1]!);
  }
  if (named) out = withoutNamed(out, named);
  for (let i = 0; i < injected.length; i++) {
    const value = credential[keys[i]!]!;
    // A credential comes from the daemon, but a line break in one would start a new header.
    if (/[\r\n\0]/.test(value)) throw new Error(`the credential header ${injected[i]} holds a line break`);
    out.push(injected[i]!, value);
  }
  return out;
}

/**
 * The answer fields sent to the client: the upstream's, minus hop-by-hop fields and those its
 * Connection names. `Content-Length` is kept when `withLength` (the body is relayed as it was framed).
 */
export function clientResponseFields(fields: string[], withLength: boolean): string[] {
  let named: Set<string> | null = null;
  for (let i = 0; i < fields.length; i += 2) {
    if (fields[i] === 'connection' && !PLAIN_CONNECTION.test(fields[i + 1]!)) named = connectionTokens(named, fields[i + 1]!);
  }
  const out: string[] = [];
  for (let i = 0; i < fields.length; i += 2) {
    const name = fields[i]!;
    if (HOP_BY_HOP.has(name) && !(withLength && name === 'content-length')) continue;
    out.push(name, fields[i + 1]!);
  }
  return named ? withoutNamed(out, named) : out;
}

/** `fields` without those named in `named` (a Connection header's tokens). */
function withoutNamed(fields: string[], named: Set<string>): string[] {
  const out: string[] = [];
  for (let i = 0; i < fields.length; i += 2) if (!named.has(fields[i]!)) out.push(fields[i]!, fields[i + 1]!);
  return out;
}

function connectionTokens(into: Set<string> | null, value: string): Set<string> {
  const set = into ?? new Set<string>();
  for (const token of value.split(',')) {
    const t = token.trim().toLowerCase();
    if (t) set.add(t);
  }
  return set;
}

/** Qwen's answer to an expired or revoked access token, whatever the status it comes with. */
export function looksLikeExpiredToken(body: string): boolean {
  return /invalid access token or token expired/i.test(body);
}
