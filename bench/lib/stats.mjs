/**
 * Small statistics and formatting helpers for the bench. Percentiles use the nearest-rank
 * method on a sorted copy, so p50 of [1,2,3,4] is 2 and p100 is the maximum.
 */

/** Sorted numeric copy (ascending). */
export function sorted(values) {
  return Float64Array.from(values).sort();
}

/** Nearest-rank percentile (0 < p <= 100) of an already sorted array. */
export function percentileOfSorted(sortedValues, p) {
  if (sortedValues.length === 0) return Number.NaN;
  const rank = Math.max(1, Math.ceil((p / 100) * sortedValues.length));
  return sortedValues[Math.min(rank, sortedValues.length) - 1];
}

/** p50/p95/p99/max/min/mean of `values`. */
export function summarize(values) {
  const s = sorted(values);
  let sum = 0;
  for (const v of s) sum += v;
  return {
    n: s.length,
    min: s[0] ?? Number.NaN,
    p50: percentileOfSorted(s, 50),
    p95: percentileOfSorted(s, 95),
    p99: percentileOfSorted(s, 99),
    max: s[s.length - 1] ?? Number.NaN,
    mean: s.length ? sum / s.length : Number.NaN,
  };
}

/** The median of `values`. */
export function median(values) {
  return percentileOfSorted(sorted(values), 50);
}

/** Rounds to `digits` significant-ish decimals for JSON output. */
export function round(value, digits = 3) {
  if (!Number.isFinite(value)) return value;
  const f = 10 ** digits;
  return Math.round(value * f) / f;
}

/** A duration given in microseconds, in the most readable unit. */
export function fmtUs(us) {
  if (!Number.isFinite(us)) return String(us);
  if (us < 1) return `${(us * 1000).toFixed(0)} ns`;
  if (us < 1000) return `${us.toFixed(us < 10 ? 2 : 1)} µs`;
  return fmtMs(us / 1000);
}

/** A duration given in milliseconds, in the most readable unit. */
export function fmtMs(ms) {
  if (!Number.isFinite(ms)) return String(ms);
  if (ms < 1) return fmtUs(ms * 1000);
  if (ms < 1000) return `${ms.toFixed(ms < 10 ? 2 : 1)} ms`;
  return `${(ms / 1000).toFixed(2)} s`;
}

/** Megabytes from kilobytes. */
export function fmtMb(kb) {
  return `${(kb / 1024).toFixed(1)} MB`;
}

/** A rate with thousands separators. */
export function fmtRate(perSecond) {
  return `${Math.round(perSecond).toLocaleString('en-US')}/s`;
}
