/**
 * The error hierarchy shared by daemon, client and CLI. Every class carries a stable
 * string `code` that survives the socket: the daemon sends `{code, message}` and the
 * client rebuilds the same class with `errorFromWire`.
 * Messages never contain token values.
 */

/** Stable codes, one per class. Never rename: clients in other languages match on them. */
export const ErrorCodes = {
  generic: 'QWEN_ERROR',
  oauth: 'QWEN_OAUTH_ERROR',
  refreshTokenInvalid: 'QWEN_REFRESH_TOKEN_INVALID',
  tokenExpired: 'QWEN_TOKEN_EXPIRED',
  tokenNotAvailable: 'QWEN_TOKEN_NOT_AVAILABLE',
  daemonUnavailable: 'QWEN_DAEMON_UNAVAILABLE',
  credentialsFile: 'QWEN_CREDENTIALS_FILE_INVALID',
  config: 'QWEN_CONFIG_INVALID',
  protocol: 'QWEN_PROTOCOL_ERROR',
  chatApi: 'QWEN_CHAT_API_ERROR',
  profileNotFound: 'QWEN_PROFILE_NOT_FOUND',
  credentialRejected: 'QWEN_CREDENTIAL_REJECTED',
} as const;

export type ErrorCode = (typeof ErrorCodes)[keyof typeof ErrorCodes];

export interface QwenErrorOptions {
  cause?: unknown;
}

/** Base of every error this package raises on purpose. */
export class QwenError extends Error {
  readonly code: ErrorCode = ErrorCodes.generic;
  constructor(message: string, options?: QwenErrorOptions) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.name = new.target.name;
  }
}

export interface QwenOAuthErrorOptions extends QwenErrorOptions {
  /** OAuth `error` field (e.g. `access_denied`, `expired_token`), when the server sent one. */
  oauthError?: string | undefined;
  /** HTTP status, when there was a response. */
  status?: number | undefined;
  /** True when trying again later can succeed (network, timeout, 5xx, 429, garbage body). */
  retryable?: boolean | undefined;
}

/** The OAuth flow failed (device authorization, polling, or a non-terminal refresh failure). */
export class QwenOAuthError extends QwenError {
  override readonly code: ErrorCode = ErrorCodes.oauth;
  readonly oauthError: string | undefined;
  readonly status: number | undefined;
  readonly retryable: boolean;
  constructor(message: string, options?: QwenOAuthErrorOptions) {
    super(message, options);
    this.oauthError = options?.oauthError;
    this.status = options?.status;
    this.retryable = options?.retryable ?? false;
  }
}

/** The server rejected the refresh token: only a new login helps. */
export class QwenRefreshTokenInvalidError extends QwenError {
  override readonly code: ErrorCode = ErrorCodes.refreshTokenInvalid;
}

/** The access token is past expiry and could not be refreshed. */
export class QwenTokenExpiredError extends QwenError {
  override readonly code: ErrorCode = ErrorCodes.tokenExpired;
}

/** There are no credentials at all: log in first. */
export class QwenTokenNotAvailableError extends QwenError {
  override readonly code: ErrorCode = ErrorCodes.tokenNotAvailable;
}

/** Client side: the daemon could not be reached (or started). */
export class QwenDaemonUnavailableError extends QwenError {
  override readonly code: ErrorCode = ErrorCodes.daemonUnavailable;
}

/** A credential file exists but is not valid JSON of the expected shape. */
export class QwenCredentialsFileError extends QwenError {
  override readonly code: ErrorCode = ErrorCodes.credentialsFile;
}

/** An environment variable or option has a value that cannot be used. */
export class QwenConfigError extends QwenError {
  override readonly code: ErrorCode = ErrorCodes.config;
}

/** A frame or message on the socket did not follow the protocol. */
export class QwenProtocolError extends QwenError {
  override readonly code: ErrorCode = ErrorCodes.protocol;
}

/** The chat API answered with an error that is not about the token. */
export class QwenChatApiError extends QwenError {
  override readonly code: ErrorCode = ErrorCodes.chatApi;
  readonly status: number | undefined;
  constructor(message: string, options?: QwenErrorOptions & { status?: number }) {
    super(message, options);
    this.status = options?.status;
  }
}

/** No profile of that name is configured. */
export class QwenProfileNotFoundError extends QwenError {
  override readonly code: ErrorCode = ErrorCodes.profileNotFound;
}

/**
 * The API rejected a static credential (an API key): a new key is needed, and retrying will not
 * help. The message names the profile and how to replace the key.
 */
export class QwenCredentialRejectedError extends QwenError {
  override readonly code: ErrorCode = ErrorCodes.credentialRejected;
}

const byCode: Record<string, new (message: string) => QwenError> = {
  [ErrorCodes.generic]: QwenError,
  [ErrorCodes.oauth]: QwenOAuthError,
  [ErrorCodes.refreshTokenInvalid]: QwenRefreshTokenInvalidError,
  [ErrorCodes.tokenExpired]: QwenTokenExpiredError,
  [ErrorCodes.tokenNotAvailable]: QwenTokenNotAvailableError,
  [ErrorCodes.daemonUnavailable]: QwenDaemonUnavailableError,
  [ErrorCodes.credentialsFile]: QwenCredentialsFileError,
  [ErrorCodes.config]: QwenConfigError,
  [ErrorCodes.protocol]: QwenProtocolError,
  [ErrorCodes.chatApi]: QwenChatApiError,
  [ErrorCodes.profileNotFound]: QwenProfileNotFoundError,
  [ErrorCodes.credentialRejected]: QwenCredentialRejectedError,
};

/** Rebuilds the typed error a daemon sent as `{code, message}`; unknown codes become `QwenError`. */
export function errorFromWire(code: string | undefined, message: string, oauthError?: string): QwenError {
  if (code === ErrorCodes.oauth) return new QwenOAuthError(message, { oauthError });
  const Ctor = (code !== undefined && byCode[code]) || QwenError;
  return new Ctor(message);
}
