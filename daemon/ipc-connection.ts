/**
 * One client connection of the socket server: it frames (splits bytes into lines), schedules
 * (waits for a turn when others are waiting) and writes (answers, with back-pressure). What a
 * line means is the dispatcher's business (rpc-dispatcher.ts).
 *
 * The simple path: a read's complete lines each go to `dispatcher.receive`, and each reply is
 * written. Around it, each optimisation says its rule:
 * - the lines of a read are decoded once and looked at in place (consumeLines);
 * - the answers made while one read is handled leave in one write (gathered);
 * - answers due in one tick to a client with more calls pending leave in one system call (cork);
 * - a read is handled only until the turn's budget is spent (TurnQueue).
 * See bench/README.md#b4 for what each is worth.
 */
import type { Socket } from 'node:net';
import { RpcErrorCodes } from '../shared/protocol.js';
import type { Logger } from './logger.js';
import { errorLine, RpcSession, type Reply, type RpcDispatcher } from './rpc-dispatcher.js';
import type { TurnQueue } from './turn-queue.js';

/** What every connection of one server shares. */
export interface ConnectionContext {
  readonly dispatcher: RpcDispatcher;
  readonly turns: TurnQueue<Connection>;
  readonly logger: Logger;
  readonly maxFrameBytes: number;
  /** A partial frame left unfinished this long closes the connection. */
  readonly partialFrameTimeoutMs: number;
  /** A connection that sends nothing at all this long after it opened is closed. */
  readonly silentTimeoutMs: number;
}

/** Replies waiting in one connection's send buffer beyond this mean the client stopped reading. */
export const MAX_UNREAD_BYTES = 1024 * 1024;
/** Above this many unread reply bytes we stop reading that client's requests until it catches up. */
const PAUSE_UNREAD_BYTES = 64 * 1024;
/** Requests one connection may have in flight before we stop reading from it. */
const MAX_INFLIGHT_PER_CONNECTION = 256;
/** Frames handled between two looks at the clock. */
const FRAMES_PER_CLOCK_CHECK = 16;
const NEWLINE = 10;

/** One accepted socket: its bytes become lines for the dispatcher, its replies leave with back-pressure. */
export class Connection {
  readonly session: RpcSession;
  /** The start of a frame whose end has not arrived yet, in parts. */
  private parts: Buffer[] = [];
  private partsLength = 0;
  /** Closes the connection when it stays silent, or leaves a frame half-sent, too long. */
  private stallTimer: NodeJS.Timeout | null = null;
  private corked = false;
  /** Answer lines made while a read of several frames is handled; null outside of that. */
  private gathered: string | null = null;
  /** Received bytes not yet looked at: this connection is waiting in line for a turn. */
  private held: Buffer | null = null;
  /** The client closed its side; ours closes once everything it sent is answered. */
  private peerEnded = false;

  constructor(
    id: number,
    readonly socket: Socket,
    private readonly context: ConnectionContext,
  ) {
    this.session = new RpcSession(id);
    this.startStallTimer(context.silentTimeoutMs, 'closing a connection that sent nothing');
  }

  onData(chunk: Buffer): void {
    // The first bytes: the connection is no longer silent (a partial frame keeps its own timer).
    if (this.stallTimer && this.partsLength === 0) this.clearStallTimer();
    // Others are waiting in line: take a place behind them rather than jump the queue.
    if (this.held || this.context.turns.busy) this.hold(chunk);
    else this.consume(chunk, performance.now() + this.context.turns.budgetMs);
  }

  /** Handles what was held back, until `deadline` (it may hold the rest again). */
  takeTurn(deadline: number): void {
    const chunk = this.held;
    this.held = null;
    if (!chunk || this.socket.destroyed) return;
    this.consume(chunk, deadline);
    this.updateFlow();
    this.endIfAnswered();
  }

  /**
   * The client will send nothing more (a script piping requests into `nc -U`, say). Frames
   * still waiting for their turn, and calls still running, are answered before our side closes.
   */
  onPeerEnd(): void {
    this.peerEnded = true;
    this.endIfAnswered();
  }

  /** The socket closed: nothing more is done for it. */
  onClose(): void {
    this.clearStallTimer();
    this.context.turns.remove(this);
  }

  private endIfAnswered(): void {
    if (this.peerEnded && this.held === null && this.session.owed === 0 && !this.socket.destroyed) this.endSocket();
  }

  /** Ends our side after what was gathered so far: answers to earlier frames are not dropped. */
  private endSocket(): void {
    this.flushGathered();
    this.socket.end();
  }

  /** Keeps `rest` for a later turn and stops reading until then. */
  private hold(rest: Buffer): void {
    this.held = this.held ? Buffer.concat([this.held, rest]) : rest;
    this.updateFlow();
    this.context.turns.enqueue(this);
  }

  // ── framing ────────────────────────────────────────────────────────────────────────────

  /** Handles the complete lines of `chunk` until `deadline`, holds the lines left, keeps a partial one. */
  private consume(chunk: Buffer, deadline: number): void {
    const first = chunk.indexOf(NEWLINE);
    // Several frames at once: their answers are gathered and leave in one write.
    const several = first !== -1 && chunk.indexOf(NEWLINE, first + 1) !== -1;
    if (!several) {
      this.consumeFrom(chunk, first, deadline);
      return;
    }
    this.gathered = '';
    try {
      this.consumeFrom(chunk, first, deadline);
    } finally {
      this.flushGathered();
    }
  }

  private consumeFrom(chunk: Buffer, firstNewline: number, deadline: number): void {
    let start = 0;
    if (this.partsLength > 0 && firstNewline !== -1) {
      // The first newline ends the frame whose start came with earlier reads.
      this.parts.push(chunk.subarray(0, firstNewline));
      const line = Buffer.concat(this.parts, this.partsLength + firstNewline);
      this.parts = [];
      this.partsLength = 0;
      this.clearStallTimer();
      if (!this.frame(line)) return;
      start = firstNewline + 1;
    }
    const lastNewline = chunk.lastIndexOf(NEWLINE);
    if (lastNewline >= start) {
      const next = this.consumeLines(chunk, start, lastNewline + 1, deadline);
      if (next === -1) return;
      start = next;
    }
    if (start < chunk.length) {
      const rest = chunk.subarray(start);
      this.parts.push(rest);
      this.partsLength += rest.length;
      if (this.partsLength > this.context.maxFrameBytes) {
        this.tooLarge();
        return;
      }
      this.startStallTimer(this.context.partialFrameTimeoutMs, 'closing a connection that left a frame half-sent');
    }
  }

  /**
   * Handles the complete lines in `chunk[from, to)` (`to` just after a newline) until `deadline`,
   * then holds the rest. Returns where the bytes left unhandled start, or -1 when nothing more
   * is to be read (held for a later turn, or the connection was closed).
   *
   * The lines are decoded as one string and looked at in place, not as a Buffer, a decode and
   * a string apiece. That needs string offsets to be byte offsets, which holds when the text is
   * as long as its bytes: every byte was one character (ASCII, or an invalid byte decoded as
   * U+FFFD). Other text, rare in this protocol, is handled a line at a time from the bytes.
   */
  private consumeLines(chunk: Buffer, from: number, to: number, deadline: number): number {
    const text = chunk.toString('utf8', from, to);
    if (text.length !== to - from) return this.consumeLineBytes(chunk, from, to, deadline);
    let start = 0;
    let handled = 0;
    let nl = text.indexOf('\n');
    while (nl !== -1) {
      if (handled % FRAMES_PER_CLOCK_CHECK === 0 && handled > 0 && performance.now() >= deadline) {
        this.hold(chunk.subarray(from + start));
        return -1;
      }
      handled++;
      if (!this.frameAt(text, start, nl)) return -1;
      start = nl + 1;
      nl = text.indexOf('\n', start);
    }
    return to;
  }

  /** `consumeLines` for text with characters of several bytes: a line at a time, from the bytes. */
  private consumeLineBytes(chunk: Buffer, from: number, to: number, deadline: number): number {
    let start = from;
    let handled = 0;
    let nl = chunk.indexOf(NEWLINE, start);
    while (nl !== -1 && nl < to) {
      if (handled % FRAMES_PER_CLOCK_CHECK === 0 && handled > 0 && performance.now() >= deadline) {
        this.hold(chunk.subarray(start));
        return -1;
      }
      handled++;
      if (!this.frame(chunk.subarray(start, nl))) return -1;
      start = nl + 1;
      nl = chunk.indexOf(NEWLINE, start);
    }
    return to;
  }

  /** Handles one complete line; false when the connection was closed. */
  private frame(line: Buffer): boolean {
    if (line.length > this.context.maxFrameBytes) {
      this.tooLarge();
      return false;
    }
    const text = line.toString('utf8');
    return this.frameAt(text, 0, text.length);
  }

  /**
   * Handles the line `text[start, end)`, whose length is its size in bytes or less (checked in
   * bytes by the caller then); false when the connection was closed.
   */
  private frameAt(text: string, start: number, end: number): boolean {
    if (end - start > this.context.maxFrameBytes) {
      this.tooLarge();
      return false;
    }
    // Tolerate CRLF and blank keep-alive lines from hand-typed clients (nc -U).
    if (end > start && text.charCodeAt(end - 1) === 13) end--;
    if (end === start) return true;
    this.reply(this.context.dispatcher.receive(this.session, text, start, end));
    return !this.socket.destroyed;
  }

  private tooLarge(): void {
    this.sendLine(errorLine(null, RpcErrorCodes.frameTooLarge, `frame exceeds ${this.context.maxFrameBytes} bytes; closing the connection`));
    this.parts = [];
    this.partsLength = 0;
    this.clearStallTimer();
    this.endSocket();
  }

  private startStallTimer(ms: number, why: string): void {
    if (this.stallTimer) return;
    this.stallTimer = setTimeout(() => {
      this.context.logger.debug({ conn: this.session.id }, why);
      this.socket.destroy();
    }, ms);
    this.stallTimer.unref();
  }

  private clearStallTimer(): void {
    if (this.stallTimer) clearTimeout(this.stallTimer);
    this.stallTimer = null;
  }

  // ── writing ────────────────────────────────────────────────────────────────────────────

  private reply(reply: Reply): void {
    if (typeof reply === 'string') {
      if (reply !== '') this.sendLine(reply);
      return;
    }
    if (reply) reply.then(this.answerSettled);
    // One call more in flight (a null reply joined one already pending).
    this.updateFlow();
  }

  /** Writes the answers that waited on a promise, then closes if the client has ended and nothing is owed. */
  private readonly answerSettled = (lines: string): void => {
    this.updateFlow();
    if (lines !== '') this.sendLine(lines);
    this.endIfAnswered();
  };

  /**
   * Back-pressure: a client with too many requests in flight, or that does not read its
   * replies, is not read from until it catches up, so it cannot make the daemon buffer
   * without bound (or starve others).
   */
  updateFlow(): void {
    const socket = this.socket;
    const hold = this.held !== null || this.session.owed >= MAX_INFLIGHT_PER_CONNECTION || socket.writableLength > PAUSE_UNREAD_BYTES;
    if (hold && !socket.isPaused()) socket.pause();
    else if (!hold && socket.isPaused() && !socket.destroyed) socket.resume();
  }

  sendLine(line: string): void {
    if (this.gathered !== null) this.gather(line);
    else this.write(line);
  }

  /** A line already encoded (a notification sent to many): after the answers being gathered, if any. */
  sendEncoded(line: Buffer): void {
    if (this.gathered !== null) this.gather(line.toString('utf8'));
    else this.socket.write(line);
  }

  private flushGathered(): void {
    const lines = this.gathered;
    this.gathered = null;
    if (lines) this.write(lines);
  }

  private gather(line: string): void {
    const lines = `${this.gathered ?? ''}${line}`;
    // Written in parts past this size (in characters): each write is held to the unread-bytes
    // limit, so a read of small frames with large answers (a client that sends garbage and
    // never reads the errors) cannot pile up past it in one write.
    if (lines.length < PAUSE_UNREAD_BYTES) {
      this.gathered = lines;
      return;
    }
    this.gathered = '';
    this.write(lines);
  }

  private write(line: string): void {
    const socket = this.socket;
    if (socket.destroyed || !socket.writable) return;
    if (socket.writableLength > MAX_UNREAD_BYTES) {
      this.context.logger.warn({ conn: this.session.id }, 'closing a connection whose client stopped reading');
      socket.destroy();
      return;
    }
    // More answers to this client are pending: hold the writes until this tick ends, so they
    // leave in one system call instead of one each.
    if (this.session.owed > 0 && !this.corked) {
      this.corked = true;
      socket.cork();
      process.nextTick(() => {
        this.corked = false;
        socket.uncork();
      });
    }
    if (!socket.write(line)) this.updateFlow();
  }
}
