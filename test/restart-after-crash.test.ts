/**
 * The first call after a daemon crash brings a daemon back. After `kill -9` the dead daemon may
 * stay a zombie (its parent has not reaped it; without an init process, maybe never), and its
 * pid file then named a process that kill(0) still finds: the daemon a client started gave way
 * with exit 3 ("already running"), and the client waited out its window for a daemon that never
 * came.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { readFile, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { DAEMON_NODE_FLAGS } from '../client/autostart.js';
import { TokenClient } from '../client/token-client.js';
import { processAlive, statSaysEnded } from '../shared/diagnostics.js';
import { assertNoSecrets, createFixture, credsFrom, DAEMON_BIN, type DaemonFixture } from './support/daemon.js';
import { until } from './support/wait.js';

const linux = process.platform === 'linux';
let fx: DaemonFixture | undefined;
const clients: TokenClient[] = [];
const parents: ChildProcess[] = [];
const daemons: number[] = [];

afterEach(async () => {
  for (const c of clients.splice(0)) await c.close();
  for (const pid of daemons.splice(0)) {
    if (ended(pid)) continue;
    process.kill(pid, 'SIGTERM');
    await until(() => ended(pid), `daemon ${pid} to stop`);
  }
  for (const p of parents.splice(0)) p.kill('SIGKILL');
  await fx?.cleanup();
  fx = undefined;
});

/** The state letter of `/proc/<pid>/stat` (`Z`: zombie), or null when the process is gone. */
function procState(pid: number): string | null {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'latin1');
    return stat.slice(stat.lastIndexOf(')') + 1).trim()[0] ?? null;
  } catch {
    return null;
  }
}

/**
 * Runs `argv` as the child of a `sleep` that never waits for it (sh forks it, then execs sleep),
 * so when it dies it stays a zombie until the test ends. Resolves with its pid.
 */
/** Gone, or a zombie (told apart from kill(0) alone, so cleanup does not rest on what is tested). */
const ended = (pid: number) => (linux ? [null, 'Z'].includes(procState(pid)) : !processAlive(pid));

async function underNonReapingParent(argv: string[], env: NodeJS.ProcessEnv = process.env): Promise<number> {
  const parent = spawn('sh', ['-c', '"$@" >/dev/null 2>&1 </dev/null & echo $!; exec sleep 120', 'sh', ...argv], {
    env,
    stdio: ['ignore', 'pipe', 'ignore'],
  });
  parents.push(parent);
  let out = '';
  parent.stdout!.on('data', (chunk: Buffer) => (out += chunk.toString('utf8')));
  await until(() => out.includes('\n'), 'the pid of the child');
  return Number(out.trim());
}

async function zombie(argv: string[] = ['sleep', '0'], env?: NodeJS.ProcessEnv): Promise<number> {
  const pid = await underNonReapingParent(argv, env);
  await until(() => procState(pid) === 'Z', `process ${pid} to become a zombie`);
  return pid;
}

function autostartingClient(f: DaemonFixture): TokenClient {
  const client = new TokenClient({ env: { ...f.env, QWEN_TOKEND_AUTOSTART: '1' } });
  clients.push(client);
  return client;
}

/** Where an autostarted daemon of this fixture logs (beside the credentials). */
const autostartLog = (f: DaemonFixture) => join(dirname(f.tokenPath), 'qwen-tokend.log');
const readLog = (f: DaemonFixture) => readFile(autostartLog(f), 'utf8').catch(() => '');

describe('processAlive', () => {
  it.skipIf(!linux)('counts a zombie as ended (kill(0) still finds it)', async () => {
    const pid = await zombie();
    expect(() => process.kill(pid, 0)).not.toThrow();
    expect(processAlive(pid)).toBe(false);
    // A process that runs is alive.
    expect(processAlive(process.pid)).toBe(true);
  });

  it('reads the state after the command name, which may hold spaces and parentheses', () => {
    expect(statSaysEnded('4242 (node) Z 1 4242 4242 0 -1')).toBe(true);
    expect(statSaysEnded('4242 (a) b) S 1 4242 4242 0 -1')).toBe(false);
    expect(statSaysEnded('4242 (x) Z) R 1 4242 4242 0 -1')).toBe(false);
    expect(statSaysEnded('4242 (x) Z) X 1 4242 4242 0 -1')).toBe(true);
    expect(statSaysEnded('')).toBe(false);
  });

  it('on Linux, asks /proc about a process kill(0) finds; elsewhere, or when /proc cannot say, kill(0) stands', () => {
    const zombieStat = () => `${process.pid} (qwen-tokend) Z 1 1 1 0 -1`;
    const unreadable = () => {
      throw Object.assign(new Error('no /proc'), { code: 'ENOENT' });
    };
    expect(processAlive(process.pid, zombieStat, 'linux')).toBe(false);
    expect(processAlive(process.pid, () => `${process.pid} (node) S 1 1 1`, 'linux')).toBe(true);
    expect(processAlive(process.pid, unreadable, 'linux')).toBe(true);
    expect(processAlive(process.pid, zombieStat, 'darwin')).toBe(true);
  });
});

describe('the first call after a daemon crash', () => {
  it.skipIf(!linux)('starts a daemon when the killed one is a zombie nobody reaps', async () => {
    fx = await createFixture();
    const seeded = credsFrom(fx.server);
    await fx.writeOwn(seeded);
    const crashed = await underNonReapingParent([process.execPath, ...DAEMON_NODE_FLAGS, DAEMON_BIN], fx.env);
    daemons.push(crashed);
    const probe = fx.client();
    await until(
      () => probe.status().then((s) => s.pid === crashed, () => false),
      'the first daemon to answer',
      10_000,
    );
    await probe.close();
    process.kill(crashed, 'SIGKILL');
    await until(() => procState(crashed) === 'Z', 'the killed daemon to be a zombie');

    const client = autostartingClient(fx);
    const token = await client.getAccessToken();
    expect(token === seeded.access_token).toBe(true);
    const { pid } = await client.status();
    daemons.push(pid);
    expect(pid).not.toBe(crashed);
    expect(procState(crashed)).toBe('Z');
    const log = await readLog(fx);
    expect(log).toContain('taking over the instance lock of a daemon that is no longer running');
    assertNoSecrets(log, fx.server.issuedTokens(), 'daemon log');
  });

  it('starts a daemon again when the one it started gave way to a holder that then went away', async () => {
    // A crashed daemon whose pid file names a process that still looks alive for a moment: a
    // zombie where /proc cannot tell (macOS), or one reaped a little later.
    fx = await createFixture();
    const seeded = credsFrom(fx.server);
    await fx.writeOwn(seeded);
    await fx.start();
    expect(await fx.stop('SIGKILL')).toBe(-1);
    const pidFile = join(dirname(fx.tokenPath), 'qwen-tokend.pid');
    const crashed = JSON.parse(await readFile(pidFile, 'utf8')) as { pid: number; socket: string; started: string };
    const holder = spawn(process.execPath, ['-e', 'setTimeout(() => {}, 60_000)'], { stdio: 'ignore' });
    parents.push(holder);
    const holderGone = new Promise((r) => holder.once('exit', r));
    await writeFile(pidFile, `${JSON.stringify({ ...crashed, pid: holder.pid })}\n`);

    const client = autostartingClient(fx);
    const asked = client.getAccessToken().then(
      (token) => ({ token }),
      (err: unknown) => ({ err }),
    );
    await until(async () => (await readLog(fx!)).includes('another qwen-tokend is already running'), 'the started daemon to give way', 10_000);
    holder.kill('SIGKILL');
    await holderGone;

    const answer = await asked;
    expect(answer).not.toHaveProperty('err');
    expect((answer as { token: string }).token === seeded.access_token).toBe(true);
    const { pid } = await client.status();
    daemons.push(pid);
    assertNoSecrets(await readLog(fx), fx.server.issuedTokens(), 'daemon log');
  });
});
