/** resolveConfig for the socket server's limits: the silent-connection timeout from the environment. */
import { describe, expect, it } from 'vitest';
import { DEFAULTS, resolveConfig } from '../shared/config.js';
import { QwenConfigError } from '../shared/errors.js';

const base = { HOME: '/home/someone' };

describe('QWEN_TOKEND_SILENT_CONNECTION_TIMEOUT_MS', () => {
  it('defaults to 30 s and takes a whole number of milliseconds', () => {
    expect(resolveConfig(base).silentConnectionTimeoutMs).toBe(30_000);
    expect(DEFAULTS.silentConnectionTimeoutMs).toBe(30_000);
    expect(resolveConfig({ ...base, QWEN_TOKEND_SILENT_CONNECTION_TIMEOUT_MS: ' 2500 ' }).silentConnectionTimeoutMs).toBe(2_500);
  });

  it('refuses what is not a whole number, or under 100 ms, naming the variable', () => {
    for (const bad of ['soon', '1.5', '-1', '99']) {
      expect(() => resolveConfig({ ...base, QWEN_TOKEND_SILENT_CONNECTION_TIMEOUT_MS: bad }), bad).toThrow(QwenConfigError);
      expect(() => resolveConfig({ ...base, QWEN_TOKEND_SILENT_CONNECTION_TIMEOUT_MS: bad }), bad).toThrow(/QWEN_TOKEND_SILENT_CONNECTION_TIMEOUT_MS/);
    }
  });
});
