/**
 * The gateway's pure parts as tables: routing, the model prefix, upstream URLs, header
 * filtering, limits from the environment, and the gateway key.
 */
import { describe, expect, it } from 'vitest';
import { clientResponseFields, looksLikeExpiredToken, upstreamRequestFields } from '../daemon/gateway/forward.js';
import { execFileSync } from 'node:child_process';
import { chmod, mkdtemp, rm, truncate, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { keyMatches, loadOrCreateGatewayKey, newGatewayKey, readGatewayKey } from '../daemon/gateway/key.js';
import { GATEWAY_DEFAULTS, resolveGatewayEnv } from '../daemon/gateway/limits.js';
import { configFilePath } from '../shared/config.js';
import { profileFromModel, routeRequest, upstreamUrl } from '../daemon/gateway/routing.js';
import { keeperProfile } from '../daemon/gateway/registry-profiles.js';
import { ProfileNeedsLoginError } from '../daemon/gateway/profiles.js';
import { QwenConfigError, QwenRefreshTokenInvalidError, QwenTokenExpiredError, QwenTokenNotAvailableError } from '../shared/errors.js';

const known = (name: string) => ['qwen', 'work'].includes(name);

describe('routeRequest', () => {
  it.each([
    ['POST', '/v1/chat/completions', { kind: 'forward', profile: 'qwen', explicit: false, rest: '/chat/completions' }],
    ['POST', '/v1/chat/completions?a=1&b=2', { kind: 'forward', profile: 'qwen', explicit: false, rest: '/chat/completions?a=1&b=2' }],
    ['POST', '/p/work/v1/messages', { kind: 'forward', profile: 'work', explicit: true, rest: '/messages' }],
    ['GET', '/v1/models', { kind: 'models' }],
    ['GET', '/p/work/v1/models', { kind: 'models', profile: 'work' }],
    ['POST', '/v1/models', { kind: 'forward', profile: 'qwen', explicit: false, rest: '/models' }],
    ['GET', '/p/nope/v1/models', { kind: 'error', status: 404, code: 'unknown_profile' }],
    ['GET', '/p/../v1/models', { kind: 'error', status: 400, code: 'invalid_path' }],
    ['GET', '/v1/../../etc/passwd', { kind: 'error', status: 400, code: 'invalid_path' }],
    ['GET', '/v1/%2e%2e/admin', { kind: 'error', status: 400, code: 'invalid_path' }],
    ['GET', '/v2/models', { kind: 'error', status: 404, code: 'unknown_route' }],
    ['GET', '/p/work', { kind: 'error', status: 404, code: 'unknown_route' }],
    ['GET', 'http://evil/v1/models', { kind: 'error', status: 400, code: 'invalid_path' }],
  ])('%s %s', (method, target, expected) => {
    expect(routeRequest(method, target, 'qwen', known)).toMatchObject(expected);
  });
});

describe('profileFromModel', () => {
  it.each([
    ['qwen/coder-model', { profile: 'qwen', model: 'coder-model' }],
    ['qwen-portal/coder-model', { profile: 'qwen', model: 'coder-model' }],
    ['work/org/model', { profile: 'work', model: 'org/model' }],
    ['meta-llama/Llama-3', null],
    ['coder-model', null],
    ['/coder-model', null],
    ['qwen/', null],
  ])('%s', (model, expected) => {
    expect(profileFromModel(model, known)).toEqual(expected);
  });
});

describe('upstreamUrl', () => {
  it.each([
    ['https://portal.qwen.ai/v1', '/chat/completions', 'https://portal.qwen.ai/v1/chat/completions'],
    ['https://dashscope-intl.aliyuncs.com/compatible-mode/v1/', '/models?x=1', 'https://dashscope-intl.aliyuncs.com/compatible-mode/v1/models?x=1'],
    ['https://dashscope-intl.aliyuncs.com/apps/anthropic', '/messages', 'https://dashscope-intl.aliyuncs.com/apps/anthropic/v1/messages'],
  ])('%s + %s', (base, rest, expected) => {
    expect(upstreamUrl(base, rest).href).toBe(expected);
  });
});

describe('header filtering', () => {
  it('drops hop-by-hop headers, those named by Connection and client credentials; adds the credential', () => {
    const out = upstreamRequestFields(
      [
        'Host', 'gateway',
        'Connection', 'keep-alive, X-Private',
        'X-Private', '1',
        'Keep-Alive', 'timeout=5',
        'Transfer-Encoding', 'chunked',
        'Content-Length', '12',
        'TE', 'trailers',
        'Upgrade', 'h2c',
        'Proxy-Authorization', 'Basic abc',
        'Authorization', 'Bearer client',
        'X-Api-Key', 'client',
        'api-key', 'client',
        'Cookie', 'session=1',
        'Expect', '100-continue',
        'X-DashScope-AuthType', 'client-set',
        'Content-Type', 'application/json',
        'User-Agent', 'tool/1',
        'Accept', 'a/b',
        'Accept', 'c/d',
      ],
      { Authorization: 'Bearer profile', 'X-DashScope-AuthType': 'qwen-oauth' },
    );
    expect(out).toEqual([
      'content-type', 'application/json',
      'user-agent', 'tool/1',
      'accept', 'a/b',
      'accept', 'c/d',
      'authorization', 'Bearer profile',
      'x-dashscope-authtype', 'qwen-oauth',
    ]);
  });

  it('refuses a credential holding a line break rather than sending it as a second header', () => {
    expect(() => upstreamRequestFields([], { authorization: 'Bearer a\r\nx-evil: 1' })).toThrow(/line break/);
  });

  it('passes response headers except hop-by-hop ones and those named by Connection; the length only when the body keeps its framing', () => {
    const fields = ['content-type', 'text/event-stream', 'connection', 'close, x-hop', 'x-hop', '1', 'transfer-encoding', 'chunked', 'x-request-id', 'r1', 'set-cookie', 'a=1', 'set-cookie', 'b=2', 'content-length', '5'];
    expect(clientResponseFields(fields, true)).toEqual(['content-type', 'text/event-stream', 'x-request-id', 'r1', 'set-cookie', 'a=1', 'set-cookie', 'b=2', 'content-length', '5']);
    expect(clientResponseFields(fields, false)).toEqual(['content-type', 'text/event-stream', 'x-request-id', 'r1', 'set-cookie', 'a=1', 'set-cookie', 'b=2']);
  });

  it("recognises Qwen's expired-token answer", () => {
    expect(looksLikeExpiredToken('{"error":{"code":"invalid_api_key","message":"invalid access token or token expired"}}')).toBe(true);
    expect(looksLikeExpiredToken('{"error":{"message":"rate limited"}}')).toBe(false);
  });
});

describe('limits and paths from the environment', () => {
  it('defaults, the socket beside the token socket, and the config file under XDG_CONFIG_HOME', () => {
    const env = resolveGatewayEnv({}, '/run/user/1/qwen-tokend/qwen-tokend.sock', '/home/me');
    expect(env).toEqual({ socketPath: '/run/user/1/qwen-tokend/gateway.sock', configPath: '/home/me/.config/qwen-tokend/config.json', limits: GATEWAY_DEFAULTS });
    expect(configFilePath({ XDG_CONFIG_HOME: '/cfg' }, '/home/me')).toBe('/cfg/qwen-tokend/config.json');
    expect(configFilePath({ QWEN_TOKEND_CONFIG: '~/x.json', XDG_CONFIG_HOME: '/cfg' }, '/home/me')).toBe('/home/me/x.json');
  });

  it('reads every limit and names the variable of a bad value', () => {
    const env = resolveGatewayEnv(
      { QWEN_TOKEND_GATEWAY_MAX_BODY_BYTES: '2048', QWEN_TOKEND_GATEWAY_REPLAY_BYTES: '4096', QWEN_TOKEND_GATEWAY_MAX_CONCURRENT: '3', QWEN_TOKEND_GATEWAY_SOCKET: '/tmp/g.sock' },
      '/run/q.sock',
      '/home/me',
    );
    expect(env.limits).toMatchObject({ maxBodyBytes: 2048, replayBytes: 2048, maxConcurrent: 3 });
    expect(env.socketPath).toBe('/tmp/g.sock');
    expect(() => resolveGatewayEnv({ QWEN_TOKEND_GATEWAY_MAX_CONCURRENT: 'lots' }, '/run/q.sock', '/h')).toThrow(QwenConfigError);
    expect(() => resolveGatewayEnv({ QWEN_TOKEND_GATEWAY_MAX_CONCURRENT: '0' }, '/run/q.sock', '/h')).toThrow(/QWEN_TOKEND_GATEWAY_MAX_CONCURRENT must be at least 1/);
  });
});

describe('gateway key', () => {
  it('has 256 random bits and matches only itself', () => {
    const a = newGatewayKey();
    const b = newGatewayKey();
    expect(a).toMatch(/^qtgw_[A-Za-z0-9_-]{43}$/);
    expect(Buffer.from(a.slice(5), 'base64url')).toHaveLength(32);
    expect(a).not.toBe(b);
    expect(keyMatches(a, a)).toBe(true);
    expect(keyMatches(b, a)).toBe(false);
    expect(keyMatches(a.slice(0, -1), a)).toBe(false);
    expect(keyMatches('', a)).toBe(false);
  });

  it('a key file that cannot hold a key (too large, a FIFO, readable by others) is refused unread', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'qtd-gwkey-'));
    try {
      const path = join(dir, 'gateway.key');
      expect(await readGatewayKey(path)).toBeNull();
      const key = await loadOrCreateGatewayKey(path);
      expect(await readGatewayKey(path)).toBe(key);
      // A sparse 1 GiB file costs no disk; read whole it would cost the daemon a gigabyte.
      await truncate(path, 1024 ** 3);
      await expect(readGatewayKey(path)).rejects.toThrow(/too large to hold a gateway key/);
      await rm(path);
      execFileSync('mkfifo', [path]);
      // Opened without blocking: a FIFO with no writer would otherwise hang the daemon here.
      await expect(readGatewayKey(path)).rejects.toThrow(/is not a regular file/);
      await rm(path);
      await writeFile(path, `${newGatewayKey()}\n`, { mode: 0o644 });
      await chmod(path, 0o644);
      await expect(readGatewayKey(path)).rejects.toThrow(QwenConfigError);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});

describe('the qwen profile over the token keeper', () => {
  const creds = (token: string) => ({ access_token: token, refresh_token: 'r', token_type: 'Bearer', expiry_date: Date.now() + 3600_000, resource_url: 'portal.qwen.ai' });

  function fakeKeeper() {
    const state = { current: creds('token-1'), refreshes: 0, fail: null as Error | null, declined: false };
    const keeper = {
      servableNow: () => (state.fail ? null : state.current),
      getAccessToken: async () => {
        if (state.fail) throw state.fail;
        return state.current;
      },
      // As TokenKeeper.refreshAfterRejection: the current token when the refused one was
      // replaced; null when a refresh cannot help (`declined`); else a refresh.
      refreshAfterRejection: async (refused: string) => {
        if (state.fail) throw state.fail;
        if (refused !== state.current.access_token) return state.current;
        if (state.declined) return null;
        state.refreshes += 1;
        state.current = creds(`token-${state.refreshes + 1}`);
        return state.current;
      },
    };
    return { keeper, state };
  }

  it('sends the token with the portal headers and the base URL from resource_url', async () => {
    const { keeper } = fakeKeeper();
    const profile = keeperProfile(keeper, 'qwen-tokend/test');
    expect(await profile.credentialHeaders()).toEqual({
      authorization: 'Bearer token-1',
      'x-dashscope-useragent': 'qwen-tokend/test',
      'x-dashscope-authtype': 'qwen-oauth',
      'x-dashscope-cachecontrol': 'enable',
    });
    expect(await profile.baseUrl()).toBe('https://portal.qwen.ai/v1');
    expect(profile).toMatchObject({ name: 'qwen', kind: 'qwen-oauth', retryOnAuthFailure: true });
  });

  it('a burst of rejections of one token costs one refresh', async () => {
    const { keeper, state } = fakeKeeper();
    const profile = keeperProfile(keeper, 'ua');
    const rejected = await profile.credentialHeaders();
    const first = await profile.renewedCredentialHeaders!(rejected);
    const second = await profile.renewedCredentialHeaders!(rejected);
    expect(state.refreshes).toBe(1);
    expect(first?.authorization).toBe('Bearer token-2');
    expect(second?.authorization).toBe('Bearer token-2');
    // The new token rejected in turn: the keeper decides (here it refreshes again).
    await profile.renewedCredentialHeaders!(first!);
    expect(state.refreshes).toBe(2);
  });

  it('a refusal a refresh cannot help with, or of a token it cannot name, renews nothing', async () => {
    const { keeper, state } = fakeKeeper();
    const profile = keeperProfile(keeper, 'ua');
    const rejected = await profile.credentialHeaders();
    state.declined = true;
    expect(await profile.renewedCredentialHeaders!(rejected)).toBeNull();
    expect(await profile.renewedCredentialHeaders!({ 'x-api-key': 'something' })).toBeNull();
    expect(state.refreshes).toBe(0);
  });

  it('no credentials or a rejected refresh token: needs login, naming the command', async () => {
    const { keeper, state } = fakeKeeper();
    const profile = keeperProfile(keeper, 'ua');
    state.fail = new QwenTokenNotAvailableError('none');
    await expect(profile.credentialHeaders()).rejects.toThrow(ProfileNeedsLoginError);
    state.fail = new QwenRefreshTokenInvalidError('rejected');
    await expect(profile.renewedCredentialHeaders!({ authorization: 'Bearer token-1' })).rejects.toThrow(/qwen-token login/);
    state.fail = new QwenTokenExpiredError('expired, refresh failing');
    await expect(profile.credentialHeaders()).rejects.toThrow(QwenTokenExpiredError);
  });
});
