/**
 * `qwen-token token` has a start-up path of its own (client/cli/main.ts): a well-formed command
 * line is run without the command tree. The same command must behave exactly as the full
 * program does: the same bytes on stdout and stderr and the same exit code, and every other
 * command line (malformed ones included) must still reach the full program.
 *
 * The full program's answer is had from a spelling the short path declines: `--socket` given
 * twice with the same value (commander keeps the last), so both paths see the same options.
 */
import { spawn } from 'node:child_process';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ExitCodes } from '../client/cli/exit-codes.js';
import { CLI_BIN, assertNoSecrets, createFixture, credsFrom, type DaemonFixture } from './support/daemon.js';
import { fingerprint } from '../shared/fingerprint.js';
import { until } from './support/wait.js';

interface CliResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

function runCli(args: string[], env: NodeJS.ProcessEnv): Promise<CliResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [CLI_BIN, ...args], { env, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (c: Buffer) => (stdout += c.toString('utf8')));
    child.stderr.on('data', (c: Buffer) => (stderr += c.toString('utf8')));
    child.once('error', reject);
    child.once('close', (code) => resolve({ code, stdout, stderr }));
  });
}

/** `args` as the short path runs them, and as the full program runs them. */
async function bothPaths(args: string[], socket: string, env: NodeJS.ProcessEnv): Promise<[CliResult, CliResult]> {
  return Promise.all([runCli(args, env), runCli([...args, '--socket', socket, '--socket', socket], env)]);
}

let fx: DaemonFixture;
/** The daemon's environment with QWEN_TOKEND_SOCKET pointing nowhere: only `--socket` finds it. */
let elsewhere: NodeJS.ProcessEnv;

beforeAll(async () => {
  fx = await createFixture();
  await fx.writeOwn(credsFrom(fx.server));
  await fx.start();
  elsewhere = { ...fx.env, QWEN_TOKEND_SOCKET: `${fx.runDir}/nothing-here.sock` };
});
afterAll(async () => {
  await fx?.cleanup();
});

describe('qwen-token token', () => {
  it('prints the same token and newline whether or not the command tree is loaded', async () => {
    const own = await fx.readOwn();
    const [short, full] = await bothPaths(['token'], fx.socketPath, fx.env);
    expect(short).toEqual({ code: ExitCodes.ok, stdout: `${own!.access_token}\n`, stderr: '' });
    expect(full).toEqual(short);
  });

  it('takes --socket before or after the command, with a space or an equals sign', async () => {
    const own = await fx.readOwn();
    for (const args of [
      ['token', '--socket', fx.socketPath],
      ['token', `--socket=${fx.socketPath}`],
      ['--socket', fx.socketPath, 'token'],
      [`--socket=${fx.socketPath}`, 'token', '--min-validity=10m'],
    ]) {
      const r = await runCli(args, elsewhere);
      expect({ args, ...r }).toEqual({ args, code: ExitCodes.ok, stdout: `${own!.access_token}\n`, stderr: '' });
    }
  });

  it('--min-validity longer than the token has left refreshes first, on both paths', async () => {
    const before = (await fx.readOwn())!.access_token;
    const short = await runCli(['token', '--min-validity', '24h'], fx.env);
    // The answer leaves before the durable write (see bench/README.md#answer-on-reply).
    await until(async () => (await fx.readOwn())?.access_token !== before, 'the refreshed credentials on disk', 5000);
    const refreshed = (await fx.readOwn())!.access_token;
    expect(short).toEqual({ code: ExitCodes.ok, stdout: `${refreshed}\n`, stderr: '' });
    // Right after a refresh the daemon would not refresh again for a minimum its tokens cannot
    // meet (see decideTokenRequest): another process's newer login makes the next call refresh.
    const other = credsFrom(fx.server, 3600);
    await fx.writeOwn(other);
    await until(async () => (await fx.client().status()).token_fingerprint === fingerprint(other.access_token), 'the file adopted', 5000);
    const full = await runCli(['token', '--min-validity', '24h', '--socket', fx.socketPath, '--socket', fx.socketPath], fx.env);
    await until(async () => (await fx.readOwn())?.access_token !== other.access_token, 'the refreshed credentials on disk', 5000);
    expect(full).toEqual({ code: ExitCodes.ok, stdout: `${(await fx.readOwn())!.access_token}\n`, stderr: '' });
  });

  it('a daemon that cannot be reached gives the same message, hint and exit code on both paths', async () => {
    const [short, full] = await bothPaths(['token'], `${fx.runDir}/nothing-here.sock`, elsewhere);
    expect(short.code).toBe(ExitCodes.daemonUnavailable);
    expect(short.stdout).toBe('');
    expect(short.stderr).toMatch(/^qwen-token: .*nothing-here\.sock.*\nhint: run `.*doctor` to see what is wrong\n$/);
    expect(full).toEqual(short);
  });

  it('malformed command lines get the full program: usage errors exit 2 with one message', async () => {
    for (const args of [
      ['token', '--min-validity', '25h'],
      ['token', '--min-validity', 'soon'],
      ['token', '--min-validity'],
      ['token', '--socket'],
      ['--min-validity', '5m', 'token'],
      ['token', '--bogus'],
      ['token', 'extra'],
    ]) {
      const r = await runCli(args, fx.env);
      expect({ args, code: r.code, stdout: r.stdout }).toEqual({ args, code: ExitCodes.usage, stdout: '' });
      expect(r.stderr.split('\n')[0]).toMatch(/^qwen-token: /);
    }
  });

  it('--help and a command other than token still reach the command tree', async () => {
    const help = await runCli(['token', '--help'], fx.env);
    expect(help.code).toBe(ExitCodes.ok);
    expect(help.stdout).toContain('--min-validity <duration>');
    const status = await runCli(['status', '--json'], fx.env);
    expect(status.code).toBe(ExitCodes.ok);
    expect(JSON.parse(status.stdout)).toMatchObject({ state: 'valid' });
    assertNoSecrets(`${help.stdout}${status.stdout}${status.stderr}`, fx.server.issuedTokens(), 'CLI output');
  });
});
