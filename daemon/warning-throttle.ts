/**
 * Lets a warning that may repeat many times a second (a client refused at the connection limit,
 * say) reach the log at most once per interval, with how many it stands for.
 */
export class WarningThrottle {
  private quietUntil = -Infinity;
  private heldBack = 0;

  constructor(private readonly intervalMs: number) {}

  /**
   * Records one occurrence at time `now` (ms). Returns how many occurrences to report now (this
   * one and those held back since the last report), or 0 when this one is held back.
   */
  occurred(now: number): number {
    if (now < this.quietUntil) {
      this.heldBack++;
      return 0;
    }
    const count = this.heldBack + 1;
    this.heldBack = 0;
    this.quietUntil = now + this.intervalMs;
    return count;
  }
}
