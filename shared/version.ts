import { readFileSync } from 'node:fs';

let cached: string | undefined;

/** This package's version, read from package.json on first use (not at import time). */
export function packageVersion(): string {
  if (cached) return cached;
  // shared/version.ts runs from the source tree (tests) or from dist/shared/version.js.
  for (const rel of ['../package.json', '../../package.json']) {
    try {
      const pkg = JSON.parse(readFileSync(new URL(rel, import.meta.url), 'utf8')) as { name?: string; version?: string };
      if (pkg.name === 'qwen-tokend' && pkg.version) return (cached = pkg.version);
    } catch {
      /* try the next candidate */
    }
  }
  return (cached = '0.0.0');
}
