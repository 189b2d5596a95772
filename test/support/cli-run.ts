/**
 * Runs the compiled `qwen-token` as a child process with a piped standard input, and lists the
 * argv of every process on the machine while it runs (Linux `/proc`, what `ps` shows), so a test
 * can prove a secret never sat on any command line: the CLI's, or a daemon it started.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { readdir, readFile } from 'node:fs/promises';
import { CLI_BIN } from './daemon.js';

export interface CliRun {
  code: number | null;
  stdout: string;
  stderr: string;
  /** Every argv seen while the CLI ran, each joined with spaces (empty where /proc is not there). */
  argvSeen: string[];
  pid: number;
}

/** The argv of every process, by pid. */
export async function allArgv(): Promise<Map<number, string>> {
  const seen = new Map<number, string>();
  for (const entry of await readdir('/proc').catch(() => [] as string[])) {
    if (!/^\d+$/.test(entry)) continue;
    const text = await readFile(`/proc/${entry}/cmdline`, 'utf8').catch(() => '');
    if (text) seen.set(Number(entry), text.split('\0').join(' '));
  }
  return seen;
}

export interface RunCliOptions {
  /** Written to standard input, which is then closed (default: closed at once). */
  stdin?: string;
  env: NodeJS.ProcessEnv;
  /** Killed (SIGKILL) after this long (default 30 s). */
  timeoutMs?: number;
  /** Called with the child once spawned (to signal it). */
  onSpawn?: (child: ChildProcess) => void;
}

/** Runs `qwen-token ...args`; resolves when it exited and the last scan is done. */
export async function runCli(args: string[], options: RunCliOptions): Promise<CliRun> {
  const child = spawn(process.execPath, [CLI_BIN, ...args], { env: options.env, stdio: ['pipe', 'pipe', 'pipe'] });
  options.onSpawn?.(child);
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (c: Buffer) => (stdout += c.toString()));
  child.stderr.on('data', (c: Buffer) => (stderr += c.toString()));
  let running = true;
  const timer = setTimeout(() => child.kill('SIGKILL'), options.timeoutMs ?? 30_000);
  const done = new Promise<number | null>((resolve) =>
    child.once('close', (code) => {
      running = false;
      clearTimeout(timer);
      resolve(code);
    }),
  );
  const argvSeen: string[] = [];
  const scanning = (async () => {
    while (running) {
      for (const argv of (await allArgv()).values()) argvSeen.push(argv);
      await new Promise((r) => setTimeout(r, 5));
    }
  })();
  child.stdin.on('error', () => undefined);
  child.stdin.end(options.stdin ?? '');
  const code = await done;
  await scanning;
  return { code, stdout, stderr, argvSeen, pid: child.pid! };
}
