/**
 * The grant a profile's token file belongs to, without a daemon process: the digest of provider
 * and client, what a token file records, what happens to a file recorded for another grant
 * (deleted at read, never used) and to one an older version wrote (kept and recorded), and that
 * files without a grant (the built-in profile's, the Qwen CLI's) keep the Qwen CLI's format.
 */
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { CredentialFile, GRANT_FIELD } from '../daemon/credential-store.js';
import { createLogger } from '../daemon/logger.js';
import { grantDigest } from '../daemon/profile-config.js';
import { parseProfileCredentials } from '../daemon/profile-oauth.js';
import { serializeCredentials, type Credentials } from '../shared/credentials.js';
import type { OAuthDeviceSettings } from '../shared/profiles.js';

interface LogLine {
  level: number;
  msg: string;
  [key: string]: unknown;
}

const device: OAuthDeviceSettings = {
  kind: 'oauth-device',
  issuer: 'https://login.example.com',
  client_id: 'agent-cli',
  scope: 'openid offline_access',
  base_url: 'https://llm.example.com/v1',
};

/** Made-up tokens, unique to this file: never printed, and searched for in the log. */
const creds: Credentials = {
  access_token: 'identity-test-access-7f3a9c',
  refresh_token: 'identity-test-refresh-2b8e41',
  token_type: 'Bearer',
  expiry_date: 1_900_000_000_000,
};

let dir: string;
let lines: LogLine[];
let logger: ReturnType<typeof createLogger>;

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'qtd-identity-'));
  lines = [];
  logger = createLogger({ level: 'debug', destination: { write: (s: string) => void lines.push(JSON.parse(s) as LogLine) } });
});
afterEach(() => rmSync(dir, { recursive: true, force: true }));

/** A profile's token file as createOAuthDeviceProfile makes it, for `settings`. */
function tokenFile(path: string, settings: OAuthDeviceSettings): CredentialFile {
  return new CredentialFile(path, {
    logger,
    moveCorruptAside: true,
    ownsDirectory: true,
    label: 'profile corp',
    parse: parseProfileCredentials,
    grant: { id: grantDigest(settings), advice: () => 'run `qwen-token login --profile corp`' },
  });
}

function recordedGrant(path: string): unknown {
  return (JSON.parse(readFileSync(path, 'utf8')) as Record<string, unknown>)[GRANT_FIELD];
}

function logText(): string {
  return lines.map((l) => JSON.stringify(l)).join('\n');
}

describe('the grant of a token file', () => {
  it('is a digest of provider and client: the issuer, each endpoint and the client id change it; scope, base URL and description do not', () => {
    const id = grantDigest(device);
    expect(id).toMatch(/^[0-9a-f]{64}$/);
    expect(id).not.toContain('agent-cli');
    for (const same of [{ scope: 'openid' }, { base_url: 'https://other.example.com/v1' }, { description: 'work' }, { refresh_lead_seconds: 60 }]) {
      expect(grantDigest({ ...device, ...same })).toBe(id);
    }
    for (const other of [
      { issuer: 'https://login.example.net' },
      { client_id: 'agent-cli-2' },
      { token_endpoint: 'https://login.example.com/token' },
      { device_authorization_endpoint: 'https://login.example.com/device' },
    ]) {
      expect(grantDigest({ ...device, ...other })).not.toBe(id);
    }
  });

  it('is recorded with every write, and the file still reads as the same credentials', async () => {
    const path = join(dir, 'corp.token.json');
    const file = tokenFile(path, device);
    await file.write(creds);
    expect(recordedGrant(path)).toBe(grantDigest(device));
    const read = await file.read();
    expect(read.status).toBe('ok');
    expect(read.status === 'ok' && read.credentials).toEqual(creds);
  });

  it('a file recorded for another provider or client is deleted when read and reads as missing; the warning names the file and the login, never a token', async () => {
    const path = join(dir, 'corp.token.json');
    await tokenFile(path, device).write(creds);
    const moved = tokenFile(path, { ...device, token_endpoint: 'https://elsewhere.example.com/token' });
    expect(await moved.read()).toEqual({ status: 'missing' });
    expect(existsSync(path)).toBe(false);
    const warning = lines.find((l) => l.level === 40 && l.msg.includes('another provider or client'));
    expect(warning?.msg).toContain(path);
    expect(warning?.msg).toContain('login --profile corp');
    expect(logText()).not.toContain(creds.refresh_token);
    expect(logText()).not.toContain(creds.access_token);
    // A grant that is not even a string is another grant too.
    writeFileSync(path, JSON.stringify({ ...creds, [GRANT_FIELD]: 42 }), { mode: 0o600 });
    expect(await tokenFile(path, device).read()).toEqual({ status: 'missing' });
    expect(existsSync(path)).toBe(false);
  });

  it('a file an older version wrote (no grant) is read as it is, and stampGrant records the current grant without changing its tokens', async () => {
    const path = join(dir, 'corp.token.json');
    writeFileSync(path, serializeCredentials(creds), { mode: 0o600 });
    const file = tokenFile(path, device);
    const before = await file.read();
    expect(before.status === 'ok' && before.credentials).toEqual(creds);
    expect(await file.stampGrant()).toBe(true);
    expect(recordedGrant(path)).toBe(grantDigest(device));
    const after = await file.read();
    expect(after.status === 'ok' && after.credentials).toEqual(creds);
    // Already recorded: nothing to do; and a missing file stays missing.
    expect(await file.stampGrant()).toBe(false);
    expect(await tokenFile(join(dir, 'none.token.json'), device).stampGrant()).toBe(false);
    expect(existsSync(join(dir, 'none.token.json'))).toBe(false);
  });

  it('a file without a grant setting (the built-in profile, the Qwen CLI) is written in the Qwen CLI format, and a recorded grant never affects it', async () => {
    const path = join(dir, 'oauth_creds.json');
    const cli = new CredentialFile(path, { logger, moveCorruptAside: false, ownsDirectory: false, label: 'qwen-cli' });
    await cli.write(creds);
    expect(readFileSync(path, 'utf8')).toBe(serializeCredentials(creds));
    writeFileSync(path, JSON.stringify({ ...creds, [GRANT_FIELD]: 'something-else' }), { mode: 0o600 });
    const read = await cli.read();
    expect(read.status === 'ok' && read.credentials).toEqual(creds);
    expect(await cli.stampGrant()).toBe(false);
    expect(existsSync(path)).toBe(true);
  });
});
