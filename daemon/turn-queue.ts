/**
 * Hands out turns on the event loop to connections with received frames still to handle, so
 * one client's flood cannot hold the loop while other clients, a refresh and timers wait.
 * Each turn lasts at most a budget of time; who runs out of it waits behind the others
 * (see bench/README.md#b4).
 */

/** What waits for a turn: handles what it holds until `deadline` (performance.now() time). */
export interface TurnTaker {
  takeTurn(deadline: number): void;
}

/** The line of connections waiting for a turn on the event loop. */
export class TurnQueue<T extends TurnTaker> {
  /** In arrival order; a Set, so each waits once. */
  private readonly waiting = new Set<T>();
  private turnScheduled = false;

  constructor(readonly budgetMs: number) {}

  /** True while someone waits for a turn: newcomers queue behind them. */
  get busy(): boolean {
    return this.waiting.size > 0;
  }

  /** Puts `taker` in line (once) for the next turn. */
  enqueue(taker: T): void {
    this.waiting.add(taker);
    if (!this.turnScheduled) {
      this.turnScheduled = true;
      // setImmediate runs after the poll phase: I/O that arrived meanwhile is handled first.
      setImmediate(this.nextTurn);
    }
  }

  /** Takes `taker` out of line (its connection closed). */
  remove(taker: T): void {
    this.waiting.delete(taker);
  }

  /**
   * One turn: those waiting, in arrival order, go until the turn's budget is spent. One that
   * runs out of time waits again behind the others.
   */
  private readonly nextTurn = (): void => {
    this.turnScheduled = false;
    const line = [...this.waiting];
    this.waiting.clear();
    const deadline = performance.now() + this.budgetMs;
    let served = 0;
    for (const taker of line) {
      // The first in line always gets its go, so every turn makes progress.
      if (served > 0 && performance.now() >= deadline) break;
      taker.takeTurn(deadline);
      served++;
    }
    if (served < line.length) {
      // Those not reached this turn go ahead of those that used theirs and queued again.
      const again = [...this.waiting];
      this.waiting.clear();
      for (const taker of [...line.slice(served), ...again]) this.enqueue(taker);
    }
  };
}
