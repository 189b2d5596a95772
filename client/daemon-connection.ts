/**
 * One socket connection to the daemon: JSON-RPC 2.0 over NDJSON, id matching, typed errors,
 * notifications. Knows nothing of tokens; `TokenClient` builds on it.
 */
import { createConnection, type Socket } from 'node:net';
import { errorFromWire, QwenConfigError, QwenDaemonUnavailableError, QwenProtocolError, type QwenError } from '../shared/errors.js';
import { checkSocketPath } from '../shared/path-trust.js';
import { RpcErrorSchema } from '../shared/protocol.js';
import { LineReader } from './line-reader.js';
import { RepeatedFrame } from '../shared/repeated-frame.js';

/** Replies are small; anything this large is a broken or hostile peer. */
const MAX_INCOMING_FRAME = 1024 * 1024;

/** The longest delay setTimeout takes; a later deadline is re-armed when it fires. */
const LONGEST_NODE_TIMER_MS = 2 ** 31 - 1;

interface Notification {
  line: string;
  method: string;
  params: unknown;
}

/**
 * The last notifications the connections of this process received, as parsed, newest first.
 * The daemon pushes each one to every subscriber, so a process holding several connections
 * reads the same lines on each: the same text is the same JSON value, parsed once. A few are
 * kept, not one, because pushes sent together (a refresh and the state it changed) arrive
 * together on every connection. Params are frozen: every connection hands the same object to
 * its listener.
 */
const recentNotifications: Notification[] = [];
const RECENT_NOTIFICATIONS = 4;
/** Pushes are a few hundred bytes; a longer line is parsed each time rather than kept for the process's life. */
const MAX_REMEMBERED_NOTIFICATION = 4096;

function recentNotification(line: string): Notification | undefined {
  for (const known of recentNotifications) if (known.line === line) return known;
  return undefined;
}

/** Freezes a parsed JSON value and everything in it (iteratively: a deep value cannot overflow the stack). */
function freezeJson(value: unknown): unknown {
  const stack = [value];
  while (stack.length > 0) {
    const v = stack.pop();
    if (typeof v !== 'object' || v === null || Object.isFrozen(v)) continue;
    Object.freeze(v);
    for (const child of Object.values(v)) stack.push(child);
  }
  return value;
}

interface Pending {
  resolve: (value: unknown) => void;
  reject: (err: QwenError) => void;
  method: string;
  timeoutMs: number;
  /** performance.now() after which the call fails; Infinity when it has no timeout. */
  deadline: number;
}

export interface DaemonConnectionOptions {
  socketPath: string;
  onNotification?: (method: string, params: unknown) => void;
  onClose?: () => void;
}

/** A connection to the daemon's socket. Create with `DaemonConnection.open`. */
export class DaemonConnection {
  private readonly pending = new Map<number, Pending>();
  private nextId = 1;
  private closed = false;
  /** Requests made in this tick after the first, written together when the tick ends. */
  private batch = '';
  private batchScheduled = false;
  /** One timer for all pending calls, due at the earliest deadline (`deadlineAt`). */
  private deadlineTimer: NodeJS.Timeout | undefined;
  private deadlineAt = Infinity;
  /** The last canonical answer, for answers that repeat it with another id (many calls, one token). */
  private readonly repeated = new RepeatedFrame<unknown>();

  private constructor(
    private readonly socket: Socket,
    private readonly options: DaemonConnectionOptions,
    private readonly reader: LineReader,
  ) {
    reader.onLine = (text, start, end) => this.onLine(text, start, end);
    reader.onTooLong = () => {
      this.failAll(new QwenProtocolError('qwen-tokend sent a frame larger than 1 MiB; closing the connection'));
      this.close();
    };
    socket.on('error', () => undefined);
    socket.on('close', () => this.onClose());
    socket.unref();
  }

  /** Connects; rejects with the socket error (ENOENT, ECONNREFUSED...) so callers can decide to autostart. */
  static open(options: DaemonConnectionOptions, timeoutMs: number): Promise<DaemonConnection> {
    // Whoever can put a socket at this path could hand out tokens and base URLs: check the path
    // as the daemon checks it before anything is sent (see shared/path-trust.ts).
    const trust = checkSocketPath(options.socketPath);
    if (trust.problem !== null) {
      if (trust.missing) return Promise.reject(Object.assign(new Error(trust.problem), { code: 'ENOENT' }));
      return Promise.reject(
        new QwenConfigError(
          `refusing to connect to qwen-tokend at ${options.socketPath}: ${trust.problem}. ` +
            'Another user could stand in for the daemon there; set QWEN_TOKEND_SOCKET (or XDG_RUNTIME_DIR) to a private directory of yours',
        ),
      );
    }
    return new Promise((resolve, reject) => {
      // Lines come from the socket's reads directly (see LineReader). The connection takes them
      // over in the 'connect' handler, and no read can be delivered before that handler ran.
      const reader = new LineReader(MAX_INCOMING_FRAME);
      const socket = createConnection({ path: options.socketPath, onread: reader.onread });
      const timer = setTimeout(() => {
        socket.destroy();
        reject(Object.assign(new Error(`connecting to ${options.socketPath} timed out after ${timeoutMs} ms`), { code: 'ETIMEDOUT' }));
      }, timeoutMs);
      socket.once('connect', () => {
        clearTimeout(timer);
        socket.removeAllListeners('error');
        resolve(new DaemonConnection(socket, options, reader));
      });
      socket.once('error', (err) => {
        clearTimeout(timer);
        reject(err);
      });
    });
  }

  get isOpen(): boolean {
    return !this.closed;
  }

  /** Sends a request and resolves with its result, or rejects with the typed error the daemon sent. */
  call(method: string, params: unknown, timeoutMs: number): Promise<unknown> {
    if (this.closed) {
      return Promise.reject(new QwenDaemonUnavailableError(`the connection to qwen-tokend (${this.options.socketPath}) is closed`));
    }
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      const deadline = timeoutMs > 0 ? performance.now() + timeoutMs : Infinity;
      this.pending.set(id, { resolve, reject, method, timeoutMs, deadline });
      if (deadline < this.deadlineAt) this.armDeadline(deadline);
      // While a call waits, the socket keeps the process alive; when idle, it must not.
      if (this.pending.size === 1) this.socket.ref();
      const line = `${JSON.stringify({ jsonrpc: '2.0', id, method, params: params ?? {} })}\n`;
      // The first call of a tick is written at once; more calls in the same tick (many
      // getAccessToken() calls on an expired token) leave together when the tick ends: one system
      // call and one wake-up of the daemon instead of one each.
      if (this.batchScheduled) {
        this.batch += line;
        return;
      }
      this.batchScheduled = true;
      process.nextTick(() => this.flushBatch());
      this.socket.write(line);
    });
  }

  close(): void {
    this.socket.destroy();
    this.onClose();
  }

  private flushBatch(): void {
    this.batchScheduled = false;
    if (this.batch === '' || this.closed) return;
    const lines = this.batch;
    this.batch = '';
    this.socket.write(lines);
  }

  /**
   * (Re)arms the one deadline timer. It does not hold the process open (the socket does while
   * calls wait), so a timer left armed after the last answer costs nothing; when it fires it
   * fails what is overdue and re-arms for the next deadline.
   */
  private armDeadline(at: number): void {
    if (this.deadlineTimer) clearTimeout(this.deadlineTimer);
    this.deadlineAt = at;
    this.deadlineTimer = setTimeout(() => this.expireOverdue(), Math.min(LONGEST_NODE_TIMER_MS, Math.max(1, Math.ceil(at - performance.now()))));
    this.deadlineTimer.unref();
  }

  private expireOverdue(): void {
    this.deadlineTimer = undefined;
    this.deadlineAt = Infinity;
    const now = performance.now();
    let next = Infinity;
    for (const [id, entry] of this.pending) {
      if (entry.deadline <= now) {
        this.settle(id);
        entry.reject(new QwenDaemonUnavailableError(`qwen-tokend did not answer "${entry.method}" within ${entry.timeoutMs} ms`));
      } else if (entry.deadline < next) {
        next = entry.deadline;
      }
    }
    if (next !== Infinity) this.armDeadline(next);
  }

  private settle(id: number): Pending | undefined {
    const entry = this.pending.get(id);
    if (!entry) return undefined;
    this.pending.delete(id);
    if (this.pending.size === 0 && !this.closed) this.socket.unref();
    return entry;
  }

  /** The line `text[start, end)` from the daemon. */
  private onLine(text: string, start: number, end: number): void {
    // Many calls at once are answered with one result many times over: an answer that repeats
    // the last one with another id carries the same value, so it is not parsed again (nor cut
    // out of the text the read was decoded into).
    const repeatedId = this.repeated.idAt(text, start, end);
    if (repeatedId !== -1) {
      this.settle(repeatedId)?.resolve(this.repeated.value);
      return;
    }
    const line = start === 0 && end === text.length ? text : text.slice(start, end);
    const known = recentNotification(line);
    if (known) {
      this.options.onNotification?.(known.method, known.params);
      return;
    }
    let data: unknown;
    try {
      data = JSON.parse(line);
    } catch {
      return; // Not ours to crash on; a broken line answers nothing.
    }
    // Dispatch on the envelope's shape, then validate what it carries with the schema for that
    // kind (results are validated by the caller, per method): cheaper than a union parse on
    // every frame, and just as strict.
    if (typeof data !== 'object' || data === null || (data as { jsonrpc?: unknown }).jsonrpc !== '2.0') return;
    const msg = data as { id?: unknown; method?: unknown; params?: unknown; result?: unknown; error?: unknown };
    if (typeof msg.method === 'string') {
      if (line.length > MAX_REMEMBERED_NOTIFICATION) {
        this.options.onNotification?.(msg.method, msg.params);
        return;
      }
      const notification: Notification = { line, method: msg.method, params: freezeJson(msg.params) };
      recentNotifications.unshift(notification);
      if (recentNotifications.length > RECENT_NOTIFICATIONS) recentNotifications.pop();
      this.options.onNotification?.(notification.method, notification.params);
      return;
    }
    if (typeof msg.id !== 'number') return;
    if (msg.error !== undefined) {
      const error = RpcErrorSchema.safeParse(msg.error);
      const entry = this.settle(msg.id);
      if (!entry) return;
      if (!error.success) entry.reject(new QwenProtocolError('qwen-tokend sent a malformed error'));
      else entry.reject(errorFromWire(error.data.data?.code, error.data.message, error.data.data?.oauth_error));
      return;
    }
    if (!('result' in msg)) return;
    this.repeated.remember(line, data, msg.result);
    this.settle(msg.id)?.resolve(msg.result);
  }

  private failAll(err: QwenError): void {
    for (const id of [...this.pending.keys()]) this.settle(id)?.reject(err);
  }

  private onClose(): void {
    if (this.closed) return;
    this.closed = true;
    // Lines still in the read being handled (a handler may close the connection) are dropped.
    this.reader.stop();
    if (this.deadlineTimer) clearTimeout(this.deadlineTimer);
    this.repeated.forget();
    this.failAll(new QwenDaemonUnavailableError(`the connection to qwen-tokend (${this.options.socketPath}) closed`));
    this.options.onClose?.();
  }
}
