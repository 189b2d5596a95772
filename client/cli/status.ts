/**
 * `qwen-token status`: what the daemon reports, for a person (default) or a script (`--json`).
 */
import { Command } from 'commander';
import { cliCommand } from '../../shared/cli-command.js';
import type { StatusResult } from '../../shared/protocol.js';
import { commandConfig, commandEnv, daemonNotRunning, out, outJson, startAdvice, withClient, type GlobalOptions } from './context.js';
import { describeExpiry, formatDuration, formatRelative } from './duration.js';
import { CommandExit, ExitCodes } from './exit-codes.js';
import { formatGatewayRows } from './gateway-format.js';

function stateText(state: StatusResult['state']): string {
  switch (state) {
    case 'no_credentials':
      return `not logged in yet (run \`${cliCommand('login')}\`)`;
    case 'retrying':
      return 'retrying (the last refresh failed)';
    case 'expired':
      return 'expired (refreshing fails)';
    case 'needs_login':
      return `needs login (run \`${cliCommand('login')}\`)`;
    default:
      return state;
  }
}

/** Two aligned columns, as `status` prints them. */
function table(rows: Array<[string, string]>): string {
  const width = Math.max(...rows.map(([label]) => label.length));
  return `${rows.map(([label, value]) => `${label.padEnd(width)}  ${value}`).join('\n')}\n`;
}

/** The human-readable status, times relative to the daemon's own clock. Never holds a token. */
export function formatStatus(s: StatusResult): string {
  const now = s.now;
  const rows: Array<[string, string]> = [
    ['state', stateText(s.state)],
    ['token', s.expiry_date === null ? 'none' : describeExpiry(s.expiry_date, now)],
    ['fingerprint', s.expiry_date === null ? 'none' : `${s.token_fingerprint} (refresh token ${s.refresh_token_fingerprint})`],
    ['next refresh', s.next_refresh_at === null ? 'none scheduled' : formatRelative(s.next_refresh_at, now)],
    ['last refresh', s.last_refresh_at === null ? 'never' : formatRelative(s.last_refresh_at, now)],
    [
      'last error',
      s.last_error === null ? 'none' : `${s.last_error.message} [${s.last_error.code}] (${formatRelative(s.last_error.at, now)})`,
    ],
    ['retry count', String(s.retry_count)],
    ['source file', s.source_file ?? 'none'],
    ['token file', s.token_path],
    ['Qwen CLI link', s.qwen_cli_link.enabled ? `on (${s.qwen_cli_link.path})` : 'off'],
    ['login', s.login_in_progress ? 'in progress' : 'not running'],
    ['daemon', `pid ${s.pid}, version ${s.version}, protocol ${s.protocol}, up ${formatDuration(s.uptime_ms)}`],
    ['clients', `${s.connected_clients} connected, ${s.requests_served} requests served`],
    ['socket', s.socket_path],
    ...(s.gateway ? formatGatewayRows(s.gateway) : []),
  ];
  return table(rows);
}

/** What `status` says when no daemon runs: that, and how to start one. */
export function formatNotRunning(socketPath: string, advice: string): string {
  return table([
    ['daemon', `not running (nothing listens on ${socketPath})`],
    ['start', advice],
  ]);
}

/** The `status` command. */
export function statusCommand(): Command {
  return new Command('status')
    .description('show the daemon and token state (never the token itself)')
    .option('--json', 'print the status object as JSON')
    .action(async (opts: { json?: boolean }, cmd: Command) => {
      const env = commandEnv(cmd.optsWithGlobals<GlobalOptions>());
      // Read-only: never autostart. A daemon started as a side effect of looking would keep
      // running (and logging) long after the question was answered.
      let status: StatusResult;
      try {
        status = await withClient(env, (client) => client.status(), { autostart: false });
      } catch (err) {
        if (!daemonNotRunning(err)) throw err;
        const config = commandConfig(env);
        const advice = startAdvice(config);
        if (opts.json) outJson({ running: false, socket_path: config.socketPath, start: advice });
        else out(formatNotRunning(config.socketPath, advice));
        throw new CommandExit(ExitCodes.daemonUnavailable);
      }
      if (opts.json) outJson(status);
      else out(formatStatus(status));
    });
}
