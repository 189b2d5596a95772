/**
 * Issue 18, items 3 and 4 (the log file), and issue 20, item 6 (readable foreground logs).
 * Logging never stops the daemon; the log file is opened without following a planted symlink or
 * waiting on a planted FIFO; a terminal gets readable lines, files and pipes get JSON.
 * The full-disk case runs in the chaos suite (test/chaos/full-disk.ts).
 */
import { execFileSync, spawn } from 'node:child_process';
import { chmod, chown, readFile, stat, symlink, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { createFixture, DAEMON_BIN, type DaemonFixture } from './support/daemon.js';
import { until } from './support/wait.js';

const cleanups: Array<() => Promise<void>> = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c().catch(() => undefined);
});

async function fixture(): Promise<DaemonFixture> {
  const fx = await createFixture({ env: { QWEN_TOKEND_QWEN_CLI_SYNC: '0' } });
  cleanups.push(async () => {
    // A daemon wedged on open() ignores SIGTERM: do not let it outlive the test.
    fx.proc?.kill('SIGKILL');
    await fx.cleanup();
  });
  return fx;
}

/** Starts the daemon, failing (instead of waiting forever) when it is not ready in `ms`. */
async function startWithin(fx: DaemonFixture, env: Record<string, string>, ms = 8_000): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`the daemon was not ready within ${ms} ms:\n${fx.output.join('\n')}`)), ms);
  });
  try {
    await Promise.race([fx.start(env), timeout]);
  } finally {
    clearTimeout(timer);
  }
}

describe('the log file is opened safely (item 4)', () => {
  it('does not follow a symlink planted at the log path, and logs to stderr instead', async () => {
    const fx = await fixture();
    const victim = join(fx.root, 'victim.txt');
    await writeFile(victim, 'precious\n');
    const link = join(fx.home, 'qwen-tokend.log');
    await symlink(victim, link);
    await startWithin(fx, { QWEN_TOKEND_LOG_FILE: link });
    expect(await readFile(victim, 'utf8')).toBe('precious\n');
    expect(fx.output.some((l) => l.startsWith(`qwen-tokend: cannot open the log file ${link}: it is a symbolic link`))).toBe(true);
    // Logging goes on, on stderr.
    expect(fx.logs().some((l) => l.msg === 'ready')).toBe(true);
  });

  it('does not wait on a FIFO planted at the log path', async () => {
    const fx = await fixture();
    const fifo = join(fx.home, 'qwen-tokend.log');
    execFileSync('mkfifo', [fifo]);
    await startWithin(fx, { QWEN_TOKEND_LOG_FILE: fifo });
    expect(fx.output.some((l) => l.startsWith(`qwen-tokend: cannot open the log file ${fifo}`))).toBe(true);
    expect(await fx.stop()).toBe(0);
  });

  it.skipIf(process.getuid?.() !== 0)('refuses a log file owned by another user; makes its own 0600', async () => {
    const fx = await fixture();
    const theirs = join(fx.home, 'theirs.log');
    await writeFile(theirs, '');
    await chown(theirs, 65534, 65534);
    await startWithin(fx, { QWEN_TOKEND_LOG_FILE: theirs });
    expect(await readFile(theirs, 'utf8')).toBe('');
    expect(fx.output.some((l) => l.includes('belongs to uid 65534'))).toBe(true);
    await fx.stop();

    const ours = join(fx.home, 'ours.log');
    await writeFile(ours, '');
    await chmod(ours, 0o644);
    const proc = spawn(process.execPath, [DAEMON_BIN], { env: { ...fx.env, QWEN_TOKEND_LOG_FILE: ours }, stdio: 'ignore' });
    const exited = new Promise((done) => proc.once('exit', done));
    cleanups.push(async () => void proc.kill('SIGKILL'));
    await until(async () => (await readFile(ours, 'utf8')).includes('"msg":"ready"'), 'the ready line in the log file');
    expect(((await stat(ours)).mode & 0o777).toString(8)).toBe('600');
    proc.kill('SIGTERM');
    await exited;
  });
});

/** Runs the daemon under a pseudo-terminal (util-linux `script`) until it is ready, then stops it; its output. */
async function onTerminal(fx: DaemonFixture, extraEnv: Record<string, string>): Promise<string> {
  const env = { ...fx.env, ...extraEnv };
  // `timeout` only bounds a daemon that never gets ready; it is stopped as soon as it is.
  const command = `timeout -s TERM 30 ${JSON.stringify(process.execPath)} ${JSON.stringify(DAEMON_BIN)}`;
  const child = spawn('script', ['-qec', command, '/dev/null'], { env, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  child.stdout.on('data', (c: Buffer) => (out += c.toString('utf8')));
  const exited = new Promise((done) => child.once('exit', done));
  cleanups.push(async () => void child.kill('SIGKILL'));
  await until(() => out.includes('ready'), 'the daemon ready on the terminal', 15_000);
  const pidFile = join(dirname(fx.tokenPath), 'qwen-tokend.pid');
  const { pid } = JSON.parse(await readFile(pidFile, 'utf8')) as { pid: number };
  process.kill(pid, 'SIGTERM');
  await exited;
  return out;
}

describe('readable lines on a terminal (issue 20, item 6)', () => {
  it('prints time, level, message and fields on a terminal, in color unless NO_COLOR', async () => {
    const fx = await fixture();
    const colored = await onTerminal(fx, { TERM: 'xterm' });
    const ready = colored.split(/\r?\n/).find((l) => l.includes('ready'));
    expect(ready).toBeDefined();
    expect(ready).toMatch(/^\[\d\d:\d\d:\d\d\.\d{3}\] \u001b\[32mINFO\u001b\[39m: \u001b\[36mready\u001b\[39m/);
    expect(ready).toContain(`"socket":"${fx.socketPath}"`);
    expect(colored).not.toContain('"level":30');

    const plain = await onTerminal(fx, { TERM: 'xterm', NO_COLOR: '1' });
    const line = plain.split(/\r?\n/).find((l) => l.includes('ready'));
    expect(line).toMatch(/^\[\d\d:\d\d:\d\d\.\d{3}\] INFO: ready \{"socket":/);
    expect(plain).not.toContain('\u001b[');
  });

  it('keeps JSON lines for pipes', async () => {
    const fx = await fixture();
    await fx.start();
    // The fixture reads the daemon's stdout through a pipe.
    expect(fx.output.find((l) => l.includes('"msg":"ready"'))).toMatch(/^\{"level":30,/);
  });
});
