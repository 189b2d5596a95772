/**
 * The thin client: asks the daemon for the token over its socket, keeps what it was told in
 * memory, and listens for pushed refreshes. It owns nothing: no file, no refresh, no timer.
 */
import { EventEmitter } from 'node:events';
import { setTimeout as sleep } from 'node:timers/promises';
import type { z } from 'zod';
import { systemClock, type Clock } from '../shared/clock.js';
import { resolveConfig, type TokendConfig } from '../shared/config.js';
import { QwenDaemonUnavailableError, QwenError, QwenProtocolError } from '../shared/errors.js';
import {
  HelloResult,
  LoginCancelResult,
  LoginCompletedParams,
  LoginFailedParams,
  LoginStartResult,
  LogoutResult,
  Methods,
  Notifications,
  PROTOCOL_VERSION,
  RefreshFailedParams,
  StateChangedParams,
  StatusResult,
  SubscribeResult,
  TokenResult,
} from '../shared/protocol.js';
import { errorFromWire } from '../shared/errors.js';
import { autostartFailure, serviceInstalled, spawnDaemon } from './autostart.js';
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
  clock?: Clock;
}

export interface TokenRequestOptions {
  /** The token must stay valid at least this long (default: the client's `minValidityMs`). */
  minValidityMs?: number;
  /** Skip the in-memory cache and ask the daemon. */
  noCache?: boolean;
}

export interface LoginOptions {
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
  disconnected: [];
}

const IDEMPOTENT = new Set<string>([Methods.hello, Methods.getAccessToken, Methods.status, Methods.subscribe, Methods.refresh]);
const CONNECT_TIMEOUT_MS = 2_000;

function expect<T extends z.ZodType>(schema: T, value: unknown, method: string): z.infer<T> {
  const parsed = schema.safeParse(value);
  if (!parsed.success) throw new QwenProtocolError(`qwen-tokend answered "${method}" with an unexpected shape`);
  return parsed.data;
}

/**
 * Tokens already checked, by the value the connection handed over: the answers to a burst of
 * calls arrive as one value many times over, and so does a push to every connection of this
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

function isUnreachable(err: unknown): boolean {
  const code = (err as NodeJS.ErrnoException)?.code;
  return code === 'ENOENT' || code === 'ECONNREFUSED' || code === 'ETIMEDOUT' || code === 'ECONNRESET' || code === 'EPIPE';
}

/** A client of the daemon. Most programs use the shared one: `TokenClient.getInstance()`. */
export class TokenClient extends EventEmitter<TokenClientEvents> {
  private static shared: TokenClient | null = null;

  readonly config: TokendConfig;
  private readonly env: NodeJS.ProcessEnv;
  private readonly clock: Clock;
  private readonly minValidityMs: number;
  private readonly requestTimeoutMs: number;
  private readonly reconnectWindowMs: number;
  private readonly autostart: boolean;
  private connection: DaemonConnection | null = null;
  private connecting: Promise<DaemonConnection> | null = null;
  private starting: Promise<void> | null = null;
  private cached: TokenResult | null = null;
  private closed = false;
  /** A daemon answered this client before: a lost connection is then a restart worth waiting for. */
  private everConnected = false;

  constructor(options: TokenClientOptions = {}) {
    super();
    this.env = options.env ?? process.env;
    const config = resolveConfig(this.env, { platform: process.platform });
    if (options.socketPath) config.socketPath = options.socketPath;
    this.config = config;
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

  /** A valid access token. Answered from memory while the cached one is valid long enough. */
  getAccessToken(options?: TokenRequestOptions): Promise<string> {
    const cached = this.usableCache(options);
    if (cached !== null) return Promise.resolve(cached.access_token);
    return this.requestToken(options, accessTokenOf);
  }

  /** The full token record, including the chat API's `base_url`; frozen, as it is shared with the cache and other callers. */
  getCredentials(options?: TokenRequestOptions): Promise<TokenResult> {
    const cached = this.usableCache(options);
    if (cached !== null) return Promise.resolve(cached);
    return this.requestToken(options, (token) => token);
  }

  /** Forces a refresh in the daemon (shared with one still waiting for the server's answer). */
  async refresh(): Promise<TokenResult> {
    const result = expectToken(await this.request(Methods.refresh, {}), Methods.refresh);
    this.remember(result);
    return result;
  }

  async status(): Promise<StatusResult> {
    return expect(StatusResult, await this.request(Methods.status, {}), Methods.status);
  }

  async hello(): Promise<HelloResult> {
    return expect(HelloResult, await this.request(Methods.hello, { protocol: PROTOCOL_VERSION }), Methods.hello);
  }

  /** Deletes the daemon's credential file (and the Qwen CLI's when `qwenCli`). Returns the removed paths. */
  async logout(options: { qwenCli?: boolean } = {}): Promise<string[]> {
    this.cached = null;
    const params = options.qwenCli ? { qwenCli: true } : {};
    return expect(LogoutResult, await this.request(Methods.logout, params), Methods.logout).removed;
  }

  /** Starts the device flow in the daemon; `login.start` returns the code, then waits for the outcome. */
  async login(options: LoginOptions): Promise<z.infer<typeof LoginCompletedParams>> {
    const connection = await this.connect();
    const outcome = new Promise<z.infer<typeof LoginCompletedParams>>((resolve, reject) => {
      const done = () => {
        this.off('login.completed', onCompleted);
        this.off('login.failed', onFailed);
        this.off('disconnected', onGone);
        options.signal?.removeEventListener('abort', onAbort);
      };
      const onCompleted = (p: z.infer<typeof LoginCompletedParams>) => {
        done();
        resolve(p);
      };
      const onFailed = (p: z.infer<typeof LoginFailedParams>) => {
        done();
        reject(errorFromWire(p.code, p.message));
      };
      const onGone = () => {
        done();
        reject(new QwenDaemonUnavailableError('lost the connection to qwen-tokend during login'));
      };
      const onAbort = () => {
        void connection.call(Methods.loginCancel, {}, this.requestTimeoutMs).catch(() => undefined);
      };
      this.on('login.completed', onCompleted);
      this.on('login.failed', onFailed);
      this.on('disconnected', onGone);
      options.signal?.addEventListener('abort', onAbort, { once: true });
    });
    outcome.catch(() => undefined);
    const started = expect(LoginStartResult, await connection.call(Methods.loginStart, {}, this.requestTimeoutMs), Methods.loginStart);
    options.onCode(started);
    if (options.signal?.aborted) await connection.call(Methods.loginCancel, {}, this.requestTimeoutMs).catch(() => undefined);
    return outcome;
  }

  /** Cancels a login running in the daemon. */
  async cancelLogin(): Promise<boolean> {
    return expect(LoginCancelResult, await this.request(Methods.loginCancel, {}), Methods.loginCancel).cancelled;
  }

  /** Subscribes to pushed events (the connection subscribes anyway; this makes sure it is open). */
  async subscribe(): Promise<void> {
    await this.connect();
  }

  /** Closes the connection; later calls reopen it unless the client was closed for good. */
  async close(): Promise<void> {
    this.closed = true;
    this.cached = null;
    this.connection?.close();
    this.connection = null;
  }

  /** Alias of `close()`, named like the seed's manager. */
  shutdown(): Promise<void> {
    return this.close();
  }

  // ---- internals ----

  private remember(result: TokenResult): void {
    this.cached = result;
  }

  /** The cached token when it may answer a call with these options, else null. */
  private usableCache(options: TokenRequestOptions | undefined): TokenResult | null {
    const cached = this.cached;
    if (cached === null || options?.noCache) return null;
    const min = options?.minValidityMs ?? this.minValidityMs;
    // A credential without expiry (an API key) stays usable until the daemon says otherwise.
    return cached.expiry_date === null || cached.expiry_date - this.clock.now() > min ? cached : null;
  }

  /**
   * Asks the daemon for a token valid for `minValidityMs` more, checks and remembers it, and
   * gives `pick(token)`. No async function of its own: a burst of calls on an expired token makes
   * a thousand of these at once, and each async frame in the chain costs every call a promise
   * and a resumption, going out and again coming back.
   */
  private requestToken<T>(options: TokenRequestOptions | undefined, pick: (token: TokenResult) => T): Promise<T> {
    const params = { minValidityMs: options?.minValidityMs ?? this.minValidityMs };
    return this.requestThen(Methods.getAccessToken, params, (value) => {
      const token = expectToken(value, Methods.getAccessToken);
      this.remember(token);
      return pick(token);
    });
  }

  /** Sends a request, reconnecting (with backoff and jitter) while the daemon restarts. */
  private async request(method: string, params: unknown, deadline = this.clock.now() + this.reconnectWindowMs, firstAttempt = 0): Promise<unknown> {
    for (let attempt = firstAttempt; ; attempt++) {
      try {
        const open = this.connection;
        const connection = open?.isOpen ? open : await this.connect();
        return await connection.call(method, params, this.requestTimeoutMs);
      } catch (err) {
        await this.beforeRetry(err, method, deadline, attempt);
      }
    }
  }

  /**
   * `request(method, params)` with its result mapped by `map`. On an open connection the request
   * leaves before this returns (the first of a burst reaches the daemon while the rest are still
   * being made), and the answer goes straight to `map`; a failure takes the reconnecting path.
   */
  private requestThen<T>(method: string, params: unknown, map: (value: unknown) => T): Promise<T> {
    const open = this.connection;
    if (!open?.isOpen) return this.request(method, params).then(map);
    const deadline = this.clock.now() + this.reconnectWindowMs;
    return open.call(method, params, this.requestTimeoutMs).then(map, async (err: unknown) => {
      await this.beforeRetry(err, method, deadline, 0);
      return map(await this.request(method, params, deadline, 1));
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
        // A daemon is there but its accept queue is full (a burst of clients, or it is
        // paused): as transient as a restart, so wait for it rather than fail or start another.
        connection = await this.waitForSocket();
      } else {
        if (!isUnreachable(err)) throw err;
        await this.startDaemon(err as NodeJS.ErrnoException);
        connection = await this.waitForSocket();
      }
    }
    this.connection = connection;
    this.everConnected = true;
    // Every connection subscribes, so the cache is replaced by pushes, never left stale.
    const handshake = Promise.all([
      connection.call(Methods.hello, { protocol: PROTOCOL_VERSION }, this.requestTimeoutMs),
      connection.call(Methods.subscribe, {}, this.requestTimeoutMs).then((r) => expect(SubscribeResult, r, Methods.subscribe)),
    ]);
    // Once both requests are written, while the daemon answers: the first token answer (or
    // push) is then checked at once instead of waiting for its schema to be built.
    if (!tokenSchemaCompiled) setImmediate(compileTokenSchemaOnce).unref();
    const [hello] = await handshake;
    const info = expect(HelloResult, hello, Methods.hello);
    if (info.protocol !== PROTOCOL_VERSION) {
      connection.close();
      throw new QwenProtocolError(`qwen-tokend speaks protocol ${info.protocol}, this client ${PROTOCOL_VERSION}: restart the daemon after upgrading`);
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
          // What the daemon told us is no longer being kept up to date.
          this.cached = null;
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

  private async waitForSocket(): Promise<DaemonConnection> {
    const deadline = this.clock.now() + this.reconnectWindowMs;
    let last: unknown;
    while (this.clock.now() < deadline) {
      try {
        return await this.openSocket();
      } catch (err) {
        last = err;
        await sleep(25);
      }
    }
    throw this.unavailable(`no daemon came up within ${this.reconnectWindowMs} ms (${(last as Error)?.message ?? 'unknown'})`);
  }

  private onNotification(method: string, params: unknown): void {
    switch (method) {
      case Notifications.tokenRefreshed: {
        const token = checkToken(params);
        if (!token) return;
        this.cached = token;
        this.emit('token.refreshed', token);
        return;
      }
      case Notifications.stateChanged: {
        const parsed = StateChangedParams.safeParse(params);
        if (!parsed.success) return;
        // After a logout (or a rejected refresh token that has expired) the cache must go.
        if (parsed.data.state === 'no_credentials' || parsed.data.state === 'expired') this.cached = null;
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
    }
  }
}

