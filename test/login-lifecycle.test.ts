/**
 * A login and the life of its profile: a profile removed or replaced while its login waits ends
 * that login with a clear error (the CLI exits instead of waiting forever), a login stopped
 * while it still asks for its code stops there, and a stopped keeper saves no credentials (a
 * removed profile must not get its tokens back).
 */
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { systemClock } from '../shared/clock.js';
import { CredentialFile } from '../daemon/credential-store.js';
import { silentLogger } from '../daemon/logger.js';
import { QwenOAuthClient } from '../daemon/oauth.js';
import { TokenKeeper } from '../daemon/token-keeper.js';
import { CLI_BIN, createFixture, RawRpcClient, type DaemonFixture, type RawRpcError } from './support/daemon.js';
import { QWEN_CLIENT_ID, deviceProfileSettings, startQwenServer } from './support/qwen-server.js';
import { rejection, until } from './support/wait.js';

let fx: DaemonFixture | null = null;
const cleanups: Array<() => Promise<void> | void> = [];

afterEach(async () => {
  while (cleanups.length) await cleanups.pop()!();
  await fx?.cleanup();
  fx = null;
});


/** A daemon with an `oauth-device` profile `corp`, and a raw client to drive it. */
async function daemonWithCorp(): Promise<{ f: DaemonFixture; admin: RawRpcClient }> {
  const f = await createFixture({ server: { deviceInterval: 0.05 } });
  fx = f;
  await f.start();
  const admin = await RawRpcClient.connect(f.socketPath, 2);
  cleanups.push(() => admin.close());
  await admin.call('profiles.add', { name: 'corp', settings: deviceProfileSettings(f.server) });
  return { f, admin };
}

function tokenFile(f: DaemonFixture, name: string): string {
  return join(f.home, '.one_dragon_alpha', 'profiles', `${name}.token.json`);
}

/** The message a profile's stopped login ends with (see OAuthProfile.loginStopped). */
const STOPPED = /the login of profile "corp" ended because the profile was removed, replaced or changed .*; run `[^`]*login --profile corp` again/;

describe('a profile removed or replaced while its login waits', () => {
  it('`qwen-token login --profile corp` exits with a clear error when the profile is removed', async () => {
    const { f, admin } = await daemonWithCorp();
    const cli = spawn(process.execPath, [CLI_BIN, 'login', '--profile', 'corp', '--json', '--no-browser'], { env: f.env, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    cli.stdout.on('data', (c: Buffer) => (stdout += c.toString()));
    cli.stderr.on('data', (c: Buffer) => (stderr += c.toString()));
    const exited = new Promise<number | null>((resolve) => cli.once('close', (code) => resolve(code)));
    // Killed if it still waits when the test ends (the bug: it waited forever).
    cleanups.push(() => void cli.kill('SIGKILL'));
    await until(() => stdout.includes('"event":"login.code"'), 'the code on stdout');

    await admin.call('profiles.remove', { name: 'corp' });

    expect(await exited).toBe(1);
    const failed = stdout
      .split('\n')
      .filter((l) => l.startsWith('{'))
      .map((l) => JSON.parse(l) as { event: string; code?: string; message?: string })
      .find((e) => e.event === 'login.failed');
    expect(failed).toMatchObject({ code: 'QWEN_OAUTH_ERROR' });
    expect(failed?.message).toMatch(STOPPED);
    expect(stderr).toMatch(STOPPED);
    expect(existsSync(tokenFile(f, 'corp'))).toBe(false);
  });

  it('a client waiting on the login hears its end when the profile is replaced with other settings', async () => {
    const { f, admin } = await daemonWithCorp();
    const client = f.client();
    let shown = false;
    const login = client.login({ profile: 'corp', onCode: () => (shown = true) });
    login.catch(() => undefined);
    await until(() => shown, 'the code');

    await admin.call('profiles.add', { name: 'corp', settings: deviceProfileSettings(f.server, { scope: 'openid email' }), replace: true });

    expect((await rejection(login)).message).toMatch(STOPPED);
    // The new profile runs no login of the old one, and logs in afresh.
    const status = await admin.call<{ login_in_progress: boolean }>('status', { profile: 'corp' });
    expect(status.login_in_progress).toBe(false);
    const again = await admin.call<{ user_code: string }>('login.start', { profile: 'corp' });
    expect(f.server.deviceCode()?.userCode).toBe(again.user_code);
    expect(f.server.deviceCode()?.scope).toBe('openid email');
  });
});

describe('a login stopped while it asks for its code', () => {
  it('removing the profile during the device authorization request ends the login there: no polls, no token file', async () => {
    const { f, admin } = await daemonWithCorp();
    f.server.injectFault({ kind: 'delay', endpoint: 'deviceCode', delayMs: 300, times: 1 });
    const started = admin.call('login.start', { profile: 'corp' });
    started.catch(() => undefined);
    await until(() => f.server.counts.deviceCode === 1, 'the device authorization request');

    await admin.call('profiles.remove', { name: 'corp' });

    const refused = (await rejection(started)) as unknown as RawRpcError;
    expect(refused.message).toMatch(STOPPED);
    // The server finishes the delayed request; approved, its code would log in at the next poll.
    await until(() => f.server.issuedDeviceCodes().length === 1, 'the server to answer the delayed request');
    f.server.approve();
    await new Promise((r) => setTimeout(r, 500));
    expect(f.server.counts.deviceToken).toBe(0);
    expect(existsSync(tokenFile(f, 'corp'))).toBe(false);
    // Added again with the same settings, the profile has no credentials.
    await admin.call('profiles.add', { name: 'corp', settings: deviceProfileSettings(f.server) });
    expect((await admin.call<{ state: string }>('status', { profile: 'corp' })).state).toBe('no_credentials');
  });

  it('login.cancel reaches a login still asking for its code; two starts meanwhile share one request', async () => {
    const { f, admin } = await daemonWithCorp();
    f.server.injectFault({ kind: 'delay', endpoint: 'deviceCode', delayMs: 300, times: 2 });
    const first = admin.call<{ user_code: string }>('login.start', { profile: 'corp' });
    const second = admin.call<{ user_code: string }>('login.start', { profile: 'corp' });
    expect((await first).user_code).toBe((await second).user_code);
    expect(f.server.counts.deviceCode).toBe(1);
    expect(await admin.call('login.cancel', { profile: 'corp' })).toEqual({ cancelled: true });
    await until(async () => !(await admin.call<{ login_in_progress: boolean }>('status', { profile: 'corp' })).login_in_progress, 'the cancelled login to end');

    const third = admin.call('login.start', { profile: 'corp' });
    third.catch(() => undefined);
    await until(() => f.server.counts.deviceCode === 2, 'the second device authorization request');
    expect(await admin.call('login.cancel', { profile: 'corp' })).toEqual({ cancelled: true });
    const refused = (await rejection(third)) as unknown as RawRpcError;
    expect(refused.data?.oauth_error).toBe('cancelled');
    expect((await admin.call<{ login_in_progress: boolean }>('status', { profile: 'corp' })).login_in_progress).toBe(false);
  });
});

describe('TokenKeeper.installCredentials', () => {
  it('refuses once the keeper is stopped and writes nothing', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'qtd-login-'));
    const server = await startQwenServer();
    cleanups.push(() => rm(dir, { recursive: true, force: true }));
    cleanups.push(() => server.close());
    const logger = silentLogger();
    const path = join(dir, 'profiles', 'corp.token.json');
    const ownFile = new CredentialFile(path, { logger, moveCorruptAside: true, ownsDirectory: true, label: 'own' });
    const keeper = new TokenKeeper({
      config: { refreshLeadMs: 300_000, retryMs: 60_000, qwenCliLockPath: join(dir, 'lock'), qwenCliLockStaleMs: 35_000, httpTimeoutMs: 2000 },
      oauth: new QwenOAuthClient({ baseUrl: server.baseUrl, clientId: QWEN_CLIENT_ID, scope: 'openid', timeoutMs: 2000 }),
      ownFile,
      cliFile: null,
      clock: systemClock,
      logger,
    });
    await keeper.start();
    await keeper.stop();
    const t = server.issueTokens();
    const error = await rejection(keeper.installCredentials({ access_token: t.access_token, refresh_token: t.refresh_token, token_type: 'Bearer', expiry_date: t.expiry_date }));
    expect(error.message).toMatch(/credentials were not saved: the profile stopped/);
    expect(existsSync(path)).toBe(false);
    expect(keeper.snapshot().credentials).toBeNull();
  });
});
