/**
 * A profile's tokens follow its grant across daemon restarts: the config file edited while the
 * daemon is stopped to name another token endpoint must not send the old refresh token there.
 * Two local providers on 127.0.0.1; the real daemon; the token file an older version wrote.
 */
import { chmod, mkdir, rename, writeFile } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { serializeCredentials, type Credentials } from '../shared/credentials.js';
import { fingerprint } from '../shared/fingerprint.js';
import { createFixture, credsFrom, RawRpcClient, type DaemonFixture } from './support/daemon.js';
import { DEVICE_CODE_PATH, QWEN_CLIENT_ID, TOKEN_PATH, startQwenServer, type QwenTestServer } from './support/qwen-server.js';

let fx: DaemonFixture | null = null;
const clients: RawRpcClient[] = [];
const servers: QwenTestServer[] = [];

afterEach(async () => {
  for (const c of clients.splice(0)) c.close();
  await fx?.cleanup();
  fx = null;
  for (const s of servers.splice(0)) await s.close();
});

function profilesDir(f: DaemonFixture): string {
  return join(f.home, '.one_dragon_alpha', 'profiles');
}

async function writeConfig(f: DaemonFixture, config: unknown): Promise<void> {
  const path = join(f.home, '.config', 'qwen-tokend', 'config.json');
  await mkdir(join(path, '..'), { recursive: true, mode: 0o700 });
  await writeFile(`${path}.tmp`, JSON.stringify(config), { mode: 0o600 });
  await rename(`${path}.tmp`, path);
}

/** A token file as a version before grants were recorded wrote it (the Qwen CLI's format, nothing else). */
async function writeLegacyToken(f: DaemonFixture, name: string, creds: Credentials): Promise<void> {
  await mkdir(profilesDir(f), { recursive: true, mode: 0o700 });
  await chmod(profilesDir(f), 0o700);
  await writeFile(join(profilesDir(f), `${name}.token.json`), serializeCredentials(creds), { mode: 0o600 });
}

function deviceSettings(deviceServer: QwenTestServer, tokenServer: QwenTestServer, extra: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    kind: 'oauth-device',
    device_authorization_endpoint: `${deviceServer.baseUrl}${DEVICE_CODE_PATH}`,
    token_endpoint: `${tokenServer.baseUrl}${TOKEN_PATH}`,
    client_id: QWEN_CLIENT_ID,
    base_url: `${deviceServer.baseUrl}/v1`,
    ...extra,
  };
}

/** Refresh requests a provider received, whatever token they carried. */
function refreshRequests(server: QwenTestServer): number {
  return server.requests.filter((r) => r.endpoint === 'token' && r.form?.grant_type === 'refresh_token').length;
}

async function connect(f: DaemonFixture): Promise<RawRpcClient> {
  const client = await RawRpcClient.connect(f.socketPath, 2);
  clients.push(client);
  return client;
}

describe('tokens follow the grant across restarts', () => {
  it('an older token file is kept and recorded; after an offline edit to another token endpoint the tokens are deleted and the new endpoint never sees the refresh token', async () => {
    fx = await createFixture();
    const first = fx.server;
    const second = await startQwenServer();
    servers.push(second);
    const legacy = credsFrom(first);
    await writeLegacyToken(fx, 'corp', legacy);
    await writeConfig(fx, { profiles: { corp: deviceSettings(first, first) } });

    // The file an older version wrote is taken as this profile's (trust on first use) ...
    await fx.start();
    let c = await connect(fx);
    const served = await c.call<{ access_token: string }>('getAccessToken', { profile: 'corp' });
    expect(fingerprint(served.access_token)).toBe(fingerprint(legacy.access_token));
    // ... and refreshes with rotation at its provider.
    await c.call('refresh', { profile: 'corp' });
    expect(refreshRequests(first)).toBe(1);
    c.close();
    await fx.stop();

    // An offline edit that keeps provider and client keeps the tokens.
    await writeConfig(fx, { profiles: { corp: deviceSettings(first, first, { description: 'work', base_url: `${first.baseUrl}/v2` }) } });
    await fx.start();
    c = await connect(fx);
    expect((await c.call<{ state: string }>('status', { profile: 'corp' })).state).toBe('valid');
    c.close();
    await fx.stop();

    // An offline edit that names another token endpoint: the tokens are not the new one's.
    await writeConfig(fx, { profiles: { corp: deviceSettings(first, second) } });
    const from = fx.logs().length;
    await fx.start();
    c = await connect(fx);
    const refused = await c.error('refresh', { profile: 'corp' });
    expect(refused.message).toContain('login --profile corp');
    expect((await c.call<{ state: string }>('status', { profile: 'corp' })).state).toBe('no_credentials');
    expect(refreshRequests(second)).toBe(0);
    expect(second.requests.filter((r) => r.body.includes('refresh_token'))).toHaveLength(0);
    expect(refreshRequests(first)).toBe(1);
    expect(existsSync(join(profilesDir(fx), 'corp.token.json'))).toBe(false);
    const warning = fx.logs().slice(from).find((l) => l.level === 40 && /another provider or client/.test(l.msg));
    expect(warning?.profile).toBe('corp');
    expect(warning?.msg).toContain('login --profile corp');
  });
});
