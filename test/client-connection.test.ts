/**
 * The client's side of the socket against a scripted stand-in for the daemon: request timeouts
 * (one timer per connection), calls made together leaving together, and answers that repeat
 * the last one (a burst) resolving to the same checked, frozen record without skipping checks.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { DaemonConnection } from '../client/daemon-connection.js';
import { TokenClient } from '../client/token-client.js';
import { QwenDaemonUnavailableError, QwenProtocolError } from '../shared/errors.js';

interface Request {
  id: number;
  method: string;
  params: unknown;
}

let dir: string;
let server: Server;
let socketPath: string;
/** Every request the stand-in received, with the number of the data chunk it came in. */
let received: Array<Request & { chunk: number }>;
/** How the stand-in answers a request: a line (without newline) or null for no answer. */
let answer: (req: Request) => string | null;
const peers: Socket[] = [];

const token = (access_token: string) => ({ access_token, token_type: 'Bearer', expiry_date: Date.now() + 3_600_000, base_url: 'https://portal.qwen.ai/v1' });
const resultLine = (id: number, result: unknown) => JSON.stringify({ jsonrpc: '2.0', id, result });

/** Answers hello and subscribe as the daemon does; everything else through `answer`. */
function standardAnswer(req: Request, rest: (req: Request) => string | null): string | null {
  if (req.method === 'hello') return resultLine(req.id, { protocol: 1, daemon: 'qwen-tokend', version: '0.0.0-test', pid: 1 });
  if (req.method === 'subscribe') return resultLine(req.id, { subscribed: true });
  return rest(req);
}

beforeEach(async () => {
  dir = mkdtempSync(join(tmpdir(), 'qwen-tokend-client-'));
  socketPath = join(dir, 'd.sock');
  received = [];
  answer = () => null;
  let chunks = 0;
  server = createServer((socket) => {
    peers.push(socket);
    let buf = '';
    socket.setEncoding('utf8');
    socket.on('data', (chunk: string) => {
      chunks++;
      buf += chunk;
      let out = '';
      for (let nl = buf.indexOf('\n'); nl !== -1; nl = buf.indexOf('\n')) {
        const req = JSON.parse(buf.slice(0, nl)) as Request;
        buf = buf.slice(nl + 1);
        received.push({ ...req, chunk: chunks });
        const line = answer(req);
        if (line !== null) out += `${line}\n`;
      }
      if (out) socket.write(out);
    });
    socket.on('error', () => undefined);
  });
  await new Promise<void>((resolve) => server.listen(socketPath, resolve));
});

afterEach(async () => {
  for (const p of peers.splice(0)) p.destroy();
  await new Promise<void>((resolve) => server.close(() => resolve()));
  rmSync(dir, { recursive: true, force: true });
});

describe('DaemonConnection', () => {
  it('fails each unanswered call after its own timeout, and only those', async () => {
    answer = (req) => ((req.params as { answer?: boolean }).answer ? resultLine(req.id, { ok: true }) : null);
    const conn = await DaemonConnection.open({ socketPath }, 2_000);
    try {
      const started = performance.now();
      const settled = (p: Promise<unknown>) =>
        p.then(
          (v) => ({ ok: true as const, v, at: performance.now() - started }),
          (e: unknown) => ({ ok: false as const, e, at: performance.now() - started }),
        );
      const slow = settled(conn.call('wait', {}, 400));
      const fast = settled(conn.call('wait', {}, 100));
      const answered = settled(conn.call('wait', { answer: true }, 100));
      const untimed = settled(conn.call('wait', {}, 0));
      const [s, f, a] = await Promise.all([slow, fast, answered]);
      expect(a).toMatchObject({ ok: true, v: { ok: true } });
      expect(f.ok).toBe(false);
      expect(s.ok).toBe(false);
      if (!f.ok && !s.ok) {
        expect(f.e).toBeInstanceOf(QwenDaemonUnavailableError);
        expect((f.e as Error).message).toBe('qwen-tokend did not answer "wait" within 100 ms');
        expect((s.e as Error).message).toBe('qwen-tokend did not answer "wait" within 400 ms');
      }
      // Each at (or after) its own deadline, the shorter one first.
      expect(f.at).toBeGreaterThanOrEqual(99);
      expect(s.at).toBeGreaterThanOrEqual(399);
      expect(f.at).toBeLessThan(s.at);
      // A call without a timeout still waits; closing the connection ends it.
      conn.close();
      const u = await untimed;
      expect(u.ok).toBe(false);
      if (!u.ok) expect((u.e as Error).message).toMatch(/closed/);
    } finally {
      conn.close();
    }
  });

  it('calls made in one tick reach the daemon in order, the first alone and the rest in one write', async () => {
    answer = (req) => resultLine(req.id, { n: (req.params as { n: number }).n });
    const conn = await DaemonConnection.open({ socketPath }, 2_000);
    try {
      const calls = Array.from({ length: 200 }, (_, n) => conn.call('echo', { n }, 5_000));
      const results = await Promise.all(calls);
      expect(results).toEqual(Array.from({ length: 200 }, (_, n) => ({ n })));
      expect(received.map((r) => (r.params as { n: number }).n)).toEqual(Array.from({ length: 200 }, (_, n) => n));
      // 200 calls, two writes: the stand-in sees at most a handful of chunks, not 200.
      expect(new Set(received.map((r) => r.chunk)).size).toBeLessThanOrEqual(4);
    } finally {
      conn.close();
    }
  });

  it('reads answers and notifications cut anywhere by the socket, characters included', async () => {
    const text = 'Grüße, 令牌 🔑';
    answer = (req) => resultLine(req.id, { text, n: (req.params as { n: number }).n });
    const notified: unknown[] = [];
    const conn = await DaemonConnection.open({ socketPath, onNotification: (method, params) => notified.push({ method, params }) }, 2_000);
    try {
      // Answers come back whole; the stand-in then trickles a notification byte by byte.
      expect(await Promise.all([conn.call('echo', { n: 1 }, 5_000), conn.call('echo', { n: 2 }, 5_000)])).toEqual([
        { text, n: 1 },
        { text, n: 2 },
      ]);
      const push = Buffer.from(`${JSON.stringify({ jsonrpc: '2.0', method: 'note', params: { text } })}\n`);
      for (const byte of push) {
        peers[0]!.write(Buffer.of(byte));
        await new Promise((done) => setImmediate(done));
      }
      while (notified.length === 0) await new Promise((done) => setTimeout(done, 2));
      expect(notified).toEqual([{ method: 'note', params: { text } }]);
    } finally {
      conn.close();
    }
  });

  it('handles nothing more of a read once a notification handler closed the connection', async () => {
    const notified: string[] = [];
    let conn: DaemonConnection | null = null;
    conn = await DaemonConnection.open(
      {
        socketPath,
        onNotification: (method) => {
          notified.push(method);
          conn?.close();
        },
      },
      2_000,
    );
    try {
      while (peers.length === 0) await new Promise((done) => setTimeout(done, 2));
      const note = (method: string) => JSON.stringify({ jsonrpc: '2.0', method, params: {} });
      peers[0]!.write(`${note('first')}\n${note('second')}\n${note('third')}\n`);
      while (conn.isOpen) await new Promise((done) => setTimeout(done, 2));
      await new Promise((done) => setTimeout(done, 20));
      expect(notified).toEqual(['first']);
    } finally {
      conn.close();
    }
  });

  it('fails what is pending and closes when the daemon sends a frame over 1 MiB', async () => {
    const conn = await DaemonConnection.open({ socketPath }, 2_000);
    try {
      const pending = conn.call('echo', {}, 5_000).then(
        () => null,
        (e: unknown) => e,
      );
      while (peers.length === 0) await new Promise((done) => setTimeout(done, 2));
      peers[0]!.write(`{"jsonrpc":"2.0","id":1,"result":"${'x'.repeat(1024 * 1024 + 10)}`);
      const err = await pending;
      expect(err).toBeInstanceOf(QwenProtocolError);
      expect((err as Error).message).toMatch(/larger than 1 MiB/);
      expect(conn.isOpen).toBe(false);
    } finally {
      conn.close();
    }
  });
});

describe('one push read by several connections of a process', () => {
  const push = (method: string, params: unknown) => `${JSON.stringify({ jsonrpc: '2.0', method, params })}\n`;

  async function peersFor(count: number): Promise<void> {
    while (peers.length < count) await new Promise((done) => setTimeout(done, 2));
  }

  it('is parsed once: every connection hands its listener the same frozen params, and other lines get their own', async () => {
    const seen: Array<{ conn: number; method: string; params: unknown }> = [];
    const conns = await Promise.all(
      [0, 1, 2].map((conn) => DaemonConnection.open({ socketPath, onNotification: (method, params) => seen.push({ conn, method, params }) }, 2_000)),
    );
    try {
      await peersFor(3);
      const line = push('token.refreshed', { nested: { list: [1, { deep: true }] }, text: 'same' });
      for (const peer of peers) peer.write(line);
      while (seen.length < 3) await new Promise((done) => setTimeout(done, 2));
      expect(seen.map((s) => s.method)).toEqual(['token.refreshed', 'token.refreshed', 'token.refreshed']);
      const params = seen[0]!.params as { nested: { list: [number, { deep: boolean }] } };
      expect(seen[1]!.params).toBe(params);
      expect(seen[2]!.params).toBe(params);
      expect(params).toEqual({ nested: { list: [1, { deep: true }] }, text: 'same' });
      // Frozen all the way down: no listener can change what the others see.
      expect(Object.isFrozen(params) && Object.isFrozen(params.nested) && Object.isFrozen(params.nested.list) && Object.isFrozen(params.nested.list[1])).toBe(true);

      // Another line, then the first again: each parsed for what it says.
      peers[0]!.write(push('state.changed', { state: 'valid', previous: 'expired' }));
      peers[1]!.write(line);
      while (seen.length < 5) await new Promise((done) => setTimeout(done, 2));
      const rest = seen.slice(3).sort((a, b) => a.conn - b.conn);
      expect(rest.map((s) => [s.conn, s.method, s.params])).toEqual([
        [0, 'state.changed', { state: 'valid', previous: 'expired' }],
        [1, 'token.refreshed', { nested: { list: [1, { deep: true }] }, text: 'same' }],
      ]);
    } finally {
      for (const conn of conns) conn.close();
    }
  });

  it('a push longer than 4 KiB is not kept: each connection parses its own copy', async () => {
    const seen: unknown[] = [];
    const conns = await Promise.all([0, 1].map(() => DaemonConnection.open({ socketPath, onNotification: (_method, params) => seen.push(params) }, 2_000)));
    try {
      await peersFor(2);
      const line = push('note', { text: 'y'.repeat(5000) });
      for (const peer of peers) peer.write(line);
      while (seen.length < 2) await new Promise((done) => setTimeout(done, 2));
      expect(seen[0]).toEqual({ text: 'y'.repeat(5000) });
      expect(seen[1]).toEqual(seen[0]);
      expect(seen[1]).not.toBe(seen[0]);
    } finally {
      for (const conn of conns) conn.close();
    }
  });

  it('gives every TokenClient of the process the same checked, frozen token; a malformed push changes none', async () => {
    answer = (req) => standardAnswer(req, (r) => resultLine(r.id, token('before-push')));
    const clients = [0, 1, 2].map(() => new TokenClient({ socketPath, autostart: false }));
    try {
      await Promise.all(clients.map((c) => c.subscribe()));
      expect(await Promise.all(clients.map((c) => c.getAccessToken()))).toEqual(['before-push', 'before-push', 'before-push']);
      const pushed: unknown[] = [];
      for (const c of clients) c.on('token.refreshed', (t) => pushed.push(t));

      const bad = push('token.refreshed', { ...token(''), expiry_date: Date.now() + 3_600_000 });
      for (const peer of peers) peer.write(bad);
      const good = push('token.refreshed', token('pushed-token'));
      for (const peer of peers) peer.write(good);
      while (pushed.length < 3) await new Promise((done) => setTimeout(done, 2));
      expect(pushed).toHaveLength(3);
      expect((pushed[0] as { access_token: string }).access_token).toBe('pushed-token');
      expect(pushed[1]).toBe(pushed[0]);
      expect(pushed[2]).toBe(pushed[0]);
      expect(Object.isFrozen(pushed[0])).toBe(true);
      expect(await Promise.all(clients.map((c) => c.getAccessToken()))).toEqual(['pushed-token', 'pushed-token', 'pushed-token']);
    } finally {
      await Promise.all(clients.map((c) => c.close()));
    }
  });
});

describe('TokenClient and repeated answers', () => {
  it('a burst answered with one token gives every caller that token, as one frozen record', async () => {
    answer = (req) => standardAnswer(req, (r) => resultLine(r.id, token('burst-token-1')));
    const client = new TokenClient({ socketPath, autostart: false });
    try {
      const records = await Promise.all(Array.from({ length: 300 }, () => client.getCredentials({ noCache: true })));
      expect(new Set(records.map((r) => r.access_token))).toEqual(new Set(['burst-token-1']));
      expect(records.every((r) => Object.isFrozen(r))).toBe(true);
      expect(() => {
        (records[0] as { access_token: string }).access_token = 'changed';
      }).toThrow(TypeError);
      expect(await client.getAccessToken()).toBe('burst-token-1');
    } finally {
      await client.close();
    }
  });

  it('an answer that differs from the repeated one is checked in full: a malformed token is refused', async () => {
    let calls = 0;
    answer = (req) =>
      standardAnswer(req, (r) => {
        calls++;
        // Two good answers (the second repeats the first), then the same shape with an empty token.
        if (calls <= 2) return resultLine(r.id, token('good-token'));
        return resultLine(r.id, { ...token(''), expiry_date: Date.now() + 3_600_000 });
      });
    const client = new TokenClient({ socketPath, autostart: false });
    try {
      expect((await client.getCredentials({ noCache: true })).access_token).toBe('good-token');
      expect((await client.getCredentials({ noCache: true })).access_token).toBe('good-token');
      await expect(client.getCredentials({ noCache: true })).rejects.toBeInstanceOf(QwenProtocolError);
    } finally {
      await client.close();
    }
  });

  it('a repeated answer with an id nobody is waiting for is ignored, and later answers still match their calls', async () => {
    answer = (req) =>
      standardAnswer(req, (r) => {
        // Before the real answer, one for an id that was never sent.
        return `${resultLine(r.id + 1000, token('t'))}\n${resultLine(r.id, token('t'))}`;
      });
    const client = new TokenClient({ socketPath, autostart: false });
    try {
      const tokens = await Promise.all([1, 2, 3].map(() => client.getAccessToken({ noCache: true })));
      expect(tokens).toEqual(['t', 't', 't']);
    } finally {
      await client.close();
    }
  });
});
