/**
 * Deterministic reproductions of what the chaos runs found, on an in-process TokenKeeper:
 * the state a race or a kill produces is set up by hand, so each test fails every time the
 * defect is there (the chaos scenarios only hit it now and then).
 */
import { createConnection, type Socket } from 'node:net';
import { expect } from 'vitest';
import { TokenClient } from '../../client/token-client.js';
import { CredentialFile } from '../../daemon/credential-store.js';
import { parseCredentialsText, type Credentials } from '../../shared/credentials.js';
import { createFixture, credsFrom } from '../support/daemon.js';
import { TOKEN_PATH } from '../support/qwen-server.js';
import { readRaw, report, sleep, until, writeAtomically, type SecretLedger } from './harness.js';
import { keeperRig } from './in-process.js';

function seed(server: { issueTokens(o: { expiresIn: number }): Credentials & { expires_in: number } }, expiresIn: number): Credentials {
  const t = server.issueTokens({ expiresIn });
  return { access_token: t.access_token, refresh_token: t.refresh_token, token_type: 'Bearer', resource_url: t.resource_url, expiry_date: t.expiry_date };
}

/**
 * The Qwen CLI refreshes the shared token and writes its file; before the daemon has handled
 * the file event, its own refresh runs. It must not present the refresh token the CLI just
 * used (the server has retired it).
 */
export async function refreshRightAfterQwenCliRefreshed(ledger: SecretLedger): Promise<void> {
  const rig = await keeperRig();
  try {
    const shared = seed(rig.server, 3600);
    await rig.cliFile().write(shared);
    const keeper = rig.keeper();
    await keeper.start();
    // The Qwen CLI's refresh: same wire request, result written atomically to its file.
    const res = await fetch(`${rig.server.baseUrl}${TOKEN_PATH}`, {
      method: 'POST',
      headers: { 'content-type': 'application/x-www-form-urlencoded', accept: 'application/json' },
      body: new URLSearchParams({ grant_type: 'refresh_token', refresh_token: shared.refresh_token, client_id: rig.server.settings.clientId }),
    });
    const body = (await res.json()) as { access_token: string; refresh_token: string; expires_in: number; resource_url?: string };
    await writeAtomically(rig.cliPath, {
      access_token: body.access_token,
      refresh_token: body.refresh_token,
      token_type: 'Bearer',
      resource_url: body.resource_url,
      expiry_date: Date.now() + body.expires_in * 1000,
    });
    // No fileChanged() yet: the watcher event is still on its way.
    const result = await keeper.refresh().catch((e: unknown) => e);
    if (result instanceof Error) ledger.addError('regression: refresh error', result);
    const reuse = rig.server.reuseCount;
    report('regression: daemon refresh right after a Qwen CLI refresh', { 'reuse count': reuse });
    expect(reuse, 'the daemon presented the refresh token the Qwen CLI had just retired').toBe(0);
    expect(result).not.toBeInstanceOf(Error);
  } finally {
    rig.lines.forEach((l) => ledger.addText('regression: keeper log', l));
    ledger.addServer(rig.server);
    await rig.close();
  }
}

/**
 * A daemon stops dead (SIGKILL, power loss) between its two writes of one refreshed set: the
 * first file is written, the second never. The next daemon must leave BOTH files on the newest
 * credentials after its next refresh; a Qwen CLI file left on a retired refresh token makes
 * the Qwen CLI fail and delete it at its next refresh.
 */
export async function deathBetweenTheTwoWrites(ledger: SecretLedger): Promise<void> {
  const rig = await keeperRig();
  try {
    const shared = seed(rig.server, 3600);
    await rig.cliFile().write(shared);
    // After `writesLeft` more writes, every write hangs forever: the process is gone.
    const gate = { writesLeft: Number.POSITIVE_INFINITY };
    class DyingFile extends CredentialFile {
      override write(c: Credentials): Promise<void> {
        if (gate.writesLeft <= 0) return new Promise<void>(() => undefined);
        gate.writesLeft--;
        return super.write(c);
      }
    }
    const opts = (label: 'own' | 'qwen-cli') => ({ logger: rig.logger, moveCorruptAside: label === 'own', ownsDirectory: label === 'own', label });
    const first = rig.keeper({ ownFile: new DyingFile(rig.ownPath, opts('own')), cliFile: new DyingFile(rig.cliPath, opts('qwen-cli')) });
    await first.start();
    gate.writesLeft = 1;
    void first.refresh().catch(() => undefined);
    const newest = () => rig.server.issuedTokens('refresh').at(-1);
    const onDisk = async (path: string) => {
      const raw = await readRaw(path);
      return raw === null ? null : parseCredentialsText(raw, path).refresh_token;
    };
    // One file has the refreshed set, the other never will.
    await until(
      async () => newest() !== shared.refresh_token && ((await onDisk(rig.ownPath)) === newest() || (await onDisk(rig.cliPath)) === newest()),
      3000,
      'the first of the two writes',
    );

    // The next daemon: start, one refresh (it waits out the dead one's lock), then look at both files.
    const second = rig.keeper();
    await second.start();
    const result = await second.refresh().catch((e: unknown) => e);
    if (result instanceof Error) ledger.addError('regression: refresh error', result);
    expect(result).not.toBeInstanceOf(Error);
    const ownOk = (await onDisk(rig.ownPath)) === newest();
    const cliOk = (await onDisk(rig.cliPath)) === newest();
    report('regression: death between the two writes', { 'own file newest': String(ownOk), 'Qwen CLI file newest': String(cliOk), 'reuse count': rig.server.reuseCount });
    expect(ownOk, 'own file on the newest refresh token').toBe(true);
    expect(cliOk, 'the Qwen CLI file on the newest refresh token (not left on a retired one)').toBe(true);
    expect(rig.server.reuseCount).toBe(0);
  } finally {
    rig.lines.forEach((l) => ledger.addText('regression: keeper log', l));
    ledger.addServer(rig.server);
    await rig.close();
  }
}

/**
 * Two outside writes of the Qwen CLI file a few milliseconds apart (a refresh and a login, or
 * the daemon's own write and the Qwen CLI's): the second, newer one must be adopted within 1 s.
 * chokidar drops a second 'change' of one path within 50 ms, so a watcher that relies on one
 * event per write never sees it.
 */
export async function quickSuccessiveWrites(ledger: SecretLedger): Promise<void> {
  const fx = await createFixture({ env: { QWEN_TOKEND_LOG_LEVEL: 'info' } });
  try {
    await fx.writeCli(credsFrom(fx.server, 3600));
    await fx.start();
    let adopted = 0;
    const rounds = 2;
    for (let i = 0; i < rounds; i++) {
      const first = credsFrom(fx.server, 7200 + i);
      const second = credsFrom(fx.server, 9000 + i);
      await writeAtomically(fx.qwenCliPath, first);
      await sleep(5);
      await writeAtomically(fx.qwenCliPath, second);
      const ok = await until(async () => (await fx.readOwn())?.access_token === second.access_token, 1_000, 'adoption of the second write').then(
        () => true,
        () => false,
      );
      if (ok) adopted++;
      await sleep(200);
    }
    report('regression: two Qwen CLI writes 5 ms apart', { rounds, 'second write adopted within 1 s': adopted });
    expect(adopted, 'second of two quick writes adopted').toBe(rounds);
  } finally {
    ledger.addFixture(fx, 'quick successive writes');
    await fx.cleanup();
  }
}

/**
 * The daemon's accept backlog is full (it is stopped for a moment, or a thousand clients
 * connect at once): connect() on a Unix socket then fails with EAGAIN. That is as transient as
 * a daemon restart, so a client must wait and retry within its reconnect window, not fail at once.
 */
export async function fullAcceptBacklog(ledger: SecretLedger): Promise<void> {
  const fx = await createFixture({ env: { QWEN_TOKEND_LOG_LEVEL: 'info' } });
  const sockets: Socket[] = [];
  const client = new TokenClient({ env: fx.env, autostart: false, reconnectWindowMs: 5_000, minValidityMs: 0 });
  try {
    await fx.writeOwn(credsFrom(fx.server));
    await fx.start();
    const proc = fx.proc!;
    proc.kill('SIGSTOP');
    let eagain = false;
    try {
      // Connections queue in the kernel until the backlog is full.
      while (!eagain && sockets.length < 5_000) {
        await new Promise<void>((done) => {
          const s = createConnection(fx.socketPath);
          sockets.push(s);
          s.once('connect', () => done());
          s.once('error', (e: NodeJS.ErrnoException) => {
            if (e.code === 'EAGAIN') eagain = true;
            done();
          });
        });
      }
      expect(eagain, 'the backlog filled up').toBe(true);
      setTimeout(() => {
        for (const s of sockets) s.destroy();
        proc.kill('SIGCONT');
      }, 500).unref();
      const result = await client.getAccessToken({ noCache: true }).then(
        () => 'token',
        (e: unknown) => e,
      );
      if (result !== 'token') ledger.addError('regression: backlog client error', result);
      report('regression: client meets a full accept backlog', {
        'queued connections': sockets.length,
        outcome: result === 'token' ? 'waited, then got the token' : `failed: ${(result as Error).message}`,
      });
      expect(result, 'the client waited for the daemon instead of failing with EAGAIN').toBe('token');
    } finally {
      proc.kill('SIGCONT');
    }
  } finally {
    for (const s of sockets) s.destroy();
    await client.close();
    ledger.addFixture(fx, 'full backlog');
    await fx.cleanup();
  }
}
