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
import { credentialsFromGrant, type QwenOAuthClient } from './oauth.js';

export interface DeviceLoginEvents {
  completed: [Credentials];
  failed: [QwenError];
}

interface Running {
  abort: AbortController;
  started: LoginStartResult;
  done: Promise<void>;
}

export class DeviceLogin extends EventEmitter<DeviceLoginEvents> {
  private running: Running | null = null;

  constructor(
    private readonly oauth: Pick<QwenOAuthClient, 'deviceAuthorizationRequest' | 'waitForDeviceToken'>,
    private readonly clock: Clock,
    private readonly logger: Logger,
    /** Makes the new credentials current and persists them. */
    private readonly install: (credentials: Credentials) => Promise<void>,
  ) {
    super();
  }

  get inProgress(): boolean {
    return this.running !== null;
  }

  /**
   * Starts a device flow, or returns the one already running so two terminals show the same
   * code instead of racing each other.
   */
  async start(): Promise<LoginStartResult> {
    if (this.running) return this.running.started;
    const abort = new AbortController();
    const auth = await this.oauth.deviceAuthorizationRequest(abort.signal);
    if (this.running) return (this.running as Running).started;
    const started: LoginStartResult = {
      user_code: auth.user_code,
      verification_uri: auth.verification_uri,
      verification_uri_complete: auth.verification_uri_complete,
      expires_in: auth.expires_in,
      interval: auth.interval,
    };
    this.logger.info({ verification_uri: auth.verification_uri, expires_in: auth.expires_in }, 'login started; waiting for the user to approve');
    const done = (async () => {
      try {
        const grant = await this.oauth.waitForDeviceToken(auth, { clock: this.clock, signal: abort.signal });
        const credentials = credentialsFromGrant(grant, null, this.clock.now());
        await this.install(credentials);
        this.logger.info({ expiry_date: credentials.expiry_date }, 'login completed');
        // Reported after the save, like every line that follows a token response.
        if (grant.rejected_resource_url) {
          this.logger.warn({ reason: grant.rejected_resource_url }, `ignoring the resource_url of the token response (${grant.rejected_resource_url}); clients use the default chat base URL`);
        }
        this.emit('completed', credentials);
      } catch (err) {
        const error = err instanceof QwenError ? err : new QwenOAuthError(`login failed: ${(err as Error).message}`);
        this.logger.warn({ code: error.code }, `login failed: ${error.message}`);
        this.emit('failed', error);
      } finally {
        this.running = null;
      }
    })();
    this.running = { abort, started, done };
    return started;
  }

  /** Cancels the running flow; false when none was running. */
  cancel(): boolean {
    if (!this.running) return false;
    this.running.abort.abort();
    return true;
  }

  async stop(): Promise<void> {
    const running = this.running;
    if (!running) return;
    running.abort.abort();
    await running.done;
  }
}
