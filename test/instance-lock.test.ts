/**
 * The single-instance lock when a daemon died at an awkward moment: after taking the lock but
 * before its pid file said who holds it. Found by the chaos crash loop: the restarted daemon
 * refused with exit 3 ("already running"), which systemd does not restart.
 */
import { spawn } from 'node:child_process';
import { mkdtemp, mkdir, readdir, readFile, rm, utimes, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { acquireInstanceLock, InstanceLockedError, type InstanceLock } from '../daemon/instance-lock.js';
import { silentLogger } from '../daemon/logger.js';

let dir: string;
const held: InstanceLock[] = [];

beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), 'qtd-instance-'));
});

afterEach(async () => {
  for (const lock of held.splice(0)) await lock.release();
  await rm(dir, { recursive: true, force: true });
});

const lockPath = () => join(dir, 'qwen-tokend.lock');
const pidPath = () => join(dir, 'qwen-tokend.pid');

/** What a daemon killed right after taking the lock leaves: the lock directory, fresh. */
async function orphanedLock(pidFile: string | null): Promise<void> {
  await mkdir(lockPath());
  if (pidFile !== null) await writeFile(pidPath(), pidFile);
}

/** Ages the lock past proper-lockfile's 10 s staleness, as time would for a dead holder. */
async function ageLock(): Promise<void> {
  const old = new Date(Date.now() - 60_000);
  await utimes(lockPath(), old, old);
}

async function acquire(): Promise<InstanceLock> {
  const lock = await acquireInstanceLock(dir, join(dir, 'd.sock'), silentLogger(), () => undefined);
  held.push(lock);
  return lock;
}

describe('the instance lock', () => {
  it('held with an empty pid file (its writer was killed mid-write): waits, and takes it once the lock goes stale', async () => {
    await orphanedLock('');
    const acquiring = acquire().then(
      () => 'acquired',
      (err: unknown) => err,
    );
    // Still waiting (the old code refused at once): the lock is fresh and may belong to a
    // daemon that is about to write its pid file.
    const early = await Promise.race([acquiring, new Promise((r) => setTimeout(() => r('waiting'), 400))]);
    expect(early).toBe('waiting');
    await ageLock();
    expect(await acquiring).toBe('acquired');
    const info = JSON.parse(await readFile(pidPath(), 'utf8')) as { pid: number };
    expect(info.pid).toBe(process.pid);
  });

  it('held with no pid file, then one naming a live process appears: refuses, naming it', async () => {
    await orphanedLock(null);
    const sleeper = spawn(process.execPath, ['-e', 'setTimeout(() => {}, 30000)'], { stdio: 'ignore' });
    try {
      const acquiring = acquire().catch((err: unknown) => err);
      await new Promise((r) => setTimeout(r, 300));
      await writeFile(pidPath(), `${JSON.stringify({ pid: sleeper.pid, socket: '/s', started: 'now' })}\n`);
      const err = await acquiring;
      expect(err).toBeInstanceOf(InstanceLockedError);
      expect((err as Error).message).toContain(`already running (pid ${sleeper.pid}`);
    } finally {
      sleeper.kill('SIGKILL');
    }
  });

  it('held by a daemon that is gone (its pid file names a dead process): taken over at once', async () => {
    const dead = spawn(process.execPath, ['-e', '']);
    await new Promise((r) => dead.once('exit', r));
    await orphanedLock(`${JSON.stringify({ pid: dead.pid, socket: '/s', started: 'then' })}\n`);
    await acquire();
    const info = JSON.parse(await readFile(pidPath(), 'utf8')) as { pid: number };
    expect(info.pid).toBe(process.pid);
  });

  it.skipIf(process.platform !== 'linux')('held by a daemon that died but is not reaped (its pid file names a zombie): taken over at once', async () => {
    // sh forks `sleep 0`, then becomes a `sleep` that never waits for it: a zombie until the end.
    const parent = spawn('sh', ['-c', 'sleep 0 & echo $!; exec sleep 60'], { stdio: ['ignore', 'pipe', 'ignore'] });
    try {
      const pid = Number(await new Promise<string>((r) => parent.stdout!.once('data', (b: Buffer) => r(b.toString()))));
      const state = () => readFile(`/proc/${pid}/stat`, 'latin1').then((s) => s.slice(s.lastIndexOf(')') + 2)[0], () => null);
      while ((await state()) !== 'Z') await new Promise((r) => setTimeout(r, 10));
      await orphanedLock(`${JSON.stringify({ pid, socket: '/s', started: 'then' })}\n`);
      await acquire();
      const info = JSON.parse(await readFile(pidPath(), 'utf8')) as { pid: number };
      expect(info.pid).toBe(process.pid);
    } finally {
      parent.kill('SIGKILL');
    }
  });

  it('writes its pid file by rename, leaving no temp file behind', async () => {
    // A temp file left by a holder killed before its rename is simply replaced.
    await writeFile(`${pidPath()}.tmp`, 'half a pid fi');
    await acquire();
    expect(JSON.parse(await readFile(pidPath(), 'utf8'))).toMatchObject({ pid: process.pid, socket: join(dir, 'd.sock') });
    expect((await readdir(dir)).filter((n) => n.endsWith('.tmp'))).toEqual([]);
  });
});
