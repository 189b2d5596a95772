/**
 * The gateway's settings that come from the environment: socket path, config file path and
 * limits. Pure: the caller passes the environment; each bad value names its variable.
 */
import { dirname, join } from 'node:path';
import { configFilePath, expandHome } from '../../shared/config.js';
import { QwenConfigError } from '../../shared/errors.js';

export interface GatewayLimits {
  /** Largest request head (request line + headers), bytes. */
  maxHeaderBytes: number;
  /** Largest request body, bytes; a larger one gets 413. */
  maxBodyBytes: number;
  /** Bodies up to this size are kept for a retry after a refresh and looked at for `model`. */
  replayBytes: number;
  /** Requests in flight at once, across both listeners; more get 503. */
  maxConcurrent: number;
  /** Time a client has to send its request head. */
  headersTimeoutMs: number;
  /** Time a client has to send its whole request (head and body). */
  requestTimeoutMs: number;
  /** Time the upstream has to answer, and to send the next bytes of an answer. */
  upstreamTimeoutMs: number;
}

export interface GatewayEnvConfig {
  /** The gateway's Unix socket: `gateway.sock` beside the token socket unless set. */
  socketPath: string;
  /** The shared config file (`gateway` key is ours). */
  configPath: string;
  limits: GatewayLimits;
}

export const GATEWAY_DEFAULTS: GatewayLimits = {
  maxHeaderBytes: 32 * 1024,
  maxBodyBytes: 32 * 1024 * 1024,
  replayBytes: 8 * 1024 * 1024,
  maxConcurrent: 2048,
  headersTimeoutMs: 10_000,
  requestTimeoutMs: 120_000,
  upstreamTimeoutMs: 300_000,
};

/** The environment variable behind each limit (documented in docs/gateway.md). */
export const LIMIT_VARIABLES: Record<keyof GatewayLimits, string> = {
  maxHeaderBytes: 'QWEN_TOKEND_GATEWAY_MAX_HEADER_BYTES',
  maxBodyBytes: 'QWEN_TOKEND_GATEWAY_MAX_BODY_BYTES',
  replayBytes: 'QWEN_TOKEND_GATEWAY_REPLAY_BYTES',
  maxConcurrent: 'QWEN_TOKEND_GATEWAY_MAX_CONCURRENT',
  headersTimeoutMs: 'QWEN_TOKEND_GATEWAY_HEADERS_TIMEOUT_MS',
  requestTimeoutMs: 'QWEN_TOKEND_GATEWAY_REQUEST_TIMEOUT_MS',
  upstreamTimeoutMs: 'QWEN_TOKEND_GATEWAY_UPSTREAM_TIMEOUT_MS',
};

const MINIMUMS: Record<keyof GatewayLimits, number> = {
  maxHeaderBytes: 1024,
  maxBodyBytes: 1024,
  replayBytes: 0,
  maxConcurrent: 1,
  headersTimeoutMs: 100,
  requestTimeoutMs: 100,
  upstreamTimeoutMs: 100,
};

function readPositive(env: NodeJS.ProcessEnv, name: string, fallback: number, min: number): number {
  const raw = env[name]?.trim();
  if (raw === undefined || raw === '') return fallback;
  if (!/^\d+$/.test(raw)) throw new QwenConfigError(`${name} must be a whole number, got "${raw}"`);
  const value = Number(raw);
  if (!Number.isSafeInteger(value) || value < min) throw new QwenConfigError(`${name} must be at least ${min}, got "${raw}"`);
  return value;
}

/** Resolves the gateway's environment settings; throws `QwenConfigError` naming the bad variable. */
export function resolveGatewayEnv(env: NodeJS.ProcessEnv, tokenSocketPath: string, home: string): GatewayEnvConfig {
  const limits = { ...GATEWAY_DEFAULTS };
  for (const key of Object.keys(LIMIT_VARIABLES) as Array<keyof GatewayLimits>) {
    limits[key] = readPositive(env, LIMIT_VARIABLES[key], GATEWAY_DEFAULTS[key], MINIMUMS[key]);
  }
  if (limits.replayBytes > limits.maxBodyBytes) limits.replayBytes = limits.maxBodyBytes;
  const socketRaw = env.QWEN_TOKEND_GATEWAY_SOCKET?.trim();
  return {
    socketPath: socketRaw ? expandHome(socketRaw, home) : join(dirname(tokenSocketPath), 'gateway.sock'),
    configPath: configFilePath(env, home),
    limits,
  };
}
