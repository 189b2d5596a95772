/**
 * LineReader (client/line-reader): lines straight from a socket's reads into one reused buffer.
 * What can go wrong is keeping a view of bytes the next read overwrites, splitting a character,
 * or reading on after a line too long; each case below fails if the reader gets it wrong.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { createConnection, createServer, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { LineReader } from '../client/line-reader.js';

/** Feeds `chunks` to `reader` the way a socket does: each one written into the same buffer. */
function feed(reader: LineReader, chunks: Buffer[]): boolean[] {
  const shared = Buffer.alloc(64);
  return chunks.map((chunk) => {
    shared.fill(0x41); // stale bytes from "earlier reads" after the chunk
    chunk.copy(shared);
    return reader.read(shared, chunk.length);
  });
}

/** A reader that keeps every line it hands on, then calls `then(line, reader)` (which may throw or stop it). */
function collecting(
  maxLineBytes = 1024,
  then: (line: string, reader: LineReader) => void = () => undefined,
): { reader: LineReader; lines: string[]; tooLong: number[] } {
  const reader = new LineReader(maxLineBytes);
  const lines: string[] = [];
  const tooLong: number[] = [];
  reader.onLine = (text, start, end) => {
    const line = text.slice(start, end);
    lines.push(line);
    then(line, reader);
  };
  reader.onTooLong = () => tooLong.push(lines.length);
  return { reader, lines, tooLong };
}

describe('LineReader', () => {
  it('gives each complete line once, whatever the reads cut, and keeps partial lines across reuse of the buffer', () => {
    const { reader, lines } = collecting();
    feed(reader, [Buffer.from('{"a":1}\n{"b"'), Buffer.from(':2}\n{"c":3}\n{"d'), Buffer.from('":'), Buffer.from('4}\n')]);
    expect(lines).toEqual(['{"a":1}', '{"b":2}', '{"c":3}', '{"d":4}']);
  });

  it('decodes a character cut in two by a read as one character', () => {
    const { reader, lines } = collecting();
    const bytes = Buffer.from('{"m":"Grüße, 令牌 🔑"}\n');
    // Cut inside every multi-byte sequence in turn.
    for (let cut = 1; cut < bytes.length - 1; cut++) feed(reader, [bytes.subarray(0, cut), bytes.subarray(cut)]);
    expect(new Set(lines)).toEqual(new Set(['{"m":"Grüße, 令牌 🔑"}']));
    expect(lines).toHaveLength(bytes.length - 2);
  });

  it('decodes the lines of one read in one go, and says where each lies in that text', () => {
    const reader = new LineReader(1024);
    const seen: [string, number, number][] = [];
    reader.onLine = (text, start, end) => seen.push([text, start, end]);
    feed(reader, [Buffer.from('{"a":1}\r\n{"bb":2}\n\n{"c":3}\n{"d')]);
    const text = '{"a":1}\r\n{"bb":2}\n\n{"c":3}\n';
    expect(seen).toEqual([
      [text, 0, 7],
      [text, 9, 17],
      [text, 18, 18],
      [text, 19, 26],
    ]);
  });

  it('a read of lines with characters of several bytes, or an invalid byte, gives each line whole and in order', () => {
    const { reader, lines } = collecting();
    const invalid = Buffer.from('{"x":"?"}\n');
    invalid[6] = 0xff;
    feed(reader, [Buffer.concat([Buffer.from('{"a":1}\n{"m":"Grüße 🔑"}\r\n{"b":2}\n'), invalid, Buffer.from('{"c":3}\n')])]);
    feed(reader, [Buffer.concat([invalid, Buffer.from('{"d":4}\n')])]);
    const replaced = `{"x":"${String.fromCharCode(0xfffd)}"}`;
    expect(lines).toEqual(['{"a":1}', '{"m":"Grüße 🔑"}', '{"b":2}', replaced, '{"c":3}', replaced, '{"d":4}']);
  });

  it('drops a trailing CR and hands blank lines on as empty strings', () => {
    const { reader, lines } = collecting();
    feed(reader, [Buffer.from('{"a":1}\r\n\n{"b":2}\r'), Buffer.from('\n')]);
    expect(lines).toEqual(['{"a":1}', '', '{"b":2}']);
  });

  it('refuses a partial line past the limit once, and reads nothing after it', () => {
    const { reader, lines, tooLong } = collecting(10);
    const results = feed(reader, [Buffer.from('{"ok":1}\n0123'), Buffer.from('456789ab'), Buffer.from('\n{"late":1}\n')]);
    expect(results).toEqual([true, false, false]);
    expect(lines).toEqual(['{"ok":1}']);
    expect(tooLong).toEqual([1]);
  });

  it('hands on the lines after one whose handler threw, then rethrows that error', () => {
    const { reader, lines } = collecting(1024, (line) => {
      if (line === 'bad') throw new Error('listener failed');
    });
    expect(() => feed(reader, [Buffer.from('one\nbad\nthree\nfo')])).toThrow('listener failed');
    expect(lines).toEqual(['one', 'bad', 'three']);
    // The partial line was kept: the next read completes it.
    feed(reader, [Buffer.from('ur\n')]);
    expect(lines).toEqual(['one', 'bad', 'three', 'four']);
  });

  it('refuses a complete line past the limit too, and hands on none of it', () => {
    const { reader, lines, tooLong } = collecting(10);
    expect(feed(reader, [Buffer.from('{"ok":1}\n0123456789abc\n{"late":1}\n')])).toEqual([false]);
    expect(lines).toEqual(['{"ok":1}']);
    expect(tooLong).toEqual([1]);
  });

  it('throws an AggregateError when several line handlers threw in one read', () => {
    const reader = new LineReader(1024);
    reader.onLine = (text, start, end) => {
      throw new Error(`failed on ${text.slice(start, end)}`);
    };
    let caught: unknown;
    try {
      feed(reader, [Buffer.from('a\nb\n')]);
    } catch (err) {
      caught = err;
    }
    expect(caught).toBeInstanceOf(AggregateError);
    expect((caught as AggregateError).errors.map((e: Error) => e.message)).toEqual(['failed on a', 'failed on b']);
  });

  it('holds a line sent one byte per read in one buffer, and reads it whole', () => {
    const { reader, lines } = collecting(1024 * 1024);
    const line = JSON.stringify({ pad: 'ü'.repeat(20_000) });
    const bytes = Buffer.from(`${line}\n`);
    const shared = Buffer.alloc(1);
    for (const byte of bytes) {
      shared[0] = byte;
      reader.read(shared, 1);
    }
    expect(lines).toEqual([line]);
  });

  it('stops in the middle of a read when a line handler stops it', () => {
    const { reader, lines } = collecting(1024, (line, r) => {
      if (line === 'stop') r.stop();
    });
    expect(feed(reader, [Buffer.from('one\nstop\nthree\n')])).toEqual([false]);
    expect(lines).toEqual(['one', 'stop']);
  });
});

describe('LineReader on real sockets sharing one read buffer', () => {
  let dir: string;
  let server: Server;
  const accepted: Socket[] = [];

  beforeEach(async () => {
    dir = mkdtempSync(join(tmpdir(), 'qtd-lines-'));
    server = createServer((s) => accepted.push(s));
    await new Promise<void>((done) => server.listen(join(dir, 's.sock'), done));
  });

  afterEach(async () => {
    for (const s of accepted.splice(0)) s.destroy();
    await new Promise<void>((done) => server.close(() => done()));
    rmSync(dir, { recursive: true, force: true });
  });

  it('keeps each connection\'s partial lines apart while their reads take turns in the buffer', async () => {
    const clients = Array.from({ length: 3 }, () => {
      const reader = new LineReader(1024 * 1024);
      const lines: string[] = [];
      reader.onLine = (text, start, end) => lines.push(text.slice(start, end));
      const socket = createConnection({ path: join(dir, 's.sock'), onread: reader.onread });
      return { lines, socket, connected: new Promise((done) => socket.once('connect', done)) };
    });
    await Promise.all(clients.map((c) => c.connected));
    while (accepted.length < clients.length) await new Promise((done) => setTimeout(done, 5));
    // Each server socket sends the same frames, cut at different places, interleaved with the
    // others' pieces, so every read lands in the buffer between another connection's two halves.
    const frames = Array.from({ length: 20 }, (_, n) => JSON.stringify({ n, pad: 'x'.repeat(n * 37) }));
    const wire = Buffer.from(frames.map((f) => `${f}\n`).join(''));
    const pieces = accepted.map((_, k) => {
      const size = 97 + k * 37;
      const out: Buffer[] = [];
      for (let at = 0; at < wire.length; at += size) out.push(wire.subarray(at, at + size));
      return out;
    });
    for (let j = 0; j < Math.max(...pieces.map((p) => p.length)); j++) {
      for (const [k, s] of accepted.entries()) if (pieces[k]![j]) s.write(pieces[k]![j]!);
      await new Promise((done) => setTimeout(done, 1));
    }
    for (const s of accepted) s.end();
    await Promise.all(clients.map((c) => new Promise((done) => c.socket.once('end', done))));
    for (const c of clients) expect(c.lines).toEqual(frames);
    for (const c of clients) c.socket.destroy();
  });
});
