/**
 * The daemon keeps following `~/.qwen` when someone deletes the directory and makes it again
 * (a reinstall of the Qwen CLI, a restore from a backup): a login written into the new one is
 * adopted at once, not only at the next refresh. (Its own state directory is followed the same
 * way, see credential-watch.test.ts; deleting it also deletes the instance lock, which stops
 * the daemon, so there is no daemon test of that.)
 */
import { mkdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterEach, describe, expect, it } from 'vitest';
import { fingerprint } from '../shared/fingerprint.js';
import { createFixture, credsFrom, type DaemonFixture } from './support/daemon.js';
import { until } from './support/wait.js';

let fx: DaemonFixture | undefined;
afterEach(async () => {
  await fx?.cleanup();
  fx = undefined;
});

/**
 * A fixture whose watched directories all exist, as on a machine in use: a missing one (the
 * config directory, by default) has the home directory watched for it, and that watch sees
 * any other directory come back as well, hiding what is tested here.
 */
async function fixtureInUse(): Promise<DaemonFixture> {
  const made = await createFixture();
  await mkdir(join(made.home, '.config', 'qwen-tokend'), { recursive: true, mode: 0o700 });
  await mkdir(made.qwenHome, { mode: 0o700 });
  return made;
}

describe('the watch on a directory that is deleted and made again', () => {
  it('adopts a Qwen CLI login written into a new ~/.qwen, each time it is made again', async () => {
    fx = await fixtureInUse();
    const first = credsFrom(fx.server);
    await fx.writeCli(first);
    await fx.start();
    const client = fx.client();
    expect((await client.status()).token_fingerprint).toBe(fingerprint(first.access_token));

    for (let i = 1; i <= 3; i++) {
      await rm(fx.qwenHome, { recursive: true });
      // `rm -rf ~/.qwen`, then `mkdir ~/.qwen` typed a moment later (nothing depends on how
      // long), then a login; the last time all at once.
      if (i < 3) await sleep(200);
      await mkdir(fx.qwenHome, { mode: 0o700 });
      const next = credsFrom(fx.server, 21600 + i * 60);
      await fx.writeCli(next);
      await until(
        async () => (await client.status()).token_fingerprint === fingerprint(next.access_token),
        `the login written into the new ~/.qwen (round ${i}) to be adopted`,
        8_000,
      );
    }
    expect(fx.logs().some((l) => l.msg === `${fx!.qwenHome} is gone; watching ${fx!.home} until it is back`)).toBe(true);
  });
});
