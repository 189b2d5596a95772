/**
 * Scenario 3: refresh token rotation. Every refresh retires the refresh token it used, and the
 * local server counts any later presentation of a retired one. Forced refreshes run while
 * another process keeps writing fresh credentials (issued by the server, so all valid) into
 * the daemon's file and the Qwen CLI's file. The daemon must never send a retired token.
 */
import { expect } from 'vitest';
import { QwenRefreshTokenInvalidError } from '../../shared/errors.js';
import { fingerprint } from '../../shared/fingerprint.js';
import { createFixture, credsFrom } from '../support/daemon.js';
import { bugLines, readRaw, report, sleep, until, writeAtomically, type SecretLedger } from './harness.js';
import type { ChaosScale } from './scale.js';
import { parseCredentialsText } from '../../shared/credentials.js';

export interface RotationFigures {
  httpRefreshes: number;
  forcedRefreshCalls: number;
  outsideWrites: number;
  adoptions: number;
  reuseCount: number;
}

export async function rotationAndReuse(scale: ChaosScale, ledger: SecretLedger): Promise<RotationFigures> {
  const fx = await createFixture({ server: { expiresIn: 3600, rotateRefreshTokens: true }, env: { QWEN_TOKEND_LOG_LEVEL: 'info' } });
  const figures: RotationFigures = { httpRefreshes: 0, forcedRefreshCalls: 0, outsideWrites: 0, adoptions: 0, reuseCount: 0 };
  try {
    await fx.writeCli(credsFrom(fx.server, 3600));
    await fx.start();
    const client = fx.client({ minValidityMs: 0 });
    let stop = false;
    const writer = (async () => {
      while (!stop) {
        await sleep(Math.random() * 40);
        if (stop) break;
        // Fresh credentials from "another login", with a lifetime shorter or longer than ours.
        const creds = credsFrom(fx.server, 1800 + Math.floor(Math.random() * 5400));
        await writeAtomically(Math.random() < 0.5 ? fx.tokenPath : fx.qwenCliPath, creds);
        figures.outsideWrites++;
      }
    })();
    const errors: unknown[] = [];
    try {
      while (fx.server.counts.refresh < scale.rotations && errors.length === 0) {
        // Sometimes several at once: they must share one HTTP refresh.
        const n = 1 + Math.floor(Math.random() * 3);
        figures.forcedRefreshCalls += n;
        await Promise.all(Array.from({ length: n }, () => client.refresh().catch((e: unknown) => errors.push(e))));
      }
    } finally {
      stop = true;
      await writer;
    }
    for (const e of errors) ledger.addError('rotation: refresh error', e);
    expect(errors.filter((e) => e instanceof QwenRefreshTokenInvalidError).length, 'refreshes rejected as retired/invalid').toBe(0);
    expect(errors.length, `unexpected refresh errors: ${errors.map((e) => (e as Error).message).join('; ')}`).toBe(0);
    // After the race: one more refresh, then the daemon, its file and the server agree.
    await sleep(200);
    const final = await client.refresh();
    await until(async () => {
      const own = await readRaw(fx.tokenPath);
      return own !== null && parseCredentialsText(own, 'own').access_token === final.access_token;
    }, 3000, 'the final refresh on disk');
    const status = await client.status();
    expect(status.state).toBe('valid');
    expect(status.token_fingerprint).toBe(fingerprint(final.access_token));
    figures.httpRefreshes = fx.server.counts.refresh;
    figures.adoptions = fx.logs().filter((l) => /adopted|already refreshed by the Qwen CLI/.test(String(l.msg))).length;
    figures.reuseCount = fx.server.reuseCount;
    expect(bugLines(fx)).toEqual([]);
    report(`3 rotation and reuse (${scale.name})`, {
      'HTTP refreshes': figures.httpRefreshes,
      'forced refresh calls': figures.forcedRefreshCalls,
      'outside writes racing them': figures.outsideWrites,
      'outside credentials adopted': figures.adoptions,
      'reuse count': figures.reuseCount,
    });
    expect(figures.reuseCount).toBe(0);
    return figures;
  } finally {
    ledger.addFixture(fx, 'rotation');
    await fx.cleanup();
  }
}
