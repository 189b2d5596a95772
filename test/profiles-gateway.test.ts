/**
 * The gateway's view of the daemon's profiles (daemon/gateway/registry-profiles.ts): which headers
 * each kind sends, which may be refreshed and retried after a 401, and where the models come
 * from. Pure adapters over stand-in runtimes: no sockets.
 */
import { describe, expect, it } from 'vitest';
import type { Credentials } from '../shared/credentials.js';
import { QwenRefreshTokenInvalidError } from '../shared/errors.js';
import type { TokenResult } from '../shared/protocol.js';
import { registryProfiles, type RegistryView, type RuntimeView } from '../daemon/gateway/registry-profiles.js';
import { ProfileNeedsLoginError } from '../daemon/gateway/profiles.js';

function creds(token: string): Credentials {
  return { access_token: token, refresh_token: `r-${token}`, token_type: 'Bearer', expiry_date: Date.now() + 3_600_000 };
}

function keeper(initial: string) {
  const state = { current: creds(initial), refreshes: 0, fail: null as Error | null };
  return {
    state,
    keeper: {
      servableNow: () => state.current,
      getAccessToken: async () => state.current,
      // As TokenKeeper.refreshAfterRejection: the current token when the refused one was
      // replaced, else a refresh.
      refreshAfterRejection: async (refused: string) => {
        if (state.fail) throw state.fail;
        if (refused !== state.current.access_token) return state.current;
        state.refreshes += 1;
        state.current = creds(`${initial}-${state.refreshes}`);
        return state.current;
      },
    },
  };
}

function apiKey(name: string, key: string | null, auth: 'authorization' | 'x-api-key', models?: string[]): RuntimeView {
  const result: TokenResult | null =
    key === null ? null : { access_token: key, token_type: 'Bearer', expiry_date: null, base_url: 'https://dashscope-intl.aliyuncs.com/compatible-mode/v1', profile: name, kind: 'api-key', auth_header: auth };
  return {
    name,
    kind: 'api-key',
    builtin: false,
    settings: { base_url: 'https://dashscope-intl.aliyuncs.com/compatible-mode/v1', ...(models ? { models } : {}) },
    servableNow: () => result,
    replaceCommand: () => `qwen-token profile add ${name} --replace ...`,
  };
}

function registry(runtimes: RuntimeView[], defaultProfile = 'qwen'): RegistryView {
  return {
    defaultProfile,
    get: (name) => runtimes.find((r) => r.name === name),
    names: () => runtimes.map((r) => r.name),
  };
}

describe('the gateway over the profiles', () => {
  const qwen = keeper('qwen-token');
  const corp = keeper('corp-token');
  const runtimes: RuntimeView[] = [
    { name: 'qwen', kind: 'qwen-oauth', builtin: true, settings: null, keeper: qwen.keeper, servableNow: () => null },
    {
      name: 'corp',
      kind: 'oauth-device',
      builtin: false,
      settings: { base_url: 'https://api.corp.example/v1' },
      keeper: corp.keeper,
      baseUrlFor: () => 'https://api.corp.example/v1',
      loginCommand: () => 'qwen-token login --profile corp',
      servableNow: () => null,
    },
    apiKey('plan', 'sk-sp-plan', 'authorization'),
    apiKey('claude', 'sk-anthropic-style', 'x-api-key', ['qwen3-coder-plus']),
    apiKey('empty', null, 'authorization'),
  ];
  const profiles = registryProfiles(registry(runtimes), 'qwen-tokend/test');

  it('the built-in profile keeps the portal headers and model list; another OAuth profile sends its token alone', async () => {
    const builtin = profiles.get('qwen')!;
    expect(await builtin.credentialHeaders()).toMatchObject({ authorization: 'Bearer qwen-token', 'x-dashscope-authtype': 'qwen-oauth' });
    expect(await builtin.models!()).toEqual(['coder-model', 'vision-model']);
    const other = profiles.get('corp')!;
    expect(other).toMatchObject({ kind: 'oauth-device', retryOnAuthFailure: true });
    expect(await other.credentialHeaders()).toEqual({ authorization: 'Bearer corp-token' });
    expect(await other.baseUrl()).toBe('https://api.corp.example/v1');
    expect(other.models).toBeUndefined();
    // A rejection refreshes that profile only, once for a burst.
    const rejected = await other.credentialHeaders();
    expect(await other.renewedCredentialHeaders!(rejected)).toEqual({ authorization: 'Bearer corp-token-1' });
    expect(await other.renewedCredentialHeaders!(rejected)).toEqual({ authorization: 'Bearer corp-token-1' });
    expect(corp.state.refreshes).toBe(1);
    expect(qwen.state.refreshes).toBe(0);
    corp.state.fail = new QwenRefreshTokenInvalidError('rejected');
    await expect(other.renewedCredentialHeaders!(rejected)).rejects.toThrow(/login --profile corp/);
  });

  it('an API key goes in Authorization or x-api-key, is never refreshed, and lists its models when it has them', async () => {
    const plan = profiles.get('plan')!;
    expect(plan).toMatchObject({ kind: 'api-key', retryOnAuthFailure: false });
    expect(await plan.credentialHeaders()).toEqual({ authorization: 'Bearer sk-sp-plan' });
    expect(await plan.baseUrl()).toBe('https://dashscope-intl.aliyuncs.com/compatible-mode/v1');
    expect(plan.models).toBeUndefined();
    const claude = profiles.get('claude')!;
    expect(await claude.credentialHeaders()).toEqual({ 'x-api-key': 'sk-anthropic-style' });
    expect(await claude.models!()).toEqual(['qwen3-coder-plus']);
    const empty = profiles.get('empty')!;
    const err = await empty.credentialHeaders().catch((e: unknown) => e);
    expect(err).toBeInstanceOf(ProfileNeedsLoginError);
    expect((err as Error).message).toContain('profile add empty --replace');
  });

  it('profiles come and go with the registry; each is adapted once while it runs', () => {
    const live = [...runtimes];
    const view = registryProfiles(registry(live, 'plan'), 'ua');
    expect(view.defaultProfile()).toBe('plan');
    expect(view.names()).toEqual(['qwen', 'corp', 'plan', 'claude', 'empty']);
    expect(view.get('plan')).toBe(view.get('plan'));
    live.splice(2, 1);
    expect(view.get('plan')).toBeUndefined();
    expect(view.names()).not.toContain('plan');
  });
});
