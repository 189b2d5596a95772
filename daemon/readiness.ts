import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import type { Logger } from './logger.js';

/**
 * Where `systemd-notify` is looked for. An absolute path, never a PATH lookup: the daemon's
 * PATH comes from whoever started it, and a `systemd-notify` of theirs would run with our
 * NOTIFY_SOCKET (and as us).
 */
export const SYSTEMD_NOTIFY_PATHS = ['/usr/bin/systemd-notify', '/bin/systemd-notify', '/usr/local/bin/systemd-notify'] as const;

/** The first `systemd-notify` among `SYSTEMD_NOTIFY_PATHS` that exists, or undefined. */
export function systemdNotifyPath(candidates: readonly string[] = SYSTEMD_NOTIFY_PATHS): string | undefined {
  return candidates.find((p) => existsSync(p));
}

/**
 * Tells systemd the daemon is ready (the socket listens) when it runs as a `Type=notify`
 * unit. Node has no sd_notify binding (and no Unix datagram sockets), so this runs
 * `systemd-notify --ready` by absolute path; the unit sets `NotifyAccess=all` so a message
 * from that child process is accepted.
 */
export function notifyReady(logger: Logger): void {
  if (!process.env.NOTIFY_SOCKET) return;
  const bin = systemdNotifyPath();
  if (!bin) {
    logger.warn({ looked_in: SYSTEMD_NOTIFY_PATHS }, 'could not notify systemd of readiness: systemd-notify not found');
    return;
  }
  const child = spawn(bin, ['--ready', `--pid=${process.pid}`], { stdio: 'ignore' });
  child.on('error', (err) => logger.warn({ err: err.message }, 'could not notify systemd of readiness'));
  child.on('exit', (code) => {
    if (code !== 0) logger.warn({ code }, 'systemd-notify --ready failed');
  });
}
