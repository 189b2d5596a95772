import { existsSync } from 'node:fs';
import { dirname, resolve, sep } from 'node:path';
import { watch, type FSWatcher } from 'chokidar';
import type { Logger } from './logger.js';
import { errorText } from '../shared/diagnostics.js';

/** After the last event for a file, read it once more this much later. */
const TRAILING_CHECK_MS = 150;
/**
 * After a watched directory appears, read its files at once and again this much later: the
 * writer may have put the file there before the directory's own watch was set up.
 */
const LATE_CHECK_MS = 1_000;

export interface WatchedFile {
  path: string;
  onChange: () => void;
}

/** The nearest existing directory at or above `dir`. */
function nearestExisting(dir: string): string {
  let p = dir;
  while (!existsSync(p) && dirname(p) !== p) p = dirname(p);
  return p;
}

/**
 * Watches credential files for changes made by other processes. It watches each file's
 * parent directory and filters by name, because writers replace the file by rename (the
 * watched inode goes away) and a file that does not exist yet must still be seen when created.
 *
 * A directory that does not exist is not created: it may belong to another program (`~/.qwen`
 * is the Qwen CLI's, made when someone first logs in with it). Its nearest existing ancestor
 * is watched instead, for that directory (or one on the way to it) to appear.
 */
export class CredentialWatcher {
  private watcher: FSWatcher | null = null;
  private readonly byPath = new Map<string, WatchedFile>();
  /** The directories of the watched files. */
  private readonly dirs = new Set<string>();
  private readonly timers = new Map<string, NodeJS.Timeout>();

  constructor(
    files: WatchedFile[],
    private readonly logger: Logger,
  ) {
    for (const file of files) this.remember(file);
  }

  /** Starts watching; resolves once the watcher is ready (changes from then on are reported). */
  async start(): Promise<void> {
    const watcher = watch(
      [...this.dirs].map((d) => nearestExisting(d)),
      {
        ignoreInitial: true,
        depth: 0,
        persistent: true,
        ignored: (path: string) => {
          const p = resolve(path);
          return !this.dirs.has(p) && !this.byPath.has(p) && !this.onTheWay(p);
        },
      },
    );
    const fire = (path: string) => {
      const key = resolve(path);
      const file = this.byPath.get(key);
      if (!file) return;
      file.onChange();
      // chokidar reports a second change of one path within ~50 ms as nothing: two quick writes
      // (a refresh, then a login) would leave us on the first. Look again once it is quiet.
      this.later(key, TRAILING_CHECK_MS, () => this.byPath.get(key)?.onChange());
    };
    const appeared = (path: string) => {
      const p = resolve(path);
      if (this.dirs.has(p)) {
        this.logger.info({ dir: p }, `${p} appeared; watching it for credential files`);
        watcher.add(p);
        // Files created with the directory came before its watch: read them now and once more.
        for (const [key, file] of this.byPath) {
          if (dirname(key) !== p) continue;
          file.onChange();
          this.later(`${key}\0late`, LATE_CHECK_MS, () => this.byPath.get(key)?.onChange());
        }
      } else if (this.onTheWay(p)) {
        watcher.add(p);
        // Directories made with this one (`mkdir -p`) came before its watch: look for them now.
        const prefix = p.endsWith(sep) ? p : p + sep;
        for (const dir of [...this.dirs]) {
          if (!dir.startsWith(prefix)) continue;
          const deepest = nearestExisting(dir);
          if (deepest.startsWith(prefix)) appeared(deepest);
        }
      }
    };
    watcher.on('add', fire);
    watcher.on('change', fire);
    watcher.on('addDir', appeared);
    watcher.on('error', (err) => this.logger.warn({ err: errorText(err) }, 'file watcher error'));
    this.watcher = watcher;
    await new Promise<void>((done) => watcher.once('ready', () => done()));
  }

  /** Watches one more file (its directory too, or the nearest existing one above it). */
  add(file: WatchedFile): void {
    const dir = dirname(resolve(file.path));
    const newDir = !this.dirs.has(dir);
    this.remember(file);
    if (newDir && this.watcher) this.watcher.add(nearestExisting(dir));
  }

  /** Stops reporting changes of `path` (its directory stays watched: cheap, and others may share it). */
  remove(path: string): void {
    this.byPath.delete(resolve(path));
  }

  async close(): Promise<void> {
    for (const timer of this.timers.values()) clearTimeout(timer);
    this.timers.clear();
    await this.watcher?.close();
    this.watcher = null;
  }

  private remember(file: WatchedFile): void {
    const key = resolve(file.path);
    this.byPath.set(key, file);
    this.dirs.add(dirname(key));
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
