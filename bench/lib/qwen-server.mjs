/**
 * Loads the local Qwen server (test/support/qwen-server.ts) into the bench process.
 * Node 20 cannot run TypeScript and the file is outside the build, but its runtime imports are
 * `node:` built-ins only, so a type-stripping transpile of that one file is all it needs.
 */
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { REPO_ROOT } from './paths.mjs';

/** Imports the server module; returns `{ startQwenServer, ... }` and a cleanup for the temp copy. */
export async function loadQwenServerModule() {
  const { default: ts } = await import('typescript');
  const source = await readFile(join(REPO_ROOT, 'test', 'support', 'qwen-server.ts'), 'utf8');
  const { outputText } = ts.transpileModule(source, {
    fileName: 'qwen-server.ts',
    compilerOptions: { module: ts.ModuleKind.ESNext, target: ts.ScriptTarget.ES2022, verbatimModuleSyntax: true },
  });
  const dir = await mkdtemp(join(tmpdir(), 'qtd-bench-server-'));
  const file = join(dir, 'qwen-server.mjs');
  await writeFile(file, outputText);
  try {
    return await import(pathToFileURL(file).href);
  } finally {
    // Once imported the module lives in memory; the copy is not needed any more.
    await rm(dir, { recursive: true, force: true });
  }
}
