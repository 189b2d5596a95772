/**
 * `profile add`'s check of an API key: one `GET {base_url}/models` with the key, as the API will
 * receive it, before anything is stored. Never follows a redirect (the key would go along).
 */
import { errnoCode, errorText } from '../../shared/diagnostics.js';
import { defaultUserAgent, serverMessage } from '../qwen-fetch.js';

export type KeyCheck =
  /** 2xx: the key works here; `models` when the answer listed them. */
  | { outcome: 'accepted'; status: number; models: number | undefined }
  /** 401 or 403: the API refuses the key. */
  | { outcome: 'rejected'; status: number; message: string | undefined }
  /** No answer: DNS, connection, TLS or the timeout. */
  | { outcome: 'unreachable'; reason: string }
  /** Any other answer (no `/models` here, rate limit, server error, a redirect). */
  | { outcome: 'other'; status: number; message: string | undefined };

export interface CheckKeyOptions {
  timeoutMs?: number;
  fetch?: typeof globalThis.fetch;
}

/** The models URL of a base URL: `{base}/models`. */
export function modelsUrl(baseUrl: string): string {
  return `${baseUrl.replace(/\/+$/, '')}/models`;
}

/** Checks `key` against `{baseUrl}/models`, sent as `auth` says. */
export async function checkApiKey(baseUrl: string, auth: 'bearer' | 'x-api-key', key: string, options: CheckKeyOptions = {}): Promise<KeyCheck> {
  const timeoutMs = options.timeoutMs ?? 10_000;
  const doFetch = options.fetch ?? globalThis.fetch;
  const headers: Record<string, string> = { Accept: 'application/json', 'User-Agent': defaultUserAgent() };
  if (auth === 'x-api-key') headers['x-api-key'] = key;
  else headers.Authorization = `Bearer ${key}`;
  let response: Response;
  try {
    response = await doFetch(modelsUrl(baseUrl), { method: 'GET', headers, redirect: 'manual', signal: AbortSignal.timeout(timeoutMs) });
  } catch (err) {
    return { outcome: 'unreachable', reason: unreachableReason(err, timeoutMs) };
  }
  let text = '';
  try {
    text = await response.text();
  } catch {
    /* the status says enough */
  }
  const message = serverMessage(text, key, { plainText: true });
  if (response.status >= 200 && response.status < 300) return { outcome: 'accepted', status: response.status, models: modelCount(text) };
  if (response.status === 401 || response.status === 403) return { outcome: 'rejected', status: response.status, message };
  return { outcome: 'other', status: response.status, message };
}

function unreachableReason(err: unknown, timeoutMs: number): string {
  const name = (err as { name?: unknown })?.name;
  if (name === 'TimeoutError' || name === 'AbortError') return `no answer within ${Math.round(timeoutMs / 1000)} s`;
  const cause = (err as { cause?: unknown })?.cause;
  const code = errnoCode(cause) ?? errnoCode(err);
  const detail = cause instanceof Error ? cause.message : errorText(err);
  return code && !detail.includes(code) ? `${code}: ${detail}` : detail;
}

function modelCount(text: string): number | undefined {
  try {
    const data = (JSON.parse(text) as { data?: unknown }).data;
    return Array.isArray(data) ? data.length : undefined;
  } catch {
    return undefined;
  }
}

