/**
 * The gateway's HTTP/1.1 client for upstreams: keep-alive connections per origin (plain or
 * TLS), one write per request head (and body, when it is kept), and the answer's body handed
 * on as it is read: decoded, or for a chunked answer relayed to a chunked client, with its
 * chunk framing as it came. It exists because node:http's client costs more per request and
 * per streamed event than the rest of the forwarding (see bench/gateway.md).
 */
import { connect as netConnect, isIP, type Socket } from 'node:net';
import { Writable } from 'node:stream';
import { connect as tlsConnect, type TLSSocket } from 'node:tls';
import { bodyFraming, ChunkedScanner, fieldValue, parseResponseHead, UpstreamProtocolError, type BodyFraming, type ResponseHead } from './http1.js';

/** Why an upstream exchange failed, as the gateway reports it. */
export class UpstreamFailure extends Error {
  constructor(
    readonly kind: 'unreachable' | 'timeout' | 'aborted',
    message: string,
  ) {
    super(message);
  }
}

/**
 * Lets the gateway cut an exchange when its client goes away. A plain hook rather than an
 * AbortSignal: the signal's event machinery cost every request more than the rest of the
 * forwarding did (see bench/gateway.md).
 */
export class Cancellation {
  cancelled = false;
  private hook: (() => void) | null = null;

  cancel(): void {
    if (this.cancelled) return;
    this.cancelled = true;
    this.hook?.();
  }

  /** Runs `fn` on cancel, at once when already cancelled. One hook: the exchange in flight. */
  onCancel(fn: () => void): void {
    this.hook = fn;
    if (this.cancelled) fn();
  }
}

/** Largest response head read from an upstream. */
const MAX_RESPONSE_HEAD = 64 * 1024;
/** Idle connections kept per origin. */
const MAX_IDLE_PER_ORIGIN = 256;
/** How long an idle connection is kept when the upstream does not say (Keep-Alive: timeout=N). */
const DEFAULT_IDLE_MS = 30_000;
/** How often idle connections past their time are closed. */
const SWEEP_MS = 1_000;

/** Where a request body goes when it is streamed; `end()` finishes it. */
export type RequestBodySink = Writable;

export interface UpstreamRequest {
  url: URL;
  method: string;
  /** Header fields to send (names lower-case), without Host, Content-Length or Transfer-Encoding. */
  fields: string[];
  /** A whole body (null: none), or a writer that streams one into the sink and ends it. */
  body: Buffer | null | { length: number | null; write: (sink: RequestBodySink) => void };
  timeoutMs: number;
  cancel: Cancellation;
}

/** What receives an answer's body as it is read. */
export interface BodySink {
  /** Body bytes; false asks for a pause until `resume()` is called on the response. */
  write(bytes: Buffer): boolean;
  /** The body is complete. */
  end(): void;
  /** The body was cut short (the upstream reset, went silent, or broke the framing). */
  broken(): void;
}

/** Keep-alive connections to upstream origins, shared by every exchange of a gateway. */
export class UpstreamPool {
  private readonly idle = new Map<string, Connection[]>();
  private readonly all = new Set<Connection>();
  private readonly sessions = new Map<string, Buffer>();
  private readonly sweeper: NodeJS.Timeout;
  private closed = false;

  /** `ca`: certificates to trust instead of the system's (tests with a local TLS upstream). */
  constructor(private readonly options: { ca?: string | Buffer } = {}) {
    this.sweeper = setInterval(() => this.sweep(), SWEEP_MS);
    this.sweeper.unref();
  }

  /** Sends `request`; resolves with the answer's head, rejects with an `UpstreamFailure`. */
  send(request: UpstreamRequest): Promise<UpstreamResponse> {
    return new Promise((resolve, reject) => {
      if (this.closed) return reject(new UpstreamFailure('unreachable', 'the gateway is closing'));
      const conn = this.take(request.url);
      new UpstreamResponse(conn, request, resolve, reject);
    });
  }

  /** Closes every connection, idle or busy. */
  close(): void {
    this.closed = true;
    clearInterval(this.sweeper);
    for (const conn of this.all) conn.socket.destroy();
    this.all.clear();
    this.idle.clear();
  }

  private take(url: URL): Connection {
    const origin = `${url.protocol}//${url.host}`;
    const list = this.idle.get(origin);
    const now = performance.now();
    while (list && list.length > 0) {
      const conn = list.pop()!;
      if (conn.socket.destroyed || now > conn.idleUntil) {
        conn.socket.destroy();
        continue;
      }
      return conn;
    }
    return this.connect(url, origin);
  }

  private connect(url: URL, origin: string): Connection {
    const host = url.hostname.startsWith('[') ? url.hostname.slice(1, -1) : url.hostname;
    let socket: Socket;
    if (url.protocol === 'https:') {
      const tls: TLSSocket = tlsConnect({
        host,
        port: Number(url.port || 443),
        ...(isIP(host) ? {} : { servername: host }),
        ALPNProtocols: ['http/1.1'],
        session: this.sessions.get(origin),
        ...(this.options.ca ? { ca: this.options.ca } : {}),
      });
      tls.on('session', (session: Buffer) => this.sessions.set(origin, session));
      socket = tls;
    } else {
      socket = netConnect({ host, port: Number(url.port || 80) });
    }
    socket.setNoDelay(true);
    const conn = new Connection(socket, origin, this);
    this.all.add(conn);
    return conn;
  }

  /** Takes back a connection whose exchange is over and whose framing allows another. */
  release(conn: Connection, idleMs: number): void {
    const list = this.idle.get(conn.origin) ?? [];
    if (this.closed || list.length >= MAX_IDLE_PER_ORIGIN) {
      conn.socket.destroy();
      return;
    }
    conn.idleUntil = performance.now() + idleMs;
    list.push(conn);
    this.idle.set(conn.origin, list);
  }

  forget(conn: Connection): void {
    this.all.delete(conn);
    const list = this.idle.get(conn.origin);
    const at = list?.indexOf(conn) ?? -1;
    if (at !== -1) list!.splice(at, 1);
  }

  private sweep(): void {
    const now = performance.now();
    for (const list of this.idle.values()) {
      for (const conn of list) if (now > conn.idleUntil) conn.socket.destroy();
    }
  }
}

/** One socket to an origin; its listeners stay for its life and serve whichever exchange holds it. */
class Connection {
  exchange: UpstreamResponse | null = null;
  idleUntil = 0;

  constructor(
    readonly socket: Socket,
    readonly origin: string,
    readonly pool: UpstreamPool,
  ) {
    socket.on('data', (bytes: Buffer) => {
      // Bytes on an idle connection belong to no request: the connection cannot be trusted.
      if (this.exchange) this.exchange.onData(bytes);
      else socket.destroy();
    });
    socket.on('error', (err: Error) => this.exchange?.onError(err));
    socket.on('timeout', () => {
      if (this.exchange) this.exchange.onTimeout();
      else socket.destroy();
    });
    socket.on('close', () => {
      pool.forget(this);
      this.exchange?.onClose();
    });
  }
}

const enum Phase {
  Head,
  Body,
  Done,
}

/**
 * One request and its answer. Resolves the caller's promise once the answer's head is read;
 * the body is then taken with `relay`, `readAll` or `discard`.
 */
export class UpstreamResponse {
  status = 0;
  /** The answer's header fields, names lower-case, `[name, value, ...]`. */
  fields: string[] = [];
  framing: BodyFraming = 'none';
  private phase = Phase.Head;
  private head: Buffer | null = null;
  private remaining = 0;
  private reusable = false;
  private idleMs = DEFAULT_IDLE_MS;
  private requestSent = false;
  private scanner: ChunkedScanner | null = null;
  private sink: BodySink | null = null;
  /** Body bytes read before a sink was attached. */
  private early: Buffer[] | null = null;
  private earlyEnd = false;
  private failed = false;
  /** The sink asked for a pause (its `write` returned false) and has not asked to resume. */
  private paused = false;
  private plainBytes = 0;

  constructor(
    private readonly conn: Connection,
    private readonly request: UpstreamRequest,
    private resolve: ((response: UpstreamResponse) => void) | null,
    private reject: ((err: UpstreamFailure) => void) | null,
  ) {
    conn.exchange = this;
    const { socket } = conn;
    socket.setTimeout(request.timeoutMs);
    request.cancel.onCancel(() => this.fail(new UpstreamFailure('aborted', 'the client went away')));
    if (request.cancel.cancelled) return;
    const { url, method, fields, body } = request;
    let head = `${method} ${url.pathname}${url.search} HTTP/1.1\r\nhost: ${url.host}\r\n`;
    for (let i = 0; i < fields.length; i += 2) head += `${fields[i]}: ${fields[i + 1]}\r\n`;
    if (body === null) {
      head += '\r\n';
      socket.write(head, 'latin1');
      this.requestSent = true;
    } else if (Buffer.isBuffer(body)) {
      head += `content-length: ${body.length}\r\n\r\n`;
      socket.cork();
      socket.write(head, 'latin1');
      if (body.length > 0) socket.write(body);
      socket.uncork();
      this.requestSent = true;
    } else {
      head += body.length === null ? 'transfer-encoding: chunked\r\n\r\n' : `content-length: ${body.length}\r\n\r\n`;
      socket.write(head, 'latin1');
      body.write(this.bodyWriter(body.length === null));
    }
  }

  /** Body bytes read so far, chunk framing not counted. */
  get bodyBytes(): number {
    return this.scanner ? this.scanner.dataBytes : this.plainBytes;
  }

  /** The value of the answer's field `name` (lower-case). */
  field(name: string): string | undefined {
    return fieldValue(this.fields, name);
  }

  /**
   * Hands the body to `sink` as it is read. With `framed`, a chunked body comes with its chunk
   * framing up to the last chunk (the sink writes the end itself); otherwise decoded.
   */
  relay(sink: BodySink, framed: boolean): void {
    this.sink = sink;
    if (this.failed) return sink.broken();
    if (this.framing === 'chunked') this.scanner = new ChunkedScanner(framed, (bytes) => this.push(bytes));
    const early = this.early;
    this.early = null;
    if (early) for (const bytes of early) this.onBody(bytes);
    if (this.earlyEnd) this.finish();
    if (this.phase === Phase.Body && !this.paused) this.conn.socket.resume();
  }

  /** Asks for more after a sink's `write` returned false. */
  resume(): void {
    this.paused = false;
    if (this.phase === Phase.Body) this.conn.socket.resume();
  }

  /** Reads the body whole when it is at most `limit` bytes; null (exchange cut) when larger or broken. */
  readAll(limit: number): Promise<Buffer | null> {
    return new Promise((done) => {
      const chunks: Buffer[] = [];
      let size = 0;
      this.relay(
        {
          write: (bytes) => {
            size += bytes.length;
            if (size > limit) {
              this.fail(new UpstreamFailure('aborted', 'answer too large'));
              done(null);
              return false;
            }
            chunks.push(bytes);
            return true;
          },
          end: () => done(Buffer.concat(chunks, size)),
          broken: () => done(null),
        },
        false,
      );
    });
  }

  /** Drops the answer and its connection. */
  discard(): void {
    this.fail(new UpstreamFailure('aborted', 'answer discarded'));
  }

  /** A writer for a streamed request body, with chunk framing when its length is not known. */
  private bodyWriter(chunked: boolean): RequestBodySink {
    const { socket } = this.conn;
    return new Writable({
      write: (chunk: Buffer, _encoding, done) => {
        if (this.phase === Phase.Done || socket.destroyed) return done(new UpstreamFailure('unreachable', 'the upstream connection closed'));
        if (chunked) {
          socket.cork();
          socket.write(`${chunk.length.toString(16)}\r\n`, 'latin1');
          socket.write(chunk);
          socket.write('\r\n', 'latin1', (err) => done(err ?? null));
          socket.uncork();
        } else socket.write(chunk, (err) => done(err ?? null));
      },
      final: (done) => {
        this.requestSent = true;
        if (chunked && !socket.destroyed) socket.write('0\r\n\r\n', 'latin1');
        done();
      },
      destroy: (err, done) => {
        if (err) this.fail(err instanceof UpstreamFailure ? err : new UpstreamFailure('unreachable', err.message));
        done(null);
      },
    });
  }

  onData(bytes: Buffer): void {
    if (this.phase === Phase.Head) {
      const buf = this.head ? Buffer.concat([this.head, bytes]) : bytes;
      let head: ResponseHead | null;
      try {
        head = parseResponseHead(buf, MAX_RESPONSE_HEAD);
        if (head && head.status < 200) {
          // An interim answer (103 Early Hints): skip it and read on.
          this.head = null;
          if (buf.length > head.size) this.onData(buf.subarray(head.size));
          return;
        }
        if (head) {
          const framing = bodyFraming(this.request.method, head);
          this.framing = framing.framing;
          this.remaining = framing.length;
          this.reusable = framing.reusable;
        }
      } catch (err) {
        return this.fail(new UpstreamFailure('unreachable', `the upstream ${this.request.url.host} sent a response the gateway cannot read (${(err as Error).message})`));
      }
      if (!head) {
        this.head = buf;
        return;
      }
      this.head = null;
      this.status = head.status;
      this.fields = head.fields;
      const hint = /timeout=(\d+)/i.exec(this.field('keep-alive') ?? '');
      if (hint) this.idleMs = Math.max(0, Number(hint[1]) * 1000 - 1000);
      this.phase = Phase.Body;
      // Until a sink is attached, body bytes wait here and the socket is paused.
      this.early = [];
      if (this.framing === 'none') this.earlyEnd = true;
      else if (buf.length > head.size) this.early.push(buf.subarray(head.size));
      if (this.framing !== 'none') this.conn.socket.pause();
      const resolve = this.resolve!;
      this.resolve = this.reject = null;
      resolve(this);
      return;
    }
    if (this.phase !== Phase.Body) return;
    if (this.early) {
      this.early.push(bytes);
      return;
    }
    this.onBody(bytes);
  }

  private onBody(bytes: Buffer): void {
    if (this.phase !== Phase.Body) return;
    switch (this.framing) {
      case 'length': {
        const take = Math.min(this.remaining, bytes.length);
        this.remaining -= take;
        if (take < bytes.length) this.reusable = false;
        this.plainBytes += take;
        if (take > 0) this.push(take === bytes.length ? bytes : bytes.subarray(0, take));
        if (this.remaining === 0) this.finish();
        return;
      }
      case 'chunked': {
        let used: number;
        try {
          used = this.scanner!.feed(bytes);
        } catch {
          return this.breakOff();
        }
        if (this.scanner!.done) {
          if (used < bytes.length) this.reusable = false;
          this.finish();
        }
        return;
      }
      case 'close':
        this.plainBytes += bytes.length;
        this.push(bytes);
        return;
      case 'none':
        this.reusable = false;
        return;
    }
  }

  private push(bytes: Buffer): void {
    if (!this.sink!.write(bytes) && this.phase === Phase.Body) {
      this.paused = true;
      this.conn.socket.pause();
    }
  }

  /** The body is complete: the sink ends, the connection goes back to the pool when it may. */
  private finish(): void {
    if (this.phase === Phase.Done) return;
    if (this.early) {
      this.earlyEnd = true;
      return;
    }
    this.phase = Phase.Done;
    const { conn } = this;
    conn.exchange = null;
    if (this.reusable && this.requestSent && !conn.socket.destroyed) {
      conn.socket.resume();
      conn.pool.release(conn, this.idleMs);
    } else conn.socket.destroy();
    this.sink!.end();
  }

  onError(err: Error): void {
    const code = (err as NodeJS.ErrnoException).code;
    this.fail(new UpstreamFailure('unreachable', `the upstream ${this.request.url.host} could not be reached (${code ?? err.message})`));
  }

  onTimeout(): void {
    this.fail(new UpstreamFailure('timeout', `the upstream sent nothing for ${this.request.timeoutMs} ms`));
  }

  onClose(): void {
    if (this.phase === Phase.Body && this.framing === 'close' && !this.failed) return this.finish();
    // A reused connection the upstream had closed: same answer as a fresh one that failed.
    this.fail(new UpstreamFailure('unreachable', `the upstream ${this.request.url.host} closed the connection`));
  }

  private breakOff(): void {
    this.fail(new UpstreamFailure('unreachable', 'the upstream broke off its answer'));
  }

  /** Ends the exchange with `err`: the caller's promise rejects, or the body's sink hears it broke. */
  private fail(err: UpstreamFailure): void {
    if (this.phase === Phase.Done || this.failed) return;
    this.failed = true;
    const wasBody = this.phase === Phase.Body;
    this.phase = Phase.Done;
    this.conn.exchange = null;
    this.conn.socket.destroy();
    if (!wasBody) {
      const reject = this.reject;
      this.resolve = this.reject = null;
      reject?.(err);
      return;
    }
    // Without a sink yet, `relay` tells the one that comes.
    this.sink?.broken();
  }
}
