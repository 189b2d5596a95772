/**
 * The `api-key` kind of profile: a static key with a base URL. Nothing expires and nothing is
 * refreshed; the key lives in `profiles/<name>.secret.json` and is re-read when that file changes.
 */
import { EventEmitter } from 'node:events';
import { cliCommand } from '../shared/cli-command.js';
import type { Clock } from '../shared/clock.js';
import { errorText } from '../shared/diagnostics.js';
import { QwenConfigError, QwenCredentialsFileError, QwenError, QwenTokenNotAvailableError } from '../shared/errors.js';
import { fingerprint } from '../shared/fingerprint.js';
import type { ApiKeySettings, ProfileInfo, ProfileSettings } from '../shared/profiles.js';
import type { LastError, LoginStartResult, TokenResult } from '../shared/protocol.js';
import type { WatchedFile } from './credential-watch.js';
import type { Logger } from './logger.js';
import type { ProfileRuntime, ProfileRuntimeEvents, ProfileStatus } from './profile-runtime.js';
import { profilePaths, readSecretFile, removeFiles } from './profile-secrets.js';

export interface ApiKeyProfileDeps {
  profilesDir: string;
  logger: Logger;
  clock: Clock;
}

/** A profile whose credential is a static API key. */
export class ApiKeyProfile extends EventEmitter<ProfileRuntimeEvents> implements ProfileRuntime {
  readonly kind = 'api-key' as const;
  readonly builtin = false;
  private readonly secretPath: string;
  private readonly logger: Logger;
  /** The answer every caller gets while the key is present (frozen: serialized once). */
  private current: TokenResult | null = null;
  private lastError: LastError | null = null;

  /** Its settings; replaced in place only for fields that change no answer (see `applySettings`). */
  private applied: ApiKeySettings;

  constructor(
    readonly name: string,
    settings: ApiKeySettings,
    private readonly deps: ApiKeyProfileDeps,
  ) {
    super();
    this.applied = settings;
    this.secretPath = profilePaths(deps.profilesDir, name).secret;
    this.logger = deps.logger.child({ profile: name });
  }

  get settings(): ApiKeySettings {
    return this.applied;
  }

  /** Takes display-only settings (description, preset, region): the key's answer stays the same. */
  applySettings(settings: ProfileSettings): boolean {
    // The registry decided that no restart is needed (settingsNeedRestart); only the kind is checked here.
    if (settings.kind !== 'api-key') throw new Error(`profile "${this.name}": its settings cannot change in place`);
    this.applied = settings;
    return false;
  }

  /** The command that replaces the key, as a person runs it here. */
  replaceCommand(): string {
    return cliCommand(`profile add ${this.name} --replace`);
  }

  async start(): Promise<void> {
    this.load(false);
  }

  async stop(): Promise<void> {}

  async reload(): Promise<void> {
    this.load(true);
  }

  servableNow(): TokenResult | null {
    return this.current;
  }

  getAccessToken(): Promise<TokenResult> {
    return this.current ? Promise.resolve(this.current) : Promise.reject(this.missingError());
  }

  refresh(): Promise<TokenResult> {
    return this.getAccessToken();
  }

  loginStart(): Promise<LoginStartResult> {
    return Promise.reject(
      new QwenConfigError(
        `profile "${this.name}" is an API key: there is nothing to log in to; to use another key run \`${this.replaceCommand()}\` (the key is read from standard input)`,
      ),
    );
  }

  loginCancel(): boolean {
    return false;
  }

  async logout(): Promise<string[]> {
    const removed = await removeFiles([this.secretPath]);
    this.set(null);
    this.logger.info({ removed }, 'logged out: removed the API key');
    return removed;
  }

  watchedFiles(): WatchedFile[] {
    return [{ path: this.secretPath, onChange: () => this.load(true) }];
  }

  status(): ProfileStatus {
    const key = this.current?.access_token;
    return {
      state: this.current ? 'static' : 'no_credentials',
      expiry_date: null,
      next_refresh_at: null,
      last_refresh_at: null,
      last_error: this.lastError,
      retry_count: 0,
      source_file: this.current ? this.secretPath : null,
      token_path: this.secretPath,
      qwen_cli_link: { enabled: false, path: '' },
      token_fingerprint: fingerprint(key),
      refresh_token_fingerprint: fingerprint(undefined),
      login_in_progress: false,
    };
  }

  info(isDefault: boolean): ProfileInfo {
    const status = this.status();
    return {
      name: this.name,
      kind: this.kind,
      builtin: false,
      default: isDefault,
      settings: { ...this.settings },
      base_url: this.settings.base_url,
      has_secret: this.current !== null,
      secret_fingerprint: status.token_fingerprint,
      state: status.state,
      expiry_date: null,
      next_refresh_at: null,
      last_error: status.last_error,
      files: [this.secretPath],
    };
  }

  private missingError(): QwenError {
    const why = this.lastError ? `its key file is not usable (${this.lastError.message})` : 'it has no API key';
    return new QwenTokenNotAvailableError(`profile "${this.name}": ${why}; run \`${this.replaceCommand()}\` (the key is read from standard input)`);
  }

  /** Reads the key file; `announce`: tell subscribers when the key changed. */
  private load(announce: boolean): void {
    let key: string | null = null;
    try {
      const read = readSecretFile(this.secretPath, this.logger);
      if (read.status === 'ok') {
        if ('api_key' in read.secret) key = read.secret.api_key;
        else throw new QwenCredentialsFileError(`${this.secretPath} holds a client secret, not an API key`);
      }
      this.lastError = null;
    } catch (err) {
      const message = errorText(err);
      this.lastError = { code: err instanceof QwenError ? err.code : 'QWEN_ERROR', message, at: this.deps.clock.now() };
      this.logger.error({ path: this.secretPath }, `cannot use the API key: ${message}`);
    }
    if (key === (this.current?.access_token ?? null)) return;
    this.set(key);
    if (key) this.logger.info({ key: fingerprint(key), path: this.secretPath }, announce ? 'API key changed' : 'loaded the API key');
    else if (!this.lastError) this.logger.warn({ path: this.secretPath }, `no API key: run \`${this.replaceCommand()}\``);
    if (announce && this.current) this.emit('token_refreshed', this.current);
  }

  private set(key: string | null): void {
    const before = this.current !== null;
    this.current = key === null ? null : this.result(key);
    if (before !== (this.current !== null)) this.emit('state_changed');
  }

  private result(key: string): TokenResult {
    return Object.freeze({
      access_token: key,
      token_type: 'Bearer',
      expiry_date: null,
      base_url: this.settings.base_url,
      profile: this.name,
      kind: this.kind,
      auth_header: this.settings.auth === 'x-api-key' ? 'x-api-key' : 'authorization',
    });
  }
}
