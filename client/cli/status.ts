/**
 * `qwen-token status`: what the daemon reports, for a person (default) or a script (`--json`).
 */
import { Command } from 'commander';
import type { StatusResult } from '../../shared/protocol.js';
import { commandEnv, out, outJson, withClient, type GlobalOptions } from './context.js';
import { describeExpiry, formatDuration, formatRelative } from './duration.js';
import { formatGatewayRows } from './gateway-format.js';

const STATE_TEXT: Record<StatusResult['state'], string> = {
  no_credentials: 'no credentials (run `qwen-token login`)',
  valid: 'valid',
  refreshing: 'refreshing',
  retrying: 'retrying (the last refresh failed)',
  expired: 'expired (refreshing fails)',
  needs_login: 'needs login (run `qwen-token login`)',
};

/** The human-readable status, times relative to the daemon's own clock. Never holds a token. */
export function formatStatus(s: StatusResult): string {
  const now = s.now;
  const rows: Array<[string, string]> = [
    ['state', STATE_TEXT[s.state] ?? s.state],
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
  const width = Math.max(...rows.map(([label]) => label.length));
  return `${rows.map(([label, value]) => `${label.padEnd(width)}  ${value}`).join('\n')}\n`;
}

/** The `status` command. */
export function statusCommand(): Command {
  return new Command('status')
    .description('show the daemon and token state (never the token itself)')
    .option('--json', 'print the status object as JSON')
    .action(async (opts: { json?: boolean }, cmd: Command) => {
      const env = commandEnv(cmd.optsWithGlobals<GlobalOptions>());
      const status = await withClient(env, (client) => client.status());
      if (opts.json) outJson(status);
      else out(formatStatus(status));
    });
}
