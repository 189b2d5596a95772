/**
 * An in-process TokenKeeper on real files and the real local Qwen server, with a logger whose
 * lines are kept (for the secret ledger). For the deterministic reproductions: no watcher runs,
 * so "the file changed but the daemon has not been told yet" is a state a test can hold.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { systemClock, type Clock } from '../../shared/clock.js';
import { CredentialFile } from '../../daemon/credential-store.js';
import { createLogger, type Logger } from '../../daemon/logger.js';
import { QwenOAuthClient } from '../../daemon/oauth.js';
import { TokenKeeper, type TokenKeeperDeps } from '../../daemon/token-keeper.js';
import { startQwenServer, type QwenServerOptions, type QwenTestServer } from '../support/qwen-server.js';

export interface KeeperRig {
  dir: string;
  server: QwenTestServer;
  ownPath: string;
  cliPath: string;
  lockPath: string;
  logger: Logger;
  /** Every log line written so far (JSON text). */
  lines: string[];
  /** A keeper over the rig's files; `files` overrides the CredentialFile instances. */
  keeper(options?: { config?: Partial<TokenKeeperDeps['config']>; ownFile?: CredentialFile; cliFile?: CredentialFile | null; clock?: Clock; oauth?: TokenKeeperDeps['oauth'] }): TokenKeeper;
  ownFile(): CredentialFile;
  cliFile(): CredentialFile;
  close(): Promise<void>;
}

export async function keeperRig(serverOptions: QwenServerOptions = {}): Promise<KeeperRig> {
  const dir = await mkdtemp(join(tmpdir(), 'qtd-chaos-'));
  const server = await startQwenServer(serverOptions);
  const lines: string[] = [];
  const logger = createLogger({ level: 'debug', destination: { write: (s: string) => void lines.push(s) } });
  const ownPath = join(dir, 'own', 'qwen_oauth_creds.json');
  const cliPath = join(dir, 'qwen', 'oauth_creds.json');
  const lockPath = join(dir, 'qwen', 'oauth_creds.lock');
  const keepers: TokenKeeper[] = [];
  const rig: KeeperRig = {
    dir,
    server,
    ownPath,
    cliPath,
    lockPath,
    logger,
    lines,
    ownFile: () => new CredentialFile(ownPath, { logger, moveCorruptAside: true, ownsDirectory: true, label: 'own' }),
    cliFile: () => new CredentialFile(cliPath, { logger, moveCorruptAside: false, ownsDirectory: false, label: 'qwen-cli' }),
    keeper(options = {}) {
      const clock = options.clock ?? systemClock;
      const k = new TokenKeeper({
        config: {
          refreshLeadMs: 300_000,
          retryMs: 60_000,
          qwenCliLockPath: lockPath,
          qwenCliLockStaleMs: 1_000,
          httpTimeoutMs: 500,
          ...options.config,
        },
        oauth: options.oauth ?? new QwenOAuthClient({ baseUrl: server.baseUrl, clientId: server.settings.clientId, scope: 'openid', timeoutMs: 500 }),
        ownFile: options.ownFile ?? rig.ownFile(),
        cliFile: options.cliFile === undefined ? rig.cliFile() : options.cliFile,
        clock,
        logger,
      });
      keepers.push(k);
      return k;
    },
    async close() {
      // A keeper frozen mid-write never finishes stopping; do not wait for it.
      await Promise.race([Promise.all(keepers.map((k) => k.stop())), new Promise((r) => setTimeout(r, 500))]);
      await server.close();
      await rm(dir, { recursive: true, force: true });
    },
  };
  return rig;
}
