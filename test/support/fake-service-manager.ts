/**
 * Recording stand-ins for `systemctl` and `launchctl`, for tests of `qwen-token service`: no
 * service manager runs in CI. Put `binDir` first on PATH; every call is appended to a log, and
 * a little state (loaded / active) makes `print` and `status` answer like the real tools.
 */
import { chmod, mkdir, readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';

const SCRIPT = `#!/bin/sh
# Stand-in for systemctl / launchctl (tests only): records its arguments, keeps a little state.
name=$(basename "$0")
{ printf '%s' "$name"; for a in "$@"; do printf '\\t%s' "$a"; done; printf '\\n'; } >> "$FAKE_SM_LOG"
verb=$1
[ "$name" = systemctl ] && verb=$2
if [ -e "$FAKE_SM_STATE/fail-$name-$verb" ]; then
  echo "$name: simulated failure of $verb" >&2
  exit 1
fi
case "$name:$verb" in
  launchctl:print)
    if [ -e "$FAKE_SM_STATE/loaded" ]; then echo "$3 = {"; echo "	state = running"; echo "}"; exit 0; fi
    echo "Could not find service \\"$3\\" in domain" >&2; exit 113 ;;
  launchctl:bootstrap) touch "$FAKE_SM_STATE/loaded" ;;
  launchctl:bootout) rm -f "$FAKE_SM_STATE/loaded" ;;
  systemctl:enable) [ "$3" = --now ] && touch "$FAKE_SM_STATE/active" ;;
  systemctl:restart) touch "$FAKE_SM_STATE/active" ;;
  systemctl:disable) rm -f "$FAKE_SM_STATE/active" ;;
  systemctl:status)
    if [ -e "$FAKE_SM_STATE/active" ]; then echo "     Active: active (running)"; exit 0; fi
    echo "     Active: inactive (dead)"; exit 3 ;;
esac
exit 0
`;

export interface FakeServiceManager {
  /** Directory holding `systemctl` and `launchctl`; goes first on PATH. */
  readonly binDir: string;
  /** Environment for the process under test (PATH plus where the stand-ins record). */
  readonly env: Record<string, string>;
  /** Every call so far, oldest first, as [command, ...args]. */
  calls(): Promise<string[][]>;
  /** Forgets recorded calls (state is kept). */
  clearCalls(): Promise<void>;
  /** Makes `command verb` fail with exit 1 from now on. */
  failOn(command: 'systemctl' | 'launchctl', verb: string): Promise<void>;
  /** Sets whether launchctl reports the agent as loaded. */
  setLoaded(loaded: boolean): Promise<void>;
}

/** Creates the stand-ins under `root`. */
export async function createFakeServiceManager(root: string): Promise<FakeServiceManager> {
  const binDir = join(root, 'fake-bin');
  const state = join(root, 'fake-state');
  const log = join(root, 'fake-calls.log');
  await mkdir(binDir, { recursive: true });
  await mkdir(state, { recursive: true });
  await writeFile(log, '');
  for (const name of ['systemctl', 'launchctl']) {
    await writeFile(join(binDir, name), SCRIPT);
    await chmod(join(binDir, name), 0o755);
  }
  return {
    binDir,
    env: { PATH: `${binDir}:${process.env.PATH ?? '/usr/bin:/bin'}`, FAKE_SM_LOG: log, FAKE_SM_STATE: state },
    async calls() {
      const text = await readFile(log, 'utf8');
      return text
        .split('\n')
        .filter((l) => l.length > 0)
        .map((l) => l.split('\t'));
    },
    async clearCalls() {
      await writeFile(log, '');
    },
    async failOn(command, verb) {
      await writeFile(join(state, `fail-${command}-${verb}`), '');
    },
    async setLoaded(loaded) {
      if (loaded) await writeFile(join(state, 'loaded'), '');
      else await rm(join(state, 'loaded'), { force: true });
    },
  };
}
