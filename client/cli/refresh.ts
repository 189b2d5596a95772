/**
 * `qwen-token refresh`: force a refresh in the daemon and show the new expiry.
 */
import { Command } from 'commander';
import { fingerprint } from '../../shared/fingerprint.js';
import { commandEnv, out, outJson, withClient, type GlobalOptions } from './context.js';
import { describeExpiry } from './duration.js';

/** The `refresh` command. */
export function refreshCommand(): Command {
  return new Command('refresh')
    .description('refresh the token now (shared with a refresh still waiting for the server)')
    .option('--json', 'print the result as JSON')
    .action(async (opts: { json?: boolean }, cmd: Command) => {
      const env = commandEnv(cmd.optsWithGlobals<GlobalOptions>());
      const result = await withClient(env, (client) => client.refresh());
      const summary = {
        expiry_date: result.expiry_date,
        token_fingerprint: fingerprint(result.access_token),
        token_type: result.token_type,
        base_url: result.base_url,
        ...(result.resource_url === undefined ? {} : { resource_url: result.resource_url }),
      };
      if (opts.json) outJson(summary);
      else out(`Refreshed: token ${result.expiry_date === null ? 'without expiry' : describeExpiry(result.expiry_date, Date.now())} (fingerprint ${summary.token_fingerprint}).\n`);
    });
}
