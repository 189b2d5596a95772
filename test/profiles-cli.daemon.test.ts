/**
 * `qwen-token profile ...` and `--profile` against the real daemon and the local server's API-key
 * endpoints: a key read from standard input or `--key-env`, checked with one `GET /models`,
 * stored 0600 by the daemon and never on any command line, in a log or in `status`, `profile`,
 * `doctor` or `watch` output; a refused key stored nowhere; per-profile status, doctor checks,
 * login advice, the default profile, `gateway env --profile`, and a daemon the CLI autostarts.
 */
import { createServer, type Server } from 'node:http';
import { chmod, readFile, readdir, stat } from 'node:fs/promises';
import type { AddressInfo } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ExitCodes } from '../client/cli/exit-codes.js';
import { resolveConfig } from '../shared/config.js';
import { fingerprint } from '../shared/fingerprint.js';
import { runCli, type CliRun } from './support/cli-run.js';
import { CLI_BIN, assertNoSecrets, createFixture, credsFrom, type DaemonFixture } from './support/daemon.js';
import { startQwenServer } from './support/qwen-server.js';
import { until } from './support/wait.js';

const KEY = 'sk-sp-cli-test-0123456789abcdef0123';
const NEW_KEY = 'sk-sp-cli-next-abcdef0123456789abcd';
const DS_KEY = 'sk-ds-cli-test-55555555555555555555';
const WRONG_KEY = 'sk-sp-cli-wrong-0000000000000000000';
const CLIENT_SECRET = 'cs-cli-test-secret-7777777777777777';
const SECRETS = [KEY, NEW_KEY, DS_KEY, WRONG_KEY, CLIENT_SECRET];

let fx: DaemonFixture;

function cli(args: string[], options: { stdin?: string; env?: Record<string, string | undefined> } = {}): Promise<CliRun> {
  return runCli(args, { env: { ...fx.env, ...options.env }, ...(options.stdin === undefined ? {} : { stdin: options.stdin }) });
}

/** Nothing secret in what a command printed, or on any command line while it ran. */
function expectClean(r: CliRun, what: string): void {
  assertNoSecrets(r.stdout + r.stderr, SECRETS, `output of ${what}`);
  assertNoSecrets(r.argvSeen.join('\n'), SECRETS, `argv while ${what} ran`);
}

async function profiles() {
  const client = fx.client();
  try {
    return await client.listProfiles();
  } finally {
    await client.close();
  }
}

describe('profile commands against the daemon', () => {
  let discovery: Server;
  let issuer: string;

  beforeAll(async () => {
    fx = await createFixture({ server: { apiKeys: [KEY, NEW_KEY, DS_KEY] } });
    await fx.writeOwn(credsFrom(fx.server));
    await fx.start();
    // An OpenID provider's discovery document, for doctor's check of oauth-device profiles.
    discovery = createServer((req, res) => {
      if (req.url === '/.well-known/openid-configuration') {
        res.writeHead(200, { 'content-type': 'application/json' });
        res.end(JSON.stringify({ issuer, device_authorization_endpoint: `${issuer}/device`, token_endpoint: `${issuer}/token` }));
        return;
      }
      res.writeHead(404).end();
    });
    await new Promise<void>((resolve) => discovery.listen(0, '127.0.0.1', resolve));
    issuer = `http://127.0.0.1:${(discovery.address() as AddressInfo).port}`;
  });

  afterAll(async () => {
    await new Promise<void>((resolve) => discovery?.close(() => resolve()));
    const output = fx?.output.join('\n') ?? '';
    await fx?.cleanup();
    assertNoSecrets(output, SECRETS, 'daemon output');
  });

  it('profile add reads the key from standard input, checks it with one GET /models, and the daemon stores it 0600', async () => {
    // A slow answer keeps the CLI running (with the key in memory) while every argv is scanned.
    fx.server.injectFault({ kind: 'delay', endpoint: 'apiModels', delayMs: 300, times: 1 });
    const models = fx.server.counts.apiModels;
    const r = await cli(['profile', 'add', 'cp', '--preset', 'coding-plan', '--base-url', fx.server.apiKeyBaseUrl], { stdin: `${KEY}\n` });
    expect(r.stderr).toMatch(/^Checked the key: http:\/\/127\.0\.0\.1:\d+ accepted it \(2 models listed\)\.$/m);
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/^Added profile cp \(api-key, http:\/\/127\.0\.0\.1:\d+\/compatible-mode\/v1; secret [0-9a-f]{4}…[0-9a-f]{4}\)\.$/m);
    expect(fx.server.counts.apiModels).toBe(models + 1);
    expect(r.argvSeen.some((a) => a.includes(CLI_BIN) && a.includes('profile add cp'))).toBe(true);
    expectClean(r, 'profile add');

    const cp = (await profiles()).profiles.find((p) => p.name === 'cp')!;
    expect(cp).toMatchObject({ kind: 'api-key', state: 'static', has_secret: true, secret_fingerprint: fingerprint(KEY) });
    expect(cp.settings).toMatchObject({ preset: 'coding-plan', region: 'intl', base_url: fx.server.apiKeyBaseUrl });
    for (const file of cp.files) expect(((await stat(file)).mode & 0o777).toString(8)).toBe('600');
  });

  it('profile add --key-env takes the key from the variable it names; only the name is on argv', async () => {
    fx.server.injectFault({ kind: 'delay', endpoint: 'apiModels', delayMs: 300, times: 1 });
    const r = await cli(['profile', 'add', 'ds', '--preset', 'dashscope', '--region', 'beijing', '--base-url', fx.server.apiKeyBaseUrl, '--key-env', 'DASHSCOPE_API_KEY'], {
      env: { DASHSCOPE_API_KEY: DS_KEY },
    });
    expect(r.code).toBe(0);
    expect(r.argvSeen.some((a) => a.includes('--key-env DASHSCOPE_API_KEY'))).toBe(true);
    expectClean(r, 'profile add --key-env');
    const token = await cli(['token', '--profile', 'ds']);
    expect(token.stdout === `${DS_KEY}\n`).toBe(true);
  });

  it('a refused key is stored nowhere: exit 7, the profile and plan/region named, one request', async () => {
    const models = fx.server.counts.apiModels;
    const r = await cli(['profile', 'add', 'wrong', '--preset', 'coding-plan', '--base-url', fx.server.apiKeyBaseUrl], { stdin: WRONG_KEY });
    expect(r.code).toBe(ExitCodes.credentialRejected);
    expect(r.stderr).toContain('refused the key for profile "wrong"');
    expect(r.stderr).toContain('nothing was stored');
    expect(r.stderr).toContain('--preset coding-plan');
    expect(fx.server.counts.apiModels).toBe(models + 1);
    expectClean(r, 'a refused profile add');
    expect((await profiles()).profiles.map((p) => p.name)).not.toContain('wrong');
    const dir = resolveConfig(fx.env, { platform: process.platform }).profilesDir;
    expect((await readdir(dir).catch(() => [] as string[])).filter((f) => f.startsWith('wrong'))).toEqual([]);
  });

  it('an unreachable endpoint is refused (hint: --no-verify); with --no-verify the key is stored unchecked', async () => {
    const gone = await startQwenServer();
    const url = gone.apiKeyBaseUrl;
    await gone.close();
    const r = await cli(['profile', 'add', 'far', '--kind', 'api-key', '--base-url', url], { stdin: KEY });
    expect(r.code).toBe(ExitCodes.error);
    expect(r.stderr).toContain('--no-verify');
    expect((await profiles()).profiles.map((p) => p.name)).not.toContain('far');
    const unchecked = await cli(['profile', 'add', 'far', '--kind', 'api-key', '--base-url', url, '--no-verify'], { stdin: KEY });
    expect(unchecked.code).toBe(0);
    expect((await profiles()).profiles.find((p) => p.name === 'far')?.has_secret).toBe(true);
    expect((await cli(['profile', 'remove', 'far'])).code).toBe(0);
  });

  it('token --profile prints the key alone; status, profile list/show and doctor never print it', async () => {
    const token = await cli(['token', '--profile', 'cp']);
    expect(token.code).toBe(0);
    expect(token.stdout === `${KEY}\n`).toBe(true);
    expect(token.stderr).toBe('');

    const status = await cli(['status']);
    expect(status.code).toBe(0);
    expect(status.stdout).toMatch(/^profiles \(\* default\):$/m);
    expect(status.stdout).toMatch(/^\* qwen +qwen-oauth +valid +expires in/m);
    expect(status.stdout).toMatch(/^ {2}cp +api-key +static +static$/m);
    expectClean(status, 'status');

    const detail = await cli(['status', '--profile', 'cp']);
    expect(detail.stdout).toMatch(/^profile +cp \(api-key\)$/m);
    expect(detail.stdout).toMatch(/^state +static/m);
    expect(detail.stdout).toMatch(new RegExp(`^key +fingerprint ${fingerprint(KEY)}$`, 'm'));
    expect(detail.stdout).not.toMatch(/^profiles/m);
    expectClean(detail, 'status --profile');

    const show = await cli(['profile', 'show', 'cp']);
    expect(show.stdout).toMatch(new RegExp(`^secret +present, fingerprint ${fingerprint(KEY)}$`, 'm'));
    expect(show.stdout).toMatch(/^files +.*cp.* \(mode 0600\)$/m);
    expect(show.stdout).toMatch(/^setting preset +coding-plan$/m);
    for (const args of [['status', '--json'], ['profile', 'list'], ['profile', 'list', '--json'], ['profile', 'show', 'cp', '--json'], ['doctor'], ['doctor', '--json']]) {
      expectClean(await cli(args), args.join(' '));
    }
    const list = await cli(['profile', 'list']);
    expect(list.stdout).toMatch(/^ {2}cp +api-key +static +static +http:\/\/127\.0\.0\.1:\d+\/compatible-mode\/v1$/m);
  });

  it('doctor checks each profile: its state, its files (a file opened to others fails) and an issuer\'s discovery', async () => {
    const client = fx.client();
    await client.addProfile({ name: 'corp', settings: { kind: 'oauth-device', issuer, client_id: 'cli', base_url: 'https://llm.example.com/v1' } });
    await client.addProfile({ name: 'lost', settings: { kind: 'oauth-device', issuer: `${issuer}/tenant-gone`, client_id: 'cli', base_url: 'https://llm.example.com/v1' } });
    const healthy = await cli(['doctor', '--json']);
    const report = JSON.parse(healthy.stdout) as { checks: Array<{ id: string; status: string; detail: string; hint?: string }> };
    const byId = (id: string) => report.checks.find((c) => c.id === id);
    expect(byId('profile:cp')).toMatchObject({ status: 'ok' });
    expect(byId('profile:cp:files')).toMatchObject({ status: 'ok' });
    expect(byId('profile:corp')).toMatchObject({ status: 'warn', hint: expect.stringContaining('login --profile corp') });
    expect(byId('profile:corp:discovery')).toMatchObject({ status: 'ok', detail: expect.stringContaining(`device flow at ${issuer}/device`) });
    expect(byId('profile:lost:discovery')).toMatchObject({ status: 'fail', detail: expect.stringContaining('HTTP 404') });
    expect(healthy.code).toBe(1);
    await client.removeProfile('lost');

    const file = (await profiles()).profiles.find((p) => p.name === 'cp')!.files[0]!;
    await chmod(file, 0o644);
    try {
      const r = await cli(['doctor']);
      expect(r.code).toBe(1);
      expect(r.stdout).toMatch(/^FAIL +profile cp files +.* has mode 0644: other users can read the secret$/m);
      expect(r.stdout).toContain(`fix: chmod 600 ${file}`);
      expectClean(r, 'doctor');
    } finally {
      await chmod(file, 0o600);
    }
    await client.removeProfile('corp');
    await client.close();
  });

  it('login --profile on an api-key profile says how to replace the key', async () => {
    const r = await cli(['login', '--profile', 'cp', '--no-browser']);
    expect(r.code).toBe(ExitCodes.error);
    expect(r.stderr).toMatch(/^qwen-token: profile "cp" is an API key: there is nothing to log in to; .*profile add cp --replace/m);
    const missing = await cli(['status', '--profile', 'nope']);
    expect(missing.code).toBe(ExitCodes.profileNotFound);
  });

  it('watch --profile shows that profile\'s key change by fingerprint, and not another profile\'s', async () => {
    let child: import('node:child_process').ChildProcess | undefined;
    const watch = runCli(['watch', '--json', '--profile', 'cp'], { env: fx.env, timeoutMs: 20_000, onSpawn: (c) => (child = c) });
    // The watch is up once the daemon counts its connection.
    const client = fx.client();
    const before = (await client.status()).connected_clients;
    await until(async () => (await client.status()).connected_clients > before, 'the watch connected');
    await new Promise((r) => setTimeout(r, 200));
    const other = await cli(['profile', 'add', 'ds', '--replace', '--no-verify'], { stdin: KEY });
    expect(other.code).toBe(0);
    const replaced = await cli(['profile', 'add', 'cp', '--replace'], { stdin: NEW_KEY });
    expect(replaced.code).toBe(0);
    expect(replaced.stdout).toMatch(/^Replaced profile cp/);
    expect(await client.getAccessToken({ profile: 'cp', noCache: true })).toBe(NEW_KEY);
    await new Promise((r) => setTimeout(r, 300));
    child!.kill('SIGINT');
    const r = await watch;
    expect(r.code).toBe(ExitCodes.cancelled);
    const events = r.stdout.trim().split('\n').map((l) => JSON.parse(l) as Record<string, unknown>);
    expect(events[0]).toMatchObject({ event: 'watch.started', profile: 'cp', state: 'static' });
    const refreshed = events.filter((e) => e.event === 'token.refreshed');
    // Every one about cp (the daemon may announce a replaced key more than once), the last the new key.
    expect(refreshed.length).toBeGreaterThan(0);
    expect(new Set(refreshed.map((e) => e.profile))).toEqual(new Set(['cp']));
    expect(refreshed.at(-1)).toMatchObject({ expiry_date: null, token_fingerprint: fingerprint(NEW_KEY) });
    expectClean(r, 'watch');
    await client.close();
  });

  it('profile default makes a profile what `token` gives by default; QWEN_TOKEND_PROFILE still wins', async () => {
    const r = await cli(['profile', 'default', 'ds']);
    expect(r.code).toBe(0);
    expect(r.stdout).toBe('ds is now the default profile.\n');
    expect((await cli(['token'])).stdout === `${KEY}\n`).toBe(true);
    expect((await cli(['token'], { env: { QWEN_TOKEND_PROFILE: 'qwen' } })).stdout).toMatch(/^qat_/);
    expect((await profiles()).default_profile).toBe('ds');
    // The built-in profile can be made the default again: default_profile leaves the config file.
    const builtin = await cli(['profile', 'default', 'qwen']);
    expect(builtin.code).toBe(0);
    expect(builtin.stdout).toBe('qwen is now the default profile.\n');
    expect((await profiles()).default_profile).toBe('qwen');
    expect((await cli(['token'])).stdout).toMatch(/^qat_/);
    expect(JSON.parse(await readFile(resolveConfig(fx.env).configPath, 'utf8')).default_profile).toBeUndefined();
    expect((await cli(['profile', 'default', 'nope'])).code).toBe(ExitCodes.profileNotFound);
    // Removing the default profile makes the built-in one the default again.
    expect((await cli(['profile', 'default', 'ds'])).code).toBe(0);
    expect((await cli(['profile', 'remove', 'ds'])).code).toBe(0);
    expect((await profiles()).default_profile).toBe('qwen');
  });

  it('gateway env --profile prints the base URL that serves that profile, and it does', async () => {
    expect((await cli(['gateway', 'enable', '--port', '0'])).code).toBe(0);
    const r = await cli(['gateway', 'env', '--plain', '--profile', 'cp']);
    expect(r.code).toBe(0);
    const env = Object.fromEntries(r.stdout.trim().split('\n').map((l) => l.split('=', 2) as [string, string]));
    expect(env.OPENAI_BASE_URL).toMatch(/^http:\/\/127\.0\.0\.1:\d+\/p\/cp\/v1$/);
    const response = await fetch(`${env.OPENAI_BASE_URL}/chat/completions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', authorization: `Bearer ${env.OPENAI_API_KEY}` },
      body: JSON.stringify({ model: 'qwen-plus', messages: [{ role: 'user', content: 'via the gateway' }] }),
    });
    expect(response.status).toBe(200);
    expect(fx.server.lastRequest('apiChat')!.headers.authorization === `Bearer ${NEW_KEY}`).toBe(true);
    expect((await cli(['gateway', 'env', '--profile', 'nope'])).code).toBe(ExitCodes.profileNotFound);
  });

  it('profile remove deletes the files; the built-in profile is refused', async () => {
    const files = (await profiles()).profiles.find((p) => p.name === 'cp')!.files;
    const r = await cli(['profile', 'remove', 'cp']);
    expect(r.code).toBe(0);
    for (const f of files) await expect(stat(f)).rejects.toThrow();
    expect((await cli(['profile', 'remove', 'qwen'])).code).toBe(ExitCodes.error);
    expect((await cli(['profile', 'remove', 'cp'])).code).toBe(ExitCodes.profileNotFound);
  });

  it('an oauth-device client secret is read from standard input, never argv, and stored as a secret', async () => {
    const bad = await cli(['profile', 'add', 'conf', '--kind', 'oauth-device', '--issuer', issuer, '--client-id', 'cli', '--token-auth-method', 'basic', '--base-url', 'https://llm.example.com/v1']);
    expect(bad.code).toBe(ExitCodes.usage);
    expect(bad.stderr).toMatch(/--token-auth-method.*Allowed choices are client_secret_post, client_secret_basic/);
    const short = await cli(['profile', 'add', 'conf', '--kind', 'oauth-device', '--issuer', issuer, '--client-id', 'cli', '--token-lifetime', '30', '--base-url', 'https://llm.example.com/v1']);
    expect(short.code).toBe(ExitCodes.usage);
    expect(short.stderr).toContain('a whole number of seconds from 60 to 31536000');
    const noSecret = await cli(['profile', 'add', 'conf', '--kind', 'oauth-device', '--issuer', issuer, '--client-id', 'cli', '--token-auth-method', 'client_secret_basic', '--base-url', 'https://llm.example.com/v1']);
    expect(noSecret.code).toBe(ExitCodes.usage);
    expect(noSecret.stderr).toContain('give --client-secret too');
    const misplaced = await cli(['profile', 'add', 'k', '--preset', 'dashscope', '--token-auth-method', 'client_secret_basic'], { stdin: KEY });
    expect(misplaced.code).toBe(ExitCodes.usage);
    expect(misplaced.stderr).toContain('--token-auth-method does not apply to api-key profiles');

    const r = await cli(
      ['profile', 'add', 'conf', '--kind', 'oauth-device', '--issuer', issuer, '--client-id', 'cli', '--client-secret', '--token-auth-method', 'client_secret_basic', '--token-lifetime', '28800', '--base-url', 'https://llm.example.com/v1'],
      { stdin: CLIENT_SECRET },
    );
    expect(r.code).toBe(0);
    expect(JSON.parse(await readFile(resolveConfig(fx.env).configPath, 'utf8')).profiles.conf).toMatchObject({
      kind: 'oauth-device',
      token_endpoint_auth_method: 'client_secret_basic',
      token_lifetime_seconds: 28_800,
    });
    expect(r.stdout).toContain(`login --profile conf`);
    expectClean(r, 'profile add --client-secret');
    const conf = (await profiles()).profiles.find((p) => p.name === 'conf')!;
    expect(JSON.stringify(conf)).not.toContain(CLIENT_SECRET);
    expectClean(await cli(['profile', 'show', 'conf']), 'profile show');

    // --replace alone changes what is given and keeps the rest, the stored secret included.
    const lifetime = await cli(['profile', 'add', 'conf', '--replace', '--token-lifetime', '600']);
    expect(lifetime.code).toBe(0);
    const configPath = resolveConfig(fx.env).configPath;
    expect(JSON.parse(await readFile(configPath, 'utf8')).profiles.conf).toMatchObject({ token_endpoint_auth_method: 'client_secret_basic', token_lifetime_seconds: 600 });
    expect((await profiles()).profiles.find((p) => p.name === 'conf')!.settings).toMatchObject({ has_client_secret: true });
    const newSecret = await cli(['profile', 'add', 'conf', '--replace', '--client-secret'], { stdin: `${CLIENT_SECRET}-2` });
    expect(newSecret.code).toBe(0);
    expectClean(newSecret, 'profile add --replace --client-secret');
    expect((await cli(['profile', 'remove', 'conf'])).code).toBe(0);
  });
});

describe('a daemon the CLI starts', () => {
  beforeAll(async () => {
    fx = await createFixture({ server: { apiKeys: [KEY] }, env: { QWEN_TOKEND_AUTOSTART: '1' } });
  });

  afterAll(async () => {
    // Started by the CLI, not by the fixture: stopped by its pid.
    const client = fx.client({ autostart: false });
    const pid = await client.status().then(
      (s) => s.pid,
      () => null,
    );
    await client.close();
    if (pid !== null) {
      process.kill(pid, 'SIGTERM');
      await until(() => {
        try {
          process.kill(pid, 0);
          return false;
        } catch {
          return true;
        }
      }, 'the autostarted daemon to exit', 10_000);
    }
    await fx.cleanup();
  });

  it('profile add starts it, and no command line on the machine holds the key meanwhile', async () => {
    const r = await cli(['profile', 'add', 'auto', '--kind', 'api-key', '--base-url', fx.server.apiKeyBaseUrl], { stdin: KEY });
    expect(r.stderr).toContain('Checked the key');
    expect(r.code).toBe(0);
    expect(r.argvSeen.some((a) => a.includes('qwen-tokend.js'))).toBe(true);
    expectClean(r, 'profile add with autostart');
    expect((await cli(['token', '--profile', 'auto'])).stdout === `${KEY}\n`).toBe(true);
  });
});
