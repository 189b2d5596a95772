import { execFileSync, spawn, spawnSync } from 'node:child_process';
import {
  chmodSync,
  closeSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  openSync,
  promises as fsPromises,
  readdirSync,
  readFileSync,
  rmSync,
  statSync,
  truncateSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { basename, join } from 'node:path';
import { once } from 'node:events';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { CredentialFile, writeDurably, type CredentialFileOptions } from '../daemon/credential-store.js';
import { createLogger } from '../daemon/logger.js';
import type { Clock } from '../shared/clock.js';
import { parseCredentialsText, serializeCredentials, type Credentials } from '../shared/credentials.js';
import { QwenCredentialsFileError } from '../shared/errors.js';
import { REPO_ROOT } from './support/daemon.js';

interface LogLine {
  level: number;
  msg: string;
  [key: string]: unknown;
}

function captureLogger() {
  const lines: LogLine[] = [];
  const logger = createLogger({
    level: 'debug',
    destination: { write: (s: string) => void lines.push(JSON.parse(s) as LogLine) },
  });
  return { logger, lines, warnings: () => lines.filter((l) => l.level === 40) };
}

function creds(n: number): Credentials {
  return {
    access_token: `at-${n}`,
    refresh_token: `rt-${n}`,
    token_type: 'Bearer',
    resource_url: 'portal.qwen.ai',
    expiry_date: 1_800_000_000_000 + n,
  };
}

const modeOf = (p: string) => statSync(p).mode & 0o777;

let dir: string;
let log: ReturnType<typeof captureLogger>;

function ownFile(path: string, extra: Partial<CredentialFileOptions> = {}) {
  return new CredentialFile(path, { logger: log.logger, moveCorruptAside: true, ownsDirectory: true, label: 'own', ...extra });
}
function cliFile(path: string, extra: Partial<CredentialFileOptions> = {}) {
  return new CredentialFile(path, {
    logger: log.logger,
    moveCorruptAside: false,
    ownsDirectory: false,
    label: 'qwen-cli',
    ...extra,
  });
}

function withUmask<T>(mask: number, fn: () => Promise<T>): Promise<T> {
  const previous = process.umask(mask);
  return fn().finally(() => process.umask(previous));
}

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'qwen-tokend-store-'));
  log = captureLogger();
});
afterEach(() => {
  rmSync(dir, { recursive: true, force: true });
});

describe('CredentialFile.write', () => {
  it('writes the Qwen CLI format as a 0600 file in a new 0700 directory', async () => {
    const path = join(dir, 'a', 'b', 'oauth_creds.json');
    const file = ownFile(path);
    await file.write(creds(1));
    const text = readFileSync(path, 'utf8');
    expect(text).toBe(serializeCredentials(creds(1)));
    expect(JSON.parse(text)).toEqual({
      access_token: 'at-1',
      refresh_token: 'rt-1',
      token_type: 'Bearer',
      resource_url: 'portal.qwen.ai',
      expiry_date: 1_800_000_000_001,
    });
    expect(modeOf(path)).toBe(0o600);
    expect(modeOf(join(dir, 'a', 'b'))).toBe(0o700);
    expect(modeOf(join(dir, 'a'))).toBe(0o700);
    expect(readdirSync(join(dir, 'a', 'b'))).toEqual(['oauth_creds.json']);
  });

  it('keeps 0600 / 0700 exactly under a permissive umask (0)', async () => {
    await withUmask(0, async () => {
      const path = join(dir, 'state', 'creds.json');
      await ownFile(path).write(creds(1));
      expect(modeOf(path)).toBe(0o600);
      expect(modeOf(join(dir, 'state'))).toBe(0o700);
      // The Qwen CLI's directory, when we have to create it, too.
      const cliPath = join(dir, 'qwen', 'oauth_creds.json');
      await cliFile(cliPath).write(creds(2));
      expect(modeOf(cliPath)).toBe(0o600);
      expect(modeOf(join(dir, 'qwen'))).toBe(0o700);
    });
  });

  it('replaces a world-readable file with a 0600 one', async () => {
    const path = join(dir, 'creds.json');
    writeFileSync(path, 'old', { mode: 0o644 });
    chmodSync(path, 0o644);
    await ownFile(path).write(creds(3));
    expect(modeOf(path)).toBe(0o600);
    expect(parseCredentialsText(readFileSync(path, 'utf8'), path).access_token).toBe('at-3');
  });

  it('tightens its own existing directory to 0700', async () => {
    const own = join(dir, 'own');
    mkdirSync(own);
    chmodSync(own, 0o755);
    await ownFile(join(own, 'creds.json')).write(creds(1));
    expect(modeOf(own)).toBe(0o700);
  });

  it("does not chmod the Qwen CLI's existing directory, only warns once", async () => {
    const qwen = join(dir, '.qwen');
    mkdirSync(qwen);
    chmodSync(qwen, 0o755);
    const file = cliFile(join(qwen, 'oauth_creds.json'));
    await file.write(creds(1));
    await file.write(creds(2));
    expect(modeOf(qwen)).toBe(0o755);
    expect(modeOf(join(qwen, 'oauth_creds.json'))).toBe(0o600);
    const warnings = log.warnings().filter((l) => l.msg.includes(qwen));
    expect(warnings).toHaveLength(1);
    expect(warnings[0]?.msg).toContain('0755');
  });

  it('does not chmod the home directory even when it holds our own file', async () => {
    const home = join(dir, 'home');
    mkdirSync(home);
    chmodSync(home, 0o755);
    const previous = process.env.HOME;
    process.env.HOME = home;
    try {
      await ownFile(join(home, 'creds.json')).write(creds(1));
    } finally {
      process.env.HOME = previous;
    }
    expect(modeOf(home)).toBe(0o755);
    expect(log.warnings().some((l) => l.msg.includes(home))).toBe(true);
  });

  it('never lets a concurrent reader see a partial or invalid file (200 writes)', async () => {
    const path = join(dir, 'oauth_creds.json');
    const stop = join(dir, 'stop');
    const file = ownFile(path);
    await file.write(creds(0));
    // A second process reads in a tight loop: real concurrency, not event-loop interleaving.
    const reader = spawn(
      process.execPath,
      [
        '-e',
        `
        const fs = require('node:fs');
        const [path, stop] = process.argv.slice(1);
        let reads = 0, bad = 0, missing = 0;
        const parent = process.ppid, giveUpAt = Date.now() + 120000;
        process.stdout.write('ready\\n');
        // Stop on the stop file; also if the test runner died or hung, so no reader outlives it.
        while (!fs.existsSync(stop) && process.ppid === parent && Date.now() < giveUpAt) {
          let text;
          try { text = fs.readFileSync(path, 'utf8'); } catch (e) { if (e.code === 'ENOENT') { missing++; continue; } throw e; }
          reads++;
          try {
            const v = JSON.parse(text);
            if (!/^at-\\d+$/.test(v.access_token) || !/^rt-\\d+$/.test(v.refresh_token) || typeof v.expiry_date !== 'number') bad++;
          } catch { bad++; }
        }
        process.stdout.write(JSON.stringify({ reads, bad, missing }) + '\\n');
        `,
        path,
        stop,
      ],
      { stdio: ['ignore', 'pipe', 'inherit'] },
    );
    let out = '';
    reader.stdout.setEncoding('utf8');
    const ready = new Promise<void>((resolve) => {
      reader.stdout.on('data', (chunk: string) => {
        out += chunk;
        if (out.includes('ready\n')) resolve();
      });
    });
    const exited = once(reader, 'exit');
    const statuses = new Map<string, number>();
    try {
      await ready;
      // An in-process reader too, through the real read() (which would move a corrupt file aside).
      const observer = ownFile(path);
      let writing = true;
      const inProcess = (async () => {
        while (writing) {
          const r = await observer.read();
          statuses.set(r.status, (statuses.get(r.status) ?? 0) + 1);
          // read() does its I/O synchronously: let the writes' own steps run in between.
          await new Promise((resolve) => setImmediate(resolve));
        }
      })();
      try {
        for (let i = 1; i <= 200; i++) await file.write(creds(i));
      } finally {
        writing = false;
        await inProcess;
        writeFileSync(stop, '');
      }
      const [code] = await exited;
      expect(code).toBe(0);
    } finally {
      if (reader.exitCode === null && reader.signalCode === null) reader.kill('SIGKILL');
    }

    const result = JSON.parse(out.split('\n')[1] ?? '') as { reads: number; bad: number; missing: number };
    expect(result.reads).toBeGreaterThan(0);
    expect(result.bad).toBe(0);
    expect(result.missing).toBe(0);
    expect([...statuses.keys()]).toEqual(['ok']);
    expect(parseCredentialsText(readFileSync(path, 'utf8'), path).access_token).toBe('at-200');
    expect(readdirSync(dir).sort()).toEqual(['oauth_creds.json', 'stop']);
  }, 60_000);

  it('serializes concurrent writes: the last one queued wins and no temp file is left', async () => {
    const path = join(dir, 'oauth_creds.json');
    const file = ownFile(path);
    // Two instances on one path share the per-path queue.
    const other = ownFile(path);
    const writes: Promise<void>[] = [];
    for (let i = 1; i <= 30; i++) writes.push((i % 2 ? file : other).write(creds(i)));
    await Promise.all(writes);
    expect(readFileSync(path, 'utf8')).toBe(serializeCredentials(creds(30)));
    expect(readdirSync(dir)).toEqual(['oauth_creds.json']);
  });

  it('remembers its last write so it can tell it from outside changes', async () => {
    const path = join(dir, 'oauth_creds.json');
    const file = ownFile(path);
    expect(file.lastWrite).toBeUndefined();
    await file.write(creds(5));
    const read = await file.read();
    if (read.status !== 'ok') throw new Error(`expected ok, got ${read.status}`);
    expect(file.lastWrite).toEqual({ text: read.text, mtimeMs: read.mtimeMs });
    expect(file.isOwnWrite(read.text)).toBe(true);
    writeFileSync(path, serializeCredentials(creds(6)));
    const changed = await file.read();
    if (changed.status !== 'ok') throw new Error(`expected ok, got ${changed.status}`);
    expect(file.isOwnWrite(changed.text)).toBe(false);
  });

  it('fails with a clear error naming the path and leaves no temp file', async () => {
    const path = join(dir, 'oauth_creds.json');
    // A non-empty directory where the file should be: the final rename fails.
    mkdirSync(path);
    writeFileSync(join(path, 'x'), '');
    const error = await ownFile(path)
      .write(creds(1))
      .catch((e: unknown) => e);
    expect(error).toBeInstanceOf(QwenCredentialsFileError);
    expect((error as Error).message).toContain(path);
    expect((error as Error).message).not.toContain('at-1');
    expect((error as Error).message).not.toContain('rt-1');
    expect(readdirSync(dir)).toEqual(['oauth_creds.json']);
  });

  it('fails with a clear error when the directory cannot be created', async () => {
    writeFileSync(join(dir, 'blocker'), '');
    const path = join(dir, 'blocker', 'oauth_creds.json');
    const error = await ownFile(path)
      .write(creds(1))
      .catch((e: unknown) => e);
    expect(error).toBeInstanceOf(QwenCredentialsFileError);
    expect((error as Error).message).toContain(path);
  });

  it('writeDurably writes any text with the requested mode', async () => {
    await withUmask(0, async () => {
      const path = join(dir, 'plain.txt');
      const result = await writeDurably(path, 'hello\n', 0o640);
      expect(readFileSync(path, 'utf8')).toBe('hello\n');
      expect(modeOf(path)).toBe(0o640);
      expect(result.mtimeMs).toBe(statSync(path).mtimeMs);
    });
  });
});

describe('CredentialFile.read', () => {
  it('reports a missing file', async () => {
    expect(await ownFile(join(dir, 'nope.json')).read()).toEqual({ status: 'missing' });
  });

  it('reads a valid file with its text and mtime', async () => {
    const path = join(dir, 'oauth_creds.json');
    const text = serializeCredentials(creds(7));
    writeFileSync(path, text, { mode: 0o600 });
    const read = await ownFile(path).read();
    expect(read).toEqual({ status: 'ok', credentials: creds(7), text, mtimeMs: statSync(path).mtimeMs });
  });

  it('reads the legacy expires_at (epoch seconds or ISO date)', async () => {
    const path = join(dir, 'legacy.json');
    writeFileSync(path, JSON.stringify({ access_token: 'a', refresh_token: 'r', expires_at: 1_800_000_000 }), {
      mode: 0o600,
    });
    const read = await ownFile(path).read();
    if (read.status !== 'ok') throw new Error(`expected ok, got ${read.status}`);
    expect(read.credentials.expiry_date).toBe(1_800_000_000_000);
    expect(read.credentials.token_type).toBe('Bearer');

    writeFileSync(path, JSON.stringify({ access_token: 'a', refresh_token: 'r', expires_at: '2027-01-15T08:00:00Z' }));
    const iso = await ownFile(path).read();
    if (iso.status !== 'ok') throw new Error(`expected ok, got ${iso.status}`);
    expect(iso.credentials.expiry_date).toBe(Date.parse('2027-01-15T08:00:00Z'));
  });

  it.each([
    ['own', true],
    ['qwen-cli', false],
  ])('fixes a world-readable %s file to 0600 and warns', async (label, own) => {
    const path = join(dir, 'oauth_creds.json');
    writeFileSync(path, serializeCredentials(creds(1)));
    chmodSync(path, 0o644);
    const file = own ? ownFile(path) : cliFile(path);
    const read = await file.read();
    expect(read.status).toBe('ok');
    expect(modeOf(path)).toBe(0o600);
    const warnings = log.warnings();
    expect(warnings).toHaveLength(1);
    expect(warnings[0]?.msg).toContain(path);
    expect(warnings[0]?.msg).toContain('0644');
    expect(warnings[0]?.file).toBe(label);
  });

  it('moves a corrupt own file aside with its bytes intact and logs one warning', async () => {
    const path = join(dir, 'oauth_creds.json');
    const garbage = Buffer.from([0x7b, 0x22, 0x61, 0xff, 0x00, 0x0a, 0x74, 0x72, 0x75, 0x6e]);
    writeFileSync(path, garbage, { mode: 0o600 });
    const clock: Clock = { now: () => Date.UTC(2026, 3, 15, 10, 20, 30, 123), setTimeout, clearTimeout } as Clock;
    const read = await ownFile(path, { clock }).read();
    if (read.status !== 'corrupt') throw new Error(`expected corrupt, got ${read.status}`);
    expect(read.error).toBeInstanceOf(QwenCredentialsFileError);
    expect(read.error.message).toContain('not valid JSON');
    expect(read.movedTo).toBe(`${path}.corrupt-2026-04-15T10-20-30.123Z`);
    expect(existsSync(path)).toBe(false);
    expect(readFileSync(read.movedTo!)).toEqual(garbage);
    expect(basename(read.movedTo!)).not.toMatch(/[:\s/\\]/);
    const warnings = log.warnings();
    expect(warnings).toHaveLength(1);
    expect(warnings[0]?.msg).toContain(path);
    expect(warnings[0]?.msg).toContain(read.movedTo);
    expect(warnings[0]?.msg).toContain('not valid JSON');
  });

  it('treats an empty file and a wrong shape as corrupt', async () => {
    const empty = join(dir, 'empty.json');
    writeFileSync(empty, '');
    const r1 = await ownFile(empty).read();
    expect(r1.status).toBe('corrupt');
    if (r1.status === 'corrupt') expect(r1.error.message).toContain('empty');

    const shape = join(dir, 'shape.json');
    const text = JSON.stringify({ access_token: 'secret-access', expiry_date: 1 });
    writeFileSync(shape, text);
    const r2 = await ownFile(shape).read();
    if (r2.status !== 'corrupt') throw new Error(`expected corrupt, got ${r2.status}`);
    expect(r2.error.message).toContain('refresh_token');
    expect(readFileSync(r2.movedTo!, 'utf8')).toBe(text);
    expect(existsSync(shape)).toBe(false);
    // The reason must never carry a token value.
    expect(JSON.stringify(log.lines)).not.toContain('secret-access');
  });

  it('gives two corrupt files moved in the same millisecond distinct names', async () => {
    const path = join(dir, 'oauth_creds.json');
    const clock = { now: () => 1_776_000_000_000, setTimeout, clearTimeout } as unknown as Clock;
    const file = ownFile(path, { clock });
    writeFileSync(path, 'first');
    const a = await file.read();
    writeFileSync(path, 'second');
    const b = await file.read();
    if (a.status !== 'corrupt' || b.status !== 'corrupt') throw new Error('expected corrupt');
    expect(a.movedTo).toBeDefined();
    expect(b.movedTo).toBeDefined();
    expect(a.movedTo).not.toBe(b.movedTo);
    expect(readFileSync(a.movedTo!, 'utf8')).toBe('first');
    expect(readFileSync(b.movedTo!, 'utf8')).toBe('second');
  });

  it("leaves a corrupt Qwen CLI file in place and only warns", async () => {
    const path = join(dir, 'oauth_creds.json');
    writeFileSync(path, '{"access_token": ', { mode: 0o600 });
    const read = await cliFile(path).read();
    expect(read).toMatchObject({ status: 'corrupt', movedTo: undefined });
    expect(readFileSync(path, 'utf8')).toBe('{"access_token": ');
    expect(readdirSync(dir)).toEqual(['oauth_creds.json']);
    const warnings = log.warnings();
    expect(warnings).toHaveLength(1);
    expect(warnings[0]?.msg).toContain(path);
  });

  it('refuses a credential file over 64 KiB without reading it: own file moved aside, Qwen CLI file left', async () => {
    // Valid credentials padded with whitespace: only the size can make them unusable.
    const padded = serializeCredentials({ ...creds(1), access_token: 'padded-access-secret', refresh_token: 'padded-refresh-secret' }) + ' '.repeat(70_000);
    const size = Buffer.byteLength(padded);
    const own = join(dir, 'own.json');
    writeFileSync(own, padded, { mode: 0o600 });
    const r1 = await ownFile(own).read();
    if (r1.status !== 'corrupt') throw new Error(`expected corrupt, got ${r1.status}`);
    expect(r1.error.message).toContain(`${size} bytes`);
    expect(existsSync(own)).toBe(false);
    expect(readFileSync(r1.movedTo!, 'utf8')).toBe(padded);

    const cli = join(dir, 'oauth_creds.json');
    writeFileSync(cli, padded, { mode: 0o600 });
    const r2 = await cliFile(cli).read();
    expect(r2).toMatchObject({ status: 'corrupt', movedTo: undefined });
    expect(readFileSync(cli, 'utf8')).toBe(padded);

    const warnings = log.warnings();
    expect(warnings).toHaveLength(2);
    expect(warnings[0]?.msg).toContain(own);
    expect(warnings[1]?.msg).toContain(cli);
    for (const w of warnings) expect(w.msg).toContain(`is ${size} bytes, more than a credential file can be`);
    expect(JSON.stringify(log.lines)).not.toMatch(/padded-(access|refresh)-secret/);
  });

  it('judges a huge (sparse) file from its size alone, so reading it costs nothing', async () => {
    // 1.5 GB that takes no disk: read whole, it would not even fit in a JavaScript string.
    const path = join(dir, 'oauth_creds.json');
    writeFileSync(path, serializeCredentials(creds(1)), { mode: 0o600 });
    truncateSync(path, 1.5 * 1024 ** 3);
    const read = await cliFile(path).read();
    expect(read).toMatchObject({ status: 'corrupt', movedTo: undefined });
    expect(statSync(path).size).toBe(1.5 * 1024 ** 3);
    const warnings = log.warnings();
    expect(warnings).toHaveLength(1);
    expect(warnings[0]?.msg).toContain(`${path} is ${1.5 * 1024 ** 3} bytes`);
  });

  it('throws a clear error when the path is a directory', async () => {
    const path = join(dir, 'oauth_creds.json');
    mkdirSync(path);
    const error = await ownFile(path)
      .read()
      .catch((e: unknown) => e);
    expect(error).toBeInstanceOf(QwenCredentialsFileError);
    expect((error as Error).message).toContain(path);
    expect((error as Error).message).toContain('directory');
    expect(existsSync(path)).toBe(true);
  });

  it('throws a clear error when the path cannot be read as a file, and leaves it alone', async () => {
    // A directory where the file should be: EISDIR works the same for root (CI) and users,
    // where a chmod 000 file would still be readable by root.
    const path = join(dir, 'oauth_creds.json');
    mkdirSync(path);
    const error = await ownFile(path)
      .read()
      .catch((e: unknown) => e);
    expect(error).toBeInstanceOf(QwenCredentialsFileError);
    expect((error as Error).message).toContain(path);
    expect((error as Error).message).toMatch(/EISDIR|directory/);
    expect(statSync(path).isDirectory()).toBe(true);
  });
});

describe('CredentialFile.read without the thread pool', () => {
  // The read sits between a refresh and everyone waiting for it (the pre-refresh look at the
  // Qwen CLI's file), so it must not queue behind the thread pool: a daemon's pool can be busy
  // with fsyncs and DNS, and each queued step waits for a turn of the event loop as well.
  it.skipIf(process.platform === 'win32')('completes while every thread of the pool is blocked', async () => {
    const path = join(dir, 'oauth_creds.json');
    writeFileSync(path, serializeCredentials(creds(3)), { mode: 0o600 });
    // Opening a FIFO for reading blocks its pool thread until a writer comes.
    const threads = Number(process.env.UV_THREADPOOL_SIZE ?? 4);
    const fifos = Array.from({ length: threads }, (_, i) => join(dir, `block-${i}`));
    for (const fifo of fifos) execFileSync('mkfifo', [fifo]);
    const blocked = fifos.map((fifo) => fsPromises.open(fifo, 'r'));
    try {
      const outcome = await Promise.race([ownFile(path).read(), sleep(5_000).then(() => 'stuck behind the pool' as const)]);
      expect(outcome).toEqual({ status: 'ok', credentials: creds(3), text: readFileSync(path, 'utf8'), mtimeMs: statSync(path).mtimeMs });
    } finally {
      // A read-write open of a FIFO does not block, and lets its readers' opens through; it
      // stays open until every one of them got through, also those still queued for a thread.
      const writers = fifos.map((fifo) => openSync(fifo, 'r+'));
      for (const fh of await Promise.all(blocked)) await fh.close();
      for (const fd of writers) closeSync(fd);
    }
  });

  it.skipIf(process.platform === 'win32')('refuses a FIFO where the file should be, without waiting for a writer', () => {
    const path = join(dir, 'oauth_creds.json');
    execFileSync('mkfifo', [path]);
    // In a child process (the built module): a read that waited for a writer would block its
    // thread for good, and this test would hang instead of failing.
    const module = JSON.stringify(join(REPO_ROOT, 'dist', 'daemon', 'credential-store.js'));
    const script = `
      const { CredentialFile } = await import(${module});
      const logger = { debug() {}, info() {}, warn() {}, error() {} };
      const file = new CredentialFile(process.argv[1], { logger, moveCorruptAside: true, ownsDirectory: true, label: 'own' });
      const outcome = await file.read().then(() => 'read', (e) => e.constructor.name + ': ' + e.message);
      process.stdout.write(outcome);`;
    const child = spawnSync(process.execPath, ['--input-type=module', '-e', script, path], { encoding: 'utf8', timeout: 10_000 });
    expect(child.signal).toBeNull();
    expect(child.stdout).toMatch(/^QwenCredentialsFileError: .*not a regular file/);
  });
});

describe('CredentialFile.remove', () => {
  it('removes the file and reports whether it was there', async () => {
    const path = join(dir, 'oauth_creds.json');
    const file = ownFile(path);
    await file.write(creds(1));
    expect(await file.remove()).toBe(true);
    expect(existsSync(path)).toBe(false);
    expect(file.lastWrite).toBeUndefined();
    expect(await file.remove()).toBe(false);
  });
});

describe('CredentialFile.cleanupTempFiles', () => {
  it('removes only our own stray temp files', async () => {
    const path = join(dir, 'oauth_creds.json');
    writeFileSync(path, serializeCredentials(creds(1)), { mode: 0o600 });
    const deadPid = join(dir, '.oauth_creds.json.qwen-tokend-99999999-a1b2c3d4e5f6.tmp');
    const ourPid = join(dir, `.oauth_creds.json.qwen-tokend-${process.pid}-0123456789ab.tmp`);
    const survivors = [
      '.oauth_creds.json.other.tmp', // someone else's temp file
      '.oauth_creds.json.tmp',
      '.other.json.qwen-tokend-99999999-abcdef.tmp', // ours, but for another file
      '.oauth_creds.json.qwen-tokend-99999999-abcdef.tmp.bak',
      'oauth_creds.json.qwen-tokend-99999999-abcdef.tmp', // not hidden: not our name
      '.oauth_creds.json.qwen-tokend-1-abcdef.tmp', // pid 1 is alive: may be a write in flight
    ];
    for (const name of [deadPid, ourPid, ...survivors.map((n) => join(dir, n))]) writeFileSync(name, 'x');

    const removed = await ownFile(path).cleanupTempFiles();
    expect(removed.sort()).toEqual([deadPid, ourPid].sort());
    expect(readdirSync(dir).sort()).toEqual(['oauth_creds.json', ...survivors].sort());
  });

  it('returns nothing when the directory does not exist', async () => {
    expect(await ownFile(join(dir, 'missing', 'oauth_creds.json')).cleanupTempFiles()).toEqual([]);
  });
});
