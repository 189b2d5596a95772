/**
 * Scenario 2: the OAuth server misbehaves in every way the facts page lists (5xx, 429, an
 * answer slower than the timeout, a reset connection, malformed JSON, an HTML error page,
 * connection refused). The daemon keeps serving the still-valid token, retries on its
 * schedule, logs exactly one clear line per failure, never has an unhandled rejection, and
 * recovers on the first healthy answer. When the token expires meanwhile, clients get
 * `QwenTokenExpiredError` saying what to do.
 */
import { expect } from 'vitest';
import { QwenTokenExpiredError } from '../../shared/errors.js';
import { resolveCommand } from '../../shared/cli-command.js';
import { REPO_ROOT, createFixture, credsFrom, type DaemonFixture, type LogLine } from '../support/daemon.js';
import type { Fault } from '../support/qwen-server.js';
import { bugLines, report, until, type SecretLedger } from './harness.js';
import type { ChaosScale } from './scale.js';

const RETRY_MS = 200;
const HTTP_TIMEOUT_MS = 300;
const FAILED = /refresh failed, will retry/;

/** The HTTP-level faults, each with what its log line must say. */
const HTTP_FAULTS: Array<{ name: string; fault: Fault; says: RegExp }> = [
  { name: '5xx', fault: { kind: '5xx', status: 503, times: 1 }, says: /HTTP 503/ },
  { name: '5xx plain', fault: { kind: '5xx', status: 500, plain: true, times: 1 }, says: /HTTP 500/ },
  { name: '429', fault: { kind: '429', times: 1 }, says: /HTTP 429/ },
  // Never answered before the server closes: a black hole, like a hung proxy.
  { name: 'slower than the timeout', fault: { kind: 'delay', delayMs: 120_000, times: 1 }, says: /timed out after 300 ms/ },
  { name: 'reset', fault: { kind: 'reset', times: 1 }, says: /closed the connection|ECONNRESET|socket/i },
  { name: 'malformed JSON', fault: { kind: 'malformedJson', times: 1 }, says: /not JSON|malformed/ },
  { name: 'HTML error page', fault: { kind: 'html', times: 1 }, says: /HTML page/ },
];
const REFUSED = /connection refused/;

function shuffle<T>(items: T[]): T[] {
  const out = [...items];
  for (let i = out.length - 1; i > 0; i--) {
    const j = Math.floor(Math.random() * (i + 1));
    [out[i], out[j]] = [out[j]!, out[i]!];
  }
  return out;
}

export interface FaultFigures {
  faultsInjected: number;
  failureLines: number;
  recoveries: number;
  refreshRequests: number;
}

function failureLines(fx: DaemonFixture): LogLine[] {
  return fx.logs().filter((l) => FAILED.test(String(l.msg)));
}

/** Runs `scale.faultRounds` rounds of all seven faults against one daemon. */
export async function oauthServerFaults(scale: ChaosScale, ledger: SecretLedger): Promise<FaultFigures> {
  const fx = await createFixture({
    env: {
      QWEN_TOKEND_REFRESH_LEAD_MS: '300000',
      QWEN_TOKEND_RETRY_MS: String(RETRY_MS),
      QWEN_TOKEND_HTTP_TIMEOUT_MS: String(HTTP_TIMEOUT_MS),
      QWEN_TOKEND_QWEN_CLI_SYNC: 'off',
      QWEN_TOKEND_LOG_LEVEL: 'info',
    },
  });
  const figures: FaultFigures = { faultsInjected: 0, failureLines: 0, recoveries: 0, refreshRequests: 0 };
  try {
    await fx.writeOwn(credsFrom(fx.server));
    await fx.start();
    const client = fx.client({ minValidityMs: 0 });
    for (let round = 0; round < scale.faultRounds; round++) {
      const serving = await client.getAccessToken({ noCache: true, minValidityMs: 0 });
      const linesBefore = failureLines(fx).length;
      const requestsBefore = fx.server.requests.filter((r) => r.endpoint === 'token').length;
      const order = shuffle(HTTP_FAULTS);
      for (const f of order) fx.server.injectFault(f.fault);
      // The forced refresh meets the first fault; the retries on schedule meet the rest.
      const kicked = await client.refresh().catch((e: unknown) => e);
      expect(kicked, `round ${round}: the forced refresh met ${order[0]!.name}`).toBeInstanceOf(Error);
      ledger.addError('faults: forced refresh error', kicked);
      await until(() => failureLines(fx).length >= linesBefore + order.length, 15_000, `round ${round}: ${order.length} failure lines`);
      // Serving the still-valid token all along.
      expect((await client.getAccessToken({ noCache: true, minValidityMs: 0 })) === serving, `round ${round}: still serving the old token`).toBe(true);
      // Connection refused: the server stops listening until the first refused attempt is logged.
      await fx.server.refuseConnections();
      await until(() => failureLines(fx).slice(linesBefore + order.length).some((l) => REFUSED.test(String(l.msg))), 10_000, 'a refused attempt');
      await fx.server.acceptConnections();
      await until(async () => (await client.status()).state === 'valid', 10_000, 'recovery');
      figures.recoveries++;

      const lines = failureLines(fx).slice(linesBefore);
      const refused = lines.filter((l) => REFUSED.test(String(l.msg))).length;
      figures.faultsInjected += order.length + refused;
      // One line per failure, each saying what went wrong, in the order the faults were met.
      expect(lines.length, `round ${round}: one line per failure`).toBe(order.length + refused);
      order.forEach((f, i) => expect(String(lines[i]!.msg), `round ${round}: line for ${f.name}`).toMatch(f.says));
      for (const l of lines.slice(order.length)) expect(String(l.msg)).toMatch(REFUSED);
      // Each line announces the next try one retry interval after the failure.
      for (const l of lines) {
        const loggedAt = Date.parse(String(l.time));
        expect(Number(l.next_retry_at) - loggedAt).toBeGreaterThan(RETRY_MS - 100);
        expect(Number(l.next_retry_at) - loggedAt).toBeLessThanOrEqual(RETRY_MS);
      }
      // Retries are spaced by the retry interval (never hammering), and the first healthy answer
      // ends the episode: HTTP faults + exactly one successful request reached the server.
      const requests = fx.server.requests.filter((r) => r.endpoint === 'token').slice(requestsBefore);
      expect(requests.length, `round ${round}: requests = faults met + one success`).toBe(order.length + 1);
      for (let i = 1; i < order.length; i++) {
        expect(requests[i]!.at - requests[i - 1]!.at, 'retry spacing').toBeGreaterThanOrEqual(RETRY_MS - 20);
      }
      const status = await client.status();
      expect(status.retry_count).toBe(0);
      expect((await client.getAccessToken({ noCache: true, minValidityMs: 0 })) !== serving, 'a new token after recovery').toBe(true);
    }
    figures.failureLines = failureLines(fx).length;
    figures.refreshRequests = fx.server.counts.refresh;
    expect(figures.failureLines).toBe(figures.faultsInjected);
    expect(bugLines(fx)).toEqual([]);
  } finally {
    ledger.addFixture(fx, 'faults');
    await fx.cleanup();
  }

  const expiry = await tokenExpiresDuringFaults(ledger);
  report(`2 OAuth server faults (${scale.name})`, {
    'faults injected': figures.faultsInjected,
    'failure log lines': figures.failureLines,
    recoveries: figures.recoveries,
    'refresh requests': figures.refreshRequests,
    'failures until expiry': expiry.failuresUntilExpiry,
    'expired error code': expiry.code,
    'unhandled rejections': 0,
  });
  return figures;
}

/** `call` until it resolves (every 50 ms, for up to 5 s); the last error when it never does. */
async function untilResolves<T>(call: () => Promise<T>): Promise<T> {
  for (let i = 0; ; i++) {
    try {
      return await call();
    } catch (err) {
      if (i >= 100) throw err;
      await new Promise((r) => setTimeout(r, 50));
    }
  }
}

/** The token runs out while every refresh fails: expired, a clear error, then recovery on demand. */
async function tokenExpiresDuringFaults(ledger: SecretLedger): Promise<{ failuresUntilExpiry: number; code: string }> {
  const fx = await createFixture({
    env: {
      QWEN_TOKEND_REFRESH_LEAD_MS: '1000',
      QWEN_TOKEND_RETRY_MS: String(RETRY_MS),
      QWEN_TOKEND_HTTP_TIMEOUT_MS: String(HTTP_TIMEOUT_MS),
      QWEN_TOKEND_QWEN_CLI_SYNC: 'off',
      QWEN_TOKEND_LOG_LEVEL: 'info',
    },
  });
  try {
    fx.server.injectFault({ kind: '5xx', status: 502 });
    await fx.writeOwn(credsFrom(fx.server, 1.2));
    await fx.start();
    const client = fx.client({ minValidityMs: 0 });
    await until(async () => (await client.status()).state === 'expired', 10_000, 'the expired state');
    const failuresUntilExpiry = failureLines(fx).length;
    expect(failuresUntilExpiry).toBeGreaterThan(0);
    const err = await client.getAccessToken({ noCache: true, minValidityMs: 0 }).catch((e: unknown) => e);
    ledger.addError('faults: expired error', err);
    expect(err).toBeInstanceOf(QwenTokenExpiredError);
    const message = (err as Error).message;
    expect(message).toMatch(/expired/);
    // It says what to do, with the commands in the form that works where the daemon runs.
    const cli = resolveCommand('qwen-token', { cwd: REPO_ROOT });
    expect(message).toContain(`\`${cli} login\``);
    expect(message).toContain('check the network');
    expect(message).toContain(`\`${cli} status\``);
    // The first healthy answer ends it: the next attempt (a request's or the schedule's, each at
    // most RETRY_MS after the last failure) refreshes.
    fx.server.clearFaults();
    const token = await untilResolves(() => client.getAccessToken({ noCache: true, minValidityMs: 0 }));
    expect(fx.server.issuedTokens('access').includes(token)).toBe(true);
    expect((await client.status()).state).toBe('valid');
    expect(bugLines(fx)).toEqual([]);
    return { failuresUntilExpiry, code: (err as QwenTokenExpiredError).code };
  } finally {
    ledger.addFixture(fx, 'faults (expiry)');
    await fx.cleanup();
  }
}
