import { readFileSync } from 'node:fs';
import type { z } from 'zod';

/** The `code` of a Node system error (`ENOENT`, `EPERM`, ...), or undefined for anything else. */
export function errnoCode(err: unknown): string | undefined {
  if (typeof err === 'object' && err !== null && 'code' in err) {
    const code = (err as { code: unknown }).code;
    return typeof code === 'string' ? code : undefined;
  }
  return undefined;
}

/** What went wrong, as text for a log line or a message: an Error's message, anything else as a string. */
export function errorText(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

/** Reads `/proc/<pid>/stat`; throws when it cannot (no /proc, the process is gone or hidden). */
export type ProcStatReader = (pid: number) => string;

const readProcStat: ProcStatReader = (pid) => readFileSync(`/proc/${pid}/stat`, 'latin1');

/**
 * True when a `/proc/<pid>/stat` line says the process has ended: a zombie (`Z`, exited but not
 * yet reaped by its parent) or dead (`X`). The state follows the last `)`, as the command name
 * in parentheses may itself hold spaces and parentheses (proc(5)).
 */
export function statSaysEnded(stat: string): boolean {
  const close = stat.lastIndexOf(')');
  const state = close === -1 ? undefined : stat.slice(close + 1).trimStart()[0];
  return state === 'Z' || state === 'X';
}

/**
 * True when a process with this pid exists and has not ended (EPERM: it exists but is not ours
 * to signal). On Linux a zombie counts as ended: it holds nothing any more, yet kill(0) finds it
 * until its parent reaps it, which in a container without an init process may be never.
 */
export function processAlive(pid: number, readStat: ProcStatReader = readProcStat, platform: NodeJS.Platform = process.platform): boolean {
  if (!Number.isSafeInteger(pid) || pid <= 0) return false;
  try {
    process.kill(pid, 0);
  } catch (err) {
    if (errnoCode(err) !== 'EPERM') return false;
  }
  if (platform !== 'linux') return true;
  let stat: string;
  try {
    stat = readStat(pid);
  } catch {
    // No /proc, or it hides other users' processes (hidepid): kill(0)'s answer stands.
    return true;
  }
  return !statSaysEnded(stat);
}

/** A validation failure as one line: `path: message; path: message` (never the values). */
export function describeIssues(error: z.ZodError): string {
  return error.issues.map((i) => `${i.path.length ? i.path.join('.') : '(root)'}: ${i.message}`).join('; ');
}
