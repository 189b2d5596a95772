/**
 * Scenario 6: permissions. The daemon runs with umask 000 (so nothing is safe by accident) and
 * every write path (device-flow login, refresh, import, adoption) must leave credential files
 * 0600 in 0700 directories; world-readable files and open directories found on disk are
 * tightened with a warning; and another user (`nobody`) can reach the directory path but not
 * the socket: the 0700 socket directory refuses it, and so does the 0600 socket itself.
 */
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { chmod, mkdir, readdir, stat, writeFile } from 'node:fs/promises';
import { createServer } from 'node:net';
import { dirname, join } from 'node:path';
import { expect } from 'vitest';
import { serializeCredentials } from '../../shared/credentials.js';
import { createFixture, credsFrom, type DaemonFixture } from '../support/daemon.js';
import { bugLines, report, until, writeAtomically, type SecretLedger } from './harness.js';

async function mode(path: string): Promise<string> {
  return ((await stat(path)).mode & 0o777).toString(8).padStart(4, '0');
}

/**
 * Every regular file in the daemon's directories that group or others may read, with its mode
 * (the directories themselves are 0700, checked separately, so what is inside a subdirectory,
 * such as proper-lockfile's empty lock directory, is out of others' reach anyway).
 */
async function looseFiles(dirs: string[]): Promise<string[]> {
  const out: string[] = [];
  for (const dir of dirs) {
    if (!existsSync(dir)) continue;
    for (const name of await readdir(dir)) {
      const st = await stat(join(dir, name));
      if (st.isFile() && (st.mode & 0o077) !== 0) out.push(`${name} ${(st.mode & 0o777).toString(8)}`);
    }
  }
  return out;
}

/** Runs `umask 000` for the spawn of the daemon, so only explicit modes protect the files. */
async function startWithOpenUmask(fx: DaemonFixture): Promise<boolean> {
  let previous: number | null = null;
  try {
    previous = process.umask(0);
  } catch {
    previous = null; // worker threads cannot change the umask: run with the inherited one
  }
  try {
    await fx.start();
  } finally {
    if (previous !== null) process.umask(previous);
  }
  return previous !== null;
}

/** Runs a tiny Node program as `nobody`; resolves with its stdout (one JSON line). */
function asNobody(script: string): Promise<{ ok: boolean; out: string; err: string }> {
  return new Promise((resolve) => {
    execFile(
      'setpriv',
      ['--reuid=nobody', '--regid=nogroup', '--clear-groups', process.execPath, '-e', script],
      { timeout: 10_000, env: { PATH: process.env.PATH ?? '/usr/bin:/bin' } },
      (err, stdout, stderr) => resolve({ ok: !err, out: String(stdout).trim(), err: String(stderr).trim() }),
    );
  });
}

const CONNECT_SCRIPT = (path: string) => `
const s = require('node:net').createConnection(${JSON.stringify(path)});
s.on('connect', () => { console.log(JSON.stringify({ connected: true })); s.destroy(); });
s.on('error', (e) => console.log(JSON.stringify({ connected: false, code: e.code })));`;
const READ_SCRIPT = (path: string) => `
try { require('node:fs').readFileSync(${JSON.stringify(path)}); console.log(JSON.stringify({ read: true })); }
catch (e) { console.log(JSON.stringify({ read: false, code: e.code })); }`;
const STAT_SCRIPT = (path: string) => `
try { require('node:fs').statSync(${JSON.stringify(path)}); console.log(JSON.stringify({ reached: true })); }
catch (e) { console.log(JSON.stringify({ reached: false, code: e.code })); }`;

export interface PermissionFigures {
  writePathsChecked: number;
  filesTightened: number;
  otherUser: string;
}

export async function permissions(ledger: SecretLedger): Promise<PermissionFigures> {
  const checked: string[] = [];
  let tightened = 0;
  let otherUser = 'skipped';

  // --- login (device flow, approved on the server), refresh, adopt: one daemon, umask 000.
  const fx = await createFixture({
    server: { deviceInterval: 0.2 },
    env: { QWEN_TOKEND_LOG_LEVEL: 'info' },
  });
  try {
    const openUmask = await startWithOpenUmask(fx);
    const client = fx.client({ minValidityMs: 0 });
    await client.login({ onCode: () => fx.server.approve() });
    expect(await mode(fx.tokenPath)).toBe('0600');
    expect(await mode(dirname(fx.tokenPath))).toBe('0700');
    checked.push('login');

    // The Qwen CLI file holds the same credentials: a refresh writes both. The Qwen CLI makes
    // its directory (0700) when it first logs in; the daemon never makes it.
    const own = await fx.readOwn();
    await mkdir(fx.qwenHome, { mode: 0o700 });
    await writeAtomically(fx.qwenCliPath, own!);
    await chmod(fx.qwenCliPath, 0o600);
    await client.refresh();
    await until(async () => (await fx.readCli())?.access_token !== own!.access_token, 3_000, 'the refresh in the Qwen CLI file');
    for (const p of [fx.tokenPath, fx.qwenCliPath]) expect(await mode(p), p).toBe('0600');
    expect(await mode(dirname(fx.tokenPath))).toBe('0700');
    expect(await mode(fx.qwenHome)).toBe('0700');
    checked.push('refresh');

    // Adopt: another process writes newer credentials to the Qwen CLI file, world-readable.
    const newer = credsFrom(fx.server, 30_000);
    await writeFile(fx.qwenCliPath + '.tmp-outside', serializeCredentials(newer), { mode: 0o644 });
    await chmod(fx.qwenCliPath + '.tmp-outside', 0o644);
    const { rename } = await import('node:fs/promises');
    await rename(fx.qwenCliPath + '.tmp-outside', fx.qwenCliPath);
    await until(async () => (await fx.readOwn())?.access_token === newer.access_token, 3_000, 'adoption');
    expect(await mode(fx.tokenPath)).toBe('0600');
    // The world-readable Qwen CLI file was tightened, with a warning.
    expect(await mode(fx.qwenCliPath)).toBe('0600');
    const tightenedWarning = (l: { level: number; msg: unknown }) => l.level === 40 && /was readable by group\/others .*changed it to 0600/.test(String(l.msg));
    // Log lines come over the daemon's stdout pipe, which may lag behind what the files show.
    await fx.waitForLog(tightenedWarning, 2_000).catch(() => undefined);
    const warned = fx.logs().filter(tightenedWarning);
    expect(warned.length).toBeGreaterThanOrEqual(1);
    tightened += warned.length;
    checked.push('adopt');

    const loose = await looseFiles([dirname(fx.tokenPath), fx.qwenHome, fx.runDir]);
    expect(loose, 'files others could read in the daemon directories').toEqual([]);
    for (const d of [dirname(fx.tokenPath), fx.qwenHome, fx.runDir]) expect(await mode(d), d).toBe('0700');
    expect(await mode(fx.socketPath)).toBe('0600');
    expect(bugLines(fx)).toEqual([]);
    if (!openUmask) checked.push('(umask could not be opened in this worker)');
  } finally {
    ledger.addFixture(fx, 'permissions');
    await fx.cleanup();
  }

  // --- import at start, and pre-existing world-readable files and an open directory.
  const fx2 = await createFixture({ env: { QWEN_TOKEND_LOG_LEVEL: 'info' } });
  try {
    const cli = credsFrom(fx2.server, 3600);
    await mkdir(fx2.qwenHome, { recursive: true, mode: 0o700 });
    await writeFile(fx2.qwenCliPath, serializeCredentials(cli), { mode: 0o644 });
    await chmod(fx2.qwenCliPath, 0o644);
    await startWithOpenUmask(fx2);
    expect(await mode(fx2.tokenPath)).toBe('0600');
    expect(await mode(dirname(fx2.tokenPath))).toBe('0700');
    expect(await mode(fx2.qwenCliPath)).toBe('0600');
    checked.push('import');
    await fx2.stop();

    // Our own file world-readable in a 0755 directory, found at start.
    await chmod(fx2.tokenPath, 0o644);
    await chmod(dirname(fx2.tokenPath), 0o755);
    const from = fx2.logs().length;
    await startWithOpenUmask(fx2);
    expect(await mode(fx2.tokenPath)).toBe('0600');
    const namesFile = (l: { level: number; msg: unknown }) => l.level === 40 && String(l.msg).includes(fx2.tokenPath) && /0600/.test(String(l.msg));
    await fx2.waitForLog(namesFile, 2_000, from).catch(() => undefined);
    const fileWarning = fx2.logs().slice(from).filter(namesFile);
    expect(fileWarning.length, 'a warning names the file it tightened').toBeGreaterThanOrEqual(1);
    tightened += fileWarning.length;
    // The directory is tightened at the next write (here: a refresh), also with a warning.
    await fx2.client({ minValidityMs: 0 }).refresh();
    expect(await mode(dirname(fx2.tokenPath))).toBe('0700');
    const dirTightened = (l: { level: number; msg: unknown }) => l.level === 40 && /changed it to 0700/.test(String(l.msg));
    await fx2.waitForLog(dirTightened, 2_000, from).catch(() => undefined);
    const dirWarning = fx2.logs().slice(from).filter(dirTightened);
    expect(dirWarning.length).toBeGreaterThanOrEqual(1);
    tightened += dirWarning.length;

    // --- another user. Only meaningful as root (CI) with setpriv available.
    if (process.getuid?.() === 0 && existsSync('/usr/bin/setpriv')) {
      // The path is traversable by others (0711), as a home directory often is.
      await chmod(fx2.root, 0o711);
      const control = join(fx2.root, 'open');
      await mkdir(control, { mode: 0o711 });
      await chmod(control, 0o711);
      const controlSock = join(control, 'c.sock');
      const server = createServer((s) => s.destroy());
      await new Promise<void>((r) => server.listen(controlSock, r));
      await chmod(controlSock, 0o666);
      try {
        // Control: nobody reaches a socket that allows it, so the setup itself does not block it.
        const ok = JSON.parse((await asNobody(CONNECT_SCRIPT(controlSock))).out) as { connected: boolean };
        expect(ok.connected, 'control: nobody can connect to an open socket beside ours').toBe(true);
        // Nobody can reach the run directory's parent but not the daemon's socket: the 0700 directory refuses.
        const reachRoot = JSON.parse((await asNobody(STAT_SCRIPT(fx2.runDir))).out) as { reached: boolean };
        expect(reachRoot.reached, 'nobody can see the socket directory itself').toBe(true);
        const viaDir = JSON.parse((await asNobody(CONNECT_SCRIPT(fx2.socketPath))).out) as { connected: boolean; code?: string };
        expect(viaDir).toEqual({ connected: false, code: 'EACCES' });
        // With the directory opened up after start, the socket's own 0600 still refuses.
        await chmod(fx2.runDir, 0o711);
        const viaSocket = JSON.parse((await asNobody(CONNECT_SCRIPT(fx2.socketPath))).out) as { connected: boolean; code?: string };
        await chmod(fx2.runDir, 0o700);
        expect(viaSocket).toEqual({ connected: false, code: 'EACCES' });
        // And the credential file is out of reach too.
        await chmod(fx2.home, 0o711);
        const read = JSON.parse((await asNobody(READ_SCRIPT(fx2.tokenPath))).out) as { read: boolean; code?: string };
        await chmod(fx2.home, 0o700);
        expect(read).toEqual({ read: false, code: 'EACCES' });
        otherUser = 'nobody: control connect ok; socket dir EACCES; socket 0600 EACCES; credential file EACCES';
      } finally {
        server.close();
        await chmod(fx2.root, 0o700);
      }
    } else {
      otherUser = 'skipped (needs root and setpriv)';
    }
    expect(bugLines(fx2)).toEqual([]);
  } finally {
    ledger.addFixture(fx2, 'permissions (import)');
    await fx2.cleanup();
  }

  const figures: PermissionFigures = { writePathsChecked: checked.length, filesTightened: tightened, otherUser };
  report('6 permissions', {
    'write paths checked (0600/0700 under umask 000)': checked.join(', '),
    'loose files/dirs tightened with a warning': tightened,
    'other user': otherUser,
  });
  return figures;
}
