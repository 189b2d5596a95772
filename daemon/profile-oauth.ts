/**
 * The OAuth kinds of profile: a TokenKeeper (refresh ahead of expiry, retry, rotation-safe
 * durable writes, needs_login) and a DeviceLogin over one OAuth client.
 * - `qwen-oauth`: the built-in `qwen` profile, exactly the daemon's original token owner: its
 *   files, paths, environment variables and the Qwen CLI link.
 * - `oauth-device`: any RFC 8628 provider, its tokens in `profiles/<name>.token.json`.
 */
import { EventEmitter } from 'node:events';
import { cliCommand } from '../shared/cli-command.js';
import type { Clock } from '../shared/clock.js';
import type { TokendConfig } from '../shared/config.js';
import { chatBaseUrl, parseCredentials, type Credentials } from '../shared/credentials.js';
import { errorText } from '../shared/diagnostics.js';
import { QwenCredentialsFileError, QwenOAuthError } from '../shared/errors.js';
import { fingerprint } from '../shared/fingerprint.js';
import type { OAuthDeviceSettings, ProfileInfo, ProfileKind, ProfileSettings } from '../shared/profiles.js';
import type { LoginStartResult, TokenResult } from '../shared/protocol.js';
import { CredentialFile } from './credential-store.js';
import type { WatchedFile } from './credential-watch.js';
import { DeviceLogin } from './device-login.js';
import type { Logger } from './logger.js';
import { cancelled, QwenOAuthClient } from './oauth.js';
import { grantDigest } from './profile-config.js';
import type { ProfileRuntime, ProfileRuntimeEvents, ProfileStatus } from './profile-runtime.js';
import { profilePaths, readSecretFile } from './profile-secrets.js';
import { TokenKeeper, type KeeperWording } from './token-keeper.js';

/** What a profile needs of an OAuth client: the device flow and the refresh grant. */
export type DeviceFlow = Pick<QwenOAuthClient, 'deviceAuthorizationRequest' | 'waitForDeviceToken' | 'refreshTokenGrant'>;

/** Makes the OAuth client of an `oauth-device` profile (the client secret read from its secret file). */
export type DeviceFlowFactory = (profile: string, settings: OAuthDeviceSettings, clientSecret: string | undefined) => DeviceFlow;

interface OAuthProfileParts {
  name: string;
  kind: Extract<ProfileKind, 'qwen-oauth' | 'oauth-device'>;
  builtin: boolean;
  settings: OAuthDeviceSettings | null;
  keeper: TokenKeeper;
  login: DeviceLogin;
  ownFile: CredentialFile;
  cliFile: CredentialFile | null;
  cliLink: { enabled: boolean; path: string };
  /** The chat API's base URL for these credentials, under these settings. */
  baseUrl: (credentials: Credentials | null, settings: OAuthDeviceSettings | null) => string;
  /** What `profiles.list` shows as its settings. */
  shownSettings: (settings: OAuthDeviceSettings | null) => Record<string, unknown>;
  /** Files besides the token file that hold its secrets (a client secret). */
  secretFiles: string[];
  wording: KeeperWording;
  logger: Logger;
}

/** A profile whose credential is an OAuth token pair with one owner: its TokenKeeper. */
export class OAuthProfile extends EventEmitter<ProfileRuntimeEvents> implements ProfileRuntime {
  readonly name: string;
  readonly kind: OAuthProfileParts['kind'];
  readonly builtin: boolean;
  /** The token's owner (the gateway asks it directly; see gateway/registry-profiles.ts). */
  readonly keeper: TokenKeeper;
  private readonly login: DeviceLogin;
  /** Its settings; replaced in place only for fields that touch no grant or request (see `applySettings`). */
  private applied: OAuthDeviceSettings | null;
  /** Built once per credential record (frozen, so the socket server serializes it once too); renewed when the base URL changes. */
  private results = new WeakMap<Credentials, TokenResult>();
  /** Callers waiting on one refresh share the keeper's promise; they share its answer too. */
  private answers = new WeakMap<Promise<Credentials>, Promise<TokenResult>>();

  constructor(private readonly parts: OAuthProfileParts) {
    super();
    this.name = parts.name;
    this.kind = parts.kind;
    this.builtin = parts.builtin;
    this.applied = parts.settings;
    this.keeper = parts.keeper;
    this.login = parts.login;
    const { keeper, login, logger } = parts;
    keeper.on('token_refreshed', (creds) => this.emit('token_refreshed', this.result(creds)));
    keeper.on('refresh_failed', ({ error, state, nextRetryAt }) =>
      this.emit('refresh_failed', { code: error.code, message: error.message, state, next_retry_at: nextRetryAt }),
    );
    keeper.on('state_changed', ({ state }) => {
      const creds = keeper.snapshot().credentials;
      if (state === 'needs_login' && creds && !creds.refresh_token) {
        logger.warn({ expiry_date: creds.expiry_date }, `the access token expired and the provider issued no refresh token: run \`${parts.wording.loginCommand()}\``);
      }
      this.emit('state_changed');
    });
    login.on('completed', (creds) => {
      if (!creds.refresh_token) {
        logger.warn(
          { expiry_date: creds.expiry_date },
          `the provider issued no refresh token: this login lasts until the access token expires; to stay logged in, ask for a scope that grants one (such as offline_access)`,
        );
      }
      this.emit('login_completed', { expiry_date: creds.expiry_date });
    });
    login.on('failed', (err) => this.emit('login_failed', err));
  }

  get settings(): OAuthDeviceSettings | null {
    return this.applied;
  }

  /** Takes a new description or base URL; true when the base URL changed (clients get the token again). */
  applySettings(settings: ProfileSettings): boolean {
    const previous = this.applied;
    // The registry decided that no restart is needed (settingsNeedRestart); only the kind is checked here.
    if (previous === null || settings.kind !== 'oauth-device') throw new Error(`profile "${this.name}": its settings cannot change in place`);
    this.applied = settings;
    if (settings.base_url === previous.base_url) return false;
    // Answers already built name the old base URL.
    this.results = new WeakMap();
    this.answers = new WeakMap();
    return true;
  }

  /** The command that logs this profile in, as a person runs it here. */
  loginCommand(): string {
    return this.parts.wording.loginCommand();
  }

  /** The chat API's base URL for `credentials` (the current ones when omitted). */
  baseUrlFor(credentials: Credentials | null = this.keeper.snapshot().credentials): string {
    return this.parts.baseUrl(credentials, this.applied);
  }

  /** What clients receive for a credential record. */
  result(c: Credentials): TokenResult {
    const cached = this.results.get(c);
    if (cached) return cached;
    const result: TokenResult = {
      access_token: c.access_token,
      token_type: c.token_type,
      expiry_date: c.expiry_date,
      base_url: this.parts.baseUrl(c, this.applied),
    };
    if (c.resource_url && this.kind === 'qwen-oauth') result.resource_url = c.resource_url;
    result.profile = this.name;
    result.kind = this.kind;
    result.auth_header = 'authorization';
    Object.freeze(result);
    this.results.set(c, result);
    return result;
  }

  async start(): Promise<void> {
    // Trust on first use: a token file from before grants were recorded was written for the
    // settings the profile had then, the ones it starts with now unless the config file was
    // also edited while the daemon was stopped for the upgrade. Refusing such files would log
    // every oauth-device profile out on upgrade. See docs/profiles.md. (A file with no grant
    // to record, the built-in profile's, is left alone.)
    if (await this.parts.ownFile.stampGrant()) {
      this.parts.logger.info({ path: this.parts.ownFile.path }, "the token file recorded no provider or client (an older version wrote it); recorded this profile's");
    }
    await this.keeper.start();
  }

  async stop(options?: { letRefreshFinish?: boolean }): Promise<void> {
    // The login first: it ends saying why, and has no credentials left to hand the keeper.
    await this.login.stop(this.loginStopped());
    await this.keeper.stop(options);
  }

  /** How a login that was waiting ends when its profile stops (a client's `login` shows this). */
  private loginStopped(): QwenOAuthError {
    const again = `run \`${this.parts.wording.loginCommand()}\` again`;
    const why = this.builtin
      ? `the login ended because the daemon is stopping; ${again}`
      : `the login of profile "${this.name}" ended because the profile was removed, replaced or changed (or the daemon is stopping); ${again}`;
    // A cancellation: the user did nothing wrong, so it is not kept as the profile's last error.
    return cancelled(why);
  }

  servableNow(minValidityMs: number): TokenResult | null {
    const ready = this.keeper.servableNow(minValidityMs);
    return ready ? this.result(ready) : null;
  }

  getAccessToken(minValidityMs: number): Promise<TokenResult> {
    const waiting = this.keeper.getAccessToken(minValidityMs);
    let answer = this.answers.get(waiting);
    if (!answer) {
      answer = waiting.then((c) => this.result(c));
      this.answers.set(waiting, answer);
    }
    return answer;
  }

  async refresh(): Promise<TokenResult> {
    return this.result(await this.keeper.refresh());
  }

  loginStart(): Promise<LoginStartResult> {
    return this.login.start();
  }

  loginCancel(): boolean {
    return this.login.cancel();
  }

  logout(includeQwenCli: boolean): Promise<string[]> {
    return this.keeper.logout(includeQwenCli && this.builtin);
  }

  reload(): Promise<void> {
    return this.keeper.reload();
  }

  watchedFiles(): WatchedFile[] {
    const files: WatchedFile[] = [{ path: this.parts.ownFile.path, onChange: () => void this.keeper.fileChanged('own') }];
    const cli = this.parts.cliFile;
    if (cli) files.push({ path: cli.path, onChange: () => void this.keeper.fileChanged('qwen-cli') });
    return files;
  }

  status(): ProfileStatus {
    const snap = this.keeper.snapshot();
    return {
      state: snap.state,
      expiry_date: snap.credentials?.expiry_date ?? null,
      next_refresh_at: snap.nextRefreshAt,
      last_refresh_at: snap.lastRefreshAt,
      // A failed login counts too: it is often the first error a new user meets.
      last_error: newestError(snap.lastError, this.login.lastFailure),
      retry_count: snap.retryCount,
      source_file: snap.sourceFile,
      token_path: this.parts.ownFile.path,
      qwen_cli_link: this.parts.cliLink,
      token_fingerprint: fingerprint(snap.credentials?.access_token),
      refresh_token_fingerprint: fingerprint(snap.credentials?.refresh_token),
      login_in_progress: this.login.inProgress,
    };
  }

  info(isDefault: boolean): ProfileInfo {
    const status = this.status();
    const creds = this.keeper.snapshot().credentials;
    const files = [this.parts.ownFile.path, ...this.parts.secretFiles];
    return {
      name: this.name,
      kind: this.kind,
      builtin: this.builtin,
      default: isDefault,
      settings: this.parts.shownSettings(this.applied),
      base_url: this.parts.baseUrl(creds, this.applied),
      has_secret: creds !== null,
      secret_fingerprint: status.token_fingerprint,
      state: status.state,
      expiry_date: status.expiry_date,
      next_refresh_at: status.next_refresh_at,
      last_error: status.last_error,
      files,
    };
  }
}

/** The more recent of two recorded errors (either may be null). */
function newestError<T extends { at: number }>(a: T | null, b: T | null): T | null {
  if (a === null) return b;
  if (b === null) return a;
  return b.at > a.at ? b : a;
}

export interface RuntimeDeps {
  config: TokendConfig;
  logger: Logger;
  clock: Clock;
}

/** The built-in `qwen` profile: today's files, paths, environment variables and Qwen CLI link. */
export function createQwenProfile({ config, logger, clock }: RuntimeDeps): OAuthProfile {
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
  return new OAuthProfile({
    name: 'qwen',
    kind: 'qwen-oauth',
    builtin: true,
    settings: null,
    keeper,
    login,
    ownFile,
    cliFile,
    cliLink: { enabled: config.qwenCliSync, path: config.qwenCliCredsPath },
    baseUrl: (c) => chatBaseUrl(c?.resource_url),
    shownSettings: () => ({ oauth_base_url: config.oauthBaseUrl, client_id: config.clientId, scope: config.scope, qwen_cli_link: config.qwenCliSync }),
    secretFiles: [],
    wording: {
      loginCommand: () => cliCommand('login'),
      statusCommand: () => cliCommand('status'),
      otherWays: ' (or log in with the Qwen CLI)',
      issuer: 'the Qwen server',
    },
    logger,
  });
}

/**
 * Reads an `oauth-device` profile's token file: the same record as the Qwen CLI's, except that
 * `refresh_token` may be empty (a provider that issues none).
 */
export function parseProfileCredentials(text: string, source: string): Credentials {
  let data: unknown;
  try {
    data = JSON.parse(text);
  } catch {
    throw new QwenCredentialsFileError(`${source} is not valid JSON`);
  }
  if (data !== null && typeof data === 'object' && !Array.isArray(data)) {
    const record = data as { refresh_token?: unknown };
    if (record.refresh_token === undefined || record.refresh_token === '') {
      return { ...parseCredentials({ ...record, refresh_token: '-' }, source), refresh_token: '' };
    }
  }
  return parseCredentials(data, source);
}

export interface DeviceProfileDeps extends RuntimeDeps {
  profilesDir: string;
  createDeviceFlow: DeviceFlowFactory;
}

/** An `oauth-device` profile: its own keeper, login, OAuth client and token file. */
export function createOAuthDeviceProfile(name: string, settings: OAuthDeviceSettings, deps: DeviceProfileDeps): OAuthProfile {
  const { config, clock } = deps;
  const logger = deps.logger.child({ profile: name });
  const paths = profilePaths(deps.profilesDir, name);
  let clientSecret: string | undefined;
  try {
    const read = readSecretFile(paths.secret, logger);
    if (read.status === 'ok') {
      if ('client_secret' in read.secret) clientSecret = read.secret.client_secret;
      else logger.warn({ path: paths.secret }, `${paths.secret} holds an API key, not a client secret; the profile is used without a client secret`);
    }
  } catch (err) {
    logger.error({ path: paths.secret, err: errorText(err) }, `cannot use the client secret: ${errorText(err)}`);
  }
  const oauth = deps.createDeviceFlow(name, settings, clientSecret);
  const loginCommand = () => cliCommand(`login --profile ${name}`);
  const ownFile = new CredentialFile(paths.token, {
    logger,
    clock,
    moveCorruptAside: true,
    ownsDirectory: true,
    label: `profile ${name}`,
    parse: parseProfileCredentials,
    // Tokens are used only by the provider and client they were issued for, whatever happened
    // to the config file while the daemon was not running.
    grant: { id: grantDigest(settings), advice: () => `run \`${loginCommand()}\`` },
  });
  const wording: KeeperWording = {
    loginCommand,
    statusCommand: () => cliCommand(`status --profile ${name}`),
    otherWays: '',
    issuer: `the provider of profile "${name}"`,
  };
  const leadMs = settings.refresh_lead_seconds === undefined ? config.refreshLeadMs : settings.refresh_lead_seconds * 1000;
  const keeper = new TokenKeeper({ config: { ...config, refreshLeadMs: leadMs }, oauth, ownFile, cliFile: null, clock, logger, wording });
  const login = new DeviceLogin(oauth, clock, logger, (creds) => keeper.installCredentials(creds), {
    serverUrl: settings.issuer ?? settings.device_authorization_endpoint,
    networkAdvice: `check the network connection and the profile's endpoints (\`${cliCommand(`profile show ${name}`)}\`)`,
    allowNoRefreshToken: true,
  });
  return new OAuthProfile({
    name,
    kind: 'oauth-device',
    builtin: false,
    settings,
    keeper,
    login,
    ownFile,
    cliFile: null,
    cliLink: { enabled: false, path: '' },
    baseUrl: (_credentials, current) => (current ?? settings).base_url,
    shownSettings: (current) => ({ ...(current ?? settings), has_client_secret: clientSecret !== undefined }),
    secretFiles: clientSecret === undefined ? [] : [paths.secret],
    wording,
    logger,
  });
}
