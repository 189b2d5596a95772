/**
 * Shared pieces of the chaos scenarios: the secret ledger (every text a person or program
 * could see, checked against every secret the local server issued or accepted), figure
 * reporting, polling, Qwen-CLI-style atomic writes and small /proc and filesystem probes.
 */
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { readdirSync, readFileSync } from 'node:fs';
import { readdir, readFile, rename, writeFile } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { inspect } from 'node:util';
import { serializeCredentials, type Credentials } from '../../shared/credentials.js';
import { allArgv } from '../support/cli-run.js';
import { CLI_BIN, type DaemonFixture } from '../support/daemon.js';
import type { QwenTestServer } from '../support/qwen-server.js';

// ---- the secret ledger ---------------------------------------------------------------------

/** Length of the slice of a secret used as its index key (every secret is longer). */
const KEY_LENGTH = 24;
const SERVER_PREFIX = /^q(?:at|rt|dc)_/;

/** Where a leak was found: the source's name and the secret's kind, never the secret itself. */
export interface Leak {
  where: string;
  kind: string;
}

/** The endpoints of the local server that take an API key. */
const API_KEY_ENDPOINTS = new Set(['apiChat', 'apiModels', 'apiMessages']);

/**
 * Collects secrets (tokens, device codes, PKCE verifiers, API keys, client secrets) and texts
 * (logs, error messages, CLI output, command lines) across a whole chaos run, and finds any
 * secret inside any text.
 */
export class SecretLedger {
  private readonly secrets = new Map<string, string>();
  private readonly texts: Array<{ where: string; text: string }> = [];
  private scannedChars = 0;

  /**
   * Every token, device code, code verifier, API key and client secret `server` has seen,
   * issued or accepts so far (a key it refused counts: it was someone's key).
   */
  addServer(server: QwenTestServer): void {
    for (const t of server.issuedTokens('access')) this.secrets.set(t, 'access token');
    for (const t of server.issuedTokens('refresh')) this.secrets.set(t, 'refresh token');
    for (const c of server.issuedDeviceCodes()) this.secrets.set(c, 'device code');
    for (const k of server.settings.apiKeys) this.addSecret(k, 'API key');
    for (const r of server.requests) {
      const verifier = r.form?.code_verifier;
      if (verifier && verifier.length >= KEY_LENGTH) this.secrets.set(verifier, 'code verifier');
      const presented = r.form?.refresh_token;
      if (presented && presented.length >= KEY_LENGTH) this.secrets.set(presented, 'refresh token');
      const clientSecret = r.form?.client_secret;
      if (clientSecret) this.addSecret(clientSecret, 'client secret');
      if (API_KEY_ENDPOINTS.has(r.endpoint)) {
        const bearer = /^Bearer\s+(\S+)$/i.exec(r.headers.authorization ?? '')?.[1];
        const header = r.headers['x-api-key'];
        for (const key of [bearer, typeof header === 'string' ? header : undefined]) if (key) this.addSecret(key, 'API key');
      }
    }
  }

  /** One secret the test holds itself (a key it typed in, a client secret, the gateway key). */
  addSecret(secret: string, kind: string): void {
    if (secret.length >= KEY_LENGTH && !this.secrets.has(secret)) this.secrets.set(secret, kind);
  }

  addText(where: string, text: string): void {
    if (text) this.texts.push({ where, text });
  }

  /** An error as a program would print it: message, stack and the whole cause chain. */
  addError(where: string, err: unknown): void {
    this.addText(where, inspect(err, { depth: 10, showHidden: false }));
    if (err instanceof Error) this.addText(`${where} (message)`, `${err.name}: ${err.message}`);
  }

  /** A fixture's daemon output (all restarts, crash output included) and its server's secrets. */
  addFixture(fx: DaemonFixture, label: string): void {
    this.addText(`${label}: daemon output`, fx.output.join('\n'));
    this.addServer(fx.server);
  }

  get secretCount(): number {
    return this.secrets.size;
  }

  get textCount(): number {
    return this.texts.length;
  }

  get charsScanned(): number {
    return this.scannedChars;
  }

  /** Scans every text collected so far for every secret; returns the leaks (empty: none). */
  scan(): Leak[] {
    const byKey = new Map<string, string[]>();
    // A secret with other characters (base64's + / =, as in Basic credentials) is looked for whole.
    const whole: string[] = [];
    for (const secret of this.secrets.keys()) {
      const core = secret.replace(SERVER_PREFIX, '');
      if (core.length < KEY_LENGTH) continue;
      const key = core.slice(0, KEY_LENGTH);
      if (!/^[A-Za-z0-9_-]+$/.test(key)) {
        whole.push(secret);
        continue;
      }
      byKey.set(key, [...(byKey.get(key) ?? []), secret]);
    }
    const leaks: Leak[] = [];
    this.scannedChars = 0;
    for (const { where, text } of this.texts) {
      this.scannedChars += text.length;
      for (const secret of whole) if (text.includes(secret)) leaks.push({ where, kind: this.secrets.get(secret) ?? 'secret' });
      // The others are base64url: only runs of those characters can hold one.
      for (const run of text.matchAll(/[A-Za-z0-9_-]{24,}/g)) {
        const s = run[0];
        for (let i = 0; i + KEY_LENGTH <= s.length; i++) {
          const candidates = byKey.get(s.slice(i, i + KEY_LENGTH));
          if (!candidates) continue;
          for (const secret of candidates) {
            if (text.includes(secret) || text.includes(secret.replace(SERVER_PREFIX, ''))) {
              leaks.push({ where, kind: this.secrets.get(secret) ?? 'secret' });
            }
          }
        }
      }
    }
    return leaks;
  }
}

// ---- figures ---------------------------------------------------------------------------------

export type Figures = Record<string, number | string>;

/**
 * Prints one scenario's figures on one line (fingerprints and counts only, never a token), when
 * asked for: `npm run test:chaos` sets CHAOS_FIGURES (vitest.chaos.config.ts); in `npm test` they
 * would only be noise between the results, unless `CHAOS_FIGURES=1 npm test`.
 */
export function report(scenario: string, figures: Figures, env: NodeJS.ProcessEnv = process.env): void {
  if (!env.CHAOS_FIGURES) return;
  const text = Object.entries(figures)
    .map(([k, v]) => `${k}=${v}`)
    .join(', ');
  console.log(`[chaos] ${scenario}: ${text}`);
}

// ---- waiting -------------------------------------------------------------------------------

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Polls `probe` every 10 ms until it returns something other than undefined/false. */
export async function until<T>(probe: () => T | undefined | false | Promise<T | undefined | false>, timeoutMs: number, what: string): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await probe();
    if (value !== undefined && value !== false) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(10);
  }
}

// ---- files ---------------------------------------------------------------------------------

/** Writes credentials the way the Qwen CLI does: a temp file in the same directory, then rename. */
export async function writeAtomically(path: string, creds: Credentials): Promise<void> {
  const temp = join(dirname(path), `.${basename(path)}.outside-${randomBytes(4).toString('hex')}.tmp`);
  await writeFile(temp, serializeCredentials(creds), { mode: 0o600 });
  await rename(temp, path);
}

/** Raw bytes of a file, or null when it does not exist. */
export async function readRaw(path: string): Promise<string | null> {
  try {
    return await readFile(path, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw err;
  }
}

/** The daemon's temp files (`.<name>.qwen-tokend-<pid>-<hex>.tmp`) in `dir`, with their pids. */
export async function daemonTempFiles(dir: string): Promise<Array<{ name: string; pid: number }>> {
  let names: string[];
  try {
    names = await readdir(dir);
  } catch {
    return [];
  }
  const out: Array<{ name: string; pid: number }> = [];
  for (const name of names) {
    const m = /^\..+\.qwen-tokend-(\d+)-[0-9a-f]+\.tmp$/.exec(name);
    if (m) out.push({ name, pid: Number(m[1]) });
  }
  return out;
}

/** Resident set size of a process in bytes (Linux /proc), or null when unavailable. */
export async function rssBytes(pid: number): Promise<number | null> {
  try {
    const status = await readFile(`/proc/${pid}/status`, 'utf8');
    const m = /^VmRSS:\s+(\d+)\s+kB/m.exec(status);
    return m ? Number(m[1]) * 1024 : null;
  } catch {
    return null;
  }
}

// ---- the qwen-token CLI ---------------------------------------------------------------------

export interface CliRun {
  code: number | null;
  stdout: string;
  stderr: string;
}

/**
 * Runs `qwen-token <args>` (the compiled CLI) with the fixture's environment; `input`, when
 * given, is written to its standard input, which is then closed (a key, a client secret).
 */
export function runCli(env: NodeJS.ProcessEnv, args: string[], timeoutMs = 15_000, input?: string): Promise<CliRun> {
  return new Promise((resolve) => {
    const child = execFile(process.execPath, [CLI_BIN, ...args], { env, timeout: timeoutMs }, (err, stdout, stderr) => {
      const code = err ? (typeof (err as { code?: unknown }).code === 'number' ? ((err as { code: number }).code) : null) : 0;
      resolve({ code, stdout: String(stdout), stderr: String(stderr) });
    });
    if (input !== undefined) {
      child.stdin?.on('error', () => undefined);
      child.stdin?.end(input);
    }
  });
}

/** How long after a process appears its command line is read again (exec follows fork at once). */
const YOUNG_MS = 1_000;

/**
 * The command line of every process on the machine (what `ps` shows) from `start()` to
 * `stop()`: the CLI's, and those of the processes it starts, an autostarted daemon included.
 * A full sweep (cli-run.ts's scanner) at both ends; in between, every few milliseconds, the
 * command line of each process younger than a second, so a short-lived one is caught without
 * reading every process's every few milliseconds. Linux `/proc` only; elsewhere it sees nothing.
 */
export class ArgvWatch {
  /** Each distinct command line seen, with the pids that had it. */
  private readonly seen = new Map<string, Set<number>>();
  /** When each live pid was first listed. */
  private readonly firstSeen = new Map<number, number>();
  private running = false;
  private loop: Promise<void> | null = null;
  /** Sweeps of `/proc` so far. */
  sweeps = 0;

  async start(): Promise<this> {
    const now = Date.now();
    for (const [pid, argv] of await allArgv()) {
      this.record(pid, argv);
      this.firstSeen.set(pid, now - YOUNG_MS);
    }
    this.running = true;
    this.loop = (async () => {
      while (this.running) {
        this.sweep();
        await sleep(5);
      }
    })();
    return this;
  }

  /** Stops, then one full sweep, so a process alive now is in. */
  async stop(): Promise<void> {
    this.running = false;
    await this.loop;
    for (const [pid, argv] of await allArgv()) this.record(pid, argv);
  }

  /** Every distinct command line seen. */
  lines(): string[] {
    return [...this.seen.keys()];
  }

  /** The command lines process `pid` was seen with. */
  of(pid: number): string[] {
    return [...this.seen].filter(([, pids]) => pids.has(pid)).map(([argv]) => argv);
  }

  /** Synchronous on purpose: a few small reads, far cheaper than a promise per process. */
  private sweep(): void {
    let entries: string[];
    try {
      entries = readdirSync('/proc');
    } catch {
      return;
    }
    const now = Date.now();
    const live = new Set<number>();
    for (const entry of entries) {
      if (!/^\d+$/.test(entry)) continue;
      const pid = Number(entry);
      live.add(pid);
      const first = this.firstSeen.get(pid) ?? now;
      this.firstSeen.set(pid, first);
      if (now - first > YOUNG_MS) continue;
      let text = '';
      try {
        text = readFileSync(`/proc/${pid}/cmdline`, 'utf8');
      } catch {
        continue;
      }
      if (text) this.record(pid, text.split('\0').join(' '));
    }
    // A pid that went away is new when it comes back.
    for (const pid of this.firstSeen.keys()) if (!live.has(pid)) this.firstSeen.delete(pid);
    this.sweeps += 1;
  }

  private record(pid: number, argv: string): void {
    const pids = this.seen.get(argv) ?? new Set<number>();
    pids.add(pid);
    this.seen.set(argv, pids);
  }
}

// ---- daemon health -----------------------------------------------------------------------------

/** Log lines that only a bug produces: an unhandled rejection, an uncaught exception, a crash. */
export function bugLines(fx: DaemonFixture): string[] {
  return fx
    .logs()
    .filter((l) => /unhandled rejection|uncaught|unexpected error/i.test(String(l.msg)))
    .map((l) => String(l.msg))
    .concat(fx.output.filter((l) => /^qwen-tokend: unexpected error|^\s+at .+\(.+:\d+:\d+\)$/.test(l)));
}
