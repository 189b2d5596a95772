#!/usr/bin/env node
/**
 * `qwen-token`: the command-line client of qwen-tokend. See `qwen-token --help`.
 */
import { flushOutput, reportError } from './context.js';
import { ExitCodes } from './exit-codes.js';
import { run } from './program.js';

// A reader that went away (`qwen-token watch | head -3`) ends the command, quietly.
process.stdout.on('error', (err: NodeJS.ErrnoException) => {
  process.exit(err.code === 'EPIPE' ? ExitCodes.ok : ExitCodes.error);
});
// Last line of defence: a bug still ends with one line, never a stack trace.
process.on('uncaughtException', (err) => {
  reportError(err);
  process.exit(ExitCodes.error);
});

const code = await run(process.argv.slice(2));
await flushOutput();
// Exit now: nothing the command started may keep the process (or a pipeline) waiting.
process.exit(code);
