import { spawn } from 'node:child_process';
import type { Logger } from './logger.js';

/**
 * Tells systemd the daemon is ready (the socket listens) when it runs as a `Type=notify`
 * unit. Node has no sd_notify binding, so this runs `systemd-notify --ready`; the unit sets
 * `NotifyAccess=all` so a message from that child process is accepted.
 */
export function notifyReady(logger: Logger): void {
  if (!process.env.NOTIFY_SOCKET) return;
  const child = spawn('systemd-notify', ['--ready', `--pid=${process.pid}`], { stdio: 'ignore' });
  child.on('error', (err) => logger.warn({ err: err.message }, 'could not notify systemd of readiness'));
  child.on('exit', (code) => {
    if (code !== 0) logger.warn({ code }, 'systemd-notify --ready failed');
  });
}
