/**
 * One daemon per state directory. proper-lockfile holds `<stateDir>/qwen-tokend.lock` (an
 * mkdir lock whose mtime it keeps fresh); a pid file beside it names the holder, so a second
 * daemon can say which one is running, and a lock left by a killed daemon is taken over at once.
 */
import { constants as fs, statSync } from 'node:fs';
import { mkdir, open, rename, rm, unlink } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import lockfile from 'proper-lockfile';
import { processAlive } from '../shared/diagnostics.js';
import { QwenConfigError, QwenError } from '../shared/errors.js';
import { ownershipProblem } from '../shared/path-trust.js';
import { readSmallFile } from './credential-store.js';
import type { Logger } from './logger.js';

export class InstanceLockedError extends QwenError {}

/** A lock whose mtime has not been refreshed for this long belongs to a dead process. */
const STALE_MS = 10_000;
/** How often the holder refreshes the lock's mtime. */
const UPDATE_MS = 2_000;
/** How often to look again while a lock without a pid file may still be starting. */
const POLL_MS = 100;

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
    // Non-blocking and regular files only: a FIFO planted here must not stop a start-up.
    const info = JSON.parse(await readSmallFile(path)) as Partial<InstanceInfo>;
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
  // The lock, pid file and credentials live here: another user who owns or may write this
  // directory could swap any of them.
  const problem = ownershipProblem(`state directory ${stateDir}`, statSync(stateDir));
  if (problem) throw new QwenConfigError(`refusing to run: ${problem}; use a directory of your own (QWEN_TOKEN_PATH) or run \`chmod go-w ${stateDir}\``);
  const lockPath = join(stateDir, 'qwen-tokend.lock');
  const pidPath = join(stateDir, 'qwen-tokend.pid');
  const take = () =>
    lockfile.lock(stateDir, {
      lockfilePath: lockPath,
      realpath: false,
      retries: 0,
      stale: STALE_MS,
      update: UPDATE_MS,
      onCompromised,
    });
  const locked = (err: unknown) => (err as NodeJS.ErrnoException).code === 'ELOCKED';
  // Held without a pid file: by a daemon that took the lock a moment ago (its pid file follows
  // at once), or by one killed before it wrote one. Wait for the pid file or for the lock to go
  // stale, which a live holder never lets happen; refusing at once would keep a restarted
  // daemon (say, by systemd after a crash) out for good, as exit 3 means "already running".
  const deadline = Date.now() + STALE_MS + 2 * UPDATE_MS;
  let waiting = false;
  let release: () => Promise<void>;
  for (;;) {
    try {
      release = await take();
      break;
    } catch (err) {
      if (!locked(err)) throw err;
    }
    const holder = await readInfo(pidPath);
    if (holder && holder.pid !== process.pid && processAlive(holder.pid)) {
      throw new InstanceLockedError(
        `another qwen-tokend is already running (pid ${holder.pid}, socket ${holder.socket}, started ${holder.started}); stop it first or use it`,
      );
    }
    if (holder) {
      // The holder is gone (killed, perhaps a zombie nobody reaps): its lock is ours to take now, not in 10 s.
      logger.warn({ pid: holder.pid }, 'taking over the instance lock of a daemon that is no longer running');
      await rm(lockPath, { recursive: true, force: true });
      try {
        release = await take();
        break;
      } catch (again) {
        if (locked(again)) throw new InstanceLockedError(`another qwen-tokend is starting in ${stateDir}; try again in a moment`);
        throw again;
      }
    }
    if (Date.now() > deadline) {
      throw new InstanceLockedError(`another qwen-tokend holds ${lockPath} and has written no pid file in ${(STALE_MS + 2 * UPDATE_MS) / 1000} s`);
    }
    if (!waiting) {
      waiting = true;
      logger.warn({ lock: lockPath }, 'the instance lock is held but no daemon has said who holds it; waiting for its pid file, or for the lock to go stale');
    }
    await sleep(POLL_MS);
  }
  const info: InstanceInfo = { pid: process.pid, socket: socketPath, started: new Date().toISOString() };
  // Replaced by rename: a daemon killed while writing leaves the previous pid file (naming a
  // dead process, so the next start takes over) or this one, never an empty one. Only the
  // lock's holder writes it, so one temp name is enough.
  const temp = `${pidPath}.tmp`;
  // Created exclusively and without following links: whatever sits at the temp name (a leftover
  // of a killed daemon, or a symlink planted to make us overwrite another file) is removed, not
  // written through.
  await unlink(temp).catch(() => undefined);
  const fh = await open(temp, fs.O_WRONLY | fs.O_CREAT | fs.O_EXCL | fs.O_NOFOLLOW, 0o600);
  try {
    await fh.writeFile(`${JSON.stringify(info)}\n`, 'utf8');
  } finally {
    await fh.close();
  }
  await rename(temp, pidPath);
  return {
    async release() {
      const current = await readInfo(pidPath);
      if (current?.pid === process.pid) await unlink(pidPath).catch(() => undefined);
      await release().catch(() => undefined);
    },
  };
}
