/**
 * The gateway in this process, over profiles the test defines, against the local Qwen server:
 * for the forwarding, retry and hostile-HTTP cases that need profile kinds the daemon does not
 * have yet (API keys). Log lines are captured for access-log and secrets assertions.
 */
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { request, type IncomingHttpHeaders } from 'node:http';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { pino } from 'pino';
import { Gateway } from '../../daemon/gateway/gateway.js';
import { GATEWAY_DEFAULTS, type GatewayLimits } from '../../daemon/gateway/limits.js';
import type { GatewayProfile, GatewayProfiles } from '../../daemon/gateway/profiles.js';
import type { LogLine } from './daemon.js';

export interface GatewayHarness {
  gateway: Gateway;
  socketPath: string;
  configPath: string;
  stateDir: string;
  logs: LogLine[];
  close(): Promise<void>;
}

/** Profiles from a list; the first is the default. */
export function profileSet(list: GatewayProfile[]): GatewayProfiles {
  return {
    defaultProfile: () => list[0]!.name,
    get: (name) => list.find((p) => p.name === name),
    names: () => list.map((p) => p.name),
  };
}

/** Starts a gateway on a Unix socket in a fresh private temp dir. */
export async function startGateway(profiles: GatewayProfiles, limits: Partial<GatewayLimits> = {}): Promise<GatewayHarness> {
  const root = await mkdtemp(join(tmpdir(), 'qgw-'));
  const runDir = join(root, 'run');
  await mkdir(runDir, { mode: 0o700 });
  const logs: LogLine[] = [];
  const sink = new Writable({
    write(chunk: Buffer, _enc, done) {
      for (const line of chunk.toString('utf8').split('\n')) if (line.trim()) logs.push(JSON.parse(line) as LogLine);
      done();
    },
  });
  const logger = pino({ level: 'debug' }, sink);
  const socketPath = join(runDir, 'gateway.sock');
  const configPath = join(root, 'config', 'config.json');
  const gateway = new Gateway({
    profiles,
    env: { socketPath, configPath, limits: { ...GATEWAY_DEFAULTS, ...limits } },
    stateDir: join(root, 'state'),
    logger,
  });
  await gateway.start();
  return {
    gateway,
    socketPath,
    configPath,
    stateDir: join(root, 'state'),
    logs,
    async close() {
      await gateway.close();
      await rm(root, { recursive: true, force: true });
    },
  };
}

export interface HttpAnswer {
  status: number;
  headers: IncomingHttpHeaders;
  body: string;
}

/** One HTTP request over a Unix socket (or TCP when `port` is given). */
export function httpCall(
  target: { socketPath: string } | { port: number },
  method: string,
  path: string,
  options: { headers?: Record<string, string | number>; body?: string | Buffer } = {},
): Promise<HttpAnswer> {
  return new Promise((resolve, reject) => {
    const where = 'socketPath' in target ? { socketPath: target.socketPath } : { host: '127.0.0.1', port: target.port };
    const req = request({ ...where, method, path, headers: options.headers, agent: false }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks).toString('utf8') }));
      res.on('error', reject);
    });
    req.on('error', reject);
    req.end(options.body);
  });
}

/**
 * Writes raw bytes on a fresh connection and resolves with everything the server sends until
 * it closes (or `waitMs` passes): for requests node's own client refuses to send.
 */
export function rawCall(socketPath: string, chunks: Array<string | Buffer>, options: { gapMs?: number; waitMs?: number } = {}): Promise<string> {
  return new Promise((resolve) => {
    const socket = connect(socketPath);
    let out = '';
    const timer = setTimeout(() => socket.destroy(), options.waitMs ?? 5_000);
    socket.on('data', (d: Buffer) => (out += d.toString('utf8')));
    socket.on('close', () => {
      clearTimeout(timer);
      resolve(out);
    });
    socket.on('error', () => undefined);
    socket.on('connect', async () => {
      for (const chunk of chunks) {
        if (socket.destroyed) return;
        socket.write(chunk);
        if (options.gapMs) await new Promise((r) => setTimeout(r, options.gapMs));
      }
    });
  });
}
