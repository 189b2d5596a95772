/**
 * Reading an API key or client secret for `profile add`: from an environment variable named on
 * the command line (`--key-env VAR`: only the name is on argv), from standard input when it is not
 * a terminal, else from a prompt that does not echo. Never from argv, which `ps` shows to every
 * user of the machine.
 */
import { QwenConfigError } from '../../shared/errors.js';
import { CommandExit, ExitCodes } from './exit-codes.js';

/** The protocol's bound on a secret (`profiles.add`'s `secret`). */
export const MAX_SECRET_BYTES = 16_384;

const ENV_NAME = /^[A-Za-z_][A-Za-z0-9_]*$/;

/** What `--key-env` names: an environment variable, by name. */
export function checkEnvName(name: string): string {
  if (!ENV_NAME.test(name)) throw new QwenConfigError(`--key-env takes the NAME of an environment variable (letters, digits, "_"), such as DASHSCOPE_API_KEY; not its value`);
  return name;
}

/** A terminal input stream as far as the prompt needs it. */
export interface SecretInput extends NodeJS.ReadableStream {
  isTTY?: boolean;
  setRawMode?: (mode: boolean) => unknown;
}

export interface ReadSecretOptions {
  /** What is asked for, in the prompt and errors: `API key for profile "cp"`. */
  what: string;
  /** Read it from this environment variable instead. */
  keyEnv?: string | undefined;
  env?: NodeJS.ProcessEnv;
  stdin?: SecretInput;
  /** Where the prompt goes (never stdout: that is for results). */
  prompt?: NodeJS.WritableStream;
}

/**
 * A secret checked for shape: one line of printable characters, without the spaces and line
 * ends a paste brings along.
 */
export function cleanSecret(raw: string, what: string, from: string): string {
  const value = raw.replace(/^\s+|\s+$/g, '');
  if (value === '') throw new QwenConfigError(`no ${what} in ${from}`);
  if (Buffer.byteLength(value) > MAX_SECRET_BYTES) throw new QwenConfigError(`the ${what} in ${from} is longer than ${MAX_SECRET_BYTES} bytes`);
  // eslint-disable-next-line no-control-regex
  if (/[\s\u0000-\u001f\u007f]/.test(value)) {
    throw new QwenConfigError(`the ${what} in ${from} contains spaces, line breaks or control characters: give the key alone, on one line`);
  }
  return value;
}

/** Reads the secret from where the options say (see the module doc). */
export async function readSecret(options: ReadSecretOptions): Promise<string> {
  const env = options.env ?? process.env;
  if (options.keyEnv !== undefined) {
    const name = checkEnvName(options.keyEnv);
    const value = env[name];
    if (value === undefined || value === '') throw new QwenConfigError(`the environment variable ${name} (--key-env) is not set or empty`);
    return cleanSecret(value, options.what, `the environment variable ${name}`);
  }
  const stdin = options.stdin ?? (process.stdin as SecretInput);
  if (stdin.isTTY === true && typeof stdin.setRawMode === 'function') {
    const typed = await promptHidden(`${capitalized(options.what)} (input hidden): `, stdin, options.prompt ?? process.stderr);
    return cleanSecret(typed, options.what, 'the prompt');
  }
  const piped = await readAll(stdin, MAX_SECRET_BYTES * 2);
  return cleanSecret(piped, options.what, 'standard input (pipe the key in, or use --key-env VAR)');
}

function capitalized(text: string): string {
  return text.charAt(0).toUpperCase() + text.slice(1);
}

/** Reads a stream to its end; more than `limit` bytes is an error (a key is short). */
function readAll(stream: NodeJS.ReadableStream, limit: number): Promise<string> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    const onData = (chunk: Buffer | string) => {
      const buf = typeof chunk === 'string' ? Buffer.from(chunk) : chunk;
      size += buf.length;
      if (size > limit) {
        cleanup();
        reject(new QwenConfigError(`standard input holds more than ${limit} bytes; pipe in the key alone`));
        return;
      }
      chunks.push(buf);
    };
    const onEnd = () => {
      cleanup();
      resolve(Buffer.concat(chunks).toString('utf8'));
    };
    const onError = (err: Error) => {
      cleanup();
      reject(err);
    };
    const cleanup = () => {
      stream.off('data', onData);
      stream.off('end', onEnd);
      stream.off('error', onError);
    };
    stream.on('data', onData);
    stream.on('end', onEnd);
    stream.on('error', onError);
    stream.resume();
  });
}

/**
 * Asks on a terminal without echo: raw mode, so nothing typed is shown; Enter ends, Backspace
 * and Ctrl-U edit, Ctrl-C cancels (exit 130), Ctrl-D on an empty line gives up. Escape sequences
 * (arrow keys) are dropped.
 */
export function promptHidden(prompt: string, input: SecretInput, output: NodeJS.WritableStream): Promise<string> {
  return new Promise((resolve, reject) => {
    let value = '';
    let escape: 'none' | 'start' | 'csi' = 'none';
    output.write(prompt);
    input.setRawMode!(true);
    const finish = (err?: unknown) => {
      input.off('data', onData);
      input.setRawMode!(false);
      input.pause();
      output.write('\n');
      if (err === undefined) resolve(value);
      else reject(err);
    };
    const onData = (chunk: Buffer | string) => {
      const text = typeof chunk === 'string' ? chunk : chunk.toString('utf8');
      for (const ch of text) {
        if (escape === 'start') {
          escape = ch === '[' || ch === 'O' ? 'csi' : 'none';
          continue;
        }
        if (escape === 'csi') {
          if (ch >= '@' && ch <= '~') escape = 'none';
          continue;
        }
        if (ch === '\r' || ch === '\n') return finish();
        if (ch === '\u0003') return finish(new CommandExit(ExitCodes.cancelled));
        if (ch === '\u0004') return value === '' ? finish(new QwenConfigError('no key entered')) : finish();
        if (ch === '\u007f' || ch === '\b') {
          value = [...value].slice(0, -1).join('');
          continue;
        }
        if (ch === '\u0015') {
          value = '';
          continue;
        }
        if (ch === '\u001b') {
          escape = 'start';
          continue;
        }
        if (ch < ' ') continue;
        value += ch;
      }
    };
    input.on('data', onData);
    input.resume();
  });
}
