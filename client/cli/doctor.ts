/**
 * `qwen-token doctor`: checks the setup piece by piece and says how to fix what is wrong.
 * It only looks: it never starts a daemon and never moves, rewrites or deletes a file.
 */
import type { Stats } from 'node:fs';
import { lstat, readFile } from 'node:fs/promises';
import { dirname } from 'node:path';
import { Command } from 'commander';
import { errnoCode, errorText } from '../../shared/diagnostics.js';
import { cliCommand } from '../../shared/cli-command.js';
import { checkSocketPathLength, CREDENTIAL_FILE_MAX_BYTES, SOCKET_PATH_LIMIT, type TokendConfig } from '../../shared/config.js';
import { QwenProtocolError } from '../../shared/errors.js';
import { fingerprint } from '../../shared/fingerprint.js';
import type { ProfileInfo } from '../../shared/profiles.js';
import type { StatusResult } from '../../shared/protocol.js';
import { serviceInstalled } from '../autostart.js';
import { commandConfig, commandEnv, daemonNotRunning, openClient, out, outJson, PROFILE_NAME_RULE, startAdvice, type GlobalOptions } from './context.js';
import { describeExpiry, formatDuration, formatRelative } from './duration.js';
import { CommandExit, ExitCodes } from './exit-codes.js';

export type CheckStatus = 'ok' | 'warn' | 'fail' | 'skip';

/** One finding. `hint` says how to fix a warn/fail. */
export interface Check {
  id: string;
  title: string;
  status: CheckStatus;
  detail: string;
  hint?: string;
}

function check(id: string, title: string, status: CheckStatus, detail: string, hint?: string): Check {
  return hint === undefined ? { id, title, status, detail } : { id, title, status, detail, hint };
}

function modeText(st: Stats): string {
  return (st.mode & 0o777).toString(8).padStart(4, '0');
}

async function lstatOrNull(path: string): Promise<Stats | null> {
  try {
    return await lstat(path);
  } catch (err) {
    if (errnoCode(err) === 'ENOENT') return null;
    throw err;
  }
}

const myUid = (): number | undefined => process.getuid?.();

function checkSocketDir(dir: string, st: Stats | null): Check {
  const title = 'socket directory';
  // Not there before the first start: nothing is wrong, the daemon creates it.
  if (st === null) return check('socket-dir', title, 'ok', `${dir} does not exist yet; the daemon creates it (mode 0700) when it starts`);
  if (!st.isDirectory()) return check('socket-dir', title, 'fail', `${dir} is not a directory`, 'set QWEN_TOKEND_SOCKET to a path in a private directory');
  const uid = myUid();
  if (uid !== undefined && st.uid !== uid) {
    return check('socket-dir', title, 'fail', `${dir} belongs to uid ${st.uid}, not to you (uid ${uid})`, 'set QWEN_TOKEND_SOCKET to a path in a directory you own');
  }
  if ((st.mode & 0o077) !== 0) {
    return check('socket-dir', title, 'fail', `${dir} has mode ${modeText(st)}: other users could reach the socket`, `chmod 700 ${dir}`);
  }
  return check('socket-dir', title, 'ok', `${dir}: mode ${modeText(st)}, owned by you`);
}

function checkSocketFile(path: string, st: Stats | null): Check {
  const title = 'socket';
  // Whether a missing socket matters is the daemon check's to say, once.
  if (st === null) return check('socket', title, 'ok', `${path} does not exist (no daemon is listening)`);
  if (!st.isSocket()) return check('socket', title, 'fail', `${path} exists but is not a socket`, `move it away or set QWEN_TOKEND_SOCKET elsewhere`);
  const uid = myUid();
  if (uid !== undefined && st.uid !== uid) return check('socket', title, 'fail', `${path} belongs to uid ${st.uid}, not to you`, 'stop the other daemon, or set QWEN_TOKEND_SOCKET');
  if ((st.mode & 0o077) !== 0) return check('socket', title, 'fail', `${path} has mode ${modeText(st)} (expected 0600)`, `chmod 600 ${path}, then restart qwen-tokend`);
  return check('socket', title, 'ok', `${path}: a socket, mode ${modeText(st)}`);
}

interface FileCheckOptions {
  id: string;
  title: string;
  /** Severity of permission and content problems (our own file: fail; the Qwen CLI's: warn). */
  severity: 'warn' | 'fail';
  /** What a missing file means. */
  missing: { status: CheckStatus; detail: string; hint?: string };
}

/** Checks a credential file without changing it: presence, owner, modes, content. */
async function checkCredentialFile(path: string, o: FileCheckOptions, now: number): Promise<Check> {
  const bad = (detail: string, hint: string) => check(o.id, o.title, o.severity, detail, hint);
  let st: Stats | null;
  try {
    st = await lstatOrNull(path);
  } catch (err) {
    return bad(`cannot inspect ${path}: ${errnoCode(err) ?? errorText(err)}`, `check the permissions of ${dirname(path)}`);
  }
  if (st === null) return check(o.id, o.title, o.missing.status, `${path} ${o.missing.detail}`, o.missing.hint);
  if (!st.isFile()) return bad(`${path} is not a regular file`, `remove it and run \`${cliCommand('login')}\``);
  // The daemon refuses such a file unread (a credential file holds a few hundred bytes); so does this check.
  if (st.size > CREDENTIAL_FILE_MAX_BYTES) return bad(`${path} is ${st.size} bytes, too large to be a credential file`, `remove it and run \`${cliCommand('login')}\``);
  const uid = myUid();
  if (uid !== undefined && st.uid !== uid) return bad(`${path} belongs to uid ${st.uid}, not to you`, `chown it to yourself or remove it`);
  if ((st.mode & 0o077) !== 0) return bad(`${path} has mode ${modeText(st)}: other users can read the tokens`, `chmod 600 ${path}`);
  const dir = dirname(path);
  const dirSt = await lstat(dir).catch(() => null);
  if (dirSt && (dirSt.mode & 0o077) !== 0) return bad(`${dir} has mode ${modeText(dirSt)} (expected 0700)`, `chmod 700 ${dir}`);
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    return bad(`cannot read ${path}: ${errnoCode(err) ?? errorText(err)}`, `check its owner and mode`);
  }
  // Loaded on use: it pulls in zod.
  const { parseCredentialsText } = await import('../../shared/credentials.js');
  try {
    const creds = parseCredentialsText(text, path);
    return check(
      o.id,
      o.title,
      'ok',
      `${path}: valid, mode ${modeText(st)}; token ${fingerprint(creds.access_token)} ${describeExpiry(creds.expiry_date, now)}`,
    );
  } catch (err) {
    return bad(errorText(err), `run \`${cliCommand('login')}\` to replace it`);
  }
}

async function checkQwenCliLock(config: TokendConfig, now: number): Promise<Check> {
  const title = 'Qwen CLI lock';
  const path = config.qwenCliLockPath;
  let st: Stats | null;
  try {
    st = await lstatOrNull(path);
  } catch (err) {
    return check('qwen-cli-lock', title, 'warn', `cannot inspect ${path}: ${errnoCode(err)}`);
  }
  if (st === null) return check('qwen-cli-lock', title, 'ok', `${path}: not held`);
  const age = Math.max(0, now - st.mtimeMs);
  if (age < config.qwenCliLockStaleMs) {
    return check('qwen-cli-lock', title, 'ok', `${path}: held for ${formatDuration(age)} (a refresh is running)`);
  }
  return check(
    'qwen-cli-lock',
    title,
    'warn',
    `${path}: stale, ${formatDuration(age)} old (stale after ${formatDuration(config.qwenCliLockStaleMs)}); it is broken at the next refresh`,
    `if no qwen or qwen-tokend process is refreshing, remove ${path}`,
  );
}

/** The daemon's token state. `loginFinding`: "not logged in yet" was already said (by the credential file check). */
function checkState(s: StatusResult, loginFinding: boolean): Check {
  const login_ = `run \`${cliCommand('login')}\``;
  const title = 'token state';
  const login = s.login_in_progress ? '; a login is in progress' : '';
  const expiry = s.expiry_date === null ? '' : `, token ${describeExpiry(s.expiry_date, s.now)} (${s.token_fingerprint})`;
  const lastError = s.last_error ? `; last error: ${s.last_error.message} [${s.last_error.code}] ${formatRelative(s.last_error.at, s.now)}` : '';
  switch (s.state) {
    case 'valid':
    case 'refreshing':
      return check('state', title, 'ok', `${s.state}${expiry}${login}`);
    case 'static':
      return check('state', title, 'ok', `static key (${s.token_fingerprint}), no expiry`);
    case 'retrying':
      return check('state', title, 'warn', `retrying (${s.retry_count} failed refreshes)${expiry}${lastError}${login}`, `the old token is served while it is valid; see \`${cliCommand('status')}\``);
    case 'expired':
      return check('state', title, 'fail', `expired and refreshing fails${expiry}${lastError}${login}`, `run \`${cliCommand('refresh')}\`; if it keeps failing, \`${cliCommand('login')}\``);
    case 'needs_login':
      return check('state', title, 'fail', `needs login: the refresh token was rejected${lastError}${login}`, login_);
    case 'no_credentials':
      // Not logged in yet is something to do, not something broken; and it is one finding.
      if (loginFinding) return check('state', title, 'skip', `no credentials (see "credential file" above)${lastError}${login}`);
      return check('state', title, 'warn', `not logged in yet${lastError}${login}`, login_);
  }
}

/**
 * The daemon check when no daemon answered. Not running is fine while clients may start one
 * (autostart, the default: a fresh install has none yet); it is a problem when a service is
 * meant to keep it running, and worth a warning when autostart is off.
 */
function checkDaemonDown(config: TokendConfig, err: unknown): Check {
  const title = 'daemon';
  if (err instanceof QwenProtocolError) {
    return check('daemon', title, 'fail', err.message, 'restart qwen-tokend after upgrading, so daemon and client speak the same protocol');
  }
  if (!daemonNotRunning(err)) return check('daemon', title, 'fail', errorText(err), startAdvice(config));
  if (serviceInstalled(config.home)) return check('daemon', title, 'fail', 'not running, though the service is installed', startAdvice(config));
  if (config.autostart) {
    return check('daemon', title, 'ok', 'not running; it starts on the first token request (autostart)');
  }
  return check('daemon', title, 'warn', 'not running, and autostart is off (QWEN_TOKEND_AUTOSTART=0)', startAdvice(config));
}

/** The environment variable naming the client's profile (shared/profiles.ts PROFILE_ENV). */
const PROFILE_ENV = 'QWEN_TOKEND_PROFILE';
/** How long doctor waits for a provider's discovery document. */
const DISCOVERY_TIMEOUT_MS = 5_000;

/** A profile's state and secret, as one finding. */
function checkProfileState(p: ProfileInfo, now: number): Check {
  const id = `profile:${p.name}`;
  const title = `profile ${p.name}`;
  const where = p.base_url ? `, ${p.base_url}` : '';
  const lastError = p.last_error ? `; last error: ${p.last_error.message} [${p.last_error.code}] ${formatRelative(p.last_error.at, now)}` : '';
  if (p.kind === 'api-key') {
    if (!p.has_secret) return check(id, title, 'fail', `api-key${where}: no key stored`, `\`${cliCommand(`profile add ${p.name} --replace`)}\` stores one`);
    if (p.last_error) return check(id, title, 'warn', `api-key${where}, key ${p.secret_fingerprint}${lastError}`, `if the key was refused, replace it: \`${cliCommand(`profile add ${p.name} --replace`)}\``);
    return check(id, title, 'ok', `api-key${where}, static key ${p.secret_fingerprint}`);
  }
  const login = `run \`${cliCommand(`login --profile ${p.name}`)}\``;
  const expiry = p.expiry_date === null ? '' : `, token ${describeExpiry(p.expiry_date, now)}`;
  switch (p.state) {
    case 'valid':
    case 'refreshing':
    case 'static':
      return check(id, title, 'ok', `${p.kind}${where}: ${p.state}${expiry}`);
    case 'retrying':
      return check(id, title, 'warn', `${p.kind}${where}: retrying${expiry}${lastError}`, `the old token is served while it is valid; see \`${cliCommand(`status --profile ${p.name}`)}\``);
    case 'no_credentials':
      return check(id, title, 'warn', `${p.kind}${where}: not logged in yet${lastError}`, login);
    case 'expired':
      return check(id, title, 'fail', `${p.kind}${where}: expired and refreshing fails${expiry}${lastError}`, `run \`${cliCommand(`refresh --profile ${p.name}`)}\`; if it keeps failing, ${login}`);
    case 'needs_login':
      return check(id, title, 'fail', `${p.kind}${where}: needs login${lastError}`, login);
  }
}

/** The files a profile lists: regular, yours, 0600 in a directory closed to others. Only looks. */
async function checkProfileFiles(p: ProfileInfo): Promise<Check> {
  const id = `profile:${p.name}:files`;
  const title = `profile ${p.name} files`;
  const uid = myUid();
  let present = 0;
  for (const path of p.files) {
    let st: Stats | null;
    try {
      st = await lstatOrNull(path);
    } catch (err) {
      return check(id, title, 'fail', `cannot inspect ${path}: ${errnoCode(err) ?? errorText(err)}`, `check the permissions of ${dirname(path)}`);
    }
    if (st === null) continue;
    present++;
    if (!st.isFile()) return check(id, title, 'fail', `${path} is not a regular file`, `move it away; the daemon writes a new one`);
    if (uid !== undefined && st.uid !== uid) return check(id, title, 'fail', `${path} belongs to uid ${st.uid}, not to you`, 'chown it to yourself or remove it');
    if ((st.mode & 0o077) !== 0) return check(id, title, 'fail', `${path} has mode ${modeText(st)}: other users can read the secret`, `chmod 600 ${path}`);
    const dir = dirname(path);
    const dirSt = await lstat(dir).catch(() => null);
    if (dirSt && (dirSt.mode & 0o077) !== 0) return check(id, title, 'fail', `${dir} has mode ${modeText(dirSt)} (expected 0700)`, `chmod 700 ${dir}`);
  }
  if (p.has_secret && present === 0 && p.files.length > 0) {
    return check(id, title, 'warn', `the daemon reports a secret but none of its files is there: ${p.files.join(', ')}`);
  }
  return check(id, title, 'ok', present === 0 ? 'no files yet' : `${present} file(s), mode 0600, owned by you`);
}

/** The discovery documents an issuer may publish: OpenID Connect's, then RFC 8414's. */
export function discoveryUrls(issuer: string): string[] {
  const url = new URL(issuer);
  const path = url.pathname.replace(/\/+$/, '');
  return [`${url.origin}${path}/.well-known/openid-configuration`, `${url.origin}/.well-known/oauth-authorization-server${path}`];
}

/** An `oauth-device` profile's issuer answers its discovery document (one GET, or two). */
async function checkDiscovery(p: ProfileInfo): Promise<Check | null> {
  const issuer = p.settings.issuer;
  if (typeof issuer !== 'string') return null;
  const id = `profile:${p.name}:discovery`;
  const title = `profile ${p.name} discovery`;
  const explicitDevice = typeof p.settings.device_authorization_endpoint === 'string';
  const failures: string[] = [];
  for (const url of discoveryUrls(issuer)) {
    let response: Response;
    try {
      response = await fetch(url, { headers: { Accept: 'application/json' }, redirect: 'manual', signal: AbortSignal.timeout(DISCOVERY_TIMEOUT_MS) });
    } catch (err) {
      const cause = (err as { cause?: unknown }).cause;
      const name = (err as { name?: unknown }).name;
      failures.push(`${url}: ${name === 'TimeoutError' ? `no answer within ${DISCOVERY_TIMEOUT_MS / 1000} s` : (errnoCode(cause) ?? (cause instanceof Error ? cause.message : errorText(err)))}`);
      continue;
    }
    let meta: unknown;
    try {
      meta = await response.json();
    } catch {
      meta = undefined;
    }
    if (!response.ok || typeof meta !== 'object' || meta === null) {
      failures.push(`${url}: HTTP ${response.status}${response.ok ? ', not JSON' : ''}`);
      continue;
    }
    const device = (meta as { device_authorization_endpoint?: unknown }).device_authorization_endpoint;
    if (typeof device !== 'string' && !explicitDevice) {
      return check(id, title, 'fail', `${url} answers, but names no device_authorization_endpoint`, 'give --device-authorization-endpoint, or ask the provider to enable the device flow for this client');
    }
    return check(id, title, 'ok', `${url} answers${typeof device === 'string' ? `; device flow at ${device}` : ''}`);
  }
  return check(id, title, 'fail', `the issuer's discovery document is not reachable: ${failures.join('; ')}`, 'check the issuer URL and the network');
}

/** Checks of the profiles other than the built-in one (whose own checks come first), and of QWEN_TOKEND_PROFILE. */
async function checkProfiles(env: NodeJS.ProcessEnv, s: StatusResult): Promise<Check[]> {
  const checks: Check[] = [];
  const profiles = s.profiles ?? [];
  if (s.config_error) {
    checks.push(check('profiles-config', 'profiles config', 'fail', `${s.config_path ?? 'the config file'} was not applied: ${s.config_error}; the previous settings stay`, `fix it; the daemon reloads it on change`));
  }
  const named = env[PROFILE_ENV];
  if (named !== undefined && named !== '') {
    if (!PROFILE_NAME_RULE.test(named)) {
      checks.push(check('profile-env', PROFILE_ENV, 'fail', `${PROFILE_ENV} is not a profile name`, `set it to one of: ${profiles.map((p) => p.name).join(', ') || 'qwen'}`));
    } else if (s.profiles !== undefined && !profiles.some((p) => p.name === named)) {
      checks.push(check('profile-env', PROFILE_ENV, 'fail', `${PROFILE_ENV}=${named}, but there is no such profile`, `\`${cliCommand('profile list')}\` shows them`));
    } else {
      checks.push(check('profile-env', PROFILE_ENV, 'ok', `clients use profile ${named}`));
    }
  }
  for (const p of profiles) {
    if (p.builtin) continue;
    checks.push(checkProfileState(p, s.now));
    checks.push(await checkProfileFiles(p));
    if (p.kind === 'oauth-device') {
      const discovery = await checkDiscovery(p);
      if (discovery) checks.push(discovery);
    }
  }
  return checks;
}

/** Runs every check against the environment `env`; never starts a daemon. */
export async function runDoctor(env: NodeJS.ProcessEnv): Promise<Check[]> {
  const checks: Check[] = [];
  let config: TokendConfig;
  try {
    config = commandConfig(env);
  } catch (err) {
    checks.push(check('config', 'configuration', 'fail', errorText(err), 'set the variable named above to a valid value, or unset it for the default'));
    return checks;
  }
  checks.push(check('config', 'configuration', 'ok', `resolves; socket ${config.socketPath}, token file ${config.tokenPath}`));
  const now = Date.now();

  let socketPathOk = true;
  try {
    checkSocketPathLength(config.socketPath, process.platform);
    const limit = (SOCKET_PATH_LIMIT[process.platform] ?? 104) - 1;
    checks.push(check('socket-path', 'socket path length', 'ok', `${Buffer.byteLength(config.socketPath)} bytes (limit ${limit})`));
  } catch (err) {
    socketPathOk = false;
    checks.push(check('socket-path', 'socket path length', 'fail', errorText(err), 'set QWEN_TOKEND_SOCKET or XDG_RUNTIME_DIR to a shorter path'));
  }

  const dir = dirname(config.socketPath);
  try {
    checks.push(checkSocketDir(dir, await lstatOrNull(dir)));
  } catch (err) {
    checks.push(check('socket-dir', 'socket directory', 'fail', `cannot inspect ${dir}: ${errnoCode(err)}`, `check the permissions of ${dirname(dir)}`));
  }
  try {
    checks.push(checkSocketFile(config.socketPath, await lstatOrNull(config.socketPath)));
  } catch (err) {
    checks.push(check('socket', 'socket', 'fail', `cannot inspect ${config.socketPath}: ${errnoCode(err)}`, `check the permissions of ${dir}`));
  }

  let status: StatusResult | null = null;
  if (!socketPathOk) {
    checks.push(check('daemon', 'daemon', 'skip', 'not checked: the socket path is too long'));
  } else {
    // Autostart off: a doctor that starts a daemon would hide the problem it should report.
    // Doctor names every profile it asks about: QWEN_TOKEND_PROFILE is checked, not used.
    const clientEnv = { ...env };
    delete clientEnv[PROFILE_ENV];
    const client = await openClient(clientEnv, { autostart: false, requestTimeoutMs: 5_000 });
    try {
      const hello = await client.hello();
      checks.push(check('daemon', 'daemon', 'ok', `qwen-tokend ${hello.version} answers (protocol ${hello.protocol}, pid ${hello.pid})`));
      // The checks below are about the built-in Qwen OAuth profile (its files, the Qwen CLI link).
      status = await client.status({ profile: 'qwen' });
    } catch (err) {
      checks.push(checkDaemonDown(config, err));
    } finally {
      await client.close();
    }
  }

  checks.push(
    await checkCredentialFile(
      config.tokenPath,
      {
        id: 'own-file',
        title: 'credential file',
        severity: 'fail',
        missing: { status: 'warn', detail: 'does not exist: not logged in yet', hint: `run \`${cliCommand('login')}\`` },
      },
      now,
    ),
  );

  if (!config.qwenCliSync) {
    checks.push(check('qwen-cli-link', 'Qwen CLI link', 'ok', 'off (QWEN_TOKEND_QWEN_CLI_SYNC=off): the Qwen CLI file is neither read nor written'));
  } else {
    checks.push(check('qwen-cli-link', 'Qwen CLI link', 'ok', `on: ${config.qwenCliCredsPath}`));
    checks.push(
      await checkCredentialFile(
        config.qwenCliCredsPath,
        {
          id: 'qwen-cli-file',
          title: 'Qwen CLI credential file',
          severity: 'warn',
          missing: { status: 'ok', detail: 'does not exist (nothing to import)' },
        },
        now,
      ),
    );
    checks.push(await checkQwenCliLock(config, now));
  }

  // The own file's only warning is "missing" (its other findings are failures).
  const loginFinding = checks.some((c) => c.id === 'own-file' && c.status === 'warn');
  checks.push(status ? checkState(status, loginFinding) : check('state', 'token state', 'skip', 'not checked: no daemon answered'));
  if (status) checks.push(...(await checkProfiles(env, status)));
  return checks;
}

const MARK: Record<CheckStatus, string> = { ok: 'ok', warn: 'warn', fail: 'FAIL', skip: '-' };

/** The human report: one line per check, a `fix:` line under each problem, a summary. */
export function formatDoctor(checks: Check[]): string {
  const width = Math.max(...checks.map((c) => c.title.length));
  const lines: string[] = [];
  for (const c of checks) {
    lines.push(`${MARK[c.status].padEnd(4)}  ${c.title.padEnd(width)}  ${c.detail}`);
    if (c.hint && (c.status === 'warn' || c.status === 'fail')) lines.push(`${' '.repeat(6 + width)}  fix: ${c.hint}`);
  }
  const fails = checks.filter((c) => c.status === 'fail').length;
  const warns = checks.filter((c) => c.status === 'warn').length;
  lines.push('');
  lines.push(fails > 0 ? `${fails} problem(s) found${warns ? `, ${warns} warning(s)` : ''}.` : `No problems found${warns ? ` (${warns} warning(s))` : ''}.`);
  return `${lines.join('\n')}\n`;
}

/** The `doctor` command. Exit 0 when nothing failed, 1 otherwise. */
export function doctorCommand(): Command {
  return new Command('doctor')
    .description('check config, socket, permissions, credential files, the daemon and the Qwen CLI link')
    .option('--json', 'print the checks as JSON')
    .action(async (opts: { json?: boolean }, cmd: Command) => {
      const env = commandEnv(cmd.optsWithGlobals<GlobalOptions>());
      const checks = await runDoctor(env);
      const ok = !checks.some((c) => c.status === 'fail');
      if (opts.json) outJson({ ok, checks });
      else out(formatDoctor(checks));
      if (!ok) throw new CommandExit(ExitCodes.error);
    });
}
