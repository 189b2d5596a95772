/**
 * The real `openai` package (devDependency) with `fetch: createQwenFetch()` against the daemon
 * and the local Qwen server: a completion, a streamed completion, a transparent refresh, and how
 * a dead token surfaces through the SDK.
 */
import OpenAI from 'openai';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createQwenFetch, qwenBaseURL } from '../client/qwen-fetch.js';
import type { TokenClient } from '../client/token-client.js';
import { QwenTokenExpiredError } from '../shared/errors.js';
import { fingerprint } from '../shared/fingerprint.js';
import { createFixture, credsFrom, type DaemonFixture } from './support/daemon.js';
import { INVALID_ACCESS_TOKEN_BODY } from './support/qwen-server.js';

let fx: DaemonFixture;
let client: TokenClient;

beforeAll(async () => {
  fx = await createFixture();
  fx.server.settings.resourceUrl = fx.server.baseUrl;
  await fx.writeOwn(credsFrom(fx.server));
  await fx.start();
  client = fx.client();
});

afterAll(async () => {
  await fx?.cleanup();
});

async function sdk(options: { maxRetries?: number } = {}): Promise<OpenAI> {
  return new OpenAI({
    apiKey: 'placeholder-never-sent',
    baseURL: await qwenBaseURL(client),
    fetch: createQwenFetch({ client }),
    maxRetries: options.maxRetries ?? 0,
  });
}

describe('openai SDK through createQwenFetch', () => {
  it('runs a chat completion with the daemon token and Qwen headers', async () => {
    const openai = await sdk();
    const token = (await client.getCredentials()).access_token;

    const completion = await openai.chat.completions.create({
      model: 'coder-model',
      messages: [{ role: 'user', content: 'hello from the sdk' }],
    });

    expect(completion.choices[0]?.message.content).toBe('echo: hello from the sdk');
    expect(completion.usage?.total_tokens).toBe(9);
    const h = fx.server.lastChatHeaders!;
    expect(fingerprint((h.authorization ?? '').replace(/^Bearer /, ''))).toBe(fingerprint(token));
    expect(h.authorization).not.toContain('placeholder-never-sent');
    expect(h['user-agent']).toMatch(/^qwen-tokend\//);
    expect(h['x-dashscope-authtype']).toBe('qwen-oauth');
    expect(h['x-dashscope-cachecontrol']).toBe('enable');
  });

  it('runs a streaming completion', async () => {
    const openai = await sdk();
    const stream = await openai.chat.completions.create({
      model: 'coder-model',
      messages: [{ role: 'user', content: 'stream me please' }],
      stream: true,
    });
    const deltas: string[] = [];
    for await (const chunk of stream) {
      const d = chunk.choices[0]?.delta?.content;
      if (d) deltas.push(d);
    }
    expect(deltas).toEqual(['echo: ', 'stream ', 'me ', 'please']);
  });

  it('a revoked token is refreshed once and the SDK never sees the 401', async () => {
    const openai = await sdk();
    fx.server.revokeAccessToken((await client.getCredentials()).access_token);
    const refreshes = fx.server.counts.refresh;

    const stream = await openai.chat.completions.create({
      model: 'coder-model',
      messages: [{ role: 'user', content: 'after revoke' }],
      stream: true,
    });
    let text = '';
    for await (const chunk of stream) text += chunk.choices[0]?.delta?.content ?? '';

    expect(text).toBe('echo: after revoke');
    expect(fx.server.counts.refresh).toBe(refreshes + 1);
  });

  it('a token rejected after the refresh reaches SDK users as the cause of its connection error, and SDK retries do not refresh again', async () => {
    const openai = await sdk({ maxRetries: 1 });
    fx.server.injectFault({
      kind: 'respond',
      endpoint: 'chat',
      status: 401,
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify(INVALID_ACCESS_TOKEN_BODY),
    });
    const refreshes = fx.server.counts.refresh;
    const chats = fx.server.counts.chat;

    let err: unknown;
    try {
      await openai.chat.completions.create({ model: 'coder-model', messages: [{ role: 'user', content: 'x' }] });
    } catch (e) {
      err = e;
    } finally {
      fx.server.clearFaults();
    }

    expect(err).toBeInstanceOf(OpenAI.APIConnectionError);
    expect((err as Error).cause).toBeInstanceOf(QwenTokenExpiredError);
    expect(fx.server.counts.refresh).toBe(refreshes + 1);
    // Attempt, retry after the refresh, then the SDK's own retry (which skips the refresh).
    expect(fx.server.counts.chat).toBe(chats + 3);
  });

  it('aborting an SDK stream closes the connection', async () => {
    const openai = await sdk();
    fx.server.settings.streamDelayMs = 100;
    const aborted = fx.server.abortedStreams;
    try {
      const stream = await openai.chat.completions.create({
        model: 'coder-model',
        messages: [{ role: 'user', content: 'a b c d e f g h' }],
        stream: true,
      });
      for await (const chunk of stream) {
        if (chunk.choices[0]?.delta?.content) break;
      }
    } finally {
      fx.server.settings.streamDelayMs = 0;
    }
    const deadline = Date.now() + 5_000;
    while (!(fx.server.abortedStreams === aborted + 1 && fx.server.openStreams === 0)) {
      if (Date.now() > deadline) throw new Error('the server never saw the stream closed');
      await new Promise((r) => setTimeout(r, 10));
    }
  });
});
