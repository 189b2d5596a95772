/**
 * JSON-RPC 2.0 without sockets: one line in, the answer lines out, now or as a promise.
 * What each method does is given as handlers; the connection around this (ipc-connection.ts)
 * only frames, schedules and writes. The path a line takes is parse → validate → handle →
 * answer; two shortcuts sit on it, each behind its own seam:
 * - a frame that repeats the last valid one with another id skips parse and validate
 *   (RepeatedFrame; see bench/README.md#b4);
 * - calls of one connection waiting on the same promise are answered together, by one
 *   callback, in one write (see bench/README.md#b4).
 */
import type { z } from 'zod';
import { compileSchemas } from '../shared/compile-schemas.js';
import { describeIssues, errorText } from '../shared/diagnostics.js';
import { QwenError } from '../shared/errors.js';
import { RpcErrorCodes, RpcRequestSchema, requestSchemaFor } from '../shared/protocol.js';
import { RepeatedFrame } from '../shared/repeated-frame.js';
import type { Logger } from './logger.js';

export type Id = string | number | null;

/** What a handler sees of the connection a call came on. */
export interface RpcConnection {
  readonly id: number;
  /** The protocol version it speaks: 1 until its `hello` names another. */
  protocol: number;
  subscribed: boolean;
  /** The profile its pushes are about; null: every profile (version 2) or the default one (version 1). */
  subscribedProfile: string | null;
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

/**
 * What receiving a line asks of the connection:
 * - a string: write it now (`''`: nothing to write, as for a notification);
 * - a promise: write what it resolves to once it settles (it never rejects);
 * - null: nothing now; this call's answer leaves with a promise this session was given before.
 */
export type Reply = string | Promise<string> | null;

/** A method with the schema for a whole request frame to it, built once. */
interface CompiledMethod {
  readonly name: string;
  readonly method: RpcMethod;
  /** Envelope and params in one schema: the common case costs one validation pass. */
  readonly frame: z.ZodType<{ id?: Id; params?: unknown }>;
}

/** Calls of one session to one method, waiting on the same promise. */
interface AwaitingCalls {
  readonly compiled: CompiledMethod;
  readonly ids: Id[];
}

/** One connection's side of the protocol: whether it listens for pushes, and the calls it is owed answers to. */
export class RpcSession implements RpcConnection {
  protocol = 1;
  subscribed = false;
  subscribedProfile: string | null = null;
  /** Calls (and notifications) whose handler has not settled yet. */
  owed = 0;
  /** Calls waiting on a promise, by that promise. */
  readonly awaiting = new Map<Promise<unknown>, AwaitingCalls>();

  constructor(readonly id: number) {}
}

const NO_ANSWER = '';

/** Turns request lines into answer lines for the methods it was given; shared by every connection of a server. */
export class RpcDispatcher {
  private readonly methods = new Map<string, CompiledMethod>();
  /** The last canonical valid call, for frames that repeat it with another id. */
  private readonly repeated = new RepeatedFrame<{ compiled: CompiledMethod; params: unknown }>();
  /** Frozen results (a token record shared by every caller) are serialized once. */
  private readonly resultJson = new WeakMap<object, string>();
  private served = 0;

  constructor(
    methods: Record<string, RpcMethod>,
    private readonly logger: Logger,
  ) {
    for (const [name, method] of Object.entries(methods)) {
      this.methods.set(name, { name, method, frame: requestSchemaFor(name, method.params) });
    }
  }

  /** Calls handled so far (notifications included). */
  get requestsServed(): number {
    return this.served;
  }

  /**
   * Builds every request schema's checking code now, so that cost does not land on the first
   * call of each method. Call it when the process is idle.
   */
  compileSchemas(): void {
    compileSchemas([...[...this.methods.values()].map((compiled) => compiled.frame), RpcRequestSchema]);
  }

  /**
   * Handles the line `text[start, end)` (no newline; `end - start` within the frame limit)
   * received on `session`, and says what to answer.
   */
  receive(session: RpcSession, text: string, start = 0, end = text.length): Reply {
    const repeatedId = this.repeated.idAt(text, start, end);
    if (repeatedId !== -1) {
      const { compiled, params } = this.repeated.value;
      return this.call(session, compiled, repeatedId, params);
    }
    const line = start === 0 && end === text.length ? text : text.slice(start, end);
    let data: unknown;
    try {
      data = JSON.parse(line);
    } catch {
      return errorLine(null, RpcErrorCodes.parseError, 'parse error: the frame is not valid JSON');
    }
    const name = typeof data === 'object' && data !== null ? (data as { method?: unknown }).method : undefined;
    const compiled = typeof name === 'string' ? this.methods.get(name) : undefined;
    const parsed = compiled?.frame.safeParse(data);
    if (!compiled || !parsed?.success) return this.rejection(data, compiled);
    // Frozen: a repeated frame hands the same params to every call it stands for.
    const params: unknown = Object.freeze(parsed.data.params);
    this.repeated.remember(line, data, { compiled, params });
    return this.call(session, compiled, parsed.data.id, params);
  }

  /** Runs a validated call (`requestId` undefined: a notification, which gets no answer). */
  private call(session: RpcSession, compiled: CompiledMethod, requestId: Id | undefined, params: unknown): Reply {
    const isNotification = requestId === undefined;
    const id: Id = requestId ?? null;
    this.served++;
    let result: unknown;
    try {
      result = compiled.method.handle(params, session);
    } catch (err) {
      return isNotification ? NO_ANSWER : this.errorAnswer(id, err, compiled.name);
    }
    if (!(result instanceof Promise)) return isNotification ? NO_ANSWER : this.resultLine(id, result);
    session.owed++;
    if (isNotification) {
      const settled = (): string => {
        session.owed--;
        return NO_ANSWER;
      };
      return result.then(settled, settled);
    }
    return this.answerWhenSettled(session, result, id, compiled);
  }

  /**
   * The answer to call `id` once `result` settles. A later call of the same session to the same
   * method waiting on the same promise joins this answer (and gets null).
   */
  private answerWhenSettled(session: RpcSession, result: Promise<unknown>, id: Id, compiled: CompiledMethod): Promise<string> | null {
    const joined = session.awaiting.get(result);
    if (joined?.compiled === compiled) {
      joined.ids.push(id);
      return null;
    }
    const group: AwaitingCalls = { compiled, ids: [id] };
    // Another method handing out the very same promise gets a group of its own.
    if (!joined) session.awaiting.set(result, group);
    return result.then(
      (value) => this.answerGroup(session, result, group, (callId) => this.resultLine(callId, value)),
      (err: unknown) => {
        const error = this.errorOf(err, compiled.name);
        return this.answerGroup(session, result, group, (callId) => `${JSON.stringify({ jsonrpc: '2.0', id: callId, error })}\n`);
      },
    );
  }

  private answerGroup(session: RpcSession, result: Promise<unknown>, group: AwaitingCalls, lineFor: (id: Id) => string): string {
    if (session.awaiting.get(result) === group) session.awaiting.delete(result);
    let lines = '';
    for (const id of group.ids) lines += lineFor(id);
    session.owed -= group.ids.length;
    return lines;
  }

  /**
   * The answer to a frame that did not validate as a call of a known method, saying what is
   * wrong: not a request at all, an unknown method, or params the method does not take.
   */
  private rejection(data: unknown, compiled: CompiledMethod | undefined): string {
    const envelope = RpcRequestSchema.safeParse(data);
    if (!envelope.success) {
      const message = Array.isArray(data)
        ? 'invalid request: batches are not supported; send one request per line'
        : `invalid request: ${describeIssues(envelope.error)}`;
      return errorLine(idOf(data), RpcErrorCodes.invalidRequest, message);
    }
    const request = envelope.data;
    if (request.id === undefined) return NO_ANSWER; // a notification gets no answer, not even an error
    if (!compiled) return errorLine(request.id, RpcErrorCodes.methodNotFound, `method not found: ${request.method}`);
    // The params as sent (the envelope's parsed copy drops keys such as __proto__).
    const params = compiled.method.params.safeParse((data as { params?: unknown }).params ?? {});
    if (params.success) return errorLine(request.id, RpcErrorCodes.invalidRequest, 'invalid request');
    return errorLine(request.id, RpcErrorCodes.invalidParams, `invalid params: ${describeIssues(params.error)}`);
  }

  /** The answer line for call `id` with `result`. */
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

  private errorAnswer(id: Id, err: unknown, method: string): string {
    return `${JSON.stringify({ jsonrpc: '2.0', id, error: this.errorOf(err, method) })}\n`;
  }

  /** The JSON-RPC error object for what a handler threw (logged when unexpected). */
  private errorOf(err: unknown, method: string): { code: number; message: string; data?: Record<string, string> } {
    if (err instanceof QwenError) {
      const data: Record<string, string> = { code: err.code };
      const oauthError = (err as { oauthError?: unknown }).oauthError;
      if (typeof oauthError === 'string') data.oauth_error = oauthError;
      return { code: RpcErrorCodes.appError, message: err.message, data };
    }
    this.logger.error({ method, err: errorText(err) }, 'handler failed unexpectedly');
    return { code: RpcErrorCodes.internalError, message: 'internal error' };
  }
}

/** An error answer line. */
export function errorLine(id: Id, code: number, message: string): string {
  return `${JSON.stringify({ jsonrpc: '2.0', id, error: { code, message } })}\n`;
}

/** The id of a frame that is not a valid request, when it has a usable one. */
function idOf(data: unknown): Id {
  if (data && typeof data === 'object' && !Array.isArray(data)) {
    const id = (data as { id?: unknown }).id;
    if (typeof id === 'string' && id.length <= 200) return id;
    if (typeof id === 'number' && Number.isFinite(id)) return id;
  }
  return null;
}
