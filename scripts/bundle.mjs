#!/usr/bin/env node
// Runs the bundles of rolldown.config.mjs (after tsc) and prints one line instead of rolldown's file list.
import { rmSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { build } from 'rolldown';
import configs from '../rolldown.config.mjs';

const t0 = performance.now();
// Start from an empty output directory, so no chunk of an earlier build is left to ship.
for (const dir of new Set(configs.map((c) => c.output.dir))) rmSync(dir, { recursive: true, force: true });
const written = [];
for (const config of configs) {
  const { output } = await build({ ...config, logLevel: 'warn' });
  for (const file of output) if (file.type === 'chunk' && file.isEntry) written.push(join(config.output.dir, file.fileName));
}
const sizes = written.map((f) => `${f} (${Math.round(statSync(f).size / 1024)} KiB)`);
process.stdout.write(`bundled ${sizes.join(', ')} in ${Math.round(performance.now() - t0)} ms\n`);
