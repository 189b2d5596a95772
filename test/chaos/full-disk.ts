/**
 * Scenario 9: the log on a full filesystem (issue 18, item 3). The daemon's log file lives on a
 * small tmpfs mounted for the scenario, filled up before start-up and again while refreshes
 * rotate the refresh token. Logging must never stop the daemon: it starts, reports the failing
 * log once on stderr and logs there instead, keeps refreshing and serving, and the credential
 * files (on another filesystem) always hold the current refresh token. After space is freed,
 * SIGHUP puts the log back in its file.
 */
import { execFileSync } from 'node:child_process';
import { mkdir, readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { expect } from 'vitest';
import { parseCredentialsText } from '../../shared/credentials.js';
import { createFixture, credsFrom } from '../support/daemon.js';
import { bugLines, readRaw, report, until, type SecretLedger } from './harness.js';
import type { ChaosScale } from './scale.js';

export interface FullDiskFigures {
  refreshes: number;
  reuseCount: number;
  fallbackReports: number;
  mount: string;
}

/** Mounts a tmpfs of `kib` KiB at `dir`; false (with the reason) when this machine does not allow it. */
function mountTmpfs(dir: string, kib: number): { ok: true } | { ok: false; reason: string } {
  if (process.getuid?.() !== 0) return { ok: false, reason: 'not root' };
  try {
    execFileSync('mount', ['-t', 'tmpfs', '-o', `size=${kib}k,mode=0700`, 'tmpfs', dir], { stdio: 'pipe' });
    return { ok: true };
  } catch (err) {
    return { ok: false, reason: String((err as { stderr?: Buffer }).stderr ?? err).trim() };
  }
}

/** Fills the filesystem at `dir` until a write fails with ENOSPC. */
async function fill(dir: string): Promise<void> {
  const chunk = Buffer.alloc(4096, 0x61);
  const parts: Buffer[] = [];
  for (let i = 0; i < 1024; i++) {
    parts.push(chunk);
    try {
      await writeFile(join(dir, 'filler'), Buffer.concat(parts));
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOSPC') return;
      throw err;
    }
  }
  throw new Error(`${dir} did not fill up`);
}

export async function logOnFullDisk(scale: ChaosScale, ledger: SecretLedger): Promise<FullDiskFigures | 'skipped'> {
  const refreshes = scale.name === 'full' ? 200 : 20;
  const fx = await createFixture({ server: { expiresIn: 3600, rotateRefreshTokens: true }, env: { QWEN_TOKEND_LOG_LEVEL: 'debug' } });
  const logDir = join(fx.root, 'logfs');
  await mkdir(logDir, { mode: 0o700 });
  const mounted = mountTmpfs(logDir, 64);
  if (!mounted.ok) {
    // Not a pass: the scenario says plainly that it could not run here, and why.
    report('9 full disk', { skipped: `cannot mount a tmpfs (${mounted.reason})` });
    await fx.cleanup();
    return 'skipped';
  }
  const logFile = join(logDir, 'qwen-tokend.log');
  const figures: FullDiskFigures = { refreshes: 0, reuseCount: 0, fallbackReports: 0, mount: 'tmpfs 64k' };
  try {
    await fx.writeOwn(credsFrom(fx.server, 3600));
    await fx.writeCli((await fx.readOwn())!);
    const reports = () => fx.output.filter((l) => l.startsWith('qwen-tokend: cannot') && l.includes('logging to stderr instead'));
    // Full before start-up: the first line already fails.
    await fill(logDir);
    await fx.start({ QWEN_TOKEND_LOG_FILE: logFile });
    expect(reports(), 'the failing log is reported once').toHaveLength(1);
    expect(reports()[0]).toContain('ENOSPC');

    const client = fx.client({ minValidityMs: 0 });
    const refreshRound = async (n: number) => {
      for (let i = 0; i < n; i++) {
        const fresh = await client.refresh();
        figures.refreshes++;
        // Served: the token the daemon hands out is the one it just got.
        expect((await client.getCredentials()).access_token).toBe(fresh.access_token);
        // Intact: both files hold the credentials of that refresh.
        const own = parseCredentialsText((await readRaw(fx.tokenPath))!, fx.tokenPath);
        const cli = parseCredentialsText((await readRaw(fx.qwenCliPath))!, fx.qwenCliPath);
        expect(own.access_token).toBe(fresh.access_token);
        expect(cli.refresh_token).toBe(own.refresh_token);
      }
    };
    await refreshRound(refreshes / 2);

    // Space again, and SIGHUP (what logrotate sends): the log goes back to its file.
    await rm(join(logDir, 'filler'));
    fx.proc!.kill('SIGHUP');
    await until(async () => (await readFile(logFile, 'utf8').catch(() => '')).includes('re-reading credential files'), 5_000, 'the log back in its file');

    // Full again while running: the next line fails, is reported once more, and refreshes go on.
    await fill(logDir);
    await refreshRound(refreshes / 2);
    await until(() => reports().length === 2 || undefined, 5_000, 'the second failure reported');
    figures.fallbackReports = reports().length;

    figures.reuseCount = fx.server.reuseCount;
    expect(fx.server.reuseCount, 'retired refresh tokens presented').toBe(0);
    expect(fx.proc?.exitCode, 'the daemon is still running').toBeNull();
    expect(bugLines(fx)).toEqual([]);
    // Every refresh was logged somewhere a person can read it (stderr, while the disk was full).
    await until(() => fx.logs().filter((l) => l.msg === 'token refreshed').length >= refreshes / 2 || undefined, 5_000, 'refresh log lines on stderr');
  } finally {
    ledger.addFixture(fx, 'full disk');
    await fx.stop().catch(() => undefined);
    try {
      execFileSync('umount', [logDir], { stdio: 'pipe' });
    } catch {
      execFileSync('umount', ['-l', logDir], { stdio: 'pipe' });
    }
    await fx.cleanup();
  }
  report('9 full disk', { ...figures });
  return figures;
}
