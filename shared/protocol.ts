import { z } from 'zod';
import { GatewayStatus } from './gateway-protocol.js';
import { ApiKeySettingsSchema, OAuthDeviceSettingsSchema, ProfileInfoSchema, ProfileKindSchema, ProfileNameSchema, ProfileSettingsSchema } from './profiles.js';

/**
 * The daemon's wire protocol: JSON-RPC 2.0, one JSON object per line (NDJSON) on a Unix socket.
 * Bump PROTOCOL_VERSION on any incompatible change. A client names its version in `hello`; the
 * daemon answers with the version the connection will speak (the client's, when it is one the
 * daemon still serves), so a client of an older version keeps working. See docs/protocol.md.
 *
 * Version 2 added profiles: an optional `profile` on every credential method, `profiles.*`
 * methods, `profile`/`kind`/`auth_header` in token results and `profile` in notifications.
 * A version-1 connection sees only the default profile, in version 1's shapes.
 */
export const PROTOCOL_VERSION = 2;
/** The oldest version the daemon still serves. */
export const MIN_PROTOCOL_VERSION = 1;

/** Largest frame (one line, newline excluded) either side accepts. */
export const MAX_FRAME_BYTES = 64 * 1024;
/** Most connections the daemon holds at once. */
export const MAX_CONNECTIONS = 1024;

/** JSON-RPC 2.0 error codes. Application errors use APP_ERROR with `data.code` = QwenError code. */
export const RpcErrorCodes = {
  parseError: -32700,
  invalidRequest: -32600,
  methodNotFound: -32601,
  invalidParams: -32602,
  internalError: -32603,
  appError: -32000,
  frameTooLarge: -32001,
} as const;

export const Methods = {
  hello: 'hello',
  getAccessToken: 'getAccessToken',
  status: 'status',
  refresh: 'refresh',
  loginStart: 'login.start',
  loginCancel: 'login.cancel',
  logout: 'logout',
  subscribe: 'subscribe',
  profilesList: 'profiles.list',
  profilesAdd: 'profiles.add',
  profilesRemove: 'profiles.remove',
  profilesSetDefault: 'profiles.setDefault',
} as const;
export type MethodName = (typeof Methods)[keyof typeof Methods];

export const Notifications = {
  tokenRefreshed: 'token.refreshed',
  tokenRefreshFailed: 'token.refresh_failed',
  stateChanged: 'state.changed',
  loginCompleted: 'login.completed',
  loginFailed: 'login.failed',
  /** Version 2: the set of profiles or their settings changed (config edited, added, removed). */
  profilesChanged: 'profiles.changed',
} as const;

/** A request id. Numbers first: that is what clients send, and a union stops at the first match. */
export const RpcIdSchema = z.union([z.number(), z.string().max(200), z.null()]);

/** A request or notification as received by the daemon. */
export const RpcRequestSchema = z.object({
  jsonrpc: z.literal('2.0'),
  id: RpcIdSchema.optional(),
  method: z.string().min(1).max(100),
  params: z.union([z.record(z.string(), z.unknown()), z.array(z.unknown())]).optional(),
});
export type RpcRequest = z.infer<typeof RpcRequestSchema>;

/**
 * The schema of a whole request frame to one method: envelope and params in one pass, so the
 * common case (a valid call) is validated once. An absent `params` member is validated as `{}`.
 */
export function requestSchemaFor<P extends z.ZodType>(method: string, params: P) {
  return z.object({ jsonrpc: z.literal('2.0'), id: RpcIdSchema.optional(), method: z.literal(method), params: params.prefault({} as z.input<P>) });
}

export const RpcErrorSchema = z.object({
  code: z.number(),
  message: z.string(),
  data: z
    .object({ code: z.string().optional(), oauth_error: z.string().optional() })
    .passthrough()
    .optional(),
});
export type RpcError = z.infer<typeof RpcErrorSchema>;

// ---- params ----
export const EmptyParams = z.object({}).strict();
export const HelloParams = z.object({ client: z.string().max(200).optional(), protocol: z.number().int().optional() }).strict();
/** The profile a call is about (version 2); absent: the daemon's default profile. */
const profile = ProfileNameSchema.optional();
export const ProfileParams = z.object({ profile }).strict();
export const GetAccessTokenParams = z
  .object({ minValidityMs: z.number().int().min(0).max(24 * 3600_000).optional(), profile })
  .strict();
export const LogoutParams = z.object({ qwenCli: z.boolean().optional(), profile }).strict();
/** `subscribe`: pushes for one profile, or (no profile, version 2) for every profile. */
export const SubscribeParams = ProfileParams;
export const ProfilesAddParams = z
  .object({
    name: ProfileNameSchema,
    settings: ProfileSettingsSchema,
    /** The API key (`api-key`) or client secret (`oauth-device`); stored in the profile's secret file. */
    secret: z.string().min(1).max(16_384).optional(),
    /** Replace an existing profile of that name (its tokens are kept when the OAuth settings are unchanged). */
    replace: z.boolean().optional(),
    /** Make it the default profile. */
    makeDefault: z.boolean().optional(),
  })
  .strict();
export const ProfilesRemoveParams = z.object({ name: ProfileNameSchema }).strict();
/** `profiles.setDefault`: the profile used when a call names none (`qwen`: the built-in one again). */
export const ProfilesSetDefaultParams = z.object({ name: ProfileNameSchema }).strict();

// ---- results ----
export const HelloResult = z.object({
  protocol: z.number(),
  daemon: z.literal('qwen-tokend'),
  version: z.string(),
  pid: z.number(),
  /** Version 2: the profile a call that names none is about (so pushes can fill that cache). */
  default_profile: z.string().optional(),
});
export type HelloResult = z.infer<typeof HelloResult>;

export const TokenResult = z.object({
  access_token: z.string().min(1),
  token_type: z.string(),
  /** Epoch ms; null (version 2) for a credential that does not expire (an API key). */
  expiry_date: z.number().nullable(),
  resource_url: z.string().optional(),
  base_url: z.string(),
  /** Version 2: which profile, its kind, and the header the credential goes in. */
  profile: z.string().optional(),
  kind: ProfileKindSchema.optional(),
  auth_header: z.enum(['authorization', 'x-api-key']).optional(),
});
export type TokenResult = z.infer<typeof TokenResult>;

export const TokenStates = ['no_credentials', 'valid', 'refreshing', 'retrying', 'expired', 'needs_login'] as const;
export const TokenStateSchema = z.enum(TokenStates);
export type TokenState = z.infer<typeof TokenStateSchema>;
/** A profile's state: a token state, or `static` (version 2) for a credential that never expires. */
export const ProfileStateSchema = z.enum([...TokenStates, 'static']);
export type ProfileState = z.infer<typeof ProfileStateSchema>;

export const LastErrorSchema = z.object({ code: z.string(), message: z.string(), at: z.number() });
export type LastError = z.infer<typeof LastErrorSchema>;

export const StatusResult = z.object({
  state: ProfileStateSchema,
  expiry_date: z.number().nullable(),
  next_refresh_at: z.number().nullable(),
  last_refresh_at: z.number().nullable(),
  last_error: LastErrorSchema.nullable(),
  retry_count: z.number(),
  source_file: z.string().nullable(),
  token_path: z.string(),
  qwen_cli_link: z.object({ enabled: z.boolean(), path: z.string() }),
  token_fingerprint: z.string(),
  refresh_token_fingerprint: z.string(),
  login_in_progress: z.boolean(),
  pid: z.number(),
  version: z.string(),
  protocol: z.number(),
  uptime_ms: z.number(),
  connected_clients: z.number(),
  requests_served: z.number(),
  socket_path: z.string(),
  now: z.number(),
  /** The HTTP gateway (absent from daemons before it existed). */
  gateway: GatewayStatus.optional(),
  /** Version 2: the profile this status is about, its kind, and every profile in one line each. */
  profile: z.string().optional(),
  kind: ProfileKindSchema.optional(),
  default_profile: z.string().optional(),
  profiles: z.array(ProfileInfoSchema).optional(),
  /** Version 2: the config file, and why its last edit was not applied (null: it was). */
  config_path: z.string().optional(),
  config_error: z.string().nullable().optional(),
});
export type StatusResult = z.infer<typeof StatusResult>;

export const LoginStartResult = z.object({
  user_code: z.string(),
  verification_uri: z.string(),
  verification_uri_complete: z.string().optional(),
  expires_in: z.number(),
  interval: z.number().optional(),
});
export type LoginStartResult = z.infer<typeof LoginStartResult>;

export const LoginCancelResult = z.object({ cancelled: z.boolean() });
export const LogoutResult = z.object({ removed: z.array(z.string()) });
export const SubscribeResult = z.object({ subscribed: z.literal(true) });
export const ProfilesListResult = z.object({
  default_profile: z.string(),
  profiles: z.array(ProfileInfoSchema),
  config_path: z.string(),
  config_error: z.string().nullable(),
});
export type ProfilesListResult = z.infer<typeof ProfilesListResult>;
export const ProfilesAddResult = z.object({ profile: ProfileInfoSchema, replaced: z.boolean() });
export const ProfilesRemoveResult = z.object({ removed: z.boolean(), files: z.array(z.string()) });
export const ProfilesSetDefaultResult = z.object({ default_profile: z.string(), previous: z.string() });

// ---- notifications ----
export const TokenRefreshedParams = TokenResult;
export const RefreshFailedParams = z.object({
  profile: z.string().optional(),
  code: z.string(),
  message: z.string(),
  state: TokenStateSchema,
  next_retry_at: z.number().nullable(),
});
export const StateChangedParams = z.object({ state: TokenStateSchema, previous: TokenStateSchema, profile: z.string().optional() });
export const LoginCompletedParams = z.object({ expiry_date: z.number(), profile: z.string().optional() });
export const LoginFailedParams = z.object({ code: z.string(), message: z.string(), profile: z.string().optional() });
export const ProfilesChangedParams = z.object({ profiles: z.array(z.string()), default_profile: z.string() });

// Re-exported so a client needs one import for the wire shapes.
export { ApiKeySettingsSchema, OAuthDeviceSettingsSchema, ProfileInfoSchema, ProfileSettingsSchema };
