/**
 * The HTTP/1.1 response side of the gateway's upstream client, without sockets: the response
 * head, how its body is framed (RFC 9112 §6.3), and a chunked-body scanner that hands on
 * either the decoded data or the chunk-framed bytes as they came, so a streamed answer can
 * be relayed without being decoded and framed again. Every rule is a table test.
 */

/** A response the gateway cannot read; the exchange fails as if the upstream were unreachable. */
export class UpstreamProtocolError extends Error {}

/** How a response body ends. */
export type BodyFraming = 'none' | 'length' | 'chunked' | 'close';

export interface ResponseHead {
  status: number;
  /** Header fields as received, names lower-cased: `[name, value, name, value, ...]`. */
  fields: string[];
  /** Bytes of the head, through its empty line. */
  size: number;
}

const TOKEN = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/;
const STATUS_LINE = /^HTTP\/1\.[01] ([1-9]\d\d)(?: [^\r\n]*)?$/;
// A field value may hold visible characters, obs-text, spaces and tabs; never NUL or a bare CR.
const FIELD_VALUE = /^[\t\x20-\x7e\x80-\xff]*$/;

/**
 * Parses a response head at the start of `buf`. Null when the head is not complete yet;
 * throws `UpstreamProtocolError` when it is malformed or larger than `maxBytes`.
 */
export function parseResponseHead(buf: Buffer, maxBytes: number): ResponseHead | null {
  const end = buf.indexOf('\r\n\r\n');
  if (end === -1) {
    if (buf.length > maxBytes) throw new UpstreamProtocolError(`the upstream's response head is larger than ${maxBytes} bytes`);
    return null;
  }
  if (end + 4 > maxBytes) throw new UpstreamProtocolError(`the upstream's response head is larger than ${maxBytes} bytes`);
  const lines = buf.toString('latin1', 0, end).split('\r\n');
  const status = STATUS_LINE.exec(lines[0]!);
  if (!status) throw new UpstreamProtocolError('the upstream did not answer with an HTTP/1.1 status line');
  const fields: string[] = [];
  for (let i = 1; i < lines.length; i++) {
    const line = lines[i]!;
    const colon = line.indexOf(':');
    const name = colon > 0 ? line.slice(0, colon) : '';
    // obs-fold (a line starting with white space) and names with spaces are refused (RFC 9112 §5).
    if (!TOKEN.test(name)) throw new UpstreamProtocolError('the upstream sent a malformed header field');
    const value = line.slice(colon + 1).replace(/^[ \t]+|[ \t]+$/g, '');
    if (!FIELD_VALUE.test(value)) throw new UpstreamProtocolError('the upstream sent a malformed header field');
    fields.push(name.toLowerCase(), value);
  }
  return { status: Number(status[1]), fields, size: end + 4 };
}

/** The value of field `name` (lower-case); several are joined with ", ". */
export function fieldValue(fields: string[], name: string): string | undefined {
  let value: string | undefined;
  for (let i = 0; i < fields.length; i += 2) {
    if (fields[i] === name) value = value === undefined ? fields[i + 1] : `${value}, ${fields[i + 1]}`;
  }
  return value;
}

export interface Framing {
  framing: BodyFraming;
  /** The body's length when framed by Content-Length. */
  length: number;
  /** The connection can carry another request once this body is read. */
  reusable: boolean;
}

/** How the body of a response to `method` with `head` is framed (RFC 9112 §6.3). */
export function bodyFraming(method: string, head: ResponseHead): Framing {
  const connection = fieldValue(head.fields, 'connection')?.toLowerCase() ?? '';
  let reusable = !/(^|,)\s*close\s*(,|$)/.test(connection);
  if (method === 'HEAD' || head.status === 204 || head.status === 304 || head.status < 200) {
    return { framing: 'none', length: 0, reusable };
  }
  const te = fieldValue(head.fields, 'transfer-encoding');
  const cl = fieldValue(head.fields, 'content-length');
  if (te !== undefined) {
    // With both, Transfer-Encoding wins and the connection must not be reused (§6.3 item 3).
    if (cl !== undefined) reusable = false;
    const codings = te.toLowerCase().split(',').map((c) => c.trim());
    if (codings[codings.length - 1] === 'chunked') return { framing: 'chunked', length: 0, reusable };
    return { framing: 'close', length: 0, reusable: false };
  }
  if (cl !== undefined) {
    const values = cl.split(',').map((v) => v.trim());
    if (!values.every((v) => /^\d{1,15}$/.test(v) && v === values[0])) throw new UpstreamProtocolError('the upstream sent an invalid Content-Length');
    return { framing: 'length', length: Number(values[0]), reusable };
  }
  return { framing: 'close', length: 0, reusable: false };
}

/** Longest chunk-size line (with extensions) and trailer section accepted. */
const MAX_SIZE_LINE = 4096;
const MAX_TRAILERS = 64 * 1024;
/** Hex digits of a chunk size: up to 2^52, the largest length a number holds exactly. */
const MAX_SIZE_DIGITS = 13;

const enum ChunkState {
  /** The hex digits of a chunk-size line. */
  Size,
  /** White space or extensions after the size, up to CR. */
  SizeRest,
  SizeLf,
  Data,
  DataCr,
  DataLf,
  Trailers,
  Done,
}

function hexValue(c: number): number {
  if (c >= 48 && c <= 57) return c - 48;
  if (c >= 97 && c <= 102) return c - 87;
  if (c >= 65 && c <= 70) return c - 55;
  return -1;
}

function malformed(): UpstreamProtocolError {
  return new UpstreamProtocolError('the upstream sent a malformed chunked body');
}

/**
 * Reads a chunked body as it arrives. In `framed` mode it passes on the bytes as they came,
 * chunk sizes included, up to (not including) the last chunk, so the receiver can write them
 * to a client that is itself sent a chunked body; in decoded mode it passes on the data only.
 * Trailer fields are read and dropped in both modes. Byte by byte through the framing: this
 * runs for every streamed event.
 */
export class ChunkedScanner {
  private state = ChunkState.Size;
  private size = 0;
  private digits = 0;
  private lineBytes = 0;
  /** framed mode: the start of a size line that came in an earlier read, not passed on yet. */
  private held: Buffer[] = [];
  private trailerLine = '';
  private trailerBytes = 0;
  /** Data bytes read so far, framing not counted. */
  dataBytes = 0;

  constructor(
    private readonly framed: boolean,
    private readonly emit: (bytes: Buffer) => void,
  ) {}

  get done(): boolean {
    return this.state === ChunkState.Done;
  }

  /**
   * Consumes `buf`; returns how many of its bytes belonged to the body (all of them until
   * the body ends). Throws `UpstreamProtocolError` on malformed framing.
   */
  feed(buf: Buffer): number {
    const n = buf.length;
    let i = 0;
    // framed mode: the start of the bytes not passed on yet, and of the size line being read.
    let from = 0;
    let lineStart = this.state === ChunkState.Size && this.digits === 0 ? 0 : -1;
    while (i < n) {
      switch (this.state) {
        case ChunkState.Size: {
          if (this.digits === 0) lineStart = i;
          const v = hexValue(buf[i]!);
          if (v === -1) {
            if (this.digits === 0) throw malformed();
            this.state = ChunkState.SizeRest;
            break;
          }
          if (++this.digits > MAX_SIZE_DIGITS) throw malformed();
          this.size = this.size * 16 + v;
          this.lineBytes += 1;
          i += 1;
          break;
        }
        case ChunkState.SizeRest: {
          const c = buf[i]!;
          if (c === 13) this.state = ChunkState.SizeLf;
          // Extensions (`;name=value`) and white space before them: visible characters, SP, HTAB.
          else if (c !== 9 && (c < 32 || c > 126)) throw malformed();
          if (++this.lineBytes > MAX_SIZE_LINE) throw malformed();
          i += 1;
          break;
        }
        case ChunkState.SizeLf: {
          if (buf[i] !== 10) throw malformed();
          i += 1;
          const start = lineStart === -1 ? 0 : lineStart;
          if (this.size === 0) {
            // The last chunk: what came before it is passed on; the receiver ends the body itself.
            if (this.framed && from < start) this.emit(buf.subarray(from, start));
            this.held = [];
            this.state = ChunkState.Trailers;
            from = i;
          } else {
            if (this.framed && this.held.length > 0) {
              // The start of this size line came in an earlier read and was held back.
              if (from < start) this.emit(buf.subarray(from, start));
              for (const bytes of this.held) this.emit(bytes);
              this.held = [];
              from = start;
            }
            this.state = ChunkState.Data;
          }
          this.digits = 0;
          this.lineBytes = 0;
          lineStart = -1;
          break;
        }
        case ChunkState.Data: {
          const take = Math.min(this.size, n - i);
          if (!this.framed) this.emit(buf.subarray(i, i + take));
          this.size -= take;
          this.dataBytes += take;
          i += take;
          if (this.size === 0) this.state = ChunkState.DataCr;
          break;
        }
        case ChunkState.DataCr:
          if (buf[i] !== 13) throw malformed();
          i += 1;
          this.state = ChunkState.DataLf;
          break;
        case ChunkState.DataLf:
          if (buf[i] !== 10) throw malformed();
          i += 1;
          this.state = ChunkState.Size;
          break;
        case ChunkState.Trailers: {
          const nl = buf.indexOf(10, i);
          const end = nl === -1 ? n : nl + 1;
          this.trailerBytes += end - i;
          if (this.trailerBytes > MAX_TRAILERS) throw malformed();
          this.trailerLine += buf.toString('latin1', i, end);
          i = end;
          from = end;
          if (nl === -1) break;
          const line = this.trailerLine;
          this.trailerLine = '';
          if (!line.endsWith('\r\n')) throw malformed();
          if (line === '\r\n') {
            this.state = ChunkState.Done;
            return i;
          }
          break;
        }
        case ChunkState.Done:
          return i;
      }
    }
    if (this.framed && this.state !== ChunkState.Trailers) {
      // A size line cut by the end of this read waits for the rest: it may be the last chunk.
      const inLine = this.state === ChunkState.SizeRest || this.state === ChunkState.SizeLf || (this.state === ChunkState.Size && this.digits > 0);
      // (-1: the line began in an earlier read and all of this one belongs to it.)
      const until = !inLine ? n : lineStart === -1 ? 0 : lineStart;
      if (from < until) this.emit(buf.subarray(from, until));
      if (inLine) this.held.push(Buffer.from(buf.subarray(until, n)));
    }
    return i;
  }
}
