/**
 * The device-code login, run inside the daemon so the new credentials have one owner from the
 * first second. A client starts it (`login.start`), shows the user code, and waits for
 * `login.completed` / `login.failed`.
 */
import { EventEmitter } from 'node:events';
import type { Clock } from '../shared/clock.js';
import type { Credentials } from '../shared/credentials.js';
import { QwenError, QwenOAuthError } from '../shared/errors.js';
import type { LoginStartResult } from '../shared/protocol.js';
import type { Logger } from './logger.js';
import { cancelled, credentialsFromGrant, NETWORK_ADVICE, type DeviceAuthorization, type QwenOAuthClient } from './oauth.js';
import { errorText } from '../shared/diagnostics.js';

export interface DeviceLoginEvents {
  completed: [Credentials];
  failed: [QwenError];
}

/** The last failed login, as `status` shows it in `last_error`. */
export interface LoginFailure {
  code: string;
  message: string;
  at: number;
}

export interface DeviceLoginOptions {
  /** The OAuth server's base URL (QWEN_OAUTH_BASE_URL), named when a login cannot start. */
  serverUrl?: string;
  /** What to check when the server cannot be reached (default: the Qwen advice, NETWORK_ADVICE). */
  networkAdvice?: string;
  /** Accept a grant without a refresh token (a provider that issues none); the login then lasts one token. */
  allowNoRefreshToken?: boolean;
}

/** The URL as a person should see it in a message: no credentials, no query, no trailing slash. */
function displayUrl(url: string): string {
  try {
    const u = new URL(url);
    return `${u.origin}${u.pathname}`.replace(/\/+$/, '');
  } catch {
    return url;
  }
}

function isCancellation(error: QwenError): boolean {
  return error instanceof QwenOAuthError && error.oauthError === 'cancelled';
}

interface Running {
  abort: AbortController;
  /** The code to show; settles when the device authorization request does. */
  started: Promise<LoginStartResult>;
  /** Settles when the flow is over (its outcome emitted, or its start failed). */
  done: Promise<void>;
}

/** The error a flow ends with once `signal` aborted: the reason `stop` gave, else `error` (a cancellation). */
function endedBy(signal: AbortSignal, error: QwenError): QwenError {
  return signal.aborted && signal.reason instanceof QwenError ? signal.reason : error;
}

export class DeviceLogin extends EventEmitter<DeviceLoginEvents> {
  private running: Running | null = null;
  private failure: LoginFailure | null = null;
  /** Set by `stop`: why this login will not run again. */
  private stopReason: QwenError | null = null;

  constructor(
    private readonly oauth: Pick<QwenOAuthClient, 'deviceAuthorizationRequest' | 'waitForDeviceToken'>,
    private readonly clock: Clock,
    private readonly logger: Logger,
    /** Makes the new credentials current and persists them. */
    private readonly install: (credentials: Credentials) => Promise<void>,
    private readonly options: DeviceLoginOptions = {},
  ) {
    super();
  }

  get inProgress(): boolean {
    return this.running !== null;
  }

  /** The last login that failed (not one the user cancelled), until a login completes. */
  get lastFailure(): LoginFailure | null {
    return this.failure;
  }

  /** Logs a failed login once and keeps it for `status`; a cancelled one is only logged. */
  private recordFailure(error: QwenError, message = error.message): void {
    if (isCancellation(error)) {
      this.logger.info({ code: error.code }, `login cancelled: ${error.message}`);
      return;
    }
    this.failure = { code: error.code, message, at: this.clock.now() };
    this.logger.warn({ code: error.code, ...(this.options.serverUrl ? { server: displayUrl(this.options.serverUrl) } : {}) }, message);
  }

  /**
   * The error for a device authorization request that failed: says where it went (the host
   * is what a wrong QWEN_OAUTH_BASE_URL or a DNS problem gets wrong) and, for transport
   * failures, what to check.
   */
  private startFailure(err: unknown): QwenError {
    const where = this.options.serverUrl ? ` at ${displayUrl(this.options.serverUrl)}` : '';
    const cause = errorText(err);
    if (!(err instanceof QwenOAuthError)) {
      return err instanceof QwenError ? err : new QwenOAuthError(`login failed: could not start the device flow${where}: ${cause}`);
    }
    if (isCancellation(err)) return err;
    const networkAdvice = this.options.networkAdvice ?? NETWORK_ADVICE;
    const advice = err.retryable && networkAdvice && !cause.includes(networkAdvice) ? `; ${networkAdvice}` : '';
    return new QwenOAuthError(`login failed: could not start the device flow${where}: ${cause}${advice}`, {
      oauthError: err.oauthError,
      status: err.status,
      retryable: err.retryable,
    });
  }

  /**
   * Starts a device flow, or returns the one already running so two terminals show the same
   * code instead of racing each other. The flow is running from the moment the device
   * authorization request is sent, so `cancel` and `stop` reach that request too: a flow that
   * outlived its profile would go on to log in a profile that is gone.
   */
  start(): Promise<LoginStartResult> {
    if (this.running) return this.running.started;
    if (this.stopReason) return Promise.reject(this.stopReason);
    const abort = new AbortController();
    let authorized!: (auth: DeviceAuthorization) => void;
    let refused!: (error: QwenError) => void;
    const started = new Promise<LoginStartResult>((resolve, reject) => {
      authorized = (auth) =>
        resolve({
          user_code: auth.user_code,
          verification_uri: auth.verification_uri,
          verification_uri_complete: auth.verification_uri_complete,
          expires_in: auth.expires_in,
          interval: auth.interval,
        });
      refused = reject;
    });
    const running: Running = { abort, started, done: Promise.resolve() };
    this.running = running;
    running.done = (async () => {
      try {
        let auth: DeviceAuthorization;
        try {
          auth = await this.oauth.deviceAuthorizationRequest(abort.signal);
        } catch (err) {
          const error = endedBy(abort.signal, this.startFailure(err));
          this.recordFailure(error);
          refused(error);
          return;
        }
        if (abort.signal.aborted) {
          refused(endedBy(abort.signal, cancelled('the login was cancelled')));
          return;
        }
        authorized(auth);
        this.logger.info({ verification_uri: auth.verification_uri, expires_in: auth.expires_in }, 'login started; waiting for the user to approve');
        await this.finish(auth, abort.signal);
      } finally {
        if (this.running === running) this.running = null;
      }
    })();
    return started;
  }

  /** Polls until the user approves, installs the credentials, and emits the outcome. */
  private async finish(auth: DeviceAuthorization, signal: AbortSignal): Promise<void> {
    try {
      const grant = await this.oauth.waitForDeviceToken(auth, { clock: this.clock, signal });
      const credentials = credentialsFromGrant(grant, null, this.clock.now(), { allowNoRefreshToken: this.options.allowNoRefreshToken === true });
      // Stopped while the approval was on its way: the credentials belong to no one now.
      if (signal.aborted) throw cancelled('the login was cancelled');
      await this.install(credentials);
      this.failure = null;
      this.logger.info({ expiry_date: credentials.expiry_date }, 'login completed');
      // Reported after the save, like every line that follows a token response.
      if (grant.rejected_resource_url) {
        this.logger.warn({ reason: grant.rejected_resource_url }, `ignoring the resource_url of the token response (${grant.rejected_resource_url}); clients use the default chat base URL`);
      }
      this.emit('completed', credentials);
    } catch (err) {
      const caught = err instanceof QwenError ? err : new QwenOAuthError(`login failed: ${errorText(err)}`);
      const error = endedBy(signal, caught);
      this.recordFailure(error, error.message.startsWith('login failed') || error === signal.reason ? error.message : `login failed: ${error.message}`);
      this.emit('failed', error);
    }
  }

  /** Cancels the running flow; false when none was running. */
  cancel(): boolean {
    if (!this.running) return false;
    this.running.abort.abort();
    return true;
  }

  /**
   * Ends the flow for good (its profile is stopped): a running flow, or one still asking for its
   * code, ends with `reason` (`login.start` rejects with it, or `failed` carries it), and no
   * later `start` begins another.
   */
  async stop(reason: QwenError): Promise<void> {
    this.stopReason ??= reason;
    const running = this.running;
    if (!running) return;
    running.abort.abort(this.stopReason);
    await running.done;
  }
}
