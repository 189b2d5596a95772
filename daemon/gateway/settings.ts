/**
 * The gateway's part of the shared config file: the top-level `gateway` key, and nothing
 * else. Every change is a read-modify-write that keeps every other key as it was (another
 * part of the daemon owns `profiles`), written atomically (temp file, fsync, rename) 0600 in
 * a 0700 directory. A file that cannot be parsed is never overwritten.
 */
import { z } from 'zod';
import { QwenConfigError } from '../../shared/errors.js';
import { readConfigObject, updateConfigFile, writeFileAtomic } from '../config-file.js';

// Kept here for the gateway's own files (its key file).
export { writeFileAtomic };

/** The loopback port `gateway enable` uses when none is given. */
export const DEFAULT_GATEWAY_PORT = 8417;

export const GatewaySettingsSchema = z
  .object({
    tcp: z
      .object({
        enabled: z.boolean(),
        port: z.number().int().min(0).max(65535),
      })
      .strict()
      .optional(),
  })
  .passthrough();
export type GatewaySettings = z.infer<typeof GatewaySettingsSchema>;

/** The gateway settings stored in `path` (empty when the file or its `gateway` key is absent). */
export async function readGatewaySettings(path: string): Promise<GatewaySettings> {
  const whole = await readConfigObject(path);
  if (whole.gateway === undefined) return {};
  const parsed = GatewaySettingsSchema.safeParse(whole.gateway);
  if (!parsed.success) {
    throw new QwenConfigError(`the "gateway" part of ${path} is invalid: ${parsed.error.issues.map((i) => `${i.path.join('.') || '(root)'} ${i.message}`).join('; ')}`);
  }
  return parsed.data;
}

/**
 * Replaces the `gateway` key with `change(current)`, keeping every other key. Changes to the file
 * made in this process are serialized (config-file.ts), so two quick `enable`/`disable` calls, or
 * a profile added meanwhile, cannot lose one another.
 */
export async function updateGatewaySettings(path: string, change: (current: GatewaySettings) => GatewaySettings): Promise<GatewaySettings> {
  let next: GatewaySettings = {};
  await updateConfigFile(path, (whole) => {
    const current = whole.gateway === undefined ? {} : GatewaySettingsSchema.parse(whole.gateway);
    next = GatewaySettingsSchema.parse(change(current));
    return { ...whole, gateway: next };
  });
  return next;
}
