/**
 * Errors the gateway makes itself, in the shape OpenAI clients parse:
 * `{"error":{"message","type","code"}}`. Upstream errors are never rewritten into this.
 */
import type { ServerResponse } from 'node:http';

/** Every error kind the gateway answers, with its status and OpenAI `type`. */
export const GatewayErrors = {
  bad_request: { status: 400, type: 'invalid_request_error' },
  invalid_json: { status: 400, type: 'invalid_request_error' },
  invalid_path: { status: 400, type: 'invalid_request_error' },
  profile_conflict: { status: 400, type: 'invalid_request_error' },
  unauthorized: { status: 401, type: 'authentication_error' },
  profile_needs_login: { status: 401, type: 'authentication_error' },
  unknown_profile: { status: 404, type: 'not_found_error' },
  unknown_route: { status: 404, type: 'not_found_error' },
  method_not_allowed: { status: 405, type: 'invalid_request_error' },
  request_timeout: { status: 408, type: 'invalid_request_error' },
  body_too_large: { status: 413, type: 'invalid_request_error' },
  headers_too_large: { status: 431, type: 'invalid_request_error' },
  upstream_unreachable: { status: 502, type: 'api_error' },
  credential_unavailable: { status: 503, type: 'api_error' },
  gateway_busy: { status: 503, type: 'api_error' },
  upstream_timeout: { status: 504, type: 'api_error' },
  internal_error: { status: 500, type: 'api_error' },
} as const;

export type GatewayErrorCode = keyof typeof GatewayErrors;

/** The JSON body of a gateway error. */
export function errorBody(code: GatewayErrorCode, message: string): string {
  return JSON.stringify({ error: { message, type: GatewayErrors[code].type, code } });
}

/**
 * The methods a 405 names in its `Allow` field (RFC 9110 §15.5.6 requires one): the common
 * ones. TRACE and CONNECT are refused because TRACE echoes the request, the credential the
 * gateway added included, and CONNECT would make the gateway a tunnel; TRACK is IIS's TRACE.
 */
export const ALLOWED_METHODS = 'GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS';

/** The whole HTTP/1.1 response for a gateway error, for a socket the HTTP server gave up on. */
export function rawErrorResponse(code: GatewayErrorCode, message: string): string {
  const body = errorBody(code, message);
  const { status } = GatewayErrors[code];
  const allow = code === 'method_not_allowed' ? `allow: ${ALLOWED_METHODS}\r\n` : '';
  return (
    `HTTP/1.1 ${status} ${statusText(status)}\r\ncontent-type: application/json\r\n${allow}` +
    `content-length: ${Buffer.byteLength(body)}\r\nconnection: close\r\n\r\n${body}`
  );
}

/** Sends a gateway error; `close` also ends the connection (used when the body was not read). */
export function sendError(res: ServerResponse, code: GatewayErrorCode, message: string, close = false): void {
  if (res.headersSent || res.destroyed) {
    res.destroy();
    return;
  }
  const body = errorBody(code, message);
  const headers: Record<string, string | number> = { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) };
  if (close) headers.connection = 'close';
  if (code === 'unauthorized') headers['www-authenticate'] = 'Bearer realm="qwen-tokend gateway"';
  if (code === 'method_not_allowed') headers.allow = ALLOWED_METHODS;
  res.writeHead(GatewayErrors[code].status, headers);
  res.end(body);
}

function statusText(status: number): string {
  const texts: Record<number, string> = { 400: 'Bad Request', 405: 'Method Not Allowed', 408: 'Request Timeout', 413: 'Payload Too Large', 431: 'Request Header Fields Too Large' };
  return texts[status] ?? 'Error';
}
