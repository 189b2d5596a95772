/**
 * The daemon's credential profiles as the gateway sees them (`GatewayProfiles`): each profile
 * adapted once, from its runtime. OAuth profiles hand out their keeper's token and are refreshed
 * and retried after a 401; the built-in `qwen` profile adds the Qwen portal's `X-DashScope-*`
 * headers; an API key goes in `Authorization: Bearer` or `x-api-key`, and a rejection of it is
 * passed through (a new key is needed, not a refresh).
 */
import { chatBaseUrl, type Credentials } from '../../shared/credentials.js';
import { QwenRefreshTokenInvalidError, QwenTokenNotAvailableError } from '../../shared/errors.js';
import type { TokenResult } from '../../shared/protocol.js';
import type { TokenKeeper } from '../token-keeper.js';
import { ProfileNeedsLoginError, type GatewayProfile, type GatewayProfiles } from './profiles.js';
import { QWEN_PROFILE } from './routing.js';

/** A token handed to the gateway is valid at least this long, so it does not expire on the way. */
const MIN_VALIDITY_MS = 30_000;

/** The models the Qwen portal serves (it offers no model list to ask). */
export const QWEN_PORTAL_MODELS = ['coder-model', 'vision-model'];

type KeeperLike = Pick<TokenKeeper, 'getAccessToken' | 'refreshAfterRejection' | 'servableNow'>;

interface OAuthSource {
  name: string;
  kind: 'qwen-oauth' | 'oauth-device';
  keeper: KeeperLike;
  /** The headers that go with an access token. */
  headers(accessToken: string): Record<string, string>;
  baseUrl(credentials: Credentials): string;
  loginCommand: string;
  models?: () => Promise<string[]>;
}

/** A profile whose credential is an OAuth access token owned by `keeper`. */
function oauthProfile(source: OAuthSource): GatewayProfile {
  const { keeper, name } = source;
  /** Runs `get`, with a missing or refused login reported as the profile needing one. */
  const asProfile = async <T>(get: () => Promise<T>): Promise<T> => {
    try {
      return await get();
    } catch (err) {
      if (err instanceof QwenTokenNotAvailableError || err instanceof QwenRefreshTokenInvalidError) {
        throw new ProfileNeedsLoginError(name, source.loginCommand, err instanceof QwenTokenNotAvailableError ? 'no credentials' : 'the refresh token was rejected');
      }
      throw err;
    }
  };
  const current = (): Promise<Credentials> => asProfile(async () => keeper.servableNow(MIN_VALIDITY_MS) ?? (await keeper.getAccessToken(MIN_VALIDITY_MS)));
  let last: Credentials | null = null;
  const profile: GatewayProfile = {
    name,
    kind: source.kind,
    retryOnAuthFailure: true,
    async credentialHeaders() {
      const creds = await current();
      last = creds;
      return source.headers(creds.access_token);
    },
    async renewedCredentialHeaders(rejected) {
      // Which token was refused decides whether a refresh can help; unknown, the refusal stands.
      const refused = /^Bearer (.+)$/.exec(rejected.authorization ?? '')?.[1];
      if (refused === undefined) return null;
      const creds = await asProfile(() => keeper.refreshAfterRejection(refused, MIN_VALIDITY_MS));
      if (!creds) return null;
      last = creds;
      return source.headers(creds.access_token);
    },
    async baseUrl() {
      return source.baseUrl(last ?? (await current()));
    },
  };
  if (source.models) profile.models = source.models;
  return profile;
}

/** The built-in `qwen` profile backed by `keeper`; `userAgent` goes out as `X-DashScope-UserAgent`. */
export function keeperProfile(keeper: KeeperLike, userAgent: string): GatewayProfile {
  return oauthProfile({
    name: QWEN_PROFILE,
    kind: 'qwen-oauth',
    keeper,
    headers: (token) => ({
      authorization: `Bearer ${token}`,
      'x-dashscope-useragent': userAgent,
      'x-dashscope-authtype': 'qwen-oauth',
      'x-dashscope-cachecontrol': 'enable',
    }),
    baseUrl: (c) => chatBaseUrl(c.resource_url),
    loginCommand: 'qwen-token login',
    models: async () => QWEN_PORTAL_MODELS,
  });
}

/** What the gateway needs of one of the daemon's profile runtimes. */
export interface RuntimeView {
  readonly name: string;
  readonly kind: 'qwen-oauth' | 'oauth-device' | 'api-key';
  readonly builtin: boolean;
  readonly settings: { base_url: string; models?: string[] | undefined } | null;
  /** OAuth kinds: the token's owner. */
  readonly keeper?: KeeperLike;
  /** OAuth kinds: the chat base URL for credentials. */
  baseUrlFor?(credentials: Credentials): string;
  /** OAuth kinds: how a person logs it in. */
  loginCommand?(): string;
  /** API keys: how a person replaces the key. */
  replaceCommand?(): string;
  servableNow(minValidityMs: number): TokenResult | null;
}

/** The daemon's profile set, read live (profiles come and go with the config file). */
export interface RegistryView {
  readonly defaultProfile: string;
  get(name: string): RuntimeView | undefined;
  names(): string[];
}

/** An `api-key` profile: the key in its header; a rejected key is the upstream's answer to pass on. */
function apiKeyProfile(runtime: RuntimeView): GatewayProfile {
  const settings = runtime.settings!;
  const profile: GatewayProfile = {
    name: runtime.name,
    kind: 'api-key',
    retryOnAuthFailure: false,
    async credentialHeaders(): Promise<Record<string, string>> {
      const current = runtime.servableNow(0);
      if (!current) throw new ProfileNeedsLoginError(runtime.name, runtime.replaceCommand?.() ?? `qwen-token profile add ${runtime.name} --replace`, 'no API key');
      return current.auth_header === 'x-api-key' ? { 'x-api-key': current.access_token } : { authorization: `Bearer ${current.access_token}` };
    },
    async baseUrl() {
      return settings.base_url;
    },
  };
  const models = settings.models;
  if (models) profile.models = async () => models;
  return profile;
}

/** Adapts one runtime (the built-in profile keeps its portal headers and model list). */
function adapt(runtime: RuntimeView, userAgent: string): GatewayProfile {
  if (runtime.kind === 'api-key') return apiKeyProfile(runtime);
  if (runtime.builtin) return keeperProfile(runtime.keeper!, userAgent);
  return oauthProfile({
    name: runtime.name,
    kind: runtime.kind,
    keeper: runtime.keeper!,
    headers: (token) => ({ authorization: `Bearer ${token}` }),
    baseUrl: (c) => runtime.baseUrlFor!(c),
    loginCommand: runtime.loginCommand?.() ?? `qwen-token login --profile ${runtime.name}`,
  });
}

/** The gateway's view of the daemon's profiles; each runtime is adapted once, while it runs. */
export function registryProfiles(registry: RegistryView, userAgent: string): GatewayProfiles {
  const adapted = new WeakMap<RuntimeView, GatewayProfile>();
  return {
    defaultProfile: () => registry.defaultProfile,
    get(name) {
      const runtime = registry.get(name);
      if (!runtime) return undefined;
      let profile = adapted.get(runtime);
      if (!profile) {
        profile = adapt(runtime, userAgent);
        adapted.set(runtime, profile);
      }
      return profile;
    },
    names: () => registry.names(),
  };
}
