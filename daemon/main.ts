#!/usr/bin/env node
/**
 * `qwen-tokend`: the daemon's entry point. Runs in the foreground (a service manager or the
 * client's autostart puts it in the background), logs JSON lines to stdout (readable lines on a
 * terminal).
 */
import { systemClock } from '../shared/clock.js';
import { resolveConfig, type TokendConfig } from '../shared/config.js';
import { errorText } from '../shared/diagnostics.js';
import { QwenConfigError, QwenCredentialsFileError, QwenError } from '../shared/errors.js';
import { packageVersion } from '../shared/package.js';
import { startDaemon, type RunningDaemon } from './daemon.js';
import { InstanceLockedError } from './instance-lock.js';
import { DaemonAlreadyRunningError } from './socket-file.js';
import { openDaemonLogger } from './logger.js';
import { notifyReady } from './readiness.js';

/**
 * Exit codes; the service units tell the service manager not to restart on 3 and 78. 78 is
 * sysexits' EX_CONFIG: the settings or files as they are cannot be used (a bad value, an unsafe
 * directory, a credential file another user owns), so starting again would fail again.
 */
export const DaemonExitCodes = { ok: 0, failure: 1, alreadyRunning: 3, config: 78 } as const;

/** How long a daemon left alone after start-up waits before it returns its start-up heap. */
const SETTLE_MS = 500;

const HELP = `qwen-tokend ${packageVersion()}: owns the Qwen OAuth token for every process of this user.

Usage: qwen-tokend [--help] [--version]

Runs in the foreground until SIGTERM/SIGINT; SIGHUP re-reads the credential files
and reopens the log file. Configuration is by environment variable (see README):
QWEN_TOKEN_PATH, QWEN_HOME, QWEN_TOKEND_SOCKET, QWEN_OAUTH_BASE_URL, QWEN_OAUTH_CLIENT_ID,
QWEN_TOKEND_REFRESH_LEAD_MS, QWEN_TOKEND_RETRY_MS, QWEN_TOKEND_REQUEST_RETRY_MS, QWEN_TOKEND_HTTP_TIMEOUT_MS,
QWEN_TOKEND_QWEN_CLI_SYNC, QWEN_TOKEND_LOG_LEVEL, QWEN_TOKEND_LOG_FILE,
QWEN_TOKEND_SILENT_CONNECTION_TIMEOUT_MS, QWEN_TOKEND_CHAT_HOSTS (see docs/security.md).

Exit codes: 0 stopped, 1 failure, 3 another daemon already runs, 78 the configuration
or files cannot be used as they are (the message says what to change).
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
    if (err instanceof QwenConfigError || err instanceof QwenCredentialsFileError) return DaemonExitCodes.config;
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
  returnStartupHeapWhenQuiet(daemon);
  return new Promise<number>(() => undefined);
}

/**
 * V8 keeps the heap it grew while the daemon loaded (a larger young generation, emptied pages)
 * until its memory reducer runs, which an idle daemon may never trigger. A daemon nobody has
 * used since it became ready, and that is not in the middle of a refresh, asks for one
 * memory-reducing collection instead: the pause must not land on a caller or on an HTTP call's
 * timeout. Needs `--expose-gc` (DAEMON_NODE_FLAGS); see bench/README.md#b6a.
 */
function returnStartupHeapWhenQuiet({ server, keeper }: RunningDaemon): void {
  const gc = (globalThis as { gc?: (options: { type: 'major'; execution: 'sync'; flavor: 'last-resort' }) => void }).gc;
  if (typeof gc !== 'function') return;
  const served = server.requestsServed;
  setTimeout(() => {
    const quiet = server.connectionCount === 0 && server.requestsServed === served && keeper.snapshot().state !== 'refreshing';
    if (quiet) gc({ type: 'major', execution: 'sync', flavor: 'last-resort' });
  }, SETTLE_MS).unref();
}

main(process.argv.slice(2)).then(
  // Only an early return (help, version, a start-up failure) resolves; a running daemon exits via stop().
  (code) => process.exit(code),
  (err: unknown) => {
    process.stderr.write(`qwen-tokend: unexpected error: ${(err as Error)?.stack ?? String(err)}\n`);
    process.exit(DaemonExitCodes.failure);
  },
);
