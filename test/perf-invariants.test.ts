/**
 * Guards of the socket server's optimisations, by counting the calls they save: a failure here
 * means a slower build, not a wrong answer (the behaviour is tested in ipc-server.test.ts and
 * rpc-dispatcher.test.ts). What each optimisation is worth: bench/README.md#b4.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { createConnection, Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { z } from 'zod';
import { IpcServer } from '../daemon/ipc-server.js';
import { silentLogger } from '../daemon/logger.js';
import { RpcDispatcher, RpcSession, rpcMethod } from '../daemon/rpc-dispatcher.js';

/** Counts the calls of `target[name]` for which `counts(this, args)` holds while `run` runs. */
async function countCalls(target: object, name: string, run: () => unknown, counts: (self: unknown, args: unknown[]) => boolean = () => true): Promise<number> {
  const methods = target as Record<string, (...args: unknown[]) => unknown>;
  const original = methods[name]!;
  let calls = 0;
  methods[name] = function (this: unknown, ...args: unknown[]) {
    if (counts(this, args)) calls++;
    return original.apply(this, args);
  };
  try {
    await run();
  } finally {
    methods[name] = original;
  }
  return calls;
}

const echo = rpcMethod(z.object({ n: z.number().int() }).strict(), ({ n }) => ({ n }));
const frame = (id: number, n = id) => JSON.stringify({ jsonrpc: '2.0', id, method: 'echo', params: { n } });

describe('the socket server, one read of 100 frames', () => {
  let dir: string;
  let server: IpcServer;
  let client: Socket;
  let answers: number[];

  beforeEach(async () => {
    dir = mkdtempSync(join(tmpdir(), 'qwen-tokend-perf-'));
    // A turn budget no read can use up: the read is handled in one go however slow the machine.
    server = new IpcServer({ socketPath: join(dir, 'run', 'd.sock'), logger: silentLogger(), turnBudgetMs: 60_000, methods: { echo } });
    await server.listen();
    client = createConnection(server.socketPath);
    await new Promise((done) => client.once('connect', done));
    answers = [];
    let buf = '';
    client.setEncoding('utf8');
    client.on('data', (chunk: string) => {
      buf += chunk;
      for (let nl = buf.indexOf('\n'); nl !== -1; nl = buf.indexOf('\n')) {
        answers.push((JSON.parse(buf.slice(0, nl)) as { result: { n: number } }).result.n);
        buf = buf.slice(nl + 1);
      }
    });
  });

  afterEach(async () => {
    client.destroy();
    await server.close();
    rmSync(dir, { recursive: true, force: true });
  });

  /** Sends 100 frames in one write and waits for every answer, in order. */
  async function hundredFrames(): Promise<void> {
    let text = '';
    for (let id = 1; id <= 100; id++) text += `${frame(id)}\n`;
    client.write(text);
    for (let i = 0; i < 2_000 && answers.length < 100; i++) await new Promise((r) => setTimeout(r, 5));
    expect(answers).toEqual(Array.from({ length: 100 }, (_, i) => i + 1));
  }

  it('answers them with one write', async () => {
    // Writes on sockets the server accepted (Node sets their `server`), not the client's.
    const writes = await countCalls(Socket.prototype, 'write', hundredFrames, (socket) => {
      const owner = (socket as { server?: unknown }).server;
      return owner !== undefined && owner !== null;
    });
    expect(writes).toBe(1);
  });

  it('decodes them in one go, not a Buffer and a string per frame', async () => {
    const decodes = await countCalls(Buffer.prototype, 'toString', hundredFrames);
    // One for the read (the client decodes through its stream, not this method); a frame at a time would be 100.
    expect(decodes).toBeLessThanOrEqual(2);
  });
});

describe('the dispatcher', () => {
  it('parses frames that repeat the last one with another id only once', async () => {
    const dispatcher = new RpcDispatcher({ echo }, silentLogger());
    const session = new RpcSession(1);
    const frames = Array.from({ length: 50 }, (_, i) => frame(i + 1, 7));
    const replies: unknown[] = [];
    const parses = await countCalls(JSON, 'parse', () => {
      for (const line of frames) replies.push(dispatcher.receive(session, line));
    });
    expect(replies).toEqual(frames.map((_, i) => `{"jsonrpc":"2.0","id":${i + 1},"result":{"n":7}}\n`));
    expect(parses).toBe(1);
  });

  it('serializes a frozen result once for all the calls it answers', async () => {
    const token = Object.freeze({ access_token: 'a', expiry_date: 1 });
    const dispatcher = new RpcDispatcher({ token: rpcMethod(z.object({}).strict(), () => token) }, silentLogger());
    const session = new RpcSession(1);
    // String ids: every frame takes the full path (parse, validate), none the repeated-frame one.
    const frames = Array.from({ length: 50 }, (_, i) => JSON.stringify({ jsonrpc: '2.0', id: `c${i}`, method: 'token', params: {} }));
    const replies: unknown[] = [];
    const tokenStringifies = await countCalls(
      JSON,
      'stringify',
      () => {
        for (const line of frames) replies.push(dispatcher.receive(session, line));
      },
      (_self, args) => args[0] === token,
    );
    expect(replies.map((r) => (JSON.parse(r as string) as { result: unknown }).result)).toEqual(Array(50).fill(token));
    expect(tokenStringifies).toBe(1);
  });
});
