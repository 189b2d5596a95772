/**
 * Scenario 7: secrets. Every text a person or another program can see during the chaos run
 * (daemon logs across restarts and kills, errors clients received, `qwen-token status [--json]`
 * and `doctor [--json]` output, a refused second instance, corrupt-file reports, exception
 * text with its cause chain) is collected in the ledger and searched for every token, device
 * code and PKCE verifier the local server issued or saw. Here the texts the other scenarios do
 * not produce are added: the CLI in every state, and a server that echoes the secrets it got.
 * Then credential profiles: API keys and an OAuth client secret given to the CLI, and every
 * text they could reach (the CLI's views, library and gateway errors, the log of a daemon the
 * CLI started, the gateway's access log, and the command line of every process meanwhile).
 */
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { inspect } from 'node:util';
import { expect } from 'vitest';
import { QwenChatModel } from '../../client/chat-model.js';
import { ExitCodes } from '../../client/cli/exit-codes.js';
import { createQwenFetch } from '../../client/qwen-fetch.js';
import { TokenClient } from '../../client/token-client.js';
import { QwenOAuthClient } from '../../daemon/oauth.js';
import { resolveConfig } from '../../shared/config.js';
import { serializeCredentials } from '../../shared/credentials.js';
import { QwenCredentialRejectedError } from '../../shared/errors.js';
import { CLI_BIN, DAEMON_BIN, createFixture, credsFrom, type DaemonFixture } from '../support/daemon.js';
import { httpCall } from '../support/gateway-harness.js';
import { startOidcProvider } from '../support/oidc-provider.js';
import { ANTHROPIC_BASE_PATH, DEVICE_CODE_PATH, TOKEN_PATH } from '../support/qwen-server.js';
import { ArgvWatch, bugLines, report, runCli, until, type CliRun, type Leak, type SecretLedger } from './harness.js';
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

/**
 * Leaks this scenario finds that are reported and not fixed yet, by the name of the text they
 * are in. Each must still be found (a fix fails this scenario until its entry is removed), and
 * nothing else may leak.
 */
const KNOWN_LEAKS: string[] = [];

/** A secret no other run shares: `prefix` and 32 random base64url characters. */
function newSecret(prefix: string): string {
  return `${prefix}${randomBytes(24).toString('base64url')}`;
}

/** Waits until process `pid` has exited (a zombie has: the daemon's reaper may be slow to collect it). */
async function gone(pid: number, what: string): Promise<void> {
  await until(
    async () => {
      try {
        process.kill(pid, 0);
      } catch {
        return true;
      }
      const stat = await readFile(`/proc/${pid}/stat`, 'utf8').catch(() => '');
      return /^\d+ \(.*\) Z /.test(stat);
    },
    10_000,
    what,
  );
}

/**
 * API keys and an OAuth client secret, given to the CLI as a person would (standard input,
 * `--key-env`), with a daemon the CLI starts itself. Everything that could show them goes into
 * the ledger; the keys and the secret go in as secrets. Returns the number of CLI runs, of
 * distinct command lines seen and of /proc sweeps.
 */
async function keysAndClientSecrets(scale: ChaosScale, ledger: SecretLedger, cleanup: (fx: DaemonFixture) => Promise<void>): Promise<{ cliRuns: number; argvLines: number; argvSweeps: number }> {
  const full = scale.name === 'full';
  const cpKey = newSecret('sk-sp-');
  const dsKey = newSecret('sk-');
  const wrongKey = newSecret('sk-sp-');
  const nextKey = newSecret('sk-');
  const clientSecret = newSecret('cs-');
  const KEY_VAR = 'CHAOS_DASHSCOPE_KEY';
  for (const [secret, kind] of [[cpKey, 'API key'], [dsKey, 'API key'], [wrongKey, 'API key (refused)'], [nextKey, 'API key'], [clientSecret, 'client secret']] as const) {
    ledger.addSecret(secret, kind);
  }
  // The CLI starts the daemon (autostart): its log goes to a file in the state directory.
  const fx = await createFixture({
    server: { apiKeys: [cpKey, dsKey, nextKey], deviceInterval: 0.2, approveAfterPolls: 1 },
    env: { QWEN_TOKEND_AUTOSTART: '1', QWEN_TOKEND_LOG_LEVEL: 'debug', QWEN_TOKEND_RETRY_MS: '60000', QWEN_TOKEND_HTTP_TIMEOUT_MS: '1000' },
  });
  const base = fx.server.apiKeyBaseUrl;
  const logFile = join(resolveConfig(fx.env).stateDir, 'qwen-tokend.log');
  const watch = await new ArgvWatch().start();
  let cliRuns = 0;
  let daemonPid: number | null = null;
  let log = '';
  /** Runs the CLI; unless `shows` is false (it prints a key on purpose), its output goes into the ledger. */
  const cli = async (args: string[], options: { input?: string; env?: Record<string, string>; shows?: boolean } = {}): Promise<CliRun> => {
    const r = await runCli({ ...fx.env, ...options.env }, args, 15_000, options.input);
    cliRuns += 1;
    if (options.shows !== false) ledger.addText(`qwen-token ${args.join(' ')} (profiles)`, `${r.stdout}\n${r.stderr}`);
    return r;
  };
  // Clients are closed before the daemon is stopped (a connected client holds its shutdown up).
  const clients: TokenClient[] = [];
  const newClient = () => {
    const c = new TokenClient({ env: fx.env, autostart: false });
    clients.push(c);
    return c;
  };
  const library = newClient();
  const echo = (endpoint: 'token' | 'apiChat', status: number, body: string, type = 'application/json') =>
    fx.server.injectFault({ kind: 'respond', endpoint, status, headers: { 'content-type': type }, body, times: 1 });

  /** A confidential OAuth client on the local server's device flow (client_secret_post), logged in, refreshed, then quoted back. */
  const clientSecretLane = async () => {
    const corp = await cli(
      ['profile', 'add', 'corp', '--kind', 'oauth-device', '--device-authorization-endpoint', `${fx.server.baseUrl}${DEVICE_CODE_PATH}`, '--token-endpoint', `${fx.server.baseUrl}${TOKEN_PATH}`, '--client-id', fx.server.settings.clientId, '--client-secret', '--base-url', base],
      { input: clientSecret },
    );
    expect(corp.code, corp.stderr).toBe(0);
    // The server approves after one poll. The reduced run logs in and refreshes through the
    // library (no process to start); the full run through the CLI.
    if (full) {
      const login = await cli(['login', '--profile', 'corp', '--no-browser', '--json']);
      expect(login.code, login.stderr).toBe(0);
      const refreshed = await cli(['refresh', '--profile', 'corp']);
      expect(refreshed.code, refreshed.stderr).toBe(0);
    } else {
      await library.login({ profile: 'corp', onCode: () => undefined });
      await library.refresh({ profile: 'corp' });
    }
    // Sent with the device code, the device grant and the refresh.
    expect(fx.server.requests.filter((r) => r.form?.client_secret === clientSecret).length).toBeGreaterThanOrEqual(3);
    // The token endpoint quotes the secret back: what `refresh` tells the CLI (full run) or the library.
    const quotes: Array<[number, string, string?]> = [[401, JSON.stringify({ error: 'invalid_client', error_description: `client authentication failed for client_secret=${clientSecret}` })]];
    if (full) quotes.push([500, `upstream said: client_secret=${clientSecret}`, 'text/plain'], [502, `<html><body>${clientSecret}</body></html>`, 'text/html']);
    for (const [status, body, type] of quotes) {
      echo('token', status, body, type);
      if (full) await cli(['refresh', '--profile', 'corp']);
      else {
        const refused = await library.refresh({ profile: 'corp' }).catch((e: unknown) => e);
        expect(refused).toBeInstanceOf(Error);
        ledger.addError('client: refresh of an oauth-device profile, secret quoted back', refused);
      }
    }
  };

  /** A key by `--key-env`, a refused key, a revoked key and a key the API quotes back: through the CLI, the library and the gateway. */
  const keyLane = async () => {
    const [ds, refused] = await Promise.all([
      cli(['profile', 'add', 'ds', '--preset', 'dashscope', '--region', 'singapore', '--base-url', base, '--key-env', KEY_VAR], { env: { [KEY_VAR]: dsKey } }),
      cli(['profile', 'add', 'wrong', '--kind', 'api-key', '--base-url', base], { input: wrongKey }),
    ]);
    expect(ds.code, ds.stderr).toBe(0);
    expect(refused.code).toBe(ExitCodes.credentialRejected);
    // The full run replaces the ds key (read from standard input again) and quotes the new one.
    if (full) expect((await cli(['profile', 'add', 'ds', '--replace'], { input: nextKey })).code).toBe(0);
    const quoted = full ? nextKey : dsKey;
    const quote = () => echo('apiChat', 401, JSON.stringify({ error: { message: `Incorrect API key provided: ${quoted}`, type: 'invalid_request_error', code: 'invalid_api_key' } }));
    fx.server.settings.apiKeys = fx.server.settings.apiKeys.filter((k) => k !== cpKey);

    // The library's errors (a client each: a rejected key is remembered per client, not asked again).
    const chat = (profile: string) =>
      createQwenFetch({ client: newClient(), profile })(`${base}/chat/completions`, { method: 'POST', body: JSON.stringify({ model: 'qwen-plus', messages: [] }) }).then(
        () => null,
        (e: unknown) => e,
      );
    const revoked = await chat('cp');
    expect(revoked).toBeInstanceOf(QwenCredentialRejectedError);
    ledger.addError('createQwenFetch: a revoked key', revoked);
    quote();
    const echoed = await chat('ds');
    expect(echoed).toBeInstanceOf(QwenCredentialRejectedError);
    ledger.addError('createQwenFetch: a key the API quoted', echoed);
    if (full) {
      quote();
      ledger.addError('QwenChatModel: a key the API quoted', await new QwenChatModel({ client: newClient(), profile: 'ds', modelName: 'qwen-plus' }).call('x').catch((e: unknown) => e));
    }

    // The gateway (its Unix socket): the revoked key, and the quoted one.
    const viaGateway = async (profile: string, what: string) => {
      const answer = await httpCall({ socketPath: join(fx.runDir, 'gateway.sock') }, 'POST', `/p/${profile}/v1/chat/completions`, {
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ model: 'qwen-plus', messages: [{ role: 'user', content: 'hi' }] }),
      });
      expect(answer.status).toBe(401);
      ledger.addText(`gateway answer: ${what}`, `${answer.status} ${JSON.stringify(answer.headers)}\n${answer.body}`);
    };
    await viaGateway('cp', 'a revoked key');
    quote();
    await viaGateway('ds', 'a key the API quoted');
    if (full) await gatewayTcpAndXApiKey();
  };

  /**
   * Full run: the gateway on loopback TCP behind its key (`gateway env` prints the key on
   * purpose: it becomes a secret of the ledger), a wrong gateway key refused, and an `x-api-key`
   * profile on the Anthropic-style endpoint whose key the API quotes back to the library.
   */
  const gatewayTcpAndXApiKey = async () => {
    expect((await cli(['gateway', 'enable', '--port', '0', '--json'])).code).toBe(0);
    const env = await cli(['gateway', 'env', '--plain'], { shows: false });
    const vars = Object.fromEntries(env.stdout.trim().split('\n').map((l) => l.split('=', 2) as [string, string]));
    const gatewayKey = vars.OPENAI_API_KEY!;
    ledger.addSecret(gatewayKey, 'gateway key');
    const port = Number(new URL(vars.OPENAI_BASE_URL!).port);
    const post = (path: string, key: string) =>
      httpCall({ port }, 'POST', path, { headers: { 'content-type': 'application/json', authorization: `Bearer ${key}` }, body: JSON.stringify({ model: 'qwen-plus', messages: [{ role: 'user', content: 'hi' }] }) });
    const refusedKey = await post('/p/ds/v1/chat/completions', `${gatewayKey.slice(0, -4)}AAAA`);
    expect(refusedKey.status).toBe(401);
    ledger.addText('gateway answer (TCP): a wrong gateway key', `${refusedKey.status} ${JSON.stringify(refusedKey.headers)}\n${refusedKey.body}`);
    const revokedKey = await post('/p/cp/v1/chat/completions', gatewayKey);
    expect(revokedKey.status).toBe(401);
    ledger.addText('gateway answer (TCP): a revoked key', `${revokedKey.status} ${JSON.stringify(revokedKey.headers)}\n${revokedKey.body}`);
    await cli(['gateway', 'status']);

    const anthropic = `${fx.server.baseUrl}${ANTHROPIC_BASE_PATH}`;
    const claudeKey = newSecret('sk-ant-');
    ledger.addSecret(claudeKey, 'API key');
    fx.server.settings.apiKeys = [...fx.server.settings.apiKeys, claudeKey];
    // No GET /models there: stored unchecked.
    expect((await cli(['profile', 'add', 'claude', '--kind', 'api-key', '--auth', 'x-api-key', '--base-url', anthropic, '--no-verify'], { input: claudeKey })).code).toBe(0);
    fx.server.injectFault({ kind: 'respond', endpoint: 'apiMessages', status: 401, headers: { 'content-type': 'application/json' }, body: JSON.stringify({ type: 'error', error: { type: 'authentication_error', message: `invalid x-api-key ${claudeKey}` } }), times: 1 });
    const quoted = await createQwenFetch({ client: newClient(), profile: 'claude' })(`${anthropic}/v1/messages`, { method: 'POST', body: JSON.stringify({ model: 'qwen-plus', max_tokens: 8, messages: [] }) }).then(
      () => null,
      (e: unknown) => e,
    );
    expect(quoted).toBeInstanceOf(QwenCredentialRejectedError);
    ledger.addError('createQwenFetch: an x-api-key the API quoted', quoted);
    fx.server.settings.apiKeys = fx.server.settings.apiKeys.filter((k) => k !== claudeKey);
    const viaSocket = await httpCall({ socketPath: join(fx.runDir, 'gateway.sock') }, 'POST', '/p/claude/v1/messages', {
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ model: 'qwen-plus', max_tokens: 8, messages: [{ role: 'user', content: 'hi' }] }),
    });
    expect(viaSocket.status).toBe(401);
    ledger.addText('gateway answer: a revoked x-api-key', `${viaSocket.status} ${JSON.stringify(viaSocket.headers)}\n${viaSocket.body}`);
  };

  /**
   * Full run: a confidential client (client_secret_basic) at a real OpenID provider found by
   * discovery: logged in through the provider's own pages, refreshed, shown.
   */
  const oidcLane = async () => {
    const secret = newSecret('cs-oidc-');
    const provider = await startOidcProvider({ clientSecret: { secret, method: 'client_secret_basic' }, interval: 1 });
    ledger.addSecret(secret, 'client secret');
    // What client_secret_basic sends: the secret is inside the Basic credentials.
    ledger.addSecret(Buffer.from(`${encodeURIComponent(provider.clientId)}:${encodeURIComponent(secret)}`).toString('base64'), 'client secret (Basic)');
    try {
      const added = await cli(['profile', 'add', 'idp', '--kind', 'oauth-device', '--issuer', provider.issuer, '--client-id', provider.clientId, '--scope', 'openid offline_access', '--client-secret', '--base-url', base], { input: secret });
      expect(added.code, added.stderr).toBe(0);
      // The user's part through the provider's pages; a failure there cancels the login at once.
      const cancel = new AbortController();
      let approval: Promise<unknown> = Promise.resolve();
      await newClient().login({
        profile: 'idp',
        signal: cancel.signal,
        onCode: (info) => {
          approval = provider.approveDevice(info.user_code).catch((e: unknown) => {
            cancel.abort();
            return e;
          });
        },
      }).catch(async (e: unknown) => {
        throw (await approval) ?? e;
      });
      const refreshed = await cli(['refresh', '--profile', 'idp']);
      expect(refreshed.code, refreshed.stderr).toBe(0);
      expect(provider.tokenRequestCounts.refresh_token).toBeGreaterThanOrEqual(1);
      await Promise.all([cli(['status', '--profile', 'idp']), cli(['profile', 'show', 'idp', '--json'])]);
    } finally {
      for (const t of provider.accessTokensIssued) ledger.addSecret(t, 'access token (OpenID provider)');
      for (const t of [...provider.refreshTokensIssued, ...provider.refreshTokensPresented]) ledger.addSecret(t, 'refresh token (OpenID provider)');
      await provider.close();
    }
  };

  try {
    // The first command starts the daemon; the key is on standard input, checked with GET /models.
    const added = await cli(['profile', 'add', 'cp', '--preset', 'coding-plan', '--base-url', base], { input: `${cpKey}\n` });
    expect(added.code, added.stderr).toBe(0);
    daemonPid = (await library.status()).pid;
    await Promise.all([clientSecretLane(), keyLane(), ...(full ? [oidcLane()] : [])]);

    // Every view of the profiles, side by side (the reduced run: one of each command); `token
    // --profile` prints a key on purpose, so only its command line counts.
    const views = full
      ? [['status'], ['status', '--json'], ['status', '--profile', 'cp'], ['status', '--profile', 'corp', '--json'], ['profile', 'list'], ['profile', 'list', '--json'], ['profile', 'show', 'cp'], ['profile', 'show', 'corp'], ['profile', 'show', 'ds', '--json'], ['doctor'], ['doctor', '--json'], ['gateway', 'status', '--json']]
      : [['status'], ['status', '--profile', 'cp', '--json'], ['profile', 'show', 'corp', '--json'], ['doctor', '--json']];
    await Promise.all([...views.map((args) => cli(args)), ...(full ? [cli(['token', '--profile', 'cp'], { shows: false })] : [])]);
  } finally {
    await watch.stop();
    daemonPid ??= await newClient().status().then((st) => st.pid, () => null);
    for (const c of clients) await c.close();
    if (daemonPid !== null) {
      process.kill(daemonPid, 'SIGTERM');
      await gone(daemonPid, 'the daemon the CLI started to exit');
    }
    log = await readFile(logFile, 'utf8').catch(() => '');
    ledger.addText('profiles: log of the daemon the CLI started', log);
    ledger.addText('profiles: every command line while the CLI ran', watch.lines().join('\n'));
    ledger.addFixture(fx, 'secrets (profiles)');
    await cleanup(fx);
  }
  // The scan saw what it must: the CLI's command lines and the daemon it started (where there is
  // a /proc); the log has the gateway's access lines for the refused requests.
  if (existsSync('/proc/self/cmdline')) {
    expect(watch.lines().some((a) => a.includes(CLI_BIN) && a.includes('profile add cp'))).toBe(true);
    expect(watch.of(daemonPid!).some((a) => a.includes('qwen-tokend'))).toBe(true);
  }
  const accessLines = log.split('\n').filter((l) => l.includes('"msg":"gateway request"') && l.includes('"status":401'));
  expect(accessLines.length).toBeGreaterThanOrEqual(2);
  return { cliRuns, argvLines: watch.lines().length, argvSweeps: watch.sweeps };
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

  // API keys and an OAuth client secret, through the CLI, the library and the gateway.
  const started = performance.now();
  const keys = await keysAndClientSecrets(scale, ledger, cleanup);
  cliRuns += keys.cliRuns;
  const profileSeconds = (performance.now() - started) / 1000;

  const leaks = ledger.scan();
  const figures: SecretFigures = { cliRuns, secretsTracked: ledger.secretCount, textsScanned: ledger.textCount, charsScanned: ledger.charsScanned, leaks };
  const where = [...new Set(leaks.map((l) => `${l.where} [${l.kind}]`))];
  report('7 secrets across the run', {
    'secrets tracked': figures.secretsTracked,
    'texts scanned': figures.textsScanned,
    'characters scanned': figures.charsScanned,
    'qwen-token runs': figures.cliRuns,
    'command lines seen': keys.argvLines,
    '/proc sweeps': keys.argvSweeps,
    'profile part s': profileSeconds.toFixed(1),
    'leaks found': leaks.length,
    ...(leaks.length ? { 'leaked in': where.join(' | ') } : {}),
  });
  const isKnown = (w: string) => KNOWN_LEAKS.some((k) => w.startsWith(`${k} [`));
  expect(where.filter((w) => !isKnown(w)), 'texts that contain an issued secret').toEqual([]);
  expect(KNOWN_LEAKS.filter((k) => !where.some((w) => w.startsWith(`${k} [`))), 'known leaks no longer found: remove them from KNOWN_LEAKS').toEqual([]);
  if (cleanupErrors.length) throw cleanupErrors[0];
  return figures;
}
