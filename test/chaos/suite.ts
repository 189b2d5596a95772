/**
 * The chaos suite, registered once for both entry points: `test/chaos.daemon.test.ts` (reduced counts,
 * part of `npm test`) and `test/chaos/full.chaos.ts` (full counts, `npm run test:chaos`).
 * Scenarios run in order in one file so the secret ledger sees the whole run; the secrets
 * check comes last.
 */
import { describe, it } from 'vitest';
import { qwenCliConcurrentWriter } from './cli-writer.js';
import { clockJumps } from './clock.js';
import { crashDuringWrite, killBetweenWrites } from './crash.js';
import { logOnFullDisk } from './full-disk.js';
import { oauthServerFaults } from './faults.js';
import { SecretLedger } from './harness.js';
import { hostileIpcInput, slowReaders } from './hostile.js';
import { permissions } from './permissions.js';
import { deathBetweenTheTwoWrites, fullAcceptBacklog, quickSuccessiveWrites, refreshRightAfterQwenCliRefreshed } from './regressions.js';
import { rotationAndReuse } from './rotation.js';
import type { ChaosScale } from './scale.js';
import { secretsEverywhere } from './secrets.js';

/** Registers every scenario at `scale`; `timeout(reducedMs)` scales per-test timeouts for the full run. */
export function defineChaosSuite(scale: ChaosScale): void {
  const full = scale.name === 'full';
  const timeout = (reducedMs: number, fullMs: number) => (full ? fullMs : reducedMs);
  const ledger = new SecretLedger();

  describe(`chaos (${scale.name})`, () => {
    it('1. crash during write: SIGKILL across refresh cycles, files always whole and current', async () => {
      await crashDuringWrite(scale, ledger);
    }, timeout(60_000, 480_000));

    it('1b. a kill between the two file writes leaves both files on the newest credentials after restart', async () => {
      await killBetweenWrites(ledger);
    }, 30_000);

    it('2. OAuth server faults: served through all seven, one line each, recovery, expiry error', async () => {
      await oauthServerFaults(scale, ledger);
    }, timeout(60_000, 180_000));

    it('3. refresh token rotation: no retired token is ever sent, racing outside writes', async () => {
      await rotationAndReuse(scale, ledger);
    }, timeout(60_000, 180_000));

    it('4. the Qwen CLI as a concurrent writer: no reuse, no lost update, stale locks, deleted file', async () => {
      await qwenCliConcurrentWriter(scale, ledger);
    }, timeout(60_000, 180_000));

    it('regression: a refresh right after the Qwen CLI refreshed does not present the retired token', async () => {
      await refreshRightAfterQwenCliRefreshed(ledger);
    });

    it('regression: death between the two writes leaves both files on the newest credentials', async () => {
      await deathBetweenTheTwoWrites(ledger);
    });

    it('regression: the second of two quick outside writes is adopted', async () => {
      await quickSuccessiveWrites(ledger);
    });

    it('regression: a client meeting a full accept backlog (EAGAIN) waits instead of failing', async () => {
      await fullAcceptBacklog(ledger);
    });

    it('5. hostile IPC input: the daemon stays up, answers, and stays within 150 MB', async () => {
      await hostileIpcInput(scale, ledger);
    }, timeout(60_000, 180_000));

    it('5b. clients that never read their replies do not grow the daemon past 150 MB', async () => {
      await slowReaders(scale, ledger);
    }, timeout(60_000, 120_000));

    it('6. permissions: 0600/0700 on every write path, loose modes fixed, other users refused', async () => {
      await permissions(ledger);
    }, 30_000);

    it('9. the log on a full disk: the daemon starts, refreshes and serves, files intact, log back on SIGHUP', async () => {
      await logOnFullDisk(scale, ledger);
    }, timeout(60_000, 240_000));

    it('8. clock: +2 h, -2 h and a suspend lead to the right decision within one retry interval', async () => {
      await clockJumps(ledger);
    });

    // Last: it scans everything the scenarios above collected.
    it('7. secrets: no issued token in any log, error, status, doctor or crash output of the run', async () => {
      await secretsEverywhere(scale, ledger);
    }, timeout(60_000, 120_000));
  });
}
