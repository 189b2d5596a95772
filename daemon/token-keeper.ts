/**
 * The one owner of the token: holds the lifecycle state, runs refreshes (single-flight),
 * persists credentials, adopts outside changes and cooperates with the Qwen CLI's lock.
 * Decisions come from `lifecycle.ts`; this module only does the I/O around them.
 */
import { EventEmitter } from 'node:events';
import { setTimeout as sleep } from 'node:timers/promises';
import { systemClock, type Clock, type TimerHandle } from '../shared/clock.js';
import type { TokendConfig } from '../shared/config.js';
import type { Credentials } from '../shared/credentials.js';
import { sameCredentials } from '../shared/credentials.js';
import {
  QwenError,
  QwenOAuthError,
  QwenRefreshTokenInvalidError,
  QwenTokenExpiredError,
  QwenTokenNotAvailableError,
} from '../shared/errors.js';
import { fingerprint } from '../shared/fingerprint.js';
import type { TokenState } from '../shared/protocol.js';
import type { CredentialFile } from './credential-store.js';
import {
  decideTokenRequest,
  type TokenDecision,
  initialState,
  nextRefreshAt,
  phase,
  pickAtStart,
  reduce,
  refreshedRecently,
  shouldAdopt,
  type LifecycleEvent,
  type LifecycleState,
} from './lifecycle.js';
import type { Logger } from './logger.js';
import { credentialsFromGrant, type QwenOAuthClient } from './oauth.js';
import { cliCommand } from '../shared/cli-command.js';
import { withQwenCliLock } from './qwen-cli-lock.js';
import { errorText } from '../shared/diagnostics.js';

/** How long shutdown waits for an in-flight refresh before abandoning it (within the 2 s exit budget). */
const STOP_GRACE_MS = 1_000;

/** A credential file that reads as corrupt after a change is judged again after this quiet time. */
const SETTLE_MS = 500;

/** Longest single timer: a wall-clock jump or a suspend is noticed within this long. */
const MAX_TIMER_MS = 30_000;

export type CredentialSource = 'own' | 'qwen-cli' | 'login';

export interface RefreshFailure {
  error: QwenError;
  state: TokenState;
  nextRetryAt: number | null;
}

export interface TokenKeeperEvents {
  /** New credentials are current (refresh, login, import or adoption). */
  token_refreshed: [Credentials];
  refresh_failed: [RefreshFailure];
  state_changed: [{ state: TokenState; previous: TokenState }];
}

/** How messages name this keeper's login and token issuer (the built-in profile's by default). */
export interface KeeperWording {
  /** The command that logs in, as a person runs it where the daemon runs: `qwen-token login`. */
  loginCommand(): string;
  /** The command that shows its status: `qwen-token status`. */
  statusCommand(): string;
  /** Other ways to log in, said after the command: ` (or log in with the Qwen CLI)`. */
  otherWays: string;
  /** Who issued the tokens: `the Qwen server`. */
  issuer: string;
}

export const QWEN_WORDING: KeeperWording = {
  loginCommand: () => cliCommand('login'),
  statusCommand: () => cliCommand('status'),
  otherWays: ' (or log in with the Qwen CLI)',
  issuer: 'the Qwen server',
};

export interface TokenKeeperDeps {
  config: Pick<TokendConfig, 'refreshLeadMs' | 'retryMs' | 'qwenCliLockPath' | 'qwenCliLockStaleMs' | 'httpTimeoutMs'> & Partial<Pick<TokendConfig, 'requestRetryMs'>>;
  oauth: Pick<QwenOAuthClient, 'refreshTokenGrant'>;
  ownFile: CredentialFile;
  /** The Qwen CLI's file, or null when the link is off. */
  cliFile: CredentialFile | null;
  clock: Clock;
  logger: Logger;
  /** Default: the built-in profile's (QWEN_WORDING). */
  wording?: KeeperWording;
}

type RefreshOutcome = { ok: true; credentials: Credentials } | { ok: false; error: QwenError };

/** One refresh in flight, shared by everyone who asks meanwhile. */
interface RefreshRun {
  /**
   * Settles as soon as the outcome is known. On success the new credentials are current in
   * memory and may still be on their way to disk: the access token is valid at the server
   * either way, so callers waiting for a token need not wait for two fsyncs.
   */
  readonly known: Promise<RefreshOutcome>;
  /** Settles when the refresh is over: on success, its credentials written (or kept for a retry). */
  readonly finished: Promise<RefreshOutcome>;
  /** The new credentials are current (the server has answered); only their writes are left. */
  readonly answered: boolean;
}

export interface KeeperSnapshot {
  state: TokenState;
  credentials: Credentials | null;
  nextRefreshAt: number | null;
  lastRefreshAt: number | null;
  lastError: LifecycleState['lastError'];
  retryCount: number;
  sourceFile: string | null;
}

function toQwenError(err: unknown): QwenError {
  if (err instanceof QwenError) return err;
  const message = errorText(err);
  return new QwenOAuthError(`refresh failed: ${message}`, { retryable: true, cause: err });
}

/** The daemon's token lifecycle shell. */
export class TokenKeeper extends EventEmitter<TokenKeeperEvents> {
  private state: LifecycleState = initialState;
  private shownPhase: TokenState = 'no_credentials';
  private inflight: RefreshRun | null = null;
  /** What callers waiting on `run` share, by their minimum validity (see getAccessToken). */
  private waiting: { run: RefreshRun; byMinimum: Map<number, Promise<Credentials>> } | null = null;
  private abortRefresh: AbortController | null = null;
  private timer: TimerHandle | null = null;
  private sourceFile: string | null = null;
  private stopped = false;
  /** Credentials a failed write could not persist yet; written again on the next wake. */
  private unsaved: Credentials | null = null;
  private fileWork: Promise<void> = Promise.resolve();
  private readonly settleTimers = new Map<'own' | 'qwen-cli', TimerHandle>();
  /**
   * Log lines held from the server's answer to a refresh until its credentials are saved: once
   * the server has rotated the refresh token, nothing may stand between its answer and the save.
   */
  private heldLogs: Array<() => void> | null = null;

  private readonly wording: KeeperWording;

  constructor(private readonly deps: TokenKeeperDeps) {
    super();
    this.wording = deps.wording ?? QWEN_WORDING;
  }

  /** Loads credentials (importing the Qwen CLI's when they are newer) and starts the schedule. */
  async start(): Promise<void> {
    const { ownFile, cliFile, logger } = this.deps;
    const stray = [...(await ownFile.cleanupTempFiles()), ...((await cliFile?.cleanupTempFiles()) ?? [])];
    if (stray.length) logger.warn({ files: stray }, 'removed temporary files left by an interrupted write');
    const own = await ownFile.read();
    const cli = cliFile ? await cliFile.read() : ({ status: 'missing' } as const);
    const ownCreds = own.status === 'ok' ? own.credentials : null;
    const cliCreds = cli.status === 'ok' ? cli.credentials : null;
    const pick = pickAtStart(ownCreds, cliCreds);
    if (pick === 'cli' && cliCreds && cliFile) {
      this.sourceFile = cliFile.path;
      this.dispatch({ type: 'credentials_loaded', credentials: cliCreds });
      logger.info(
        { from: cliFile.path, to: ownFile.path, token: fingerprint(cliCreds.access_token), expiry_date: cliCreds.expiry_date },
        ownCreds ? 'imported newer credentials from the Qwen CLI' : 'imported credentials from the Qwen CLI',
      );
      await this.save(cliCreds, false);
    } else if (pick === 'own' && ownCreds) {
      this.sourceFile = ownFile.path;
      this.dispatch({ type: 'credentials_loaded', credentials: ownCreds });
      logger.info({ from: ownFile.path, token: fingerprint(ownCreds.access_token), expiry_date: ownCreds.expiry_date }, 'loaded credentials');
    } else {
      logger.warn({ path: ownFile.path }, `no credentials yet: run \`${this.wording.loginCommand()}\`${this.wording.otherWays}`);
      this.schedule();
    }
  }

  /** The credentials when they can be served right now, valid longer than `minValidityMs`; else null. */
  servableNow(minValidityMs = 0): Credentials | null {
    const decision = decideTokenRequest(this.state, this.deps.config, this.deps.clock.now(), minValidityMs);
    return decision.action === 'serve' ? this.state.credentials : null;
  }

  /**
   * A token valid for more than `minValidityMs`, refreshing first when needed. Callers waiting
   * on the same refresh with the same minimum share one promise: a thousand calls at once
   * is answered from one settlement, not a thousand chains resumed one step at a time.
   */
  getAccessToken(minValidityMs = 0): Promise<Credentials> {
    const decision = decideTokenRequest(this.state, this.deps.config, this.deps.clock.now(), minValidityMs);
    if (decision.action !== 'refresh') return this.serveOrFail(decision);
    const run = this.refreshNow();
    if (this.waiting?.run !== run) this.waiting = { run, byMinimum: new Map() };
    let shared = this.waiting.byMinimum.get(minValidityMs);
    if (!shared) {
      shared = run.known.then(() => this.serveOrFail(decideTokenRequest(this.state, this.deps.config, this.deps.clock.now(), minValidityMs, true)));
      this.waiting.byMinimum.set(minValidityMs, shared);
    }
    return shared;
  }

  private serveOrFail(decision: TokenDecision): Promise<Credentials> {
    if (decision.action === 'serve' && this.state.credentials) return Promise.resolve(this.state.credentials);
    return Promise.reject(this.unavailableError(decision.action === 'fail' ? decision.reason : 'expired'));
  }

  /**
   * Forces a refresh now, joining one still waiting for the server's answer; resolves once it
   * is saved, throws when it fails.
   */
  async refresh(): Promise<Credentials> {
    if (!this.state.credentials) throw this.unavailableError('no_credentials');
    if (!this.state.credentials.refresh_token) throw new QwenRefreshTokenInvalidError(this.noRefreshTokenMessage());
    // A refresh that already has its answer is not the one asked for: a forced refresh means a
    // new exchange with the server, after that one's writes.
    while (this.inflight?.answered) await this.inflight.finished;
    const outcome = await this.refreshNow().finished;
    if (outcome.ok) return outcome.credentials;
    throw outcome.error;
  }

  /**
   * A token to try instead of `rejected`, which an upstream refused: the current one when it
   * is already another, else a refresh. Null when a refresh ended moments ago
   * (`refreshedRecently`: one failed, or one gave the token refused): refreshing again would
   * not help, the refusal is about something else (a model the account may not use, say), and
   * a refresh per refused request would rotate the refresh token on every call.
   */
  async refreshAfterRejection(rejected: string, minValidityMs = 0): Promise<Credentials | null> {
    while (this.inflight) await this.inflight.finished;
    const creds = this.state.credentials;
    if (!creds) throw this.unavailableError('no_credentials');
    if (creds.access_token !== rejected) return this.getAccessToken(minValidityMs);
    if (this.state.needsLogin) throw this.unavailableError('needs_login');
    if (refreshedRecently(this.state, this.deps.config, this.deps.clock.now())) return null;
    return this.refresh();
  }

  /**
   * Makes freshly logged-in credentials current and persists them. Refused once the keeper is
   * stopped: its profile may be gone (removed, its files deleted), and tokens written now would
   * come back to life in a later profile of the same name.
   */
  async installCredentials(credentials: Credentials): Promise<void> {
    if (this.stopped) {
      throw new QwenOAuthError(`the login's credentials were not saved: the profile stopped before they arrived; run \`${this.wording.loginCommand()}\` again`);
    }
    this.sourceFile = this.deps.ownFile.path;
    this.dispatch({ type: 'credentials_loaded', credentials });
    await this.save(credentials, false);
    this.emit('token_refreshed', credentials);
  }

  /** Forgets the credentials and deletes our file (and the Qwen CLI's when asked). */
  async logout(includeQwenCli: boolean): Promise<string[]> {
    // Let an in-flight refresh end first (aborted, or finishing its write), so it cannot
    // write the credentials back after we delete them.
    this.abortRefresh?.abort();
    await this.inflight?.finished;
    this.unsaved = null;
    this.sourceFile = null;
    this.dispatch({ type: 'credentials_cleared' });
    const removed: string[] = [];
    if (await this.deps.ownFile.remove()) removed.push(this.deps.ownFile.path);
    if (includeQwenCli && this.deps.cliFile && (await this.deps.cliFile.remove())) removed.push(this.deps.cliFile.path);
    this.deps.logger.info({ removed }, 'logged out');
    return removed;
  }

  /**
   * Called when a watched file changed. Outside changes that are fresher are adopted; our own
   * writes, vanished files ("no news") and older credentials are ignored.
   */
  fileChanged(which: 'own' | 'qwen-cli'): Promise<void> {
    // One file event at a time, in order, so two quick changes cannot be applied out of order.
    const work = this.fileWork.then(() => this.adoptFrom(which));
    this.fileWork = work.catch(() => undefined);
    return work;
  }

  /** Re-reads both files now (SIGHUP). */
  async reload(): Promise<void> {
    await this.fileChanged('own');
    if (this.deps.cliFile) await this.fileChanged('qwen-cli');
  }

  snapshot(): KeeperSnapshot {
    const now = this.deps.clock.now();
    return {
      state: phase(this.state, now),
      credentials: this.state.credentials,
      nextRefreshAt: nextRefreshAt(this.state, this.deps.config, now),
      lastRefreshAt: this.state.lastRefreshAt,
      lastError: this.state.lastError,
      retryCount: this.state.failures,
      sourceFile: this.sourceFile,
    };
  }

  /**
   * Stops timers and abandons an in-flight refresh; a credential write in progress completes.
   * `letRefreshFinish`: the keeper is being replaced, not shut down (a profile restarted for a
   * new setting), so a refresh in flight gets its whole HTTP timeout to finish and be saved.
   */
  async stop({ letRefreshFinish = false }: { letRefreshFinish?: boolean } = {}): Promise<void> {
    this.stopped = true;
    this.clearTimer();
    for (const timer of this.settleTimers.values()) this.deps.clock.clearTimeout(timer);
    this.settleTimers.clear();
    // Give a refresh already at the server a moment to finish and be saved: abandoned after
    // the server rotated, it would leave only a retired refresh token on disk.
    const graceMs = letRefreshFinish ? this.deps.config.httpTimeoutMs + STOP_GRACE_MS : STOP_GRACE_MS;
    if (this.inflight) await Promise.race([this.inflight.finished, sleep(graceMs)]);
    this.abortRefresh?.abort();
    await this.inflight?.finished;
    await this.fileWork;
  }

  // ---- internals ----

  /** Why a login without a refresh token cannot be refreshed, and what to do. */
  private noRefreshTokenMessage(): string {
    const creds = this.state.credentials;
    const expiry = creds ? new Date(creds.expiry_date).toISOString() : 'unknown';
    return (
      `${this.wording.issuer} issued no refresh token, so this login lasts only as long as its access token (until ${expiry}): ` +
      `run \`${this.wording.loginCommand()}\` again, and to stay logged in ask for a scope that grants one (such as offline_access)`
    );
  }

  private unavailableError(reason: 'no_credentials' | 'needs_login' | 'expired'): QwenError {
    const login = this.wording.loginCommand();
    if (reason === 'no_credentials') {
      return new QwenTokenNotAvailableError(`not logged in yet: run \`${login}\`${this.wording.otherWays}`);
    }
    if (reason === 'needs_login') {
      if (this.state.credentials && !this.state.credentials.refresh_token && !this.state.needsLogin) {
        return new QwenRefreshTokenInvalidError(this.noRefreshTokenMessage());
      }
      return new QwenRefreshTokenInvalidError(
        `the refresh token was rejected by ${this.wording.issuer} and the access token has expired: run \`${login}\``,
      );
    }
    const last = this.state.lastError;
    const expiry = this.state.credentials ? new Date(this.state.credentials.expiry_date).toISOString() : 'unknown';
    const next = nextRefreshAt(this.state, this.deps.config, this.deps.clock.now());
    const retry = next !== null && next > this.deps.clock.now() ? `; the next attempt is at ${new Date(next).toISOString()}` : '';
    return new QwenTokenExpiredError(
      `the access token expired at ${expiry} and could not be refreshed${last ? ` (${last.message})` : ''}${retry}; ` +
        `check the network, \`${this.wording.statusCommand()}\`, or run \`${login}\``,
    );
  }

  private dispatch(event: LifecycleEvent): void {
    if (this.stopped) return;
    this.state = reduce(this.state, event, this.deps.clock.now());
    this.notePhase();
    this.schedule();
  }

  private notePhase(): void {
    const current = phase(this.state, this.deps.clock.now());
    if (current === this.shownPhase) return;
    const previous = this.shownPhase;
    this.shownPhase = current;
    this.logAfterSave(() => this.deps.logger.info({ state: current, previous }, 'state changed'));
    this.emit('state_changed', { state: current, previous });
  }

  private clearTimer(): void {
    if (this.timer) this.deps.clock.clearTimeout(this.timer);
    this.timer = null;
  }

  private schedule(): void {
    this.clearTimer();
    if (this.stopped) return;
    const now = this.deps.clock.now();
    const at = nextRefreshAt(this.state, this.deps.config, now);
    if (at !== null && at <= now) {
      void this.refreshNow();
      return;
    }
    // Wake at the due time, but at least every MAX_TIMER_MS: timers do not notice wall-clock
    // jumps or a suspended machine, a fresh look at the clock does.
    const creds = this.state.credentials;
    const expiryWake = creds && creds.expiry_date > now ? creds.expiry_date - now : MAX_TIMER_MS;
    const delay = Math.min(at === null ? expiryWake : at - now, MAX_TIMER_MS);
    this.timer = this.deps.clock.setTimeout(() => this.wake(), Math.max(delay, 0));
  }

  private wake(): void {
    this.timer = null;
    if (this.stopped) return;
    this.notePhase();
    // Not during a refresh: its own save supersedes the old record (written after it, the old
    // record would put a retired refresh token on disk).
    if (this.unsaved && !this.inflight) void this.save(this.unsaved, false);
    this.schedule();
  }

  /** Single-flight refresh: every caller during a refresh shares its one HTTP call. */
  private refreshNow(): RefreshRun {
    if (this.inflight) return this.inflight;
    const creds = this.state.credentials;
    if (!creds) {
      const none = Promise.resolve<RefreshOutcome>({ ok: false, error: this.unavailableError('no_credentials') });
      return { known: none, finished: none, answered: false };
    }
    const abort = new AbortController();
    this.abortRefresh = abort;
    this.dispatch({ type: 'refresh_started' });
    let announce!: (outcome: RefreshOutcome) => void;
    const announced = new Promise<RefreshOutcome>((resolve) => (announce = resolve));
    let answered = false;
    const finished = this.runRefresh(creds, abort.signal, (outcome) => {
      answered = true;
      announce(outcome);
    }).finally(() => {
      this.inflight = null;
      this.abortRefresh = null;
      this.schedule();
    });
    const run: RefreshRun = {
      known: Promise.race([announced, finished]),
      finished,
      get answered() {
        return answered;
      },
    };
    this.inflight = run;
    return run;
  }

  private async runRefresh(creds: Credentials, signal: AbortSignal, announce: (outcome: RefreshOutcome) => void): Promise<RefreshOutcome> {
    const { logger } = this.deps;
    const used = creds.refresh_token;
    // (Typed by assertion: it is set inside the closure, which control-flow analysis does not follow.)
    let published = null as { credentials: Credentials; via: 'http' | 'qwen-cli'; taken: boolean } | null;
    // Called with the new credentials before they are written: from here on they are current,
    // waiting callers get them and subscribers are told. Nothing here may keep the save from
    // happening: a listener's exception is logged, not thrown. False when they are not taken:
    // a login or another file replaced the grant while the refresh was at the server.
    const publish = (credentials: Credentials, via: 'http' | 'qwen-cli'): boolean => {
      // As the lifecycle decides it (`reduce`), and also once stopping, when it records nothing
      // more but a refresh the server has answered must still be saved.
      const taken = this.state.credentials?.refresh_token === used;
      this.dispatch({ type: 'refresh_succeeded', credentials, usedRefreshToken: used });
      published = { credentials, via, taken };
      announce({ ok: true, credentials: taken ? credentials : (this.state.credentials ?? credentials) });
      if (this.stopped || !taken) return taken;
      try {
        this.emit('token_refreshed', credentials);
      } catch (err) {
        logger.error({ err: errorText(err) }, 'a token_refreshed listener failed');
      }
      return true;
    };
    try {
      await this.refreshOnce(creds, signal, publish);
    } catch (err) {
      this.releaseLogs();
      // Only releasing the Qwen CLI's lock can fail once the credentials were published.
      if (!published) return this.refreshFailed(err, used);
      logger.warn({ err: errorText(err) }, 'the refresh succeeded, but cleaning up after it failed');
    }
    this.releaseLogs();
    if (!published) return this.refreshFailed(new Error('the refresh ended without credentials'), used);
    const { credentials, via, taken } = published;
    if (!taken) {
      logger.info(
        { token: fingerprint(credentials.access_token), via },
        'a refresh ended after new credentials replaced the ones it refreshed; its result was dropped',
      );
      const current = this.state.credentials;
      return current ? { ok: true, credentials: current } : { ok: false, error: this.unavailableError('no_credentials') };
    }
    logger.info(
      { token: fingerprint(credentials.access_token), expiry_date: credentials.expiry_date, via, rotated: credentials.refresh_token !== used },
      via === 'http' ? 'token refreshed' : 'token already refreshed by the Qwen CLI; adopted it',
    );
    return { ok: true, credentials };
  }

  /** A refresh that failed: rescue from the files if the token was rejected, else record and retry later. */
  private async refreshFailed(err: unknown, used: string): Promise<RefreshOutcome> {
    const { logger } = this.deps;
    const error = toQwenError(err);
    const terminal = error instanceof QwenRefreshTokenInvalidError;
    if (this.stopped) return { ok: false, error };
    // Another process may hold a newer refresh token: look once before giving up.
    const rescued = terminal
      ? await this.rescueFromFiles(used).catch((rescueErr: unknown) => {
          logger.warn({ err: errorText(rescueErr) }, 'could not look for a newer refresh token on disk');
          return null;
        })
      : null;
    // With rescued credentials current, this failure concerns a retired refresh token: the
    // lifecycle records it without counting it (and the refresh is over either way).
    this.dispatch({ type: 'refresh_failed', error: { code: error.code, message: error.message }, terminal, usedRefreshToken: used });
    if (rescued) return { ok: true, credentials: rescued };
    const snap = this.snapshot();
    if (terminal) {
      logger.error({ code: error.code, state: snap.state }, `refresh token rejected, stopping auto-refresh: ${error.message}; run \`${this.wording.loginCommand()}\``);
    } else {
      logger.warn(
        { code: error.code, state: snap.state, retry_count: snap.retryCount, next_retry_at: snap.nextRefreshAt },
        `refresh failed, will retry: ${error.message}`,
      );
    }
    this.emit('refresh_failed', { error, state: snap.state, nextRetryAt: snap.nextRefreshAt });
    return { ok: false, error };
  }

  /**
   * One refresh. When the Qwen CLI's file holds the same refresh token, the refresh runs
   * inside the CLI's own lock, and is skipped if the CLI refreshed meanwhile.
   */
  private async refreshOnce(
    creds: Credentials,
    signal: AbortSignal,
    publish: (credentials: Credentials, via: 'http' | 'qwen-cli') => boolean,
  ): Promise<void> {
    const { config, logger } = this.deps;
    // A Qwen CLI file that cannot be read (refused for its permissions, say) is no link: our
    // own refresh token does not depend on it.
    const outside = await this.readQwenCliFile({ settling: true });
    const cliFile = outside ? this.deps.cliFile : null;
    const theirs = outside?.status === 'ok' ? outside.credentials : null;
    if (cliFile && theirs && theirs.refresh_token !== creds.refresh_token && theirs.expiry_date > creds.expiry_date) {
      // The Qwen CLI refreshed (or logged in) and its file event has not reached us yet:
      // refreshing now would present a refresh token it has just retired. Take its result.
      this.sourceFile = cliFile.path;
      if (publish(theirs, 'qwen-cli')) await this.save(theirs, false);
      return;
    }
    if (!cliFile || theirs?.refresh_token !== creds.refresh_token) {
      const fresh = await this.httpRefresh(creds, signal);
      if (publish(fresh, 'http')) await this.save(fresh, false);
      return;
    }
    const lockOptions = {
      staleMs: config.qwenCliLockStaleMs,
      // Long enough to outwait a lock abandoned by a killed process.
      acquireTimeoutMs: config.qwenCliLockStaleMs + 5_000,
      // Staleness compares with real file mtimes: always the system clock, even under a test clock.
      clock: systemClock,
      logger,
      signal,
    };
    return withQwenCliLock(config.qwenCliLockPath, lockOptions, async () => {
      const inside = (await this.readQwenCliFile()) ?? { status: 'missing' as const };
      if (inside.status === 'ok') {
        const theirs = inside.credentials;
        const now = this.deps.clock.now();
        const refreshedByCli =
          theirs.refresh_token !== creds.refresh_token ||
          (theirs.expiry_date > creds.expiry_date && theirs.expiry_date - now > config.refreshLeadMs);
        if (refreshedByCli && theirs.expiry_date > now) {
          this.sourceFile = cliFile.path;
          if (publish(theirs, 'qwen-cli')) await this.save(theirs, false);
          return;
        }
      }
      const fresh = await this.httpRefresh(creds, signal);
      const taken = publish(fresh, 'http');
      // Write back where the token came from: a copy of a retired refresh token left in the
      // CLI's file would make the CLI fail (and delete its file) on its next refresh. The
      // write happens inside the CLI's lock, so the CLI never refreshes from the old file.
      // That holds even when a login replaced our credentials meanwhile: the CLI keeps its grant.
      const alsoQwenCli = inside.status === 'ok' && inside.credentials.refresh_token === creds.refresh_token;
      if (taken) await this.save(fresh, alsoQwenCli);
      else if (alsoQwenCli) await this.saveQwenCliOnly(fresh);
    });
  }

  private async httpRefresh(creds: Credentials, signal: AbortSignal): Promise<Credentials> {
    const grant = await this.deps.oauth.refreshTokenGrant(creds.refresh_token, signal);
    // The server may have rotated the refresh token: log nothing more until it is saved.
    this.heldLogs ??= [];
    const refused = grant.rejected_resource_url;
    if (refused) {
      this.logAfterSave(() =>
        this.deps.logger.warn({ reason: refused }, `ignoring the resource_url of the token response (${refused}); clients use the default chat base URL`),
      );
    }
    return credentialsFromGrant(grant, creds, this.deps.clock.now());
  }

  /** Logs now, or once the refresh in progress is saved (see `heldLogs`). */
  private logAfterSave(line: () => void): void {
    if (this.heldLogs) this.heldLogs.push(line);
    else line();
  }

  /** Writes the log lines held during a refresh. */
  private releaseLogs(): void {
    const held = this.heldLogs;
    this.heldLogs = null;
    for (const line of held ?? []) line();
  }

  /** Before declaring needs_login: adopt a different, usable refresh token from either file. */
  private async rescueFromFiles(rejected: string): Promise<Credentials | null> {
    const files = [this.deps.ownFile, this.deps.cliFile].filter((f): f is CredentialFile => f !== null);
    for (const file of files) {
      const read = await file.read();
      if (read.status !== 'ok' || read.credentials.refresh_token === rejected) continue;
      const creds = read.credentials;
      this.sourceFile = file.path;
      this.dispatch({ type: 'credentials_loaded', credentials: creds });
      this.deps.logger.info({ from: file.path, token: fingerprint(creds.access_token) }, 'refresh token rejected, but a newer one was found on disk; adopted it');
      if (file !== this.deps.ownFile) await this.save(creds, false);
      this.emit('token_refreshed', creds);
      return creds;
    }
    return null;
  }

  private async adoptFrom(which: 'own' | 'qwen-cli', settled = false): Promise<void> {
    // A refresh whose credentials are current but not yet written: judge the file after that
    // write, so memory and disk cannot end up disagreeing.
    while (this.inflight?.answered) await this.inflight.finished;
    if (this.stopped) return;
    const file = which === 'own' ? this.deps.ownFile : this.deps.cliFile;
    if (!file) return;
    let read: Awaited<ReturnType<CredentialFile['read']>>;
    try {
      read = await file.read({ settling: !settled });
    } catch (err) {
      // Unreadable or refused (another user's file, a FIFO): nothing to adopt, and said why.
      this.deps.logger.warn({ path: file.path, err: errorText(err) }, `not adopting a change of ${file.path}: ${errorText(err)}`);
      return;
    }
    if (read.status === 'corrupt' && !settled) {
      // Possibly caught mid-write by a writer that does not rename into place: judge it
      // (and move a corrupt own file aside) only once it has stopped changing.
      this.recheckWhenSettled(which);
      return;
    }
    // A vanished file is no news: the Qwen CLI deletes its file after a failed refresh,
    // which says nothing about the credentials we hold.
    if (read.status !== 'ok') return;
    if (file.isOwnWrite(read.text)) return;
    const current = this.state.credentials;
    if (sameCredentials(current, read.credentials)) return;
    if (!shouldAdopt(current, this.state.credentialsSince, read.credentials, read.mtimeMs)) {
      this.deps.logger.debug({ path: file.path }, 'ignored a credential file change that is not newer than ours');
      return;
    }
    this.sourceFile = file.path;
    this.dispatch({ type: 'credentials_loaded', credentials: read.credentials });
    this.deps.logger.info(
      { from: file.path, token: fingerprint(read.credentials.access_token), expiry_date: read.credentials.expiry_date },
      'adopted newer credentials written by another process',
    );
    if (which === 'qwen-cli') await this.save(read.credentials, false);
    this.emit('token_refreshed', read.credentials);
  }

  private recheckWhenSettled(which: 'own' | 'qwen-cli'): void {
    const pending = this.settleTimers.get(which);
    if (pending) this.deps.clock.clearTimeout(pending);
    const timer = this.deps.clock.setTimeout(() => {
      this.settleTimers.delete(which);
      const work = this.fileWork.then(() => this.adoptFrom(which, true));
      this.fileWork = work.catch(() => undefined);
    }, SETTLE_MS);
    timer.unref?.();
    this.settleTimers.set(which, timer);
  }

  /** Writes our file (and the Qwen CLI's when asked). A failed write keeps the token in memory and retries later. */
  private async save(credentials: Credentials, alsoQwenCli: boolean): Promise<void> {
    const { ownFile, logger } = this.deps;
    // The Qwen CLI's file first: a crash between the two writes then leaves the newer
    // credentials in the CLI's file, which the next start imports into ours (the later
    // expiry wins). The other order would leave the CLI on a retired refresh token.
    if (alsoQwenCli) await this.saveQwenCliOnly(credentials);
    try {
      await ownFile.write(credentials);
      // Anything older that failed to save is superseded by what was just written.
      this.unsaved = null;
    } catch (err) {
      this.unsaved = credentials;
      logger.error({ path: ownFile.path, err: errorText(err) }, 'could not save credentials; keeping them in memory and retrying');
    }
  }

  /** Writes the Qwen CLI's file alone; a failure is logged (after the refresh's own lines). */
  private async saveQwenCliOnly(credentials: Credentials): Promise<void> {
    const { cliFile, logger } = this.deps;
    if (!cliFile) return;
    try {
      await cliFile.write(credentials);
    } catch (err) {
      this.logAfterSave(() => logger.error({ path: cliFile.path, err: errorText(err) }, "could not update the Qwen CLI's credential file"));
    }
  }

  /**
   * The Qwen CLI's file as a refresh sees it; null when there is none to link with: no CLI
   * file configured, or one that cannot be read (refused, say), which is logged and otherwise
   * leaves the refresh of our own token alone.
   */
  private async readQwenCliFile(options?: { settling: boolean }): Promise<Awaited<ReturnType<CredentialFile['read']>> | null> {
    const { cliFile, logger } = this.deps;
    if (!cliFile) return null;
    try {
      return await cliFile.read(options);
    } catch (err) {
      logger.warn({ path: cliFile.path, err: errorText(err) }, `refreshing without the Qwen CLI's file, which cannot be read: ${errorText(err)}`);
      return null;
    }
  }
}
