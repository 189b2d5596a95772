/**
 * A scripted stand-in for qwen-tokend's socket that speaks protocol 2 (or 1) with profiles held
 * in memory: enough of `hello`, `subscribe`, `getAccessToken`, `status`, `refresh`, `login.start`,
 * `logout` and `profiles.*` for client and CLI tests that must not depend on the daemon's own
 * lifecycle. Records every request; pushes what a test tells it to.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fingerprint } from '../../shared/fingerprint.js';
import type { ProfileInfo, ProfileKind } from '../../shared/profiles.js';
import { ANTHROPIC_BASE_PATH } from './qwen-server.js';

export interface FakeProfile {
  kind: ProfileKind;
  settings: Record<string, unknown>;
  /** The key (api-key) or current access token (OAuth kinds); undefined: none yet. */
  secret: string | undefined;
  /** Epoch ms for OAuth tokens; null for a key. */
  expiry: number | null;
  baseUrl: string;
  authHeader?: 'authorization' | 'x-api-key';
}

export interface FakeRequest {
  id: number | string | null;
  method: string;
  params: Record<string, unknown>;
}

interface Conn {
  socket: Socket;
  subscribed: boolean;
  /** `subscribe {profile}` narrows pushes to those profiles; empty: every profile. */
  only: Set<string>;
}

export class FakeProfileDaemon {
  readonly dir: string;
  readonly socketPath: string;
  readonly requests: FakeRequest[] = [];
  readonly profiles = new Map<string, FakeProfile>();
  defaultProfile = 'qwen';
  /** What `hello` answers. */
  protocol: number;
  private readonly server: Server;
  private readonly conns = new Set<Conn>();
  private seq = 0;

  private constructor(protocol: number) {
    this.protocol = protocol;
    this.dir = mkdtempSync(join(tmpdir(), 'qtd-fake-'));
    this.socketPath = join(this.dir, 'd.sock');
    this.server = createServer((socket) => this.accept(socket));
    this.profiles.set('qwen', {
      kind: 'qwen-oauth',
      settings: { kind: 'qwen-oauth' },
      secret: 'qat_fake_qwen_token_0001',
      expiry: Date.now() + 3_600_000,
      baseUrl: 'https://portal.qwen.ai/v1',
    });
  }

  /** Starts one listening on a fresh private directory. */
  static async start(protocol = 2): Promise<FakeProfileDaemon> {
    const d = new FakeProfileDaemon(protocol);
    await new Promise<void>((resolve) => d.server.listen(d.socketPath, resolve));
    return d;
  }

  async close(): Promise<void> {
    for (const c of this.conns) c.socket.destroy();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
    rmSync(this.dir, { recursive: true, force: true });
  }

  /** Adds (or replaces) a profile directly, as a config file would. */
  /**
   * Three API-key profiles on a test server's key endpoints: `cp` (the key, as a Bearer token),
   * `bad` (a key it refuses) and `anthropic` (the key in `x-api-key`, at its Anthropic base).
   */
  setKeyProfiles(server: { baseUrl: string; apiKeyBaseUrl: string }, key: string, wrongKey: string): void {
    this.set('cp', { kind: 'api-key', baseUrl: server.apiKeyBaseUrl, secret: key });
    this.set('bad', { kind: 'api-key', baseUrl: server.apiKeyBaseUrl, secret: wrongKey });
    const anthropic = `${server.baseUrl}${ANTHROPIC_BASE_PATH}`;
    this.set('anthropic', { kind: 'api-key', baseUrl: anthropic, secret: key, settings: { kind: 'api-key', base_url: anthropic, auth: 'x-api-key' } });
  }

  set(name: string, profile: Partial<FakeProfile> & Pick<FakeProfile, 'kind' | 'baseUrl'>): void {
    this.profiles.set(name, {
      settings: { kind: profile.kind, base_url: profile.baseUrl },
      secret: undefined,
      expiry: profile.kind === 'api-key' ? null : Date.now() + 3_600_000,
      ...profile,
    });
  }

  /** Requests of one method (optionally about one profile; `null`: those naming none). */
  calls(method: string, profile?: string | null): FakeRequest[] {
    return this.requests.filter((r) => r.method === method && (profile === undefined || (r.params.profile ?? null) === profile));
  }

  /** Sends a notification to every subscribed connection that wants it. */
  push(method: string, params: Record<string, unknown>): void {
    const line = `${JSON.stringify({ jsonrpc: '2.0', method, params })}\n`;
    const about = typeof params.profile === 'string' ? params.profile : undefined;
    for (const c of this.conns) {
      if (!c.subscribed) continue;
      if (about !== undefined && c.only.size > 0 && !c.only.has(about)) continue;
      c.socket.write(line);
    }
  }

  /** A new token for an OAuth profile, pushed as `token.refreshed`; returns it. */
  rotate(name: string): string {
    const p = this.profiles.get(name)!;
    p.secret = `tok_${name}_${++this.seq}_${'x'.repeat(8)}`;
    p.expiry = Date.now() + 3_600_000;
    this.push('token.refreshed', this.tokenResult(name, p) as Record<string, unknown>);
    return p.secret;
  }

  tokenResult(name: string, p: FakeProfile): Record<string, unknown> {
    const base = { access_token: p.secret, token_type: 'Bearer', expiry_date: p.expiry, base_url: p.baseUrl };
    if (this.protocol < 2) return base;
    const auth_header = p.authHeader ?? (p.settings.auth === 'x-api-key' ? 'x-api-key' : 'authorization');
    return { ...base, profile: name, kind: p.kind, auth_header };
  }

  info(name: string, p: FakeProfile): ProfileInfo {
    return {
      name,
      kind: p.kind,
      builtin: name === 'qwen',
      default: name === this.defaultProfile,
      settings: p.settings,
      base_url: p.baseUrl,
      has_secret: p.secret !== undefined,
      secret_fingerprint: fingerprint(p.secret),
      state: p.secret === undefined ? 'no_credentials' : p.kind === 'api-key' ? 'static' : 'valid',
      expiry_date: p.expiry,
      next_refresh_at: null,
      last_error: null,
      files: [join(this.dir, `${name}.json`)],
    };
  }

  private accept(socket: Socket): void {
    const conn: Conn = { socket, subscribed: false, only: new Set() };
    this.conns.add(conn);
    socket.on('close', () => this.conns.delete(conn));
    socket.on('error', () => undefined);
    let buf = '';
    socket.setEncoding('utf8');
    socket.on('data', (chunk: string) => {
      buf += chunk;
      let out = '';
      for (let nl = buf.indexOf('\n'); nl !== -1; nl = buf.indexOf('\n')) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        const req = JSON.parse(line) as { id?: number; method: string; params?: Record<string, unknown> };
        const record: FakeRequest = { id: req.id ?? null, method: req.method, params: req.params ?? {} };
        this.requests.push(record);
        out += `${JSON.stringify(this.answer(conn, record))}\n`;
      }
      if (out) socket.write(out);
    });
  }

  private answer(conn: Conn, req: FakeRequest): Record<string, unknown> {
    const ok = (result: unknown) => ({ jsonrpc: '2.0', id: req.id, result });
    const fail = (code: string, message: string, rpc = -32000) => ({ jsonrpc: '2.0', id: req.id, error: { code: rpc, message, data: { code } } });
    const named = req.params.profile;
    if (named !== undefined && this.protocol < 2) return fail('QWEN_ERROR', 'params: unknown key "profile"', -32602);
    const name = typeof named === 'string' ? named : this.defaultProfile;
    const profile = this.profiles.get(name);
    const missing = () => fail('QWEN_PROFILE_NOT_FOUND', `there is no profile "${name}"`);
    switch (req.method) {
      case 'hello':
        return ok({
          protocol: this.protocol,
          daemon: 'qwen-tokend',
          version: '0.0.0-fake',
          pid: process.pid,
          ...(this.protocol >= 2 ? { default_profile: this.defaultProfile } : {}),
        });
      case 'subscribe':
        conn.subscribed = true;
        if (typeof named === 'string') conn.only.add(named);
        return ok({ subscribed: true });
      case 'getAccessToken':
      case 'refresh': {
        if (!profile) return missing();
        if (profile.secret === undefined) return fail('QWEN_TOKEN_NOT_AVAILABLE', `profile "${name}" has no credentials`);
        if (req.method === 'refresh' && profile.kind !== 'api-key') {
          this.rotate(name);
        }
        return ok(this.tokenResult(name, profile));
      }
      case 'status': {
        if (!profile) return missing();
        const info = this.info(name, profile);
        const base = {
          state: info.state,
          expiry_date: profile.expiry,
          next_refresh_at: null,
          last_refresh_at: null,
          last_error: null,
          retry_count: 0,
          source_file: null,
          token_path: join(this.dir, 'qwen.json'),
          qwen_cli_link: { enabled: false, path: join(this.dir, 'oauth_creds.json') },
          token_fingerprint: fingerprint(profile.secret),
          refresh_token_fingerprint: 'none',
          login_in_progress: false,
          pid: process.pid,
          version: '0.0.0-fake',
          protocol: this.protocol,
          uptime_ms: 1000,
          connected_clients: this.conns.size,
          requests_served: this.requests.length,
          socket_path: this.socketPath,
          now: Date.now(),
        };
        if (this.protocol < 2) return ok({ ...base, state: info.state === 'static' ? 'valid' : info.state });
        return ok({
          ...base,
          profile: name,
          kind: profile.kind,
          default_profile: this.defaultProfile,
          profiles: [...this.profiles].map(([n, p]) => this.info(n, p)),
          config_path: join(this.dir, 'config.json'),
          config_error: null,
        });
      }
      case 'login.start':
        if (!profile) return missing();
        if (profile.kind === 'api-key') {
          return fail('QWEN_CONFIG_INVALID', `profile "${name}" holds an API key: there is no login; replace the key with \`qwen-token profile add ${name} --replace\``);
        }
        return ok({ user_code: 'ABCD-EFGH', verification_uri: 'https://example.test/device', expires_in: 600 });
      case 'login.cancel':
        return ok({ cancelled: false });
      case 'logout':
        if (!profile) return missing();
        profile.secret = undefined;
        return ok({ removed: [] });
      case 'profiles.list':
        if (this.protocol < 2) return fail('', 'method not found', -32601);
        return ok({
          default_profile: this.defaultProfile,
          profiles: [...this.profiles].map(([n, p]) => this.info(n, p)),
          config_path: join(this.dir, 'config.json'),
          config_error: null,
        });
      case 'profiles.add': {
        const p = req.params as { name: string; settings: Record<string, unknown>; secret?: string; replace?: boolean; makeDefault?: boolean };
        const existing = this.profiles.get(p.name);
        if (existing && !p.replace) return fail('QWEN_CONFIG_INVALID', `profile "${p.name}" exists`);
        const kind = p.settings.kind as ProfileKind;
        this.profiles.set(p.name, {
          kind,
          settings: p.settings,
          secret: p.secret ?? existing?.secret,
          expiry: kind === 'api-key' ? null : (existing?.expiry ?? null),
          baseUrl: String(p.settings.base_url),
        });
        if (p.makeDefault) this.defaultProfile = p.name;
        this.push('profiles.changed', { profiles: [...this.profiles.keys()], default_profile: this.defaultProfile });
        return ok({ profile: this.info(p.name, this.profiles.get(p.name)!), replaced: existing !== undefined });
      }
      case 'profiles.remove': {
        const target = String(req.params.name);
        if (!this.profiles.has(target)) return ok({ removed: false, files: [] });
        this.profiles.delete(target);
        return ok({ removed: true, files: [join(this.dir, `${target}.json`)] });
      }
      case 'profiles.setDefault': {
        const target = String(req.params.name);
        if (!this.profiles.has(target)) return fail('QWEN_PROFILE_NOT_FOUND', `no profile named "${target}"`);
        const previous = this.defaultProfile;
        this.defaultProfile = target;
        this.push('profiles.changed', { profiles: [...this.profiles.keys()], default_profile: this.defaultProfile });
        return ok({ default_profile: target, previous });
      }
      default:
        return fail('', `method not found: ${req.method}`, -32601);
    }
  }
}
