/**
 * `qwen-token service`: the rendered unit passes systemd-analyze, the plist parses as a property
 * list, install/uninstall write the right files and run the right service-manager commands
 * (recorded by stand-ins on PATH), and an installed service stops clients from autostarting.
 */
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { renderLaunchdPlist, renderSystemdUnit, serviceCommand, type EnvironmentEntry } from '../client/cli/service.js';
import { DAEMON_GLIBC_TUNABLES, DAEMON_NODE_FLAGS } from '../client/autostart.js';
import { TokenClient } from '../client/token-client.js';
import { QwenDaemonUnavailableError } from '../shared/errors.js';
import { createFixture, DAEMON_BIN, REPO_ROOT, type DaemonFixture } from './support/daemon.js';
import { createFakeServiceManager, type FakeServiceManager } from './support/fake-service-manager.js';

const SERVICE_CLI = join(REPO_ROOT, 'test', 'support', 'service-cli.mjs');
const UNIT = 'qwen-tokend.service';
const LABEL = 'io.github.qwen-tokend';
const uid = process.getuid?.() ?? 0;

interface Ran {
  code: number;
  stdout: string;
  stderr: string;
}

function runFile(file: string, args: string[], env: NodeJS.ProcessEnv): Promise<Ran> {
  return new Promise((done) => {
    execFile(file, args, { env, encoding: 'utf8' }, (err, stdout, stderr) => {
      const code = err ? (typeof err.code === 'number' ? err.code : -1) : 0;
      done({ code, stdout, stderr });
    });
  });
}

/** Values that need escaping in both formats; none is a secret. */
const TRICKY: EnvironmentEntry[] = [
  ['QWEN_TOKEN_PATH', '/home/alice/my tokens/c%d$x"q\\&<>\'.json'],
  ['QWEN_TOKEND_LOG_LEVEL', 'debug'],
];

// ---- systemd-analyze ------------------------------------------------------------------------

describe.skipIf(process.platform !== 'linux')('the systemd unit', () => {
  let dir: string;
  beforeAll(() => {
    if (!['/usr/bin/systemd-analyze', '/bin/systemd-analyze'].some((p) => existsSync(p))) {
      throw new Error("systemd-analyze is missing: install Debian's `systemd` package (the CI script should)");
    }
  });
  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), 'qtd-unit-'));
    await mkdir(join(dir, 'run'), { mode: 0o700 });
  });
  afterEach(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  /** `systemd-analyze verify --user`; clean = exit 0 and nothing said (it only warns about bad lines). */
  async function verify(unit: string): Promise<Ran> {
    const file = join(dir, UNIT);
    await writeFile(file, unit);
    // --user needs a runtime dir to resolve %t, and containers often have none.
    return runFile('systemd-analyze', ['verify', '--user', file], { ...process.env, XDG_RUNTIME_DIR: join(dir, 'run') });
  }

  const render = (home: string, writable: string[] = [`${home}/.one_dragon_alpha`, `${home}/.qwen`, '%t/qwen-tokend']) =>
    renderSystemdUnit({ nodePath: process.execPath, daemonPath: DAEMON_BIN, environment: TRICKY, writablePaths: writable });

  it('passes systemd-analyze verify --user, with and without PrivateTmp', async () => {
    for (const unit of [render('/home/alice'), render('/tmp/alice')]) {
      const result = await verify(unit);
      expect(result.stderr).toBe('');
      expect(result.code).toBe(0);
    }
    expect(render('/home/alice')).toMatch(/^PrivateTmp=yes$/m);
    expect(render('/tmp/alice')).not.toMatch(/^PrivateTmp=/m);
  });

  it('the check catches a broken unit: a bad value, an unknown key, a missing binary', async () => {
    const good = render('/home/alice');
    const badValue = await verify(good.replace('Restart=on-failure', 'Restart=sometimes'));
    expect(badValue.stderr).toMatch(/restart/i);
    const unknownKey = await verify(good.replace('[Service]', '[Service]\nRestartPreventExitCode=3'));
    expect(unknownKey.stderr).toMatch(/Unknown key/);
    const missing = await verify(
      renderSystemdUnit({ nodePath: join(dir, 'no-such-node'), daemonPath: DAEMON_BIN, environment: [], writablePaths: ['/home/alice'] }),
    );
    expect(missing.code).not.toBe(0);
  });

  it('has the settings the service depends on', () => {
    const unit = render('/home/alice');
    const lines = unit.split('\n').filter((l) => !l.startsWith('#'));
    for (const expected of [
      'Type=notify',
      'NotifyAccess=all',
      // Started as autostart starts it (client/autostart.ts).
      `ExecStart=${process.execPath} ${DAEMON_NODE_FLAGS.join(' ')} ${DAEMON_BIN}`,
      `Environment="GLIBC_TUNABLES=${DAEMON_GLIBC_TUNABLES}"`,
      'Restart=on-failure',
      'RestartPreventExitStatus=3 78',
      'StandardOutput=journal',
      'NoNewPrivileges=yes',
      'PrivateUsers=yes',
      'ProtectSystem=strict',
      'ReadWritePaths="-/home/alice/.one_dragon_alpha" "-/home/alice/.qwen" -%t/qwen-tokend',
      'WantedBy=default.target',
      // Quoted, with % doubled (a specifier otherwise); $ is literal in Environment=.
      'Environment="QWEN_TOKEN_PATH=/home/alice/my tokens/c%%d$x\\"q\\\\&<>\'.json"',
      'Environment="QWEN_TOKEND_LOG_LEVEL=debug"',
    ]) {
      expect(lines).toContain(expected);
    }
    expect(lines.some((l) => l.startsWith('MemoryDenyWriteExecute'))).toBe(false);
    expect(lines.some((l) => l.startsWith('TimeoutStopSec='))).toBe(true);
    expect(lines.some((l) => l.startsWith('RestartSec='))).toBe(true);
    expect(unit).not.toMatch(/@[A-Z_]+@/);
  });

  it('quotes an ExecStart path with spaces, % and $ so systemd reads it back unchanged', async () => {
    const odd = join(dir, 'node dir %h $HOME');
    await mkdir(odd);
    const node = join(odd, 'node');
    await writeFile(node, '#!/bin/sh\n', { mode: 0o755 });
    const unit = renderSystemdUnit({ nodePath: node, daemonPath: DAEMON_BIN, environment: [], writablePaths: ['/home/alice'] });
    // In the executable only % is special; in an argument $ is too.
    expect(unit).toContain(`ExecStart="${odd.replace('%h', () => '%%h')}/node" ${DAEMON_NODE_FLAGS.join(' ')} ${DAEMON_BIN}`);
    const arg = renderSystemdUnit({ nodePath: node, daemonPath: '/opt/a $b%c/main.js', environment: [], writablePaths: [] });
    expect(arg).toContain(`/node" ${DAEMON_NODE_FLAGS.join(' ')} "/opt/a $$b%%c/main.js"\n`);
    // verify resolves the binary: it finds it only if the quoting is read back as the real path.
    const result = await verify(unit);
    expect(result.stderr).toBe('');
    expect(result.code).toBe(0);
  });

  it('refuses control characters and relative paths instead of writing a broken unit', () => {
    expect(() =>
      renderSystemdUnit({ nodePath: process.execPath, daemonPath: DAEMON_BIN, environment: [['QWEN_HOME', 'a\nExecStartPre=/bin/sh']], writablePaths: [] }),
    ).toThrow(/control character/);
    expect(() => renderSystemdUnit({ nodePath: 'node', daemonPath: DAEMON_BIN, environment: [], writablePaths: [] })).toThrow(/absolute/);
  });
});

// ---- launchd plist --------------------------------------------------------------------------

const PLIST_TO_JSON = 'import plistlib,sys,json; print(json.dumps(plistlib.load(open(sys.argv[1],"rb"))))';

describe('the launchd plist', () => {
  let dir: string;
  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), 'qtd-plist-'));
  });
  afterEach(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  async function parsePlist(text: string): Promise<Ran> {
    const file = join(dir, `${LABEL}.plist`);
    await writeFile(file, text);
    return runFile('python3', ['-c', PLIST_TO_JSON, file], process.env);
  }

  it('parses as a property list with the keys launchd needs, values escaped', async () => {
    const text = renderLaunchdPlist({
      nodePath: '/opt/node & co/bin/node',
      daemonPath: DAEMON_BIN,
      environment: TRICKY,
      logDir: '/Users/alice/Library/Logs/qwen-tokend',
    });
    const parsed = await parsePlist(text);
    expect(parsed.stderr).toBe('');
    expect(parsed.code).toBe(0);
    const plist = JSON.parse(parsed.stdout) as Record<string, unknown>;
    expect(plist).toEqual({
      Label: LABEL,
      ProgramArguments: ['/opt/node & co/bin/node', ...DAEMON_NODE_FLAGS, DAEMON_BIN],
      EnvironmentVariables: Object.fromEntries(TRICKY),
      RunAtLoad: true,
      KeepAlive: { SuccessfulExit: false },
      ThrottleInterval: 10,
      ExitTimeOut: 10,
      ProcessType: 'Background',
      Umask: 0o077,
      StandardOutPath: '/Users/alice/Library/Logs/qwen-tokend/qwen-tokend.log',
      StandardErrorPath: '/Users/alice/Library/Logs/qwen-tokend/qwen-tokend.err.log',
    });
  });

  it('the check catches a broken plist (an unescaped &)', async () => {
    const text = renderLaunchdPlist({ nodePath: '/a & b/node', daemonPath: DAEMON_BIN, environment: [], logDir: '/Users/a/Library/Logs/q' });
    const broken = await parsePlist(text.replace('&amp;', '&'));
    expect(broken.code).not.toBe(0);
  });
});

// ---- install / uninstall / status ---------------------------------------------------------

describe('qwen-token service install | uninstall | status', () => {
  let root: string;
  let home: string;
  let fake: FakeServiceManager;
  let env: NodeJS.ProcessEnv;

  beforeEach(async () => {
    root = await mkdtemp(join(tmpdir(), 'qtd-svc-'));
    home = join(root, 'home');
    await mkdir(home, { mode: 0o700 });
    await mkdir(join(root, 'run'), { mode: 0o700 });
    fake = await createFakeServiceManager(root);
    env = { ...process.env };
    for (const key of Object.keys(env)) if (key.startsWith('QWEN_') || key === 'NOTIFY_SOCKET') delete env[key];
    Object.assign(env, fake.env, {
      HOME: home,
      XDG_RUNTIME_DIR: join(root, 'run'),
      QWEN_TOKEND_LOG_LEVEL: 'warn',
      // Must never reach a service file: not a daemon setting.
      QWEN_API_KEY: 'sk-not-a-daemon-setting',
    });
  });
  afterEach(async () => {
    await rm(root, { recursive: true, force: true });
  });

  const cli = (...args: string[]) => runFile(process.execPath, [SERVICE_CLI, ...args], env);
  const unitPath = () => join(home, '.config', 'systemd', 'user', UNIT);
  const plistPath = () => join(home, 'Library', 'LaunchAgents', `${LABEL}.plist`);

  it('--print prints the unit and writes and runs nothing', async () => {
    const printed = await cli('install', '--print', '--platform', 'linux');
    expect(printed.code).toBe(0);
    expect(printed.stdout).toMatch(/^\[Service\]$/m);
    expect(printed.stdout).toContain(`ExecStart=${process.execPath} ${DAEMON_NODE_FLAGS.join(' ')} ${DAEMON_BIN}`);
    expect(printed.stdout).toContain('Environment="QWEN_TOKEND_LOG_LEVEL=warn"');
    expect(printed.stdout).not.toContain('sk-not-a-daemon-setting');
    expect(await fake.calls()).toEqual([]);
    expect(existsSync(join(home, '.config'))).toBe(false);
    expect(existsSync(join(home, '.one_dragon_alpha'))).toBe(false);

    const plist = await cli('install', '--print', '--platform', 'darwin');
    expect(plist.code).toBe(0);
    expect(plist.stdout).toContain(`<string>${LABEL}</string>`);
    // launchd may not give the agent this shell's TMPDIR: the socket path is pinned.
    expect(plist.stdout).toContain(`<key>QWEN_TOKEND_SOCKET</key>\n    <string>${join(root, 'run', 'qwen-tokend', 'qwen-tokend.sock')}</string>`);
    expect(await fake.calls()).toEqual([]);
    expect(existsSync(join(home, 'Library'))).toBe(false);
  });

  it('linux: install writes the unit (0644) and runs daemon-reload, enable --now; re-install restarts; uninstall removes', async () => {
    const printed = await cli('install', '--print', '--platform', 'linux');
    const installed = await cli('install', '--platform', 'linux');
    expect(installed.stderr).toBe('');
    expect(installed.code).toBe(0);
    expect(installed.stdout).toContain(unitPath());
    expect(installed.stdout).toContain('loginctl enable-linger');
    expect(await readFile(unitPath(), 'utf8')).toBe(printed.stdout);
    expect((await stat(unitPath())).mode & 0o777).toBe(0o644);
    // ProtectSystem=strict: the daemon cannot create these itself.
    expect((await stat(join(home, '.one_dragon_alpha'))).mode & 0o777).toBe(0o700);
    expect((await stat(join(home, '.qwen'))).mode & 0o777).toBe(0o700);
    expect(await fake.calls()).toEqual([
      ['systemctl', '--user', 'daemon-reload'],
      ['systemctl', '--user', 'enable', '--now', UNIT],
    ]);

    await fake.clearCalls();
    const status = await cli('status', '--platform', 'linux');
    expect(status.code).toBe(0);
    expect(status.stdout).toContain(`${unitPath()} (installed)`);
    expect(status.stdout).toContain('Active: active (running)');
    expect(await fake.calls()).toEqual([['systemctl', '--user', 'status', UNIT]]);

    await fake.clearCalls();
    expect((await cli('install', '--platform', 'linux')).code).toBe(0);
    expect(await fake.calls()).toEqual([
      ['systemctl', '--user', 'daemon-reload'],
      ['systemctl', '--user', 'enable', UNIT],
      ['systemctl', '--user', 'restart', UNIT],
    ]);

    await fake.clearCalls();
    const removed = await cli('uninstall', '--platform', 'linux');
    expect(removed.code).toBe(0);
    expect(existsSync(unitPath())).toBe(false);
    expect(await fake.calls()).toEqual([
      ['systemctl', '--user', 'disable', '--now', UNIT],
      ['systemctl', '--user', 'daemon-reload'],
    ]);

    await fake.clearCalls();
    const after = await cli('status', '--platform', 'linux');
    expect(after.code).toBe(4);
    expect(after.stdout).toContain('(not installed)');
    expect(await fake.calls()).toEqual([]);
  });

  it('linux: a failing systemctl call is a clear error with exit 1', async () => {
    await fake.failOn('systemctl', 'enable');
    const result = await cli('install', '--platform', 'linux');
    expect(result.code).toBe(1);
    expect(result.stderr).toContain('`systemctl --user enable --now qwen-tokend.service` failed (exit 1)');
    expect(result.stderr).toContain('simulated failure of enable');
    expect(result.stderr).toContain('delete it to undo');

    await fake.clearCalls();
    await fake.failOn('systemctl', 'disable');
    const removal = await cli('uninstall', '--platform', 'linux');
    expect(removal.code).toBe(1);
    expect(removal.stderr).toContain('`systemctl --user disable --now qwen-tokend.service` failed');
    expect(existsSync(unitPath())).toBe(true);
  });

  it('no systemctl at all is a clear error with exit 1', async () => {
    env.PATH = join(root, 'empty-bin');
    const result = await cli('install', '--platform', 'linux');
    expect(result.code).toBe(1);
    expect(result.stderr).toContain('systemctl was not found on PATH');
  });

  it('macOS: install writes the plist (0644) and bootstraps it; a loaded agent is booted out first; uninstall boots out and removes', async () => {
    const printed = await cli('install', '--print', '--platform', 'darwin');
    const installed = await cli('install', '--platform', 'darwin');
    expect(installed.stderr).toBe('');
    expect(installed.code).toBe(0);
    expect(await readFile(plistPath(), 'utf8')).toBe(printed.stdout);
    expect((await stat(plistPath())).mode & 0o777).toBe(0o644);
    expect((await stat(join(home, 'Library', 'Logs', 'qwen-tokend'))).mode & 0o777).toBe(0o700);
    const service = `gui/${uid}/${LABEL}`;
    expect(await fake.calls()).toEqual([
      ['launchctl', 'print', service],
      ['launchctl', 'enable', service],
      ['launchctl', 'bootstrap', `gui/${uid}`, plistPath()],
    ]);

    await fake.clearCalls();
    const status = await cli('status', '--platform', 'darwin');
    expect(status.code).toBe(0);
    expect(status.stdout).toContain('state = running');

    await fake.clearCalls();
    expect((await cli('install', '--platform', 'darwin')).code).toBe(0);
    expect(await fake.calls()).toEqual([
      ['launchctl', 'print', service],
      ['launchctl', 'bootout', service],
      ['launchctl', 'print', service],
      ['launchctl', 'enable', service],
      ['launchctl', 'bootstrap', `gui/${uid}`, plistPath()],
    ]);

    await fake.clearCalls();
    expect((await cli('uninstall', '--platform', 'darwin')).code).toBe(0);
    expect(existsSync(plistPath())).toBe(false);
    expect(await fake.calls()).toEqual([
      ['launchctl', 'print', service],
      ['launchctl', 'bootout', service],
    ]);
  });

  it('--help works for every subcommand and does not show the test-only --platform', async () => {
    const help = await cli('install', '--help');
    expect(help.code).toBe(0);
    expect(help.stdout).toContain('Usage: service install [options]');
    expect(help.stdout).toContain('--print');
    expect(help.stdout).not.toContain('--platform');
    const subcommands = serviceCommand().commands;
    expect(subcommands.map((c) => c.name())).toEqual(['install', 'uninstall', 'status']);
    for (const sub of subcommands) {
      expect(sub.helpInformation()).toContain(`Usage: service ${sub.name()} [options]`);
      expect(sub.helpInformation()).not.toContain('--platform');
    }
  });
});

// ---- with a real daemon ---------------------------------------------------------------------

describe('service install next to a real daemon', () => {
  let fx: DaemonFixture;
  let fake: FakeServiceManager;
  afterEach(async () => {
    await fx.cleanup();
  });

  it('warns about a daemon it did not start and enables the unit without starting it', async () => {
    fx = await createFixture();
    fake = await createFakeServiceManager(fx.root);
    await fx.start();
    const pid = fx.proc!.pid!;
    const result = await new Promise<Ran>((done) =>
      execFile(process.execPath, [SERVICE_CLI, 'install', '--platform', 'linux'], { env: { ...fx.env, ...fake.env }, encoding: 'utf8' }, (err, stdout, stderr) =>
        done({ code: err ? Number(err.code) : 0, stdout, stderr }),
      ),
    );
    expect(result.code).toBe(0);
    expect(result.stderr).toContain(`pid ${pid}`);
    expect(result.stderr).toContain('systemctl --user start qwen-tokend.service');
    expect(await fake.calls()).toEqual([
      ['systemctl', '--user', 'daemon-reload'],
      ['systemctl', '--user', 'enable', UNIT],
    ]);
    // The fixture's socket is not the default one, so the unit carries it and may write there.
    const unit = await readFile(join(fx.home, '.config', 'systemd', 'user', UNIT), 'utf8');
    expect(unit).toContain(`Environment="QWEN_TOKEND_SOCKET=${fx.socketPath}"`);
    expect(unit).toContain(`"-${fx.runDir}"`);
  });

  it('once installed, a client with autostart on does not start a daemon and names the service', async () => {
    fx = await createFixture({ env: { QWEN_TOKEND_AUTOSTART: '1' } });
    fake = await createFakeServiceManager(fx.root);
    const installed = await new Promise<Ran>((done) =>
      execFile(process.execPath, [SERVICE_CLI, 'install'], { env: { ...fx.env, ...fake.env }, encoding: 'utf8' }, (err, stdout, stderr) =>
        done({ code: err ? Number(err.code) : 0, stdout, stderr }),
      ),
    );
    expect(installed.code).toBe(0);
    // The fixture's QWEN_TOKEND_BIN points at the real daemon: without the unit, this would start it.
    const client = new TokenClient({ env: fx.env, autostart: true, reconnectWindowMs: 500 });
    try {
      const failure = await client.getAccessToken().then(
        () => null,
        (err: unknown) => err,
      );
      expect(failure).toBeInstanceOf(QwenDaemonUnavailableError);
      expect((failure as Error).message).toMatch(/service is installed but not running/);
    } finally {
      await client.close();
    }
    expect(existsSync(fx.socketPath)).toBe(false);
    expect(existsSync(join(fx.home, '.one_dragon_alpha', 'qwen-tokend.pid'))).toBe(false);
  });
});
