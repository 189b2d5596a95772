/**
 * Whether a path can be trusted not to be swapped by another local user: who owns it, who may
 * write to it, and who may write to every directory above it. The client runs these checks
 * before it connects to the daemon's socket (so a stand-in listening there gets nothing), and
 * the daemon before it listens or reads a credential file. Synchronous on purpose: a handful of
 * lstat calls, done once per connection or file read.
 */
import { lstatSync, statSync, type Stats } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { errnoCode } from './diagnostics.js';

/** The effective uid, or undefined where there are no uids (Windows). */
export function currentUid(): number | undefined {
  return process.geteuid?.() ?? process.getuid?.();
}

function octal(mode: number): string {
  return (mode & 0o7777).toString(8).padStart(4, '0');
}

const STICKY = 0o1000;

/**
 * Why `st` (a file or directory at `path`) is not ours alone, or null when it is: owned by
 * another uid, or (with `privateMode`) group/other bits set, or else writable by group/other.
 */
export function ownershipProblem(path: string, st: Stats, options: { privateMode?: boolean; uid?: number } = {}): string | null {
  const uid = options.uid ?? currentUid();
  if (uid === undefined) return null;
  if (st.uid !== uid) return `${path} belongs to uid ${st.uid}, not to this user (uid ${uid})`;
  const mask = options.privateMode ? 0o077 : 0o022;
  if ((st.mode & mask) !== 0) {
    const who = options.privateMode ? 'accessible' : 'writable';
    return `${path} is ${who} by group/others (mode ${octal(st.mode)})`;
  }
  return null;
}

/**
 * Why the directories above `dir` could let another user replace `dir`, or null. Walks up from
 * `dir`'s parent: a directory writable by group/others (and not sticky) is a problem, as is one
 * owned by someone other than this user or root. The walk stops at the first root-owned or
 * sticky directory that others cannot misuse (`/`, `/run/user`, `/tmp`).
 */
export function parentsProblem(dir: string, uid: number | undefined = currentUid()): string | null {
  if (uid === undefined) return null;
  let current = resolve(dir);
  for (;;) {
    const parent = dirname(current);
    if (parent === current) return null;
    current = parent;
    let st: Stats;
    try {
      // stat, not lstat: a symlinked parent (a home on another disk) is judged by its target,
      // whose own parents are then not walked; the target is what another user would need to change.
      st = statSync(current);
    } catch (err) {
      return `cannot inspect ${current} (${errnoCode(err) ?? String(err)})`;
    }
    const sticky = (st.mode & STICKY) !== 0;
    if (!sticky && (st.mode & 0o022) !== 0) {
      return `${current} is writable by group/others (mode ${octal(st.mode)}), so another user could replace what is inside it`;
    }
    if (st.uid !== uid && st.uid !== 0) return `${current} belongs to uid ${st.uid}, not to this user (uid ${uid}) or root`;
    if (st.uid === 0 || sticky) return null;
  }
}

/** What the client checks before it connects; `problem` is null when the socket can be trusted. */
export type SocketTrust = { problem: null } | { problem: string; missing?: boolean };

/**
 * Checks the daemon's socket as the daemon checks its directory: the socket is a socket (not a
 * symlink) owned by this user, its directory is this user's and not group/other-accessible, and
 * no directory above can be changed by another user. `missing` is set when nothing is there yet
 * (the caller may start a daemon).
 */
export function checkSocketPath(socketPath: string): SocketTrust {
  const uid = currentUid();
  if (uid === undefined) return { problem: null };
  const dir = dirname(resolve(socketPath));
  let dirStat: Stats;
  try {
    dirStat = lstatSync(dir);
  } catch (err) {
    if (errnoCode(err) === 'ENOENT') return { problem: `socket directory ${dir} does not exist`, missing: true };
    return { problem: `cannot inspect socket directory ${dir} (${errnoCode(err) ?? String(err)})` };
  }
  if (!dirStat.isDirectory()) return { problem: `socket directory ${dir} is not a directory` };
  const dirProblem = ownershipProblem(`socket directory ${dir}`, dirStat, { privateMode: true, uid });
  if (dirProblem) return { problem: dirProblem };
  const above = parentsProblem(dir, uid);
  if (above) return { problem: above };
  let st: Stats;
  try {
    st = lstatSync(socketPath);
  } catch (err) {
    if (errnoCode(err) === 'ENOENT') return { problem: `${socketPath} does not exist`, missing: true };
    return { problem: `cannot inspect ${socketPath} (${errnoCode(err) ?? String(err)})` };
  }
  if (!st.isSocket()) return { problem: `${socketPath} is not a socket` };
  if (st.uid !== uid) return { problem: `socket ${socketPath} belongs to uid ${st.uid}, not to this user (uid ${uid})` };
  return { problem: null };
}
