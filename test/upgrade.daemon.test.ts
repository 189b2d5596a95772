/**
 * Upgrading to profiles needs no action: a state directory written by the release before them
 * (its credential file, no config file) serves the same token, and a client speaking protocol
 * version 1 keeps working against the default profile, in version 1's shapes.
 */
import { chmod, mkdir, readFile, readdir, rename, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { serializeCredentials } from '../shared/credentials.js';
import { presetSettings } from '../shared/profiles.js';
import { assertNoSecrets, createFixture, credsFrom, RawRpcClient, type DaemonFixture } from './support/daemon.js';
import { DEVICE_CODE_PATH, QWEN_CLIENT_ID, TOKEN_PATH } from './support/qwen-server.js';
import { until } from './support/wait.js';

let fx: DaemonFixture | null = null;
const clients: RawRpcClient[] = [];
const KEY = `sk-upgrade-test-key-${Math.random().toString(36).slice(2)}`;

afterEach(async () => {
  for (const c of clients.splice(0)) c.close();
  const output = fx?.output.join('\n') ?? '';
  await fx?.cleanup();
  fx = null;
  assertNoSecrets(output, [KEY], 'daemon output');
});

async function connect(f: DaemonFixture, protocol?: number): Promise<RawRpcClient> {
  const client = await RawRpcClient.connect(f.socketPath, protocol);
  clients.push(client);
  return client;
}

const V1_TOKEN_KEYS = ['access_token', 'base_url', 'expiry_date', 'resource_url', 'token_type'];

describe('upgrade from the release before profiles', () => {
  it('a state directory of that release serves the same token with no command run, and nothing new is written', async () => {
    fx = await createFixture();
    const seeded = credsFrom(fx.server);
    await fx.writeOwn(seeded);
    const bytes = await readFile(fx.tokenPath, 'utf8');
    const stateDir = join(fx.tokenPath, '..');
    const before = (await readdir(stateDir)).sort();
    await fx.start();

    const v1 = await connect(fx);
    expect(await v1.call('hello', { client: 'old', protocol: 1 })).toMatchObject({ protocol: 1, daemon: 'qwen-tokend' });
    const token = await v1.call<Record<string, unknown>>('getAccessToken', {});
    expect(Object.keys(token).sort()).toEqual(V1_TOKEN_KEYS);
    expect(token).toMatchObject({ access_token: seeded.access_token, expiry_date: seeded.expiry_date, base_url: 'https://portal.qwen.ai/v1' });
    const status = await v1.call<Record<string, unknown>>('status', {});
    expect(status).toMatchObject({ state: 'valid', protocol: 1, token_path: fx.tokenPath, expiry_date: seeded.expiry_date });
    // The library of this release gets the same token.
    expect(await fx.client().getAccessToken()).toBe(seeded.access_token);

    // Same file, byte for byte; no config file, no profiles directory.
    expect(await readFile(fx.tokenPath, 'utf8')).toBe(bytes);
    const after = (await readdir(stateDir)).filter((n) => !before.includes(n));
    expect(after.filter((n) => n === 'profiles')).toEqual([]);
    await expect(stat(join(fx.home, '.config', 'qwen-tokend', 'config.json'))).rejects.toMatchObject({ code: 'ENOENT' });
  });

  it('hello answers the version the connection will speak', async () => {
    fx = await createFixture();
    await fx.start();
    const c = await connect(fx);
    expect((await c.call<{ protocol: number }>('hello', { protocol: 1 })).protocol).toBe(1);
    expect((await c.call<{ protocol: number }>('hello', { protocol: 2 })).protocol).toBe(2);
    expect((await c.call<{ protocol: number }>('hello', { protocol: 99 })).protocol).toBe(2);
    expect((await c.call<{ protocol: number }>('hello', { protocol: 0 })).protocol).toBe(1);
    expect((await c.call<{ protocol: number }>('hello', {})).protocol).toBe(2);
  });

  it('a version-1 client gets tokens and token.refreshed pushes for the default profile only, in version 1 shapes', async () => {
    fx = await createFixture();
    const qwen = credsFrom(fx.server);
    await fx.writeOwn(qwen);
    // An oauth-device profile and an API key profile beside the built-in one.
    const dir = join(fx.tokenPath, '..', 'profiles');
    await mkdir(dir, { recursive: true, mode: 0o700 });
    await chmod(dir, 0o700);
    await writeFile(join(dir, 'dev.token.json'), serializeCredentials(credsFrom(fx.server)), { mode: 0o600 });
    await writeFile(join(dir, 'key.secret.json'), JSON.stringify({ api_key: KEY }), { mode: 0o600 });
    const configDir = join(fx.home, '.config', 'qwen-tokend');
    await mkdir(configDir, { recursive: true, mode: 0o700 });
    const config = {
      profiles: {
        dev: {
          kind: 'oauth-device',
          device_authorization_endpoint: `${fx.server.baseUrl}${DEVICE_CODE_PATH}`,
          token_endpoint: `${fx.server.baseUrl}${TOKEN_PATH}`,
          client_id: QWEN_CLIENT_ID,
          base_url: `${fx.server.baseUrl}/v1`,
        },
        key: presetSettings('coding-plan'),
      },
    };
    await writeFile(join(configDir, 'config.json'), JSON.stringify(config), { mode: 0o600 });
    await fx.start();

    // One version-1 subscriber that said hello, one that never did.
    const v1 = await connect(fx, 1);
    await v1.call('subscribe');
    const silent = await connect(fx);
    await silent.call('subscribe');
    const v2 = await connect(fx, 2);
    await v2.call('subscribe', {});

    const admin = await connect(fx, 2);
    const dev = await admin.call<{ access_token: string; profile: string }>('refresh', { profile: 'dev' });
    expect(dev.profile).toBe('dev');
    const fresh = await admin.call<{ access_token: string }>('refresh', {});
    expect(fresh.access_token).not.toBe(qwen.access_token);
    await until(() => v2.notifications.filter((n) => n.method === 'token.refreshed').length === 2, 'both pushes to the version-2 subscriber');
    await until(() => v1.notifications.length >= 1 && silent.notifications.length >= 1, 'the version-1 pushes');
    // Longer than the state settle time: nothing else arrives for the other profile.
    await new Promise((r) => setTimeout(r, 600));
    for (const client of [v1, silent]) {
      expect(client.notifications.map((n) => n.method)).toEqual(['token.refreshed']);
      const params = client.notifications[0]!.params;
      expect(Object.keys(params).sort()).toEqual(V1_TOKEN_KEYS);
      expect(params.access_token).toBe(fresh.access_token);
    }
    expect(v2.notifications.filter((n) => n.method === 'token.refreshed').map((n) => n.params.profile).sort()).toEqual(['dev', 'qwen']);
    expect(JSON.stringify(v1.notifications)).not.toContain(dev.access_token);

    // A version-1 client may still name a profile; an API key then has a numeric expiry.
    const key = await v1.call<Record<string, unknown>>('getAccessToken', { profile: 'key' });
    expect(key).toEqual({ access_token: KEY, token_type: 'Bearer', expiry_date: 8_640_000_000_000_000, base_url: 'https://coding-intl.dashscope.aliyuncs.com/v1' });

    // With the API key profile as the default, a version-1 client sees it as a valid token.
    const edited = { ...config, default_profile: 'key' };
    await writeFile(join(configDir, 'config.tmp'), JSON.stringify(edited), { mode: 0o600 });
    await rename(join(configDir, 'config.tmp'), join(configDir, 'config.json'));
    await until(async () => (await admin.call<{ default_profile: string }>('profiles.list')).default_profile === 'key', 'the new default');
    expect((await v1.call<{ access_token: string; expiry_date: number }>('getAccessToken', {})).expiry_date).toBe(8_640_000_000_000_000);
    // Its cached token is replaced by a push of the new default's.
    await until(() => v1.notifications.length === 2, 'the new default pushed');
    expect(v1.notifications[1]).toEqual({
      method: 'token.refreshed',
      params: { access_token: KEY, token_type: 'Bearer', expiry_date: 8_640_000_000_000_000, base_url: 'https://coding-intl.dashscope.aliyuncs.com/v1' },
    });
    expect(v2.notifications.filter((n) => n.method === 'token.refreshed')).toHaveLength(2);
    const status = await v1.call<{ state: string; profile: string }>('status', {});
    expect(status.state).toBe('valid');
    expect(status.profile).toBe('key');
    expect((await admin.call<{ state: string }>('status', {})).state).toBe('static');
  });
});
