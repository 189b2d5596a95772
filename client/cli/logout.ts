/**
 * `qwen-token logout`: the daemon forgets its credentials and deletes its file (and the Qwen
 * CLI's file when asked).
 */
import { Command } from 'commander';
import { commandEnv, out, outJson, profileArg, profileOption, withClient, type GlobalOptions } from './context.js';

/** The `logout` command. */
export function logoutCommand(): Command {
  const cmd = new Command('logout')
    .description("delete the daemon's credential file of a profile (the Qwen CLI's too with --qwen-cli)")
    .option('--qwen-cli', "also delete the Qwen CLI's credential file")
    .option('--json', 'print the removed files as JSON');
  return profileOption(cmd, 'whose credentials')
    .action(async (opts: { json?: boolean; qwenCli?: boolean; profile?: string }, cmd: Command) => {
      const env = commandEnv(cmd.optsWithGlobals<GlobalOptions>());
      const removed = await withClient(env, (client) => client.logout({ qwenCli: opts.qwenCli === true, ...profileArg(opts.profile) }));
      if (opts.json) {
        outJson({ removed });
        return;
      }
      if (removed.length === 0) out('Logged out; there was no credential file to remove.\n');
      else out(`Logged out. Removed:\n${removed.map((p) => `  ${p}\n`).join('')}`);
    });
}
