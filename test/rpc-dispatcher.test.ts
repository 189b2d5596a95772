/**
 * The socket server's JSON-RPC core without sockets: lines in, answer lines (or a promise of
 * them) out. Every case of the protocol is one call here; the framing and writing around it are
 * tested in ipc-server.test.ts.
 */
import { describe, expect, it } from 'vitest';
import { z } from 'zod';
import { createLogger } from '../daemon/logger.js';
import { RpcDispatcher, RpcSession, rpcMethod, type Reply } from '../daemon/rpc-dispatcher.js';
import { QwenTokenExpiredError } from '../shared/errors.js';

interface Answer {
  jsonrpc: string;
  id: unknown;
  result?: unknown;
  error?: { code: number; message: string; data?: Record<string, string> };
}

function setup(handlers: { wait?: () => Promise<unknown> } = {}) {
  const logged: Array<{ msg: string }> = [];
  const seen: unknown[] = [];
  const dispatcher = new RpcDispatcher(
    {
      echo: rpcMethod(z.object({ n: z.number().int() }).strict(), (params, connection) => {
        seen.push(params);
        return { n: params.n, conn: connection.id };
      }),
      subscribe: rpcMethod(z.object({}).strict(), (_params, connection) => {
        connection.subscribed = true;
        return { subscribed: true };
      }),
      fail: rpcMethod(z.object({ how: z.enum(['typed', 'plain']) }).strict(), ({ how }) => {
        throw how === 'typed' ? new QwenTokenExpiredError('expired') : new Error('secret detail');
      }),
      wait: rpcMethod(z.object({}).strict(), () => handlers.wait?.() ?? Promise.resolve(null)),
    },
    createLogger({ level: 'debug', destination: { write: (line: string) => void logged.push(JSON.parse(line) as { msg: string }) } }),
  );
  return { dispatcher, session: new RpcSession(7), logged, seen };
}

/** The answer lines of a reply that is ready now. */
function linesOf(reply: Reply): Answer[] {
  expect(typeof reply).toBe('string');
  return (reply as string)
    .split('\n')
    .filter((l) => l !== '')
    .map((l) => JSON.parse(l) as Answer);
}

const call = (id: unknown, method: string, params?: unknown) => JSON.stringify({ jsonrpc: '2.0', id, method, params });

describe('RpcDispatcher', () => {
  it('answers a valid call with its result under its id, and hands the handler this session', () => {
    const { dispatcher, session } = setup();
    expect(linesOf(dispatcher.receive(session, call(1, 'echo', { n: 5 })))).toEqual([{ jsonrpc: '2.0', id: 1, result: { n: 5, conn: 7 } }]);
    expect(linesOf(dispatcher.receive(session, call('a', 'subscribe', {})))).toEqual([{ jsonrpc: '2.0', id: 'a', result: { subscribed: true } }]);
    expect(session.subscribed).toBe(true);
    expect(dispatcher.requestsServed).toBe(2);
  });

  it('says what is wrong with a frame that is not a valid call', () => {
    const { dispatcher, session, seen } = setup();
    const answer = (line: string) => linesOf(dispatcher.receive(session, line))[0];
    expect(answer('{not json')).toEqual({ jsonrpc: '2.0', id: null, error: { code: -32700, message: 'parse error: the frame is not valid JSON' } });
    expect(answer('[1,2]')?.error).toEqual({ code: -32600, message: 'invalid request: batches are not supported; send one request per line' });
    expect(answer(JSON.stringify({ jsonrpc: '1.0', id: 3, method: 'echo' }))).toMatchObject({ id: 3, error: { code: -32600 } });
    expect(answer(call(4, 'nope'))).toEqual({ jsonrpc: '2.0', id: 4, error: { code: -32601, message: 'method not found: nope' } });
    const invalid = answer(call(5, 'echo', { n: 'five' }));
    expect(invalid).toMatchObject({ id: 5, error: { code: -32602 } });
    expect(invalid?.error?.message).toMatch(/^invalid params: n: /);
    expect(answer(call(6, 'echo', { n: 1, extra: true }))?.error?.code).toBe(-32602);
    expect(seen).toEqual([]);
  });

  it('a notification gets no answer, whether it is handled, unknown or invalid', () => {
    const { dispatcher, session, seen } = setup();
    expect(dispatcher.receive(session, JSON.stringify({ jsonrpc: '2.0', method: 'echo', params: { n: 1 } }))).toBe('');
    expect(dispatcher.receive(session, JSON.stringify({ jsonrpc: '2.0', method: 'nope' }))).toBe('');
    expect(dispatcher.receive(session, JSON.stringify({ jsonrpc: '2.0', method: 'echo', params: { n: 'x' } }))).toBe('');
    expect(seen).toEqual([{ n: 1 }]);
  });

  it('a typed failure carries its stable code; anything else is an internal error, logged without the answer saying why', () => {
    const { dispatcher, session, logged } = setup();
    const typed = linesOf(dispatcher.receive(session, call(1, 'fail', { how: 'typed' })))[0];
    expect(typed?.error).toEqual({ code: -32000, message: 'expired', data: { code: 'QWEN_TOKEN_EXPIRED' } });
    const plain = linesOf(dispatcher.receive(session, call(2, 'fail', { how: 'plain' })))[0];
    expect(plain?.error).toEqual({ code: -32603, message: 'internal error' });
    expect(logged.filter((l) => l.msg === 'handler failed unexpectedly')).toHaveLength(1);
  });

  it('looks only at text[start, end): a frame among others in one decoded read', () => {
    const { dispatcher, session } = setup();
    const text = `${call(1, 'echo', { n: 1 })}\n${call(2, 'echo', { n: 2 })}\n`;
    const second = text.indexOf('\n') + 1;
    expect(linesOf(dispatcher.receive(session, text, second, text.length - 1))).toEqual([{ jsonrpc: '2.0', id: 2, result: { n: 2, conn: 7 } }]);
  });

  it('a frame repeating the last one with another id gets its own answer, with the same frozen params', () => {
    const { dispatcher, session, seen } = setup();
    for (const id of [1, 2, 30]) expect(linesOf(dispatcher.receive(session, call(id, 'echo', { n: 9 })))[0]?.id).toBe(id);
    expect(seen).toHaveLength(3);
    expect(seen[1]).toBe(seen[2]);
    expect(Object.isFrozen(seen[1])).toBe(true);
  });

  it('calls of one session waiting on the same promise: the first gets a promise of every answer, the rest join it', async () => {
    let release!: (value: unknown) => void;
    const gate = new Promise((resolve) => (release = resolve));
    const { dispatcher, session } = setup({ wait: () => gate });
    const first = dispatcher.receive(session, call(1, 'wait', {}));
    expect(first).toBeInstanceOf(Promise);
    expect(dispatcher.receive(session, call(2, 'wait', {}))).toBeNull();
    expect(dispatcher.receive(session, call(3, 'wait', {}))).toBeNull();
    // Another session waiting on the same promise gets its own.
    const other = new RpcSession(8);
    const otherReply = dispatcher.receive(other, call(1, 'wait', {}));
    expect(otherReply).toBeInstanceOf(Promise);
    expect(session.owed).toBe(3);
    release(Object.freeze({ token: 't' }));
    const lines = (await first) as string;
    expect(lines.trimEnd().split('\n').map((l) => JSON.parse(l) as Answer)).toEqual([1, 2, 3].map((id) => ({ jsonrpc: '2.0', id, result: { token: 't' } })));
    expect(session.owed).toBe(0);
    expect(await otherReply).toBe('{"jsonrpc":"2.0","id":1,"result":{"token":"t"}}\n');
    expect(other.owed).toBe(0);
  });

  it('a promise that fails answers every call joined to it with the error, and logs once', async () => {
    let fail!: (err: unknown) => void;
    const gate = new Promise((_resolve, reject) => (fail = reject));
    gate.catch(() => undefined);
    const { dispatcher, session, logged } = setup({ wait: () => gate });
    const first = dispatcher.receive(session, call(1, 'wait', {}));
    dispatcher.receive(session, call(2, 'wait', {}));
    fail(new Error('boom'));
    const answers = ((await first) as string).trimEnd().split('\n').map((l) => JSON.parse(l) as Answer);
    expect(answers.map((a) => [a.id, a.error?.code])).toEqual([
      [1, -32603],
      [2, -32603],
    ]);
    expect(logged.filter((l) => l.msg === 'handler failed unexpectedly')).toHaveLength(1);
  });

  it('a notification whose handler returns a promise is owed until it settles, and answered with nothing', async () => {
    let release!: (value: unknown) => void;
    const gate = new Promise((resolve) => (release = resolve));
    const { dispatcher, session } = setup({ wait: () => gate });
    const reply = dispatcher.receive(session, JSON.stringify({ jsonrpc: '2.0', method: 'wait', params: {} }));
    expect(session.owed).toBe(1);
    release(1);
    expect(await reply).toBe('');
    expect(session.owed).toBe(0);
  });
});
