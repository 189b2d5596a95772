/**
 * Reads NDJSON lines straight from a socket's reads, without Node's stream machinery.
 *
 * A socket created with `onread` hands each read to a callback in a buffer it reuses, instead
 * of pushing a new Buffer through the Readable stream (which costs a `push`, a `nextTick` and,
 * with an encoding, a StringDecoder per read). For a process that holds many connections and
 * is told the same news on each of them, that machinery was most of the cost of receiving it.
 *
 * All readers share one read buffer: libuv reads one socket at a time and runs its callback
 * before the next read, and the callback copies out what it keeps (a partial line) before it
 * returns, so no read overwrites bytes still in use.
 */
import type { OnReadOpts } from 'node:net';

/** Node's own read size for a stream socket. */
const READ_BUFFER_BYTES = 64 * 1024;

let sharedReadBuffer: Buffer | null = null;

function readBuffer(): Buffer {
  sharedReadBuffer ??= Buffer.allocUnsafe(READ_BUFFER_BYTES);
  return sharedReadBuffer;
}

/**
 * Splits a socket's bytes into lines. Lines are split on the byte 0x0A before they are decoded,
 * which is safe in UTF-8: that byte never occurs inside a multi-byte character, so a character
 * cut in two by a read is always decoded whole.
 */
export class LineReader {
  private parts: Buffer[] = [];
  private partBytes = 0;
  private refused = false;
  /** Each complete line, decoded as UTF-8, without its newline (and without a trailing CR). */
  onLine: (line: string) => void = () => undefined;
  /** A partial line grew past `maxLineBytes`: nothing more is read. */
  onTooLong: () => void = () => undefined;

  constructor(private readonly maxLineBytes: number) {}

  /** The `onread` option for `net.createConnection` that feeds this reader. */
  get onread(): OnReadOpts {
    return { buffer: readBuffer, callback: (bytes, buffer) => this.read(buffer, bytes) };
  }

  /**
   * Consumes `buffer[0, bytes)`, which the caller reuses once this returns. False stops reading.
   * A line handler that throws does not cost the lines after it: they are handled too, and the
   * first exception is rethrown once the read is consumed.
   */
  read(buffer: Uint8Array, bytes: number): boolean {
    if (this.refused) return false;
    const thrown: unknown[] = [];
    const consumed = this.consume(buffer, bytes, thrown);
    if (thrown.length > 0) throw thrown[0];
    return consumed;
  }

  private consume(buffer: Uint8Array, bytes: number, thrown: unknown[]): boolean {
    // Only the bytes of this read: the rest of the buffer holds earlier reads.
    const buf = Buffer.from(buffer.buffer, buffer.byteOffset, bytes);
    let start = 0;
    let nl = buf.indexOf(10);
    while (nl !== -1) {
      let line: string;
      if (this.partBytes > 0) {
        this.parts.push(buf.subarray(start, nl));
        line = this.decode(Buffer.concat(this.parts, this.partBytes + nl - start), 0, this.partBytes + nl - start);
        this.parts = [];
        this.partBytes = 0;
      } else {
        line = this.decode(buf, start, nl);
      }
      try {
        this.onLine(line);
      } catch (error) {
        thrown.push(error);
      }
      // A line's handler may have closed the connection; what follows is not for anyone.
      if (this.refused) return false;
      start = nl + 1;
      nl = buf.indexOf(10, start);
    }
    if (start < bytes) {
      // The buffer is about to be reused: keep a copy of the partial line.
      this.parts.push(Buffer.from(buf.subarray(start)));
      this.partBytes += bytes - start;
      if (this.partBytes > this.maxLineBytes) {
        this.stop();
        this.onTooLong();
        return false;
      }
    }
    return true;
  }

  /** Drops what is held and ignores whatever is read after. */
  stop(): void {
    this.refused = true;
    this.parts = [];
    this.partBytes = 0;
  }

  private decode(buf: Buffer, start: number, end: number): string {
    return buf.toString('utf8', start, end > start && buf[end - 1] === 13 ? end - 1 : end);
  }
}
