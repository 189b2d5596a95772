import { execFileSync } from 'node:child_process';
import { readdirSync, statSync } from 'node:fs';
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { REPO_ROOT } from './daemon.js';

/** What the build reads: a change to any of these makes dist/ out of date. */
const SOURCE_DIRS = ['shared', 'daemon', 'client'];
const SOURCE_FILES = ['tsconfig.json', 'rolldown.config.mjs', join('scripts', 'bundle.mjs'), 'package.json', 'package-lock.json'];
/**
 * The bundles the tests run. Every build writes them anew, last (tsc's incremental build may
 * leave an unchanged .js file with its old mtime, so those cannot tell).
 */
const OUTPUTS = [join('dist', 'bin', 'qwen-tokend.js'), join('dist', 'bin', 'qwen-token.js')];

function mtimeOrNull(path: string): number | null {
  try {
    return statSync(path).mtimeMs;
  } catch {
    return null;
  }
}

function newestSource(dir: string): number {
  let newest = 0;
  for (const entry of readdirSync(dir, { withFileTypes: true })) {
    const path = join(dir, entry.name);
    if (entry.isDirectory()) newest = Math.max(newest, newestSource(path));
    else if (entry.name.endsWith('.ts')) newest = Math.max(newest, statSync(path).mtimeMs);
  }
  return newest;
}

/** True when every output exists and is newer than every input (as right after `npm install`'s build). */
export function distUpToDate(root: string = REPO_ROOT): boolean {
  const outputs = OUTPUTS.map((f) => mtimeOrNull(join(root, f)));
  if (outputs.some((m) => m === null)) return false;
  const oldestOutput = Math.min(...(outputs as number[]));
  const newestInput = Math.max(
    ...SOURCE_DIRS.map((d) => newestSource(join(root, d))),
    ...SOURCE_FILES.map((f) => mtimeOrNull(join(root, f)) ?? 0),
  );
  return newestInput < oldestOutput;
}

/**
 * Builds the project before any test file runs, as `npm run build` does: tsc (incremental),
 * then the bundles of the daemon and the CLI that the integration tests run. Skipped when
 * dist/ is newer than every source, so `npm install && npm test` builds once, not twice.
 */
export default function setup(): void {
  if (distUpToDate()) return;
  const require = createRequire(import.meta.url);
  const tsc = require.resolve('typescript/bin/tsc');
  execFileSync(process.execPath, [tsc, '-p', 'tsconfig.json'], { cwd: REPO_ROOT, stdio: 'inherit' });
  execFileSync(process.execPath, [join('scripts', 'bundle.mjs')], { cwd: REPO_ROOT, stdio: 'inherit' });
}
