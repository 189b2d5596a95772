/**
 * The client's socket is unref'd while idle so library users can exit; a CLI command that
 * waits for pushed events (login, watch) must hold the process open itself.
 */

/** Keeps the event loop alive until the returned function is called. */
export function keepAlive(): () => void {
  const timer = setInterval(() => undefined, 60_000);
  return () => clearInterval(timer);
}

/** Resolves after `ms` without keeping the process alive. */
export function delay(ms: number): Promise<void> {
  return new Promise((done) => setTimeout(done, ms).unref());
}
