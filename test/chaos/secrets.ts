/**
 * Scenario 7: secrets. Every text a person or another program can see during the chaos run
 * (daemon logs across restarts and kills, errors clients received, `qwen-token status [--json]`
 * and `doctor [--json]` output, a refused second instance, corrupt-file reports, exception
 * text with its cause chain) is collected in the ledger and searched for every token, device
 * code and PKCE verifier the local server issued or saw. Here the texts the other scenarios do
 * not produce are added: the CLI in every state, and a server that echoes the secrets it got.
 */
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { writeFile } from 'node:fs/promises';
import { inspect } from 'node:util';
import { expect } from 'vitest';
import { QwenOAuthClient } from '../../daemon/oauth.js';
import { serializeCredentials } from '../../shared/credentials.js';
import { CLI_BIN, DAEMON_BIN, createFixture, credsFrom, type DaemonFixture } from '../support/daemon.js';
import { bugLines, report, runCli, until, type Leak, type SecretLedger } from './harness.js';
import type { ChaosScale } from './scale.js';

/** `qwen-token status [--json]` and `doctor [--json]` as they are now (run side by side; the reduced run skips two). */
async function cliViews(fx: DaemonFixture, ledger: SecretLedger, label: string, full: boolean): Promise<number> {
  if (!existsSync(CLI_BIN)) return 0;
  const commands = full ? [['status'], ['status', '--json'], ['doctor'], ['doctor', '--json']] : [['status', '--json'], ['doctor']];
  const runs = await Promise.all(commands.map((args) => runCli(fx.env, args)));
  runs.forEach((r, i) => ledger.addText(`qwen-token ${commands[i]!.join(' ')} (${label})`, `${r.stdout}\n${r.stderr}`));
  return runs.length;
}

/** A one-shot answer from the token endpoint. */
function respond(fx: DaemonFixture, status: number, body: unknown, contentType = 'application/json'): void {
  fx.server.injectFault({ kind: 'respond', status, headers: { 'content-type': contentType }, body: typeof body === 'string' ? body : JSON.stringify(body), times: 1 });
}

export interface SecretFigures {
  cliRuns: number;
  secretsTracked: number;
  textsScanned: number;
  charsScanned: number;
  leaks: Leak[];
}

export async function secretsEverywhere(scale: ChaosScale, ledger: SecretLedger): Promise<SecretFigures> {
  const full = scale.name === 'full';
  let cliRuns = 0;
  // The fixture's own leak check throws at cleanup; keep it for after the full report.
  const cleanupErrors: unknown[] = [];
  const cleanup = (f: DaemonFixture) => f.cleanup().catch((e: unknown) => void cleanupErrors.push(e));
  const fx = await createFixture({
    server: { deviceInterval: 0.2 },
    env: { QWEN_TOKEND_RETRY_MS: '60000', QWEN_TOKEND_HTTP_TIMEOUT_MS: '500', QWEN_TOKEND_LOG_LEVEL: 'debug' },
  });
  try {
    // A login (device code + PKCE verifier on the wire), then every state the CLI can show.
    await fx.start();
    if (full) cliRuns += await cliViews(fx, ledger, 'no credentials', full);
    const client = fx.client({ minValidityMs: 0 });
    await client.login({ onCode: () => fx.server.approve() });
    if (full) cliRuns += await cliViews(fx, ledger, 'valid', full);

    // A server that echoes what it was sent: in an OAuth error description (4xx and 5xx), in a
    // plain-text and an HTML body, and in a malformed 200.
    const own = (await fx.readOwn())!;
    const echoes: Array<[number, unknown, string?]> = [
      [503, { error: 'server_error', error_description: `backend refused refresh_token=${own.refresh_token}` }],
      [429, { error: 'rate_limited', error_description: `slow down, ${own.refresh_token}` }],
      [500, `upstream said: refresh_token=${own.refresh_token}`, 'text/plain'],
      [502, `<html><body>${own.refresh_token} ${own.access_token}</body></html>`, 'text/html'],
      [200, `{"access_token":"${own.access_token}","refresh_token":"${own.refresh_token}","expires_in":"soon"}`],
    ];
    for (const [status, body, type] of echoes) {
      respond(fx, status, body, type);
      ledger.addError('client: refresh against an echoing server', await client.refresh().catch((e: unknown) => e));
    }
    cliRuns += await cliViews(fx, ledger, 'retrying after echoed errors', full);

    // The refresh token itself rejected, with the server quoting it.
    respond(fx, 400, { error: 'invalid_request', error_description: `Invalid refresh token ${own.refresh_token} or client_id` });
    ledger.addError('client: rejected refresh', await client.refresh().catch((e: unknown) => e));
    await until(async () => (await client.status()).state === 'needs_login', 3_000, 'needs_login');
    cliRuns += await cliViews(fx, ledger, 'needs login', full);

    // A second instance is refused: its output is crash output too.
    const second = spawn(process.execPath, [DAEMON_BIN], { env: fx.env, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    second.stdout.on('data', (c: Buffer) => (out += c.toString()));
    second.stderr.on('data', (c: Buffer) => (out += c.toString()));
    await new Promise((r) => second.once('exit', r));
    ledger.addText('second instance output', out);
    expect(bugLines(fx)).toEqual([]);
  } finally {
    ledger.addFixture(fx, 'secrets');
    await cleanup(fx);
  }

  // Corrupt credential files holding real tokens: the reports must not quote them.
  const fx2 = await createFixture({ env: { QWEN_TOKEND_LOG_LEVEL: 'debug' } });
  try {
    const a = credsFrom(fx2.server);
    const b = credsFrom(fx2.server);
    await fx2.writeOwn(a);
    await writeFile(fx2.tokenPath, serializeCredentials(a).slice(0, -20));
    await fx2.writeCli(b);
    await writeFile(fx2.qwenCliPath, JSON.stringify({ access_token: b.access_token, refresh_token: b.refresh_token, token_type: 7, expiry_date: 'tomorrow' }));
    await fx2.start();
    cliRuns += await cliViews(fx2, ledger, 'corrupt files', full);
    // Killed hard: whatever it printed is in the output too.
    await fx2.stop('SIGKILL');
  } finally {
    ledger.addFixture(fx2, 'secrets (corrupt files)');
    await cleanup(fx2);
  }

  // Exception text from the OAuth client itself, cause chain included.
  const fx3 = await createFixture();
  try {
    const oauth = new QwenOAuthClient({ baseUrl: fx3.server.baseUrl, clientId: fx3.server.settings.clientId, scope: 'openid', timeoutMs: 300 });
    const t = credsFrom(fx3.server);
    const faults: Array<() => void> = [
      () => respond(fx3, 400, { error: 'invalid_grant', error_description: `no such token ${t.refresh_token}` }),
      () => respond(fx3, 401, { error: 'invalid_client', error_description: t.refresh_token }),
      () => respond(fx3, 500, `${t.refresh_token}`, 'text/plain'),
      () => fx3.server.injectFault({ kind: 'reset', times: 1 }),
      () => fx3.server.injectFault({ kind: 'delay', delayMs: 5_000, times: 1 }),
    ];
    for (const inject of faults) {
      inject();
      const err = await oauth.refreshTokenGrant(t.refresh_token).catch((e: unknown) => e);
      ledger.addText('oauth client exception', inspect(err, { depth: 10 }));
    }
  } finally {
    ledger.addFixture(fx3, 'secrets (oauth client)');
    await cleanup(fx3);
  }

  const leaks = ledger.scan();
  const figures: SecretFigures = { cliRuns, secretsTracked: ledger.secretCount, textsScanned: ledger.textCount, charsScanned: ledger.charsScanned, leaks };
  const where = [...new Set(leaks.map((l) => `${l.where} [${l.kind}]`))];
  report('7 secrets across the run', {
    'secrets tracked': figures.secretsTracked,
    'texts scanned': figures.textsScanned,
    'characters scanned': figures.charsScanned,
    'qwen-token runs': figures.cliRuns,
    'leaks found': leaks.length,
    ...(leaks.length ? { 'leaked in': where.join(' | ') } : {}),
  });
  expect(where, 'texts that contain an issued secret').toEqual([]);
  if (cleanupErrors.length) throw cleanupErrors[0];
  return figures;
}
