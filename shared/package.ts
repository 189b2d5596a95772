import { readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

interface PackageInfo {
  root: string;
  version: string;
}

let cached: PackageInfo | undefined;

/**
 * This package's root directory and version, found on first use (never at import time) by
 * walking up from this module to the package.json named qwen-tokend. The module runs from the
 * source tree (tests), from dist/shared (the library) or from a bundle in dist/bin.
 */
function packageInfo(): PackageInfo {
  if (cached) return cached;
  let dir = dirname(fileURLToPath(import.meta.url));
  for (let depth = 0; depth < 4; depth++) {
    try {
      const pkg = JSON.parse(readFileSync(join(dir, 'package.json'), 'utf8')) as { name?: string; version?: string };
      if (pkg.name === 'qwen-tokend') return (cached = { root: dir, version: pkg.version ?? '0.0.0' });
    } catch {
      /* not here; look one level up */
    }
    dir = dirname(dir);
  }
  throw new Error('cannot find the qwen-tokend package.json above this module; is the package installed completely?');
}

/** This package's version, from its package.json. */
export function packageVersion(): string {
  try {
    return packageInfo().version;
  } catch {
    return '0.0.0';
  }
}

/** The package's root directory (where package.json, systemd/ and launchd/ are). */
export function packageRoot(): string {
  return packageInfo().root;
}

/** The daemon program of this package: the bundle `npm run build` writes. */
export function packagedDaemonBin(): string {
  return join(packageRoot(), 'dist', 'bin', 'qwen-tokend.js');
}
