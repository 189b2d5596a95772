/**
 * Runs the real daemon (the dist/bin/qwen-tokend.js bundle) as a child process on a temporary HOME and runtime
 * dir, against a local Qwen server. Every fixture checks at cleanup that no token the server
 * issued appears in the daemon's captured output.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseCredentialsText, serializeCredentials, type Credentials } from '../../shared/credentials.js';
import { DAEMON_NODE_FLAGS } from '../../client/autostart.js';
import { TokenClient, type TokenClientOptions } from '../../client/token-client.js';
import { startQwenServer, type QwenServerOptions, type QwenTestServer } from './qwen-server.js';

export const REPO_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');
export const DAEMON_BIN = join(REPO_ROOT, 'dist', 'bin', 'qwen-tokend.js');
export const CLI_BIN = join(REPO_ROOT, 'dist', 'bin', 'qwen-token.js');

export interface LogLine {
  level: number;
  msg: string;
  [key: string]: unknown;
}

export interface FixtureOptions {
  server?: QwenServerOptions;
  /** Extra environment for the daemon (and clients made by `client()`). */
  env?: Record<string, string | undefined>;
  /** Reuse an existing server instead of starting one (it is then not closed by cleanup). */
  sharedServer?: QwenTestServer;
}

/** Throws when any secret appears in `text`; the message names only a fingerprint-free index. */
export function assertNoSecrets(text: string, secrets: readonly string[], where = 'output'): void {
  const leaked = secrets.filter((s) => s.length >= 8 && text.includes(s));
  if (leaked.length > 0) {
    throw new Error(`${leaked.length} issued token(s) appear in the ${where} (lengths ${leaked.map((s) => s.length).join(', ')})`);
  }
}

export class DaemonFixture {
  readonly root: string;
  readonly home: string;
  readonly runDir: string;
  readonly socketPath: string;
  readonly tokenPath: string;
  readonly qwenHome: string;
  readonly qwenCliPath: string;
  readonly env: NodeJS.ProcessEnv;
  proc: ChildProcess | null = null;
  /** Every line the daemon wrote to stdout or stderr, across restarts. */
  readonly output: string[] = [];
  private readonly clients: TokenClient[] = [];
  private exitPromise: Promise<number | null> | null = null;

  constructor(
    root: string,
    readonly server: QwenTestServer,
    private readonly ownsServer: boolean,
    extraEnv: Record<string, string | undefined>,
  ) {
    this.root = root;
    this.home = join(root, 'home');
    this.runDir = join(root, 'run');
    this.socketPath = join(this.runDir, 'd.sock');
    this.tokenPath = join(this.home, '.one_dragon_alpha', 'qwen_oauth_creds.json');
    this.qwenHome = join(this.home, '.qwen');
    this.qwenCliPath = join(this.qwenHome, 'oauth_creds.json');
    const env: NodeJS.ProcessEnv = { ...process.env };
    for (const key of Object.keys(env)) {
      if (key.startsWith('QWEN_') || key === 'XDG_RUNTIME_DIR' || key === 'XDG_CONFIG_HOME' || key === 'NOTIFY_SOCKET') delete env[key];
    }
    Object.assign(env, {
      HOME: this.home,
      QWEN_TOKEND_SOCKET: this.socketPath,
      QWEN_OAUTH_BASE_URL: server.baseUrl,
      QWEN_TOKEND_LOG_LEVEL: 'debug',
      QWEN_TOKEND_HTTP_TIMEOUT_MS: '2000',
      QWEN_TOKEND_AUTOSTART: '0',
      QWEN_TOKEND_BIN: DAEMON_BIN,
    });
    for (const [k, v] of Object.entries(extraEnv)) {
      if (v === undefined) delete env[k];
      else env[k] = v;
    }
    this.env = env;
  }

  /** Parsed JSON log lines (non-JSON lines are skipped). */
  logs(): LogLine[] {
    const lines: LogLine[] = [];
    for (const line of this.output) {
      try {
        lines.push(JSON.parse(line) as LogLine);
      } catch {
        /* not a log line */
      }
    }
    return lines;
  }

  /** Starts the daemon and resolves when it logs `ready`; rejects with its output if it exits first. */
  async start(extraEnv: Record<string, string | undefined> = {}): Promise<void> {
    if (!existsSync(DAEMON_BIN)) throw new Error(`${DAEMON_BIN} is missing: run \`npm run build\``);
    const env = { ...this.env, ...extraEnv };
    // Started as autostart starts it, Node flags included.
    const proc = spawn(process.execPath, [...DAEMON_NODE_FLAGS, DAEMON_BIN], { env, stdio: ['ignore', 'pipe', 'pipe'] });
    this.proc = proc;
    const startIndex = this.output.length;
    let buffered = '';
    const onChunk = (chunk: Buffer) => {
      buffered += chunk.toString('utf8');
      let nl = buffered.indexOf('\n');
      while (nl !== -1) {
        this.output.push(buffered.slice(0, nl));
        buffered = buffered.slice(nl + 1);
        nl = buffered.indexOf('\n');
      }
    };
    proc.stdout!.on('data', onChunk);
    proc.stderr!.on('data', onChunk);
    this.exitPromise = new Promise((done) => proc.once('exit', (code, signal) => done(code ?? (signal ? -1 : null))));
    await new Promise<void>((ready, fail) => {
      const timer = setInterval(() => {
        if (this.output.slice(startIndex).some((l) => l.includes('"msg":"ready"'))) {
          clearInterval(timer);
          ready();
        }
      }, 10);
      void this.exitPromise!.then((code) => {
        clearInterval(timer);
        fail(new Error(`daemon exited with ${code} before ready:\n${this.output.slice(startIndex).join('\n')}`));
      });
    });
  }

  /** Sends a signal and waits for the exit code. */
  async stop(signal: NodeJS.Signals = 'SIGTERM'): Promise<number | null> {
    const proc = this.proc;
    if (!proc || proc.exitCode !== null || proc.signalCode !== null) return proc?.exitCode ?? null;
    proc.kill(signal);
    const code = await this.exitPromise!;
    this.proc = null;
    return code;
  }

  /** Waits until a log line matches, or throws after `timeoutMs`. */
  async waitForLog(match: (line: LogLine) => boolean, timeoutMs = 5000, from = 0): Promise<LogLine> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const found = this.logs().slice(from).find(match);
      if (found) return found;
      if (Date.now() > deadline) throw new Error(`no matching log line within ${timeoutMs} ms; output:\n${this.output.join('\n')}`);
      await new Promise((r) => setTimeout(r, 10));
    }
  }

  /** A client of this daemon (autostart off unless asked). Closed by cleanup. */
  client(options: TokenClientOptions = {}): TokenClient {
    const client = new TokenClient({ env: this.env, ...options });
    this.clients.push(client);
    return client;
  }

  async writeOwn(creds: Credentials): Promise<void> {
    await mkdir(dirname(this.tokenPath), { recursive: true, mode: 0o700 });
    await writeFile(this.tokenPath, serializeCredentials(creds), { mode: 0o600 });
  }

  async writeCli(creds: Credentials): Promise<void> {
    await mkdir(this.qwenHome, { recursive: true, mode: 0o700 });
    await writeFile(this.qwenCliPath, serializeCredentials(creds), { mode: 0o600 });
  }

  async readOwn(): Promise<Credentials | null> {
    return readCreds(this.tokenPath);
  }

  async readCli(): Promise<Credentials | null> {
    return readCreds(this.qwenCliPath);
  }

  /** Stops clients, the daemon and the server, checks the output for leaked tokens, removes the temp dir. */
  async cleanup(): Promise<void> {
    for (const c of this.clients.splice(0)) await c.close();
    await this.stop('SIGTERM');
    const secrets = [...this.server.issuedTokens(), ...this.server.issuedDeviceCodes()];
    if (this.ownsServer) await this.server.close();
    await rm(this.root, { recursive: true, force: true });
    assertNoSecrets(this.output.join('\n'), secrets, 'daemon output');
  }
}

async function readCreds(path: string): Promise<Credentials | null> {
  try {
    return parseCredentialsText(await readFile(path, 'utf8'), path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw err;
  }
}

/** A fresh temp HOME + runtime dir + local Qwen server (not started daemon: call `start()`). */
export async function createFixture(options: FixtureOptions = {}): Promise<DaemonFixture> {
  const root = await mkdtemp(join(tmpdir(), 'qtd-'));
  await mkdir(join(root, 'home'), { recursive: true, mode: 0o700 });
  await mkdir(join(root, 'run'), { recursive: true, mode: 0o700 });
  const server = options.sharedServer ?? (await startQwenServer(options.server));
  return new DaemonFixture(root, server, !options.sharedServer, options.env ?? {});
}

/** Credentials from the server, as a credential file would hold them. */
export function credsFrom(server: QwenTestServer, expiresIn = 21600): Credentials {
  const t = server.issueTokens({ expiresIn });
  return {
    access_token: t.access_token,
    refresh_token: t.refresh_token,
    token_type: 'Bearer',
    resource_url: t.resource_url,
    expiry_date: t.expiry_date,
  };
}

/** An error answer, as a raw client sees it. */
export interface RawRpcError {
  code: number;
  message: string;
  data?: { code?: string; oauth_error?: string };
}

/** A JSON-RPC notification received by a raw client. */
export interface RawNotification {
  method: string;
  params: Record<string, unknown>;
}

/**
 * A client that speaks the wire protocol itself (no client library): what a client of any
 * version, or of another language, sends and receives. `call` resolves with the result or
 * rejects with the error object; notifications are collected in `notifications`.
 */
export class RawRpcClient {
  readonly notifications: RawNotification[] = [];
  private nextId = 1;
  private buffered = '';
  private readonly pending = new Map<number, { resolve: (v: unknown) => void; reject: (e: RawRpcError) => void }>();

  private constructor(readonly socket: import('node:net').Socket) {
    socket.on('data', (chunk: Buffer) => {
      this.buffered += chunk.toString('utf8');
      let nl = this.buffered.indexOf('\n');
      while (nl !== -1) {
        const line = this.buffered.slice(0, nl);
        this.buffered = this.buffered.slice(nl + 1);
        nl = this.buffered.indexOf('\n');
        const msg = JSON.parse(line) as { id?: number; result?: unknown; error?: RawRpcError; method?: string; params?: Record<string, unknown> };
        if (msg.method !== undefined) {
          this.notifications.push({ method: msg.method, params: msg.params ?? {} });
          continue;
        }
        const waiter = this.pending.get(msg.id as number);
        if (!waiter) continue;
        this.pending.delete(msg.id as number);
        if (msg.error) waiter.reject(msg.error);
        else waiter.resolve(msg.result);
      }
    });
    socket.on('error', () => undefined);
  }

  /** Connects to `socketPath`; with `protocol`, sends `hello` first (without: no hello at all, as version 1 clients may). */
  static async connect(socketPath: string, protocol?: number): Promise<RawRpcClient> {
    const { createConnection } = await import('node:net');
    const socket = createConnection(socketPath);
    await new Promise<void>((resolve, reject) => {
      socket.once('connect', () => resolve());
      socket.once('error', reject);
    });
    const client = new RawRpcClient(socket);
    if (protocol !== undefined) await client.call('hello', { client: 'raw-test', protocol });
    return client;
  }

  call<T = Record<string, unknown>>(method: string, params?: Record<string, unknown>): Promise<T> {
    const id = this.nextId++;
    return new Promise<T>((resolve, reject) => {
      this.pending.set(id, { resolve: resolve as (v: unknown) => void, reject });
      this.socket.write(`${JSON.stringify({ jsonrpc: '2.0', id, method, ...(params === undefined ? {} : { params }) })}\n`);
    });
  }

  /** The error a call fails with (throws when it succeeds). */
  async error(method: string, params?: Record<string, unknown>): Promise<RawRpcError> {
    try {
      await this.call(method, params);
    } catch (err) {
      return err as RawRpcError;
    }
    throw new Error(`${method} succeeded; an error was expected`);
  }

  close(): void {
    this.socket.destroy();
  }
}
