/**
 * The gateway key: the Bearer secret TCP clients must present. 256 random bits, made once,
 * kept 0600 in the daemon's state directory, compared in constant time.
 */
import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import { constants as fsConstants } from 'node:fs';
import { chmod, mkdir, open } from 'node:fs/promises';
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

/** A key file larger than this holds no gateway key: it is refused unread. */
const MAX_KEY_FILE_BYTES = 1024;

/**
 * Reads the key; null when there is none yet. Opened non-blocking (a FIFO in its place cannot
 * stall the daemon); refused unread when it is not a regular file, is too large to be a key,
 * or others could read it.
 */
export async function readGatewayKey(path: string): Promise<string | null> {
  let handle;
  try {
    handle = await open(path, fsConstants.O_RDONLY | fsConstants.O_NONBLOCK);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw err;
  }
  let text: string;
  try {
    const st = await handle.stat();
    const fix = 'remove it and run `qwen-token gateway enable` for a new key';
    if (!st.isFile() || st.size > MAX_KEY_FILE_BYTES) {
      throw new QwenConfigError(`the gateway key file ${path} ${st.isFile() ? `is ${st.size} bytes, too large to hold a gateway key` : 'is not a regular file'}; ${fix}`);
    }
    if ((st.mode & 0o077) !== 0) {
      throw new QwenConfigError(`the gateway key file ${path} is readable by others (mode ${(st.mode & 0o777).toString(8)}); ${fix}`);
    }
    text = await handle.readFile({ encoding: 'utf8' });
  } finally {
    await handle.close().catch(() => undefined);
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
