/**
 * The gateway's reading of upstream answers, without sockets: the response head, how the body
 * is framed, and the chunked scanner fed every way a body can be cut into reads.
 */
import { describe, expect, it } from 'vitest';
import { bodyFraming, ChunkedScanner, parseResponseHead, UpstreamProtocolError, type ResponseHead } from '../daemon/gateway/http1.js';

const head = (text: string) => Buffer.from(text, 'latin1');

describe('parseResponseHead', () => {
  it('waits for the empty line, then reads status and fields (names lower-cased, values trimmed, repeats kept)', () => {
    expect(parseResponseHead(head('HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n'), 1024)).toBeNull();
    const text = 'HTTP/1.1 201 Created\r\nContent-Type:  text/plain \r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\nX-Empty:\r\n\r\n';
    const parsed = parseResponseHead(head(`${text}body`), 1024);
    expect(parsed).toEqual({ status: 201, fields: ['content-type', 'text/plain', 'set-cookie', 'a=1', 'set-cookie', 'b=2', 'x-empty', ''], size: text.length });
    expect(parseResponseHead(head('HTTP/1.0 404\r\n\r\n'), 1024)?.status).toBe(404);
  });

  it.each([
    ['not HTTP', 'SSH-2.0-OpenSSH\r\n\r\n'],
    ['a status of two digits', 'HTTP/1.1 20 OK\r\n\r\n'],
    ['HTTP/2 framing', 'HTTP/2 200\r\n\r\n'],
    ['obs-fold', 'HTTP/1.1 200 OK\r\nX-A: 1\r\n  folded\r\n\r\n'],
    ['a space before the colon', 'HTTP/1.1 200 OK\r\nX-A : 1\r\n\r\n'],
    ['a line without a colon', 'HTTP/1.1 200 OK\r\nnonsense\r\n\r\n'],
    ['a NUL in a value', 'HTTP/1.1 200 OK\r\nX-A: a\0b\r\n\r\n'],
  ])('refuses %s', (_name, text) => {
    expect(() => parseResponseHead(head(text), 1024)).toThrow(UpstreamProtocolError);
  });

  it('refuses a head over the limit, complete or not', () => {
    const big = `HTTP/1.1 200 OK\r\nX-Filler: ${'a'.repeat(2000)}\r\n`;
    expect(() => parseResponseHead(head(big), 1024)).toThrow(/larger than 1024/);
    expect(() => parseResponseHead(head(`${big}\r\n`), 1024)).toThrow(/larger than 1024/);
  });
});

describe('bodyFraming (RFC 9112 §6.3)', () => {
  const h = (status: number, fields: string[]): ResponseHead => ({ status, fields, size: 0 });
  it.each([
    ['HEAD', 200, ['content-length', '10'], { framing: 'none', length: 0, reusable: true }],
    ['GET', 204, [], { framing: 'none', length: 0, reusable: true }],
    ['GET', 304, ['content-length', '10'], { framing: 'none', length: 0, reusable: true }],
    ['POST', 200, ['transfer-encoding', 'chunked'], { framing: 'chunked', length: 0, reusable: true }],
    ['POST', 200, ['transfer-encoding', 'gzip, chunked'], { framing: 'chunked', length: 0, reusable: true }],
    ['POST', 200, ['transfer-encoding', 'chunked', 'content-length', '5'], { framing: 'chunked', length: 0, reusable: false }],
    ['POST', 200, ['transfer-encoding', 'gzip'], { framing: 'close', length: 0, reusable: false }],
    ['POST', 200, ['content-length', '42'], { framing: 'length', length: 42, reusable: true }],
    ['POST', 200, ['content-length', '42', 'content-length', '42'], { framing: 'length', length: 42, reusable: true }],
    ['POST', 200, ['content-length', '0', 'connection', 'close'], { framing: 'length', length: 0, reusable: false }],
    ['POST', 200, [], { framing: 'close', length: 0, reusable: false }],
  ])('%s answered %i with %j', (method, status, fields, expected) => {
    expect(bodyFraming(method, h(status, fields))).toEqual(expected);
  });

  it.each([[['content-length', '42', 'content-length', '43']], [['content-length', '-1']], [['content-length', '4 2']], [['content-length', '0x10']]])(
    'refuses Content-Length %j',
    (fields) => {
      expect(() => bodyFraming('GET', h(200, fields))).toThrow(UpstreamProtocolError);
    },
  );
});

describe('ChunkedScanner', () => {
  // Two data chunks (one with an extension), the last chunk, a trailer, then a byte of the next message.
  const body = 'a\r\ndata: one\n\r\n7;ext="x"\r\ndata: 2\r\n0\r\nx-trailer: t\r\n\r\n';
  const wire = Buffer.from(`${body}N`, 'latin1');
  const untilLast = wire.subarray(0, wire.indexOf('0\r\nx-trailer'));

  /** Feeds `pieces` in order; returns what was emitted, the bytes consumed and whether it finished. */
  function run(framed: boolean, pieces: Buffer[]) {
    const out: Buffer[] = [];
    const scanner = new ChunkedScanner(framed, (b) => out.push(Buffer.from(b)));
    let consumed = 0;
    for (const piece of pieces) {
      if (scanner.done) break;
      consumed += scanner.feed(piece);
    }
    return { out: Buffer.concat(out).toString('latin1'), consumed, done: scanner.done, dataBytes: scanner.dataBytes };
  }

  /** Every way to cut the wire bytes in two or three reads, and one byte at a time. */
  function splits(): Buffer[][] {
    const all: Buffer[][] = [[wire], [...wire].map((b) => Buffer.from([b]))];
    for (let i = 1; i < wire.length; i++) {
      all.push([wire.subarray(0, i), wire.subarray(i)]);
      for (let j = i + 1; j < wire.length; j += 3) all.push([wire.subarray(0, i), wire.subarray(i, j), wire.subarray(j)]);
    }
    return all;
  }

  it('decoded: hands on the data only, however the body is cut into reads', () => {
    for (const pieces of splits()) {
      expect(run(false, pieces)).toEqual({ out: 'data: one\ndata: 2', consumed: body.length, done: true, dataBytes: 17 });
    }
  });

  it('framed: hands on the bytes as they came up to the last chunk, never a piece of it, however cut', () => {
    for (const pieces of splits()) {
      expect(run(true, pieces)).toEqual({ out: untilLast.toString('latin1'), consumed: body.length, done: true, dataBytes: 17 });
    }
  });

  it('framed: a size line cut between reads is held back until it is known not to be the last chunk', () => {
    const emitted: string[] = [];
    const scanner = new ChunkedScanner(true, (b) => emitted.push(b.toString('latin1')));
    scanner.feed(Buffer.from('3\r\nabc\r\n1'));
    expect(emitted.join('')).toBe('3\r\nabc\r\n');
    scanner.feed(Buffer.from('0'));
    scanner.feed(Buffer.from('\r\n0123456789abcdef\r\n'));
    expect(emitted.join('')).toBe('3\r\nabc\r\n10\r\n0123456789abcdef\r\n');
    scanner.feed(Buffer.from('0\r'));
    scanner.feed(Buffer.from('\n\r\n'));
    expect(emitted.join('')).toBe('3\r\nabc\r\n10\r\n0123456789abcdef\r\n');
    expect(scanner.done).toBe(true);
  });

  it.each([
    ['a size that is not hex', 'zz\r\n'],
    ['a bare LF after the size', '3\nabc\r\n'],
    ['data longer than its size', '3\r\nabcd\r\n'],
    ['a size of more than 13 hex digits', '10000000000000\r\n'],
    ['a control character in an extension', '3;a\x01\r\nabc\r\n'],
    ['an empty size line', '\r\n'],
  ])('refuses %s', (_name, text) => {
    for (const framed of [false, true]) {
      expect(() => new ChunkedScanner(framed, () => undefined).feed(Buffer.from(text, 'latin1'))).toThrow(UpstreamProtocolError);
    }
  });
});
