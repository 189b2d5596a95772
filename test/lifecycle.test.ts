/**
 * Table tests of the token lifecycle's pure decisions (daemon/lifecycle.ts).
 * Time is a plain number: no timers, no clock, no I/O. Every state is reached by replaying
 * events through `reduce`, so the tables exercise the same path the daemon takes.
 */
import { describe, expect, it } from 'vitest';
import {
  decideTokenRequest,
  finalAttemptLeadMs,
  initialState,
  nextRefreshAt,
  phase,
  pickAtStart,
  reduce,
  shouldAdopt,
  type LifecycleConfig,
  type LifecycleEvent,
  type LifecycleState,
  type TokenDecision,
} from '../daemon/lifecycle.js';
import type { Credentials } from '../shared/credentials.js';
import type { TokenState } from '../shared/protocol.js';

const T0 = 1_700_000_000_000;
const SEC = 1_000;
const MIN = 60 * SEC;
const HOUR = 60 * MIN;

/** The defaults from the issue: refresh 5 min before expiry, retry every 60 s. */
const cfg: LifecycleConfig = { refreshLeadMs: 5 * MIN, retryMs: 60 * SEC };
const FINAL_LEAD = 10 * SEC; // finalAttemptLeadMs(cfg)

function creds(name: string, expiry_date: number, refresh_token = `rt-${name}`): Credentials {
  return {
    access_token: `at-${name}`,
    refresh_token,
    token_type: 'Bearer',
    resource_url: 'portal.qwen.ai',
    expiry_date,
  };
}

/** Token A: loaded at T0, expires one hour later; its refresh is due 5 min before that. */
const EXP = T0 + HOUR;
const DUE = EXP - cfg.refreshLeadMs;
const A = creds('A', EXP);
/** Token B: what another process wrote (a different refresh token, later expiry). */
const B = creds('B', EXP + HOUR);
/** A rotated: what a refresh of A returns (new access and refresh token). */
const A2 = creds('A2', DUE + HOUR);

const ev = {
  loaded: (credentials: Credentials): LifecycleEvent => ({ type: 'credentials_loaded', credentials }),
  cleared: (): LifecycleEvent => ({ type: 'credentials_cleared' }),
  started: (): LifecycleEvent => ({ type: 'refresh_started' }),
  succeeded: (credentials: Credentials, usedRefreshToken: string): LifecycleEvent => ({
    type: 'refresh_succeeded',
    credentials,
    usedRefreshToken,
  }),
  failed: (usedRefreshToken: string, terminal = false): LifecycleEvent => ({
    type: 'refresh_failed',
    error: terminal
      ? { code: 'invalid_grant', message: 'refresh token rejected' }
      : { code: 'server_error', message: 'HTTP 503' },
    terminal,
    usedRefreshToken,
  }),
};

/** Replays `[event, at]` pairs from `from` (default: the initial state). */
function run(steps: Array<[LifecycleEvent, number]>, from: LifecycleState = initialState): LifecycleState {
  return steps.reduce((s, [e, at]) => reduce(s, e, at), from);
}

// The states of the table, each reached the way the daemon reaches it.
const sNone = initialState;
const sValid = run([[ev.loaded(A), T0]]);
const sRefreshing = run([[ev.started(), DUE]], sValid);
const sRetrying = run([[ev.failed('rt-A'), DUE]], sRefreshing); // failed once at DUE
const sNeedsLogin = run([[ev.failed('rt-A', true), DUE]], sRefreshing);
/** A file at start-up whose token had already expired. */
const sExpiredLoaded = run([[ev.loaded(creds('old', T0 - MIN)), T0]]);
/** Retrying, then the token ran out while refreshes kept failing. */
const sRetryingPastExpiry = run([
  [ev.started(), EXP + 5 * SEC],
  [ev.failed('rt-A'), EXP + 5 * SEC],
], sRetrying);

describe('phase: every state', () => {
  it.each<[string, TokenState, LifecycleState, number]>([
    ['no credentials held', 'no_credentials', sNone, T0],
    ['fresh token', 'valid', sValid, T0],
    ['valid up to the last millisecond before expiry', 'valid', sValid, EXP - 1],
    ['expired exactly at expiry_date', 'expired', sValid, EXP],
    ['expired long after expiry_date', 'expired', sValid, EXP + HOUR],
    ['refresh in flight', 'refreshing', sRefreshing, DUE],
    ['refresh in flight even past expiry', 'refreshing', sRefreshing, EXP + MIN],
    ['failed refresh, old token still valid', 'retrying', sRetrying, DUE + SEC],
    ['failed refresh, token now past expiry', 'expired', sRetrying, EXP],
    ['failures continued past expiry', 'expired', sRetryingPastExpiry, EXP + 5 * SEC],
    ['loaded a token that had already expired', 'expired', sExpiredLoaded, T0],
    ['refresh token rejected, token still valid', 'needs_login', sNeedsLogin, DUE],
    ['refresh token rejected, token expired', 'needs_login', sNeedsLogin, EXP + HOUR],
  ])('%s → %s', (_label, expected, state, now) => {
    expect(phase(state, now)).toBe(expected);
  });
});

describe('reduce: transitions between states', () => {
  it.each<[string, TokenState, TokenState, LifecycleState, LifecycleEvent, number]>([
    // from no_credentials
    ['login / file at start', 'no_credentials', 'valid', sNone, ev.loaded(A), T0],
    ['file at start holds an expired token', 'no_credentials', 'expired', sNone, ev.loaded(creds('old', T0 - 1)), T0],
    ['logout while holding nothing', 'no_credentials', 'no_credentials', sNone, ev.cleared(), T0],
    // from valid
    ['timer fires', 'valid', 'refreshing', sValid, ev.started(), DUE],
    ['outside change adopted', 'valid', 'valid', sValid, ev.loaded(B), T0 + MIN],
    ['logout', 'valid', 'no_credentials', sValid, ev.cleared(), T0 + MIN],
    // from refreshing
    ['refresh succeeds', 'refreshing', 'valid', sRefreshing, ev.succeeded(A2, 'rt-A'), DUE + SEC],
    ['retryable failure, token still valid', 'refreshing', 'retrying', sRefreshing, ev.failed('rt-A'), DUE + SEC],
    ['retryable failure after expiry', 'refreshing', 'expired', sRefreshing, ev.failed('rt-A'), EXP + SEC],
    ['refresh token rejected', 'refreshing', 'needs_login', sRefreshing, ev.failed('rt-A', true), DUE + SEC],
    ['logout during refresh', 'refreshing', 'no_credentials', sRefreshing, ev.cleared(), DUE + SEC],
    ['refresh succeeds after expiry', 'refreshing', 'valid', sRefreshing, ev.succeeded(A2, 'rt-A'), EXP + MIN],
    ['outside change adopted mid-refresh: still in flight', 'refreshing', 'refreshing', sRefreshing, ev.loaded(B), DUE + SEC],
    ['failure for a token replaced mid-refresh', 'refreshing', 'valid', run([[ev.loaded(B), DUE + SEC]], sRefreshing), ev.failed('rt-A', true), DUE + 2 * SEC],
    // from retrying
    ['retry timer fires', 'retrying', 'refreshing', sRetrying, ev.started(), DUE + MIN],
    ['outside change adopted', 'retrying', 'valid', sRetrying, ev.loaded(B), DUE + MIN],
    ['logout', 'retrying', 'no_credentials', sRetrying, ev.cleared(), DUE + MIN],
    // from expired
    ['caller or timer starts a refresh', 'expired', 'refreshing', sRetryingPastExpiry, ev.started(), EXP + MIN],
    ['outside change adopted', 'expired', 'valid', sRetryingPastExpiry, ev.loaded(B), EXP + MIN],
    ['logout', 'expired', 'no_credentials', sRetryingPastExpiry, ev.cleared(), EXP + MIN],
    // from needs_login
    ['new login / newer file', 'needs_login', 'valid', sNeedsLogin, ev.loaded(B), DUE + MIN],
    ['logout', 'needs_login', 'no_credentials', sNeedsLogin, ev.cleared(), DUE + MIN],
  ])('%s: %s → %s', (_label, from, expected, state, event, at) => {
    // The row's starting state really is the one named, so the row tests a transition.
    expect(phase(state, at)).toBe(from);
    expect(phase(reduce(state, event, at), at)).toBe(expected);
  });

  it.each<[string, LifecycleState, number, TokenState]>([
    ['valid → expired as time passes', sValid, EXP, 'expired'],
    ['retrying → expired as time passes', sRetrying, EXP, 'expired'],
  ])('%s (no event needed)', (_label, state, later, expected) => {
    expect(phase(state, later - 1)).not.toBe(expected);
    expect(phase(state, later)).toBe(expected);
  });

  it.each<[string, LifecycleState, Partial<LifecycleState>]>([
    [
      'credentials_loaded takes the credentials and clears failures and needs_login',
      run([[ev.loaded(B), DUE + MIN]], sNeedsLogin),
      { credentials: B, credentialsSince: DUE + MIN, needsLogin: false, failures: 0, lastFailureAt: null },
    ],
    [
      'refresh_started only marks the refresh in flight',
      sRefreshing,
      { credentials: A, credentialsSince: T0, refreshing: true, failures: 0, lastRefreshAt: null },
    ],
    [
      'refresh_succeeded takes the new credentials and records the refresh time',
      run([[ev.succeeded(A2, 'rt-A'), DUE + SEC]], sRetrying),
      { credentials: A2, credentialsSince: DUE + SEC, refreshing: false, failures: 0, lastFailureAt: null, lastRefreshAt: DUE + SEC },
    ],
    [
      'a retryable failure counts one failure at its time',
      run([[ev.failed('rt-A'), DUE + 7 * SEC]], sRefreshing),
      {
        refreshing: false,
        needsLogin: false,
        failures: 1,
        lastFailureAt: DUE + 7 * SEC,
        lastError: { code: 'server_error', message: 'HTTP 503', at: DUE + 7 * SEC },
      },
    ],
    [
      'failures accumulate until a success',
      run([[ev.started(), DUE + MIN], [ev.failed('rt-A'), DUE + MIN + SEC]], sRetrying),
      { failures: 2, lastFailureAt: DUE + MIN + SEC },
    ],
    [
      'a terminal failure sets needs_login',
      sNeedsLogin,
      { refreshing: false, needsLogin: true, failures: 1, lastFailureAt: DUE, lastError: { code: 'invalid_grant', message: 'refresh token rejected', at: DUE } },
    ],
    [
      'credentials_cleared forgets the credentials and failures',
      run([[ev.cleared(), DUE + MIN]], sNeedsLogin),
      { credentials: null, credentialsSince: null, refreshing: false, needsLogin: false, failures: 0, lastFailureAt: null },
    ],
  ])('%s', (_label, state, expected) => {
    expect(state).toMatchObject(expected);
  });

  it('is pure: the input state is not changed and the same input gives the same output', () => {
    const frozen = Object.freeze({ ...sRetrying, credentials: Object.freeze({ ...A }) });
    const before = structuredClone(frozen);
    const events = [ev.loaded(B), ev.cleared(), ev.started(), ev.succeeded(A2, 'rt-A'), ev.failed('rt-A'), ev.failed('rt-A', true)];
    for (const e of events) {
      expect(reduce(frozen, e, DUE + MIN)).toEqual(reduce(frozen, e, DUE + MIN));
    }
    expect(frozen).toEqual(before);
  });
});

describe('nextRefreshAt: the regular refresh', () => {
  it.each<[string, LifecycleConfig, number]>([
    ['default lead 5 min', cfg, EXP - 300_000],
    ['lead 1 min', { refreshLeadMs: 60_000, retryMs: 60_000 }, EXP - 60_000],
    ['lead 0', { refreshLeadMs: 0, retryMs: 60_000 }, EXP],
    ['lead 30 min', { refreshLeadMs: 30 * MIN, retryMs: 60_000 }, EXP - 30 * MIN],
  ])('is due exactly at expiry_date - refreshLeadMs (%s)', (_label, config, expected) => {
    expect(nextRefreshAt(sValid, config, T0)).toBe(expected);
  });

  it.each<[string, boolean, number]>([
    ['one ms before the due time', false, DUE - 1],
    ['exactly at the due time', true, DUE],
    ['after the due time', true, DUE + 1],
  ])('%s: due = %s', (_label, due, now) => {
    const at = nextRefreshAt(sValid, cfg, now);
    expect(at).not.toBeNull();
    expect(at! <= now).toBe(due);
  });

  it.each<[string, LifecycleState]>([
    ['no credentials', sNone],
    ['a refresh is already running', sRefreshing],
    ['the refresh token was rejected', sNeedsLogin],
    ['needs_login even once expired', sNeedsLogin],
  ])('is null when %s', (_label, state) => {
    expect(nextRefreshAt(state, cfg, DUE + MIN)).toBeNull();
    expect(nextRefreshAt(state, cfg, EXP + HOUR)).toBeNull();
  });
});

describe('finalAttemptLeadMs', () => {
  it.each<[number, number]>([
    [60_000, 10_000],
    [20_000, 10_000],
    [19_999, 9_999],
    [8_000, 4_000],
    [1_000, 500],
    [1, 0],
  ])('retryMs %d → %d', (retryMs, expected) => {
    expect(finalAttemptLeadMs({ refreshLeadMs: 300_000, retryMs })).toBe(expected);
  });
});

/** A state whose last refresh of A failed (retryably) at `at`. */
function failedAt(at: number, held: Credentials = A): LifecycleState {
  return run([
    [ev.loaded(held), T0],
    [ev.started(), at],
    [ev.failed(held.refresh_token), at],
  ]);
}

describe('nextRefreshAt: retry timing after a retryable failure', () => {
  it.each<[string, LifecycleConfig, number, number]>([
    ['default retry, failure at the due time', cfg, DUE, DUE + 60_000],
    ['default retry, failure with 10 min left', cfg, EXP - 10 * MIN, EXP - 9 * MIN],
    ['retry 15 s', { refreshLeadMs: 5 * MIN, retryMs: 15_000 }, DUE, DUE + 15_000],
    ['retry 2 min', { refreshLeadMs: 5 * MIN, retryMs: 2 * MIN }, DUE + 30 * SEC, DUE + 150 * SEC],
    // A manual refresh that failed long before the due time: the regular cadence applies.
    ['failure well before the due time', cfg, T0 + MIN, T0 + 2 * MIN],
  ])('%s → lastFailure + retryMs', (_label, config, failure, expected) => {
    expect(nextRefreshAt(failedAt(failure), config, failure)).toBe(expected);
  });

  it.each<[string, LifecycleConfig, number, number]>([
    // The regular retry (EXP + 0 s) would step over expiry: one final attempt at EXP - 10 s.
    ['regular retry lands exactly on expiry', cfg, EXP - 60 * SEC, EXP - FINAL_LEAD],
    ['regular retry lands after expiry', cfg, EXP - 30 * SEC, EXP - FINAL_LEAD],
    ['regular retry lands between final attempt and expiry', cfg, EXP - 65 * SEC, EXP - FINAL_LEAD],
    ['one ms before the final attempt', cfg, EXP - FINAL_LEAD - 1, EXP - FINAL_LEAD],
    ['short retry: final lead is half of it', { refreshLeadMs: 5 * MIN, retryMs: 8_000 }, EXP - 6_000, EXP - 4_000],
  ])('sooner when the token would expire first: %s', (_label, config, failure, expected) => {
    expect(nextRefreshAt(failedAt(failure), config, failure)).toBe(expected);
  });

  it.each<[string, number, number]>([
    ['the final attempt failed on time', EXP - FINAL_LEAD, EXP - FINAL_LEAD + 60_000],
    ['the final attempt failed after 300 ms of latency', EXP - FINAL_LEAD + 300, EXP - FINAL_LEAD + 300 + 60_000],
    ['a failure after expiry', EXP + 5 * MIN, EXP + 6 * MIN],
  ])('back to the regular cadence once %s', (_label, failure, expected) => {
    const at = nextRefreshAt(failedAt(failure), cfg, failure);
    expect(at).toBe(expected);
    expect(at! - failure).toBe(cfg.retryMs); // never "now" again: no tight loop
  });

  it('a token that keeps failing is retried on a fixed cadence with exactly one final attempt', () => {
    // Drive the loop as the daemon would: start at each planned time, fail at once.
    let state = sValid;
    const attempts: number[] = [];
    let at = nextRefreshAt(state, cfg, T0)!;
    // Bounded, so a tight loop (the same time planned again) fails instead of hanging.
    for (let i = 0; i < 20 && at <= EXP + 3 * MIN; i++) {
      attempts.push(at);
      state = run([[ev.started(), at], [ev.failed('rt-A'), at]], state);
      at = nextRefreshAt(state, cfg, at)!;
    }
    expect(attempts).toEqual([
      DUE, // EXP - 300 s
      EXP - 240 * SEC,
      EXP - 180 * SEC,
      EXP - 120 * SEC,
      EXP - 60 * SEC,
      EXP - 10 * SEC, // the final attempt
      EXP + 50 * SEC,
      EXP + 110 * SEC,
      EXP + 170 * SEC,
    ]);
    expect(state.failures).toBe(attempts.length);
    expect(phase(state, at)).toBe('expired');
  });
});

describe('wall-clock jumps', () => {
  it('forward +2 h: the token looks expired and a refresh is decided now', () => {
    const now = T0 + 2 * HOUR;
    expect(phase(sValid, now)).toBe('expired');
    expect(nextRefreshAt(sValid, cfg, now)).toBeLessThanOrEqual(now);
    expect(decideTokenRequest(sValid, cfg, now, 0)).toEqual({ action: 'refresh' });
  });

  it('forward +2 h while retrying: the retry is due now', () => {
    const now = DUE + 2 * HOUR;
    expect(nextRefreshAt(sRetrying, cfg, now)).toBeLessThanOrEqual(now);
    expect(phase(sRetrying, now)).toBe('expired');
  });

  it.each<[string, number]>([
    ['2 h', 2 * HOUR],
    ['1 day', 24 * HOUR],
    ['1 s', SEC],
  ])('back %s after a failure: the next retry is no later than now + retryMs', (_label, jump) => {
    const now = DUE - jump;
    const at = nextRefreshAt(sRetrying, cfg, now)!;
    expect(at).not.toBeNull();
    expect(at).toBeLessThanOrEqual(now + cfg.retryMs);
    expect(at).toBeGreaterThanOrEqual(now); // and not a tight loop either
  });

  it('back 2 h after a failure: once the planned retry time arrives, the retry is due', () => {
    // The failure was recorded at DUE, then the clock went back 2 h. The daemon plans the
    // retry, and when that time arrives (nothing else happened) it asks again whether it is due.
    const now = DUE - 2 * HOUR;
    const planned = nextRefreshAt(sRetrying, cfg, now)!;
    expect(planned).toBeLessThanOrEqual(now + cfg.retryMs);
    // Arriving at, or after, the planned time must mean "due", as for a suspended laptop.
    expect(nextRefreshAt(sRetrying, cfg, planned)).toBeLessThanOrEqual(planned);
    expect(nextRefreshAt(sRetrying, cfg, planned + 5 * SEC)).toBeLessThanOrEqual(planned + 5 * SEC);
  });

  it('back 2 h without a failure: the refresh stays at expiry_date - lead', () => {
    const now = T0 - 2 * HOUR;
    expect(nextRefreshAt(sValid, cfg, now)).toBe(DUE);
    expect(phase(sValid, now)).toBe('valid');
    expect(decideTokenRequest(sValid, cfg, now, 0)).toEqual({ action: 'serve' });
  });
});

describe('suspended laptop: waking after the planned time', () => {
  it.each<[string, LifecycleState, number]>([
    ['regular refresh', sValid, T0],
    ['regular retry', sRetrying, DUE],
    ['final attempt', failedAt(EXP - 30 * SEC), EXP - 30 * SEC],
    ['retry after expiry', sRetryingPastExpiry, EXP + 5 * SEC],
  ])('%s is due at once on wake', (_label, state, before) => {
    const planned = nextRefreshAt(state, cfg, before)!;
    expect(planned).toBeGreaterThan(before); // it was in the future when planned
    for (const wake of [planned, planned + 1, planned + 3 * HOUR]) {
      expect(nextRefreshAt(state, cfg, wake)).toBeLessThanOrEqual(wake);
    }
  });
});

describe('refresh racing an outside file change', () => {
  /** Refreshing A, and meanwhile B was adopted from a file. */
  const adoptedDuringRefresh = run([[ev.loaded(B), DUE + SEC]], sRefreshing);

  it.each<[string, boolean]>([
    ['retryable', false],
    ['terminal', true],
  ])('a %s failure for the refresh token we no longer hold decides nothing', (_label, terminal) => {
    const s = reduce(adoptedDuringRefresh, ev.failed('rt-A', terminal), DUE + 2 * SEC);
    expect(s.needsLogin).toBe(false);
    expect(s.failures).toBe(0);
    expect(s.lastFailureAt).toBeNull();
    expect(s.refreshing).toBe(false);
    expect(s.credentials).toEqual(B);
    expect(phase(s, DUE + 2 * SEC)).toBe('valid');
    expect(nextRefreshAt(s, cfg, DUE + 2 * SEC)).toBe(B.expiry_date - cfg.refreshLeadMs);
    expect(decideTokenRequest(s, cfg, DUE + 2 * SEC, 0)).toEqual({ action: 'serve' });
  });

  it('a stale failure does not disturb an earlier failure count of the adopted token', () => {
    // B itself already failed once; a late failure for A must not add to it.
    const s = run([
      [ev.started(), DUE + 3 * SEC],
      [ev.failed('rt-B'), DUE + 4 * SEC],
      [ev.started(), DUE + 5 * SEC],
      [ev.loaded(creds('C', EXP + HOUR)), DUE + 6 * SEC],
      [ev.failed('rt-B', true), DUE + 7 * SEC],
    ], adoptedDuringRefresh);
    expect(s).toMatchObject({ needsLogin: false, failures: 0, lastFailureAt: null });
  });

  it('a failure after the file was rewritten with the same refresh token still counts', () => {
    // Only the refresh token decides: a rewrite that kept it does not make the failure stale.
    const rewritten = { ...A, access_token: 'at-A-rewritten' };
    const s = run([[ev.loaded(rewritten), DUE + SEC], [ev.failed('rt-A', true), DUE + 2 * SEC]], sRefreshing);
    expect(s.needsLogin).toBe(true);
    expect(phase(s, DUE + 2 * SEC)).toBe('needs_login');
  });

  it('a refresh_succeeded after adoption is dropped: the adopted grant stays', () => {
    // B came from a login or another process while A was being refreshed; A2 belongs to the
    // grant B replaced, and taking it would throw B's refresh token away.
    const s = reduce(adoptedDuringRefresh, ev.succeeded(A2, 'rt-A'), DUE + 2 * SEC);
    expect(s.credentials).toEqual(B);
    expect(s.credentialsSince).toBe(DUE + SEC);
    expect(s.lastRefreshAt).toBe(adoptedDuringRefresh.lastRefreshAt);
    expect(s.refreshing).toBe(false);
    expect(phase(s, DUE + 2 * SEC)).toBe('valid');
  });

  it('a failure arriving after logout leaves no credentials and no needs_login', () => {
    const s = run([[ev.cleared(), DUE + SEC], [ev.failed('rt-A', true), DUE + 2 * SEC]], sRefreshing);
    expect(s).toMatchObject({ credentials: null, needsLogin: false, failures: 0, refreshing: false });
    expect(phase(s, DUE + 2 * SEC)).toBe('no_credentials');
  });

  it('a refresh that succeeds after logout does not bring the credentials back', () => {
    // Logout (credentials_cleared) while a refresh of A was in flight; the HTTP call then
    // returns. Taking its result would silently undo the logout.
    const s = run([[ev.cleared(), DUE + SEC], [ev.succeeded(A2, 'rt-A'), DUE + 2 * SEC]], sRefreshing);
    expect(s.credentials).toBeNull();
    expect(phase(s, DUE + 2 * SEC)).toBe('no_credentials');
  });
});

describe('rotation', () => {
  const rotated = run([[ev.succeeded(A2, 'rt-A'), DUE + SEC]], sRefreshing);

  it('refresh_succeeded replaces the refresh token', () => {
    expect(rotated.credentials?.refresh_token).toBe('rt-A2');
    expect(rotated.credentials?.access_token).toBe('at-A2');
    expect(nextRefreshAt(rotated, cfg, DUE + SEC)).toBe(A2.expiry_date - cfg.refreshLeadMs);
  });

  it.each<[string, boolean]>([
    ['retryable', false],
    ['terminal', true],
  ])('a late %s failure for the retired refresh token is ignored', (_label, terminal) => {
    const s = run([[ev.started(), DUE + 2 * SEC], [ev.failed('rt-A', terminal), DUE + 3 * SEC]], rotated);
    expect(s).toMatchObject({ needsLogin: false, failures: 0, credentials: A2 });
    expect(phase(s, DUE + 3 * SEC)).toBe('valid');
  });

  it('a terminal failure of the new refresh token sets needs_login', () => {
    const s = run([[ev.started(), DUE + 2 * SEC], [ev.failed('rt-A2', true), DUE + 3 * SEC]], rotated);
    expect(phase(s, DUE + 3 * SEC)).toBe('needs_login');
  });

  it('a refresh that returns the same refresh token keeps it and takes the new access token', () => {
    const renewed = creds('A-renewed', DUE + HOUR, 'rt-A');
    const s = reduce(sRefreshing, ev.succeeded(renewed, 'rt-A'), DUE + SEC);
    expect(s.credentials).toEqual(renewed);
    expect(s.lastRefreshAt).toBe(DUE + SEC);
  });
});

describe('needs_login', () => {
  it('stops auto-refresh', () => {
    expect(sNeedsLogin.needsLogin).toBe(true);
    expect(nextRefreshAt(sNeedsLogin, cfg, DUE)).toBeNull();
  });

  it.each<[string, number, number, boolean, TokenDecision]>([
    ['still valid', DUE, 0, false, { action: 'serve' }],
    ['still valid, asked for more validity than is left', DUE, 10 * MIN, false, { action: 'serve' }],
    ['still valid, after a refresh attempt', DUE, 10 * MIN, true, { action: 'serve' }],
    ['1 ms before expiry', EXP - 1, 0, false, { action: 'serve' }],
    ['exactly at expiry', EXP, 0, false, { action: 'fail', reason: 'needs_login' }],
    ['an hour after expiry', EXP + HOUR, 0, false, { action: 'fail', reason: 'needs_login' }],
    ['after expiry, after a refresh attempt', EXP + HOUR, 0, true, { action: 'fail', reason: 'needs_login' }],
  ])('token request when %s', (_label, now, minValidityMs, after, expected) => {
    expect(decideTokenRequest(sNeedsLogin, cfg, now, minValidityMs, after)).toEqual(expected);
  });

  it.each<[string, LifecycleEvent]>([
    ['credentials_loaded (new login or newer file)', ev.loaded(B)],
    ['a refresh that succeeded after re-reading the files', ev.succeeded(B, 'rt-A')],
  ])('is cleared by %s', (_label, event) => {
    const s = reduce(sNeedsLogin, event, DUE + MIN);
    expect(s.needsLogin).toBe(false);
    expect(s.failures).toBe(0);
    expect(phase(s, DUE + MIN)).toBe('valid');
    expect(nextRefreshAt(s, cfg, DUE + MIN)).toBe(B.expiry_date - cfg.refreshLeadMs);
    expect(decideTokenRequest(s, cfg, EXP + MIN, 0)).toEqual({ action: 'serve' });
  });
});

describe('decideTokenRequest', () => {
  /** Refreshed at DUE into A2, which lives an hour. */
  const sFreshRefresh = run([[ev.succeeded(A2, 'rt-A'), DUE]], sRefreshing);

  it.each<[string, LifecycleState, number, number, boolean, TokenDecision]>([
    ['no credentials', sNone, T0, 0, false, { action: 'fail', reason: 'no_credentials' }],
    ['no credentials, after an attempt', sNone, T0, 0, true, { action: 'fail', reason: 'no_credentials' }],
    ['fresh token', sValid, T0, 0, false, { action: 'serve' }],
    ['within the refresh lead: the timer handles it', sValid, DUE + MIN, 0, false, { action: 'serve' }],
    ['remaining just above minValidityMs', sValid, EXP - 10 * MIN - 1, 10 * MIN, false, { action: 'serve' }],
    ['remaining exactly minValidityMs', sValid, EXP - 10 * MIN, 10 * MIN, false, { action: 'refresh' }],
    ['remaining below minValidityMs', sValid, EXP - 5 * MIN, 10 * MIN, false, { action: 'refresh' }],
    ['minValidityMs longer than any token lives', sValid, T0, 2 * HOUR, false, { action: 'refresh' }],
    ['exactly at expiry', sValid, EXP, 0, false, { action: 'refresh' }],
    ['past expiry: refresh now, not when the timer fires', sValid, EXP + MIN, 0, false, { action: 'refresh' }],
    ['refresh in flight and token expired: join it', sRefreshing, EXP + MIN, 0, false, { action: 'refresh' }],
    ['retrying, token still valid', sRetrying, DUE + MIN, 0, false, { action: 'serve' }],
    // After a failure, a request starts another refresh at most every REQUEST_RETRY_MS (5 s).
    ['retrying past expiry, within 5 s of the failure', sRetryingPastExpiry, EXP + 9 * SEC, 0, false, { action: 'fail', reason: 'expired' }],
    ['retrying past expiry, 5 s after the failure', sRetryingPastExpiry, EXP + 10 * SEC, 0, false, { action: 'refresh' }],
    ['retrying past expiry, long after the failure', sRetryingPastExpiry, EXP + MIN, 0, false, { action: 'refresh' }],
    ['retrying, short of the minimum, within 5 s', sRetrying, DUE + 4 * SEC, 10 * MIN, false, { action: 'serve' }],
    ['retrying, short of the minimum, 5 s later', sRetrying, DUE + 5 * SEC, 10 * MIN, false, { action: 'refresh' }],
    ['retrying, the clock went back before the failure', sRetryingPastExpiry, EXP + SEC, 0, false, { action: 'refresh' }],
    ['just refreshed, asked for more than the new token lives', sFreshRefresh, DUE + 30 * SEC, 2 * HOUR, false, { action: 'serve' }],
    ['refreshed a retry interval ago, asked for more than it lives', sFreshRefresh, DUE + cfg.retryMs, 2 * HOUR, false, { action: 'refresh' }],
    ['refresh in flight within a retry interval of a failure: join it', run([[ev.started(), DUE + SEC]], sRetrying), DUE + 2 * SEC, 10 * MIN, false, { action: 'refresh' }],
    ['after a failed attempt, still valid but short', sValid, EXP - 5 * MIN, 10 * MIN, true, { action: 'serve' }],
    ['after a failed attempt, 1 ms left', sValid, EXP - 1, 10 * MIN, true, { action: 'serve' }],
    ['after a failed attempt, exactly at expiry', sValid, EXP, 0, true, { action: 'fail', reason: 'expired' }],
    ['after a failed attempt, past expiry', sRetryingPastExpiry, EXP + MIN, 0, true, { action: 'fail', reason: 'expired' }],
    ['after an attempt, plenty left', sValid, T0, 0, true, { action: 'serve' }],
  ])('%s', (_label, state, now, minValidityMs, after, expected) => {
    expect(decideTokenRequest(state, cfg, now, minValidityMs, after)).toEqual(expected);
  });

  it.each<[string, LifecycleConfig, number, TokenDecision]>([
    ['requestRetryMs 0: a request may refresh right after a failure', { ...cfg, requestRetryMs: 0 }, EXP + 6 * SEC, { action: 'refresh' }],
    ['requestRetryMs 30 s: not 25 s after the failure', { ...cfg, requestRetryMs: 30 * SEC }, EXP + 30 * SEC, { action: 'fail', reason: 'expired' }],
    ['retryMs shorter than 5 s bounds the default', { ...cfg, retryMs: 2 * SEC }, EXP + 7 * SEC, { action: 'refresh' }],
  ])('%s', (_label, config, now, expected) => {
    expect(decideTokenRequest(sRetryingPastExpiry, config, now, 0)).toEqual(expected);
  });

  it('afterRefreshAttempt defaults to false', () => {
    expect(decideTokenRequest(sValid, cfg, EXP + MIN, 0)).toEqual({ action: 'refresh' });
  });
});

describe('shouldAdopt', () => {
  const SINCE = T0 + 10 * MIN; // when A became ours
  const later = creds('A-later', EXP + MIN, 'rt-A');
  const earlierSameRt = creds('A-earlier', EXP - MIN, 'rt-A');
  const otherSameExpiry = creds('X', EXP);
  const otherEarlier = creds('Y', EXP - 30 * MIN);
  const otherLater = creds('Z', EXP + MIN);

  it.each<[string, boolean, Credentials | null, number | null, Credentials, number]>([
    ['none held', true, null, null, A, T0],
    ['none held, even an expired candidate', true, null, null, creds('old', T0 - HOUR), T0 - HOUR],
    ['later expiry, same refresh token', true, A, SINCE, later, SINCE - MIN],
    ['later expiry, different refresh token written earlier', true, A, SINCE, otherLater, SINCE - MIN],
    ['different refresh token written later (same expiry)', true, A, SINCE, otherSameExpiry, SINCE + 1],
    ['different refresh token written later (earlier expiry: a new login)', true, A, SINCE, otherEarlier, SINCE + MIN],
    ['different refresh token written earlier', false, A, SINCE, otherSameExpiry, SINCE - 1],
    ['different refresh token written in the same ms', false, A, SINCE, otherSameExpiry, SINCE],
    ['different refresh token, earlier expiry, written earlier', false, A, SINCE, otherEarlier, SINCE - MIN],
    ['different refresh token, ours has no known start', true, A, null, otherEarlier, T0],
    ['same refresh token, earlier expiry, written later', false, A, SINCE, earlierSameRt, SINCE + MIN],
    ['identical credentials written later', false, A, SINCE, { ...A }, SINCE + MIN],
    ['identical credentials, no known start', false, A, null, { ...A }, T0],
    ['identical but for token_type', false, A, SINCE, { ...A, token_type: 'bearer' }, SINCE + MIN],
  ])('%s → %s', (_label, expected, current, since, candidate, writtenAt) => {
    expect(shouldAdopt(current, since, candidate, writtenAt)).toBe(expected);
  });
});

describe('pickAtStart', () => {
  it.each<[string, 'own' | 'cli' | 'none', Credentials | null, Credentials | null]>([
    ['neither file', 'none', null, null],
    ['only ours', 'own', A, null],
    ['only the Qwen CLI file', 'cli', null, A],
    ['the Qwen CLI file expires later', 'cli', A, B],
    ['ours expires later', 'own', B, A],
    ['a tie keeps ours', 'own', A, creds('A-cli', EXP)],
    ['later by one ms', 'cli', A, creds('A-cli', EXP + 1)],
  ])('%s → %s', (_label, expected, own, cli) => {
    expect(pickAtStart(own, cli)).toBe(expected);
  });
});
