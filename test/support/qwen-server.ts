/**
 * A local stand-in for Qwen's OAuth server and OpenAI-compatible chat API, for tests and benches.
 *
 * It is a real `node:http` server on 127.0.0.1 that speaks the wire format described in
 * `qwen-oauth-facts.md`: RFC 8628 device authorization with PKCE (RFC 7636), the refresh grant
 * (RFC 6749 §6) with optional rotation, Qwen's own error shapes, and `/v1/chat/completions`
 * (JSON and SSE). It also stands in for an API-key plan (Coding Plan, DashScope): under
 * `API_KEY_BASE_PATH`, `chat/completions` and `models` check a configured key sent as
 * `Authorization: Bearer` or `x-api-key`, and `ANTHROPIC_BASE_PATH/v1/messages` answers in the
 * Anthropic shape. Every behaviour a test may need to provoke is a knob on `settings` (read at each
 * request, so tests may change them at any time) or a one-shot fault (`injectFault`).
 *
 * Runtime imports are `node:` built-ins only (shared types are imported as types), so the module
 * also runs standalone once compiled or under a type-stripping runtime:
 * `node qwen-server.js [--port N] [--interval S] [--expires-in S] [--no-rotate] [--approve-after N]`.
 */
import { STATUS_CODES, createServer, type IncomingHttpHeaders, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { createHash, randomBytes } from 'node:crypto';
import type { AddressInfo, Socket } from 'node:net';
import { pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';
import type { Credentials } from '../../shared/credentials.js';

// ---------------------------------------------------------------------------------------------
// Wire constants
// ---------------------------------------------------------------------------------------------

export const QWEN_CLIENT_ID = 'f0304373b74a44d2b584a3fb70ca9e56';
export const DEVICE_CODE_PATH = '/api/v1/oauth2/device/code';
export const TOKEN_PATH = '/api/v1/oauth2/token';
export const CHAT_PATH = '/v1/chat/completions';
export const AUTHORIZE_PATH = '/authorize';
export const DEVICE_GRANT_TYPE = 'urn:ietf:params:oauth:grant-type:device_code';
export const CHAT_MODELS = ['coder-model', 'vision-model'] as const;
/** Where the API-key endpoints live (an OpenAI-compatible base URL is `baseUrl + API_KEY_BASE_PATH`). */
export const API_KEY_BASE_PATH = '/compatible-mode/v1';
/** The Anthropic-compatible endpoint's base (`/v1/messages` under it), as DashScope's `/apps/anthropic`. */
export const ANTHROPIC_BASE_PATH = '/apps/anthropic';
/** What the API-key endpoints answer to a missing or unknown key (HTTP 401), in DashScope's words. */
export const INVALID_API_KEY_BODY = {
  error: { message: 'Incorrect API key provided.', type: 'invalid_request_error', code: 'invalid_api_key' },
} as const;

/** What Qwen answers to an unknown, retired or revoked refresh token (note: not `invalid_grant`). */
export const INVALID_REFRESH_TOKEN_BODY = {
  error: 'invalid_request',
  error_description: 'Invalid refresh token or client_id',
} as const;

/** What the chat API answers to a missing, unknown, revoked or expired access token (HTTP 401). */
export const INVALID_ACCESS_TOKEN_BODY = {
  error: { code: 'invalid_api_key', message: 'invalid access token or token expired' },
} as const;

/** The interval a client assumes when the device authorization response carries none (Qwen CLI). */
export const CLIENT_DEFAULT_INTERVAL_S = 2;

/** The poll spacing the slow_down check forgives, for timer jitter on real clocks. */
const SLOW_DOWN_GRACE_MS = 20;
const MAX_BODY_BYTES = 1024 * 1024;

// ---------------------------------------------------------------------------------------------
// Public types
// ---------------------------------------------------------------------------------------------

/** Knobs read at every request; mutate `server.settings` to change behaviour mid-test. */
export interface QwenServerSettings {
  /** The only client_id the server accepts. */
  clientId: string;
  /** `expires_in` (seconds) of every access token issued. */
  expiresIn: number;
  /** `resource_url` sent with tokens; `null` omits the field. Set it to `server.baseUrl` to route chat here. */
  resourceUrl: string | null;
  /** When on, every refresh issues a new refresh token and retires the one used (RFC 6749 §6). */
  rotateRefreshTokens: boolean;
  /** With rotation off: omit `refresh_token` from refresh responses instead of echoing the old one. */
  omitRefreshTokenOnRefresh: boolean;
  /** When on, a refresh revokes the access tokens issued under the refresh token it used. */
  revokeOldAccessTokensOnRefresh: boolean;
  /** `interval` (seconds, may be fractional) in device authorization responses; `null` omits it. */
  deviceInterval: number | null;
  /** `expires_in` (seconds) of device codes. */
  deviceExpiresIn: number;
  /** When on, a poll sooner than `minPollIntervalMs` after the previous one answers `slow_down`. */
  slowDown: boolean;
  /** HTTP status of `slow_down`: 429 like Qwen, or 400 like RFC 8628. */
  slowDownStatus: 400 | 429;
  /** Minimum spacing between polls; `null` means the advertised interval (or 2 s when omitted). */
  minPollIntervalMs: number | null;
  /** Approve a pending device code by itself after this many `authorization_pending` answers. */
  approveAfterPolls: number | null;
  /** Delay (ms) between SSE chunks, so a test can abort mid-stream. */
  streamDelayMs: number;
  /** API keys the API-key endpoints accept (none: every request is refused with 401). */
  apiKeys: string[];
  /** How the API-key endpoints take a key: either header, or only one of them. */
  apiKeyHeader: 'either' | 'bearer' | 'x-api-key';
  /** The models the API-key endpoints serve and list. */
  apiModels: string[];
}

/** `apiChat`, `apiModels`, `apiMessages`: the API-key endpoints (see `API_KEY_BASE_PATH`). */
export type Endpoint = 'deviceCode' | 'token' | 'chat' | 'apiChat' | 'apiModels' | 'apiMessages';

/** Faults that override the normal answer of an endpoint, for the next `times` requests. */
export type FaultKind =
  /** Answer `status` (default 503), JSON `{"error":"server_error"}` or plain text when `plain`. */
  | '5xx'
  /** Answer 429 `{"error":"rate_limited"}` with `Retry-After: 1`. */
  | '429'
  /** Wait `delayMs` (default 30 s), then handle the request normally (a refresh still rotates). */
  | 'delay'
  /** Destroy the socket without answering. */
  | 'reset'
  /** Answer 200 `application/json` with a truncated body `{"access_token":`. */
  | 'malformedJson'
  /** Answer `status` (default 502) with an HTML error page, like a proxy in front of the server. */
  | 'html'
  /** Answer exactly `status`, `headers` and `body` (for one-off shapes). */
  | 'respond';

export interface Fault {
  kind: FaultKind;
  /** Which endpoint the fault applies to (default `token`). */
  endpoint?: Endpoint | 'any';
  /** How many requests it affects (default: every request until `clearFaults`). */
  times?: number;
  status?: number;
  plain?: boolean;
  delayMs?: number;
  headers?: Record<string, string>;
  body?: string;
}

/** One request as the server received it. */
export interface RecordedRequest {
  endpoint: Endpoint | 'other';
  method: string;
  path: string;
  headers: IncomingHttpHeaders;
  /** Raw body text. */
  body: string;
  /** The body parsed as a form, when it was sent as one. */
  form?: Record<string, string>;
  /** The body parsed as JSON, when it was sent as JSON. */
  json?: unknown;
  /** Server clock at arrival. */
  at: number;
}

export interface QwenServerCounts {
  deviceCode: number;
  deviceToken: number;
  refresh: number;
  chat: number;
  /** Requests to the API-key endpoints (faulted and refused ones included). */
  apiChat: number;
  apiModels: number;
  apiMessages: number;
  /** API-key requests refused for their key (401). */
  apiKeyRejected: number;
}

/** A pair minted directly by `issueTokens`, with `expiry_date` on the server's clock. */
export interface IssuedTokens extends Credentials {
  refresh_token: string;
  expires_in: number;
}

export type DeviceCodeState = 'pending' | 'approved' | 'denied' | 'expired' | 'used';

export interface DeviceCodeInfo {
  userCode: string;
  state: DeviceCodeState;
  scope: string;
  /** `authorization_pending` answers so far. */
  pendingPolls: number;
  /** Every poll so far, whatever its answer. */
  polls: number;
}

export interface QwenServerOptions extends Partial<QwenServerSettings> {
  /** Port to listen on (default 0: an ephemeral one). */
  port?: number;
  /** The server's clock for token and device-code expiry and poll spacing (default `Date.now`). */
  now?: () => number;
}

/** `oauth-device` profile settings for a test server, with explicit endpoints; `extra` adds or overrides. */
export function deviceProfileSettings(server: { baseUrl: string }, extra: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    kind: 'oauth-device',
    device_authorization_endpoint: `${server.baseUrl}${DEVICE_CODE_PATH}`,
    token_endpoint: `${server.baseUrl}${TOKEN_PATH}`,
    client_id: QWEN_CLIENT_ID,
    scope: 'openid model.completion',
    base_url: `${server.baseUrl}/v1`,
    ...extra,
  };
}

export interface QwenTestServer {
  /** `http://127.0.0.1:PORT`, no trailing slash. */
  readonly baseUrl: string;
  readonly port: number;
  /** Live knobs; see `QwenServerSettings`. */
  readonly settings: QwenServerSettings;
  /** Requests per endpoint (faulted ones included). */
  readonly counts: QwenServerCounts;
  /** Presentations of retired (rotated-out) refresh tokens. */
  readonly reuseCount: number;
  /** SSE responses currently open. */
  readonly openStreams: number;
  /** SSE responses the client closed before `[DONE]`. */
  readonly abortedStreams: number;
  /** Every request received, oldest first. */
  readonly requests: readonly RecordedRequest[];
  /** The latest request (to one endpoint, when given). */
  lastRequest(endpoint?: Endpoint): RecordedRequest | undefined;
  /** Headers of the latest chat request (for X-DashScope-* assertions). */
  readonly lastChatHeaders: IncomingHttpHeaders | undefined;
  /** `baseUrl + API_KEY_BASE_PATH`: the OpenAI-compatible base URL of the API-key endpoints. */
  readonly apiKeyBaseUrl: string;
  /** Every token ever issued (both kinds unless one is named), for grepping logs for leaks. */
  issuedTokens(kind?: 'access' | 'refresh'): string[];
  /** Every device code ever issued (also a secret). */
  issuedDeviceCodes(): string[];
  /** Approves a pending device code (the latest one when no user code is given). */
  approve(userCode?: string): void;
  /** Denies a pending device code (the latest one when no user code is given). */
  deny(userCode?: string): void;
  /** Makes a device code answer `expired_token` from now on (the latest one when none is given). */
  expireDeviceCode(userCode?: string): void;
  /** State of a device code (the latest one when none is given). */
  deviceCode(userCode?: string): DeviceCodeInfo | undefined;
  /** Mints a valid access/refresh pair without any HTTP, e.g. to seed a credential file. */
  issueTokens(opts?: { expiresIn?: number }): IssuedTokens;
  /** Makes the chat API reject an access token. */
  revokeAccessToken(token: string): void;
  /** Makes the token endpoint reject a refresh token (not counted as reuse). */
  revokeRefreshToken(token: string): void;
  /** Revokes every access and refresh token issued so far. */
  revokeAll(): void;
  /** Overrides the normal answer of an endpoint; see `FaultKind`. */
  injectFault(fault: Fault): void;
  clearFaults(): void;
  /** Stops listening and drops open connections: clients get ECONNREFUSED until `acceptConnections`. */
  refuseConnections(): Promise<void>;
  /** Listens again on the same port. */
  acceptConnections(): Promise<void>;
  /** Stops everything; pending delays and streams are dropped. Idempotent. */
  close(): Promise<void>;
}

// ---------------------------------------------------------------------------------------------
// Implementation
// ---------------------------------------------------------------------------------------------

export const DEFAULT_SETTINGS: Readonly<QwenServerSettings> = {
  clientId: QWEN_CLIENT_ID,
  expiresIn: 21600,
  resourceUrl: 'portal.qwen.ai',
  rotateRefreshTokens: true,
  omitRefreshTokenOnRefresh: false,
  revokeOldAccessTokensOnRefresh: false,
  deviceInterval: null,
  deviceExpiresIn: 600,
  slowDown: true,
  slowDownStatus: 429,
  minPollIntervalMs: null,
  approveAfterPolls: null,
  streamDelayMs: 0,
  apiKeys: [],
  apiKeyHeader: 'either',
  apiModels: ['qwen3-coder-plus', 'qwen-plus'],
};

interface DeviceCodeRecord extends DeviceCodeInfo {
  deviceCode: string;
  clientId: string;
  codeChallenge: string;
  expiresAt: number;
  interval: number | null;
  lastPollAt: number | null;
}

interface AccessTokenRecord {
  expiresAt: number;
  revoked: boolean;
  refreshToken: string;
}

type RefreshTokenState = 'active' | 'retired' | 'revoked';

interface ActiveFault extends Fault {
  remaining: number;
}

/** base64url of SHA-256, the PKCE S256 transform (RFC 7636 §4.2). */
function s256(verifier: string): string {
  return createHash('sha256').update(verifier, 'ascii').digest('base64url');
}

function randomToken(prefix: string): string {
  return `${prefix}${randomBytes(24).toString('base64url')}`;
}

function randomUserCode(): string {
  // No 0/O/1/I: codes a person types.
  const alphabet = 'ABCDEFGHJKLMNPQRSTUVWXYZ23456789';
  const bytes = randomBytes(8);
  let out = '';
  for (let i = 0; i < 8; i++) {
    out += alphabet[(bytes[i] ?? 0) % alphabet.length];
    if (i === 3) out += '-';
  }
  return out;
}

function mediaType(headers: IncomingHttpHeaders): string {
  return (headers['content-type'] ?? '').split(';')[0]!.trim().toLowerCase();
}

function sendJson(res: ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}): void {
  const text = JSON.stringify(body);
  res.writeHead(status, {
    'content-type': 'application/json',
    'content-length': Buffer.byteLength(text),
    'cache-control': 'no-store',
    ...headers,
  });
  res.end(text);
}

function sendText(res: ServerResponse, status: number, contentType: string, text: string, headers: Record<string, string> = {}): void {
  res.writeHead(status, { 'content-type': contentType, 'content-length': Buffer.byteLength(text), ...headers });
  res.end(text);
}

function oauthError(res: ServerResponse, status: number, error: string, description?: string): void {
  sendJson(res, status, description === undefined ? { error } : { error, error_description: description });
}

function openAiError(res: ServerResponse, status: number, message: string, code = 'invalid_parameter'): void {
  sendJson(res, status, { error: { message, type: 'invalid_request_error', code } });
}

function htmlPage(status: number): string {
  const title = `${status} ${STATUS_CODES[status] ?? 'Error'}`;
  return `<!DOCTYPE html>\n<html><head><title>${title}</title></head><body><center><h1>${title}</h1></center><hr><center>nginx</center></body></html>\n`;
}

function readBody(req: IncomingMessage): Promise<string | null> {
  return new Promise((resolve) => {
    const chunks: Buffer[] = [];
    let size = 0;
    req.on('data', (chunk: Buffer) => {
      size += chunk.length;
      if (size <= MAX_BODY_BYTES) chunks.push(chunk);
    });
    req.on('end', () => resolve(size > MAX_BODY_BYTES ? null : Buffer.concat(chunks).toString('utf8')));
    req.on('error', () => resolve(null));
  });
}

function textOfContent(content: unknown): string {
  if (typeof content === 'string') return content;
  if (Array.isArray(content)) {
    return content
      .map((part: unknown) =>
        part && typeof part === 'object' && (part as { type?: unknown }).type === 'text'
          ? String((part as { text?: unknown }).text ?? '')
          : '',
      )
      .filter(Boolean)
      .join(' ');
  }
  return '';
}

function wordCount(text: string): number {
  return text.split(/\s+/).filter(Boolean).length;
}

/** Starts the server on 127.0.0.1 and resolves once it listens. */
export async function startQwenServer(options: QwenServerOptions = {}): Promise<QwenTestServer> {
  const { port: requestedPort = 0, now: nowOption, ...overrides } = options;
  const now = nowOption ?? (() => Date.now());
  const settings: QwenServerSettings = { ...DEFAULT_SETTINGS };
  for (const [key, value] of Object.entries(overrides)) {
    if (value !== undefined) Object.assign(settings, { [key]: value });
  }

  const counts: QwenServerCounts = { deviceCode: 0, deviceToken: 0, refresh: 0, chat: 0, apiChat: 0, apiModels: 0, apiMessages: 0, apiKeyRejected: 0 };
  const requests: RecordedRequest[] = [];
  const deviceCodes = new Map<string, DeviceCodeRecord>();
  const accessTokens = new Map<string, AccessTokenRecord>();
  const refreshTokens = new Map<string, RefreshTokenState>();
  let faults: ActiveFault[] = [];
  const timers = new Set<ReturnType<typeof setTimeout>>();
  const sockets = new Set<Socket>();
  let reuseCount = 0;
  let openStreams = 0;
  let abortedStreams = 0;
  let completionSeq = 0;
  let closed = false;
  let port = 0;
  let baseUrl = '';

  const later = (ms: number, fn: () => void): void => {
    const t = setTimeout(() => {
      timers.delete(t);
      if (!closed) fn();
    }, ms);
    timers.add(t);
  };

  // ---- token minting ----
  const mint = (expiresIn: number, refreshToken?: string): { access: string; refresh: string } => {
    const refresh = refreshToken ?? randomToken('qrt_');
    if (!refreshTokens.has(refresh)) refreshTokens.set(refresh, 'active');
    const access = randomToken('qat_');
    accessTokens.set(access, { expiresAt: now() + expiresIn * 1000, revoked: false, refreshToken: refresh });
    return { access, refresh };
  };

  const tokenBody = (access: string, refresh: string | undefined, expiresIn: number): Record<string, unknown> => {
    const body: Record<string, unknown> = { access_token: access };
    if (refresh !== undefined) body.refresh_token = refresh;
    body.token_type = 'Bearer';
    body.expires_in = expiresIn;
    if (settings.resourceUrl !== null) body.resource_url = settings.resourceUrl;
    return body;
  };

  // ---- device codes ----
  const latestDeviceCode = (userCode?: string): DeviceCodeRecord | undefined => {
    const all = [...deviceCodes.values()];
    if (userCode !== undefined) return all.find((d) => d.userCode === userCode);
    return all.at(-1);
  };

  const setDeviceState = (userCode: string | undefined, state: DeviceCodeState): void => {
    const rec = latestDeviceCode(userCode);
    if (!rec) throw new Error(`no device code${userCode ? ` with user code ${userCode}` : ''} was issued`);
    if (rec.state === 'pending' || state === 'expired') rec.state = state;
  };

  // ---- faults ----
  const takeFault = (endpoint: Endpoint): ActiveFault | undefined => {
    const fault = faults.find((f) => (f.endpoint ?? 'token') === endpoint || f.endpoint === 'any');
    if (!fault) return undefined;
    fault.remaining -= 1;
    if (fault.remaining <= 0) faults = faults.filter((f) => f !== fault);
    return fault;
  };

  /** Answers per the fault; `delay` calls `proceed` (the normal handler) afterwards. */
  const applyFault = (fault: ActiveFault, res: ServerResponse, req: IncomingMessage, proceed: () => void): void => {
    switch (fault.kind) {
      case '5xx': {
        const status = fault.status ?? 503;
        if (fault.plain) sendText(res, status, 'text/plain', 'Service Unavailable\n');
        else sendJson(res, status, { error: 'server_error', error_description: 'upstream failure' });
        return;
      }
      case '429':
        sendJson(res, fault.status ?? 429, { error: 'rate_limited', error_description: 'too many requests' }, { 'retry-after': '1' });
        return;
      case 'delay':
        // A real server finishes the work even when the client has gone away meanwhile.
        later(fault.delayMs ?? 30_000, proceed);
        return;
      case 'reset':
        req.socket.destroy();
        return;
      case 'malformedJson':
        sendText(res, 200, 'application/json', '{"access_token":');
        return;
      case 'html': {
        const status = fault.status ?? 502;
        sendText(res, status, 'text/html; charset=utf-8', htmlPage(status));
        return;
      }
      case 'respond':
        res.writeHead(fault.status ?? 500, fault.headers ?? {});
        res.end(fault.body ?? '');
        return;
    }
  };

  // ---- handlers ----
  const handleDeviceCode = (req: IncomingMessage, res: ServerResponse, rec: RecordedRequest): void => {
    if (mediaType(req.headers) !== 'application/x-www-form-urlencoded' || !rec.form) {
      oauthError(res, 400, 'invalid_request', 'Content-Type must be application/x-www-form-urlencoded');
      return;
    }
    const form = rec.form;
    if (form.client_id !== settings.clientId) {
      oauthError(res, 400, 'invalid_client', 'Invalid client_id');
      return;
    }
    if (!form.code_challenge || form.code_challenge_method !== 'S256') {
      oauthError(res, 400, 'invalid_request', 'code_challenge with code_challenge_method=S256 is required');
      return;
    }
    const deviceCode = randomToken('qdc_');
    const userCode = randomUserCode();
    deviceCodes.set(deviceCode, {
      deviceCode,
      userCode,
      clientId: form.client_id,
      codeChallenge: form.code_challenge,
      scope: form.scope ?? '',
      expiresAt: now() + settings.deviceExpiresIn * 1000,
      interval: settings.deviceInterval,
      lastPollAt: null,
      state: 'pending',
      pendingPolls: 0,
      polls: 0,
    });
    const verificationUri = `${baseUrl}${AUTHORIZE_PATH}`;
    const body: Record<string, unknown> = {
      device_code: deviceCode,
      user_code: userCode,
      verification_uri: verificationUri,
      verification_uri_complete: `${verificationUri}?user_code=${encodeURIComponent(userCode)}&client=qwen-code`,
      expires_in: settings.deviceExpiresIn,
    };
    if (settings.deviceInterval !== null) body.interval = settings.deviceInterval;
    sendJson(res, 200, body);
  };

  const handleDeviceGrant = (res: ServerResponse, form: Record<string, string>): void => {
    const rec = form.device_code ? deviceCodes.get(form.device_code) : undefined;
    if (!rec) {
      oauthError(res, 400, 'invalid_grant', 'Invalid device code');
      return;
    }
    if (form.client_id !== rec.clientId) {
      oauthError(res, 400, 'invalid_client', 'Invalid client_id');
      return;
    }
    if (!form.code_verifier) {
      oauthError(res, 400, 'invalid_request', 'code_verifier is required');
      return;
    }
    if (s256(form.code_verifier) !== rec.codeChallenge) {
      oauthError(res, 400, 'invalid_grant', 'PKCE verification failed');
      return;
    }
    const at = now();
    const previousPoll = rec.lastPollAt;
    rec.lastPollAt = at;
    rec.polls += 1;
    if (rec.state === 'used') {
      oauthError(res, 400, 'invalid_grant', 'Device code already used');
      return;
    }
    if (rec.state === 'expired' || at >= rec.expiresAt) {
      rec.state = 'expired';
      oauthError(res, 400, 'expired_token', 'Device code expired');
      return;
    }
    if (rec.state === 'denied') {
      oauthError(res, 400, 'access_denied', 'The user denied the authorization request');
      return;
    }
    const minSpacing = settings.minPollIntervalMs ?? (rec.interval ?? CLIENT_DEFAULT_INTERVAL_S) * 1000;
    if (settings.slowDown && previousPoll !== null && at - previousPoll < minSpacing - SLOW_DOWN_GRACE_MS) {
      oauthError(res, settings.slowDownStatus, 'slow_down', 'Polling too frequently');
      return;
    }
    if (rec.state === 'pending') {
      rec.pendingPolls += 1;
      if (settings.approveAfterPolls !== null && rec.pendingPolls >= settings.approveAfterPolls) rec.state = 'approved';
      oauthError(res, 400, 'authorization_pending', 'The authorization request is still pending');
      return;
    }
    // approved
    rec.state = 'used';
    const expiresIn = settings.expiresIn;
    const { access, refresh } = mint(expiresIn);
    sendJson(res, 200, tokenBody(access, refresh, expiresIn));
  };

  const handleRefreshGrant = (res: ServerResponse, form: Record<string, string>): void => {
    const presented = form.refresh_token ?? '';
    const state = refreshTokens.get(presented);
    if (state === 'retired') reuseCount += 1;
    if (form.client_id !== settings.clientId || state !== 'active') {
      sendJson(res, 400, INVALID_REFRESH_TOKEN_BODY);
      return;
    }
    if (settings.revokeOldAccessTokensOnRefresh) {
      for (const rec of accessTokens.values()) if (rec.refreshToken === presented) rec.revoked = true;
    }
    const expiresIn = settings.expiresIn;
    if (settings.rotateRefreshTokens) {
      refreshTokens.set(presented, 'retired');
      const { access, refresh } = mint(expiresIn);
      sendJson(res, 200, tokenBody(access, refresh, expiresIn));
      return;
    }
    const { access } = mint(expiresIn, presented);
    sendJson(res, 200, tokenBody(access, settings.omitRefreshTokenOnRefresh ? undefined : presented, expiresIn));
  };

  const handleToken = (req: IncomingMessage, res: ServerResponse, rec: RecordedRequest): void => {
    if (mediaType(req.headers) !== 'application/x-www-form-urlencoded' || !rec.form) {
      oauthError(res, 400, 'invalid_request', 'Content-Type must be application/x-www-form-urlencoded');
      return;
    }
    const form = rec.form;
    if (form.grant_type === DEVICE_GRANT_TYPE) handleDeviceGrant(res, form);
    else if (form.grant_type === 'refresh_token') handleRefreshGrant(res, form);
    else oauthError(res, 400, 'unsupported_grant_type', `grant_type ${JSON.stringify(form.grant_type ?? '')} is not supported`);
  };

  const handleChat = (req: IncomingMessage, res: ServerResponse, rec: RecordedRequest): void => {
    const auth = req.headers.authorization ?? '';
    const match = /^Bearer\s+(\S+)$/i.exec(auth);
    const token = match ? accessTokens.get(match[1]!) : undefined;
    if (!token || token.revoked || now() >= token.expiresAt) {
      sendJson(res, 401, INVALID_ACCESS_TOKEN_BODY);
      return;
    }
    complete(res, rec, CHAT_MODELS);
  };

  /** The key an API-key request carries in the header(s) `settings.apiKeyHeader` allows, if any. */
  const presentedKey = (req: IncomingMessage): string | undefined => {
    const which = settings.apiKeyHeader;
    const bearer = /^Bearer\s+(\S+)$/i.exec(req.headers.authorization ?? '')?.[1];
    const header = req.headers['x-api-key'];
    const xApiKey = typeof header === 'string' && header !== '' ? header : undefined;
    if (which === 'bearer') return bearer;
    if (which === 'x-api-key') return xApiKey;
    return xApiKey ?? bearer;
  };

  /** True when the request carries an accepted key; otherwise answers 401 and counts the refusal. */
  const checkKey = (req: IncomingMessage, res: ServerResponse, anthropic: boolean): boolean => {
    const key = presentedKey(req);
    if (key !== undefined && settings.apiKeys.includes(key)) return true;
    counts.apiKeyRejected += 1;
    if (anthropic) sendJson(res, 401, { type: 'error', error: { type: 'authentication_error', message: 'invalid x-api-key' } });
    else sendJson(res, 401, INVALID_API_KEY_BODY);
    return false;
  };

  const handleApiChat = (req: IncomingMessage, res: ServerResponse, rec: RecordedRequest): void => {
    if (checkKey(req, res, false)) complete(res, rec, settings.apiModels);
  };

  const handleApiModels = (req: IncomingMessage, res: ServerResponse): void => {
    if (!checkKey(req, res, false)) return;
    const created = Math.floor(now() / 1000);
    sendJson(res, 200, { object: 'list', data: settings.apiModels.map((id) => ({ id, object: 'model', created, owned_by: 'test' })) });
  };

  const handleApiMessages = (req: IncomingMessage, res: ServerResponse, rec: RecordedRequest): void => {
    if (!checkKey(req, res, true)) return;
    const body = rec.json as { model?: unknown; messages?: unknown; max_tokens?: unknown } | undefined;
    if (!body || typeof body !== 'object' || typeof body.model !== 'string' || !settings.apiModels.includes(body.model) || !Array.isArray(body.messages)) {
      sendJson(res, 400, { type: 'error', error: { type: 'invalid_request_error', message: `model must be one of ${settings.apiModels.join(', ')}; messages must be an array` } });
      return;
    }
    const lastUser = [...body.messages].reverse().find((m: unknown) => (m as { role?: unknown } | null)?.role === 'user') as { content?: unknown } | undefined;
    const reply = `echo: ${textOfContent(lastUser?.content)}`;
    completionSeq += 1;
    sendJson(res, 200, {
      id: `msg_${completionSeq}`,
      type: 'message',
      role: 'assistant',
      model: body.model,
      content: [{ type: 'text', text: reply }],
      stop_reason: 'end_turn',
      usage: { input_tokens: body.messages.length, output_tokens: wordCount(reply) },
    });
  };

  /** Answers a chat completion (JSON or SSE) for a request already authenticated; the model must be one of `models`. */
  const complete = (res: ServerResponse, rec: RecordedRequest, models: readonly string[]): void => {
    const body = rec.json as { model?: unknown; messages?: unknown; stream?: unknown } | undefined;
    if (!body || typeof body !== 'object' || Array.isArray(body)) {
      openAiError(res, 400, 'request body must be a JSON object', 'invalid_request_error');
      return;
    }
    if (typeof body.model !== 'string' || !models.includes(body.model)) {
      openAiError(res, 400, `model must be one of ${models.join(', ')}`, 'model_not_found');
      return;
    }
    if (!Array.isArray(body.messages)) {
      openAiError(res, 400, 'messages must be an array');
      return;
    }
    const lastUser = [...body.messages]
      .reverse()
      .find((m: unknown) => m && typeof m === 'object' && (m as { role?: unknown }).role === 'user') as
      | { content?: unknown }
      | undefined;
    const userText = textOfContent(lastUser?.content);
    const reply = `echo: ${userText}`;
    const promptTokens = body.messages.reduce<number>(
      (n, m: unknown) => n + wordCount(textOfContent((m as { content?: unknown } | null)?.content)),
      0,
    );
    const usage = { prompt_tokens: promptTokens, completion_tokens: wordCount(reply), total_tokens: promptTokens + wordCount(reply) };
    completionSeq += 1;
    const id = `chatcmpl-${completionSeq}`;
    const created = Math.floor(now() / 1000);
    const model = body.model;

    if (body.stream !== true) {
      sendJson(res, 200, {
        id,
        object: 'chat.completion',
        created,
        model,
        choices: [{ index: 0, message: { role: 'assistant', content: reply }, finish_reason: 'stop' }],
        usage,
      });
      return;
    }

    const words = reply.split(' ');
    const chunk = (delta: Record<string, unknown>, finish: string | null, extra: Record<string, unknown> = {}): string =>
      `data: ${JSON.stringify({ id, object: 'chat.completion.chunk', created, model, choices: [{ index: 0, delta, finish_reason: finish }], ...extra })}\n\n`;
    const frames = [
      chunk({ role: 'assistant', content: '' }, null),
      ...words.map((w, i) => chunk({ content: i < words.length - 1 ? `${w} ` : w }, null)),
      chunk({}, 'stop', { usage }),
      'data: [DONE]\n\n',
    ];
    res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache', connection: 'keep-alive' });
    openStreams += 1;
    let finished = false;
    res.on('close', () => {
      openStreams -= 1;
      if (!finished) abortedStreams += 1;
    });
    let i = 0;
    const next = (): void => {
      if (res.destroyed) return;
      const frame = frames[i++];
      if (frame === undefined) {
        finished = true;
        res.end();
        return;
      }
      res.write(frame);
      if (settings.streamDelayMs > 0) later(settings.streamDelayMs, next);
      else setImmediate(next);
    };
    next();
  };

  const handleAuthorizePage = (req: IncomingMessage, res: ServerResponse, rec: RecordedRequest): void => {
    // For manual use: a person opens verification_uri_complete and approves or denies.
    const url = new URL(req.url ?? '/', baseUrl);
    if (req.method === 'POST') {
      const userCode = rec.form?.user_code ?? '';
      const target = latestDeviceCode(userCode);
      if (!target) {
        sendText(res, 404, 'text/html; charset=utf-8', '<p>Unknown code.</p>\n');
        return;
      }
      setDeviceState(userCode, rec.form?.decision === 'deny' ? 'denied' : 'approved');
      sendText(res, 200, 'text/html; charset=utf-8', `<p>Code ${target.userCode}: ${target.state}.</p>\n`);
      return;
    }
    const code = (url.searchParams.get('user_code') ?? '').replace(/[^A-Z0-9-]/gi, '');
    sendText(
      res,
      200,
      'text/html; charset=utf-8',
      `<!DOCTYPE html><form method="post"><input name="user_code" value="${code}">` +
        `<button name="decision" value="approve">Approve</button><button name="decision" value="deny">Deny</button></form>\n`,
    );
  };

  const route = (req: IncomingMessage): Endpoint | 'authorize' | 'other' => {
    const path = (req.url ?? '/').split('?')[0];
    if (req.method === 'POST' && path === DEVICE_CODE_PATH) return 'deviceCode';
    if (req.method === 'POST' && path === TOKEN_PATH) return 'token';
    if (req.method === 'POST' && path === CHAT_PATH) return 'chat';
    if (req.method === 'POST' && path === `${API_KEY_BASE_PATH}/chat/completions`) return 'apiChat';
    if (req.method === 'GET' && path === `${API_KEY_BASE_PATH}/models`) return 'apiModels';
    if (req.method === 'POST' && path === `${ANTHROPIC_BASE_PATH}/v1/messages`) return 'apiMessages';
    if ((req.method === 'GET' || req.method === 'POST') && path === AUTHORIZE_PATH) return 'authorize';
    return 'other';
  };

  const onRequest = async (req: IncomingMessage, res: ServerResponse): Promise<void> => {
    const target = route(req);
    const text = await readBody(req);
    if (text === null) {
      if (!res.headersSent && !res.destroyed) sendJson(res, 413, { error: 'invalid_request', error_description: 'body too large' });
      return;
    }
    const rec: RecordedRequest = {
      endpoint: target === 'authorize' ? 'other' : target,
      method: req.method ?? '',
      path: req.url ?? '',
      headers: { ...req.headers },
      body: text,
      at: now(),
    };
    const type = mediaType(req.headers);
    if (type === 'application/x-www-form-urlencoded') rec.form = Object.fromEntries(new URLSearchParams(text));
    if (type === 'application/json') {
      try {
        rec.json = JSON.parse(text);
      } catch {
        // left undefined: the handler answers 400
      }
    }
    requests.push(rec);

    if (target === 'authorize') return handleAuthorizePage(req, res, rec);
    if (target === 'other') return sendJson(res, 404, { error: 'not_found' });

    if (target === 'deviceCode') counts.deviceCode += 1;
    else if (target === 'chat') counts.chat += 1;
    else if (target === 'apiChat') counts.apiChat += 1;
    else if (target === 'apiModels') counts.apiModels += 1;
    else if (target === 'apiMessages') counts.apiMessages += 1;
    else if (rec.form?.grant_type === DEVICE_GRANT_TYPE) counts.deviceToken += 1;
    else if (rec.form?.grant_type === 'refresh_token') counts.refresh += 1;

    const handle = (): void => {
      if (target === 'deviceCode') handleDeviceCode(req, res, rec);
      else if (target === 'token') handleToken(req, res, rec);
      else if (target === 'apiChat') handleApiChat(req, res, rec);
      else if (target === 'apiModels') handleApiModels(req, res);
      else if (target === 'apiMessages') handleApiMessages(req, res, rec);
      else handleChat(req, res, rec);
    };
    const fault = takeFault(target);
    if (fault) applyFault(fault, res, req, handle);
    else handle();
  };

  const server: Server = createServer((req, res) => {
    onRequest(req, res).catch((err: unknown) => {
      if (!res.headersSent && !res.destroyed) sendJson(res, 500, { error: 'server_error', error_description: String(err) });
    });
  });
  server.on('connection', (socket: Socket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
  });

  const listen = (p: number): Promise<void> =>
    new Promise((resolve, reject) => {
      const onError = (err: Error): void => reject(err);
      server.once('error', onError);
      server.listen(p, '127.0.0.1', () => {
        server.off('error', onError);
        resolve();
      });
    });

  const stopListening = (): Promise<void> =>
    new Promise((resolve) => {
      if (!server.listening) {
        resolve();
        return;
      }
      server.close(() => resolve());
      for (const s of sockets) s.destroy();
    });

  await listen(requestedPort);
  port = (server.address() as AddressInfo).port;
  baseUrl = `http://127.0.0.1:${port}`;

  const api: QwenTestServer = {
    get baseUrl() {
      return baseUrl;
    },
    get port() {
      return port;
    },
    settings,
    counts,
    get reuseCount() {
      return reuseCount;
    },
    get openStreams() {
      return openStreams;
    },
    get abortedStreams() {
      return abortedStreams;
    },
    requests,
    lastRequest(endpoint) {
      for (let i = requests.length - 1; i >= 0; i--) {
        const r = requests[i]!;
        if (endpoint === undefined || r.endpoint === endpoint) return r;
      }
      return undefined;
    },
    get lastChatHeaders() {
      return api.lastRequest('chat')?.headers;
    },
    get apiKeyBaseUrl() {
      return `${baseUrl}${API_KEY_BASE_PATH}`;
    },
    issuedTokens(kind) {
      const access = kind === 'refresh' ? [] : [...accessTokens.keys()];
      const refresh = kind === 'access' ? [] : [...refreshTokens.keys()];
      return [...access, ...refresh];
    },
    issuedDeviceCodes() {
      return [...deviceCodes.keys()];
    },
    approve(userCode) {
      setDeviceState(userCode, 'approved');
    },
    deny(userCode) {
      setDeviceState(userCode, 'denied');
    },
    expireDeviceCode(userCode) {
      setDeviceState(userCode, 'expired');
    },
    deviceCode(userCode) {
      const rec = latestDeviceCode(userCode);
      if (!rec) return undefined;
      const { userCode: code, state, scope, pendingPolls, polls } = rec;
      return { userCode: code, state, scope, pendingPolls, polls };
    },
    issueTokens(opts = {}) {
      const expiresIn = opts.expiresIn ?? settings.expiresIn;
      const { access, refresh } = mint(expiresIn);
      const out: IssuedTokens = {
        access_token: access,
        refresh_token: refresh,
        token_type: 'Bearer',
        expires_in: expiresIn,
        expiry_date: now() + expiresIn * 1000,
      };
      if (settings.resourceUrl !== null) out.resource_url = settings.resourceUrl;
      return out;
    },
    revokeAccessToken(token) {
      const rec = accessTokens.get(token);
      if (rec) rec.revoked = true;
    },
    revokeRefreshToken(token) {
      if (refreshTokens.has(token)) refreshTokens.set(token, 'revoked');
    },
    revokeAll() {
      for (const rec of accessTokens.values()) rec.revoked = true;
      for (const token of refreshTokens.keys()) refreshTokens.set(token, 'revoked');
    },
    injectFault(fault) {
      faults.push({ ...fault, remaining: fault.times ?? Number.POSITIVE_INFINITY });
    },
    clearFaults() {
      faults = [];
    },
    async refuseConnections() {
      await stopListening();
    },
    async acceptConnections() {
      if (!server.listening && !closed) await listen(port);
    },
    async close() {
      if (closed) return;
      closed = true;
      for (const t of timers) clearTimeout(t);
      timers.clear();
      await stopListening();
    },
  };
  return api;
}

// ---------------------------------------------------------------------------------------------
// Standalone use
// ---------------------------------------------------------------------------------------------

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      port: { type: 'string', default: '0' },
      interval: { type: 'string' },
      'expires-in': { type: 'string' },
      'no-rotate': { type: 'boolean', default: false },
      'approve-after': { type: 'string' },
    },
  });
  const server = await startQwenServer({
    port: Number(values.port),
    deviceInterval: values.interval === undefined ? null : Number(values.interval),
    ...(values['expires-in'] === undefined ? {} : { expiresIn: Number(values['expires-in']) }),
    rotateRefreshTokens: !values['no-rotate'],
    approveAfterPolls: values['approve-after'] === undefined ? null : Number(values['approve-after']),
  });
  // Standalone, chat goes to this server too: clients derive the chat base URL from resource_url.
  server.settings.resourceUrl = server.baseUrl;
  process.stdout.write(`${JSON.stringify({ baseUrl: server.baseUrl, clientId: server.settings.clientId })}\n`);
  const stop = (): void => {
    void server.close().then(() => process.exit(0));
  };
  process.once('SIGINT', stop);
  process.once('SIGTERM', stop);
}

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(process.argv[1]).href) {
  main().catch((err: unknown) => {
    process.stderr.write(`${String(err)}\n`);
    process.exit(1);
  });
}
