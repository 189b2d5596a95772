/**
 * The daemon's Unix-socket server: JSON-RPC 2.0, one JSON object per line. It accepts
 * connections, enforces the limits, and sends notifications to subscribers; the socket file is
 * socket-file.ts's, each connection's framing and writing ipc-connection.ts's, and what a line
 * means rpc-dispatcher.ts's. Nothing a client sends may crash the daemon or stall other clients.
 */
import { chmod } from 'node:fs/promises';
import { createServer, type Server, type Socket } from 'node:net';
import { dirname } from 'node:path';
import { systemClock, type Clock } from '../shared/clock.js';
import { checkSocketPathLength, DEFAULTS } from '../shared/config.js';
import { errorText } from '../shared/diagnostics.js';
import { MAX_CONNECTIONS, MAX_FRAME_BYTES } from '../shared/protocol.js';
import { Connection, MAX_UNREAD_BYTES, type ConnectionContext } from './ipc-connection.js';
import type { Logger } from './logger.js';
import { RpcDispatcher, type RpcMethod } from './rpc-dispatcher.js';
import { prepareSocketDirectory, removeOwnSocket, removeStaleSocket } from './socket-file.js';
import { TurnQueue } from './turn-queue.js';
import { WarningThrottle } from './warning-throttle.js';

export interface IpcServerOptions {
  socketPath: string;
  logger: Logger;
  methods: Record<string, RpcMethod>;
  platform?: NodeJS.Platform;
  maxConnections?: number;
  maxFrameBytes?: number;
  /** A partial frame left unfinished this long closes the connection. */
  partialFrameTimeoutMs?: number;
  /** A connection that sends nothing at all this long after it opened is closed. */
  silentConnectionTimeoutMs?: number;
  /** How long handling received frames may hold the event loop before the rest waits a turn. */
  turnBudgetMs?: number;
  /** Refused connections are warned about at most once per this long. */
  refusedWarningIntervalMs?: number;
  clock?: Clock;
}

/**
 * How long handling received frames may keep the event loop before the rest waits for a later
 * turn: long enough for warm code to handle a pipelined window at once, short enough that a
 * flood of cold calls does not stall a refresh, other clients and timers (see bench/README.md#b4).
 */
const TURN_BUDGET_MS = 2;
const REFUSED_WARNING_INTERVAL_MS = 60_000;

function encode(method: string, params: unknown): Buffer {
  return Buffer.from(`${JSON.stringify({ jsonrpc: '2.0', method, params })}\n`);
}

/** JSON-RPC 2.0 over NDJSON on a Unix socket. */
export class IpcServer {
  private readonly server: Server;
  private readonly context: ConnectionContext;
  private readonly connections = new Set<Connection>();
  private readonly refusedWarnings: WarningThrottle;
  private readonly clock: Clock;
  private nextId = 1;
  private listening = false;

  constructor(private readonly options: IpcServerOptions) {
    const logger = options.logger;
    this.clock = options.clock ?? systemClock;
    this.context = {
      dispatcher: new RpcDispatcher(options.methods, logger),
      turns: new TurnQueue<Connection>(options.turnBudgetMs ?? TURN_BUDGET_MS),
      logger,
      maxFrameBytes: options.maxFrameBytes ?? MAX_FRAME_BYTES,
      partialFrameTimeoutMs: options.partialFrameTimeoutMs ?? 10_000,
      silentTimeoutMs: options.silentConnectionTimeoutMs ?? DEFAULTS.silentConnectionTimeoutMs,
    };
    this.refusedWarnings = new WarningThrottle(options.refusedWarningIntervalMs ?? REFUSED_WARNING_INTERVAL_MS);
    // Half-open: when a client closes its side, what it already sent is still answered.
    this.server = createServer({ allowHalfOpen: true }, (socket) => this.accept(socket));
    this.server.maxConnections = options.maxConnections ?? MAX_CONNECTIONS;
    this.server.on('drop', () => this.refused());
  }

  get connectionCount(): number {
    return this.connections.size;
  }

  get requestsServed(): number {
    return this.context.dispatcher.requestsServed;
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
      // A backlog as deep as the connection limit: many clients connecting at once (every
      // agent starting together) queue instead of failing with EAGAIN.
      this.server.listen({ path: socketPath, backlog: this.server.maxConnections }, () => {
        this.server.off('error', reject);
        resolveListen();
      });
    });
    this.listening = true;
    this.server.on('error', (err) => this.options.logger.error({ err: errorText(err) }, 'socket server error'));
    await chmod(socketPath, 0o600);
    // Built now, while the daemon is idle, rather than on the first call of each method.
    setImmediate(() => this.context.dispatcher.compileSchemas()).unref();
  }

  /** Sends a notification to every subscribed connection. */
  broadcast(method: string, params: unknown): number {
    // Encoded once for every subscriber.
    const line = encode(method, params);
    let sent = 0;
    for (const conn of this.connections) {
      if (!conn.session.subscribed || conn.socket.destroyed) continue;
      if (this.send(conn, line)) sent++;
    }
    return sent;
  }

  /**
   * Sends a notification about one profile to the connections that listen to it: a version-2
   * connection subscribed to that profile or to all of them gets `params`; a version-1
   * connection hears only its subscribed profile (the default one unless it named another) and
   * gets `v1Params`, version 1's shape (null: nothing, the method is not part of version 1).
   * `params` null: version-2 connections are not told.
   */
  broadcastAbout(profile: string, defaultProfile: string, method: string, params: unknown, v1Params: unknown): number {
    let line: Buffer | null = null;
    let v1Line: Buffer | null = null;
    let sent = 0;
    for (const conn of this.connections) {
      const session = conn.session;
      if (!session.subscribed || conn.socket.destroyed) continue;
      if (session.protocol >= 2) {
        if (params === null || (session.subscribedProfile !== null && session.subscribedProfile !== profile)) continue;
        // Encoded once for every subscriber of a version.
        line ??= encode(method, params);
        if (this.send(conn, line)) sent++;
      } else {
        if (v1Params === null || (session.subscribedProfile ?? defaultProfile) !== profile) continue;
        v1Line ??= encode(method, v1Params);
        if (this.send(conn, v1Line)) sent++;
      }
    }
    return sent;
  }

  /** Sends a notification only version-2 connections know (`profiles.changed`). */
  broadcastV2(method: string, params: unknown): number {
    let line: Buffer | null = null;
    let sent = 0;
    for (const conn of this.connections) {
      if (!conn.session.subscribed || conn.session.protocol < 2 || conn.socket.destroyed) continue;
      line ??= encode(method, params);
      if (this.send(conn, line)) sent++;
    }
    return sent;
  }

  /** Writes an encoded notification; a client that stopped reading is closed instead. */
  private send(conn: Connection, line: Buffer): boolean {
    if (conn.socket.writableLength > MAX_UNREAD_BYTES) {
      conn.socket.destroy();
      return false;
    }
    conn.sendEncoded(line);
    return true;
  }

  /** Stops accepting, closes every connection and removes the socket file. */
  async close(): Promise<void> {
    if (!this.listening) return;
    this.listening = false;
    const closed = new Promise<void>((done) => this.server.close(() => done()));
    for (const conn of this.connections) conn.socket.destroy();
    await closed;
    // server.close() removes the socket file on most platforms; make sure, but only ours.
    await removeOwnSocket(this.options.socketPath);
  }

  private accept(socket: Socket): void {
    const conn = new Connection(this.nextId++, socket, this.context);
    this.connections.add(conn);
    socket.on('data', (chunk: Buffer) => conn.onData(chunk));
    socket.on('end', () => conn.onPeerEnd());
    socket.on('drain', () => conn.updateFlow());
    socket.on('error', () => socket.destroy());
    socket.on('close', () => {
      conn.onClose();
      this.connections.delete(conn);
    });
  }

  /** A client was turned away at the connection limit: warned about, but not once per client. */
  private refused(): void {
    const count = this.refusedWarnings.occurred(this.clock.now());
    if (count > 0) this.options.logger.warn({ max: this.server.maxConnections, refused: count }, 'connection limit reached; refused clients');
  }
}
