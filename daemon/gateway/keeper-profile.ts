/**
 * The built-in `qwen` profile over the daemon's TokenKeeper, as the gateway sees it. The only
 * profile until named profiles exist; then their registry provides `GatewayProfiles` instead.
 */
import { chatBaseUrl, type Credentials } from '../../shared/credentials.js';
import { QwenRefreshTokenInvalidError, QwenTokenNotAvailableError } from '../../shared/errors.js';
import type { TokenKeeper } from '../token-keeper.js';
import { ProfileNeedsLoginError, type GatewayProfile, type GatewayProfiles } from './profiles.js';
import { QWEN_PROFILE } from './routing.js';

/** A token handed to the gateway is valid at least this long, so it does not expire on the way. */
const MIN_VALIDITY_MS = 30_000;

/** The models the Qwen portal serves (it offers no model list to ask). */
export const QWEN_PORTAL_MODELS = ['coder-model', 'vision-model'];

/** The `qwen` profile backed by `keeper`; `userAgent` goes out as `X-DashScope-UserAgent`. */
export function keeperProfile(keeper: Pick<TokenKeeper, 'getAccessToken' | 'refresh' | 'servableNow'>, userAgent: string): GatewayProfile {
  const credentials = async (forceRefresh: boolean, rejected?: string): Promise<Credentials> => {
    try {
      if (forceRefresh) {
        const current = keeper.servableNow(MIN_VALIDITY_MS);
        // Refreshed since the rejected request left: the new token is the answer.
        if (current && rejected !== undefined && rejected !== `Bearer ${current.access_token}`) return current;
        return await keeper.refresh();
      }
      return keeper.servableNow(MIN_VALIDITY_MS) ?? (await keeper.getAccessToken(MIN_VALIDITY_MS));
    } catch (err) {
      if (err instanceof QwenTokenNotAvailableError || err instanceof QwenRefreshTokenInvalidError) {
        throw new ProfileNeedsLoginError(QWEN_PROFILE, 'qwen-token login', err instanceof QwenTokenNotAvailableError ? 'no credentials' : 'the refresh token was rejected');
      }
      throw err;
    }
  };
  let last: Credentials | null = null;
  return {
    name: QWEN_PROFILE,
    kind: 'qwen-oauth',
    retryOnAuthFailure: true,
    async credentialHeaders(options = {}) {
      const creds = await credentials(options.forceRefresh === true, options.rejected?.authorization);
      last = creds;
      return {
        authorization: `Bearer ${creds.access_token}`,
        'x-dashscope-useragent': userAgent,
        'x-dashscope-authtype': 'qwen-oauth',
        'x-dashscope-cachecontrol': 'enable',
      };
    },
    async baseUrl() {
      return chatBaseUrl((last ?? (await credentials(false))).resource_url);
    },
    async models() {
      return QWEN_PORTAL_MODELS;
    },
  };
}

/** The profile set of a daemon with only the built-in profile. */
export function singleProfile(profile: GatewayProfile): GatewayProfiles {
  return {
    defaultProfile: () => profile.name,
    get: (name) => (name === profile.name ? profile : undefined),
    names: () => [profile.name],
  };
}
