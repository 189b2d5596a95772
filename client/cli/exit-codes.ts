/**
 * The qwen-token CLI's exit codes. Scripts branch on them, so they never change meaning.
 */
import { cliCommand } from '../../shared/cli-command.js';
import {
  QwenConfigError,
  QwenCredentialRejectedError,
  QwenDaemonUnavailableError,
  QwenProfileNotFoundError,
  QwenRefreshTokenInvalidError,
  QwenTokenExpiredError,
  QwenTokenNotAvailableError,
} from '../../shared/errors.js';

export const ExitCodes = {
  ok: 0,
  /** Anything not covered below. */
  error: 1,
  /** Unknown command or option, bad option value. */
  usage: 2,
  /** No credentials, or the refresh token was rejected: `qwen-token login`. */
  needsLogin: 3,
  /** No daemon answers on the socket (and none could be started). */
  daemonUnavailable: 4,
  /** The token is past expiry and refreshing it keeps failing. */
  tokenExpired: 5,
  /** No profile of the name given (`--profile`, `QWEN_TOKEND_PROFILE`, `profile show`...). */
  profileNotFound: 6,
  /** The API refused a profile's key: a new key is needed (`profile add NAME --replace`). */
  credentialRejected: 7,
  /** Interrupted by Ctrl-C (128 + SIGINT). */
  cancelled: 130,
} as const;

export type ExitCode = (typeof ExitCodes)[keyof typeof ExitCodes];

/** The exit code for an error that ended a command. */
export function exitCodeFor(err: unknown): ExitCode {
  if (err instanceof QwenRefreshTokenInvalidError || err instanceof QwenTokenNotAvailableError) return ExitCodes.needsLogin;
  if (err instanceof QwenDaemonUnavailableError) return ExitCodes.daemonUnavailable;
  if (err instanceof QwenTokenExpiredError) return ExitCodes.tokenExpired;
  if (err instanceof QwenProfileNotFoundError) return ExitCodes.profileNotFound;
  if (err instanceof QwenCredentialRejectedError) return ExitCodes.credentialRejected;
  return ExitCodes.error;
}

/**
 * What to do about an error, in one line, or undefined when there is nothing to add: the
 * daemon's own messages often end with the same advice ("... run `qwen-token login`"), and
 * saying it twice reads as two problems. Commands are named in the form that works here.
 */
export function hintFor(err: unknown): string | undefined {
  const message = err instanceof Error ? err.message : '';
  // Said already: a command in backquotes that runs `sub` (with or without `--profile NAME`).
  const unlessSaid = (sub: string, hint: string) => (new RegExp(`\`[^\`]*\\b${sub}\\b[^\`]*\``).test(message) ? undefined : hint);
  if (err instanceof QwenRefreshTokenInvalidError || err instanceof QwenTokenNotAvailableError) {
    // An API-key profile without its key says how to store one; a login would not help.
    if (/`[^`]*\bprofile add\b[^`]*`/.test(message)) return undefined;
    return unlessSaid('login', `run \`${cliCommand('login')}\``);
  }
  if (err instanceof QwenDaemonUnavailableError) return `run \`${cliCommand('doctor')}\` to see what is wrong`;
  if (err instanceof QwenTokenExpiredError) {
    return unlessSaid('status', `see \`${cliCommand('status')}\` for the last refresh error; \`${cliCommand('login')}\` if it persists`);
  }
  if (err instanceof QwenConfigError) return `fix the setting named above; \`${cliCommand('doctor')}\` checks the whole setup`;
  if (err instanceof QwenProfileNotFoundError) return unlessSaid('profile list', `\`${cliCommand('profile list')}\` shows the profiles there are`);
  return undefined;
}

/** The exit-code table as shown at the end of `--help`. */
export const EXIT_CODES_HELP = `Exit codes:
  0    ok
  1    error
  2    usage error (unknown command or option, bad value)
  3    needs login (no credentials, or the refresh token was rejected)
  4    daemon unreachable
  5    token expired and refreshing it fails
  6    no profile of that name
  7    the API refused the profile's key (replace it: profile add NAME --replace)
  130  cancelled (Ctrl-C)`;

/** Thrown by a command that has said everything already and only needs to end with `exitCode`. */
export class CommandExit extends Error {
  constructor(readonly exitCode: ExitCode) {
    super(`exit ${exitCode}`);
    this.name = 'CommandExit';
  }
}
