/**
 * What the gateway needs from a credential profile, and nothing more. The daemon adapts its
 * credential owners (today the built-in `qwen` TokenKeeper) to this interface; the gateway
 * never sees a credential file, a refresh token or an OAuth client.
 */
import { QwenTokenNotAvailableError } from '../../shared/errors.js';

/** How a profile authenticates; OAuth kinds can be refreshed and retried after a 401. */
export type GatewayProfileKind = 'qwen-oauth' | 'oauth-device' | 'api-key';

/** One profile as the gateway uses it. */
export interface GatewayProfile {
  readonly name: string;
  readonly kind: GatewayProfileKind;
  /** The upstream's OpenAI-compatible base URL, ending in its version segment (e.g. `https://host/v1`). */
  baseUrl(): Promise<string>;
  /**
   * The headers that carry the credential (`Authorization` or `x-api-key`, plus the Qwen
   * portal's `X-DashScope-*` headers for `qwen-oauth`). Throws `ProfileNeedsLoginError` when
   * the profile has no usable credential.
   */
  credentialHeaders(): Promise<Record<string, string>>;
  /** True for OAuth kinds: a 401/403 is answered by one forced refresh and one retry. */
  readonly retryOnAuthFailure: boolean;
  /**
   * (OAuth kinds) The headers to retry with after the upstream refused `rejected`: the current
   * credential when it changed since (another request's refresh: a burst of refusals costs one
   * refresh), else a refreshed one. Null when a refresh would not help, because one ended
   * moments ago (it failed, or it gave the credential refused): the refusal then stands, and is
   * not turned into a refresh per request. Throws `ProfileNeedsLoginError` like `credentialHeaders`.
   */
  renewedCredentialHeaders?(rejected: Record<string, string>): Promise<Record<string, string> | null>;
  /** The profile's models, when it knows them without asking the upstream. */
  models?(): Promise<string[]>;
}

/** The set of profiles the gateway routes to. */
export interface GatewayProfiles {
  /** The profile `/v1/...` goes to. */
  defaultProfile(): string;
  get(name: string): GatewayProfile | undefined;
  names(): string[];
}

/** The profile has no usable credential; `loginCommand` tells a person what to run. */
export class ProfileNeedsLoginError extends QwenTokenNotAvailableError {
  constructor(
    readonly profile: string,
    readonly loginCommand: string,
    reason: string,
  ) {
    super(`profile "${profile}" needs a login (${reason}): run \`${loginCommand}\``);
  }
}
