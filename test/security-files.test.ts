/**
 * Issue 18, items 4 and 5: files and directories another user owns or may write are refused with
 * a clear error; the pid temp file is not written through a planted symlink; a FIFO at the Qwen
 * CLI's lock path or the pid file cannot wedge the daemon. Run as root, with uid 65534 (nobody)
 * playing the other user.
 */
import { execFileSync, spawn } from 'node:child_process';
import { chmod, chown, mkdir, readFile, symlink, unlink, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { serializeCredentials } from '../shared/credentials.js';
import { silentLogger } from '../daemon/logger.js';
import { QwenCliLock } from '../daemon/qwen-cli-lock.js';
import { createFixture, credsFrom, DAEMON_BIN, type DaemonFixture } from './support/daemon.js';

const isRoot = process.getuid?.() === 0;
const OTHER = 65534;

const cleanups: Array<() => Promise<void>> = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c().catch(() => undefined);
});

async function fixture(): Promise<DaemonFixture> {
  const fx = await createFixture();
  cleanups.push(async () => {
    fx.proc?.kill('SIGKILL');
    await fx.cleanup();
  });
  return fx;
}

/** Runs the daemon until it exits or is ready; its exit code (null when it became ready) and output. */
function runDaemon(fx: DaemonFixture, extraEnv: Record<string, string> = {}): Promise<{ code: number | null; output: string }> {
  return new Promise((resolve) => {
    const proc = spawn(process.execPath, [DAEMON_BIN], { env: { ...fx.env, ...extraEnv }, stdio: ['ignore', 'pipe', 'pipe'] });
    let output = '';
    const onData = (c: Buffer) => {
      output += c.toString('utf8');
      if (output.includes('"msg":"ready"')) {
        proc.kill('SIGTERM');
        resolve({ code: null, output });
      }
    };
    proc.stdout.on('data', onData);
    proc.stderr.on('data', onData);
    const timer = setTimeout(() => proc.kill('SIGKILL'), 15_000);
    proc.once('exit', (code) => {
      clearTimeout(timer);
      resolve({ code, output });
    });
  });
}

describe.skipIf(!isRoot)('ownership (item 4)', () => {
  it("refuses the Qwen CLI's credential file when another user owns it, and imports nothing", async () => {
    const fx = await fixture();
    await fx.writeCli(credsFrom(fx.server));
    await chown(fx.qwenCliPath, OTHER, OTHER);
    const { code, output } = await runDaemon(fx);
    // EX_CONFIG: a service manager does not restart it into the same refusal.
    expect(code).toBe(78);
    expect(output).toContain(`refusing qwen-cli credential file ${fx.qwenCliPath}: it belongs to uid ${OTHER}`);
    expect(await fx.readOwn()).toBeNull();
  });

  it("refuses our credential file in a directory others may write to, naming the fix", async () => {
    const fx = await fixture();
    await fx.writeOwn(credsFrom(fx.server));
    await chmod(dirname(fx.tokenPath), 0o777);
    const { code, output } = await runDaemon(fx);
    expect(code).toBe(78);
    expect(output).toContain('is writable by group/others (mode 0777)');
    expect(output).toContain(`chmod go-w ${dirname(fx.tokenPath)}`);
  });

  it("refuses the Qwen CLI's directory when another user owns it", async () => {
    const fx = await fixture();
    await fx.writeCli(credsFrom(fx.server));
    await chown(fx.qwenHome, OTHER, OTHER);
    const { code, output } = await runDaemon(fx);
    expect(code).toBe(78);
    expect(output).toContain(`its directory ${fx.qwenHome} belongs to uid ${OTHER}`);
  });

  it('refuses a state directory owned by another user, even before any credentials exist', async () => {
    const fx = await fixture();
    const state = dirname(fx.tokenPath);
    await mkdir(state, { mode: 0o700 });
    await chown(state, OTHER, OTHER);
    const { code, output } = await runDaemon(fx);
    expect(code).toBe(78);
    expect(output).toContain(`state directory ${state} belongs to uid ${OTHER}`);
  });
});

describe('symlinks and FIFOs (items 4 and 5)', () => {
  it('does not write the pid file through a symlink planted at its temp name', async () => {
    const fx = await fixture();
    const state = dirname(fx.tokenPath);
    await mkdir(state, { recursive: true, mode: 0o700 });
    const victim = join(fx.root, 'victim.txt');
    await writeFile(victim, 'precious\n');
    await symlink(victim, join(state, 'qwen-tokend.pid.tmp'));
    await fx.start();
    expect(await readFile(victim, 'utf8')).toBe('precious\n');
    const pid = JSON.parse(await readFile(join(state, 'qwen-tokend.pid'), 'utf8')) as { pid: number };
    expect(pid.pid).toBe(fx.proc!.pid);
  });

  it("releasing the Qwen CLI's lock does not wait on a FIFO put in its place", async () => {
    const fx = await fixture();
    const lockPath = join(fx.qwenHome, 'oauth_creds.lock');
    const lock = new QwenCliLock(lockPath, { staleMs: 35_000, acquireTimeoutMs: 1_000, logger: silentLogger() });
    await lock.acquire();
    await unlink(lockPath);
    execFileSync('mkfifo', [lockPath]);
    let timer: NodeJS.Timeout | undefined;
    const released = await Promise.race([
      lock.release(),
      new Promise<'hung'>((r) => {
        timer = setTimeout(() => r('hung'), 3_000);
      }),
    ]);
    clearTimeout(timer);
    if (released === 'hung') {
      // Unblock the stuck open() so the worker can exit, then fail.
      await writeFile(lockPath, '').catch(() => undefined);
    }
    expect(released).toBe(false);
  });

  it('a FIFO at the pid file does not wedge a second start while the lock is held', async () => {
    const fx = await fixture();
    await fx.writeOwn(credsFrom(fx.server));
    await fx.start();
    const pidPath = join(dirname(fx.tokenPath), 'qwen-tokend.pid');
    await unlink(pidPath);
    execFileSync('mkfifo', [pidPath]);
    await chmod(pidPath, 0o600);
    // The second daemon finds the lock held and no readable pid file: it waits for the lock to
    // go stale (it never does, the first daemon keeps it fresh) and answers SIGTERM meanwhile.
    const proc = spawn(process.execPath, [DAEMON_BIN], { env: fx.env, stdio: ['ignore', 'pipe', 'pipe'] });
    let output = '';
    proc.stdout.on('data', (c: Buffer) => (output += c.toString('utf8')));
    proc.stderr.on('data', (c: Buffer) => (output += c.toString('utf8')));
    const exited = new Promise<string>((r) => proc.once('exit', (code, signal) => r(signal ?? String(code))));
    const deadline = Date.now() + 10_000;
    while (!output.includes('waiting for its pid file') && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    expect(output).toContain('waiting for its pid file');
    proc.kill('SIGTERM');
    const timer = setTimeout(() => proc.kill('SIGKILL'), 5_000);
    const how = await exited;
    clearTimeout(timer);
    // Ended by SIGTERM itself (it has no handler yet while starting), not by the SIGKILL fallback.
    expect(how).not.toBe('SIGKILL');
  });

  it('a credential file written by us stays readable through these checks', async () => {
    const fx = await fixture();
    await mkdir(dirname(fx.tokenPath), { recursive: true, mode: 0o700 });
    await writeFile(fx.tokenPath, serializeCredentials(credsFrom(fx.server)), { mode: 0o600 });
    await fx.start();
    expect((await fx.client().getCredentials()).access_token.length).toBeGreaterThan(0);
  });
});

describe.skipIf(!isRoot)('a refused file at run time (item 4)', () => {
  it("another user's file put in place of the Qwen CLI's is not adopted, and the reason is logged", async () => {
    const fx = await fixture();
    const ours = credsFrom(fx.server);
    await fx.writeOwn(ours);
    await fx.start();
    const client = fx.client({ minValidityMs: 0 });
    expect((await client.getCredentials()).access_token).toBe(ours.access_token);
    // Newer credentials, in a file that belongs to someone else.
    const planted = join(fx.root, 'planted.json');
    await writeFile(planted, serializeCredentials(credsFrom(fx.server, 30_000)), { mode: 0o600 });
    await chown(planted, OTHER, OTHER);
    await mkdir(fx.qwenHome, { recursive: true, mode: 0o700 });
    const { rename } = await import('node:fs/promises');
    await rename(planted, fx.qwenCliPath);
    const line = await fx.waitForLog((l) => String(l.msg).startsWith(`not adopting a change of ${fx.qwenCliPath}`));
    expect(String(line.msg)).toContain(`belongs to uid ${OTHER}`);
    expect((await client.getCredentials({ noCache: true })).access_token).toBe(ours.access_token);
    expect(fx.logs().filter((l) => /unhandled rejection/.test(String(l.msg)))).toEqual([]);
  });
});
