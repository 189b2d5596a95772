/**
 * The config file's `profiles` part and the files around it, without a daemon process: what a
 * valid config is, the secrets it must never hold, how an invalid one is reported while the
 * profiles in use are kept, and the files' modes and serialized writes.
 */
import { chmod, mkdir, mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { systemClock } from '../shared/clock.js';
import { resolveConfig } from '../shared/config.js';
import { serializeCredentials } from '../shared/credentials.js';
import { QwenConfigError, QwenCredentialsFileError, QwenRefreshTokenInvalidError } from '../shared/errors.js';
import { fingerprint } from '../shared/fingerprint.js';
import { presetSettings, type ProfileSettings } from '../shared/profiles.js';
import { readConfigObject, readConfigText, updateConfigFile } from '../daemon/config-file.js';
import { updateGatewaySettings } from '../daemon/gateway/settings.js';
import { silentLogger } from '../daemon/logger.js';
import type { TokenGrant } from '../daemon/oauth.js';
import { grantIdentity, readProfilesConfig, secretFields, settingsKey, settingsNeedRestart } from '../daemon/profile-config.js';
import type { DeviceFlow } from '../daemon/profile-oauth.js';
import { ProfileRegistry } from '../daemon/profile-registry.js';
import { readSecretFile, writeSecretFile } from '../daemon/profile-secrets.js';
import { until } from './support/wait.js';

const PATH = '/home/u/.config/qwen-tokend/config.json';
const DIR = '/home/u/.one_dragon_alpha/profiles';

const device = {
  kind: 'oauth-device',
  issuer: 'https://login.example.com',
  client_id: 'cli',
  scope: 'openid offline_access',
  base_url: 'https://api.example.com/v1',
};

function read(whole: Record<string, unknown>) {
  return readProfilesConfig(whole, PATH, DIR);
}

describe('the profiles part of the config file', () => {
  it('a valid file gives its profiles in order and its default', () => {
    const { config, error } = read({ default_profile: 'plan', profiles: { plan: presetSettings('coding-plan'), corp: device }, gateway: { tcp: { enabled: true, port: 1 } } });
    expect(error).toBeNull();
    expect([...config!.profiles.keys()]).toEqual(['plan', 'corp']);
    expect(config!.defaultProfile).toBe('plan');
    expect(read({}).config).toEqual({ profiles: new Map(), defaultProfile: 'qwen' });
  });

  it('refuses a secret anywhere in a profile, saying where secrets go and never quoting it', () => {
    for (const field of ['api_key', 'apiKey', 'client_secret', 'token', 'refresh_token', 'password', 'dashscope_api_key']) {
      const { config, error } = read({ profiles: { plan: { ...presetSettings('coding-plan'), [field]: 'sk-sp-0123456789abcdef' } } });
      expect(config, field).toBeNull();
      expect(error, field).toContain(field);
      expect(error, field).toContain('secrets never go in the config file');
      expect(error, field).toContain(`${DIR}/plan.secret.json`);
      expect(error, field).not.toContain('sk-sp-0123456789abcdef');
    }
    expect(read({ api_key: 'sk-x' }).error).toContain('secret field (api_key)');
    // Setting names that merely contain "token" are settings.
    expect(read({ profiles: { corp: { ...device, token_endpoint: 'https://login.example.com/token', device_authorization_endpoint: 'https://login.example.com/device' } } }).error).toBeNull();
    expect(secretFields({ a: { nested: { client_secret: 'x' } }, token_endpoint: 'u' })).toEqual(['a.nested.client_secret']);
  });

  it('refuses the built-in name, the built-in kind, bad names and bad settings, naming the profile and the file', () => {
    const cases: Array<[Record<string, unknown>, string]> = [
      [{ profiles: { qwen: presetSettings('dashscope') } }, 'built-in'],
      [{ profiles: { mine: { kind: 'qwen-oauth' } } }, 'qwen-oauth'],
      [{ profiles: { 'Bad Name': presetSettings('dashscope') } }, 'Bad Name'],
      [{ profiles: { plain: { kind: 'api-key', base_url: 'http://api.example.com/v1' } } }, 'plain'],
      [{ profiles: { half: { ...device, issuer: undefined, token_endpoint: 'https://x.example/token' } } }, 'half'],
      [{ profiles: { extra: { ...device, colour: 'blue' } } }, 'extra'],
      [{ profiles: ['not', 'an', 'object'] }, 'must be an object'],
    ];
    for (const [whole, named] of cases) {
      const { config, error } = read(whole);
      expect(config, named).toBeNull();
      expect(error, named).toContain(named);
      if (!named.startsWith('must')) expect(error, named).toContain(PATH);
    }
    // Plain http is fine to this machine.
    expect(read({ profiles: { local: { kind: 'api-key', base_url: 'http://127.0.0.1:8080/v1' } } }).error).toBeNull();
  });

  it('a default naming no profile is reported and the built-in profile is the default; the profiles are still used', () => {
    const { config, error } = read({ default_profile: 'gone', profiles: { plan: presetSettings('coding-plan') } });
    expect(error).toContain('"gone"');
    expect(config!.defaultProfile).toBe('qwen');
    expect([...config!.profiles.keys()]).toEqual(['plan']);
  });

  it('settings compare by content, and tokens follow the grant: provider and client, not the base URL', () => {
    expect(settingsKey({ ...device } as never)).toBe(settingsKey(Object.fromEntries(Object.entries(device).reverse()) as never));
    expect(grantIdentity({ ...device, base_url: 'https://other.example/v1' } as never)).toBe(grantIdentity(device as never));
    expect(grantIdentity({ ...device, client_id: 'other' } as never)).not.toBe(grantIdentity(device as never));
    expect(grantIdentity({ ...device, issuer: 'https://evil.example' } as never)).not.toBe(grantIdentity(device as never));
  });

  it('a running profile is restarted only for what its grant, requests, schedule or credential depend on', () => {
    const d = device as ProfileSettings;
    const key = presetSettings('coding-plan');
    const restarts = (from: ProfileSettings, change: Record<string, unknown>) => settingsNeedRestart(from, { ...from, ...change } as ProfileSettings);
    // Taken in place: what is shown, and the base URL clients and the gateway get.
    expect(restarts(d, { description: 'work' })).toBe(false);
    expect(restarts({ ...d, description: 'work' } as ProfileSettings, { description: undefined })).toBe(false);
    expect(restarts(d, { base_url: 'https://api2.example.com/v1' })).toBe(false);
    expect(restarts(key, { description: 'mine', preset: 'dashscope', region: 'beijing' })).toBe(false);
    // Restarted: the OAuth client's requests, the refresh schedule, the grant, the kind.
    for (const change of [
      { scope: 'openid' },
      { audience: 'api' },
      { resource: 'https://api.example.com' },
      { pkce: false },
      { token_endpoint_auth_method: 'client_secret_basic' },
      { refresh_lead_seconds: 60 },
      { token_lifetime_seconds: 600 },
      { issuer: 'https://login.example.net' },
      { token_endpoint: 'https://login.example.com/token' },
      { device_authorization_endpoint: 'https://login.example.com/device' },
      { client_id: 'other' },
    ]) {
      expect(restarts(d, change), JSON.stringify(Object.keys(change))).toBe(true);
    }
    // An api-key profile's answer and the gateway's view of it: restarted (it has nothing to refresh).
    for (const change of [{ base_url: 'https://x.example.com/v1' }, { auth: 'x-api-key' }, { models: ['m'] }]) {
      expect(restarts(key, change), JSON.stringify(Object.keys(change))).toBe(true);
    }
    expect(settingsNeedRestart(d, key)).toBe(true);
  });
});

describe('config and secret files', () => {
  let root: string;
  beforeEach(async () => {
    root = await mkdtemp(join(tmpdir(), 'qtd-profiles-'));
  });
  afterEach(async () => {
    await rm(root, { recursive: true, force: true });
  });

  it('a change keeps every other key, is written 0600 in a new 0700 directory, and concurrent changes are all kept', async () => {
    const path = join(root, 'cfg', 'qwen-tokend', 'config.json');
    await updateConfigFile(path, (whole) => ({ ...whole, gateway: { tcp: { enabled: true, port: 9 } }, custom: 'kept' }));
    await Promise.all(
      Array.from({ length: 20 }, (_, i) =>
        updateConfigFile(path, (whole) => ({ ...whole, profiles: { ...(whole.profiles as object), [`p${i}`]: presetSettings('dashscope') } })),
      ),
    );
    await updateGatewaySettings(path, (g) => ({ ...g, tcp: { enabled: false, port: 10 } }));
    const whole = await readConfigObject(path);
    expect(Object.keys(whole.profiles as object)).toHaveLength(20);
    expect(whole.custom).toBe('kept');
    expect(whole.gateway).toEqual({ tcp: { enabled: false, port: 10 } });
    expect((await stat(path)).mode & 0o777).toBe(0o600);
    expect((await stat(join(path, '..'))).mode & 0o777).toBe(0o700);
  });

  it('a file that is not JSON is never overwritten; one another user could write is refused', async () => {
    const dir = join(root, 'qwen-tokend');
    await mkdir(dir, { mode: 0o700 });
    const path = join(dir, 'config.json');
    await writeFile(path, '{"profiles": ', { mode: 0o600 });
    await expect(updateConfigFile(path, (w) => ({ ...w, x: 1 }))).rejects.toThrow(/not valid JSON/);
    expect(await readFile(path, 'utf8')).toBe('{"profiles": ');
    await writeFile(path, '{}');
    await chmod(path, 0o666);
    await expect(readConfigText(path)).rejects.toThrow(QwenConfigError);
    await expect(readConfigText(path)).rejects.toThrow(/writable by group\/others/);
    await chmod(path, 0o644);
    expect(await readConfigText(path)).toBe('{}');
  });

  it('a config file that cannot be written is a config error naming it, not an internal error', async () => {
    // A name the file may have but its temporary sibling, longer, may not: reading finds no
    // file, writing fails (as on a read-only home or in a sandbox, which root in CI ignores).
    const dir = join(root, 'long');
    await mkdir(dir, { mode: 0o700 });
    const path = join(dir, `${'c'.repeat(240)}.json`);
    const err = await updateConfigFile(path, (w) => ({ ...w, x: 1 })).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(QwenConfigError);
    expect((err as Error).message).toContain(`cannot write the config file ${path}`);
    expect((err as Error).message).toMatch(/ENAMETOOLONG|name too long/);
  });

  it('a secret file is 0600 in a 0700 directory; a looser file is tightened, a bad one refused without its content', async () => {
    const dir = join(root, 'profiles');
    const path = join(dir, 'plan.secret.json');
    await writeSecretFile(dir, path, { api_key: 'sk-sp-secret-value-1234' });
    expect((await stat(dir)).mode & 0o777).toBe(0o700);
    expect((await stat(path)).mode & 0o777).toBe(0o600);
    expect(readSecretFile(path, silentLogger())).toEqual({ status: 'ok', secret: { api_key: 'sk-sp-secret-value-1234' } });
    await chmod(path, 0o644);
    readSecretFile(path, silentLogger());
    expect((await stat(path)).mode & 0o777).toBe(0o600);
    await writeFile(path, '{"api_key": "sk-sp-secret-value-1234", "extra": 1}');
    expect(() => readSecretFile(path, silentLogger())).toThrow(QwenCredentialsFileError);
    expect(() => readSecretFile(path, silentLogger())).not.toThrow(/sk-sp-secret/);
    await chmod(dir, 0o777);
    await writeSecretFile(dir, path, { api_key: 'sk-sp-secret-value-1234' });
    expect((await stat(dir)).mode & 0o777).toBe(0o700);
    expect(readSecretFile(join(dir, 'missing.secret.json'), silentLogger())).toEqual({ status: 'missing' });
  });
});

describe('the registry', () => {
  let root: string;
  let registry: ProfileRegistry | null = null;
  beforeEach(async () => {
    root = await mkdtemp(join(tmpdir(), 'qtd-registry-'));
  });
  afterEach(async () => {
    await registry?.stop();
    registry = null;
    await rm(root, { recursive: true, force: true });
  });

  it('an invalid edit keeps the profiles in use and says why; a valid one is applied', async () => {
    const home = join(root, 'home');
    await mkdir(home, { mode: 0o700 });
    const config = resolveConfig({ HOME: home, QWEN_TOKEND_SOCKET: join(root, 's.sock'), QWEN_TOKEND_QWEN_CLI_SYNC: 'off' }, { homedir: home });
    await writeSecretFile(config.profilesDir, join(config.profilesDir, 'plan.secret.json'), { api_key: 'sk-sp-registry-test-key' });
    await updateConfigFile(config.configPath, () => ({ profiles: { plan: presetSettings('coding-plan') } }));
    registry = new ProfileRegistry({
      config,
      logger: silentLogger(),
      clock: systemClock,
      createDeviceFlow: () => {
        throw new Error('no oauth-device profile here');
      },
    });
    await registry.start();
    expect(registry.names()).toEqual(['qwen', 'plan']);
    expect(registry.resolve('plan').servableNow(0)?.access_token).toBe('sk-sp-registry-test-key');

    await writeFile(config.configPath, JSON.stringify({ profiles: { plan: { kind: 'api-key' } } }));
    await registry.reloadConfig();
    expect(registry.configProblem).toContain('profile "plan"');
    expect(registry.names()).toEqual(['qwen', 'plan']);
    expect(registry.resolve('plan').servableNow(0)?.access_token).toBe('sk-sp-registry-test-key');

    await writeFile(config.configPath, JSON.stringify({ default_profile: 'plan', profiles: { plan: presetSettings('coding-plan', 'cn') } }));
    await registry.reloadConfig();
    expect(registry.configProblem).toBeNull();
    expect(registry.defaultProfile).toBe('plan');
    expect(registry.resolve(undefined).servableNow(0)?.base_url).toBe('https://coding.dashscope.aliyuncs.com/v1');
    expect(() => registry!.resolve('nope')).toThrow(/profile list/);

    // A profile whose client cannot be made is reported; the others run.
    await writeFile(config.configPath, JSON.stringify({ profiles: { plan: presetSettings('coding-plan', 'cn'), corp: device } }));
    await registry.reloadConfig();
    expect(registry.configProblem).toContain('profile "corp" cannot be used: no oauth-device profile here');
    expect(registry.names()).toEqual(['qwen', 'plan']);
    expect(registry.resolve('plan').servableNow(0)?.access_token).toBe('sk-sp-registry-test-key');
  });
  /** A registry with one oauth-device profile, `corp`, on a rotating provider, holding a token valid for an hour. */
  async function startCorp() {
    const home = join(root, 'home');
    await mkdir(home, { mode: 0o700 });
    const config = resolveConfig({ HOME: home, QWEN_TOKEND_SOCKET: join(root, 's.sock'), QWEN_TOKEND_QWEN_CLI_SYNC: 'off' }, { homedir: home });
    const provider = rotatingProvider();
    const first = provider.issue();
    await mkdir(config.profilesDir, { recursive: true, mode: 0o700 });
    await writeFile(join(config.profilesDir, 'corp.token.json'), serializeCredentials({ ...first, expiry_date: Date.now() + 3_600_000 }), { mode: 0o600 });
    await updateConfigFile(config.configPath, () => ({ profiles: { corp: device } }));
    registry = new ProfileRegistry({ config, logger: silentLogger(), clock: systemClock, createDeviceFlow: () => provider.flow });
    await registry.start();
    return { config, provider, registry };
  }

  it('a description or base URL edit is applied without a restart: a refresh in flight, its token already rotated by the provider, completes and is kept', async () => {
    const { config, provider } = await startCorp();
    const pushed: string[] = [];
    registry.on('token_refreshed', (_profile, result) => pushed.push(result.base_url));

    // A refresh reaches the provider, which rotates at once and answers only when released.
    provider.holdNext();
    const refreshing = registry.resolve('corp').refresh().then(
      (r) => fingerprint(r.access_token),
      () => 'failed',
    );
    await until(() => provider.presented.length === 1, 'the refresh at the provider');
    await updateConfigFile(config.configPath, (current) => ({ ...current, profiles: { corp: { ...device, description: 'work laptop' } } }));
    await registry.reloadConfig();
    expect(registry.infos().find((i) => i.name === 'corp')?.settings.description).toBe('work laptop');
    provider.release();
    const firstOutcome = await refreshing;
    const rotated = fingerprint(provider.latest().access_token);

    // The next refresh presents the rotated token, never the retired one.
    const second = await registry.resolve('corp').refresh().then(
      () => 'refreshed',
      (err: { code?: string }) => err.code,
    );
    expect(provider.retiredPresented).toBe(0);
    expect(second).toBe('refreshed');
    expect(registry.resolve('corp').status().state).toBe('valid');
    expect(firstOutcome).toBe(rotated);

    // A new base URL: in place too, and clients are sent the token again with it.
    await updateConfigFile(config.configPath, (current) => ({ ...current, profiles: { corp: { ...device, description: 'work laptop', base_url: 'https://api2.example.com/v1' } } }));
    await registry.reloadConfig();
    expect(registry.resolve('corp').servableNow(0)?.base_url).toBe('https://api2.example.com/v1');
    expect(pushed.at(-1)).toBe('https://api2.example.com/v1');
    expect(provider.presented).toHaveLength(2);
  });

  it('a scope edit restarts the profile, but a refresh in flight on the same grant finishes and is saved first', async () => {
    const { config, provider } = await startCorp();

    provider.holdNext();
    const refreshing = registry.resolve('corp').refresh().catch(() => undefined);
    await until(() => provider.presented.length === 1, 'the refresh at the provider');
    await updateConfigFile(config.configPath, (current) => ({ ...current, profiles: { corp: { ...device, scope: 'openid offline_access other' } } }));
    const reloading = registry.reloadConfig();
    // Longer than the grace a shutting-down keeper gives a refresh: the restart must wait longer.
    await new Promise((r) => setTimeout(r, 1_500));
    provider.release();
    await reloading;
    await refreshing;
    expect(registry.infos().find((i) => i.name === 'corp')?.settings.scope).toBe('openid offline_access other');

    // The restarted profile holds the rotated token: its refresh never presents the retired one.
    await registry.resolve('corp').refresh();
    expect(provider.retiredPresented).toBe(0);
    expect(registry.resolve('corp').status().state).toBe('valid');
  });
});

/**
 * An OAuth provider in process that rotates refresh tokens the moment a refresh arrives (as a
 * real one does before its answer reaches the client) and counts presentations of retired ones.
 * `holdNext` keeps the next answer until `release`; an abort of the request ends the wait.
 */
function rotatingProvider() {
  const state = new Map<string, 'active' | 'retired'>();
  const presented: string[] = [];
  let retiredPresented = 0;
  let n = 0;
  let hold = false;
  let release: (() => void) | null = null;
  let latest: TokenGrant | null = null;
  const mint = (): TokenGrant => {
    n += 1;
    const grant = { access_token: `registry-test-at-${n}-${Math.random().toString(36).slice(2)}`, refresh_token: `registry-test-rt-${n}-${Math.random().toString(36).slice(2)}`, token_type: 'Bearer', expires_in: 3600 };
    state.set(grant.refresh_token, 'active');
    latest = grant;
    return grant;
  };
  const flow: DeviceFlow = {
    deviceAuthorizationRequest: () => Promise.reject(new Error('no login in this test')),
    waitForDeviceToken: () => Promise.reject(new Error('no login in this test')),
    async refreshTokenGrant(refreshToken: string, signal?: AbortSignal): Promise<TokenGrant> {
      presented.push(refreshToken);
      const was = state.get(refreshToken);
      if (was === 'retired') retiredPresented += 1;
      if (was !== 'active') throw new QwenRefreshTokenInvalidError('invalid_grant: the refresh token is not active');
      state.set(refreshToken, 'retired');
      const grant = mint();
      if (hold) {
        hold = false;
        await new Promise<void>((resolve, reject) => {
          release = resolve;
          signal?.addEventListener('abort', () => reject(new Error('aborted')), { once: true });
        });
      }
      return grant;
    },
  };
  return {
    flow,
    presented,
    get retiredPresented() {
      return retiredPresented;
    },
    issue: () => {
      const g = mint();
      return { access_token: g.access_token, refresh_token: g.refresh_token!, token_type: 'Bearer' };
    },
    latest: () => latest!,
    holdNext: () => {
      hold = true;
    },
    release: () => release?.(),
  };
}
