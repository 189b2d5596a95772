/**
 * API-key profiles end to end: the real daemon holds the key, the client library hands it to
 * `createQwenFetch`, `QwenChatModel` and the `openai` SDK, and the local server's API-key
 * endpoints check it. A refused key is a clear error after one request, never a refresh loop;
 * a replaced key reaches running clients without a restart; the key never reaches a log.
 */
import { stat } from 'node:fs/promises';
import { dirname } from 'node:path';
import OpenAI from 'openai';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { QwenChatModel } from '../client/chat-model.js';
import { createQwenFetch, qwenBaseURL } from '../client/qwen-fetch.js';
import type { TokenClient } from '../client/token-client.js';
import { QwenCredentialRejectedError } from '../shared/errors.js';
import { fingerprint } from '../shared/fingerprint.js';
import { assertNoSecrets, createFixture, credsFrom, type DaemonFixture } from './support/daemon.js';
import { rejection, until } from './support/wait.js';

const KEY = 'sk-sp-daemon-test-0123456789abcdef01';
const NEW_KEY = 'sk-sp-daemon-next-abcdef0123456789ab';
const WRONG_KEY = 'sk-sp-daemon-wrong-99999999999999999';

let fx: DaemonFixture;
let client: TokenClient;

beforeAll(async () => {
  fx = await createFixture({ server: { apiKeys: [KEY, NEW_KEY] } });
  fx.server.settings.resourceUrl = fx.server.baseUrl;
  await fx.writeOwn(credsFrom(fx.server));
  await fx.start();
  client = fx.client();
  const base = fx.server.apiKeyBaseUrl;
  await client.addProfile({ name: 'cp', settings: { kind: 'api-key', base_url: base, preset: 'coding-plan', region: 'intl' }, secret: KEY });
  await client.addProfile({ name: 'bad', settings: { kind: 'api-key', base_url: base }, secret: WRONG_KEY });
  await client.addProfile({
    name: 'anthropic',
    settings: { kind: 'api-key', base_url: `${fx.server.baseUrl}/apps/anthropic`, auth: 'x-api-key' },
    secret: KEY,
  });
});

afterAll(async () => {
  const output = fx?.output.join('\n') ?? '';
  await fx?.cleanup();
  assertNoSecrets(output, [KEY, NEW_KEY, WRONG_KEY], 'daemon output');
});

describe('an api-key profile in the daemon', () => {
  it('is served as a static credential of its kind, and cached without expiry', async () => {
    const creds = await client.getCredentials({ profile: 'cp' });
    expect(creds).toMatchObject({ access_token: KEY, expiry_date: null, profile: 'cp', kind: 'api-key', auth_header: 'authorization', base_url: fx.server.apiKeyBaseUrl });
    const served = (await client.status()).requests_served;
    // A day of validity asked for: a key has no expiry, so the cache answers.
    expect(await client.getAccessToken({ profile: 'cp', minValidityMs: 24 * 3600_000 })).toBe(KEY);
    expect((await client.status()).requests_served).toBe(served + 1);
  });

  it('its key file is 0600 in a 0700 directory, and the config file does not hold the key', async () => {
    const info = (await client.listProfiles()).profiles.find((p) => p.name === 'cp')!;
    expect(info).toMatchObject({ kind: 'api-key', state: 'static', has_secret: true, secret_fingerprint: fingerprint(KEY) });
    expect(info.files.length).toBeGreaterThan(0);
    for (const file of info.files) {
      expect(((await stat(file)).mode & 0o777).toString(8)).toBe('600');
      expect(((await stat(dirname(file))).mode & 0o777).toString(8)).toBe('700');
    }
    const { readFile } = await import('node:fs/promises');
    const config = await readFile((await client.listProfiles()).config_path, 'utf8');
    expect(config).toContain('"cp"');
    expect(config.includes(KEY)).toBe(false);
  });

  it('createQwenFetch sends it as a Bearer token without the Qwen OAuth headers', async () => {
    const qwenFetch = createQwenFetch({ client, profile: 'cp' });
    const response = await qwenFetch(`${await qwenBaseURL({ client, profile: 'cp' })}/chat/completions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ model: 'qwen3-coder-plus', messages: [{ role: 'user', content: 'through the daemon' }] }),
    });
    expect(response.status).toBe(200);
    expect(await response.json()).toMatchObject({ choices: [{ message: { content: 'echo: through the daemon' } }] });
    const h = fx.server.lastRequest('apiChat')!.headers;
    expect(h.authorization === `Bearer ${KEY}`).toBe(true);
    expect(Object.keys(h).filter((k) => k.startsWith('x-dashscope'))).toEqual([]);
  });

  it('an x-api-key profile sends it in x-api-key to the Anthropic-style endpoint', async () => {
    const response = await createQwenFetch({ client, profile: 'anthropic' })(`${fx.server.baseUrl}/apps/anthropic/v1/messages`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', 'x-api-key': 'placeholder' },
      body: JSON.stringify({ model: 'qwen-plus', max_tokens: 16, messages: [{ role: 'user', content: 'hello anthropic' }] }),
    });
    expect(response.status).toBe(200);
    expect(await response.json()).toMatchObject({ content: [{ type: 'text', text: 'echo: hello anthropic' }] });
    const h = fx.server.lastRequest('apiMessages')!.headers;
    expect(h['x-api-key'] === KEY).toBe(true);
    expect(h.authorization).toBeUndefined();
  });

  it('QwenChatModel calls and streams with any model name the profile serves', async () => {
    const model = new QwenChatModel({ client, profile: 'cp', modelName: 'qwen-plus' });
    expect((await model.call('plan call')).text).toBe('echo: plan call');
    let streamed = '';
    for await (const d of model.stream('plan stream')) streamed += d;
    expect(streamed).toBe('echo: plan stream');
    expect(fx.server.lastRequest('apiChat')!.json).toMatchObject({ model: 'qwen-plus', stream: true });
  });

  it('the openai SDK lists the models and completes with the key', async () => {
    const openai = new OpenAI({ apiKey: 'placeholder-never-sent', baseURL: await qwenBaseURL({ client, profile: 'cp' }), fetch: createQwenFetch({ client, profile: 'cp' }) });
    expect((await openai.models.list()).data.map((m) => m.id)).toEqual(['qwen3-coder-plus', 'qwen-plus']);
    const completion = await openai.chat.completions.create({ model: 'qwen3-coder-plus', messages: [{ role: 'user', content: 'sdk to plan' }] });
    expect(completion.choices[0]?.message.content).toBe('echo: sdk to plan');
  });

  it('a refused key: QwenCredentialRejectedError naming the profile, one request with the SDK retrying, no refresh in the daemon', async () => {
    const openai = new OpenAI({ apiKey: 'placeholder', baseURL: fx.server.apiKeyBaseUrl, fetch: createQwenFetch({ client, profile: 'bad' }), maxRetries: 2 });
    const chats = fx.server.counts.apiChat;
    const logLines = fx.output.length;
    const err = await rejection(openai.chat.completions.create({ model: 'qwen-plus', messages: [{ role: 'user', content: 'x' }] }));
    expect(err).toBeInstanceOf(OpenAI.APIConnectionError);
    const cause = err.cause as Error;
    expect(cause).toBeInstanceOf(QwenCredentialRejectedError);
    expect(cause.message).toContain('rejected the API key of profile "bad" (HTTP 401: Incorrect API key provided.');
    expect(cause.message).toContain('profile add bad --replace');
    expect(cause.message).not.toContain(WRONG_KEY);
    expect(fx.server.counts.apiChat).toBe(chats + 1);
    // The daemon was not asked to refresh anything (a key has nothing to refresh).
    expect(fx.logs().slice(logLines).filter((l) => /refresh/i.test(l.msg))).toEqual([]);

    const model = new QwenChatModel({ client, profile: 'bad', modelName: 'qwen-plus' });
    expect(await rejection(model.call('again'))).toBeInstanceOf(QwenCredentialRejectedError);
    expect(fx.server.counts.apiChat).toBe(chats + 1);
  });

  it('a replaced key reaches a running client without a restart, and a fetch that was refused works at once', async () => {
    const qwenFetch = createQwenFetch({ client, profile: 'bad' });
    const send = () =>
      qwenFetch(`${fx.server.apiKeyBaseUrl}/chat/completions`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ model: 'qwen-plus', messages: [{ role: 'user', content: 'after replace' }] }),
      });
    expect(await rejection(send())).toBeInstanceOf(QwenCredentialRejectedError);
    const other = fx.client();
    await other.addProfile({ name: 'bad', settings: { kind: 'api-key', base_url: fx.server.apiKeyBaseUrl }, secret: NEW_KEY, replace: true });
    await until(async () => (await client.getAccessToken({ profile: 'bad' })) === NEW_KEY, 'the new key in the first client');
    const response = await send();
    expect(response.status).toBe(200);
    expect(fx.server.lastRequest('apiChat')!.headers.authorization === `Bearer ${NEW_KEY}`).toBe(true);
  });

  it('the default profile is still the Qwen OAuth one, with its headers', async () => {
    const creds = await client.getCredentials();
    expect(creds).toMatchObject({ profile: 'qwen', kind: 'qwen-oauth' });
    expect(creds.expiry_date).toBeGreaterThan(Date.now());
    const model = new QwenChatModel({ client });
    expect((await model.call('oauth still')).text).toBe('echo: oauth still');
    expect(fx.server.lastChatHeaders!['x-dashscope-authtype']).toBe('qwen-oauth');
  });
});
