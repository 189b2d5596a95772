/**
 * `qwen-token service install`: the installed daemon must see the same files as the CLI that
 * installed it (every daemon setting carried, none holding a secret), and under the systemd
 * unit's ProtectSystem=strict every directory it writes must be listed in ReadWritePaths= and
 * exist before it starts. A config dir left out made `profile add` and `gateway enable` fail.
 */
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, isAbsolute, join, relative, resolve } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { CARRIED_SETTINGS, planService } from '../client/cli/service.js';
import { resolveConfig } from '../shared/config.js';
import { resolveGatewayEnv } from '../daemon/gateway/limits.js';
import { REPO_ROOT } from './support/daemon.js';
import { createFakeServiceManager } from './support/fake-service-manager.js';

const SERVICE_CLI = join(REPO_ROOT, 'test', 'support', 'service-cli.mjs');
/** What systemd's user manager gives the service as %t (and XDG_RUNTIME_DIR). */
const RUNTIME = '/run/user/1000';
const HOME = '/home/alice';

/** Read by the daemon, but given to the service by its manager (or pinned: the darwin socket). */
const PROVIDED_BY_MANAGER = ['HOME', 'XDG_RUNTIME_DIR', 'TMPDIR'];
/** Read by the daemon's config code, but client settings or replaced by the service's logging. */
const LEFT_OUT = ['QWEN_TOKEND_AUTOSTART', 'QWEN_TOKEND_BIN', 'QWEN_TOKEND_LOG_FILE'];

/** Every environment variable the daemon's settings code reads. */
function variablesTheDaemonReads(): Set<string> {
  const read = new Set<string>();
  const env = new Proxy({} as NodeJS.ProcessEnv, {
    get(_target, name) {
      if (typeof name === 'string') read.add(name);
      return undefined;
    },
  });
  for (const platform of ['linux', 'darwin'] as const) {
    const config = resolveConfig(env, { platform, homedir: HOME });
    resolveGatewayEnv(env, config.socketPath, config.home);
  }
  return read;
}

/** A valid value for each carried setting (none is a secret). */
const SAMPLE: Record<(typeof CARRIED_SETTINGS)[number], string> = {
  QWEN_TOKEN_PATH: '/home/alice/state/creds.json',
  QWEN_HOME: '/home/alice/qwen-cli',
  QWEN_TOKEND_SOCKET: '/home/alice/sock/t.sock',
  QWEN_TOKEND_CONFIG: '/home/alice/cfg/config.json',
  XDG_CONFIG_HOME: '/home/alice/xdg',
  QWEN_OAUTH_BASE_URL: 'https://oauth.example.test',
  QWEN_OAUTH_CLIENT_ID: 'public-client-id',
  QWEN_OAUTH_SCOPE: 'openid',
  QWEN_TOKEND_CHAT_HOSTS: 'portal.qwen.ai,*.example.test',
  QWEN_TOKEND_REFRESH_LEAD_MS: '120000',
  QWEN_TOKEND_RETRY_MS: '30000',
  QWEN_TOKEND_REQUEST_RETRY_MS: '2000',
  QWEN_TOKEND_HTTP_TIMEOUT_MS: '10000',
  QWEN_TOKEND_QWEN_CLI_LOCK_STALE_MS: '40000',
  QWEN_TOKEND_SILENT_CONNECTION_TIMEOUT_MS: '20000',
  QWEN_TOKEND_QWEN_CLI_SYNC: 'on',
  QWEN_TOKEND_LOG_LEVEL: 'debug',
  QWEN_TOKEND_GATEWAY_SOCKET: '/home/alice/gw/gateway.sock',
  QWEN_TOKEND_GATEWAY_MAX_HEADER_BYTES: '65536',
  QWEN_TOKEND_GATEWAY_MAX_BODY_BYTES: '1048576',
  QWEN_TOKEND_GATEWAY_REPLAY_BYTES: '4096',
  QWEN_TOKEND_GATEWAY_MAX_CONCURRENT: '64',
  QWEN_TOKEND_GATEWAY_HEADERS_TIMEOUT_MS: '5000',
  QWEN_TOKEND_GATEWAY_REQUEST_TIMEOUT_MS: '60000',
  QWEN_TOKEND_GATEWAY_UPSTREAM_TIMEOUT_MS: '90000',
};

/** Reads a systemd double-quoted string back (the inverse of service.ts's quoting). */
function unquote(quoted: string): string {
  return quoted.replace(/\\(.)/g, '$1').replace(/%%/g, '%');
}

/** The unit's Environment= settings, as the service's process sees them. */
function unitEnvironment(unit: string): Record<string, string> {
  const env: Record<string, string> = {};
  for (const m of unit.matchAll(/^Environment="((?:[^"\\]|\\.)*)"$/gm)) {
    const setting = unquote(m[1]!);
    const eq = setting.indexOf('=');
    env[setting.slice(0, eq)] = setting.slice(eq + 1);
  }
  return env;
}

/** ReadWritePaths= as absolute directories, %t read as the runtime dir. */
function unitWritable(unit: string): string[] {
  const line = unit.split('\n').find((l) => l.startsWith('ReadWritePaths='));
  expect(line, 'ReadWritePaths= line').toBeDefined();
  return [...line!.slice('ReadWritePaths='.length).matchAll(/"-((?:[^"\\]|\\.)*)"|-(%t\/\S+)/g)].map((m) =>
    m[1] !== undefined ? unquote(m[1]) : m[2]!.replace('%t', RUNTIME),
  );
}

/** The plist's EnvironmentVariables. */
function plistEnvironment(plist: string): Record<string, string> {
  const unescape = (s: string) => s.replace(/&lt;/g, '<').replace(/&gt;/g, '>').replace(/&quot;/g, '"').replace(/&apos;/g, "'").replace(/&amp;/g, '&');
  const env: Record<string, string> = {};
  for (const m of plist.matchAll(/<key>([^<]*)<\/key>\n\s*<string>([^<]*)<\/string>/g)) env[unescape(m[1]!)] = unescape(m[2]!);
  return env;
}

function isInside(parent: string, child: string): boolean {
  const rel = relative(parent, child);
  return rel === '' || (!rel.startsWith('..') && !isAbsolute(rel));
}

/** Every directory the daemon writes in, for the environment it runs with. */
function directoriesTheDaemonWrites(env: NodeJS.ProcessEnv): string[] {
  const config = resolveConfig(env, { platform: 'linux', homedir: HOME });
  const gateway = resolveGatewayEnv(env, config.socketPath, config.home);
  return [
    config.stateDir,
    config.profilesDir,
    ...(config.qwenCliSync ? [config.qwenHome] : []),
    dirname(config.configPath),
    dirname(config.socketPath),
    dirname(gateway.socketPath),
  ];
}

describe('the settings a service carries', () => {
  it('are every variable the daemon reads, less the documented exceptions', () => {
    const read = variablesTheDaemonReads();
    const expected = [...read].filter((name) => !PROVIDED_BY_MANAGER.includes(name) && !LEFT_OUT.includes(name)).sort();
    expect([...CARRIED_SETTINGS].sort()).toEqual(expected);
    // The CLI-only and secret-holding settings stay out.
    for (const name of [...LEFT_OUT, 'QWEN_TOKEND_PROFILE', 'QWEN_API_KEY', 'DASHSCOPE_API_KEY']) {
      expect(CARRIED_SETTINGS as readonly string[]).not.toContain(name);
    }
  });

  it('reach the unit and the plist, paths resolved', () => {
    const env = { HOME, XDG_RUNTIME_DIR: RUNTIME, ...SAMPLE, QWEN_TOKEND_CONFIG: 'rel/config.json', QWEN_API_KEY: 'sk-not-a-daemon-setting' };
    for (const platform of ['linux', 'darwin'] as const) {
      const plan = planService(env, platform);
      const seen = platform === 'linux' ? unitEnvironment(plan.contents) : plistEnvironment(plan.contents);
      for (const name of Object.keys(SAMPLE) as Array<keyof typeof SAMPLE>) {
        // A relative path is resolved where `install` runs: the service runs elsewhere.
        const value = name === 'QWEN_TOKEND_CONFIG' ? resolve('rel/config.json') : SAMPLE[name];
        expect(seen[name], `${platform} ${name}`).toBe(value);
      }
      expect(plan.contents).not.toContain('sk-not-a-daemon-setting');
    }
  });
});

describe('the systemd unit lets the daemon write every directory it writes', () => {
  const cases: Array<[string, NodeJS.ProcessEnv]> = [
    ['defaults', {}],
    ['XDG_CONFIG_HOME', { XDG_CONFIG_HOME: '/home/alice/xdg' }],
    [
      'every path set apart',
      {
        QWEN_TOKEN_PATH: '/srv/alice/state/creds.json',
        QWEN_HOME: '/srv/alice/qwen',
        QWEN_TOKEND_CONFIG: '/etc/alice/qwen-tokend/config.json',
        QWEN_TOKEND_SOCKET: '/home/alice/sock/t.sock',
        QWEN_TOKEND_GATEWAY_SOCKET: '/home/alice/gw/gateway.sock',
      },
    ],
    ['no Qwen CLI link, config inside the state dir', { QWEN_TOKEND_QWEN_CLI_SYNC: 'off', QWEN_TOKEND_CONFIG: '~/.one_dragon_alpha/config.json' }],
  ];

  it.each(cases)('%s', (_name, settings) => {
    const installEnv = { HOME, XDG_RUNTIME_DIR: RUNTIME, ...settings };
    const plan = planService(installEnv, 'linux');
    // The service's process: what systemd gives it plus the unit's Environment= lines.
    const serviceEnv = { HOME, XDG_RUNTIME_DIR: RUNTIME, ...unitEnvironment(plan.contents) };
    const cli = resolveConfig(installEnv, { platform: 'linux' });
    const daemon = resolveConfig(serviceEnv, { platform: 'linux' });
    expect(daemon.configPath).toBe(cli.configPath);
    expect(daemon.socketPath).toBe(cli.socketPath);
    expect(resolveGatewayEnv(serviceEnv, daemon.socketPath, HOME).socketPath).toBe(resolveGatewayEnv(installEnv, cli.socketPath, HOME).socketPath);

    const writable = unitWritable(plan.contents);
    for (const dir of directoriesTheDaemonWrites(serviceEnv)) {
      expect(
        writable.some((w) => isInside(w, dir)),
        `${dir} is writable under ProtectSystem=strict (ReadWritePaths=${writable.join(' ')})`,
      ).toBe(true);
      // A listed directory that does not exist is skipped ("-"), and the daemon cannot create it.
      if (!isInside(RUNTIME, dir)) expect(plan.createDirs.some((c) => isInside(c, dir)), `${dir} is created by install`).toBe(true);
    }
  });
});

describe.skipIf(process.platform === 'win32')('qwen-token service install (linux)', () => {
  let root: string;
  beforeEach(async () => {
    root = await mkdtemp(join(tmpdir(), 'qtd-svcpaths-'));
  });
  afterEach(async () => {
    await rm(root, { recursive: true, force: true });
  });

  function run(args: string[], env: NodeJS.ProcessEnv): Promise<{ code: number; stdout: string; stderr: string }> {
    return new Promise((done) => {
      execFile(process.execPath, [SERVICE_CLI, ...args], { env, encoding: 'utf8' }, (err, stdout, stderr) => {
        done({ code: err ? (typeof err.code === 'number' ? err.code : -1) : 0, stdout, stderr });
      });
    });
  }

  it('--print carries the settings and makes the config dir writable; install creates it 0700', async () => {
    const home = join(root, 'home');
    await mkdir(home, { mode: 0o700 });
    await mkdir(join(root, 'run'), { mode: 0o700 });
    const fake = await createFakeServiceManager(root);
    const env: NodeJS.ProcessEnv = { ...process.env };
    for (const key of Object.keys(env)) if (key.startsWith('QWEN_') || key.startsWith('XDG_') || key === 'NOTIFY_SOCKET') delete env[key];
    Object.assign(env, fake.env, {
      HOME: home,
      XDG_RUNTIME_DIR: join(root, 'run'),
      QWEN_TOKEND_CHAT_HOSTS: 'portal.qwen.ai,*.example.test',
      QWEN_TOKEND_SILENT_CONNECTION_TIMEOUT_MS: '20000',
      QWEN_TOKEND_GATEWAY_MAX_CONCURRENT: '64',
    });
    const configDir = join(home, '.config', 'qwen-tokend');

    const printed = await run(['install', '--print', '--platform', 'linux'], env);
    expect(printed.stderr).toBe('');
    expect(printed.code).toBe(0);
    expect(printed.stdout).toContain('Environment="QWEN_TOKEND_CHAT_HOSTS=portal.qwen.ai,*.example.test"');
    expect(printed.stdout).toContain('Environment="QWEN_TOKEND_SILENT_CONNECTION_TIMEOUT_MS=20000"');
    expect(printed.stdout).toContain('Environment="QWEN_TOKEND_GATEWAY_MAX_CONCURRENT=64"');
    expect(unitWritable(printed.stdout)).toContain(configDir);
    expect(existsSync(configDir)).toBe(false);

    const analyze = ['/usr/bin/systemd-analyze', '/bin/systemd-analyze'].find((p) => existsSync(p));
    if (analyze) {
      const unitFile = join(root, 'qwen-tokend.service');
      await writeFile(unitFile, printed.stdout);
      const verified = await new Promise<{ code: number; stderr: string }>((done) => {
        execFile(analyze, ['verify', '--user', unitFile], { env: { ...process.env, XDG_RUNTIME_DIR: join(root, 'run') }, encoding: 'utf8' }, (err, _out, stderr) =>
          done({ code: err ? 1 : 0, stderr }),
        );
      });
      expect(verified.stderr).toBe('');
      expect(verified.code).toBe(0);
    }

    const installed = await run(['install', '--platform', 'linux'], env);
    expect(installed.stderr).toBe('');
    expect(installed.code).toBe(0);
    expect((await stat(configDir)).mode & 0o777).toBe(0o700);
  });
});
