/**
 * Issue 18, item 6: a daemon started by a client does not inherit the client's service-manager
 * variables (it would tell the caller's service manager it is ready), and readiness is reported
 * through `systemd-notify` found by absolute path, never through the PATH of whoever started us.
 */
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { chmod, mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { spawnDaemon } from '../client/autostart.js';
import { resolveConfig } from '../shared/config.js';
import { createFixture } from './support/daemon.js';
import { until } from './support/wait.js';

const cleanups: Array<() => Promise<void>> = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c().catch(() => undefined);
});

async function tempDir(): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'qtd-env-'));
  cleanups.push(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

describe('autostart (item 6)', () => {
  it('drops NOTIFY_SOCKET, LISTEN_FDS, LISTEN_PID and LISTEN_FDNAMES from the daemon it starts', async () => {
    const dir = await tempDir();
    // A stand-in daemon program that records the environment it was given.
    const bin = join(dir, 'record-env.mjs');
    const out = join(dir, 'env.json');
    await writeFile(bin, `import { writeFileSync } from 'node:fs';\nwriteFileSync(${JSON.stringify(out)}, JSON.stringify(process.env));\n`);
    const env: NodeJS.ProcessEnv = {
      HOME: join(dir, 'home'),
      PATH: process.env.PATH,
      QWEN_TOKEND_BIN: bin,
      NOTIFY_SOCKET: '/run/user/0/systemd/notify',
      LISTEN_FDS: '1',
      LISTEN_PID: String(process.pid),
      LISTEN_FDNAMES: 'caller',
      KEEP_ME: 'yes',
    };
    const { exited } = spawnDaemon(resolveConfig(env), env);
    expect(await exited).toBe(0);
    const seen = JSON.parse(await readFile(out, 'utf8')) as Record<string, string>;
    for (const name of ['NOTIFY_SOCKET', 'LISTEN_FDS', 'LISTEN_PID', 'LISTEN_FDNAMES']) expect(seen[name], name).toBeUndefined();
    expect(seen.KEEP_ME).toBe('yes');
  });
});

describe('readiness (item 6)', () => {
  it('never runs a systemd-notify found on PATH', async () => {
    const fx = await createFixture();
    cleanups.push(() => fx.cleanup());
    const bin = join(fx.root, 'bin');
    await mkdir(bin);
    const marker = join(fx.root, 'ran');
    await writeFile(join(bin, 'systemd-notify'), `#!/bin/sh\ntouch ${JSON.stringify(marker)}\n`);
    await chmod(join(bin, 'systemd-notify'), 0o755);
    await fx.start({ PATH: `${bin}:${process.env.PATH ?? ''}`, NOTIFY_SOCKET: join(fx.root, 'notify.sock') });
    // Give a spawned child ample time to have run.
    await fx.client().status();
    await new Promise((r) => setTimeout(r, 500));
    expect(existsSync(marker)).toBe(false);
  });

  const python = ['/usr/bin/python3', '/bin/python3'].find((p) => existsSync(p));
  it.skipIf(!python || !['/usr/bin/systemd-notify', '/bin/systemd-notify'].some((p) => existsSync(p)))('still reports READY=1 to the NOTIFY_SOCKET of the service manager', async () => {
    const fx = await createFixture();
    cleanups.push(() => fx.cleanup());
    const sock = join(fx.root, 'notify.sock');
    const got = join(fx.root, 'got');
    // A stand-in service manager: one Unix datagram socket, what arrives is written to a file.
    const listener = spawn(python!, [
      '-c',
      `import socket,sys\ns=socket.socket(socket.AF_UNIX,socket.SOCK_DGRAM)\ns.bind(sys.argv[1])\nprint('up',flush=True)\nd=s.recv(4096)\nopen(sys.argv[2],'wb').write(d)`,
      sock,
      got,
    ]);
    cleanups.push(async () => void listener.kill('SIGKILL'));
    await new Promise<void>((r) => listener.stdout.once('data', () => r()));
    await fx.start({ NOTIFY_SOCKET: sock });
    await until(() => existsSync(got), 'the readiness datagram', 5_000);
    expect(await readFile(got, 'utf8')).toContain('READY=1');
  });
});
