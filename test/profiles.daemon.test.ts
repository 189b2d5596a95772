/**
 * Credential profiles against the real daemon process: `profiles.add/list/remove` over the
 * socket, API keys served as static credentials, the files and their modes, hand edits of the
 * config file applied live (and invalid ones reported, the previous profiles kept), and many
 * profiles refreshing independently while one provider hangs and another fails.
 */
import { createServer, type Server } from 'node:http';
import type { Socket } from 'node:net';
import { chmod, mkdir, readFile, rename, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { serializeCredentials, type Credentials } from '../shared/credentials.js';
import { fingerprint } from '../shared/fingerprint.js';
import { presetSettings } from '../shared/profiles.js';
import { assertNoSecrets, createFixture, credsFrom, RawRpcClient, type DaemonFixture } from './support/daemon.js';
import { deviceProfileSettings, startQwenServer, type QwenTestServer } from './support/qwen-server.js';
import { unixSocketFetch } from './support/unix-fetch.js';
import { until } from './support/wait.js';

let fx: DaemonFixture | null = null;
const clients: RawRpcClient[] = [];
const extraServers: Array<{ close(): Promise<void> }> = [];
/** API keys and client secrets the test handed the daemon: never to appear in its output. */
const secrets: string[] = [];

afterEach(async () => {
  for (const c of clients.splice(0)) c.close();
  const output = fx?.output.join('\n') ?? '';
  await fx?.cleanup();
  fx = null;
  for (const s of extraServers.splice(0)) await s.close();
  assertNoSecrets(output, secrets.splice(0), 'daemon output');
});

function configPath(f: DaemonFixture): string {
  return join(f.home, '.config', 'qwen-tokend', 'config.json');
}

function profilesDir(f: DaemonFixture): string {
  return join(f.home, '.one_dragon_alpha', 'profiles');
}

/** A key that looks like a real one and is unique to this call. */
function apiKey(label: string): string {
  const key = `sk-sp-${label}-${Math.random().toString(36).slice(2)}${Math.random().toString(36).slice(2)}`;
  secrets.push(key);
  return key;
}

async function connect(f: DaemonFixture, protocol: number | undefined = 2): Promise<RawRpcClient> {
  const client = await RawRpcClient.connect(f.socketPath, protocol);
  clients.push(client);
  return client;
}

/** Writes the config file as an editor that renames into place would. */
async function writeConfig(f: DaemonFixture, text: string): Promise<void> {
  const path = configPath(f);
  await mkdir(join(path, '..'), { recursive: true, mode: 0o700 });
  await writeFile(`${path}.tmp`, text, { mode: 0o600 });
  await rename(`${path}.tmp`, path);
}

/** Writes a profile's secret file by hand, as the daemon would. */
async function writeSecret(f: DaemonFixture, name: string, secret: Record<string, string>): Promise<void> {
  await mkdir(profilesDir(f), { recursive: true, mode: 0o700 });
  await chmod(profilesDir(f), 0o700);
  await writeFile(join(profilesDir(f), `${name}.secret.json`), JSON.stringify(secret), { mode: 0o600 });
}

/** Writes an `oauth-device` profile's token file (the credential record). */
async function writeToken(f: DaemonFixture, name: string, creds: Credentials): Promise<void> {
  await mkdir(profilesDir(f), { recursive: true, mode: 0o700 });
  await chmod(profilesDir(f), 0o700);
  await writeFile(join(profilesDir(f), `${name}.token.json`), serializeCredentials(creds), { mode: 0o600 });
}


/** Refresh requests the server received for one refresh token. */
function refreshesOf(server: QwenTestServer, refreshToken: string): number {
  return server.requests.filter((r) => r.endpoint === 'token' && r.form?.grant_type === 'refresh_token' && r.form.refresh_token === refreshToken).length;
}

interface TokenAnswer {
  access_token: string;
  expiry_date: number | null;
  base_url: string;
  profile?: string;
  kind?: string;
  auth_header?: string;
}

describe('profiles over the socket', () => {
  it('add, list and remove an API key profile: served static with expiry null, its key only in a 0600 file in a 0700 directory', async () => {
    fx = await createFixture();
    await fx.start();
    const admin = await connect(fx);
    const watcher = await connect(fx);
    await watcher.call('subscribe', {});
    const key = apiKey('plan');
    const settings = presetSettings('coding-plan');
    const added = await admin.call<{ profile: Record<string, unknown>; replaced: boolean }>('profiles.add', { name: 'plan', settings, secret: key });
    expect(added.replaced).toBe(false);
    expect(added.profile).toMatchObject({
      name: 'plan',
      kind: 'api-key',
      builtin: false,
      default: false,
      base_url: 'https://coding-intl.dashscope.aliyuncs.com/v1',
      has_secret: true,
      secret_fingerprint: fingerprint(key),
      state: 'static',
      expiry_date: null,
      next_refresh_at: null,
    });

    const token = await admin.call<TokenAnswer>('getAccessToken', { profile: 'plan' });
    expect(token).toEqual({
      access_token: key,
      token_type: 'Bearer',
      expiry_date: null,
      base_url: 'https://coding-intl.dashscope.aliyuncs.com/v1',
      profile: 'plan',
      kind: 'api-key',
      auth_header: 'authorization',
    });
    const status = await admin.call<Record<string, unknown>>('status', { profile: 'plan' });
    expect(status).toMatchObject({ state: 'static', expiry_date: null, next_refresh_at: null, profile: 'plan', kind: 'api-key', default_profile: 'qwen', config_error: null });
    expect(status.token_fingerprint).toBe(fingerprint(key));
    expect(JSON.stringify(status)).not.toContain(key);
    // A forced refresh of a key answers the same key; there is nothing to log in to.
    expect((await admin.call<TokenAnswer>('refresh', { profile: 'plan' })).access_token).toBe(key);
    const login = await admin.error('login.start', { profile: 'plan' });
    expect(login.data?.code).toBe('QWEN_CONFIG_INVALID');
    expect(login.message).toContain('profile add plan --replace');

    // The files: the key in its own 0600 file in a 0700 directory, never in the config file.
    const dir = profilesDir(fx);
    const secretPath = join(dir, 'plan.secret.json');
    expect((await stat(dir)).mode & 0o777).toBe(0o700);
    expect((await stat(secretPath)).mode & 0o777).toBe(0o600);
    expect(JSON.parse(await readFile(secretPath, 'utf8'))).toEqual({ api_key: key });
    const configText = await readFile(configPath(fx), 'utf8');
    expect(configText).not.toContain(key);
    expect(JSON.parse(configText).profiles.plan).toEqual(settings);
    expect((await stat(configPath(fx))).mode & 0o777).toBe(0o600);
    expect((await stat(join(configPath(fx), '..'))).mode & 0o777).toBe(0o700);

    // x-api-key, and a list of both next to the built-in profile.
    const anthropicKey = apiKey('anthropic');
    await admin.call('profiles.add', {
      name: 'claude-ish',
      settings: { kind: 'api-key', base_url: 'https://dashscope-intl.aliyuncs.com/apps/anthropic', auth: 'x-api-key', models: ['qwen3-coder-plus'] },
      secret: anthropicKey,
    });
    expect((await admin.call<TokenAnswer>('getAccessToken', { profile: 'claude-ish' })).auth_header).toBe('x-api-key');
    const list = await admin.call<{ default_profile: string; profiles: Array<{ name: string; builtin: boolean; default: boolean; kind: string }>; config_path: string; config_error: null }>('profiles.list');
    expect(list.default_profile).toBe('qwen');
    expect(list.config_path).toBe(configPath(fx));
    expect(list.config_error).toBeNull();
    expect(list.profiles.map((p) => [p.name, p.kind, p.builtin, p.default])).toEqual([
      ['qwen', 'qwen-oauth', true, true],
      ['plan', 'api-key', false, false],
      ['claude-ish', 'api-key', false, false],
    ]);
    expect(JSON.stringify(list)).not.toContain(key);

    // Adding again needs --replace; the built-in name is taken.
    expect((await admin.error('profiles.add', { name: 'plan', settings, secret: apiKey('again') })).message).toContain('--replace');
    expect((await admin.error('profiles.add', { name: 'qwen', settings, secret: apiKey('q') })).message).toContain('built-in');
    // A replace with a new key: served at once.
    const newKey = apiKey('plan2');
    expect((await admin.call<{ replaced: boolean }>('profiles.add', { name: 'plan', settings, secret: newKey, replace: true })).replaced).toBe(true);
    expect((await admin.call<TokenAnswer>('getAccessToken', { profile: 'plan' })).access_token).toBe(newKey);

    // Remove: gone from the config file, its file deleted, its name unknown.
    const removed = await admin.call<{ removed: boolean; files: string[] }>('profiles.remove', { name: 'plan' });
    expect(removed).toEqual({ removed: true, files: [secretPath] });
    await expect(stat(secretPath)).rejects.toMatchObject({ code: 'ENOENT' });
    expect(JSON.parse(await readFile(configPath(fx), 'utf8')).profiles).not.toHaveProperty('plan');
    const unknown = await admin.error('getAccessToken', { profile: 'plan' });
    expect(unknown.data?.code).toBe('QWEN_PROFILE_NOT_FOUND');
    expect(unknown.message).toContain('profile list');
    expect((await admin.error('profiles.remove', { name: 'qwen' })).message).toContain('built-in');
    expect((await admin.error('profiles.remove', { name: 'plan' })).data?.code).toBe('QWEN_PROFILE_NOT_FOUND');

    // A subscriber heard each change of the set, naming the profiles.
    await until(() => watcher.notifications.filter((n) => n.method === 'profiles.changed').length >= 3, 'profiles.changed pushes');
    const changes = watcher.notifications.filter((n) => n.method === 'profiles.changed').map((n) => n.params.profiles);
    expect(changes[0]).toEqual(['qwen', 'plan']);
    expect(changes.at(-1)).toEqual(['qwen', 'claude-ish']);
    const pushedKeys = watcher.notifications.filter((n) => n.method === 'token.refreshed' && n.params.profile === 'plan').map((n) => n.params.access_token);
    expect(pushedKeys).toContain(newKey);
  });

  it('an unknown profile is QWEN_PROFILE_NOT_FOUND on every credential method; bad names are refused as invalid params', async () => {
    fx = await createFixture();
    await fx.start();
    const c = await connect(fx);
    for (const method of ['getAccessToken', 'status', 'refresh', 'login.start', 'login.cancel', 'logout', 'subscribe']) {
      const err = await c.error(method, { profile: 'nope' });
      expect(err.data?.code, method).toBe('QWEN_PROFILE_NOT_FOUND');
      expect(err.message, method).toContain('"nope"');
    }
    expect((await c.error('getAccessToken', { profile: 'Bad Name!' })).code).toBe(-32602);
    // A secret inside the settings is not a setting: refused before anything is written.
    const err = await c.error('profiles.add', { name: 'x', settings: { ...presetSettings('dashscope'), api_key: 'sk-123456789' } });
    expect(err.code).toBe(-32602);
    await expect(stat(configPath(fx))).rejects.toMatchObject({ code: 'ENOENT' });
  });

  it('a hand edit of the config file is applied live; an invalid one is reported once and the previous profiles are kept', async () => {
    fx = await createFixture();
    await fx.start();
    const admin = await connect(fx);
    const keyA = apiKey('a');
    await admin.call('profiles.add', { name: 'a', settings: presetSettings('dashscope', 'beijing'), secret: keyA });
    const keyB = apiKey('b');
    await writeSecret(fx, 'b', { api_key: keyB });
    const edited = JSON.parse(await readFile(configPath(fx), 'utf8'));
    edited.profiles.b = presetSettings('coding-plan', 'cn');
    edited.gateway = { tcp: { enabled: false, port: 8417 } };
    await writeConfig(fx, JSON.stringify(edited, null, 2));
    await until(async () => (await admin.call<{ profiles: Array<{ name: string }> }>('profiles.list')).profiles.some((p) => p.name === 'b'), 'profile b applied');
    expect((await admin.call<TokenAnswer>('getAccessToken', { profile: 'b' })).access_token).toBe(keyB);

    // Not JSON: reported, and a and b are still served.
    const logsBefore = fx.logs().length;
    await writeConfig(fx, '{"profiles": {');
    await until(async () => (await admin.call<{ config_error: string | null }>('status')).config_error !== null, 'config_error');
    const status = await admin.call<{ config_error: string; profiles: Array<{ name: string }> }>('status');
    expect(status.config_error).toContain('not valid JSON');
    expect(status.config_error).toContain(configPath(fx));
    expect(status.profiles.map((p) => p.name)).toEqual(['qwen', 'a', 'b']);
    expect((await admin.call<TokenAnswer>('getAccessToken', { profile: 'a' })).access_token).toBe(keyA);
    expect((await admin.call<TokenAnswer>('getAccessToken', { profile: 'b' })).access_token).toBe(keyB);
    // Adding a profile does not overwrite a file it cannot parse.
    expect((await admin.error('profiles.add', { name: 'c', settings: presetSettings('dashscope'), secret: apiKey('c') })).message).toContain('not valid JSON');
    expect(await readFile(configPath(fx), 'utf8')).toBe('{"profiles": {');

    // A secret in the file: refused with where secrets go; still the previous profiles.
    const withSecret = { profiles: { a: presetSettings('dashscope', 'beijing'), b: { ...presetSettings('coding-plan', 'cn'), api_key: 'sk-sp-written-by-hand-123' } } };
    await writeConfig(fx, JSON.stringify(withSecret));
    await until(async () => (await admin.call<{ config_error: string | null }>('status')).config_error?.includes('secret') === true, 'the secret refused');
    const refused = (await admin.call<{ config_error: string }>('profiles.list')).config_error;
    expect(refused).toContain('api_key');
    expect(refused).toContain('secrets never go in the config file');
    expect(refused).toContain('.secret.json');
    expect(refused).not.toContain('sk-sp-written-by-hand-123');
    expect((await admin.call<TokenAnswer>('getAccessToken', { profile: 'b' })).access_token).toBe(keyB);

    // Each distinct problem was logged once, as one error line.
    const errors = fx.logs().slice(logsBefore).filter((l) => l.level >= 50 && l.msg.includes('config file'));
    expect(errors).toHaveLength(2);

    // Fixed, with b removed by hand and a as the default: applied, the error cleared, b's key file kept.
    await writeConfig(fx, JSON.stringify({ default_profile: 'a', profiles: { a: presetSettings('dashscope', 'beijing') }, gateway: edited.gateway }));
    await until(async () => (await admin.call<{ config_error: string | null }>('status')).config_error === null, 'the config applied');
    expect((await admin.call<{ profiles: Array<{ name: string }> }>('profiles.list')).profiles.map((p) => p.name)).toEqual(['qwen', 'a']);
    expect((await admin.error('getAccessToken', { profile: 'b' })).data?.code).toBe('QWEN_PROFILE_NOT_FOUND');
    expect((await stat(join(profilesDir(fx), 'b.secret.json'))).isFile()).toBe(true);
    // A call without a profile is about the default profile.
    expect((await admin.call<TokenAnswer>('getAccessToken')).access_token).toBe(keyA);
    expect((await admin.call<{ profile: string }>('status')).profile).toBe('a');

    // A default that names no profile: reported, and the built-in profile is the default.
    await writeConfig(fx, JSON.stringify({ default_profile: 'gone', profiles: { a: presetSettings('dashscope', 'beijing') } }));
    await until(async () => (await admin.call<{ config_error: string | null }>('status')).config_error?.includes('gone') === true, 'the unknown default reported');
    expect((await admin.call<{ default_profile: string }>('profiles.list')).default_profile).toBe('qwen');
  });

  it('an oauth-device profile logs in through the daemon, keeps its tokens in its own 0600 file and refreshes with rotation', async () => {
    fx = await createFixture({ server: { deviceInterval: 0.2 } });
    await fx.start();
    const admin = await connect(fx);
    await admin.call('profiles.add', { name: 'corp', settings: deviceProfileSettings(fx.server) });
    const events = await connect(fx);
    await events.call('subscribe', { profile: 'corp' });
    expect((await admin.error('getAccessToken', { profile: 'corp' })).message).toContain('login --profile corp');
    const started = await admin.call<{ user_code: string }>('login.start', { profile: 'corp' });
    fx.server.approve(started.user_code);
    await until(() => events.notifications.some((n) => n.method === 'login.completed'), 'login.completed');
    const completed = events.notifications.find((n) => n.method === 'login.completed')!;
    expect(completed.params.profile).toBe('corp');
    const token = await admin.call<TokenAnswer>('getAccessToken', { profile: 'corp' });
    expect(token).toMatchObject({ profile: 'corp', kind: 'oauth-device', auth_header: 'authorization', base_url: `${fx.server.baseUrl}/v1` });
    expect(fx.server.issuedTokens('access')).toContain(token.access_token);
    // PKCE was used (the local server checks the verifier against the challenge).
    expect(fx.server.lastRequest('deviceCode')?.form?.code_challenge_method).toBe('S256');

    const tokenPath = join(profilesDir(fx), 'corp.token.json');
    expect((await stat(tokenPath)).mode & 0o777).toBe(0o600);
    const before = JSON.parse(await readFile(tokenPath, 'utf8')) as Credentials;
    expect(before.access_token).toBe(token.access_token);

    const refreshed = await admin.call<TokenAnswer>('refresh', { profile: 'corp' });
    expect(refreshed.access_token).not.toBe(token.access_token);
    const after = JSON.parse(await readFile(tokenPath, 'utf8')) as Credentials;
    expect(after.access_token).toBe(refreshed.access_token);
    expect(after.refresh_token).not.toBe(before.refresh_token);
    expect(fx.server.reuseCount).toBe(0);
    await until(() => events.notifications.some((n) => n.method === 'token.refreshed' && n.params.access_token === refreshed.access_token), 'the push');
    // The built-in profile was never touched.
    expect((await admin.call<{ state: string }>('status')).state).toBe('no_credentials');
  });

  it('oauth-device: a provider that issued no refresh token is served until expiry, then needs a login; a rejected refresh token needs a login naming the profile', async () => {
    fx = await createFixture();
    const issued = credsFrom(fx.server);
    // No refresh token, expiring shortly.
    await writeToken(fx, 'norefresh', { ...issued, refresh_token: '', expiry_date: Date.now() + 4_000 });
    const rejected = credsFrom(fx.server);
    await writeToken(fx, 'revoked', { ...rejected, expiry_date: Date.now() - 1_000 });
    await writeConfig(fx, JSON.stringify({ profiles: { norefresh: deviceProfileSettings(fx.server), revoked: deviceProfileSettings(fx.server) } }));
    fx.server.injectFault({ kind: 'respond', status: 400, headers: { 'content-type': 'application/json' }, body: '{"error":"invalid_grant","error_description":"grant revoked"}' });
    await fx.start();
    const c = await connect(fx);
    expect((await c.call<TokenAnswer>('getAccessToken', { profile: 'norefresh' })).access_token).toBe(issued.access_token);
    await until(async () => (await c.call<{ state: string }>('status', { profile: 'norefresh' })).state === 'needs_login', 'needs_login at expiry', 10_000);
    const err = await c.error('getAccessToken', { profile: 'norefresh' });
    expect(err.data?.code).toBe('QWEN_REFRESH_TOKEN_INVALID');
    expect(err.message).toContain('no refresh token');
    expect(err.message).toContain('offline_access');
    expect(err.message).toContain('login --profile norefresh');

    const revoked = await c.error('getAccessToken', { profile: 'revoked' });
    expect(revoked.data?.code).toBe('QWEN_REFRESH_TOKEN_INVALID');
    expect(revoked.message).toContain('login --profile revoked');
    expect((await c.call<{ state: string }>('status', { profile: 'revoked' })).state).toBe('needs_login');
    // One refresh attempt for the rejected token, none ever without a refresh token.
    expect(refreshesOf(fx.server, rejected.refresh_token)).toBe(1);
    expect(fx.server.requests.filter((r) => r.form?.grant_type === 'refresh_token' && !r.form.refresh_token)).toHaveLength(0);
  });

  it('oauth-device: a login whose provider issues no refresh token is kept, and says so', async () => {
    fx = await createFixture({ server: { deviceInterval: 0.2 } });
    await fx.start();
    const c = await connect(fx);
    await c.call('profiles.add', { name: 'oneshot', settings: deviceProfileSettings(fx.server) });
    await c.call('subscribe', { profile: 'oneshot' });
    await c.call('login.start', { profile: 'oneshot' });
    const access = apiKey('access-token-without-refresh');
    fx.server.injectFault({
      kind: 'respond',
      endpoint: 'token',
      times: 1,
      status: 200,
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ access_token: access, token_type: 'Bearer', expires_in: 3600 }),
    });
    await until(() => c.notifications.some((n) => n.method === 'login.completed'), 'login.completed');
    expect((await c.call<TokenAnswer>('getAccessToken', { profile: 'oneshot' })).access_token).toBe(access);
    expect((await c.call<{ state: string }>('status', { profile: 'oneshot' })).state).toBe('valid');
    const saved = JSON.parse(await readFile(join(profilesDir(fx), 'oneshot.token.json'), 'utf8')) as Credentials;
    expect(saved.refresh_token).toBe('');
    expect(fx.logs().some((l) => l.profile === 'oneshot' && /no refresh token/.test(l.msg) && /offline_access/.test(l.msg))).toBe(true);
    // A forced refresh says why it cannot, and asks the provider nothing.
    const err = await c.error('refresh', { profile: 'oneshot' });
    expect(err.message).toContain('no refresh token');
    expect(fx.server.counts.refresh).toBe(0);
  });
});

/** An OAuth provider that takes requests and never answers them. */
async function hangingProvider(): Promise<{ baseUrl: string; received: () => number; close(): Promise<void> }> {
  let received = 0;
  const sockets = new Set<Socket>();
  const server: Server = createServer(() => {
    received += 1;
  });
  server.on('connection', (s) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
  });
  await new Promise<void>((done) => server.listen(0, '127.0.0.1', done));
  const { port } = server.address() as { port: number };
  return {
    baseUrl: `http://127.0.0.1:${port}`,
    received: () => received,
    close: async () => {
      for (const s of sockets) s.destroy();
      await new Promise<void>((done) => server.close(() => done()));
    },
  };
}

describe('the gateway over profiles', () => {
  it('routes /p/<profile>/v1 to each profile with its own credential header, the portal headers for the built-in profile only', async () => {
    fx = await createFixture();
    await fx.writeOwn({ ...credsFrom(fx.server), resource_url: fx.server.baseUrl });
    await fx.start();
    const admin = await connect(fx);
    const bearer = apiKey('bearer');
    const xKey = apiKey('xkey');
    await admin.call('profiles.add', { name: 'plan', settings: { kind: 'api-key', base_url: `${fx.server.baseUrl}/v1` }, secret: bearer });
    await admin.call('profiles.add', { name: 'anth', settings: { kind: 'api-key', base_url: `${fx.server.baseUrl}/v1`, auth: 'x-api-key' }, secret: xKey });
    const gateway = unixSocketFetch(join(fx.runDir, 'gateway.sock'));
    const chat = (path: string) =>
      gateway(`http://localhost${path}`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ model: 'coder-model', messages: [{ role: 'user', content: 'hi' }] }) });

    expect((await chat('/v1/chat/completions')).status).toBe(200);
    expect(fx.server.lastChatHeaders?.['x-dashscope-authtype']).toBe('qwen-oauth');
    await (await chat('/p/plan/v1/chat/completions')).text();
    expect(fx.server.lastChatHeaders?.authorization).toBe(`Bearer ${bearer}`);
    expect(fx.server.lastChatHeaders?.['x-dashscope-authtype']).toBeUndefined();
    await (await chat('/p/anth/v1/chat/completions')).text();
    expect(fx.server.lastChatHeaders?.['x-api-key']).toBe(xKey);
    expect(fx.server.lastChatHeaders?.authorization).toBeUndefined();
    // The local server rejects these keys: the 401 is passed through, not retried.
    const chats = fx.server.counts.chat;
    expect((await chat('/p/plan/v1/chat/completions')).status).toBe(401);
    expect(fx.server.counts.chat).toBe(chats + 1);
    const unknown = await chat('/p/nope/v1/chat/completions');
    expect(unknown.status).toBe(404);
  });
});

describe('isolation', () => {
  it('20 profiles of mixed kinds: each expiring one is refreshed exactly once, and a hanging provider delays none of the others', async () => {
    // A long HTTP timeout, so the hanging provider's refresh is still hanging while the rest is checked.
    fx = await createFixture({ env: { QWEN_TOKEND_HTTP_TIMEOUT_MS: '15000' } });
    const healthy = fx.server;
    const failing = await startQwenServer();
    extraServers.push(failing);
    failing.injectFault({ kind: '5xx', endpoint: 'token' });
    const hanging = await hangingProvider();
    extraServers.push(hanging);

    const profiles: Record<string, unknown> = {};
    const keys = new Map<string, string>();
    for (let i = 0; i < 10; i++) {
      const name = `key-${i}`;
      const key = apiKey(name);
      keys.set(name, key);
      profiles[name] = presetSettings('dashscope');
      await writeSecret(fx, name, { api_key: key });
    }
    // Eight profiles whose tokens expire together, refreshed 2 s ahead of that.
    const seeded = new Map<string, Credentials>();
    const expiry = Date.now() + 4_000;
    for (let i = 0; i < 8; i++) {
      const name = `oauth-${i}`;
      const creds = { ...credsFrom(healthy), expiry_date: expiry };
      seeded.set(name, creds);
      profiles[name] = deviceProfileSettings(healthy, { refresh_lead_seconds: 2 });
      await writeToken(fx, name, creds);
    }
    // One whose provider never answers (its token already expired: refreshed at start), one whose provider fails.
    profiles.hangs = { ...deviceProfileSettings(healthy), device_authorization_endpoint: `${hanging.baseUrl}/device`, token_endpoint: `${hanging.baseUrl}/token` };
    await writeToken(fx, 'hangs', { ...credsFrom(healthy), expiry_date: Date.now() - 1_000 });
    // Refreshed when the others are, and still valid long after its refresh failed.
    const failingCreds = { ...credsFrom(failing), expiry_date: expiry + 56_000 };
    profiles.fails = deviceProfileSettings(failing, { refresh_lead_seconds: 58 });
    await writeToken(fx, 'fails', failingCreds);
    expect(Object.keys(profiles)).toHaveLength(20);

    await fx.start();
    const c = await connect(fx);
    const pushes = await connect(fx);
    await pushes.call('subscribe', {});
    // Added as a hand edit, once a subscriber listens: every refresh happens after it subscribed.
    await writeConfig(fx, JSON.stringify({ profiles }));
    // A client waits on the hanging provider (its expired token is being refreshed since it loaded)...
    await until(() => hanging.received() >= 1, 'the hanging provider to get its refresh', 10_000);
    let hungSettled = false;
    void c.call('getAccessToken', { profile: 'hangs' }).then(
      () => (hungSettled = true),
      () => (hungSettled = true),
    );

    // ...while every healthy profile is refreshed once and its new token handed out.
    await until(() => [...seeded.values()].every((s) => refreshesOf(healthy, s.refresh_token) === 1), 'eight refreshes', 10_000);
    for (const [name, before] of seeded) {
      const token = await c.call<TokenAnswer>('getAccessToken', { profile: name, minValidityMs: 60_000 });
      expect(token.access_token, name).not.toBe(before.access_token);
      expect(healthy.issuedTokens('access'), name).toContain(token.access_token);
    }
    for (const [name, key] of keys) expect((await c.call<TokenAnswer>('getAccessToken', { profile: name })).access_token).toBe(key);
    // The failing provider's profile keeps its still-valid token and says it is retrying.
    await until(async () => (await c.call<{ state: string }>('status', { profile: 'fails' })).state === 'retrying', 'fails retrying');
    expect((await c.call<TokenAnswer>('getAccessToken', { profile: 'fails' })).access_token).toBe(failingCreds.access_token);
    // All of that while the hanging provider still holds its one request.
    expect(hungSettled).toBe(false);
    expect(hanging.received()).toBe(1);

    // Each refreshed token was pushed once, naming its profile; none was refreshed twice.
    const seededTokens = new Set([...seeded.values()].map((s) => s.access_token));
    const refreshedPushes = () =>
      pushes.notifications.filter((n) => n.method === 'token.refreshed' && String(n.params.profile).startsWith('oauth-') && !seededTokens.has(String(n.params.access_token)));
    await until(() => refreshedPushes().length >= 8, 'the pushes');
    expect(refreshedPushes().map((n) => n.params.profile).sort()).toEqual([...seeded.keys()].sort());
    for (const [name, before] of seeded) expect(refreshesOf(healthy, before.refresh_token), name).toBe(1);
    expect(healthy.counts.refresh).toBe(8);
    expect(healthy.reuseCount).toBe(0);
    const status = await c.call<{ profiles: Array<{ name: string; state: string }> }>('status');
    expect(status.profiles).toHaveLength(21);
    expect(status.profiles.filter((p) => p.state === 'static')).toHaveLength(10);
    expect(status.profiles.filter((p) => p.name.startsWith('oauth-') && p.state === 'valid')).toHaveLength(8);
  });
});
