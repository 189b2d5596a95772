/**
 * `qwen-token token`: the access token alone on stdout, for `$(qwen-token token)`.
 */
import { Command, InvalidArgumentError } from 'commander';
import { commandEnv, out, profileArg, profileOption, withClient, type GlobalOptions } from './context.js';
import { parseDuration } from './duration.js';

/** The protocol's upper bound for `minValidityMs`. */
const MAX_MIN_VALIDITY_MS = 24 * 3600_000;

/** Commander parser for `--min-validity`: a duration of at most 24 h. */
export function parseMinValidity(value: string): number {
  const ms = parseDuration(value);
  if (ms === undefined) throw new InvalidArgumentError('expected a duration such as 90s, 5m or 1h30m.');
  if (ms > MAX_MIN_VALIDITY_MS) throw new InvalidArgumentError('at most 24h.');
  return ms;
}

/** The `token` command. */
export function tokenCommand(): Command {
  const cmd = new Command('token')
    .description("print the access token (an api-key profile's key) and a newline, nothing else (for $(qwen-token token))")
    .option('--min-validity <duration>', 'the token must stay valid at least this long; refreshes first if not (e.g. 10m)', parseMinValidity);
  return profileOption(cmd, 'whose token').action(async (opts: { minValidity?: number; profile?: string }, cmd: Command) => {
    const env = commandEnv(cmd.optsWithGlobals<GlobalOptions>());
    const token = await withClient(env, (client) =>
      client.getAccessToken({
        noCache: true,
        ...(opts.minValidity === undefined ? {} : { minValidityMs: opts.minValidity }),
        ...profileArg(opts.profile),
      }),
    );
    out(`${token}\n`);
  });
}
