/**
 * Signals to the real daemon: SIGTERM/SIGINT stop it cleanly (exit 0, socket removed, instance
 * lock released, credential files whole) even in the middle of a refresh; SIGHUP re-reads the
 * credential files and reopens the log file.
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { readdir, readFile, rename, stat } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { parseCredentialsText, serializeCredentials } from '../shared/credentials.js';
import { QwenDaemonUnavailableError } from '../shared/errors.js';
import { fingerprint } from '../shared/fingerprint.js';
import { assertNoSecrets, createFixture, credsFrom, DAEMON_BIN, type DaemonFixture } from './support/daemon.js';
import { until } from './support/wait.js';

/** Polls `check` every 10 ms until it holds; throws with `what` after `timeoutMs`. */
let fx: DaemonFixture | null = null;
let ownDaemon: ChildProcess | null = null;

afterEach(async () => {
  if (ownDaemon && ownDaemon.exitCode === null && ownDaemon.signalCode === null) {
    const exited = new Promise((r) => ownDaemon!.once('exit', r));
    ownDaemon.kill('SIGKILL');
    await exited;
  }
  ownDaemon = null;
  await fx?.cleanup();
  fx = null;
});

/** What a clean stop leaves behind: no socket, no lock, no pid file, no temp files, a valid credential file. */
async function expectCleanlyStopped(f: DaemonFixture, credentialText: string): Promise<void> {
  const stateDir = dirname(f.tokenPath);
  expect(existsSync(f.socketPath)).toBe(false);
  expect(existsSync(join(stateDir, 'qwen-tokend.lock'))).toBe(false);
  expect(existsSync(join(stateDir, 'qwen-tokend.pid'))).toBe(false);
  expect((await readdir(stateDir)).filter((n) => n.endsWith('.tmp'))).toEqual([]);
  const text = await readFile(f.tokenPath, 'utf8');
  // Parses and validates with the shared schema; unchanged byte for byte.
  expect(() => parseCredentialsText(text, f.tokenPath)).not.toThrow();
  expect(text === credentialText).toBe(true);
  expect((await stat(f.tokenPath)).mode & 0o777).toBe(0o600);
  const logs = f.logs().map((l) => l.msg);
  expect(logs).toContain('shutting down');
  expect(logs).toContain('stopped');
}

describe('SIGTERM / SIGINT', () => {
  it('SIGTERM during a refresh: exit 0, socket removed, lock released, credentials intact', { timeout: 15_000 }, async () => {
    fx = await createFixture();
    await fx.writeOwn(credsFrom(fx.server));
    const before = await readFile(fx.tokenPath, 'utf8');
    await fx.start();
    const client = fx.client({ reconnectWindowMs: 0 });
    await client.status();

    fx.server.injectFault({ kind: 'delay', delayMs: 5_000, endpoint: 'token', times: 1 });
    const refreshing = client.refresh().then(
      () => 'refreshed',
      (err: unknown) => err,
    );
    await until(() => fx!.server.counts.refresh >= 1, 'the refresh request to reach the server');

    expect(await fx.stop('SIGTERM')).toBe(0);
    await expectCleanlyStopped(fx, before);
    // The client hears that the daemon went away instead of hanging.
    expect(await refreshing).toBeInstanceOf(QwenDaemonUnavailableError);
    expect(fx.logs().some((l) => l.msg === 'shutdown took too long; exiting anyway')).toBe(false);

    // The instance lock really is free: a new daemon starts on the same state dir and serves.
    await fx.start();
    const again = fx.client();
    expect((await again.status()).token_fingerprint).toBe(fingerprint(parseCredentialsText(before, 'before').access_token));
  });

  it('SIGTERM while a quick refresh is at the server: the refresh completes and is saved first', { timeout: 15_000 }, async () => {
    fx = await createFixture();
    const seeded = credsFrom(fx.server);
    await fx.writeOwn(seeded);
    await fx.start();
    const client = fx.client({ reconnectWindowMs: 0 });
    await client.status();
    // The server rotates the refresh token once it answers: abandoning this refresh would leave
    // only the retired refresh token on disk and force a new login after the restart.
    fx.server.injectFault({ kind: 'delay', delayMs: 300, endpoint: 'token', times: 1 });
    void client.refresh().catch(() => undefined);
    await until(() => fx!.server.counts.refresh >= 1, 'the refresh request to reach the server');
    expect(await fx.stop('SIGTERM')).toBe(0);
    const saved = await fx.readOwn();
    expect(saved?.refresh_token).not.toBe(seeded.refresh_token);
    await fx.start();
    await fx.client().refresh();
    expect(fx.server.reuseCount).toBe(0);
    expect((await fx.client().status()).state).toBe('valid');
  });

  it('SIGINT: exit 0, socket removed, lock released, credentials intact', { timeout: 15_000 }, async () => {
    fx = await createFixture();
    await fx.writeOwn(credsFrom(fx.server));
    const before = await readFile(fx.tokenPath, 'utf8');
    await fx.start();
    await fx.client().status();
    expect(await fx.stop('SIGINT')).toBe(0);
    await expectCleanlyStopped(fx, before);
    await fx.start();
  });
});

/**
 * Rewrites a file in place through a shared memory mapping. inotify reports nothing for writes
 * through mmap, so the daemon's file watcher cannot see this change: only a SIGHUP re-read can.
 */
function writeUnseen(path: string, text: string): Promise<void> {
  const script = [
    'import mmap, sys',
    'data = sys.argv[2].encode()',
    'with open(sys.argv[1], "r+b") as f:',
    '    m = mmap.mmap(f.fileno(), 0)',
    '    assert len(m) == len(data), "same length needed"',
    '    m[:] = data',
    '    m.flush()',
    '    m.close()',
  ].join('\n');
  return new Promise((done, fail) => {
    execFile('python3', ['-c', script, path, text], (err, _out, stderr) => (err ? fail(new Error(stderr || err.message)) : done()));
  });
}

describe('SIGHUP', () => {
  it('re-reads the credential files and keeps running', { timeout: 15_000 }, async () => {
    // Without the Qwen CLI link only our own file is read, so the test is about that file alone.
    fx = await createFixture({ env: { QWEN_TOKEND_QWEN_CLI_SYNC: 'off' } });
    const first = credsFrom(fx.server, 3_600);
    await fx.writeOwn(first);
    await fx.start();
    const client = fx.client();
    expect((await client.status()).token_fingerprint).toBe(fingerprint(first.access_token));

    // Newer credentials, serialized to the same length (tokens and expiry have fixed widths).
    const newer = credsFrom(fx.server, 7_200);
    const text = serializeCredentials(newer);
    await writeUnseen(fx.tokenPath, text);
    expect(await readFile(fx.tokenPath, 'utf8')).toBe(text);
    // Unnoticed so far: the watcher saw nothing.
    expect((await client.status()).token_fingerprint).toBe(fingerprint(first.access_token));

    const logMark = fx.logs().length;
    fx.proc!.kill('SIGHUP');
    await until(async () => (await client.status()).token_fingerprint === fingerprint(newer.access_token), 'the daemon to adopt the file');
    const token = await client.getAccessToken({ noCache: true });
    expect(token === newer.access_token).toBe(true);
    expect(fx.proc!.exitCode).toBeNull();
    expect(fx.proc!.signalCode).toBeNull();
    const after = fx.logs().slice(logMark).map((l) => l.msg);
    expect(after).toContain('SIGHUP: re-reading credential files');
    expect(after).toContain('adopted newer credentials written by another process');
    expect(await fx.stop('SIGTERM')).toBe(0);
  });

  it('reopens QWEN_TOKEND_LOG_FILE: after the file is moved away, new lines go to a fresh file', { timeout: 15_000 }, async () => {
    fx = await createFixture();
    const logFile = join(fx.root, 'logs', 'qwen-tokend.log');
    const rotated = `${logFile}.1`;
    // Logging to a file means no `ready` line on stdout for the fixture to wait for: run it here.
    const proc = spawn(process.execPath, [DAEMON_BIN], {
      env: { ...fx.env, QWEN_TOKEND_LOG_FILE: logFile, QWEN_TOKEND_LOG_LEVEL: 'info' },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    ownDaemon = proc;
    let consoleOutput = '';
    proc.stdout!.on('data', (c: Buffer) => (consoleOutput += c.toString()));
    proc.stderr!.on('data', (c: Buffer) => (consoleOutput += c.toString()));
    const exited = new Promise<number | null>((r) => proc.once('exit', (code) => r(code)));
    const read = async (p: string) => (existsSync(p) ? readFile(p, 'utf8') : '');

    await until(async () => (await read(logFile)).includes('"msg":"ready"'), 'the ready line in the log file');
    await rename(logFile, rotated);
    proc.kill('SIGHUP');
    await until(async () => (await read(logFile)).includes('SIGHUP: re-reading credential files'), 'a fresh log file');
    expect((await stat(logFile)).mode & 0o777).toBe(0o600);
    expect(await read(rotated)).toContain('"msg":"ready"');
    expect(await read(rotated)).not.toContain('SIGHUP');

    proc.kill('SIGTERM');
    expect(await exited).toBe(0);
    // The last lines were flushed to the new file, and nothing went to the console.
    expect(await read(logFile)).toContain('"msg":"stopped"');
    expect(consoleOutput).toBe('');
    assertNoSecrets((await read(rotated)) + (await read(logFile)), fx.server.issuedTokens(), 'log file');
  });
});
