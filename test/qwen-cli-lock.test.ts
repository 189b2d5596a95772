import { spawn } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { once } from 'node:events';
import {
  chmodSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  statSync,
  unlinkSync,
  utimesSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { createLogger } from '../daemon/logger.js';
import { QwenCliLock, withQwenCliLock, type QwenCliLockOptions } from '../daemon/qwen-cli-lock.js';
import { QwenOAuthError } from '../shared/errors.js';

interface LogLine {
  level: number;
  msg: string;
}

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;
const modeOf = (p: string) => statSync(p).mode & 0o777;

let dir: string;
let lockPath: string;
let lines: LogLine[];
let options: QwenCliLockOptions;

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'qwen-tokend-lock-'));
  lockPath = join(dir, 'oauth_creds.lock');
  lines = [];
  const logger = createLogger({
    level: 'debug',
    destination: { write: (s: string) => void lines.push(JSON.parse(s) as LogLine) },
  });
  options = { staleMs: 35_000, acquireTimeoutMs: 5_000, pollMs: 5, logger };
});
afterEach(() => {
  rmSync(dir, { recursive: true, force: true });
});

const warnings = () => lines.filter((l) => l.level === 40);

/** Another holder of the lock, made the way qwen-code makes it. */
function holdAsOther(mtimeMs?: number): string {
  const id = randomUUID();
  writeFileSync(lockPath, id, { flag: 'wx', mode: 0o600 });
  if (mtimeMs !== undefined) utimesSync(lockPath, mtimeMs / 1000, mtimeMs / 1000);
  return id;
}

describe('withQwenCliLock', () => {
  it('holds a plain 0600 file with a UUID while fn runs, and removes it afterwards', async () => {
    let seen: { content: string; mode: number; isFile: boolean } | undefined;
    const result = await withQwenCliLock(lockPath, options, async () => {
      seen = { content: readFileSync(lockPath, 'utf8'), mode: modeOf(lockPath), isFile: statSync(lockPath).isFile() };
      return 42;
    });
    expect(result).toBe(42);
    expect(seen?.content).toMatch(UUID);
    expect(seen?.mode).toBe(0o600);
    expect(seen?.isFile).toBe(true);
    expect(existsSync(lockPath)).toBe(false);
    expect(readdirSync(dir)).toEqual([]);
  });

  it("creates the lock's missing directory as 0700 (even with umask 0) but leaves an existing one alone", async () => {
    const previous = process.umask(0);
    try {
      const nested = join(dir, 'qwen', 'home', 'oauth_creds.lock');
      await withQwenCliLock(nested, options, async () => {
        expect(modeOf(nested)).toBe(0o600);
      });
      expect(modeOf(join(dir, 'qwen', 'home'))).toBe(0o700);
      expect(modeOf(join(dir, 'qwen'))).toBe(0o700);
    } finally {
      process.umask(previous);
    }
    const shared = join(dir, 'shared');
    mkdirSync(shared);
    chmodSync(shared, 0o755);
    await withQwenCliLock(join(shared, 'oauth_creds.lock'), options, async () => undefined);
    expect(modeOf(shared)).toBe(0o755);
  });

  it('excludes a second process speaking the same protocol (shared counter)', async () => {
    const counter = join(dir, 'counter');
    const inside = join(dir, 'inside');
    writeFileSync(counter, '0');
    const iterations = 25;
    // qwen-code's protocol, written independently of the module under test.
    const child = spawn(
      process.execPath,
      [
        '-e',
        `
        const fs = require('node:fs');
        const crypto = require('node:crypto');
        const [lockPath, counter, inside, iterations] = process.argv.slice(1);
        const sleep = (ms) => Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
        const parent = process.ppid, giveUpAt = Date.now() + 60000;
        function acquire() {
          const id = crypto.randomUUID();
          for (;;) {
            // Never outlive a dead or hung test runner.
            if (process.ppid !== parent || Date.now() > giveUpAt) process.exit(3);
            try { const fd = fs.openSync(lockPath, 'wx', 0o600); fs.writeSync(fd, id); fs.closeSync(fd); return id; }
            catch (e) { if (e.code !== 'EEXIST') throw e; }
            try {
              if (Date.now() - fs.statSync(lockPath).mtimeMs > 35000) {
                const aside = lockPath + '.stale-' + crypto.randomUUID();
                fs.renameSync(lockPath, aside); fs.unlinkSync(aside); continue;
              }
            } catch (e) { if (e.code !== 'ENOENT') throw e; continue; }
            sleep(3);
          }
        }
        function release(id) {
          try { if (fs.readFileSync(lockPath, 'utf8') === id) fs.unlinkSync(lockPath); }
          catch (e) { if (e.code !== 'ENOENT') throw e; }
        }
        let overlaps = 0;
        process.stdout.write('ready\\n');
        for (let i = 0; i < Number(iterations); i++) {
          const id = acquire();
          try { fs.writeFileSync(inside, 'child', { flag: 'wx' }); } catch (e) { if (e.code === 'EEXIST') overlaps++; else throw e; }
          const n = Number(fs.readFileSync(counter, 'utf8'));
          sleep(2);
          fs.writeFileSync(counter, String(n + 1));
          fs.rmSync(inside, { force: true });
          release(id);
          sleep(Math.floor(Math.random() * 6));
        }
        process.stdout.write(JSON.stringify({ overlaps }) + '\\n');
        `,
        lockPath,
        counter,
        inside,
        String(iterations),
      ],
      { stdio: ['ignore', 'pipe', 'inherit'] },
    );
    let out = '';
    child.stdout.setEncoding('utf8');
    const ready = new Promise<void>((resolve) => {
      child.stdout.on('data', (chunk: string) => {
        out += chunk;
        if (out.includes('ready\n')) resolve();
      });
    });
    const exited = once(child, 'exit');
    let overlaps = 0;
    try {
      await ready;
      for (let i = 0; i < iterations; i++) {
        await withQwenCliLock(lockPath, { ...options, acquireTimeoutMs: 20_000 }, async () => {
          try {
            writeFileSync(inside, 'parent', { flag: 'wx' });
          } catch {
            overlaps++;
          }
          const n = Number(readFileSync(counter, 'utf8'));
          await delay(2);
          writeFileSync(counter, String(n + 1));
          rmSync(inside, { force: true });
        });
      }
      const [code] = await exited;
      expect(code).toBe(0);
    } finally {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    }
    const childResult = JSON.parse(out.split('\n')[1] ?? '') as { overlaps: number };
    expect(childResult.overlaps).toBe(0);
    expect(overlaps).toBe(0);
    expect(readFileSync(counter, 'utf8')).toBe(String(2 * iterations));
    expect(existsSync(lockPath)).toBe(false);
  }, 60_000);

  it('excludes concurrent holders in one process, also racing to break one stale lock', async () => {
    holdAsOther(Date.now() - 120_000);
    const fast = { ...options, staleMs: 1_000 };
    let inside = 0;
    let overlaps = 0;
    let runs = 0;
    await Promise.all(
      Array.from({ length: 6 }, () =>
        withQwenCliLock(lockPath, fast, async () => {
          inside++;
          if (inside > 1) overlaps++;
          await delay(3);
          inside--;
          runs++;
        }),
      ),
    );
    expect(runs).toBe(6);
    expect(overlaps).toBe(0);
    expect(readdirSync(dir)).toEqual([]);
  });

  it('takes over a stale lock (old mtime) and leaves no renamed copy behind', async () => {
    const old = holdAsOther(Date.now() - 60_000);
    let content = '';
    await withQwenCliLock(lockPath, { ...options, staleMs: 1_000, acquireTimeoutMs: 2_000 }, async () => {
      content = readFileSync(lockPath, 'utf8');
    });
    expect(content).toMatch(UUID);
    expect(content).not.toBe(old);
    expect(readdirSync(dir)).toEqual([]);
    expect(warnings().some((l) => l.msg.includes('stale') && l.msg.includes(lockPath))).toBe(true);
  });

  it('waits while another process holds a fresh lock, then times out with a clear, retryable error', async () => {
    const other = holdAsOther();
    let ran = false;
    const error = await withQwenCliLock(lockPath, { ...options, staleMs: 60_000, acquireTimeoutMs: 200 }, async () => {
      ran = true;
    }).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(QwenOAuthError);
    expect((error as QwenOAuthError).retryable).toBe(true);
    expect((error as Error).message).toBe(`the Qwen CLI's lock ${lockPath} is held by another process`);
    expect(ran).toBe(false);
    expect(readFileSync(lockPath, 'utf8')).toBe(other);
  });

  it('gets the lock once the other holder releases it', async () => {
    holdAsOther();
    const events: string[] = [];
    setTimeout(() => {
      events.push('other released');
      unlinkSync(lockPath);
    }, 100);
    await withQwenCliLock(lockPath, options, async () => {
      events.push('fn ran');
    });
    expect(events).toEqual(['other released', 'fn ran']);
  });

  it("does not remove a lock that holds someone else's UUID on release", async () => {
    const someoneElse = randomUUID();
    await withQwenCliLock(lockPath, options, async () => {
      // Another process judged us stale and took the lock over (content rewritten in place).
      writeFileSync(lockPath, someoneElse);
    });
    expect(readFileSync(lockPath, 'utf8')).toBe(someoneElse);
    expect(warnings().some((l) => l.msg.includes(lockPath))).toBe(true);

    // Same when the file was replaced by a new one.
    rmSync(lockPath);
    const replacement = randomUUID();
    await withQwenCliLock(lockPath, options, async () => {
      unlinkSync(lockPath);
      writeFileSync(lockPath, replacement, { flag: 'wx' });
    });
    expect(readFileSync(lockPath, 'utf8')).toBe(replacement);
  });

  it('releases the lock when fn throws, and rethrows the same error', async () => {
    const boom = new Error('boom');
    const error = await withQwenCliLock(lockPath, options, async () => {
      expect(existsSync(lockPath)).toBe(true);
      throw boom;
    }).catch((e: unknown) => e);
    expect(error).toBe(boom);
    expect(existsSync(lockPath)).toBe(false);
    // And it can be taken again right away.
    await expect(withQwenCliLock(lockPath, { ...options, acquireTimeoutMs: 100 }, async () => 'again')).resolves.toBe(
      'again',
    );
  });
});

describe('QwenCliLock', () => {
  it('acquire/release pair: release reports whether it removed our lock', async () => {
    const lock = new QwenCliLock(lockPath, options);
    expect(lock.held).toBe(false);
    await lock.acquire();
    expect(lock.held).toBe(true);
    expect(readFileSync(lockPath, 'utf8')).toBe(lock.id);
    expect(await lock.release()).toBe(true);
    expect(lock.held).toBe(false);
    expect(existsSync(lockPath)).toBe(false);
    expect(await lock.release()).toBe(false);
  });

  it('release returns false and warns when the lock vanished meanwhile', async () => {
    const lock = new QwenCliLock(lockPath, options);
    await lock.acquire();
    unlinkSync(lockPath);
    expect(await lock.release()).toBe(false);
    expect(warnings().some((l) => l.msg.includes('vanished'))).toBe(true);
  });
});
