/**
 * What every credential profile does at run time, whatever its kind: hand out a token, refresh,
 * log in and out, report its state. One runtime object per profile, each with its own timers,
 * files and HTTP, so one profile's trouble never waits on another's (profile-registry.ts keeps
 * the set; profile-oauth.ts and profile-api-key.ts are the kinds).
 */
import type { EventEmitter } from 'node:events';
import type { QwenError } from '../shared/errors.js';
import type { ProfileInfo, ProfileKind, ProfileSettings } from '../shared/profiles.js';
import type { LastError, LoginStartResult, ProfileState, TokenResult, TokenState } from '../shared/protocol.js';
import type { WatchedFile } from './credential-watch.js';

export interface RuntimeRefreshFailure {
  code: string;
  message: string;
  state: TokenState;
  next_retry_at: number | null;
}

export interface ProfileRuntimeEvents {
  /** New credentials are current; the answer clients get from now on. */
  token_refreshed: [TokenResult];
  refresh_failed: [RuntimeRefreshFailure];
  /** The state a person sees may have changed (announced settled by the registry). */
  state_changed: [];
  login_completed: [{ expiry_date: number }];
  login_failed: [QwenError];
}

/** The part of `status` that is about one profile. */
export interface ProfileStatus {
  state: ProfileState;
  expiry_date: number | null;
  next_refresh_at: number | null;
  last_refresh_at: number | null;
  last_error: LastError | null;
  retry_count: number;
  source_file: string | null;
  token_path: string;
  qwen_cli_link: { enabled: boolean; path: string };
  token_fingerprint: string;
  refresh_token_fingerprint: string;
  login_in_progress: boolean;
}

export interface ProfileRuntime extends EventEmitter<ProfileRuntimeEvents> {
  readonly name: string;
  readonly kind: ProfileKind;
  readonly builtin: boolean;
  /** The settings it runs with; null for the built-in profile (its settings come from the environment). */
  readonly settings: ProfileSettings | null;
  /**
   * Takes new settings while running, without a restart. Only for a change that
   * `settingsNeedRestart` (profile-config.ts) allows: the same kind, differing only in fields
   * that touch no grant, request, schedule or credential. True when the token answer clients
   * get changed (its base URL), so they are sent it again.
   */
  applySettings(settings: ProfileSettings): boolean;
  /** Loads what is on disk and starts its schedule; never waits for the network. */
  start(): Promise<void>;
  /**
   * Stops timers and abandons what is in flight (a write in progress completes).
   * `letRefreshFinish`: replaced by a runtime on the same grant, so a refresh in flight may
   * finish (within its HTTP timeout) rather than lose a refresh token the provider rotated.
   */
  stop(options?: { letRefreshFinish?: boolean }): Promise<void>;
  /** The token when it can be handed out right now, valid longer than `minValidityMs`; else null. */
  servableNow(minValidityMs: number): TokenResult | null;
  /** A token valid longer than `minValidityMs`, refreshing first when needed. */
  getAccessToken(minValidityMs: number): Promise<TokenResult>;
  /** Forces a refresh (for a static credential: answers the same). */
  refresh(): Promise<TokenResult>;
  loginStart(): Promise<LoginStartResult>;
  loginCancel(): boolean;
  /** Forgets the credential and deletes its file (the Qwen CLI's too when asked, built-in profile only). */
  logout(includeQwenCli: boolean): Promise<string[]>;
  /** Re-reads its files (SIGHUP). */
  reload(): Promise<void>;
  status(): ProfileStatus;
  /** The profile as `profiles.list` shows it. */
  info(isDefault: boolean): ProfileInfo;
  /** The files whose changes by other processes it must hear about. */
  watchedFiles(): WatchedFile[];
}

/** What a version-1 client gets for `expiry_date` of a credential that never expires (the largest Date). */
export const NEVER_EXPIRES = 8_640_000_000_000_000;

const v1Results = new WeakMap<TokenResult, TokenResult>();

/**
 * A token answer in version 1's shape: no `profile`, `kind` or `auth_header`, and `expiry_date`
 * always a number (a static credential's is the largest date). Made once per answer and frozen,
 * so it is serialized once too.
 */
export function v1Token(result: TokenResult): TokenResult {
  let v1 = v1Results.get(result);
  if (!v1) {
    const { profile: _profile, kind: _kind, auth_header: _header, ...rest } = result;
    v1 = Object.freeze({ ...rest, expiry_date: result.expiry_date ?? NEVER_EXPIRES });
    v1Results.set(result, v1);
  }
  return v1;
}

/** A state in version 1's terms: a static credential is simply valid. */
export function v1State(state: ProfileState): TokenState {
  return state === 'static' ? 'valid' : state;
}
