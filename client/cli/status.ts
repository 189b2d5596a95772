/**
 * `qwen-token status`: what the daemon reports, for a person (default) or a script (`--json`).
 */
import { Command } from 'commander';
import { cliCommand } from '../../shared/cli-command.js';
import type { ProfileInfo } from '../../shared/profiles.js';
import type { StatusResult } from '../../shared/protocol.js';
import { commandConfig, commandEnv, daemonNotRunning, out, outJson, profileArg, profileOption, startAdvice, withClient, type GlobalOptions } from './context.js';
import { describeExpiry, formatDuration, formatRelative } from './duration.js';
import { CommandExit, ExitCodes } from './exit-codes.js';
import { formatGatewayRows } from './gateway-format.js';

/** `qwen-token <sub>`, naming the profile unless it is the daemon's default. */
function commandFor(sub: string, s: Pick<StatusResult, 'profile' | 'default_profile'>): string {
  const named = s.profile !== undefined && s.profile !== s.default_profile ? ` --profile ${s.profile}` : '';
  return cliCommand(`${sub}${named}`);
}

function stateText(s: StatusResult): string {
  switch (s.state) {
    case 'no_credentials':
      return s.kind === 'api-key'
        ? `no key stored (run \`${cliCommand(`profile add ${s.profile ?? ''} --replace`)}\`)`
        : `not logged in yet (run \`${commandFor('login', s)}\`)`;
    case 'retrying':
      return 'retrying (the last refresh failed)';
    case 'expired':
      return 'expired (refreshing fails)';
    case 'needs_login':
      return `needs login (run \`${commandFor('login', s)}\`)`;
    case 'static':
      return 'static (an API key: no expiry, nothing to refresh)';
    default:
      return s.state;
  }
}

/** Two aligned columns, as `status` prints them. */
function table(rows: Array<[string, string]>): string {
  const width = Math.max(...rows.map(([label]) => label.length));
  return `${rows.map(([label, value]) => `${label.padEnd(width)}  ${value}`).join('\n')}\n`;
}

/** A profile's expiry as one word or phrase: `static`, `expires in 5h`, `none`. */
function expiryText(state: string, expiry: number | null, now: number): string {
  if (state === 'static') return 'static';
  return expiry === null ? 'none' : describeExpiry(expiry, now);
}

/**
 * One line per profile (`*` marks the default): name, kind, state, expiry (`static` for a key),
 * and with `baseUrl` the API base URL; as `status` and `profile list` print them. Never a secret.
 */
export function formatProfileLines(profiles: readonly ProfileInfo[], now: number, options: { baseUrl?: boolean } = {}): string {
  if (profiles.length === 0) return '';
  const rows = profiles.map((p) => [
    p.default ? '*' : ' ',
    p.name,
    p.kind,
    p.state,
    expiryText(p.state, p.expiry_date, now),
    options.baseUrl ? (p.base_url ?? '') : '',
  ]);
  const width = (i: number) => Math.max(...rows.map((r) => r[i]!.length));
  const cols = [width(1), width(2), width(3), width(4)];
  return `${rows
    .map((r) => `${r[0]} ${r[1]!.padEnd(cols[0]!)}  ${r[2]!.padEnd(cols[1]!)}  ${r[3]!.padEnd(cols[2]!)}  ${r[4]!.padEnd(cols[3]!)}  ${r[5]}`.trimEnd())
    .join('\n')}\n`;
}

export interface FormatStatusOptions {
  /** Add the one-line-per-profile list after the rows (`status` without `--profile`). */
  profiles?: boolean;
}

/** The human-readable status, times relative to the daemon's own clock. Never holds a token or key. */
export function formatStatus(s: StatusResult, options: FormatStatusOptions = {}): string {
  const now = s.now;
  const qwenOAuth = s.kind === undefined || s.kind === 'qwen-oauth';
  const isKey = s.kind === 'api-key';
  const info = s.profiles?.find((p) => p.name === s.profile);
  const rows: Array<[string, string]> = [];
  // Named unless it is the built-in Qwen profile as the default: then the rows read as they always have.
  if (s.profile !== undefined && !(qwenOAuth && s.profile === s.default_profile)) {
    rows.push(['profile', `${s.profile} (${s.kind ?? 'qwen-oauth'}${s.profile === s.default_profile ? ', the default' : ''})`]);
  }
  rows.push(['state', stateText(s)]);
  if (isKey) {
    rows.push(['key', s.token_fingerprint === 'none' ? 'none' : `fingerprint ${s.token_fingerprint}`]);
  } else {
    rows.push(
      ['token', s.expiry_date === null ? 'none' : describeExpiry(s.expiry_date, now)],
      ['fingerprint', s.expiry_date === null ? 'none' : `${s.token_fingerprint} (refresh token ${s.refresh_token_fingerprint})`],
      ['next refresh', s.next_refresh_at === null ? 'none scheduled' : formatRelative(s.next_refresh_at, now)],
      ['last refresh', s.last_refresh_at === null ? 'never' : formatRelative(s.last_refresh_at, now)],
    );
  }
  rows.push(['last error', s.last_error === null ? 'none' : `${s.last_error.message} [${s.last_error.code}] (${formatRelative(s.last_error.at, now)})`]);
  if (!isKey) rows.push(['retry count', String(s.retry_count)]);
  if (qwenOAuth) {
    rows.push(
      ['source file', s.source_file ?? 'none'],
      ['token file', s.token_path],
      ['Qwen CLI link', s.qwen_cli_link.enabled ? `on (${s.qwen_cli_link.path})` : 'off'],
    );
  } else {
    rows.push(['files', info && info.files.length > 0 ? info.files.join(', ') : 'none']);
    if (info?.base_url) rows.push(['base URL', info.base_url]);
  }
  if (!isKey) rows.push(['login', s.login_in_progress ? 'in progress' : 'not running']);
  rows.push(
    ['daemon', `pid ${s.pid}, version ${s.version}, protocol ${s.protocol}, up ${formatDuration(s.uptime_ms)}`],
    ['clients', `${s.connected_clients} connected, ${s.requests_served} requests served`],
    ['socket', s.socket_path],
  );
  if (s.config_path !== undefined) {
    rows.push(['config', s.config_error ? `${s.config_path}: not applied: ${s.config_error} (the previous settings stay)` : s.config_path]);
  }
  if (s.gateway) rows.push(...formatGatewayRows(s.gateway));
  let text = table(rows);
  if (options.profiles && s.profiles && s.profiles.length > 0) {
    text += `\nprofiles (* default):\n${formatProfileLines(s.profiles, now)}`;
  }
  return text;
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
  const cmd = new Command('status')
    .description('show the daemon and token state, and one line per profile (never a token or key)')
    .option('--json', 'print the status object as JSON');
  return profileOption(cmd, 'show this profile in detail')
    .action(async (opts: { json?: boolean; profile?: string }, cmd: Command) => {
      const env = commandEnv(cmd.optsWithGlobals<GlobalOptions>());
      // Read-only: never autostart. A daemon started as a side effect of looking would keep
      // running (and logging) long after the question was answered.
      let status: StatusResult;
      try {
        status = await withClient(env, (client) => client.status(profileArg(opts.profile)), { autostart: false });
      } catch (err) {
        if (!daemonNotRunning(err)) throw err;
        const config = commandConfig(env);
        const advice = startAdvice(config);
        if (opts.json) outJson({ running: false, socket_path: config.socketPath, start: advice });
        else out(formatNotRunning(config.socketPath, advice));
        throw new CommandExit(ExitCodes.daemonUnavailable);
      }
      if (opts.json) outJson(status);
      else out(formatStatus(status, { profiles: opts.profile === undefined }));
    });
}
