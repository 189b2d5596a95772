/**
 * `QwenChatModel`: the seed's chat model in TypeScript. An OpenAI-compatible chat client for
 * Qwen's portal, or for any profile's API (an API key's plan, another OAuth provider), that
 * always carries the daemon's current credential (through `createQwenFetch`).
 *
 *   const model = new QwenChatModel({ modelName: 'coder-model' });
 *   const plan = new QwenChatModel({ profile: 'coding-plan', modelName: 'qwen3-coder-plus' });
 *   const { text } = await model.call('Hello, Qwen!');
 *   for await (const delta of model.stream('Tell me a story')) process.stdout.write(delta);
 */
import { z } from 'zod';
import { QwenChatApiError, QwenConfigError } from '../shared/errors.js';
import { DEFAULT_PROFILE } from '../shared/profiles.js';
import type { TokenResult } from '../shared/protocol.js';
import { abortable, createQwenFetch, isQwenOAuth, redactKey, trustedBaseURL, type QwenFetch } from './qwen-fetch.js';
import { TokenClient } from './token-client.js';

/** The models Qwen's OAuth portal serves, by their wire names. */
export const QWEN_CHAT_MODELS = ['coder-model', 'vision-model'] as const;
export type QwenWireModel = (typeof QWEN_CHAT_MODELS)[number];
/** The seed's full model ids are `qwen-portal/{model}`; the wire carries the bare name. */
export const QWEN_PORTAL_PREFIX = 'qwen-portal/';
export type QwenModelName = QwenWireModel | `${typeof QWEN_PORTAL_PREFIX}${QwenWireModel}`;

/** Every name `QwenChatModel` accepts when `validateModel` is on. */
export const QWEN_MODEL_NAMES: readonly QwenModelName[] = [
  ...QWEN_CHAT_MODELS,
  ...QWEN_CHAT_MODELS.map((m) => `${QWEN_PORTAL_PREFIX}${m}` as const),
];

export type QwenContentPart =
  | { type: 'text'; text: string }
  | { type: 'image_url'; image_url: { url: string; detail?: 'auto' | 'low' | 'high' } };

/** An OpenAI-style chat message; extra fields (e.g. `tool_call_id`) pass through untouched. */
export interface QwenChatMessage {
  role: 'system' | 'user' | 'assistant' | 'tool' | 'developer';
  content: string | QwenContentPart[] | null;
  name?: string;
  [field: string]: unknown;
}

/** A prompt string (sent as one user message) or a list of messages. */
export type QwenChatInput = string | readonly QwenChatMessage[];

export interface QwenChatModelOptions {
  /**
   * For Qwen OAuth: `coder-model` (default), `vision-model`, or the seed's `qwen-portal/{name}`.
   * For other profiles: any name their API serves (required; e.g. `qwen3-coder-plus`).
   */
  modelName?: QwenModelName | (string & {});
  /** The credential profile (default: the client's, i.e. `QWEN_TOKEND_PROFILE`, else the daemon's default). */
  profile?: string;
  /** Daemon client to use. Default: the shared client, or a new one when `clientId`/`tokenPath`/`env` is given. */
  client?: TokenClient;
  /**
   * OAuth client id for a daemon this process autostarts (`QWEN_OAUTH_CLIENT_ID`). A daemon
   * already listening keeps its own configuration.
   */
  clientId?: string;
  /**
   * Credential file of a daemon this process autostarts (`QWEN_TOKEN_PATH`). When a daemon is
   * already listening, the first call checks it uses this file and fails with `QwenConfigError` otherwise.
   */
  tokenPath?: string;
  /** Environment the daemon client is configured from (default `process.env`). */
  env?: NodeJS.ProcessEnv;
  /** For Qwen OAuth: reject model names Qwen's portal does not serve (default true). Other profiles accept any name. */
  validateModel?: boolean;
  /**
   * Chat API base URL; default: the profile's `base_url` from the daemon, looked up per call.
   * Its origin must be the profile's: the credential is sent nowhere else (another host needs a
   * profile whose `base_url` names it).
   */
  baseURL?: string;
  /** Transport under the token handling (default: the global `fetch`). */
  fetch?: QwenFetch;
  /** Request fields sent with every call (e.g. `temperature`, `max_tokens`). */
  defaultParams?: Record<string, unknown>;
  /** Extra HTTP headers for every call. */
  headers?: Record<string, string>;
}

export interface QwenCallOptions {
  /** Aborts the request (and, for `stream`, the response body). */
  signal?: AbortSignal;
  /** Request fields for this call, over `defaultParams`. */
  params?: Record<string, unknown>;
}

const Usage = z.looseObject({
  prompt_tokens: z.number().optional(),
  completion_tokens: z.number().optional(),
  total_tokens: z.number().optional(),
});
export type QwenUsage = z.infer<typeof Usage>;

const MessageContent = z.union([z.string(), z.null(), z.array(z.looseObject({ type: z.string().optional(), text: z.string().optional() }))]);

const Completion = z.looseObject({
  id: z.string().optional(),
  model: z.string().optional(),
  choices: z
    .array(
      z.looseObject({
        index: z.number().optional(),
        message: z.looseObject({ role: z.string().optional(), content: MessageContent.optional() }),
        finish_reason: z.string().nullable().optional(),
      }),
    )
    .min(1),
  usage: Usage.nullable().optional(),
});
/** A non-streaming chat completion as the API returned it (validated, extra fields kept). */
export type QwenChatCompletion = z.infer<typeof Completion>;

const CompletionChunk = z.looseObject({
  choices: z
    .array(
      z.looseObject({
        delta: z.looseObject({ content: z.string().nullable().optional() }).nullable().optional(),
        finish_reason: z.string().nullable().optional(),
      }),
    )
    .optional(),
  error: z.unknown().optional(),
});

export interface QwenChatResult {
  /** The assistant's reply. */
  text: string;
  usage: QwenUsage | undefined;
  raw: QwenChatCompletion;
}

/** Maps a caller's model name to the wire name; throws `QwenConfigError` listing the valid ones. */
export function resolveModelName(name: string, validate = true): string {
  const wire = name.startsWith(QWEN_PORTAL_PREFIX) ? name.slice(QWEN_PORTAL_PREFIX.length) : name;
  if (validate && !(QWEN_CHAT_MODELS as readonly string[]).includes(wire)) {
    throw new QwenConfigError(
      `unknown Qwen model "${name}": use one of ${QWEN_MODEL_NAMES.join(', ')} (or pass validateModel: false to send it anyway)`,
    );
  }
  if (!wire) throw new QwenConfigError('the model name is empty');
  return wire;
}

/** An OpenAI-compatible chat model that always uses the daemon's current credential for its profile. */
export class QwenChatModel {
  /** The name as given (e.g. `qwen-portal/coder-model`). */
  readonly modelName: string;
  /** The name sent in the request's `model` field (e.g. `coder-model`). */
  readonly model: string;
  readonly client: TokenClient;
  /** The profile given (undefined: the client's). */
  readonly profile: string | undefined;
  private readonly which: { profile: string } | undefined;
  private readonly modelGiven: boolean;
  private readonly validateModel: boolean;
  private readonly ownsClient: boolean;
  private readonly tokenPath: string | undefined;
  private readonly baseURL: string | undefined;
  private readonly fetch: QwenFetch;
  private readonly defaultParams: Record<string, unknown>;
  private daemonChecked: Promise<void> | null = null;

  constructor(options: QwenChatModelOptions = {}) {
    this.modelGiven = options.modelName !== undefined;
    this.modelName = options.modelName ?? 'coder-model';
    this.validateModel = options.validateModel ?? true;
    this.profile = options.profile;
    this.which = options.profile === undefined ? undefined : { profile: options.profile };
    const configures = options.clientId !== undefined || options.tokenPath !== undefined || options.env !== undefined;
    if (options.client && configures) {
      throw new QwenConfigError('pass either `client` or `clientId`/`tokenPath`/`env`, not both: the client already has its configuration');
    }
    if (options.client) {
      this.client = options.client;
      this.ownsClient = false;
    } else if (configures) {
      const env: NodeJS.ProcessEnv = { ...(options.env ?? process.env) };
      if (options.clientId !== undefined) env.QWEN_OAUTH_CLIENT_ID = options.clientId;
      if (options.tokenPath !== undefined) env.QWEN_TOKEN_PATH = options.tokenPath;
      this.client = new TokenClient({ env });
      this.ownsClient = true;
    } else {
      this.client = TokenClient.getInstance();
      this.ownsClient = false;
    }
    // The portal's model list belongs to Qwen OAuth, the built-in `qwen` profile: named so, the
    // name is checked now; otherwise at the first call, once the daemon says the profile's kind.
    const named = options.profile ?? this.client.profile;
    this.model = resolveModelName(this.modelName, this.validateModel && named === DEFAULT_PROFILE);
    this.tokenPath = options.tokenPath === undefined ? undefined : this.client.config.tokenPath;
    this.baseURL = options.baseURL?.replace(/\/+$/, '');
    this.defaultParams = { ...options.defaultParams };
    this.fetch = createQwenFetch({
      client: this.client,
      ...(options.profile === undefined ? {} : { profile: options.profile }),
      ...(options.fetch ? { fetch: options.fetch } : {}),
      ...(options.headers ? { headers: options.headers } : {}),
    });
  }

  /** One chat completion; returns the reply text, token usage and the raw response. */
  async call(input: QwenChatInput, options: QwenCallOptions = {}): Promise<QwenChatResult> {
    const response = await this.post(input, options, false);
    const raw = await abortable(readJson(response), options.signal);
    const parsed = Completion.safeParse(raw);
    if (!parsed.success) throw new QwenChatApiError('the Qwen chat API answered with an unexpected completion shape', { status: response.status });
    const choice = parsed.data.choices[0]!;
    return { text: contentText(choice.message.content), usage: parsed.data.usage ?? undefined, raw: parsed.data };
  }

  /** Alias of `call` (the seed's model is called directly; LangChain-style code says `invoke`). */
  invoke(input: QwenChatInput, options?: QwenCallOptions): Promise<QwenChatResult> {
    return this.call(input, options);
  }

  /**
   * Streams the reply as text deltas. Aborting `signal` rejects the iteration with the abort
   * reason; leaving the `for await` early also closes the response (and its connection). A body
   * that ends before the reply is complete (no `[DONE]`, no `finish_reason`) rejects with
   * `QwenChatApiError` after the deltas that came.
   */
  async *stream(input: QwenChatInput, options: QwenCallOptions = {}): AsyncGenerator<string, void, undefined> {
    const response = await this.post(input, options, true);
    const type = response.headers.get('content-type') ?? '';
    if (!/text\/event-stream/i.test(type)) {
      // A server that ignores `stream: true` answers one JSON completion: hand it out whole.
      const parsed = Completion.safeParse(await abortable(readJson(response), options.signal));
      if (!parsed.success) throw new QwenChatApiError('the Qwen chat API answered a streaming request with an unexpected body', { status: response.status });
      const text = contentText(parsed.data.choices[0]!.message.content);
      if (text) yield text;
      return;
    }
    let done = false;
    // A choice that says why it stopped ends the reply, even from a server that sends no [DONE].
    let finished = false;
    try {
      for await (const event of readServerSentEvents(response.body!)) {
        // After [DONE] the rest is drained, not cancelled, so the connection can be reused.
        if (done) continue;
        if (event.data === '[DONE]') {
          done = true;
          continue;
        }
        let chunk: unknown;
        try {
          chunk = JSON.parse(event.data);
        } catch {
          throw new QwenChatApiError('the Qwen chat API sent a stream event that is not JSON', { status: response.status });
        }
        const parsed = CompletionChunk.safeParse(chunk);
        if (!parsed.success) throw new QwenChatApiError('the Qwen chat API sent a stream event of unexpected shape', { status: response.status });
        if (parsed.data.error !== undefined) {
          throw new QwenChatApiError(`the Qwen chat API failed mid-stream: ${await this.redact(errorMessage(parsed.data) ?? 'no message')}`, {
            status: response.status,
          });
        }
        if (parsed.data.choices?.some((c) => typeof c.finish_reason === 'string' && c.finish_reason !== '')) finished = true;
        const delta = parsed.data.choices?.[0]?.delta?.content;
        if (typeof delta === 'string' && delta.length > 0) yield delta;
      }
      // The body ended early (a proxy timeout, a server restart): what came is only part of the reply.
      if (!done && !finished) {
        throw new QwenChatApiError('the Qwen chat API ended the stream before the reply was complete (no [DONE] and no finish_reason)', {
          status: response.status,
        });
      }
    } catch (err) {
      if (options.signal?.aborted) throw options.signal.reason;
      throw err;
    }
  }

  /** Closes the daemon client when this model created it (not the shared one). */
  async close(): Promise<void> {
    if (this.ownsClient) await this.client.close();
  }

  private async post(input: QwenChatInput, options: QwenCallOptions, stream: boolean): Promise<Response> {
    const messages = toMessages(input);
    await abortable(this.checkDaemon(), options.signal);
    const creds = await abortable(this.client.getCredentials(this.which), options.signal);
    this.checkModel(creds);
    const base = this.baseURL ?? trustedBaseURL(creds, this.client);
    const body = { ...this.defaultParams, ...options.params, model: this.model, messages, stream };
    const response = await this.fetch(`${base}/chat/completions`, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', Accept: stream ? 'text/event-stream' : 'application/json' },
      body: JSON.stringify(body),
      ...(options.signal ? { signal: options.signal } : {}),
    });
    if (response.ok) return response;
    const text = await abortable(response.text(), options.signal).catch((err: unknown) => {
      if (options.signal?.aborted) throw err;
      return '';
    });
    const message = errorMessage(parseJson(text)) ?? plainMessage(text) ?? (response.statusText || 'no message');
    const api = isQwenOAuth(creds) ? 'the Qwen chat API' : `the chat API of profile "${creds.profile ?? 'default'}"`;
    throw new QwenChatApiError(`${api} answered HTTP ${response.status}: ${await this.redact(message)}`, { status: response.status });
  }

  /** The model name against the profile's kind: the portal's names for Qwen OAuth; a name given for the others. */
  private checkModel(creds: TokenResult): void {
    if (isQwenOAuth(creds)) {
      if (this.validateModel) resolveModelName(this.modelName, true);
      return;
    }
    if (!this.modelGiven) {
      throw new QwenConfigError(
        `profile "${creds.profile ?? 'default'}" (${creds.kind}) has no default model: pass modelName, one its API serves (GET ${creds.base_url}/models lists them)`,
      );
    }
  }

  /** With `tokenPath` given, the daemon that answers must keep its token in that file. */
  private checkDaemon(): Promise<void> {
    if (this.tokenPath === undefined) return Promise.resolve();
    this.daemonChecked ??= (async () => {
      const status = await this.client.status(this.which);
      if (status.token_path !== this.tokenPath) {
        throw new QwenConfigError(
          `tokenPath is ${this.tokenPath}, but the qwen-tokend at ${status.socket_path} keeps its token in ${status.token_path}: ` +
            'stop that daemon, or point QWEN_TOKEND_SOCKET at a daemon started with this QWEN_TOKEN_PATH',
        );
      }
    })();
    // A failed check (e.g. daemon down) is tried again on the next call.
    this.daemonChecked.catch(() => {
      this.daemonChecked = null;
    });
    return this.daemonChecked;
  }

  /** Server messages should never echo a token; make sure ours does not pass through if one does. */
  private async redact(message: string): Promise<string> {
    let out = message.replace(/(bearer\s+)[A-Za-z0-9._~+/=-]{8,}/gi, '$1[redacted]');
    try {
      const token = (await this.client.getCredentials(this.which)).access_token;
      // Also a run of its first characters, should the server have cut it.
      out = redactKey(out, token, 'token');
    } catch {
      /* no token to look for */
    }
    return out.length > 500 ? `${out.slice(0, 500)}…` : out;
  }
}

function toMessages(input: QwenChatInput): QwenChatMessage[] {
  if (typeof input === 'string') return [{ role: 'user', content: input }];
  if (!Array.isArray(input) || input.length === 0) {
    throw new TypeError('QwenChatModel input must be a string or a non-empty array of chat messages');
  }
  input.forEach((m, i) => {
    if (!m || typeof m !== 'object' || typeof m.role !== 'string') throw new TypeError(`message ${i} has no role`);
  });
  return [...input];
}

function contentText(content: z.infer<typeof MessageContent> | undefined): string {
  if (typeof content === 'string') return content;
  if (Array.isArray(content)) return content.map((p) => (typeof p.text === 'string' ? p.text : '')).join('');
  return '';
}

async function readJson(response: Response): Promise<unknown> {
  const text = await response.text();
  const parsed = parseJson(text);
  if (parsed === undefined) throw new QwenChatApiError('the Qwen chat API answered with a body that is not JSON', { status: response.status });
  return parsed;
}

function parseJson(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return undefined;
  }
}

/** The message of an OpenAI-style (`{error:{message}}`) or OAuth-style (`{error, error_description}`) error body. */
function errorMessage(body: unknown): string | undefined {
  if (!body || typeof body !== 'object') return undefined;
  const { error, error_description: description, message } = body as Record<string, unknown>;
  if (error && typeof error === 'object') {
    const m = (error as Record<string, unknown>).message;
    if (typeof m === 'string' && m) return m;
  }
  if (typeof error === 'string' && error) return typeof description === 'string' && description ? `${error}: ${description}` : error;
  if (typeof message === 'string' && message) return message;
  return undefined;
}

/** A short plain-text body (not an HTML error page) is the message itself. */
function plainMessage(text: string): string | undefined {
  const trimmed = text.trim();
  if (!trimmed || trimmed.startsWith('<') || trimmed.length > 500) return undefined;
  return trimmed;
}

/** One server-sent event: its `event` name (if any) and its data lines joined by `\n`. */
export interface ServerSentEvent {
  event: string | undefined;
  data: string;
}

/**
 * Parses a `text/event-stream` body (WHATWG HTML §9.2): lines end in CRLF, LF or CR (also when
 * split across chunks), `:` lines are comments, `data:` lines of one event join with `\n`, and a
 * blank line ends the event. Leaving the loop early cancels the body, which closes the connection.
 */
export async function* readServerSentEvents(body: ReadableStream<Uint8Array>): AsyncGenerator<ServerSentEvent, void, undefined> {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = '';
  let data: string[] = [];
  let event: string | undefined;
  let finished = false;

  const take = (line: string): ServerSentEvent | null => {
    if (line === '') {
      if (data.length === 0) {
        event = undefined;
        return null;
      }
      const out = { event, data: data.join('\n') };
      data = [];
      event = undefined;
      return out;
    }
    if (line.startsWith(':')) return null;
    const colon = line.indexOf(':');
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? '' : line.slice(colon + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (field === 'data') data.push(value);
    else if (field === 'event') event = value;
    return null;
  };

  try {
    for (;;) {
      const { done, value } = await reader.read();
      buffer += done ? decoder.decode() : decoder.decode(value, { stream: true });
      let start = 0;
      for (let i = 0; i < buffer.length; i++) {
        const c = buffer.charCodeAt(i);
        if (c !== 10 && c !== 13) continue;
        // A CR that ends the chunk may be the first half of a CRLF: wait for the next chunk.
        if (c === 13 && i === buffer.length - 1 && !done) break;
        const line = buffer.slice(start, i);
        if (c === 13 && buffer.charCodeAt(i + 1) === 10) i++;
        start = i + 1;
        const ready = take(line);
        if (ready) yield ready;
      }
      buffer = buffer.slice(start);
      if (done) {
        // Be lenient with a stream that ends without the final blank line.
        const last = take(buffer) ?? take('');
        if (last) yield last;
        finished = true;
        return;
      }
    }
  } finally {
    if (!finished) await reader.cancel().catch(() => undefined);
    reader.releaseLock();
  }
}
