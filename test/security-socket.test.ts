/**
 * Issue 18, item 2: a client checks the socket before it connects, as the daemon checks it
 * before it listens. Another user who controls the socket's directory (or one above it) could
 * otherwise stand in for the daemon and hand out tokens, base URLs and device codes.
 * The tests run as root and give directories to uid 65534 (nobody) to play the other user.
 */
import { spawn } from 'node:child_process';
import { chmod, chown, mkdir, mkdtemp, rm } from 'node:fs/promises';
import { createServer, type Server } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { TokenClient } from '../client/token-client.js';
import { QwenConfigError } from '../shared/errors.js';
import { DAEMON_BIN } from './support/daemon.js';

const OTHER_UID = 65534;
const isRoot = process.getuid?.() === 0;

/** A stand-in "daemon": answers like the real one and records every byte it receives. */
async function impostor(socketPath: string): Promise<{ received: () => string; connections: () => number; close: () => Promise<void> }> {
  let data = '';
  let connections = 0;
  const server: Server = createServer((socket) => {
    connections += 1;
    socket.on('data', (chunk) => {
      data += chunk.toString('utf8');
      for (const line of chunk.toString('utf8').split('\n').filter(Boolean)) {
        const req = JSON.parse(line) as { id: number; method: string };
        const result =
          req.method === 'hello'
            ? { protocol: 1, daemon: 'qwen-tokend', version: '0.0.0', pid: 1 }
            : req.method === 'subscribe'
              ? { subscribed: true }
              : { access_token: 'planted-token-value', token_type: 'Bearer', expiry_date: Date.now() + 3_600_000, base_url: 'http://127.0.0.1:9/v1' };
        socket.write(`${JSON.stringify({ jsonrpc: '2.0', id: req.id, result })}\n`);
      }
    });
  });
  await new Promise<void>((done) => server.listen(socketPath, done));
  return {
    received: () => data,
    connections: () => connections,
    close: () => new Promise<void>((done) => server.close(() => done())),
  };
}

const cleanups: Array<() => Promise<void>> = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c().catch(() => undefined);
});

async function tempRoot(): Promise<string> {
  const root = await mkdtemp(join(tmpdir(), 'qtd-sock-'));
  cleanups.push(() => rm(root, { recursive: true, force: true }));
  return root;
}

function client(root: string, socketPath: string): TokenClient {
  const c = new TokenClient({ env: { HOME: join(root, 'home'), QWEN_TOKEND_AUTOSTART: '0' }, socketPath, autostart: false, reconnectWindowMs: 200 });
  cleanups.push(() => c.close());
  return c;
}

describe.skipIf(!isRoot)('the client checks the socket before connecting', () => {
  it('refuses a socket whose directory belongs to another user, and sends it nothing', async () => {
    const root = await tempRoot();
    const dir = join(root, 'theirs');
    await mkdir(dir, { mode: 0o700 });
    const socketPath = join(dir, 'd.sock');
    const fake = await impostor(socketPath);
    cleanups.push(fake.close);
    await chown(dir, OTHER_UID, OTHER_UID);

    const err = await client(root, socketPath).getAccessToken().catch((e: unknown) => e);
    expect(err).toBeInstanceOf(QwenConfigError);
    expect((err as Error).message).toMatch(/refusing to connect .*belongs to uid 65534/);
    expect(fake.connections()).toBe(0);
    expect(fake.received()).toBe('');
  });

  it('refuses a socket owned by another user in a private directory', async () => {
    const root = await tempRoot();
    const dir = join(root, 'run');
    await mkdir(dir, { mode: 0o700 });
    const socketPath = join(dir, 'd.sock');
    const fake = await impostor(socketPath);
    cleanups.push(fake.close);
    await chown(socketPath, OTHER_UID, OTHER_UID);

    const err = await client(root, socketPath).getAccessToken().catch((e: unknown) => e);
    expect(err).toBeInstanceOf(QwenConfigError);
    expect((err as Error).message).toContain('belongs to uid 65534');
    expect(fake.connections()).toBe(0);
  });

  it('refuses a private socket directory inside a directory others may write to', async () => {
    const root = await tempRoot();
    const shared = join(root, 'shared');
    await mkdir(shared);
    await chmod(shared, 0o777);
    const dir = join(shared, 'qwen-tokend');
    await mkdir(dir, { mode: 0o700 });
    const socketPath = join(dir, 'd.sock');
    const fake = await impostor(socketPath);
    cleanups.push(fake.close);

    const err = await client(root, socketPath).getAccessToken().catch((e: unknown) => e);
    expect(err).toBeInstanceOf(QwenConfigError);
    expect((err as Error).message).toContain(`${shared} is writable by group/others`);
    expect(fake.received()).toBe('');
  });

  it('refuses a group-accessible socket directory', async () => {
    const root = await tempRoot();
    const dir = join(root, 'run');
    await mkdir(dir);
    const socketPath = join(dir, 'd.sock');
    const fake = await impostor(socketPath);
    cleanups.push(fake.close);
    await chmod(dir, 0o750);

    const err = await client(root, socketPath).getAccessToken().catch((e: unknown) => e);
    expect(err).toBeInstanceOf(QwenConfigError);
    expect((err as Error).message).toContain('accessible by group/others (mode 0750)');
    expect(fake.received()).toBe('');
  });

  it('connects through a sticky shared directory (like /tmp) to a private directory of its own', async () => {
    const root = await tempRoot();
    const sticky = join(root, 'tmp');
    await mkdir(sticky);
    await chmod(sticky, 0o1777);
    const dir = join(sticky, 'mine');
    await mkdir(dir, { mode: 0o700 });
    const socketPath = join(dir, 'd.sock');
    const fake = await impostor(socketPath);
    cleanups.push(fake.close);

    expect(await client(root, socketPath).getAccessToken()).toBe('planted-token-value');
    expect(fake.connections()).toBe(1);
  });
});

describe.skipIf(!isRoot)('the daemon walks the parents of its socket directory', () => {
  it('refuses to listen under a directory others may write to (exit 78, a clear message)', async () => {
    const root = await tempRoot();
    const shared = join(root, 'shared');
    await mkdir(shared);
    await chmod(shared, 0o777);
    await mkdir(join(root, 'home'), { mode: 0o700 });
    const socketPath = join(shared, 'qwen-tokend', 'd.sock');
    const env: NodeJS.ProcessEnv = { PATH: process.env.PATH, HOME: join(root, 'home'), QWEN_TOKEND_SOCKET: socketPath, QWEN_TOKEND_QWEN_CLI_SYNC: '0' };
    const proc = spawn(process.execPath, [DAEMON_BIN], { env, stdio: ['ignore', 'pipe', 'pipe'] });
    let stderr = '';
    proc.stderr.on('data', (c: Buffer) => (stderr += c.toString('utf8')));
    const code = await new Promise<number | null>((done) => {
      const timer = setTimeout(() => proc.kill('SIGTERM'), 10_000);
      proc.once('exit', (c) => {
        clearTimeout(timer);
        done(c);
      });
    });
    expect(code).toBe(78);
    expect(stderr).toContain(`${shared} is writable by group/others`);
  });
});
