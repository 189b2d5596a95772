/**
 * One socket connection to the daemon: JSON-RPC 2.0 over NDJSON, id matching, typed errors,
 * notifications. Knows nothing of tokens; `TokenClient` builds on it.
 */
import { createConnection, type Socket } from 'node:net';
import { errorFromWire, QwenDaemonUnavailableError, QwenProtocolError, type QwenError } from '../shared/errors.js';
import { RpcErrorSchema } from '../shared/protocol.js';

/** Replies are small; anything this large is a broken or hostile peer. */
const MAX_INCOMING_FRAME = 1024 * 1024;

interface Pending {
  resolve: (value: unknown) => void;
  reject: (err: QwenError) => void;
  timer: NodeJS.Timeout | undefined;
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
  private buffer = '';
  private closed = false;
  /** Calls written in the current tick; from the second on, the socket is corked until it ends. */
  private callsThisTick = 0;

  private constructor(
    private readonly socket: Socket,
    private readonly options: DaemonConnectionOptions,
  ) {
    socket.setEncoding('utf8');
    socket.on('data', (chunk: string) => this.onData(chunk));
    socket.on('error', () => undefined);
    socket.on('close', () => this.onClose());
    socket.unref();
  }

  /** Connects; rejects with the socket error (ENOENT, ECONNREFUSED...) so callers can decide to autostart. */
  static open(options: DaemonConnectionOptions, timeoutMs: number): Promise<DaemonConnection> {
    return new Promise((resolve, reject) => {
      const socket = createConnection(options.socketPath);
      const timer = setTimeout(() => {
        socket.destroy();
        reject(Object.assign(new Error(`connecting to ${options.socketPath} timed out after ${timeoutMs} ms`), { code: 'ETIMEDOUT' }));
      }, timeoutMs);
      socket.once('connect', () => {
        clearTimeout(timer);
        socket.removeAllListeners('error');
        resolve(new DaemonConnection(socket, options));
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
      const entry: Pending = { resolve, reject, timer: undefined };
      if (timeoutMs > 0) {
        entry.timer = setTimeout(() => {
          this.settle(id);
          reject(new QwenDaemonUnavailableError(`qwen-tokend did not answer "${method}" within ${timeoutMs} ms`));
        }, timeoutMs);
      }
      this.pending.set(id, entry);
      // While a call waits, the socket keeps the process alive; when idle, it must not.
      if (this.pending.size === 1) this.socket.ref();
      // The first call of a tick is written at once; more calls in the same tick (a burst of
      // getAccessToken() on an expired token) are held and leave together when the tick ends:
      // one system call and one wake-up of the daemon instead of one each.
      const call = ++this.callsThisTick;
      if (call === 1) {
        process.nextTick(() => {
          if (this.callsThisTick > 1) this.socket.uncork();
          this.callsThisTick = 0;
        });
      } else if (call === 2) {
        this.socket.cork();
      }
      this.socket.write(`${JSON.stringify({ jsonrpc: '2.0', id, method, params: params ?? {} })}\n`);
    });
  }

  close(): void {
    this.socket.destroy();
    this.onClose();
  }

  private settle(id: number): Pending | undefined {
    const entry = this.pending.get(id);
    if (!entry) return undefined;
    this.pending.delete(id);
    if (entry.timer) clearTimeout(entry.timer);
    if (this.pending.size === 0 && !this.closed) this.socket.unref();
    return entry;
  }

  private onData(chunk: string): void {
    this.buffer += chunk;
    let nl = this.buffer.indexOf('\n');
    while (nl !== -1) {
      const line = this.buffer.slice(0, nl);
      this.buffer = this.buffer.slice(nl + 1);
      if (line.trim()) this.onLine(line);
      nl = this.buffer.indexOf('\n');
    }
    if (this.buffer.length > MAX_INCOMING_FRAME) {
      this.failAll(new QwenProtocolError('qwen-tokend sent a frame larger than 1 MiB; closing the connection'));
      this.socket.destroy();
    }
  }

  private onLine(line: string): void {
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
      this.options.onNotification?.(msg.method, msg.params);
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
    this.settle(msg.id)?.resolve(msg.result);
  }

  private failAll(err: QwenError): void {
    for (const id of [...this.pending.keys()]) this.settle(id)?.reject(err);
  }

  private onClose(): void {
    if (this.closed) return;
    this.closed = true;
    this.failAll(new QwenDaemonUnavailableError(`the connection to qwen-tokend (${this.options.socketPath}) closed`));
    this.options.onClose?.();
  }
}
