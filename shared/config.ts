import { join, dirname, resolve } from 'node:path';
import { QwenConfigError } from './errors.js';
import { isLoopbackHost, readTrustedChatHosts } from './url-trust.js';

/**
 * Everything the daemon, client and CLI read from the environment, resolved in one place.
 * Pure: the caller passes the environment, platform and home directory; nothing here does I/O.
 */
export interface TokendConfig {
  home: string;
  /** Our own credential file (`QWEN_TOKEN_PATH`). */
  tokenPath: string;
  /** Directory of `tokenPath`: the daemon's state dir (instance lock, pid file). */
  stateDir: string;
  /** The Qwen CLI's home (`QWEN_HOME`, default `~/.qwen`). */
  qwenHome: string;
  qwenCliCredsPath: string;
  qwenCliLockPath: string;
  /** Whether the Qwen CLI link is on (`QWEN_TOKEND_QWEN_CLI_SYNC`). */
  qwenCliSync: boolean;
  socketPath: string;
  oauthBaseUrl: string;
  clientId: string;
  scope: string;
  refreshLeadMs: number;
  retryMs: number;
  /** After a failed refresh, a token request starts another at most this often (`QWEN_TOKEND_REQUEST_RETRY_MS`). */
  requestRetryMs: number;
  httpTimeoutMs: number;
  qwenCliLockStaleMs: number;
  /** A client connection that sends nothing at all this long is closed (`QWEN_TOKEND_SILENT_CONNECTION_TIMEOUT_MS`). */
  silentConnectionTimeoutMs: number;
  logLevel: string;
  logFile: string | undefined;
  autostart: boolean;
  /** Path of the daemon entry point to start when autostarting (`QWEN_TOKEND_BIN`). */
  daemonBin: string | undefined;
  /** Hosts a chat base URL may name (`QWEN_TOKEND_CHAT_HOSTS`); undefined: the built-in list (see url-trust.ts). */
  trustedChatHosts: string[] | undefined;
  /** The shared config file (profiles, gateway settings); see `configFilePath`. */
  configPath: string;
  /** Where the daemon keeps each profile's secrets and tokens: `profiles/` in the state dir. */
  profilesDir: string;
}

export const DEFAULTS = {
  oauthBaseUrl: 'https://chat.qwen.ai',
  clientId: 'f0304373b74a44d2b584a3fb70ca9e56',
  scope: 'openid profile email model.completion',
  refreshLeadMs: 5 * 60_000,
  retryMs: 60_000,
  requestRetryMs: 5_000,
  httpTimeoutMs: 15_000,
  qwenCliLockStaleMs: 35_000,
  silentConnectionTimeoutMs: 30_000,
  logLevel: 'info',
} as const;

/**
 * After a failed refresh, how soon a token request may start another when
 * `QWEN_TOKEND_REQUEST_RETRY_MS` is not set: 5 s, or the schedule's retry when that is sooner.
 */
export function defaultRequestRetryMs(retryMs: number): number {
  return Math.min(DEFAULTS.requestRetryMs, retryMs);
}

/** A credential file holds a few hundred bytes; one larger than this is refused unread (daemon and `doctor`). */
export const CREDENTIAL_FILE_MAX_BYTES = 64 * 1024;

/** Unix socket path limits (sun_path), including the terminating NUL. */
export const SOCKET_PATH_LIMIT: Record<string, number> = { darwin: 104, linux: 108 };

export interface ResolveOptions {
  platform?: NodeJS.Platform;
  homedir?: string;
}

const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'];

function readInt(env: NodeJS.ProcessEnv, name: string, fallback: number, min: number): number {
  const raw = env[name];
  if (raw === undefined || raw.trim() === '') return fallback;
  if (!/^\d+$/.test(raw.trim())) {
    throw new QwenConfigError(`${name} must be a whole number of milliseconds, got "${raw}"`);
  }
  const value = Number(raw.trim());
  if (!Number.isSafeInteger(value) || value < min) {
    throw new QwenConfigError(`${name} must be at least ${min}, got "${raw}"`);
  }
  return value;
}

function readBool(env: NodeJS.ProcessEnv, name: string, fallback: boolean): boolean {
  const raw = env[name]?.trim().toLowerCase();
  if (raw === undefined || raw === '') return fallback;
  if (['1', 'on', 'true', 'yes'].includes(raw)) return true;
  if (['0', 'off', 'false', 'no'].includes(raw)) return false;
  throw new QwenConfigError(`${name} must be on/off (or 1/0, true/false), got "${env[name]}"`);
}

function readUrl(env: NodeJS.ProcessEnv, name: string, fallback: string): string {
  const raw = env[name]?.trim();
  if (!raw) return fallback;
  let url: URL;
  try {
    url = new URL(raw);
  } catch {
    throw new QwenConfigError(`${name} must be an absolute http(s) URL, got "${raw}"`);
  }
  if (url.protocol !== 'https:' && url.protocol !== 'http:') {
    throw new QwenConfigError(`${name} must be an http(s) URL, got "${raw}"`);
  }
  // Tokens never travel in clear text, except to a server on this machine (tests, proxies).
  if (url.protocol === 'http:' && !isLoopbackHost(url.hostname)) {
    throw new QwenConfigError(`${name} must use https (plain http is allowed only for loopback addresses), got "${raw}"`);
  }
  return raw.replace(/\/+$/, '');
}

/** `~` and `~/…` against `home`; anything else made absolute. */
export function expandHome(p: string, home: string): string {
  if (p === '~') return home;
  if (p.startsWith('~/')) return join(home, p.slice(2));
  return resolve(p);
}

/** Default socket path: `$XDG_RUNTIME_DIR/qwen-tokend/`, macOS per-user `$TMPDIR`, else under the home dir. */
export function defaultSocketPath(env: NodeJS.ProcessEnv, platform: NodeJS.Platform, home: string): string {
  const xdg = env.XDG_RUNTIME_DIR?.trim();
  if (xdg) return join(xdg, 'qwen-tokend', 'qwen-tokend.sock');
  const tmp = env.TMPDIR?.trim();
  // macOS gives every user a private TMPDIR under /var/folders; a shared /tmp is not private.
  if (platform === 'darwin' && tmp && tmp.startsWith('/var/folders/')) {
    return join(tmp, 'qwen-tokend', 'qwen-tokend.sock');
  }
  return join(home, '.one_dragon_alpha', 'run', 'qwen-tokend.sock');
}

/** The shared config file: `QWEN_TOKEND_CONFIG`, else `$XDG_CONFIG_HOME/qwen-tokend/config.json`, else `~/.config/...`. */
export function configFilePath(env: NodeJS.ProcessEnv, home: string): string {
  const explicit = env.QWEN_TOKEND_CONFIG?.trim();
  if (explicit) return expandHome(explicit, home);
  const xdg = env.XDG_CONFIG_HOME?.trim();
  return join(xdg ? expandHome(xdg, home) : join(home, '.config'), 'qwen-tokend', 'config.json');
}

/** Resolves the configuration from the environment; throws `QwenConfigError` with the variable's name. */
export function resolveConfig(env: NodeJS.ProcessEnv, options: ResolveOptions = {}): TokendConfig {
  const platform = options.platform ?? 'linux';
  const home = options.homedir ?? env.HOME ?? '/';
  const tokenPath = expandHome(env.QWEN_TOKEN_PATH?.trim() || '~/.one_dragon_alpha/qwen_oauth_creds.json', home);
  const qwenHome = expandHome(env.QWEN_HOME?.trim() || '~/.qwen', home);
  const socketRaw = env.QWEN_TOKEND_SOCKET?.trim();
  const socketPath = socketRaw ? expandHome(socketRaw, home) : defaultSocketPath(env, platform, home);
  const logLevel = (env.QWEN_TOKEND_LOG_LEVEL?.trim() || DEFAULTS.logLevel).toLowerCase();
  if (!LOG_LEVELS.includes(logLevel)) {
    throw new QwenConfigError(`QWEN_TOKEND_LOG_LEVEL must be one of ${LOG_LEVELS.join(', ')}, got "${logLevel}"`);
  }
  const retryMs = readInt(env, 'QWEN_TOKEND_RETRY_MS', DEFAULTS.retryMs, 100);
  const config: TokendConfig = {
    home,
    tokenPath,
    stateDir: dirname(tokenPath),
    qwenHome,
    qwenCliCredsPath: join(qwenHome, 'oauth_creds.json'),
    qwenCliLockPath: join(qwenHome, 'oauth_creds.lock'),
    qwenCliSync: readBool(env, 'QWEN_TOKEND_QWEN_CLI_SYNC', true),
    socketPath,
    oauthBaseUrl: readUrl(env, 'QWEN_OAUTH_BASE_URL', DEFAULTS.oauthBaseUrl),
    clientId: env.QWEN_OAUTH_CLIENT_ID?.trim() || DEFAULTS.clientId,
    scope: env.QWEN_OAUTH_SCOPE?.trim() || DEFAULTS.scope,
    refreshLeadMs: readInt(env, 'QWEN_TOKEND_REFRESH_LEAD_MS', DEFAULTS.refreshLeadMs, 0),
    retryMs,
    requestRetryMs: readInt(env, 'QWEN_TOKEND_REQUEST_RETRY_MS', defaultRequestRetryMs(retryMs), 0),
    httpTimeoutMs: readInt(env, 'QWEN_TOKEND_HTTP_TIMEOUT_MS', DEFAULTS.httpTimeoutMs, 100),
    qwenCliLockStaleMs: readInt(env, 'QWEN_TOKEND_QWEN_CLI_LOCK_STALE_MS', DEFAULTS.qwenCliLockStaleMs, 1000),
    silentConnectionTimeoutMs: readInt(env, 'QWEN_TOKEND_SILENT_CONNECTION_TIMEOUT_MS', DEFAULTS.silentConnectionTimeoutMs, 100),
    logLevel,
    logFile: env.QWEN_TOKEND_LOG_FILE?.trim() ? expandHome(env.QWEN_TOKEND_LOG_FILE.trim(), home) : undefined,
    autostart: readBool(env, 'QWEN_TOKEND_AUTOSTART', true),
    daemonBin: env.QWEN_TOKEND_BIN?.trim() || undefined,
    trustedChatHosts: readTrustedChatHosts(env),
    configPath: configFilePath(env, home),
    profilesDir: join(dirname(tokenPath), 'profiles'),
  };
  // The refresh must finish well inside the Qwen CLI's stale-lock age, or the CLI may
  // break our lock mid-refresh and refresh the same token in parallel.
  if (config.httpTimeoutMs * 2 > config.qwenCliLockStaleMs) {
    throw new QwenConfigError(
      `QWEN_TOKEND_HTTP_TIMEOUT_MS (${config.httpTimeoutMs}) must be under half the Qwen CLI's stale-lock age (${config.qwenCliLockStaleMs} ms)`,
    );
  }
  return config;
}

/** Throws when the socket path is longer than the platform's sun_path allows. */
export function checkSocketPathLength(socketPath: string, platform: NodeJS.Platform): void {
  const limit = SOCKET_PATH_LIMIT[platform] ?? 104;
  const bytes = Buffer.byteLength(socketPath);
  if (bytes >= limit) {
    throw new QwenConfigError(
      `socket path is ${bytes} bytes, over the ${limit - 1}-byte limit on ${platform}: ${socketPath} (set QWEN_TOKEND_SOCKET or XDG_RUNTIME_DIR to a shorter path)`,
    );
  }
}
