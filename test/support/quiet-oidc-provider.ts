/**
 * oidc-provider tells, at import, on start and on some requests, that its development-only
 * adapter, interactions and default pages are in use (and, on Node 20, that the runtime is
 * unsupported, though it works): true of every test provider, so those lines are dropped rather
 * than repeated through the test output. Its other messages still show. Imported before
 * oidc-provider itself, so the import-time line is caught too.
 */
const EXPECTED = /^oidc-provider (WARNING|NOTICE): (a quick start development-only|Unsupported runtime|default features\.)/;
const flag = Symbol.for('qwen-tokend.test.quiet-oidc-provider');
const marks = console as unknown as Record<symbol, boolean>;
if (!marks[flag]) {
  marks[flag] = true;
  for (const level of ['warn', 'info'] as const) {
    const original = console[level].bind(console);
    console[level] = (...args: unknown[]) => {
      if (typeof args[0] === 'string' && EXPECTED.test(args[0])) return;
      original(...args);
    };
  }
}
