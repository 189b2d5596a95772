/**
 * The daemon as a child process on a temp HOME against the local Qwen server: import, refresh
 * ahead of expiry, file modes, adoption of outside changes, faults, needs_login, single instance.
 */
import { spawn } from 'node:child_process';
import { mkdir, rename, stat, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { serializeCredentials } from '../shared/credentials.js';
import { QwenRefreshTokenInvalidError, QwenTokenExpiredError } from '../shared/errors.js';
import { DAEMON_BIN, createFixture, credsFrom, type DaemonFixture } from './support/daemon.js';
import { until } from './support/wait.js';

let fx: DaemonFixture;
afterEach(async () => {
  await fx?.cleanup();
});

async function mode(path: string): Promise<number> {
  return (await stat(path)).mode & 0o777;
}

describe('qwen-tokend daemon', () => {
  it('imports the Qwen CLI credentials at start and writes its own file 0600 in a 0700 dir', async () => {
    fx = await createFixture();
    const cli = credsFrom(fx.server);
    await fx.writeCli(cli);
    await fx.start();
    const own = await fx.readOwn();
    expect(own).toEqual(cli);
    expect(await mode(fx.tokenPath)).toBe(0o600);
    expect(await mode(dirname(fx.tokenPath))).toBe(0o700);
    const token = await fx.client().getAccessToken();
    expect(token).toBe(cli.access_token);
    const status = await fx.client().status();
    expect(status.source_file).toBe(fx.qwenCliPath);
    expect(fx.server.counts.refresh).toBe(0);
  });

  it('prefers its own file when it is newer than the Qwen CLI file', async () => {
    fx = await createFixture();
    const older = credsFrom(fx.server, 3600);
    const newer = credsFrom(fx.server, 7200);
    await fx.writeCli(older);
    await fx.writeOwn(newer);
    await fx.start();
    expect(await fx.client().getAccessToken()).toBe(newer.access_token);
    expect(await fx.readCli()).toEqual(older);
  });

  it('refreshes ahead of expiry (lead from env) and writes both files 0600, retiring the old refresh token', async () => {
    fx = await createFixture({ env: { QWEN_TOKEND_REFRESH_LEAD_MS: '2500' } });
    const seeded = credsFrom(fx.server, 3); // expires in 3 s: refresh due in ~0.5 s
    await fx.writeCli(seeded);
    await fx.start();
    await fx.waitForLog((l) => l.msg === 'token refreshed', 5000);
    const own = await fx.readOwn();
    const cli = await fx.readCli();
    expect(own?.access_token).not.toBe(seeded.access_token);
    expect(own?.refresh_token).not.toBe(seeded.refresh_token); // the server rotates
    expect(cli).toEqual(own); // written back where it came from
    expect(await mode(fx.tokenPath)).toBe(0o600);
    expect(await mode(fx.qwenCliPath)).toBe(0o600);
    expect(fx.server.counts.refresh).toBe(1);
    expect(fx.server.reuseCount).toBe(0);
    // Its own writes are not mistaken for another process's.
    await new Promise((r) => setTimeout(r, 300));
    expect(fx.logs().filter((l) => /adopted/.test(l.msg))).toEqual([]);
    // The lock the daemon took (the Qwen CLI's own protocol) is released.
    await expect(stat(join(fx.qwenHome, 'oauth_creds.lock'))).rejects.toMatchObject({ code: 'ENOENT' });
  });

  it('adopts a newer credential file written by another process within 1 s', async () => {
    fx = await createFixture();
    await fx.writeCli(credsFrom(fx.server, 3600));
    await fx.start();
    const client = fx.client();
    await client.getAccessToken();
    const fresher = credsFrom(fx.server, 7200);
    // Write like the Qwen CLI does: temp file + rename.
    const tmp = `${fx.qwenCliPath}.tmp-test`;
    await writeFile(tmp, serializeCredentials(fresher), { mode: 0o600 });
    const writtenAt = Date.now();
    await rename(tmp, fx.qwenCliPath);
    await until(async () => (await client.getAccessToken({ noCache: true })) === fresher.access_token, 'adoption', 1000);
    const latency = Date.now() - writtenAt;
    console.log(`adoption latency: ${latency} ms`);
    // Adopted from the Qwen CLI file, then saved to our own.
    await until(async () => ((await fx.readOwn())?.access_token === fresher.access_token), 'own file saved', 3000);
    expect(await fx.readOwn()).toEqual(fresher);
    expect(fx.server.counts.refresh).toBe(0);
  });

  it('a file written in two steps (not renamed into place) is adopted, not moved aside as corrupt', async () => {
    fx = await createFixture({ env: { QWEN_TOKEND_QWEN_CLI_SYNC: 'off' } });
    await fx.start();
    const client = fx.client();
    const creds = credsFrom(fx.server);
    const text = serializeCredentials(creds);
    const { open, readdir } = await import('node:fs/promises');
    await mkdir(dirname(fx.tokenPath), { recursive: true });
    const fh = await open(fx.tokenPath, 'w', 0o600);
    await fh.write(text.slice(0, 20));
    await fh.sync();
    await new Promise((r) => setTimeout(r, 150)); // the watcher sees the half-written file
    await fh.write(text.slice(20));
    await fh.close();
    await until(async () => ((await client.status()).state === 'valid'), 'adoption', 5000);
    expect(await client.getAccessToken({ noCache: true })).toBe(creds.access_token);
    expect((await readdir(dirname(fx.tokenPath))).filter((f) => f.includes('.corrupt-'))).toEqual([]);
  });

  it('a file that stays corrupt after a change is moved aside once it settles, keeping the token in memory', async () => {
    fx = await createFixture({ env: { QWEN_TOKEND_QWEN_CLI_SYNC: 'off' } });
    const creds = credsFrom(fx.server);
    await fx.writeOwn(creds);
    await fx.start();
    const client = fx.client();
    await writeFile(fx.tokenPath, 'garbage that is not json');
    const { readdir } = await import('node:fs/promises');
    await until(async () => ((await readdir(dirname(fx.tokenPath))).some((f) => f.includes('.corrupt-'))), 'moved aside', 5000);
    expect(await client.getAccessToken({ noCache: true })).toBe(creds.access_token);
  });

  it('treats a vanished Qwen CLI file as no news and ignores older credentials', async () => {
    fx = await createFixture();
    const current = credsFrom(fx.server, 7200);
    await fx.writeCli(current);
    await fx.start();
    const client = fx.client();
    const { rm } = await import('node:fs/promises');
    await rm(fx.qwenCliPath);
    // Same refresh token, earlier expiry: an older copy, not news.
    const stale = credsFrom(fx.server, 60);
    await fx.writeCli({ ...stale, refresh_token: current.refresh_token });
    await fx.waitForLog((l) => /not newer/.test(l.msg), 3000);
    expect(await client.getAccessToken({ noCache: true })).toBe(current.access_token);
    expect((await fx.readOwn())?.access_token).toBe(current.access_token);
  });

  it('keeps serving the still-valid token through 5xx, timeout and reset faults, then recovers', async () => {
    fx = await createFixture({
      env: { QWEN_TOKEND_REFRESH_LEAD_MS: '3600000', QWEN_TOKEND_RETRY_MS: '200', QWEN_TOKEND_HTTP_TIMEOUT_MS: '300' },
    });
    const seeded = credsFrom(fx.server, 600); // inside the lead: refresh due at once
    fx.server.injectFault({ kind: '5xx', times: 1 });
    fx.server.injectFault({ kind: 'delay', delayMs: 1500, times: 1 });
    fx.server.injectFault({ kind: 'reset', times: 1 });
    await fx.writeOwn(seeded);
    await fx.start();
    const client = fx.client();
    await fx.waitForLog((l) => /refresh failed, will retry/.test(l.msg) && /HTTP 503/.test(l.msg), 5000);
    expect(await client.getAccessToken({ noCache: true })).toBe(seeded.access_token);
    await fx.waitForLog((l) => /refresh failed, will retry/.test(l.msg) && /timed out/.test(l.msg), 5000);
    expect(await client.getAccessToken({ noCache: true })).toBe(seeded.access_token);
    await fx.waitForLog((l) => l.msg === 'token refreshed', 8000);
    // One failure per fault at least (a loaded machine may time out one more normal answer).
    const failures = fx.logs().filter((l) => /refresh failed, will retry/.test(l.msg));
    expect(failures.length).toBeGreaterThanOrEqual(3);
    for (const what of [/HTTP 503/, /timed out/, /reset|ECONNRESET|socket hang up|closed/i]) {
      expect(failures.some((l) => what.test(l.msg))).toBe(true);
    }
    const status = await client.status();
    expect(status.state).toBe('valid');
    expect(status.retry_count).toBe(0);
    expect(await client.getAccessToken({ noCache: true })).not.toBe(seeded.access_token);
  });

  it('answers QwenTokenExpiredError when the token has expired and refresh keeps failing', async () => {
    fx = await createFixture({ env: { QWEN_TOKEND_RETRY_MS: '60000' } });
    fx.server.injectFault({ kind: '5xx' });
    const expired = { ...credsFrom(fx.server), expiry_date: Date.now() - 1000 };
    await fx.writeOwn(expired);
    await fx.start();
    const client = fx.client();
    const err = await client.getAccessToken().catch((e: unknown) => e);
    expect(err).toBeInstanceOf(QwenTokenExpiredError);
    expect((err as Error).message).toMatch(/qwen-token login|status/);
    expect((await client.status()).state).toBe('expired');
  });

  it('goes needs_login when the refresh token is rejected, after checking the files once more', async () => {
    fx = await createFixture();
    const seeded = credsFrom(fx.server, 3600);
    await fx.writeOwn(seeded);
    await fx.start();
    const client = fx.client();
    fx.server.revokeRefreshToken(seeded.refresh_token);
    const err = await client.refresh().catch((e: unknown) => e);
    expect(err).toBeInstanceOf(QwenRefreshTokenInvalidError);
    const status = await client.status();
    expect(status.state).toBe('needs_login');
    expect(status.next_refresh_at).toBeNull();
    expect(status.last_error?.code).toBe('QWEN_REFRESH_TOKEN_INVALID');
    // The still-valid access token is served meanwhile.
    expect(await client.getAccessToken({ noCache: true })).toBe(seeded.access_token);
    // A new login elsewhere (a file with a different refresh token) clears the state.
    const relogged = credsFrom(fx.server, 3600);
    await fx.writeCli(relogged);
    await until(async () => ((await client.status()).state === 'valid'), 'valid again', 3000);
    expect(await client.getAccessToken({ noCache: true })).toBe(relogged.access_token);
  });

  it('adopts a newer refresh token found on disk instead of declaring needs_login', async () => {
    fx = await createFixture({ env: { QWEN_TOKEND_QWEN_CLI_SYNC: 'off' } });
    const seeded = credsFrom(fx.server, 3600);
    await fx.writeOwn(seeded);
    await fx.start();
    fx.server.revokeRefreshToken(seeded.refresh_token);
    // Someone replaced the file while the daemon was not looking (no watcher event yet).
    const replacement = credsFrom(fx.server, 1800);
    const client = fx.client();
    await writeFile(fx.tokenPath, serializeCredentials(replacement), { mode: 0o600 });
    const result = await client.refresh().catch((e: unknown) => e);
    expect(result).not.toBeInstanceOf(Error);
    expect((await client.status()).state).not.toBe('needs_login');
  });

  it('with QWEN_TOKEND_QWEN_CLI_SYNC=off neither imports nor writes the Qwen CLI file', async () => {
    fx = await createFixture({ env: { QWEN_TOKEND_QWEN_CLI_SYNC: 'off' } });
    const cli = credsFrom(fx.server);
    await fx.writeCli(cli);
    await fx.start();
    const client = fx.client();
    expect((await client.status()).state).toBe('no_credentials');
    expect((await client.status()).qwen_cli_link.enabled).toBe(false);
    const own = credsFrom(fx.server);
    await fx.writeOwn(own);
    await until(async () => ((await client.status()).state === 'valid'), 'own file adopted', 3000);
    await client.refresh();
    expect(await fx.readCli()).toEqual(cli);
  });

  it('refuses a second instance with a message naming the running one', async () => {
    fx = await createFixture();
    await fx.start();
    const second = spawn(process.execPath, [DAEMON_BIN], { env: fx.env, stdio: ['ignore', 'pipe', 'pipe'] });
    let stderr = '';
    second.stderr.on('data', (c: Buffer) => (stderr += c.toString()));
    const code = await new Promise<number | null>((done) => second.once('exit', (c) => done(c)));
    expect(code).toBe(3);
    expect(stderr).toContain(`pid ${fx.proc!.pid}`);
    // The first one is unharmed.
    expect((await fx.client().status()).pid).toBe(fx.proc!.pid);
  });

  it('moves a corrupt own file aside and starts without credentials', async () => {
    fx = await createFixture({ env: { QWEN_TOKEND_QWEN_CLI_SYNC: '0' } });
    await fx.writeOwn(credsFrom(fx.server));
    await writeFile(fx.tokenPath, '{"access_token": "abc", trunc');
    await fx.start();
    const line = await fx.waitForLog((l) => typeof l.msg === 'string' && /corrupt|not valid/.test(l.msg), 3000);
    expect(line.level).toBeGreaterThanOrEqual(40);
    expect((await fx.client().status()).state).toBe('no_credentials');
    const { readdir, readFile } = await import('node:fs/promises');
    const aside = (await readdir(dirname(fx.tokenPath))).filter((f) => f.includes('.corrupt-'));
    expect(aside).toHaveLength(1);
    expect(await readFile(join(dirname(fx.tokenPath), aside[0]!), 'utf8')).toBe('{"access_token": "abc", trunc');
  });

  it('creates the state directory 0700 even when the log file (autostart) is opened first', async () => {
    fx = await createFixture();
    const logFile = join(dirname(fx.tokenPath), 'qwen-tokend.log');
    const proc = spawn(process.execPath, [DAEMON_BIN], { env: { ...fx.env, QWEN_TOKEND_LOG_FILE: logFile }, stdio: 'ignore' });
    try {
      await until(async () => (await stat(fx.socketPath).then(() => true, () => false)), 'the socket');
      expect(await mode(dirname(fx.tokenPath))).toBe(0o700);
      expect(await mode(logFile)).toBe(0o600);
    } finally {
      proc.kill('SIGTERM');
      await new Promise((done) => proc.once('exit', done));
    }
  });

  it('exits 78 with a clear message on a bad environment value', async () => {
    fx = await createFixture({ env: { QWEN_TOKEND_RETRY_MS: 'soon' } });
    const proc = spawn(process.execPath, [DAEMON_BIN], { env: fx.env, stdio: ['ignore', 'pipe', 'pipe'] });
    let stderr = '';
    proc.stderr.on('data', (c: Buffer) => (stderr += c.toString()));
    const code = await new Promise<number | null>((done) => proc.once('exit', (c) => done(c)));
    expect(code, stderr).toBe(78);
    expect(stderr).toContain('QWEN_TOKEND_RETRY_MS');
  });
});
