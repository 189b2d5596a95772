/**
 * Wires the daemon together: instance lock, credential files, token keeper, file watcher,
 * device login and the socket server with its method handlers.
 */
import type { Clock } from '../shared/clock.js';
import type { TokendConfig } from '../shared/config.js';
import { chatBaseUrl, type Credentials } from '../shared/credentials.js';
import { fingerprint } from '../shared/fingerprint.js';
import {
  EmptyParams,
  GetAccessTokenParams,
  HelloParams,
  LogoutParams,
  Methods,
  Notifications,
  PROTOCOL_VERSION,
  type StatusResult,
  type TokenResult,
} from '../shared/protocol.js';
import { packageVersion } from '../shared/package.js';
import { compileSchemas } from '../shared/compile-schemas.js';
import { CredentialFile } from './credential-store.js';
import { CredentialWatcher } from './credential-watch.js';
import { DeviceLogin } from './device-login.js';
import { acquireInstanceLock, type InstanceLock } from './instance-lock.js';
import { IpcServer } from './ipc-server.js';
import { rpcMethod, type RpcMethod } from './rpc-dispatcher.js';
import type { Logger } from './logger.js';
import { QwenOAuthClient, TokenResponseSchema } from './oauth.js';
import { TokenKeeper } from './token-keeper.js';
import { Gateway } from './gateway/gateway.js';
import { keeperProfile, singleProfile } from './gateway/keeper-profile.js';
import { resolveGatewayEnv } from './gateway/limits.js';
import { gatewayMethods } from './gateway/rpc.js';

/** How long a state change must hold before subscribers are told (see the state_changed wiring). */
const STATE_SETTLE_MS = 250;

export interface DaemonOptions {
  config: TokendConfig;
  logger: Logger;
  clock: Clock;
  platform?: NodeJS.Platform;
  /** Called if the instance lock is lost while running (another daemon took over). */
  onFatal?: (err: Error) => void;
}

export interface RunningDaemon {
  keeper: TokenKeeper;
  server: IpcServer;
  /** Re-reads the credential files (SIGHUP). */
  reload(): Promise<void>;
  /** Stops everything in order; safe to call twice. */
  close(): Promise<void>;
}

/** Built once per credential record (frozen, so the socket server serializes it once too). */
const tokenResults = new WeakMap<Credentials, TokenResult>();

/** What clients receive for a token: the record plus the chat API's base URL. */
export function tokenResult(c: Credentials): TokenResult {
  const cached = tokenResults.get(c);
  if (cached) return cached;
  const result: TokenResult = {
    access_token: c.access_token,
    token_type: c.token_type,
    expiry_date: c.expiry_date,
    base_url: chatBaseUrl(c.resource_url),
  };
  if (c.resource_url) result.resource_url = c.resource_url;
  Object.freeze(result);
  tokenResults.set(c, result);
  return result;
}

/** Starts the daemon; resolves once the socket listens (the moment to report readiness). */
export async function startDaemon(options: DaemonOptions): Promise<RunningDaemon> {
  const { config, logger, clock } = options;
  const startedAt = clock.now();
  const version = packageVersion();
  const instance: InstanceLock = await acquireInstanceLock(config.stateDir, config.socketPath, logger, (err) => {
    logger.fatal({ err: err.message }, 'lost the instance lock (another daemon may have taken over); shutting down');
    options.onFatal?.(err);
  });
  const cleanups: Array<() => Promise<void>> = [() => instance.release()];
  const closeAll = async () => {
    for (const cleanup of cleanups.splice(0).reverse()) {
      await cleanup().catch((err: Error) => logger.warn({ err: err.message }, 'error during shutdown'));
    }
  };
  try {
    // A resource_url from a file or a token response is checked where it comes in (see shared/url-trust.ts).
    const chatUrlPolicy = { oauthBaseUrl: config.oauthBaseUrl, trustedHosts: config.trustedChatHosts };
    const ownFile = new CredentialFile(config.tokenPath, { logger, clock, moveCorruptAside: true, ownsDirectory: true, label: 'own', chatUrlPolicy });
    const cliFile = config.qwenCliSync
      ? new CredentialFile(config.qwenCliCredsPath, { logger, clock, moveCorruptAside: false, ownsDirectory: false, label: 'qwen-cli', chatUrlPolicy })
      : null;
    const oauth = new QwenOAuthClient({
      baseUrl: config.oauthBaseUrl,
      clientId: config.clientId,
      scope: config.scope,
      timeoutMs: config.httpTimeoutMs,
      trustedChatHosts: config.trustedChatHosts,
    });
    const keeper = new TokenKeeper({ config, oauth, ownFile, cliFile, clock, logger });
    const login = new DeviceLogin(oauth, clock, logger, (creds) => keeper.installCredentials(creds), { serverUrl: config.oauthBaseUrl });

    await keeper.start();
    cleanups.push(() => keeper.stop());
    cleanups.push(() => login.stop());

    const watcher = new CredentialWatcher(
      [
        { path: ownFile.path, onChange: () => void keeper.fileChanged('own') },
        ...(cliFile ? [{ path: cliFile.path, onChange: () => void keeper.fileChanged('qwen-cli') }] : []),
      ],
      logger,
    );
    await watcher.start();
    cleanups.push(() => watcher.close());

    // The HTTP gateway (daemon/gateway/): today over the built-in `qwen` profile alone.
    const gateway = new Gateway({
      profiles: singleProfile(keeperProfile(keeper, `qwen-tokend/${version}`)),
      env: resolveGatewayEnv(process.env, config.socketPath, config.home),
      stateDir: config.stateDir,
      logger,
      platform: options.platform,
    });

    let server: IpcServer;
    const answers = new WeakMap<Promise<Credentials>, Promise<TokenResult>>();
    const methods: Record<string, RpcMethod> = {
      [Methods.hello]: rpcMethod(HelloParams, () => ({ protocol: PROTOCOL_VERSION, daemon: 'qwen-tokend', version, pid: process.pid })),
      [Methods.getAccessToken]: rpcMethod(GetAccessTokenParams, ({ minValidityMs = 0 }) => {
        // The common case, a token valid long enough, is answered without a promise.
        const ready = keeper.servableNow(minValidityMs);
        if (ready) return tokenResult(ready);
        // Callers waiting on one refresh share the keeper's promise; they share its answer too.
        const waiting = keeper.getAccessToken(minValidityMs);
        let answer = answers.get(waiting);
        if (!answer) {
          answer = waiting.then(tokenResult);
          answers.set(waiting, answer);
        }
        return answer;
      }),
      [Methods.refresh]: rpcMethod(EmptyParams, async () => tokenResult(await keeper.refresh())),
      [Methods.status]: rpcMethod(EmptyParams, (): StatusResult => {
        const snap = keeper.snapshot();
        return {
          state: snap.state,
          expiry_date: snap.credentials?.expiry_date ?? null,
          next_refresh_at: snap.nextRefreshAt,
          last_refresh_at: snap.lastRefreshAt,
          // A failed login counts too: it is often the first error a new user meets.
          last_error: newestError(snap.lastError, login.lastFailure),
          retry_count: snap.retryCount,
          source_file: snap.sourceFile,
          token_path: config.tokenPath,
          qwen_cli_link: { enabled: config.qwenCliSync, path: config.qwenCliCredsPath },
          token_fingerprint: fingerprint(snap.credentials?.access_token),
          refresh_token_fingerprint: fingerprint(snap.credentials?.refresh_token),
          login_in_progress: login.inProgress,
          pid: process.pid,
          version,
          protocol: PROTOCOL_VERSION,
          uptime_ms: clock.now() - startedAt,
          connected_clients: server.connectionCount,
          requests_served: server.requestsServed,
          socket_path: config.socketPath,
          now: clock.now(),
          gateway: gateway.status(),
        };
      }),
      [Methods.loginStart]: rpcMethod(EmptyParams, () => login.start()),
      [Methods.loginCancel]: rpcMethod(EmptyParams, () => ({ cancelled: login.cancel() })),
      [Methods.logout]: rpcMethod(LogoutParams, async ({ qwenCli = false }) => ({ removed: await keeper.logout(qwenCli) })),
      [Methods.subscribe]: rpcMethod(EmptyParams, (_params, conn) => {
        conn.subscribed = true;
        return { subscribed: true };
      }),
      ...gatewayMethods(gateway),
    };
    server = new IpcServer({
      socketPath: config.socketPath,
      logger,
      methods,
      platform: options.platform,
      silentConnectionTimeoutMs: config.silentConnectionTimeoutMs,
    });

    // Pushed once the callers waiting on this refresh have their answers (those leave from
    // promise callbacks, before this immediate): a waiting caller gets the token first, and the
    // push's wake-ups of a thousand subscribers do not stand between the refresh and them.
    keeper.on('token_refreshed', (creds) => setImmediate(() => server.broadcast(Notifications.tokenRefreshed, tokenResult(creds))));
    keeper.on('refresh_failed', ({ error, state, nextRetryAt }) =>
      server.broadcast(Notifications.tokenRefreshFailed, { code: error.code, message: error.message, state, next_retry_at: nextRetryAt }),
    );
    // State changes are announced settled: coalesced over STATE_SETTLE_MS, so a quick refresh
    // (valid → refreshing → valid) costs subscribers one push (token.refreshed), not three,
    // and never sits between a refresh and its HTTP call.
    let announced = keeper.snapshot().state;
    let settleTimer: NodeJS.Timeout | null = null;
    keeper.on('state_changed', () => {
      settleTimer ??= setTimeout(() => {
        settleTimer = null;
        const state = keeper.snapshot().state;
        if (state === announced) return;
        server.broadcast(Notifications.stateChanged, { state, previous: announced });
        announced = state;
      }, STATE_SETTLE_MS);
      settleTimer.unref();
    });
    cleanups.push(async () => {
      if (settleTimer) clearTimeout(settleTimer);
    });
    login.on('completed', (creds) => server.broadcast(Notifications.loginCompleted, { expiry_date: creds.expiry_date }));
    login.on('failed', (err) => server.broadcast(Notifications.loginFailed, { code: err.code, message: err.message }));

    await server.listen();
    // The first refresh response is checked at once, not after its schema is built.
    setImmediate(() => compileSchemas([TokenResponseSchema])).unref();
    // Stop accepting clients first, so none is cut off in the middle of a shutdown.
    cleanups.push(() => server.close());
    await gateway.start();
    cleanups.push(() => gateway.close());

    let closing: Promise<void> | null = null;
    return {
      keeper,
      server,
      reload: () => keeper.reload(),
      close: () => (closing ??= closeAll()),
    };
  } catch (err) {
    await closeAll();
    throw err;
  }
}

/** The more recent of two recorded errors (either may be null). */
function newestError<T extends { at: number }>(a: T | null, b: T | null): T | null {
  if (a === null) return b;
  if (b === null) return a;
  return b.at > a.at ? b : a;
}
