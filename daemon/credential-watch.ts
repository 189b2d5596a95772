import { existsSync } from 'node:fs';
import { dirname, resolve, sep } from 'node:path';
import { watch, type FSWatcher } from 'chokidar';
import type { Logger } from './logger.js';

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
  private stopTimers: () => void = () => undefined;

  constructor(
    private readonly files: WatchedFile[],
    private readonly logger: Logger,
  ) {}

  /** Starts watching; resolves once the watcher is ready (changes from then on are reported). */
  async start(): Promise<void> {
    const byPath = new Map(this.files.map((f) => [resolve(f.path), f]));
    const dirs = [...new Set([...byPath.keys()].map((p) => dirname(p)))];
    // Every directory on the way to a watched one: watched while the one below is missing.
    const onTheWay = (p: string) => dirs.some((d) => d.startsWith(p.endsWith(sep) ? p : p + sep));
    const watcher = watch(
      dirs.map((d) => nearestExisting(d)),
      {
        ignoreInitial: true,
        depth: 0,
        persistent: true,
        ignored: (path: string) => {
          const p = resolve(path);
          return !dirs.includes(p) && !byPath.has(p) && !onTheWay(p);
        },
      },
    );
    // chokidar reports a second change of one path within ~50 ms as nothing: two quick writes
    // (a refresh, then a login) would leave us on the first. Look again once it is quiet.
    const timers = new Map<string, NodeJS.Timeout>();
    const later = (key: string, ms: number, fn: () => void) => {
      clearTimeout(timers.get(key));
      const timer = setTimeout(() => {
        timers.delete(key);
        fn();
      }, ms);
      timer.unref();
      timers.set(key, timer);
    };
    const fire = (path: string) => {
      const key = resolve(path);
      const file = byPath.get(key);
      if (!file) return;
      file.onChange();
      later(key, TRAILING_CHECK_MS, () => file.onChange());
    };
    const appeared = (path: string) => {
      const p = resolve(path);
      if (dirs.includes(p)) {
        this.logger.info({ dir: p }, `${p} appeared; watching it for credential files`);
        watcher.add(p);
        // Files created with the directory came before its watch: read them now and once more.
        for (const [key, file] of byPath) {
          if (dirname(key) !== p) continue;
          file.onChange();
          later(`${key}\0late`, LATE_CHECK_MS, () => file.onChange());
        }
      } else if (onTheWay(p)) {
        watcher.add(p);
      }
    };
    this.stopTimers = () => {
      for (const timer of timers.values()) clearTimeout(timer);
      timers.clear();
    };
    watcher.on('add', fire);
    watcher.on('change', fire);
    watcher.on('addDir', appeared);
    watcher.on('error', (err) => this.logger.warn({ err: (err as Error).message }, 'file watcher error'));
    this.watcher = watcher;
    await new Promise<void>((done) => watcher.once('ready', () => done()));
  }

  async close(): Promise<void> {
    this.stopTimers();
    await this.watcher?.close();
    this.watcher = null;
  }
}
