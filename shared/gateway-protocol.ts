import { z } from 'zod';

/**
 * The daemon methods behind `qwen-token gateway ...`, and the `gateway` part of the status
 * result. Separate from protocol.ts so the gateway can change without touching the token API.
 */
export const GatewayMethods = {
  enable: 'gateway.enable',
  disable: 'gateway.disable',
  status: 'gateway.status',
  env: 'gateway.env',
} as const;

export const GatewayEnableParams = z.object({ port: z.number().int().min(0).max(65535).optional() }).strict();
export const GatewayEmptyParams = z.object({}).strict();

/** The gateway as `status` and `gateway status` show it. Never holds the gateway key. */
export const GatewayStatus = z.object({
  /** The always-on Unix socket. */
  socket_path: z.string(),
  tcp: z.object({
    /** Whether the config asks for the loopback listener. */
    enabled: z.boolean(),
    /** `127.0.0.1:PORT` while listening, else null. */
    address: z.string().nullable(),
    /** The port in the config (0 = any free port). */
    configured_port: z.number().nullable(),
    /** Why the listener is not up although enabled, when it is not. */
    error: z.string().nullable(),
  }),
  default_profile: z.string(),
  profiles: z.array(z.string()),
  requests_served: z.number(),
  active_requests: z.number(),
  active_streams: z.number(),
  /** Counts of errors by kind: the gateway's own codes plus `upstream_4xx`, `upstream_5xx`, `client_aborted`. */
  errors: z.record(z.string(), z.number()),
  config_path: z.string(),
});
export type GatewayStatus = z.infer<typeof GatewayStatus>;

/** What `gateway env` prints: a base URL and the key for OpenAI-style clients. */
export const GatewayEnvResult = z.object({ base_url: z.string(), api_key: z.string() });
export type GatewayEnvResult = z.infer<typeof GatewayEnvResult>;
