/**
 * Starting a daemon when none is running: only when allowed, only one start at a time per
 * process, and never when a service manager owns the daemon.
 */
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import type { TokendConfig } from '../shared/config.js';
import { QwenDaemonUnavailableError } from '../shared/errors.js';
import { packagedDaemonBin } from '../shared/package.js';

/** The launchd label and systemd unit name the `service` command installs. */
export const SERVICE_LABEL = 'io.github.qwen-tokend';
export const SYSTEMD_UNIT = 'qwen-tokend.service';

/** Where `qwen-token service install` puts the unit/plist for this platform. */
export function serviceFilePath(home: string, platform: NodeJS.Platform = process.platform): string {
  return platform === 'darwin'
    ? join(home, 'Library', 'LaunchAgents', `${SERVICE_LABEL}.plist`)
    : join(home, '.config', 'systemd', 'user', SYSTEMD_UNIT);
}

/** True when a service unit is installed: then the service manager is the one owner of starting the daemon. */
export function serviceInstalled(home: string, platform: NodeJS.Platform = process.platform): boolean {
  return existsSync(serviceFilePath(home, platform));
}


/** systemd's per-service variables (sd_notify, socket activation), dropped from an autostarted daemon's environment. */
export const INHERITED_FROM_SERVICE_MANAGER = ['NOTIFY_SOCKET', 'LISTEN_FDS', 'LISTEN_PID', 'LISTEN_FDNAMES'] as const;

/**
 * How the daemon is started wherever it is started (autostart, the systemd unit and launchd
 * agent, `npm start`, the bench): settings Node and the C library read only at start-up, so the
 * daemon cannot set them itself. What each one is for, and what it saves: bench/README.md#b6a.
 *
 * - `--max-semi-space-size=16`: the young generation stops at the same size on every Node
 *   version (Node 24's V8 would let a burst of garbage grow it further).
 * - `--expose-gc`: lets a daemon left alone after start-up return its start-up heap
 *   (daemon/main.ts).
 */
export const DAEMON_NODE_FLAGS: readonly string[] = ['--max-semi-space-size=16', '--expose-gc'];

/**
 * glibc's trim threshold, fixed at glibc's default: left alone, glibc raises it once a large
 * block is freed, and the memory V8 freed after compiling at start-up stays with the daemon.
 * Other C libraries ignore the variable.
 */
export const DAEMON_GLIBC_TUNABLES = 'glibc.malloc.trim_threshold=131072';

/** `env` for a daemon: with DAEMON_GLIBC_TUNABLES, unless `env` sets glibc tunables itself. */
export function daemonEnv(env: NodeJS.ProcessEnv): NodeJS.ProcessEnv {
  return env.GLIBC_TUNABLES === undefined ? { ...env, GLIBC_TUNABLES: DAEMON_GLIBC_TUNABLES } : { ...env };
}

/** Exit code with which a second daemon says another one already runs (not a failure here). */
const ALREADY_RUNNING = 3;

/**
 * Starts a detached daemon. Resolves once it has been spawned; the caller waits for the socket.
 * Rejects early when the child exits with a real failure.
 */
export function spawnDaemon(config: TokendConfig, env: NodeJS.ProcessEnv): { exited: Promise<number | null> } {
  let bin: string;
  try {
    bin = config.daemonBin ?? packagedDaemonBin();
  } catch (err) {
    throw new QwenDaemonUnavailableError(`cannot autostart qwen-tokend: ${(err as Error).message} (set QWEN_TOKEND_BIN to the daemon program)`);
  }
  if (!existsSync(bin)) {
    throw new QwenDaemonUnavailableError(`cannot autostart qwen-tokend: ${bin} does not exist (set QWEN_TOKEND_BIN or run \`npm run build\`)`);
  }
  const childEnv = daemonEnv(env);
  // Meant for the caller (run by a service manager), not for a daemon it starts: with these the
  // daemon would tell the caller's service manager it is ready, or take sockets meant for it.
  for (const name of INHERITED_FROM_SERVICE_MANAGER) delete childEnv[name];
  // A detached daemon has no terminal: its log goes to a file beside the credentials.
  childEnv.QWEN_TOKEND_LOG_FILE ??= join(config.stateDir, 'qwen-tokend.log');
  const child = spawn(process.execPath, [...DAEMON_NODE_FLAGS, bin], { detached: true, stdio: 'ignore', env: childEnv });
  const exited = new Promise<number | null>((resolve) => {
    child.once('exit', (code) => resolve(code));
    child.once('error', () => resolve(null));
  });
  child.unref();
  return { exited };
}

/** True when a daemon's exit code says another daemon holds the instance lock. */
export function saidAlreadyRunning(code: number | null): boolean {
  return code === ALREADY_RUNNING;
}

/** The error for a daemon that exited with `code` while starting; null when that code means another one runs. */
export function autostartFailure(config: TokendConfig, code: number | null, env: NodeJS.ProcessEnv): QwenDaemonUnavailableError | null {
  if (code === ALREADY_RUNNING) return null;
  const log = env.QWEN_TOKEND_LOG_FILE ?? join(config.stateDir, 'qwen-tokend.log');
  return new QwenDaemonUnavailableError(`qwen-tokend exited with code ${code} while starting; see ${log}`);
}
