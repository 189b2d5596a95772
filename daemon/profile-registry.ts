/**
 * The set of credential profiles: the built-in `qwen` profile plus those of the config file.
 * It maps names to runtimes, applies the config file (at start, on a hand edit, after
 * `profiles.add`/`profiles.remove`): a new profile is started, a removed one stopped, a changed one
 * updated in place when only display settings changed (see `settingsNeedRestart`), else
 * restarted (keeping its tokens while they belong to the same grant). An invalid config file is
 * reported (one log line, `config_error`) and the profiles already running are kept.
 * Applying is serialized; handing out tokens never waits for it.
 */
import { EventEmitter } from 'node:events';
import { readFileSync } from 'node:fs';
import type { Clock } from '../shared/clock.js';
import type { TokendConfig } from '../shared/config.js';
import { errnoCode, errorText } from '../shared/diagnostics.js';
import { QwenConfigError, QwenError, QwenProfileNotFoundError } from '../shared/errors.js';
import { cliCommand } from '../shared/cli-command.js';
import { DEFAULT_PROFILE, type ProfileInfo, type ProfileSettings } from '../shared/profiles.js';
import type { ProfileState, TokenResult } from '../shared/protocol.js';
import { parseConfigObject, readConfigText, updateConfigFile } from './config-file.js';
import { CredentialWatcher } from './credential-watch.js';
import type { Logger } from './logger.js';
import { ApiKeyProfile } from './profile-api-key.js';
import { grantIdentity, parseProfileSettings, readProfilesConfig, settingsKey, settingsNeedRestart, type ProfilesConfig } from './profile-config.js';
import { createOAuthDeviceProfile, createQwenProfile, type DeviceFlowFactory, type OAuthProfile } from './profile-oauth.js';
import type { ProfileRuntime, RuntimeRefreshFailure } from './profile-runtime.js';
import { profilePaths, readSecretFile, removeFiles, writeSecretFile, type SecretFile } from './profile-secrets.js';

/** How long a state change must hold before subscribers are told (a quick refresh is one push, not three). */
export const STATE_SETTLE_MS = 250;

export interface RegistryEvents {
  token_refreshed: [profile: string, result: TokenResult];
  refresh_failed: [profile: string, failure: RuntimeRefreshFailure];
  /** Settled over STATE_SETTLE_MS. */
  state_changed: [profile: string, state: ProfileState, previous: ProfileState];
  login_completed: [profile: string, info: { expiry_date: number }];
  login_failed: [profile: string, error: QwenError];
  /** The set of profiles, their settings or the default changed. */
  profiles_changed: [];
}

export interface ProfileRegistryOptions {
  config: TokendConfig;
  logger: Logger;
  clock: Clock;
  /** Makes the OAuth client of an `oauth-device` profile. */
  createDeviceFlow: DeviceFlowFactory;
}

export interface AddProfileRequest {
  name: string;
  settings: ProfileSettings;
  secret?: string | undefined;
  replace?: boolean | undefined;
  makeDefault?: boolean | undefined;
}

/** One running profile and what the registry keeps about it. */
interface Entry {
  runtime: ProfileRuntime;
  /** Canonical settings text (null: the built-in profile). */
  key: string | null;
  announced: ProfileState;
  settleTimer: NodeJS.Timeout | null;
  /** Stops listening to the runtime, except for the end of a login (see `detachAndStop`). */
  detach: () => void;
  /** Stops listening for the end of a login. */
  detachLogin: () => void;
}

/** Every profile this daemon serves. */
export class ProfileRegistry extends EventEmitter<RegistryEvents> {
  private readonly entries = new Map<string, Entry>();
  /** Profile names in the order `names()` gives them: the built-in one, then the config file's. */
  private order: string[] = [DEFAULT_PROFILE];
  private defaultName = DEFAULT_PROFILE;
  private configError: string | null = null;
  private work: Promise<unknown> = Promise.resolve();
  private readonly watcher: CredentialWatcher;
  private stopped = false;
  /** The built-in profile. */
  readonly qwen: OAuthProfile;

  constructor(private readonly options: ProfileRegistryOptions) {
    super();
    const { config, logger, clock } = options;
    this.qwen = createQwenProfile({ config, logger, clock });
    this.watcher = new CredentialWatcher([{ path: config.configPath, onChange: () => void this.reloadConfig() }], logger);
  }

  get configPath(): string {
    return this.options.config.configPath;
  }

  /** The name of the profile a call without one is about. */
  get defaultProfile(): string {
    return this.defaultName;
  }

  /** Why the config file's last version was not (wholly) applied; null when it was. */
  get configProblem(): string | null {
    return this.configError;
  }

  /** Starts the built-in profile and those of the config file, then watches their files. */
  async start(): Promise<void> {
    await this.qwen.start();
    this.attach(DEFAULT_PROFILE, this.qwen, null);
    await this.serialized(() => this.applyFromFile());
    await this.watcher.start();
  }

  get(name: string): ProfileRuntime | undefined {
    return this.entries.get(name)?.runtime;
  }

  /** The profile `name` names, or the default one; throws `QwenProfileNotFoundError` for an unknown name. */
  resolve(name: string | undefined): ProfileRuntime {
    const entry = this.entries.get(name ?? this.defaultName);
    if (entry) return entry.runtime;
    throw new QwenProfileNotFoundError(`no profile named "${name}": see \`${cliCommand('profile list')}\``);
  }

  names(): string[] {
    return this.order.slice();
  }

  /** Every profile, as `profiles.list` and `status` show them. */
  infos(): ProfileInfo[] {
    const infos: ProfileInfo[] = [];
    for (const name of this.order) {
      const entry = this.entries.get(name);
      if (entry) infos.push(entry.runtime.info(name === this.defaultName));
    }
    return infos;
  }

  /** Re-reads the config file and applies it (a change event, SIGHUP). */
  reloadConfig(): Promise<void> {
    return this.serialized(() => this.applyFromFile());
  }

  /** Re-reads every profile's files and the config file (SIGHUP). */
  async reload(): Promise<void> {
    await this.reloadConfig();
    for (const name of this.order) await this.entries.get(name)?.runtime.reload();
  }

  /**
   * Adds (or with `replace`, replaces) a profile: its secret file first, then the config file,
   * then the profile runs. A failure on the way leaves the secret file as it was.
   */
  add(request: AddProfileRequest): Promise<{ profile: ProfileInfo; replaced: boolean }> {
    return this.serialized(async () => {
      const { name } = request;
      const { config, logger } = this.options;
      const settings = parseProfileSettings(name, request.settings, 'profiles.add', config.profilesDir);
      const whole = parseConfigObject(config.configPath, await readConfigText(config.configPath));
      const inFile = isObject(whole.profiles) && (whole.profiles as Record<string, unknown>)[name] !== undefined;
      const existing = this.entries.get(name)?.runtime;
      const exists = inFile || existing !== undefined;
      if (exists && !request.replace) {
        throw new QwenConfigError(`profile "${name}" already exists; to change it, add it again with --replace (see \`${cliCommand(`profile show ${name}`)}\`)`);
      }
      const paths = profilePaths(config.profilesDir, name);
      const before = readRawSecret(paths.secret);
      const kindChanged = existing !== undefined && existing.kind !== settings.kind;
      let secret: SecretFile | null = null;
      if (request.secret !== undefined) secret = settings.kind === 'api-key' ? { api_key: request.secret } : { client_secret: request.secret };
      if (settings.kind === 'api-key' && secret === null && (kindChanged || !holdsApiKey(paths.secret, logger))) {
        throw new QwenConfigError(`profile "${name}" is an API key profile and needs its key: give it on standard input (never on the command line)`);
      }
      if (secret) await writeSecretFile(config.profilesDir, paths.secret, secret);
      try {
        await updateConfigFile(config.configPath, (current) => {
          const profiles = isObject(current.profiles) ? { ...(current.profiles as Record<string, unknown>) } : {};
          profiles[name] = settings;
          const next: Record<string, unknown> = { ...current, profiles };
          if (request.makeDefault) next.default_profile = name;
          const check = readProfilesConfig(next, config.configPath, config.profilesDir);
          if (check.config === null) throw new QwenConfigError(`${check.error}; fix the config file first`);
          return next;
        });
      } catch (err) {
        if (secret) await restoreSecret(config.profilesDir, paths.secret, before);
        throw err;
      }
      // A secret of the other kind (a key left by an api-key profile that became oauth-device) goes.
      if (kindChanged && secret === null) await removeFiles([paths.secret]);
      // A new secret with the same settings: restarted, so it is used from now on.
      if (secret && existing) await this.detachAndStop(name);
      await this.applyFromFile();
      const runtime = this.entries.get(name)?.runtime;
      if (!runtime) throw new QwenConfigError(`profile "${name}" was written to ${config.configPath} but could not be started: ${this.configError ?? 'unknown reason'}`);
      logger.info({ profile: name, kind: settings.kind, replaced: exists }, exists ? 'profile replaced' : 'profile added');
      return { profile: runtime.info(name === this.defaultName), replaced: exists };
    });
  }

  /**
   * Makes `name` the default profile: written to the config file (`qwen`, the built-in default,
   * by removing `default_profile`), then applied like any edit.
   */
  setDefault(name: string): Promise<{ default_profile: string; previous: string }> {
    return this.serialized(async () => {
      const { config } = this.options;
      if (name !== DEFAULT_PROFILE && !this.entries.has(name)) {
        throw new QwenProfileNotFoundError(`no profile named "${name}": see \`${cliCommand('profile list')}\``);
      }
      const previous = this.defaultName;
      await updateConfigFile(config.configPath, (current) => {
        const next: Record<string, unknown> = { ...current };
        if (name === DEFAULT_PROFILE) delete next.default_profile;
        else next.default_profile = name;
        const check = readProfilesConfig(next, config.configPath, config.profilesDir);
        if (check.config === null) throw new QwenConfigError(`${check.error}; fix the config file first`);
        return next;
      });
      await this.applyFromFile();
      return { default_profile: this.defaultName, previous };
    });
  }

  /** Removes a profile: from the config file, stopped, its files deleted. */
  remove(name: string): Promise<{ removed: boolean; files: string[] }> {
    return this.serialized(async () => {
      const { config, logger } = this.options;
      if (name === DEFAULT_PROFILE) {
        throw new QwenConfigError(`"${DEFAULT_PROFILE}" is the built-in profile and cannot be removed; \`${cliCommand('logout')}\` removes its credentials`);
      }
      const whole = parseConfigObject(config.configPath, await readConfigText(config.configPath));
      const inFile = isObject(whole.profiles) && (whole.profiles as Record<string, unknown>)[name] !== undefined;
      const entry = this.entries.get(name);
      if (!inFile && !entry) throw new QwenProfileNotFoundError(`no profile named "${name}": see \`${cliCommand('profile list')}\``);
      if (inFile || whole.default_profile === name) {
        await updateConfigFile(config.configPath, (current) => {
          const next: Record<string, unknown> = { ...current };
          if (isObject(current.profiles)) {
            const { [name]: _gone, ...rest } = current.profiles as Record<string, unknown>;
            next.profiles = rest;
          }
          if (next.default_profile === name) delete next.default_profile;
          return next;
        });
      }
      // Stopped before its files go, so no refresh in flight writes its token back.
      if (entry) await this.detachAndStop(name);
      const paths = profilePaths(config.profilesDir, name);
      const files = await removeFiles([paths.secret, paths.token]);
      logger.info({ profile: name, removed: files }, 'profile removed');
      await this.applyFromFile();
      this.emit('profiles_changed');
      return { removed: true, files: [...files] };
    });
  }

  /** Stops every profile and the file watcher. */
  async stop(): Promise<void> {
    this.stopped = true;
    await this.watcher.close();
    await this.work.catch(() => undefined);
    await Promise.all(
      [...this.entries.values()].map(async (entry) => {
        if (entry.settleTimer) clearTimeout(entry.settleTimer);
        await entry.runtime.stop();
      }),
    );
  }

  // ---- internals ----

  /** Runs `task` after every change queued before it. */
  private serialized<T>(task: () => Promise<T>): Promise<T> {
    const run = this.work.then(task);
    this.work = run.catch(() => undefined);
    return run;
  }

  /** Reads the config file and applies it; a problem is reported and what runs is kept. */
  private async applyFromFile(): Promise<void> {
    if (this.stopped) return;
    const { config } = this.options;
    let read: { config: ProfilesConfig | null; error: string | null };
    try {
      read = readProfilesConfig(parseConfigObject(config.configPath, await readConfigText(config.configPath)), config.configPath, config.profilesDir);
    } catch (err) {
      read = { config: null, error: errorText(err) };
    }
    const problems = read.config ? await this.apply(read.config) : [];
    const error = [read.error, ...problems].filter((p) => p !== null).join('; ');
    this.reportConfig(error === '' ? null : error, read.config === null);
  }

  private reportConfig(error: string | null, kept: boolean): void {
    const { logger, config } = this.options;
    if (error === this.configError) return;
    const hadError = this.configError !== null;
    this.configError = error;
    if (error !== null) {
      logger.error({ path: config.configPath }, kept ? `config file not applied, keeping the profiles already in use: ${error}` : error);
    } else if (hadError) {
      logger.info({ path: config.configPath }, 'config file applied');
    }
  }

  /** Makes the running profiles those of `wanted`; returns why any of them could not run. */
  private async apply(wanted: ProfilesConfig): Promise<string[]> {
    const { logger } = this.options;
    const problems: string[] = [];
    let changed = false;
    for (const name of [...this.entries.keys()]) {
      if (name === DEFAULT_PROFILE || wanted.profiles.has(name)) continue;
      // Its files are kept: a profile taken out of the file by hand may come back.
      await this.detachAndStop(name);
      logger.info({ profile: name }, 'profile no longer in the config file; stopped it (its files are kept)');
      changed = true;
    }
    const started: ProfileRuntime[] = [];
    /** Profiles updated in place whose token answer changed (a new base URL). */
    const reanswered: ProfileRuntime[] = [];
    for (const [name, settings] of wanted.profiles) {
      const key = settingsKey(settings);
      const entry = this.entries.get(name);
      if (entry?.key === key) continue;
      const previous = entry?.runtime.settings;
      if (entry && previous && !settingsNeedRestart(previous, settings)) {
        // No restart: a restart ends a login in progress and makes a refresh in flight wait out
        // its HTTP timeout, neither of which a description or base URL needs.
        if (entry.runtime.applySettings(settings)) reanswered.push(entry.runtime);
        entry.key = key;
        changed = true;
        logger.info({ profile: name }, 'profile settings changed; applied without a restart');
        continue;
      }
      if (entry) {
        const sameGrant = previous != null && grantIdentity(previous) === grantIdentity(settings);
        // On the same grant the new runtime reads the tokens the old one leaves: let a refresh
        // the provider may already have rotated finish and be saved first.
        await this.detachAndStop(name, { letRefreshFinish: sameGrant });
        if (previous && !sameGrant) {
          // Tokens of another grant: presented to the new provider, a refresh token would leak to it.
          const removed = await removeFiles([profilePaths(this.options.config.profilesDir, name).token]);
          if (removed.length) logger.info({ profile: name, removed }, 'the profile now names another provider or client; removed its tokens');
        }
      }
      changed = true;
      let runtime: ProfileRuntime;
      try {
        runtime = this.create(name, settings);
      } catch (err) {
        problems.push(`profile "${name}" cannot be used: ${errorText(err)}`);
        continue;
      }
      this.attach(name, runtime, key);
      started.push(runtime);
    }
    // Each profile loads its own files; none waits for another's network.
    await Promise.all(
      started.map((runtime) =>
        runtime.start().catch((err: unknown) => logger.error({ profile: runtime.name, err: errorText(err) }, 'profile could not start')),
      ),
    );
    // What a profile loaded at its start is its first state, not a change to announce.
    for (const runtime of started) {
      const entry = this.entries.get(runtime.name);
      if (entry?.runtime === runtime) entry.announced = runtime.status().state;
    }
    const order = [DEFAULT_PROFILE, ...[...wanted.profiles.keys()].filter((name) => this.entries.has(name))];
    if (order.join('\0') !== this.order.join('\0')) changed = true;
    this.order = order;
    if (wanted.defaultProfile !== this.defaultName) {
      logger.info({ profile: wanted.defaultProfile, previous: this.defaultName }, 'default profile changed');
      this.defaultName = wanted.defaultProfile;
      changed = true;
    }
    for (const runtime of [...started, ...reanswered]) {
      const ready = runtime.servableNow(0);
      if (ready) this.emit('token_refreshed', runtime.name, ready);
    }
    if (changed) this.emit('profiles_changed');
    return problems;
  }

  private create(name: string, settings: ProfileSettings): ProfileRuntime {
    const { config, logger, clock, createDeviceFlow } = this.options;
    if (settings.kind === 'api-key') return new ApiKeyProfile(name, settings, { profilesDir: config.profilesDir, logger, clock });
    return createOAuthDeviceProfile(name, settings, { config, logger, clock, profilesDir: config.profilesDir, createDeviceFlow });
  }

  private attach(name: string, runtime: ProfileRuntime, key: string | null): void {
    const entry: Entry = { runtime, key, announced: runtime.status().state, settleTimer: null, detach: () => undefined, detachLogin: () => undefined };
    const onToken = (result: TokenResult) => this.emit('token_refreshed', name, result);
    const onFailed = (failure: RuntimeRefreshFailure) => this.emit('refresh_failed', name, failure);
    const onState = () => this.settle(name, entry);
    const onLogin = (info: { expiry_date: number }) => this.emit('login_completed', name, info);
    const onLoginFailed = (err: QwenError) => this.emit('login_failed', name, err);
    runtime.on('token_refreshed', onToken);
    runtime.on('refresh_failed', onFailed);
    runtime.on('state_changed', onState);
    runtime.on('login_completed', onLogin);
    runtime.on('login_failed', onLoginFailed);
    const files = runtime.watchedFiles();
    for (const file of files) this.watcher.add(file);
    entry.detach = () => {
      runtime.off('token_refreshed', onToken);
      runtime.off('refresh_failed', onFailed);
      runtime.off('state_changed', onState);
      for (const file of files) this.watcher.remove(file.path);
      if (entry.settleTimer) clearTimeout(entry.settleTimer);
    };
    entry.detachLogin = () => {
      runtime.off('login_completed', onLogin);
      runtime.off('login_failed', onLoginFailed);
    };
    this.entries.set(name, entry);
  }

  private async detachAndStop(name: string, options?: { letRefreshFinish?: boolean }): Promise<void> {
    const entry = this.entries.get(name);
    if (!entry) return;
    this.entries.delete(name);
    this.order = this.order.filter((n) => n !== name);
    entry.detach();
    // A login waiting on this profile ends as it stops: its clients must hear that end
    // (`login.failed`, saying why), or `qwen-token login` would wait forever.
    try {
      await entry.runtime.stop(options);
    } finally {
      entry.detachLogin();
    }
  }

  /**
   * Announces a profile's state once it has held for STATE_SETTLE_MS: a quick refresh
   * (valid → refreshing → valid) costs subscribers one push (token.refreshed), not three, and
   * never sits between a refresh and its HTTP call.
   */
  private settle(name: string, entry: Entry): void {
    entry.settleTimer ??= setTimeout(() => {
      entry.settleTimer = null;
      if (this.entries.get(name) !== entry) return;
      const state = entry.runtime.status().state;
      if (state === entry.announced) return;
      const previous = entry.announced;
      entry.announced = state;
      this.emit('state_changed', name, state, previous);
    }, STATE_SETTLE_MS);
    entry.settleTimer.unref();
  }
}

function isObject(value: unknown): boolean {
  return value !== null && typeof value === 'object' && !Array.isArray(value);
}

/** The secret file's text as it is now (null: none), to put back if an add fails half-way. */
function readRawSecret(path: string): string | null {
  try {
    return readFileSync(path, 'utf8');
  } catch (err) {
    if (errnoCode(err) === 'ENOENT') return null;
    throw new QwenConfigError(`cannot read ${path}: ${errorText(err)}`);
  }
}

async function restoreSecret(dir: string, path: string, before: string | null): Promise<void> {
  if (before === null) {
    await removeFiles([path]).catch(() => undefined);
    return;
  }
  try {
    await writeSecretFile(dir, path, JSON.parse(before) as SecretFile);
  } catch {
    // The old file was not ours to parse; it was replaced by the new secret, which stays.
  }
}

/** True when the secret file holds an API key (the key kept when an api-key profile is replaced without a new one). */
function holdsApiKey(path: string, logger: Logger): boolean {
  try {
    const read = readSecretFile(path, logger);
    return read.status === 'ok' && 'api_key' in read.secret;
  } catch {
    return false;
  }
}
