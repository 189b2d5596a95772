/**
 * The `profiles` and `default_profile` keys of the shared config file: what they must hold, as
 * pure functions of the parsed file (no I/O), so every rule is a one-line test. A secret never
 * belongs here: a field that looks like one is refused with a message saying where it goes.
 */
import { createHash } from 'node:crypto';
import { describeIssues } from '../shared/diagnostics.js';
import { QwenConfigError } from '../shared/errors.js';
import {
  DEFAULT_PROFILE,
  ProfileNameSchema,
  ProfileSettingsSchema,
  type OAuthDeviceSettings,
  type ProfileSettings,
} from '../shared/profiles.js';

/** The profiles a config file defines, and its default (the built-in profile when it names none). */
export interface ProfilesConfig {
  /** Settings by profile name, in the file's order; never the built-in profile. */
  profiles: ReadonlyMap<string, ProfileSettings>;
  defaultProfile: string;
}

/** What a config file gave: the profiles to apply, and why (part of) it could not be used. */
export interface ProfilesConfigRead {
  config: ProfilesConfig;
  /** Null when the whole file was usable. */
  error: string | null;
}

/** Field names that hold a secret, wherever they appear in a profile's settings. */
const SECRET_FIELD = /^(api_?key|apikey|key|secret|client_secret|password|passwd|token|access_token|refresh_token|id_token|bearer|authorization|x-api-key)$/i;
/** Field names that end like a secret's (`dashscope_api_key`, `my_secret`). */
const SECRET_SUFFIX = /(_|-)(api_?key|secret|password|token)$/i;

/** The names of fields in `value` (searched to any depth) that look like secrets. */
export function secretFields(value: unknown, path = ''): string[] {
  if (value === null || typeof value !== 'object') return [];
  const found: string[] = [];
  for (const [key, inner] of Object.entries(value)) {
    const here = path ? `${path}.${key}` : key;
    if (SECRET_FIELD.test(key) || SECRET_SUFFIX.test(key)) found.push(here);
    else found.push(...secretFields(inner, here));
  }
  return found;
}

/** Where a profile's secret is kept, and how to put it there, for messages. */
export function secretAdvice(name: string, profilesDir: string): string {
  return (
    `secrets never go in the config file: run \`qwen-token profile add ${name} --replace\`, which reads the key or ` +
    `client secret from standard input and stores it in ${profilesDir}/${name}.secret.json (0600)`
  );
}

/**
 * Validates one profile's settings; throws `QwenConfigError` naming the profile, the file and
 * what is wrong. `where` names the source (the config file's path, or "profiles.add").
 */
export function parseProfileSettings(name: string, raw: unknown, where: string, profilesDir: string): ProfileSettings {
  const named = ProfileNameSchema.safeParse(name);
  if (!named.success) throw new QwenConfigError(`profile name "${name.slice(0, 80)}" in ${where} is not valid: ${describeIssues(named.error)}`);
  if (name === DEFAULT_PROFILE) {
    throw new QwenConfigError(`"${DEFAULT_PROFILE}" in ${where} is the built-in Qwen OAuth profile and cannot be redefined; choose another name`);
  }
  const secrets = secretFields(raw);
  if (secrets.length > 0) {
    throw new QwenConfigError(`profile "${name}" in ${where} has a secret field (${secrets.join(', ')}); ${secretAdvice(name, profilesDir)}`);
  }
  if (raw !== null && typeof raw === 'object' && (raw as { kind?: unknown }).kind === 'qwen-oauth') {
    throw new QwenConfigError(`profile "${name}" in ${where}: kind "qwen-oauth" is the built-in "${DEFAULT_PROFILE}" profile alone; use "oauth-device" or "api-key"`);
  }
  const parsed = ProfileSettingsSchema.safeParse(raw);
  if (!parsed.success) throw new QwenConfigError(`profile "${name}" in ${where} is not valid: ${describeIssues(parsed.error)}`);
  return parsed.data;
}

/**
 * The profiles of a parsed config file. A bad profile (or a bad `profiles` key) makes the whole
 * set unusable: `error` says why and the caller keeps what it had. An unknown `default_profile`
 * is reported too, but the profiles are used, with the built-in profile as the default.
 */
export function readProfilesConfig(whole: Record<string, unknown>, path: string, profilesDir: string): { config: ProfilesConfig | null; error: string | null } {
  const topSecrets = Object.keys(whole).filter((k) => SECRET_FIELD.test(k) || SECRET_SUFFIX.test(k));
  if (topSecrets.length > 0) {
    return { config: null, error: `the config file ${path} has a secret field (${topSecrets.join(', ')}) at the top level; secrets never go in the config file (see \`qwen-token profile add --help\`)` };
  }
  const rawProfiles = whole.profiles ?? {};
  if (rawProfiles === null || typeof rawProfiles !== 'object' || Array.isArray(rawProfiles)) {
    return { config: null, error: `"profiles" in ${path} must be an object of profile name to settings` };
  }
  const profiles = new Map<string, ProfileSettings>();
  try {
    for (const [name, raw] of Object.entries(rawProfiles)) profiles.set(name, parseProfileSettings(name, raw, path, profilesDir));
  } catch (err) {
    return { config: null, error: (err as QwenConfigError).message };
  }
  const wanted = whole.default_profile;
  if (wanted === undefined || wanted === DEFAULT_PROFILE) return { config: { profiles, defaultProfile: DEFAULT_PROFILE }, error: null };
  if (typeof wanted !== 'string' || !profiles.has(wanted)) {
    const shown = typeof wanted === 'string' ? `"${wanted.slice(0, 80)}"` : 'not a profile name';
    return {
      config: { profiles, defaultProfile: DEFAULT_PROFILE },
      error: `default_profile in ${path} is ${shown}, which names no profile; using "${DEFAULT_PROFILE}" (see \`qwen-token profile list\`)`,
    };
  }
  return { config: { profiles, defaultProfile: wanted }, error: null };
}

/** A canonical text of settings (keys sorted), to tell a real change from a rewrite of the same. */
export function settingsKey(settings: ProfileSettings): string {
  const sorted = (v: unknown): unknown => {
    if (Array.isArray(v)) return v.map(sorted);
    if (v === null || typeof v !== 'object') return v;
    return Object.fromEntries(Object.keys(v).sort().map((k) => [k, sorted((v as Record<string, unknown>)[k])]));
  };
  return JSON.stringify(sorted(settings));
}

/**
 * What identifies the grant an `oauth-device` profile's tokens belong to: the provider and the
 * client. Tokens are kept across a settings change only while this stays the same; presented to
 * another provider, a refresh token would leak to it.
 */
export function grantIdentity(settings: ProfileSettings): string {
  if (settings.kind !== 'oauth-device') return settings.kind;
  const s: OAuthDeviceSettings = settings;
  return JSON.stringify([s.kind, s.issuer ?? null, s.device_authorization_endpoint ?? null, s.token_endpoint ?? null, s.client_id]);
}

/**
 * The grant a token file records (`grant` in `profiles/<name>.token.json`): a SHA-256 digest of
 * `grantIdentity`, so a file names its provider and client without spelling them out. Tokens
 * whose file names another grant are deleted at load (see daemon/credential-store.ts).
 */
export function grantDigest(settings: ProfileSettings): string {
  return createHash('sha256').update(grantIdentity(settings)).digest('hex');
}

/**
 * Settings a running profile takes without a restart, by kind: they change what is shown (and,
 * for `oauth-device`, the base URL clients and the gateway get), never the grant, the OAuth
 * client's requests, the refresh schedule or the credential. A restart ends a login in progress
 * and holds the change until a refresh in flight is saved, for nothing these need.
 * An `api-key` profile's `base_url`, `auth` and `models` restart it: it has nothing to refresh,
 * and the gateway reads them once per runtime.
 */
const IN_PLACE_FIELDS: Readonly<Record<ProfileSettings['kind'], readonly string[]>> = {
  'oauth-device': ['description', 'base_url'],
  'api-key': ['description', 'preset', 'region'],
};

/** True when a running profile must be restarted to go from `previous` to `next` settings. */
export function settingsNeedRestart(previous: ProfileSettings, next: ProfileSettings): boolean {
  if (previous.kind !== next.kind) return true;
  const without = (s: ProfileSettings): string => {
    const rest: Record<string, unknown> = { ...s };
    for (const field of IN_PLACE_FIELDS[s.kind]) delete rest[field];
    return settingsKey(rest as ProfileSettings);
  };
  return without(previous) !== without(next);
}
