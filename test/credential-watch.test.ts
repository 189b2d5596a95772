/**
 * CredentialWatcher against a real file system: a watched directory that is deleted, moved or
 * replaced under the same name is watched again once it is back, files written into it before
 * that are read at once, and doing so again and again leaves no watch behind.
 */
import { mkdirSync, mkdtempSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { CredentialWatcher } from '../daemon/credential-watch.js';
import { createLogger } from '../daemon/logger.js';
import { until } from './support/wait.js';

interface LogLine {
  level: number;
  msg: string;
}

let root: string;
let watcher: CredentialWatcher | null;
let lines: LogLine[];

beforeEach(() => {
  root = mkdtempSync(join(tmpdir(), 'qwen-tokend-watch-'));
  watcher = null;
  lines = [];
});
afterEach(async () => {
  await watcher?.close();
  // fs watches finish closing a turn later; the next test counts them from none.
  await until(() => openWatches() === 0, 'the fs watches of this test to close');
  rmSync(root, { recursive: true, force: true });
});

/** Watches `paths`; `seen(path)` is what the file held each time a change of it was reported. */
async function watchFiles(...paths: string[]) {
  const seen = new Map<string, string[]>(paths.map((p) => [p, []]));
  const logger = createLogger({ level: 'debug', destination: { write: (s: string) => void lines.push(JSON.parse(s) as LogLine) } });
  watcher = new CredentialWatcher(
    paths.map((path) => ({
      path,
      onChange: () => {
        try {
          seen.get(path)!.push(readFileSync(path, 'utf8'));
        } catch {
          // gone again: nothing to record
        }
      },
    })),
    logger,
  );
  await watcher.start();
  return {
    watcher,
    seen: (path: string) => seen.get(path)!,
    /** Waits until a change of `path` to `text` has been reported. */
    noticed: (path: string, text: string, what = `${text} in ${path} to be noticed`) => until(() => seen.get(path)!.includes(text), what),
  };
}

/** Writes `text` to `path` as credential writers do: a temp file renamed over it. */
function replaceFile(path: string, text: string): void {
  writeFileSync(`${path}.tmp`, text);
  renameSync(`${path}.tmp`, path);
}

/** Waits until the watcher has logged `msg` `times` times in all. */
function logged(msg: string, times = 1): Promise<void> {
  return until(() => lines.filter((l) => l.msg === msg).length >= times, `the log line "${msg}"${times > 1 ? ` ${times} times` : ''}`);
}

/** fs.watch handles open in this process (each watched path holds one). */
function openWatches(): number {
  return process.getActiveResourcesInfo().filter((r) => r === 'FSEventWrap').length;
}

describe('CredentialWatcher: a watched directory that goes away and comes back', () => {
  it('is watched again when deleted with its files and made again, and a file written before that is read at once', async () => {
    const dir = join(root, '.qwen');
    const file = join(dir, 'oauth_creds.json');
    mkdirSync(dir);
    writeFileSync(file, 'v1');
    const w = await watchFiles(file);

    // All in one go: the new directory and its file exist before any watch can see them.
    rmSync(dir, { recursive: true });
    mkdirSync(dir);
    writeFileSync(file, 'v2');
    await w.noticed(file, 'v2');
    // And changes after that are reported too (without the fix, the watch stays on the old directory).
    replaceFile(file, 'v3');
    await w.noticed(file, 'v3');
    // Also once the file was deleted (the Qwen CLI does so after a failed refresh) and written again.
    // A while later (only so that this is not one instant; nothing here depends on how long).
    rmSync(file);
    await sleep(100);
    replaceFile(file, 'v4');
    await w.noticed(file, 'v4');
    expect(lines.some((l) => l.msg === `${dir} was replaced by a new directory; watching it for credential files`)).toBe(true);
    expect(w.watcher.watchedDirectories()).toEqual([dir]);
  });

  it('is watched again when deleted while empty (chokidar reports nothing for that) and made again later', async () => {
    const dir = join(root, '.qwen');
    const file = join(dir, 'oauth_creds.json');
    mkdirSync(dir);
    const w = await watchFiles(file);

    rmSync(dir, { recursive: true });
    await logged(`${dir} is gone; watching ${root} until it is back`);
    expect(w.watcher.watchedDirectories()).toEqual([root]);
    mkdirSync(dir);
    writeFileSync(file, 'v1');
    await w.noticed(file, 'v1');
    replaceFile(file, 'v2');
    await w.noticed(file, 'v2');
  });

  it('is watched again when moved away and made again; the moved one is no longer followed', async () => {
    const dir = join(root, '.qwen');
    const file = join(dir, 'oauth_creds.json');
    mkdirSync(dir);
    const w = await watchFiles(file);

    renameSync(dir, `${dir}.bak`);
    await logged(`${dir} is gone; watching ${root} until it is back`);
    writeFileSync(join(`${dir}.bak`, 'oauth_creds.json'), 'moved');
    mkdirSync(dir);
    writeFileSync(file, 'v1');
    await w.noticed(file, 'v1');
    expect(w.seen(file)).not.toContain('moved');
  });

  it("works for the daemon's own state directory and the profiles directory inside it, removed together", async () => {
    const state = join(root, 'state', 'qwen-tokend');
    const profiles = join(state, 'profiles');
    const own = join(state, 'oauth_creds.json');
    const profile = join(profiles, 'work.json');
    mkdirSync(profiles, { recursive: true });
    const w = await watchFiles(own, profile);

    rmSync(join(root, 'state'), { recursive: true });
    await logged(`${state} is gone; watching ${root} until it is back`);
    await logged(`${profiles} is gone; watching ${root} until it is back`);
    expect(w.watcher.watchedDirectories()).toEqual([root]);
    // Made again at once with `mkdir -p` and written at once, as a restore from a backup would.
    mkdirSync(profiles, { recursive: true });
    writeFileSync(own, 'own-1');
    writeFileSync(profile, 'profile-1');
    await w.noticed(own, 'own-1');
    await w.noticed(profile, 'profile-1');
    replaceFile(own, 'own-2');
    replaceFile(profile, 'profile-2');
    await w.noticed(own, 'own-2');
    await w.noticed(profile, 'profile-2');
    expect(w.watcher.watchedDirectories().sort()).toEqual([profiles, state].sort());
  });

  it('leaves no watch behind when it happens again and again, and none once closed', async () => {
    const before = openWatches();
    const dir = join(root, '.qwen');
    const file = join(dir, 'oauth_creds.json');
    mkdirSync(dir);
    writeFileSync(file, 'start');
    const w = await watchFiles(file);
    const watching = openWatches() - before; // the directory and the file in it

    for (let i = 0; i < 20; i++) {
      rmSync(dir, { recursive: true });
      // Every other time, made again only once the watch has fallen back to the parent.
      if (i % 2 === 1) await logged(`${dir} is gone; watching ${root} until it is back`, (i + 1) / 2);
      mkdirSync(dir);
      writeFileSync(file, `v${i}`);
      await w.noticed(file, `v${i}`);
    }
    await until(() => w.watcher.watchedDirectories().join() === dir, 'only the directory to be watched');
    await until(() => openWatches() - before === watching, `${watching} fs watches (there are ${openWatches() - before})`);
    await w.watcher.close();
    watcher = null;
    await until(() => openWatches() === before, `every fs watch to be closed (before ${before}, now ${openWatches()})`);
  });
});
