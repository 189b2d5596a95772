/**
 * Keeps the profile's credential out of upstream error answers. An API that rejects a key often
 * quotes it back ("Incorrect API key provided: sk-…"); relayed as it came, that would hand the
 * key to a client that should only ever hold the gateway key. Error bodies are therefore read
 * (up to a cap), decoded when compressed, and every credential value the gateway sent is
 * replaced by its fingerprint.
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
  for (const [name, value] of Object.entries(credential)) {
    if (!CREDENTIAL_HEADERS.has(name.toLowerCase())) continue;
    const secret = value.replace(/^\s*(?:Bearer|Basic|Token)\s+/i, '').trim();
    // Too short to be a real credential, and replacing it would mangle ordinary text.
    if (secret.length >= 8) secrets.push(secret);
  }
  return secrets;
}

/** A header value with every occurrence of each secret replaced by `[redacted key <fingerprint>]`, in ASCII. */
export function redactHeaderValue(value: string, secrets: readonly string[]): string {
  let out = value;
  for (const secret of secrets) if (out.includes(secret)) out = out.split(secret).join(`[redacted key ${fingerprint(secret).replace('…', '...')}]`);
  return out;
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

/** `bytes` with every occurrence of each secret replaced by `[redacted key <fingerprint>]` (UTF-8). */
function redactBytes(bytes: Buffer, secrets: readonly string[]): Buffer {
  let out = bytes;
  for (const secret of secrets) {
    let at = out.indexOf(secret, 0, 'latin1');
    if (at === -1) continue;
    const marker = Buffer.from(`[redacted key ${fingerprint(secret)}]`, 'utf8');
    const parts: Buffer[] = [];
    let from = 0;
    while (at !== -1) {
      parts.push(out.subarray(from, at), marker);
      from = at + secret.length;
      at = out.indexOf(secret, from, 'latin1');
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

/** `bytes` without a trailing run that begins some secret. */
function withoutSecretPrefixTail(bytes: Buffer, secrets: readonly string[]): Buffer {
  let end = bytes.length;
  for (const secret of secrets) {
    const s = Buffer.from(secret, 'latin1');
    for (let k = Math.min(s.length - 1, end); k > 0; k--) {
      if (bytes.subarray(end - k, end).equals(s.subarray(0, k))) {
        end -= k;
        break;
      }
    }
  }
  return bytes.subarray(0, end);
}
