/**
 * `qwen-token refresh`: force a refresh in the daemon and show the new expiry.
 */
import { Command } from 'commander';
import { fingerprint } from '../../shared/fingerprint.js';
import { commandEnv, out, outJson, profileArg, profileOption, withClient, type GlobalOptions } from './context.js';
import { describeExpiry } from './duration.js';

/** The `refresh` command. */
export function refreshCommand(): Command {
  const cmd = new Command('refresh')
    .description('refresh the token now (shared with a refresh still waiting for the server)')
    .option('--json', 'print the result as JSON');
  return profileOption(cmd, 'whose token')
    .action(async (opts: { json?: boolean; profile?: string }, cmd: Command) => {
      const env = commandEnv(cmd.optsWithGlobals<GlobalOptions>());
      const result = await withClient(env, (client) => client.refresh(profileArg(opts.profile)));
      const summary = {
        ...(result.profile === undefined ? {} : { profile: result.profile }),
        expiry_date: result.expiry_date,
        token_fingerprint: fingerprint(result.access_token),
        token_type: result.token_type,
        base_url: result.base_url,
        ...(result.resource_url === undefined ? {} : { resource_url: result.resource_url }),
      };
      if (opts.json) outJson(summary);
      else if (result.kind === 'api-key') out(`Profile ${result.profile ?? 'default'} has a static API key (fingerprint ${summary.token_fingerprint}): nothing to refresh.\n`);
      else out(`Refreshed: token ${result.expiry_date === null ? 'without expiry' : describeExpiry(result.expiry_date, Date.now())} (fingerprint ${summary.token_fingerprint}).\n`);
    });
}
