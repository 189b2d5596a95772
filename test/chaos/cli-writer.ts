/**
 * Scenario 4: the Qwen CLI as a concurrent writer. A separate process that speaks the Qwen
 * CLI's lock-and-write protocol (fake-qwen-cli.mjs) refreshes the shared credentials while the
 * daemon refreshes them too. No refresh token may be used twice, no update may be lost, both
 * ends finish on the newest credentials; a lock abandoned by a killed process is taken over
 * once stale; the Qwen CLI deleting its file never makes the daemon drop what it holds.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { utimes, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { expect } from 'vitest';
import { parseCredentialsText } from '../../shared/credentials.js';
import { fingerprint } from '../../shared/fingerprint.js';
import { createFixture, credsFrom, type DaemonFixture } from '../support/daemon.js';
import { TOKEN_PATH } from '../support/qwen-server.js';
import { bugLines, readRaw, report, until, type SecretLedger } from './harness.js';
import type { ChaosScale } from './scale.js';

const FAKE_CLI = join(dirname(fileURLToPath(import.meta.url)), 'fake-qwen-cli.mjs');
/** Stale-lock age shared by the daemon (QWEN_TOKEND_QWEN_CLI_LOCK_STALE_MS) and the fake CLI. */
const STALE_MS = 2_000;
/** The UUID in the lock the test leaves behind as if its holder had died. */
const ABANDONED_LOCK = '3f1c0e7e-0000-4000-8000-abandoned000';

interface FakeCliMessage {
  event: string;
  [key: string]: unknown;
}

/** Starts the fake Qwen CLI; `next(event)` resolves with its first message of that kind. */
function startFakeCli(fx: DaemonFixture, env: Record<string, string>): { proc: ChildProcess; next: (event: string) => Promise<FakeCliMessage>; stderr: () => string } {
  const proc = spawn(process.execPath, [FAKE_CLI], {
    env: {
      ...process.env,
      FAKE_QWEN_HOME: fx.qwenHome,
      FAKE_TOKEN_URL: `${fx.server.baseUrl}${TOKEN_PATH}`,
      FAKE_CLIENT_ID: fx.server.settings.clientId,
      FAKE_STALE_MS: String(STALE_MS),
      ...env,
    },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const messages: FakeCliMessage[] = [];
  const waiters: Array<{ event: string; resolve: (m: FakeCliMessage) => void }> = [];
  let err = '';
  proc.stderr!.on('data', (c: Buffer) => (err += c.toString()));
  createInterface({ input: proc.stdout! }).on('line', (line) => {
    const msg = JSON.parse(line) as FakeCliMessage;
    messages.push(msg);
    for (const w of waiters.splice(0)) {
      if (w.event === msg.event) w.resolve(msg);
      else waiters.push(w);
    }
  });
  const next = (event: string) =>
    new Promise<FakeCliMessage>((resolve, reject) => {
      const found = messages.find((m) => m.event === event);
      if (found) return resolve(found);
      waiters.push({ event, resolve });
      proc.once('exit', (code) => {
        if (!messages.some((m) => m.event === event)) reject(new Error(`fake Qwen CLI exited ${code} before "${event}": ${err}`));
      });
    });
  return { proc, next, stderr: () => err };
}

/**
 * Creates a lock as a process that then died would have: O_CREAT|O_EXCL, waiting while the daemon
 * holds its own. Overwriting a held lock instead races the daemon's release, which reads its UUID
 * and then unlinks: a write between the two is deleted with no "broke the stale lock" line.
 */
async function createAbandonedLock(lockPath: string, id: string): Promise<void> {
  const deadline = Date.now() + 10_000;
  for (;;) {
    try {
      await writeFile(lockPath, id, { mode: 0o600, flag: 'wx' });
      return;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST' || Date.now() > deadline) throw err;
      await new Promise((r) => setTimeout(r, 5));
    }
  }
}

/** Waits until the daemon, both files and the server's newest refresh token all agree. */
async function converged(fx: DaemonFixture, timeoutMs: number): Promise<void> {
  const client = fx.client({ minValidityMs: 0 });
  await until(
    async () => {
      const own = await readRaw(fx.tokenPath);
      const cli = await readRaw(fx.qwenCliPath);
      if (own === null || cli === null) return false;
      const o = parseCredentialsText(own, 'own');
      const c = parseCredentialsText(cli, 'cli');
      const newest = fx.server.issuedTokens('refresh').at(-1);
      const status = await client.status();
      return o.refresh_token === newest && c.refresh_token === newest && status.refresh_token_fingerprint === fingerprint(newest);
    },
    timeoutMs,
    'the daemon, its file, the Qwen CLI file and the server to agree on the newest refresh token',
  );
}

export interface CliWriterFigures {
  rounds: number;
  cliRefreshes: number;
  cliSkipped: number;
  daemonRefreshes: number;
  adoptedFromCli: number;
  staleLocksTakenOver: number;
  reuseCount: number;
}

export async function qwenCliConcurrentWriter(scale: ChaosScale, ledger: SecretLedger): Promise<CliWriterFigures> {
  const fx = await createFixture({
    server: { expiresIn: 2 },
    env: {
      QWEN_TOKEND_REFRESH_LEAD_MS: '1850',
      QWEN_TOKEND_RETRY_MS: '200',
      QWEN_TOKEND_HTTP_TIMEOUT_MS: '1000',
      QWEN_TOKEND_QWEN_CLI_LOCK_STALE_MS: String(STALE_MS),
      QWEN_TOKEND_LOG_LEVEL: 'info',
    },
  });
  const children: ChildProcess[] = [];
  try {
    await fx.writeCli(credsFrom(fx.server, 2));
    await fx.start();

    // A: concurrent refreshing, both sides.
    const cli = startFakeCli(fx, { FAKE_MODE: 'rounds', FAKE_ROUNDS: String(scale.cliRounds), FAKE_REFRESH_BELOW_MS: '1750-1950', FAKE_PAUSE_MS: '300' });
    children.push(cli.proc);
    const done = await cli.next('done');
    if (process.env.CHAOS_DEBUG) debugReuse(fx);
    expect(fx.server.reuseCount, 'a refresh token was presented twice').toBe(0);
    await converged(fx, 5_000);
    const cliRefreshes = Number(done.refreshes);
    const totalAfterRounds = fx.server.counts.refresh;

    // B1: an abandoned lock (old mtime, someone else's UUID) is broken at the next refresh.
    const client = fx.client({ minValidityMs: 0 });
    const lockPath = join(fx.qwenHome, 'oauth_creds.lock');
    const staleLogsBefore = fx.logs().filter((l) => /stale lock/.test(String(l.msg))).length;
    await createAbandonedLock(lockPath, ABANDONED_LOCK);
    const old = new Date(Date.now() - 10 * STALE_MS);
    await utimes(lockPath, old, old);
    await client.refresh();
    // The daemon's log reaches us over its stdout pipe, which may lag behind the socket's answer,
    // and the forced refresh may have been answered by an automatic one that was already past the
    // lock: the next one breaks it. Wait for that before B2, or the fake CLI would break it instead.
    const staleTakeovers = () => fx.logs().filter((l) => /broke the Qwen CLI's stale lock/.test(String(l.msg))).length - staleLogsBefore;
    await until(() => staleTakeovers() >= 1, STALE_MS + 3_000, 'the daemon to log breaking the abandoned lock');
    // B2: the fake CLI is SIGKILLed while it holds the lock; the daemon waits until stale, then takes it.
    const holder = startFakeCli(fx, { FAKE_MODE: 'hold-lock' });
    children.push(holder.proc);
    const holderLock = String((await holder.next('locked')).id);
    holder.proc.kill('SIGKILL');
    await client.refresh();
    // As above: once the dead holder's lock is STALE_MS old, the next refresh breaks it.
    await until(() => staleTakeovers() >= 2, STALE_MS + 3_000, 'the daemon to log breaking both abandoned locks').catch(() => undefined);
    // On failure, say what the daemon logged about the lock meanwhile (messages only: no token).
    const lockLines = () =>
      fx
        .logs()
        .map((l) => String(l.msg))
        .filter((m) => /lock/i.test(m))
        .slice(-12)
        .join(' | ');
    expect(staleTakeovers(), `both abandoned locks were broken; the daemon's lock messages: ${lockLines()}`).toBeGreaterThanOrEqual(2);
    // Neither abandoned lock is left. A lock may be there: the daemon's own, for one of its
    // automatic refreshes (one every ~150 ms here), so judge the lock by its content.
    const lockNow = await readRaw(lockPath);
    expect(lockNow === null || ![ABANDONED_LOCK, holderLock].includes(lockNow.trim()), 'an abandoned lock is still there').toBe(true);
    await converged(fx, 5_000);

    // C: the Qwen CLI, holding an invalid refresh token in memory, gets 400 and deletes its file.
    const revoked = credsFrom(fx.server, 2);
    fx.server.revokeRefreshToken(revoked.refresh_token);
    const before = await client.status();
    const deleter = startFakeCli(fx, { FAKE_MODE: 'rejected-refresh', FAKE_REFRESH_TOKEN: revoked.refresh_token });
    children.push(deleter.proc);
    const deleted = await deleter.next('done');
    expect(deleted.rejected).toBe(1);
    expect(await readRaw(fx.qwenCliPath)).toBeNull();
    // The daemon keeps its credentials: it still serves, its file is intact, it refreshes on.
    const after = await client.status();
    expect(after.state === 'valid' || after.state === 'refreshing').toBe(true);
    const served = await client.getAccessToken({ noCache: true, minValidityMs: 0 });
    expect(fx.server.issuedTokens('access').includes(served)).toBe(true);
    const own = await readRaw(fx.tokenPath);
    expect(own).not.toBeNull();
    parseCredentialsText(own!, 'own file after the Qwen CLI deleted its file');
    const refreshed = await client.refresh();
    expect(fingerprint(refreshed.access_token)).not.toBe(before.token_fingerprint);
    expect(fx.logs().some((l) => l.state === 'no_credentials' && l.previous !== undefined)).toBe(false);

    const figures: CliWriterFigures = {
      rounds: scale.cliRounds,
      cliRefreshes,
      cliSkipped: Number(done.skipped),
      daemonRefreshes: totalAfterRounds - cliRefreshes,
      adoptedFromCli: fx.logs().filter((l) => /adopted newer credentials|already refreshed by the Qwen CLI/.test(String(l.msg))).length,
      staleLocksTakenOver: staleTakeovers(),
      reuseCount: fx.server.reuseCount,
    };
    expect(bugLines(fx)).toEqual([]);
    report(`4 Qwen CLI as a concurrent writer (${scale.name})`, {
      rounds: figures.rounds,
      'Qwen CLI refreshes': figures.cliRefreshes,
      'Qwen CLI skips (fresh token found inside the lock)': figures.cliSkipped,
      'daemon refreshes': figures.daemonRefreshes,
      'daemon adoptions of CLI refreshes': figures.adoptedFromCli,
      'abandoned locks taken over': figures.staleLocksTakenOver,
      'credentials dropped on CLI delete': 0,
      'reuse count': figures.reuseCount,
    });
    expect(figures.reuseCount).toBe(0);
    return figures;
  } finally {
    for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
    ledger.addFixture(fx, 'Qwen CLI writer');
    await fx.cleanup();
  }
}

/** Debug aid: who presented an already-used refresh token, with the daemon's log lines around it. */
function debugReuse(fx: DaemonFixture): void {
  const seen = new Map<string, number>();
  const reqs = fx.server.requests.filter((r) => r.form?.grant_type === 'refresh_token');
  const tokenIndex = (t: string) => fx.server.issuedTokens('refresh').indexOf(t);
  for (const [i, r] of reqs.entries()) {
    const t = r.form!.refresh_token!;
    const who = String(r.headers['user-agent']).includes('fake') ? 'cli' : 'daemon';
    if (seen.has(t)) {
      console.log(`REUSE by ${who} of #${tokenIndex(t)} at ${r.at} (first used at ${seen.get(t)})`);
      for (const l of fx.logs()) {
        const at = Date.parse(String(l.time));
        if (Math.abs(at - r.at) < 400) console.log(`   ${at - r.at} ${l.msg} ${l.via ?? ''}`);
      }
      for (const q of reqs.slice(Math.max(0, i - 4), i + 1)) console.log(`   req ${q.at - r.at} ${String(q.headers['user-agent']).includes('fake') ? 'cli' : 'daemon'} #${tokenIndex(q.form!.refresh_token!)}`);
    } else seen.set(t, r.at);
  }
}
