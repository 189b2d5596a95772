import { closeSync, constants as fs, fchmodSync, fstatSync, mkdirSync, openSync, writeSync } from 'node:fs';
import { dirname } from 'node:path';
import { pino, type Logger, type DestinationStream } from 'pino';
import { errnoCode } from '../shared/diagnostics.js';
import { currentUid } from '../shared/path-trust.js';

export type { Logger };

/**
 * Field paths censored in every log line. Tokens are never passed to the logger in the
 * first place; this is the second belt in case one slips into an object that is logged.
 */
export const REDACT_PATHS = [
  'access_token',
  'refresh_token',
  'device_code',
  'code_verifier',
  '*.access_token',
  '*.refresh_token',
  '*.device_code',
  '*.code_verifier',
  'credentials',
  '*.credentials',
  'headers.authorization',
  '*.headers.authorization',
  'api_key',
  'client_secret',
  '*.api_key',
  '*.client_secret',
  'headers["x-api-key"]',
  '*.headers["x-api-key"]',
];

export interface LoggerOptions {
  level: string;
  /** Where lines go; defaults to stdout (synchronous, so nothing is lost on exit). */
  destination?: DestinationStream;
}

/** The daemon's logger: JSON lines, one per event, with tokens censored. */
export function createLogger(options: LoggerOptions): Logger {
  return pino(
    {
      name: 'qwen-tokend',
      level: options.level,
      redact: { paths: REDACT_PATHS, censor: '[redacted]' },
      base: { pid: process.pid },
      timestamp: pino.stdTimeFunctions.isoTime,
    },
    options.destination ?? new LogDestination({}),
  );
}

/** A logger that drops everything, for unit tests and library use. */
export function silentLogger(): Logger {
  return pino({ level: 'silent' });
}

// ---- where log lines go -----------------------------------------------------------------------

/** Turns one JSON log line into what a person reads (see `prettyFormatter`). */
export type LineFormatter = (line: string) => string;

export interface LogDestinationOptions {
  /** Log file path; absent: stdout. */
  file?: string | undefined;
  /** Applied to every line before it is written (a terminal's readable format). */
  format?: LineFormatter | undefined;
  /** Where a failure is reported and lines go after one (default: fd 2, stderr). */
  fallbackFd?: number;
}

/** Retries of a write to a non-blocking pipe that is momentarily full, before the line is dropped. */
const EAGAIN_RETRIES = 50;
const sleeper = new Int32Array(new SharedArrayBuffer(4));

/** Why opening or writing failed, in a few words. */
function reason(err: unknown): string {
  const code = errnoCode(err);
  const text = err instanceof Error ? err.message : String(err);
  return code && !text.includes(code) ? `${text} (${code})` : text;
}

/**
 * The log destination: synchronous writes (nothing is lost on exit), and never an exception. A
 * log line must not be able to stop the daemon (a full disk, `/dev/full`, a closed pipe): when
 * the file or stdout fails, that is reported once on stderr and lines go to stderr from then on;
 * if stderr fails too, lines are dropped. `reopen()` (SIGHUP) tries the file again.
 *
 * The file is opened with O_NOFOLLOW (a symlink planted at the path is refused, not followed)
 * and O_NONBLOCK (a FIFO there cannot stop start-up), and must be a regular file of this user.
 */
export class LogDestination implements DestinationStream {
  private fd: number;
  private ownsFd = false;
  /** Set once the primary destination failed; lines then go to the fallback. */
  private failed = false;
  private readonly fallbackFd: number;

  constructor(private readonly options: LogDestinationOptions) {
    this.fallbackFd = options.fallbackFd ?? 2;
    this.fd = 1;
    this.open();
  }

  /** The path lines are written to, or undefined for stdout / after a fallback. */
  get target(): string | undefined {
    return this.failed ? undefined : this.options.file;
  }

  write(line: string): void {
    const text = this.options.format ? this.format(line) : line;
    if (!this.failed) {
      const err = this.writeAll(this.fd, text);
      if (err === undefined) return;
      this.fail(`cannot write the log ${this.options.file ?? 'to stdout'}: ${reason(err)}`);
    }
    this.writeAll(this.fallbackFd, text);
  }

  /** Closes and opens the log file again (log rotation); a file that cannot be opened falls back to stderr. */
  reopen(): void {
    if (!this.options.file) return;
    this.closeFd();
    this.failed = false;
    this.open();
  }

  /** Writes are synchronous: there is never anything to flush. */
  flush(cb?: (err?: Error) => void): void {
    cb?.();
  }

  flushSync(): void {}

  end(): void {
    this.closeFd();
  }

  private format(line: string): string {
    try {
      return this.options.format!(line);
    } catch {
      return line;
    }
  }

  private open(): void {
    const file = this.options.file;
    if (!file) return;
    try {
      // The log usually lives in the state dir: create it private here, before anything else
      // would create it with the umask's mode.
      mkdirSync(dirname(file), { recursive: true, mode: 0o700 });
      const fd = openSync(file, fs.O_WRONLY | fs.O_APPEND | fs.O_CREAT | fs.O_NOFOLLOW | fs.O_NONBLOCK, 0o600);
      try {
        const st = fstatSync(fd);
        if (!st.isFile()) throw new Error('it is not a regular file');
        const uid = currentUid();
        if (uid !== undefined && st.uid !== uid) throw new Error(`it belongs to uid ${st.uid}, not to this user (uid ${uid})`);
        if ((st.mode & 0o077) !== 0) fchmodSync(fd, 0o600);
      } catch (err) {
        closeSync(fd);
        throw err;
      }
      this.fd = fd;
      this.ownsFd = true;
    } catch (err) {
      const code = errnoCode(err);
      const why = code === 'ELOOP' ? 'it is a symbolic link (ELOOP); refusing to follow it' : code === 'ENXIO' ? 'it is a FIFO with no reader (ENXIO)' : reason(err);
      this.fail(`cannot open the log file ${file}: ${why}`);
    }
  }

  private fail(message: string): void {
    this.failed = true;
    this.closeFd();
    this.writeAll(this.fallbackFd, `qwen-tokend: ${message}; logging to stderr instead\n`);
  }

  private closeFd(): void {
    if (!this.ownsFd) return;
    this.ownsFd = false;
    try {
      closeSync(this.fd);
    } catch {
      /* nothing was lost: writes are synchronous */
    }
    this.fd = 1;
  }

  /** Writes all of `text`; returns the error that stopped it (undefined on success). Never throws. */
  private writeAll(fd: number, text: string): unknown {
    let buffer = Buffer.from(text, 'utf8');
    let again = 0;
    while (buffer.length > 0) {
      try {
        const n = writeSync(fd, buffer);
        buffer = buffer.subarray(n);
      } catch (err) {
        if (errnoCode(err) === 'EAGAIN' && again++ < EAGAIN_RETRIES) {
          Atomics.wait(sleeper, 0, 0, 2);
          continue;
        }
        return err;
      }
    }
    return undefined;
  }
}

/** Options a `qwen-tokend` process logs with (from its config and its terminal). */
export interface DaemonLogOptions {
  level: string;
  file: string | undefined;
  env: NodeJS.ProcessEnv;
  /** Whether stdout is a terminal (default: `process.stdout.isTTY`). */
  isTTY?: boolean;
}

/**
 * The daemon's logger and its destination. On a terminal (and no log file), lines are printed
 * readable (time, level, message, fields) by pino-pretty, colored unless `NO_COLOR` is set;
 * files, journald and pipes get JSON lines. Never throws.
 */
export async function openDaemonLogger(options: DaemonLogOptions): Promise<{ logger: Logger; destination: LogDestination }> {
  const tty = options.isTTY ?? process.stdout.isTTY === true;
  const format = !options.file && tty ? await prettyFormatter(options.env).catch(() => undefined) : undefined;
  const destination = new LogDestination({ file: options.file, format });
  return { logger: createLogger({ level: options.level, destination }), destination };
}

/** pino-pretty's line formatter, loaded only for a terminal. */
export async function prettyFormatter(env: NodeJS.ProcessEnv): Promise<LineFormatter> {
  const { prettyFactory } = await import('pino-pretty');
  // https://no-color.org: any non-empty value turns color off.
  const colorize = !env.NO_COLOR && env.TERM !== 'dumb';
  const pretty = prettyFactory({ colorize, translateTime: 'SYS:HH:MM:ss.l', ignore: 'pid,hostname,name', singleLine: true });
  return (line: string) => pretty(line);
}
