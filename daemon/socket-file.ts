/**
 * The socket file and its directory: created private, checked before use, a stale socket
 * replaced, a live one left alone. Nothing here reads or writes a frame.
 */
import { lstat, mkdir, chmod, unlink } from 'node:fs/promises';
import { createConnection } from 'node:net';
import { QwenConfigError, QwenError } from '../shared/errors.js';
import { parentsProblem } from '../shared/path-trust.js';

/** Another daemon answers on the socket. */
export class DaemonAlreadyRunningError extends QwenError {}

/**
 * Creates the socket's directory 0700, or checks an existing one: it must be a directory we
 * own that grants nothing to group or other, or any local user could reach the socket.
 */
export async function prepareSocketDirectory(dir: string): Promise<void> {
  let st;
  try {
    st = await lstat(dir);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
    await mkdir(dir, { recursive: true, mode: 0o700 });
    await chmod(dir, 0o700);
    refuseUnsafeParents(dir);
    return;
  }
  if (!st.isDirectory()) {
    throw new QwenConfigError(`socket directory ${dir} exists but is not a directory`);
  }
  const uid = process.getuid?.();
  if (uid !== undefined && st.uid !== uid) {
    throw new QwenConfigError(`socket directory ${dir} belongs to uid ${st.uid}, not to this user (uid ${uid}); refusing to use it`);
  }
  if ((st.mode & 0o077) !== 0) {
    const mode = (st.mode & 0o777).toString(8).padStart(4, '0');
    throw new QwenConfigError(
      `socket directory ${dir} has mode ${mode}: group or other users could reach the socket. Run \`chmod 700 ${dir}\` or set QWEN_TOKEND_SOCKET to a path in a private directory`,
    );
  }  refuseUnsafeParents(dir);
}

/** Refuses a socket directory that another user could replace through a directory above it. */
function refuseUnsafeParents(dir: string): void {
  const problem = parentsProblem(dir);
  if (problem) {
    throw new QwenConfigError(`socket directory ${dir} is not safe: ${problem}. Set QWEN_TOKEND_SOCKET to a path in a private directory`);
  }
}

/** Removes a socket file nothing listens on; refuses a live one and anything that is not a socket. */
export async function removeStaleSocket(socketPath: string): Promise<void> {
  let st;
  try {
    st = await lstat(socketPath);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return;
    throw err;
  }
  if (!st.isSocket()) {
    throw new QwenConfigError(`${socketPath} exists and is not a socket; refusing to replace it`);
  }
  const live = await new Promise<boolean>((done) => {
    const probe = createConnection(socketPath);
    probe.once('connect', () => {
      probe.destroy();
      done(true);
    });
    probe.once('error', () => done(false));
  });
  if (live) {
    throw new DaemonAlreadyRunningError(`another qwen-tokend is already listening on ${socketPath}`);
  }
  await unlink(socketPath);
}

/** Removes the socket file at `socketPath` if it is still a socket (never anything else put there). */
export async function removeOwnSocket(socketPath: string): Promise<void> {
  try {
    const st = await lstat(socketPath);
    if (st.isSocket()) await unlink(socketPath);
  } catch {
    /* already gone */
  }
}
