/**
 * The compiled `qwen-token` CLI as a child process against the real daemon and the local Qwen
 * server: output bytes, exit codes, files, and what the daemon reports afterwards.
 */
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { chmod, mkdir, rm, truncate, writeFile } from 'node:fs/promises';
import { dirname } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { fingerprint } from '../shared/fingerprint.js';
import { StatusResult } from '../shared/protocol.js';
import { ExitCodes } from '../client/cli/exit-codes.js';
import { resolveCommand } from '../shared/cli-command.js';
import { CLI_BIN, REPO_ROOT, assertNoSecrets, createFixture, credsFrom, type DaemonFixture } from './support/daemon.js';
import { until } from './support/wait.js';

/**
 * Each describe block shares one fixture (daemon starts dominate the run time on two cores);
 * every test reads the state it checks from the daemon or the files, not from earlier tests.
 */
let fx: DaemonFixture;

function withFixture(setup: () => Promise<DaemonFixture>): void {
  beforeAll(async () => {
    fx = await setup();
  });
  afterAll(async () => {
    await fx?.cleanup();
  });
}

interface CliResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** A running CLI: stdout collected by line, so a test can wait for one. */
class CliProcess {
  stdout = '';
  stderr = '';
  readonly done: Promise<CliResult>;
  private readonly child;

  constructor(args: string[], env: NodeJS.ProcessEnv) {
    this.child = spawn(process.execPath, [CLI_BIN, ...args], { env, stdio: ['ignore', 'pipe', 'pipe'] });
    this.child.stdout.on('data', (c: Buffer) => (this.stdout += c.toString('utf8')));
    this.child.stderr.on('data', (c: Buffer) => (this.stderr += c.toString('utf8')));
    this.done = new Promise((resolve) =>
      this.child.once('close', (code) => resolve({ code, stdout: this.stdout, stderr: this.stderr })),
    );
  }

  /** Parsed JSON lines printed so far. */
  jsonLines(): Array<Record<string, unknown>> {
    return this.stdout
      .split('\n')
      .filter((l) => l.trim() !== '')
      .map((l) => JSON.parse(l) as Record<string, unknown>);
  }

  /** Waits for a JSON line matching `match`; fails early if the process exits first. */
  async waitForJson(match: (line: Record<string, unknown>) => boolean, timeoutMs = 8000): Promise<Record<string, unknown>> {
    let exited = false;
    void this.done.then(() => (exited = true));
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const found = this.jsonLines().find(match);
      if (found) return found;
      if (exited) throw new Error(`CLI exited before the expected line; stderr: ${this.stderr}`);
      if (Date.now() > deadline) throw new Error(`no matching line within ${timeoutMs} ms; stderr: ${this.stderr}`);
      await new Promise((r) => setTimeout(r, 10));
    }
  }

  kill(signal: NodeJS.Signals): void {
    this.child.kill(signal);
  }
}

function cli(args: string[], env: NodeJS.ProcessEnv = fx.env): CliProcess {
  return new CliProcess(args, env);
}

function runCli(args: string[], env: NodeJS.ProcessEnv = fx.env): Promise<CliResult> {
  return cli(args, env).done;
}

/** Every secret the server handed out must stay out of what the CLI printed. */
function expectNoSecrets(text: string): void {
  assertNoSecrets(text, [...fx.server.issuedTokens(), ...fx.server.issuedDeviceCodes()], 'CLI output');
}

const STATUS_KEYS = Object.keys(StatusResult.shape).sort();

/**
 * `qwen-token login` as the CLI and the daemon (both run from this checkout) name it: the
 * form depends on PATH (see shared/cli-command.ts), so it is computed, not spelled out.
 */
const LOGIN = `${resolveCommand('qwen-token', { cwd: REPO_ROOT })} login`;

describe('with a logged-in daemon', () => {
  withFixture(async () => {
    const f = await createFixture();
    await f.writeOwn(credsFrom(f.server));
    await f.start();
    return f;
  });

  it('token prints exactly the current token and a newline, nothing else', async () => {
    const r = await runCli(['token']);
    expect(r.code).toBe(0);
    const own = await fx.readOwn();
    expect(r.stdout === `${own!.access_token}\n`).toBe(true);
    expect(r.stderr).toBe('');
  });

  it('token --min-validity refreshes first when the token would expire sooner', async () => {
    const before = await fx.readOwn();
    const r = await runCli(['token', '--min-validity', '24h']);
    expect(r.code).toBe(0);
    // The daemon answers as soon as the server has; writing the file follows right after.
    await until(async () => (await fx.readOwn())?.access_token !== before!.access_token, 'the refreshed credentials on disk', 5000);
    const after = await fx.readOwn();
    expect(r.stdout === `${after!.access_token}\n`).toBe(true);
    expect(r.stderr).toBe('');
  });

  it('status --json prints every StatusResult field and no token; --socket overrides the environment', async () => {
    const env = { ...fx.env, QWEN_TOKEND_SOCKET: `${fx.root}/elsewhere.sock` };
    const r = await runCli(['status', '--json', '--socket', fx.socketPath], env);
    expect(r.code).toBe(0);
    const raw = JSON.parse(r.stdout) as Record<string, unknown>;
    expect(Object.keys(raw).sort()).toEqual(STATUS_KEYS);
    const status = StatusResult.parse(raw);
    expect(status.state).toBe('valid');
    expect(status.socket_path).toBe(fx.socketPath);
    expect(status.token_fingerprint).toBe(fingerprint((await fx.readOwn())!.access_token));
    expectNoSecrets(r.stdout + r.stderr);
  });

  it('status shows "expires in" and the fingerprint, never the token', async () => {
    const r = await runCli(['status']);
    expect(r.code).toBe(0);
    const own = await fx.readOwn();
    expect(r.stdout).toMatch(/token\s+expires in (5h 59m|6h)\n/);
    expect(r.stdout).toContain(fingerprint(own!.access_token));
    expect(r.stdout).toMatch(/Qwen CLI link\s+on/);
    expectNoSecrets(r.stdout + r.stderr);
  });

  it('refresh prints the new expiry and fingerprint, not the token', async () => {
    const before = await fx.readOwn();
    const r = await runCli(['refresh', '--json']);
    expect(r.code).toBe(0);
    const after = await fx.readOwn();
    expect(after!.access_token).not.toBe(before!.access_token);
    expect(JSON.parse(r.stdout)).toMatchObject({ expiry_date: after!.expiry_date, token_fingerprint: fingerprint(after!.access_token) });
    const human = await runCli(['refresh']);
    expect(human.code).toBe(0);
    expect(human.stdout).toMatch(/^Refreshed: token expires in (5h 59m|6h) \(fingerprint [0-9a-f]{4}…[0-9a-f]{4}\)\.\n$/);
    expect(human.stdout).toContain(fingerprint((await fx.readOwn())!.access_token));
    expectNoSecrets(r.stdout + r.stderr + human.stdout + human.stderr);
  });

  it('watch --json prints a forced refresh from another client without the token; Ctrl-C exits 130', async () => {
    const p = cli(['watch', '--json']);
    await p.waitForJson((l) => l.event === 'watch.started');
    const refreshed = await fx.client().refresh();
    const event = await p.waitForJson((l) => l.event === 'token.refreshed');
    expect(event.token_fingerprint).toBe(fingerprint(refreshed.access_token));
    expect(event.expiry_date).toBe(refreshed.expiry_date);
    p.kill('SIGINT');
    const r = await p.done;
    expect(r.code).toBe(ExitCodes.cancelled);
    expectNoSecrets(r.stdout + r.stderr);
  });

  it('doctor exits 0 on a healthy setup', async () => {
    const r = await runCli(['doctor', '--json']);
    const report = JSON.parse(r.stdout) as { ok: boolean; checks: Array<{ id: string; status: string }> };
    expect(report.checks.filter((c) => c.status === 'fail')).toEqual([]);
    expect(report.ok).toBe(true);
    expect(r.code).toBe(0);
    expect(report.checks.map((c) => c.id)).toEqual([
      'config',
      'socket-path',
      'socket-dir',
      'socket',
      'daemon',
      'own-file',
      'qwen-cli-link',
      'qwen-cli-file',
      'qwen-cli-lock',
      'state',
    ]);
    expectNoSecrets(r.stdout + r.stderr);
  });

  it('doctor flags a credential file too large to be one, without reading it', async () => {
    await mkdir(dirname(fx.qwenCliPath), { recursive: true, mode: 0o700 });
    await writeFile(fx.qwenCliPath, '', { mode: 0o600 });
    // Sparse: 2 GiB of nothing costs no disk, and read whole it could not even become a string.
    await truncate(fx.qwenCliPath, 2 * 1024 ** 3);
    try {
      const r = await runCli(['doctor', '--json']);
      const check = (JSON.parse(r.stdout) as { checks: Array<{ id: string; status: string; detail: string }> }).checks.find((c) => c.id === 'qwen-cli-file');
      // The Qwen CLI's file is only a warning (the daemon works without it).
      expect(check?.status).toBe('warn');
      expect(check?.detail).toContain('too large to be a credential file');
    } finally {
      await rm(fx.qwenCliPath, { force: true });
    }
  });

  it('doctor fails (exit 1) when the socket directory is group/other accessible', async () => {
    await chmod(fx.runDir, 0o755);
    try {
      const r = await runCli(['doctor']);
      expect(r.code).toBe(1);
      expect(r.stdout).toMatch(/^FAIL\s+socket directory\s+.*mode 0755/m);
      expect(r.stdout).toContain(`fix: chmod 700 ${fx.runDir}`);
    } finally {
      await chmod(fx.runDir, 0o700);
    }
  });
});

describe('login against a daemon without credentials', () => {
  withFixture(async () => {
    const f = await createFixture({ server: { deviceInterval: 0.05, slowDown: false } });
    await f.start();
    return f;
  });

  it('token exits 3 with one clear stderr line when there are no credentials', async () => {
    const r = await runCli(['token']);
    expect(r.code).toBe(ExitCodes.needsLogin);
    expect(r.stdout).toBe('');
    // One line that says what to do, in the form that works here; no second hint saying it again.
    expect(r.stderr).toBe(`qwen-token: not logged in yet: run \`${LOGIN}\` (or log in with the Qwen CLI)\n`);
  });

  it('Ctrl-C cancels the flow in the daemon and exits 130', async () => {
    const p = cli(['login', '--no-browser', '--json']);
    const code = await p.waitForJson((l) => l.event === 'login.code');
    p.kill('SIGINT');
    const r = await p.done;
    expect(r.code).toBe(ExitCodes.cancelled);
    expect(p.jsonLines().at(-1)).toMatchObject({ event: 'login.cancelled', confirmed: true });
    const status = await fx.client().status();
    expect(status.login_in_progress).toBe(false);
    expect(fx.server.deviceCode(code.user_code as string)?.state).toBe('pending');
    expect(await fx.readOwn()).toBeNull();
    expectNoSecrets(r.stdout + r.stderr);
  });

  it('login --no-browser --json completes a device flow approved by the test', async () => {
    const p = cli(['login', '--no-browser', '--json']);
    const code = await p.waitForJson((l) => l.event === 'login.code');
    expect(code.user_code).toEqual(expect.any(String));
    expect(code.verification_uri_complete).toContain(encodeURIComponent(code.user_code as string));
    fx.server.approve(code.user_code as string);
    const r = await p.done;
    expect(r.code).toBe(0);
    const own = await fx.readOwn();
    expect(own).not.toBeNull();
    expect(fx.server.issuedTokens('access')).toContain(own!.access_token);
    const lines = p.jsonLines();
    expect(lines.map((l) => l.event)).toEqual(['login.code', 'login.completed']);
    expect(lines[1]).toMatchObject({ expiry_date: own!.expiry_date, token_fingerprint: fingerprint(own!.access_token) });
    expectNoSecrets(r.stdout + r.stderr);
  });

  it('login in human mode shows the URL, the code and a QR code', async () => {
    fx.server.settings.approveAfterPolls = 2;
    const r = await runCli(['login', '--no-browser']);
    fx.server.settings.approveAfterPolls = null;
    expect(r.code).toBe(0);
    const info = fx.server.deviceCode()!;
    expect(info.state).toBe('used');
    expect(r.stdout).toContain(`Code: ${info.userCode}`);
    expect(r.stdout).toContain(`user_code=${encodeURIComponent(info.userCode)}`);
    expect(r.stdout).toMatch(/[▀▄█]{5}/);
    expect(r.stdout).toMatch(/Logged in\. The token expires in (5h 59m|6h) \(fingerprint /);
    expect(r.stdout).toContain(fingerprint((await fx.readOwn())!.access_token));
    expectNoSecrets(r.stdout + r.stderr);
  });
});

describe('a daemon whose token cannot be refreshed', () => {
  withFixture(async () => {
    const f = await createFixture({ env: { QWEN_TOKEND_RETRY_MS: '60000' } });
    await f.writeOwn(credsFrom(f.server, -60));
    f.server.injectFault({ kind: '5xx', endpoint: 'token' });
    await f.start();
    return f;
  });

  it('token exits 5 while the token is expired and refreshing fails', async () => {
    const r = await runCli(['token']);
    expect(r.code).toBe(ExitCodes.tokenExpired);
    expect(r.stdout).toBe('');
    expect(r.stderr.split('\n')[0]).toMatch(/^qwen-token: /);
  });

  it('refresh exits 3 once the server rejects the refresh token', async () => {
    fx.server.clearFaults();
    fx.server.revokeAll();
    const r = await runCli(['refresh']);
    expect(r.code).toBe(ExitCodes.needsLogin);
    expect(r.stdout).toBe('');
    expect(r.stderr.endsWith(`\nhint: run \`${LOGIN}\`\n`)).toBe(true);
    const doctor = await runCli(['doctor', '--json']);
    expect(doctor.code).toBe(1);
    const state = (JSON.parse(doctor.stdout) as { checks: Array<{ id: string; status: string; hint?: string }> }).checks.find((c) => c.id === 'state');
    expect(state).toMatchObject({ status: 'fail', hint: `run \`${LOGIN}\`` });
    expectNoSecrets(r.stderr + doctor.stdout);
  });
});

describe('logout', () => {
  withFixture(async () => {
    const f = await createFixture();
    const creds = credsFrom(f.server);
    await f.writeOwn(creds);
    await f.writeCli(creds);
    await f.start();
    return f;
  });

  it('removes the own file; --qwen-cli also removes the Qwen CLI file', async () => {
    const first = await runCli(['logout', '--json']);
    expect(first.code).toBe(0);
    expect(JSON.parse(first.stdout)).toEqual({ removed: [fx.tokenPath] });
    expect(existsSync(fx.tokenPath)).toBe(false);
    expect(existsSync(fx.qwenCliPath)).toBe(true);
    const second = await runCli(['logout', '--qwen-cli']);
    expect(second.code).toBe(0);
    expect(second.stdout).toBe(`Logged out. Removed:\n  ${fx.qwenCliPath}\n`);
    expect(existsSync(fx.tokenPath)).toBe(false);
    expect(existsSync(fx.qwenCliPath)).toBe(false);
    expect((await runCli(['token'])).code).toBe(ExitCodes.needsLogin);
  });
});

describe('without a daemon', () => {
  withFixture(async () => {
    const f = await createFixture();
    await f.writeOwn(credsFrom(f.server));
    return f;
  });

  it('token exits 4 when no daemon is reachable and autostart is off', async () => {
    const r = await runCli(['token']);
    expect(r.code).toBe(ExitCodes.daemonUnavailable);
    expect(r.stdout).toBe('');
    expect(r.stderr.split('\n')[0]).toMatch(/^qwen-token: qwen-tokend is not reachable at .*d\.sock/);
    expect(r.stderr).not.toMatch(/\n\s+at /);
  });

  it('doctor reports the daemon as not running (not a failure: clients start it) and does not start one, even with autostart on', async () => {
    const r = await runCli(['doctor', '--json'], { ...fx.env, QWEN_TOKEND_AUTOSTART: '1' });
    if (existsSync(fx.socketPath)) {
      // The bug this test exists to catch: stop the daemon it started before failing.
      const pid = (await fx.client().status().catch(() => null))?.pid;
      if (pid) process.kill(pid, 'SIGTERM');
    }
    expect(r.code).toBe(0);
    const report = JSON.parse(r.stdout) as { checks: Array<{ id: string; status: string; detail: string }> };
    expect(report.checks.find((c) => c.id === 'daemon')).toMatchObject({ status: 'ok', detail: expect.stringMatching(/^not running/) });
    expect(report.checks.find((c) => c.id === 'own-file')?.status).toBe('ok');
    expect(existsSync(fx.socketPath)).toBe(false);
    expectNoSecrets(r.stdout + r.stderr);
  });

  it('unknown command or option exits 2; --help exits 0 and documents exit codes', async () => {
    const [bad, badOption, help] = await Promise.all([runCli(['frobnicate']), runCli(['status', '--frob']), runCli(['--help'])]);
    expect(bad.code).toBe(ExitCodes.usage);
    expect(bad.stderr.split('\n')[0]).toBe("qwen-token: unknown command 'frobnicate'");
    expect(badOption.code).toBe(ExitCodes.usage);
    expect(badOption.stderr.split('\n')[0]).toBe("qwen-token: unknown option '--frob'");
    expect(help.code).toBe(0);
    expect(help.stdout).toMatch(/Exit codes:[\s\S]*3\s+needs login[\s\S]*4\s+daemon unreachable/);
  });

  it('a usage error never echoes a value given as --option=value, on the token path or any other', async () => {
    const SECRET = 'not-a-real-secret-7f3a'; // a stand-in, not a real secret
    const cases: Array<[string[], string]> = [
      // `token` lines are looked at by main.ts before the command tree; these are left to it.
      [['token', `--client-secret=${SECRET}`], "unknown option '--client-secret=<redacted>'"],
      [['token', `--min-validity=${SECRET}`], "option '--min-validity <duration>' argument '<redacted>' is invalid."],
      [['profile', 'add', 'work', `--client-secret=${SECRET}`], "unknown option '--client-secret=<redacted>'"],
      [[`--key=${SECRET}`, 'status'], "unknown option '--key=<redacted>'"],
      [['status', `--secret=${SECRET}`], "unknown option '--secret=<redacted>'"],
    ];
    const results = await Promise.all(cases.map(([args]) => runCli(args)));
    results.forEach((r, i) => {
      expect(r.code, cases[i]![0].join(' ')).toBe(ExitCodes.usage);
      expect(r.stdout + r.stderr).not.toContain(SECRET);
      expect(r.stderr.split('\n')[0]).toContain(cases[i]![1]);
    });
  });
});
