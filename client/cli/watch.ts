/**
 * `qwen-token watch`: prints the daemon's pushed events as they arrive, until Ctrl-C.
 * A refreshed token is shown by expiry and fingerprint only.
 */
import { Command } from 'commander';
import { fingerprint } from '../../shared/fingerprint.js';
import { QwenDaemonUnavailableError } from '../../shared/errors.js';
import type { TokenClient } from '../token-client.js';
import { commandConfig, commandEnv, daemonNotRunning, note, openClient, out, outJson, profileArg, profileOption, startAdvice, type GlobalOptions } from './context.js';
import { describeExpiry, formatRelative } from './duration.js';
import { CommandExit, ExitCodes } from './exit-codes.js';
import { delay, keepAlive } from './keep-alive.js';

/** How long `watch` keeps trying to reach a daemon that went away before giving up. */
const RECONNECT_FOR_MS = 30_000;

/** One event as printed: `event` and `at` first, never a token. */
export type WatchEvent = { event: string; at: number } & Record<string, unknown>;

function clockTime(at: number): string {
  return new Date(at).toTimeString().slice(0, 8);
}

/** The human line for an event, naming its profile when the daemon did. */
export function formatWatchEvent(e: WatchEvent): string {
  const line = eventText(e);
  if (typeof e.profile !== 'string' || e.event === 'watch.started') return line;
  // After the time: `12:00:00 [coding-plan] token refreshed: ...`.
  return `${line.slice(0, 8)} [${e.profile}]${line.slice(8)}`;
}

function eventText(e: WatchEvent): string {
  const at = e.at;
  switch (e.event) {
    case 'watch.started':
      return `${clockTime(at)} watching qwen-tokend (pid ${e.pid})${typeof e.profile === 'string' ? `, profile ${e.profile}` : ''}: state ${e.state}${
        typeof e.expiry_date === 'number' ? `, token ${describeExpiry(e.expiry_date, at)}` : ''
      }, fingerprint ${e.token_fingerprint}; Ctrl-C stops`;
    case 'token.refreshed':
      return `${clockTime(at)} token refreshed: ${
        typeof e.expiry_date === 'number' ? describeExpiry(e.expiry_date, at) : 'no expiry'
      }, fingerprint ${e.token_fingerprint}`;
    case 'token.refresh_failed':
      return `${clockTime(at)} refresh failed: ${e.message} [${e.code}]; state ${e.state}${
        typeof e.next_retry_at === 'number' ? `, next retry ${formatRelative(e.next_retry_at, at)}` : ''
      }`;
    case 'state.changed':
      return `${clockTime(at)} state ${e.previous} -> ${e.state}`;
    case 'login.completed':
      return `${clockTime(at)} login completed: token ${describeExpiry(e.expiry_date as number, at)}`;
    case 'login.failed':
      return `${clockTime(at)} login failed: ${e.message} [${e.code}]`;
    case 'profiles.changed':
      return `${clockTime(at)} profiles changed: ${(e.profiles as string[]).join(', ')} (default ${e.default_profile})`;
    case 'disconnected':
      return `${clockTime(at)} lost the connection to qwen-tokend; reconnecting...`;
    default:
      return `${clockTime(at)} ${e.event}`;
  }
}

/**
 * Subscribes through `client` and prints events until Ctrl-C (then throws `CommandExit`). With a
 * profile, only that profile's events (and profile-set changes); without, every profile's.
 */
export async function runWatch(client: TokenClient, json: boolean, profile?: string): Promise<void> {
  const write = (e: WatchEvent) => (json ? outJson(e) : out(`${formatWatchEvent(e)}\n`));
  /** The profile the watch is about, by the name the daemon gives it (known after the first status). */
  let watched = profile;
  const print = (e: WatchEvent) => {
    if (watched !== undefined && typeof e.profile === 'string' && e.profile !== watched) return;
    write(e);
  };
  const release = keepAlive();
  let stop!: (how: 'signal' | Error) => void;
  const stopped = new Promise<'signal' | Error>((done) => {
    stop = done;
  });
  let stopRequested = false;
  const onSignal = () => {
    stopRequested = true;
    stop('signal');
  };
  let reconnecting = false;
  const announce = async () => {
    await client.subscribe();
    const s = await client.status(profileArg(profile));
    if (profile !== undefined || client.profile !== undefined) watched = s.profile ?? watched;
    print({
      event: 'watch.started',
      at: Date.now(),
      pid: s.pid,
      ...(s.profile === undefined ? {} : { profile: s.profile }),
      state: s.state,
      expiry_date: s.expiry_date,
      token_fingerprint: s.token_fingerprint,
    });
  };
  const reconnect = async () => {
    if (reconnecting) return;
    reconnecting = true;
    // A service manager may take a few seconds to restart the daemon: keep trying that long.
    const deadline = Date.now() + RECONNECT_FOR_MS;
    try {
      for (let attempt = 0; ; attempt++) {
        try {
          await announce();
          return;
        } catch (err) {
          if (stopRequested || Date.now() >= deadline || !(err instanceof QwenDaemonUnavailableError)) throw err;
          await delay(Math.min(250 * 2 ** attempt, 2_000));
        }
      }
    } catch (err) {
      stop(err instanceof Error ? err : new QwenDaemonUnavailableError(String(err)));
    } finally {
      reconnecting = false;
    }
  };

  client.on('token.refreshed', (t) =>
    print({
      event: 'token.refreshed',
      at: Date.now(),
      ...(t.profile === undefined ? {} : { profile: t.profile }),
      expiry_date: t.expiry_date,
      token_fingerprint: fingerprint(t.access_token),
      base_url: t.base_url,
    }),
  );
  client.on('token.refresh_failed', (p) => print({ event: 'token.refresh_failed', at: Date.now(), ...p }));
  client.on('state.changed', (p) => print({ event: 'state.changed', at: Date.now(), ...p }));
  client.on('login.completed', (p) => print({ event: 'login.completed', at: Date.now(), ...p }));
  client.on('login.failed', (p) => print({ event: 'login.failed', at: Date.now(), ...p }));
  client.on('profiles.changed', (p) => print({ event: 'profiles.changed', at: Date.now(), ...p }));
  client.on('disconnected', () => {
    print({ event: 'disconnected', at: Date.now() });
    void reconnect();
  });

  process.on('SIGINT', onSignal);
  try {
    // Ctrl-C must work even while the first answer is still awaited.
    const how = await Promise.race([announce().then(() => stopped), stopped]);
    if (how !== 'signal') throw how;
    throw new CommandExit(ExitCodes.cancelled);
  } finally {
    process.off('SIGINT', onSignal);
    client.removeAllListeners();
    release();
  }
}

/** The `watch` command. */
export function watchCommand(): Command {
  const cmd = new Command('watch')
    .description('print token events live (refreshes, failures, state changes, logins) of every profile, or one, until Ctrl-C')
    .option('--json', 'print one JSON object per event');
  return profileOption(cmd, 'only the events of this profile')
    .action(async (opts: { json?: boolean; profile?: string }, cmd: Command) => {
      const env = commandEnv(cmd.optsWithGlobals<GlobalOptions>());
      // Watching is looking: it never starts a daemon (a token request does).
      const client = await openClient(env, { autostart: false });
      try {
        await runWatch(client, opts.json === true, opts.profile);
      } catch (err) {
        if (!daemonNotRunning(err)) throw err;
        const config = commandConfig(env);
        note(`qwen-token: qwen-tokend is not running (nothing listens on ${config.socketPath}); ${startAdvice(config)}`);
        throw new CommandExit(ExitCodes.daemonUnavailable);
      } finally {
        await client.close();
      }
    });
}
