/**
 * One daemon per state directory. proper-lockfile holds `<stateDir>/qwen-tokend.lock` (an
 * mkdir lock whose mtime it keeps fresh); a pid file beside it names the holder, so a second
 * daemon can say which one is running, and a lock left by a killed daemon is taken over at once.
 */
import { mkdir, readFile, rm, writeFile, unlink } from 'node:fs/promises';
import { join } from 'node:path';
import lockfile from 'proper-lockfile';
import { processAlive } from '../shared/diagnostics.js';
import { QwenError } from '../shared/errors.js';
import type { Logger } from './logger.js';

export class InstanceLockedError extends QwenError {}

export interface InstanceInfo {
  pid: number;
  socket: string;
  started: string;
}

export interface InstanceLock {
  release(): Promise<void>;
}

async function readInfo(path: string): Promise<InstanceInfo | null> {
  try {
    const info = JSON.parse(await readFile(path, 'utf8')) as Partial<InstanceInfo>;
    return typeof info.pid === 'number' ? (info as InstanceInfo) : null;
  } catch {
    return null;
  }
}

/**
 * Takes the instance lock or throws `InstanceLockedError` naming the running daemon.
 * `onCompromised` runs if the lock is lost while we run (e.g. its directory was removed).
 */
export async function acquireInstanceLock(
  stateDir: string,
  socketPath: string,
  logger: Logger,
  onCompromised: (err: Error) => void,
): Promise<InstanceLock> {
  await mkdir(stateDir, { recursive: true, mode: 0o700 });
  const lockPath = join(stateDir, 'qwen-tokend.lock');
  const pidPath = join(stateDir, 'qwen-tokend.pid');
  const take = () =>
    lockfile.lock(stateDir, {
      lockfilePath: lockPath,
      realpath: false,
      retries: 0,
      stale: 10_000,
      update: 2_000,
      onCompromised,
    });
  let release: () => Promise<void>;
  try {
    release = await take();
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ELOCKED') throw err;
    const holder = await readInfo(pidPath);
    if (holder && holder.pid !== process.pid && processAlive(holder.pid)) {
      throw new InstanceLockedError(
        `another qwen-tokend is already running (pid ${holder.pid}, socket ${holder.socket}, started ${holder.started}); stop it first or use it`,
      );
    }
    if (holder) {
      // The holder is gone (killed): its lock is ours to take now, not in 10 s.
      logger.warn({ pid: holder.pid }, 'taking over the instance lock of a daemon that is no longer running');
      await rm(lockPath, { recursive: true, force: true });
      try {
        release = await take();
      } catch (again) {
        if ((again as NodeJS.ErrnoException).code === 'ELOCKED') {
          throw new InstanceLockedError(`another qwen-tokend is starting in ${stateDir}; try again in a moment`);
        }
        throw again;
      }
    } else {
      throw new InstanceLockedError(`another qwen-tokend holds ${lockPath} (no pid file yet; it may be starting)`);
    }
  }
  const info: InstanceInfo = { pid: process.pid, socket: socketPath, started: new Date().toISOString() };
  await writeFile(pidPath, `${JSON.stringify(info)}\n`, { mode: 0o600 });
  return {
    async release() {
      const current = await readInfo(pidPath);
      if (current?.pid === process.pid) await unlink(pidPath).catch(() => undefined);
      await release().catch(() => undefined);
    },
  };
}
