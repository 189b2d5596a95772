/**
 * The local OpenAI-compatible gateway: HTTP on a Unix socket beside the token socket (always
 * on) and, when enabled, on loopback TCP behind a gateway key. Requests are routed to a
 * profile (routing.ts), forwarded with its credential (forward.ts), and logged one line each.
 */
import { chmod, unlink } from 'node:fs/promises';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { Socket } from 'node:net';
import { dirname } from 'node:path';
import { pipeline } from 'node:stream/promises';
import { Transform } from 'node:stream';
import { z } from 'zod';
import { checkSocketPathLength } from '../../shared/config.js';
import { QwenConfigError, QwenError } from '../../shared/errors.js';
import type { GatewayEnvResult, GatewayStatus } from '../../shared/gateway-protocol.js';
import { prepareSocketDirectory, removeStaleSocket } from '../socket-file.js';
import type { Logger } from '../logger.js';
import { GatewayErrors, rawErrorResponse, sendError, type GatewayErrorCode } from './errors.js';
import { clientResponseFields, looksLikeExpiredToken, upstreamRequestFields } from './forward.js';
import { gatewayKeyPath, keyDigest, keyMatches, loadOrCreateGatewayKey } from './key.js';
import type { GatewayEnvConfig } from './limits.js';
import { credentialSecrets, ERROR_BODY_CAP, redactErrorBody, redactFieldValues, type RedactedBody } from './redact.js';
import { ProfileNeedsLoginError, type GatewayProfile, type GatewayProfiles } from './profiles.js';
import { profileFromModel, routeRequest, upstreamUrl, type ForwardRoute } from './routing.js';
import { DEFAULT_GATEWAY_PORT, readGatewaySettings, updateGatewaySettings } from './settings.js';
import { Cancellation, UpstreamFailure, UpstreamPool, type BodySink, type RequestBodySink, type UpstreamResponse } from './upstream.js';

/** The only address the TCP listener ever binds. */
export const LOOPBACK = '127.0.0.1';

/** How long `GET /v1/models` waits for one profile's upstream list. */
const MODELS_TIMEOUT_MS = 10_000;
const MODELS_BODY_LIMIT = 4 * 1024 * 1024;

type Listener = 'unix' | 'tcp';

export interface GatewayOptions {
  profiles: GatewayProfiles;
  env: GatewayEnvConfig;
  /** The daemon's state directory, where the gateway key lives. */
  stateDir: string;
  logger: Logger;
  platform?: NodeJS.Platform;
}

/** What one request did, for the access log and the counters. */
interface Exchange {
  method: string;
  path: string;
  listener: Listener;
  profile: string | null;
  started: number;
  bytesIn: number;
  bytesOut: number;
  /** The answer being relayed, whose body bytes count as bytes out. */
  relayed: { readonly bodyBytes: number } | null;
  /** Cuts the upstream exchange when the client goes away first. */
  cancel: Cancellation | null;
  error: string | null;
  stream: boolean;
}

/** The exchange a response belongs to, for the parser's errors on its connection. */
const EXCHANGE = Symbol('gateway exchange');
type TaggedResponse = ServerResponse & { [EXCHANGE]?: Exchange };

/**
 * Parser errors that mean the client went away, not that it sent something malformed: the
 * connection ended in the middle of a request (a process exiting mid-upload), or was reset.
 */
const CLIENT_GONE = new Set(['ECONNRESET', 'EPIPE', 'HPE_INVALID_EOF_STATE']);

const ModelListSchema = z.object({ data: z.array(z.object({ id: z.string().min(1).max(200) }).passthrough()).max(10_000) }).passthrough();

/** The gateway: its listeners, counters and settings. */
export class Gateway {
  private readonly unixServer: Server;
  private tcpServer: Server | null = null;
  /**
   * Every TCP server not yet closed, the listening one and earlier ones whose requests are
   * still finishing, with the promise of its end: none is ever out of reach of `close()`.
   */
  private readonly tcpServers = new Map<Server, Promise<void>>();
  /** Listener changes (start, enable, disable, close) run one at a time, in order. */
  private tcpTurn: Promise<unknown> = Promise.resolve();
  private tcpAddress: string | null = null;
  private tcpError: string | null = null;
  private tcpEnabled = false;
  private configuredPort: number | null = null;
  private key: string | null = null;
  private keyHash: Buffer | null = null;
  private readonly upstreams = new UpstreamPool();
  private served = 0;
  private active = 0;
  private streams = 0;
  private readonly errors: Record<string, number> = {};
  private closed = false;
  /**
   * The access log: the daemon's logger without its redaction pass, which cost more than the
   * rest of the line. Safe because the line is built here from fixed fields (method, path,
   * status, counts, error codes) and never holds a header, query, body, token or key.
   */
  private readonly accessLog: Logger;
  private readonly known = (name: string): boolean => this.options.profiles.get(name) !== undefined;

  constructor(private readonly options: GatewayOptions) {
    const { limits } = options.env;
    if (limits.replayBytes > limits.maxBodyBytes) options.env = { ...options.env, limits: { ...limits, replayBytes: limits.maxBodyBytes } };
    this.accessLog = options.logger.child({}, { redact: [] });
    this.unixServer = this.createHttpServer('unix');
  }

  get socketPath(): string {
    return this.options.env.socketPath;
  }

  /** Listens on the Unix socket (0600, in a private directory), then on TCP when the config says so. */
  async start(): Promise<void> {
    const { socketPath } = this.options.env;
    checkSocketPathLength(socketPath, this.options.platform ?? process.platform);
    await prepareSocketDirectory(dirname(socketPath));
    await removeStaleSocket(socketPath);
    await listen(this.unixServer, { path: socketPath });
    await chmod(socketPath, 0o600);
    this.unixServer.on('error', (err) => this.options.logger.error({ err: err.message }, 'gateway socket error'));
    this.options.logger.info({ socket: socketPath }, 'gateway listening');
    let settings;
    try {
      settings = await readGatewaySettings(this.options.env.configPath);
    } catch (err) {
      this.options.logger.error({ err: (err as Error).message }, 'gateway settings unreadable; loopback TCP stays off');
      return;
    }
    const tcp = settings.tcp;
    if (tcp?.enabled) {
      await this.tcpChange(async () => {
        this.tcpEnabled = true;
        this.configuredPort = tcp.port;
        try {
          await this.openTcp(tcp.port);
        } catch (err) {
          this.tcpError = (err as Error).message;
          this.options.logger.error({ err: this.tcpError }, 'gateway could not listen on loopback TCP');
        }
      });
    }
  }

  /** Turns on loopback TCP (stored in the config, applied now); makes the gateway key when there is none. */
  enableTcp(port: number = DEFAULT_GATEWAY_PORT): Promise<GatewayStatus> {
    return this.tcpChange(async () => {
      if (this.tcpServer && this.configuredPort === port) {
        await this.saveTcp(true, port);
        this.tcpEnabled = true;
        return this.status();
      }
      const previous = this.tcpServer ? this.configuredPort : null;
      // The old listener stops at once (its port is free again); its requests finish on their own.
      void this.closeTcp();
      try {
        await this.openTcp(port);
        await this.saveTcp(true, port);
      } catch (err) {
        // Nothing changes when the new port cannot be had or the setting cannot be stored.
        void this.closeTcp();
        if (previous !== null) await this.openTcp(previous).catch((reopen: Error) => (this.tcpError = reopen.message));
        throw err;
      }
      this.tcpEnabled = true;
      this.tcpError = null;
      this.configuredPort = port;
      return this.status();
    });
  }

  /** Turns off loopback TCP (stored in the config); resolves once the requests in flight have finished. */
  async disableTcp(): Promise<GatewayStatus> {
    const { finished } = await this.tcpChange(async () => {
      await this.saveTcp(false, this.configuredPort ?? DEFAULT_GATEWAY_PORT);
      this.tcpEnabled = false;
      this.tcpError = null;
      // Waited for outside the turn, so a long stream does not hold up the next enable.
      return { finished: this.closeTcp() };
    });
    await finished;
    return this.status();
  }

  /** The base URL and key for `gateway env`; throws when loopback TCP is off. */
  async envInfo(): Promise<GatewayEnvResult> {
    if (!this.tcpAddress) {
      throw new QwenConfigError(
        this.tcpEnabled
          ? `the gateway's loopback listener is not up (${this.tcpError ?? 'unknown error'}); run \`qwen-token gateway enable\` again`
          : 'the gateway listens on loopback TCP only when enabled: run `qwen-token gateway enable`',
      );
    }
    const key = this.key ?? (await loadOrCreateGatewayKey(gatewayKeyPath(this.options.stateDir)));
    return { base_url: `http://${this.tcpAddress}/v1`, api_key: key };
  }

  /** Counters and addresses; never the key. */
  status(): GatewayStatus {
    return {
      socket_path: this.options.env.socketPath,
      tcp: { enabled: this.tcpEnabled, address: this.tcpAddress, configured_port: this.configuredPort, error: this.tcpError },
      default_profile: this.options.profiles.defaultProfile(),
      profiles: this.options.profiles.names(),
      requests_served: this.served,
      active_requests: this.active,
      active_streams: this.streams,
      errors: { ...this.errors },
      config_path: this.options.env.configPath,
    };
  }

  /** Stops both listeners and cuts open exchanges; removes the socket file. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    // After any change in progress, so a listener it opens is closed too.
    await this.tcpChange(() => {
      void this.closeTcp();
      for (const server of this.tcpServers.keys()) server.closeAllConnections();
      return Promise.all(this.tcpServers.values());
    });
    await closeServer(this.unixServer, true);
    await unlink(this.options.env.socketPath).catch(() => undefined);
    this.upstreams.close();
  }

  private async saveTcp(enabled: boolean, port: number): Promise<void> {
    await updateGatewaySettings(this.options.env.configPath, (current) => ({ ...current, tcp: { enabled, port } }));
  }

  /** Runs `change` after every listener change asked for before it. */
  private tcpChange<T>(change: () => Promise<T>): Promise<T> {
    const turn = this.tcpTurn.then(change, change);
    this.tcpTurn = turn.catch(() => undefined);
    return turn;
  }

  /** Listens on loopback TCP; only inside `tcpChange`, with no TCP listener open. */
  private async openTcp(port: number): Promise<void> {
    if (this.closed) throw new QwenConfigError('the gateway is shutting down');
    // A listener left open here could never be closed by `disable`: stop it first.
    if (this.tcpServer) void this.closeTcp();
    this.key = await loadOrCreateGatewayKey(gatewayKeyPath(this.options.stateDir));
    this.keyHash = keyDigest(this.key);
    const server = this.createHttpServer('tcp');
    try {
      await listen(server, { host: LOOPBACK, port, exclusive: true });
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      throw new QwenConfigError(
        code === 'EADDRINUSE'
          ? `port ${port} on ${LOOPBACK} is in use; choose another with \`qwen-token gateway enable --port N\``
          : `cannot listen on ${LOOPBACK}:${port}: ${code ?? (err as Error).message}`,
      );
    }
    server.on('error', (err) => this.options.logger.error({ err: err.message }, 'gateway TCP error'));
    const address = server.address();
    const actual = address && typeof address === 'object' ? address.port : port;
    this.tcpServers.set(server, new Promise((resolve) => server.once('close', () => resolve())));
    void this.tcpServers.get(server)!.then(() => this.tcpServers.delete(server));
    this.tcpServer = server;
    this.tcpAddress = `${LOOPBACK}:${actual}`;
    this.options.logger.info({ address: this.tcpAddress }, 'gateway listening on loopback TCP');
  }

  /**
   * Stops the TCP listener at once (its port is free when this returns); resolves when its
   * open connections have ended.
   */
  private closeTcp(): Promise<void> {
    const server = this.tcpServer;
    this.tcpServer = null;
    this.tcpAddress = null;
    if (!server) return Promise.resolve();
    return closeServer(server, false);
  }

  private createHttpServer(listener: Listener): Server {
    const { limits } = this.options.env;
    const server = createServer(
      {
        maxHeaderSize: limits.maxHeaderBytes,
        headersTimeout: limits.headersTimeoutMs,
        requestTimeout: limits.requestTimeoutMs,
        // How often those two are checked: often enough that a slow sender is cut near its deadline.
        connectionsCheckingInterval: Math.max(50, Math.min(1_000, Math.floor(limits.headersTimeoutMs / 4))),
        keepAliveTimeout: 5_000,
        noDelay: true,
        // Duplicate headers are rejected by the parser already (two Content-Lengths, CL + TE).
        requireHostHeader: false,
      },
      (req, res) => {
        this.handle(req, res, listener).catch((err: unknown) => {
          this.options.logger.error({ err: (err as Error).message }, 'gateway request failed unexpectedly');
          sendError(res, 'internal_error', 'the gateway failed to handle this request', true);
        });
      },
    );
    server.on('clientError', (err: NodeJS.ErrnoException, socket: Socket) => this.onClientError(err, socket, listener));
    // Node hands CONNECT to this event instead of the request handler; refused like TRACE.
    server.on('connect', (_req: IncomingMessage, socket: Socket) => this.refuseConnect(socket, listener));
    // Idle keep-alive connections are cheap but not free: a bound on them too, with room for pools.
    server.maxConnections = limits.maxConcurrent + 256;
    return server;
  }

  /**
   * A request the HTTP parser refused, or a client too slow: answered 4xx on the raw socket,
   * nothing forwarded. When an answer is already going out on the connection (an SSE stream
   * with a bad request pipelined behind it, an upload that timed out while its answer flows),
   * bytes written now would land inside that answer: the connection is cut instead.
   */
  private onClientError(err: NodeJS.ErrnoException, socket: Socket, listener: Listener): void {
    if (CLIENT_GONE.has(err.code ?? '') || !socket.writable) {
      // The exchange in flight, if any, is counted as client_aborted when its response closes.
      socket.destroy();
      return;
    }
    let code: GatewayErrorCode = 'bad_request';
    let message = `malformed HTTP request (${err.code ?? 'parse error'})`;
    if (err.code === 'HPE_HEADER_OVERFLOW') {
      code = 'headers_too_large';
      message = `the request head is larger than ${this.options.env.limits.maxHeaderBytes} bytes`;
    } else if (err.code === 'ERR_HTTP_REQUEST_TIMEOUT') {
      code = 'request_timeout';
      message = 'the request was not received in time';
    } else if (err.code === 'HPE_INVALID_TRANSFER_ENCODING' || err.code === 'HPE_UNEXPECTED_CONTENT_LENGTH') {
      message = `ambiguous request framing (${err.code === 'HPE_INVALID_TRANSFER_ENCODING' ? 'Content-Length with Transfer-Encoding' : 'more than one Content-Length'})`;
    } else if (err.code === 'HPE_INVALID_METHOD' && (err as { rawPacket?: Buffer }).rawPacket?.subarray(0, 6).toString('latin1') === 'TRACK ') {
      // Node's parser does not know IIS's TRACE; answered as TRACE is.
      code = 'method_not_allowed';
      message = 'the gateway does not forward TRACK requests';
    }
    this.count(code);
    const inFlight = (socket as Socket & { _httpMessage?: TaggedResponse | null })._httpMessage;
    const ex = inFlight?.[EXCHANGE];
    // Its access log line names why it ended, and it is not counted a second time as client_aborted.
    if (ex && ex.error === null) ex.error = code;
    if (inFlight?.headersSent) {
      this.options.logger.info({ listener, error: code }, 'gateway cut a connection: a malformed request arrived while an answer was being sent');
      socket.destroy();
      return;
    }
    this.options.logger.info({ listener, status: GatewayErrors[code].status, error: code }, 'gateway refused a malformed request');
    socket.end(rawErrorResponse(code, message));
    socket.destroySoon?.();
  }

  /** CONNECT asks for a tunnel: answered 405 on the raw socket, nothing forwarded. */
  private refuseConnect(socket: Socket, listener: Listener): void {
    this.count('method_not_allowed');
    this.options.logger.info({ listener, method: 'CONNECT', status: 405, error: 'method_not_allowed' }, 'gateway refused a request');
    socket.end(rawErrorResponse('method_not_allowed', 'the gateway does not forward CONNECT requests'));
    socket.destroySoon?.();
  }

  private count(kind: string): void {
    this.errors[kind] = (this.errors[kind] ?? 0) + 1;
  }

  private async handle(req: IncomingMessage, res: ServerResponse, listener: Listener): Promise<void> {
    const target = req.url ?? '/';
    const q = target.indexOf('?');
    const ex: Exchange = {
      method: req.method ?? '',
      path: (q === -1 ? target : target.slice(0, q)).slice(0, 200),
      listener,
      profile: null,
      started: performance.now(),
      bytesIn: 0,
      bytesOut: 0,
      relayed: null,
      cancel: null,
      error: null,
      stream: false,
    };
    this.active += 1;
    (res as TaggedResponse)[EXCHANGE] = ex;
    res.once('close', () => this.finish(ex, res));
    const fail = (code: GatewayErrorCode, message: string): void => {
      ex.error = code;
      this.count(code);
      // The body was not read: close, so it cannot be taken for a next request.
      sendError(res, code, message, !req.complete);
    };

    if (this.active > this.options.env.limits.maxConcurrent) {
      return fail('gateway_busy', `the gateway is serving its limit of ${this.options.env.limits.maxConcurrent} requests; try again`);
    }
    if (listener === 'tcp' && !this.authorized(req)) {
      return fail('unauthorized', 'a gateway key is required: send `Authorization: Bearer <key>` (see `qwen-token gateway env`)');
    }
    const { profiles } = this.options;
    const route = routeRequest(ex.method, target, profiles.defaultProfile(), this.known);
    if (route.kind === 'error') return fail(route.code, route.message);
    if (route.kind === 'models') {
      ex.profile = route.profile ?? null;
      // A body means nothing here, but it is read (and bounded) so the connection can serve the next request.
      const { maxBodyBytes } = this.options.env.limits;
      const read = Number(req.headers['content-length'] ?? 0) > maxBodyBytes ? { whole: false as const } : await readUpTo(req, maxBodyBytes);
      if (read === null) return; // counted as client_aborted when the response closes
      if (!read.whole) return fail('body_too_large', `the request body is larger than ${maxBodyBytes} bytes`);
      ex.bytesIn = read.body.length;
      return this.answerModels(res, route.profile);
    }
    await this.forward(req, res, route, ex, fail);
  }

  private authorized(req: IncomingMessage): boolean {
    const key = this.keyHash;
    if (!key) return false;
    const auth = req.headers.authorization;
    const bearer = auth && /^Bearer\s+(\S+)\s*$/i.exec(auth)?.[1];
    const presented = bearer || (typeof req.headers['x-api-key'] === 'string' ? req.headers['x-api-key'].trim() : '');
    return presented !== '' && keyMatches(presented, key);
  }

  private async forward(
    req: IncomingMessage,
    res: ServerResponse,
    route: ForwardRoute,
    ex: Exchange,
    fail: (code: GatewayErrorCode, message: string) => void,
  ): Promise<void> {
    const { limits } = this.options.env;
    const { profiles } = this.options;
    const declared = req.headers['content-length'] === undefined ? null : Number(req.headers['content-length']);
    const hasBody = declared !== null || req.headers['transfer-encoding'] !== undefined;
    if (declared !== null && declared > limits.maxBodyBytes) {
      return fail('body_too_large', `the request body is larger than ${limits.maxBodyBytes} bytes`);
    }

    // Bodies up to the replay size are read whole: they can be looked at and sent twice.
    let body: Buffer | null = Buffer.alloc(0);
    let prefix: Buffer[] = [];
    if (hasBody) {
      const read = declared !== null && declared > limits.replayBytes ? { whole: false as const, chunks: [] } : await readUpTo(req, limits.replayBytes);
      if (read === null) return; // the client went away while sending
      if (read.whole) body = read.body;
      else {
        body = null;
        prefix = read.chunks;
      }
    }

    let profileName = route.profile;
    if (body && body.length > 0 && isJson(req.headers['content-type'])) {
      let parsed: unknown;
      try {
        parsed = JSON.parse(body.toString('utf8'));
      } catch (err) {
        return fail('invalid_json', `the request body is not valid JSON: ${(err as Error).message.slice(0, 200)}`);
      }
      const model = parsed && typeof parsed === 'object' && !Array.isArray(parsed) ? (parsed as { model?: unknown }).model : undefined;
      if (typeof model === 'string') {
        const chosen = profileFromModel(model, this.known);
        if (chosen) {
          if (route.explicit && chosen.profile !== route.profile) {
            return fail('profile_conflict', `the path names profile "${route.profile}" but the model names profile "${chosen.profile}"`);
          }
          profileName = chosen.profile;
          (parsed as { model: string }).model = chosen.model;
          body = Buffer.from(JSON.stringify(parsed), 'utf8');
        }
      }
    }
    ex.profile = profileName;
    const profile = profiles.get(profileName);
    if (!profile) return fail('unknown_profile', `no profile named "${profileName}"`);

    const cancel = new Cancellation();
    ex.cancel = cancel;

    const replayable = body !== null;
    let retried = false;
    /** The credential to retry with, after the upstream refused the first one. */
    let renewed: Record<string, string> | null = null;
    let credential: Record<string, string> | undefined;
    for (;;) {
      let url: URL;
      let fields: string[];
      try {
        credential = renewed ?? (await profile.credentialHeaders());
        url = upstreamUrl(await profile.baseUrl(), route.rest);
        fields = upstreamRequestFields(req.rawHeaders, credential);
      } catch (err) {
        return this.credentialFailure(err, profile, fail);
      }
      if (cancel.cancelled) return;
      let upstream: UpstreamResponse;
      try {
        upstream = await this.upstreams.send({
          url,
          method: ex.method,
          fields,
          body: body !== null ? (hasBody ? body : null) : { length: declared, write: (sink: RequestBodySink) => this.streamBody(req, prefix, sink, ex) },
          timeoutMs: limits.upstreamTimeoutMs,
          cancel,
        });
      } catch (err) {
        if (err instanceof UpstreamFailure) {
          if (err.kind === 'aborted') return;
          if (ex.error === 'body_too_large') return fail('body_too_large', `the request body is larger than ${limits.maxBodyBytes} bytes`);
          return fail(err.kind === 'timeout' ? 'upstream_timeout' : 'upstream_unreachable', err.message);
        }
        throw err;
      }
      if (body === null) ex.bytesIn = ex.bytesIn || declared || 0;
      else ex.bytesIn = body.length;

      const status = upstream.status;
      const mayRetry = profile.retryOnAuthFailure && profile.renewedCredentialHeaders !== undefined && replayable && !retried;
      if (mayRetry && (status === 401 || status === 403)) {
        // A refusal a refresh cannot cure (one ended moments ago) goes to the client as it came.
        const next = await this.renewal(profile, credential, upstream, fail);
        if (next === undefined) return;
        if (next) {
          upstream.discard();
          retried = true;
          renewed = next;
          this.options.logger.info({ profile: profile.name, status }, 'gateway: upstream rejected the credential; retrying once with a renewed one');
          continue;
        }
      }
      const secrets = credentialSecrets(credential);
      if (status >= 400 && upstream.framing !== 'none') {
        // Error bodies are read (up to a cap) before they go on: they may quote the credential.
        const read = await readCapped(upstream, ERROR_BODY_CAP);
        if (read === null) {
          if (cancel.cancelled) return;
          return fail('upstream_unreachable', `the upstream ${url.host} broke off its ${status} answer`);
        }
        // Every Content-Encoding line counts: a second one would otherwise leave the body encoded, unsearched.
        const redacted = redactErrorBody(read.bytes, upstream.fieldList('content-encoding'), read.cut, secrets);
        if (mayRetry && status !== 401 && status !== 403 && status < 500 && looksLikeExpiredToken(redacted.body.toString('latin1'))) {
          const next = await this.renewal(profile, credential, null, fail);
          if (next === undefined) return;
          if (next) {
            retried = true;
            renewed = next;
            this.options.logger.info({ profile: profile.name, status }, 'gateway: upstream says the token expired; retrying once with a renewed one');
            continue;
          }
        }
        this.relayError(upstream, res, ex, redacted, secrets);
        return;
      }
      this.relay(upstream, res, ex, secrets);
      return;
    }
  }

  /**
   * The credential to retry with after the upstream refused `refused`: new headers, null when a
   * refresh cannot help (the refusal stands), undefined when the profile needs a login or has
   * no credential (answered here; `upstream`, when still open, is dropped).
   */
  private async renewal(
    profile: GatewayProfile,
    refused: Record<string, string>,
    upstream: UpstreamResponse | null,
    fail: (code: GatewayErrorCode, message: string) => void,
  ): Promise<Record<string, string> | null | undefined> {
    try {
      return await profile.renewedCredentialHeaders!(refused);
    } catch (err) {
      upstream?.discard();
      this.credentialFailure(err, profile, fail);
      return undefined;
    }
  }

  /** Streams a body too large to keep: what was read so far, then the rest, counted against the limit. */
  private streamBody(req: IncomingMessage, prefix: Buffer[], dest: RequestBodySink, ex: Exchange): void {
    const max = this.options.env.limits.maxBodyBytes;
    let seen = 0;
    const counter = new Transform({
      transform: (chunk: Buffer, _enc, done) => {
        seen += chunk.length;
        ex.bytesIn = seen;
        if (seen > max) {
          ex.error = 'body_too_large';
          done(new UpstreamFailure('unreachable', 'request body too large'));
          return;
        }
        done(null, chunk);
      },
    });
    for (const chunk of prefix) counter.write(chunk);
    pipeline(req, counter, dest).catch((err: Error) => dest.destroy(err));
  }

  /**
   * Sends the upstream's answer on: status as it is, headers with the credential replaced in
   * their values (a redirect's `Location` or a 401's `WWW-Authenticate` may quote it, whatever
   * the status), the body streamed as it comes. The exchange ends when the response closes
   * (`finish`), which also cuts the upstream when the client went away first.
   */
  private relay(upstream: UpstreamResponse, res: ServerResponse, ex: Exchange, secrets: readonly string[]): void {
    if (!this.answering(upstream, res)) return;
    ex.stream = (upstream.field('content-type') ?? '').startsWith('text/event-stream');
    if (ex.stream) this.streams += 1;
    // The length goes on with a body relayed as it is framed, and with no body (HEAD, 304),
    // where it tells the length the body would have had.
    const fields = clientResponseFields(upstream.fields, upstream.framing === 'length' || upstream.framing === 'none');
    res.writeHead(upstream.status, redactFieldValues(fields, secrets));
    ex.relayed = upstream;
    upstream.relay(this.bodySink(upstream, res, ex));
  }

  /**
   * Sends an upstream error answer on with every credential the gateway sent replaced by its
   * fingerprint, in its body and its header values; status and other headers as they came,
   * the body decoded when it was compressed, and its length set to what is sent.
   */
  private relayError(upstream: UpstreamResponse, res: ServerResponse, ex: Exchange, { body, decoded }: RedactedBody, secrets: readonly string[]): void {
    if (!this.answering(upstream, res)) return;
    const fields = clientResponseFields(upstream.fields, false);
    const out: string[] = [];
    for (let i = 0; i < fields.length; i += 2) {
      if (decoded && fields[i] === 'content-encoding') continue;
      out.push(fields[i]!, fields[i + 1]!);
    }
    out.push('content-length', String(body.length));
    res.writeHead(upstream.status, redactFieldValues(out, secrets));
    ex.bytesOut += body.length;
    res.end(body);
  }

  /** Counts an upstream error status; false when the client left while the answer was looked at. */
  private answering(upstream: UpstreamResponse, res: ServerResponse): boolean {
    const status = upstream.status;
    if (status >= 500) this.count('upstream_5xx');
    else if (status >= 400) this.count('upstream_4xx');
    if (res.destroyed) {
      // `finish` has run already.
      upstream.discard();
      return false;
    }
    return true;
  }

  /**
   * Where the answer's body goes. Each read is written as it arrives (an SSE event is never held
   * back), and a slow client pauses the upstream instead of filling memory.
   */
  private bodySink(upstream: UpstreamResponse, res: ServerResponse, ex: Exchange): BodySink {
    return {
      write: (bytes) => {
        if (res.write(bytes)) return true;
        res.once('drain', () => upstream.resume());
        return false;
      },
      end: () => res.end(),
      // An answer cut short upstream (reset, or silent past the timeout) is cut short here too.
      broken: () => {
        if (res.writableFinished) return;
        if (ex.error === null) {
          ex.error = 'upstream_broken';
          this.count('upstream_broken');
        }
        res.destroy();
      },
    };
  }

  private credentialFailure(err: unknown, profile: GatewayProfile, fail: (code: GatewayErrorCode, message: string) => void): void {
    if (err instanceof ProfileNeedsLoginError) return fail('profile_needs_login', err.message);
    const message = err instanceof QwenError ? err.message : 'the credential could not be obtained';
    this.options.logger.warn({ profile: profile.name, err: message }, 'gateway: no credential for a request');
    fail('credential_unavailable', `profile "${profile.name}" has no usable credential right now: ${message}`);
  }

  private async answerModels(res: ServerResponse, only: string | undefined): Promise<void> {
    const { profiles } = this.options;
    const names = only ? [only] : profiles.names();
    const data: Array<{ id: string; object: 'model'; created: number; owned_by: string }> = [];
    for (const name of names) {
      const profile = profiles.get(name);
      if (!profile) continue;
      let ids: string[] = [];
      try {
        ids = profile.models ? await profile.models() : await this.upstreamModels(profile);
      } catch (err) {
        this.options.logger.warn({ profile: name, err: (err as Error).message }, 'gateway: could not list a profile\'s models');
      }
      for (const id of ids) data.push({ id: only ? id : `${name}/${id}`, object: 'model', created: 0, owned_by: name });
    }
    const body = JSON.stringify({ object: 'list', data });
    res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) });
    res.end(body);
  }

  /** `GET {base}/models` of a profile that does not know its models itself. */
  private async upstreamModels(profile: GatewayProfile): Promise<string[]> {
    const cancel = new Cancellation();
    const timer = setTimeout(() => cancel.cancel(), MODELS_TIMEOUT_MS);
    try {
      const upstream = await this.upstreams.send({
        url: upstreamUrl(await profile.baseUrl(), '/models'),
        method: 'GET',
        fields: upstreamRequestFields(['accept', 'application/json'], await profile.credentialHeaders()),
        body: null,
        timeoutMs: MODELS_TIMEOUT_MS,
        cancel,
      });
      const text = await upstream.readAll(MODELS_BODY_LIMIT);
      if (upstream.status !== 200 || !text) throw new Error(`the upstream answered ${upstream.status} to GET /models`);
      return ModelListSchema.parse(JSON.parse(text.toString('utf8'))).data.map((m) => m.id);
    } finally {
      clearTimeout(timer);
    }
  }

  /** Counts the exchange and writes its access log line (never a header, query or body). */
  private finish(ex: Exchange, res: ServerResponse): void {
    this.active -= 1;
    this.served += 1;
    if (ex.stream) this.streams -= 1;
    if (!res.writableFinished) {
      if (ex.error === null) {
        ex.error = 'client_aborted';
        this.count('client_aborted');
      }
      ex.cancel?.cancel();
    }
    this.accessLog.info(
      {
        listener: ex.listener,
        method: ex.method,
        path: ex.path,
        profile: ex.profile,
        // Null when no answer was sent (the client left first, or the connection was cut).
        status: res.headersSent ? res.statusCode : null,
        duration_ms: Math.round((performance.now() - ex.started) * 10) / 10,
        bytes_in: ex.bytesIn,
        bytes_out: ex.bytesOut + (ex.relayed?.bodyBytes ?? 0),
        ...(ex.error ? { error: ex.error } : {}),
      },
      'gateway request',
    );
  }
}

function isJson(contentType: string | undefined): boolean {
  if (!contentType) return false;
  const type = contentType.split(';')[0]!.trim().toLowerCase();
  return type === 'application/json' || type.endsWith('+json');
}

/**
 * Reads a request body up to `limit` bytes. Whole when it fits; otherwise the chunks read so
 * far, with the request paused for the caller to stream on. Null when the client went away.
 */
function readUpTo(req: IncomingMessage, limit: number): Promise<{ whole: true; body: Buffer } | { whole: false; chunks: Buffer[] } | null> {
  return new Promise((resolve) => {
    const chunks: Buffer[] = [];
    let size = 0;
    const cleanup = () => {
      req.off('data', onData);
      req.off('end', onEnd);
      req.off('close', onClose);
      req.off('error', onClose);
    };
    const onData = (chunk: Buffer) => {
      chunks.push(chunk);
      size += chunk.length;
      if (size > limit) {
        req.pause();
        cleanup();
        resolve({ whole: false, chunks });
      }
    };
    const onEnd = () => {
      cleanup();
      resolve({ whole: true, body: Buffer.concat(chunks, size) });
    };
    const onClose = () => {
      if (req.complete) return;
      cleanup();
      resolve(null);
    };
    req.on('data', onData);
    req.on('end', onEnd);
    req.on('close', onClose);
    req.on('error', onClose);
  });
}

/**
 * Reads an answer's body up to `cap` bytes: whole, or its first `cap` bytes (`cut`) with the
 * rest dropped and the connection closed. Null when the upstream broke it off.
 */
function readCapped(upstream: UpstreamResponse, cap: number): Promise<{ bytes: Buffer; cut: boolean } | null> {
  return new Promise((done) => {
    const chunks: Buffer[] = [];
    let size = 0;
    let over = false;
    upstream.relay(
      {
        write: (bytes) => {
          if (over) return false;
          if (size + bytes.length > cap) {
            chunks.push(bytes.subarray(0, cap - size));
            size = cap;
            over = true;
            done({ bytes: Buffer.concat(chunks, size), cut: true });
            upstream.discard();
            return false;
          }
          chunks.push(bytes);
          size += bytes.length;
          return true;
        },
        end: () => done({ bytes: Buffer.concat(chunks, size), cut: false }),
        broken: () => {
          if (!over) done(null);
        },
      },
    );
  });
}

function listen(server: Server, options: { path: string } | { host: string; port: number; exclusive: boolean }): Promise<void> {
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen({ ...options, backlog: 1024 }, () => {
      server.off('error', reject);
      resolve();
    });
  });
}

function closeServer(server: Server, force: boolean): Promise<void> {
  return new Promise((resolve) => {
    if (!server.listening) return resolve();
    server.close(() => resolve());
    server.closeIdleConnections();
    if (force) server.closeAllConnections();
  });
}
