/**
 * What a new user meets first: messages that name a command that works where they are, a
 * doctor that says "not logged in yet" once and passes, a status that starts nothing, a failed
 * login that is recorded, no `~/.qwen` made for a Qwen CLI that was never installed, and an
 * `npm start` that a signal stops.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { chmod, mkdir, mkdtemp, readFile, rm, utimes, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { DAEMON_GLIBC_TUNABLES, DAEMON_NODE_FLAGS } from '../client/autostart.js';
import { resolveCommand } from '../shared/cli-command.js';
import { processAlive } from '../shared/diagnostics.js';
import { serializeCredentials } from '../shared/credentials.js';
import { fingerprint } from '../shared/fingerprint.js';
import { ExitCodes } from '../client/cli/exit-codes.js';
import { report } from './chaos/harness.js';
import { CLI_BIN, DAEMON_BIN, REPO_ROOT, createFixture, credsFrom, type DaemonFixture } from './support/daemon.js';
import { distUpToDate } from './support/global-setup.js';
import { until } from './support/wait.js';

interface CliResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Runs the compiled CLI from `cwd` (default: this checkout, as `npm run cli` does). */
function runCli(args: string[], env: NodeJS.ProcessEnv, cwd = REPO_ROOT): Promise<CliResult> {
  const child = spawn(process.execPath, [CLI_BIN, ...args], { env, cwd, stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (c: Buffer) => (stdout += c.toString('utf8')));
  child.stderr.on('data', (c: Buffer) => (stderr += c.toString('utf8')));
  return new Promise((resolve) => child.once('close', (code) => resolve({ code, stdout, stderr })));
}

const fixtures: DaemonFixture[] = [];
const temps: string[] = [];
const strays: number[] = [];

async function fixture(...args: Parameters<typeof createFixture>): Promise<DaemonFixture> {
  const fx = await createFixture(...args);
  fixtures.push(fx);
  return fx;
}

async function tempDir(): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'qtd-first-'));
  temps.push(dir);
  return dir;
}

let shared: DaemonFixture | null = null;

/**
 * One daemon without credentials, shared (daemon starts dominate the run time on two cores) by
 * the tests that only look at it, in file order; the last of them logs in.
 */
async function daemonWithoutCredentials(): Promise<DaemonFixture> {
  if (!shared) {
    shared = await createFixture({ server: { deviceInterval: 0.05, slowDown: false } });
    await shared.start();
  }
  return shared;
}

afterAll(async () => {
  await shared?.cleanup();
});

afterEach(async () => {
  for (const pid of strays.splice(0)) if (processAlive(pid)) process.kill(pid, 'SIGKILL');
  for (const fx of fixtures.splice(0)) await fx.cleanup();
  for (const dir of temps.splice(0)) await rm(dir, { recursive: true, force: true });
});

/** A directory on PATH that holds an executable `qwen-token`, as `npm link` or a global install makes. */
async function binDirWithCli(): Promise<string> {
  const dir = await tempDir();
  await writeFile(join(dir, 'qwen-token'), '#!/bin/sh\nexit 0\n', { mode: 0o755 });
  return dir;
}

const occurrences = (text: string, needle: string) => text.split(needle).length - 1;

/**
 * How the CLI and the daemon, run from this checkout with the test's PATH, name the two programs:
 * `npm run cli --` and `npm start` unless a `qwen-token` is on PATH (`npm link`).
 */
const CLI = resolveCommand('qwen-token', { cwd: REPO_ROOT });
const DAEMON = resolveCommand('qwen-tokend', { cwd: REPO_ROOT });

describe('advice names a command that works here (item 2)', () => {
  it('resolves qwen-token on PATH, the npm script in the checkout, npx in a project, else node and the bundle', async () => {
    const bin = await binDirWithCli();
    const project = await tempDir();
    await mkdir(join(project, 'node_modules', '.bin'), { recursive: true });
    await writeFile(join(project, 'node_modules', '.bin', 'qwen-token'), '#!/bin/sh\n', { mode: 0o755 });
    const elsewhere = await tempDir();
    const noCli = { PATH: '/nonexistent' };
    expect(resolveCommand('qwen-token', { env: { PATH: `/nonexistent:${bin}` }, cwd: REPO_ROOT })).toBe('qwen-token');
    expect(resolveCommand('qwen-token', { env: noCli, cwd: REPO_ROOT })).toBe('npm run cli --');
    expect(resolveCommand('qwen-token', { env: noCli, cwd: join(REPO_ROOT, 'client') })).toBe('npm run cli --');
    expect(resolveCommand('qwen-tokend', { env: noCli, cwd: REPO_ROOT })).toBe('npm start');
    expect(resolveCommand('qwen-token', { env: noCli, cwd: project })).toBe('npx qwen-token');
    expect(resolveCommand('qwen-token', { env: noCli, cwd: elsewhere })).toBe(`node ${CLI_BIN}`);
    expect(resolveCommand('qwen-tokend', { env: noCli, cwd: elsewhere })).toBe(`node ${DAEMON_BIN}`);
    // A `qwen-token` that is not executable is not a command.
    await chmod(join(bin, 'qwen-token'), 0o644);
    expect(resolveCommand('qwen-token', { env: { PATH: bin }, cwd: elsewhere })).toBe(`node ${CLI_BIN}`);
  });

  it('token without credentials gives the advice once, in the form for where it runs', async () => {
    const fx = await daemonWithoutCredentials();
    const fromCheckout = await runCli(['token'], fx.env);
    expect(fromCheckout.code).toBe(ExitCodes.needsLogin);
    expect(fromCheckout.stdout).toBe('');
    expect(occurrences(fromCheckout.stderr, 'login`')).toBe(1);
    expect(fromCheckout.stderr).toContain(`\`${CLI} login\``);

    const installed = await runCli(['token'], { ...fx.env, PATH: `${await binDirWithCli()}:${fx.env.PATH ?? ''}` });
    expect(installed.code).toBe(ExitCodes.needsLogin);
    expect(occurrences(installed.stderr, 'login`')).toBe(1);
    // The daemon (started in the checkout) says its own form; the CLI adds no second hint.
    expect(installed.stderr.split('\n').filter((l) => l.startsWith('hint:'))).toEqual([]);

    // The daemon's log line says it in the form that works where the daemon was started.
    const line = await fx.waitForLog((l) => /no credentials yet/.test(l.msg));
    expect(line.msg).toContain(`\`${CLI} login\``);
  });

  it('status, with no credentials, names the working login command', async () => {
    const fx = await daemonWithoutCredentials();
    const r = await runCli(['status'], fx.env);
    expect(r.code).toBe(0);
    expect(r.stdout.split('\n')[0]).toMatch(/^state +not logged in yet \(run `(.+)`\)$/);
    expect(r.stdout.split('\n')[0]!.endsWith(`(run \`${CLI} login\`)`)).toBe(true);
  });
});

describe('doctor on a fresh install (item 3)', () => {
  it('with no daemon and no credentials: one finding, the one command, exit 0', async () => {
    const fx = await fixture({ env: { QWEN_TOKEND_AUTOSTART: '1' } });
    const r = await runCli(['doctor', '--json'], fx.env);
    const report = JSON.parse(r.stdout) as { ok: boolean; checks: Array<{ id: string; status: string; hint?: string }> };
    expect(report.checks.filter((c) => c.status === 'fail')).toEqual([]);
    const findings = report.checks.filter((c) => c.status === 'warn');
    expect(findings).toEqual([expect.objectContaining({ id: 'own-file', hint: `run \`${CLI} login\`` })]);
    expect(report.ok).toBe(true);
    expect(r.code).toBe(0);
    // Doctor only looks: no daemon was started.
    expect(existsSync(fx.socketPath)).toBe(false);

    const human = await runCli(['doctor'], fx.env);
    expect(human.code).toBe(0);
    expect(human.stdout).toMatch(/^warn\s+credential file\s+.* does not exist: not logged in yet$/m);
    expect(human.stdout).toMatch(/^ok\s+daemon\s+not running; it starts on the first token request/m);
    expect(occurrences(human.stdout, 'fix:')).toBe(1);
  });

  it('with a daemon that has no credentials: still one finding, exit 0', async () => {
    const fx = await daemonWithoutCredentials();
    const r = await runCli(['doctor', '--json'], fx.env);
    const report = JSON.parse(r.stdout) as { checks: Array<{ id: string; status: string }> };
    expect(report.checks.filter((c) => c.status === 'warn' || c.status === 'fail').map((c) => c.id)).toEqual(['own-file']);
    expect(report.checks.find((c) => c.id === 'state')?.status).toBe('skip');
    expect(r.code).toBe(0);
  });

  it('with autostart off and no daemon: a warning, not a failure', async () => {
    const fx = await fixture();
    await fx.writeOwn(credsFrom(fx.server));
    const r = await runCli(['doctor', '--json'], fx.env);
    const report = JSON.parse(r.stdout) as { checks: Array<{ id: string; status: string; hint?: string }> };
    expect(report.checks.find((c) => c.id === 'daemon')).toMatchObject({ status: 'warn', hint: expect.stringContaining(`\`${DAEMON}\``) });
    expect(r.code).toBe(0);
  });
});

describe('status starts nothing (item 4)', () => {
  it('with autostart on and no daemon, status says "not running" and how to start one, exit 4', async () => {
    const fx = await fixture({ env: { QWEN_TOKEND_AUTOSTART: '1' } });
    await fx.writeOwn(credsFrom(fx.server));
    const r = await runCli(['status'], fx.env);
    // The bug this catches: a daemon started as a side effect. Stop it before failing.
    const started = await fx.client({ autostart: false }).status().catch(() => null);
    if (started) strays.push(started.pid);
    expect(started).toBeNull();
    expect(existsSync(fx.socketPath)).toBe(false);
    expect(r.code).toBe(ExitCodes.daemonUnavailable);
    expect(r.stdout).toMatch(/^daemon\s+not running \(nothing listens on .*d\.sock\)$/m);
    expect(r.stdout.split('\n')[1]).toBe(
      `start   it starts on the first token request (\`${CLI} token\`, \`${CLI} login\`, a library call); or run \`${DAEMON}\` in the foreground`,
    );

    const json = await runCli(['status', '--json'], fx.env);
    expect(json.code).toBe(ExitCodes.daemonUnavailable);
    expect(JSON.parse(json.stdout)).toMatchObject({ running: false, socket_path: fx.socketPath });

    const watch = await runCli(['watch'], fx.env);
    expect(watch.code).toBe(ExitCodes.daemonUnavailable);
    expect(watch.stderr).toMatch(/not running/);
    expect(existsSync(fx.socketPath)).toBe(false);

    // `token` needs a token: it still starts one.
    const token = await runCli(['token'], fx.env);
    const daemon = await fx.client({ autostart: false }).status().catch(() => null);
    if (daemon) strays.push(daemon.pid);
    expect(token.code).toBe(0);
    expect(daemon?.state).toBe('valid');
  });
});

describe('a failed login is recorded (item 1)', () => {
  it('names the server and what to check, shows in status as the last error, logs one line', async () => {
    const fx = await daemonWithoutCredentials();
    await fx.server.refuseConnections();
    const r = await runCli(['login', '--no-browser'], fx.env).finally(() => fx.server.acceptConnections());
    expect(r.code).toBe(ExitCodes.error);
    const message = r.stderr.split('\n')[0]!;
    expect(message).toContain(`login failed: could not start the device flow at ${fx.server.baseUrl}`);
    expect(message).toContain('connection refused (ECONNREFUSED)');
    expect(message).toMatch(/check the network connection, QWEN_OAUTH_BASE_URL, and behind a proxy HTTPS_PROXY/);

    const status = await fx.client().status();
    expect(status.last_error).toMatchObject({ code: 'QWEN_OAUTH_ERROR', message: expect.stringContaining('login failed') });
    expect(status.last_error!.message).toContain(fx.server.baseUrl);
    const human = await runCli(['status'], fx.env);
    expect(human.stdout).toMatch(/^last error\s+login failed: could not start the device flow at /m);

    await fx.waitForLog((l) => /login failed/.test(l.msg));
    const lines = fx.logs().filter((l) => /login failed/.test(l.msg));
    expect(lines).toHaveLength(1);
    expect(lines[0]).toMatchObject({ level: 40, server: fx.server.baseUrl });
  });
});

describe('the Qwen CLI directory (item 5)', () => {
  it('is not created by the daemon, and a Qwen CLI login made after the daemon started is adopted', async () => {
    const fx = await fixture();
    await fx.start();
    const client = fx.client();
    expect((await client.status()).state).toBe('no_credentials');
    expect(existsSync(fx.qwenHome)).toBe(false);

    // The Qwen CLI logs in for the first time: it makes its directory and writes its file.
    const creds = credsFrom(fx.server);
    await mkdir(fx.qwenHome, { mode: 0o700 });
    await writeFile(fx.qwenCliPath, serializeCredentials(creds), { mode: 0o600 });
    await until(async () => (await client.status()).state === 'valid', 'the daemon to adopt the Qwen CLI login', 8_000);
    const status = await client.status();
    expect(status.token_fingerprint).toBe(fingerprint(creds.access_token));
    expect(status.source_file).toBe(fx.qwenCliPath);
    await until(async () => (await fx.readOwn())?.refresh_token === creds.refresh_token, 'the adopted login in the own file');
  });

  it('a directory made first and the file a moment later is adopted too', async () => {
    const fx = await fixture();
    await fx.start();
    const client = fx.client();
    await mkdir(fx.qwenHome, { mode: 0o700 });
    await new Promise((r) => setTimeout(r, 300));
    const creds = credsFrom(fx.server);
    await writeFile(fx.qwenCliPath, serializeCredentials(creds), { mode: 0o600 });
    await until(async () => (await client.status()).token_fingerprint === fingerprint(creds.access_token), 'the daemon to adopt the file', 8_000);
  });
});

describe('npm start (item 7)', () => {
  it('a SIGTERM to the npm process stops the daemon too', async () => {
    const fx = await fixture();
    const npm = process.platform === 'win32' ? 'npm.cmd' : 'npm';
    const child: ChildProcess = spawn(npm, ['start'], { cwd: REPO_ROOT, env: fx.env, stdio: ['ignore', 'pipe', 'pipe'] });
    let output = '';
    child.stdout!.on('data', (c: Buffer) => (output += c.toString('utf8')));
    child.stderr!.on('data', (c: Buffer) => (output += c.toString('utf8')));
    const exited = new Promise<void>((done) => child.once('exit', () => done()));
    try {
      await until(() => /"msg":"ready"/.test(output), 'the daemon under npm start to be ready', 15_000);
      const pid = (JSON.parse(output.split('\n').find((l) => l.includes('"msg":"ready"'))!) as { pid: number }).pid;
      strays.push(pid);
      expect(pid).not.toBe(child.pid);
      if (process.platform === 'linux') {
        // Started as autostart starts it: the same node flags and C library settings.
        const argv = (await readFile(`/proc/${pid}/cmdline`, 'utf8')).split('\0').filter((a) => a !== '');
        expect(argv.slice(1)).toEqual([...DAEMON_NODE_FLAGS, 'dist/bin/qwen-tokend.js']);
        const environ = (await readFile(`/proc/${pid}/environ`, 'utf8')).split('\0');
        expect(environ).toContain(`GLIBC_TUNABLES=${fx.env.GLIBC_TUNABLES ?? DAEMON_GLIBC_TUNABLES}`);
      }
      child.kill('SIGTERM');
      await exited;
      await until(() => !processAlive(pid), 'the daemon to stop after npm got SIGTERM', 5_000);
      expect(output).toMatch(/"reason":"SIGTERM","msg":"shutting down"/);
    } finally {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    }
  });
});

describe('test output (item 8)', () => {
  it('chaos figures are printed only when asked for', () => {
    const printed: string[] = [];
    const log = console.log;
    console.log = (...args: unknown[]) => void printed.push(args.join(' '));
    try {
      report('x', { a: 1 }, {});
      expect(printed).toEqual([]);
      report('x', { a: 1 }, { CHAOS_FIGURES: '1' });
      expect(printed).toEqual(['[chaos] x: a=1']);
    } finally {
      console.log = log;
    }
  });

  it('the build before the tests is skipped while dist/ is newer than every source', async () => {
    const root = await tempDir();
    for (const dir of ['shared', 'daemon', 'client/cli', 'dist/bin', 'scripts']) await mkdir(join(root, dir), { recursive: true });
    const sources = ['shared/a.ts', 'daemon/b.ts', 'client/cli/c.ts', 'tsconfig.json', 'package.json'];
    for (const f of sources) await writeFile(join(root, f), '');
    const old = new Date(Date.now() - 60_000);
    for (const f of sources) await utimes(join(root, f), old, old);
    expect(distUpToDate(root)).toBe(false); // no bundles yet
    await writeFile(join(root, 'dist/bin/qwen-tokend.js'), '');
    await writeFile(join(root, 'dist/bin/qwen-token.js'), '');
    expect(distUpToDate(root)).toBe(true);
    await utimes(join(root, 'client/cli/c.ts'), new Date(), new Date(Date.now() + 1_000));
    expect(distUpToDate(root)).toBe(false);
  });

  it('the CLI writes no colour codes when its output is not a terminal', async () => {
    const fx = await daemonWithoutCredentials();
    fx.server.settings.approveAfterPolls = 2;
    const results = [await runCli(['login', '--no-browser'], fx.env), await runCli(['status'], fx.env), await runCli(['doctor'], fx.env)];
    for (const r of results) expect(r.stdout + r.stderr).not.toMatch(/\x1b\[/);
    expect(results[0]!.code).toBe(0);
  });
});
