/**
 * `qwen-token profile add|list|show|remove|default`: the daemon's credential profiles. Every
 * command asks the daemon (which owns the config file and the secret files). A key or client
 * secret is read from `--key-env VAR`, standard input or a hidden prompt, never from argv.
 */
import { lstat } from 'node:fs/promises';
import { Command, InvalidArgumentError, Option } from 'commander';
import { cliCommand } from '../../shared/cli-command.js';
import { TOKEN_ENDPOINT_AUTH_METHODS, TOKEN_LIFETIME_S, type ProfileInfo, type ProfileSettings } from '../../shared/profiles.js';
import type { TokenClient } from '../token-client.js';
import { commandEnv, note, out, outJson, parseProfileName, withClient, type GlobalOptions } from './context.js';
import { describeExpiry, formatRelative } from './duration.js';
import { ExitCodes } from './exit-codes.js';
import { formatProfileLines } from './status.js';
import { errorText } from '../../shared/diagnostics.js';

/** The built-in profile (shared/profiles.ts DEFAULT_PROFILE; repeated so that `--help` loads no zod). */
const BUILTIN = 'qwen';

export interface ProfileAddOptions {
  preset?: string;
  region?: string;
  kind?: string;
  baseUrl?: string;
  auth?: string;
  issuer?: string;
  deviceAuthorizationEndpoint?: string;
  tokenEndpoint?: string;
  clientId?: string;
  scope?: string;
  audience?: string;
  resource?: string;
  /** False with `--no-pkce`. */
  pkce: boolean;
  refreshLead?: number;
  tokenLifetime?: number;
  clientSecret?: boolean;
  tokenAuthMethod?: string;
  keyEnv?: string;
  description?: string;
  replace?: boolean;
  default?: boolean;
  /** False with `--no-verify`. */
  verify: boolean;
  json?: boolean;
}

/** Options that belong to one kind, by the flag a person types. */
const OAUTH_ONLY = {
  issuer: '--issuer',
  deviceAuthorizationEndpoint: '--device-authorization-endpoint',
  tokenEndpoint: '--token-endpoint',
  clientId: '--client-id',
  scope: '--scope',
  audience: '--audience',
  resource: '--resource',
  refreshLead: '--refresh-lead',
  tokenLifetime: '--token-lifetime',
  clientSecret: '--client-secret',
  tokenAuthMethod: '--token-auth-method',
} as const;
const KEY_ONLY = { auth: '--auth', region: '--region' } as const;

function usage(cmd: Command, message: string): never {
  cmd.error(message, { exitCode: ExitCodes.usage, code: 'commander.error' });
}

/** A parser for a whole number of seconds from `min` to `max`. */
function seconds(min: number, max: number): (value: string) => number {
  return (value) => {
    if (!/^\d+$/.test(value) || Number(value) < min || Number(value) > max) throw new InvalidArgumentError(`a whole number of seconds from ${min} to ${max}.`);
    return Number(value);
  };
}

/** The kind a command line asks for: `--preset` makes an api-key profile. */
function requestedKind(opts: ProfileAddOptions): string | undefined {
  return opts.kind ?? (opts.preset === undefined ? undefined : 'api-key');
}

/** Flags given that do not apply to `kind`. */
function misplacedFlags(opts: ProfileAddOptions, kind: string): string[] {
  const given = (table: Record<string, string>) => Object.entries(table).filter(([key]) => (opts as unknown as Record<string, unknown>)[key] !== undefined).map(([, flag]) => flag);
  if (kind === 'api-key') return [...given(OAUTH_ONLY), ...(opts.pkce ? [] : ['--no-pkce'])];
  if (kind === 'oauth-device') return given(KEY_ONLY);
  return [];
}

/** The settings fields the command line sets for `kind`, and only those (for a new profile, or over an existing one's). */
function settingsFromFlags(opts: ProfileAddOptions, kind: string): Record<string, unknown> {
  const fields: Record<string, unknown> = {};
  const set = (key: string, value: unknown) => {
    if (value !== undefined) fields[key] = value;
  };
  set('base_url', opts.baseUrl);
  set('description', opts.description);
  if (kind === 'api-key') {
    set('auth', opts.auth);
  } else if (kind === 'oauth-device') {
    set('issuer', opts.issuer);
    set('device_authorization_endpoint', opts.deviceAuthorizationEndpoint);
    set('token_endpoint', opts.tokenEndpoint);
    set('client_id', opts.clientId);
    set('scope', opts.scope);
    set('audience', opts.audience);
    set('resource', opts.resource);
    set('refresh_lead_seconds', opts.refreshLead);
    set('token_lifetime_seconds', opts.tokenLifetime);
    set('token_endpoint_auth_method', opts.tokenAuthMethod);
    if (!opts.pkce) fields.pkce = false;
  }
  return fields;
}

/** What the profile's secret is called in prompts and messages. */
function secretName(kind: string, name: string): string {
  return kind === 'api-key' ? `API key for profile "${name}"` : `client secret for profile "${name}"`;
}

function originOf(url: string): string {
  try {
    return new URL(url).origin;
  } catch {
    return url;
  }
}

/** One line about a profile after `profile add`. */
function addedText(info: ProfileInfo, replaced: boolean): string {
  const lines = [
    `${replaced ? 'Replaced' : 'Added'} profile ${info.name} (${info.kind}${info.base_url ? `, ${info.base_url}` : ''}${
      info.has_secret && info.secret_fingerprint !== 'none' ? `; secret ${info.secret_fingerprint}` : ''
    }).${info.default ? ' It is the default profile.' : ''}`,
  ];
  if (info.kind === 'oauth-device') lines.push(`Log in: ${cliCommand(`login --profile ${info.name}`)}`);
  lines.push(`Use it: ${cliCommand(`token --profile ${info.name}`)}, or QWEN_TOKEND_PROFILE=${info.name} for programs.`);
  return `${lines.join('\n')}\n`;
}

/** The hint after a refused key: which preset and region a key belongs to. */
const PLAN_HINT =
  'a key works only with the base URL of its own plan and region: a Coding Plan key (sk-sp-…) needs --preset coding-plan ' +
  '(--region intl or cn), a pay-as-you-go Model Studio key --preset dashscope with the region it was made in ' +
  '(--region singapore, beijing, us-virginia or hongkong); another endpoint goes in --base-url';

async function runAdd(name: string, opts: ProfileAddOptions, cmd: Command): Promise<void> {
  if (name === BUILTIN) usage(cmd, `"${BUILTIN}" is the built-in Qwen OAuth profile; its settings come from the environment (QWEN_OAUTH_*). Pick another name.`);
  if (opts.kind === 'qwen-oauth') usage(cmd, `--kind qwen-oauth is the built-in profile "${BUILTIN}"; add api-key or oauth-device profiles`);
  if (opts.preset !== undefined && opts.kind !== undefined && opts.kind !== 'api-key') usage(cmd, '--preset makes an api-key profile; drop --kind, or drop --preset');
  if (opts.region !== undefined && opts.preset === undefined) usage(cmd, '--region goes with --preset (for another endpoint, give --base-url)');
  const kindAsked = requestedKind(opts);
  if (kindAsked === undefined && !opts.replace) usage(cmd, 'give --preset coding-plan|dashscope, or --kind api-key|oauth-device (see `qwen-token profile add --help`)');
  if (kindAsked !== undefined) {
    const misplaced = misplacedFlags(opts, kindAsked);
    if (misplaced.length > 0) usage(cmd, `${misplaced.join(', ')} ${misplaced.length === 1 ? 'does' : 'do'} not apply to ${kindAsked} profiles`);
  }

  const env = commandEnv(cmd.optsWithGlobals<GlobalOptions>());
  const profiles = await import('../../shared/profiles.js');
  const { describeIssues } = await import('../../shared/diagnostics.js');
  const { QwenProfileNotFoundError, QwenCredentialRejectedError, QwenError } = await import('../../shared/errors.js');

  await withClient(env, async (client: TokenClient) => {
    const list = await client.listProfiles();
    const existing = list.profiles.find((p) => p.name === name);
    if (existing && !opts.replace) {
      throw new QwenError(`profile "${name}" exists already (${existing.kind}); add --replace to replace its settings and secret`);
    }
    if (!existing && kindAsked === undefined) {
      throw new QwenProfileNotFoundError(`there is no profile "${name}" to replace; to add it, give --preset or --kind`);
    }

    // The settings: a preset's or the existing profile's, with the flags over them.
    const kind = kindAsked ?? existing!.kind;
    const misplaced = misplacedFlags(opts, kind);
    if (misplaced.length > 0) usage(cmd, `${misplaced.join(', ')} ${misplaced.length === 1 ? 'does' : 'do'} not apply to ${kind} profiles`);
    // `profiles.list` shows whether a client secret is stored beside the settings; it is not a setting.
    const { has_client_secret: storedSecret, ...stored } = (existing?.settings ?? {}) as Record<string, unknown>;
    let base: Record<string, unknown> = { kind };
    if (opts.preset !== undefined) {
      try {
        base = { ...profiles.presetSettings(opts.preset, opts.region) };
      } catch (err) {
        usage(cmd, errorText(err));
      }
    } else if (kindAsked === undefined) {
      base = { ...stored, kind };
    }
    const parsed = profiles.ProfileSettingsSchema.safeParse({ ...base, ...settingsFromFlags(opts, kind) });
    if (!parsed.success) usage(cmd, `the settings of profile "${name}" are not valid: ${describeIssues(parsed.error)}`);
    const settings: ProfileSettings = parsed.data;

    // The secret: a key always; a client secret when asked for.
    const wantsSecret = settings.kind === 'api-key' || opts.clientSecret === true || opts.keyEnv !== undefined;
    const keepsSecret = kindAsked === undefined && storedSecret === true;
    if (settings.kind === 'oauth-device' && settings.token_endpoint_auth_method !== undefined && !wantsSecret && !keepsSecret) {
      usage(cmd, `token_endpoint_auth_method is how a client secret is sent; give --client-secret too (a client without one sends none)`);
    }
    let secret: string | undefined;
    if (wantsSecret) {
      const { readSecret } = await import('./secret-input.js');
      secret = await readSecret({ what: secretName(settings.kind, name), keyEnv: opts.keyEnv, env: process.env });
    }

    if (settings.kind === 'api-key' && opts.verify) {
      const { checkApiKey, modelsUrl } = await import('./verify-key.js');
      const url = modelsUrl(settings.base_url);
      const check = await checkApiKey(settings.base_url, settings.auth ?? 'bearer', secret!);
      switch (check.outcome) {
        case 'accepted':
          note(`Checked the key: ${originOf(url)} accepted it${check.models === undefined ? '' : ` (${check.models} model${check.models === 1 ? '' : 's'} listed)`}.`);
          break;
        case 'rejected':
          throw new QwenCredentialRejectedError(
            `${originOf(url)} refused the key for profile "${name}" (GET ${url}: HTTP ${check.status}${check.message ? `: ${check.message}` : ''}); nothing was stored. Hint: ${PLAN_HINT}`,
          );
        case 'unreachable':
          throw new QwenError(
            `could not reach ${url} to check the key for profile "${name}" (${check.reason}); nothing was stored. ` +
              'Check the base URL and the network, or add the profile unchecked with --no-verify',
          );
        case 'other':
          note(
            `Could not confirm the key: GET ${url} answered HTTP ${check.status}${check.message ? ` (${check.message})` : ''}` +
              `${check.status === 404 ? ', so this endpoint may offer no model list' : ''}. Storing it unchecked.`,
          );
          break;
      }
    }

    const result = await client.addProfile({
      name,
      settings,
      ...(secret === undefined ? {} : { secret }),
      ...(opts.replace ? { replace: true } : {}),
      ...(opts.default ? { makeDefault: true } : {}),
    });
    if (opts.json) outJson(result);
    else out(addedText(result.profile, result.replaced));
  });
}

/** A file's mode as `0600`, or why it could not be seen. */
async function fileMode(path: string): Promise<string> {
  try {
    const st = await lstat(path);
    return `mode ${(st.mode & 0o777).toString(8).padStart(4, '0')}`;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'ENOENT' ? 'not there' : `cannot inspect: ${(err as NodeJS.ErrnoException).code ?? 'error'}`;
  }
}

function settingText(value: unknown): string {
  return typeof value === 'string' ? value : JSON.stringify(value);
}

/** `profile show`'s rows: settings, state, secret fingerprint and files; never a secret. */
export async function formatProfile(info: ProfileInfo, now: number): Promise<string> {
  const rows: Array<[string, string]> = [
    ['name', `${info.name}${info.builtin ? ' (built in)' : ''}${info.default ? ', the default profile' : ''}`],
    ['kind', info.kind],
    ['state', info.state],
    ['expiry', info.state === 'static' ? 'static (no expiry)' : info.expiry_date === null ? 'none' : describeExpiry(info.expiry_date, now)],
  ];
  if (info.next_refresh_at !== null) rows.push(['next refresh', formatRelative(info.next_refresh_at, now)]);
  if (info.base_url) rows.push(['base URL', info.base_url]);
  for (const [key, value] of Object.entries(info.settings)) {
    if (key === 'kind' || key === 'base_url' || value === undefined) continue;
    rows.push([`setting ${key}`, settingText(value)]);
  }
  rows.push(['secret', info.has_secret ? `present, fingerprint ${info.secret_fingerprint}` : 'none']);
  const files = await Promise.all(info.files.map(async (f) => `${f} (${await fileMode(f)})`));
  rows.push(['files', files.length === 0 ? 'none' : files.join('\n')]);
  rows.push(['last error', info.last_error ? `${info.last_error.message} [${info.last_error.code}] (${formatRelative(info.last_error.at, now)})` : 'none']);
  const width = Math.max(...rows.map(([label]) => label.length));
  return `${rows.map(([label, value]) => `${label.padEnd(width)}  ${value.split('\n').join(`\n${' '.repeat(width + 2)}`)}`).join('\n')}\n`;
}

async function findProfile(client: TokenClient, name: string): Promise<{ info: ProfileInfo; now: number; configPath: string }> {
  const list = await client.listProfiles();
  const info = list.profiles.find((p) => p.name === name);
  if (!info) {
    const { QwenProfileNotFoundError } = await import('../../shared/errors.js');
    throw new QwenProfileNotFoundError(`there is no profile "${name}"; the profiles are: ${list.profiles.map((p) => p.name).join(', ')}`);
  }
  return { info, now: Date.now(), configPath: list.config_path };
}

/** The `profile` command group. */
export function profileCommand(): Command {
  const profile = new Command('profile').description('credential profiles: Qwen OAuth (built in), API keys (Coding Plan, DashScope), any OAuth device-flow provider');

  profile
    .command('add')
    .description(
      'add a profile (or replace one with --replace). A key or client secret is read from --key-env VAR, standard input, or a hidden prompt; never from the command line',
    )
    .argument('<name>', 'the profile name (lower-case letters, digits, "_", "-")', parseProfileName)
    .addOption(new Option('--preset <preset>', 'an api-key profile for one of Qwen\'s plans').choices(['coding-plan', 'dashscope']))
    .option('--region <region>', "the preset's region: coding-plan intl|cn; dashscope singapore|beijing|us-virginia|hongkong")
    .addOption(new Option('--kind <kind>', 'the kind of profile (instead of --preset)').choices(['api-key', 'oauth-device']))
    .option('--base-url <url>', 'the OpenAI-compatible API base URL (overrides the preset\'s)')
    .addOption(new Option('--auth <how>', 'api-key: how the key is sent').choices(['bearer', 'x-api-key']))
    .option('--issuer <url>', 'oauth-device: the issuer (endpoints found by discovery)')
    .option('--device-authorization-endpoint <url>', 'oauth-device: the device authorization endpoint (with --token-endpoint, instead of --issuer)')
    .option('--token-endpoint <url>', 'oauth-device: the token endpoint')
    .option('--client-id <id>', 'oauth-device: the OAuth client id')
    .option('--scope <scope>', 'oauth-device: the scope to ask for (e.g. "openid offline_access")')
    .option('--audience <audience>', 'oauth-device: the audience parameter some providers need')
    .option('--resource <url>', 'oauth-device: an RFC 8707 resource indicator')
    .option('--no-pkce', 'oauth-device: no PKCE on the device authorization request (on by default)')
    .option('--refresh-lead <seconds>', 'oauth-device: refresh this long before expiry', seconds(0, 86_400))
    .option('--token-lifetime <seconds>', 'oauth-device: how long a token lasts when the provider does not say (default 3600)', seconds(TOKEN_LIFETIME_S.min, TOKEN_LIFETIME_S.max))
    .option('--client-secret', 'oauth-device: the client is confidential: ask for its secret (stdin or prompt)')
    .addOption(
      new Option('--token-auth-method <method>', 'oauth-device: how the client secret is sent (default: in the body, unless the provider takes only HTTP Basic)').choices([
        ...TOKEN_ENDPOINT_AUTH_METHODS,
      ]),
    )
    .option('--key-env <VAR>', 'read the key (or client secret) from this environment variable, e.g. DASHSCOPE_API_KEY')
    .option('--description <text>', 'a note shown with the profile')
    .option('--replace', 'replace a profile of that name (without --preset/--kind: keep its settings, change what is given)')
    .option('--default', 'make it the default profile')
    .option('--no-verify', 'api-key: store the key without checking it (GET {base-url}/models)')
    .option('--json', 'print the added profile as JSON')
    .addHelpText(
      'after',
      `
Examples:
  qwen-token profile add coding --preset coding-plan --default     (then paste the sk-sp-… key)
  printf '%s' "$DASHSCOPE_API_KEY" | qwen-token profile add ds --preset dashscope --region beijing
  qwen-token profile add ds --preset dashscope --key-env DASHSCOPE_API_KEY
  qwen-token profile add corp --kind oauth-device --issuer https://id.example.com --client-id cli \\
      --scope "openid offline_access" --base-url https://llm.example.com/v1`,
    )
    .action((name: string, opts: ProfileAddOptions, cmd: Command) => runAdd(name, opts, cmd));

  profile
    .command('list')
    .description('one line per profile (* marks the default): name, kind, state, expiry, base URL')
    .option('--json', 'print the profiles.list result as JSON')
    .action(async (opts: { json?: boolean }, cmd: Command) => {
      const env = commandEnv(cmd.optsWithGlobals<GlobalOptions>());
      const list = await withClient(env, (client) => client.listProfiles(), { autostart: false });
      if (opts.json) return outJson(list);
      out(formatProfileLines(list.profiles, Date.now(), { baseUrl: true }));
      out(`config: ${list.config_path}${list.config_error ? ` (not applied: ${list.config_error}; the previous settings stay)` : ''}\n`);
    });

  profile
    .command('show')
    .description("a profile's settings, state, secret fingerprint and files (never the secret)")
    .argument('<name>', 'the profile', parseProfileName)
    .option('--json', 'print the profile as JSON')
    .action(async (name: string, opts: { json?: boolean }, cmd: Command) => {
      const env = commandEnv(cmd.optsWithGlobals<GlobalOptions>());
      const { info, now } = await withClient(env, (client) => findProfile(client, name), { autostart: false });
      if (opts.json) return outJson(info);
      out(await formatProfile(info, now));
    });

  profile
    .command('remove')
    .description(`remove a profile and its secret files (not the built-in "${BUILTIN}": \`logout\` deletes its credentials)`)
    .argument('<name>', 'the profile', parseProfileName)
    .option('--json', 'print the result as JSON')
    .action(async (name: string, opts: { json?: boolean }, cmd: Command) => {
      if (name === BUILTIN) {
        const { QwenError } = await import('../../shared/errors.js');
        throw new QwenError(`"${BUILTIN}" is the built-in profile and stays; \`${cliCommand('logout')}\` deletes its credentials`);
      }
      const env = commandEnv(cmd.optsWithGlobals<GlobalOptions>());
      const result = await withClient(env, async (client) => {
        await findProfile(client, name);
        return client.removeProfile(name);
      });
      if (opts.json) return outJson(result);
      if (!result.removed) {
        const { QwenProfileNotFoundError } = await import('../../shared/errors.js');
        throw new QwenProfileNotFoundError(`there is no profile "${name}"`);
      }
      out(`Removed profile ${name}${result.files.length > 0 ? `; deleted:\n${result.files.map((f) => `  ${f}\n`).join('')}` : '.\n'}`);
    });

  profile
    .command('default')
    .description('make a profile the default (what clients get when they name none and QWEN_TOKEND_PROFILE is unset)')
    .argument('<name>', 'the profile', parseProfileName)
    .action(async (name: string, _opts: unknown, cmd: Command) => {
      const env = commandEnv(cmd.optsWithGlobals<GlobalOptions>());
      const message = await withClient(env, async (client) => {
        const { info } = await findProfile(client, name);
        if (info.default) return `${name} is the default profile already.\n`;
        await client.setDefaultProfile(name);
        return `${name} is now the default profile.\n`;
      });
      out(message);
    });

  return profile;
}
