#!/usr/bin/env node
/**
 * The official `openai` SDK against Qwen's portal, with the token managed by qwen-tokend.
 *
 *   npm run build && node examples/openai-sdk.mjs "Write a haiku about sockets"
 *
 * The daemon must be logged in (`qwen-token login`). Environment: the usual qwen-tokend
 * variables (QWEN_TOKEND_SOCKET, ...) pick the daemon; QWEN_MODEL picks the model (default coder-model).
 */
import OpenAI from 'openai';
import { createQwenFetch, qwenBaseURL, shutdown } from 'qwen-tokend';

const prompt = process.argv[2] ?? 'Say hello in one short sentence.';
const model = process.env.QWEN_MODEL ?? 'coder-model';

const openai = new OpenAI({
  // Required by the SDK, never sent: createQwenFetch replaces Authorization with the daemon's token.
  apiKey: 'qwen-oauth',
  baseURL: await qwenBaseURL(),
  fetch: createQwenFetch(),
});

try {
  const completion = await openai.chat.completions.create({ model, messages: [{ role: 'user', content: prompt }] });
  console.log(`completion: ${completion.choices[0]?.message.content ?? ''}`);

  const stream = await openai.chat.completions.create({ model, messages: [{ role: 'user', content: prompt }], stream: true });
  process.stdout.write('stream: ');
  for await (const chunk of stream) process.stdout.write(chunk.choices[0]?.delta?.content ?? '');
  process.stdout.write('\n');
} finally {
  await shutdown();
}
