/**
 * The token lifecycle's decisions, as pure functions of state + event + time (sans-I/O).
 * The shell (`TokenKeeper`) does the HTTP, the files and the timers; everything that decides
 * "what now?" lives here so the hard cases are one-line table tests.
 */
import { defaultRequestRetryMs } from '../shared/config.js';
import type { Credentials } from '../shared/credentials.js';
import { sameCredentials } from '../shared/credentials.js';
import type { LastError, TokenState } from '../shared/protocol.js';

export interface LifecycleConfig {
  /** Refresh this long before `expiry_date`. */
  refreshLeadMs: number;
  /** After a retryable failure, try again after this long. */
  retryMs: number;
  /**
   * After a failed refresh, a token request starts another at most this often (shorter than
   * the schedule's `retryMs`, so a client is not kept waiting long once the network is back,
   * but a busy client cannot turn an outage into a refresh per request). Default: 5 s, or
   * `retryMs` when that is shorter.
   */
  requestRetryMs?: number;
}

export interface LifecycleState {
  credentials: Credentials | null;
  /** Wall-clock time the current credentials became ours (login, refresh, load or adoption). */
  credentialsSince: number | null;
  refreshing: boolean;
  /** The refresh token was rejected: auto-refresh is stopped until new credentials arrive. */
  needsLogin: boolean;
  /** Retryable failures since the last success. */
  failures: number;
  lastFailureAt: number | null;
  lastError: LastError | null;
  lastRefreshAt: number | null;
}

export type LifecycleEvent =
  /** New credentials from a login, a file at start-up, or an outside change we adopted. */
  | { type: 'credentials_loaded'; credentials: Credentials }
  | { type: 'credentials_cleared' }
  | { type: 'refresh_started' }
  /** `credentials` came back for the refresh token `usedRefreshToken`. */
  | { type: 'refresh_succeeded'; credentials: Credentials; usedRefreshToken: string }
  /** `terminal`: the server rejected `usedRefreshToken` itself. */
  | { type: 'refresh_failed'; error: { code: string; message: string }; terminal: boolean; usedRefreshToken: string };

export const initialState: LifecycleState = {
  credentials: null,
  credentialsSince: null,
  refreshing: false,
  needsLogin: false,
  failures: 0,
  lastFailureAt: null,
  lastError: null,
  lastRefreshAt: null,
};

/** Applies one event. Pure: the same state, event and time always give the same result. */
export function reduce(state: LifecycleState, event: LifecycleEvent, now: number): LifecycleState {
  switch (event.type) {
    case 'credentials_loaded':
      return {
        ...state,
        credentials: event.credentials,
        credentialsSince: now,
        needsLogin: false,
        failures: 0,
        lastFailureAt: null,
      };
    case 'credentials_cleared':
      return { ...initialState, lastError: state.lastError, lastRefreshAt: state.lastRefreshAt };
    case 'refresh_started':
      return { ...state, refreshing: true };
    case 'refresh_succeeded':
      // A logout while the refresh was in flight wins: its result must not bring credentials back.
      if (!state.credentials) return { ...state, refreshing: false };
      // So does a login (or an adopted file with another refresh token): the result belongs to
      // the grant that was replaced, and taking it would throw away the new one.
      if (state.credentials.refresh_token !== event.usedRefreshToken) return { ...state, refreshing: false };
      return {
        ...state,
        credentials: event.credentials,
        credentialsSince: now,
        refreshing: false,
        needsLogin: false,
        failures: 0,
        lastFailureAt: null,
        lastRefreshAt: now,
      };
    case 'refresh_failed': {
      const lastError = { code: event.error.code, message: event.error.message, at: now };
      // The credentials changed while the refresh was in flight (an outside file change was
      // adopted): the failure concerns a refresh token we no longer hold, so it decides nothing.
      if (state.credentials?.refresh_token !== event.usedRefreshToken) {
        return { ...state, refreshing: false, lastError };
      }
      if (event.terminal) {
        return { ...state, refreshing: false, needsLogin: true, lastError, failures: state.failures + 1, lastFailureAt: now };
      }
      return { ...state, refreshing: false, failures: state.failures + 1, lastFailureAt: now, lastError };
    }
  }
}

/** The state a person (and `status`) sees. */
export function phase(state: LifecycleState, now: number): TokenState {
  if (!state.credentials) return 'no_credentials';
  if (state.needsLogin) return 'needs_login';
  // A login without a refresh token (a provider that issues none) ends when its token expires.
  if (!state.credentials.refresh_token && now >= state.credentials.expiry_date) return 'needs_login';
  if (state.refreshing) return 'refreshing';
  if (now >= state.credentials.expiry_date) return 'expired';
  if (state.failures > 0) return 'retrying';
  return 'valid';
}

/**
 * The last retry before expiry comes this long before it, so a token is not lost just
 * because the regular retry cadence would have stepped over its expiry.
 */
export function finalAttemptLeadMs(config: LifecycleConfig): number {
  return Math.min(10_000, Math.floor(config.retryMs / 2));
}

/**
 * When the next automatic refresh should start (wall clock), or null when none is due
 * (no credentials, needs login, or one is running). A time in the past means "now".
 */
export function nextRefreshAt(state: LifecycleState, config: LifecycleConfig, now: number): number | null {
  const creds = state.credentials;
  if (!creds || state.needsLogin || state.refreshing) return null;
  // Nothing to refresh with: the token is served until it expires, then a login is needed.
  if (!creds.refresh_token) return null;
  let dueByExpiry = creds.expiry_date - config.refreshLeadMs;
  // A token whose whole lifetime is shorter than the lead would be refreshed again at once,
  // in a loop; refresh such a fresh token halfway through its life instead.
  const since = state.credentialsSince;
  if (since !== null && state.lastRefreshAt === since && dueByExpiry <= since) {
    dueByExpiry = since + Math.max(0, Math.floor((creds.expiry_date - since) / 2));
  }
  if (state.failures === 0 || state.lastFailureAt === null) return dueByExpiry;
  // The clock went backwards past the failure: the planned retry time means nothing on the
  // new clock, so retry now; that failure (if any) is stamped on the new clock.
  if (state.lastFailureAt > now) return now;
  const failedAt = state.lastFailureAt;
  const regular = failedAt + config.retryMs;
  const finalAttempt = creds.expiry_date - finalAttemptLeadMs(config);
  if (failedAt < finalAttempt && regular > finalAttempt) return finalAttempt;
  return regular;
}

export type TokenDecision =
  | { action: 'serve' }
  | { action: 'refresh' }
  | { action: 'fail'; reason: 'no_credentials' | 'needs_login' | 'expired' };

/**
 * Whether a refresh ended so recently that a request should not start another: one that failed
 * within `requestRetryMs`, or one that gave the credentials held now within `retryMs` (another
 * would give a token of the same lifetime, and rotate the refresh token for nothing).
 */
export function refreshedRecently(state: LifecycleState, config: LifecycleConfig, now: number): boolean {
  const within = (at: number | null, ms: number) => at !== null && at <= now && now - at < ms;
  const afterFailure = config.requestRetryMs ?? defaultRequestRetryMs(config.retryMs);
  if (state.failures > 0 && within(state.lastFailureAt, afterFailure)) return true;
  return state.lastRefreshAt === state.credentialsSince && within(state.lastRefreshAt, config.retryMs);
}

/**
 * What to do with a request for a token that must stay valid for `minValidityMs`.
 * `afterRefreshAttempt`: a refresh for this request already ran (and failed), so serve what
 * is still valid or fail, rather than refreshing again. A refresh that ended very recently
 * (`refreshedRecently`) counts as that attempt: requests cannot turn an outage into a refresh
 * each, and a minimum longer than the provider's tokens live is met as far as a fresh token can.
 */
export function decideTokenRequest(
  state: LifecycleState,
  config: LifecycleConfig,
  now: number,
  minValidityMs: number,
  afterRefreshAttempt = false,
): TokenDecision {
  const creds = state.credentials;
  if (!creds) return { action: 'fail', reason: 'no_credentials' };
  const remaining = creds.expiry_date - now;
  if (remaining > minValidityMs) return { action: 'serve' };
  if (state.needsLogin || !creds.refresh_token) return remaining > 0 ? { action: 'serve' } : { action: 'fail', reason: 'needs_login' };
  // A refresh in flight is joined, however recent the last one.
  if (!afterRefreshAttempt && (state.refreshing || !refreshedRecently(state, config, now))) return { action: 'refresh' };
  // The refresh failed (or could not do better): a token that is still valid is better than none.
  return remaining > 0 ? { action: 'serve' } : { action: 'fail', reason: 'expired' };
}

/**
 * Whether credentials read from a file (written by someone else) should replace ours:
 * when we have none, when they expire later, or when they carry a different refresh token
 * and were written after ours became current (a newer login or a refresh elsewhere).
 */
export function shouldAdopt(
  current: Credentials | null,
  currentSince: number | null,
  candidate: Credentials,
  candidateWrittenAt: number,
): boolean {
  if (!current) return true;
  if (sameCredentials(current, candidate)) return false;
  if (candidate.expiry_date > current.expiry_date) return true;
  return candidate.refresh_token !== current.refresh_token && candidateWrittenAt > (currentSince ?? 0);
}

/**
 * Which credentials to start with when both our file and the Qwen CLI's exist: the one that
 * expires later (it was refreshed more recently); ours on a tie.
 */
export function pickAtStart(own: Credentials | null, cli: Credentials | null): 'own' | 'cli' | 'none' {
  if (!own && !cli) return 'none';
  if (!own) return 'cli';
  if (!cli) return 'own';
  return cli.expiry_date > own.expiry_date ? 'cli' : 'own';
}
