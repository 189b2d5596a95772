/**
 * qwen-tokend's client library: ask the one daemon for a fresh credential of a profile (Qwen
 * OAuth by default, another OAuth provider's token, or an API key).
 *
 *   import { getAccessToken } from 'qwen-tokend';
 *   const token = await getAccessToken();
 *   const key = await getAccessToken({ profile: 'coding-plan' });
 */
import { TokenClient, type TokenRequestOptions } from './token-client.js';
import type { TokenResult } from '../shared/protocol.js';

export { TokenClient } from './token-client.js';
export type { TokenClientOptions, TokenRequestOptions, LoginOptions, LogoutOptions, ProfileOption, ProfilesAddRequest, TokenClientEvents } from './token-client.js';
export {
  QwenError,
  QwenOAuthError,
  QwenRefreshTokenInvalidError,
  QwenTokenExpiredError,
  QwenTokenNotAvailableError,
  QwenDaemonUnavailableError,
  QwenCredentialsFileError,
  QwenConfigError,
  QwenProtocolError,
  QwenChatApiError,
  QwenProfileNotFoundError,
  QwenCredentialRejectedError,
  ErrorCodes,
} from '../shared/errors.js';
export type { TokenResult, StatusResult, LoginStartResult, TokenState, ProfileState, ProfilesListResult } from '../shared/protocol.js';
export { DEFAULT_PROFILE, PROFILE_ENV, PRESETS, presetSettings } from '../shared/profiles.js';
export type { ProfileInfo, ProfileKind, ProfileSettings, ApiKeySettings, OAuthDeviceSettings } from '../shared/profiles.js';
export { chatBaseUrl, DEFAULT_CHAT_BASE_URL } from '../shared/credentials.js';
export { fingerprint } from '../shared/fingerprint.js';

/** A valid access token (or a profile's API key) from the shared client (one connection per process). */
export function getAccessToken(options?: TokenRequestOptions): Promise<string> {
  return TokenClient.getInstance().getAccessToken(options);
}

/** The full token record from the shared client: `base_url` for the chat API, `profile`, `kind`, `expiry_date` (null for a key). */
export function getCredentials(options?: TokenRequestOptions): Promise<TokenResult> {
  return TokenClient.getInstance().getCredentials(options);
}

/** Closes the shared client so the process can exit (it does not keep the event loop alive anyway). */
export function shutdown(): Promise<void> {
  return TokenClient.shutdown();
}

export { createQwenFetch, qwenBaseURL, defaultUserAgent } from './qwen-fetch.js';
export type { QwenFetch, QwenFetchOptions, QwenBaseUrlOptions } from './qwen-fetch.js';
export { QwenChatModel, QWEN_CHAT_MODELS, QWEN_MODEL_NAMES, QWEN_PORTAL_PREFIX, resolveModelName } from './chat-model.js';
export type {
  QwenChatModelOptions,
  QwenCallOptions,
  QwenChatInput,
  QwenChatMessage,
  QwenContentPart,
  QwenChatResult,
  QwenChatCompletion,
  QwenUsage,
  QwenModelName,
  QwenWireModel,
} from './chat-model.js';
