/**
 * The bundled programs take Node's built-ins from process.getBuiltinModule() (rolldown.config.mjs):
 * an ES-module import of node:http makes Node 22 and later load undici at start-up (Node 20 has
 * no such export, so there the runtime check cannot fail). What an idle daemon has loaded is read
 * from its own `process.moduleLoadList`, written by a preload when it exits.
 */
import { readdirSync, readFileSync } from 'node:fs';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { REPO_ROOT, createFixture, credsFrom, type DaemonFixture } from './support/daemon.js';

let fx: DaemonFixture | undefined;
afterAll(async () => {
  await fx?.cleanup();
});

describe('built-ins in the bundles', () => {
  it('no bundle imports a built-in as an ES module (rolldown runtime aside)', () => {
    const dir = join(REPO_ROOT, 'dist', 'bin');
    for (const file of readdirSync(dir).filter((f) => f.endsWith('.js'))) {
      const imports = readFileSync(join(dir, file), 'utf8').match(/^import .* from "node:[^"]+";$/gm) ?? [];
      expect({ file, imports: imports.filter((l) => !l.endsWith('from "node:module";')) }).toEqual({ file, imports: [] });
    }
  });

  it('an idle daemon that serves HTTP has not loaded undici', async () => {
    fx = await createFixture();
    const loaded = join(fx.root, 'loaded.json');
    const preload = join(fx.root, 'record-builtins.cjs');
    await writeFile(
      preload,
      `process.on('exit', () => require('node:fs').writeFileSync(${JSON.stringify(loaded)}, JSON.stringify(process.moduleLoadList)));\n`,
    );
    await fx.writeOwn(credsFrom(fx.server));
    await fx.start({ NODE_OPTIONS: `--require ${preload}` });
    // The gateway listens: node:http is loaded, its WebSocket (undici) must not be.
    await fx.waitForLog((l) => l.msg === 'gateway listening');
    expect(await fx.stop()).toBe(0);
    const list = JSON.parse(await readFile(loaded, 'utf8')) as string[];
    expect(list).toContain('NativeModule http');
    expect(list).not.toContain('NativeModule internal/deps/undici/undici');
  });
});
