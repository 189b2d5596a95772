/** The leak check every daemon fixture runs, and the logger's second belt of redaction. */
import { Writable } from 'node:stream';
import { describe, expect, it } from 'vitest';
import { createLogger } from '../daemon/logger.js';
import { fingerprint } from '../shared/fingerprint.js';
import { assertNoSecrets } from './support/daemon.js';

describe('secrets', () => {
  it('the fixture leak check fails when an issued token appears in output', () => {
    const token = 'qat_0123456789abcdefghij';
    expect(() => assertNoSecrets(`{"msg":"x","t":"${token}"}`, [token])).toThrow(/1 issued token/);
    expect(() => assertNoSecrets('{"msg":"x"}', [token])).not.toThrow();
  });

  it('the logger censors token fields even when an object carrying them is logged', () => {
    const lines: string[] = [];
    const sink = new Writable({
      write(chunk: Buffer, _enc, done) {
        lines.push(chunk.toString());
        done();
      },
    });
    const logger = createLogger({ level: 'debug', destination: sink });
    const creds = { access_token: 'qat_secret_access_value', refresh_token: 'qrt_secret_refresh_value', expiry_date: 1 };
    logger.info(creds, 'top level');
    logger.info({ result: creds }, 'nested');
    logger.info({ credentials: creds }, 'whole record');
    const out = lines.join('');
    expect(out).not.toContain('qat_secret_access_value');
    expect(out).not.toContain('qrt_secret_refresh_value');
    expect(out).toContain('[redacted]');
    expect(out).toContain('"expiry_date":1');
  });

  it('fingerprints are short, stable and do not contain the token', () => {
    const fp = fingerprint('qat_secret_access_value');
    expect(fp).toMatch(/^[0-9a-f]{4}…[0-9a-f]{4}$/);
    expect(fingerprint('qat_secret_access_value')).toBe(fp);
    expect(fingerprint('qat_other')).not.toBe(fp);
    expect(fingerprint(undefined)).toBe('none');
  });
});
