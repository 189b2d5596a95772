/**
 * Human durations for the CLI: "4h 12m", "expires in 4h 12m", "expired 3m ago", and parsing of
 * option values such as "90s", "5m", "1h30m".
 */

const SECOND = 1_000;
const MINUTE = 60 * SECOND;
const HOUR = 60 * MINUTE;
const DAY = 24 * HOUR;

const UNITS: ReadonlyArray<readonly [string, number]> = [
  ['d', DAY],
  ['h', HOUR],
  ['m', MINUTE],
  ['s', SECOND],
];

/**
 * A duration as at most two units, rounded down ("4h 12m", "3m 5s", "45s", "2d 3h"); under a
 * second is "<1s". Rounding down never overstates how long a token stays valid.
 */
export function formatDuration(ms: number): string {
  if (!Number.isFinite(ms)) return 'forever';
  const total = Math.abs(ms);
  if (total < SECOND) return '<1s';
  const i = UNITS.findIndex(([, size]) => total >= size);
  const [bigName, bigSize] = UNITS[i]!;
  const big = Math.floor(total / bigSize);
  let out = `${big}${bigName}`;
  // The second unit is always the adjacent one: "1d 5m" would read like a typo.
  const next = UNITS[i + 1];
  if (next) {
    const small = Math.floor((total - big * bigSize) / next[1]);
    if (small > 0) out += ` ${small}${next[0]}`;
  }
  return out;
}

/** "in 4h 12m" for a time ahead of `now`, "3m ago" for one behind it. */
export function formatRelative(target: number, now: number): string {
  const diff = target - now;
  return diff >= 0 ? `in ${formatDuration(diff)}` : `${formatDuration(-diff)} ago`;
}

/** "expires in 4h 12m" or "expired 3m ago". */
export function describeExpiry(expiry: number, now: number): string {
  const diff = expiry - now;
  return diff > 0 ? `expires in ${formatDuration(diff)}` : `expired ${formatDuration(-diff)} ago`;
}

const UNIT_MS: Record<string, number> = { ms: 1, s: SECOND, m: MINUTE, h: HOUR, d: DAY };

/**
 * Parses "90s", "5m", "1h30m", "250ms", or a bare number of seconds, into milliseconds.
 * Returns undefined when the text is not a duration.
 */
export function parseDuration(text: string): number | undefined {
  const s = text.trim().toLowerCase();
  if (s === '') return undefined;
  if (/^\d+(\.\d+)?$/.test(s)) return Math.round(Number(s) * SECOND);
  const re = /(\d+(?:\.\d+)?)(ms|s|m|h|d)/gy;
  let total = 0;
  let matched = 0;
  let m: RegExpExecArray | null;
  while ((m = re.exec(s)) !== null) {
    total += Number(m[1]) * UNIT_MS[m[2]!]!;
    matched = re.lastIndex;
  }
  if (matched !== s.length) return undefined;
  return Math.round(total);
}
