import { createHash } from 'node:crypto';

/**
 * A short, non-reversible label for a token, for logs and status output where a person needs
 * to tell two tokens apart: the first 4 and last 4 hex digits of its SHA-256.
 */
export function fingerprint(token: string | undefined | null): string {
  if (!token) return 'none';
  const hex = createHash('sha256').update(token).digest('hex');
  return `${hex.slice(0, 4)}…${hex.slice(-4)}`;
}
