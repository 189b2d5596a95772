/**
 * Pure pieces of the qwen-token CLI: the duration formatter and parser, and the error → exit
 * code mapping.
 */
import { cliCommand } from '../shared/cli-command.js';
import { describe, expect, it } from 'vitest';
import { describeExpiry, formatDuration, formatRelative, parseDuration } from '../client/cli/duration.js';
import { ExitCodes, exitCodeFor, hintFor } from '../client/cli/exit-codes.js';
import { redactCommandLine } from '../client/cli/program.js';
import { parseMinValidity } from '../client/cli/token.js';
import {
  QwenConfigError,
  QwenCredentialRejectedError,
  QwenDaemonUnavailableError,
  QwenProfileNotFoundError,
  QwenError,
  QwenOAuthError,
  QwenRefreshTokenInvalidError,
  QwenTokenExpiredError,
  QwenTokenNotAvailableError,
} from '../shared/errors.js';

const S = 1000;
const M = 60 * S;
const H = 60 * M;
const D = 24 * H;

describe('formatDuration', () => {
  it.each([
    [0, '<1s'],
    [999, '<1s'],
    [1000, '1s'],
    [45 * S + 999, '45s'],
    [60 * S, '1m'],
    [3 * M + 5 * S, '3m 5s'],
    [59 * M + 59 * S + 999, '59m 59s'],
    [H, '1h'],
    [4 * H + 12 * M + 59 * S, '4h 12m'],
    [6 * H - 1, '5h 59m'],
    [D + 5 * M, '1d'],
    [2 * D + 3 * H + 30 * M, '2d 3h'],
    [-(3 * M), '3m'],
  ])('%d ms → %s', (ms, text) => {
    expect(formatDuration(ms)).toBe(text);
  });

  it('says "forever" for an infinite duration', () => {
    expect(formatDuration(Infinity)).toBe('forever');
  });
});

describe('relative times', () => {
  const now = 1_750_000_000_000;
  it('formats future and past', () => {
    expect(formatRelative(now + 4 * H + 12 * M, now)).toBe('in 4h 12m');
    expect(formatRelative(now - 3 * M, now)).toBe('3m ago');
    expect(formatRelative(now, now)).toBe('in <1s');
  });

  it('describes an expiry', () => {
    expect(describeExpiry(now + 4 * H + 12 * M + 30 * S, now)).toBe('expires in 4h 12m');
    expect(describeExpiry(now - 3 * M - 10 * S, now)).toBe('expired 3m 10s ago');
    expect(describeExpiry(now, now)).toBe('expired <1s ago');
  });
});

describe('parseDuration', () => {
  it.each([
    ['90', 90 * S],
    ['1.5', 1500],
    ['250ms', 250],
    ['90s', 90 * S],
    ['5m', 5 * M],
    ['1h30m', H + 30 * M],
    ['1H', H],
    [' 2d ', 2 * D],
    ['0', 0],
  ])('%s → %d ms', (text, ms) => {
    expect(parseDuration(text)).toBe(ms);
  });

  it.each(['', 'abc', '5x', '-5m', '5 m', 'm5', '1h-30m', '1e3'])('rejects %j', (text) => {
    expect(parseDuration(text)).toBeUndefined();
  });

  it('--min-validity is capped at the protocol maximum of 24h', () => {
    expect(parseMinValidity('24h')).toBe(D);
    expect(() => parseMinValidity('25h')).toThrow(/at most 24h/);
    expect(() => parseMinValidity('soon')).toThrow(/expected a duration/);
  });
});

describe('exit codes', () => {
  it('maps each typed error to its documented code', () => {
    expect(exitCodeFor(new QwenTokenNotAvailableError('x'))).toBe(ExitCodes.needsLogin);
    expect(exitCodeFor(new QwenRefreshTokenInvalidError('x'))).toBe(ExitCodes.needsLogin);
    expect(exitCodeFor(new QwenDaemonUnavailableError('x'))).toBe(ExitCodes.daemonUnavailable);
    expect(exitCodeFor(new QwenTokenExpiredError('x'))).toBe(ExitCodes.tokenExpired);
    expect(exitCodeFor(new QwenOAuthError('x'))).toBe(ExitCodes.error);
    expect(exitCodeFor(new QwenError('x'))).toBe(ExitCodes.error);
    expect(exitCodeFor(new Error('x'))).toBe(ExitCodes.error);
    expect(exitCodeFor(new QwenProfileNotFoundError('x'))).toBe(ExitCodes.profileNotFound);
    expect(exitCodeFor(new QwenCredentialRejectedError('x'))).toBe(ExitCodes.credentialRejected);
    expect(Object.values(ExitCodes)).toEqual([0, 1, 2, 3, 4, 5, 6, 7, 130]);
  });

  it('gives a hint for the errors a person can act on', () => {
    // The command in the form that works here: `qwen-token` on PATH, else e.g. `npm run cli --`.
    expect(hintFor(new QwenTokenNotAvailableError('x'))).toBe(`run \`${cliCommand('login')}\``);
    expect(hintFor(new QwenDaemonUnavailableError('x'))).toContain(`\`${cliCommand('doctor')}\``);
    // Advice the message already gives is not repeated as a hint.
    expect(hintFor(new QwenTokenNotAvailableError(`not logged in yet: run \`${cliCommand('login')}\``))).toBeUndefined();
    expect(hintFor(new QwenConfigError('x'))).toBeDefined();
    expect(hintFor(new Error('x'))).toBeUndefined();
  });
});

describe('usage errors never echo an option value that may be a secret', () => {
  // A stand-in, not a real secret.
  const SECRET = 'not-a-real-secret-7f3a';

  it('redacts what follows = in an option token, whatever it holds', () => {
    for (const token of [`--client-secret=${SECRET}`, `--key=${SECRET}`, `-k=${SECRET}`, `--secret=a ${SECRET}'b`]) {
      const text = redactCommandLine(`unknown option '${token}'\n`, ['profile', 'add', 'x', token]);
      expect(text).not.toContain(SECRET);
      expect(text).toBe(`unknown option '${token.slice(0, token.indexOf('='))}=<redacted>'\n`);
    }
    const invalid = redactCommandLine(`option '--port <n>' argument '${SECRET}' is invalid.`, [`--port=${SECRET}`]);
    expect(invalid).toBe("option '--port <n>' argument '<redacted>' is invalid.");
  });

  it('redacts the value of an option named for a secret, and leaves other text alone', () => {
    expect(redactCommandLine(`option '--api-key <k>' argument '${SECRET}' is invalid.`, ['--api-key', SECRET])).not.toContain(SECRET);
    // Not a secret by name: the value helps the user and stays.
    expect(redactCommandLine("option '--port <n>' argument 'abc' is invalid.", ['--port', 'abc'])).toContain("'abc'");
    expect(redactCommandLine("option '--token-lifetime <seconds>' argument 'x' is invalid.", ['--token-lifetime', 'x'])).toContain("'x'");
    // After `--` there are no options; nothing is taken for one.
    expect(redactCommandLine("unknown command '--x=1'", ['--', '--x=1'])).toBe("unknown command '--x=1'");
    expect(redactCommandLine("too many arguments for 'token'. Expected 0 arguments but got 1.", ['token', '--x=1'])).toBe(
      "too many arguments for 'token'. Expected 0 arguments but got 1.",
    );
  });
});
