import { randomBytes } from 'node:crypto';
import { closeSync, constants as fsConstants, fchmodSync, fstatSync, openSync, readSync, statSync, type Stats } from 'node:fs';
import { chmod, link, lstat, mkdir, open, readdir, rename, stat, unlink, type FileHandle } from 'node:fs/promises';
import { homedir } from 'node:os';
import { basename, dirname, join, resolve } from 'node:path';
import { errnoCode, errorText, processAlive } from '../shared/diagnostics.js';
import { systemClock, type Clock } from '../shared/clock.js';
import { CREDENTIAL_FILE_MAX_BYTES } from '../shared/config.js';
import { parseCredentialsText, serializeCredentials, trustedChatBaseUrl, type Credentials } from '../shared/credentials.js';
import { QwenCredentialsFileError } from '../shared/errors.js';
import { currentUid } from '../shared/path-trust.js';
import { printable, type ChatUrlPolicy } from '../shared/url-trust.js';
import type { Logger } from './logger.js';

/** What reading a credential file found. */
export type FileRead =
  | { status: 'missing' }
  | { status: 'ok'; credentials: Credentials; mtimeMs: number; text: string }
  | { status: 'corrupt'; error: QwenCredentialsFileError; movedTo: string | undefined };

export interface CredentialFileOptions {
  logger: Logger;
  clock?: Clock;
  /** Move a corrupt file aside (own file: yes; the Qwen CLI's file: no, we only warn). */
  moveCorruptAside: boolean;
  /**
   * Whether the directory is ours: then its permissions are fixed to 0700 on write. For a
   * directory of another program (`~/.qwen`) we only create it (0700) when missing and
   * otherwise warn when it is group/other-accessible.
   */
  ownsDirectory: boolean;
  /** Names the file in log lines: 'own' | 'qwen-cli'. */
  label: string;
  /**
   * When set, a `resource_url` this policy refuses is dropped from what `read()` returns (the
   * chat API's default is used), and reported once per value. Any process of this user can write
   * these files, and the value decides where clients send their token.
   */
  chatUrlPolicy?: ChatUrlPolicy;
  /**
   * Parses the file's text (default: the Qwen CLI's format, `parseCredentialsText`); throws
   * `QwenCredentialsFileError` when it is not a credential record.
   */
  parse?: (text: string, source: string) => Credentials;
  /**
   * The grant the tokens must belong to, for a file only the daemon writes (a profile's token
   * file; never the Qwen CLI's, whose format is shared). `id` (a digest of provider and client,
   * no secret) is written into every write as `grant`. A file that names another grant is
   * deleted when read and reads as missing: its refresh token must never reach another
   * provider. A file that names none (written before grants were recorded) reads as usual;
   * `stampGrant` marks it. `advice` ends the warning (how to log in again).
   */
  grant?: { id: string; advice: () => string };
}

/** The field of a token file that names the grant its tokens belong to (see `CredentialFileOptions.grant`). */
export const GRANT_FIELD = 'grant';

/** The text we last wrote and the file's mtime right after that write. */
export interface LastWrite {
  text: string;
  mtimeMs: number;
}

const FILE_MODE = 0o600;
const DIR_MODE = 0o700;
const TEMP_MARKER = 'qwen-tokend';

// ---- per-path serialization -------------------------------------------------------------

/** Tail of the work queued per resolved path, so writes to one file never interleave in this process. */
const chains = new Map<string, Promise<void>>();

/** Runs `task` after every task queued before it for the same path has settled. */
function serialized<T>(path: string, task: () => Promise<T>): Promise<T> {
  const key = resolve(path);
  const previous = chains.get(key) ?? Promise.resolve();
  const run = previous.then(task);
  const tail = run.then(
    () => undefined,
    () => undefined,
  );
  chains.set(key, tail);
  void tail.then(() => {
    if (chains.get(key) === tail) chains.delete(key);
  });
  return run;
}

// ---- small fs helpers ---------------------------------------------------------------------

const REASONS: Record<string, string> = {
  EACCES: 'permission denied',
  EPERM: 'operation not permitted',
  EISDIR: 'it is a directory',
  ENOTDIR: 'a parent path is not a directory',
  ENOSPC: 'no space left on device',
  EDQUOT: 'disk quota exceeded',
  EROFS: 'read-only file system',
  ENOTEMPTY: 'a non-empty directory is in the way',
  ELOOP: 'too many symbolic links',
};

/** A short human reason for a filesystem error, with its errno code. */
export function describeFsError(err: unknown): string {
  const code = errnoCode(err);
  if (code !== undefined && /^E[A-Z0-9]+$/.test(code)) return `${REASONS[code] ?? errorText(err)} (${code})`;
  return errorText(err);
}

/** Small files (locks, pid files) are read only this far: they hold a UUID or a line of JSON. */
const SMALL_FILE_LIMIT = 64 * 1024;

/**
 * Reads a small file of ours (a lock, a pid file) the way credential files are read: opened
 * non-blocking, so a FIFO put at the path cannot stop the daemon (or its SIGTERM handling) until
 * something writes to it, and refused unless it is a regular file. Errors keep their errno code
 * (ENOENT for a missing file); anything else is `EFTYPE`.
 */
export async function readSmallFile(path: string): Promise<string> {
  const fh = await open(path, fsConstants.O_RDONLY | fsConstants.O_NONBLOCK | fsConstants.O_NOFOLLOW);
  try {
    const st = await fh.stat();
    if (!st.isFile() || st.size > SMALL_FILE_LIMIT) {
      throw Object.assign(new Error(`${path} is not a small regular file`), { code: 'EFTYPE' });
    }
    return await fh.readFile({ encoding: 'utf8' });
  } finally {
    await fh.close().catch(() => undefined);
  }
}

/**
 * A credential file larger than this is not a credential file and is refused unread: reading it
 * whole would hold the event loop and the daemon's memory hostage to whatever was put at the path.
 */
const CREDENTIAL_FILE_LIMIT = CREDENTIAL_FILE_MAX_BYTES;

let readBuffer: Buffer | null = null;

/**
 * Reads the file behind `fd` as UTF-8, at most `limit` bytes; null when it holds more (it grew
 * after fstat said it did not).
 */
function readAtMost(fd: number, limit: number): string | null {
  // One byte more than the limit, to see that the file goes on. One buffer for every read: the
  // read is synchronous, and its text is copied out before anything else can use the buffer.
  if (readBuffer === null || readBuffer.length !== limit + 1) readBuffer = Buffer.allocUnsafeSlow(limit + 1);
  const buffer = readBuffer;
  let length = 0;
  for (;;) {
    const n = readSync(fd, buffer, length, buffer.length - length, length);
    if (n === 0) return buffer.toString('utf8', 0, length);
    length += n;
    if (length > limit) return null;
  }
}

function octal(mode: number): string {
  return (mode & 0o777).toString(8).padStart(4, '0');
}

/** The name of a temp file for `target`: hidden, in the same directory, tagged with our pid. */
function tempPathFor(target: string): string {
  const suffix = randomBytes(6).toString('hex');
  return join(dirname(target), `.${basename(target)}.${TEMP_MARKER}-${process.pid}-${suffix}.tmp`);
}

function escapeRegExp(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}

/** Matches only the temp files `tempPathFor` makes for a file named `base`; group 1 is the pid. */
function tempFilePattern(base: string): RegExp {
  return new RegExp(`^\\.${escapeRegExp(base)}\\.${TEMP_MARKER}-(\\d+)-[0-9a-f]+\\.tmp$`);
}

/** fsyncs a directory so a rename inside it survives a crash; some platforms refuse, which is fine. */
async function fsyncDirectory(dir: string): Promise<void> {
  let fh: FileHandle | undefined;
  try {
    fh = await open(dir, 'r');
    await fh.sync();
  } catch (err) {
    const code = errnoCode(err);
    if (code !== 'EISDIR' && code !== 'EINVAL' && code !== 'EPERM' && code !== 'ENOTSUP') throw err;
  } finally {
    await fh?.close().catch(() => undefined);
  }
}

/** Creates `dir` (and missing parents) as 0700, whatever the umask; returns whether it created anything. */
async function makeDirectory(dir: string): Promise<boolean> {
  const firstCreated = await mkdir(dir, { recursive: true, mode: DIR_MODE });
  if (firstCreated === undefined) return false;
  // mkdir's mode is filtered by the umask; set it exactly on every directory we made.
  for (let p = dir; ; p = dirname(p)) {
    await chmod(p, DIR_MODE);
    if (p === firstCreated || dirname(p) === p) break;
  }
  return true;
}

async function writeDurablyNow(path: string, text: string, mode: number): Promise<LastWrite> {
  const dir = dirname(path);
  const temp = tempPathFor(path);
  let fh: FileHandle | undefined;
  let renamed = false;
  try {
    // 'wx' = O_CREAT|O_EXCL: never follows a planted symlink, never reuses a file.
    fh = await open(temp, 'wx', mode);
    // The umask can only have removed bits; set the mode exactly.
    await fh.chmod(mode);
    await fh.writeFile(text, 'utf8');
    await fh.sync();
    // rename does not change a file's mtime, so this is the mtime the target will have.
    const { mtimeMs } = await fh.stat();
    await fh.close();
    fh = undefined;
    await rename(temp, path);
    renamed = true;
    await fsyncDirectory(dir);
    return { text, mtimeMs };
  } catch (err) {
    await fh?.close().catch(() => undefined);
    if (!renamed) await unlink(temp).catch(() => undefined);
    throw new QwenCredentialsFileError(`could not write ${path}: ${describeFsError(err)}`, { cause: err });
  }
}

/**
 * Writes `text` to `path` atomically and durably: a 0600 (or `mode`) temp file in the same
 * directory, fsync, rename over the target, fsync the directory. Writes to one path are
 * serialized within the process. The directory must exist. Throws `QwenCredentialsFileError`.
 */
export function writeDurably(path: string, text: string, mode: number = FILE_MODE): Promise<LastWrite> {
  return serialized(path, () => writeDurablyNow(path, text, mode));
}

// ---- the grant a token file belongs to ---------------------------------------------------

/**
 * The grant a token file's text names; undefined when it names none. A `grant` that is not a
 * string names no grant we could match: '' (never a grant's id).
 */
function grantNamedIn(text: string): string | undefined {
  try {
    const data: unknown = JSON.parse(text);
    if (data === null || typeof data !== 'object') return undefined;
    const value = (data as Record<string, unknown>)[GRANT_FIELD];
    if (value === undefined) return undefined;
    return typeof value === 'string' ? value : '';
  } catch {
    return undefined;
  }
}

// ---- the credential file ------------------------------------------------------------------

/** One credential file on disk (ours or the Qwen CLI's): validated reads, atomic 0600 writes. */
export class CredentialFile {
  /** What we wrote last, to tell our own writes from outside changes. */
  lastWrite: LastWrite | undefined;
  /** The text of a write in progress. */
  private writing: string | undefined;

  private readonly logger: Logger;
  private readonly clock: Clock;
  private readonly moveCorruptAside: boolean;
  private readonly ownsDirectory: boolean;
  private readonly label: string;
  private warnedAboutDirectory = false;
  private readonly chatUrlPolicy: ChatUrlPolicy | undefined;
  private readonly parse: (text: string, source: string) => Credentials;
  private readonly grant: { id: string; advice: () => string } | undefined;
  /** `resource_url` values already reported as refused (reported once each). */
  private readonly refusedResourceUrls = new Set<string>();

  constructor(
    readonly path: string,
    options: CredentialFileOptions,
  ) {
    this.logger = options.logger;
    this.clock = options.clock ?? systemClock;
    this.moveCorruptAside = options.moveCorruptAside;
    this.ownsDirectory = options.ownsDirectory;
    this.label = options.label;
    this.chatUrlPolicy = options.chatUrlPolicy;
    this.parse = options.parse ?? parseCredentialsText;
    this.grant = options.grant;
  }

  /** True when `text` is exactly what this instance wrote last. */
  isOwnWrite(text: string): boolean {
    // A watcher can report our rename before write() has returned: the text being written counts too.
    return (this.lastWrite !== undefined && this.lastWrite.text === text) || this.writing === text;
  }

  /**
   * Reads and validates the file; a corrupt file is reported (and moved aside when configured).
   * `settling`: the read follows a change event, so the file may be half-written by a writer
   * that does not rename into place; a corrupt result is then reported quietly and left alone.
   */
  async read(options: { settling?: boolean } = {}): Promise<FileRead> {
    // Synchronous I/O, on purpose. The file is a few hundred bytes on a local disk (a larger
    // one is refused unread), read at start-up, after a change event and right before each
    // refresh, where every caller waiting for a token waits on it too. Done asynchronously, open, stat, read and close are four
    // thread-pool round trips, each waiting for a turn of the event loop, far slower than the
    // read itself when many requests are queued (see bench/README.md#b4).
    let fd: number;
    try {
      // Non-blocking open: a FIFO put where the file should be is refused below, instead of
      // stopping the daemon until something writes to it. Regular files read the same.
      fd = openSync(this.path, fsConstants.O_RDONLY | fsConstants.O_NONBLOCK);
    } catch (err) {
      if (errnoCode(err) === 'ENOENT') return { status: 'missing' };
      throw this.fileError('cannot read', err);
    }
    let info: Stats;
    let text: string | null;
    try {
      // stat before reading: if the file changes in between, the mtime we report is older
      // than the text, so the caller sees one more change rather than missing one.
      info = fstatSync(fd);
      if (info.isDirectory()) {
        throw new QwenCredentialsFileError(`cannot read ${this.label} credential file ${this.path}: it is a directory`);
      }
      if (!info.isFile()) {
        throw new QwenCredentialsFileError(`cannot read ${this.label} credential file ${this.path}: not a regular file`);
      }
      this.refuseForeign(info);
      if ((info.mode & 0o077) !== 0) this.restrictMode(fd, info.mode);
      text = info.size > CREDENTIAL_FILE_LIMIT ? null : readAtMost(fd, CREDENTIAL_FILE_LIMIT);
    } catch (err) {
      if (err instanceof QwenCredentialsFileError) throw err;
      throw this.fileError('cannot read', err);
    } finally {
      try {
        closeSync(fd);
      } catch (err) {
        // Nothing was written through it; a failure here would mean the descriptor was closed twice.
        this.logger.debug({ file: this.label, path: this.path, reason: describeFsError(err) }, 'closing a credential file after reading it failed');
      }
    }

    let credentials: Credentials;
    try {
      if (text === null) {
        // Judged like any other file that is not a credential record, from its size alone.
        const size = info.size > CREDENTIAL_FILE_LIMIT ? `${info.size} bytes` : `over ${CREDENTIAL_FILE_LIMIT} bytes`;
        throw new QwenCredentialsFileError(
          `${this.path} is ${size}, more than a credential file can be (${CREDENTIAL_FILE_LIMIT / 1024} KiB); not read`,
        );
      }
      if (text.trim() === '') throw new QwenCredentialsFileError(`${this.path} is empty`);
      credentials = this.parse(text, this.path);
    } catch (err) {
      const error =
        err instanceof QwenCredentialsFileError
          ? err
          : new QwenCredentialsFileError(`${this.path} is not a valid credential file`, { cause: err });
      if (options.settling) {
        this.logger.debug({ file: this.label, path: this.path }, 'credential file not valid yet; will look again once it settles');
        return { status: 'corrupt', error, movedTo: undefined };
      }
      return this.reportCorrupt(error, info);
    }
    if (this.grant) {
      const named = grantNamedIn(text);
      if (named !== undefined && named !== this.grant.id) return this.discardForeignGrant(info);
    }
    return { status: 'ok', credentials: this.withTrustedResourceUrl(credentials), mtimeMs: info.mtimeMs, text };
  }

  /**
   * Refuses a file, or a directory holding it, that another user owns or may write: whoever can
   * replace the file chooses our refresh token and where clients send their access token.
   */
  private refuseForeign(info: Stats): void {
    const uid = currentUid();
    if (uid === undefined) return;
    const refuse = (problem: string, fix: string) =>
      new QwenCredentialsFileError(`refusing ${this.label} credential file ${this.path}: ${problem}; ${fix}`);
    if (info.uid !== uid) {
      throw refuse(`it belongs to uid ${info.uid}, not to this user (uid ${uid})`, 'remove it or log in again');
    }
    const dir = dirname(this.path);
    let dirInfo: Stats;
    try {
      dirInfo = statSync(dir);
    } catch (err) {
      throw this.fileError('cannot inspect the directory of', err);
    }
    if (dirInfo.uid !== uid) {
      throw refuse(`its directory ${dir} belongs to uid ${dirInfo.uid}, not to this user (uid ${uid})`, 'use a directory of your own');
    }
    if ((dirInfo.mode & 0o022) !== 0) {
      throw refuse(
        `its directory ${dir} is writable by group/others (mode ${octal(dirInfo.mode)}), so another user could have replaced it`,
        `run \`chmod go-w ${dir}\``,
      );
    }
  }

  /** The credentials, without a `resource_url` the chat URL policy refuses (reported once per value). */
  private withTrustedResourceUrl(credentials: Credentials): Credentials {
    if (!this.chatUrlPolicy || credentials.resource_url === undefined) return credentials;
    const trusted = trustedChatBaseUrl(credentials.resource_url, this.chatUrlPolicy);
    if (trusted.rejected === undefined) return credentials;
    if (!this.refusedResourceUrls.has(credentials.resource_url)) {
      this.refusedResourceUrls.add(credentials.resource_url);
      this.logger.warn(
        { file: this.label, path: this.path, resource_url: printable(credentials.resource_url, 200), reason: trusted.rejected },
        `ignoring the resource_url in ${this.label} credential file ${this.path} (${trusted.rejected}); clients use ${trusted.url}`,
      );
    }
    const { resource_url: _dropped, ...rest } = credentials;
    return rest;
  }

  /** Writes the credentials atomically and durably as a 0600 file in a 0700 directory (with the grant, when set). */
  write(c: Credentials): Promise<void> {
    const text = serializeCredentials(c, this.grant ? { [GRANT_FIELD]: this.grant.id } : undefined);
    return serialized(this.path, async () => {
      await this.prepareDirectory();
      this.writing = text;
      try {
        this.lastWrite = await writeDurablyNow(this.path, text, FILE_MODE);
      } finally {
        this.writing = undefined;
      }
    });
  }

  /**
   * Marks a file that names no grant (written before grants were recorded) as this file's grant,
   * keeping its tokens; true when it did. Only while nothing else writes the file (before its
   * keeper starts): the text stamped is the text just read.
   */
  async stampGrant(): Promise<boolean> {
    if (!this.grant) return false;
    const read = await this.read();
    if (read.status !== 'ok' || grantNamedIn(read.text) !== undefined) return false;
    await this.write(read.credentials);
    return true;
  }

  /** Deletes a file whose tokens belong to another grant (only the very file judged); reads as missing. */
  private async discardForeignGrant(read: Stats): Promise<FileRead> {
    const advice = this.grant?.advice() ?? '';
    await serialized(this.path, async () => {
      try {
        const current = await stat(this.path);
        if (current.ino !== read.ino || current.dev !== read.dev) return;
        await unlink(this.path);
        this.lastWrite = undefined;
        this.logger.warn(
          { file: this.label, path: this.path },
          `${this.label} credential file ${this.path} holds tokens issued to another provider or client than the settings now name; deleted them, so its refresh token never reaches the new one: ${advice}`,
        );
      } catch (err) {
        if (errnoCode(err) === 'ENOENT') return;
        this.logger.error(
          { file: this.label, path: this.path, reason: describeFsError(err) },
          `${this.label} credential file ${this.path} holds tokens issued to another provider or client and could not be deleted (${describeFsError(err)}); they are not used: ${advice}`,
        );
      }
    });
    return { status: 'missing' };
  }

  /** Deletes the file; false when it was already missing. */
  remove(): Promise<boolean> {
    return serialized(this.path, async () => {
      try {
        await unlink(this.path);
      } catch (err) {
        if (errnoCode(err) === 'ENOENT') return false;
        throw this.fileError('cannot remove', err);
      }
      this.lastWrite = undefined;
      return true;
    });
  }

  /**
   * Removes temp files a crashed write of ours left next to the file (only names matching our
   * own pattern, and not those of another live process); returns the removed paths.
   */
  cleanupTempFiles(): Promise<string[]> {
    return serialized(this.path, async () => {
      const dir = dirname(this.path);
      const pattern = tempFilePattern(basename(this.path));
      let names: string[];
      try {
        names = await readdir(dir);
      } catch (err) {
        if (errnoCode(err) === 'ENOENT') return [];
        throw this.fileError('cannot list the directory of', err);
      }
      const removed: string[] = [];
      for (const name of names) {
        const match = pattern.exec(name);
        if (!match) continue;
        const pid = Number(match[1]);
        // Our own pid: nothing of ours is in flight (we run inside the write queue), so it is
        // a leftover of an earlier process that had the same pid (common in containers).
        if (pid !== process.pid && processAlive(pid)) continue;
        const full = join(dir, name);
        try {
          await unlink(full);
          removed.push(full);
        } catch (err) {
          if (errnoCode(err) !== 'ENOENT') {
            this.logger.warn(
              { file: this.label, path: full, reason: describeFsError(err) },
              `could not remove stray temp file ${full}: ${describeFsError(err)}`,
            );
          }
        }
      }
      if (removed.length > 0) {
        this.logger.info(
          { file: this.label, path: this.path, removed },
          `removed ${removed.length} stray temp file(s) left by an interrupted write of ${this.path}`,
        );
      }
      return removed;
    });
  }

  private fileError(what: string, err: unknown): QwenCredentialsFileError {
    return new QwenCredentialsFileError(
      `${what} ${this.label} credential file ${this.path}: ${describeFsError(err)}`,
      { cause: err },
    );
  }

  /** A refresh token readable by others is a leak: make the file owner-only. */
  private restrictMode(fd: number, mode: number): void {
    try {
      fchmodSync(fd, FILE_MODE);
      this.logger.warn(
        { file: this.label, path: this.path, mode: octal(mode) },
        `${this.label} credential file ${this.path} was readable by group/others (mode ${octal(mode)}); changed it to 0600`,
      );
    } catch (err) {
      this.logger.warn(
        { file: this.label, path: this.path, mode: octal(mode), reason: describeFsError(err) },
        `${this.label} credential file ${this.path} is readable by group/others (mode ${octal(mode)}) and could not be changed to 0600: ${describeFsError(err)}`,
      );
    }
  }

  private async reportCorrupt(error: QwenCredentialsFileError, info: Stats): Promise<FileRead> {
    const reason = error.message;
    if (!this.moveCorruptAside) {
      this.logger.warn(
        { file: this.label, path: this.path, reason },
        `${this.label} credential file ${this.path} is not usable, leaving it in place: ${reason}`,
      );
      return { status: 'corrupt', error, movedTo: undefined };
    }
    const movedTo = await serialized(this.path, () => this.moveAside(info, reason));
    return { status: 'corrupt', error, movedTo };
  }

  /** Moves the file we read aside under a unique `.corrupt-<timestamp>` name; never overwrites anything. */
  private async moveAside(read: Stats, reason: string): Promise<string | undefined> {
    // Only move the very file we judged; if it was replaced meanwhile, the next read judges the new one.
    let current: Stats;
    try {
      current = await stat(this.path);
    } catch {
      return undefined;
    }
    if (current.ino !== read.ino || current.dev !== read.dev) {
      this.logger.warn(
        { file: this.label, path: this.path, reason },
        `${this.label} credential file ${this.path} was not usable (${reason}) but changed before it could be moved aside; leaving it`,
      );
      return undefined;
    }
    const stamp = new Date(this.clock.now()).toISOString().replace(/:/g, '-');
    try {
      for (let n = 0; ; n++) {
        const candidate = `${this.path}.corrupt-${stamp}${n === 0 ? '' : `-${n}`}`;
        if (await this.moveNoClobber(candidate)) {
          this.logger.warn(
            { file: this.label, path: this.path, movedTo: candidate, reason },
            `moved corrupt ${this.label} credential file ${this.path} aside to ${candidate}: ${reason}`,
          );
          return candidate;
        }
      }
    } catch (err) {
      this.logger.warn(
        { file: this.label, path: this.path, reason, moveError: describeFsError(err) },
        `${this.label} credential file ${this.path} is not usable (${reason}) and could not be moved aside: ${describeFsError(err)}`,
      );
      return undefined;
    }
  }

  /** Renames the file to `target` unless `target` exists; false when it does. */
  private async moveNoClobber(target: string): Promise<boolean> {
    try {
      // link() fails on an existing target, so nothing is ever overwritten.
      await link(this.path, target);
    } catch (err) {
      const code = errnoCode(err);
      if (code === 'EEXIST') return false;
      if (code !== 'EPERM' && code !== 'ENOTSUP' && code !== 'ENOSYS' && code !== 'EMLINK') throw err;
      // No hard links on this filesystem: check, then rename (racy only against another process).
      try {
        await lstat(target);
        return false;
      } catch (statErr) {
        if (errnoCode(statErr) !== 'ENOENT') throw statErr;
      }
      await rename(this.path, target);
      return true;
    }
    await unlink(this.path);
    return true;
  }

  /** Makes sure the directory exists with safe permissions before a write. */
  private async prepareDirectory(): Promise<void> {
    const dir = dirname(this.path);
    let info: Stats;
    try {
      if (await makeDirectory(dir)) return;
      info = await stat(dir);
    } catch (err) {
      throw new QwenCredentialsFileError(
        `cannot create the directory of ${this.label} credential file ${this.path}: ${describeFsError(err)}`,
        { cause: err },
      );
    }
    if ((info.mode & 0o077) === 0) return;
    // Never chmod a directory that is not ours alone (another program's, or the home directory).
    const isHome = resolve(dir) === resolve(homedir());
    if (this.ownsDirectory && !isHome) {
      try {
        await chmod(dir, DIR_MODE);
        this.logger.warn(
          { file: this.label, dir, mode: octal(info.mode) },
          `directory ${dir} was accessible by group/others (mode ${octal(info.mode)}); changed it to 0700`,
        );
        return;
      } catch (err) {
        this.logger.warn(
          { file: this.label, dir, mode: octal(info.mode), reason: describeFsError(err) },
          `directory ${dir} is accessible by group/others (mode ${octal(info.mode)}) and could not be changed to 0700: ${describeFsError(err)}`,
        );
        return;
      }
    }
    if (this.warnedAboutDirectory) return;
    this.warnedAboutDirectory = true;
    this.logger.warn(
      { file: this.label, dir, mode: octal(info.mode) },
      `directory ${dir} is accessible by group/others (mode ${octal(info.mode)}); consider chmod 700 ${dir}`,
    );
  }
}
