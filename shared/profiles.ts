/**
 * Credential profiles: what daemon, client and CLI agree a profile is. A profile is a name, a
 * kind and its settings. Settings live in the config file (never a secret); secrets (tokens,
 * API keys, client secrets) live only in the daemon's per-profile files. See docs/profiles.md.
 */
import { z } from 'zod';
import { isLoopbackUrl } from './url-trust.js';

/** The built-in profile: Qwen OAuth with today's files, paths and environment variables. */
export const DEFAULT_PROFILE = 'qwen';
/** The environment variable a client reads for the profile it uses when none is given. */
export const PROFILE_ENV = 'QWEN_TOKEND_PROFILE';

export const PROFILE_NAME_PATTERN = /^[a-z0-9][a-z0-9_-]{0,62}$/;
export const ProfileNameSchema = z
  .string()
  .regex(PROFILE_NAME_PATTERN, 'a profile name is 1-63 characters: lower-case letters, digits, "_" and "-", starting with a letter or digit');

export const PROFILE_KINDS = ['qwen-oauth', 'oauth-device', 'api-key'] as const;
export const ProfileKindSchema = z.enum(PROFILE_KINDS);
export type ProfileKind = z.infer<typeof ProfileKindSchema>;

/** How an API key is sent: `Authorization: Bearer KEY` or `x-api-key: KEY`. */
export const API_KEY_AUTH = ['bearer', 'x-api-key'] as const;
export const ApiKeyAuthSchema = z.enum(API_KEY_AUTH);
export type ApiKeyAuth = z.infer<typeof ApiKeyAuthSchema>;

/** True for an https URL, or plain http to this machine; no userinfo, query or fragment. */
export function isAcceptableEndpoint(value: string): boolean {
  let url: URL;
  try {
    url = new URL(value);
  } catch {
    return false;
  }
  if (url.username || url.password || url.search || url.hash) return false;
  return url.protocol === 'https:' || (url.protocol === 'http:' && isLoopbackUrl(url));
}

const EndpointUrl = z
  .string()
  .max(2048)
  .refine(isAcceptableEndpoint, 'must be an https URL (plain http only for loopback) without user, query or fragment');

/** How an `oauth-device` profile may send its client secret to the provider. */
export const TOKEN_ENDPOINT_AUTH_METHODS = ['client_secret_post', 'client_secret_basic'] as const;
export type TokenEndpointAuthMethod = (typeof TOKEN_ENDPOINT_AUTH_METHODS)[number];
/** The range of `token_lifetime_seconds`: a minute to a year. */
export const TOKEN_LIFETIME_S = { min: 60, max: 31_536_000 } as const;

/** Settings of an `oauth-device` profile: any RFC 8628 provider. */
export const OAuthDeviceSettingsSchema = z
  .object({
    kind: z.literal('oauth-device'),
    /** The issuer; endpoints found by RFC 8414 or OpenID discovery. */
    issuer: EndpointUrl.optional(),
    /** Explicit endpoints, instead of (or overriding) discovery. */
    device_authorization_endpoint: EndpointUrl.optional(),
    token_endpoint: EndpointUrl.optional(),
    client_id: z.string().min(1).max(1024),
    scope: z.string().max(4096).optional(),
    audience: z.string().min(1).max(2048).optional(),
    /** RFC 8707 resource indicator. */
    resource: z.string().url().max(2048).optional(),
    /** PKCE S256 on the device authorization request (on unless turned off). */
    pkce: z.boolean().optional(),
    /**
     * How the client secret is sent (RFC 8414 names): in the request body, or as HTTP Basic.
     * Unset: in the body unless the provider lists only Basic. Providers that hold a client to
     * the method it was registered with refuse the other one (invalid_client).
     */
    token_endpoint_auth_method: z.enum(TOKEN_ENDPOINT_AUTH_METHODS).optional(),
    /** Refresh this long before expiry (default: the daemon's refresh lead). */
    refresh_lead_seconds: z.number().int().min(0).max(86_400).optional(),
    /**
     * How long an access token lasts when the provider's answer does not say (no `expires_in`,
     * and the token is not a JWT with an `exp`). Default: one hour.
     */
    token_lifetime_seconds: z.number().int().min(TOKEN_LIFETIME_S.min).max(TOKEN_LIFETIME_S.max).optional(),
    /** The API base URL that chat calls use (OpenAI-compatible, ending in its version). */
    base_url: EndpointUrl,
    description: z.string().max(500).optional(),
  })
  .strict()
  .refine((s) => s.issuer !== undefined || (s.device_authorization_endpoint !== undefined && s.token_endpoint !== undefined), {
    message: 'give an issuer, or both device_authorization_endpoint and token_endpoint',
    path: ['issuer'],
  });
export type OAuthDeviceSettings = z.infer<typeof OAuthDeviceSettingsSchema>;

/** Settings of an `api-key` profile: a static key with a base URL. */
export const ApiKeySettingsSchema = z
  .object({
    kind: z.literal('api-key'),
    base_url: EndpointUrl,
    auth: ApiKeyAuthSchema.optional(),
    /** The preset and region it was made from, for display. */
    preset: z.string().max(100).optional(),
    region: z.string().max(100).optional(),
    /** Models to list when the endpoint offers no `GET /models`. */
    models: z.array(z.string().min(1).max(200)).max(500).optional(),
    description: z.string().max(500).optional(),
  })
  .strict();
export type ApiKeySettings = z.infer<typeof ApiKeySettingsSchema>;

/** Settings a user may write in the config file (the `qwen-oauth` profile is built in). */
export const ProfileSettingsSchema = z.discriminatedUnion('kind', [OAuthDeviceSettingsSchema, ApiKeySettingsSchema]);
export type ProfileSettings = z.infer<typeof ProfileSettingsSchema>;

/** The `profiles` part of the config file, and which profile is the default. */
export const ProfilesConfigSchema = z
  .object({
    default_profile: ProfileNameSchema.optional(),
    profiles: z.record(ProfileNameSchema, ProfileSettingsSchema).optional(),
  })
  .passthrough();
export type ProfilesConfig = z.infer<typeof ProfilesConfigSchema>;

// ---- presets ----

export interface ProfilePreset {
  readonly name: string;
  readonly description: string;
  readonly regions: Readonly<Record<string, string>>;
  readonly defaultRegion: string;
  readonly auth: ApiKeyAuth;
}

/**
 * Shortcuts for Qwen's current plans (base URLs from Alibaba Cloud Model Studio's "Base URL
 * overview"); every URL can be overridden with `--base-url`.
 */
export const PRESETS: Readonly<Record<string, ProfilePreset>> = Object.freeze({
  'coding-plan': {
    name: 'coding-plan',
    description: 'Qwen Coding Plan (sk-sp-… key)',
    regions: { intl: 'https://coding-intl.dashscope.aliyuncs.com/v1', cn: 'https://coding.dashscope.aliyuncs.com/v1' },
    defaultRegion: 'intl',
    auth: 'bearer',
  },
  dashscope: {
    name: 'dashscope',
    description: 'Alibaba Cloud Model Studio (DashScope) pay-as-you-go key',
    regions: {
      singapore: 'https://dashscope-intl.aliyuncs.com/compatible-mode/v1',
      beijing: 'https://dashscope.aliyuncs.com/compatible-mode/v1',
      'us-virginia': 'https://dashscope-us.aliyuncs.com/compatible-mode/v1',
      hongkong: 'https://cn-hongkong.dashscope.aliyuncs.com/compatible-mode/v1',
    },
    defaultRegion: 'singapore',
    auth: 'bearer',
  },
});

/** The settings a preset stands for; throws a message naming the valid choices. */
export function presetSettings(preset: string, region?: string): ApiKeySettings {
  const p = PRESETS[preset];
  if (!p) throw new Error(`unknown preset "${preset}"; choose one of: ${Object.keys(PRESETS).join(', ')}`);
  const r = region ?? p.defaultRegion;
  const baseUrl = p.regions[r];
  if (!baseUrl) throw new Error(`preset "${preset}" has no region "${r}"; choose one of: ${Object.keys(p.regions).join(', ')}`);
  return { kind: 'api-key', base_url: baseUrl, auth: p.auth, preset: p.name, region: r };
}

// ---- what the daemon reports about a profile ----

/** One profile as `profiles.list` and `status` show it: settings and state, never a secret. */
export const ProfileInfoSchema = z.object({
  name: z.string(),
  kind: ProfileKindSchema,
  builtin: z.boolean(),
  default: z.boolean(),
  /** The settings (for `qwen-oauth`: the effective OAuth server and chat base URL). */
  settings: z.record(z.string(), z.unknown()),
  base_url: z.string().nullable(),
  /** True when the profile's secret (key, client secret or tokens) is present. */
  has_secret: z.boolean(),
  /** Fingerprint of the key or access token; never the value. */
  secret_fingerprint: z.string(),
  state: z.enum(['no_credentials', 'valid', 'refreshing', 'retrying', 'expired', 'needs_login', 'static']),
  expiry_date: z.number().nullable(),
  next_refresh_at: z.number().nullable(),
  last_error: z.object({ code: z.string(), message: z.string(), at: z.number() }).nullable(),
  /** The files that hold its secrets. */
  files: z.array(z.string()),
});
export type ProfileInfo = z.infer<typeof ProfileInfoSchema>;
