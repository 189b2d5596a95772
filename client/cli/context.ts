/**
 * What every qwen-token command shares: the environment (with `--socket` applied), how to
 * open a TokenClient, and how output and errors are written.
 */
import { InvalidArgumentError, type Command } from 'commander';
import { resolveConfig, type TokendConfig } from '../../shared/config.js';
import { cliCommand, daemonCommand } from '../../shared/cli-command.js';
import { errnoCode, errorText } from '../../shared/diagnostics.js';
import { QwenDaemonUnavailableError, QwenError } from '../../shared/errors.js';
import { serviceInstalled } from '../autostart.js';
import type { TokenClient } from '../token-client.js';
import { hintFor } from './exit-codes.js';

/** Options every command accepts (defined on the root command). */
export interface GlobalOptions {
  socket?: string;
}

/**
 * A profile name as the daemon takes it: the rule of shared/profiles.ts, repeated here so that
 * parsing arguments (and `--help`) loads no zod. test/profiles-client.test.ts keeps them equal.
 */
export const PROFILE_NAME_RULE = /^[a-z0-9][a-z0-9_-]{0,62}$/;

/** Commander parser for a profile name. */
export function parseProfileName(value: string): string {
  if (!PROFILE_NAME_RULE.test(value)) {
    throw new InvalidArgumentError('a profile name is 1-63 characters: lower-case letters, digits, "_" and "-", starting with a letter or digit.');
  }
  return value;
}

/** Adds `--profile <name>` to a command. */
export function profileOption(cmd: Command, what = 'the profile'): Command {
  return cmd.option('--profile <name>', `${what} (default: $QWEN_TOKEND_PROFILE, else the daemon's default profile)`, parseProfileName);
}

/** `{ profile }` for a library call when `--profile` was given, else nothing (the client's default). */
export function profileArg(profile: string | undefined): { profile?: string } {
  return profile === undefined ? {} : { profile };
}

/** The environment a command runs with: `--socket` wins over `QWEN_TOKEND_SOCKET`. */
export function commandEnv(globals: GlobalOptions, base: NodeJS.ProcessEnv = process.env): NodeJS.ProcessEnv {
  const env = { ...base };
  if (globals.socket !== undefined) env.QWEN_TOKEND_SOCKET = globals.socket;
  return env;
}

/** The resolved configuration; throws `QwenConfigError` naming the bad variable. */
export function commandConfig(env: NodeJS.ProcessEnv): TokendConfig {
  return resolveConfig(env, { platform: process.platform });
}

export interface OpenClientOptions {
  /** Force autostart off (read-only commands such as status and doctor never start a daemon). */
  autostart?: boolean;
  /** How long one request may wait (default: the client's 30 s, a refresh may be running). */
  requestTimeoutMs?: number;
}

/**
 * A TokenClient for one command. When no daemon will be started for us, waiting the library's
 * full reconnect window would only delay "daemon unreachable", so the CLI waits briefly.
 */
export async function openClient(env: NodeJS.ProcessEnv, options: OpenClientOptions = {}): Promise<TokenClient> {
  const config = commandConfig(env);
  // Loaded on use: the client pulls in zod, which `--help` and usage errors do not need.
  const { TokenClient } = await import('../token-client.js');
  const autostart = options.autostart ?? config.autostart;
  const willStart = autostart && !serviceInstalled(config.home);
  return new TokenClient({
    env,
    autostart,
    reconnectWindowMs: willStart ? 10_000 : 1_000,
    ...(options.requestTimeoutMs === undefined ? {} : { requestTimeoutMs: options.requestTimeoutMs }),
  });
}

/** True when `err` says that no daemon runs at all (no socket, or nobody listening on it). */
export function daemonNotRunning(err: unknown): boolean {
  if (!(err instanceof QwenDaemonUnavailableError)) return false;
  const code = errnoCode(err.cause);
  return code === 'ENOENT' || code === 'ECONNREFUSED';
}

/** How to start the daemon, in commands that work here (see shared/cli-command.ts). */
export function startAdvice(config: TokendConfig): string {
  if (serviceInstalled(config.home)) {
    return process.platform === 'darwin'
      ? `the service is installed but not running; see \`${cliCommand('service status')}\``
      : 'the service is installed but not running; run `systemctl --user start qwen-tokend`';
  }
  const foreground = `run \`${daemonCommand()}\` in the foreground`;
  if (!config.autostart) return `${foreground}, or \`${cliCommand('service install')}\` to run it as a service (autostart is off)`;
  // Not `login`: for someone logged in already, that would start a needless device flow.
  return `it starts on the first token request (\`${cliCommand('token')}\`, \`${cliCommand('login')}\`, a library call); or ${foreground}`;
}

/** Runs `fn` with a client and always closes it, so the process can exit at once. */
export async function withClient<T>(env: NodeJS.ProcessEnv, fn: (client: TokenClient) => Promise<T>, options?: OpenClientOptions): Promise<T> {
  const client = await openClient(env, options);
  try {
    return await fn(client);
  } finally {
    await client.close();
  }
}

/** Writes text to stdout. */
export function out(text: string): void {
  process.stdout.write(text);
}

/** Writes one JSON document as one line to stdout. */
export function outJson(value: unknown): void {
  process.stdout.write(`${JSON.stringify(value)}\n`);
}

/** Writes one line to stderr. */
export function note(text: string): void {
  process.stderr.write(`${text}\n`);
}

/** True when output goes to a person at a terminal (no CI, not piped). */
export function interactive(env: NodeJS.ProcessEnv = process.env): boolean {
  return process.stdout.isTTY === true && !('CI' in env) && env.TERM !== 'dumb';
}

/** Collapses a message to one line: errors are read in terminals and grepped in logs. */
function oneLine(text: string): string {
  return text.replace(/\s*\n\s*/g, ' ').trim();
}

/** Prints `qwen-token: <message>` (and a hint line) to stderr; never a stack trace. */
export function reportError(err: unknown): void {
  const message = errorText(err);
  note(`qwen-token: ${oneLine(message) || (err instanceof QwenError ? err.code : 'unexpected error')}`);
  const hint = hintFor(err);
  if (hint) note(`hint: ${hint}`);
}

/** Resolves once everything written so far to stdout and stderr has been handed to the OS. */
export function flushOutput(): Promise<void> {
  const drain = (stream: NodeJS.WriteStream) =>
    new Promise<void>((done) => {
      if (stream.destroyed || !stream.writable) return done();
      stream.write('', () => done());
    });
  return Promise.all([drain(process.stdout), drain(process.stderr)]).then(() => undefined);
}
