/**
 * A hand-driven `Clock` with two time lines, like a real machine: the wall clock (`now()`,
 * what `expiry_date` is compared with) and the monotonic time timers run on. `advance` moves
 * both and fires due timers; `jump` moves only the wall clock (an NTP step or a manual change),
 * so pending timers neither fire nor shift; `suspend` is a jump forward (the machine slept:
 * wall time passed, monotonic time and therefore every pending timer did not).
 */
import type { Clock, TimerHandle } from '../../shared/clock.js';

interface FakeTimer extends TimerHandle {
  id: number;
  /** Monotonic due time. */
  due: number;
  fn: () => void;
}

/** A fake clock for in-process tests of timer-driven code. */
export class FakeClock implements Clock {
  private wall: number;
  private mono = 0;
  private seq = 0;
  private readonly timers = new Map<number, FakeTimer>();

  constructor(startWallMs: number) {
    this.wall = startWallMs;
  }

  now(): number {
    return this.wall;
  }

  /** Monotonic milliseconds since the clock was made. */
  monotonic(): number {
    return this.mono;
  }

  setTimeout(fn: () => void, ms: number): TimerHandle {
    const timer: FakeTimer = { id: ++this.seq, due: this.mono + Math.max(0, ms), fn, unref: () => timer };
    this.timers.set(timer.id, timer);
    return timer;
  }

  clearTimeout(handle: TimerHandle): void {
    const id = (handle as Partial<FakeTimer>).id;
    if (id !== undefined) this.timers.delete(id);
  }

  /** Pending timers. */
  get pending(): number {
    return this.timers.size;
  }

  /** Monotonic time until the next timer fires, or null when none is pending. */
  nextDueIn(): number | null {
    let next: number | null = null;
    for (const t of this.timers.values()) if (next === null || t.due < next) next = t.due;
    return next === null ? null : Math.max(0, next - this.mono);
  }

  /**
   * Lets `ms` pass on both time lines, firing every timer that comes due, in due order, with
   * the clock set to its due time. Timers set by a firing timer fire too when due in the window.
   */
  advance(ms: number): number {
    const end = this.mono + ms;
    let fired = 0;
    for (;;) {
      let next: FakeTimer | undefined;
      for (const t of this.timers.values()) if (t.due <= end && (!next || t.due < next.due || (t.due === next.due && t.id < next.id))) next = t;
      if (!next) break;
      this.wall += next.due - this.mono;
      this.mono = next.due;
      this.timers.delete(next.id);
      fired++;
      next.fn();
    }
    this.wall += end - this.mono;
    this.mono = end;
    return fired;
  }

  /** Steps the wall clock by `ms` (negative: backwards) without touching timers. */
  jump(ms: number): void {
    this.wall += ms;
  }

  /** The machine sleeps for `ms`: wall time passes, timers wait (they fire late after wake-up). */
  suspend(ms: number): void {
    this.jump(ms);
  }
}
