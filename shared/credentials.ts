import { z } from 'zod';
import { describeIssues } from './diagnostics.js';
import { QwenCredentialsFileError } from './errors.js';
import { checkChatBaseUrl, type ChatUrlPolicy } from './url-trust.js';

/**
 * The credential record, in the Qwen CLI's `oauth_creds.json` format so the two files are
 * interchangeable. `expiry_date` is epoch milliseconds.
 */
export interface Credentials {
  access_token: string;
  refresh_token: string;
  token_type: string;
  resource_url?: string | undefined;
  expiry_date: number;
}

const nonEmpty = z.string().trim().min(1);

/**
 * What we accept when reading a file: the Qwen CLI format, plus the legacy `expires_at`
 * (epoch seconds or milliseconds, or an ISO date) written by older Python tools.
 */
const CredentialsFileSchema = z
  .object({
    access_token: nonEmpty,
    refresh_token: nonEmpty,
    token_type: nonEmpty.optional(),
    resource_url: z.string().trim().min(1).optional().nullable(),
    expiry_date: z.number().finite().positive().optional(),
    expires_at: z.union([z.number().finite().positive(), nonEmpty]).optional(),
  })
  .refine((v) => v.expiry_date !== undefined || v.expires_at !== undefined, {
    message: 'expiry_date (epoch milliseconds) is missing',
    path: ['expiry_date'],
  });

/** Epoch seconds are below this; epoch milliseconds above (year 5138 vs 1973). */
const SECONDS_LIMIT = 1e11;

function legacyExpiry(value: number | string): number | undefined {
  if (typeof value === 'number') return value < SECONDS_LIMIT ? Math.round(value * 1000) : value;
  const asNumber = Number(value);
  if (Number.isFinite(asNumber)) return legacyExpiry(asNumber);
  const parsed = Date.parse(value);
  return Number.isFinite(parsed) ? parsed : undefined;
}

/** Validates parsed JSON as credentials; throws `QwenCredentialsFileError` naming what is wrong. */
export function parseCredentials(data: unknown, source: string): Credentials {
  const result = CredentialsFileSchema.safeParse(data);
  if (!result.success) {
    throw new QwenCredentialsFileError(`${source} is not a valid credential file (${describeIssues(result.error)})`);
  }
  const v = result.data;
  const expiry = v.expiry_date ?? (v.expires_at === undefined ? undefined : legacyExpiry(v.expires_at));
  if (expiry === undefined) {
    throw new QwenCredentialsFileError(`${source} is not a valid credential file (expires_at: not a date)`);
  }
  return {
    access_token: v.access_token,
    refresh_token: v.refresh_token,
    token_type: v.token_type ?? 'Bearer',
    resource_url: v.resource_url ?? undefined,
    expiry_date: expiry,
  };
}

/** Parses a credential file's text; bad JSON and bad shape both become `QwenCredentialsFileError`. */
export function parseCredentialsText(text: string, source: string): Credentials {
  let data: unknown;
  try {
    data = JSON.parse(text);
  } catch {
    throw new QwenCredentialsFileError(`${source} is not valid JSON`);
  }
  return parseCredentials(data, source);
}

/** The file text written for credentials: every field the Qwen CLI requires, always (then `extra`, such as a token file's grant). */
export function serializeCredentials(c: Credentials, extra?: Record<string, string>): string {
  const out: Record<string, unknown> = {
    access_token: c.access_token,
    refresh_token: c.refresh_token,
    token_type: c.token_type || 'Bearer',
    resource_url: c.resource_url,
    expiry_date: c.expiry_date,
    ...extra,
  };
  if (out.resource_url === undefined) delete out.resource_url;
  return `${JSON.stringify(out, null, 2)}\n`;
}

/** True when both records hold the same tokens and expiry (what matters for adoption). */
export function sameCredentials(a: Credentials | null | undefined, b: Credentials | null | undefined): boolean {
  if (!a || !b) return a === b;
  return (
    a.access_token === b.access_token &&
    a.refresh_token === b.refresh_token &&
    a.expiry_date === b.expiry_date &&
    (a.resource_url ?? '') === (b.resource_url ?? '')
  );
}

export const DEFAULT_CHAT_BASE_URL = 'https://portal.qwen.ai/v1';

/**
 * The OpenAI-compatible base URL for a `resource_url`: `https://` is prefixed when there is
 * no scheme, `/v1` appended when missing; the default applies when there is no resource URL.
 */
export function chatBaseUrl(resourceUrl: string | undefined | null): string {
  const raw = resourceUrl?.trim();
  if (!raw) return DEFAULT_CHAT_BASE_URL;
  let url = /^[a-z][a-z0-9+.-]*:\/\//i.test(raw) ? raw : `https://${raw}`;
  url = url.replace(/\/+$/, '');
  return url.endsWith('/v1') ? url : `${url}/v1`;
}

/** A chat base URL that passed `checkChatBaseUrl`, or the default with the reason it was refused. */
export interface TrustedChatBaseUrl {
  url: string;
  /** Why the `resource_url` was refused; undefined when it was used (or absent). */
  rejected?: string;
}

/**
 * `chatBaseUrl`, judged by `policy`: an untrusted `resource_url` (plain http, user info, query,
 * fragment, a host off the allow-list) gives the default base URL and the reason.
 */
export function trustedChatBaseUrl(resourceUrl: string | undefined | null, policy: ChatUrlPolicy): TrustedChatBaseUrl {
  const base = chatBaseUrl(resourceUrl);
  if (base === DEFAULT_CHAT_BASE_URL) return { url: base };
  const verdict = checkChatBaseUrl(base, policy);
  if (verdict.ok) return { url: verdict.url };
  return { url: DEFAULT_CHAT_BASE_URL, rejected: verdict.reason };
}
