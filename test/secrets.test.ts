/**
 * The leak check every daemon fixture runs, the logger's second belt of redaction, and API keys
 * and client secrets: a key an API echoes back never reaches an error, and the CLI never prints
 * one or puts it on a command line. (With the real daemon: profiles-cli.daemon.test.ts.)
 */
import { Writable } from 'node:stream';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { QwenChatModel } from '../client/chat-model.js';
import { checkApiKey } from '../client/cli/verify-key.js';
import { createQwenFetch } from '../client/qwen-fetch.js';
import { TokenClient } from '../client/token-client.js';
import { createLogger } from '../daemon/logger.js';
import { fingerprint } from '../shared/fingerprint.js';
import { runCli } from './support/cli-run.js';
import { assertNoSecrets } from './support/daemon.js';
import { FakeProfileDaemon } from './support/fake-profile-daemon.js';
import { startQwenServer, type QwenTestServer } from './support/qwen-server.js';

/** A debug logger whose output lines are kept in memory. */
function capturedLogger(): { lines: string[]; logger: ReturnType<typeof createLogger> } {
  const lines: string[] = [];
  const sink = new Writable({
    write(chunk: Buffer, _enc, done) {
      lines.push(chunk.toString());
      done();
    },
  });
  return { lines, logger: createLogger({ level: 'debug', destination: sink }) };
}

describe('secrets', () => {
  it('the fixture leak check fails when an issued token appears in output', () => {
    const token = 'qat_0123456789abcdefghij';
    expect(() => assertNoSecrets(`{"msg":"x","t":"${token}"}`, [token])).toThrow(/1 issued token/);
    expect(() => assertNoSecrets('{"msg":"x"}', [token])).not.toThrow();
  });

  it('the logger censors token fields even when an object carrying them is logged', () => {
    const { lines, logger } = capturedLogger();
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

  it('the logger censors API keys, client secrets and an x-api-key header wherever they are logged', () => {
    const { lines, logger } = capturedLogger();
    logger.info({ api_key: 'sk-top-level-key-value' }, 'key');
    logger.info({ secret: { client_secret: 'cs-nested-secret-value' } }, 'nested');
    logger.info({ request: { headers: { 'x-api-key': 'sk-header-key-value' } } }, 'header');
    const out = lines.join('');
    for (const value of ['sk-top-level-key-value', 'cs-nested-secret-value', 'sk-header-key-value']) expect(out).not.toContain(value);
    expect(out.match(/\[redacted\]/g)).toHaveLength(3);
  });

  it('fingerprints are short, stable and do not contain the token', () => {
    const fp = fingerprint('qat_secret_access_value');
    expect(fp).toMatch(/^[0-9a-f]{4}…[0-9a-f]{4}$/);
    expect(fingerprint('qat_secret_access_value')).toBe(fp);
    expect(fingerprint('qat_other')).not.toBe(fp);
    expect(fingerprint(undefined)).toBe('none');
  });
});

describe('API keys an API echoes back', () => {
  const KEY = 'sk-sp-echoed-key-0123456789abcdef0123';
  let server: QwenTestServer;
  let daemon: FakeProfileDaemon;
  let client: TokenClient;

  /** The next answers of `endpoint` refuse the key and repeat it, as a careless API might. */
  const echo = (endpoint: 'apiChat' | 'apiModels', status: number, times = 1) =>
    server.injectFault({
      kind: 'respond',
      endpoint,
      times,
      status,
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ error: { message: `Incorrect API key provided: ${KEY}`, code: 'invalid_api_key' } }),
    });

  beforeAll(async () => {
    server = await startQwenServer({ apiKeys: [KEY] });
    daemon = await FakeProfileDaemon.start(2);
    daemon.set('cp', { kind: 'api-key', baseUrl: server.apiKeyBaseUrl, secret: KEY });
    daemon.set('corp', { kind: 'oauth-device', baseUrl: 'https://llm.example.com/v1', secret: 'cs-client-secret-4444444444' });
    client = new TokenClient({ socketPath: daemon.socketPath, autostart: false, env: {} });
  });
  afterAll(async () => {
    await client.close();
    await daemon.close();
    await server.close();
  });

  it('createQwenFetch, QwenChatModel and the key check show a fingerprint in its place', async () => {
    echo('apiChat', 401);
    const fetchError = await createQwenFetch({ client, profile: 'cp' })(`${server.apiKeyBaseUrl}/chat/completions`, { method: 'POST', body: '{}' }).then(
      () => null,
      (e: Error) => e,
    );
    expect(fetchError?.message).toContain(`Incorrect API key provided: [key ${fingerprint(KEY)}]`);
    expect(fetchError?.message).not.toContain(KEY);

    echo('apiChat', 400);
    const chatError = await new QwenChatModel({ client, profile: 'cp', modelName: 'qwen-plus' }).call('x').then(
      () => null,
      (e: Error) => e,
    );
    expect(chatError?.message).toContain('Incorrect API key provided');
    expect(chatError?.message).not.toContain(KEY);

    echo('apiModels', 401);
    const check = await checkApiKey(server.apiKeyBaseUrl, 'bearer', KEY);
    expect(check).toMatchObject({ outcome: 'rejected', message: `Incorrect API key provided: [key ${fingerprint(KEY)}]` });
  });

  it('the CLI prints no key or client secret, in errors, status or doctor, and puts none on a command line', async () => {
    const env = { PATH: process.env.PATH ?? '', HOME: daemon.dir, QWEN_TOKEND_SOCKET: daemon.socketPath, QWEN_TOKEND_AUTOSTART: '0' };
    const secrets = [KEY, 'cs-client-secret-4444444444'];
    echo('apiModels', 401);
    const refused = await runCli(['profile', 'add', 'again', '--kind', 'api-key', '--base-url', server.apiKeyBaseUrl], { env, stdin: KEY });
    expect(refused.code).toBe(7);
    expect(refused.stderr).toContain(`[key ${fingerprint(KEY)}]`);
    const confidential = await runCli(
      ['profile', 'add', 'conf', '--kind', 'oauth-device', '--token-endpoint', 'https://id.example.com/token', '--device-authorization-endpoint', 'https://id.example.com/device', '--client-id', 'c', '--client-secret', '--base-url', 'https://llm.example.com/v1'],
      { env, stdin: 'cs-client-secret-4444444444' },
    );
    expect(confidential.code).toBe(0);
    expect(daemon.calls('profiles.add').at(-1)!.params.secret).toBe('cs-client-secret-4444444444');
    const runs = [refused, confidential];
    for (const args of [['status'], ['status', '--json'], ['status', '--profile', 'cp'], ['doctor'], ['doctor', '--json'], ['profile', 'show', 'conf'], ['profile', 'list', '--json'], ['refresh', '--profile', 'cp']]) {
      runs.push(await runCli(args, { env }));
    }
    for (const r of runs) {
      assertNoSecrets(r.stdout + r.stderr, secrets, 'CLI output');
      assertNoSecrets(r.argvSeen.join('\n'), secrets, 'argv');
    }
    expect(runs.at(-1)!.stdout).toBe(`Profile cp has a static API key (fingerprint ${fingerprint(KEY)}): nothing to refresh.\n`);
  });
});
