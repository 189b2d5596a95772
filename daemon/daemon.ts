/**
 * Wires the daemon together: instance lock, the credential profiles (profile-registry.ts), the
 * socket server with its method handlers, and the HTTP gateway.
 *
 * Protocol versions: a connection speaks the version its `hello` named (version 1 until then,
 * for pushes; `profile` params are accepted either way). Version 1 sees only the default
 * profile, in version 1's shapes: an API key's `expiry_date` is a number and its state `valid`.
 */
import type { Clock } from '../shared/clock.js';
import type { TokendConfig } from '../shared/config.js';
import { errorText } from '../shared/diagnostics.js';
import {
  GetAccessTokenParams,
  HelloParams,
  LogoutParams,
  MIN_PROTOCOL_VERSION,
  Methods,
  Notifications,
  PROTOCOL_VERSION,
  ProfileParams,
  ProfilesAddParams,
  ProfilesRemoveParams,
  ProfilesSetDefaultParams,
  SubscribeParams,
  EmptyParams,
  type ProfilesListResult,
  type StatusResult,
  type TokenResult,
} from '../shared/protocol.js';
import { packageVersion } from '../shared/package.js';
import { compileSchemas } from '../shared/compile-schemas.js';
import { acquireInstanceLock, type InstanceLock } from './instance-lock.js';
import { IpcServer } from './ipc-server.js';
import { rpcMethod, type RpcConnection, type RpcMethod } from './rpc-dispatcher.js';
import type { Logger } from './logger.js';
import { TokenResponseSchema } from './oauth.js';
import { DeviceFlowClient } from './oauth-device.js';
import type { DeviceFlowFactory } from './profile-oauth.js';
import { ProfileRegistry } from './profile-registry.js';
import { v1State, v1Token, type ProfileRuntime } from './profile-runtime.js';
import type { TokenKeeper } from './token-keeper.js';
import { Gateway } from './gateway/gateway.js';
import { registryProfiles } from './gateway/registry-profiles.js';
import { resolveGatewayEnv } from './gateway/limits.js';
import { gatewayMethods } from './gateway/rpc.js';

export interface DaemonOptions {
  config: TokendConfig;
  logger: Logger;
  clock: Clock;
  platform?: NodeJS.Platform;
  /** Called if the instance lock is lost while running (another daemon took over). */
  onFatal?: (err: Error) => void;
  /** Makes the OAuth client of an `oauth-device` profile (default: DeviceFlowClient). */
  createDeviceFlow?: DeviceFlowFactory;
}

export interface RunningDaemon {
  /** The built-in profile's token owner. */
  keeper: TokenKeeper;
  profiles: ProfileRegistry;
  server: IpcServer;
  /** Re-reads the credential files and the config file (SIGHUP). */
  reload(): Promise<void>;
  /** Stops everything in order; safe to call twice. */
  close(): Promise<void>;
}

/** The version a connection speaks, for the version its client named. */
function negotiate(requested: number | undefined): number {
  if (requested === undefined) return PROTOCOL_VERSION;
  return Math.min(Math.max(requested, MIN_PROTOCOL_VERSION), PROTOCOL_VERSION);
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
    const createDeviceFlow: DeviceFlowFactory =
      options.createDeviceFlow ??
      ((profile, settings, clientSecret) =>
        new DeviceFlowClient({ profile, settings, timeoutMs: config.httpTimeoutMs, ...(clientSecret === undefined ? {} : { clientSecret }) }));
    const registry = new ProfileRegistry({ config, logger, clock, createDeviceFlow });
    cleanups.push(() => registry.stop());
    await registry.start();

    // The HTTP gateway (daemon/gateway/), over every profile.
    const gateway = new Gateway({
      profiles: registryProfiles(registry, `qwen-tokend/${version}`),
      env: resolveGatewayEnv(process.env, config.socketPath, config.home),
      stateDir: config.stateDir,
      logger,
      platform: options.platform,
    });

    let server: IpcServer;
    const v1Answers = new WeakMap<Promise<TokenResult>, Promise<TokenResult>>();
    const runtimeFor = (name: string | undefined): ProfileRuntime => registry.resolve(name);
    /** A token answer in the shape the connection speaks. */
    const shaped = (result: TokenResult, conn: RpcConnection): TokenResult => (conn.protocol >= 2 ? result : v1Token(result));
    const status = ({ profile }: { profile?: string | undefined }, conn: RpcConnection): StatusResult => {
      const runtime = runtimeFor(profile);
      const own = runtime.status();
      return {
        ...own,
        state: conn.protocol >= 2 ? own.state : v1State(own.state),
        pid: process.pid,
        version,
        protocol: conn.protocol,
        uptime_ms: clock.now() - startedAt,
        connected_clients: server.connectionCount,
        requests_served: server.requestsServed,
        socket_path: config.socketPath,
        now: clock.now(),
        gateway: gateway.status(),
        profile: runtime.name,
        kind: runtime.kind,
        default_profile: registry.defaultProfile,
        profiles: registry.infos(),
        config_path: registry.configPath,
        config_error: registry.configProblem,
      };
    };
    const list = (): ProfilesListResult => ({
      default_profile: registry.defaultProfile,
      profiles: registry.infos(),
      config_path: registry.configPath,
      config_error: registry.configProblem,
    });
    const methods: Record<string, RpcMethod> = {
      [Methods.hello]: rpcMethod(HelloParams, ({ protocol }, conn) => {
        conn.protocol = negotiate(protocol);
        const hello = { protocol: conn.protocol, daemon: 'qwen-tokend' as const, version, pid: process.pid };
        return conn.protocol >= 2 ? { ...hello, default_profile: registry.defaultProfile } : hello;
      }),
      [Methods.getAccessToken]: rpcMethod(GetAccessTokenParams, ({ minValidityMs = 0, profile }, conn) => {
        const runtime = runtimeFor(profile);
        // The common case, a token valid long enough, is answered without a promise.
        const ready = runtime.servableNow(minValidityMs);
        if (ready) return shaped(ready, conn);
        // Callers waiting on one refresh share one promise, and so one answer per version.
        const waiting = runtime.getAccessToken(minValidityMs);
        if (conn.protocol >= 2) return waiting;
        let v1 = v1Answers.get(waiting);
        if (!v1) {
          v1 = waiting.then(v1Token);
          v1Answers.set(waiting, v1);
        }
        return v1;
      }),
      [Methods.refresh]: rpcMethod(ProfileParams, async ({ profile }, conn) => shaped(await runtimeFor(profile).refresh(), conn)),
      [Methods.status]: rpcMethod(ProfileParams, status),
      [Methods.loginStart]: rpcMethod(ProfileParams, ({ profile }) => runtimeFor(profile).loginStart()),
      [Methods.loginCancel]: rpcMethod(ProfileParams, ({ profile }) => ({ cancelled: runtimeFor(profile).loginCancel() })),
      [Methods.logout]: rpcMethod(LogoutParams, async ({ qwenCli = false, profile }) => ({ removed: await runtimeFor(profile).logout(qwenCli) })),
      [Methods.subscribe]: rpcMethod(SubscribeParams, ({ profile }, conn) => {
        if (profile !== undefined) runtimeFor(profile);
        conn.subscribed = true;
        conn.subscribedProfile = profile ?? null;
        return { subscribed: true };
      }),
      [Methods.profilesList]: rpcMethod(EmptyParams, list),
      [Methods.profilesAdd]: rpcMethod(ProfilesAddParams, (params) => registry.add(params)),
      [Methods.profilesRemove]: rpcMethod(ProfilesRemoveParams, ({ name }) => registry.remove(name)),
      [Methods.profilesSetDefault]: rpcMethod(ProfilesSetDefaultParams, ({ name }) => registry.setDefault(name)),
      ...gatewayMethods(gateway),
    };
    server = new IpcServer({
      socketPath: config.socketPath,
      logger,
      methods,
      platform: options.platform,
      silentConnectionTimeoutMs: config.silentConnectionTimeoutMs,
    });

    const about = (profile: string, method: string, params: Record<string, unknown>, v1: Record<string, unknown> | null) =>
      server.broadcastAbout(profile, registry.defaultProfile, method, { ...params, profile }, v1);
    // Pushed once the callers waiting on this refresh have their answers (those leave from
    // promise callbacks, before this immediate): a waiting caller gets the token first, and the
    // push's wake-ups of a thousand subscribers do not stand between the refresh and them.
    registry.on('token_refreshed', (profile, result) =>
      setImmediate(() => server.broadcastAbout(profile, registry.defaultProfile, Notifications.tokenRefreshed, result, v1Token(result))),
    );
    registry.on('refresh_failed', (profile, failure) => about(profile, Notifications.tokenRefreshFailed, { ...failure }, { ...failure }));
    // State changes arrive settled (see ProfileRegistry.settle).
    registry.on('state_changed', (profile, state, previous) =>
      about(profile, Notifications.stateChanged, { state, previous }, { state: v1State(state), previous: v1State(previous) }),
    );
    registry.on('login_completed', (profile, info) => about(profile, Notifications.loginCompleted, { ...info }, { ...info }));
    registry.on('login_failed', (profile, err) =>
      about(profile, Notifications.loginFailed, { code: err.code, message: err.message }, { code: err.code, message: err.message }),
    );
    let announcedDefault = registry.defaultProfile;
    registry.on('profiles_changed', () => {
      const defaultProfile = registry.defaultProfile;
      server.broadcastV2(Notifications.profilesChanged, { profiles: registry.names(), default_profile: defaultProfile });
      if (defaultProfile === announcedDefault) return;
      announcedDefault = defaultProfile;
      // A version-1 client caches the default profile's token: it gets the new default's.
      const ready = registry.get(defaultProfile)?.servableNow(0);
      if (ready) server.broadcastAbout(defaultProfile, defaultProfile, Notifications.tokenRefreshed, null, v1Token(ready));
    });

    await server.listen();
    // The first refresh response is checked at once, not after its schema is built.
    setImmediate(() => compileSchemas([TokenResponseSchema])).unref();
    // Stop accepting clients first, so none is cut off in the middle of a shutdown.
    cleanups.push(() => server.close());
    await gateway.start();
    cleanups.push(() => gateway.close());

    let closing: Promise<void> | null = null;
    return {
      keeper: registry.qwen.keeper,
      profiles: registry,
      server,
      reload: () => registry.reload().catch((err: unknown) => logger.warn({ err: errorText(err) }, 'reload failed')),
      close: () => (closing ??= closeAll()),
    };
  } catch (err) {
    await closeAll();
    throw err;
  }
}
