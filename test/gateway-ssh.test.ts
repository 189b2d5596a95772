/**
 * The docs' SSH recipe, for real: an OpenSSH server on 127.0.0.1 with a throwaway host key and
 * user key, `ssh -R` forwarding the token socket and the gateway socket to a "far side"
 * directory, and a client there getting a token and a gateway chat completion.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { chmod, mkdir, mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { createServer } from 'node:net';
import { tmpdir, userInfo } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TokenClient } from '../client/token-client.js';
import { createFixture, credsFrom, type DaemonFixture } from './support/daemon.js';
import { httpCall } from './support/gateway-harness.js';

const SSHD = ['/usr/sbin/sshd', '/usr/local/sbin/sshd'].find((p) => existsSync(p));

function runQuiet(cmd: string, args: string[]): Promise<void> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString('utf8')));
    child.on('close', (code) => (code === 0 ? resolve() : reject(new Error(`${cmd} exited ${code}: ${stderr}`))));
  });
}

function freePort(): Promise<number> {
  return new Promise((resolve) => {
    const probe = createServer().listen(0, '127.0.0.1', () => {
      const { port } = probe.address() as { port: number };
      probe.close(() => resolve(port));
    });
  });
}

async function waitFor(check: () => boolean | Promise<boolean>, what: string, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

describe.skipIf(!SSHD)('gateway and token socket over OpenSSH (ssh -R)', () => {
  let fx: DaemonFixture;
  let dir: string;
  let sshd: ChildProcess | null = null;
  let ssh: ChildProcess | null = null;
  const logs: string[] = [];
  let farTokenSocket: string;
  let farGatewaySocket: string;

  beforeAll(async () => {
    fx = await createFixture();
    fx.server.settings.resourceUrl = fx.server.baseUrl;
    await fx.writeOwn(credsFrom(fx.server));
    await fx.start();

    dir = await mkdtemp(join(tmpdir(), 'qssh-'));
    await chmod(dir, 0o700);
    const hostKey = join(dir, 'host_ed25519');
    const userKey = join(dir, 'user_ed25519');
    await runQuiet('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', hostKey]);
    await runQuiet('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', userKey]);
    await writeFile(join(dir, 'authorized_keys'), await readFile(`${userKey}.pub`), { mode: 0o600 });
    const port = await freePort();
    const hostPub = (await readFile(`${hostKey}.pub`, 'utf8')).split(' ').slice(0, 2).join(' ');
    await writeFile(join(dir, 'known_hosts'), `[127.0.0.1]:${port} ${hostPub}\n`);
    await writeFile(
      join(dir, 'sshd_config'),
      [
        `Port ${port}`,
        'ListenAddress 127.0.0.1',
        `HostKey ${hostKey}`,
        `PidFile ${join(dir, 'sshd.pid')}`,
        `AuthorizedKeysFile ${join(dir, 'authorized_keys')}`,
        'StrictModes no',
        'UsePAM no',
        'PasswordAuthentication no',
        'KbdInteractiveAuthentication no',
        'PubkeyAuthentication yes',
        'PermitRootLogin prohibit-password',
        'AllowStreamLocalForwarding yes',
        'StreamLocalBindUnlink yes',
        'LogLevel ERROR',
        '',
      ].join('\n'),
    );
    // sshd refuses to start without its privilege-separation directory (the service creates it).
    if (!existsSync('/run/sshd') && process.getuid?.() === 0) await mkdir('/run/sshd', { mode: 0o755 });
    sshd = spawn(SSHD!, ['-D', '-e', '-f', join(dir, 'sshd_config')], { stdio: ['ignore', 'pipe', 'pipe'] });
    sshd.stderr!.on('data', (d: Buffer) => logs.push(d.toString('utf8')));
    await waitFor(
      () =>
        new Promise<boolean>((resolve) => {
          const probe = createServer();
          probe.once('error', () => resolve(true));
          probe.listen(port, '127.0.0.1', () => probe.close(() => resolve(false)));
        }),
      'sshd to listen',
    );

    const far = join(dir, 'far');
    await mkdir(far, { mode: 0o700 });
    farTokenSocket = join(far, 'qwen-tokend.sock');
    farGatewaySocket = join(far, 'gateway.sock');
    // The recipe in docs/gateway.md: both sockets to the far side, stale ones replaced.
    ssh = spawn(
      'ssh',
      [
        '-F', '/dev/null',
        '-N',
        '-p', String(port),
        '-i', userKey,
        '-o', 'IdentitiesOnly=yes',
        '-o', 'BatchMode=yes',
        '-o', `UserKnownHostsFile=${join(dir, 'known_hosts')}`,
        '-o', 'StrictHostKeyChecking=yes',
        '-o', 'ExitOnForwardFailure=yes',
        '-o', 'StreamLocalBindUnlink=yes',
        '-R', `${farTokenSocket}:${fx.socketPath}`,
        '-R', `${farGatewaySocket}:${join(fx.runDir, 'gateway.sock')}`,
        `${userInfo().username}@127.0.0.1`,
      ],
      { stdio: ['ignore', 'pipe', 'pipe'] },
    );
    ssh.stderr!.on('data', (d: Buffer) => logs.push(d.toString('utf8')));
    ssh.once('exit', (code) => logs.push(`ssh exited ${code}`));
    await waitFor(() => existsSync(farTokenSocket) && existsSync(farGatewaySocket), `the forwarded sockets (${logs.join(' ')})`);
  }, 30_000);

  afterAll(async () => {
    ssh?.kill('SIGTERM');
    sshd?.kill('SIGTERM');
    await fx?.cleanup();
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  it('a client on the far side gets a token through the forwarded token socket', async () => {
    expect((await stat(farTokenSocket)).isSocket()).toBe(true);
    const client = new TokenClient({ env: { ...fx.env, QWEN_TOKEND_SOCKET: farTokenSocket }, autostart: false });
    try {
      const token = await client.getAccessToken();
      expect(token).toBe((await fx.readOwn())!.access_token);
    } finally {
      await client.close();
    }
  });

  it('a client on the far side gets a chat completion through the forwarded gateway socket', async () => {
    const answer = await httpCall({ socketPath: farGatewaySocket }, 'POST', '/v1/chat/completions', {
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ model: 'qwen/coder-model', messages: [{ role: 'user', content: 'over ssh' }] }),
    });
    expect(answer.status).toBe(200);
    expect(JSON.parse(answer.body).choices[0].message.content).toBe('echo: over ssh');
    expect(fx.server.lastRequest('chat')!.headers.authorization).toBe(`Bearer ${(await fx.readOwn())!.access_token}`);
  });
});
