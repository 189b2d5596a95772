import { execFileSync } from 'node:child_process';
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { REPO_ROOT } from './daemon.js';

/**
 * Builds the project before any test file runs, as `npm run build` does: tsc (incremental),
 * then the bundles of the daemon and the CLI that the integration tests run.
 */
export default function setup(): void {
  const require = createRequire(import.meta.url);
  const tsc = require.resolve('typescript/bin/tsc');
  execFileSync(process.execPath, [tsc, '-p', 'tsconfig.json'], { cwd: REPO_ROOT, stdio: 'inherit' });
  execFileSync(process.execPath, [join('scripts', 'bundle.mjs')], { cwd: REPO_ROOT, stdio: 'inherit' });
}
