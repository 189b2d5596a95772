/**
 * A small run of bench scenarios B2 and B4 (few iterations) against the real daemon, so a
 * change that breaks them fails `npm test`. Correctness only, no timing: B2's round trips must
 * all return the daemon's token and the echo baseline must answer every line; B4's burst on an
 * expired token must cause exactly one refresh and hand every caller the new token; the B4
 * study (`--b4-rounds`) must run the burst all three ways.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runB2 } from '../bench/scenarios/b2-b3-rpc.mjs';
import { runB4, runB4Rounds } from '../bench/scenarios/b4-expired.mjs';
import { startQwenServer, type QwenTestServer } from './support/qwen-server.js';

interface Row {
  id: string;
  data: Record<string, unknown>;
}

let server: QwenTestServer;

beforeAll(async () => {
  server = await startQwenServer();
});

afterAll(async () => {
  await server?.close();
});

describe('bench smoke', () => {
  it('B2: uncached round trips over one connection all return the daemon token; the echo baseline answers each', async () => {
    const [row] = (await runB2({ server }, { blocks: 2, perBlock: 50, warmup: 10 })) as Row[];
    expect(row!.id).toBe('B2');
    const data = row!.data as { roundTrips: number; correct: boolean; echoUs: { n: number }; replyBytes: number };
    expect(data.correct).toBe(true);
    expect(data.roundTrips).toBe(100);
    expect(data.echoUs.n).toBe(100);
    // The echo baseline answers lines exactly as long as the daemon's reply.
    expect(data.replyBytes).toBeGreaterThan(100);
  });

  it('B4: a burst on an expired token over several connections causes exactly one refresh; every call gets the new token', async () => {
    const refreshesBefore = server.counts.refresh;
    const [row] = (await runB4({ server }, { processes: 1, connectionsPerProcess: 3, callsPerConnection: 20, baselineCalls: 1, context: false })) as Row[];
    expect(row!.id).toBe('B4');
    const data = row!.data as { refreshes: number; callsGivenNewToken: number; errors: Record<string, number>; correct: boolean; calls: number };
    expect(data.errors).toEqual({});
    expect(data.calls).toBe(60);
    expect(data.refreshes).toBe(1);
    expect(data.callsGivenNewToken).toBe(60);
    expect(data.correct).toBe(true);
    // At the server: the failed start-up refresh, the direct baseline calls (warm-up + 1), the burst's one.
    expect(server.counts.refresh - refreshesBefore).toBe(1 + 2 + 1);
  });

  it('B4 study: one round runs the burst against the bare server and the daemon (raw and library clients), one refresh each', async () => {
    const refreshesBefore = server.counts.refresh;
    const study = (await runB4Rounds({ server }, { rounds: 1, processes: 1, connectionsPerProcess: 3, callsPerConnection: 20, baselineCalls: 1 })) as {
      calls: number;
      summary: { way: string; bursts: number; met: number }[];
      bursts: { round: number; way: string; baselineMs: number; p99Ms: number; met: boolean }[];
    };
    expect(study.calls).toBe(60);
    expect(study.bursts.map((b) => b.way)).toEqual(['bare', 'raw', 'library']);
    expect(study.summary.map((s) => [s.way, s.bursts])).toEqual([
      ['bare', 1],
      ['raw', 1],
      ['library', 1],
    ]);
    for (const b of study.bursts) {
      expect(b.round).toBe(1);
      expect(b.p99Ms).toBeGreaterThan(0);
      expect(b.baselineMs).toBeGreaterThan(0);
    }
    // Per way, a baseline (warm-up + 1 direct refresh) and the burst's one refresh; each daemon
    // also had its start-up refresh fail.
    expect(server.counts.refresh - refreshesBefore).toBe(3 * 2 + 1 + (1 + 1) + (1 + 1));
  });
});
