/**
 * Frames that repeat the last one with another id skip parsing and validation (shared/repeated-frame):
 * the recognizer must only ever accept a line that parses to the remembered value with its id,
 * and the daemon must answer such frames exactly as it answers the first one.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { createConnection } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { z } from 'zod';
import { IpcServer } from '../daemon/ipc-server.js';
import { rpcMethod } from '../daemon/rpc-dispatcher.js';
import { silentLogger } from '../daemon/logger.js';
import { RepeatedFrame } from '../shared/repeated-frame.js';

const line = (id: unknown, rest = '"method":"getAccessToken","params":{"minValidityMs":60000}') => `{"jsonrpc":"2.0","id":${JSON.stringify(id)},${rest}}`;

/** The id `r` finds in the whole of `line`. */
function idOf(r: RepeatedFrame<unknown>, line: string): number {
  return r.idAt(line, 0, line.length);
}

function remembered(text: string): RepeatedFrame<string> {
  const r = new RepeatedFrame<string>();
  r.remember(text, JSON.parse(text), 'value');
  return r;
}

describe('RepeatedFrame', () => {
  it('recognizes the remembered frame with any other positive integer id, and gives back its value', () => {
    const r = remembered(line(7));
    for (const id of [1, 7, 42, 999_999_999_999_999]) {
      expect(idOf(r, line(id))).toBe(id);
      expect(r.value).toBe('value');
    }
  });

  it('declines whatever does not parse to the remembered value with that id', () => {
    const r = remembered(line(7));
    const declined = [
      line(0), // not an id this client sends
      line(-3),
      line(1.5),
      line('7'),
      line(null),
      '{"jsonrpc":"2.0","id":07,"method":"getAccessToken","params":{"minValidityMs":60000}}', // not JSON
      '{"jsonrpc":"2.0","id":1e3,"method":"getAccessToken","params":{"minValidityMs":60000}}',
      '{"jsonrpc":"2.0","id":1234567890123456,"method":"getAccessToken","params":{"minValidityMs":60000}}', // 16 digits
      line(8, '"method":"getAccessToken","params":{"minValidityMs":60001}'),
      line(8, '"method":"getAccessToken","params":{"minValidityMs":60000},"x":1'),
      ` ${line(8)}`,
      `${line(8)} `,
      '{"jsonrpc":"2.0","id":8 ,"method":"getAccessToken","params":{"minValidityMs":60000}}',
      '{"jsonrpc":"2.0","id":,"method":"getAccessToken","params":{"minValidityMs":60000}}',
      '{"jsonrpc":"2.0","id":8a,"method":"getAccessToken","params":{"minValidityMs":60000}}',
      '',
    ];
    for (const text of declined) expect(idOf(r, text), text).toBe(-1);
  });

  it('remembers only canonical frames: what JSON.stringify gives back, with a positive integer id first after jsonrpc', () => {
    const notCanonical = [
      '{"jsonrpc":"2.0","id":7,"method":"getAccessToken","params":{},"id":9}', // a duplicate key: the last one wins in JSON.parse
      '{"jsonrpc":"2.0","id":7,"method":"getAccessToken","params":{ }}',
      '{"jsonrpc":"2.0","id":7,"method":"get\\u0041ccessToken","params":{}}',
      '{"jsonrpc":"2.0","id":7.0,"method":"getAccessToken","params":{}}',
      '{"id":7,"jsonrpc":"2.0","method":"getAccessToken","params":{}}',
      '{"jsonrpc":"2.0","id":"7","method":"getAccessToken","params":{}}',
      '{"jsonrpc":"2.0","id":0,"method":"getAccessToken","params":{}}',
    ];
    for (const text of notCanonical) {
      const r = remembered(text);
      expect(idOf(r, text.replace('"id":7', '"id":8')), text).toBe(-1);
      expect(idOf(r, text), text).toBe(-1);
    }
  });

  it('whenever it recognizes a line, JSON.parse agrees: same value, that id (randomized)', () => {
    const base = { jsonrpc: '2.0', id: 5, result: { access_token: 'a-token', token_type: 'Bearer', expiry_date: 1_800_000_000_000, base_url: 'https://x/v1' } };
    const r = new RepeatedFrame<unknown>();
    const text = JSON.stringify(base);
    r.remember(text, JSON.parse(text), base.result);
    const alphabet = '0123456789-.e ,:{}"abn';
    let seed = 42;
    const rand = (n: number) => {
      seed = (Math.imul(seed, 1_103_515_245) + 12_345) >>> 0;
      return (seed >>> 8) % n;
    };
    let recognized = 0;
    for (let i = 0; i < 5_000; i++) {
      // Mutate the id region (and now and then the rest) of the remembered line.
      const id = String(rand(10 ** (1 + rand(6))));
      let candidate = `{"jsonrpc":"2.0","id":${id}${text.slice(text.indexOf(',"result"'))}`;
      if (rand(4) === 0) {
        const at = rand(candidate.length);
        candidate = candidate.slice(0, at) + alphabet[rand(alphabet.length)] + candidate.slice(at + rand(2));
      }
      const got = idOf(r, candidate);
      if (got === -1) continue;
      recognized++;
      const parsed = JSON.parse(candidate) as typeof base;
      expect(parsed.id).toBe(got);
      expect(parsed.result).toEqual(base.result);
      expect(Object.keys(parsed)).toEqual(['jsonrpc', 'id', 'result']);
    }
    expect(recognized).toBeGreaterThan(1_000);
  });

  it('does not remember lines over 4 KiB (checking one costs a JSON.stringify)', () => {
    const small = line(7, `"method":"m","params":{"pad":"${'x'.repeat(4000)}"}`);
    const large = line(7, `"method":"m","params":{"pad":"${'x'.repeat(4100)}"}`);
    expect(idOf(remembered(small), small.replace('"id":7', '"id":8'))).toBe(8);
    expect(idOf(remembered(large), large.replace('"id":7', '"id":8'))).toBe(-1);
  });

  it('idAt looks at exactly text[start, end): the frame in place among others, nothing past its ends', () => {
    const r = remembered(line(7));
    const frames = [line(12), line(345), line('x'), line(6)];
    const text = `${frames.join('\n')}\n`;
    const found: number[] = [];
    let start = 0;
    for (let nl = text.indexOf('\n'); nl !== -1; nl = text.indexOf('\n', start)) {
      found.push(r.idAt(text, start, nl));
      start = nl + 1;
    }
    expect(found).toEqual([12, 345, -1, 6]);
    // One character more or less at either end is not the frame.
    const second = text.indexOf(frames[1]!);
    const end = second + frames[1]!.length;
    expect(r.idAt(text, second, end)).toBe(345);
    expect(r.idAt(text, second, end + 1)).toBe(-1);
    expect(r.idAt(text, second, end - 1)).toBe(-1);
    expect(r.idAt(text, second - 1, end)).toBe(-1);
    expect(r.idAt(text, second + 1, end)).toBe(-1);
  });

  it('forget() drops what it remembered', () => {
    const r = remembered(line(7));
    r.forget();
    expect(idOf(r, line(8))).toBe(-1);
  });
});

describe('the daemon socket server and repeated frames', () => {
  let dir: string;
  let server: IpcServer;
  let seen: Array<{ params: unknown; frozen: boolean }>;

  beforeEach(async () => {
    dir = mkdtempSync(join(tmpdir(), 'qwen-tokend-repeat-'));
    seen = [];
    server = new IpcServer({
      socketPath: join(dir, 'run', 'd.sock'),
      logger: silentLogger(),
      methods: {
        take: rpcMethod(z.object({ n: z.number().int().max(100) }).strict(), (params) => {
          seen.push({ params: { ...params }, frozen: Object.isFrozen(params) });
          return { twice: params.n * 2 };
        }),
      },
    });
    await server.listen();
  });

  afterEach(async () => {
    await server.close();
    rmSync(dir, { recursive: true, force: true });
  });

  /** Sends `lines` in one write and collects `count` answers. */
  function exchange(lines: string[], count: number): Promise<Array<{ id: unknown; result?: unknown; error?: { code: number; message: string } }>> {
    return new Promise((resolve, reject) => {
      const socket = createConnection(server.socketPath);
      const answers: Array<{ id: unknown; result?: unknown; error?: { code: number; message: string } }> = [];
      let buf = '';
      socket.setEncoding('utf8');
      socket.on('data', (chunk: string) => {
        buf += chunk;
        for (let nl = buf.indexOf('\n'); nl !== -1; nl = buf.indexOf('\n')) {
          answers.push(JSON.parse(buf.slice(0, nl)));
          buf = buf.slice(nl + 1);
        }
        if (answers.length >= count) {
          socket.destroy();
          resolve(answers);
        }
      });
      socket.on('error', reject);
      socket.write(lines.map((l) => `${l}\n`).join(''));
    });
  }

  it('answers 500 frames that repeat one call, each under its own id, and hands every call frozen params', async () => {
    const lines = Array.from({ length: 500 }, (_, i) => `{"jsonrpc":"2.0","id":${i + 1},"method":"take","params":{"n":21}}`);
    const answers = await exchange(lines, 500);
    expect(answers.map((a) => a.id)).toEqual(lines.map((_, i) => i + 1));
    expect(answers.every((a) => (a.result as { twice: number }).twice === 42)).toBe(true);
    expect(seen).toHaveLength(500);
    expect(seen.every((s) => s.frozen && (s.params as { n: number }).n === 21)).toBe(true);
  });

  it('a frame that differs from the remembered one in anything but its id is checked in full', async () => {
    const answers = await exchange(
      [
        '{"jsonrpc":"2.0","id":1,"method":"take","params":{"n":21}}',
        '{"jsonrpc":"2.0","id":2,"method":"take","params":{"n":21}}',
        '{"jsonrpc":"2.0","id":3,"method":"take","params":{"n":101}}',
        '{"jsonrpc":"2.0","id":4,"method":"take","params":{"n":21,"x":1}}',
        '{"jsonrpc":"2.0","id":05,"method":"take","params":{"n":21}}',
        '{"jsonrpc":"2.0","id":"6","method":"take","params":{"n":21}}',
        '{"jsonrpc":"2.0","id":7,"method":"take","params":{"n":21}}',
      ],
      7,
    );
    expect(answers[0]).toMatchObject({ id: 1, result: { twice: 42 } });
    expect(answers[1]).toMatchObject({ id: 2, result: { twice: 42 } });
    expect(answers[2]).toMatchObject({ id: 3, error: { code: -32602 } });
    expect(answers[2]?.error?.message).toMatch(/invalid params/);
    expect(answers[3]).toMatchObject({ id: 4, error: { code: -32602 } });
    expect(answers[4]).toMatchObject({ id: null, error: { code: -32700 } });
    expect(answers[5]).toMatchObject({ id: '6', result: { twice: 42 } });
    expect(answers[6]).toMatchObject({ id: 7, result: { twice: 42 } });
    expect(seen).toHaveLength(4);
  });
});
