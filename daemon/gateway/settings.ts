/**
 * The gateway's part of the shared config file: the top-level `gateway` key, and nothing
 * else. Every change is a read-modify-write that keeps every other key as it was (another
 * part of the daemon owns `profiles`), written atomically (temp file, fsync, rename) 0600 in
 * a 0700 directory. A file that cannot be parsed is never overwritten.
 */
import { randomBytes } from 'node:crypto';
import { chmod, mkdir, open, readFile, rename, unlink } from 'node:fs/promises';
import { dirname, join, basename } from 'node:path';
import { z } from 'zod';
import { QwenConfigError } from '../../shared/errors.js';

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

const ConfigFileSchema = z.record(z.string(), z.unknown());

/** Reads the whole file as a JSON object; `{}` when it does not exist. */
async function readConfigObject(path: string): Promise<Record<string, unknown>> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return {};
    throw new QwenConfigError(`cannot read the config file ${path}: ${(err as Error).message}`);
  }
  if (text.trim() === '') return {};
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch (err) {
    throw new QwenConfigError(`the config file ${path} is not valid JSON (${(err as Error).message}); fix or remove it`);
  }
  const obj = ConfigFileSchema.safeParse(parsed);
  if (!obj.success || Array.isArray(parsed)) throw new QwenConfigError(`the config file ${path} must hold a JSON object`);
  return obj.data;
}

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

/** Writes `text` to `path` atomically, 0600, its directory 0700. */
export async function writeFileAtomic(path: string, text: string): Promise<void> {
  const dir = dirname(path);
  await mkdir(dir, { recursive: true, mode: 0o700 });
  const tmp = join(dir, `.${basename(path)}.${randomBytes(6).toString('hex')}.tmp`);
  const handle = await open(tmp, 'wx', 0o600);
  try {
    await handle.writeFile(text, 'utf8');
    await handle.sync();
  } finally {
    await handle.close();
  }
  try {
    await chmod(tmp, 0o600);
    await rename(tmp, path);
  } catch (err) {
    await unlink(tmp).catch(() => undefined);
    throw err;
  }
  const dirHandle = await open(dir, 'r').catch(() => null);
  if (dirHandle) {
    await dirHandle.sync().catch(() => undefined);
    await dirHandle.close();
  }
}

let queue: Promise<unknown> = Promise.resolve();

/**
 * Replaces the `gateway` key with `change(current)`, keeping every other key. Changes made in
 * this process are serialized, so two quick `enable`/`disable` calls cannot lose one another.
 */
export function updateGatewaySettings(path: string, change: (current: GatewaySettings) => GatewaySettings): Promise<GatewaySettings> {
  const run = queue.then(async () => {
    const whole = await readConfigObject(path);
    const current = whole.gateway === undefined ? {} : GatewaySettingsSchema.parse(whole.gateway);
    const next = GatewaySettingsSchema.parse(change(current));
    await writeFileAtomic(path, `${JSON.stringify({ ...whole, gateway: next }, null, 2)}\n`);
    return next;
  });
  queue = run.catch(() => undefined);
  return run;
}
