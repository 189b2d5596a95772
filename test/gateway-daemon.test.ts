/**
 * The gateway in the real daemon: curl over the Unix socket, the `openai` SDK and a Python
 * client over the socket and over loopback TCP, the CLI's `gateway` commands, `status`, the
 * daemon's own refresh behind a rejected token, and no secret in any output.
 */
import { execFile, spawn } from 'node:child_process';
import { readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import OpenAI from 'openai';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { GatewayStatus } from '../shared/gateway-protocol.js';
import { StatusResult } from '../shared/protocol.js';
import { assertNoSecrets, CLI_BIN, createFixture, credsFrom, REPO_ROOT, type DaemonFixture } from './support/daemon.js';
import { unixSocketFetch } from './support/unix-fetch.js';

interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
}

function run(cmd: string, args: string[], env: NodeJS.ProcessEnv): Promise<Run> {
  return new Promise((resolve) => {
    const child = spawn(cmd, args, { env, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString('utf8')));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString('utf8')));
    child.on('close', (code) => resolve({ code, stdout, stderr }));
  });
}

const cli = (args: string[]) => run(process.execPath, [CLI_BIN, ...args], fx.env);

let fx: DaemonFixture;
let gatewaySocket: string;
let configPath: string;
/** Everything printed or answered that must hold no secret. */
const seen: string[] = [];

beforeAll(async () => {
  fx = await createFixture();
  configPath = join(fx.root, 'config', 'config.json');
  (fx.env as Record<string, string>).QWEN_TOKEND_CONFIG = configPath;
  fx.server.settings.resourceUrl = fx.server.baseUrl;
  await fx.writeOwn(credsFrom(fx.server));
  await fx.start();
  gatewaySocket = join(fx.runDir, 'gateway.sock');
});

afterAll(async () => {
  const key = await readFile(join(fx.home, '.one_dragon_alpha', 'gateway.key'), 'utf8').catch(() => '');
  const output = fx.output.join('\n');
  await fx.cleanup();
  if (key.trim()) {
    expect(output).not.toContain(key.trim());
    for (const text of seen) expect(text).not.toContain(key.trim());
  }
});

describe('gateway on the Unix socket of the daemon', () => {
  it('is there at start, 0600, and answers curl --unix-socket with a completion made with the daemon token', async () => {
    expect((await stat(gatewaySocket)).mode & 0o777).toBe(0o600);
    const body = JSON.stringify({ model: 'qwen-portal/coder-model', messages: [{ role: 'user', content: 'from curl' }] });
    const r = await run('curl', ['-sS', '--unix-socket', gatewaySocket, '-H', 'content-type: application/json', '-d', body, 'http://localhost/v1/chat/completions'], fx.env);
    seen.push(r.stdout, r.stderr);
    expect(r.code).toBe(0);
    expect(JSON.parse(r.stdout).choices[0].message.content).toBe('echo: from curl');
    const own = await fx.readOwn();
    const upstream = fx.server.lastRequest('chat')!;
    expect(upstream.headers.authorization).toBe(`Bearer ${own!.access_token}`);
    expect(upstream.headers['x-dashscope-authtype']).toBe('qwen-oauth');
    expect(upstream.headers['x-dashscope-useragent']).toMatch(/^qwen-tokend\//);
    expect((upstream.json as { model: string }).model).toBe('coder-model');
  });

  it('serves the openai SDK over the socket, plain and streamed', async () => {
    const sdk = new OpenAI({ apiKey: 'unused-on-the-socket', baseURL: 'http://gateway.invalid/v1', fetch: unixSocketFetch(gatewaySocket), maxRetries: 0 });
    const models = await sdk.models.list();
    expect(models.data.map((m) => m.id)).toEqual(['qwen/coder-model', 'qwen/vision-model']);
    const done = await sdk.chat.completions.create({ model: 'qwen/coder-model', messages: [{ role: 'user', content: 'from the sdk' }] });
    expect(done.choices[0]!.message.content).toBe('echo: from the sdk');
    const stream = await sdk.chat.completions.create({ model: 'qwen/coder-model', stream: true, messages: [{ role: 'user', content: 'streamed words here' }] });
    let text = '';
    for await (const chunk of stream) text += chunk.choices[0]?.delta.content ?? '';
    expect(text).toBe('echo: streamed words here');
    expect(fx.server.lastRequest('chat')!.headers.authorization).not.toContain('unused-on-the-socket');
  });

  it('serves a Python standard-library client over the socket', async () => {
    const r = await run('python3', [join(REPO_ROOT, 'test', 'support', 'gateway_client.py'), gatewaySocket], fx.env);
    seen.push(r.stdout, r.stderr);
    expect(r.stderr).toBe('');
    expect(JSON.parse(r.stdout)).toEqual({ reply: 'echo: from python', streamed: 'echo: from python' });
  });

  it('behind a token the server rejected: the daemon refreshes once and the request succeeds', async () => {
    const own = await fx.readOwn();
    fx.server.revokeAccessToken(own!.access_token);
    const refreshes = fx.server.counts.refresh;
    const chats = fx.server.counts.chat;
    const body = JSON.stringify({ model: 'coder-model', messages: [{ role: 'user', content: 'after revoke' }] });
    const r = await run('curl', ['-sS', '--unix-socket', gatewaySocket, '-H', 'content-type: application/json', '-d', body, 'http://localhost/v1/chat/completions'], fx.env);
    seen.push(r.stdout);
    expect(JSON.parse(r.stdout).choices[0].message.content).toBe('echo: after revoke');
    expect(fx.server.counts.refresh).toBe(refreshes + 1);
    expect(fx.server.counts.chat).toBe(chats + 2);
    expect((await fx.readOwn())!.access_token).not.toBe(own!.access_token);
  });

  it('a 403 a fresh token does not cure costs one refresh for a run of requests, not one each', async () => {
    // Say, a model the account may not use: every answer is 403 whatever the token.
    fx.server.injectFault({ kind: '5xx', endpoint: 'chat', status: 403, body: '{"error":{"message":"access denied","code":"AccessDenied"}}', times: 10 });
    try {
      const refreshes = fx.server.counts.refresh;
      const chats = fx.server.counts.chat;
      const body = JSON.stringify({ model: 'coder-model', messages: [{ role: 'user', content: 'not allowed' }] });
      for (let i = 0; i < 3; i++) {
        const r = await run('curl', ['-sS', '-o', '/dev/null', '-w', '%{http_code}', '--unix-socket', gatewaySocket, '-H', 'content-type: application/json', '-d', body, 'http://localhost/v1/chat/completions'], fx.env);
        expect(r.stdout).toBe('403');
      }
      // At most the first refusal refreshes and retries (none when the test before just
      // refreshed); the next ones, moments after a refresh, pass through as they came.
      const made = fx.server.counts.refresh - refreshes;
      expect(made).toBeLessThanOrEqual(1);
      expect(fx.server.counts.chat).toBe(chats + 3 + made);
    } finally {
      fx.server.clearFaults();
    }
  });
});

describe('gateway on loopback TCP through the CLI', () => {
  let env: Record<string, string>;

  it('gateway enable --port 0 listens, stores the setting, and gateway env prints what a shell needs', async () => {
    const enabled = await cli(['gateway', 'enable', '--port', '0', '--json']);
    seen.push(enabled.stdout, enabled.stderr);
    expect(enabled.code).toBe(0);
    const status = GatewayStatus.parse(JSON.parse(enabled.stdout));
    expect(status.tcp.address).toMatch(/^127\.0\.0\.1:\d+$/);
    expect(JSON.parse(await readFile(configPath, 'utf8'))).toEqual({ gateway: { tcp: { enabled: true, port: 0 } } });

    const printed = await cli(['gateway', 'env']);
    expect(printed.code).toBe(0);
    const lines = printed.stdout.trim().split('\n');
    expect(lines).toHaveLength(2);
    expect(lines[0]).toBe(`export OPENAI_BASE_URL=http://${status.tcp.address}/v1`);
    expect(lines[1]).toMatch(/^export OPENAI_API_KEY=qtgw_[A-Za-z0-9_-]{43}$/);
    env = Object.fromEntries((await cli(['gateway', 'env', '--plain'])).stdout.trim().split('\n').map((l) => l.split('=', 2) as [string, string]));
    expect(env.OPENAI_API_KEY).toBe(lines[1]!.split('=')[1]);
    // What the shell would do with it: eval in bash, then a child sees both variables.
    const viaShell = await run('bash', ['-c', `eval "$(node ${CLI_BIN} gateway env)" && node -e 'console.log(process.env.OPENAI_BASE_URL)'`], fx.env);
    expect(viaShell.stdout.trim()).toBe(env.OPENAI_BASE_URL);
  });

  it('serves the openai SDK and Python with the printed base URL and key; refuses requests without it', async () => {
    const sdk = new OpenAI({ apiKey: env.OPENAI_API_KEY, baseURL: env.OPENAI_BASE_URL, maxRetries: 0 });
    const done = await sdk.chat.completions.create({ model: 'qwen-portal/coder-model', messages: [{ role: 'user', content: 'over tcp' }] });
    expect(done.choices[0]!.message.content).toBe('echo: over tcp');
    expect(fx.server.lastRequest('chat')!.headers.authorization).not.toContain(env.OPENAI_API_KEY!);

    const py = await run('python3', [join(REPO_ROOT, 'test', 'support', 'gateway_client.py')], { ...fx.env, ...env });
    seen.push(py.stderr);
    expect(py.stderr).toBe('');
    expect(JSON.parse(py.stdout)).toEqual({ reply: 'echo: from python', streamed: 'echo: from python' });

    const chats = fx.server.counts.chat;
    const wrong = new OpenAI({ apiKey: 'qtgw_not-the-key', baseURL: env.OPENAI_BASE_URL, maxRetries: 0 });
    const err = await wrong.chat.completions.create({ model: 'coder-model', messages: [{ role: 'user', content: 'x' }] }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(OpenAI.AuthenticationError);
    expect((err as InstanceType<typeof OpenAI.AuthenticationError>).code).toBe('unauthorized');
    expect(fx.server.counts.chat).toBe(chats);
  });

  it('status shows the gateway: addresses, requests, streams and errors, never the key', async () => {
    const json = await cli(['status', '--json']);
    seen.push(json.stdout);
    const status = StatusResult.parse(JSON.parse(json.stdout));
    expect(status.gateway!.socket_path).toBe(gatewaySocket);
    expect(status.gateway!.tcp.address).toBe(env.OPENAI_BASE_URL!.slice('http://'.length, -'/v1'.length));
    expect(status.gateway!.requests_served).toBeGreaterThanOrEqual(8);
    expect(status.gateway!.errors.unauthorized).toBe(1);
    const text = await cli(['status']);
    seen.push(text.stdout);
    expect(text.stdout).toMatch(/gateway socket\s+.*gateway\.sock/);
    expect(text.stdout).toMatch(/gateway TCP\s+http:\/\/127\.0\.0\.1:\d+\/v1/);
    expect(text.stdout).toMatch(/gateway errors\s+.*unauthorized 1/);
    const gw = await cli(['gateway', 'status']);
    seen.push(gw.stdout);
    expect(gw.stdout).toMatch(/gateway requests\s+\d+ served, \d+ active, 0 streaming/);
  });

  it('every request has an access log line without tokens or keys', async () => {
    const lines = fx.logs().filter((l) => l.msg === 'gateway request');
    expect(lines.length).toBeGreaterThanOrEqual(8);
    expect(lines.every((l) => typeof l.status === 'number' && typeof l.duration_ms === 'number' && typeof l.bytes_out === 'number')).toBe(true);
    assertNoSecrets(JSON.stringify(lines), [...fx.server.issuedTokens(), env.OPENAI_API_KEY!], 'access log');
  });

  it('is listening again after a daemon restart, then gateway disable stops TCP and keeps the socket', async () => {
    await fx.stop();
    await fx.start();
    const after = GatewayStatus.parse(JSON.parse((await cli(['gateway', 'status', '--json'])).stdout));
    expect(after.tcp.enabled).toBe(true);
    expect(after.tcp.address).toMatch(/^127\.0\.0\.1:\d+$/);
    const off = await cli(['gateway', 'disable']);
    expect(off.code).toBe(0);
    const env2 = await cli(['gateway', 'env']);
    expect(env2.code).toBe(1);
    expect(env2.stderr).toContain('qwen-token gateway enable');
    expect(JSON.parse(await readFile(configPath, 'utf8')).gateway.tcp.enabled).toBe(false);
    const r = await run('curl', ['-sS', '--unix-socket', gatewaySocket, 'http://localhost/v1/models'], fx.env);
    expect(JSON.parse(r.stdout).data).toHaveLength(2);
  });
});

describe('gateway commands without a daemon', () => {
  it('exit 4 with a message naming the socket, and never start one', async () => {
    const env = { ...fx.env, QWEN_TOKEND_SOCKET: join(fx.root, 'nowhere', 'd.sock'), QWEN_TOKEND_AUTOSTART: '1' };
    const r = await run(process.execPath, [CLI_BIN, 'gateway', 'status'], env);
    expect(r.code).toBe(4);
    expect(r.stderr).toContain(join(fx.root, 'nowhere', 'd.sock'));
    expect(r.stdout).toBe('');
  });
});

describe('gateway of a daemon without credentials', () => {
  it('answers 401 naming `qwen-token login`, in the OpenAI error shape', async () => {
    const bare = await createFixture();
    try {
      await bare.start();
      const r = await new Promise<string>((resolve, reject) =>
        execFile('curl', ['-sS', '--unix-socket', join(bare.runDir, 'gateway.sock'), '-w', '\n%{http_code}', '-H', 'content-type: application/json', '-d', '{"model":"coder-model","messages":[]}', 'http://localhost/v1/chat/completions'], (err, stdout) => (err ? reject(err) : resolve(stdout))),
      );
      const [body, code] = r.split('\n');
      expect(code).toBe('401');
      const parsed = JSON.parse(body!) as { error: { code: string; message: string; type: string } };
      expect(parsed.error.code).toBe('profile_needs_login');
      expect(parsed.error.message).toContain('qwen-token login');
      expect(bare.server.counts.chat).toBe(0);
    } finally {
      await bare.cleanup();
    }
  });
});
