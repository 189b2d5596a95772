import { defineConfig } from 'vitest/config';

/** `npm run test:chaos`: the chaos suite at full counts (about 5-10 minutes on 2 cores). */
export default defineConfig({
  test: {
    include: ['test/chaos/full.chaos.ts'],
    // Runs the compiled daemon and CLI: build first, as for `npm test`.
    globalSetup: ['test/support/global-setup.ts'],
    testTimeout: 600_000,
    hookTimeout: 60_000,
    // One file, one worker: the scenarios measure latency and memory and must not share the CPU
    // with each other.
    maxWorkers: 1,
    // The scenarios' figures (test/chaos/harness.ts report()) are what this run is for.
    env: { CHAOS_FIGURES: '1' },
  },
});
