/**
 * The shared config file (`QWEN_TOKEND_CONFIG`, else `$XDG_CONFIG_HOME/qwen-tokend/config.json`):
 * one JSON object whose top-level keys belong to different parts of the daemon (`gateway`,
 * `profiles`, `default_profile`). Every change is a read-modify-write of the part it concerns,
 * keeping every other key as it was, written atomically 0600 in a 0700 directory, serialized
 * within the process. A file that cannot be parsed is never overwritten.
 */
import { constants as fsConstants } from 'node:fs';
import { chmod, mkdir, open, stat } from 'node:fs/promises';
import { dirname } from 'node:path';
import { errnoCode, errorText } from '../shared/diagnostics.js';
import { QwenConfigError } from '../shared/errors.js';
import { ownershipProblem } from '../shared/path-trust.js';
import { writeDurably } from './credential-store.js';

/** A config file larger than this is refused: it holds settings, not data. */
export const MAX_CONFIG_BYTES = 1024 * 1024;

/**
 * Reads the file's text; null when it does not exist. Opened non-blocking (a FIFO at the path
 * cannot stall the daemon) and refused when it is not a regular file, is too large, or could have
 * been written by another user (it decides where keys and tokens are sent).
 */
export async function readConfigText(path: string): Promise<string | null> {
  let handle;
  try {
    handle = await open(path, fsConstants.O_RDONLY | fsConstants.O_NONBLOCK);
  } catch (err) {
    if (errnoCode(err) === 'ENOENT') return null;
    throw new QwenConfigError(`cannot read the config file ${path}: ${errorText(err)}`);
  }
  try {
    const st = await handle.stat();
    if (!st.isFile()) throw new QwenConfigError(`the config file ${path} is not a regular file; remove it`);
    if (st.size > MAX_CONFIG_BYTES) throw new QwenConfigError(`the config file ${path} is larger than ${MAX_CONFIG_BYTES / 1024} KiB; it holds settings only`);
    const problem = ownershipProblem(path, st);
    if (problem) throw new QwenConfigError(`refusing the config file: ${problem}; fix its owner or mode (chmod go-w ${path})`);
    const dir = dirname(path);
    const dirStat = await stat(dir);
    const dirProblem = ownershipProblem(dir, dirStat);
    if (dirProblem) throw new QwenConfigError(`refusing the config file ${path}: ${dirProblem}; run \`chmod go-w ${dir}\``);
    return await handle.readFile({ encoding: 'utf8' });
  } catch (err) {
    if (err instanceof QwenConfigError) throw err;
    throw new QwenConfigError(`cannot read the config file ${path}: ${errorText(err)}`);
  } finally {
    await handle.close().catch(() => undefined);
  }
}

/** The file's text as a JSON object (`{}` for an empty file); throws `QwenConfigError` naming the problem. */
export function parseConfigObject(path: string, text: string | null): Record<string, unknown> {
  if (text === null || text.trim() === '') return {};
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch (err) {
    throw new QwenConfigError(`the config file ${path} is not valid JSON (${errorText(err)}); fix or remove it`);
  }
  if (parsed === null || typeof parsed !== 'object' || Array.isArray(parsed)) {
    throw new QwenConfigError(`the config file ${path} must hold a JSON object`);
  }
  return parsed as Record<string, unknown>;
}

/** Reads the whole file as a JSON object; `{}` when it does not exist. */
export async function readConfigObject(path: string): Promise<Record<string, unknown>> {
  return parseConfigObject(path, await readConfigText(path));
}

/** Writes `text` to `path` atomically and durably, 0600, its directory made 0700 when missing. */
export async function writeFileAtomic(path: string, text: string): Promise<void> {
  const dir = dirname(path);
  const created = await mkdir(dir, { recursive: true, mode: 0o700 });
  // mkdir's mode passes through the umask; the directory we made is set exactly.
  if (created !== undefined) await chmod(dir, 0o700);
  await writeDurably(path, text, 0o600);
}

/** Tail of the changes queued per config path, so no read-modify-write loses another's change. */
const queues = new Map<string, Promise<unknown>>();

/**
 * Replaces the file's object with `change(current)` (which returns the new whole object, every
 * other key kept), after every change queued before it in this process. Resolves to what `change`
 * returned, once written.
 */
export function updateConfigFile<T extends Record<string, unknown>>(path: string, change: (current: Record<string, unknown>) => T): Promise<T> {
  const previous = queues.get(path) ?? Promise.resolve();
  const run = previous.then(async () => {
    const next = change(await readConfigObject(path));
    try {
      await writeFileAtomic(path, `${JSON.stringify(next, null, 2)}\n`);
    } catch (err) {
      // Said as a config problem, naming the file, not an internal error: a read-only home or
      // a sandbox that does not let the daemon write there is for a person to fix.
      throw new QwenConfigError(`cannot write the config file ${path}: ${errorText(err)}`);
    }
    return next;
  });
  const tail = run.catch(() => undefined);
  queues.set(path, tail);
  void tail.then(() => {
    if (queues.get(path) === tail) queues.delete(path);
  });
  return run;
}
