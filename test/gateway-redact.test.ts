/**
 * The redaction of upstream error bodies on its own: the cases the gateway tests cannot reach
 * cheaply (a body over the cap with a key across the cut, encodings the gateway cannot read).
 */
import { brotliCompressSync, deflateRawSync } from 'node:zlib';
import { describe, expect, it } from 'vitest';
import { credentialSecrets, ERROR_BODY_CAP, redactErrorBody, redactFieldValues, redactHeaderValue } from '../daemon/gateway/redact.js';
import { fingerprint } from '../shared/fingerprint.js';

const key = 'sk-0123456789abcdefghijklmnopqrstuv';
const marker = `[redacted key ${fingerprint(key)}]`;

describe('error body redaction', () => {
  it('takes the secret values of credential headers only, without "Bearer "', () => {
    expect(credentialSecrets({ authorization: `Bearer ${key}`, 'x-dashscope-cachecontrol': 'enable', 'x-api-key': 'other-key-123' })).toEqual([key, 'other-key-123']);
  });

  it('a body cut at the cap keeps no first characters of a key that straddles the cut', () => {
    const raw = Buffer.from('x'.repeat(ERROR_BODY_CAP - 10) + key.slice(0, 10));
    const { body } = redactErrorBody(raw, undefined, true, [key]);
    const text = body.toString('utf8');
    expect(text).not.toContain(key.slice(0, 10));
    expect(text.endsWith(`\n[the gateway cut this error body at ${ERROR_BODY_CAP} bytes]`)).toBe(true);
  });

  it('decodes br and raw deflate; withholds a body in an encoding it cannot read', () => {
    const text = `bad key ${key}`;
    for (const [enc, packed] of [['br', brotliCompressSync(text)], ['deflate', deflateRawSync(text)]] as const) {
      const out = redactErrorBody(packed, enc, false, [key]);
      expect(out).toEqual({ body: Buffer.from(`bad key ${marker}`), decoded: true });
    }
    const unknown = redactErrorBody(Buffer.from(text), 'zstd', false, [key]).body.toString();
    expect(unknown).not.toContain(key);
    expect(unknown).toContain('"zstd"');
  });

  it('header values get an ASCII marker', () => {
    expect(redactHeaderValue(`Bearer error="invalid_token", token=${key}`, [key])).toBe(`Bearer error="invalid_token", token=[redacted key ${fingerprint(key).replace('…', '...')}]`);
  });

  describe('a key with characters encoders escape', () => {
    const slashy = 'sk-ab/cd+ef=gh%ij0123456789';
    const bodyMarker = `[redacted key ${fingerprint(slashy)}]`;
    const headerMarker = `[redacted key ${fingerprint(slashy).replace('…', '...')}]`;
    const redact = (text: string, cut = false) => redactErrorBody(Buffer.from(text, 'latin1'), undefined, cut, [slashy]).body.toString('utf8');

    it('is found as it is, JSON-escaped, percent-encoded in either case, and with escapes mixed', () => {
      const spellings = [
        slashy,
        slashy.replaceAll('/', '\\/'),
        encodeURIComponent(slashy),
        encodeURIComponent(slashy).replace(/%[0-9A-F]{2}/g, (e) => e.toLowerCase()),
        'sk-ab\\u002Fcd\\u002bef\\u003Dgh\\u0025ij0123456789',
        'sk-ab\\/cd%2Bef=gh%25ij0123456789',
      ];
      for (const spelling of spellings) {
        expect(redact(`a ${spelling} b ${spelling}`)).toBe(`a ${bodyMarker} b ${bodyMarker}`);
        expect(redactHeaderValue(`k=${spelling}`, [slashy])).toBe(`k=${headerMarker}`);
      }
    });

    it('leaves text that only looks like part of it', () => {
      const near = 'sk-ab/cd+ef=gh%ij012345678 and sk-ab%2Fcd';
      expect(redact(near)).toBe(near);
      expect(redactHeaderValue(near, [slashy])).toBe(near);
    });

    it('a cut inside an escaped spelling keeps none of it', () => {
      const start = 'x'.repeat(ERROR_BODY_CAP - 12);
      for (const tail of ['sk-ab%2Fcd%2', 'sk-ab\\u002', 'sk-ab\\/cd+e']) {
        const text = redact(start + tail, true);
        expect(text.startsWith(`${start}\n[the gateway cut`)).toBe(true);
      }
    });

    it('header fields are changed in place only where a value holds it', () => {
      const fields = ['location', `https://x.test/?k=${encodeURIComponent(slashy)}`, 'x-plain', 'nothing'];
      expect(redactFieldValues(fields, [slashy])).toEqual(['location', `https://x.test/?k=${headerMarker}`, 'x-plain', 'nothing']);
    });
  });
});
