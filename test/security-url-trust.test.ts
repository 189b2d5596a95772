/**
 * Issue 18, items 1 and 8: the rules of shared/url-trust.ts, one case per rule.
 */
import { describe, expect, it } from 'vitest';
import { resolveConfig } from '../shared/config.js';
import { DEFAULT_CHAT_BASE_URL, trustedChatBaseUrl } from '../shared/credentials.js';
import { QwenConfigError } from '../shared/errors.js';
import { checkChatBaseUrl, isLoopbackHost, isOpenableUrl, printable, readTrustedChatHosts } from '../shared/url-trust.js';

describe('isLoopbackHost', () => {
  it('takes all of 127.0.0.0/8, ::1 and localhost, and nothing that merely starts with "127."', () => {
    for (const host of ['127.0.0.1', '127.0.0.2', '127.255.255.254', 'localhost', 'LOCALHOST', 'api.localhost', '[::1]', '::1', '[::ffff:7f00:1]', '::ffff:127.0.0.1']) {
      expect(isLoopbackHost(host), host).toBe(true);
    }
    for (const host of ['127.attacker.example', '127.0.0.1.attacker.example', '128.0.0.1', '10.0.0.1', 'localhost.attacker.example', '[::2]', 'example.com']) {
      expect(isLoopbackHost(host), host).toBe(false);
    }
  });

});

describe('the chat base URL rules (item 1)', () => {
  const remote = { oauthBaseUrl: 'https://chat.qwen.ai' };
  const local = { oauthBaseUrl: 'http://127.0.0.1:9' };

  it('accepts the portal and DashScope over https', () => {
    for (const url of ['https://portal.qwen.ai/v1', 'https://dashscope.aliyuncs.com/compatible-mode/v1', 'https://coding-intl.dashscope.aliyuncs.com/v1', 'https://dashscope-intl.aliyuncs.com/compatible-mode/v1']) {
      expect(checkChatBaseUrl(url, remote), url).toEqual({ ok: true, url });
    }
  });

  it('refuses plain http, user info, query, fragment and hosts off the list', () => {
    const refused = {
      'http://portal.qwen.ai/v1': 'plain http',
      'http://127.0.0.1:8080/v1': 'plain http',
      'https://portal.qwen.ai@attacker.example/v1': 'user info',
      'https://portal.qwen.ai/v1?x=1': 'query',
      'https://portal.qwen.ai/v1#x': 'fragment',
      'https://attacker.example/v1': 'not a trusted chat host',
      'https://dashscope.aliyuncs.com.attacker.example/v1': 'not a trusted chat host',
      'https://bucket.oss-cn-hangzhou.aliyuncs.com/v1': 'not a trusted chat host',
      'ftp://portal.qwen.ai/v1': 'not https',
    };
    for (const [url, why] of Object.entries(refused)) {
      const verdict = checkChatBaseUrl(url, remote);
      expect(verdict.ok, url).toBe(false);
      if (!verdict.ok) expect(verdict.reason, url).toContain(why);
    }
  });

  it('allows plain http to loopback only while the OAuth server is loopback too', () => {
    expect(checkChatBaseUrl('http://127.0.0.1:8080/v1', local).ok).toBe(true);
    expect(checkChatBaseUrl('http://localhost:8080/v1', local).ok).toBe(true);
    expect(checkChatBaseUrl('http://127.0.0.1:8080/v1', remote).ok).toBe(false);
    expect(checkChatBaseUrl('http://10.0.0.1/v1', local).ok).toBe(false);
  });

  it('QWEN_TOKEND_CHAT_HOSTS replaces the list; a bad entry is a configuration error', () => {
    const hosts = readTrustedChatHosts({ QWEN_TOKEND_CHAT_HOSTS: 'gateway.corp.example, *.proxy.example' });
    expect(hosts).toEqual(['gateway.corp.example', '*.proxy.example']);
    expect(checkChatBaseUrl('https://gateway.corp.example/v1', { ...remote, trustedHosts: hosts }).ok).toBe(true);
    expect(checkChatBaseUrl('https://a.proxy.example/v1', { ...remote, trustedHosts: hosts }).ok).toBe(true);
    expect(checkChatBaseUrl('https://portal.qwen.ai/v1', { ...remote, trustedHosts: hosts }).ok).toBe(false);
    expect(checkChatBaseUrl('http://gateway.corp.example/v1', { ...remote, trustedHosts: hosts }).ok).toBe(false);
    expect(() => readTrustedChatHosts({ QWEN_TOKEND_CHAT_HOSTS: 'https://x.example/' })).toThrow(QwenConfigError);
    expect(resolveConfig({ HOME: '/h', QWEN_TOKEND_CHAT_HOSTS: '*' }).trustedChatHosts).toEqual(['*']);
  });

  it('a refused resource_url gives the default base URL and says why', () => {
    expect(trustedChatBaseUrl('portal.qwen.ai', remote)).toEqual({ url: 'https://portal.qwen.ai/v1' });
    const refused = trustedChatBaseUrl('portal.qwen.ai@attacker.example', remote);
    expect(refused.url).toBe(DEFAULT_CHAT_BASE_URL);
    expect(refused.rejected).toContain('user info');
  });
});

describe('text and URLs from the server, for the terminal (item 7)', () => {
  it('opens only https addresses, or http on this machine', () => {
    expect(isOpenableUrl('https://chat.qwen.ai/authorize?user_code=ABCD')).toBe(true);
    expect(isOpenableUrl('http://127.0.0.1:8080/authorize')).toBe(true);
    for (const url of ['http://chat.qwen.ai/authorize', 'file:///etc/passwd', 'javascript:alert(1)', 'vscode://x', 'https://user:pw@chat.qwen.ai/', 'not a url']) {
      expect(isOpenableUrl(url), url).toBe(false);
    }
  });

  it('strips control characters, DEL, C1 and bidi overrides, and bounds the length', () => {
    expect(printable('AB\u001b[2J\u0007CD\u009b\u202eEF\u007f')).toBe('AB[2JCDEF');
    expect(printable('x'.repeat(10), 4)).toBe('xxxx…');
  });
});
