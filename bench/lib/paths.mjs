/** Where the bench finds the compiled daemon, CLI and client library. */
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

export const REPO_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');
export const DAEMON_BIN = join(REPO_ROOT, 'dist', 'bin', 'qwen-tokend.js');
export const CLI_BIN = join(REPO_ROOT, 'dist', 'bin', 'qwen-token.js');
export const WORKERS = join(REPO_ROOT, 'bench', 'workers');
