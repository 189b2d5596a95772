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

/** A partial line kept in a buffer larger than this is given back once the line is complete. */
const KEEP_PARTIAL_BUFFER_BYTES = 64 * 1024;

/**
 * Splits a socket's bytes into lines. Lines are split on the byte 0x0A before they are decoded,
 * which is safe in UTF-8: that byte never occurs inside a multi-byte character, so a character
 * cut in two by a read is always decoded whole.
 */
export class LineReader {
  /** The partial line so far: the first `partialBytes` bytes, in one buffer grown by doubling. */
  private partial: Buffer = Buffer.alloc(0);
  private partialBytes = 0;
  private refused = false;
  /**
   * Each complete line, decoded as UTF-8, without its newline (and without a trailing CR): the
   * line is `text.slice(start, end)`. A read's lines are decoded together, so `text` may hold
   * others; looking at a line in place spares making a string of it.
   */
  onLine: (text: string, start: number, end: number) => void = () => undefined;
  /** A line (complete or not) grew past `maxLineBytes`: nothing more is read (the owner closes the socket). */
  onTooLong: () => void = () => undefined;

  constructor(private readonly maxLineBytes: number) {}

  /** The `onread` option for `net.createConnection` that feeds this reader. */
  get onread(): OnReadOpts {
    return { buffer: readBuffer, callback: (bytes, buffer) => this.read(buffer, bytes) };
  }

  /**
   * Consumes `buffer[0, bytes)`, which the caller reuses once this returns. False stops reading.
   * A line handler that throws does not cost the lines after it: they are handled too, and the
   * error is rethrown once the read is consumed (an AggregateError if several threw).
   */
  read(buffer: Uint8Array, bytes: number): boolean {
    if (this.refused) return false;
    const thrown: unknown[] = [];
    const consumed = this.consume(buffer, bytes, thrown);
    if (thrown.length === 1) throw thrown[0];
    if (thrown.length > 1) throw new AggregateError(thrown, `${thrown.length} line handlers threw`);
    return consumed;
  }

  /** Drops what is held and ignores whatever is read after (the socket stays open: close it). */
  stop(): void {
    this.refused = true;
    this.partial = Buffer.alloc(0);
    this.partialBytes = 0;
  }

  private consume(buffer: Uint8Array, bytes: number, thrown: unknown[]): boolean {
    // Only the bytes of this read: the rest of the buffer holds earlier reads.
    const buf = Buffer.from(buffer.buffer, buffer.byteOffset, bytes);
    let start = 0;
    const first = buf.indexOf(10);
    if (first !== -1 && this.partialBytes > 0) {
      // The first newline ends the line whose start came with earlier reads.
      if (this.partialBytes + first > this.maxLineBytes) return this.tooLong();
      this.keep(buf.subarray(0, first));
      const line = decode(this.partial, 0, this.partialBytes);
      this.partialBytes = 0;
      if (this.partial.length > KEEP_PARTIAL_BUFFER_BYTES) this.partial = Buffer.alloc(0);
      if (!this.deliver(line, 0, line.length, thrown)) return false;
      start = first + 1;
    }
    const last = first === -1 ? -1 : buf.lastIndexOf(10);
    if (last >= start) {
      if (!this.lines(buf, start, last + 1, thrown)) return false;
      start = last + 1;
    }
    if (start < bytes) {
      if (this.partialBytes + bytes - start > this.maxLineBytes) return this.tooLong();
      // The read buffer is about to be reused: the partial line is copied out.
      this.keep(buf.subarray(start));
    }
    return true;
  }

  /**
   * Delivers the lines of `buf[from, to)`, which ends with a newline; false when reading stops.
   * They are decoded as one string, and each line is handed over where it lies in it. Offsets in
   * that string are byte offsets when it is as long as its bytes (every byte one character:
   * ASCII, or an invalid byte read as U+FFFD); other text is decoded a line at a time.
   */
  private lines(buf: Buffer, from: number, to: number, thrown: unknown[]): boolean {
    const text = buf.toString('utf8', from, to);
    if (text.length !== to - from) {
      for (let start = from, nl = buf.indexOf(10, from); nl !== -1 && nl < to; start = nl + 1, nl = buf.indexOf(10, start)) {
        if (nl - start > this.maxLineBytes) return this.tooLong();
        const line = decode(buf, start, nl);
        if (!this.deliver(line, 0, line.length, thrown)) return false;
      }
      return true;
    }
    for (let start = 0, nl = text.indexOf('\n'); nl !== -1; start = nl + 1, nl = text.indexOf('\n', start)) {
      if (nl - start > this.maxLineBytes) return this.tooLong();
      const end = nl > start && text.charCodeAt(nl - 1) === 13 ? nl - 1 : nl;
      if (!this.deliver(text, start, end, thrown)) return false;
    }
    return true;
  }

  /** Hands one line to `onLine`, keeping what it throws for later; false when reading stops. */
  private deliver(text: string, start: number, end: number, thrown: unknown[]): boolean {
    try {
      this.onLine(text, start, end);
    } catch (error) {
      thrown.push(error);
    }
    // A line's handler may have closed the connection; what follows is not for anyone.
    return !this.refused;
  }

  private tooLong(): false {
    this.stop();
    this.onTooLong();
    return false;
  }

  /** Appends `bytes` to the partial line, growing its buffer by doubling. */
  private keep(bytes: Buffer): void {
    const needed = this.partialBytes + bytes.length;
    if (needed > this.partial.length) {
      const grown = Buffer.allocUnsafe(Math.max(needed, this.partial.length * 2, 256));
      this.partial.copy(grown, 0, 0, this.partialBytes);
      this.partial = grown;
    }
    bytes.copy(this.partial, this.partialBytes);
    this.partialBytes = needed;
  }
}

/** `bytes[start, end)` as UTF-8, without a trailing CR. */
function decode(bytes: Buffer, start: number, end: number): string {
  return bytes.toString('utf8', start, end > start && bytes[end - 1] === 13 ? end - 1 : end);
}
