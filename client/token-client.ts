/**
 * The thin client: asks the daemon for the token over its socket, keeps what it was told in
 * memory, and listens for pushed refreshes. It owns nothing: no file, no refresh, no timer.
 */
import { EventEmitter } from 'node:events';
import { setTimeout as sleep } from 'node:timers/promises';
import type { z } from 'zod';
import { systemClock, type Clock } from '../shared/clock.js';
import { resolveConfig, type TokendConfig } from '../shared/config.js';
import { QwenConfigError, QwenDaemonUnavailableError, QwenError, QwenProtocolError } from '../shared/errors.js';
import { DEFAULT_PROFILE, PROFILE_ENV, PROFILE_NAME_PATTERN } from '../shared/profiles.js';
import {
  HelloResult,
  LoginCancelResult,
  LoginCompletedParams,
  LoginFailedParams,
  LoginStartResult,
  LogoutResult,
  Methods,
  MIN_PROTOCOL_VERSION,
  Notifications,
  ProfilesAddParams,
  ProfilesAddResult,
  ProfilesChangedParams,
  ProfilesListResult,
  ProfilesRemoveResult,
  ProfilesSetDefaultResult,
  PROTOCOL_VERSION,
  RefreshFailedParams,
  StateChangedParams,
  StatusResult,
  SubscribeResult,
  TokenResult,
} from '../shared/protocol.js';
import { errorFromWire } from '../shared/errors.js';
import { autostartFailure, saidAlreadyRunning, serviceInstalled, spawnDaemon } from './autostart.js';
import { DaemonConnection } from './daemon-connection.js';
import { compileSchemas } from '../shared/compile-schemas.js';
import { daemonCommand } from '../shared/cli-command.js';

export interface TokenClientOptions {
  /** Environment to resolve the configuration from (default `process.env`). */
  env?: NodeJS.ProcessEnv;
  /** Socket path; default from `QWEN_TOKEND_SOCKET` / `XDG_RUNTIME_DIR` / the home dir. */
  socketPath?: string;
  /** Start a daemon when none listens (default: on unless `QWEN_TOKEND_AUTOSTART=0` or a service unit is installed). */
  autostart?: boolean;
  /** A cached token is used only while valid for longer than this (default 60 s). */
  minValidityMs?: number;
  /** How long one request may wait for the daemon (default 30 s: a refresh may be in flight). */
  requestTimeoutMs?: number;
  /** How long to keep trying to reach a daemon that is (re)starting (default 10 s). */
  reconnectWindowMs?: number;
  /**
   * The profile calls use when they name none (default: `QWEN_TOKEND_PROFILE` from `env`, else
   * the daemon's default profile).
   */
  profile?: string;
  clock?: Clock;
}

/** Which credential profile a call is about (default: the client's profile, see `TokenClientOptions.profile`). */
export interface ProfileOption {
  profile?: string;
}

export interface TokenRequestOptions extends ProfileOption {
  /** The token must stay valid at least this long (default: the client's `minValidityMs`). */
  minValidityMs?: number;
  /** Skip the in-memory cache and ask the daemon. */
  noCache?: boolean;
}

export interface LogoutOptions extends ProfileOption {
  /** Also delete the Qwen CLI's credential file (the `qwen` profile only). */
  qwenCli?: boolean;
}

export type ProfilesAddRequest = z.input<typeof ProfilesAddParams>;

export interface LoginOptions extends ProfileOption {
  /** Called once with the code to show the user. */
  onCode: (info: LoginStartResult) => void;
  /** Aborting cancels the login in the daemon too. */
  signal?: AbortSignal;
}

export interface TokenClientEvents {
  'token.refreshed': [TokenResult];
  'token.refresh_failed': [z.infer<typeof RefreshFailedParams>];
  'state.changed': [z.infer<typeof StateChangedParams>];
  'login.completed': [z.infer<typeof LoginCompletedParams>];
  'login.failed': [z.infer<typeof LoginFailedParams>];
  /** Protocol 2: profiles were added, removed or changed (the caches were dropped). */
  'profiles.changed': [z.infer<typeof ProfilesChangedParams>];
  disconnected: [];
}

const IDEMPOTENT = new Set<string>([Methods.hello, Methods.getAccessToken, Methods.status, Methods.subscribe, Methods.refresh]);
const CONNECT_TIMEOUT_MS = 2_000;
/**
 * After a daemon we started said another one runs (exit 3), how long the socket may refuse
 * connections before we start one again: the one it saw may have been a crashed daemon not yet
 * reaped, or one that gave up; a daemon that really runs listens well within this.
 */
const RESTART_AFTER_REFUSED_MS = 1_000;
/** How many more daemons one wait for the socket may start. */
const MAX_RESTARTS = 3;

function expect<T extends z.ZodType>(schema: T, value: unknown, method: string): z.infer<T> {
  const parsed = schema.safeParse(value);
  if (!parsed.success) throw new QwenProtocolError(`qwen-tokend answered "${method}" with an unexpected shape`);
  return parsed.data;
}

/**
 * Tokens already checked, by the value the connection handed over: the answers to many calls
 * made at once arrive as one value many times over, and so does a push to every connection of this
 * process (see DaemonConnection), so it is checked once.
 */
const checkedTokens = new WeakMap<object, TokenResult>();
let tokenSchemaCompiled = false;

/** Builds TokenResult's checks once per process, at its first connection (see openConnection). */
function compileTokenSchemaOnce(): void {
  if (tokenSchemaCompiled) return;
  tokenSchemaCompiled = true;
  compileSchemas([TokenResult]);
}

/**
 * A token answer, checked against `TokenResult` and frozen: one record is shared by the cache and
 * every caller it was given to, so no caller can change what the others see.
 */
function expectToken(value: unknown, method: string): TokenResult {
  const token = checkToken(value);
  if (!token) throw new QwenProtocolError(`qwen-tokend answered "${method}" with an unexpected shape`);
  return token;
}

/** `value` checked against `TokenResult` and frozen (see expectToken); null when it does not match. */
function checkToken(value: unknown): TokenResult | null {
  const key = typeof value === 'object' && value !== null ? value : null;
  const known = key && checkedTokens.get(key);
  if (known) return known;
  const parsed = TokenResult.safeParse(value);
  if (!parsed.success) return null;
  const result = Object.freeze(parsed.data);
  if (key) checkedTokens.set(key, result);
  return result;
}

function accessTokenOf(token: TokenResult): string {
  return token.access_token;
}

/** The profile named by `env` (`QWEN_TOKEND_PROFILE`), checked; undefined when unset or empty. */
export function profileFromEnv(env: NodeJS.ProcessEnv): string | undefined {
  const value = env[PROFILE_ENV];
  if (value === undefined || value === '') return undefined;
  return checkProfileName(value, PROFILE_ENV);
}

/** `name` when it is a valid profile name, else a QwenConfigError naming where it came from. */
function checkProfileName(name: string, from: string): string {
  if (PROFILE_NAME_PATTERN.test(name)) return name;
  throw new QwenConfigError(
    `${from} is not a profile name (1-63 characters: lower-case letters, digits, "_" and "-", starting with a letter or digit)`,
  );
}

/** Nothing listens on the socket: no file, or a file left by a daemon that is gone. */
function isRefused(err: unknown): boolean {
  const code = (err as NodeJS.ErrnoException)?.code;
  return code === 'ENOENT' || code === 'ECONNREFUSED';
}

function isUnreachable(err: unknown): boolean {
  const code = (err as NodeJS.ErrnoException)?.code;
  return code === 'ENOENT' || code === 'ECONNREFUSED' || code === 'ETIMEDOUT' || code === 'ECONNRESET' || code === 'EPIPE';
}


/** A client of the daemon. Most programs use the shared one: `TokenClient.getInstance()`. */
export class TokenClient extends EventEmitter<TokenClientEvents> {
  private static shared: TokenClient | null = null;

  readonly config: TokendConfig;
  /** The profile calls use when they name none; undefined: the daemon's default profile. */
  readonly profile: string | undefined;
  private readonly env: NodeJS.ProcessEnv;
  private readonly clock: Clock;
  private readonly minValidityMs: number;
  private readonly requestTimeoutMs: number;
  private readonly reconnectWindowMs: number;
  private readonly autostart: boolean;
  private connection: DaemonConnection | null = null;
  private connecting: Promise<DaemonConnection> | null = null;
  private starting: Promise<void> | null = null;
  /** The daemon this client started last; `alreadyRunningAt`: when it exited saying another one runs. */
  private lastStart: { alreadyRunningAt: number | undefined } | null = null;
  /** The daemon's default profile's token (calls that name no profile). */
  private cached: TokenResult | null = null;
  /** Tokens of profiles named in calls, by name. */
  private readonly profileCaches = new Map<string, TokenResult>();
  /** The protocol the open connection speaks; 0 until its `hello` is answered. */
  private daemonProtocol = 0;
  /** The daemon's default profile as its `hello` named it (version 2), so pushes fill that cache before any call. */
  private daemonDefault: string | undefined = undefined;
  private closed = false;
  /** A daemon answered this client before: a lost connection is then a restart worth waiting for. */
  private everConnected = false;

  constructor(options: TokenClientOptions = {}) {
    super();
    this.env = options.env ?? process.env;
    const config = resolveConfig(this.env, { platform: process.platform });
    if (options.socketPath) config.socketPath = options.socketPath;
    this.config = config;
    this.profile = options.profile === undefined ? profileFromEnv(this.env) : checkProfileName(options.profile, 'the profile option');
    this.clock = options.clock ?? systemClock;
    this.minValidityMs = options.minValidityMs ?? 60_000;
    this.requestTimeoutMs = options.requestTimeoutMs ?? 30_000;
    this.reconnectWindowMs = options.reconnectWindowMs ?? 10_000;
    this.autostart = options.autostart ?? config.autostart;
  }

  /** The process-wide shared client (the seed's singleton manager role). */
  static getInstance(options?: TokenClientOptions): TokenClient {
    if (!TokenClient.shared || TokenClient.shared.closed) TokenClient.shared = new TokenClient(options);
    return TokenClient.shared;
  }

  /** Closes the shared client, if any. */
  static async shutdown(): Promise<void> {
    const shared = TokenClient.shared;
    TokenClient.shared = null;
    await shared?.close();
  }

  /** A valid access token (or API key). Answered from memory while the cached one is valid long enough. */
  getAccessToken(options?: TokenRequestOptions): Promise<string> {
    const cached = this.usableCache(options);
    if (cached !== null) return Promise.resolve(cached.access_token);
    return this.requestToken(options, accessTokenOf);
  }

  /**
   * The full token record: the chat API's `base_url`, and (protocol 2) `profile`, `kind` and the
   * header the credential goes in; `expiry_date` is null for an API key. Frozen, as it is shared
   * with the cache and other callers.
   */
  getCredentials(options?: TokenRequestOptions): Promise<TokenResult> {
    const cached = this.usableCache(options);
    if (cached !== null) return Promise.resolve(cached);
    return this.requestToken(options, (token) => token);
  }

  /** Forces a refresh in the daemon (shared with one still waiting for the server's answer). */
  async refresh(options: ProfileOption = {}): Promise<TokenResult> {
    const result = expectToken(await this.request(Methods.refresh, {}, this.profileFor(options)), Methods.refresh);
    this.remember(result, this.profileFor(options));
    return result;
  }

  /** The daemon's state; with protocol 2, about one profile, with every profile listed in `profiles`. */
  async status(options: ProfileOption = {}): Promise<StatusResult> {
    return expect(StatusResult, await this.request(Methods.status, {}, this.profileFor(options)), Methods.status);
  }

  async hello(): Promise<HelloResult> {
    return expect(HelloResult, await this.request(Methods.hello, { protocol: PROTOCOL_VERSION }), Methods.hello);
  }

  /** The protocol version the current connection speaks (0 before the first answer). */
  get protocol(): number {
    return this.daemonProtocol;
  }

  /** Deletes a profile's credentials (and the Qwen CLI's file when `qwenCli`). Returns the removed paths. */
  async logout(options: LogoutOptions = {}): Promise<string[]> {
    const profile = this.profileFor(options);
    this.forget(profile);
    const params = options.qwenCli ? { qwenCli: true } : {};
    return expect(LogoutResult, await this.request(Methods.logout, params, profile), Methods.logout).removed;
  }

  /**
   * Starts the login flow of a profile in the daemon; `login.start` returns the code, then this
   * waits for the outcome (a `login.completed` or `login.failed` push about that profile).
   */
  async login(options: LoginOptions): Promise<z.infer<typeof LoginCompletedParams>> {
    let connection = await this.connect();
    if (this.daemonProtocol === 0 && this.connecting) connection = await this.connecting;
    // Pushes of every profile reach this connection: wait for the one about ours, by name.
    let profile = this.profileFor(options);
    if (profile === undefined && this.daemonProtocol >= 2) profile = (await this.status()).profile;
    const params = this.withProfile({}, profile);
    const mine = (p: { profile?: string | undefined }) => p.profile === undefined || profile === undefined || p.profile === profile;
    const outcome = new Promise<z.infer<typeof LoginCompletedParams>>((resolve, reject) => {
      const done = () => {
        this.off('login.completed', onCompleted);
        this.off('login.failed', onFailed);
        this.off('disconnected', onGone);
        options.signal?.removeEventListener('abort', onAbort);
      };
      const onCompleted = (p: z.infer<typeof LoginCompletedParams>) => {
        if (!mine(p)) return;
        done();
        resolve(p);
      };
      const onFailed = (p: z.infer<typeof LoginFailedParams>) => {
        if (!mine(p)) return;
        done();
        reject(errorFromWire(p.code, p.message));
      };
      const onGone = () => {
        done();
        reject(new QwenDaemonUnavailableError('lost the connection to qwen-tokend during login'));
      };
      const onAbort = () => {
        void connection.call(Methods.loginCancel, params, this.requestTimeoutMs).catch(() => undefined);
      };
      this.on('login.completed', onCompleted);
      this.on('login.failed', onFailed);
      this.on('disconnected', onGone);
      options.signal?.addEventListener('abort', onAbort, { once: true });
    });
    outcome.catch(() => undefined);
    const started = expect(LoginStartResult, await connection.call(Methods.loginStart, params, this.requestTimeoutMs), Methods.loginStart);
    options.onCode(started);
    if (options.signal?.aborted) await connection.call(Methods.loginCancel, params, this.requestTimeoutMs).catch(() => undefined);
    return outcome;
  }

  /** Cancels a login running in the daemon. */
  async cancelLogin(options: ProfileOption = {}): Promise<boolean> {
    return expect(LoginCancelResult, await this.request(Methods.loginCancel, {}, this.profileFor(options)), Methods.loginCancel).cancelled;
  }

  /** Every profile the daemon knows, its default, and the config file (protocol 2). */
  async listProfiles(): Promise<ProfilesListResult> {
    await this.requireProfiles(Methods.profilesList);
    return expect(ProfilesListResult, await this.request(Methods.profilesList, {}), Methods.profilesList);
  }

  /** Adds (or with `replace`, replaces) a profile; a key or client secret goes in `secret` (protocol 2). */
  async addProfile(params: ProfilesAddRequest): Promise<z.infer<typeof ProfilesAddResult>> {
    await this.requireProfiles(Methods.profilesAdd);
    this.forget(params.name);
    return expect(ProfilesAddResult, await this.request(Methods.profilesAdd, params), Methods.profilesAdd);
  }

  /** Removes a profile and its secret files (protocol 2). */
  async removeProfile(name: string): Promise<z.infer<typeof ProfilesRemoveResult>> {
    await this.requireProfiles(Methods.profilesRemove);
    this.forget(name);
    return expect(ProfilesRemoveResult, await this.request(Methods.profilesRemove, { name }), Methods.profilesRemove);
  }

  /** Makes `name` the default profile (`qwen`: the built-in one again) (protocol 2). */
  async setDefaultProfile(name: string): Promise<z.infer<typeof ProfilesSetDefaultResult>> {
    await this.requireProfiles(Methods.profilesSetDefault);
    this.forget(undefined);
    return expect(ProfilesSetDefaultResult, await this.request(Methods.profilesSetDefault, { name }), Methods.profilesSetDefault);
  }

  /** Subscribes to pushed events (the connection subscribes anyway; this makes sure it is open). */
  async subscribe(): Promise<void> {
    await this.connect();
  }

  /** Closes the connection; later calls reopen it unless the client was closed for good. */
  async close(): Promise<void> {
    this.closed = true;
    this.dropCaches();
    this.connection?.close();
    this.connection = null;
  }

  /** Alias of `close()`, named like the seed's manager. */
  shutdown(): Promise<void> {
    return this.close();
  }

  // ---- internals ----

  /** The profile a call is about: its own option, else the client's; undefined: the daemon's default. */
  private profileFor(options: ProfileOption | undefined): string | undefined {
    const named = options?.profile;
    return named === undefined ? this.profile : checkProfileName(named, 'the profile option');
  }

  /**
   * Remembers a token under every name it answers to: the profile it was asked for (undefined:
   * the daemon's default) and the profile the daemon says it belongs to (protocol 2).
   */
  private remember(result: TokenResult, asked: string | undefined): void {
    if (asked === undefined) this.cached = result;
    else this.profileCaches.set(asked, result);
    const owner = result.profile;
    if (owner === undefined) return;
    if (asked !== owner && this.profileCaches.has(owner)) this.profileCaches.set(owner, result);
    if (asked !== undefined && this.cached?.profile === owner) this.cached = result;
  }

  /** Drops what is cached for a profile (undefined: the default's). */
  private forget(profile: string | undefined): void {
    if (profile === undefined) {
      this.cached = null;
      // Version 1 names no profile: what it says is about `qwen`, its only one.
      if (this.daemonProtocol === 1) this.profileCaches.delete(DEFAULT_PROFILE);
      return;
    }
    this.profileCaches.delete(profile);
    if (this.cached?.profile === profile) this.cached = null;
  }

  private dropCaches(): void {
    this.cached = null;
    this.profileCaches.clear();
  }

  /** The cached token when it may answer a call with these options, else null. */
  private usableCache(options: TokenRequestOptions | undefined): TokenResult | null {
    if (options?.noCache) return null;
    const profile = options?.profile ?? this.profile;
    const cached = profile === undefined ? this.cached : (this.profileCaches.get(profile) ?? null);
    if (cached === null) return null;
    const min = options?.minValidityMs ?? this.minValidityMs;
    // A credential without expiry (an API key) stays usable until the daemon says otherwise.
    return cached.expiry_date === null || cached.expiry_date - this.clock.now() > min ? cached : null;
  }

  /**
   * Asks the daemon for a token valid for `minValidityMs` more, checks and remembers it, and
   * gives `pick(token)`. No async function of its own: many calls at once on an expired token makes
   * a thousand of these at once, and each async frame in the chain costs every call a promise
   * and a resumption, going out and again coming back.
   */
  private requestToken<T>(options: TokenRequestOptions | undefined, pick: (token: TokenResult) => T): Promise<T> {
    let profile: string | undefined;
    try {
      profile = this.profileFor(options);
    } catch (err) {
      return Promise.reject(err);
    }
    const params = { minValidityMs: options?.minValidityMs ?? this.minValidityMs };
    return this.requestThen(Methods.getAccessToken, params, profile, (value) => {
      const token = expectToken(value, Methods.getAccessToken);
      this.remember(token, profile);
      return pick(token);
    });
  }

  /**
   * `params` with the profile added in the form the connection's protocol takes: version 1 knows
   * only its one profile (Qwen OAuth, `qwen`), so another name is an error that says to restart
   * the daemon.
   */
  private withProfile<P extends object>(params: P, profile: string | undefined): P | (P & { profile: string }) {
    if (profile === undefined) return params;
    if (this.daemonProtocol === 1) {
      if (profile === DEFAULT_PROFILE) return params;
      throw this.noProfiles(`profile "${profile}"`);
    }
    return { ...params, profile };
  }

  private noProfiles(what: string): QwenProtocolError {
    return new QwenProtocolError(
      `qwen-tokend at ${this.config.socketPath} speaks protocol ${this.daemonProtocol}, which has no profiles, so ${what} is not available: ` +
        'restart the daemon after upgrading (it serves only the built-in Qwen OAuth profile until then)',
    );
  }

  /** Throws unless the daemon serves the `profiles.*` methods (protocol 2). */
  private async requireProfiles(method: string): Promise<void> {
    await this.connect();
    if (this.daemonProtocol === 0 && this.connecting) await this.connecting;
    if (this.daemonProtocol < 2) throw this.noProfiles(`"${method}"`);
  }

  /** Sends a request, reconnecting (with backoff and jitter) while the daemon restarts. */
  private async request(
    method: string,
    params: object,
    profile?: string,
    deadline = this.clock.now() + this.reconnectWindowMs,
    firstAttempt = 0,
  ): Promise<unknown> {
    for (let attempt = firstAttempt; ; attempt++) {
      try {
        const open = this.connection;
        let connection = open?.isOpen ? open : await this.connect();
        // The profile's form depends on the protocol: wait for `hello`'s answer on a new connection.
        if (profile !== undefined && this.daemonProtocol === 0 && this.connecting) connection = await this.connecting;
        return await connection.call(method, this.withProfile(params, profile), this.requestTimeoutMs);
      } catch (err) {
        await this.beforeRetry(err, method, deadline, attempt);
      }
    }
  }

  /**
   * `request(method, params)` with its result mapped by `map`. On an open connection the request
   * leaves before this returns (the first of many calls reaches the daemon while the rest are still
   * being made), and the answer goes straight to `map`; a failure takes the reconnecting path.
   */
  private requestThen<T>(method: string, params: object, profile: string | undefined, map: (value: unknown) => T): Promise<T> {
    const open = this.connection;
    if (!open?.isOpen || (profile !== undefined && this.daemonProtocol === 0)) return this.request(method, params, profile).then(map);
    let sent: object;
    try {
      sent = this.withProfile(params, profile);
    } catch (err) {
      return Promise.reject(err);
    }
    const deadline = this.clock.now() + this.reconnectWindowMs;
    return open.call(method, sent, this.requestTimeoutMs).then(map, async (err: unknown) => {
      await this.beforeRetry(err, method, deadline, 0);
      return map(await this.request(method, params, profile, deadline, 1));
    });
  }

  /** After failed attempt `attempt`: waits out the backoff, or throws `err` when it is not worth another. */
  private async beforeRetry(err: unknown, method: string, deadline: number, attempt: number): Promise<void> {
    // Wait out a daemon restart, but not a daemon that was never there (and that we may not
    // start): that answer is final at once, not after the whole reconnect window.
    const retryable = err instanceof QwenDaemonUnavailableError && IDEMPOTENT.has(method) && !this.closed && this.everConnected;
    if (!retryable || this.clock.now() >= deadline) throw err;
    const backoff = Math.min(50 * 2 ** attempt, 1_000);
    await sleep(backoff / 2 + Math.random() * (backoff / 2));
  }

  private connect(): Promise<DaemonConnection> {
    if (this.closed) this.closed = false;
    if (this.connection?.isOpen) return Promise.resolve(this.connection);
    this.connecting ??= this.openConnection().finally(() => {
      this.connecting = null;
    });
    return this.connecting;
  }

  private async openConnection(): Promise<DaemonConnection> {
    let connection: DaemonConnection;
    try {
      connection = await this.openSocket();
    } catch (err) {
      if ((err as NodeJS.ErrnoException)?.code === 'EAGAIN') {
        // A daemon is there but its accept queue is full (many clients at once, or it is
        // paused): as transient as a restart, so wait for it rather than fail or start another.
        connection = await this.waitForSocket(false);
      } else {
        if (!isUnreachable(err)) throw err;
        await this.startDaemon(err as NodeJS.ErrnoException);
        connection = await this.waitForSocket(true);
      }
    }
    this.connection = connection;
    this.daemonProtocol = 0;
    this.daemonDefault = undefined;
    this.everConnected = true;
    // Every connection subscribes, so the caches are replaced by pushes, never left stale. With
    // no profile named, a version-2 daemon pushes about every profile (each push names its own)
    // and a version-1 daemon about its one.
    const handshake = Promise.all([
      connection.call(Methods.hello, { protocol: PROTOCOL_VERSION }, this.requestTimeoutMs),
      connection.call(Methods.subscribe, {}, this.requestTimeoutMs).then((r) => expect(SubscribeResult, r, Methods.subscribe)),
    ]);
    // Once both requests are written, while the daemon answers: the first token answer (or
    // push) is then checked at once instead of waiting for its schema to be built.
    if (!tokenSchemaCompiled) setImmediate(compileTokenSchemaOnce).unref();
    const [hello] = await handshake;
    const info = expect(HelloResult, hello, Methods.hello);
    if (info.protocol < MIN_PROTOCOL_VERSION || info.protocol > PROTOCOL_VERSION) {
      connection.close();
      throw new QwenProtocolError(
        `qwen-tokend speaks protocol ${info.protocol}, this client ${MIN_PROTOCOL_VERSION} to ${PROTOCOL_VERSION}: restart the daemon after upgrading`,
      );
    }
    if (this.connection === connection) {
      this.daemonProtocol = info.protocol;
      this.daemonDefault = info.default_profile;
    }
    return connection;
  }

  private openSocket(): Promise<DaemonConnection> {
    return DaemonConnection.open(
      {
        socketPath: this.config.socketPath,
        onNotification: (method, params) => this.onNotification(method, params),
        onClose: () => {
          this.connection = null;
          this.daemonProtocol = 0;
          // What the daemon told us is no longer being kept up to date.
          this.dropCaches();
          this.emit('disconnected');
        },
      },
      CONNECT_TIMEOUT_MS,
    );
  }

  private unavailable(reason: string, cause?: unknown): QwenDaemonUnavailableError {
    return new QwenDaemonUnavailableError(`qwen-tokend is not reachable at ${this.config.socketPath}: ${reason}`, { cause });
  }

  private async startDaemon(cause: NodeJS.ErrnoException): Promise<void> {
    if (!this.autostart) {
      // The cause (ENOENT, ECONNREFUSED) tells a caller that no daemon runs, e.g. `qwen-token status`.
      throw this.unavailable(`${cause.code ?? cause.message}; start it with \`${daemonCommand()}\` (autostart is off)`, cause);
    }
    if (serviceInstalled(this.config.home)) {
      throw this.unavailable(
        process.platform === 'darwin'
          ? 'the service is installed but not running; run `qwen-token service status`'
          : 'the service is installed but not running; run `systemctl --user start qwen-tokend`',
      );
    }
    // One start at a time per process; concurrent callers wait for the same one.
    this.starting ??= (async () => {
      const { exited } = spawnDaemon(this.config, this.env);
      const start = { alreadyRunningAt: undefined as number | undefined };
      this.lastStart = start;
      // Also after the 300 ms below: a daemon may wait for the lock before it gives way.
      void exited.then((code) => {
        if (saidAlreadyRunning(code)) start.alreadyRunningAt = this.clock.now();
      });
      const failed = await Promise.race([exited, sleep(300).then(() => 'running' as const)]);
      if (failed !== 'running') {
        const err = autostartFailure(this.config, failed, this.env);
        if (err) throw err;
      }
    })().finally(() => {
      this.starting = null;
    });
    await this.starting;
  }

  /**
   * Connects once a daemon listens, within the reconnect window. With `mayRestart` (we started a
   * daemon for this wait): when ours gave way to another that does not answer, starts one again
   * (see RESTART_AFTER_REFUSED_MS), so the first call after a crash brings a daemon back.
   */
  private async waitForSocket(mayRestart: boolean): Promise<DaemonConnection> {
    const deadline = this.clock.now() + this.reconnectWindowMs;
    let last: unknown;
    let refusedSince: number | undefined;
    let restarts = 0;
    while (this.clock.now() < deadline) {
      try {
        return await this.openSocket();
      } catch (err) {
        last = err;
        const now = this.clock.now();
        if (!isRefused(err)) refusedSince = undefined;
        else if (this.lastStart?.alreadyRunningAt !== undefined) refusedSince ??= now;
        if (mayRestart && refusedSince !== undefined && now - refusedSince >= RESTART_AFTER_REFUSED_MS && restarts < MAX_RESTARTS) {
          restarts++;
          refusedSince = undefined;
          await this.startDaemon(err as NodeJS.ErrnoException);
          continue;
        }
        await sleep(25);
      }
    }
    const gaveWay = this.lastStart?.alreadyRunningAt !== undefined ? '; the daemon started for it said another one already runs' : '';
    throw this.unavailable(`no daemon came up within ${this.reconnectWindowMs} ms (${(last as Error)?.message ?? 'unknown'})${gaveWay}`);
  }

  private onNotification(method: string, params: unknown): void {
    switch (method) {
      case Notifications.tokenRefreshed: {
        const token = checkToken(params);
        if (!token) return;
        this.onPushedToken(token);
        this.emit('token.refreshed', token);
        return;
      }
      case Notifications.stateChanged: {
        const parsed = StateChangedParams.safeParse(params);
        if (!parsed.success) return;
        // After a logout (or a rejected refresh token that has expired) the cache must go.
        if (parsed.data.state === 'no_credentials' || parsed.data.state === 'expired') this.forget(parsed.data.profile);
        this.emit('state.changed', parsed.data);
        return;
      }
      case Notifications.tokenRefreshFailed: {
        const parsed = RefreshFailedParams.safeParse(params);
        if (parsed.success) this.emit('token.refresh_failed', parsed.data);
        return;
      }
      case Notifications.loginCompleted: {
        const parsed = LoginCompletedParams.safeParse(params);
        if (parsed.success) this.emit('login.completed', parsed.data);
        return;
      }
      case Notifications.loginFailed: {
        const parsed = LoginFailedParams.safeParse(params);
        if (parsed.success) this.emit('login.failed', parsed.data);
        return;
      }
      case Notifications.profilesChanged: {
        const parsed = ProfilesChangedParams.safeParse(params);
        if (!parsed.success) return;
        // Settings, secrets or the default may have changed: ask again rather than guess.
        this.dropCaches();
        this.daemonDefault = parsed.data.default_profile;
        this.emit('profiles.changed', parsed.data);
        return;
      }
    }
  }

  /**
   * A pushed token replaces what is cached for its profile, and nothing else: a version-2 push
   * names its profile; a version-1 push is about the one profile that daemon has.
   */
  private onPushedToken(token: TokenResult): void {
    const owner = token.profile;
    if (owner === undefined) {
      this.cached = token;
      if (this.profileCaches.has(DEFAULT_PROFILE)) this.profileCaches.set(DEFAULT_PROFILE, token);
      return;
    }
    // The default's cache takes it when it holds that profile's token, or (nothing asked yet)
    // when the daemon said that profile is its default and this client names none of its own.
    if (this.cached?.profile === owner || (this.cached === null && this.profile === undefined && owner === this.daemonDefault)) this.cached = token;
    if (this.profileCaches.has(owner) || owner === this.profile) this.profileCaches.set(owner, token);
  }
}
