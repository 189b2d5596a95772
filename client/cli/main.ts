#!/usr/bin/env node
/**
 * `qwen-token`: the command-line client of qwen-tokend. See `qwen-token --help`.
 *
 * `qwen-token token` runs in scripts and prompts, so its start-up is a target of its own
 * (see bench/README.md#b7): a well-formed `token` command line is run here without loading
 * the command tree (commander and every other command). Anything else, a malformed `token`
 * included, goes to the full program, which also words every usage error.
 */
import { commandEnv, flushOutput, out, reportError, withClient } from './context.js';
import { parseDuration } from './duration.js';
import { ExitCodes, exitCodeFor } from './exit-codes.js';

// A reader that went away (`qwen-token watch | head -3`) ends the command, quietly.
process.stdout.on('error', (err: NodeJS.ErrnoException) => {
  process.exit(err.code === 'EPIPE' ? ExitCodes.ok : ExitCodes.error);
});
// Last line of defence: a bug still ends with one line, never a stack trace.
process.on('uncaughtException', (err) => {
  reportError(err);
  process.exit(ExitCodes.error);
});

/** `token`'s own options, as the full program reads them. */
interface TokenArgs {
  socket?: string;
  minValidityMs?: number;
}

/** The longest `--min-validity` the full program accepts (its error message says so). */
const MAX_MIN_VALIDITY_MS = 24 * 3600_000;

/**
 * `argv` when it is exactly `token` with at most one `--socket` (before or after it) and one
 * `--min-validity` (after it), each with a value the full program would accept; otherwise
 * undefined (the full program decides).
 */
function plainTokenArgs(argv: readonly string[]): TokenArgs | undefined {
  const args: TokenArgs = {};
  let command = false;
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    if (arg === 'token' && !command) {
      command = true;
      continue;
    }
    const eq = arg.indexOf('=');
    const name = eq === -1 ? arg : arg.slice(0, eq);
    if (name !== '--socket' && !(name === '--min-validity' && command)) return undefined;
    const value = eq === -1 ? argv[++i] : arg.slice(eq + 1);
    if (value === undefined || value === '' || value.startsWith('-')) return undefined;
    if (name === '--socket') {
      if (args.socket !== undefined) return undefined;
      args.socket = value;
    } else {
      if (args.minValidityMs !== undefined) return undefined;
      const ms = parseDuration(value);
      if (ms === undefined || ms > MAX_MIN_VALIDITY_MS) return undefined;
      args.minValidityMs = ms;
    }
  }
  return command ? args : undefined;
}

/** `qwen-token token` as the full program runs it: the token and a newline on stdout. */
async function runToken(args: TokenArgs): Promise<number> {
  try {
    const env = commandEnv(args.socket === undefined ? {} : { socket: args.socket });
    const token = await withClient(env, (client) =>
      client.getAccessToken(args.minValidityMs === undefined ? { noCache: true } : { minValidityMs: args.minValidityMs, noCache: true }),
    );
    out(`${token}\n`);
    return ExitCodes.ok;
  } catch (err) {
    reportError(err);
    return exitCodeFor(err);
  }
}

const argv = process.argv.slice(2);
const tokenArgs = plainTokenArgs(argv);
const code = tokenArgs ? await runToken(tokenArgs) : await (await import('./program.js')).run(argv);
await flushOutput();
// Exit now: nothing the command started may keep the process (or a pipeline) waiting.
process.exit(code);
