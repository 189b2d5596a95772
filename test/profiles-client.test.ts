/**
 * Profiles on the client side, against a scripted stand-in for the daemon (protocol 2, and 1):
 * one cache and push stream per profile, the version-1 fallback, API keys through
 * `createQwenFetch`, `QwenChatModel` and the real `openai` SDK against the local server's
 * API-key endpoints, and the CLI's `profile` commands (key from stdin, `--key-env`, a refused key,
 * never on argv). The same against the real daemon: profiles-cli.daemon.test.ts.
 */
import { PassThrough } from 'node:stream';
import OpenAI from 'openai';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { QwenChatModel } from '../client/chat-model.js';
import { parseProfileName, PROFILE_NAME_RULE } from '../client/cli/context.js';
import { ExitCodes, exitCodeFor, hintFor } from '../client/cli/exit-codes.js';
import { profileBaseUrl } from '../client/cli/gateway.js';
import { cleanSecret, promptHidden, readSecret } from '../client/cli/secret-input.js';
import { formatProfileLines, formatStatus } from '../client/cli/status.js';
import { checkApiKey } from '../client/cli/verify-key.js';
import { createQwenFetch, qwenBaseURL } from '../client/qwen-fetch.js';
import { TokenClient } from '../client/token-client.js';
import {
  QwenChatApiError,
  QwenConfigError,
  QwenCredentialRejectedError,
  QwenProfileNotFoundError,
  QwenProtocolError,
  QwenRefreshTokenInvalidError,
  QwenTokenNotAvailableError,
} from '../shared/errors.js';
import { fingerprint } from '../shared/fingerprint.js';
import { PROFILE_NAME_PATTERN, type ProfileInfo } from '../shared/profiles.js';
import type { StatusResult } from '../shared/protocol.js';
import { runCli as runCliProcess } from './support/cli-run.js';
import { CLI_BIN } from './support/daemon.js';
import { FakeProfileDaemon } from './support/fake-profile-daemon.js';
import { startQwenServer, type QwenTestServer } from './support/qwen-server.js';
import { rejection } from './support/wait.js';

const KEY = 'sk-sp-test-0123456789abcdef0123456789';
const WRONG_KEY = 'sk-sp-wrong-fedcba9876543210fedcba98';

let daemon: FakeProfileDaemon;
const clients: TokenClient[] = [];

function client(options: ConstructorParameters<typeof TokenClient>[0] = {}): TokenClient {
  const c = new TokenClient({ socketPath: daemon.socketPath, autostart: false, env: {}, ...options });
  clients.push(c);
  return c;
}

afterEach(async () => {
  for (const c of clients.splice(0)) await c.close();
});

describe('TokenClient against a protocol-2 daemon', () => {
  beforeEach(async () => {
    daemon = await FakeProfileDaemon.start(2);
    daemon.set('cp', { kind: 'api-key', baseUrl: 'https://coding-intl.dashscope.aliyuncs.com/v1', secret: KEY });
    daemon.set('corp', { kind: 'oauth-device', baseUrl: 'https://llm.example.com/v1', secret: 'tok_corp_first_0000' });
  });
  afterEach(async () => {
    await daemon.close();
  });

  it('says protocol 2 in hello and subscribes to every profile', async () => {
    const c = client();
    await c.getAccessToken();
    expect(daemon.calls('hello')[0]!.params).toMatchObject({ protocol: 2 });
    expect(daemon.calls('subscribe')[0]!.params).toEqual({});
    expect(c.protocol).toBe(2);
  });

  it('an API key is served with its profile and kind, expiry null, and answered from memory afterwards', async () => {
    const c = client();
    const creds = await c.getCredentials({ profile: 'cp' });
    expect(creds).toMatchObject({ access_token: KEY, expiry_date: null, profile: 'cp', kind: 'api-key', auth_header: 'authorization' });
    expect(await c.getAccessToken({ profile: 'cp', minValidityMs: 24 * 3600_000 })).toBe(KEY);
    expect(daemon.calls('getAccessToken', 'cp')).toHaveLength(1);
    // The default profile is another cache slot: its first call goes to the daemon, without a profile.
    expect(await c.getAccessToken()).toBe('qat_fake_qwen_token_0001');
    expect(daemon.calls('getAccessToken', null)).toHaveLength(1);
  });

  it('takes the profile from QWEN_TOKEND_PROFILE, then the client option, then the call', async () => {
    const fromEnv = client({ env: { QWEN_TOKEND_PROFILE: 'cp' } });
    expect(fromEnv.profile).toBe('cp');
    expect(await fromEnv.getAccessToken()).toBe(KEY);
    const fromOption = client({ env: { QWEN_TOKEND_PROFILE: 'cp' }, profile: 'corp' });
    expect(await fromOption.getAccessToken()).toBe('tok_corp_first_0000');
    expect(await fromOption.getAccessToken({ profile: 'qwen' })).toBe('qat_fake_qwen_token_0001');
    expect(daemon.calls('getAccessToken').map((r) => r.params.profile)).toEqual(['cp', 'corp', 'qwen']);
  });

  it('refuses a malformed profile name without showing it', () => {
    let err: unknown;
    try {
      client({ env: { QWEN_TOKEND_PROFILE: 'Not A Name sk-secret' } });
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(QwenConfigError);
    expect((err as Error).message).toContain('QWEN_TOKEND_PROFILE is not a profile name');
    expect((err as Error).message).not.toContain('sk-secret');
  });

  it("a push updates that profile's cache only", async () => {
    const c = client();
    await c.getAccessToken({ profile: 'corp' });
    await c.getAccessToken({ profile: 'cp' });
    await c.getAccessToken();
    const before = daemon.requests.length;
    const pushed = new Promise((resolve) => c.once('token.refreshed', resolve));
    const fresh = daemon.rotate('corp');
    await pushed;
    expect(await c.getAccessToken({ profile: 'corp' })).toBe(fresh);
    expect(await c.getAccessToken({ profile: 'cp' })).toBe(KEY);
    expect(await c.getAccessToken()).toBe('qat_fake_qwen_token_0001');
    expect(daemon.requests.length).toBe(before);
  });

  it("a push about the default profile, by name, replaces the cache of calls that named none", async () => {
    const c = client();
    await c.getAccessToken();
    const pushed = new Promise((resolve) => c.once('token.refreshed', resolve));
    const fresh = daemon.rotate('qwen');
    await pushed;
    const before = daemon.requests.length;
    expect(await c.getAccessToken()).toBe(fresh);
    expect(daemon.requests.length).toBe(before);
  });

  it("a subscribed client that has asked nothing yet takes its default profile's and its own profile's pushes into its caches", async () => {
    const plain = client();
    const own = client({ profile: 'corp' });
    await Promise.all([plain.subscribe(), own.subscribe()]);
    const pushes = Promise.all([plain, own].flatMap((c) => [new Promise((r) => c.once('token.refreshed', r))]));
    const qwenToken = daemon.rotate('qwen');
    await pushes;
    const corpPushes = Promise.all([plain, own].map((c) => new Promise((r) => c.once('token.refreshed', r))));
    const corpToken = daemon.rotate('corp');
    await corpPushes;
    const before = daemon.calls('getAccessToken').length;
    expect(await plain.getAccessToken()).toBe(qwenToken);
    expect(await own.getAccessToken()).toBe(corpToken);
    expect(daemon.calls('getAccessToken').length).toBe(before);
  });

  it('a state change to no_credentials drops that profile only; profiles.changed drops all', async () => {
    const c = client();
    await c.getAccessToken({ profile: 'corp' });
    await c.getAccessToken({ profile: 'cp' });
    const changed = new Promise((resolve) => c.once('state.changed', resolve));
    daemon.push('state.changed', { profile: 'corp', state: 'no_credentials', previous: 'valid' });
    await changed;
    const before = daemon.calls('getAccessToken').length;
    await c.getAccessToken({ profile: 'cp' });
    expect(daemon.calls('getAccessToken').length).toBe(before);
    await c.getAccessToken({ profile: 'corp' });
    expect(daemon.calls('getAccessToken').length).toBe(before + 1);

    const profilesChanged = new Promise((resolve) => c.once('profiles.changed', resolve));
    daemon.push('profiles.changed', { profiles: ['qwen', 'cp', 'corp'], default_profile: 'qwen' });
    await profilesChanged;
    await c.getAccessToken({ profile: 'cp' });
    expect(daemon.calls('getAccessToken').length).toBe(before + 2);
  });

  it('an unknown profile is QwenProfileNotFoundError', async () => {
    const err = await rejection(client().getAccessToken({ profile: 'nope' }));
    expect(err).toBeInstanceOf(QwenProfileNotFoundError);
  });

  it('lists, adds and removes profiles', async () => {
    const c = client();
    const added = await c.addProfile({ name: 'ds', settings: { kind: 'api-key', base_url: 'https://dashscope.aliyuncs.com/compatible-mode/v1' }, secret: KEY });
    expect(added.profile).toMatchObject({ name: 'ds', kind: 'api-key', has_secret: true, secret_fingerprint: fingerprint(KEY) });
    expect(JSON.stringify(added)).not.toContain(KEY);
    expect((await c.listProfiles()).profiles.map((p) => p.name)).toEqual(['qwen', 'cp', 'corp', 'ds']);
    expect(await c.removeProfile('ds')).toMatchObject({ removed: true });
  });
});

describe('TokenClient against a protocol-1 daemon', () => {
  beforeEach(async () => {
    daemon = await FakeProfileDaemon.start(1);
  });
  afterEach(async () => {
    await daemon.close();
  });

  it('serves the default profile, and `qwen` by name, with no profile on the wire', async () => {
    const c = client();
    expect(await c.getAccessToken()).toBe('qat_fake_qwen_token_0001');
    expect(c.protocol).toBe(1);
    expect(await c.getAccessToken({ profile: 'qwen', noCache: true })).toBe('qat_fake_qwen_token_0001');
    expect((await c.status()).state).toBe('valid');
    expect(daemon.requests.every((r) => r.params.profile === undefined)).toBe(true);
  });

  it('another profile is a QwenProtocolError saying to restart the daemon, and nothing is sent', async () => {
    const c = client({ env: { QWEN_TOKEND_PROFILE: 'cp' } });
    const err = await rejection(c.getAccessToken());
    expect(err).toBeInstanceOf(QwenProtocolError);
    expect(err.message).toMatch(/protocol 1.*profile "cp".*restart the daemon after upgrading/);
    expect(daemon.calls('getAccessToken')).toHaveLength(0);
    const list = await rejection(client().listProfiles());
    expect(list).toBeInstanceOf(QwenProtocolError);
    expect(daemon.calls('profiles.list')).toHaveLength(0);
  });

  it('a pushed token without a profile replaces the default cache, also when it was asked for as `qwen`', async () => {
    const c = client();
    await c.getAccessToken({ profile: 'qwen' });
    await c.getAccessToken();
    const pushed = new Promise((resolve) => c.once('token.refreshed', resolve));
    const fresh = daemon.rotate('qwen');
    await pushed;
    const before = daemon.requests.length;
    expect(await c.getAccessToken({ profile: 'qwen' })).toBe(fresh);
    expect(await c.getAccessToken()).toBe(fresh);
    expect(daemon.requests.length).toBe(before);
  });
});

describe('a daemon of a newer protocol', () => {
  beforeEach(async () => {
    daemon = await FakeProfileDaemon.start(3);
  });
  afterEach(async () => {
    await daemon.close();
  });

  it('is refused by name', async () => {
    const err = await rejection(client().getAccessToken());
    expect(err).toBeInstanceOf(QwenProtocolError);
    expect(err.message).toContain('speaks protocol 3, this client 1 to 2');
  });
});

describe('api-key profiles against the local API-key server', () => {
  let server: QwenTestServer;

  beforeAll(async () => {
    server = await startQwenServer({ apiKeys: [KEY] });
  });
  afterAll(async () => {
    await server.close();
  });
  beforeEach(async () => {
    daemon = await FakeProfileDaemon.start(2);
    daemon.setKeyProfiles(server, KEY, WRONG_KEY);
    server.settings.apiKeyHeader = 'either';
  });
  afterEach(async () => {
    server.clearFaults();
    await daemon.close();
  });

  const chatBody = (content: string, model = 'qwen3-coder-plus') => JSON.stringify({ model, messages: [{ role: 'user', content }] });

  it('createQwenFetch sends the key as a Bearer token, without the Qwen OAuth headers, replacing a caller header', async () => {
    const c = client();
    const qwenFetch = createQwenFetch({ client: c, profile: 'cp' });
    const response = await qwenFetch(`${await qwenBaseURL({ client: c, profile: 'cp' })}/chat/completions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', authorization: 'Bearer placeholder', 'x-api-key': 'placeholder' },
      body: chatBody('hello key'),
    });
    expect(response.status).toBe(200);
    expect(((await response.json()) as { choices: Array<{ message: { content: string } }> }).choices[0]!.message.content).toBe('echo: hello key');
    const h = server.lastRequest('apiChat')!.headers;
    expect(h.authorization === `Bearer ${KEY}`).toBe(true);
    expect(h['x-api-key']).toBeUndefined();
    expect(Object.keys(h).filter((k) => k.startsWith('x-dashscope'))).toEqual([]);
    expect(h['user-agent']).toMatch(/^qwen-tokend\//);
  });

  it('createQwenFetch sends an x-api-key profile\'s key in x-api-key only (the Anthropic shape)', async () => {
    server.settings.apiKeyHeader = 'x-api-key';
    const c = client();
    const qwenFetch = createQwenFetch({ client: c, profile: 'anthropic' });
    const response = await qwenFetch(`${await qwenBaseURL({ client: c, profile: 'anthropic' })}/v1/messages`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ model: 'qwen3-coder-plus', max_tokens: 10, messages: [{ role: 'user', content: 'hi there' }] }),
    });
    expect(response.status).toBe(200);
    expect(await response.json()).toMatchObject({ type: 'message', content: [{ type: 'text', text: 'echo: hi there' }] });
    const h = server.lastRequest('apiMessages')!.headers;
    expect(h['x-api-key'] === KEY).toBe(true);
    expect(h.authorization).toBeUndefined();
  });

  it('a refused key is QwenCredentialRejectedError naming the profile and the fix; one request, no refresh, and a retry soon after is not sent', async () => {
    const c = client();
    const qwenFetch = createQwenFetch({ client: c, profile: 'bad' });
    const chats = server.counts.apiChat;
    const url = `${server.apiKeyBaseUrl}/chat/completions`;
    const err = await rejection(qwenFetch(url, { method: 'POST', headers: { 'content-type': 'application/json' }, body: chatBody('x') }));
    expect(err).toBeInstanceOf(QwenCredentialRejectedError);
    expect(err.message).toContain('profile "bad"');
    expect(err.message).toContain('HTTP 401');
    expect(err.message).toContain('qwen-token profile add bad --replace');
    expect(err.message).toContain(fingerprint(WRONG_KEY));
    expect(err.message).not.toContain(WRONG_KEY);
    expect(server.counts.apiChat).toBe(chats + 1);
    expect(daemon.calls('refresh')).toHaveLength(0);
    // An SDK retry, or a loop, with the same key: refused here, not sent again.
    const again = await rejection(qwenFetch(url, { method: 'POST', headers: { 'content-type': 'application/json' }, body: chatBody('y') }));
    expect(again).toBeInstanceOf(QwenCredentialRejectedError);
    expect(server.counts.apiChat).toBe(chats + 1);
    expect(exitCodeFor(again)).toBe(ExitCodes.credentialRejected);
  });

  it('a 403 about quota is handed to the caller as it is, once', async () => {
    server.injectFault({
      kind: 'respond',
      endpoint: 'apiChat',
      times: 1,
      status: 403,
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ error: { code: 'insufficient_quota', message: 'You exceeded your current quota' } }),
    });
    const chats = server.counts.apiChat;
    const response = await createQwenFetch({ client: client(), profile: 'cp' })(`${server.apiKeyBaseUrl}/chat/completions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: chatBody('x'),
    });
    expect(response.status).toBe(403);
    expect(await response.text()).toContain('insufficient_quota');
    expect(server.counts.apiChat).toBe(chats + 1);
  });

  it('QwenChatModel takes any model name for an api-key profile, and calls and streams with the key', async () => {
    const model = new QwenChatModel({ client: client(), profile: 'cp', modelName: 'qwen3-coder-plus' });
    expect((await model.call('one two')).text).toBe('echo: one two');
    const deltas: string[] = [];
    for await (const d of model.stream('three four')) deltas.push(d);
    expect(deltas.join('')).toBe('echo: three four');
    expect(server.lastRequest('apiChat')!.json).toMatchObject({ model: 'qwen3-coder-plus', stream: true });
    expect(server.lastRequest('apiChat')!.headers.authorization === `Bearer ${KEY}`).toBe(true);

    // Not checked here: the server decides (and says no).
    const other = new QwenChatModel({ client: client(), profile: 'cp', modelName: 'qwen-unknown' });
    const err = await rejection(other.call('x'));
    expect(err).toBeInstanceOf(QwenChatApiError);
    expect(err.message).toContain('the chat API of profile "cp" answered HTTP 400');
  });

  it('QwenChatModel needs a model name for an api-key profile, and checks the portal names for `qwen` at once', async () => {
    const unnamed = new QwenChatModel({ client: client(), profile: 'cp' });
    const err = await rejection(unnamed.call('x'));
    expect(err).toBeInstanceOf(QwenConfigError);
    expect(err.message).toContain('profile "cp" (api-key) has no default model: pass modelName');
    expect(() => new QwenChatModel({ client: client(), profile: 'qwen', modelName: 'qwen3-coder-plus' })).toThrow(QwenConfigError);
    // Naming none, the daemon's default decides: here Qwen OAuth, so the portal's names, at the first call.
    const byDefault = new QwenChatModel({ client: client(), modelName: 'qwen3-coder-plus' });
    const wrong = await rejection(byDefault.call('x'));
    expect(wrong).toBeInstanceOf(QwenConfigError);
    expect(wrong.message).toContain('coder-model');
  });

  it('QwenChatModel with a refused key fails with QwenCredentialRejectedError after one request', async () => {
    const chats = server.counts.apiChat;
    const err = await rejection(new QwenChatModel({ client: client(), profile: 'bad', modelName: 'qwen3-coder-plus' }).call('x'));
    expect(err).toBeInstanceOf(QwenCredentialRejectedError);
    expect(server.counts.apiChat).toBe(chats + 1);
  });

  it('the openai SDK lists models and completes with the key; a refused key reaches it once, SDK retries included', async () => {
    const c = client();
    const sdk = (profile: string) =>
      new OpenAI({ apiKey: 'placeholder-never-sent', baseURL: server.apiKeyBaseUrl, fetch: createQwenFetch({ client: c, profile }), maxRetries: 2 });
    const models = await sdk('cp').models.list();
    expect(models.data.map((m) => m.id)).toEqual(['qwen3-coder-plus', 'qwen-plus']);
    const completion = await sdk('cp').chat.completions.create({ model: 'qwen-plus', messages: [{ role: 'user', content: 'from the sdk' }] });
    expect(completion.choices[0]?.message.content).toBe('echo: from the sdk');
    expect(server.lastRequest('apiChat')!.headers.authorization).not.toContain('placeholder');

    const chats = server.counts.apiChat;
    const err = await rejection(sdk('bad').chat.completions.create({ model: 'qwen-plus', messages: [{ role: 'user', content: 'x' }] }));
    expect(err).toBeInstanceOf(OpenAI.APIConnectionError);
    expect(err.cause).toBeInstanceOf(QwenCredentialRejectedError);
    expect(server.counts.apiChat).toBe(chats + 1);
  });
});

describe('CLI pieces', () => {
  it("the CLI's profile-name rule is the shared one", () => {
    expect(PROFILE_NAME_RULE.source).toBe(PROFILE_NAME_PATTERN.source);
    expect(parseProfileName('coding-plan_2')).toBe('coding-plan_2');
    expect(() => parseProfileName('Coding')).toThrow(/profile name/);
  });

  it('new errors have their exit codes and hints', () => {
    expect(exitCodeFor(new QwenProfileNotFoundError('no'))).toBe(6);
    expect(exitCodeFor(new QwenCredentialRejectedError('no'))).toBe(7);
    expect(hintFor(new QwenProfileNotFoundError('there is no profile "x"'))).toMatch(/profile list/);
    // The daemon's own advice for a profile is not contradicted by the built-in profile's login.
    expect(hintFor(new QwenTokenNotAvailableError('profile "cp": it has no API key; run `qwen-token profile add cp --replace ...`'))).toBeUndefined();
    expect(hintFor(new QwenRefreshTokenInvalidError('the login expired: run `qwen-token login --profile corp`'))).toBeUndefined();
    expect(hintFor(new QwenTokenNotAvailableError('not logged in'))).toMatch(/login/);
  });

  it('gateway env --profile: the base URL with /p/NAME/v1', () => {
    expect(profileBaseUrl('http://127.0.0.1:8417/v1', 'cp')).toBe('http://127.0.0.1:8417/p/cp/v1');
  });

  const info = (over: Partial<ProfileInfo>): ProfileInfo => ({
    name: 'x',
    kind: 'api-key',
    builtin: false,
    default: false,
    settings: {},
    base_url: 'https://example.com/v1',
    has_secret: true,
    secret_fingerprint: 'abcd…ef01',
    state: 'static',
    expiry_date: null,
    next_refresh_at: null,
    last_error: null,
    files: [],
    ...over,
  });

  it('one line per profile: default marker, name, kind, state, expiry or static', () => {
    const now = 1_000_000;
    const text = formatProfileLines(
      [
        info({ name: 'qwen', kind: 'qwen-oauth', builtin: true, default: true, state: 'valid', expiry_date: now + 3_600_000 }),
        info({ name: 'coding', kind: 'api-key' }),
      ],
      now,
    );
    expect(text).toBe('* qwen    qwen-oauth  valid   expires in 1h\n  coding  api-key     static  static\n');
  });

  it('status of an api-key profile shows it as static with the key fingerprint and its files, and lists every profile', () => {
    const s = {
      state: 'static',
      expiry_date: null,
      next_refresh_at: null,
      last_refresh_at: null,
      last_error: null,
      retry_count: 0,
      source_file: null,
      token_path: '/t/qwen.json',
      qwen_cli_link: { enabled: true, path: '/q' },
      token_fingerprint: 'abcd…ef01',
      refresh_token_fingerprint: 'none',
      login_in_progress: false,
      pid: 1,
      version: '1',
      protocol: 2,
      uptime_ms: 1,
      connected_clients: 1,
      requests_served: 1,
      socket_path: '/s',
      now: 0,
      profile: 'coding',
      kind: 'api-key',
      default_profile: 'coding',
      profiles: [info({ name: 'qwen', kind: 'qwen-oauth', builtin: true, state: 'no_credentials' }), info({ name: 'coding', default: true, files: ['/p/coding.json'] })],
      config_path: '/c/config.json',
      config_error: null,
    } satisfies StatusResult;
    const text = formatStatus(s, { profiles: true });
    expect(text).toMatch(/^profile +coding \(api-key, the default\)$/m);
    expect(text).toMatch(/^state +static/m);
    expect(text).toMatch(/^key +fingerprint abcd…ef01$/m);
    expect(text).toMatch(/^files +\/p\/coding\.json$/m);
    expect(text).not.toMatch(/Qwen CLI link|next refresh/);
    expect(text).toContain('profiles (* default):\n  qwen    qwen-oauth  no_credentials  none\n* coding  api-key     static          static\n');
  });
});

describe('reading a secret', () => {
  it('from the environment variable --key-env names; an unset one is an error naming it', async () => {
    expect(await readSecret({ what: 'API key', keyEnv: 'MY_KEY', env: { MY_KEY: ` ${KEY}\n` } })).toBe(KEY);
    await expect(readSecret({ what: 'API key', keyEnv: 'MY_KEY', env: {} })).rejects.toThrow(/MY_KEY \(--key-env\) is not set/);
    await expect(readSecret({ what: 'API key', keyEnv: 'sk-abc=1', env: {} })).rejects.toThrow(/NAME of an environment variable/);
  });

  it('from standard input when it is not a terminal, line end dropped; two words refused', async () => {
    const pipe = () => {
      const s = new PassThrough();
      return s;
    };
    const one = pipe();
    const got = readSecret({ what: 'API key', stdin: one });
    one.end(`${KEY}\r\n`);
    expect(await got).toBe(KEY);
    const two = pipe();
    const bad = readSecret({ what: 'API key', stdin: two });
    two.end(`${KEY} extra\n`);
    await expect(bad).rejects.toThrow(/spaces, line breaks or control characters/);
    const none = pipe();
    const empty = readSecret({ what: 'API key', stdin: none });
    none.end('');
    await expect(empty).rejects.toThrow(/no API key in standard input/);
    expect(() => cleanSecret('   ', 'API key', 'x')).toThrow(/no API key in x/);
  });

  it('from a terminal without echo: raw mode on and off, edits applied, arrow keys dropped, nothing typed written', async () => {
    const input = Object.assign(new PassThrough(), { isTTY: true, modes: [] as boolean[], setRawMode(mode: boolean) {
      this.modes.push(mode);
      return this;
    } });
    const written: string[] = [];
    const output = new PassThrough();
    output.on('data', (c: Buffer) => written.push(c.toString()));
    const typed = promptHidden('API key (input hidden): ', input, output);
    input.write('sk-x');
    input.write('\u001b[D'); // left arrow
    input.write('yz\u007f'); // backspace
    input.write('Q\r');
    expect(await typed).toBe('sk-xyQ');
    expect(input.modes).toEqual([true, false]);
    expect(written.join('')).toBe('API key (input hidden): \n');
  });
});

describe('checking a key with GET /models', () => {
  let server: QwenTestServer;
  beforeAll(async () => {
    server = await startQwenServer({ apiKeys: [KEY] });
  });
  afterAll(async () => {
    await server.close();
  });

  it('accepted, refused, no model list, unreachable', async () => {
    expect(await checkApiKey(server.apiKeyBaseUrl, 'bearer', KEY)).toEqual({ outcome: 'accepted', status: 200, models: 2 });
    expect(await checkApiKey(server.apiKeyBaseUrl, 'bearer', WRONG_KEY)).toEqual({ outcome: 'rejected', status: 401, message: 'Incorrect API key provided.' });
    expect(await checkApiKey(`${server.baseUrl}/nowhere/v1`, 'x-api-key', KEY)).toMatchObject({ outcome: 'other', status: 404 });
    const closed = await startQwenServer();
    const url = closed.apiKeyBaseUrl;
    await closed.close();
    expect(await checkApiKey(url, 'bearer', KEY)).toMatchObject({ outcome: 'unreachable', reason: expect.stringMatching(/ECONNREFUSED/) });
  });
});

// ---- the CLI as a child process, against the stand-in ----

/** Runs the CLI against the stand-in, scanning every process's argv while it runs. */
function runCli(args: string[], options: { stdin?: string; env?: Record<string, string> } = {}) {
  const env = { PATH: process.env.PATH ?? '', HOME: daemon.dir, QWEN_TOKEND_SOCKET: daemon.socketPath, QWEN_TOKEND_AUTOSTART: '0', ...options.env };
  return runCliProcess(args, { env, ...(options.stdin === undefined ? {} : { stdin: options.stdin }) });
}

describe('qwen-token profile against the stand-in daemon', () => {
  let server: QwenTestServer;
  beforeAll(async () => {
    server = await startQwenServer({ apiKeys: [KEY] });
  });
  afterAll(async () => {
    await server.close();
  });
  beforeEach(async () => {
    daemon = await FakeProfileDaemon.start(2);
    server.clearFaults();
  });
  afterEach(async () => {
    await daemon.close();
  });

  /** Slows GET /models so the argv scan sees the CLI while it holds the key. */
  const slowModels = () => server.injectFault({ kind: 'delay', endpoint: 'apiModels', delayMs: 300, times: 1 });

  it('profile add reads the key from standard input, checks it once, stores it; argv never holds it', async () => {
    slowModels();
    const models = server.counts.apiModels;
    const r = await runCli(['profile', 'add', 'cp', '--kind', 'api-key', '--base-url', server.apiKeyBaseUrl, '--default'], { stdin: `${KEY}\n` });
    expect(r.stderr).toContain('Checked the key');
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/^Added profile cp \(api-key, http:\/\/127\.0\.0\.1:\d+\/compatible-mode\/v1; secret [0-9a-f]{4}…[0-9a-f]{4}\)\. It is the default profile\.$/m);
    expect(daemon.profiles.get('cp')?.secret === KEY).toBe(true);
    expect(daemon.defaultProfile).toBe('cp');
    expect(server.counts.apiModels).toBe(models + 1);
    expect(server.lastRequest('apiModels')!.headers.authorization === `Bearer ${KEY}`).toBe(true);
    expect(r.argvSeen.some((a) => a.includes(CLI_BIN) && a.includes('profile add cp'))).toBe(true);
    expect(r.argvSeen.filter((a) => a.includes(KEY))).toEqual([]);
    expect(r.stdout + r.stderr).not.toContain(KEY);
  });

  it('profile add --key-env reads the variable the name points to; only the name is on argv', async () => {
    slowModels();
    const r = await runCli(['profile', 'add', 'ds', '--preset', 'dashscope', '--base-url', server.apiKeyBaseUrl, '--key-env', 'DASHSCOPE_API_KEY'], {
      env: { DASHSCOPE_API_KEY: KEY },
    });
    expect(r.code).toBe(0);
    expect(daemon.profiles.get('ds')?.secret === KEY).toBe(true);
    expect(daemon.profiles.get('ds')?.settings).toMatchObject({ kind: 'api-key', preset: 'dashscope', region: 'singapore', base_url: server.apiKeyBaseUrl });
    expect(r.argvSeen.filter((a) => a.includes(KEY))).toEqual([]);
    expect(r.stdout + r.stderr).not.toContain(KEY);
  });

  it('a refused key is not stored: exit 7, the profile and the plan/region hint named, one request', async () => {
    const models = server.counts.apiModels;
    const r = await runCli(['profile', 'add', 'cp', '--preset', 'coding-plan', '--base-url', server.apiKeyBaseUrl], { stdin: WRONG_KEY });
    expect(r.code).toBe(ExitCodes.credentialRejected);
    expect(r.stderr).toContain('refused the key for profile "cp"');
    expect(r.stderr).toContain('HTTP 401: Incorrect API key provided.');
    expect(r.stderr).toContain('nothing was stored');
    expect(r.stderr).toMatch(/Coding Plan key \(sk-sp-…\) needs --preset coding-plan/);
    expect(daemon.profiles.has('cp')).toBe(false);
    expect(daemon.calls('profiles.add')).toHaveLength(0);
    expect(server.counts.apiModels).toBe(models + 1);
    expect(r.stdout + r.stderr).not.toContain(WRONG_KEY);
  });

  it('an unreachable endpoint is refused with a hint to use --no-verify, which then stores the key unchecked', async () => {
    const gone = await startQwenServer();
    const url = gone.apiKeyBaseUrl;
    await gone.close();
    const r = await runCli(['profile', 'add', 'far', '--kind', 'api-key', '--base-url', url], { stdin: KEY });
    expect(r.code).toBe(ExitCodes.error);
    expect(r.stderr).toContain(`could not reach ${url}/models`);
    expect(r.stderr).toContain('--no-verify');
    expect(daemon.profiles.has('far')).toBe(false);
    const unchecked = await runCli(['profile', 'add', 'far', '--kind', 'api-key', '--base-url', url, '--no-verify'], { stdin: KEY });
    expect(unchecked.code).toBe(0);
    expect(daemon.profiles.get('far')?.secret === KEY).toBe(true);
  });

  it('no key at all, a key on argv, and flags of another kind are refused before anything is sent', async () => {
    const empty = await runCli(['profile', 'add', 'cp', '--preset', 'coding-plan', '--no-verify']);
    expect(empty.code).toBe(ExitCodes.error);
    expect(empty.stderr).toContain('no API key for profile "cp" in standard input');
    const onArgv = await runCli(['profile', 'add', 'cp', '--preset', 'coding-plan', '--key', KEY]);
    expect(onArgv.code).toBe(ExitCodes.usage);
    const mixed = await runCli(['profile', 'add', 'cp', '--preset', 'coding-plan', '--issuer', 'https://id.example.com']);
    expect(mixed.code).toBe(ExitCodes.usage);
    expect(mixed.stderr).toContain('--issuer does not apply to api-key profiles');
    const builtin = await runCli(['profile', 'add', 'qwen', '--preset', 'coding-plan']);
    expect(builtin.code).toBe(ExitCodes.usage);
    expect(daemon.calls('profiles.add')).toHaveLength(0);
  });

  it('token --profile prints the key alone; status, list and show never do', async () => {
    daemon.set('cp', { kind: 'api-key', baseUrl: server.apiKeyBaseUrl, secret: KEY });
    const token = await runCli(['token', '--profile', 'cp']);
    expect(token.code).toBe(0);
    expect(token.stdout === `${KEY}\n`).toBe(true);
    expect(token.stderr).toBe('');
    for (const args of [['status'], ['status', '--profile', 'cp'], ['status', '--json'], ['profile', 'list'], ['profile', 'list', '--json'], ['profile', 'show', 'cp'], ['profile', 'show', 'cp', '--json']]) {
      const r = await runCli(args);
      expect(r.code, args.join(' ')).toBe(0);
      expect(r.stdout + r.stderr, args.join(' ')).not.toContain(KEY);
    }
    const show = await runCli(['profile', 'show', 'cp']);
    expect(show.stdout).toMatch(new RegExp(`^secret +present, fingerprint ${fingerprint(KEY)}$`, 'm'));
    const status = await runCli(['status']);
    expect(status.stdout).toMatch(/^ {2}cp +api-key +static +static$/m);
    expect(status.stdout).toMatch(/^\* qwen +qwen-oauth +valid +expires in/m);
  });

  it('a missing profile exits 6; login on an api-key profile prints how to replace the key', async () => {
    const missing = await runCli(['token', '--profile', 'nope']);
    expect(missing.code).toBe(ExitCodes.profileNotFound);
    expect((await runCli(['profile', 'show', 'nope'])).code).toBe(ExitCodes.profileNotFound);
    daemon.set('cp', { kind: 'api-key', baseUrl: server.apiKeyBaseUrl, secret: KEY });
    const login = await runCli(['login', '--profile', 'cp', '--json']);
    expect(login.code).not.toBe(0);
    expect(login.stderr).toContain('qwen-token profile add cp --replace');
  });

  it('profile default makes another profile the default, keeping its secret; remove refuses the built-in one', async () => {
    daemon.set('cp', { kind: 'api-key', baseUrl: server.apiKeyBaseUrl, secret: KEY });
    const r = await runCli(['profile', 'default', 'cp']);
    expect(r.code).toBe(0);
    expect(daemon.defaultProfile).toBe('cp');
    expect(daemon.calls('profiles.setDefault')[0]!.params).toEqual({ name: 'cp' });
    expect(daemon.calls('profiles.add')).toEqual([]);
    expect(daemon.profiles.get('cp')?.secret === KEY).toBe(true);
    const builtin = await runCli(['profile', 'remove', 'qwen']);
    expect(builtin.code).toBe(ExitCodes.error);
    expect(builtin.stderr).toContain('built-in profile');
    const removed = await runCli(['profile', 'remove', 'cp']);
    expect(removed.code).toBe(0);
    expect(daemon.profiles.has('cp')).toBe(false);
  });

  it('profile add --replace without a kind keeps the settings and replaces the key', async () => {
    daemon.set('cp', { kind: 'api-key', baseUrl: server.apiKeyBaseUrl, secret: WRONG_KEY });
    const r = await runCli(['profile', 'add', 'cp', '--replace'], { stdin: KEY });
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/^Replaced profile cp/);
    expect(daemon.profiles.get('cp')?.secret === KEY).toBe(true);
    const exists = await runCli(['profile', 'add', 'cp', '--kind', 'api-key', '--base-url', server.apiKeyBaseUrl], { stdin: KEY });
    expect(exists.code).toBe(ExitCodes.error);
    expect(exists.stderr).toContain('exists already');
  });

  it('gateway env --profile refuses an unknown profile by name (exit 6)', async () => {
    const r = await runCli(['gateway', 'env', '--profile', 'nope']);
    expect(r.code).toBe(ExitCodes.profileNotFound);
    expect(r.stderr).toContain('there is no profile "nope"');
  });
});

describe('qwen-token against a protocol-1 stand-in', () => {
  beforeEach(async () => {
    daemon = await FakeProfileDaemon.start(1);
  });
  afterEach(async () => {
    await daemon.close();
  });

  it('token serves the default profile; --profile another says to restart the daemon', async () => {
    const r = await runCli(['token']);
    expect(r.code).toBe(0);
    expect(r.stdout).toBe('qat_fake_qwen_token_0001\n');
    const other = await runCli(['token', '--profile', 'cp']);
    expect(other.code).toBe(ExitCodes.error);
    expect(other.stderr).toContain('restart the daemon after upgrading');
  });
});
