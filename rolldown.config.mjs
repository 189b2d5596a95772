/**
 * Bundles the two programs (the daemon and the CLI) after `tsc`, so each starts by reading one
 * file instead of resolving ~200 modules, and zod's ~60 unused locale modules are left out.
 * Start-up time and idle memory are mostly module loading (see bench/README.md#bundle).
 * The library (dist/client/index.js) stays plain tsc output for programs that import it.
 */
import { defineConfig } from 'rolldown';

/**
 * One bundle per program, sharing no chunks with the other (shared chunks are more files to load
 * at start). The CLI's lazily imported parts (its daemon client, doctor) become chunks of its own.
 */
function program(name, input) {
  return defineConfig({
    input: { [name]: input },
    platform: 'node',
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
    },
  });
}

export default [program('qwen-tokend', 'dist/daemon/main.js'), program('qwen-token', 'dist/client/cli/main.js')];
