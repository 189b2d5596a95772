/**
 * TokenKeeper in-process against the real local Qwen server: single-flight refresh, serving
 * through failures, adoption racing a refresh.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { systemClock } from '../shared/clock.js';
import type { Credentials } from '../shared/credentials.js';
import { CredentialFile } from '../daemon/credential-store.js';
import { silentLogger } from '../daemon/logger.js';
import { QwenOAuthClient } from '../daemon/oauth.js';
import { TokenKeeper } from '../daemon/token-keeper.js';
import { startQwenServer, type QwenTestServer } from './support/qwen-server.js';

let dir: string;
let server: QwenTestServer;
let keeper: TokenKeeper | undefined;

beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), 'qtd-keeper-'));
  server = await startQwenServer();
});

afterEach(async () => {
  await keeper?.stop();
  keeper = undefined;
  await server.close();
  await rm(dir, { recursive: true, force: true });
});

function makeKeeper(withCli = false): { keeper: TokenKeeper; own: CredentialFile; cli: CredentialFile | null } {
  const logger = silentLogger();
  const own = new CredentialFile(join(dir, 'own', 'creds.json'), { logger, moveCorruptAside: true, ownsDirectory: true, label: 'own' });
  const cli = withCli
    ? new CredentialFile(join(dir, 'qwen', 'oauth_creds.json'), { logger, moveCorruptAside: false, ownsDirectory: false, label: 'qwen-cli' })
    : null;
  const oauth = new QwenOAuthClient({ baseUrl: server.baseUrl, clientId: server.settings.clientId, scope: 'openid', timeoutMs: 2000 });
  const k = new TokenKeeper({
    config: { refreshLeadMs: 300_000, retryMs: 60_000, qwenCliLockPath: join(dir, 'qwen', 'oauth_creds.lock'), qwenCliLockStaleMs: 35_000, httpTimeoutMs: 2000 },
    oauth,
    ownFile: own,
    cliFile: cli,
    clock: systemClock,
    logger,
  });
  keeper = k;
  return { keeper: k, own, cli };
}

function seeded(expiresIn: number): Credentials {
  const t = server.issueTokens({ expiresIn });
  return { access_token: t.access_token, refresh_token: t.refresh_token, token_type: 'Bearer', resource_url: t.resource_url, expiry_date: t.expiry_date };
}

/** Resolves once `check` holds (polled every 10 ms, for up to 5 s). */
async function until(check: () => Promise<boolean>): Promise<void> {
  for (let i = 0; i < 500; i++) {
    if (await check()) return;
    await new Promise((r) => setTimeout(r, 10));
  }
  throw new Error('the condition never held');
}

/** Holds every write of `file` until the returned function is called: a slow disk. */
function holdWrites(file: CredentialFile): () => void {
  let release!: () => void;
  const gate = new Promise<void>((resolve) => (release = resolve));
  const write = file.write.bind(file);
  file.write = async (c) => {
    await gate;
    return write(c);
  };
  return release;
}

describe('TokenKeeper', () => {
  it('200 concurrent requests for an expired token share exactly one HTTP refresh', async () => {
    const { keeper: k, own } = makeKeeper();
    const old = { ...seeded(3600), expiry_date: Date.now() - 1 };
    await own.write(old);
    // Slow the token endpoint so every request arrives while the refresh is in flight.
    server.injectFault({ kind: 'delay', delayMs: 200, times: 1 });
    await k.start();
    const results = await Promise.all(Array.from({ length: 200 }, () => k.getAccessToken()));
    expect(server.counts.refresh).toBe(1);
    const tokens = new Set(results.map((c) => c.access_token));
    expect(tokens.size).toBe(1);
    expect([...tokens][0]).not.toBe(old.access_token);
    expect((await own.read()).status).toBe('ok');
  });

  it('200 concurrent forced refreshes also share one HTTP call', async () => {
    const { keeper: k, own } = makeKeeper();
    await own.write(seeded(3600));
    await k.start();
    server.injectFault({ kind: 'delay', delayMs: 100, times: 1 });
    const results = await Promise.all(Array.from({ length: 200 }, () => k.refresh()));
    expect(server.counts.refresh).toBe(1);
    expect(new Set(results.map((c) => c.access_token)).size).toBe(1);
  });

  it('callers waiting on a refresh get the new token before it is written; a forced refresh then waits for the write and asks the server again', async () => {
    const { keeper: k, own } = makeKeeper();
    const first = seeded(3600);
    await own.write(first);
    await k.start();
    const release = holdWrites(own);
    const fresh = await k.getAccessToken(2 * 3600_000); // valid 1 h, asked for 2 h: refreshes
    expect(fresh.access_token).not.toBe(first.access_token);
    expect(server.counts.refresh).toBe(1);
    const onDisk = await own.read();
    expect(onDisk.status === 'ok' && onDisk.credentials.access_token).toBe(first.access_token);
    // That refresh has its answer; a forced refresh asked now wants a new one. It waits for
    // the write (two writes never race), then makes its own exchange with the server.
    let forcedDone = false;
    const forced = k.refresh().then((c) => {
      forcedDone = true;
      return c;
    });
    for (let i = 0; i < 20; i++) await new Promise((r) => setImmediate(r));
    expect(forcedDone).toBe(false);
    expect(server.counts.refresh).toBe(1);
    release();
    const again = await forced;
    expect(server.counts.refresh).toBe(2);
    expect(again.access_token).not.toBe(fresh.access_token);
    expect(k.snapshot().credentials?.access_token).toBe(again.access_token);
    const saved = await own.read();
    expect(saved.status === 'ok' && saved.credentials.access_token).toBe(again.access_token);
  });

  it('a file change arriving between a refresh and its write is judged after the write: memory and disk agree', async () => {
    const { keeper: k, own } = makeKeeper();
    await own.write(seeded(3600));
    await k.start();
    const release = holdWrites(own);
    const fresh = await k.getAccessToken(2 * 3600_000);
    // Another process writes a later-expiring record to our file before our write lands.
    const { writeFile } = await import('node:fs/promises');
    const { serializeCredentials } = await import('../shared/credentials.js');
    await writeFile(own.path, serializeCredentials(seeded(7200)), { mode: 0o600 });
    const judged = k.fileChanged('own');
    // Without waiting for our write, the change would be adopted now, and our write would then
    // put different credentials on disk than the ones in memory.
    const first = await Promise.race([judged.then(() => 'judged'), new Promise((r) => setTimeout(() => r('waiting'), 300))]);
    release();
    await judged;
    expect(first).toBe('waiting');
    const onDisk = await own.read();
    expect(onDisk.status).toBe('ok');
    expect(onDisk.status === 'ok' && onDisk.credentials.access_token).toBe(k.snapshot().credentials?.access_token);
    expect(k.snapshot().credentials?.access_token).toBe(fresh.access_token);
  });

  it('a token_refreshed listener that throws does not keep the refreshed credentials from being saved', async () => {
    const { keeper: k, own } = makeKeeper();
    const first = seeded(3600);
    await own.write(first);
    await k.start();
    k.on('token_refreshed', () => {
      throw new Error('a broken listener');
    });
    const refreshed = await k.refresh();
    expect(refreshed.refresh_token).not.toBe(first.refresh_token);
    const onDisk = await own.read();
    expect(onDisk.status === 'ok' && onDisk.credentials.refresh_token).toBe(refreshed.refresh_token);
  });

  it('a refresh failure for a refresh token replaced meanwhile does not declare needs_login', async () => {
    const { keeper: k, own } = makeKeeper();
    const first = seeded(3600);
    await own.write(first);
    await k.start();
    server.revokeRefreshToken(first.refresh_token);
    server.injectFault({ kind: 'delay', delayMs: 300, times: 1 });
    const refreshing = k.refresh().catch((e: unknown) => e);
    // While the refresh is in flight, another process writes a new login to our file.
    const second = seeded(7200);
    await new Promise((r) => setTimeout(r, 50));
    const { writeFile } = await import('node:fs/promises');
    const { serializeCredentials } = await import('../shared/credentials.js');
    await writeFile(own.path, serializeCredentials(second), { mode: 0o600 });
    await k.fileChanged('own');
    await refreshing;
    expect(k.snapshot().state).toBe('valid');
    expect((await k.getAccessToken()).access_token).toBe(second.access_token);
  });

  it('emits token_refreshed, refresh_failed and state_changed', async () => {
    const { keeper: k, own } = makeKeeper();
    await own.write(seeded(3600));
    const events: string[] = [];
    k.on('token_refreshed', () => events.push('token_refreshed'));
    k.on('refresh_failed', (f) => events.push(`refresh_failed:${f.state}`));
    k.on('state_changed', (s) => events.push(`state:${s.previous}->${s.state}`));
    await k.start();
    await k.refresh();
    server.injectFault({ kind: '5xx', times: 1 });
    await k.refresh().catch(() => undefined);
    expect(events).toEqual([
      'state:no_credentials->valid',
      'state:valid->refreshing',
      'state:refreshing->valid',
      'token_refreshed',
      'state:valid->refreshing',
      'state:refreshing->retrying',
      'refresh_failed:retrying',
    ]);
  });

  it('keeps the refreshed token in memory and serves it when the file cannot be written', async () => {
    const { keeper: k, own } = makeKeeper();
    await own.write(seeded(3600));
    await k.start();
    const { chmod } = await import('node:fs/promises');
    await chmod(join(dir, 'own'), 0o500);
    try {
      if (process.getuid?.() === 0) {
        // root ignores directory permissions; make the target a directory instead.
        await rm(own.path);
        const { mkdir } = await import('node:fs/promises');
        await mkdir(own.path);
      }
      const refreshed = await k.refresh();
      expect((await k.getAccessToken()).access_token).toBe(refreshed.access_token);
    } finally {
      await chmod(join(dir, 'own'), 0o700);
    }
  });

  it('stop() abandons a refresh that waits for a Qwen CLI lock held elsewhere', async () => {
    const { keeper: k, own, cli } = makeKeeper(true);
    const creds = seeded(3600);
    await own.write(creds);
    await cli!.write(creds);
    const { mkdir, writeFile, stat } = await import('node:fs/promises');
    await mkdir(join(dir, 'qwen'), { recursive: true });
    // A fresh lock held by "the Qwen CLI": the refresh must wait for it (up to 40 s).
    await writeFile(join(dir, 'qwen', 'oauth_creds.lock'), 'someone-elses-uuid');
    await k.start();
    const refreshing = k.refresh().catch((e: unknown) => e);
    await new Promise((r) => setTimeout(r, 100));
    // Resolves long before the 40 s acquisition timeout (the test's own timeout is 20 s).
    await k.stop();
    await refreshing;
    expect(server.counts.refresh).toBe(0);
    // The other holder's lock is untouched.
    expect((await stat(join(dir, 'qwen', 'oauth_creds.lock'))).isFile()).toBe(true);
  });

  it('requests right after a failed refresh do not each start one (at most one per 5 s)', async () => {
    const { keeper: k, own } = makeKeeper();
    // Valid for 30 s: inside every request's 60 s minimum, so each one wants a refresh.
    await own.write(seeded(30));
    await k.start();
    server.injectFault({ kind: '5xx', times: 100 });
    const served = [];
    for (let i = 0; i < 20; i++) served.push(await k.getAccessToken(60_000));
    // One attempt; the other nineteen get the still-valid token without asking the server.
    expect(server.counts.refresh).toBe(1);
    expect(new Set(served.map((c) => c.access_token)).size).toBe(1);
    expect(k.snapshot().retryCount).toBe(1);
    // A forced refresh (`qwen-token refresh`) still asks at once.
    await expect(k.refresh()).rejects.toThrow();
    expect(server.counts.refresh).toBe(2);
  });

  it('an expired token after a failed refresh fails at once, naming the next attempt', async () => {
    const { keeper: k, own } = makeKeeper();
    await own.write({ ...seeded(3600), expiry_date: Date.now() - 1_000 });
    server.injectFault({ kind: '5xx', times: 100 });
    await k.start();
    await expect(k.getAccessToken()).rejects.toThrow(/could not be refreshed/);
    const attempts = server.counts.refresh;
    const err = await k.getAccessToken().catch((e: Error) => e);
    expect(err).toBeInstanceOf(Error);
    expect((err as Error).message).toMatch(/the next attempt is at \d{4}-\d\d-\d\dT/);
    expect(server.counts.refresh).toBe(attempts);
  });

  it('asking for more validity than a fresh token has refreshes once, not on every call', async () => {
    const { keeper: k, own } = makeKeeper();
    await own.write(seeded(3600));
    await k.start();
    const tokens = [];
    // Refreshed tokens live 6 h here; 7 h cannot be had, and asking again must not rotate the grant each time.
    for (let i = 0; i < 3; i++) {
      const token = await k.getAccessToken(7 * 3600_000);
      tokens.push(token);
      // Each call after the last one's write, so none joins a refresh still in progress.
      await until(async () => {
        const onDisk = await own.read();
        return onDisk.status === 'ok' && onDisk.credentials.access_token === token.access_token;
      });
    }
    expect(server.counts.refresh).toBe(1);
    expect(new Set(tokens.map((c) => c.access_token)).size).toBe(1);
  });

  it('a refresh that answers after a login is dropped: the login stays in memory and on disk', async () => {
    const { keeper: k, own } = makeKeeper();
    const first = seeded(3600);
    await own.write(first);
    await k.start();
    server.injectFault({ kind: 'delay', delayMs: 300, times: 1 });
    const refreshing = k.refresh();
    await new Promise((r) => setTimeout(r, 50));
    const login = seeded(7200);
    await k.installCredentials(login);
    const answer = await refreshing;
    expect(server.counts.refresh).toBe(1);
    // The caller of the refresh gets what is current: the login.
    expect(answer.refresh_token).toBe(login.refresh_token);
    expect(k.snapshot().credentials?.refresh_token).toBe(login.refresh_token);
    const onDisk = await own.read();
    expect(onDisk.status === 'ok' && onDisk.credentials.refresh_token).toBe(login.refresh_token);
  });

  it("a Qwen CLI file that cannot be read does not keep our own token from refreshing", async () => {
    const { keeper: k, own, cli } = makeKeeper(true);
    const first = seeded(3600);
    await own.write(first);
    await k.start();
    // The CLI's directory becomes writable by others: its file is refused from then on.
    await cli!.write(first);
    const { chmod } = await import('node:fs/promises');
    await chmod(join(dir, 'qwen'), 0o777);
    await expect(cli!.read()).rejects.toThrow();
    const refreshed = await k.refresh();
    expect(server.counts.refresh).toBe(1);
    expect(refreshed.refresh_token).not.toBe(first.refresh_token);
    const onDisk = await own.read();
    expect(onDisk.status === 'ok' && onDisk.credentials.refresh_token).toBe(refreshed.refresh_token);
  });

  describe('refreshAfterRejection (an upstream refused the access token)', () => {
    it('refreshes once; refusals within the retry interval get null instead of another refresh', async () => {
      const { keeper: k, own } = makeKeeper();
      const first = seeded(3600);
      await own.write(first);
      await k.start();
      const fresh = await k.refreshAfterRejection(first.access_token);
      expect(fresh?.access_token).not.toBe(first.access_token);
      expect(server.counts.refresh).toBe(1);
      // The fresh token is refused too (a model the account may not use): no second refresh.
      expect(await k.refreshAfterRejection(fresh!.access_token)).toBeNull();
      expect(server.counts.refresh).toBe(1);
    });

    it('hands out the current token when the refused one was already replaced', async () => {
      const { keeper: k, own } = makeKeeper();
      const first = seeded(3600);
      await own.write(first);
      await k.start();
      const current = await k.refresh();
      expect((await k.refreshAfterRejection(first.access_token))?.access_token).toBe(current.access_token);
      expect(server.counts.refresh).toBe(1);
    });

    it('after a failed refresh, refusals within the retry interval get null', async () => {
      const { keeper: k, own } = makeKeeper();
      const first = seeded(3600);
      await own.write(first);
      await k.start();
      server.injectFault({ kind: '5xx', times: 100 });
      await expect(k.refreshAfterRejection(first.access_token)).rejects.toThrow();
      expect(await k.refreshAfterRejection(first.access_token)).toBeNull();
      expect(server.counts.refresh).toBe(1);
    });
  });
});
