import { mkdir } from 'node:fs/promises';
import { dirname, resolve } from 'node:path';
import { watch, type FSWatcher } from 'chokidar';
import type { Logger } from './logger.js';

/** After the last event for a file, read it once more this much later. */
const TRAILING_CHECK_MS = 150;

export interface WatchedFile {
  path: string;
  onChange: () => void;
}

/**
 * Watches credential files for changes made by other processes. It watches each file's
 * parent directory and filters by name, because writers replace the file by rename (the
 * watched inode goes away) and a file that does not exist yet must still be seen when created.
 */
export class CredentialWatcher {
  private watcher: FSWatcher | null = null;
  private stopTrailing: () => void = () => undefined;

  constructor(
    private readonly files: WatchedFile[],
    private readonly logger: Logger,
  ) {}

  /** Starts watching; resolves once the watcher is ready (changes from then on are reported). */
  async start(): Promise<void> {
    const byPath = new Map(this.files.map((f) => [resolve(f.path), f]));
    const dirs = [...new Set([...byPath.keys()].map((p) => dirname(p)))];
    // A directory that does not exist cannot be watched; create it private, as its owner would.
    await Promise.all(dirs.map((d) => mkdir(d, { recursive: true, mode: 0o700 })));
    const watcher = watch(dirs, {
      ignoreInitial: true,
      depth: 0,
      persistent: true,
      ignored: (path: string) => {
        const p = resolve(path);
        return !dirs.includes(p) && !byPath.has(p);
      },
    });
    // chokidar reports a second change of one path within ~50 ms as nothing: two quick writes
    // (a refresh, then a login) would leave us on the first. Look again once it is quiet.
    const trailing = new Map<string, NodeJS.Timeout>();
    const fire = (path: string) => {
      const key = resolve(path);
      const file = byPath.get(key);
      if (!file) return;
      file.onChange();
      clearTimeout(trailing.get(key));
      const timer = setTimeout(() => {
        trailing.delete(key);
        file.onChange();
      }, TRAILING_CHECK_MS);
      timer.unref();
      trailing.set(key, timer);
    };
    this.stopTrailing = () => {
      for (const timer of trailing.values()) clearTimeout(timer);
      trailing.clear();
    };
    watcher.on('add', fire);
    watcher.on('change', fire);
    watcher.on('error', (err) => this.logger.warn({ err: (err as Error).message }, 'file watcher error'));
    this.watcher = watcher;
    await new Promise<void>((done) => watcher.once('ready', () => done()));
  }

  async close(): Promise<void> {
    this.stopTrailing();
    await this.watcher?.close();
    this.watcher = null;
  }
}
