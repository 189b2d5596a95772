/**
 * Each profile's secrets, in the daemon's state directory: `profiles/<name>.secret.json` (an API
 * key or a client secret) and, for OAuth profiles, `profiles/<name>.token.json` (the credential
 * record, written by its TokenKeeper). The directory is 0700 and every file 0600, owned by this
 * user; a file another user could have written is refused, as the credential store does.
 */
import { closeSync, constants as fsConstants, fchmodSync, fstatSync, openSync, readFileSync, statSync } from 'node:fs';
import { chmod, mkdir, stat, unlink } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { z } from 'zod';
import { errnoCode } from '../shared/diagnostics.js';
import { QwenCredentialsFileError } from '../shared/errors.js';
import { currentUid, ownershipProblem } from '../shared/path-trust.js';
import { describeFsError, writeDurably } from './credential-store.js';
import type { Logger } from './logger.js';

/** What a secret file holds: exactly one of the two. */
export const SecretFileSchema = z.union([
  z.object({ api_key: z.string().min(1).max(16_384) }).strict(),
  z.object({ client_secret: z.string().min(1).max(16_384) }).strict(),
]);
export type SecretFile = z.infer<typeof SecretFileSchema>;

/** Secret files are a line of JSON; anything larger is not one. */
const MAX_SECRET_BYTES = 64 * 1024;

/** The paths of one profile's files. */
export interface ProfilePaths {
  secret: string;
  token: string;
}

/** A profile's secret file and token file, by name, under `dir`. */
export function profilePaths(dir: string, name: string): ProfilePaths {
  return { secret: join(dir, `${name}.secret.json`), token: join(dir, `${name}.token.json`) };
}

/** What reading a secret file found: nothing, or the secret. Anything else throws. */
export type SecretRead = { status: 'missing' } | { status: 'ok'; secret: SecretFile };

/**
 * Reads a secret file: a regular file of this user's in a directory only this user may write,
 * made 0600 when it was looser (and said so). Throws `QwenCredentialsFileError` naming the file
 * and what to do; the message never holds the file's content.
 */
export function readSecretFile(path: string, logger: Logger): SecretRead {
  let fd: number;
  try {
    fd = openSync(path, fsConstants.O_RDONLY | fsConstants.O_NONBLOCK | fsConstants.O_NOFOLLOW);
  } catch (err) {
    if (errnoCode(err) === 'ENOENT') return { status: 'missing' };
    throw new QwenCredentialsFileError(`cannot read secret file ${path}: ${describeFsError(err)}`);
  }
  let text: string;
  try {
    const st = fstatSync(fd);
    if (!st.isFile()) throw new QwenCredentialsFileError(`secret file ${path} is not a regular file; remove it and add the profile again`);
    if (st.size > MAX_SECRET_BYTES) throw new QwenCredentialsFileError(`secret file ${path} is larger than ${MAX_SECRET_BYTES / 1024} KiB; it is not one of ours`);
    const owner = ownershipProblem(path, st);
    if (owner) throw new QwenCredentialsFileError(`refusing secret file: ${owner}; remove it and add the profile again`);
    const dir = dirname(path);
    const dirProblem = ownershipProblem(dir, statSync(dir));
    if (dirProblem) throw new QwenCredentialsFileError(`refusing secret file ${path}: ${dirProblem}; run \`chmod 700 ${dir}\``);
    if ((st.mode & 0o077) !== 0) {
      fchmodSync(fd, 0o600);
      logger.warn({ path, mode: (st.mode & 0o777).toString(8) }, `secret file ${path} was readable by group/others; changed it to 0600`);
    }
    text = readFileSync(fd, 'utf8');
  } catch (err) {
    if (err instanceof QwenCredentialsFileError) throw err;
    throw new QwenCredentialsFileError(`cannot read secret file ${path}: ${describeFsError(err)}`);
  } finally {
    closeSync(fd);
  }
  let data: unknown;
  try {
    data = JSON.parse(text);
  } catch {
    throw new QwenCredentialsFileError(`secret file ${path} is not valid JSON; add the profile again with --replace`);
  }
  const parsed = SecretFileSchema.safeParse(data);
  // Field names only: the values are the secret.
  if (!parsed.success) throw new QwenCredentialsFileError(`secret file ${path} must hold {"api_key": ...} or {"client_secret": ...}; add the profile again with --replace`);
  return { status: 'ok', secret: parsed.data };
}

/** Makes the profiles directory (0700), or makes an existing one 0700: it is the daemon's own. */
export async function prepareProfilesDir(dir: string): Promise<void> {
  try {
    const created = await mkdir(dir, { recursive: true, mode: 0o700 });
    if (created !== undefined) {
      await chmod(dir, 0o700);
      return;
    }
    const st = await stat(dir);
    if (!st.isDirectory()) throw new QwenCredentialsFileError(`${dir} is not a directory; move it away so the daemon can keep profile secrets there`);
    const owner = ownershipProblem(dir, st, { privateMode: true });
    if (owner && st.uid === currentUid()) await chmod(dir, 0o700);
    else if (owner) throw new QwenCredentialsFileError(`refusing ${dir}: ${owner}`);
  } catch (err) {
    if (err instanceof QwenCredentialsFileError) throw err;
    throw new QwenCredentialsFileError(`cannot prepare ${dir}: ${describeFsError(err)}`);
  }
}

/** Writes a secret file atomically and durably, 0600 in the 0700 profiles directory. */
export async function writeSecretFile(dir: string, path: string, secret: SecretFile): Promise<void> {
  await prepareProfilesDir(dir);
  await writeDurably(path, `${JSON.stringify(secret)}\n`, 0o600);
}

/** Deletes the files; returns those that existed. */
export async function removeFiles(paths: readonly string[]): Promise<string[]> {
  const removed: string[] = [];
  for (const path of paths) {
    try {
      await unlink(path);
      removed.push(path);
    } catch (err) {
      if (errnoCode(err) !== 'ENOENT') throw new QwenCredentialsFileError(`cannot remove ${path}: ${describeFsError(err)}`);
    }
  }
  return removed;
}
