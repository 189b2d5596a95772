/**
 * Recognizes a frame that repeats the last remembered one with another id, so what it carries
 * need not be parsed and validated again. A client's concurrent getAccessToken() calls differ
 * only in their ids, and so do the daemon's answers to them.
 *
 * In shared/ because both ends use it (the daemon on requests, the client on answers) and it
 * rests on what both agree to write: every frame as JSON.stringify gives it, `jsonrpc` then `id`
 * first. A frame written otherwise is still understood, through the ordinary path.
 *
 * Sound by construction: a frame is remembered only when its text is exactly what
 * JSON.stringify gives for it and it starts with `jsonrpc` and a positive integer `id`. Another
 * frame with the same text around a different run of digits is then the same JSON value with
 * that id, so it parses and validates to the same thing.
 */
const HEAD = '{"jsonrpc":"2.0","id":';
/** Ids past 15 digits may not be exact doubles; such frames take the slow path. */
const MAX_ID_DIGITS = 15;
/**
 * Longer lines are not remembered: the frames that repeat are a few hundred bytes, and checking
 * that a line is canonical costs a JSON.stringify of it, which a peer sending large frames
 * should not be able to double.
 */
const MAX_REMEMBERED_LENGTH = 4096;

export class RepeatedFrame<T> {
  private tail: string | null = null;
  private remembered: T | undefined;

  /** The value remembered with the frame that `line` repeats (valid after `idOf` found one). */
  get value(): T {
    return this.remembered as T;
  }

  /**
   * The id of the frame `text.slice(start, end)` when it is the remembered frame with another
   * positive integer id; -1 otherwise. Looked at in place, without making that string: a read of
   * many frames is decoded once and its frames are checked where they lie.
   */
  idAt(text: string, start: number, end: number): number {
    const tail = this.tail;
    if (tail === null) return -1;
    const digits = end - start - HEAD.length - tail.length;
    if (digits < 1 || digits > MAX_ID_DIGITS || !text.startsWith(tail, end - tail.length) || !text.startsWith(HEAD, start)) return -1;
    let id = 0;
    const first = start + HEAD.length;
    for (let i = first; i < first + digits; i++) {
      const digit = text.charCodeAt(i) - 48;
      if (digit < 0 || digit > 9 || (digit === 0 && id === 0)) return -1;
      id = id * 10 + digit;
    }
    return id;
  }

  /**
   * Remembers `value` for frames that repeat `line` (whose JSON.parse result is `data`), if
   * `line` is canonical; otherwise keeps what it had.
   */
  remember(line: string, data: unknown, value: T): void {
    if (line.length > MAX_REMEMBERED_LENGTH) return;
    const id = (data as { id?: unknown } | null)?.id;
    if (typeof id !== 'number' || !Number.isSafeInteger(id) || id < 1) return;
    const head = `${HEAD}${id}`;
    if (head.length - HEAD.length > MAX_ID_DIGITS || !line.startsWith(head) || JSON.stringify(data) !== line) return;
    this.tail = line.slice(head.length);
    this.remembered = value;
  }

  forget(): void {
    this.tail = null;
    this.remembered = undefined;
  }
}
