import { pino, type Logger, type DestinationStream } from 'pino';

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
    options.destination ?? pino.destination({ dest: 1, sync: true }),
  );
}

/** A logger that drops everything, for unit tests and library use. */
export function silentLogger(): Logger {
  return pino({ level: 'silent' });
}
