import { statSync, type Stats } from 'node:fs';
import { basename, dirname, resolve, sep } from 'node:path';
import { watch, type FSWatcher } from 'chokidar';
import type { Logger } from './logger.js';
import { errorText } from '../shared/diagnostics.js';

/** After the last event for a file, read it once more this much later. */
const TRAILING_CHECK_MS = 150;
/**
 * A watch not ready after this long is given up and tried again this much later: chokidar never
 * reports ready when the directory turns into something else while it is being read.
 */
const READY_LIMIT_MS = 10_000;
/**
 * After a watched directory came, went or was replaced, one more look (and a read of its files)
 * this much later: events that arrived while watches were being swapped (a directory deleted,
 * made again and written at once, on a busy machine) are not left to the next refresh.
 */
const TRANSITION_RECHECK_MS = 1_000;

export interface WatchedFile {
  path: string;
  onChange: () => void;
}

/** A directory being watched, and which one it was when the watch began. */
interface WatchedDirectory {
  watcher: FSWatcher;
  /** The directory's device and inode when the watch began. */
  id: string;
  /**
   * The directory itself was deleted or moved (its watch said so): the watch follows nothing any
   * more. Needed besides `id`, because a directory made again at once often gets the inode number
   * the deleted one had.
   */
  lost: boolean;
}

/** Which directory stands at a path (while it stands there). */
function identity(stats: Stats): string {
  return `${stats.dev}:${stats.ino}`;
}

/** The nearest directory at or above `dir` that exists now, with its stats. */
function nearestDirectory(dir: string): { path: string; stats: Stats } {
  for (let p = dir; ; p = dirname(p)) {
    let stats: Stats | undefined;
    try {
      stats = statSync(p, { throwIfNoEntry: false });
    } catch {
      // ENOTDIR, EACCES: not a directory we can watch; look further up.
    }
    if (stats?.isDirectory() || dirname(p) === p) return { path: p, stats: stats ?? statSync(p) };
  }
}

/**
 * Watches credential files for changes made by other processes. It watches each file's
 * parent directory and filters by name, because writers replace the file by rename (the
 * watched inode goes away) and a file that does not exist yet must still be seen when created.
 *
 * A directory that does not exist is not created: it may belong to another program (`~/.qwen`
 * is the Qwen CLI's, made when someone first logs in with it). Its nearest existing ancestor
 * is watched instead, for that directory (or one on the way to it) to appear. A watched
 * directory that goes away (deleted, moved, or replaced by a new one under the same name) is
 * followed the same way: a watch stays on the inode it began on, so it is dropped, its nearest
 * existing ancestor is watched until the directory is back, and the directory's files are read
 * as soon as it is watched again.
 */
export class CredentialWatcher {
  private readonly byPath = new Map<string, WatchedFile>();
  /** The directories of the watched files. */
  private readonly dirs = new Set<string>();
  /** What is watched: each of `dirs` that exists, or else its nearest existing ancestor. One chokidar watcher each. */
  private readonly watched = new Map<string, WatchedDirectory>();
  /** For each of `dirs`, the directory that stood in for it at the last look (itself when it existed). */
  private readonly lastSeenAs = new Map<string, string>();
  /** Watchers not ready yet. */
  private readonly pending = new Set<FSWatcher>();
  private readonly timers = new Map<string, NodeJS.Timeout>();
  private started = false;
  private closed = false;
  /** The look at the directories in progress, and whether something asked for another one meanwhile. */
  private looking: Promise<void> | null = null;
  private lookAgain = false;

  constructor(
    files: WatchedFile[],
    private readonly logger: Logger,
  ) {
    for (const file of files) this.remember(file);
  }

  /** Starts watching; resolves once the watcher is ready (changes from then on are reported). */
  async start(): Promise<void> {
    this.started = true;
    await this.look();
  }

  /** Watches one more file (its directory too, or the nearest existing one above it). */
  add(file: WatchedFile): void {
    const newDir = !this.dirs.has(dirname(resolve(file.path)));
    this.remember(file);
    if (newDir && this.started) void this.look();
  }

  /** Stops reporting changes of `path` (its directory stays watched: cheap, and others may share it). */
  remove(path: string): void {
    this.byPath.delete(resolve(path));
  }

  /** The directories watched now: those of the files, or stand-ins for missing ones (for tests). */
  watchedDirectories(): string[] {
    return [...this.watched.keys()];
  }

  async close(): Promise<void> {
    this.closed = true;
    for (const timer of this.timers.values()) clearTimeout(timer);
    this.timers.clear();
    // Not waiting for a look in progress: it stops at its next step, and may wait for a
    // watcher that closing it here releases.
    const watchers = [...this.pending, ...[...this.watched.values()].map((w) => w.watcher)];
    this.pending.clear();
    this.watched.clear();
    await Promise.all(watchers.map((w) => w.close()));
  }

  private remember(file: WatchedFile): void {
    const key = resolve(file.path);
    this.byPath.set(key, file);
    this.dirs.add(dirname(key));
  }

  /**
   * Makes what is watched match what exists: runs until a pass finds nothing to change, so a
   * directory that came or went while a watch was being set up is not missed. Calls made
   * meanwhile are folded into the one in progress.
   */
  private look(): Promise<void> {
    if (this.looking) {
      this.lookAgain = true;
      return this.looking;
    }
    const run = async () => {
      try {
        let changed: boolean;
        do {
          this.lookAgain = false;
          changed = await this.lookOnce();
        } while ((changed || this.lookAgain) && !this.closed);
      } catch (err) {
        if (this.closed) return;
        this.logger.warn({ err: errorText(err) }, `file watcher error; looking again in ${READY_LIMIT_MS / 1000} s`);
        this.later('\0look', READY_LIMIT_MS, () => void this.look());
      } finally {
        this.looking = null;
      }
    };
    this.looking = run();
    return this.looking;
  }

  /** One pass of `look()`; true when it changed what is watched. */
  private async lookOnce(): Promise<boolean> {
    const wanted = new Map<string, Stats>();
    const standIns = new Map<string, string>();
    for (const dir of this.dirs) {
      const { path, stats } = nearestDirectory(dir);
      wanted.set(path, stats);
      standIns.set(dir, path);
    }
    let changed = false;
    // A watch stays with the inode it began on: one whose directory is gone or was replaced
    // under the same name sees nothing more, so it goes (and would otherwise stay open for good).
    for (const [path, w] of this.watched) {
      const stats = wanted.get(path);
      if (stats && !w.lost && identity(stats) === w.id) continue;
      this.watched.delete(path);
      await w.watcher.close();
      changed = true;
    }
    const fresh = new Set<string>();
    for (const [path, stats] of wanted) {
      if (this.watched.has(path) || this.closed) continue;
      const w = await this.watchDirectory(path, identity(stats));
      if (this.closed) {
        await w.watcher.close();
        return false;
      }
      this.watched.set(path, w);
      fresh.add(path);
      changed = true;
    }
    if (this.closed) return false;
    for (const [dir, now] of standIns) {
      const before = this.lastSeenAs.get(dir);
      this.lastSeenAs.set(dir, now);
      if (before === undefined) continue; // first look: its files were read by whoever added them
      if (changed) this.later(`\0transition:${dir}`, TRANSITION_RECHECK_MS, () => void this.recheckAfterTransition(dir));
      if (now === dir && fresh.has(dir)) {
        const what = before === dir ? 'was replaced by a new directory' : 'appeared';
        this.logger.info({ dir }, `${dir} ${what}; watching it for credential files`);
        // Files written into it before its watch began were not reported: read them now.
        for (const [key, file] of this.byPath) if (dirname(key) === dir) file.onChange();
      } else if (before === dir && now !== dir) {
        this.logger.info({ dir, watching: now }, `${dir} is gone; watching ${now} until it is back`);
      }
    }
    return changed;
  }

  /** The late look after a transition (`TRANSITION_RECHECK_MS`): watches made right, `dir`'s files read. */
  private async recheckAfterTransition(dir: string): Promise<void> {
    if (this.closed) return;
    await this.look();
    for (const [key, file] of this.byPath) if (dirname(key) === dir) file.onChange();
  }

  /** A chokidar watcher on `dir` (depth 0), ready: changes from then on are reported. */
  private async watchDirectory(dir: string, id: string): Promise<WatchedDirectory> {
    const watcher = watch(dir, {
      ignoreInitial: true,
      depth: 0,
      persistent: true,
      ignored: (path: string) => {
        const p = resolve(path);
        return !this.dirs.has(p) && !this.byPath.has(p) && !this.onTheWay(p);
      },
    });
    const fire = (path: string) => {
      const key = resolve(path);
      const file = this.byPath.get(key);
      if (!file) return;
      file.onChange();
      // chokidar reports a second change of one path within ~50 ms as nothing: two quick writes
      // (a refresh, then a login) would leave us on the first. Look again once it is quiet.
      this.later(key, TRAILING_CHECK_MS, () => this.byPath.get(key)?.onChange());
    };
    const watched: WatchedDirectory = { watcher, id, lost: false };
    // Whatever may mean a directory came or went: chokidar reports a directory deleted with
    // its files (unlinkDir) but not an empty one deleted, or one replaced at once; the raw
    // `rename` of the directory itself (named by its own name) comes in every case.
    const recheck = () => {
      if (!this.closed) void this.look();
    };
    watcher.on('add', fire);
    watcher.on('change', fire);
    watcher.on('addDir', recheck);
    watcher.on('unlinkDir', recheck);
    watcher.on('raw', (event, name, details) => {
      const watchedPath = (details as { watchedPath?: string } | undefined)?.watchedPath;
      // Only the directory's own watch (each watched file has one too), and only names that
      // matter: an ancestor watched for a missing directory may be a busy home directory.
      if (event !== 'rename' || watchedPath === undefined || resolve(watchedPath) !== dir) return;
      if (name === basename(dir)) watched.lost = true;
      const entry = name ? resolve(dir, name) : dir;
      if (name === basename(dir) || entry === dir || this.dirs.has(entry) || this.onTheWay(entry)) recheck();
    });
    watcher.on('error', (err) => {
      this.logger.warn({ err: errorText(err) }, 'file watcher error');
      recheck();
    });
    this.pending.add(watcher);
    let limit: NodeJS.Timeout | undefined;
    try {
      const ready = await Promise.race([
        new Promise<boolean>((done) => watcher.once('ready', () => done(true))),
        new Promise<boolean>((done) => {
          limit = setTimeout(() => done(false), READY_LIMIT_MS);
          limit.unref();
        }),
      ]);
      if (!ready) {
        await watcher.close();
        throw new Error(`watching ${dir} did not get ready within ${READY_LIMIT_MS / 1000} s`);
      }
    } finally {
      clearTimeout(limit);
      this.pending.delete(watcher);
    }
    return watched;
  }

  /** True for a directory on the way to a watched one (watched while the one below is missing). */
  private onTheWay(p: string): boolean {
    const prefix = p.endsWith(sep) ? p : p + sep;
    for (const d of this.dirs) if (d.startsWith(prefix)) return true;
    return false;
  }

  private later(key: string, ms: number, fn: () => void): void {
    clearTimeout(this.timers.get(key));
    const timer = setTimeout(() => {
      this.timers.delete(key);
      fn();
    }, ms);
    timer.unref();
    this.timers.set(key, timer);
  }
}
