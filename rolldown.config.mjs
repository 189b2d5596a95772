/**
 * Bundles the two programs (the daemon and the CLI) after `tsc`, so each starts by reading one
 * file instead of resolving ~200 modules, and zod's ~60 unused locale modules are left out.
 * Start-up time and idle memory are mostly module loading (see bench/README.md#bundle).
 * The library (dist/client/index.js) stays plain tsc output for programs that import it.
 */
import { builtinModules } from 'node:module';
import { defineConfig, RUNTIME_MODULE_ID } from 'rolldown';

const BUILTIN = '\0builtin:';

/**
 * Built-ins that only some paths need (TLS for an https upstream, child processes for a service
 * manager's readiness message or an autostart): loaded by the first call of one of their
 * functions, not at start-up (see bench/README.md#builtins). Only their functions can be
 * imported; anything else fails the build.
 */
const ON_FIRST_CALL = new Set(['node:tls', 'node:https', 'node:child_process']);

/**
 * Node's built-in modules come from `process.getBuiltinModule()` instead of an ESM import. Node
 * makes an ESM view of a built-in by reading every one of its exports, and on Node 22 and later
 * reading node:http's `WebSocket` loads all of undici (see bench/README.md#builtins). Each
 * imported name becomes one property read where the import was; names nothing imports are
 * dropped, so no other export is read.
 */
function builtinsByGetBuiltinModule() {
  const builtins = new Set(builtinModules);
  return {
    name: 'builtins-by-get-builtin-module',
    resolveId(source, importer, { kind }) {
      // Only the program's ESM imports: bundled CommonJS gets built-ins from require(), which
      // makes no such view, and rolldown's own runtime needs only node:module.
      if (kind !== 'import-statement' || importer === RUNTIME_MODULE_ID) return null;
      const name = source.startsWith('node:') ? source.slice(5) : source;
      if (!builtins.has(name)) return null;
      return { id: `${BUILTIN}node:${name}`, moduleSideEffects: !ON_FIRST_CALL.has(`node:${name}`) };
    },
    load(id) {
      if (!id.startsWith(BUILTIN)) return null;
      const specifier = id.slice(BUILTIN.length);
      const mod = process.getBuiltinModule(specifier);
      const onFirstCall = ON_FIRST_CALL.has(specifier);
      const names = Object.keys(mod).filter((k) => /^[A-Za-z_$][\w$]*$/.test(k) && k !== 'default' && (!onFirstCall || typeof mod[k] === 'function'));
      const get = JSON.stringify(specifier);
      // Local names are numbered, so no export (fs.read, say) can clash with them.
      const head = onFirstCall
        ? [
            'let builtin;',
            // A stand-in that loads the module on its first call, and works with `new` too.
            'const read = (name) => function (...args) {',
            `  const real = (builtin ??= process.getBuiltinModule(${get}))[name];`,
            '  return new.target ? Reflect.construct(real, args) : real.apply(this, args);',
            '};',
          ]
        : [`const builtin = process.getBuiltinModule(${get});`, 'const read = (name) => builtin[name];'];
      const exported = names.map((k, i) => `v${i} as ${k}`);
      if (!onFirstCall) exported.unshift('builtin as default');
      return [
        ...head,
        ...names.map((k, i) => `const v${i} = /* @__PURE__ */ read(${JSON.stringify(k)});`),
        `export { ${exported.join(', ')} };`,
      ].join('\n');
    },
  };
}

/**
 * One bundle per program, sharing no chunks with the other (shared chunks are more files to load
 * at start). `groups` are the program's own chunks (rolldown's code-splitting groups).
 */
function program(name, input, groups = []) {
  return defineConfig({
    input: { [name]: input },
    platform: 'node',
    plugins: [builtinsByGetBuiltinModule()],
    // `open` finds its bundled xdg-open script next to its own module file, and the QR code
    // printer is CommonJS loaded only during a login: both stay ordinary package imports. The
    // log prettifier, loaded only when the daemon runs on a terminal, becomes a chunk of its own,
    // so installing the library does not install it.
    external: ['open', 'qrcode-terminal'],
    output: {
      dir: 'dist/bin',
      format: 'esm',
      entryFileNames: '[name].js',
      chunkFileNames: `${name}-[name].js`,
      sourcemap: true,
      charset: 'ascii',
      comments: { legal: true, annotation: false, jsdoc: false },
      codeSplitting: { groups },
    },
  });
}

/**
 * The CLI's chunks: `qwen-token token` loads four files instead of ten (each module file costs
 * a resolve, a read and a link at start-up; see bench/README.md#b7). `start`: what every command
 * needs before it runs (environment, configuration, errors, output). `client`: the daemon client
 * and zod, which `token` loads on use and `--help` never does. The rest (commander and the other
 * commands) stays in chunks of its own, loaded for the commands that need it.
 */
const START = /dist\/client\/cli\/(context|duration|exit-codes)\.js|dist\/client\/autostart\.js|dist\/shared\/(diagnostics|errors|url-trust|cli-command|config|package)\.js|builtin:node:(fs|path|net|url|child_process|events|timers\/promises)$/;
const CLIENT = /dist\/client\/(token-client|daemon-connection|line-reader)\.js|dist\/shared\/(protocol|gateway-protocol|path-trust|repeated-frame|compile-schemas|clock)\.js|node_modules\/zod\//;

export default [
  program('qwen-tokend', 'dist/daemon/main.js'),
  program('qwen-token', 'dist/client/cli/main.js', [
    // `start` first: a module both need (config, errors) must not pull zod into every command.
    { name: 'start', test: START, priority: 2 },
    { name: 'client', test: CLIENT, priority: 1 },
  ]),
];
