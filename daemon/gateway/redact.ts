/**
 * Keeps the profile's credential out of upstream answers. An API that rejects a key often
 * quotes it back ("Incorrect API key provided: sk-…"); relayed as it came, that would hand the
 * key to a client that should only ever hold the gateway key. Error bodies are therefore read
 * (up to a cap), decoded when compressed, and every credential value the gateway sent is
 * replaced by its fingerprint; so are the header values of every answer. A secret is found
 * however it was written: as it is, JSON-escaped (`\/`, `\u002B`) or percent-encoded.
 */
import { brotliDecompressSync, constants, gunzipSync, inflateRawSync, inflateSync } from 'node:zlib';
import { fingerprint } from '../../shared/fingerprint.js';

/** The most of an error body read, decoded and relayed; the rest is cut off. */
export const ERROR_BODY_CAP = 64 * 1024;
/** The most a compressed error body may decode to before it is withheld. */
const DECODED_LIMIT = 4 * ERROR_BODY_CAP;

/** Request headers whose value is a credential (the rest, like Qwen's `X-DashScope-*`, are not secret). */
const CREDENTIAL_HEADERS = new Set(['authorization', 'x-api-key', 'api-key', 'proxy-authorization']);

/** The secret values among the credential headers the gateway sent: keys and tokens, without "Bearer ". */
export function credentialSecrets(credential: Record<string, string>): string[] {
  const secrets: string[] = [];
  for (const name in credential) {
    if (!CREDENTIAL_HEADERS.has(name.toLowerCase())) continue;
    const secret = credential[name]!.replace(/^\s*(?:Bearer|Basic|Token)\s+/i, '').trim();
    // Too short to be a real credential, and replacing it would mangle ordinary text.
    if (secret.length >= 8) secrets.push(secret);
  }
  return secrets;
}

/** How one secret can appear in an answer, worked out once per secret. */
interface SecretSpellings {
  /** The longest run of characters no encoder escapes: every spelling holds it as it is, a cheap first test. */
  anchor: string;
  /** Matches every spelling, escapes mixed included; null when the secret has no character to escape. */
  pattern: RegExp | null;
  /** For each character of the secret, the ways it can be written. */
  chars: string[][];
  /** The longest spelling's length. */
  longest: number;
  bodyMarker: string;
  headerMarker: string;
}

/** Characters no JSON or URL encoder escapes. */
const PLAIN = /^[A-Za-z0-9_-]$/;
const spellingsCache = new Map<string, SecretSpellings>();

/**
 * The ways an ASCII character is written by JSON (`\/`, `\"`, `\\`, `\u00XX`) and URL
 * (`%XX`) encoders, hex digits in either case.
 */
function charSpellings(ch: string): string[] {
  const code = ch.charCodeAt(0);
  if (PLAIN.test(ch) || code > 0x7e) return [ch];
  const upper = code.toString(16).toUpperCase().padStart(2, '0');
  const lower = upper.toLowerCase();
  const out = new Set([ch, `%${upper}`, `%${lower}`, `\\u00${upper}`, `\\u00${lower}`]);
  if (ch === '/' || ch === '"' || ch === '\\') out.add(`\\${ch}`);
  return [...out];
}

function spellingsOf(secret: string): SecretSpellings {
  let found = spellingsCache.get(secret);
  if (found) return found;
  const chars = secret.split('').map(charSpellings);
  let anchor = '';
  let run = '';
  let escapable = false;
  for (let i = 0; i < chars.length; i++) {
    if (chars[i]!.length === 1) {
      run += chars[i]![0];
      if (run.length > anchor.length) anchor = run;
    } else {
      escapable = true;
      run = '';
    }
  }
  const pattern = escapable ? new RegExp(chars.map((c) => (c.length === 1 ? escapeRegExp(c[0]!) : `(?:${c.map(escapeRegExp).join('|')})`)).join(''), 'g') : null;
  const print = fingerprint(secret);
  found = {
    anchor,
    pattern,
    chars,
    longest: chars.reduce((n, c) => n + Math.max(...c.map((s) => s.length)), 0),
    bodyMarker: `[redacted key ${print}]`,
    headerMarker: `[redacted key ${print.replace('…', '...')}]`,
  };
  // Tokens rotate; a small bound keeps old ones from piling up.
  if (spellingsCache.size >= 64) spellingsCache.clear();
  spellingsCache.set(secret, found);
  return found;
}

function escapeRegExp(text: string): string {
  return text.replace(/[\\^$.*+?()[\]{}|/]/g, '\\$&');
}

/** A header value with every occurrence of each secret, in any spelling, replaced by `[redacted key <fingerprint>]`, in ASCII. */
export function redactHeaderValue(value: string, secrets: readonly string[]): string {
  let out = value;
  for (const secret of secrets) {
    const s = spellingsOf(secret);
    if (out.includes(s.anchor)) out = s.pattern ? out.replace(s.pattern, () => s.headerMarker) : out.split(secret).join(s.headerMarker);
  }
  return out;
}

/**
 * Answer fields (`[name, value, ...]`) with each secret replaced in their values, in place.
 * One `includes` per value and secret when none holds it, which is every ordinary answer.
 */
export function redactFieldValues(fields: string[], secrets: readonly string[]): string[] {
  for (let i = 1; i < fields.length; i += 2) fields[i] = redactHeaderValue(fields[i]!, secrets);
  return fields;
}

/** The error body as the client gets it, and whether its Content-Encoding was removed. */
export interface RedactedBody {
  body: Buffer;
  decoded: boolean;
}

/**
 * `raw` (the first `ERROR_BODY_CAP` bytes of an error body, `cut` when there were more) with
 * its credentials replaced. A compressed body (gzip, deflate, br) is decoded and sent decoded;
 * one in an encoding the gateway cannot read is withheld with a note, since it cannot be checked.
 */
export function redactErrorBody(raw: Buffer, contentEncoding: string | undefined, cut: boolean, secrets: readonly string[]): RedactedBody {
  let bytes = raw;
  let decoded = false;
  const codings = (contentEncoding ?? '')
    .split(',')
    .map((c) => c.trim().toLowerCase())
    .filter((c) => c !== '' && c !== 'identity');
  if (codings.length > 0) {
    try {
      // Codings are listed in the order they were applied; undone in reverse.
      for (const coding of codings.reverse()) bytes = decode(bytes, coding);
    } catch (err) {
      const why = err instanceof UnknownCoding ? `it is encoded as "${err.coding}", which the gateway cannot read` : 'it could not be decoded';
      return { body: Buffer.from(`[the gateway withheld this error body: ${why}, so it could not be checked for credentials]`), decoded: true };
    }
    decoded = true;
    if (bytes.length > ERROR_BODY_CAP) {
      bytes = bytes.subarray(0, ERROR_BODY_CAP);
      cut = true;
    }
  }
  // A credential that straddles the cut would leave its first characters at the end.
  if (cut) bytes = withoutSecretPrefixTail(bytes, secrets);
  let body = redactBytes(bytes, secrets);
  if (cut) body = Buffer.concat([body, Buffer.from(`\n[the gateway cut this error body at ${ERROR_BODY_CAP} bytes]`)]);
  return { body, decoded };
}

/** `bytes` with every occurrence of each secret, in any spelling, replaced by `[redacted key <fingerprint>]` (UTF-8). */
function redactBytes(bytes: Buffer, secrets: readonly string[]): Buffer {
  let out = bytes;
  for (const secret of secrets) {
    const s = spellingsOf(secret);
    if (out.indexOf(s.anchor, 0, 'latin1') === -1) continue;
    // Latin-1 maps byte to character one for one, so string offsets are byte offsets.
    const spans: number[] = [];
    if (s.pattern) {
      const text = out.toString('latin1');
      s.pattern.lastIndex = 0;
      for (let m = s.pattern.exec(text); m !== null; m = s.pattern.exec(text)) spans.push(m.index, m.index + m[0].length);
    } else {
      for (let at = out.indexOf(secret, 0, 'latin1'); at !== -1; at = out.indexOf(secret, at + secret.length, 'latin1')) spans.push(at, at + secret.length);
    }
    if (spans.length === 0) continue;
    const marker = Buffer.from(s.bodyMarker, 'utf8');
    const parts: Buffer[] = [];
    let from = 0;
    for (let i = 0; i < spans.length; i += 2) {
      parts.push(out.subarray(from, spans[i]), marker);
      from = spans[i + 1]!;
    }
    parts.push(out.subarray(from));
    out = Buffer.concat(parts);
  }
  return out;
}

class UnknownCoding extends Error {
  constructor(readonly coding: string) {
    super(`unknown content coding ${coding}`);
  }
}

function decode(bytes: Buffer, coding: string): Buffer {
  // Sync flush: a body cut at the cap still yields what it holds.
  const gz = { finishFlush: constants.Z_SYNC_FLUSH, maxOutputLength: DECODED_LIMIT };
  switch (coding) {
    case 'gzip':
    case 'x-gzip':
      return gunzipSync(bytes, gz);
    case 'deflate':
      // "deflate" is zlib-wrapped by the standard; some servers send it raw.
      try {
        return inflateSync(bytes, gz);
      } catch {
        return inflateRawSync(bytes, gz);
      }
    case 'br':
      return brotliDecompressSync(bytes, { finishFlush: constants.BROTLI_OPERATION_FLUSH, maxOutputLength: DECODED_LIMIT });
    default:
      throw new UnknownCoding(coding.slice(0, 40));
  }
}

/** `bytes` without a trailing run that begins some spelling of a secret. */
function withoutSecretPrefixTail(bytes: Buffer, secrets: readonly string[]): Buffer {
  let end = bytes.length;
  for (const secret of secrets) {
    const s = spellingsOf(secret);
    const from = Math.max(0, end - s.longest);
    const text = bytes.toString('latin1', from, end);
    // The earliest start is the longest run.
    for (let at = 0; at < text.length; at++) {
      if (beginsSecret(text, at, s.chars, 0)) {
        end = from + at;
        break;
      }
    }
  }
  return bytes.subarray(0, end);
}

/** Whether `text` from `at` to its end is a proper beginning of some spelling of the secret, from its character `i`. */
function beginsSecret(text: string, at: number, chars: string[][], i: number): boolean {
  if (i === chars.length) return false; // the whole secret: replaced by the redaction itself
  if (at === text.length) return i > 0;
  for (const spelling of chars[i]!) {
    if (text.length - at < spelling.length) {
      if (spelling.startsWith(text.slice(at))) return true;
    } else if (text.startsWith(spelling, at) && beginsSecret(text, at + spelling.length, chars, i + 1)) {
      return true;
    }
  }
  return false;
}
