/**
 * Where `createQwenFetch` lets a credential go, and what it says about a refused one: redirects
 * (followed within the profile's origin only, body sent afresh), a request for another origin
 * (refused before anything is sent), an API key cut short in a server's message (never shown),
 * and which 403s lock a key out. Against the scripted daemon stand-in and local servers.
 */
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { checkApiKey } from '../client/cli/verify-key.js';
import { createQwenFetch, qwenBaseURL } from '../client/qwen-fetch.js';
import { TokenClient } from '../client/token-client.js';
import { QwenConfigError, QwenCredentialRejectedError } from '../shared/errors.js';
import { FakeProfileDaemon } from './support/fake-profile-daemon.js';
import { INVALID_API_KEY_BODY, startQwenServer, type QwenTestServer } from './support/qwen-server.js';
import { rejection, until } from './support/wait.js';

const KEY = 'sk-sp-safety-0123456789abcdef0123456789';
const WRONG_KEY = 'sk-sp-refused-fedcba9876543210fedcba98';
const OTHER_KEY = 'sk-sp-other-00112233445566778899aabbcc';

let server: QwenTestServer;
/** Another origin (another port): where a redirect or a stale base URL could take a credential. */
let elsewhere: QwenTestServer;
let daemon: FakeProfileDaemon;
const clients: TokenClient[] = [];

function client(): TokenClient {
  const c = new TokenClient({ socketPath: daemon.socketPath, autostart: false, env: {} });
  clients.push(c);
  return c;
}

/** How many of the key's first characters appear together in `text` (0 when none). */
function longestKeyPrefix(text: string, key: string): number {
  for (let n = key.length; n > 0; n--) if (text.includes(key.slice(0, n))) return n;
  return 0;
}

/** Any credential header `elsewhere` received. */
function credentialsElsewhere(): string[] {
  return elsewhere.requests.flatMap((r) => [r.headers.authorization, r.headers['x-api-key']].filter((v): v is string => v !== undefined));
}

const json = { 'content-type': 'application/json' };
const chatBody = (content: string, model = 'qwen3-coder-plus'): string => JSON.stringify({ model, messages: [{ role: 'user', content }] });

beforeAll(async () => {
  server = await startQwenServer({ apiKeys: [KEY] });
  elsewhere = await startQwenServer({ apiKeys: [KEY, OTHER_KEY] });
});
afterAll(async () => {
  await server.close();
  await elsewhere.close();
});
beforeEach(async () => {
  daemon = await FakeProfileDaemon.start(2);
  daemon.setKeyProfiles(server, KEY, WRONG_KEY);
  daemon.set('other', { kind: 'api-key', baseUrl: elsewhere.apiKeyBaseUrl, secret: OTHER_KEY });
  daemon.defaultProfile = 'cp';
  server.settings.apiKeyHeader = 'either';
});
afterEach(async () => {
  server.clearFaults();
  for (const c of clients.splice(0)) await c.close();
  await daemon.close();
});

describe('redirects', () => {
  it('a redirect to another origin is handed back as it came: neither x-api-key nor Authorization goes along', async () => {
    // A GET, so that Node 20's fetch (which cannot replay a POST body on a redirect) would follow it.
    const target = `${elsewhere.apiKeyBaseUrl}/models`;
    for (const profile of ['anthropic', 'cp']) {
      server.injectFault({ kind: 'respond', endpoint: 'apiModels', times: 1, status: 307, headers: { location: target }, body: '' });
      const seen = elsewhere.requests.length;
      const response = await createQwenFetch({ client: client(), profile })(`${server.apiKeyBaseUrl}/models`);
      // A count, not the values: a failure must not print a key.
      expect(credentialsElsewhere().length).toBe(0);
      expect(response.status).toBe(307);
      expect(response.headers.get('location')).toBe(target);
      expect(elsewhere.requests.length).toBe(seen);
    }
  });

  it('a 307 within the origin is followed with the credential and the body sent again', async () => {
    // Node 20's own redirect handling cannot send a buffered body twice.
    server.injectFault({ kind: 'respond', endpoint: 'apiChat', times: 1, status: 307, headers: { location: '/compatible-mode/v1/chat/completions' }, body: '' });
    const chats = server.counts.apiChat;
    const response = await createQwenFetch({ client: client(), profile: 'cp' })(`${server.apiKeyBaseUrl}/chat/completions`, {
      method: 'POST',
      headers: json,
      body: chatBody('after a redirect'),
    });
    expect(response.status).toBe(200);
    expect(((await response.json()) as { choices: Array<{ message: { content: string } }> }).choices[0]!.message.content).toBe('echo: after a redirect');
    expect(server.counts.apiChat).toBe(chats + 2);
    expect(server.lastRequest('apiChat')!.headers.authorization === `Bearer ${KEY}`).toBe(true);
  });

  it('a 303 within the origin continues as a GET with the credential, the body left behind', async () => {
    server.injectFault({ kind: 'respond', endpoint: 'apiChat', times: 1, status: 303, headers: { location: '/compatible-mode/v1/models' }, body: '' });
    const response = await createQwenFetch({ client: client(), profile: 'cp' })(`${server.apiKeyBaseUrl}/chat/completions`, {
      method: 'POST',
      headers: json,
      body: chatBody('x'),
    });
    expect(response.status).toBe(200);
    expect(((await response.json()) as { data: unknown[] }).data.length).toBeGreaterThan(0);
    const get = server.lastRequest('apiModels')!;
    expect(get.method).toBe('GET');
    expect(get.body).toBe('');
    expect(get.headers['content-type']).toBeUndefined();
    expect(get.headers.authorization === `Bearer ${KEY}`).toBe(true);
  });
});

describe('the credential goes to its own origin only', () => {
  it('after the default profile changes under a running SDK, the stale base URL gets nothing: a QwenConfigError says to pin the profile', async () => {
    const c = client();
    const base = await qwenBaseURL({ client: c });
    const qwenFetch = createQwenFetch({ client: c });
    const first = await qwenFetch(`${base}/chat/completions`, { method: 'POST', headers: json, body: chatBody('one') });
    expect(first.status).toBe(200);
    await first.text();

    await c.setDefaultProfile('other');
    await until(async () => (await c.getCredentials()).profile === 'other', 'the client to see the new default');
    const chats = server.requests.length;
    const err = await rejection(qwenFetch(`${base}/chat/completions`, { method: 'POST', headers: json, body: chatBody('two') }));
    expect(err).toBeInstanceOf(QwenConfigError);
    expect(err.message).toContain(server.baseUrl);
    expect(err.message).toContain(elsewhere.baseUrl);
    expect(err.message).toContain('profile "other"');
    expect(err.message).toContain("createQwenFetch({ profile: 'other' })");
    expect(err.message.includes(OTHER_KEY)).toBe(false);
    expect(server.requests.length).toBe(chats);
  });

  it('a pinned profile refuses a base URL of another origin, and sends nothing', async () => {
    const chats = server.requests.length;
    const err = await rejection(
      createQwenFetch({ client: client(), profile: 'other' })(`${server.apiKeyBaseUrl}/chat/completions`, { method: 'POST', headers: json, body: chatBody('x') }),
    );
    expect(err).toBeInstanceOf(QwenConfigError);
    expect(err.message).toContain("qwenBaseURL({ profile: 'other' })");
    expect(server.requests.length).toBe(chats);
  });
});

describe('a refused key in an error message', () => {
  it('is taken out before the message is cut, and a prefix of it the server cut is taken out too', async () => {
    // 174 characters first: an unredacted 200-character cut would leave 26 of the key's.
    const messages = [`${'x'.repeat(174)}${WRONG_KEY} is not valid`, `Incorrect API key provided: ${WRONG_KEY.slice(0, 24)}`];
    for (const message of messages) {
      server.injectFault({ kind: 'respond', endpoint: 'apiChat', times: 1, status: 401, headers: json, body: JSON.stringify({ error: { message } }) });
      const err = await rejection(
        createQwenFetch({ client: client(), profile: 'bad' })(`${server.apiKeyBaseUrl}/chat/completions`, { method: 'POST', headers: json, body: chatBody('x') }),
      );
      expect(err).toBeInstanceOf(QwenCredentialRejectedError);
      expect(err.message.includes('HTTP 401: ')).toBe(true);
      expect(longestKeyPrefix(err.message, WRONG_KEY)).toBeLessThan(8);
    }
  });

  it('profile add\'s key check shows no cut prefix of the key either', async () => {
    const fetch = async (): Promise<Response> =>
      new Response(JSON.stringify({ error: { message: `Incorrect API key provided: ${WRONG_KEY.slice(0, 24)}` } }), { status: 401, headers: json });
    const check = await checkApiKey(server.apiKeyBaseUrl, 'bearer', WRONG_KEY, { fetch });
    expect(check.outcome).toBe('rejected');
    // Booleans, not the text: a failing assertion must not print what is left of the key.
    expect((check.outcome === 'rejected' ? (check.message ?? '') : '').startsWith('Incorrect API key provided: [key ')).toBe(true);
    expect(longestKeyPrefix(JSON.stringify(check), WRONG_KEY)).toBeLessThan(8);
  });
});

describe('which 403s lock an API key out', () => {
  it('a 403 about one model goes to the caller as it came, and the key keeps working for other models', async () => {
    server.injectFault({
      kind: 'respond',
      endpoint: 'apiChat',
      times: 1,
      status: 403,
      headers: json,
      body: JSON.stringify({ error: { message: 'Model access denied.', type: 'invalid_request_error', code: 'model_access_denied' } }),
    });
    const qwenFetch = createQwenFetch({ client: client(), profile: 'cp' });
    const url = `${server.apiKeyBaseUrl}/chat/completions`;
    const chats = server.counts.apiChat;
    const denied = await qwenFetch(url, { method: 'POST', headers: json, body: chatBody('x', 'qwen-max-restricted') });
    expect(denied.status).toBe(403);
    expect(await denied.text()).toContain('Model access denied.');
    const allowed = await qwenFetch(url, { method: 'POST', headers: json, body: chatBody('y') });
    expect(allowed.status).toBe(200);
    await allowed.text();
    expect(server.counts.apiChat).toBe(chats + 2);
  });

  it('a 403 that says the key is invalid is a refused key, and a retry soon after is not sent', async () => {
    server.injectFault({ kind: 'respond', endpoint: 'apiChat', times: 1, status: 403, headers: json, body: JSON.stringify(INVALID_API_KEY_BODY) });
    const qwenFetch = createQwenFetch({ client: client(), profile: 'cp' });
    const url = `${server.apiKeyBaseUrl}/chat/completions`;
    const chats = server.counts.apiChat;
    expect(await rejection(qwenFetch(url, { method: 'POST', headers: json, body: chatBody('x') }))).toBeInstanceOf(QwenCredentialRejectedError);
    expect(await rejection(qwenFetch(url, { method: 'POST', headers: json, body: chatBody('y') }))).toBeInstanceOf(QwenCredentialRejectedError);
    expect(server.counts.apiChat).toBe(chats + 1);
  });
});
