/**
 * `qwen-token gateway enable|disable|status|env`: the daemon's HTTP gateway. Every command
 * asks the daemon (which owns the listener, the config file and the key); none starts one.
 */
import { Command, InvalidArgumentError } from 'commander';
import type { z } from 'zod';
import { QwenDaemonUnavailableError, QwenProtocolError } from '../../shared/errors.js';
import type { GatewayEnvResult, GatewayStatus } from '../../shared/gateway-protocol.js';
import type { DaemonConnection } from '../daemon-connection.js';
import { commandConfig, commandEnv, out, outJson, parseProfileName, withClient, type GlobalOptions } from './context.js';
import { formatGatewayRows } from './gateway-format.js';
import { errorText } from '../../shared/diagnostics.js';

const CALL_TIMEOUT_MS = 10_000;

type Protocol = typeof import('../../shared/gateway-protocol.js');

/**
 * Calls one gateway method on the daemon and checks the answer's shape. The protocol module
 * (and zod with it) is loaded on use, as for the other commands: `--help` does not need it.
 */
async function callDaemon<S extends z.ZodType>(
  cmd: Command,
  method: (p: Protocol) => string,
  params: unknown,
  schemaOf: (p: Protocol) => S,
): Promise<z.output<S>> {
  const protocol = await import('../../shared/gateway-protocol.js');
  const { DaemonConnection } = await import('../daemon-connection.js');
  return callWith(DaemonConnection, cmd, method(protocol), params, schemaOf(protocol));
}

async function callWith<S extends z.ZodType>(
  Connection: typeof DaemonConnection,
  cmd: Command,
  method: string,
  params: unknown,
  schema: S,
): Promise<z.output<S>> {
  const config = commandConfig(commandEnv(cmd.optsWithGlobals<GlobalOptions>()));
  let connection: DaemonConnection;
  try {
    connection = await Connection.open({ socketPath: config.socketPath }, CALL_TIMEOUT_MS);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code ?? errorText(err);
    throw new QwenDaemonUnavailableError(`qwen-tokend is not reachable at ${config.socketPath} (${code}); start it with \`qwen-tokend\` or \`qwen-token service install\``);
  }
  try {
    const result = schema.safeParse(await connection.call(method, params, CALL_TIMEOUT_MS));
    if (!result.success) throw new QwenProtocolError(`qwen-tokend answered "${method}" with an unexpected shape; is the daemon older than this CLI? Restart it.`);
    return result.data;
  } finally {
    connection.close();
  }
}

function formatRows(rows: Array<[string, string]>): string {
  const width = Math.max(...rows.map(([label]) => label.length));
  return `${rows.map(([label, value]) => `${label.padEnd(width)}  ${value}`).join('\n')}\n`;
}

function parsePort(value: string): number {
  if (!/^\d+$/.test(value) || Number(value) > 65535) throw new InvalidArgumentError('a port is a whole number from 0 to 65535');
  return Number(value);
}

/** The gateway's base URL for one profile: `http://127.0.0.1:8417/v1` → `http://127.0.0.1:8417/p/NAME/v1`. */
export function profileBaseUrl(baseUrl: string, profile: string): string {
  const url = new URL(baseUrl);
  const prefix = url.pathname.replace(/\/v1\/?$/, '').replace(/\/+$/, '');
  return `${url.origin}${prefix}/p/${profile}/v1`;
}

/** Fails with QwenProfileNotFoundError (exit 6) unless the daemon has the profile. */
async function requireProfile(cmd: Command, profile: string): Promise<void> {
  const env = commandEnv(cmd.optsWithGlobals<GlobalOptions>());
  const list = await withClient(env, (client) => client.listProfiles(), { autostart: false });
  if (list.profiles.some((p) => p.name === profile)) return;
  const { QwenProfileNotFoundError } = await import('../../shared/errors.js');
  throw new QwenProfileNotFoundError(`there is no profile "${profile}"; the profiles are: ${list.profiles.map((p) => p.name).join(', ')}`);
}

/** The `gateway` command group. */
export function gatewayCommand(): Command {
  const gateway = new Command('gateway').description('the local OpenAI-compatible HTTP gateway (a Unix socket always; loopback TCP when enabled)');

  gateway
    .command('enable')
    .description('listen on 127.0.0.1 too (kept in the config file; makes the gateway key the first time)')
    .option('--port <n>', 'the loopback port (default 8417; 0 picks a free one)', parsePort)
    .option('--json', 'print the gateway status as JSON')
    .action(async (opts: { port?: number; json?: boolean }, cmd: Command) => {
      const status = await callDaemon(cmd, (p) => p.GatewayMethods.enable, opts.port === undefined ? {} : { port: opts.port }, (p) => p.GatewayStatus);
      if (opts.json) return outJson(status);
      out(`Gateway listening on http://${status.tcp.address}/v1 (and ${status.socket_path}).\nUse it from a shell: eval "$(qwen-token gateway env)"\n`);
    });

  gateway
    .command('disable')
    .description('stop listening on TCP (the Unix socket stays)')
    .option('--json', 'print the gateway status as JSON')
    .action(async (opts: { json?: boolean }, cmd: Command) => {
      const status = await callDaemon(cmd, (p) => p.GatewayMethods.disable, {}, (p) => p.GatewayStatus);
      if (opts.json) return outJson(status);
      out(`Gateway TCP off; the Unix socket ${status.socket_path} stays.\n`);
    });

  gateway
    .command('status')
    .description("show the gateway's addresses and counters (never the key)")
    .option('--json', 'print the gateway status as JSON')
    .action(async (opts: { json?: boolean }, cmd: Command) => {
      const status = await callDaemon(cmd, (p) => p.GatewayMethods.status, {}, (p) => p.GatewayStatus);
      if (opts.json) return outJson(status);
      out(formatRows(formatGatewayRows(status)));
    });

  gateway
    .command('env')
    .description('print OPENAI_BASE_URL and OPENAI_API_KEY for a shell: eval "$(qwen-token gateway env)"')
    .option('--plain', 'print NAME=value lines without `export` (for env files)')
    .option('--profile <name>', "a base URL that serves this profile (/p/NAME/v1) instead of the daemon's default", parseProfileName)
    .action(async (opts: { plain?: boolean; profile?: string }, cmd: Command) => {
      if (opts.profile !== undefined) await requireProfile(cmd, opts.profile);
      const env = await callDaemon(cmd, (p) => p.GatewayMethods.env, {}, (p) => p.GatewayEnvResult);
      const prefix = opts.plain ? '' : 'export ';
      const baseUrl = opts.profile === undefined ? env.base_url : profileBaseUrl(env.base_url, opts.profile);
      out(`${prefix}OPENAI_BASE_URL=${baseUrl}\n${prefix}OPENAI_API_KEY=${env.api_key}\n`);
    });

  return gateway;
}
