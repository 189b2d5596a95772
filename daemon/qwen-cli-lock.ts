import { randomUUID } from 'node:crypto';
import type { Stats } from 'node:fs';
import { chmod, link, mkdir, open, rename, stat, unlink, type FileHandle } from 'node:fs/promises';
import { dirname } from 'node:path';
import { errnoCode } from '../shared/diagnostics.js';
import { systemClock, type Clock } from '../shared/clock.js';
import { QwenCredentialsFileError, QwenError, QwenOAuthError } from '../shared/errors.js';
import { describeFsError, readSmallFile } from './credential-store.js';
import type { Logger } from './logger.js';

/**
 * The Qwen CLI's own cross-process lock on its credential file (qwen-code's protocol, not
 * proper-lockfile's): a plain file created with O_CREAT|O_EXCL holding a random UUID, judged
 * stale by its mtime, broken by renaming it aside, released only by the holder of that UUID.
 */

export interface QwenCliLockOptions {
  /** A lock whose mtime is older than this is abandoned (qwen-code 0.24.4: 35 s). */
  staleMs: number;
  /** Give up (retryable error) when the lock is still held after this long. */
  acquireTimeoutMs: number;
  /** Base wait between attempts; each wait adds up to as much again as jitter. Default 50 (so 50..100 ms). */
  pollMs?: number;
  /** Wall-clock time source; staleness compares it with file mtimes, so it must track real time. */
  clock?: Clock;
  logger: Logger;
  /** Stops waiting for the lock (shutdown); noticed within one poll interval. */
  signal?: AbortSignal;
}

const DEFAULT_POLL_MS = 50;

/** One acquisition of the Qwen CLI's lock file; use `withQwenCliLock` unless you need the two halves. */
export class QwenCliLock {
  /** The UUID written into the lock file while we hold it. */
  readonly id: string = randomUUID();

  private readonly clock: Clock;
  private acquiredAt: number | undefined;

  constructor(
    readonly lockPath: string,
    private readonly options: QwenCliLockOptions,
  ) {
    this.clock = options.clock ?? systemClock;
  }

  /** True between a successful `acquire()` and `release()`. */
  get held(): boolean {
    return this.acquiredAt !== undefined;
  }

  /**
   * Takes the lock, breaking it if stale and waiting while another process holds it; throws a
   * retryable `QwenOAuthError` after `acquireTimeoutMs`.
   */
  async acquire(): Promise<void> {
    if (this.held) throw new QwenError(`the Qwen CLI's lock ${this.lockPath} is already held by this instance`);
    const deadline = this.clock.now() + this.options.acquireTimeoutMs;
    await this.ensureDirectory();
    for (;;) {
      if (this.options.signal?.aborted) {
        throw new QwenOAuthError(`stopped waiting for the Qwen CLI's lock ${this.lockPath}`, { oauthError: 'cancelled' });
      }
      if (await this.tryCreate()) return;
      const broken = await this.breakIfStale();
      const now = this.clock.now();
      if (now >= deadline) {
        throw new QwenOAuthError(`the Qwen CLI's lock ${this.lockPath} is held by another process`, {
          retryable: true,
        });
      }
      // After breaking a stale lock, try again at once; otherwise wait a jittered poll interval.
      if (!broken) await this.sleep(Math.min(this.pollDelay(), deadline - now));
    }
  }

  /** Removes the lock file if it still holds our UUID; never removes another process's lock. */
  async release(): Promise<boolean> {
    const acquiredAt = this.acquiredAt;
    if (acquiredAt === undefined) return false;
    this.acquiredAt = undefined;
    const heldMs = this.clock.now() - acquiredAt;
    let content: string;
    try {
      content = await readSmallFile(this.lockPath);
    } catch (err) {
      if (errnoCode(err) === 'ENOENT') {
        this.options.logger.warn(
          { lockPath: this.lockPath, heldMs },
          `the Qwen CLI's lock ${this.lockPath} vanished while we held it (another process judged it stale?)`,
        );
        return false;
      }
      if (errnoCode(err) === 'EFTYPE' || errnoCode(err) === 'ELOOP' || errnoCode(err) === 'ENXIO') {
        // Something else now sits at the path (a FIFO, a symlink): not our lock, not ours to remove.
        this.options.logger.warn(
          { lockPath: this.lockPath, heldMs },
          `not removing ${this.lockPath}: it was replaced by something that is not a lock file while we held it`,
        );
        return false;
      }
      throw this.lockError('cannot read', err);
    }
    if (content.trim() !== this.id) {
      this.options.logger.warn(
        { lockPath: this.lockPath, heldMs },
        `not removing the Qwen CLI's lock ${this.lockPath}: another process took it over while we held it`,
      );
      return false;
    }
    try {
      await unlink(this.lockPath);
    } catch (err) {
      if (errnoCode(err) === 'ENOENT') return false;
      throw this.lockError('cannot remove', err);
    }
    if (heldMs > this.options.staleMs) {
      this.options.logger.warn(
        { lockPath: this.lockPath, heldMs, staleMs: this.options.staleMs },
        `held the Qwen CLI's lock ${this.lockPath} for ${heldMs} ms, longer than its stale age (${this.options.staleMs} ms)`,
      );
    }
    return true;
  }

  /** One O_CREAT|O_EXCL attempt; true when the lock is now ours. */
  private async tryCreate(): Promise<boolean> {
    let fh: FileHandle;
    try {
      fh = await open(this.lockPath, 'wx', 0o600);
    } catch (err) {
      const code = errnoCode(err);
      if (code === 'EEXIST') return false;
      if (code === 'ENOENT') {
        // The directory vanished under us; recreate it and let the loop try again.
        await this.ensureDirectory();
        return false;
      }
      throw this.lockError('cannot create', err);
    }
    try {
      await fh.writeFile(this.id, 'utf8');
    } catch (err) {
      await fh.close().catch(() => undefined);
      await unlink(this.lockPath).catch(() => undefined);
      throw this.lockError('cannot write', err);
    }
    await fh.close().catch(() => undefined);
    this.acquiredAt = this.clock.now();
    return true;
  }

  /**
   * Breaks the lock when its mtime is older than `staleMs`: rename aside (atomic, so only one
   * contender wins), then unlink. True when the lock is gone (by us or someone else).
   */
  private async breakIfStale(): Promise<boolean> {
    let judged: Stats;
    try {
      judged = await stat(this.lockPath);
    } catch (err) {
      if (errnoCode(err) === 'ENOENT') return true;
      throw this.lockError('cannot inspect', err);
    }
    const ageMs = this.clock.now() - judged.mtimeMs;
    if (ageMs <= this.options.staleMs) return false;

    const aside = `${this.lockPath}.stale-${randomUUID()}`;
    try {
      await rename(this.lockPath, aside);
    } catch (err) {
      if (errnoCode(err) === 'ENOENT') return true; // another contender broke it first
      throw this.lockError('cannot break stale', err);
    }
    // The rename took whatever sat at the path at that instant. If a faster contender had
    // already broken the stale lock and created a fresh one, we just moved a live lock:
    // put it back (link() never overwrites a lock someone created since).
    let taken: Stats | undefined;
    try {
      taken = await stat(aside);
    } catch {
      taken = undefined;
    }
    if (taken !== undefined && (taken.ino !== judged.ino || taken.dev !== judged.dev)) {
      try {
        await link(aside, this.lockPath);
      } catch (err) {
        this.options.logger.warn(
          { lockPath: this.lockPath, reason: describeFsError(err) },
          `moved a live Qwen CLI lock ${this.lockPath} aside by mistake and could not restore it: ${describeFsError(err)}`,
        );
      }
      await unlink(aside).catch(() => undefined);
      return true;
    }
    await unlink(aside).catch(() => undefined);
    this.options.logger.warn(
      { lockPath: this.lockPath, ageMs: Math.round(ageMs), staleMs: this.options.staleMs },
      `broke the Qwen CLI's stale lock ${this.lockPath} (untouched for ${Math.round(ageMs)} ms, stale after ${this.options.staleMs} ms)`,
    );
    return true;
  }

  /** Creates the lock's directory as 0700 when missing; an existing directory is left as it is. */
  private async ensureDirectory(): Promise<void> {
    const dir = dirname(this.lockPath);
    try {
      const firstCreated = await mkdir(dir, { recursive: true, mode: 0o700 });
      if (firstCreated === undefined) return;
      for (let p = dir; ; p = dirname(p)) {
        await chmod(p, 0o700);
        if (p === firstCreated || dirname(p) === p) break;
      }
    } catch (err) {
      throw new QwenCredentialsFileError(
        `cannot create the directory of the Qwen CLI's lock ${this.lockPath}: ${describeFsError(err)}`,
        { cause: err },
      );
    }
  }

  private pollDelay(): number {
    const base = Math.max(1, this.options.pollMs ?? DEFAULT_POLL_MS);
    return base + Math.floor(Math.random() * base);
  }

  private sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      this.clock.setTimeout(resolve, Math.max(0, ms));
    });
  }

  private lockError(what: string, err: unknown): QwenCredentialsFileError {
    return new QwenCredentialsFileError(`${what} the Qwen CLI's lock ${this.lockPath}: ${describeFsError(err)}`, {
      cause: err,
    });
  }
}

/**
 * Runs `fn` while holding the Qwen CLI's lock at `lockPath`, releasing it even when `fn`
 * throws. Throws a retryable `QwenOAuthError` when the lock stays held past `acquireTimeoutMs`.
 */
export async function withQwenCliLock<T>(
  lockPath: string,
  options: QwenCliLockOptions,
  fn: () => Promise<T>,
): Promise<T> {
  const lock = new QwenCliLock(lockPath, options);
  await lock.acquire();
  try {
    return await fn();
  } finally {
    try {
      await lock.release();
    } catch (err) {
      // A lock we fail to remove goes stale on its own; do not hide fn's outcome for it.
      options.logger.warn(
        { lockPath, reason: describeFsError(err) },
        `could not release the Qwen CLI's lock ${lockPath}: ${describeFsError(err)}`,
      );
    }
  }
}
