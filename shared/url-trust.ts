/**
 * Which URLs may receive a token. One loopback test for every check, and the rules for the chat
 * API's base URL, which arrives from places an attacker on this machine may write (the Qwen
 * CLI's credential file, our own file, a token response) and decides where every client sends
 * its access token and prompts. Pure: no I/O.
 */
import { isIP } from 'node:net';
import { QwenConfigError } from './errors.js';

/**
 * True for a host on this machine: `localhost` (and its subdomains, RFC 6761 §6.3), any address
 * in 127.0.0.0/8, `::1`, and IPv4-mapped loopback (`::ffff:127.0.0.1`). Accepts a URL's
 * `hostname` (IPv6 in brackets) or a bare host.
 */
export function isLoopbackHost(host: string): boolean {
  let h = host.trim().toLowerCase();
  if (h.startsWith('[') && h.endsWith(']')) h = h.slice(1, -1);
  if (h.endsWith('.')) h = h.slice(0, -1);
  if (h === 'localhost' || h.endsWith('.localhost')) return true;
  const family = isIP(h);
  if (family === 4) return h.split('.')[0] === '127';
  if (family === 6) {
    if (h === '::1' || /^(0{1,4}:){7}0{0,3}1$/.test(h) || h === '0:0:0:0:0:0:0:1') return true;
    const mapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/.exec(h);
    if (mapped) return isLoopbackHost(mapped[1]!);
    // WHATWG URL parsing writes a mapped address in hex: ::ffff:7f00:1 is 127.0.0.1.
    const mappedHex = /^::ffff:([0-9a-f]{1,4}):[0-9a-f]{1,4}$/.exec(h);
    if (mappedHex) return parseInt(mappedHex[1]!, 16) >> 8 === 127;
  }
  return false;
}

/** True when `url` parses and its host is loopback (see `isLoopbackHost`). */
export function isLoopbackUrl(url: string | URL): boolean {
  try {
    return isLoopbackHost((typeof url === 'string' ? new URL(url) : url).hostname);
  } catch {
    return false;
  }
}

/**
 * Hosts the chat API of a `qwen-oauth` login may live on: Qwen's portal and Alibaba's DashScope
 * domains. `*.` matches any subdomain (not the domain itself).
 */
export const DEFAULT_TRUSTED_CHAT_HOSTS: readonly string[] = Object.freeze([
  'portal.qwen.ai',
  'chat.qwen.ai',
  'dashscope.aliyuncs.com',
  'dashscope-intl.aliyuncs.com',
  'dashscope-us.aliyuncs.com',
  '*.dashscope.aliyuncs.com',
]);

/** The environment setting that replaces `DEFAULT_TRUSTED_CHAT_HOSTS`. */
export const TRUSTED_CHAT_HOSTS_ENV = 'QWEN_TOKEND_CHAT_HOSTS';

/** What a chat base URL is judged against. */
export interface ChatUrlPolicy {
  /** The OAuth server's base URL: plain http chat URLs are allowed only when it is loopback too. */
  oauthBaseUrl: string;
  /** Host names (`*.` for subdomains, `*` for any host); default `DEFAULT_TRUSTED_CHAT_HOSTS`. */
  trustedHosts?: readonly string[] | undefined;
}

const HOST_PATTERN = /^(\*|(\*\.)?[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*)$/;

/**
 * Reads `QWEN_TOKEND_CHAT_HOSTS`: a comma-separated list of host names, `*.example.com` for
 * subdomains, or `*` for any host (https is still required). Undefined when unset.
 */
export function readTrustedChatHosts(env: NodeJS.ProcessEnv): string[] | undefined {
  const raw = env[TRUSTED_CHAT_HOSTS_ENV]?.trim();
  if (!raw) return undefined;
  const hosts = raw
    .split(',')
    .map((h) => h.trim().toLowerCase().replace(/\.$/, ''))
    .filter((h) => h !== '');
  for (const host of hosts) {
    if (!HOST_PATTERN.test(host)) {
      throw new QwenConfigError(
        `${TRUSTED_CHAT_HOSTS_ENV} must be a comma-separated list of host names (e.g. portal.qwen.ai,*.dashscope.aliyuncs.com), got "${host}"`,
      );
    }
  }
  return hosts;
}

function hostAllowed(host: string, trusted: readonly string[]): boolean {
  const h = host.toLowerCase().replace(/\.$/, '');
  return trusted.some((pattern) => {
    if (pattern === '*') return true;
    if (pattern.startsWith('*.')) return h.endsWith(pattern.slice(1)) && h.length > pattern.length - 1;
    return h === pattern;
  });
}

export type ChatUrlVerdict = { ok: true; url: string } | { ok: false; reason: string };

/**
 * Judges a chat API base URL (already normalized, e.g. `https://portal.qwen.ai/v1`): https only
 * (plain http only for a loopback host while the OAuth server is loopback too), no user info, no
 * query, no fragment, and a host from the trusted list (loopback hosts pass while the OAuth
 * server is loopback, as in tests and local proxies).
 */
export function checkChatBaseUrl(base: string, policy: ChatUrlPolicy): ChatUrlVerdict {
  let url: URL;
  try {
    url = new URL(base);
  } catch {
    return { ok: false, reason: 'it is not an absolute URL' };
  }
  if (url.username !== '' || url.password !== '' || /^[a-z][a-z0-9+.-]*:\/\/[^/?#]*@/i.test(base)) {
    return { ok: false, reason: 'it carries user info (user@host)' };
  }
  if (url.search !== '' || base.includes('?')) return { ok: false, reason: 'it has a query' };
  if (url.hash !== '' || base.includes('#')) return { ok: false, reason: 'it has a fragment' };
  const loopback = isLoopbackHost(url.hostname);
  const localOAuth = isLoopbackUrl(policy.oauthBaseUrl);
  if (url.protocol === 'http:') {
    if (!loopback) return { ok: false, reason: 'it uses plain http' };
    if (!localOAuth) return { ok: false, reason: 'it uses plain http, allowed only while the OAuth server is on this machine too' };
  } else if (url.protocol !== 'https:') {
    return { ok: false, reason: `its scheme ${url.protocol} is not https` };
  }
  if (loopback && localOAuth) return { ok: true, url: base };
  if (!hostAllowed(url.hostname, policy.trustedHosts ?? DEFAULT_TRUSTED_CHAT_HOSTS)) {
    return { ok: false, reason: `its host ${url.hostname} is not a trusted chat host (see ${TRUSTED_CHAT_HOSTS_ENV})` };
  }
  return { ok: true, url: base };
}

/**
 * Server-sent or file-sourced text made safe to show: control characters (C0, DEL, C1, and the
 * bidirectional overrides that reorder what a terminal shows) removed, length bounded.
 */
export function printable(text: string, max = 500): string {
  // eslint-disable-next-line no-control-regex
  const clean = text.replace(/[\u0000-\u001f\u007f-\u009f\u200e\u200f\u202a-\u202e\u2066-\u2069]/g, '');
  return clean.length > max ? `${clean.slice(0, max)}…` : clean;
}

/** True when a URL may be opened in a browser: https, or http to a loopback host; no user info. */
export function isOpenableUrl(text: string): boolean {
  let url: URL;
  try {
    url = new URL(text);
  } catch {
    return false;
  }
  if (url.username !== '' || url.password !== '') return false;
  if (url.protocol === 'https:') return true;
  return url.protocol === 'http:' && isLoopbackHost(url.hostname);
}
