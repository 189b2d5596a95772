/**
 * The socket protocol and the client library against the real daemon process: many client
 * processes, single-flight over the socket, reconnects, autostart, hostile frames, permissions,
 * and a non-Node client.
 */
import { spawn, execFile, type ChildProcess } from 'node:child_process';
import { chmod, mkdir, readFile, stat, writeFile } from 'node:fs/promises';
import { createConnection, type Socket } from 'node:net';
import { dirname, join } from 'node:path';
import { createInterface } from 'node:readline';
import { promisify } from 'node:util';
import { afterEach, describe, expect, it } from 'vitest';
import { fingerprint } from '../shared/fingerprint.js';
import { MAX_FRAME_BYTES, StatusResult } from '../shared/protocol.js';
import { QwenDaemonUnavailableError } from '../shared/errors.js';
import { TokenClient } from '../client/token-client.js';
import { DAEMON_GLIBC_TUNABLES, DAEMON_NODE_FLAGS } from '../client/autostart.js';
import { DAEMON_BIN, REPO_ROOT, createFixture, credsFrom, type DaemonFixture } from './support/daemon.js';
import { until } from './support/wait.js';

const CHILD = join(REPO_ROOT, 'test', 'support', 'client-child.mjs');
let fx: DaemonFixture;
const children: ChildProcess[] = [];

afterEach(async () => {
  for (const c of children.splice(0)) c.kill('SIGKILL');
  await fx?.cleanup();
});

interface ChildMessage {
  event: string;
  fp?: string;
  cached?: string;
  at?: number;
  code?: string;
}

function startChild(env: NodeJS.ProcessEnv): { proc: ChildProcess; messages: ChildMessage[]; next: (event: string) => Promise<ChildMessage> } {
  const proc = spawn(process.execPath, [CHILD], { env, stdio: ['pipe', 'pipe', 'inherit'] });
  children.push(proc);
  const messages: ChildMessage[] = [];
  const waiters: Array<{ event: string; resolve: (m: ChildMessage) => void }> = [];
  createInterface({ input: proc.stdout! }).on('line', (line) => {
    const msg = JSON.parse(line) as ChildMessage;
    messages.push(msg);
    for (const w of waiters.splice(0)) {
      if (w.event === msg.event || msg.event === 'error') w.resolve(msg);
      else waiters.push(w);
    }
  });
  const next = (event: string) =>
    new Promise<ChildMessage>((resolve) => {
      const found = messages.find((m) => m.event === event || m.event === 'error');
      if (found) resolve(found);
      else waiters.push({ event, resolve });
    });
  return { proc, messages, next };
}

/** Sends raw bytes on a fresh connection and collects the lines it gets back. */
function rawConnection(socketPath: string): Promise<{ socket: Socket; lines: string[] }> {
  return new Promise((resolve, reject) => {
    const socket = createConnection(socketPath);
    const lines: string[] = [];
    let buf = '';
    socket.on('data', (d) => {
      buf += d.toString();
      let nl = buf.indexOf('\n');
      while (nl !== -1) {
        lines.push(buf.slice(0, nl));
        buf = buf.slice(nl + 1);
        nl = buf.indexOf('\n');
      }
    });
    socket.on('error', () => undefined);
    socket.once('connect', () => resolve({ socket, lines }));
    socket.once('error', reject);
  });
}

describe('IPC', () => {
  it('20 client processes get the same token; a forced refresh is pushed to all of them', async () => {
    fx = await createFixture();
    const seeded = credsFrom(fx.server);
    await fx.writeOwn(seeded);
    await fx.start();
    const kids = Array.from({ length: 20 }, () => startChild(fx.env));
    const first = await Promise.all(kids.map((k) => k.next('token')));
    expect(first.every((m) => m.event === 'token' && m.fp === fingerprint(seeded.access_token))).toBe(true);
    const admin = fx.client();
    const before = (await admin.status()).requests_served;
    const refreshed = await admin.refresh();
    // The daemon pushes to subscribers just before it answers a forced refresh (that answer
    // waits for the write), so the admin's answer is the reference point for the pushes.
    const answeredAt = Date.now();
    const pushes = await Promise.all(kids.map((k) => k.next('pushed')));
    const latencies = pushes.map((p) => Math.max(0, p.at! - answeredAt)).sort((a, b) => a - b);
    console.log(`push after the refresh answer, 20 processes: median ${latencies[10]} ms, max ${latencies[19]} ms`);
    for (const p of pushes) {
      expect(p.fp).toBe(fingerprint(refreshed.access_token));
      expect(p.cached).toBe(fingerprint(refreshed.access_token));
    }
    // The children answered from their pushed cache: only the admin's refresh + status reached the daemon.
    const after = (await admin.status()).requests_served;
    expect(after - before).toBe(2);
  });

  it('an expired token and 500 concurrent getAccessToken calls over the socket cause exactly one refresh', async () => {
    fx = await createFixture();
    await fx.writeOwn({ ...credsFrom(fx.server), expiry_date: Date.now() + 400 });
    await fx.start({ QWEN_TOKEND_REFRESH_LEAD_MS: '0' });
    const clients = Array.from({ length: 10 }, () => fx.client());
    await Promise.all(clients.map((c) => c.hello()));
    await new Promise((r) => setTimeout(r, 450)); // now it has expired
    fx.server.injectFault({ kind: 'delay', delayMs: 150, times: 1 });
    const tokens = await Promise.all(
      clients.flatMap((c) => Array.from({ length: 50 }, () => c.getAccessToken({ noCache: true, minValidityMs: 0 }))),
    );
    expect(tokens).toHaveLength(500);
    expect(new Set(tokens).size).toBe(1);
    expect(fx.server.counts.refresh).toBe(1);
  });

  it('a caller waiting on a refresh gets its answer before the push of the same token', async () => {
    fx = await createFixture();
    // Valid for an hour, so nothing refreshes until the call below asks for two.
    await fx.writeOwn(credsFrom(fx.server, 3600));
    await fx.start();
    const { socket, lines } = await rawConnection(fx.socketPath);
    socket.write('{"jsonrpc":"2.0","id":1,"method":"subscribe"}\n');
    await until(() => lines.length >= 1, 'the subscribe answer', 3000);
    socket.write('{"jsonrpc":"2.0","id":2,"method":"getAccessToken","params":{"minValidityMs":7200000}}\n');
    type Line = { id?: number; method?: string; result?: { access_token: string }; params?: { access_token: string } };
    const parsed = () => lines.slice(1).map((l) => JSON.parse(l) as Line);
    await until(() => parsed().some((l) => l.method === 'token.refreshed'), 'the push', 5000);
    socket.destroy();
    // A refresh slower than the state's settle time (a loaded machine) adds a state push; only
    // the order of the answer and the token's push matters here.
    const order = parsed().filter((l) => l.id === 2 || l.method === 'token.refreshed');
    const [answer, push] = order;
    expect(answer?.id).toBe(2);
    expect(push?.method).toBe('token.refreshed');
    expect(push?.params?.access_token).toBe(answer?.result?.access_token);
    expect(fx.server.counts.refresh).toBe(1);
  });

  it('clients reconnect after the daemon is killed and restarted', async () => {
    fx = await createFixture();
    await fx.writeOwn(credsFrom(fx.server));
    await fx.start();
    const client = fx.client({ reconnectWindowMs: 8000 });
    const token = await client.getAccessToken();
    await fx.stop('SIGKILL');
    // A call while the daemon is down waits (with backoff) for it to come back.
    const pending = client.getAccessToken({ noCache: true });
    await new Promise((r) => setTimeout(r, 200));
    await fx.start();
    expect(await pending).toBe(token);
    expect((await client.status()).pid).toBe(fx.proc!.pid);
  });

  it('a call already waiting on an open connection when the daemon dies is answered by the restarted daemon', async () => {
    fx = await createFixture();
    await fx.writeOwn({ ...credsFrom(fx.server), expiry_date: Date.now() - 1000 });
    // The start-up refresh hangs, so the call below waits on it, on an open connection.
    fx.server.injectFault({ kind: 'delay', endpoint: 'token', delayMs: 5_000, times: 1 });
    await fx.start();
    const client = fx.client({ reconnectWindowMs: 8000 });
    await client.hello();
    const pending = client.getAccessToken();
    await new Promise((r) => setTimeout(r, 100));
    await fx.stop('SIGKILL');
    await fx.start();
    const token = await pending;
    expect(token).toBe((await fx.readOwn())?.access_token);
    expect((await client.status()).pid).toBe(fx.proc!.pid);
  });

  it('with autostart on and no daemon, the first getAccessToken starts one (the packaged bundle by default)', async () => {
    fx = await createFixture();
    await fx.writeOwn(credsFrom(fx.server));
    const { QWEN_TOKEND_BIN: _unset, ...env } = fx.env;
    const client = new TokenClient({ env: { ...env, QWEN_TOKEND_AUTOSTART: '1' } });
    try {
      const token = await client.getAccessToken();
      expect(token).toBe((await fx.readOwn())?.access_token);
      const status = await client.status();
      expect(status.pid).toBeGreaterThan(0);
      if (process.platform === 'linux') {
        const argv = (await readFile(`/proc/${status.pid}/cmdline`, 'utf8')).split('\0');
        // node, its flags for the daemon, the bundle.
        expect(argv.slice(1).filter((a) => a !== '')).toEqual([...DAEMON_NODE_FLAGS, DAEMON_BIN]);
        // And the C library's settings for it, unless the caller had its own.
        const environ = (await readFile(`/proc/${status.pid}/environ`, 'utf8')).split('\0');
        expect(environ).toContain(`GLIBC_TUNABLES=${process.env.GLIBC_TUNABLES ?? DAEMON_GLIBC_TUNABLES}`);
      }
      process.kill(status.pid, 'SIGTERM');
      await until(async () => !(await stat(fx.socketPath).then(() => true, () => false)), 'daemon exit', 5000);
    } finally {
      await client.close();
    }
  });

  it('without autostart and no daemon, clients get QwenDaemonUnavailableError naming the socket', async () => {
    fx = await createFixture();
    // The reconnect window is for restarts: a daemon that was never there is reported at once.
    // With a 60 s window, waiting it out would blow this test's 20 s timeout.
    const client = fx.client({ reconnectWindowMs: 60_000 });
    const err = await client.getAccessToken().catch((e: unknown) => e);
    expect(err).toBeInstanceOf(QwenDaemonUnavailableError);
    expect((err as Error).message).toContain(fx.socketPath);
  });

  it('malformed, oversized and half-sent frames leave the daemon serving others', async () => {
    fx = await createFixture();
    const seeded = credsFrom(fx.server);
    await fx.writeOwn(seeded);
    await fx.start();
    const bad = await Promise.all(Array.from({ length: 30 }, () => rawConnection(fx.socketPath)));
    bad[0]!.socket.write('{not json\n');
    bad[1]!.socket.write(`${JSON.stringify({ jsonrpc: '2.0', id: 7, method: 'nope' })}\n`);
    bad[2]!.socket.write(`${JSON.stringify({ jsonrpc: '1.0', id: 8, method: 'status' })}\n`);
    bad[3]!.socket.write(`${JSON.stringify({ jsonrpc: '2.0', id: 9, method: 'getAccessToken', params: { minValidityMs: 'soon' } })}\n`);
    bad[4]!.socket.write(`${'x'.repeat(MAX_FRAME_BYTES + 10)}\n`);
    bad[5]!.socket.write('['.repeat(20000) + ']'.repeat(20000) + '\n');
    bad[6]!.socket.write('{"jsonrpc":"2.0","id":1,"method":"getAcc'); // half a frame, never finished
    bad[7]!.socket.write(Buffer.from([0xff, 0xfe, 0x00, 0x0a]));
    for (const b of bad.slice(8)) b.socket.write('y'.repeat(MAX_FRAME_BYTES + 1)); // oversized without newline
    await until(() => bad[0]!.lines.length > 0 && bad[1]!.lines.length > 0 && bad[2]!.lines.length > 0 && bad[3]!.lines.length > 0 && bad[4]!.lines.length > 0 && bad[5]!.lines.length > 0, 'error replies', 3000);
    expect(JSON.parse(bad[0]!.lines[0]!).error.code).toBe(-32700);
    expect(JSON.parse(bad[1]!.lines[0]!).error.code).toBe(-32601);
    expect(JSON.parse(bad[1]!.lines[0]!).id).toBe(7);
    expect(JSON.parse(bad[2]!.lines[0]!).error.code).toBe(-32600);
    expect(JSON.parse(bad[3]!.lines[0]!).error.code).toBe(-32602);
    expect(JSON.parse(bad[3]!.lines[0]!).error.message).toMatch(/^invalid params: minValidityMs: /);
    expect(JSON.parse(bad[3]!.lines[0]!).id).toBe(9);
    expect(JSON.parse(bad[4]!.lines[0]!).error.message).toMatch(/exceeds/);
    expect(JSON.parse(bad[5]!.lines[0]!).error.code).toBe(-32600);
    // Meanwhile a well-formed client is served.
    const good = await rawConnection(fx.socketPath);
    const trickyId = 'a"\\\n\u2028}';
    good.socket.write(`${JSON.stringify({ jsonrpc: '2.0', id: trickyId, method: 'getAccessToken' })}\n`);
    await until(() => good.lines.length > 0, 'token reply', 3000);
    const reply = JSON.parse(good.lines[0]!);
    expect(reply.id).toBe(trickyId);
    expect(reply.result.access_token).toBe(seeded.access_token);
    expect(reply.result.base_url).toBe('https://portal.qwen.ai/v1');
    for (const b of bad) b.socket.destroy();
    good.socket.destroy();
    const status = StatusResult.parse(await fx.client().status());
    expect(status.state).toBe('valid');
  });

  it('a connection that sends nothing is closed after QWEN_TOKEND_SILENT_CONNECTION_TIMEOUT_MS; one that spoke stays open', async () => {
    fx = await createFixture({ env: { QWEN_TOKEND_SILENT_CONNECTION_TIMEOUT_MS: '300' } });
    await fx.writeOwn(credsFrom(fx.server));
    await fx.start();
    const silent = await rawConnection(fx.socketPath);
    const spoke = await rawConnection(fx.socketPath);
    let silentClosed = false;
    let spokeClosed = false;
    silent.socket.once('close', () => (silentClosed = true));
    spoke.socket.once('close', () => (spokeClosed = true));
    spoke.socket.write(`${JSON.stringify({ jsonrpc: '2.0', id: 1, method: 'hello', params: { protocol: 1 } })}\n`);
    await until(() => silentClosed, 'the daemon to close the silent connection', 5_000);
    // Well past the timeout: the connection that sent a frame is still served.
    await new Promise((r) => setTimeout(r, 600));
    spoke.socket.write(`${JSON.stringify({ jsonrpc: '2.0', id: 2, method: 'hello', params: { protocol: 1 } })}\n`);
    await until(() => spoke.lines.length === 2, 'both hello answers', 3_000);
    expect(spokeClosed).toBe(false);
    expect(silent.lines).toEqual([]);
    spoke.socket.destroy();
  });

  it('the socket is 0600 in a 0700 directory, and a looser directory is refused', async () => {
    fx = await createFixture();
    await fx.start();
    expect((await stat(fx.socketPath)).mode & 0o777).toBe(0o600);
    expect((await stat(dirname(fx.socketPath))).mode & 0o777).toBe(0o700);
    await fx.stop();
    await chmod(dirname(fx.socketPath), 0o755);
    const proc = spawn(process.execPath, [DAEMON_BIN], { env: fx.env, stdio: ['ignore', 'pipe', 'pipe'] });
    let stderr = '';
    proc.stderr!.on('data', (c: Buffer) => (stderr += c.toString()));
    const code = await new Promise<number | null>((done) => proc.once('exit', (c) => done(c)));
    expect(code).toBe(78);
    expect(stderr).toContain('mode 0755');
    expect(stderr).toContain(dirname(fx.socketPath));
  });

  it('refuses a socket path over the platform limit, naming it', async () => {
    fx = await createFixture();
    const deep = join(fx.root, 'r'.repeat(60), 's'.repeat(60));
    await mkdir(deep, { recursive: true, mode: 0o700 });
    const path = join(deep, 'qwen-tokend.sock');
    const proc = spawn(process.execPath, [DAEMON_BIN], { env: { ...fx.env, QWEN_TOKEND_SOCKET: path }, stdio: ['ignore', 'pipe', 'pipe'] });
    let stderr = '';
    proc.stderr!.on('data', (c: Buffer) => (stderr += c.toString()));
    const code = await new Promise<number | null>((done) => proc.once('exit', (c) => done(c)));
    expect(code).toBe(78);
    expect(stderr).toContain(path);
  });

  it('never unlinks a non-socket file at the socket path', async () => {
    fx = await createFixture();
    await writeFile(fx.socketPath, 'precious');
    const proc = spawn(process.execPath, [DAEMON_BIN], { env: fx.env, stdio: ['ignore', 'pipe', 'pipe'] });
    const code = await new Promise<number | null>((done) => proc.once('exit', (c) => done(c)));
    expect(code).not.toBe(0);
    const { readFile } = await import('node:fs/promises');
    expect(await readFile(fx.socketPath, 'utf8')).toBe('precious');
  });

  it('a stale socket file left by a killed daemon is replaced', async () => {
    fx = await createFixture();
    await fx.start();
    await fx.stop('SIGKILL');
    expect((await stat(fx.socketPath)).isSocket()).toBe(true);
    await fx.start();
    expect((await fx.client().hello()).pid).toBe(fx.proc!.pid);
  });

  it('subscribers hear a quick successful refresh as one token.refreshed, and a failure as one settled state.changed', async () => {
    fx = await createFixture();
    await fx.writeOwn(credsFrom(fx.server));
    await fx.start();
    const sub = await rawConnection(fx.socketPath);
    sub.socket.write(`${JSON.stringify({ jsonrpc: '2.0', id: 1, method: 'subscribe' })}\n`);
    await until(() => sub.lines.length === 1, 'subscribed');
    const admin = fx.client();
    await admin.refresh(); // warm-up: the first refresh also loads the daemon's HTTP stack
    await new Promise((r) => setTimeout(r, 600)); // longer than the 250 ms state settle time
    sub.lines.splice(1);
    await admin.refresh();
    await new Promise((r) => setTimeout(r, 600));
    const methods = () => sub.lines.slice(1).map((l) => JSON.parse(l).method as string);
    expect(methods()).toEqual(['token.refreshed']);
    fx.server.injectFault({ kind: '5xx', times: 1 });
    await admin.refresh().catch(() => undefined);
    await until(() => methods().includes('state.changed'), 'state.changed');
    await new Promise((r) => setTimeout(r, 600));
    expect(methods()).toEqual(['token.refreshed', 'token.refresh_failed', 'state.changed']);
    expect(JSON.parse(sub.lines.at(-1)!).params).toEqual({ state: 'retrying', previous: 'valid' });
    sub.socket.destroy();
  });

  it('a client process exits by itself after getAccessToken without calling close()', async () => {
    fx = await createFixture();
    await fx.writeOwn(credsFrom(fx.server));
    await fx.start();
    const script = [
      `import { getAccessToken, fingerprint } from ${JSON.stringify(join(REPO_ROOT, 'dist', 'client', 'index.js'))};`,
      'const token = await getAccessToken();',
      'console.log(fingerprint(token));',
    ].join('\n');
    const child = spawn(process.execPath, ['--input-type=module', '-e', script], { env: fx.env, stdio: ['ignore', 'pipe', 'inherit'] });
    let out = '';
    child.stdout!.on('data', (c: Buffer) => (out += c.toString()));
    // If the idle socket kept the event loop alive, this would never resolve (test timeout).
    const code = await new Promise<number | null>((done) => child.once('exit', (c) => done(c)));
    expect(code).toBe(0);
    expect(out.trim()).toBe(fingerprint((await fx.readOwn())!.access_token));
  });

  it('a Python client using only the socket module gets the token (the README example)', async () => {
    fx = await createFixture();
    const seeded = credsFrom(fx.server);
    await fx.writeOwn(seeded);
    await fx.start();
    const script = [
      'import json, os, socket',
      's = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)',
      's.connect(os.environ["QWEN_TOKEND_SOCKET"])',
      's.sendall(b\'{"jsonrpc":"2.0","id":1,"method":"getAccessToken"}\\n\')',
      'reply = json.loads(s.makefile().readline())',
      'token = reply["result"]["access_token"]',
      'import hashlib',
      'h = hashlib.sha256(token.encode()).hexdigest()',
      'print(h[:4] + "\\u2026" + h[-4:])',
    ].join('\n');
    const { stdout } = await promisify(execFile)('python3', ['-c', script], { env: fx.env });
    expect(stdout.trim()).toBe(fingerprint(seeded.access_token));
  });
});
