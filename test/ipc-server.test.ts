/**
 * The socket server in-process: how it shares the event loop when one client floods it.
 * Client and server share this process, so everything a client writes is in the kernel before
 * the server reads any of it. With a turn budget of 0 the server yields after every clock
 * check (16 frames), so the order of events does not depend on timing.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { createConnection, Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { z } from 'zod';
import { IpcServer } from '../daemon/ipc-server.js';
import { rpcMethod } from '../daemon/rpc-dispatcher.js';
import { createLogger, silentLogger } from '../daemon/logger.js';
import { QwenTokenExpiredError } from '../shared/errors.js';

let dir: string;
let server: IpcServer;
const sockets: Socket[] = [];
/** What the server handled, in order: `a:<n>` and `b:<n>` per frame, plus marks. */
let handled: string[];

async function startServer(turnBudgetMs?: number, maxFrameBytes?: number): Promise<void> {
  server = new IpcServer({
    socketPath: join(dir, 'run', 'd.sock'),
    logger: silentLogger(),
    turnBudgetMs,
    maxFrameBytes,
    methods: {
      echo: rpcMethod(z.object({ from: z.string(), n: z.number().int(), busyMs: z.number().optional() }).strict(), ({ from, n, busyMs }) => {
        handled.push(`${from}:${n}`);
        if (from === 'a' && n === 1) setImmediate(() => handled.push('immediate'));
        // A frame that takes this long to handle (as cold code does).
        if (busyMs) for (const until = performance.now() + busyMs; performance.now() < until; );
        return { n };
      }),
      subscribe: rpcMethod(z.object({ n: z.number().int() }).strict(), ({ n }, connection) => {
        connection.subscribed = true;
        return { n };
      }),
      // Tells every subscriber while handling the call, before answering it.
      shout: rpcMethod(z.object({ n: z.number().int() }).strict(), ({ n }) => {
        server.broadcast('shouted', { n });
        return { n };
      }),
      later: rpcMethod(z.object({ n: z.number().int() }).strict(), async ({ n }) => {
        await new Promise((r) => setTimeout(r, 20));
        return { n };
      }),
    },
  });
  await server.listen();
}

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'qwen-tokend-ipc-'));
  handled = [];
});

afterEach(async () => {
  for (const s of sockets.splice(0)) s.destroy();
  await server.close();
  rmSync(dir, { recursive: true, force: true });
});

/** A connection that collects the `result.n` of every answer, and calls `onAnswer` after each. */
function connect(onAnswer: () => void = () => undefined, allowHalfOpen = false): Promise<{ socket: Socket; answers: number[] }> {
  return new Promise((resolve, reject) => {
    const socket = createConnection({ path: server.socketPath, allowHalfOpen });
    sockets.push(socket);
    const answers: number[] = [];
    let buf = '';
    socket.setEncoding('utf8');
    socket.on('data', (chunk: string) => {
      buf += chunk;
      let nl = buf.indexOf('\n');
      while (nl !== -1) {
        answers.push((JSON.parse(buf.slice(0, nl)) as { result: { n: number } }).result.n);
        buf = buf.slice(nl + 1);
        onAnswer();
        nl = buf.indexOf('\n');
      }
    });
    socket.once('connect', () => resolve({ socket, answers }));
    socket.once('error', reject);
  });
}

/** A connection that keeps everything the server sends, as text. */
async function rawClient(): Promise<{ socket: Socket; received: () => string }> {
  const socket = createConnection(server.socketPath);
  sockets.push(socket);
  await new Promise((done) => socket.once('connect', done));
  let text = '';
  socket.setEncoding('utf8');
  socket.on('data', (chunk: string) => (text += chunk));
  return { socket, received: () => text };
}

function frames(from: string, count: number, busyMs?: number): string {
  let out = '';
  for (let n = 1; n <= count; n++) out += `${JSON.stringify({ jsonrpc: '2.0', id: n, method: 'echo', params: { from, n, busyMs } })}\n`;
  return out;
}

async function until(check: () => boolean): Promise<void> {
  for (let i = 0; i < 2_000 && !check(); i++) await new Promise((r) => setTimeout(r, 5));
  expect(check()).toBe(true);
}

describe('IpcServer under a flood of frames', () => {
  const BURST = 3_000;

  it('yields to the event loop part-way through one connection\'s burst, and still answers every frame in order', async () => {
    await startServer(0);
    const a = await connect();
    a.socket.write(frames('a', BURST));
    await until(() => a.answers.length === BURST);
    expect(a.answers).toEqual(Array.from({ length: BURST }, (_, i) => i + 1));
    expect(handled.filter((h) => h.startsWith('a:'))).toHaveLength(BURST);
    // Work queued by the first frame (here a setImmediate; in the daemon, the refresh's file
    // read and HTTP call) ran long before the burst was through, not after it.
    const ranAfter = handled.indexOf('immediate');
    expect(ranAfter).toBeGreaterThan(0);
    expect(ranAfter).toBeLessThan(BURST / 10);
  });

  it('with the default budget, frames that take 0.5 ms each do not keep the event loop for the whole burst', async () => {
    await startServer();
    const a = await connect();
    a.socket.write(frames('a', 200, 0.5));
    await until(() => a.answers.length === 200);
    expect(a.answers).toEqual(Array.from({ length: 200 }, (_, i) => i + 1));
    // 100 ms of handling in all; the loop got a turn after about 2 ms of it.
    const ranAfter = handled.indexOf('immediate');
    expect(ranAfter).toBeGreaterThan(0);
    expect(ranAfter).toBeLessThan(100);
  });

  it('answers a second client while the first one\'s burst is still being handled', async () => {
    await startServer(0);
    let aAnswersWhenBWasAnswered = -1;
    const a = await connect();
    const b = await connect(() => {
      aAnswersWhenBWasAnswered = a.answers.length;
    });
    a.socket.write(frames('a', BURST));
    b.socket.write(frames('b', 1));
    await until(() => a.answers.length === BURST && b.answers.length === 1);
    // The server took b's frame early in the burst; so did the client receive its answer.
    expect(handled.indexOf('b:1')).toBeLessThan(BURST / 10);
    expect(aAnswersWhenBWasAnswered).toBeGreaterThanOrEqual(0);
    expect(aAnswersWhenBWasAnswered).toBeLessThan(BURST);
  });

  it('a client that sends its burst and then closes its side (a script piping into nc -U) gets every answer', async () => {
    await startServer(0);
    const a = await connect(undefined, true);
    const ended = new Promise((resolve) => a.socket.once('end', resolve));
    a.socket.end(frames('a', BURST));
    await ended;
    expect(a.answers).toEqual(Array.from({ length: BURST }, (_, i) => i + 1));
  });

  it('a client that closes its side right after a call that takes a while still gets the answer', async () => {
    await startServer();
    const a = await connect(undefined, true);
    const ended = new Promise((resolve) => a.socket.once('end', resolve));
    a.socket.end(`${JSON.stringify({ jsonrpc: '2.0', id: 7, method: 'later', params: { n: 7 } })}\n`);
    await ended;
    expect(a.answers).toEqual([7]);
  });

  it('a read with characters of several bytes, an invalid byte, CRLF and blank lines: every frame answered in order', async () => {
    await startServer(60_000);
    const a = await connect();
    const echo = (from: string, n: number) => JSON.stringify({ jsonrpc: '2.0', id: n, method: 'echo', params: { from, n } });
    // "ü€😀" are 2-, 3- and 4-byte characters; 0xFF is never valid UTF-8 and reads as U+FFFD.
    const bytes = Buffer.from(`${echo('a', 1)}\r\n\n${echo('ü€😀', 2)}\n${echo('a', 3)}\n${echo('a', 4)}\n`);
    const six = Buffer.from(echo('c', 6));
    six[six.indexOf('"c"') + 1] = 0xff;
    const withInvalid = Buffer.concat([Buffer.from(`${echo('a', 5)}\r\n`), six, Buffer.from(`\n${echo('a', 7)}\n`)]);
    a.socket.write(bytes);
    await until(() => a.answers.length === 4);
    a.socket.write(withInvalid);
    await until(() => a.answers.length === 7);
    expect(a.answers).toEqual([1, 2, 3, 4, 5, 6, 7]);
    expect(handled.filter((h) => h !== 'immediate')).toEqual(['a:1', 'ü€😀:2', 'a:3', 'a:4', 'a:5', `${String.fromCharCode(0xfffd)}:6`, 'a:7']);
  });

  it('a frame cut in two inside a character of several bytes, with more frames after it in the second read', async () => {
    await startServer(60_000);
    const a = await connect();
    const first = Buffer.from(`${JSON.stringify({ jsonrpc: '2.0', id: 1, method: 'echo', params: { from: '€uro', n: 1 } })}\n`);
    const cut = first.indexOf(Buffer.from('€')) + 1;
    a.socket.write(first.subarray(0, cut));
    await new Promise((r) => setTimeout(r, 20));
    a.socket.write(Buffer.concat([first.subarray(cut), Buffer.from(frames('a', 3).replace(/"n":1\b/, '"n":2').replace(/"id":1\b/, '"id":2'))]));
    await until(() => a.answers.length === 4);
    expect(handled).toEqual(['€uro:1', 'a:2', 'a:2', 'a:3']);
  });

  it('a client that never reads is cut off at the unread-bytes limit, even within one read of small frames', async () => {
    // A budget no read can use up: the whole read is handled in one go.
    await startServer(60_000);
    const { socket } = await rawClient();
    socket.pause();
    // Every server-side write from here on, by size: on sockets the server accepted (Node sets
    // their `server`), not on the client's own.
    const write = Socket.prototype.write;
    let largest = 0;
    Socket.prototype.write = function (this: Socket & { server?: unknown }, ...args: unknown[]) {
      if (this.server !== undefined && this.server !== null) largest = Math.max(largest, String(args[0]).length);
      return (write as (...a: unknown[]) => boolean).apply(this, args);
    } as typeof write;
    try {
      // 64 KiB of 2-byte frames, each answered with a ~100-byte parse error: 3.4 MB owed.
      socket.write('x\n'.repeat(32 * 1024));
      await until(() => server.connectionCount === 0);
    } finally {
      Socket.prototype.write = write;
    }
    expect(largest).toBeGreaterThan(0);
    expect(largest).toBeLessThan(70 * 1024);
  });

  it('a notification sent while a read is handled follows the answers to the frames before it', async () => {
    await startServer();
    const { socket, received } = await rawClient();
    const call = (id: number, method: string) => `${JSON.stringify({ jsonrpc: '2.0', id, method, params: { n: id } })}\n`;
    socket.write(call(1, 'subscribe') + call(2, 'shout') + call(3, 'subscribe'));
    await until(() => received().split('\n').length > 4);
    const order = received().trimEnd().split('\n').map((line) => {
      const msg = JSON.parse(line) as { id?: number; method?: string };
      return msg.method ?? `answer ${msg.id}`;
    });
    expect(order).toEqual(['answer 1', 'shouted', 'answer 2', 'answer 3']);
  });

  it('a read whose last frame is too large: the frames before it are answered, then the error, then the end', async () => {
    await startServer(undefined, 300);
    const { socket, received } = await rawClient();
    const ended = new Promise((done) => socket.once('end', done));
    socket.write(`${frames('a', 3)}${JSON.stringify({ jsonrpc: '2.0', id: 4, method: 'echo', params: { from: 'x'.repeat(400), n: 4 } })}\n`);
    await ended;
    const lines = received().trimEnd().split('\n').map((line) => JSON.parse(line) as { id: number | null; result?: { n: number }; error?: { message: string } });
    expect(lines.slice(0, 3).map((l) => l.result?.n)).toEqual([1, 2, 3]);
    expect(lines[3]?.id).toBeNull();
    expect(lines[3]?.error?.message).toMatch(/exceeds 300 bytes/);
    expect(lines).toHaveLength(4);
  });

  it('a client that disconnects with frames still waiting for their turn leaves the others served', async () => {
    await startServer(0);
    const a = await connect();
    const b = await connect();
    a.socket.write(frames('a', BURST));
    a.socket.destroy();
    b.socket.write(frames('b', 3));
    await until(() => b.answers.length === 3);
    expect(b.answers).toEqual([1, 2, 3]);
    await until(() => server.connectionCount === 1);
  });
});

describe('IpcServer answering calls that wait on one promise (a burst waiting on a refresh)', () => {
  let release: (value: unknown) => void;
  let fail: (err: unknown) => void;
  let handlerCalls: number;
  let logged: Array<{ level: number; msg: string }>;

  beforeEach(async () => {
    handlerCalls = 0;
    logged = [];
    const gate = new Promise<unknown>((resolve, reject) => {
      release = resolve;
      fail = reject;
    });
    gate.catch(() => undefined);
    server = new IpcServer({
      socketPath: join(dir, 'run', 'd.sock'),
      logger: createLogger({ level: 'debug', destination: { write: (line: string) => void logged.push(JSON.parse(line) as { level: number; msg: string }) } }),
      methods: {
        wait: rpcMethod(z.object({}).strict(), () => {
          handlerCalls++;
          return gate;
        }),
      },
    });
    await server.listen();
  });

  /** Sends `count` calls of `wait` in one write; resolves with the parsed answers once all are in. */
  async function burst(count: number, sendBeforeSettling: () => void): Promise<Array<{ id: number; result?: unknown; error?: { code: number; message: string; data?: { code?: string } } }>> {
    const socket = createConnection(server.socketPath);
    sockets.push(socket);
    await new Promise((done) => socket.once('connect', done));
    const answers: Array<{ id: number }> = [];
    let buf = '';
    socket.setEncoding('utf8');
    const all = new Promise<void>((done) =>
      socket.on('data', (chunk: string) => {
        buf += chunk;
        for (let nl = buf.indexOf('\n'); nl !== -1; nl = buf.indexOf('\n')) {
          answers.push(JSON.parse(buf.slice(0, nl)) as { id: number });
          buf = buf.slice(nl + 1);
        }
        if (answers.length >= count) done();
      }),
    );
    let out = '';
    for (let id = 1; id <= count; id++) out += `${JSON.stringify({ jsonrpc: '2.0', id, method: 'wait' })}\n`;
    socket.write(out);
    while (handlerCalls < count) await new Promise((done) => setTimeout(done, 2));
    expect(answers).toEqual([]);
    sendBeforeSettling();
    await all;
    return answers;
  }

  it('answers each waiting call under its own id, in the order they came, with the one result', async () => {
    const token = Object.freeze({ access_token: 'shared', expiry_date: 1 });
    const answers = await burst(300, () => release(token));
    expect(answers.map((a) => a.id)).toEqual(Array.from({ length: 300 }, (_, i) => i + 1));
    for (const a of answers) expect(a.result).toEqual(token);
  });

  it('answers each with the error when the promise fails, and logs an unexpected failure once, not once per call', async () => {
    const answers = await burst(120, () => fail(new Error('boom')));
    expect(answers.map((a) => a.id)).toEqual(Array.from({ length: 120 }, (_, i) => i + 1));
    for (const a of answers) expect(a.error).toEqual({ code: -32603, message: 'internal error' });
    expect(logged.filter((l) => l.msg === 'handler failed unexpectedly')).toHaveLength(1);
  });

  it('answers a typed failure with its code to every waiting call', async () => {
    const answers = await burst(50, () => fail(new QwenTokenExpiredError('the token expired and could not be refreshed')));
    for (const a of answers) {
      expect(a.error?.data?.code).toBe('QWEN_TOKEN_EXPIRED');
      expect(a.error?.message).toBe('the token expired and could not be refreshed');
    }
  });
});

describe('IpcServer limits on idle and refused clients', () => {
  let logged: Array<{ level: number; msg: string; refused?: number }>;

  async function startLimited(options: { silentConnectionTimeoutMs?: number; maxConnections?: number }): Promise<void> {
    logged = [];
    server = new IpcServer({
      socketPath: join(dir, 'run', 'd.sock'),
      logger: createLogger({ level: 'debug', destination: { write: (line: string) => void logged.push(JSON.parse(line) as { level: number; msg: string }) } }),
      methods: { echo: rpcMethod(z.object({ n: z.number().int() }).strict(), ({ n }) => ({ n })) },
      ...options,
    });
    await server.listen();
  }

  function closedFlag(socket: Socket): () => boolean {
    let closed = false;
    socket.once('close', () => (closed = true));
    return () => closed;
  }

  it('closes a connection that sends nothing once the silent-connection timeout passes, not one that sent a frame', async () => {
    await startLimited({ silentConnectionTimeoutMs: 150 });
    const silent = await rawClient();
    const spoke = await connect();
    const silentClosed = closedFlag(silent.socket);
    const spokeClosed = closedFlag(spoke.socket);
    spoke.socket.write(`${JSON.stringify({ jsonrpc: '2.0', id: 1, method: 'echo', params: { n: 1 } })}\n`);
    await until(() => silentClosed());
    await new Promise((r) => setTimeout(r, 400));
    spoke.socket.write(`${JSON.stringify({ jsonrpc: '2.0', id: 2, method: 'echo', params: { n: 2 } })}\n`);
    await until(() => spoke.answers.length === 2);
    expect(spoke.answers).toEqual([1, 2]);
    expect(spokeClosed()).toBe(false);
    expect(server.connectionCount).toBe(1);
  });

  it('a connection that sent only part of a frame is not taken for a silent one: it gets the partial-frame timeout', async () => {
    await startLimited({ silentConnectionTimeoutMs: 100 });
    const partial = await rawClient();
    const closed = closedFlag(partial.socket);
    partial.socket.write('{"jsonrpc":"2.0","id":1,');
    await new Promise((r) => setTimeout(r, 400));
    expect(closed()).toBe(false);
    partial.socket.write('"method":"echo","params":{"n":5}}\n');
    await until(() => partial.received().includes('"n":5'));
  });

  it('warns about clients refused at the connection limit once, with their count, not once per client', async () => {
    await startLimited({ maxConnections: 1 });
    const kept = await connect();
    kept.socket.write(`${JSON.stringify({ jsonrpc: '2.0', id: 1, method: 'echo', params: { n: 1 } })}\n`);
    await until(() => kept.answers.length === 1);
    // One after another: each is accepted by the kernel and closed by the server at once.
    for (let i = 0; i < 20; i++) {
      await new Promise<void>((done) => {
        const socket = createConnection(server.socketPath);
        socket.on('error', () => undefined);
        socket.once('close', () => done());
      });
    }
    const warnings = logged.filter((l) => /connection limit/.test(l.msg));
    expect(warnings).toHaveLength(1);
    expect(warnings[0]?.refused).toBe(1);
    expect(kept.answers).toEqual([1]);
  });
});
