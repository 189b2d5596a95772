import { mkdir } from 'node:fs/promises';
import { dirname, resolve } from 'node:path';
import { watch, type FSWatcher } from 'chokidar';
import type { Logger } from './logger.js';

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
    const fire = (path: string) => {
      const file = byPath.get(resolve(path));
      if (file) file.onChange();
    };
    watcher.on('add', fire);
    watcher.on('change', fire);
    watcher.on('error', (err) => this.logger.warn({ err: (err as Error).message }, 'file watcher error'));
    this.watcher = watcher;
    await new Promise<void>((done) => watcher.once('ready', () => done()));
  }

  async close(): Promise<void> {
    await this.watcher?.close();
    this.watcher = null;
  }
}
