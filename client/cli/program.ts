/**
 * The qwen-token command tree (commander) and `run()`, which turns every outcome into an
 * exit code: usage errors 2, typed client errors their own codes, never a stack trace.
 */
import { Command, CommanderError } from 'commander';
import { packageVersion } from '../../shared/package.js';
import { reportError } from './context.js';
import { doctorCommand } from './doctor.js';
import { gatewayCommand } from './gateway.js';
import { CommandExit, EXIT_CODES_HELP, ExitCodes, exitCodeFor } from './exit-codes.js';
import { loginCommand } from './login.js';
import { logoutCommand } from './logout.js';
import { profileCommand } from './profile.js';
import { refreshCommand } from './refresh.js';
import { serviceCommand } from './service.js';
import { statusCommand } from './status.js';
import { tokenCommand } from './token.js';
import { watchCommand } from './watch.js';

const SHORT_EXIT_CODES =
  'Exit codes: 0 ok, 1 error, 2 usage, 3 needs login, 4 daemon unreachable, 5 token expired, 6 no such profile, 7 key refused, 130 Ctrl-C.';

/**
 * Gives a command built elsewhere (`new Command(...)`) the root's error handling and output
 * settings, recursively, and adds it to `parent`.
 */
export function addSubcommand(parent: Command, cmd: Command): Command {
  const adopt = (from: Command, c: Command): void => {
    c.copyInheritedSettings(from);
    c.addHelpText('after', `\n${SHORT_EXIT_CODES}`);
    for (const sub of c.commands) adopt(c, sub);
  };
  adopt(parent, cmd);
  parent.addCommand(cmd);
  return cmd;
}

/** Option names whose value is a secret: their last word says so (`--client-secret`, `--api-key`). */
const SECRET_OPTION = /^--?(?:[a-z0-9-]*-)?(?:secret|key|apikey|token|password|passwd|passphrase|credentials?)$/i;
const REDACTED = '<redacted>';

/**
 * Error text from argument parsing with no value from the command line in it that may be a
 * secret: the part after `=` of every option token (`--client-secret=…` is an unknown option,
 * echoed whole), and the value given to an option whose name says it holds a secret.
 */
export function redactCommandLine(text: string, argv: readonly string[]): string {
  const tokens: Array<[string, string]> = [];
  const values = new Set<string>();
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    if (arg === '--') break;
    if (!arg.startsWith('-')) continue;
    const eq = arg.indexOf('=');
    if (eq > 0 && eq < arg.length - 1) {
      tokens.push([arg, `${arg.slice(0, eq)}=${REDACTED}`]);
      values.add(arg.slice(eq + 1));
    } else if (eq === -1 && SECRET_OPTION.test(arg) && argv[i + 1] !== undefined) {
      values.add(argv[i + 1]!);
    }
  }
  let redacted = text;
  // Whole tokens first (commander echoes an unknown one as is), longest first.
  for (const [token, shown] of tokens.sort((a, b) => b[0].length - a[0].length)) redacted = redacted.split(token).join(shown);
  // Commander quotes an option's value in its messages (`argument 'VALUE' is invalid`).
  for (const value of [...values].sort((a, b) => b.length - a.length)) redacted = redacted.split(`'${value}'`).join(`'${REDACTED}'`);
  return redacted;
}

/**
 * The root `qwen-token` command with every subcommand. `argv`, the command line it will parse,
 * is what its usage errors must not echo (see `redactCommandLine`).
 */
export function createProgram(argv: readonly string[] = []): Command {
  const program = new Command('qwen-token')
    .description(
      'Check and drive qwen-tokend, the one owner of your credentials: Qwen OAuth, API keys and OAuth device-flow tokens, one profile each. Only `qwen-token token` prints a token or key.',
    )
    .version(packageVersion(), '-v, --version', 'print the version')
    .helpOption('-h, --help', 'show help')
    .option('--socket <path>', "the daemon's socket (overrides QWEN_TOKEND_SOCKET)")
    .exitOverride()
    .configureOutput({
      // One line in our own voice: `qwen-token: unknown command 'x'`, never a secret typed as `--opt=value`.
      outputError: (text, write) => write(`qwen-token: ${redactCommandLine(text.replace(/^error: /, ''), argv)}`),
    })
    .showHelpAfterError('(run `qwen-token --help` for usage)')
    .addHelpText('after', `\n${EXIT_CODES_HELP}\n`);
  for (const cmd of [statusCommand(), tokenCommand(), loginCommand(), refreshCommand(), logoutCommand(), watchCommand(), profileCommand(), doctorCommand(), serviceCommand(), gatewayCommand()]) {
    addSubcommand(program, cmd);
  }
  return program;
}

/** Parses `argv` (without node and script) and runs the command; resolves with the exit code. */
export async function run(argv: string[], program: Command = createProgram(argv)): Promise<number> {
  try {
    await program.parseAsync(argv, { from: 'user' });
    return ExitCodes.ok;
  } catch (err) {
    if (err instanceof CommandExit) return err.exitCode;
    if (err instanceof CommanderError) {
      // Help and version exit 0; `cmd.error()` keeps the code it asked for; the rest is usage.
      if (err.exitCode === 0) return ExitCodes.ok;
      if (err.code === 'commander.error') return err.exitCode;
      return ExitCodes.usage;
    }
    reportError(err);
    return exitCodeFor(err);
  }
}
