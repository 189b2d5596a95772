/**
 * QwenChatModel and createQwenFetch against the real daemon and the local Qwen server's chat
 * endpoint (resource_url points at the server itself): headers on the wire, the one automatic
 * refresh on a rejected token, QwenTokenExpiredError on a second rejection, streaming, abort.
 * Tokens are compared by fingerprint so a failing assertion never prints one.
 */
import { afterAll, describe, expect, it } from 'vitest';
import { join } from 'node:path';
import { QwenChatModel, QWEN_MODEL_NAMES, readServerSentEvents, type ServerSentEvent } from '../client/chat-model.js';
import { createQwenFetch, qwenBaseURL } from '../client/qwen-fetch.js';
import type { TokenClient } from '../client/token-client.js';
import {
  QwenChatApiError,
  QwenConfigError,
  QwenError,
  QwenRefreshTokenInvalidError,
  QwenTokenExpiredError,
} from '../shared/errors.js';
import { fingerprint } from '../shared/fingerprint.js';
import { createFixture, credsFrom, type DaemonFixture } from './support/daemon.js';
import { INVALID_ACCESS_TOKEN_BODY, type RecordedRequest } from './support/qwen-server.js';
import { until } from './support/wait.js';

let fx: DaemonFixture | undefined;
/** Where the current test's requests start in `server.requests`. */
let mark = 0;
/** `server.abortedStreams` when the current test started. */
let aborted = 0;

/** A running daemon holding fresh credentials whose resource_url routes chat to the local server. */
async function startDaemon(): Promise<DaemonFixture> {
  const fixture = await createFixture();
  fixture.server.settings.resourceUrl = fixture.server.baseUrl;
  await fixture.writeOwn(credsFrom(fixture.server));
  await fixture.start();
  return fixture;
}

/**
 * Most tests share one daemon (starting one costs about a second on a busy machine); each gets
 * a fresh client (so no client-side state carries over), a clean server and the current token.
 */
async function setup(): Promise<{ client: TokenClient; token: string }> {
  const f = (fx ??= await startDaemon());
  f.server.clearFaults();
  f.server.settings.streamDelayMs = 0;
  await until(() => f.server.openStreams === 0, 'streams of the previous test to close');
  const client = f.client();
  const token = (await client.getCredentials()).access_token;
  mark = f.server.requests.length;
  aborted = f.server.abortedStreams;
  return { client, token };
}

afterAll(async () => {
  await fx?.cleanup();
});

function bearerPrint(req: RecordedRequest | undefined): string {
  const auth = req?.headers.authorization ?? '';
  return fingerprint(auth.replace(/^Bearer /, ''));
}

function chatRequests(): RecordedRequest[] {
  return fx!.server.requests.slice(mark).filter((r) => r.endpoint === 'chat');
}

function refreshes(): number {
  return fx!.server.requests.slice(mark).filter((r) => r.endpoint === 'token' && r.form?.grant_type === 'refresh_token').length;
}

function lastChat(): RecordedRequest | undefined {
  return chatRequests().at(-1);
}

async function rejection(promise: Promise<unknown>): Promise<Error> {
  try {
    await promise;
  } catch (err) {
    return err as Error;
  }
  throw new Error('expected a rejection');
}

/** The chat endpoint answering every request with `status` and `body`. */
function chatAnswer(status: number, body: string, contentType = 'application/json') {
  return { kind: 'respond' as const, endpoint: 'chat' as const, status, headers: { 'content-type': contentType }, body };
}

const TOKEN_ERROR_FAULT = chatAnswer(401, JSON.stringify(INVALID_ACCESS_TOKEN_BODY));

/** The chat endpoint answering every request 403 with an OpenAI-style error. */
function chatRefusal(message: string, code: string) {
  return chatAnswer(403, JSON.stringify({ error: { message, code } }));
}

/** A chat completion request for `fetch`, saying `content`. */
function chatPost(content: string): RequestInit {
  return { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ model: 'coder-model', messages: [{ role: 'user', content }] }) };
}

describe('QwenChatModel against the local chat API', () => {
  it('sends the daemon token and the Qwen headers, and returns text, usage and the raw response', async () => {
    const { client, token } = await setup();
    const model = new QwenChatModel({ client });
    const result = await model.call('hello there');

    expect(result.text).toBe('echo: hello there');
    expect(result.usage).toEqual({ prompt_tokens: 2, completion_tokens: 3, total_tokens: 5 });
    expect(result.raw.choices[0]?.finish_reason).toBe('stop');
    const req = lastChat()!;
    expect(req.path).toBe('/v1/chat/completions');
    expect(bearerPrint(req)).toBe(fingerprint(token));
    const h = fx!.server.lastChatHeaders!;
    expect(h['user-agent']).toMatch(/^qwen-tokend\/\d+\.\d+\.\d+ \(node \d+/);
    expect(h['x-dashscope-useragent']).toBe(h['user-agent']);
    expect(h['x-dashscope-authtype']).toBe('qwen-oauth');
    expect(h['x-dashscope-cachecontrol']).toBe('enable');
    expect(req.json).toMatchObject({ model: 'coder-model', stream: false, messages: [{ role: 'user', content: 'hello there' }] });
    expect(await qwenBaseURL(client)).toBe(`${fx!.server.baseUrl}/v1`);
  });

  it('recovers from a revoked token with exactly one refresh through the daemon', async () => {
    const { client, token } = await setup();
    fx!.server.revokeAccessToken(token);
    const model = new QwenChatModel({ client });

    const result = await model.call('after revoke');

    expect(result.text).toBe('echo: after revoke');
    expect(refreshes()).toBe(1);
    const [first, second] = chatRequests();
    expect(chatRequests()).toHaveLength(2);
    expect(bearerPrint(first)).toBe(fingerprint(token));
    expect(bearerPrint(second)).not.toBe(fingerprint(token));
    // The daemon persisted the refreshed token, and that is the one the retry carried.
    expect(bearerPrint(second)).toBe(fingerprint((await fx!.readOwn())?.access_token));
  });

  it('concurrent calls that all hit a revoked token share one refresh', async () => {
    const { client, token } = await setup();
    fx!.server.revokeAccessToken(token);
    const model = new QwenChatModel({ client });

    const texts = await Promise.all(['a', 'b', 'c', 'd'].map(async (p) => (await model.call(p)).text));

    expect(texts).toEqual(['echo: a', 'echo: b', 'echo: c', 'echo: d']);
    expect(refreshes()).toBe(1);
  });

  it('raises QwenTokenExpiredError when the refreshed token is rejected too, without returning the 401', async () => {
    const { client } = await setup();
    fx!.server.injectFault({ ...TOKEN_ERROR_FAULT, times: 2 });
    const model = new QwenChatModel({ client });

    const err = await rejection(model.call('twice rejected'));

    expect(err).toBeInstanceOf(QwenTokenExpiredError);
    expect(err.message).toContain('qwen-token login');
    expect(refreshes()).toBe(1);
    expect(chatRequests()).toHaveLength(2);
    for (const token of fx!.server.issuedTokens()) expect(err.message.includes(token)).toBe(false);

    // The token itself was fine: once the server accepts it again, calls work with no further refresh.
    expect((await model.call('recovered')).text).toBe('echo: recovered');
    expect(refreshes()).toBe(1);
  });

  it('a service that rejects every token costs one refresh, not one per call', async () => {
    const { client } = await setup();
    fx!.server.injectFault({ ...TOKEN_ERROR_FAULT });
    const model = new QwenChatModel({ client });

    expect(await rejection(model.call('one'))).toBeInstanceOf(QwenTokenExpiredError);
    expect(await rejection(model.call('two'))).toBeInstanceOf(QwenTokenExpiredError);
    expect(await rejection(model.call('three'))).toBeInstanceOf(QwenTokenExpiredError);

    expect(refreshes()).toBe(1);
    // 2 requests for the first call, then one attempt each.
    expect(chatRequests()).toHaveLength(4);
  });

  it('a 403 that a fresh token does not cure is a QwenChatApiError with the server message', async () => {
    const { client } = await setup();
    fx!.server.injectFault(chatRefusal('model access denied for this account', 'access_denied'));
    const model = new QwenChatModel({ client });

    const err = await rejection(model.call('forbidden'));

    expect(err).toBeInstanceOf(QwenChatApiError);
    expect((err as QwenChatApiError).status).toBe(403);
    expect(err.message).toContain('model access denied for this account');
    expect(refreshes()).toBe(1);
  });

  it('a lasting 403 costs one refresh for the token, not one per request, and each 403 reaches the caller', async () => {
    const { client } = await setup();
    fx!.server.injectFault(chatRefusal('Access to model denied', 'access_denied'));
    const qwenFetch = createQwenFetch({ client });
    const url = `${await qwenBaseURL(client)}/chat/completions`;
    for (let i = 0; i < 5; i++) {
      const response = await qwenFetch(url, chatPost(`call ${i}`));
      expect(response.status).toBe(403);
      expect(await response.text()).toContain('Access to model denied');
    }
    expect(refreshes()).toBe(1);
    // Two requests for the first call (before and after the refresh), then one each.
    expect(chatRequests()).toHaveLength(6);
  });

  it('a 403 about quota or rate goes to the caller at once, with no refresh', async () => {
    const { client } = await setup();
    fx!.server.injectFault({ ...chatRefusal('You exceeded your current quota', 'insufficient_quota'), times: 1 });
    const response = await createQwenFetch({ client })(`${await qwenBaseURL(client)}/chat/completions`, chatPost('quota'));
    expect(response.status).toBe(403);
    expect(await response.text()).toContain('insufficient_quota');
    expect(refreshes()).toBe(0);
    expect(chatRequests()).toHaveLength(1);
  });

  it('other API errors become QwenChatApiError with status and message, and a token echoed by the server is redacted', async () => {
    const { client, token } = await setup();
    fx!.server.injectFault({ ...chatAnswer(400, JSON.stringify({ error: { message: `bad request for key ${token}` } })), times: 1 });
    const model = new QwenChatModel({ client });

    const err = await rejection(model.call('bad'));

    expect(err).toBeInstanceOf(QwenChatApiError);
    expect((err as QwenChatApiError).status).toBe(400);
    expect(err.message).toContain('bad request for key [token ');
    expect(err.message.includes(token)).toBe(false);
    expect(refreshes()).toBe(0);
  });

  it('streams the deltas in order and closes the stream normally', async () => {
    const { client } = await setup();
    const model = new QwenChatModel({ client });

    const deltas: string[] = [];
    for await (const d of model.stream('one two three')) deltas.push(d);

    expect(deltas).toEqual(['echo: ', 'one ', 'two ', 'three']);
    expect(lastChat()?.json).toMatchObject({ stream: true });
    await until(() => fx!.server.openStreams === 0, 'the stream to end');
    expect(fx!.server.abortedStreams).toBe(aborted);
  });

  /** A chat answer whose SSE body is exactly `events`, then ends. */
  const sseFault = (events: object[], end = '') => ({
    ...chatAnswer(200, events.map((e) => `data: ${JSON.stringify(e)}\n\n`).join('') + end, 'text/event-stream'),
    times: 1,
  });
  const chunk = (content: string | undefined, finish: string | null = null) => ({
    object: 'chat.completion.chunk',
    choices: [{ index: 0, delta: content === undefined ? {} : { content }, finish_reason: finish }],
  });

  it('a stream cut off before [DONE] and before any finish_reason is a QwenChatApiError, after the deltas that came', async () => {
    const { client } = await setup();
    fx!.server.injectFault(sseFault([chunk('Once upon'), chunk(' a time')]));
    const model = new QwenChatModel({ client });

    const deltas: string[] = [];
    const err = await rejection(
      (async () => {
        for await (const d of model.stream('tell me a story')) deltas.push(d);
      })(),
    );

    expect(err).toBeInstanceOf(QwenChatApiError);
    expect((err as QwenChatApiError).status).toBe(200);
    expect(err.message).toContain('ended the stream before the reply was complete');
    expect(deltas).toEqual(['Once upon', ' a time']);
  });

  it('a stream that ends with a finish_reason but no [DONE] is complete', async () => {
    const { client } = await setup();
    fx!.server.injectFault(sseFault([chunk('all'), chunk(' of it'), chunk(undefined, 'stop')]));
    const model = new QwenChatModel({ client });

    const deltas: string[] = [];
    for await (const d of model.stream('short')) deltas.push(d);

    expect(deltas).toEqual(['all', ' of it']);
  });

  it('streaming also recovers from a revoked token with one refresh', async () => {
    const { client, token } = await setup();
    fx!.server.revokeAccessToken(token);
    const model = new QwenChatModel({ client });

    const deltas: string[] = [];
    for await (const d of model.stream('x y')) deltas.push(d);

    expect(deltas.join('')).toBe('echo: x y');
    expect(refreshes()).toBe(1);
  });

  it('an AbortSignal stops the stream mid-way and the server sees the connection closed', async () => {
    const { client } = await setup();
    fx!.server.settings.streamDelayMs = 100;
    const model = new QwenChatModel({ client });
    const controller = new AbortController();

    const deltas: string[] = [];
    const err = await rejection(
      (async () => {
        for await (const d of model.stream('a b c d e f g h i j', { signal: controller.signal })) {
          deltas.push(d);
          if (deltas.length === 2) controller.abort();
        }
      })(),
    );

    expect(err.name).toBe('AbortError');
    expect(deltas).toEqual(['echo: ', 'a ']);
    await until(() => fx!.server.abortedStreams === aborted + 1 && fx!.server.openStreams === 0, 'the server to see the stream closed');
  });

  it('breaking out of the for-await loop closes the stream too', async () => {
    const { client } = await setup();
    fx!.server.settings.streamDelayMs = 100;
    const model = new QwenChatModel({ client });

    for await (const d of model.stream('a b c d e f g h i j')) {
      expect(d).toBe('echo: ');
      break;
    }

    await until(() => fx!.server.abortedStreams === aborted + 1 && fx!.server.openStreams === 0, 'the server to see the stream closed');
  });

  it('an already aborted signal sends nothing', async () => {
    const { client } = await setup();
    const model = new QwenChatModel({ client });
    const err = await rejection(model.call('never', { signal: AbortSignal.abort() }));
    expect(err.name).toBe('AbortError');
    expect(chatRequests()).toHaveLength(0);
  });

  it('qwen-portal/ names send the bare model; vision messages with image parts pass through', async () => {
    const { client } = await setup();
    await new QwenChatModel({ client, modelName: 'qwen-portal/coder-model' }).call('hi');
    expect(lastChat()?.json).toMatchObject({ model: 'coder-model' });

    const image = { type: 'image_url', image_url: { url: 'data:image/png;base64,iVBORw0KGgo=' } } as const;
    const vision = new QwenChatModel({ client, modelName: 'qwen-portal/vision-model' });
    const result = await vision.call([
      { role: 'system', content: 'describe images' },
      { role: 'user', content: [{ type: 'text', text: 'what is this' }, image] },
    ]);

    expect(result.text).toBe('echo: what is this');
    const sent = lastChat()?.json as { model: string; messages: Array<{ content: unknown }> };
    expect(sent.model).toBe('vision-model');
    expect(sent.messages[1]?.content).toEqual([{ type: 'text', text: 'what is this' }, image]);
  });

  it('tokenPath must match the daemon that answers', async () => {
    await setup();
    const other = new QwenChatModel({ env: fx!.env, tokenPath: join(fx!.root, 'elsewhere', 'creds.json') });
    const err = await rejection(other.call('x'));
    await other.close();
    expect(err).toBeInstanceOf(QwenConfigError);
    expect(err.message).toContain(fx!.tokenPath);
    expect(chatRequests()).toHaveLength(0);

    const same = new QwenChatModel({ env: fx!.env, tokenPath: fx!.tokenPath, clientId: fx!.server.settings.clientId });
    expect((await same.call('y')).text).toBe('echo: y');
    await same.close();
  });
});

describe('when the refresh token is revoked too', () => {
  let own: DaemonFixture | undefined;
  afterAll(async () => {
    await own?.cleanup();
  });

  it('raises QwenTokenExpiredError (caused by the daemon refusal) when the refresh token is revoked as well', async () => {
    // Its own daemon: after this the refresh token is dead for good.
    own = await startDaemon();
    const client = own.client();
    own.server.revokeAll();
    const model = new QwenChatModel({ client });

    const err = await rejection(model.call('all revoked'));

    expect(err).toBeInstanceOf(QwenTokenExpiredError);
    expect(err.cause).toBeInstanceOf(QwenRefreshTokenInvalidError);
    expect(own.server.counts.chat).toBe(1);
    expect(own.server.counts.refresh).toBe(1);
  });
});

describe('model names', () => {
  it('an unknown name for the Qwen OAuth profile is a QwenError that lists the valid names', () => {
    let err: unknown;
    try {
      // Named `qwen`, the check is at once; for the daemon's default profile it waits for the first call (its kind).
      new QwenChatModel({ modelName: 'qwen-max', profile: 'qwen', client: {} as TokenClient });
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(QwenConfigError);
    expect(err).toBeInstanceOf(QwenError);
    for (const name of ['coder-model', 'vision-model', 'qwen-portal/coder-model', 'qwen-portal/vision-model']) {
      expect((err as Error).message).toContain(name);
    }
    expect(QWEN_MODEL_NAMES).toHaveLength(4);
  });

  it('validateModel: false sends any name (the server decides)', async () => {
    const { client } = await setup();
    const model = new QwenChatModel({ client, modelName: 'qwen-portal/qwen-next', validateModel: false });
    expect(model.model).toBe('qwen-next');
    const err = await rejection(model.call('x'));
    expect(err).toBeInstanceOf(QwenChatApiError);
    expect((err as QwenChatApiError).status).toBe(400);
    expect(err.message).toContain('model must be one of');
    expect(lastChat()?.json).toMatchObject({ model: 'qwen-next' });
  });
});

describe('createQwenFetch request bodies', () => {
  const body = () => JSON.stringify({ model: 'coder-model', messages: [{ role: 'user', content: 'replayed body' }] });

  it('replays a ReadableStream body after a refresh and replaces a caller Authorization header', async () => {
    const { client, token } = await setup();
    fx!.server.revokeAccessToken(token);
    const qwenFetch = createQwenFetch({ client, headers: { 'X-Extra': 'yes' } });
    const bytes = new TextEncoder().encode(body());
    const stream = new ReadableStream<Uint8Array>({
      start(c) {
        c.enqueue(bytes.slice(0, 10));
        c.enqueue(bytes.slice(10));
        c.close();
      },
    });

    const res = await qwenFetch(`${await qwenBaseURL(client)}/chat/completions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', authorization: 'Bearer stale-key' },
      body: stream,
      duplex: 'half',
    } as RequestInit);

    expect(res.status).toBe(200);
    expect(((await res.json()) as { choices: Array<{ message: { content: string } }> }).choices[0]?.message.content).toBe('echo: replayed body');
    const [first, second] = chatRequests();
    expect(first?.body).toBe(body());
    expect(second?.body).toBe(body());
    expect(bearerPrint(first)).toBe(fingerprint(token));
    expect(second?.headers['x-extra']).toBe('yes');
  });

  it('accepts a Request object, and Blob / Uint8Array bodies', async () => {
    const { client, token } = await setup();
    fx!.server.revokeAccessToken(token);
    const qwenFetch = createQwenFetch({ client });
    const url = `${await qwenBaseURL(client)}/chat/completions`;

    const viaRequest = await qwenFetch(new Request(url, { method: 'POST', headers: { 'content-type': 'application/json' }, body: body() }));
    expect(viaRequest.status).toBe(200);
    await viaRequest.body?.cancel();
    const viaBlob = await qwenFetch(url, { method: 'POST', body: new Blob([body()], { type: 'application/json' }) });
    expect(viaBlob.status).toBe(200);
    await viaBlob.text();
    const viaBytes = await qwenFetch(url, { method: 'POST', headers: { 'content-type': 'application/json' }, body: new TextEncoder().encode(body()) });
    expect(viaBytes.status).toBe(200);
    await viaBytes.text();

    // Request: rejected + retried; the others went straight through with the refreshed token.
    const chats = chatRequests();
    expect(chats).toHaveLength(4);
    expect(chats.every((r) => r.body === body())).toBe(true);
    expect(refreshes()).toBe(1);
  });
});

describe('readServerSentEvents', () => {
  function streamOf(chunks: string[]): ReadableStream<Uint8Array> {
    const enc = new TextEncoder();
    return new ReadableStream({
      start(c) {
        for (const ch of chunks) c.enqueue(enc.encode(ch));
        c.close();
      },
    });
  }

  async function collect(chunks: string[]): Promise<ServerSentEvent[]> {
    const out: ServerSentEvent[] = [];
    for await (const e of readServerSentEvents(streamOf(chunks))) out.push(e);
    return out;
  }

  const text =
    ': keep-alive comment\r\n' +
    'data: {"a":1}\r\n\r\n' +
    'event: message\n' +
    'data: line one\n' +
    'data:line two\n\n' +
    'data: héllo ✓\r\r' +
    'id: 7\nretry: 10\n\n' +
    'data: [DONE]';
  const expected: ServerSentEvent[] = [
    { event: undefined, data: '{"a":1}' },
    { event: 'message', data: 'line one\nline two' },
    { event: undefined, data: 'héllo ✓' },
    { event: undefined, data: '[DONE]' },
  ];

  it('handles CRLF / LF / CR endings, comments, multi-line data and a missing final blank line', async () => {
    expect(await collect([text])).toEqual(expected);
  });

  it('gives the same events however the bytes are split (every byte boundary, including inside CRLF and UTF-8)', async () => {
    const bytes = new TextEncoder().encode(text);
    const enc = new TextDecoder();
    for (let cut = 1; cut < bytes.length; cut++) {
      const reader = readServerSentEvents(
        new ReadableStream<Uint8Array>({
          start(c) {
            c.enqueue(bytes.slice(0, cut));
            c.enqueue(bytes.slice(cut));
            c.close();
          },
        }),
      );
      const out: ServerSentEvent[] = [];
      for await (const e of reader) out.push(e);
      expect(out, `split at byte ${cut} (${JSON.stringify(enc.decode(bytes.slice(0, cut)).slice(-4))})`).toEqual(expected);
    }
    const oneByOne: string[] = [];
    for (const ch of text) oneByOne.push(ch);
    expect(await collect(oneByOne)).toEqual(expected);
  });

  it('cancels the body when the consumer stops early', async () => {
    let cancelled = false;
    const body = new ReadableStream<Uint8Array>({
      pull(c) {
        c.enqueue(new TextEncoder().encode('data: x\n\n'));
      },
      cancel() {
        cancelled = true;
      },
    });
    for await (const e of readServerSentEvents(body)) {
      expect(e.data).toBe('x');
      break;
    }
    expect(cancelled).toBe(true);
  });
});
