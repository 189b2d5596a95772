/**
 * The runnable examples, as a user runs them (`node examples/*.mjs`, importing the built
 * package), against a fixture daemon whose server routes chat to itself.
 */
import { execFile } from 'node:child_process';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { REPO_ROOT, assertNoSecrets, createFixture, credsFrom, type DaemonFixture } from './support/daemon.js';
import { INVALID_ACCESS_TOKEN_BODY } from './support/qwen-server.js';

const execFileP = promisify(execFile);
let fx: DaemonFixture;

beforeAll(async () => {
  fx = await createFixture();
  fx.server.settings.resourceUrl = fx.server.baseUrl;
  await fx.writeOwn(credsFrom(fx.server));
  await fx.start();
});

afterAll(async () => {
  await fx?.cleanup();
});

async function runExample(name: string, prompt: string): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const { stdout, stderr } = await execFileP(process.execPath, [join(REPO_ROOT, 'examples', name), prompt], {
      cwd: REPO_ROOT,
      env: fx.env,
      timeout: 15_000,
    });
    return { code: 0, stdout, stderr };
  } catch (err) {
    const e = err as { code?: number; stdout?: string; stderr?: string };
    return { code: typeof e.code === 'number' ? e.code : -1, stdout: e.stdout ?? '', stderr: e.stderr ?? '' };
  }
}

function checkNoTokens(out: { stdout: string; stderr: string }): void {
  assertNoSecrets(out.stdout + out.stderr, fx.server.issuedTokens(), 'example output');
}

describe('examples', () => {
  it('examples/openai-sdk.mjs prints one completion and one streamed completion', async () => {
    const chats = fx.server.counts.chat;
    const out = await runExample('openai-sdk.mjs', 'hello example');
    checkNoTokens(out);
    expect(out.stderr).toBe('');
    expect(out.code).toBe(0);
    expect(out.stdout).toBe('completion: echo: hello example\nstream: echo: hello example\n');
    expect(fx.server.counts.chat).toBe(chats + 2);
    expect(fx.server.lastChatHeaders?.['x-dashscope-authtype']).toBe('qwen-oauth');
  });

  it('examples/chat-model.mjs prints a reply with usage and a streamed reply', async () => {
    const chats = fx.server.counts.chat;
    const out = await runExample('chat-model.mjs', 'hello example');
    checkNoTokens(out);
    expect(out.stderr).toBe('');
    expect(out.code).toBe(0);
    expect(out.stdout).toBe('reply: echo: hello example\nusage: 5 tokens\nstream: echo: hello example\n');
    expect(fx.server.counts.chat).toBe(chats + 2);
    expect((fx.server.lastRequest('chat')?.json as { model?: string }).model).toBe('coder-model');
  });

  it('examples/chat-model.mjs tells the user to log in when every token is rejected', async () => {
    fx.server.injectFault({
      kind: 'respond',
      endpoint: 'chat',
      status: 401,
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify(INVALID_ACCESS_TOKEN_BODY),
    });
    try {
      const out = await runExample('chat-model.mjs', 'anyone there');
      checkNoTokens(out);
      expect(out.code).toBe(1);
      expect(out.stderr).toMatch(/^login needed: .*qwen-token login/);
    } finally {
      fx.server.clearFaults();
    }
  });
});
