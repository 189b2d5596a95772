/**
 * Issue 18, item 3: once the server has answered a refresh (and may have rotated the refresh
 * token), no log line is written before the new credentials are on disk. A log write that failed
 * there used to be able to stop the daemon with only the retired refresh token saved.
 * In-process: a logger that checks the files at every line, against the real local Qwen server.
 */
import { readFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino } from 'pino';
import { afterEach, beforeEach, expect, it } from 'vitest';
import { systemClock } from '../shared/clock.js';
import { parseCredentialsText, serializeCredentials, type Credentials } from '../shared/credentials.js';
import { CredentialFile } from '../daemon/credential-store.js';
import { QwenOAuthClient } from '../daemon/oauth.js';
import { TokenKeeper } from '../daemon/token-keeper.js';
import { startQwenServer, type QwenTestServer } from './support/qwen-server.js';
import { mkdirSync, writeFileSync } from 'node:fs';

let dir: string;
let server: QwenTestServer;
let keeper: TokenKeeper | undefined;

beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), 'qtd-logorder-'));
  server = await startQwenServer({ rotateRefreshTokens: true });
});

afterEach(async () => {
  await keeper?.stop();
  keeper = undefined;
  await server.close();
  await rm(dir, { recursive: true, force: true });
});

function refreshTokenIn(path: string): string | undefined {
  try {
    return parseCredentialsText(readFileSync(path, 'utf8'), path).refresh_token;
  } catch {
    return undefined;
  }
}

for (const withCli of [false, true]) {
  it(`writes no log line between the refresh answer and the save${withCli ? ' (inside the Qwen CLI lock, both files)' : ''}`, async () => {
    const ownPath = join(dir, 'own', 'creds.json');
    const cliPath = join(dir, 'qwen', 'oauth_creds.json');
    /** Set while the server's answer is known and not yet on disk; each line written then is a violation. */
    let newRefreshToken: string | undefined;
    const violations: string[] = [];
    const lines: string[] = [];
    const destination = {
      write(line: string) {
        lines.push(line);
        if (newRefreshToken === undefined) return;
        const savedOwn = refreshTokenIn(ownPath) === newRefreshToken;
        const savedCli = !withCli || refreshTokenIn(cliPath) === newRefreshToken;
        if (!savedOwn || !savedCli) violations.push(String((JSON.parse(line) as { msg?: unknown }).msg));
      },
    };
    const logger = pino({ level: 'debug' }, destination);
    const own = new CredentialFile(ownPath, { logger, moveCorruptAside: true, ownsDirectory: true, label: 'own' });
    const cli = withCli ? new CredentialFile(cliPath, { logger, moveCorruptAside: false, ownsDirectory: false, label: 'qwen-cli' }) : null;
    const real = new QwenOAuthClient({ baseUrl: server.baseUrl, clientId: server.settings.clientId, scope: 'openid', timeoutMs: 2000 });
    const oauth = {
      refreshTokenGrant: async (token: string, signal?: AbortSignal) => {
        const grant = await real.refreshTokenGrant(token, signal);
        newRefreshToken = grant.refresh_token;
        return grant;
      },
    };
    const t = server.issueTokens({ expiresIn: 3600 });
    const seed: Credentials = { access_token: t.access_token, refresh_token: t.refresh_token, token_type: 'Bearer', expiry_date: t.expiry_date };
    mkdirSync(join(dir, 'own'), { mode: 0o700 });
    writeFileSync(ownPath, serializeCredentials(seed), { mode: 0o600 });
    if (withCli) {
      mkdirSync(join(dir, 'qwen'), { mode: 0o700 });
      writeFileSync(cliPath, serializeCredentials(seed), { mode: 0o600 });
    }
    keeper = new TokenKeeper({
      config: { refreshLeadMs: 300_000, retryMs: 60_000, qwenCliLockPath: join(dir, 'qwen', 'oauth_creds.lock'), qwenCliLockStaleMs: 35_000, httpTimeoutMs: 2000 },
      oauth,
      ownFile: own,
      cliFile: cli,
      clock: systemClock,
      logger,
    });
    await keeper.start();
    for (let i = 0; i < 3; i++) {
      newRefreshToken = undefined;
      const before = lines.length;
      await keeper.refresh();
      // The lines of this refresh were written, all of them after the save.
      expect(lines.length).toBeGreaterThan(before);
      expect(refreshTokenIn(ownPath)).toBe(newRefreshToken);
    }
    expect(violations).toEqual([]);
    // The state change is still logged, only later.
    expect(lines.some((l) => l.includes('"msg":"state changed"') && l.includes('"state":"valid"'))).toBe(true);
  });
}
