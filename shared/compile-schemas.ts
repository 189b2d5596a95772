import type { z } from 'zod';

/**
 * Builds the checking code of each schema now rather than on its first real message. zod
 * builds an object schema's checks the first time it checks an object: 1-3 ms each on a small
 * machine, which would land on the first token answer or refresh response. Checking an empty
 * object (it fails; the result is thrown away) is enough. Call it when the process is idle.
 *
 * In shared/ because both processes check protocol schemas on their first message: the
 * daemon its requests and the refresh response, the client the token it is handed.
 */
export function compileSchemas(schemas: Iterable<z.ZodType>): void {
  for (const schema of schemas) schema.safeParse({});
}
