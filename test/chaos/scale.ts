/**
 * How hard each chaos scenario pushes. `npm test` runs the reduced counts (seconds per
 * scenario); `npm run test:chaos` runs the full ones. `CHAOS_SCALE=full|reduced` overrides the
 * default of either entry point.
 */
export interface ChaosScale {
  name: 'reduced' | 'full';
  /** 1: daemon SIGKILLs across refresh cycles. */
  kills: number;
  /** 2: rounds of the seven OAuth server faults (each round injects all seven). */
  faultRounds: number;
  /** 3: forced refreshes with rotation on, racing outside writes. */
  rotations: number;
  /** 4: refresh rounds of the fake Qwen CLI against the daemon. */
  cliRounds: number;
  /** 5: hostile frames in total, from `hostileConnections` concurrent connections. */
  hostileFrames: number;
  hostileConnections: number;
  /** 5: idle connections held open throughout. */
  idleConnections: number;
  /** 5: assert the p99 of the probe's getAccessToken latency (only on the full run: timing). */
  assertLatency: boolean;
}

export const REDUCED: ChaosScale = {
  name: 'reduced',
  kills: 10,
  faultRounds: 1,
  rotations: 30,
  cliRounds: 10,
  hostileFrames: 5_000,
  hostileConnections: 50,
  idleConnections: 200,
  assertLatency: false,
};

export const FULL: ChaosScale = {
  name: 'full',
  kills: 200,
  faultRounds: 10,
  rotations: 500,
  cliRounds: 100,
  hostileFrames: 100_000,
  hostileConnections: 50,
  idleConnections: 1_000,
  assertLatency: true,
};

/** The scale for this run: `CHAOS_SCALE` when set, else the entry point's default. */
export function chaosScale(fallback: 'reduced' | 'full'): ChaosScale {
  const wanted = (process.env.CHAOS_SCALE ?? fallback).trim().toLowerCase();
  if (wanted === 'full') return FULL;
  if (wanted === 'reduced') return REDUCED;
  throw new Error(`CHAOS_SCALE must be "full" or "reduced", got "${process.env.CHAOS_SCALE}"`);
}
