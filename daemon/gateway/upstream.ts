/**
 * The gateway's client for upstreams, on undici: keep-alive connections per origin (plain or
 * TLS), the request body sent whole or streamed, and the answer's body handed on, decoded, as
 * it is read, with back-pressure. undici is loaded on the first request, so a daemon whose
 * gateway forwards nothing does not carry it.
 */
import { PassThrough, type Writable } from 'node:stream';
import type { Agent, Dispatcher } from 'undici';

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

/** How long an idle connection is kept when the upstream does not say (Keep-Alive: timeout=N). */
const DEFAULT_IDLE_MS = 30_000;
/** Largest response head read from an upstream. */
const MAX_RESPONSE_HEAD = 64 * 1024;

/** Where a request body goes when it is streamed; `end()` finishes it. */
export type RequestBodySink = Writable;

/** How an answer's body comes: with a length, with none (HEAD, 204, 304), or streamed until its end. */
export type BodyFraming = 'length' | 'none' | 'stream';

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

type Undici = typeof import('undici');
let undiciModule: Promise<Undici> | null = null;

/** Keep-alive connections to upstream origins, shared by every exchange of a gateway. */
export class UpstreamPool {
  private agent: Agent | null = null;
  private loading: Promise<Agent> | null = null;
  private closed = false;

  /** `ca`: certificates to trust instead of the system's (tests with a local TLS upstream). */
  constructor(private readonly options: { ca?: string | Buffer } = {}) {}

  /** Sends `request`; resolves with the answer's head, rejects with an `UpstreamFailure`. */
  send(request: UpstreamRequest): Promise<UpstreamResponse> {
    if (this.closed) return Promise.reject(new UpstreamFailure('unreachable', 'the gateway is closing'));
    if (this.agent) return start(this.agent, request);
    return this.load().then((agent) => start(agent, request));
  }

  /** Closes every connection, idle or busy. */
  close(): void {
    this.closed = true;
    void this.agent?.destroy().catch(() => undefined);
    this.agent = null;
  }

  private load(): Promise<Agent> {
    this.loading ??= (undiciModule ??= import('undici')).then(({ Agent }) => {
      if (this.closed) throw new UpstreamFailure('unreachable', 'the gateway is closing');
      this.agent = new Agent({
        keepAliveTimeout: DEFAULT_IDLE_MS,
        keepAliveMaxTimeout: 10 * 60_000,
        keepAliveTimeoutThreshold: 1_000,
        maxHeaderSize: MAX_RESPONSE_HEAD,
        // Timeouts are the gateway's own, per request.
        headersTimeout: 0,
        bodyTimeout: 0,
        connect: { ALPNProtocols: ['http/1.1'], ...(this.options.ca ? { ca: this.options.ca } : {}) },
      });
      return this.agent;
    });
    return this.loading;
  }
}

function start(agent: Agent, request: UpstreamRequest): Promise<UpstreamResponse> {
  return new Promise((resolve, reject) => new UpstreamResponse(agent, request, resolve, reject));
}

const enum Phase {
  Head,
  Body,
  Done,
}

/**
 * One request and its answer, as an undici dispatch handler. Resolves the caller's promise
 * once the answer's head is read; the body is then taken with `relay`, `readAll` or `discard`.
 */
export class UpstreamResponse implements Dispatcher.DispatchHandler {
  status = 0;
  /** The answer's header fields, names lower-case, `[name, value, ...]`. */
  fields: string[] = [];
  framing: BodyFraming = 'none';
  private phase = Phase.Head;
  private sink: BodySink | null = null;
  /** Body bytes read before a sink was attached. */
  private early: Buffer[] | null = null;
  private earlyEnd = false;
  private failed = false;
  private paused = false;
  private abortFn: ((err: Error) => void) | null = null;
  private resumeFn: (() => void) | null = null;
  private received = 0;

  constructor(
    agent: Agent,
    private readonly request: UpstreamRequest,
    private resolve: ((response: UpstreamResponse) => void) | null,
    private reject: ((err: UpstreamFailure) => void) | null,
  ) {
    request.cancel.onCancel(() => this.fail(new UpstreamFailure('aborted', 'the client went away')));
    if (request.cancel.cancelled) return;
    const { url, method, fields, body, timeoutMs } = request;
    let sent: Buffer | PassThrough | null = null;
    let headers = fields;
    if (Buffer.isBuffer(body)) sent = body;
    else if (body !== null) {
      const pipe = new PassThrough();
      if (body.length !== null) headers = [...fields, 'content-length', String(body.length)];
      body.write(pipe);
      sent = pipe;
    }
    agent.dispatch(
      {
        origin: url.origin,
        path: url.pathname + url.search,
        method: method as Dispatcher.HttpMethod,
        headers,
        body: sent,
        headersTimeout: timeoutMs,
        bodyTimeout: timeoutMs,
      },
      this,
    );
  }

  /** Body bytes read so far. */
  get bodyBytes(): number {
    return this.received;
  }

  /** The value of the answer's field `name` (lower-case). */
  field(name: string): string | undefined {
    for (let i = 0; i < this.fields.length; i += 2) if (this.fields[i] === name) return this.fields[i + 1];
    return undefined;
  }

  /**
   * Every value of the answer's field `name` (lower-case), joined with `, ` as RFC 9110 §5.3
   * combines repeated list fields; for fields where the second line matters (Content-Encoding).
   */
  fieldList(name: string): string | undefined {
    let joined: string | undefined;
    for (let i = 0; i < this.fields.length; i += 2) {
      if (this.fields[i] === name) joined = joined === undefined ? this.fields[i + 1] : `${joined}, ${this.fields[i + 1]}`;
    }
    return joined;
  }

  /** Hands the body, decoded, to `sink` as it is read. */
  relay(sink: BodySink): void {
    this.sink = sink;
    if (this.failed) return sink.broken();
    this.paused = false;
    const early = this.early;
    this.early = null;
    if (early) for (const bytes of early) this.push(bytes);
    if (this.earlyEnd) return this.finish();
    if (this.phase === Phase.Body && !this.paused) this.resumeFn?.();
  }

  /** Asks for more after a sink's `write` returned false. */
  resume(): void {
    this.paused = false;
    if (this.phase === Phase.Body) this.resumeFn?.();
  }

  /** Reads the body whole when it is at most `limit` bytes; null (exchange cut) when larger or broken. */
  readAll(limit: number): Promise<Buffer | null> {
    return new Promise((done) => {
      const chunks: Buffer[] = [];
      let size = 0;
      this.relay({
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
      });
    });
  }

  /** Drops the answer and its connection. */
  discard(): void {
    this.fail(new UpstreamFailure('aborted', 'answer discarded'));
  }

  // undici's handler interface.

  onConnect(abort: (err?: Error) => void): void {
    this.abortFn = abort;
    if (this.phase === Phase.Done) abort(new UpstreamFailure('aborted', 'the client went away'));
  }

  onHeaders(statusCode: number, rawHeaders: Buffer[], resume: () => void): boolean {
    if (this.phase !== Phase.Head) return false;
    // An interim answer (103 Early Hints) is not passed on.
    if (statusCode < 200) return true;
    this.status = statusCode;
    const fields: string[] = [];
    let length = false;
    for (let i = 0; i < rawHeaders.length; i += 2) {
      const name = rawHeaders[i]!.toString('latin1').toLowerCase();
      if (name === 'content-length') length = true;
      fields.push(name, rawHeaders[i + 1]!.toString('latin1'));
    }
    this.fields = fields;
    const method = this.request.method;
    this.framing = method === 'HEAD' || statusCode === 204 || statusCode === 304 ? 'none' : length ? 'length' : 'stream';
    this.resumeFn = resume;
    this.phase = Phase.Body;
    // Until a sink is attached, body bytes wait here and the upstream is paused.
    this.early = [];
    this.paused = true;
    const done = this.resolve!;
    this.resolve = this.reject = null;
    done(this);
    if (this.sink) this.paused = false;
    return !this.paused;
  }

  onData(chunk: Buffer): boolean {
    if (this.phase !== Phase.Body) return false;
    if (this.early) {
      this.early.push(chunk);
      return false;
    }
    this.push(chunk);
    return !this.paused;
  }

  onComplete(): void {
    if (this.phase !== Phase.Body) return;
    if (this.early) {
      this.earlyEnd = true;
      return;
    }
    this.finish();
  }

  onError(err: Error): void {
    if (err instanceof UpstreamFailure) return this.fail(err);
    const code = (err as NodeJS.ErrnoException).code;
    const host = this.request.url.host;
    if (code === 'UND_ERR_HEADERS_TIMEOUT' || code === 'UND_ERR_BODY_TIMEOUT') {
      return this.fail(new UpstreamFailure('timeout', `the upstream sent nothing for ${this.request.timeoutMs} ms`));
    }
    if (code === 'HPE_INVALID_CONSTANT' || (code?.startsWith('HPE_') ?? false) || code === 'UND_ERR_RES_CONTENT_LENGTH_MISMATCH' || code === 'UND_ERR_HEADERS_OVERFLOW') {
      return this.fail(new UpstreamFailure('unreachable', `the upstream ${host} sent a response the gateway cannot read (${err.message})`));
    }
    const cause = (err as { cause?: NodeJS.ErrnoException }).cause;
    this.fail(new UpstreamFailure('unreachable', `the upstream ${host} could not be reached (${cause?.code ?? code ?? err.message})`));
  }

  private push(bytes: Buffer): void {
    this.received += bytes.length;
    if (!this.sink!.write(bytes) && this.phase === Phase.Body) this.paused = true;
  }

  private finish(): void {
    if (this.phase === Phase.Done) return;
    this.phase = Phase.Done;
    this.sink!.end();
  }

  /** Ends the exchange with `err`: the caller's promise rejects, or the body's sink hears it broke. */
  private fail(err: UpstreamFailure): void {
    if (this.phase === Phase.Done || this.failed) return;
    this.failed = true;
    const wasBody = this.phase === Phase.Body;
    this.phase = Phase.Done;
    this.abortFn?.(err);
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
