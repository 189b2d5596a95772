/**
 * The daemon's Unix-socket server: JSON-RPC 2.0, one JSON object per line.
 * It owns framing, limits and the socket file; what each method does is given as handlers.
 * Nothing a client sends may crash the daemon or stall other clients.
 */
import { lstat, mkdir, chmod, unlink } from 'node:fs/promises';
import { createConnection, createServer, type Server, type Socket } from 'node:net';
import { dirname } from 'node:path';
import type { z } from 'zod';
import { checkSocketPathLength } from '../shared/config.js';
import { describeIssues } from '../shared/diagnostics.js';
import { QwenConfigError, QwenError } from '../shared/errors.js';
import { parentsProblem } from '../shared/path-trust.js';
import { MAX_CONNECTIONS, MAX_FRAME_BYTES, RpcErrorCodes, RpcRequestSchema, requestSchemaFor } from '../shared/protocol.js';
import { compileSchemas } from '../shared/compile-schemas.js';
import { RepeatedFrame } from '../shared/repeated-frame.js';
import type { Logger } from './logger.js';

/** Another daemon answers on the socket. */
export class DaemonAlreadyRunningError extends QwenError {}

export interface RpcConnection {
  readonly id: number;
  subscribed: boolean;
}

/** One method: the schema its params must match, and what it does with them. */
export interface RpcMethod {
  readonly params: z.ZodType;
  handle(params: unknown, connection: RpcConnection): unknown;
}

/**
 * Declares a method. `params` should be strict: unknown members are a caller's mistake. An
 * absent `params` member is validated as `{}`.
 */
export function rpcMethod<P extends z.ZodType>(params: P, handle: (params: z.output<P>, connection: RpcConnection) => unknown): RpcMethod {
  return { params, handle: handle as RpcMethod['handle'] };
}

/** Calls of one connection to one method, waiting on the same promise. */
interface AwaitingCalls {
  readonly compiled: CompiledMethod;
  readonly ids: Id[];
}

/** A method with the schema for a whole request frame to it, built once. */
interface CompiledMethod {
  readonly name: string;
  readonly method: RpcMethod;
  /** Envelope and params in one schema: the common case costs one validation pass. */
  readonly frame: z.ZodType<{ id?: Id; params?: unknown }>;
}

export interface IpcServerOptions {
  socketPath: string;
  logger: Logger;
  methods: Record<string, RpcMethod>;
  platform?: NodeJS.Platform;
  maxConnections?: number;
  maxFrameBytes?: number;
  /** A partial frame left unfinished this long closes the connection. */
  partialFrameTimeoutMs?: number;
  /** How long handling received frames may hold the event loop before the rest waits a turn. */
  turnBudgetMs?: number;
}

/** Replies waiting in one connection's send buffer beyond this mean the client stopped reading. */
const MAX_UNREAD_BYTES = 1024 * 1024;
/** Above this many unread reply bytes we stop reading that client's requests until it catches up. */
const PAUSE_UNREAD_BYTES = 64 * 1024;
/** Requests one connection may have in flight before we stop reading from it. */
const MAX_INFLIGHT_PER_CONNECTION = 256;
/**
 * How long handling received frames may keep the event loop before the rest waits for a later
 * turn. A burst (a thousand calls when the token expired, before V8 has optimized anything:
 * ~8 µs a frame on a small machine) would otherwise be handled in one run while the refresh it
 * started, the other clients and the timers all wait. Warm code handles a pipelined window of
 * 128 frames well within it, so steady load never waits.
 */
const TURN_BUDGET_MS = 2;
/** Frames handled between two looks at the clock. */
const FRAMES_PER_CLOCK_CHECK = 16;

type Id = string | number | null;

class Connection implements RpcConnection {
  subscribed = false;
  private parts: Buffer[] = [];
  private partsLength = 0;
  private inflight = 0;
  private partialTimer: NodeJS.Timeout | null = null;
  private corked = false;
  /** Answer lines made while a read of several frames is handled; null outside of that. */
  private gathered: string | null = null;
  /** Received bytes not yet looked at: this connection is waiting in line for a turn. */
  private held: Buffer | null = null;
  /** The client closed its side; ours closes once everything it sent is answered. */
  private peerEnded = false;
  /** Calls waiting on a promise, by that promise (see answerWhenSettled). */
  private readonly awaiting = new Map<Promise<unknown>, AwaitingCalls>();

  constructor(
    readonly id: number,
    readonly socket: Socket,
    private readonly server: IpcServer,
  ) {}

  onData(chunk: Buffer): void {
    // Others are waiting in line: take a place behind them rather than jump the queue.
    if (this.held || this.server.hasWaiting()) this.hold(chunk);
    else this.consume(chunk, performance.now() + this.server.turnBudgetMs);
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

  private endIfAnswered(): void {
    if (this.peerEnded && this.held === null && this.inflight === 0 && !this.socket.destroyed) this.endSocket();
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
    this.server.waitInLine(this);
  }

  /** Handles the complete lines of `chunk` until `deadline`, holds the lines left, keeps a partial one. */
  private consume(chunk: Buffer, deadline: number): void {
    const first = chunk.indexOf(10);
    // Several frames at once (a pipelining client, a burst): the answers made while handling
    // them are gathered and leave in one write, not one each.
    const batch = first !== -1 && chunk.indexOf(10, first + 1) !== -1;
    if (!batch) {
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

  private flushGathered(): void {
    const lines = this.gathered;
    this.gathered = null;
    if (lines) this.write(lines);
  }

  private consumeFrom(chunk: Buffer, firstNewline: number, deadline: number): void {
    let start = 0;
    if (this.partsLength > 0 && firstNewline !== -1) {
      // The first newline ends the frame whose start came with earlier reads.
      this.parts.push(chunk.subarray(0, firstNewline));
      const line = Buffer.concat(this.parts, this.partsLength + firstNewline);
      this.parts = [];
      this.partsLength = 0;
      this.clearPartialTimer();
      if (!this.frame(line)) return;
      start = firstNewline + 1;
    }
    const lastNewline = chunk.lastIndexOf(10);
    if (lastNewline >= start) {
      const next = this.consumeLines(chunk, start, lastNewline + 1, deadline);
      if (next === -1) return;
      start = next;
    }
    if (start < chunk.length) {
      const rest = chunk.subarray(start);
      this.parts.push(rest);
      this.partsLength += rest.length;
      if (this.partsLength > this.server.maxFrameBytes) {
        this.tooLarge();
        return;
      }
      if (!this.partialTimer) {
        this.partialTimer = setTimeout(() => {
          this.server.logger.debug({ conn: this.id }, 'closing a connection that left a frame half-sent');
          this.socket.destroy();
        }, this.server.partialFrameTimeoutMs);
        this.partialTimer.unref();
      }
    }
  }

  /**
   * Handles the complete lines in `chunk[from, to)` (`to` just after a newline) until `deadline`,
   * then holds the rest. Returns where the bytes left unhandled start, or -1 when nothing more
   * is to be read (held for a later turn, or the connection was closed).
   *
   * The lines are decoded as one string and looked at in place: a burst's frames cost a few
   * string comparisons each, not a Buffer, a decode and a string apiece (half the cost of the
   * first thousand frames in a fresh daemon). That needs string offsets to be byte offsets,
   * which holds when the text is as long as its bytes: every byte was one character (ASCII, or
   * an invalid byte decoded as U+FFFD). Other text, rare in this protocol, is handled a line at
   * a time from the bytes.
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
    let nl = chunk.indexOf(10, start);
    while (nl !== -1 && nl < to) {
      if (handled % FRAMES_PER_CLOCK_CHECK === 0 && handled > 0 && performance.now() >= deadline) {
        this.hold(chunk.subarray(start));
        return -1;
      }
      handled++;
      if (!this.frame(chunk.subarray(start, nl))) return -1;
      start = nl + 1;
      nl = chunk.indexOf(10, start);
    }
    return to;
  }

  clearPartialTimer(): void {
    if (this.partialTimer) clearTimeout(this.partialTimer);
    this.partialTimer = null;
  }

  /** Handles one complete line; false when the connection was closed. */
  private frame(line: Buffer): boolean {
    if (line.length > this.server.maxFrameBytes) {
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
    if (end - start > this.server.maxFrameBytes) {
      this.tooLarge();
      return false;
    }
    // Tolerate CRLF and blank keep-alive lines from hand-typed clients (nc -U).
    if (end > start && text.charCodeAt(end - 1) === 13) end--;
    if (end === start) return true;
    this.server.handleFrame(this, text, start, end);
    return !this.socket.destroyed;
  }

  private tooLarge(): void {
    this.send({
      jsonrpc: '2.0',
      id: null,
      error: { code: RpcErrorCodes.frameTooLarge, message: `frame exceeds ${this.server.maxFrameBytes} bytes; closing the connection` },
    });
    this.parts = [];
    this.partsLength = 0;
    this.clearPartialTimer();
    this.endSocket();
  }

  requestStarted(): void {
    this.inflight++;
    this.updateFlow();
  }

  requestDone(count = 1): void {
    this.inflight -= count;
    this.updateFlow();
    // After the answer this request is about to write.
    if (this.peerEnded && this.inflight === 0) process.nextTick(() => this.endIfAnswered());
  }

  /**
   * Answers call `id` when `result` settles. Calls of this connection waiting on the same
   * promise (a burst waiting on one refresh) are answered together: one callback and one write
   * for all of them, instead of one each.
   */
  answerWhenSettled(result: Promise<unknown>, id: Id, compiled: CompiledMethod): void {
    const joined = this.awaiting.get(result);
    if (joined?.compiled === compiled) {
      joined.ids.push(id);
      return;
    }
    const group: AwaitingCalls = { compiled, ids: [id] };
    // Another method handing out the very same promise gets a group of its own.
    if (!joined) this.awaiting.set(result, group);
    result.then(
      (value) => this.answerGroup(result, group, (callId) => this.server.resultLine(callId, value)),
      (err: unknown) => {
        const error = this.server.errorOf(err, compiled.name);
        this.answerGroup(result, group, (callId) => `${JSON.stringify({ jsonrpc: '2.0', id: callId, error })}\n`);
      },
    );
  }

  private answerGroup(result: Promise<unknown>, group: AwaitingCalls, lineFor: (id: Id) => string): void {
    if (this.awaiting.get(result) === group) this.awaiting.delete(result);
    let lines = '';
    for (const id of group.ids) lines += lineFor(id);
    this.requestDone(group.ids.length);
    this.sendLine(lines);
  }

  /**
   * Back-pressure: a client with too many requests in flight, or that does not read its
   * replies, is not read from until it catches up, so it cannot make the daemon buffer
   * without bound (or starve others).
   */
  updateFlow(): void {
    const socket = this.socket;
    const hold = this.held !== null || this.inflight >= MAX_INFLIGHT_PER_CONNECTION || socket.writableLength > PAUSE_UNREAD_BYTES;
    if (hold && !socket.isPaused()) socket.pause();
    else if (!hold && socket.isPaused() && !socket.destroyed) socket.resume();
  }

  send(message: unknown): void {
    this.sendLine(`${JSON.stringify(message)}\n`);
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
      this.server.logger.warn({ conn: this.id }, 'closing a connection whose client stopped reading');
      socket.destroy();
      return;
    }
    // More answers to this client are pending (say, many calls waiting on one refresh): hold
    // the writes until this tick ends, so they leave in one system call instead of one each.
    if (this.inflight > 0 && !this.corked) {
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

/** JSON-RPC 2.0 over NDJSON on a Unix socket. */
export class IpcServer {
  readonly logger: Logger;
  readonly maxFrameBytes: number;
  readonly partialFrameTimeoutMs: number;
  readonly turnBudgetMs: number;
  private readonly server: Server;
  private readonly connections = new Set<Connection>();
  private nextId = 1;
  private served = 0;
  private listening = false;
  private readonly methods = new Map<string, CompiledMethod>();
  /** Frozen results (a token record shared by every caller) are serialized once. */
  private readonly resultJson = new WeakMap<object, string>();
  /** Connections with received frames held back for a later turn, in arrival order. */
  private readonly waiting = new Set<Connection>();
  private turnScheduled = false;
  /** The last canonical valid call, for frames that repeat it with another id (a burst). */
  private readonly repeated = new RepeatedFrame<{ compiled: CompiledMethod; params: unknown }>();

  constructor(private readonly options: IpcServerOptions) {
    this.logger = options.logger;
    for (const [name, method] of Object.entries(options.methods)) {
      this.methods.set(name, { name, method, frame: requestSchemaFor(name, method.params) });
    }
    this.maxFrameBytes = options.maxFrameBytes ?? MAX_FRAME_BYTES;
    this.partialFrameTimeoutMs = options.partialFrameTimeoutMs ?? 10_000;
    this.turnBudgetMs = options.turnBudgetMs ?? TURN_BUDGET_MS;
    // Half-open: when a client closes its side, what it already sent is still answered.
    this.server = createServer({ allowHalfOpen: true }, (socket) => this.accept(socket));
    this.server.maxConnections = options.maxConnections ?? MAX_CONNECTIONS;
    this.server.on('drop', () => this.logger.warn({ max: this.server.maxConnections }, 'connection limit reached; refused a client'));
  }

  get connectionCount(): number {
    return this.connections.size;
  }

  get requestsServed(): number {
    return this.served;
  }

  get socketPath(): string {
    return this.options.socketPath;
  }

  /** Prepares the socket directory, replaces a stale socket, listens, and restricts the socket to its owner. */
  async listen(): Promise<void> {
    const { socketPath } = this.options;
    checkSocketPathLength(socketPath, this.options.platform ?? process.platform);
    await prepareSocketDirectory(dirname(socketPath));
    await removeStaleSocket(socketPath);
    await new Promise<void>((resolveListen, reject) => {
      this.server.once('error', reject);
      // A backlog as deep as the connection limit: a burst of clients connecting at once
      // (every agent starting together) queues instead of failing with EAGAIN.
      this.server.listen({ path: socketPath, backlog: this.server.maxConnections }, () => {
        this.server.off('error', reject);
        resolveListen();
      });
    });
    this.listening = true;
    this.server.on('error', (err) => this.logger.error({ err: err.message }, 'socket server error'));
    await chmod(socketPath, 0o600);
    setImmediate(() => this.compileSchemas()).unref();
  }

  /**
   * zod builds a schema's checking code on its first use, ~1-3 ms each: left to the first call
   * of each method, that lands on a request (on the first getAccessToken of a burst, ahead of the
   * refresh it starts). Done once here instead, when the daemon has just started and is idle.
   */
  private compileSchemas(): void {
    compileSchemas([...[...this.methods.values()].map((compiled) => compiled.frame), RpcRequestSchema]);
  }

  /** Sends a notification to every subscribed connection. */
  broadcast(method: string, params: unknown): number {
    // Encoded once: with a thousand subscribers, per-socket string conversion adds up.
    const line = Buffer.from(`${JSON.stringify({ jsonrpc: '2.0', method, params })}\n`);
    let sent = 0;
    for (const conn of this.connections) {
      if (!conn.subscribed || conn.socket.destroyed) continue;
      if (conn.socket.writableLength > MAX_UNREAD_BYTES) {
        conn.socket.destroy();
        continue;
      }
      conn.sendEncoded(line);
      sent++;
    }
    return sent;
  }

  /** Stops accepting, closes every connection and removes the socket file. */
  async close(): Promise<void> {
    if (!this.listening) return;
    this.listening = false;
    const closed = new Promise<void>((done) => this.server.close(() => done()));
    for (const conn of this.connections) conn.socket.destroy();
    await closed;
    // server.close() removes the socket file on most platforms; make sure, but only ours.
    try {
      const st = await lstat(this.options.socketPath);
      if (st.isSocket()) await unlink(this.options.socketPath);
    } catch {
      /* already gone */
    }
  }

  /** True while some connection has frames held back for a later turn. */
  hasWaiting(): boolean {
    return this.waiting.size > 0;
  }

  /** Puts `conn` in line (once) for the next turn. */
  waitInLine(conn: Connection): void {
    this.waiting.add(conn);
    if (!this.turnScheduled) {
      this.turnScheduled = true;
      // setImmediate runs after the poll phase: I/O that arrived meanwhile is handled first.
      setImmediate(this.nextTurn);
    }
  }

  /**
   * One turn: the waiting connections, in arrival order, handle their frames until the turn's
   * budget is spent. One that runs out of time waits again behind the others.
   */
  private readonly nextTurn = (): void => {
    this.turnScheduled = false;
    const line = [...this.waiting];
    this.waiting.clear();
    const deadline = performance.now() + this.turnBudgetMs;
    let served = 0;
    for (const conn of line) {
      // The first in line always gets its go, so every turn makes progress.
      if (served > 0 && performance.now() >= deadline) break;
      conn.takeTurn(deadline);
      served++;
    }
    if (served < line.length) {
      // Those not reached this turn go ahead of those that used theirs and queued again.
      const again = [...this.waiting];
      this.waiting.clear();
      for (const conn of [...line.slice(served), ...again]) this.waitInLine(conn);
    }
  };

  private accept(socket: Socket): void {
    const conn = new Connection(this.nextId++, socket, this);
    this.connections.add(conn);
    socket.on('data', (chunk: Buffer) => conn.onData(chunk));
    socket.on('end', () => conn.onPeerEnd());
    socket.on('drain', () => conn.updateFlow());
    socket.on('error', () => socket.destroy());
    socket.on('close', () => {
      conn.clearPartialTimer();
      this.waiting.delete(conn);
      this.connections.delete(conn);
    });
  }

  /** @internal Parses, validates and dispatches one frame, `source[start, end)`. */
  handleFrame(conn: Connection, source: string, start: number, end: number): void {
    const repeatedId = this.repeated.idAt(source, start, end);
    if (repeatedId !== -1) {
      const { compiled, params } = this.repeated.value;
      this.dispatch(conn, compiled, repeatedId, params);
      return;
    }
    const text = start === 0 && end === source.length ? source : source.slice(start, end);
    let data: unknown;
    try {
      data = JSON.parse(text);
    } catch {
      conn.send({ jsonrpc: '2.0', id: null, error: { code: RpcErrorCodes.parseError, message: 'parse error: the frame is not valid JSON' } });
      return;
    }
    const name = typeof data === 'object' && data !== null ? (data as { method?: unknown }).method : undefined;
    const compiled = typeof name === 'string' ? this.methods.get(name) : undefined;
    const parsed = compiled?.frame.safeParse(data);
    if (!compiled || !parsed?.success) {
      this.rejectFrame(conn, data, compiled);
      return;
    }
    // Frozen: a repeated frame hands the same params to every call it stands for.
    const params: unknown = Object.freeze(parsed.data.params);
    this.repeated.remember(text, data, { compiled, params });
    this.dispatch(conn, compiled, parsed.data.id, params);
  }

  /** Runs a validated call (`id` undefined: a notification, which gets no answer) and answers it. */
  private dispatch(conn: Connection, compiled: CompiledMethod, requestId: Id | undefined, params: unknown): void {
    const isNotification = requestId === undefined;
    const id: Id = requestId ?? null;
    this.served++;
    conn.requestStarted();
    let result: unknown;
    try {
      result = compiled.method.handle(params, conn);
    } catch (err) {
      conn.requestDone();
      if (!isNotification) conn.send(this.errorResponse(id, err, compiled.name));
      return;
    }
    if (result instanceof Promise) {
      if (!isNotification) {
        conn.answerWhenSettled(result, id, compiled);
        return;
      }
      // A notification gets no answer, whatever the outcome.
      result.then(
        () => conn.requestDone(),
        () => conn.requestDone(),
      );
      return;
    }
    conn.requestDone();
    if (!isNotification) conn.sendLine(this.resultLine(id, result));
  }

  /**
   * Answers a frame that did not validate as a call of a known method, saying what is wrong:
   * not a request at all, an unknown method, or params the method does not take.
   */
  private rejectFrame(conn: Connection, data: unknown, compiled: CompiledMethod | undefined): void {
    const envelope = RpcRequestSchema.safeParse(data);
    if (!envelope.success) {
      const message = Array.isArray(data)
        ? 'invalid request: batches are not supported; send one request per line'
        : `invalid request: ${describeIssues(envelope.error)}`;
      conn.send({ jsonrpc: '2.0', id: idOf(data), error: { code: RpcErrorCodes.invalidRequest, message } });
      return;
    }
    const request = envelope.data;
    if (request.id === undefined) return; // a notification gets no answer, not even an error
    const id: Id = request.id;
    if (!compiled) {
      conn.send({ jsonrpc: '2.0', id, error: { code: RpcErrorCodes.methodNotFound, message: `method not found: ${request.method}` } });
      return;
    }
    // The params as sent (the envelope's parsed copy drops keys such as __proto__).
    const params = compiled.method.params.safeParse((data as { params?: unknown }).params ?? {});
    const message = params.success ? 'invalid request' : `invalid params: ${describeIssues(params.error)}`;
    conn.send({ jsonrpc: '2.0', id, error: { code: params.success ? RpcErrorCodes.invalidRequest : RpcErrorCodes.invalidParams, message } });
  }

  /** @internal The answer line for call `id` with `result`. */
  resultLine(id: Id, result: unknown): string {
    if (result === undefined || result === null || typeof result !== 'object' || !Object.isFrozen(result)) {
      return `${JSON.stringify({ jsonrpc: '2.0', id, result: result ?? null })}\n`;
    }
    let json = this.resultJson.get(result);
    if (json === undefined) {
      json = JSON.stringify(result);
      this.resultJson.set(result, json);
    }
    return `{"jsonrpc":"2.0","id":${JSON.stringify(id)},"result":${json}}\n`;
  }

  private errorResponse(id: Id, err: unknown, method: string): unknown {
    return { jsonrpc: '2.0', id, error: this.errorOf(err, method) };
  }

  /** @internal The JSON-RPC error object for what a handler threw (logged when unexpected). */
  errorOf(err: unknown, method: string): { code: number; message: string; data?: Record<string, string> } {
    if (err instanceof QwenError) {
      const data: Record<string, string> = { code: err.code };
      const oauthError = (err as { oauthError?: unknown }).oauthError;
      if (typeof oauthError === 'string') data.oauth_error = oauthError;
      return { code: RpcErrorCodes.appError, message: err.message, data };
    }
    this.logger.error({ method, err: err instanceof Error ? err.message : String(err) }, 'handler failed unexpectedly');
    return { code: RpcErrorCodes.internalError, message: 'internal error' };
  }
}

function idOf(data: unknown): Id {
  if (data && typeof data === 'object' && !Array.isArray(data)) {
    const id = (data as { id?: unknown }).id;
    if (typeof id === 'string' && id.length <= 200) return id;
    if (typeof id === 'number' && Number.isFinite(id)) return id;
  }
  return null;
}

/**
 * Creates the socket's directory 0700, or checks an existing one: it must be a directory we
 * own that grants nothing to group or other, or any local user could reach the socket.
 */
export async function prepareSocketDirectory(dir: string): Promise<void> {
  let st;
  try {
    st = await lstat(dir);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
    await mkdir(dir, { recursive: true, mode: 0o700 });
    await chmod(dir, 0o700);
    refuseUnsafeParents(dir);
    return;
  }
  if (!st.isDirectory()) {
    throw new QwenConfigError(`socket directory ${dir} exists but is not a directory`);
  }
  const uid = process.getuid?.();
  if (uid !== undefined && st.uid !== uid) {
    throw new QwenConfigError(`socket directory ${dir} belongs to uid ${st.uid}, not to this user (uid ${uid}); refusing to use it`);
  }
  if ((st.mode & 0o077) !== 0) {
    const mode = (st.mode & 0o777).toString(8).padStart(4, '0');
    throw new QwenConfigError(
      `socket directory ${dir} has mode ${mode}: group or other users could reach the socket. Run \`chmod 700 ${dir}\` or set QWEN_TOKEND_SOCKET to a path in a private directory`,
    );
  }
  refuseUnsafeParents(dir);
}

/** The directories above the socket's must not let another user swap it (see shared/path-trust.ts). */
function refuseUnsafeParents(dir: string): void {
  const problem = parentsProblem(dir);
  if (problem) {
    throw new QwenConfigError(`socket directory ${dir} is not safe: ${problem}. Set QWEN_TOKEND_SOCKET to a path in a private directory`);
  }
}

/** Removes a socket file nothing listens on; refuses a live one and anything that is not a socket. */
export async function removeStaleSocket(socketPath: string): Promise<void> {
  let st;
  try {
    st = await lstat(socketPath);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return;
    throw err;
  }
  if (!st.isSocket()) {
    throw new QwenConfigError(`${socketPath} exists and is not a socket; refusing to replace it`);
  }
  const live = await new Promise<boolean>((done) => {
    const probe = createConnection(socketPath);
    probe.once('connect', () => {
      probe.destroy();
      done(true);
    });
    probe.once('error', () => done(false));
  });
  if (live) {
    throw new DaemonAlreadyRunningError(`another qwen-tokend is already listening on ${socketPath}`);
  }
  await unlink(socketPath);
}
