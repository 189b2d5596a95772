// Test-only entry: runs the compiled `service` command group as a program of its own, so
// tests see real exit codes and output. Like the qwen-token program, it turns a CommandExit
// into the exit code.
import { serviceCommand } from '../../dist/client/cli/service.js';
import { CommandExit } from '../../dist/client/cli/exit-codes.js';

try {
  await serviceCommand().parseAsync(process.argv);
} catch (err) {
  if (!(err instanceof CommandExit)) throw err;
  process.exitCode = err.exitCode;
}
