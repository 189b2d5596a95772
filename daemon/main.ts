#!/usr/bin/env node
/**
 * `qwen-tokend`: the daemon's entry point. Runs in the foreground (a service manager or the
 * client's autostart puts it in the background), logs JSON lines to stdout (readable lines on a
 * terminal).
 */
import { systemClock } from '../shared/clock.js';
import { resolveConfig, type TokendConfig } from '../shared/config.js';
import { errorText } from '../shared/diagnostics.js';
import { QwenConfigError, QwenError } from '../shared/errors.js';
import { packageVersion } from '../shared/package.js';
import { startDaemon, type RunningDaemon } from './daemon.js';
import { InstanceLockedError } from './instance-lock.js';
import { DaemonAlreadyRunningError } from './socket-file.js';
import { openDaemonLogger } from './logger.js';
import { notifyReady } from './readiness.js';

/** Exit codes; the service units tell the service manager not to restart on 3 and 78. */
export const DaemonExitCodes = { ok: 0, failure: 1, alreadyRunning: 3, config: 78 } as const;

const HELP = `qwen-tokend ${packageVersion()}: owns the Qwen OAuth token for every process of this user.

Usage: qwen-tokend [--help] [--version]

Runs in the foreground until SIGTERM/SIGINT; SIGHUP re-reads the credential files
and reopens the log file. Configuration is by environment variable (see README):
QWEN_TOKEN_PATH, QWEN_HOME, QWEN_TOKEND_SOCKET, QWEN_OAUTH_BASE_URL, QWEN_OAUTH_CLIENT_ID,
QWEN_TOKEND_REFRESH_LEAD_MS, QWEN_TOKEND_RETRY_MS, QWEN_TOKEND_HTTP_TIMEOUT_MS,
QWEN_TOKEND_QWEN_CLI_SYNC, QWEN_TOKEND_LOG_LEVEL, QWEN_TOKEND_LOG_FILE,
QWEN_TOKEND_SILENT_CONNECTION_TIMEOUT_MS, QWEN_TOKEND_CHAT_HOSTS (see docs/security.md).
`;

async function main(argv: string[]): Promise<number> {
  if (argv.includes('--help') || argv.includes('-h')) {
    process.stdout.write(HELP);
    return DaemonExitCodes.ok;
  }
  if (argv.includes('--version') || argv.includes('-v')) {
    process.stdout.write(`${packageVersion()}\n`);
    return DaemonExitCodes.ok;
  }
  const unknown = argv.filter((a) => a.length > 0);
  if (unknown.length > 0) {
    process.stderr.write(`qwen-tokend: unknown argument "${unknown[0]}"; see qwen-tokend --help\n`);
    return DaemonExitCodes.config;
  }

  let config: TokendConfig;
  try {
    config = resolveConfig(process.env, { platform: process.platform });
  } catch (err) {
    process.stderr.write(`qwen-tokend: ${errorText(err)}\n`);
    return DaemonExitCodes.config;
  }
  // Never throws: a log file that cannot be opened or written is reported and replaced by stderr.
  const { logger, destination } = await openDaemonLogger({ level: config.logLevel, file: config.logFile, env: process.env });

  let daemon: RunningDaemon;
  let fatal: Error | null = null;
  let stopping: Promise<number> | null = null;
  const stop = (reason: string): Promise<number> =>
    (stopping ??= (async () => {
      logger.info({ reason }, 'shutting down');
      // A hung step must not keep a service manager waiting: give up after 1.8 s.
      const watchdog = setTimeout(() => {
        logger.error('shutdown took too long; exiting anyway');
        logger.flush();
        process.exit(DaemonExitCodes.failure);
      }, 1_800);
      watchdog.unref();
      await daemon.close();
      clearTimeout(watchdog);
      logger.info('stopped');
      logger.flush();
      return fatal ? DaemonExitCodes.failure : DaemonExitCodes.ok;
    })());

  try {
    daemon = await startDaemon({
      config,
      logger,
      clock: systemClock,
      platform: process.platform,
      onFatal: (err) => {
        fatal = err;
        void stop('instance lock lost').then((code) => process.exit(code));
      },
    });
  } catch (err) {
    const message = errorText(err);
    logger.fatal({ code: err instanceof QwenError ? err.code : undefined }, `cannot start: ${message}`);
    process.stderr.write(`qwen-tokend: ${message}\n`);
    if (err instanceof InstanceLockedError || err instanceof DaemonAlreadyRunningError) return DaemonExitCodes.alreadyRunning;
    if (err instanceof QwenConfigError) return DaemonExitCodes.config;
    return DaemonExitCodes.failure;
  }

  for (const signal of ['SIGTERM', 'SIGINT'] as const) {
    process.on(signal, () => void stop(signal).then((code) => process.exit(code)));
  }
  process.on('SIGHUP', () => {
    destination.reopen();
    logger.info('SIGHUP: re-reading credential files');
    void daemon.reload();
  });
  process.on('unhandledRejection', (reason) => {
    logger.error({ err: errorText(reason) }, 'unhandled rejection (bug); continuing');
  });

  logger.info({ socket: config.socketPath, version: packageVersion(), pid: process.pid }, 'ready');
  notifyReady(logger);
  return new Promise<number>(() => undefined);
}

main(process.argv.slice(2)).then(
  // Only an early return (help, version, a start-up failure) resolves; a running daemon exits via stop().
  (code) => process.exit(code),
  (err: unknown) => {
    process.stderr.write(`qwen-tokend: unexpected error: ${(err as Error)?.stack ?? String(err)}\n`);
    process.exit(DaemonExitCodes.failure);
  },
);
