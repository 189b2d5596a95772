/**
 * Scenario 5: hostile IPC input. Many connections send random, malformed, oversized, deeply
 * nested and half-sent frames (and some never read what comes back) while hundreds of idle
 * connections are held open. Meanwhile a well-formed client in another process asks for the
 * token every 10 ms. The daemon must stay up, keep answering, and keep its RSS bounded.
 */
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { createConnection, type Socket } from 'node:net';
import { dirname, join } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { expect } from 'vitest';
import { MAX_CONNECTIONS, MAX_FRAME_BYTES } from '../../shared/protocol.js';
import { createFixture, credsFrom } from '../support/daemon.js';
import { bugLines, report, rssBytes, sleep, type SecretLedger } from './harness.js';
import type { ChaosScale } from './scale.js';

const PROBE = join(dirname(fileURLToPath(import.meta.url)), 'latency-probe.mjs');
const RSS_LIMIT_BYTES = 150 * 1024 * 1024;
const P99_LIMIT_MS = 50;

const pick = <T>(items: readonly T[]): T => items[Math.floor(Math.random() * items.length)]!;
const METHODS = ['hello', 'getAccessToken', 'status', 'refresh', 'login.start', 'login.cancel', 'logout', 'subscribe'];
const WEIRD_METHODS = ['__proto__', 'constructor', 'toString', 'hasOwnProperty', 'valueOf', '', ' ', 'getAccessToken ', 'GETACCESSTOKEN', 'x'.repeat(101), '\u0000', 'status\n'];
const WEIRD_VALUES: unknown[] = [null, true, 0, -1, 1e308, -0, '', 'x', [], {}, [1, 2], { a: 1 }, '\u0000\uffff', 'x'.repeat(300)];

function nested(depth: number, open: string, close: string, inner = ''): string {
  return open.repeat(depth) + inner + close.repeat(depth);
}

/** Invalid params for every real method: validation must refuse them (no harmful call runs). */
function invalidParams(method: string): unknown {
  switch (method) {
    case 'getAccessToken':
      return pick([{ minValidityMs: -1 }, { minValidityMs: 'soon' }, { minValidityMs: 1e20 }, { minValidityMs: 1.5 }, { extra: 1 }, { minValidityMs: null }]);
    case 'logout':
      return pick([{ qwenCli: 'yes' }, { qwenCli: 1 }, { everything: true }]);
    case 'hello':
      return pick([{ client: 'x'.repeat(201) }, { protocol: 'one' }, { unknown: 1 }]);
    case 'status':
    case 'subscribe':
      // Harmless methods also get a `__proto__` key (validation sees an empty object: fine).
      return pick<unknown>([{ a: 1 }, { ['__proto__']: { polluted: true } }, { constructor: { prototype: { x: 1 } } }]);
    default:
      return pick<unknown>([{ a: 1 }, { params: {} }, { constructor: { prototype: { x: 1 } } }]);
  }
}

/** One hostile frame (bytes that may or may not end in a newline). */
function hostileFrame(): { bytes: Buffer; kind: string } {
  const r = Math.random();
  if (r < 0.12) return { kind: 'random bytes', bytes: randomBytes(1 + Math.floor(Math.random() * 400)) };
  if (r < 0.22) {
    const valid = JSON.stringify({ jsonrpc: '2.0', id: 1, method: pick(METHODS), params: {} });
    return { kind: 'truncated JSON', bytes: Buffer.from(`${valid.slice(0, Math.floor(Math.random() * valid.length))}\n`) };
  }
  if (r < 0.34) {
    const shapes: unknown[] = [
      pick(WEIRD_VALUES),
      [{ jsonrpc: '2.0', id: 1, method: 'status' }],
      { jsonrpc: '1.0', id: 1, method: 'status' },
      { jsonrpc: '2.0', id: { nested: true }, method: 'status' },
      { jsonrpc: '2.0', id: 'i'.repeat(5000), method: 'status' },
      { jsonrpc: '2.0', id: 1, method: pick(WEIRD_VALUES) },
      { jsonrpc: '2.0', id: 1, method: 'status', params: pick(['str', 5, true]) },
      { jsonrpc: '2.0', id: 1 },
      { method: 'getAccessToken' },
      { jsonrpc: '2.0', id: 1, method: 'status', ['__proto__']: { admin: true } },
    ];
    return { kind: 'wrong shape', bytes: Buffer.from(`${JSON.stringify(pick(shapes))}\n`) };
  }
  if (r < 0.5) {
    const method = pick(METHODS);
    return { kind: 'invalid params', bytes: Buffer.from(`${JSON.stringify({ jsonrpc: '2.0', id: Math.floor(Math.random() * 1e6), method, params: invalidParams(method) })}\n`) };
  }
  if (r < 0.58) {
    const method = pick(WEIRD_METHODS);
    return { kind: 'unknown method', bytes: Buffer.from(`${JSON.stringify({ jsonrpc: '2.0', id: 'w', method })}\n`) };
  }
  if (r < 0.66) {
    // Harmless well-formed calls mixed in: the hostile peer may also be a real client.
    const method = pick(['hello', 'status', 'getAccessToken']);
    const id = Math.random() < 0.2 ? undefined : Math.floor(Math.random() * 1e9);
    return { kind: 'well-formed', bytes: Buffer.from(`${JSON.stringify({ jsonrpc: '2.0', id, method, params: {} })}\n`) };
  }
  if (r < 0.72) {
    const depth = 100 + Math.floor(Math.random() * 20_000);
    const body = pick([
      () => nested(depth, '[', ']'),
      () => nested(depth, '{"a":', '}', '1'),
      () => `{"jsonrpc":"2.0","id":1,"method":"status","params":{"a":${nested(depth, '[', ']')}}}`,
      () => `{"jsonrpc":"2.0","id":1,"method":"getAccessToken","params":${nested(Math.min(depth, 5000), '{"x":', '}', '0')}}`,
    ])();
    return { kind: 'deeply nested', bytes: Buffer.from(`${body.slice(0, MAX_FRAME_BYTES - 1)}\n`) };
  }
  if (r < 0.73) return { kind: 'oversized', bytes: Buffer.from(`${'z'.repeat(MAX_FRAME_BYTES + 1 + Math.floor(Math.random() * 1000))}\n`) };
  if (r < 0.8) {
    const junk = pick(['\n', '\r\n', '\n\n\n', '\u0000\n', '\ud800\n', '\u2028\n', ' \t \n', '{"jsonrpc":"2.0","id":1,"method":"status"}\r\n']);
    return { kind: 'blank/odd line', bytes: Buffer.from(junk) };
  }
  if (r < 0.9) {
    const valid = JSON.stringify({ jsonrpc: '2.0', id: 2, method: 'status' });
    return { kind: 'half-sent', bytes: Buffer.from(valid.slice(0, 1 + Math.floor(Math.random() * (valid.length - 1)))) };
  }
  return { kind: 'random text', bytes: Buffer.from(`${randomBytes(64).toString('base64')}\n`) };
}

function connect(socketPath: string): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const s = createConnection(socketPath);
    s.once('connect', () => {
      s.removeAllListeners('error');
      s.on('error', () => undefined);
      resolve(s);
    });
    s.once('error', reject);
  });
}

export interface HostileFigures {
  framesSent: number;
  connectionsOpened: number;
  refusedAtLimit: number;
  idleHeld: number;
  probeSamples: number;
  probeErrors: number;
  p50: number;
  p99: number;
  max: number;
  maxRssMb: number;
}

export async function hostileIpcInput(scale: ChaosScale, ledger: SecretLedger): Promise<HostileFigures> {
  const fx = await createFixture({ env: { QWEN_TOKEND_QWEN_CLI_SYNC: 'off', QWEN_TOKEND_LOG_LEVEL: 'info' } });
  const sockets = new Set<Socket>();
  let probe: ReturnType<typeof spawn> | null = null;
  try {
    await fx.writeOwn(credsFrom(fx.server));
    await fx.start();
    const pid = fx.proc!.pid!;

    // The well-formed client, connected first.
    probe = spawn(process.execPath, [PROBE], { env: { ...fx.env, PROBE_INTERVAL_MS: '10' }, stdio: ['pipe', 'pipe', 'inherit'] });
    const probeLines = createInterface({ input: probe.stdout! });
    const probeMessages: Array<Record<string, unknown>> = [];
    const probeWaiters: Array<() => void> = [];
    probeLines.on('line', (l) => {
      probeMessages.push(JSON.parse(l) as Record<string, unknown>);
      for (const w of probeWaiters.splice(0)) w();
    });
    const probeSays = (event: string) =>
      new Promise<Record<string, unknown>>((resolve) => {
        const check = () => {
          const m = probeMessages.find((x) => x.event === event);
          if (m) resolve(m);
          else probeWaiters.push(check);
        };
        check();
      });
    await probeSays('connected');

    let maxRss = (await rssBytes(pid)) ?? 0;
    const rssAtStart = maxRss;
    let sampling = true;
    const sampler = (async () => {
      while (sampling) {
        const rss = await rssBytes(pid);
        if (rss !== null) maxRss = Math.max(maxRss, rss);
        await sleep(50);
      }
    })();

    // Idle connections, held open for the whole run.
    let idle = 0;
    for (let i = 0; i < scale.idleConnections; i += 50) {
      const batch = await Promise.allSettled(Array.from({ length: Math.min(50, scale.idleConnections - i) }, () => connect(fx.socketPath)));
      for (const b of batch) {
        if (b.status === 'fulfilled') {
          sockets.add(b.value);
          idle++;
        }
      }
    }

    const rssWithIdle = (await rssBytes(pid)) ?? 0;
    // Hostile connections: each sends frames until the shared budget is spent, reconnecting
    // whenever the daemon closes it (oversized frame, half-sent frame dropped, limit reached).
    let framesLeft = scale.hostileFrames;
    let framesSent = 0;
    let opened = 0;
    let refused = 0;
    const refusedCodes = new Map<string, number>();
    let stalled = 0;
    const kinds = new Map<string, number>();
    const worker = async (n: number) => {
      const reader = n % 10 !== 0; // every tenth connection never reads its replies
      while (framesLeft > 0) {
        let socket: Socket;
        try {
          socket = await connect(fx.socketPath);
        } catch (err) {
          refused++;
          const code = String((err as NodeJS.ErrnoException).code);
          refusedCodes.set(code, (refusedCodes.get(code) ?? 0) + 1);
          await sleep(20);
          continue;
        }
        opened++;
        sockets.add(socket);
        let closed = false;
        socket.on('close', () => {
          closed = true;
          sockets.delete(socket);
        });
        if (reader) socket.on('data', () => undefined);
        else socket.pause();
        while (!closed && framesLeft > 0) {
          framesLeft--;
          const frame = hostileFrame();
          kinds.set(frame.kind, (kinds.get(frame.kind) ?? 0) + 1);
          framesSent++;
          const flushed = socket.write(frame.bytes);
          if (frame.kind === 'half-sent') {
            // Either hang up mid-frame or finish it later in another write.
            if (Math.random() < 0.7) {
              socket.destroy();
              break;
            }
            await sleep(Math.random() * 20);
            socket.write('\n');
          }
          if (!flushed) {
            // A daemon that stops reading us (backpressure) is fine: give up on this connection.
            const drained = await Promise.race([
              new Promise<boolean>((r) => (closed ? r(true) : socket.once('drain', () => r(true)).once('close', () => r(true)))),
              sleep(1_000).then(() => false),
            ]);
            if (!drained) {
              stalled++;
              break;
            }
          }
          if (framesSent % 200 === 0) await sleep(1);
        }
        socket.destroy();
      }
    };
    await Promise.all(Array.from({ length: scale.hostileConnections }, (_, n) => worker(n)));

    // Still up, still answering, memory bounded.
    probe.stdin!.end();
    const result = await probeSays('done');
    sampling = false;
    await sampler;
    expect(fx.proc?.exitCode ?? null, 'the daemon is still running').toBeNull();
    const after = fx.client({ minValidityMs: 0 });
    const status = await after.status();
    expect(status.state).toBe('valid');
    expect(status.pid).toBe(pid);
    for (const s of sockets) s.destroy();
    expect(bugLines(fx)).toEqual([]);

    const figures: HostileFigures = {
      framesSent,
      connectionsOpened: opened,
      refusedAtLimit: refused,
      idleHeld: idle,
      probeSamples: Number(result.samples),
      probeErrors: Number(result.errors),
      p50: Number(result.p50),
      p99: Number(result.p99),
      max: Number(result.max),
      maxRssMb: Math.round((maxRss / 1024 / 1024) * 10) / 10,
    };
    const limitWarnings = fx.logs().filter((l) => /connection limit reached/.test(String(l.msg))).length;
    report(`5 hostile IPC input (${scale.name})`, {
      'frames sent': figures.framesSent,
      'hostile connections opened': figures.connectionsOpened,
      'connects refused': `${figures.refusedAtLimit} (${[...refusedCodes.entries()].map(([c, n]) => `${c}:${n}`).join(' ')})`,
      'connection-limit warnings logged': limitWarnings,
      'connections the daemon stopped reading (backpressure)': stalled,
      [`idle connections held (limit ${MAX_CONNECTIONS})`]: figures.idleHeld,
      'probe answers': figures.probeSamples,
      'probe errors': figures.probeErrors,
      'getAccessToken p50 ms': figures.p50.toFixed(2),
      'p99 ms': figures.p99.toFixed(2),
      'max ms': figures.max.toFixed(2),
      'RSS MB at start': Math.round(rssAtStart / 1048576),
      'with idle connections': Math.round(rssWithIdle / 1048576),
      'max RSS MB': figures.maxRssMb,
      kinds: [...kinds.entries()].map(([k, v]) => `${k}:${v}`).join(' '),
    });
    expect(figures.idleHeld).toBe(scale.idleConnections);
    expect(figures.probeErrors, 'the well-formed client was always answered').toBe(0);
    expect(figures.probeSamples).toBeGreaterThan(0);
    expect(maxRss, 'daemon RSS').toBeLessThanOrEqual(RSS_LIMIT_BYTES);
    if (scale.assertLatency) expect(figures.p99, 'getAccessToken p99 (ms) under hostile load').toBeLessThanOrEqual(P99_LIMIT_MS);
    return figures;
  } finally {
    probe?.kill('SIGKILL');
    for (const s of sockets) s.destroy();
    ledger.addFixture(fx, 'hostile IPC');
    await fx.cleanup();
  }
}

export interface SlowReaderFigures {
  connections: number;
  framesSent: number;
  replyMbOwed: number;
  maxRssMb: number;
}

/**
 * Scenario 5b: clients that pipeline requests and never read the replies. Each connection sends
 * requests whose error replies add up to ~3.2 MiB (under the daemon's 4 MiB cut-off for one
 * connection, so it is not simply dropped); 40 of them owe ~130 MiB of replies together. The
 * daemon must not buffer all that: it may stop reading such clients, or drop them.
 */
export async function slowReaders(scale: ChaosScale, ledger: SecretLedger): Promise<SlowReaderFigures> {
  const fx = await createFixture({ env: { QWEN_TOKEND_QWEN_CLI_SYNC: 'off', QWEN_TOKEND_LOG_LEVEL: 'info' } });
  const sockets: Socket[] = [];
  try {
    await fx.writeOwn(credsFrom(fx.server));
    await fx.start();
    const pid = fx.proc!.pid!;
    // "method not found" echoes the id and the method name: a ~340-byte request earns a ~380-byte reply.
    const frame = Buffer.from(`${JSON.stringify({ jsonrpc: '2.0', id: 'i'.repeat(200), method: 'm'.repeat(100) })}\n`);
    const replyBytes = Buffer.byteLength(
      `${JSON.stringify({ jsonrpc: '2.0', id: 'i'.repeat(200), error: { code: -32601, message: `method not found: ${'m'.repeat(100)}` } })}\n`,
    );
    const framesEach = Math.floor((3.2 * 1024 * 1024) / replyBytes);
    const perWrite = Math.floor(65536 / frame.length);
    const batch = Buffer.concat(Array.from({ length: perWrite }, () => frame));
    const connections = scale.name === 'full' ? 50 : 40;
    let framesSent = 0;
    await Promise.all(
      Array.from({ length: connections }, async () => {
        const s = await connect(fx.socketPath);
        sockets.push(s);
        s.pause(); // never read
        let closed = false;
        s.on('close', () => (closed = true));
        for (let sent = 0; sent < framesEach && !closed; sent += perWrite) {
          const flushed = s.write(sent + perWrite <= framesEach ? batch : batch.subarray(0, (framesEach - sent) * frame.length));
          framesSent += Math.min(perWrite, framesEach - sent);
          if (!flushed) {
            // A busy daemon catches up within a second or two; one that stopped reading us never does.
            const drained = await Promise.race([new Promise<boolean>((r) => s.once('drain', () => r(true)).once('close', () => r(true))), sleep(2_000).then(() => false)]);
            if (!drained) break; // the daemon stopped reading us: that is the point
          }
        }
      }),
    );
    let maxRss = 0;
    for (let i = 0; i < 20; i++) {
      maxRss = Math.max(maxRss, (await rssBytes(pid)) ?? 0);
      await sleep(50);
    }
    const status = await fx.client({ minValidityMs: 0 }).status();
    expect(status.pid).toBe(pid);
    const figures: SlowReaderFigures = {
      connections,
      framesSent,
      replyMbOwed: Math.round((framesSent * replyBytes) / 1048576),
      maxRssMb: Math.round((maxRss / 1048576) * 10) / 10,
    };
    report(`5b clients that never read (${scale.name})`, {
      connections: figures.connections,
      'frames pipelined': figures.framesSent,
      'reply MiB owed to them': figures.replyMbOwed,
      'max RSS MB': figures.maxRssMb,
    });
    expect(maxRss, 'daemon RSS with clients that never read').toBeLessThanOrEqual(RSS_LIMIT_BYTES);
    return figures;
  } finally {
    for (const s of sockets) s.destroy();
    ledger.addFixture(fx, 'slow readers');
    await fx.cleanup();
  }
}
