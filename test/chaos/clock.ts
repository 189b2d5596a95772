/**
 * Scenario 8: the wall clock jumps (+2 h, -2 h) and the machine sleeps (timers fire late), with
 * the real TokenKeeper driven by a fake clock (real files, real local server). After each event
 * the keeper must take the right refresh decision within one retry interval of monotonic time:
 * refresh when the token is (now) due, not refresh when it is not, and never spin.
 */
import { expect } from 'vitest';
import type { Credentials } from '../../shared/credentials.js';
import { QwenOAuthClient } from '../../daemon/oauth.js';
import type { TokenKeeper } from '../../daemon/token-keeper.js';
import { FakeClock } from './fake-clock.js';
import { report, until, type SecretLedger } from './harness.js';
import { keeperRig, type KeeperRig } from './in-process.js';

const SEC = 1_000;
const MIN = 60 * SEC;
const HOUR = 60 * MIN;
const LEAD = 5 * MIN;
const RETRY = 60 * SEC;
/** 2026-01-01T00:00:00Z on the fake wall clock. */
const T0 = Date.UTC(2026, 0, 1);

interface Attempt {
  mono: number;
  wall: number;
}

interface ClockRig {
  rig: KeeperRig;
  clock: FakeClock;
  keeper: TokenKeeper;
  attempts: Attempt[];
  seeded: Credentials;
  /** Lets `ms` of monotonic time pass in steps, letting refreshes (real I/O) finish after each. */
  run(ms: number, stepMs: number, stopWhen?: () => boolean): Promise<void>;
}

async function clockRig(expiresInMs: number): Promise<ClockRig> {
  const rig = await keeperRig();
  const clock = new FakeClock(T0);
  const attempts: Attempt[] = [];
  const real = new QwenOAuthClient({ baseUrl: rig.server.baseUrl, clientId: rig.server.settings.clientId, scope: 'openid', timeoutMs: 2_000 });
  const oauth = {
    refreshTokenGrant(refreshToken: string, signal?: AbortSignal) {
      attempts.push({ mono: clock.monotonic(), wall: clock.now() });
      return real.refreshTokenGrant(refreshToken, signal);
    },
  };
  const t = rig.server.issueTokens({ expiresIn: 21_600 });
  const seeded: Credentials = { access_token: t.access_token, refresh_token: t.refresh_token, token_type: 'Bearer', resource_url: t.resource_url, expiry_date: T0 + expiresInMs };
  await rig.ownFile().write(seeded);
  const keeper = rig.keeper({ clock, cliFile: null, oauth, config: { refreshLeadMs: LEAD, retryMs: RETRY, httpTimeoutMs: 2_000 } });
  await keeper.start();
  const settle = async () => {
    await new Promise((r) => setImmediate(r));
    if (keeper.snapshot().state === 'refreshing') await until(() => keeper.snapshot().state !== 'refreshing', 5_000, 'the refresh to finish');
    await new Promise((r) => setImmediate(r));
  };
  return {
    rig,
    clock,
    keeper,
    attempts,
    seeded,
    async run(ms, stepMs, stopWhen) {
      for (let passed = 0; passed < ms; passed += stepMs) {
        clock.advance(stepMs);
        await settle();
        if (stopWhen?.()) return;
      }
    },
  };
}

/** Monotonic seconds from `since` to the first attempt after it, or null when there was none. */
function decidedAfter(attempts: Attempt[], since: number): number | null {
  const a = attempts.find((x) => x.mono >= since);
  return a ? (a.mono - since) / SEC : null;
}

export interface ClockFigures {
  [name: string]: string;
}

export async function clockJumps(ledger: SecretLedger): Promise<ClockFigures> {
  const figures: ClockFigures = {};
  const cases: Array<[string, () => Promise<string>]> = [
    [
      '+2 h jump, token valid',
      async () => {
        const c = await clockRig(HOUR); // refresh due at T0+55 min
        try {
          c.clock.jump(2 * HOUR); // now the token is an hour past expiry
          const at = c.clock.monotonic();
          await c.run(2 * RETRY, SEC, () => c.attempts.length > 0);
          const after = decidedAfter(c.attempts, at);
          expect(after, 'refreshed within one retry interval of the jump').not.toBeNull();
          expect(after!).toBeLessThanOrEqual(RETRY / SEC);
          expect(c.keeper.snapshot().state).toBe('valid');
          expect(c.keeper.snapshot().credentials!.expiry_date).toBeGreaterThan(c.clock.now() + HOUR);
          // And no storm afterwards.
          await c.run(2 * RETRY, 5 * SEC);
          expect(c.attempts).toHaveLength(1);
          return `refreshed after ${after} s`;
        } finally {
          await finish(c, ledger);
        }
      },
    ],
    [
      '-2 h jump, token valid',
      async () => {
        const c = await clockRig(HOUR);
        try {
          const due = T0 + HOUR - LEAD;
          c.clock.jump(-2 * HOUR);
          await c.run(2 * RETRY, 5 * SEC);
          expect(c.attempts, 'no refresh: on the new clock the token is not due').toHaveLength(0);
          expect(c.keeper.snapshot().nextRefreshAt).toBe(due);
          // The refresh comes when the wall clock reaches the due time, not 2 h late.
          await c.run(4 * HOUR, 5 * SEC, () => c.attempts.length > 0);
          expect(c.attempts).toHaveLength(1);
          const lateBy = (c.attempts[0]!.wall - due) / SEC;
          expect(lateBy).toBeGreaterThanOrEqual(0);
          expect(lateBy).toBeLessThanOrEqual(RETRY / SEC);
          return `no refresh until due, then ${lateBy} s after due`;
        } finally {
          await finish(c, ledger);
        }
      },
    ],
    [
      '-2 h jump while retrying',
      async () => {
        const c = await clockRig(HOUR);
        try {
          c.rig.server.injectFault({ kind: '5xx' });
          await c.run(HOUR, 10 * SEC, () => c.attempts.length > 0); // the regular refresh fails
          expect(c.keeper.snapshot().state).toBe('retrying');
          c.clock.jump(-2 * HOUR);
          const at = c.clock.monotonic();
          await c.run(2 * RETRY, SEC, () => c.attempts.length > 1);
          const after = decidedAfter(c.attempts.slice(1), at);
          expect(after, 'retried within one retry interval of the jump, not 2 h later').not.toBeNull();
          expect(after!).toBeLessThanOrEqual(RETRY / SEC);
          c.rig.server.clearFaults();
          await c.run(2 * RETRY, SEC, () => c.keeper.snapshot().state === 'valid');
          expect(c.keeper.snapshot().state).toBe('valid');
          return `retried after ${after} s, recovered`;
        } finally {
          await finish(c, ledger);
        }
      },
    ],
    [
      'suspended 3 h, token valid',
      async () => {
        const c = await clockRig(HOUR);
        try {
          await c.run(10 * MIN, 10 * SEC);
          expect(c.attempts).toHaveLength(0);
          c.clock.suspend(3 * HOUR); // wakes 2 h 10 min past expiry; timers fire late
          const at = c.clock.monotonic();
          await c.run(2 * RETRY, SEC, () => c.attempts.length > 0);
          const after = decidedAfter(c.attempts, at);
          expect(after, 'refreshed within one retry interval of waking').not.toBeNull();
          expect(after!).toBeLessThanOrEqual(RETRY / SEC);
          expect(c.keeper.snapshot().state).toBe('valid');
          return `refreshed ${after} s after waking`;
        } finally {
          await finish(c, ledger);
        }
      },
    ],
    [
      'suspended 3 h, a client asks at once',
      async () => {
        const c = await clockRig(HOUR);
        try {
          c.clock.suspend(3 * HOUR);
          const creds = await c.keeper.getAccessToken(0);
          expect(creds.access_token === c.seeded.access_token, 'not the expired token').toBe(false);
          expect(c.attempts).toHaveLength(1);
          return 'refreshed on the request (0 s)';
        } finally {
          await finish(c, ledger);
        }
      },
    ],
    [
      'suspended 1 h while retrying',
      async () => {
        const c = await clockRig(HOUR);
        try {
          c.rig.server.injectFault({ kind: '5xx', times: 1 });
          await c.run(HOUR, 10 * SEC, () => c.attempts.length > 0);
          expect(c.keeper.snapshot().state).toBe('retrying');
          c.clock.suspend(HOUR); // past expiry now
          const at = c.clock.monotonic();
          await c.run(2 * RETRY, SEC, () => c.attempts.length > 1);
          const after = decidedAfter(c.attempts.slice(1), at);
          expect(after).not.toBeNull();
          expect(after!).toBeLessThanOrEqual(RETRY / SEC);
          expect(c.keeper.snapshot().state).toBe('valid');
          return `retried ${after} s after waking, recovered`;
        } finally {
          await finish(c, ledger);
        }
      },
    ],
  ];
  for (const [name, run] of cases) figures[name] = await run();
  report('8 clock jumps and suspend', figures);
  return figures;
}

async function finish(c: ClockRig, ledger: SecretLedger): Promise<void> {
  c.rig.lines.forEach((l) => ledger.addText('clock: keeper log', l));
  ledger.addServer(c.rig.server);
  await c.keeper.stop();
  await c.rig.close();
}
