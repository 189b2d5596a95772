/** WarningThrottle: a repeated warning at most once per interval, carrying how many it stands for. */
import { describe, expect, it } from 'vitest';
import { WarningThrottle } from '../daemon/warning-throttle.js';

describe('WarningThrottle', () => {
  it('reports the first occurrence, holds back the rest of the interval, then reports them with the next one', () => {
    const t = new WarningThrottle(1_000);
    expect(t.occurred(0)).toBe(1);
    expect([t.occurred(1), t.occurred(500), t.occurred(999)]).toEqual([0, 0, 0]);
    expect(t.occurred(1_000)).toBe(4);
    expect(t.occurred(1_001)).toBe(0);
    expect(t.occurred(5_000)).toBe(2);
  });
});
