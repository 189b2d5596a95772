import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    // Integration tests run the compiled daemon: build once before any test file runs.
    globalSetup: ['test/support/global-setup.ts'],
    testTimeout: 20_000,
    hookTimeout: 20_000,
    // Two cores: more workers only make the daemon-spawning tests fight for CPU.
    maxWorkers: 2,
  },
});
