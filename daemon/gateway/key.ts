/**
 * The gateway key: the Bearer secret TCP clients must present. 256 random bits, made once,
 * kept 0600 in the daemon's state directory, compared in constant time.
 */
import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import { chmod, mkdir, readFile, stat } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { QwenConfigError } from '../../shared/errors.js';
import { writeFileAtomic } from './settings.js';

/** A prefix that tells a person (and a secret scanner) what the string is. */
const KEY_PREFIX = 'qtgw_';
const KEY_FORMAT = /^qtgw_[A-Za-z0-9_-]{43,}$/;

/** Where the key lives in the state directory. */
export function gatewayKeyPath(stateDir: string): string {
  return join(stateDir, 'gateway.key');
}

/** A new key: 32 random bytes, base64url. */
export function newGatewayKey(): string {
  return `${KEY_PREFIX}${randomBytes(32).toString('base64url')}`;
}

/** Reads the key; null when there is none yet. Refuses a key file others could read. */
export async function readGatewayKey(path: string): Promise<string | null> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw err;
  }
  const st = await stat(path);
  if ((st.mode & 0o077) !== 0) {
    throw new QwenConfigError(`the gateway key file ${path} is readable by others (mode ${(st.mode & 0o777).toString(8)}); remove it and run \`qwen-token gateway enable\` for a new key`);
  }
  const key = text.trim();
  if (!KEY_FORMAT.test(key)) throw new QwenConfigError(`the gateway key file ${path} does not hold a gateway key; remove it and run \`qwen-token gateway enable\``);
  return key;
}

/** The existing key, or a new one written 0600 when there is none. */
export async function loadOrCreateGatewayKey(path: string): Promise<string> {
  const existing = await readGatewayKey(path);
  if (existing) return existing;
  await mkdir(dirname(path), { recursive: true, mode: 0o700 });
  const key = newGatewayKey();
  await writeFileAtomic(path, `${key}\n`);
  await chmod(path, 0o600);
  return key;
}

/** The digest a presented key is compared with; made once per key. */
export function keyDigest(key: string): Buffer {
  return createHash('sha256').update(key).digest();
}

/** Constant-time comparison: the presented key is hashed first, so not even its length leaks. */
export function keyMatches(presented: string, key: string | Buffer): boolean {
  const expected = typeof key === 'string' ? keyDigest(key) : key;
  return timingSafeEqual(keyDigest(presented), expected);
}
